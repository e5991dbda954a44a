"""`rayseg tune` on a tiny synthetic dataset with a real local Ray, real Ray Tune and a real sqlite
MLflow store: grid expansion ([[grid.rows]] x product), every pre-flight check failing before any
trial (naming key, file, columns, views, weights), and one 2x2 sweep that is killed after two
trials completed and then resumed: the parent run and its four child runs, no trial redone, and
`rayseg report` on it (tests/test_report.py covers the report on a hand-built store)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray

from rayseg import config as cfgmod
from rayseg.data.prepare import prepare_synthetic
from rayseg.partition.job import run_partition
from rayseg.train import launch, tune
from tiny import TINY, toml_text

# The shared tiny experiment (tests/tiny.py): 4 train + 2 val scenes, one epoch per stage.
BASE = {**TINY, "name": "tiny", "data.monitor_scenes": 1, "tracking.experiment": "tiny-sweep",
        "tune.max_concurrent": 2}

SWEEP_TOML = """\
extends = "base.toml"
name = "tiny-sweep"

[grid]
'loss.rpc.eta' = [0.0, 0.8]
'loss.rpc.mode' = ["point", "region"]
"""
SWEEP_NAME = "sweep-a"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tmp dir, base.toml) with a prepared, shape_detection-partitioned dataset and a local Ray
    (2 CPUs, the TRAIN_DRIVER resource trial drivers use)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tmp_path_factory.mktemp("tune")
    base = write(tmp / "base.toml", toml_text({**BASE, "data.root": str(tmp / "data"),
                                              "tracking.runs_dir": str(tmp / "runs")}))
    cfg = cfgmod.load(base).config
    launch.quiet_environment()
    ray.init(num_cpus=2, include_dashboard=False, resources={launch.TRAIN_DRIVER_RESOURCE: 100})
    assert prepare_synthetic(cfg.synthetic, cfg.data.root).ok
    assert run_partition(cfg.data.root, ["shape_detection"], cfg).ok
    yield tmp, base
    ray.shutdown()


def _client(tmp: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")


def _children(client, parent_id: str) -> list:
    exp = client.get_experiment_by_name("tiny-sweep")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# --------------------------------------------------------------------------------------------
# Grid expansion and validation: nothing starts
# --------------------------------------------------------------------------------------------


def test_grid_rows_times_product(tmp_path):
    path = write(tmp_path / "t8.toml", """
