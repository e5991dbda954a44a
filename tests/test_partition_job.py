"""`rayseg partition` / `partition-quality` on a tiny prepared dataset, with a local Ray and an
sqlite MLflow store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rayseg import cli
from rayseg import config as cfgmod
from rayseg.config import SyntheticConfig
from rayseg.data import shards, synthetic
from rayseg.partition import job

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SYN = SyntheticConfig(num_scenes=3, num_views=2, image_width=64, image_height=48,
                      points_per_m2=150, min_points=3000, max_points=5000)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():  # another module's Ray is still up: share it, leave it running
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def make_dataset(root, tiny_scene: bool = False):
    for i in range(SYN.num_scenes):
        shards.write_scene(root, synthetic.generate_scene(SYN, i))
    if tiny_scene:  # valid for the shard contract, too small for any kNN method
        scene = synthetic.generate_scene(SYN, 0)
        keep = np.arange(8)
        for key in ("coord", "color", "normal", "label", "instance"):
            scene[key] = scene[key][keep]
        scene["scene_id"] = "tiny_room"
        shards.write_scene(root, scene)
    shards.write_manifest(root, SYN.profile)
    return root


def mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.glob("*/*.parquet"))}


def test_partition_dataset_then_rerun_is_a_no_op(tmp_path, local_ray):
    root = make_dataset(tmp_path / "ds")
    cfg = cfgmod.Config()
    first = job.run_partition(root, ["shape_detection", "gt"], cfg, progress_seconds=1)
    assert first.ok and len(first.written) == 3 and not first.skipped
    # SYN samples 150 points/m^2, where the default 50-point minimum region covers ~0.3 m^2
    assert len(first.warnings) == 1 and "partition.sd_min_size = 50 points" in first.warnings[0]
    assert "WARNING shape_detection: partition.sd_min_size" in first.format()
    for path in shards.scene_paths(root):
        scene = shards.read_scene(path)
        for m in ("shape_detection", "gt"):
            region, view_region = scene[f"region_{m}"], scene[f"view_region_{m}"]
            assert region.dtype == np.int32 and region.shape == scene["label"].shape
            assert view_region.dtype == np.int32 and view_region.shape == scene["view_depth"].shape
            assert (region >= 0).all()  # both label every point
    assert shards.verify(root) == []  # manifest refreshed: checksums match the rewritten shards
    assert {"gt", "shape_detection"} <= set(shards.load_manifest(root)["scenes"][0]["regions"])
    sidecar = json.loads((root / job.SIDECAR).read_text())
    assert sidecar["methods"]["gt"]["oracle"] is True
    assert sidecar["methods"]["shape_detection"]["oracle"] is False
    before = mtimes(root)

    second = job.run_partition(root, ["shape_detection", "gt"], cfg)
    assert second.ok and not second.written and len(second.skipped) == 3 and not second.warnings
    assert mtimes(root) == before  # nothing rewritten

    # A changed parameter recomputes that method only; pointwise is new, gt stays up to date.
    changed = cfgmod.replace(cfg, **{"partition.sd_max_distance": 0.02, "partition.sd_min_size": 3})
    third = job.run_partition(root, ["shape_detection", "gt", "pointwise"], changed)
    assert len(third.written) == 3 and not third.warnings  # 3 points at 150 / m^2: 0.02 m^2
    sidecar = json.loads((root / job.SIDECAR).read_text())
    assert sidecar["methods"]["shape_detection"]["params"]["sd_max_distance"] == 0.02
    assert sidecar["methods"]["shape_detection"]["params"]["sd_min_size"] == 3
    for entry in sidecar["scenes"].values():
        assert set(entry) == {"shape_detection", "gt", "pointwise"}
    assert shards.verify(root) == []


def test_failing_scene_is_reported_by_name_and_others_complete(tmp_path, local_ray, capsys):
    root = make_dataset(tmp_path / "ds", tiny_scene=True)
    code = cli.main(["partition", str(root), "--method", "region_growing"])
    out = capsys.readouterr()
    assert code == 1
    assert "FAILED tiny_room" in out.out and "8 distinct points" in out.out
    assert "scene tiny_room FAILED" in out.err
    done = [p for p in shards.scene_paths(root) if "region_region_growing" in shards.shard_columns(p)]
    assert sorted(p.stem for p in done) == ["synth_0000", "synth_0001", "synth_0002"]
    assert shards.verify(root) == []
    # The quality command refuses a dataset where a scene lacks the column, naming it.
    assert cli.main(["partition-quality", str(root), "--method", "region_growing"]) == 2
    assert "tiny_room" in capsys.readouterr().err


def test_partition_quality_table_and_mlflow(tmp_path, local_ray, capsys):
    import mlflow

    root = make_dataset(tmp_path / "ds")
    assert cli.main(["partition", str(root), "--method", "pointwise", "--method", "vccs",
                     "--method", "gt"]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["partition-quality", str(root), "--method", "pointwise", "--method", "vccs",
                     "--method", "gt", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "gt (ORACLE: GT instances)" in out
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfgmod.Config().tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    metrics = run.data.metrics
    assert run.data.tags["partition.oracle_methods"] == "gt"
    assert metrics["pointwise/oracle_miou"] == 1.0  # every point its own region
    assert metrics["gt/oracle_miou"] == 1.0  # one class per GT instance
    assert metrics["pointwise/regions_per_scene"] > metrics["vccs/regions_per_scene"] > 1
    assert 0.3 < metrics["vccs/oracle_miou"] < 1.0
    assert 0.0 < metrics["vccs/oracle_miou_2d"] <= 1.0
    assert metrics["gt/scenes"] == 3
    per_class = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("vccs/oracle_iou/")}
    assert per_class and all(0.0 <= v <= 1.0 for v in per_class.values())
    assert abs(sum(per_class.values()) / len(per_class) - metrics["vccs/oracle_miou"]) < 1e-9  # the mean is of these
    assert all(v == 1.0 for k, v in metrics.items() if k.startswith("gt/oracle_iou/"))
    assert "oracle IoU 3D per class" in out


def test_partition_repairs_a_manifest_left_stale_between_its_two_writes(tmp_path, local_ray, capsys):
    """A kill after the shards and partitions.json were written but before the manifest was: the
    shards carry region_pointwise, the manifest does not. A re-run must repair the manifest, not
    report "all up to date" and leave training to say the column is missing."""
    root = make_dataset(tmp_path / "ds")
    stale = (root / shards.MANIFEST_NAME).read_text()
    assert job.run_partition(root, ["pointwise"], cfgmod.Config()).ok
    (root / shards.MANIFEST_NAME).write_text(stale)  # the state on disk after such a kill
    problems = shards.verify(root)
    assert len(problems) == 3 and all("re-run `rayseg partition` to repair it" in p for p in problems)
    with pytest.raises(shards.ShardError, match="truncated or rewritten"):
        shards.scene_paths(root)  # readers refuse the stale manifest, naming the shard

    again = job.run_partition(root, ["pointwise"], cfgmod.Config())
    assert again.ok and len(again.skipped) == 3 and not again.written  # nothing recomputed
    assert "manifest refreshed" in capsys.readouterr().out
    assert shards.verify(root) == [] and job.verify_partitions(root) == []
    assert all("pointwise" in e["regions"] for e in shards.load_manifest(root)["scenes"])


def test_verify_partitions_names_scenes_made_with_other_parameters(tmp_path, local_ray, capsys):
    """A partition run with new parameters that did not finish leaves scenes of two parameter sets
    under one column: `inspect --verify` and `doctor` name them."""
    root = make_dataset(tmp_path / "ds")
    cfg = cfgmod.replace(cfgmod.Config(), **{"partition.vccs_seed_resolution": 0.3})
    assert job.run_partition(root, ["vccs"], cfg).ok
    old_hash = json.loads((root / job.SIDECAR).read_text())["methods"]["vccs"]["hash"]
    assert job.run_partition(root, ["vccs"], cfgmod.replace(cfg, **{"partition.vccs_seed_resolution": 0.4})).ok
    sidecar = json.loads((root / job.SIDECAR).read_text())
    sidecar["scenes"]["train/synth_0001.parquet"]["vccs"] = old_hash  # not redone before the stop
    (root / job.SIDECAR).write_text(json.dumps(sidecar))
    problems = job.verify_partitions(root)
    assert len(problems) == 1 and problems[0].startswith("train/synth_0001.parquet: region_vccs: made with other")
    assert cli.main(["inspect", str(root), "--verify"]) == 1
    assert "synth_0001.parquet: region_vccs: made with other parameters" in capsys.readouterr().out
    # training on that column is refused before Ray starts, naming the scene
    config = tmp_path / "exp.toml"
    config.write_text(f"[data]\nroot = '{root}'\nregion_column = 'vccs'\n")
    assert cli.main(["train", str(config)]) == 2
    assert "synth_0001.parquet: region_vccs: made with other parameters" in capsys.readouterr().err
    # the same method re-run with the current parameters redoes exactly that scene
    fixed = job.run_partition(root, ["vccs"], cfgmod.replace(cfg, **{"partition.vccs_seed_resolution": 0.4}))
    assert fixed.written == ["synth_0001"] and job.verify_partitions(root) == []
    assert cli.main(["doctor", str(root)]) == 0
