"""experiments/probe_features.py: the GT linear probe (an ORACLE diagnostic) fits and scores correctly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "probe_features.py"
_spec = importlib.util.spec_from_file_location("probe_features", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_probe_separates_separable_classes_despite_imbalance():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (4, 8))
    y = np.concatenate([np.full(n, c) for c, n in enumerate((2000, 500, 100, 20))])  # 100:1 imbalance
    x = (centres[y] + rng.normal(0, 0.5, (len(y), 8))).astype(np.float32)
    predict = probe.fit_probe(x, y, num_classes=5)
    tags = np.ones((len(y), 5), bool)
    miou, per_class = probe.masked_miou(predict(x), tags, y, 5)
    assert miou > 99.0 and np.isnan(per_class[4])  # class 4 never occurs: not averaged in


def test_masked_miou_never_predicts_an_untagged_class():
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    y = np.array([1, 2, 1])
    tags = np.array([[False, True, True]] * 3)  # class 0 absent from the scene's tags
    miou, per_class = probe.masked_miou(logits, tags, y, 3)
    # argmax among tagged classes: rows -> 1, 2, 1 (class 0 masked despite the largest logit)
    assert per_class[1] == 100.0 and per_class[2] == 100.0 and miou == 100.0
    miou_unmasked, _ = probe.masked_miou(logits, np.ones((3, 3), bool), y, 3)
    assert miou_unmasked < 50.0


_spec2 = importlib.util.spec_from_file_location(
    "tag_statistics", Path(__file__).resolve().parents[1] / "experiments" / "tag_statistics.py")
tagstats = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(tagstats)


def test_tag_statistics_separates_room_type_bound_from_free_classes():
    types = ["bath", "bed"] * 8
    bound = np.array([t == "bath" for t in types])          # tagged exactly in bathrooms
    free = np.array([i % 4 < 2 for i in range(16)])          # half of each room type
    rows, explained = tagstats.tag_table(np.stack([bound, free], 1), types, ["toilet", "chair"])
    assert rows[0]["H"] == 1.0 and rows[0]["H_given_type"] < 1e-9
    assert rows[1]["H"] == 1.0 and abs(rows[1]["H_given_type"] - 1.0) < 1e-9
    assert rows[0]["by_type"] == {"bath": 1.0, "bed": 0.0} and abs(explained - 0.5) < 1e-9


def test_tag_head_variants_clear_the_removed_structures_tag_and_the_head_learns_from_tags():
    """removal_variants: the floor variant drops the biggest low region and clears 'floor' (as the
    augmentation does); fit_tag_head, trained on tags only (no labels), then finds floor, wall and
    the chair of the scenes tagged 'chair' from indicator features."""
    names = ("wall", "floor", "chair")
    rng = np.random.default_rng(0)
    scenes = []
    for i in range(8):
        floor = np.c_[rng.integers(10, 40, (100, 2)), np.zeros(100)]             # z = 0, away from the sides
        wall = np.c_[np.zeros(100), rng.integers(0, 50, 100), rng.integers(0, 40, 100)]  # the x = 0 side
        chair = np.c_[rng.integers(20, 30, (50, 2)), rng.integers(1, 10, 50)]
        has_chair = i % 2 == 0
        parts = [floor, wall] + ([chair] if has_chair else [])
        label = np.concatenate([np.full(len(p), c) for c, p in zip((1, 0, 2), parts)])
        feat = torch.tensor(np.stack([label == 0, label == 1, label == 2], 1).astype(np.float32))
        scenes.append({"feat": feat, "grid": np.concatenate(parts).astype(np.float32), "region": label.copy(),
                       "label": label, "tags": np.array([True, True, has_chair]), "inverse": torch.arange(len(label))})
    variants = probe.removal_variants(scenes[0], names, voxel_size=0.1)
    assert len(variants) == 3 and variants[0][0].all()
    (floor_keep, floor_tags), (wall_keep, wall_tags) = variants[1], variants[2]
    assert not floor_keep[scenes[0]["label"] == 1].any() and floor_keep[scenes[0]["label"] != 1].all()
    assert floor_tags.tolist() == [True, False, True] and wall_tags.tolist() == [False, True, True]
    assert not wall_keep[scenes[0]["label"] == 0].any()
    head, loss = probe.fit_tag_head(scenes, names, voxel_size=0.1)
    assert loss < 0.3
    miou, per_class = probe.pointwise_miou(scenes, lambda s: head(s["feat"]), 3)
    assert min(per_class) > 90.0, per_class


_spec3 = importlib.util.spec_from_file_location(
    "rpc_targets", Path(__file__).resolve().parents[1] / "experiments" / "rpc_targets.py")
rpctargets = importlib.util.module_from_spec(_spec3)
_spec3.loader.exec_module(rpctargets)


def test_rpc_targets_counts_what_region_pooled_targets_fix_and_break():
    """Two regions: the teacher's pooled label is right on 5 of 6 points; the student is wrong on
    3 of those and right on the one the pooling gets wrong -> 3 fixes, 1 break; a threshold above
    every pooled probability keeps nothing; the adaptive state counts what it accepted."""
    from rayseg import losses as L

    big = 8.0
    teacher = torch.tensor([[big, 0, 0]] * 3 + [[0, big, 0]] * 2 + [[0, 0.4 * big, 0.5 * big]], dtype=torch.float32)
    student = torch.tensor([[big, 0, 0]] * 2 + [[0, big, 0]] + [[0, 0, big]] * 3, dtype=torch.float32)
    row = {"teacher": teacher, "student": student, "tags": torch.ones(6, 3), "region": torch.tensor([0, 0, 0, 1, 1, 1]),
           "label": torch.tensor([0, 0, 0, 1, 1, 2])}
    states = {"adaptive": L.ThresholdState(3, 0.8, adaptive=True), "loose": L.ThresholdState(3, 0.5, adaptive=False),
              "strict": L.ThresholdState(3, 1.0, adaptive=False)}
    out = rpctargets.analyse([row], 3, states, "region")
    loose = out["thresholds"]["loose"]
    assert loose["kept"] == 1.0 and abs(loose["kept_accuracy"] - 5 / 6) < 1e-9
    assert abs(loose["fixes"] - 3 / 6) < 1e-9 and abs(loose["breaks"] - 1 / 6) < 1e-9
    assert out["thresholds"]["strict"]["kept"] == 0.0 and out["thresholds"]["strict"]["fixes"] == 0.0
    assert out["thresholds"]["adaptive"]["kept"] == 1.0  # Q = 0 before the first room: everything passes
    assert states["adaptive"].counts.tolist() == [3, 3, 0]
    assert abs(out["teacher_point_miou"] - 1.0) < 1e-9  # point-wise the teacher is right everywhere...
    assert out["teacher_region_miou"] < 0.7  # ...pooling region 1 loses class 2
    table = {r["class"]: r for r in rpctargets.class_table(out, "adaptive", ("a", "b", "c"))}
    assert table["c"]["kept_recall"] == 0.0 and table["c"]["kept_as"][0] == ("b", 1.0)  # its point was taught "b"
    assert table["a"]["kept_recall"] == 1.0 and table["a"]["kept_as"][0][1] == 0.0


_spec3 = importlib.util.spec_from_file_location(
    "link_labels", Path(__file__).resolve().parents[1] / "experiments" / "link_labels.py")
link_labels = importlib.util.module_from_spec(_spec3)
_spec3.loader.exec_module(link_labels)


def test_labels_at_links_read_the_linked_pixel_mask_untagged_classes_and_fuse():
    """Two views of 2 x 3 pixels, 3 classes, class 2 untagged. Link k joins point k to one pixel:
    the 2D label must be that pixel's, never the untagged class, and the fused label the argmax of
    the mean of both branches' masked softmax."""
    view_logits = torch.zeros(2, 3, 2, 3)
    view_logits[1, 1, 1, 2] = 4.0   # view 1, pixel (1, 2): class 1
    view_logits[0, 2, 0, 1] = 9.0   # view 0, pixel (0, 1): untagged class 2 ...
    view_logits[0, 0, 0, 1] = 1.0   # ... so class 0 there
    point_logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    batch = {"link_point": torch.tensor([0, 1]), "link_view": torch.tensor([1, 0]),
             "link_pixel": torch.tensor([1 * 3 + 2, 0 * 3 + 1]),
             "tags": torch.tensor([[1.0, 1.0, 0.0]]), "label": torch.tensor([1, 0, 2])}
    out = link_labels.labels_at_links(batch, point_logits, view_logits)
    assert out["3d"].tolist() == [0, 1] and out["2d"].tolist() == [1, 0] and out["gt"].tolist() == [1, 0]
    # link 0: 3D sure of 0 (p 0.95), 2D sure of 1 (p 0.98): the mean favours 1 by a hair
    assert out["fused"].tolist() == [1, 0]