[grid]
'loss.rpc.eta' = [0.0, 0.5]
[[grid.rows]]
'loss.rpc.mode' = "point"
'loss.rpc.threshold' = "fixed"
[[grid.rows]]
loss.rpc.mode = "region"
loss.rpc.threshold = "adaptive"
""")
    exp = cfgmod.load(path)
    points = cfgmod.grid_points(exp)
    assert points == [
        {"loss.rpc.eta": 0.0, "loss.rpc.mode": "point", "loss.rpc.threshold": "fixed"},
        {"loss.rpc.eta": 0.5, "loss.rpc.mode": "point", "loss.rpc.threshold": "fixed"},
        {"loss.rpc.eta": 0.0, "loss.rpc.mode": "region", "loss.rpc.threshold": "adaptive"},
        {"loss.rpc.eta": 0.5, "loss.rpc.mode": "region", "loss.rpc.threshold": "adaptive"},
    ]
    cfg = cfgmod.apply(exp, points[2])
    assert (cfg.loss.rpc.eta, cfg.loss.rpc.mode, cfg.loss.rpc.threshold) == (0.0, "region", "adaptive")
    # Only rows (Table 2 style): one point per row.
    rows_only = write(tmp_path / "t2.toml", "[[grid.rows]]\n'augment.mix3d' = false\n[[grid.rows]]\n'augment.mix3d' = true\n")
    assert cfgmod.grid_points(cfgmod.load(rows_only)) == [{"augment.mix3d": False}, {"augment.mix3d": True}]


@pytest.mark.parametrize("text, pattern", [
    ("[[grid.rows]]\n'loss.rpc.eta' = 1.5\n", r"loss.rpc.eta: must be in \[0, 1\].*bad.toml \[grid\]"),
    ("[[grid.rows]]\n'loss.rpc.mode' = 'edge'\n", r"loss.rpc.mode: must be one of \['region', 'point'\].*bad.toml"),
    ("[[grid.rows]]\n'loss.rpc.etaa' = 0.5\n", r"loss.rpc.etaa: unknown key.*bad.toml \[grid\]"),
    ("[grid]\n'loss.rpc.eta' = [0.1]\n[[grid.rows]]\n'loss.rpc.eta' = 0.2\n",
     r"grid.rows\[0\]: \['loss.rpc.eta'\] also listed as \[grid\] product keys.*bad.toml"),
    ("[grid]\nrows = [1, 2]\n", r"grid.rows\[0\]: must be a non-empty table.*bad.toml"),
    ("[tune]\nasha = true\nmetric = 'pseudo_final_miou_3d'\n", r"tune.asha: ASHA needs a per-epoch metric"),
    ("[tune]\nmetric = 'val_accuracy'\n", r"tune.metric: must be one of"),
])
def test_bad_grid_values_fail_naming_key_and_file(tmp_path, text, pattern):
    bad = write(tmp_path / "bad.toml", text)
    with pytest.raises(cfgmod.ConfigError, match=pattern):
        tune.prepare_sweep(bad)


def test_preflight_checks_fail_before_any_trial(tiny, tmp_path):
    """Missing region columns (with the partition command), too few stored views, missing 2D
    weights, a sweep-level grid key: all reported at once, before any directory, MLflow run or
    trial exists."""
    tmp, base = tiny
    runs = tmp_path / "runs"
    path = write(tmp_path / "bad.toml", f"""
extends = "{base}"
[tracking]
runs_dir = "{runs}"
[grid]
'data.region_column' = ["shape_detection", "vccs", "gt"]
'data.num_views' = [2, 6]
'ray.num_workers' = [1]
'data.monitor_every' = [1, 3]
'model.init_2d' = ["none", "{tmp_path / 'dino.pth'}"]
""")
    with pytest.raises(tune.SweepError) as info:
        tune.prepare_sweep(path)
    msg = str(info.value)
    root = tmp / "data"
    assert "bad.toml" in msg
    assert f"lacks region column(s) ['vccs', 'gt']" in msg
    assert f"rayseg partition {root} --method vccs --method gt" in msg
    assert "data.num_views = 6" in msg and "stores only 4 views" in msg
    assert "grid key ray.num_workers" in msg and "cannot vary per trial" in msg
    assert "checkpoint file not found" in msg and "dino.pth" in msg
    assert "data.monitor_every = 3; set it to 1" in msg  # ASHA needs the metric every epoch
    assert not runs.exists()  # no sweep directory, no MLflow store

    missing = write(tmp_path / "nodata.toml", f"extends = '{base}'\n[data]\nroot = '{tmp_path / 'nowhere'}'\n"
                                              f"[grid]\n'loss.rpc.eta' = [0.1]\n")
    with pytest.raises(tune.SweepError, match=r"nowhere does not exist.*rayseg prepare synthetic"):
        tune.prepare_sweep(missing)
    no_grid = write(tmp_path / "nogrid.toml", f"extends = '{base}'\n")
    with pytest.raises(tune.SweepError, match="no \\[grid\\] table"):
        tune.prepare_sweep(no_grid)


def test_preflight_names_a_truncated_shard(tiny, tmp_path):
    """A shard truncated since the manifest was written is named before any trial starts (in a
    trial, Ray Data's reader would say only "Parquet magic bytes not found")."""
    import shutil

    tmp, base = tiny
    data = tmp_path / "data"
    shutil.copytree(tmp / "data", data)
    victim = sorted((data / "train").glob("*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    path = write(tmp_path / "cut.toml", f"extends = '{base}'\n[data]\nroot = '{data}'\n"
                                        f"[tracking]\nruns_dir = '{tmp_path / 'runs'}'\n[grid]\n'loss.rpc.eta' = [0.1]\n")
    with pytest.raises(tune.SweepError, match=rf"shard {victim}: 1000 bytes, .* truncated"):
        tune.prepare_sweep(path)
    assert not (tmp_path / "runs").exists()


def test_resources_and_concurrency_from_cluster():
    cfg = cfgmod.replace(cfgmod.Config(), **{"ray.num_workers": 0, "ray.cpus_per_worker": 0.5})
    assert tune.trial_workers(cfg).ray.num_workers == 1  # Train local mode cannot run inside a Tune trial
    assert tune.trial_resources(cfg, {"CPU": 2, "TRAIN_DRIVER": 100}) == {"CPU": 0, "TRAIN_DRIVER": 0.01}
    assert tune.max_concurrent_trials(cfg, {"CPU": 2}, 10) == 2  # one CPU kept for Ray Data
    assert tune.max_concurrent_trials(cfg, {"CPU": 2}, 1) == 1
    gpu = cfgmod.replace(cfg, **{"ray.num_workers": 2, "ray.cpus_per_worker": 4, "ray.use_gpu": True})
    assert tune.max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}, 30) == 4  # GPUs bound it
    assert tune.max_concurrent_trials(gpu, {"CPU": 64, "GPU": 0}, 30) == 1
    fixed = cfgmod.replace(cfg, **{"tune.max_concurrent": 3})
    assert tune.max_concurrent_trials(fixed, {"CPU": 64}, 30) == 3


