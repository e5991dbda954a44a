"""Checkpoint loading: a planted state.pt that would run code is refused at every loading site,
real checkpoints load, and Ray Train's checkpoint reaches a restarted worker without a shared
temporary copy."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from rayseg.train.checkpoint import UnsafeCheckpointError, load_state, ray_checkpoint_file
from rayseg.train.loop import Progress, resume_state, save_checkpoint


class _RunsCode:
    """Pickles as a call to os.system: loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(run_dir: Path, marker: Path, step: int = 5) -> Path:
    """A checkpoint directory as save_checkpoint names it, holding a malicious state.pt."""
    path = run_dir / "checkpoints" / f"{step:09d}-cmg-e0001" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"student": {}, "progress": Progress(step=step).__dict__, "x": _RunsCode(marker)}, path)
    return path


def test_planted_checkpoint_is_refused_everywhere_without_running(tmp_path):
    from rayseg.train.launch import load_run_checkpoint
    from rayseg.train.tune import _load_state

    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    save_checkpoint(run, {"w": torch.ones(2)}, Progress(step=1), "cmg")  # a genuine older one
    planted = _plant(run, marker)
    # The file really is a code-running pickle (what the old weights_only=False did with it).
    torch.load(planted, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match=r"000000005-cmg-e0001/state.pt: refused .*posix.system"):
        load_state(planted)
    # Resume refuses rather than quietly falling back to the older checkpoint.
    with pytest.raises(UnsafeCheckpointError, match="000000005-cmg-e0001"):
        resume_state(None, run)
    with pytest.raises(UnsafeCheckpointError):
        resume_state(planted, tmp_path / "empty-run")  # as Ray Train's checkpoint
    (run / "config.toml").write_text("")  # a run directory (default settings)
    with pytest.raises(UnsafeCheckpointError):
        load_run_checkpoint(run)  # evaluate, export, pseudo-label, demo, tune's pseudo-label evaluation
    with pytest.raises(UnsafeCheckpointError):
        _load_state(planted)  # tune's trial bookkeeping
    assert not marker.exists()


def test_pseudo_labeler_refuses_a_planted_checkpoint(tmp_path):
    from rayseg import config as cfgmod
    from rayseg.pseudo import TeacherLabeler

    marker = tmp_path / "code-ran"
    planted = _plant(tmp_path / "run", marker)
    flat = cfgmod.flatten(cfgmod.to_dict(cfgmod.Config()))
    with pytest.raises(UnsafeCheckpointError):
        TeacherLabeler(str(planted), flat, 20, str(tmp_path / "out"), "train")
    assert not marker.exists()


