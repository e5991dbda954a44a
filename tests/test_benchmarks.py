"""The benchmark harness behind benchmarks/train_step.py and benchmarks/gpu_check.py: its split
step is the training step, it runs without Ray or MLflow, and the torchvision stand-in has
torchvision's ResNet layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _harness as H  # noqa: E402
import _tv_fallback  # noqa: E402

TINY_DEMO = ["synthetic.val_fraction=0.5", "synthetic.num_views=2", "synthetic.image_width=64",
             "synthetic.image_height=48", "synthetic.min_points=2000", "synthetic.max_points=3000",
             "data.image_width=64", "data.image_height=48", "data.voxel_size=0.1", "optim.batch_size=2"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The demo config on 4 small synthetic scenes (2 train), prepared without Ray."""
    cfg = H.demo_config(tmp_path_factory.mktemp("bench") / "demo", 4, TINY_DEMO)
    H.prepare_demo_data(cfg, log=lambda _: None)
    return cfg


def test_split_step_is_the_training_step(tiny_demo):
    """Timing the step part by part (backward in three calls) changes nothing: same loss, same
    student and teacher after the SGD and EMA updates as the whole step of rayseg.train.loop."""
    cfg = tiny_demo
    batch = next(H.batches(cfg, 0))
    whole, split = H.Trainer(cfg), H.Trainer(cfg)
    loss_whole, _ = whole.step(batch)
    loss_split, parts = split.step(batch, split=True)
    assert loss_split == pytest.approx(loss_whole, rel=1e-5)
    for a, b in ((whole.student, split.student), (whole.teacher, split.teacher)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert set(H.PARTS[1:]) <= set(parts) and all(wall >= 0 and cpu >= 0 for wall, cpu, _ in parts.values())
    assert parts["3d_bwd"][1] > 0 and parts["2d_bwd"][1] > 0  # both branches got their backward


@pytest.mark.parametrize("method", ["blocked", "per_offset"])
def test_flop_count_of_a_sparse_convolution_is_its_products(method):
    """The roofline of train_step.py counts the sparse backend's in-place GEMMs: a convolution
    forward + backward costs 2 x pairs x Cin x Cout FLOPs per product (output, input grad,
    weight grad), whichever algorithm runs it."""
    from rayseg.sparse import torch_backend as tb

    gen = torch.Generator().manual_seed(0)
    coord = torch.unique(torch.randint(0, 12, (600, 3), generator=gen), dim=0)
    coord = torch.cat([torch.zeros(len(coord), 1, dtype=torch.long), coord], dim=1)
    x = tb.make_input(coord, torch.randn(len(coord), 8, generator=gen))
    kmap = x.manager.conv_map(1, 3)
    kernel = torch.randn(27, 8, 16, requires_grad=True)
    feats = x.feats.clone().requires_grad_(True)
    with H.count_flops() as counter:
        tb.sparse_conv(feats, kernel, kmap, method=method).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * kmap.num_pairs() * 8 * 16


def test_split_step_attributes_flops_to_its_parts(tiny_demo):
    """Under count_flops every timed part carries the FLOPs run inside it: the student's 2D
    forward exactly those of the 2D network alone on the same images, backward about twice the
    forward, and no FLOPs for the optimizer or the EMA update."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = next(H.batches(tiny_demo, 0))
    trainer = H.Trainer(tiny_demo)
    with FlopCounterMode(display=False) as alone:
        with torch.no_grad():
            trainer.student.forward_2d(torch.as_tensor(batch["images"]))
    with H.count_flops():
        _, parts = trainer.step(batch, split=True)
    assert parts["2d_fwd"][2] == alone.get_total_flops() > 0
    for side in ("3d", "2d"):
        assert 1.5 < parts[f"{side}_bwd"][2] / parts[f"{side}_fwd"][2] < 2.5
    assert parts["teacher_fwd"][2] > 0 and parts["optimizer"][2] == parts["ema"][2] == 0


def test_prefetcher_workers_give_the_plain_loops_batches(tiny_demo):
    """The GPU check's batch feed (worker processes, across epoch boundaries) yields the plain
    loop's batches of epoch 0, 1, ... in order."""
    import numpy as np

    expected = list(H.batches(tiny_demo, 0)) + list(H.batches(tiny_demo, 1))
    feed = H.Prefetcher(tiny_demo, workers=1, depth=2)
    try:
        got = [feed.next() for _ in expected]
    finally:
        feed.close()
    for want, (batch, waited) in zip(expected, got):
        assert waited >= 0 and batch["teacher_scene_id"] == want["teacher_scene_id"]
        for k, v in want.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(batch[k], v, err_msg=k)


def test_training_step_runs_without_ray_or_mlflow():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import _harness, gpu_check; "
            "import rayseg.train.loop, rayseg.models.twobranch, rayseg.losses, rayseg.data.pipeline, "
            "rayseg.partition.job; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, kw", [("resnet34", {}), ("resnet50", {"replace_stride_with_dilation": [False, True, True]})])
def test_torchvision_stand_in_has_torchvisions_resnet_layout(name, kw):
    from rayseg.models._torchvision import import_torchvision

    real = getattr(import_torchvision().models, name)(weights=None, **kw)
    stand_in = getattr(_tv_fallback, name)(**kw)
    assert {k: tuple(v.shape) for k, v in real.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in stand_in.state_dict().items()}
    stand_in.load_state_dict(real.state_dict())
    real.eval(), stand_in.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(x), real(x), rtol=1e-4, atol=1e-5)