# --------------------------------------------------------------------------------------------
# A 2x2 sweep, interrupted and resumed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tiny):
    """Run the 2x2 sweep as `rayseg tune` in a subprocess on the fixture's Ray (RAY_ADDRESS),
    SIGKILL it once two trials are complete, then resume it here. Returns what the tests check."""
    tmp, _ = tiny
    sweep_file = write(tmp / "sweep.toml", SWEEP_TOML)
    sweep_dir = tmp / "runs" / SWEEP_NAME
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rayseg", "tune", str(sweep_file), "--name", SWEEP_NAME],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done: list[Path] = []
    deadline = time.time() + 900  # generous: on a loaded 2-core machine two trials took > 400 s
    try:
        while time.time() < deadline and len(done) < 2:
            assert proc.poll() is None, (tmp / "first.log").read_text()[-4000:]
            done = sorted(sweep_dir.glob(f"{tune.TRIALS_DIR}/*/{tune.RESULT_FILE}"))
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert len(done) >= 2, "two trials did not complete in time:\n" + (tmp / "first.log").read_text()[-4000:]
    before = {p.parent.name: (p.stat().st_mtime_ns, json.loads(p.read_text()),
                              sorted(c.name for c in (p.parent / "checkpoints").iterdir())) for p in done}

    sweep = tune.prepare_sweep(sweep_file, resume=True)  # the newest sweep of this config
    assert sweep.sweep_dir == sweep_dir and sweep.resume
    result = tune.run_sweep(sweep)
    return {"tmp": tmp, "sweep_dir": sweep_dir, "before": before, "result": result}


def test_ray_keeps_hard_links_of_the_trials_checkpoints_not_copies(swept):
    """Tune trials run a Ray Train worker, which hands every checkpoint to Ray Train: its copy in
    <trial>/ray/<trainer>/<name> is the trial's own checkpoint file, hard-linked (no second copy)."""
    linked = 0
    for trial in (swept["sweep_dir"] / tune.TRIALS_DIR).iterdir():
        for copy in trial.glob("ray/*/?????????-*-e????/state.pt"):
            original = trial / "checkpoints" / copy.parent.name / "state.pt"
            if original.is_file():  # Ray and rayseg prune their own
                assert copy.stat().st_ino == original.stat().st_ino, copy
                linked += 1
    assert linked >= 4  # every trial keeps at least its last checkpoint in both places


