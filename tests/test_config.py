"""Config: defaults, TOML extends/overrides, --set, [grid], and every validation error."""

import subprocess
import sys
from pathlib import Path

import pytest

from rayseg import config as C

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_match_method():
    cfg = C.Config()
    assert cfg.loss.rpc.eta == 0.8 and cfg.loss.rpc.ema_decay == 0.999
    assert cfg.loss.guidance.alpha == 0.05 and cfg.loss.guidance.temperature == 0.07
    assert cfg.optim.cmg_lr == 0.1 and cfg.optim.cmg_rpc_lr == 0.05 and cfg.optim.momentum == 0.9
    assert cfg.data.num_views == 6 and cfg.partition.method == "shape_detection"


def test_round_trip_through_toml(tmp_path):
    cfg = C.replace(C.Config(), **{"loss.rpc.eta": 0.3, "augment.view_jitter_student": [0.1, 0.2, 0.3, 0.4]})
    path = write(tmp_path / "full.toml", C.dumps(cfg))
    again = C.load(path).config
    assert again == cfg
    assert again.augment.view_jitter_student == (0.1, 0.2, 0.3, 0.4)


def test_extends_overrides_and_set(tmp_path):
    write(tmp_path / "base.toml", "name = 'base'\n[loss.rpc]\neta = 0.5\nmode = 'point'\n[optim]\nbatch_size = 2\n")
    child = write(tmp_path / "child.toml", "extends = 'base.toml'\nname = 'child'\n[loss.rpc]\neta = 0.6\n")
    exp = C.load(child, ["optim.batch_size=8", "tracking.experiment=sweep"])
    cfg = exp.config
    assert cfg.name == "child"
    assert cfg.loss.rpc.eta == 0.6 and cfg.loss.rpc.mode == "point"  # inherited
    assert cfg.optim.batch_size == 8 and cfg.tracking.experiment == "sweep"
    assert exp.sources["loss.rpc.mode"].endswith("base.toml")
    assert exp.sources["loss.rpc.eta"].endswith("child.toml")


def test_grid_expansion_and_validation(tmp_path):
    path = write(tmp_path / "t8.toml",
                 "[grid]\n'loss.rpc.eta' = [0.0, 0.5]\n'loss.rpc.mode' = ['point', 'region']\n")
    exp = C.load(path)
    points = C.grid_points(exp)
    assert len(points) == 4
    cfgs = [C.apply(exp, p) for p in points]
    assert {(c.loss.rpc.eta, c.loss.rpc.mode) for c in cfgs} == {(0.0, "point"), (0.0, "region"),
                                                                 (0.5, "point"), (0.5, "region")}
    bad = write(tmp_path / "bad.toml", "[grid]\n'loss.rpc.eta' = [0.5, 1.5]\n")
    with pytest.raises(C.ConfigError, match=r"loss.rpc.eta: must be in \[0, 1\].*bad.toml \[grid\]"):
        C.load(bad)
    unknown = write(tmp_path / "unk.toml", "[grid]\n'loss.rpc.etaa' = [0.5]\n")
    with pytest.raises(C.ConfigError, match=r"loss.rpc.etaa: unknown key"):
        C.load(unknown)
    empty = write(tmp_path / "empty.toml", "[grid]\n'loss.rpc.eta' = []\n")
    with pytest.raises(C.ConfigError, match=r"empty.toml: grid.loss.rpc.eta: must be a non-empty list"):
        C.load(empty)


@pytest.mark.parametrize("text, pattern", [
    ("[loss.rpc]\netaa = 0.5\n", r"loss.rpc.etaa: unknown key.*known keys of \[loss.rpc\]"),
    ("[loss.rpc]\neta = 'high'\n", r"loss.rpc.eta: expected float, got 'high'"),
    ("[loss.rpc]\neta = 1.5\n", r"loss.rpc.eta: must be in \[0, 1\]"),
    ("[optim]\nbatch_size = 2.5\n", r"optim.batch_size: expected int"),
    ("[optim]\nbatch_size = 0\n", r"optim.batch_size: must be > 0"),
    ("[model]\nbackend = 'spconv'\n", r"model.backend: must be one of \['torch', 'minkowski'\]"),
    ("[augment]\nflip_xy = 1\n", r"augment.flip_xy: expected bool"),
    ("[augment]\nview_jitter_student = [0.1, 0.2]\n", r"augment.view_jitter_student: expected 4 values"),
    ("[data]\nvoxel_size = -0.1\n", r"data.voxel_size: must be > 0"),
    ("nonsense = 1\n", r"nonsense: unknown key"),
    ("data = 3\n", r"data: expected a table"),
])
def test_validation_errors_name_key_and_file(tmp_path, text, pattern):
    path = write(tmp_path / "exp.toml", text)
    with pytest.raises(C.ConfigError, match=pattern) as info:
        C.load(path)
    assert "exp.toml" in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(tmp_path / "missing.toml")
    write(tmp_path / "a.toml", "extends = 'b.toml'\n")
    write(tmp_path / "b.toml", "extends = 'a.toml'\n")
    with pytest.raises(C.ConfigError, match="circular extends"):
        C.load(tmp_path / "a.toml")
    write(tmp_path / "broken.toml", "[loss\n")
    with pytest.raises(C.ConfigError, match="broken.toml: invalid TOML"):
        C.load(tmp_path / "broken.toml")


def test_set_override_parsing():
    assert C.parse_override("loss.rpc.eta=0.7") == ("loss.rpc.eta", 0.7)
    assert C.parse_override("model.backend=torch") == ("model.backend", "torch")  # bare string
    assert C.parse_override("augment.mix3d=false") == ("augment.mix3d", False)
    assert C.parse_override("augment.view_jitter_student=[0.1,0.1,0.1,0.0]")[1] == [0.1, 0.1, 0.1, 0.0]
    with pytest.raises(C.ConfigError, match="expected KEY=VALUE"):
        C.parse_override("loss.rpc.eta")
    with pytest.raises(C.ConfigError, match=r"optim.batch_size: expected int.*--set optim.batch_size=big"):
        C.load(None, ["optim.batch_size=big"])


def test_every_experiment_file_loads():
    files = sorted((REPO / "experiments").rglob("*.toml"))
    assert len(files) >= 4, "experiments/ must hold the base, demo, ScanNet and S3DIS configs"
    for path in files:
        exp = C.load(path)
        for point in C.grid_points(exp):
            C.apply(exp, point)


def test_cli_config_show(tmp_path):
    path = write(tmp_path / "exp.toml", "[loss.rpc]\neta = 0.25\n[grid]\n'data.num_views' = [0, 3]\n")
    out = subprocess.run([sys.executable, "-m", "rayseg", "config", "show", str(path), "--set", "seed=7"],
                         capture_output=True, text=True, check=True).stdout
    assert "eta = 0.25" in out and "seed = 7" in out and "2 points" in out
    bad = subprocess.run([sys.executable, "-m", "rayseg", "config", "show", str(path), "--set", "seed=x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "seed: expected int" in bad.stderr
