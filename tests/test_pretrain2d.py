"""`rayseg pretrain-2d`: the ImageNet STAND-IN (object crops of synthetic rooms of their own seed,
a ResNet classifier), cached, loadable as model.init_2d."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayseg import config as C
from rayseg.cli import main
from rayseg.data.synthetic import generate_scene
from rayseg.models.resnet2d import ResNet2D
from rayseg.pretrain2d import corpus_config, render_crops


def test_corpus_crops_are_classified_objects_of_rooms_of_their_own_seed():
    cfg = C.Pretrain2DConfig(rooms=3, max_crops_per_class=3)
    images, labels = render_crops(cfg)
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3) and len(images) == len(labels)
    counts = np.bincount(labels, minlength=20)
    assert counts.max() <= 3 * 3  # per class and room
    assert (counts > 0).sum() >= 5  # walls, floors and furniture
    # no benchmark room: the corpus' rooms are generated from their own seed
    corpus_room = generate_scene(corpus_config(cfg, "scannet20"), 0)
    bench_room = generate_scene(C.SyntheticConfig(num_scenes=3, seed=0, min_points=2000, max_points=4000,
                                                  points_per_m2=20.0, num_views=6, image_width=160,
                                                  image_height=120, val_fraction=0.0), 0)
    assert not np.array_equal(corpus_room["view_rgb"], bench_room["view_rgb"])


def test_pretrain_2d_writes_a_cached_stand_in_that_init_2d_loads(tmp_path, capsys):
    out = tmp_path / "standin.pth"
    args = ["pretrain-2d", "--out", str(out), "--set", "pretrain_2d.backbone=resnet18", "--set", "pretrain_2d.rooms=3",
            "--set", "pretrain_2d.steps=3", "--set", "pretrain_2d.batch_size=8"]
    assert main(args) == 0
    info = json.loads((tmp_path / "standin.pth.json").read_text())
    assert info["stand_in"] is True and "STAND-IN" in info["what"]
    assert info["settings"]["seed"] == C.Pretrain2DConfig().seed and 0.0 <= info["stats"]["held_out_accuracy"] <= 1.0
    assert "NOT ImageNet" in capsys.readouterr().out
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0 and out.stat().st_mtime_ns == mtime  # cached: same settings, not retrained
    saved = torch.load(out, weights_only=True)
    model = ResNet2D("resnet18", num_classes=20, init=str(out))  # the fc head is ignored
    own = model.backbone.state_dict()
    assert torch.equal(own["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    assert torch.equal(own["bn1.running_mean"], saved["bn1.running_mean"])
    with pytest.raises(ValueError, match="no classifier.weight of shape"):
        ResNet2D("resnet18", num_classes=20, init=str(out), init_classifier=True)  # a crop stand-in has none
    for init in ("imagenet", "none"):  # refused before any weights load (offline, imagenet would fail on those)
        with pytest.raises(ValueError, match=f"init_classifier: init '{init}' holds no classifier"):
            ResNet2D("resnet18", num_classes=20, init=init, init_classifier=True)
    assert main(args[:-2] + ["--set", "pretrain_2d.batch_size=4"]) == 0
    assert out.stat().st_mtime_ns != mtime  # other settings: trained again


def test_pixels_stand_in_learns_to_segment_the_corpus_views_and_loads_as_init_2d(tmp_path, capsys):
    """task 'pixels': the 2D branch's own dilated network trained on per-pixel labels of corpus
    rooms; a few dozen steps on 4 rooms already beat the majority class on held-out views, and
    the saved backbone is what ResNet2D loads. The crop stand-in's cache name does not change."""
    from rayseg.pretrain2d import default_path, render_views

    cfg = C.Pretrain2DConfig(backbone="resnet18", task="pixels", rooms=4, views_per_room=4, image_width=64,
                             image_height=48, steps=60, batch_size=8, lr=0.02)
    images, labels = render_views(cfg)
    assert images.shape == (16, 48, 64, 3) and labels.shape == (16, 48, 64) and labels.dtype == np.uint8
    out = tmp_path / "pixels.pth"
    args = ["pretrain-2d", "--out", str(out)] + [a for k, v in (("backbone", "resnet18"), ("task", "pixels"),
                                                                 ("rooms", 4), ("views_per_room", 4),
                                                                 ("image_width", 64), ("image_height", 48),
                                                                 ("steps", 60), ("batch_size", 8), ("lr", 0.02))
                                                  for a in ("--set", f"pretrain_2d.{k}={v}")]
    assert main(args) == 0
    info = json.loads((tmp_path / "pixels.pth.json").read_text())
    assert info["stand_in"] is True and "per-pixel" in info["what"] and info["settings"]["task"] == "pixels"
    assert "NOT ImageNet; per-pixel labels" in capsys.readouterr().out
    valid = labels[labels != 255]
    majority = np.bincount(valid).max() / valid.size
    assert info["stats"]["held_out_pixel_accuracy"] > majority, (info["stats"], majority)
    model = ResNet2D("resnet18", num_classes=20, init=str(out))
    saved = torch.load(out, weights_only=True)
    assert torch.equal(model.backbone.state_dict()["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    headed = ResNet2D("resnet18", num_classes=20, init=str(out), init_classifier=True)  # model.init_2d_classifier
    assert torch.equal(headed.classifier.weight, saved["classifier.weight"])
    assert not torch.equal(model.classifier.weight, saved["classifier.weight"])  # a backbone init leaves it
    assert default_path(C.Pretrain2DConfig(backbone="resnet18", rooms=400, steps=2000), "scannet20").name == \
        "standin-scannet20-resnet18-ce3d66f6fe8d.pth"  # the crop stand-in every measurement used
    assert default_path(cfg, "scannet20").name.startswith("standin-pixels-scannet20-resnet18-")