def test_sweep_resumes_without_redoing_complete_trials(swept):
    sweep_dir, before, result = swept["sweep_dir"], swept["before"], swept["result"]
    assert result["errors"] == 0
    assert sorted(r["index"] for r in result["results"]) == [0, 1, 2, 3]
    for r in result["results"]:
        assert 0.0 <= r["metrics"]["pseudo_final_miou_3d"] <= 1.0
        assert "pseudo_miou_3d" in r["metrics"]  # the monitored metric reached Tune
    trial_dirs = sorted(d.name for d in (sweep_dir / tune.TRIALS_DIR).iterdir())
    assert trial_dirs == ["t000-0.0-point", "t001-0.0-region", "t002-0.8-point", "t003-0.8-region"]
    for name, (mtime, content, ckpts) in before.items():  # complete before the kill: untouched
        result_file = sweep_dir / tune.TRIALS_DIR / name / tune.RESULT_FILE
        assert result_file.stat().st_mtime_ns == mtime
        assert json.loads(result_file.read_text()) == content
        assert sorted(c.name for c in (sweep_dir / tune.TRIALS_DIR / name / "checkpoints").iterdir()) == ckpts
    assert all((sweep_dir / tune.TRIALS_DIR / d / tune.RESULT_FILE).is_file() for d in trial_dirs)


def test_resume_finds_a_sweep_under_another_runs_dir_and_refuses_other_overrides(swept, tmp_path, monkeypatch):
    """From another folder, a sweep started elsewhere is resumed by naming its runs_dir (what the
    interrupted sweep's summary prints); any other --set is refused."""
    sweep_dir = swept["sweep_dir"]
    monkeypatch.chdir(tmp_path)
    sweep_file = swept["tmp"] / "sweep.toml"
    runs = f"tracking.runs_dir={sweep_dir.parent}"
    sweep = tune.prepare_sweep(sweep_file, [runs], name=SWEEP_NAME, resume=True)
    assert sweep.sweep_dir == sweep_dir and sweep.resume
    with pytest.raises(tune.SweepError, match=r"drop the --set overrides \['loss.rpc.eta=0.5'\]"):
        tune.prepare_sweep(sweep_file, [runs, "loss.rpc.eta=0.5"], name=SWEEP_NAME, resume=True)