def test_real_checkpoint_content_loads_and_garbage_is_a_load_error(tmp_path):
    from rayseg import losses as L
    from rayseg.config import Config, flatten, to_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    cfg = Config()
    state = {"student": model.state_dict(), "teacher": None, "optimizer": opt.state_dict(),
             "thresholds": {"3d": L.ThresholdState.from_config(cfg.loss.rpc, 20).state_dict()},
             "generator": [torch.Generator().get_state()], "config": flatten(to_dict(cfg)),
             "class_names": ("wall", "floor"), "stages": ["cmg", "cmg_rpc"]}
    progress = Progress(step=3, epoch=1, history=[{"stage": "cmg", "epoch": 1, "cmg/epoch_loss": 0.5}])
    path = save_checkpoint(tmp_path, state, progress, "cmg") / "state.pt"
    back = load_state(path)
    assert back["class_names"] == ("wall", "floor") and back["progress"]["history"][0]["cmg/epoch_loss"] == 0.5
    torch.testing.assert_close(back["student"]["0.weight"], model.state_dict()["0.weight"])
    opt.load_state_dict(back["optimizer"])

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as info:  # garbage is a load error, not "unsafe"
        load_state(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a rayseg checkpoint"):
        load_state(path)


def _ray_checkpoint_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")} | \
           {p.name for p in Path(tempfile.gettempdir()).glob("rayseg-resume-*")}


def test_ray_checkpoint_is_read_in_place_or_copied_privately(tmp_path):
    from ray.train import Checkpoint

    src = save_checkpoint(tmp_path / "run", {"w": torch.ones(3)}, Progress(step=7), "cmg")
    before = _ray_checkpoint_dirs()
    with ray_checkpoint_file(None) as none:
        assert none is None
    # Local storage (a single machine, or shared storage mounted locally): no copy at all.
    with ray_checkpoint_file(Checkpoint.from_directory(str(src))) as f:
        assert f == src / "state.pt"
        assert load_state(f)["progress"]["step"] == 7
    # Storage behind another filesystem (as S3 would be): each caller gets its own copy, removed
    # afterwards. Two ranks at once never share a folder (the race Ray's own to_directory had).
    remote = Checkpoint(path=str(src.relative_to(tmp_path)),
                        filesystem=pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()))
    seen, errors, barrier = [], [], threading.Barrier(2)

    def rank():
        try:
            with ray_checkpoint_file(remote) as f:
                seen.append(f)
                barrier.wait(timeout=30)  # both copies exist at the same time
                assert load_state(f)["w"].tolist() == [1.0, 1.0, 1.0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({p.parent for p in seen}) == 2 and all(p != src / "state.pt" for p in seen)
    assert not any(p.parent.exists() for p in seen)
    assert _ray_checkpoint_dirs() == before  # nothing left in the system temp dir


def test_partial_ray_copies_are_removed_and_complete_ones_kept(tmp_path):
    from rayseg.train.checkpoint import remove_partial_ray_copies

    run = tmp_path / "run"
    names = []
    for step in (2, 4, 6):
        names.append(save_checkpoint(run, {"w": torch.ones(1000)}, Progress(step=step, epoch=step // 2), "cmg").name)
    size = (run / "checkpoints" / names[0] / "state.pt").stat().st_size
    trainer = run / "ray" / "tiny-train-cmg-abc123"
    for name in names:  # Ray's copies, as ray.train.report(checkpoint_dir_name=name) names them
        (trainer / name).mkdir(parents=True)
    (trainer / names[0] / "state.pt").write_bytes((run / "checkpoints" / names[0] / "state.pt").read_bytes())
    (trainer / names[1] / "state.pt").write_bytes(b"\0" * (size // 2))  # the kill came mid-copy
    # names[2]: killed before the file was created (empty folder)
    pruned = trainer / "000000000-cmg-e0000"  # its original is gone: Ray prunes its own copy
    pruned.mkdir()
    (pruned / "state.pt").write_bytes(b"x")
    (trainer / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files: untouched

    linking = trainer / f".tmp-{names[0]}-0a1b2c"  # link_into_ray_storage killed mid-link
    linking.mkdir()

    assert remove_partial_ray_copies(run) == [trainer / names[1], trainer / names[2], linking]
    assert (trainer / names[0] / "state.pt").stat().st_size == size
    assert not (trainer / names[1]).exists() and not (trainer / names[2]).exists()
    assert pruned.exists() and (trainer / "checkpoint_manager_snapshot.json").exists()
    assert remove_partial_ray_copies(run) == [] and remove_partial_ray_copies(tmp_path / "none") == []


def test_commands_refuse_a_planted_checkpoint_in_one_line(tmp_path, capsys):
    from rayseg import cli
    from rayseg import config as cfgmod

    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    _plant(run, marker)
    # A dataset for the run to name (evaluate checks it before loading the checkpoint).
    from rayseg.data import shards, synthetic

    scfg = cfgmod.replace(cfgmod.Config(), **{"synthetic.num_scenes": 1, "synthetic.num_views": 0,
                                              "synthetic.min_points": 500, "synthetic.max_points": 800}).synthetic
    shards.write_scene(tmp_path / "data", {**synthetic.generate_scene(scfg, 0), "split": "train"})
    shards.write_manifest(tmp_path / "data", scfg.profile)
    cfg = cfgmod.replace(cfgmod.Config(), **{"data.root": str(tmp_path / "data")})
    (run / "config.toml").write_text(cfgmod.dumps(cfg))
    assert cli.main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayseg evaluate: ") and "000000005-cmg-e0001/state.pt: refused to load" in err
    assert "Traceback" not in err and not marker.exists()


def test_run_checkpoint_is_the_given_file_or_the_latest_and_names_what_is_missing(tmp_path):
    from rayseg.train.checkpoint import run_checkpoint

    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no checkpoint found under checkpoints/"):
        run_checkpoint(tmp_path)
    first = save_checkpoint(tmp_path, {"x": torch.zeros(1)}, Progress(epoch=1, step=10), "cmg") / "state.pt"
    latest = save_checkpoint(tmp_path, {"x": torch.ones(1)}, Progress(epoch=2, step=20), "cmg_rpc") / "state.pt"
    assert run_checkpoint(tmp_path) == latest and run_checkpoint(str(tmp_path), first) == first
    with pytest.raises(FileNotFoundError, match="gone.pt: no such checkpoint file"):
        run_checkpoint(tmp_path, tmp_path / "gone.pt")