_spec4 = importlib.util.spec_from_file_location(
    "mil_2d_drift", Path(__file__).resolve().parents[1] / "experiments" / "mil_2d_drift.py")
mil_2d_drift = importlib.util.module_from_spec(_spec4)
_spec4.loader.exec_module(mil_2d_drift)


def test_mil_drift_reads_the_tag_masked_argmax_against_gt():
    """A room tagged with one class is all that class in the tag-masked argmax, whatever the
    network: right where GT says so, wrong where GT has another class."""
    from rayseg.models.resnet2d import ResNet2D

    torch.manual_seed(0)
    net = ResNet2D("resnet18", 20, init="none")
    tags = torch.zeros(20)
    tags[3] = 1
    y = torch.full((2, 16, 16), 3, dtype=torch.int64)
    room = {"x": torch.randn(2, 3, 16, 16), "y": y, "tags": tags}
    miou, iou = mil_2d_drift.masked_miou(net, [room])
    assert miou == 1.0 and iou[3] == 1.0
    y2 = y.clone()
    y2[:, :8] = 5  # half the pixels are class 5, which the room is not tagged with
    miou, iou = mil_2d_drift.masked_miou(net, [{**room, "y": y2}])
    assert iou[3] == 0.5 and iou[5] == 0.0 and net.training  # back in training mode after reading