def test_2d_confusion_task_finishes_with_only_its_own_half_cpu(swept, tmp_path):
    """finish_trial's 2D-confusion task, with the rest of the cluster held (as by another trial's
    training worker and the pseudo-label actor): it reads its scenes itself, so it finishes; read
    through Ray Data it waited forever for a whole free CPU."""
    trial = tmp_path / "trial"  # a copy of a finished trial, its config on the Ray Data loader
    shutil.copytree(sorted((swept["sweep_dir"] / tune.TRIALS_DIR).iterdir())[0], trial)
    cfg = cfgmod.replace(launch.load_run(trial), **{"data.loader": "ray"})
    (trial / launch.RUN_CONFIG_FILE).write_text(cfgmod.dumps(cfg))

    @ray.remote(num_cpus=1.5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        task = ray.remote(launch.teacher_2d_confusion).options(num_cpus=0.5)
        conf = ray.get(task.remote(str(trial)), timeout=300)
        assert conf.shape[0] == conf.shape[1] and int(conf.sum()) > 0  # every pixel of the train views
    finally:
        ray.kill(holder)


def test_sweep_terminal_shows_rayseg_progress_not_ray_train_reports(swept):
    """What `rayseg tune` printed before the kill: rayseg's own step lines from the trials' Ray
    Train workers, and none of Ray Train's INFO echo of every report's metrics dict. (This sweep
    joins the fixture's Ray, so rayseg.raylocal's worker setup hook, which quiets the
    PlacementGroupCleaner in rayseg's own local Ray, is not in effect here.)"""
    printed = (swept["tmp"] / "first.log").read_text()
    assert "[rayseg] cmg epoch" in printed
    assert "Reporting training result" not in printed and "Reported metrics" not in printed


def test_trials_share_stage_cmg_when_its_settings_agree(swept):
    """The 2x2 grid's eta acts only in stage cmg_rpc, its mode also in stage cmg's monitor: two
    shared stage-cmg runs, each branched into by the two trials of its mode (hard links)."""
    sweep_dir = swept["sweep_dir"]
    shared = sorted((sweep_dir / tune.STAGE1_DIR).glob(f"*/{tune.STAGE1_DONE}"))
    assert len(shared) == 2
    for done in shared:
        name = json.loads(done.read_text())["checkpoint"]
        assert name.split("-")[1] == "cmg"
        inode = (done.parent / "checkpoints" / name / "state.pt").stat().st_ino
        branched = [d.name for d in (sweep_dir / tune.TRIALS_DIR).iterdir()
                    if (d / "checkpoints" / name / "state.pt").is_file()
                    and (d / "checkpoints" / name / "state.pt").stat().st_ino == inode]
        assert len(branched) == 2 and len({n.split("-")[-1] for n in branched}) == 1  # one mode, both etas


def test_a_later_sweep_branches_from_a_stage1_dir_an_earlier_one_trained(swept):
    """tune.stage1_dir shares stage cmg across sweeps: a second sweep, of an eta the first never
    ran (under its own runs folder and experiment, so the first sweep's report is untouched),
    trains no stage cmg of its own; its trial starts from the first sweep's region-mode
    stage-cmg checkpoint (the same file, hard-linked)."""
    tmp, sweep_dir = swept["tmp"], swept["sweep_dir"]
    stage1 = sweep_dir / tune.STAGE1_DIR
    keys_before = sorted(p.name for p in stage1.iterdir())
    path = write(tmp / "later.toml", f"""
extends = "base.toml"
name = "tiny-sweep"
[tune]
stage1_dir = "{stage1}"
[tracking]
runs_dir = "{tmp / 'runs-later'}"
experiment = "tiny-sweep-later"
[grid]
'loss.rpc.eta' = [0.5]
'loss.rpc.mode' = ["region"]
""")
    sweep = tune.prepare_sweep(path, name="sweep-b")
    result = tune.run_sweep(sweep)
    assert result["errors"] == 0 and len(result["results"]) == 1
    assert not (sweep.sweep_dir / tune.STAGE1_DIR).exists()  # nothing trained under the new sweep
    assert sorted(p.name for p in stage1.iterdir()) == keys_before  # nor a new key in the shared folder
    (trial,) = (sweep.sweep_dir / tune.TRIALS_DIR).iterdir()
    (region,) = [d.parent for d in stage1.glob(f"*/{tune.STAGE1_DONE}")
                 if launch.load_run(d.parent).loss.rpc.mode == "region"]
    name = json.loads((region / tune.STAGE1_DONE).read_text())["checkpoint"]
    shared_file = region / "checkpoints" / name / "state.pt"
    assert (trial / "checkpoints" / name / "state.pt").stat().st_ino == shared_file.stat().st_ino
    cfg = launch.load_run(trial)
    assert cfg.loss.rpc.eta == 0.5 and cfg.loss.rpc.mode == "region"


def test_stage1_key_ignores_only_later_settings():
    cfg = cfgmod.Config()
    key = tune.stage1_key(cfg)
    for later in ({"loss.rpc.eta": 0.3}, {"loss.rpc.threshold": "fixed"}, {"optim.cmg_rpc_lr": 0.01},
                  {"optim.seg_epochs": 3}, {"tune.with_seg": True}, {"name": "other"},
                  {"loss.rpc.student_classes": "tagged"}, {"ray.num_workers": 1}, {"ray.data_task_cpus": 0.25}):
        assert tune.stage1_key(cfgmod.replace(cfg, **later)) == key, later
    for acting in ({"loss.rpc.ema_decay": 0.99}, {"loss.rpc.mode": "point"}, {"optim.cmg_lr": 0.05},
                   {"loss.guidance.loss_3d": "none"}, {"seed": 1}, {"optim.cmg_rpc_init": "best_val"},
                   {"ray.num_workers": 2}):
        assert tune.stage1_key(cfgmod.replace(cfg, **acting)) != key, acting


def test_sweep_mlflow_parent_and_children(swept):
    tmp, result = swept["tmp"], swept["result"]
    client = _client(tmp)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tune.TAG_SWEEP] == SWEEP_NAME
    assert json.loads(parent.data.tags[tune.TAG_GRID_KEYS]) == ["loss.rpc.eta", "loss.rpc.mode"]
    assert parent.data.tags["rayseg.file"].endswith("sweep.toml")
    assert json.loads(parent.data.params["trial/003"]) == {"loss.rpc.eta": 0.8, "loss.rpc.mode": "region"}
    children = [c for c in _children(client, parent.info.run_id) if c.data.tags.get(tune.TAG_SUPERSEDED) != "true"]
    assert len(children) == 4  # one live child per trial, also across the kill
    by_index = {int(c.data.tags[tune.TAG_TRIAL]): c for c in children}
    assert sorted(by_index) == [0, 1, 2, 3]
    for index, child in by_index.items():
        point = json.loads(child.data.tags[tune.TAG_POINT])
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["loss.rpc.eta"] == str(point["loss.rpc.eta"])
        assert child.data.params["loss.rpc.mode"] == point["loss.rpc.mode"]
        assert child.data.params["ray.num_workers"] == "1"
        for key in ("pseudo_final_3d_miou", "pseudo_final_2d_miou"):
            assert key in child.data.metrics, (index, key)
        # sweep -> trial -> stages: the training curves live in the trial's stage runs
        stages = {s.info.run_name: s for s in _children(client, child.info.run_id)}
        # stage cmg runs once per stage-cmg setting (tune.share_stage1): under the trial that trained
        # it; every trial names that run in a tag
        assert sorted(stages) in (["cmg", "cmg_rpc", "pseudo_label"], ["cmg_rpc", "pseudo_label"]), sorted(stages)
        assert len(_children(client, child.info.run_id)) == len(stages)  # no empty or duplicate stage runs
        stage1 = client.get_run(child.data.tags[launch.TAG_STAGE1_RUN])
        assert stage1.info.run_name == "cmg" and "loss" in stage1.data.metrics
        assert {"loss", "pseudo_3d_miou", "stage"} <= set(stages["cmg_rpc"].data.metrics)
        assert "pseudo_final_3d_miou" in stages["pseudo_label"].data.metrics
        tune_metrics = next(r["metrics"] for r in result["results"] if r["index"] == index)
        assert tune_metrics["pseudo_final_miou_3d"] == pytest.approx(child.data.metrics["pseudo_final_3d_miou"])
    # Complete trials kept their child runs across the resume.
    for name, (_, content, _) in swept["before"].items():
        assert content["mlflow_run_id"] == by_index[int(name[1:4])].info.run_id


