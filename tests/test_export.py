"""`rayseg export` / `rayseg render`: coloured PLY files that read back with the palette colours
of their labels, PNG comparison renders with real content, predictions of a run's own network
(seg run: MinkUNet; train run: the EMA teacher's 3D branch), and errors that name what is wrong.

The dataset is three tiny synthetic scenes written with the real generator and shard writer (no
Ray needed); the runs are real run directories (launch.new_run_dir + loop.save_checkpoint) whose
final layer is set so that the network's answer is known: zero weights and one large bias."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayseg import cli
from rayseg import config as cfgmod
from rayseg import export
from rayseg.data import shards, synthetic
from rayseg.data.ply import read_ply
from rayseg.data.pseudo_store import pseudo_path, write_pseudo
from rayseg.data.scene import IGNORE_LABEL, S3DIS13, SCANNET20

TINY = {"synthetic.num_scenes": 3, "synthetic.val_fraction": 0.34, "synthetic.num_views": 0,
        "synthetic.min_points": 1500, "synthetic.max_points": 2500, "synthetic.points_per_m2": 30.0,
        "data.voxel_size": 0.2, "data.num_views": 0, "data.region_column": "",
        "model.backbone_3d": "MinkUNet14A", "model.backbone_2d": "resnet18", "model.init_2d": "none",
        "optim.seg_backbone": "MinkUNet14A", "optim.seg_voxel_size": 0.2}
SEG_CLASS, TEACHER_CLASS, STUDENT_CLASS = 6, 9, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(cfg, dataset root, tmp): 2 train + 1 val synthetic scenes, pseudo-labels for train."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = cfgmod.replace(cfgmod.Config(), **TINY, **{"data.root": str(tmp / "data"),
                                                     "tracking.runs_dir": str(tmp / "runs"), "name": "exp"})
    for i in range(cfg.synthetic.num_scenes):
        shards.write_scene(cfg.data.root, synthetic.generate_scene(cfg.synthetic, i))
    shards.write_manifest(cfg.data.root, cfg.synthetic.profile)
    # Pseudo-labels with a known relation to GT: the next class id, never wall (ignored -> floor).
    for path in shards.scene_paths(cfg.data.root, "train"):
        scene = shards.read_scene(path, ["label"])
        sid = scene["scene_id"]
        write_pseudo(pseudo_path(tmp / "pl", "train", sid), sid, expected_pseudo(scene["label"]))
    return cfg, Path(cfg.data.root), tmp


def expected_pseudo(label: np.ndarray) -> np.ndarray:
    return np.where(label == IGNORE_LABEL, 1, label.astype(np.int64) % 19 + 1).astype(np.uint8)


def fixed_answer(net: torch.nn.Module, cls: int) -> None:
    """Make a MinkUNet predict `cls` everywhere: final 1x1 conv weights 0, bias one-hot."""
    with torch.no_grad():
        for name, p in net.final.named_parameters():
            p.zero_()
            if name == "bias":
                p[..., cls] = 10.0


def make_run(cfg, kind: str) -> Path:
    from rayseg.models.minkunet import build_minkunet
    from rayseg.models.twobranch import TwoBranchModel
    from rayseg.train import launch
    from rayseg.train.loop import Progress, save_checkpoint

    names = SCANNET20
    run_dir = launch.new_run_dir(cfg, kind)
    if kind == "seg":
        net = build_minkunet(cfg.optim.seg_backbone, cfg.model.in_channels, len(names), cfg.model.backend)
        fixed_answer(net, SEG_CLASS)
        state = {"student": net.state_dict(), "teacher": None, "stages": ["seg"]}
        stage = "seg"
    else:
        student, teacher = TwoBranchModel(cfg.model, len(names)), TwoBranchModel(cfg.model, len(names))
        fixed_answer(student.net3d, STUDENT_CLASS)
        fixed_answer(teacher.net3d, TEACHER_CLASS)
        state = {"student": student.state_dict(), "teacher": teacher.state_dict(), "stages": ["cmg", "cmg_rpc"]}
        stage = "cmg_rpc"
    save_checkpoint(run_dir, {**state, "class_names": names}, Progress(step=1, epoch=1), stage)
    return run_dir


# --------------------------------------------------------------------------------------------


def test_palettes_and_colorize():
    assert export.palette(SCANNET20).shape == (20, 3) and export.palette(S3DIS13).shape == (13, 3)
    for names in (SCANNET20, S3DIS13, ("a", "b", "c", "d", "e", "f", "g")):
        colors = export.palette(names)
        assert len({tuple(c) for c in colors}) == len(names)  # one colour per class
        assert not any(tuple(c) == export.IGNORE_COLOR for c in colors)
    colors = export.palette(SCANNET20)
    assert tuple(colors[0]) == (174, 199, 232)  # ScanNet's wall
    rgb = export.colorize(np.array([0, 19, IGNORE_LABEL, 3], np.uint8), colors)
    np.testing.assert_array_equal(rgb, [colors[0], colors[19], (0, 0, 0), colors[3]])
    with pytest.raises(export.ExportError, match="pseudo of scene x: label 20 is not a class id 0..19"):
        export.colorize(np.array([1, 20]), colors, "pseudo of scene x")
    legend = export.format_legend(SCANNET20, colors)
    assert "wall" in legend and "RGB (174, 199, 232)" in legend and "(ignore)" in legend


def test_ply_round_trip_gt_and_pseudo(data, tmp_path):
    cfg, root, tmp = data
    source = export.resolve_source(root, ("gt", "pseudo"), num_scenes=2, split="train", pseudo_labels=tmp / "pl")
    paths = export.export_ply(source, ("gt", "pseudo"), tmp_path, log=lambda _: None)
    assert sorted(p.name for p in paths) == ["synth_0000-gt.ply", "synth_0000-pseudo.ply",
                                             "synth_0001-gt.ply", "synth_0001-pseudo.ply"]
    colors = export.palette(SCANNET20)
    for shard in shards.scene_paths(root, "train"):
        scene = shards.read_scene(shard, ["coord", "label"])
        for what, labels in (("gt", scene["label"]), ("pseudo", expected_pseudo(scene["label"]))):
            v = read_ply(tmp_path / f"{scene['scene_id']}-{what}.ply")["vertex"]
            assert list(v) == ["x", "y", "z", "red", "green", "blue", "label"]
            np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), scene["coord"])
            np.testing.assert_array_equal(v["label"], labels)
            rgb = np.stack([v["red"], v["green"], v["blue"]], 1)
            known = labels != IGNORE_LABEL
            np.testing.assert_array_equal(rgb[known], colors[labels[known]])
            if what == "gt":
                assert (~known).any()  # synthetic scenes have ignored points: black
                assert (rgb[~known] == 0).all()


def test_pred_of_seg_and_train_runs(data, tmp_path):
    cfg, root, _ = data
    seg = make_run(cfg, "seg")
    train = make_run(cfg, "train")
    colors = export.palette(SCANNET20)
    val = shards.read_scene(shards.scene_paths(root, "val")[0], ["coord"])
    for run_dir in (seg, train):
        source = export.resolve_source(run_dir, ("pred",))  # default: the first val scene
        assert [p.stem for p in source.paths] == [val["scene_id"]]
    # A train run's prediction is its EMA teacher's (not the student's) 3D argmax.
    (path,) = export.export_ply(export.resolve_source(train, ("pred",)), ("pred",), tmp_path, log=lambda _: None)
    v = read_ply(path)["vertex"]
    assert len(v["label"]) == len(val["coord"])
    assert (v["label"] == TEACHER_CLASS).all()
    assert (np.stack([v["red"], v["green"], v["blue"]], 1) == colors[TEACHER_CLASS]).all()

    # The CLI: the run's own export/ folder and the printed legend.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["export", str(seg), "--what", "gt"]) == 0
    assert [p.name for p in (seg / "export").iterdir()] == [f"{val['scene_id']}-gt.ply"]
    assert "legend (20 classes)" in out.getvalue() and f"{SCANNET20[SEG_CLASS]:<14}  ->  RGB" in out.getvalue()

    # A render of GT vs prediction: the prediction panel (right half) is the predicted class.
    (png,) = export.render_run_scenes(seg, tmp_path / "renders", num_scenes=1, what=("gt", "pred"))
    img = np.asarray(Image.open(png).convert("RGB"))
    right = img[:, img.shape[1] // 2:].reshape(-1, 3)
    assert (right == colors[SEG_CLASS]).all(1).sum() > 500
    assert (right == colors[0]).all(1).sum() == 0  # no wall colour where everything is predicted table


def test_render_comparison_png(data, tmp_path):
    _, root, tmp = data
    shard = shards.scene_paths(root, "train")[0]
    scene = shards.read_scene(shard, ["coord", "label"])
    sets = {"gt": scene["label"], "pseudo": expected_pseudo(scene["label"])}
    png = export.render_comparison(scene["coord"], sets, SCANNET20, tmp_path / "a.png", title="synth_0000")
    img = Image.open(png)
    assert img.format == "PNG" and 600 <= img.width <= 1000 and 800 <= img.height <= 1100, img.size
    rgb = np.asarray(img.convert("RGB"))
    colors = export.palette(SCANNET20)
    left, right = rgb[:, : rgb.shape[1] // 2].reshape(-1, 3), rgb[:, rgb.shape[1] // 2:].reshape(-1, 3)
    # Each panel shows its own labels: GT classes on the left, their successors on the right.
    # (The legend row at the bottom spans both halves, so compare counts, not mere presence.)
    present = [c for c in np.unique(scene["label"]) if c != IGNORE_LABEL]
    for c in present:
        assert (left == colors[c]).all(1).sum() > 20, SCANNET20[c]
    wall, floor = colors[0], colors[1]  # wall points are floor-coloured in the pseudo panel
    assert (left == wall).all(1).sum() > 5 * (right == wall).all(1).sum()
    assert (right == floor).all(1).sum() > (left == floor).all(1).sum()
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20


def test_named_errors(data, tmp_path):
    cfg, root, tmp = data
    with pytest.raises(export.ExportError, match="nowhere does not exist"):
        export.resolve_source(tmp_path / "nowhere", ("gt",))
    with pytest.raises(export.ExportError, match="no scene synth_9999 in the dataset"):
        export.resolve_source(root, ("gt",), scene_ids=["synth_9999"])
    with pytest.raises(export.ExportError, match="--what pred needs a run directory"):
        export.resolve_source(root, ("pred",))
    with pytest.raises(export.ExportError, match="choose a comma-separated subset of gt,pseudo,pred"):
        export.parse_what("gt,labels")
    with pytest.raises(export.ExportError, match="no scenes in split 'test'"):
        export.resolve_source(root, ("gt",), split="test")
    # Pseudo-labels cover the train split only: a val scene names itself, its split and the folder's.
    (tmp / "pl" / "pseudo.json").write_text('{"split": "train"}')
    source = export.resolve_source(root, ("pseudo",), split="val", pseudo_labels=tmp / "pl")
    with pytest.raises(export.ExportError,
                       match=r"scene synth_0002 \(split val\): no pseudo-labels .* covers split 'train'"):
        export.export_ply(source, ("pseudo",), tmp_path, log=lambda _: None)
    # A shard copied out of its dataset has no manifest (class names) next to it.
    loose = tmp_path / "loose" / "train" / "synth_0000.parquet"
    loose.parent.mkdir(parents=True)
    shutil.copy(shards.scene_paths(root, "train")[0], loose)
    with pytest.raises(export.ExportError, match="not inside a prepared dataset"):
        export.resolve_source(loose, ("gt",))
    with pytest.raises(export.ExportError, match=r"render: label set 'gt' has shape \(3,\), expected \(2,\)"):
        export.render_comparison(np.zeros((2, 3)), {"gt": np.zeros(3, np.uint8)}, SCANNET20, tmp_path / "x.png")
    # The CLI turns them into one line on stderr and exit code 2.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["render", str(root), "--what", "pseudo"]) == 2
    assert err.getvalue().startswith("render: --what pseudo needs --pseudo-labels DIR")