def test_mil_drift_reads_the_backbone_from_the_standins_sidecar(tmp_path):
    standin = tmp_path / "standin.pth"
    (tmp_path / "standin.pth.json").write_text(json.dumps({"settings": {"backbone": "resnet34"}}))
    assert mil_2d_drift.standin_backbone(str(standin)) == "resnet34"
    with pytest.raises(SystemExit, match="other.pth.json: cannot read the stand-in's settings.backbone"):
        mil_2d_drift.standin_backbone(str(tmp_path / "other.pth"))


_spec_gf = importlib.util.spec_from_file_location(
    "guidance_floor", Path(__file__).resolve().parents[1] / "experiments" / "guidance_floor.py")
guidance_floor = importlib.util.module_from_spec(_spec_gf)
_spec_gf.loader.exec_module(guidance_floor)


def test_guidance_floor_is_what_duplicate_targets_leave():
    """Pairs whose 2D targets come in groups of 8 equal vectors (orthogonal between groups): a 3D
    projection equal to the targets still scores ln 8 (its floor); a random one scores more."""
    torch.manual_seed(0)
    f2 = torch.eye(4).repeat_interleave(8, dim=0) * 3.0  # 32 pairs, 4 distinct targets
    cells = torch.arange(32) // 8
    exact = guidance_floor.scene_stats(torch.randn(32, 6), f2.clone(), f2, cells, temperature=0.07)
    assert exact["floor_3d"] == pytest.approx(np.log(8), abs=1e-3)
    assert exact["actual_3d"] == pytest.approx(exact["floor_3d"], abs=1e-6)
    assert exact["chance"] == pytest.approx(np.log(32)) and exact["cells"] == 4
    assert exact["near_duplicate_negatives"] == 7
    assert exact["floor_2d"] < 0.5  # 32 random 6-d 3D features are rarely within tau of each other
    guessed = guidance_floor.scene_stats(torch.randn(32, 6), torch.randn(32, 4), f2, cells, temperature=0.07)
    assert guessed["actual_3d"] > exact["floor_3d"] + 1.0