def test_report_on_the_sweep(swept, tmp_path, capsys):
    """`rayseg report` on the sweep's runs: table values equal the logged metrics (markdown in
    percent, CSV exactly), PNG and per-class CSV written and logged to the parent run."""
    from PIL import Image

    from rayseg import report

    tmp = swept["tmp"]
    client = _client(tmp)
    uri = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    md = report.run_report(uri, ["tiny-sweep"], "markdown", tmp_path / "out")
    children = {int(c.data.tags[tune.TAG_TRIAL]): c for c in _children(client, swept["result"]["parent_run_id"])
                if c.data.tags.get(tune.TAG_SUPERSEDED) != "true"}
    lines = [line for line in md["text"].splitlines() if line.startswith("| ")]
    assert lines[0] == "| rpc.eta | rpc.mode | pseudo-label 3D mIoU | pseudo-label 2D mIoU |"
    for index, line in enumerate(lines[1:5]):
        m = children[index].data.metrics
        point = json.loads(children[index].data.tags[tune.TAG_POINT])
        assert line == (f"| {point['loss.rpc.eta']} | {point['loss.rpc.mode']} | "
                        f"{100 * m['pseudo_final_3d_miou']:.1f} | {100 * m['pseudo_final_2d_miou']:.1f} |")
    assert "4 of 4 trials complete" in md["text"] and "for reporting only" in md["text"]

    from rayseg.cli import main

    capsys.readouterr()
    assert main(["report", "--experiment", "tiny-sweep", "--format", "csv", "--tracking-uri", uri,
                 "--out", str(tmp_path / "cli"), "--no-log"]) == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        m = children[int(r["trial"])].data.metrics
        assert float(r["pseudo_final_3d_miou"]) == m["pseudo_final_3d_miou"]
        assert float(r["pseudo_final_2d_miou"]) == m["pseudo_final_2d_miou"]
        assert r["run_id"] == children[int(r["trial"])].info.run_id and r["val_3d_miou"] == ""

    folder = tmp_path / "out" / "tiny-sweep"
    with Image.open(folder / "tiny-sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    best = max(children.values(), key=lambda c: c.data.metrics["pseudo_final_3d_miou"])
    per_class = list(csv.DictReader((folder / "best_per_class_iou.csv").open()))
    assert {r["run_id"] for r in per_class} == {best.info.run_id}
    assert any(r["pseudo_final_3d"] for r in per_class)
    for r in per_class:
        key = f"pseudo_final_3d_iou/{r['class']}"
        assert (float(r["pseudo_final_3d"]) == best.data.metrics[key]) if r["pseudo_final_3d"] else \
            key not in best.data.metrics
    logged = {a.path for a in client.list_artifacts(swept["result"]["parent_run_id"], "report")}
    assert {"report/report.md", "report/report.csv", "report/tiny-sweep.png", "report/best_per_class_iou.csv"} <= logged


INTERRUPTED_TOML = """\
extends = "base.toml"
name = "tiny-interrupted"

[tracking]
experiment = "tiny-interrupted"

[tune]
max_concurrent = 1

[grid]
'loss.rpc.eta' = [0.0, 0.8]
"""


def test_interrupted_sweep_is_not_reported_as_a_success(tiny):
    """Issue 18: after Ctrl+C a sweep exited 0, its MLflow parent FINISHED with
    rayseg.failed_trials=0 and "1 trials" for a 2-point grid. Now: nonzero exit, the parent
    KILLED with both trials counted unfinished, no child left RUNNING, and doctor says so."""
    from rayseg import cli

    tmp, _ = tiny
    sweep_file = write(tmp / "interrupted.toml", INTERRUPTED_TOML)
    sweep_dir = tmp / "runs" / "sweep-interrupted"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "interrupted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rayseg", "tune", str(sweep_file), "--name", sweep_dir.name],
                                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not list(sweep_dir.glob(f"{tune.TRIALS_DIR}/t000-*/config.toml")):  # the first trial runs
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune stops gracefully and returns
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text()
    assert code == 1, text[-4000:]
    assert "2 trials: 2 unfinished" in text and "--resume --name sweep-interrupted" in text
    client = _client(tmp)
    exp = client.get_experiment_by_name("tiny-interrupted")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.rayseg.sweep_role = 'parent'")
    assert parent.info.status == "KILLED"
    tags = parent.data.tags
    assert (tags["rayseg.unfinished_trials"], tags["rayseg.complete_trials"], tags["rayseg.failed_trials"]) == ("2", "0", "0")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(c.info.status != "RUNNING" for c in children)
    assert cli.main(["doctor", str(sweep_dir)]) == 1
