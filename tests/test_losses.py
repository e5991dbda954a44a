"""Losses of METHOD.md against small hand-computed examples and straightforward reimplementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from rayseg import losses
from rayseg.config import LossConfig, GuidanceConfig, RPCConfig


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def soft_margin(pooled: list[float], tags: list[float]) -> float:
    """Multi-label soft margin of one scene, written out: mean_c -[y log s(x) + (1-y) log s(-x)]."""
    terms = [softplus(-x) if y else softplus(x) for x, y in zip(pooled, tags)]
    return sum(terms) / len(terms)


# ----------------------------------------------------------------------------------- offsets


def test_offsets_and_gather_tags():
    offset = torch.tensor([2, 2, 5])
    assert losses.counts_from_offset(offset).tolist() == [2, 0, 3]
    assert losses.batch_index(offset).tolist() == [0, 0, 2, 2, 2]
    tags = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert losses.gather_tags(tags, offset).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]
    with pytest.raises(ValueError, match="non-decreasing"):
        losses.batch_index(torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="2 scenes but offset has 3"):
        losses.gather_tags(tags[:2], offset)


# ------------------------------------------------------------------------------- Lcls 3D / 2D


def test_multilabel_cls_loss_hand_example():
    logits = torch.tensor([[1.0, -1.0], [3.0, 1.0], [0.0, -2.0]], requires_grad=True)
    offset = torch.tensor([2, 3])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # scene 0 pools to (2, 0) with tags (1, 0); scene 1 is (0, -2) with tags (0, 1)
    expected = (soft_margin([2.0, 0.0], [1, 0]) + soft_margin([0.0, -2.0], [0, 1])) / 2
    loss = losses.multilabel_cls_loss(logits, offset, tags)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # a scene without rows is left out of the mean
    with_empty = losses.multilabel_cls_loss(logits, torch.tensor([2, 2, 3]),
                                            torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    assert with_empty.item() == pytest.approx(expected, rel=1e-6)


def test_tag_prior_loss_is_the_cls_loss_of_constant_log_odds():
    tags = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # frequencies (1, 1/4, 1/4): entropies 0, H(1/4), H(1/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert losses.tag_prior_loss(tags) == pytest.approx(2 * h / 3, rel=1e-9)
    # the same number as Lcls of every scene pooling to logit(frequency)
    freq = tags.mean(0).clamp(1e-6, 1 - 1e-6)
    pooled = torch.log(freq / (1 - freq)).expand(4, 3)
    loss = losses.multilabel_cls_loss(pooled, torch.tensor([1, 2, 3, 4]), tags)
    assert loss.item() == pytest.approx(losses.tag_prior_loss(tags), abs=1e-5)


def test_multilabel_cls_loss_2d_pools_all_pixels_of_all_views():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 2, 3, generator=gen)  # 3 views: scene 0 has views 0-1, scene 1 view 2
    tags = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    pooled0 = [logits[0:2, c].mean().item() for c in range(2)]
    pooled1 = [logits[2:3, c].mean().item() for c in range(2)]
    expected = (soft_margin(pooled0, [1, 1]) + soft_margin(pooled1, [0, 1])) / 2
    loss = losses.multilabel_cls_loss_2d(logits, torch.tensor([2, 3]), tags)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"\(V, C, H, W\)"):
        losses.multilabel_cls_loss_2d(logits[0], torch.tensor([2]), tags[:1])

    # valid pixels only (removed structures): scene 0 pools 3 pixels of view 0 and 1 of view 1,
    # scene 1 has none left and is left out
    valid = torch.zeros(3, 2, 3, dtype=torch.bool)
    valid[0, 0, :] = True
    valid[1, 1, 2] = True
    pooled0 = [torch.cat([logits[0, c, 0, :], logits[1, c, 1, 2:]]).mean().item() for c in range(2)]
    loss = losses.multilabel_cls_loss_2d(logits, torch.tensor([2, 3]), tags, valid)
    assert loss.item() == pytest.approx(soft_margin(pooled0, [1, 1]), rel=1e-5)
    full = losses.multilabel_cls_loss_2d(logits, torch.tensor([2, 3]), tags, torch.ones(3, 2, 3, dtype=torch.bool))
    assert full.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"valid must be \(V, H, W\)"):
        losses.multilabel_cls_loss_2d(logits, torch.tensor([2, 3]), tags, valid[:, 0])


# -------------------------------------------------------------------- masked softmax, regions


def test_masked_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    probs = losses.masked_softmax(logits, tags)
    e1, e3 = math.exp(1), math.exp(3)
    assert probs[0].tolist() == pytest.approx([e1 / (e1 + e3), 0.0, e3 / (e1 + e3)], abs=1e-7)
    assert probs[1].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-7)
    assert probs[2].tolist() == pytest.approx([1 / 3] * 3, abs=1e-7)  # no tag at all: uniform
    half = losses.masked_softmax(logits.half(), tags)  # -1e6 must not overflow in half precision
    assert torch.isfinite(half).all() and half[0].tolist() == pytest.approx(probs[0].tolist(), abs=1e-3)


def test_region_mean_keeps_no_region_rows():
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [1.0, 0.0]])
    region = torch.tensor([5, 5, -1, 100, 100, 100])
    out = losses.region_mean(values, region)
    expected = [[0.5, 0.5], [0.5, 0.5], [0.3, 0.7], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]
    assert out.tolist() == [pytest.approx(r, abs=1e-7) for r in expected]
    assert losses.region_mean(values, torch.full((6,), -1)).tolist() == values.tolist()
    with pytest.raises(ValueError, match="region has 5 rows"):
        losses.region_mean(values, region[:5])


# ------------------------------------------------------------------------- thresholds and RPC


def test_threshold_first_step_everything_passes_then_adaptive_rule():
    state = losses.ThresholdState(num_classes=3, eta=1.0, adaptive=True)
    assert state.thresholds().tolist() == [0.0, 0.0, 0.0]  # Q = 0: 0/0 := 0
    # teacher logits whose masked softmax is nearly uniform: far below eta = 1.0
    logits = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.2], [0.0, 0.3, 0.0]])
    tags = torch.ones(3, 3)
    label, mask = losses.rpc_targets(logits, tags, None, state.thresholds(), mode="point")
    assert label.tolist() == [0, 2, 1] and mask.all()
    state.update(losses.accepted_counts(label, mask, 3))
    assert state.counts.tolist() == [1, 1, 1]
    state.update(torch.tensor([5, 1, 0]))
    assert state.counts.tolist() == [6, 2, 1]  # cumulative, never reset
    assert state.thresholds().tolist() == pytest.approx([1.0, 2 / 6, 1 / 6])

    state = losses.ThresholdState(num_classes=3, eta=0.8, adaptive=True)
    state.update(torch.tensor([4, 1, 0]))
    thresholds = state.thresholds()
    assert thresholds.tolist() == pytest.approx([0.8, 0.2, 0.0])
    # probabilities (point mode, all classes tagged): row -> (argmax, prob of argmax)
    probs = torch.tensor([[0.85, 0.1, 0.05], [0.75, 0.2, 0.05], [0.1, 0.25, 0.65], [0.3, 0.4, 0.3],
                          [0.3, 0.3, 0.4]])
    label, mask = losses.rpc_targets(probs.log(), torch.ones(5, 3), None, thresholds, mode="point")
    assert label.tolist() == [0, 0, 2, 1, 2]
    assert mask.tolist() == [True, False, True, True, True]  # 0.75 < 0.8 for class 0; class 2 has T = 0
    assert losses.accepted_counts(label, mask, 3).tolist() == [1, 1, 2]


def test_fixed_threshold_ignores_counts():
    state = losses.ThresholdState(num_classes=2, eta=0.7, adaptive=False)
    assert state.thresholds().tolist() == pytest.approx([0.7, 0.7])
    state.update(torch.tensor([10, 0]))
    assert state.thresholds().tolist() == pytest.approx([0.7, 0.7])
    probs = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.2, 0.8], [0.35, 0.65]])
    label, mask = losses.rpc_targets(probs.log(), torch.ones(4, 2), None, state.thresholds(), mode="point")
    assert label.tolist() == [0, 0, 1, 1] and mask.tolist() == [True, False, True, False]
    # the reference's test is >=: with eta = 1 a probability of exactly 1 (exp(-200) underflows)
    # passes, and a probability exactly at the threshold passes
    certain = torch.tensor([[0.0, -200.0]])
    _, mask = losses.rpc_targets(certain, torch.ones(1, 2), None, torch.ones(2), mode="point")
    assert losses.masked_softmax(certain, torch.ones(1, 2))[0, 0].item() == 1.0 and mask.all()
    half = torch.tensor([[0.0, 0.0]])  # masked softmax (0.5, 0.5), argmax class 0
    assert losses.rpc_targets(half, torch.ones(1, 2), None, torch.tensor([0.5, 0.9]), "point")[1].item()
    assert not losses.rpc_targets(half, torch.ones(1, 2), None, torch.tensor([0.5001, 0.0]), "point")[1].item()
    adaptive = losses.ThresholdState.from_config(RPCConfig(eta=0.7, threshold="adaptive"), 2)
    adaptive.update(torch.tensor([10, 0]))
    _, mask = losses.rpc_targets(probs.log(), torch.ones(4, 2), None, adaptive.thresholds(), mode="point")
    assert mask.tolist() == [True, False, True, True]  # class 1 never accepted: T[1] = 0


def test_region_mode_vs_point_mode():
    # region 0 = rows 0-2: row 2 alone prefers class 1 but the region's mean prefers class 0
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.3, 0.2, 0.5]])
    tags = torch.tensor([[1.0, 1.0, 0.0]] * 3 + [[1.0, 1.0, 1.0]])  # class 2 absent in rows 0-2
    region = torch.tensor([0, 0, 0, -1])
    zero = torch.zeros(3)
    point_label, _ = losses.rpc_targets(probs.log(), tags, region, zero, mode="point")
    region_label, _ = losses.rpc_targets(probs.log(), tags, region, zero, mode="region")
    assert point_label.tolist() == [0, 0, 1, 2]
    assert region_label.tolist() == [0, 0, 0, 2]
    # the threshold tests the REGION mean (0.7 for class 0), not the point's own probability
    _, mask = losses.rpc_targets(probs.log(), tags, region, torch.tensor([0.65, 0.0, 0.9]), mode="region")
    assert mask.tolist() == [True, True, True, False]
    _, mask = losses.rpc_targets(probs.log(), tags, region, torch.tensor([0.75, 0.0, 0.9]), mode="region")
    assert mask.tolist() == [False, False, False, False]
    with pytest.raises(ValueError, match="needs a region"):
        losses.rpc_targets(probs.log(), tags, None, zero, mode="region")


def test_rpc_loss_averages_over_all_points():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]], requires_grad=True)
    label = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, False, True, False])

    def ce(row, c):
        return math.log(sum(math.exp(v) for v in row)) - row[c]

    expected = (ce([2.0, 0.0], 0) + ce([1.0, 1.0], 1)) / 4
    loss = losses.rpc_loss(logits, label, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[3].abs().sum() == 0  # masked rows: no gradient
    assert logits.grad[0].abs().sum() > 0


def test_rpc_loss_over_tagged_classes_only():
    """loss.rpc.student_classes = 'tagged': the softmax runs over the row's tagged classes (and the
    target's), so untagged classes get no gradient from RPC."""
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, 4.0]], requires_grad=True)
    label = torch.tensor([0, 2])
    tags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # row 1's target class 2 is not tagged
    loss = losses.rpc_loss(logits, label, torch.tensor([True, True]), tags)

    def ce(row, c):
        return math.log(sum(math.exp(v) for v in row)) - row[c]

    assert loss.item() == pytest.approx((ce([2.0, 0.0], 0) + ce([0.0, 1.0, 4.0], 2)) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[0, 1] != 0
    full = losses.rpc_loss(logits.detach(), label, torch.tensor([True, True]))
    assert full.item() > loss.item()  # the untagged class 2 of row 0 costs the 'all' variant


def test_rpc_teacher_gets_no_gradient():
    teacher = torch.randn(6, 3, requires_grad=True)
    student = torch.randn(6, 3, requires_grad=True)
    label, mask = losses.rpc_targets(teacher, torch.ones(6, 3), torch.tensor([0, 0, 1, 1, -1, 2]),
                                     torch.zeros(3), mode="region")
    losses.rpc_loss(student, label, mask).backward()
    assert teacher.grad is None and student.grad is not None


def test_rpc_on_pixels_with_pixel_regions():
    # 2 scenes: scene 0 has views 0-1, scene 1 has view 2; views are 1 x 2 pixels, 3 classes
    logits = torch.zeros(3, 3, 1, 2)
    logits[0, :, 0, 0] = torch.tensor([2.0, 0.0, 9.0])  # class 2 is absent from scene 0's tags
    logits[0, :, 0, 1] = torch.tensor([0.0, 0.5, 0.0])
    logits[1, :, 0, 0] = torch.tensor([0.0, 3.0, 0.0])
    logits[1, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    logits[2, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    logits[2, :, 0, 1] = torch.tensor([0.0, 3.0, 1.0])
    tags = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    view_region = torch.tensor([[[0, 0]], [[1, -1]], [[2, 2]]])
    rows = losses.flatten_pixels(logits)
    assert rows.shape == (6, 3) and rows[1].tolist() == [0.0, 0.5, 0.0]
    row_tags = losses.gather_tags(tags, losses.pixel_offset(torch.tensor([2, 3]), 1, 2))
    label, mask = losses.rpc_targets(rows, row_tags, losses.flatten_pixels(view_region), torch.zeros(3), "region")
    # region 0: masked softmax of (2,0) and (0,0.5) averaged -> class 0; region 1 (one pixel) -> 1;
    # the pixel without region keeps its own (1,0) -> 0; region 2 over classes 1-2 -> class 2 vs 1:
    # mean of softmax(0,1) and softmax(3,1) on classes (1,2) = (0.575, 0.425) -> class 1
    assert label.tolist() == [0, 0, 1, 0, 1, 1]
    assert mask.all()


def test_threshold_state_round_trip_and_errors():
    state = losses.ThresholdState(num_classes=3, eta=0.8, adaptive=True)
    state.update(torch.tensor([3, 0, 7]))
    saved = state.state_dict()
    state.update(torch.tensor([1, 1, 1]))  # the saved copy must not alias the live counts
    restored = losses.ThresholdState(num_classes=3, eta=0.8, adaptive=True)
    restored.load_state_dict(saved)
    assert restored.counts.tolist() == [3, 0, 7]
    assert restored.thresholds().tolist() == pytest.approx([0.8 * 3 / 7, 0.0, 0.8])
    with pytest.raises(ValueError, match="num_classes is 3, expected 4"):
        losses.ThresholdState(num_classes=4, eta=0.8, adaptive=True).load_state_dict(saved)
    with pytest.raises(KeyError, match="counts"):
        restored.load_state_dict({"num_classes": 3})
    with pytest.raises(ValueError, match="2 classes, expected 3"):
        restored.update(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eta"):
        losses.ThresholdState(num_classes=3, eta=1.5, adaptive=True)


# ----------------------------------------------------------------------------------- guidance


def test_contrastive_guidance_hand_example_and_detach():
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True)  # normalised to e1, e2
    target = torch.tensor([[5.0, 0.0], [0.0, 0.5]], requires_grad=True)
    loss = losses.contrastive_guidance(query, target, temperature=0.5)
    # logits = [[2, 0], [0, 2]]: each row -log(e^2 / (e^2 + 1))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    loss.backward()
    assert target.grad is None and query.grad is not None


def test_contrastive_guidance_matches_reimplementation_per_scene():
    gen = torch.Generator().manual_seed(3)
    query, target = torch.randn(7, 4, generator=gen), torch.randn(7, 4, generator=gen)
    pair_offset = torch.tensor([4, 4, 7])  # the middle scene has no pairs: left out
    tau = 0.07

    def info_nce(q, k):
        total = 0.0
        qn = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in q.tolist()]
        kn = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in k.tolist()]
        for i, qi in enumerate(qn):
            sims = [sum(a * b for a, b in zip(qi, kj)) / tau for kj in kn]
            top = max(sims)
            total += top + math.log(sum(math.exp(s - top) for s in sims)) - sims[i]
        return total / len(qn)

    per_scene = info_nce(query[:4], target[:4]) + info_nce(query[4:], target[4:])
    got = losses.guidance_loss("contrastive", pair_offset, query=query, target=target, temperature=tau)
    assert got.item() == pytest.approx(per_scene, rel=1e-5)  # the reference sums over scenes
    mean = losses.guidance_loss("contrastive", pair_offset, query=query, target=target, temperature=tau,
                                reduction="mean")
    assert mean.item() == pytest.approx(per_scene / 2, rel=1e-5)  # two scenes have pairs


def test_guidance_of_two_identical_scenes_is_twice_one_scene():
    gen = torch.Generator().manual_seed(3)
    query, target = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    one = losses.guidance_loss("contrastive", torch.tensor([5]), query=query, target=target)
    two = losses.guidance_loss("contrastive", torch.tensor([5, 10]), query=torch.cat([query, query]),
                               target=torch.cat([target, target]))
    assert two.item() == pytest.approx(2 * one.item(), rel=1e-6)
    two_mean = losses.guidance_loss("contrastive", torch.tensor([5, 10]), query=torch.cat([query, query]),
                                    target=torch.cat([target, target]), reduction="mean")
    assert two_mean.item() == pytest.approx(one.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        losses.guidance_loss("contrastive", torch.tensor([5]), query=query, target=target, reduction="max")


def test_mse_affinity_cam_hand_examples():
    # mse: (3,4)/5 = (0.6, 0.8) vs (1, 0): 0.4^2 + 0.8^2
    assert losses.mse_guidance(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.8)
    # affinity: A_q = I (2x2), A_k = all ones (both target rows point the same way): mean (0,1,1,0)^2
    aff = losses.affinity_guidance(torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
                                   torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))
    assert aff.item() == pytest.approx(0.5)
    # cam: the other branch's masked argmax: row 0 over classes {0, 2} -> 2 (its class 1 logit is
    # absent from the tags), row 1 -> 0; CE of this branch's logits against (2, 0)
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], requires_grad=True)
    other = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    tags = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    lse0 = math.log(math.e + 1 + math.exp(2))
    lse1 = math.log(2 + math.e)
    expected = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    cam = losses.cam_guidance(logits, other, tags)
    assert cam.item() == pytest.approx(expected, rel=1e-6)
    cam.backward()
    assert other.grad is None and logits.grad is not None
    # fused: argmax over the tagged classes {0, 2} of both masked softmaxes summed. Row 0: both
    # branches say 2 (p 0.73) -> 2; row 1: this branch 0 or 2 evenly (p 0.5 each), the other 0
    # (p 0.73) -> 0; row 2: this branch 2 (p 0.98), the other 0 (p 0.62) -> 2, where cam says 0.
    fused_logits = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]], requires_grad=True)
    fused_other = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    fused_tags = torch.ones(3, 3)
    fused_tags[:, 1] = 0
    fused = losses.fused_guidance(fused_logits, fused_other, fused_tags)
    expected = F.cross_entropy(fused_logits.detach(), torch.tensor([2, 0, 2]))
    assert fused.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.cam_guidance(fused_logits, fused_other, fused_tags).item() == pytest.approx(
        F.cross_entropy(fused_logits.detach(), torch.tensor([2, 0, 0])).item(), rel=1e-6)  # cam: row 2 -> 0
    fused.backward()
    assert fused_logits.grad is not None


def test_guidance_loss_dispatch_and_errors():
    q, k = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    off = torch.tensor([2, 5])
    for variant, fn in (("mse", losses.mse_guidance), ("affinity", losses.affinity_guidance)):
        got = losses.guidance_loss(variant, off, query=q, target=k)
        assert got.item() == pytest.approx((fn(q[:2], k[:2]) + fn(q[2:], k[2:])).item(), rel=1e-6)
    empty = losses.guidance_loss("contrastive", torch.tensor([0, 0]), query=q[:0], target=k[:0])
    assert empty.item() == 0.0 and empty.requires_grad  # keeps the graph for DDP
    with pytest.raises(ValueError, match="unknown guidance variant 'l1'"):
        losses.guidance_loss("l1", off, query=q, target=k)
    with pytest.raises(ValueError, match="covers 4 pairs"):
        losses.guidance_loss("mse", torch.tensor([4]), query=q, target=k)
    with pytest.raises(ValueError, match="needs logits"):
        losses.guidance_loss("cam", off, query=q, target=k)


def test_voxel_representatives_are_first_points():
    inverse = torch.tensor([2, 0, 2, 1, 0, 1])
    assert losses.voxel_representatives(inverse, 3).tolist() == [1, 3, 0]


def test_link_pool_per_view_then_pairs_per_direction():
    # scene 0 = points 0..99, scene 1 = points 100..139; view 0 sees 80 points of scene 0, view 1
    # sees 64 (exactly the minimum: skipped, the reference keeps views with > 64 links), view 2
    # (scene 1) sees 40 (skipped)
    link_point = torch.cat([torch.arange(80), torch.arange(20, 84), torch.arange(100, 140)])
    link_view = torch.tensor([0] * 80 + [1] * 64 + [2] * 40)
    offset = torch.tensor([100, 140])
    pool, pool_offset = losses.link_pool(link_point, link_view, offset, max_links_per_view=50,
                                         min_links_per_view=64, generator=torch.Generator().manual_seed(0))
    assert pool_offset.tolist() == [50, 50]  # 50 of view 0's 80; views 1 and 2 skipped
    assert (link_view[pool] == 0).all() and len(set(pool.tolist())) == 50
    # keep_point: only links of the voxels' first points count (one link per voxel and view)
    keep = torch.zeros(140, dtype=torch.bool)
    keep[::2] = True
    _, pool_offset = losses.link_pool(link_point, link_view, offset, 512, 20, keep_point=keep)
    assert pool_offset.tolist() == [72, 72]  # view 2's 20 links are not > 20
    pool, pool_offset = losses.link_pool(link_point, link_view, offset, 512, 19, keep_point=keep)
    assert pool_offset.tolist() == [72, 92]  # view 0: 40, view 1: 32, view 2: 20 (all > 19)
    assert (link_point[pool] % 2 == 0).all()
    # pairs: at most max_pairs per scene, drawn separately per call (one call per direction)
    gen = torch.Generator().manual_seed(1)
    rows_3d, off_3d = losses.draw_pairs(pool_offset, 16, gen)
    rows_2d, off_2d = losses.draw_pairs(pool_offset, 16, gen)
    assert off_3d.tolist() == off_2d.tolist() == [16, 32]
    assert (rows_3d[:16] < 72).all() and (rows_3d[16:] >= 72).all()
    assert rows_3d.tolist() != rows_2d.tolist()  # independent draws
    every, off = losses.draw_pairs(torch.tensor([3, 3, 5]), 10)
    assert every.tolist() == [0, 1, 2, 3, 4] and off.tolist() == [3, 3, 5]
    with pytest.raises(ValueError, match="outside the batch"):
        losses.link_pool(torch.tensor([140]), torch.tensor([0]), offset, 4, 0)


def test_gather_pixels_from_coarse_map():
    fmap = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)  # V=2, D=1, h=2, w=3
    # image 8 x 12: pixel (y 5, x 11) of view 1 lies in cell (1, 2) -> value 6 + 1*3 + 2 = 11;
    # pixel (0, 4) of view 0 in cell (0, 1) -> 1
    pixel = torch.tensor([5 * 12 + 11, 0 * 12 + 4])
    got = losses.gather_pixels(fmap, torch.tensor([1, 0]), pixel, (8, 12))
    assert got[:, 0].tolist() == [11.0, 1.0]
    full = torch.arange(2 * 8 * 12, dtype=torch.float32).reshape(2, 1, 8, 12)  # full size: the pixel itself
    assert losses.gather_pixels(full, torch.tensor([1]), pixel[:1], (8, 12))[:, 0].tolist() == [96.0 + 71]
    with pytest.raises(ValueError, match="0..95"):
        losses.gather_pixels(fmap, torch.tensor([0]), torch.tensor([96]), (8, 12))


# ------------------------------------------------------------------------- warm-up and Eq. 9


def test_warmup_weight():
    assert losses.warmup_weight(0, 2400) == 0.0
    assert losses.warmup_weight(600, 2400) == 0.25
    assert losses.warmup_weight(2400, 2400) == 1.0
    assert losses.warmup_weight(10_000, 2400) == 1.0
    assert losses.warmup_weight(0, 0) == 1.0


def test_warmups_across_the_stage_boundary():
    # the reference: stage cmg ramps cls (step / 2400, counted after use) and CMG ((step + 1) /
    # 2400); stage cmg_rpc keeps cls and CMG at full weight and ramps RPC ((step + 1) / 2400)
    cfg = LossConfig(cls_warmup_steps=2400, guidance=GuidanceConfig(alpha=0.05, warmup_steps=2400),
                     rpc=RPCConfig(beta=1.0, warmup_steps=2400))
    w = losses.term_weights(cfg, "cmg", 0)
    assert (w["cls_3d"], w["cls_2d"]) == (0.0, 0.0) and w["con_3d"] == pytest.approx(0.05 / 2400)
    w = losses.term_weights(cfg, "cmg", 599)
    assert w["cls_3d"] == pytest.approx(599 / 2400) and w["con_2d"] == pytest.approx(0.05 * 0.25)
    w = losses.term_weights(cfg, "cmg", 5000)
    assert w["cls_3d"] == 1.0 and w["con_3d"] == pytest.approx(0.05)
    w = losses.term_weights(cfg, "cmg_rpc", 0)  # the next stage: no second ramp for cls / CMG
    assert w["cls_3d"] == 1.0 and w["con_3d"] == pytest.approx(0.05) and w["rpc_3d"] == pytest.approx(1 / 2400)
    w = losses.term_weights(cfg, "cmg_rpc", 1199)
    assert w["rpc_2d"] == pytest.approx(0.5) and w["cls_2d"] == 1.0
    off = losses.term_weights(LossConfig(cls_warmup_steps=0), "cmg", 0)
    assert off["cls_3d"] == 1.0  # 0 = no ramp (rayseg before this change)


def test_total_loss_eq9():
    cfg = LossConfig(cls_warmup_steps=0, guidance=GuidanceConfig(alpha=0.05, warmup_steps=100),
                     rpc=RPCConfig(beta=1.0, warmup_steps=200))
    terms = {name: torch.tensor(v) for name, v in zip(losses.TERMS, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))}
    stage1 = {k: v for k, v in terms.items() if not k.startswith("rpc")}
    total, log = losses.total_loss(stage1, cfg, "cmg", step=1000)
    assert total.item() == pytest.approx(1 + 2 + 0.05 * (3 + 4))
    assert log["loss"] == pytest.approx(total.item()) and log["loss/con_2d"] == 4.0
    total, log = losses.total_loss(stage1, cfg, "cmg", step=49)  # alpha half warmed: (49 + 1) / 100
    assert total.item() == pytest.approx(1 + 2 + 0.025 * 7)
    total, log = losses.total_loss(terms, cfg, "cmg_rpc", step=49)  # alpha full, beta a quarter
    assert total.item() == pytest.approx(1 + 2 + 0.05 * 7 + 0.25 * 11)
    assert log["weight/rpc_3d"] == 0.25 and log["weight/con_3d"] == pytest.approx(0.05)
    total, _ = losses.total_loss(terms, cfg, "cmg", step=1000)  # rpc only in stage cmg_rpc
    assert total.item() == pytest.approx(1 + 2 + 0.05 * 7)
    with pytest.raises(ValueError, match=r"\['rpc_3d', 'rpc_2d'\] are switched on"):
        losses.total_loss(stage1, cfg, "cmg_rpc", step=0)
    switched = LossConfig(cls_2d=False, guidance=GuidanceConfig(loss_3d="none"), rpc=RPCConfig(enabled_2d=False))
    assert losses.active_terms(switched, "cmg_rpc") == ("cls_3d", "con_2d", "rpc_3d")
    assert losses.active_terms(LossConfig(), "cmg_rpc", has_2d=False) == ("cls_3d", "rpc_3d")
    total, _ = losses.total_loss(terms, switched, "cmg_rpc", step=10_000)
    assert total.item() == pytest.approx(1 + 0.05 * 4 + 5)
    with pytest.raises(ValueError, match="unknown stage"):
        losses.active_terms(cfg, "stage1")
    nothing = LossConfig(cls_3d=False, guidance=GuidanceConfig(loss_3d="none", loss_2d="none"))
    with pytest.raises(ValueError, match="every loss term is switched off"):
        losses.total_loss({}, nothing, "cmg", step=0, has_2d=False)


# ------------------------------------------------------------------------------ pseudo-labels


def test_scene_pseudo_labels():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 5.0], [0.0, 2.0, 0.0], [0.5, 0.0, 4.0]])
    tags = torch.tensor([1.0, 1.0, 0.0])  # class 2 absent: row 1 -> class 1, row 3 -> class 0
    assert losses.scene_pseudo_labels(logits, tags, None, mode="point").tolist() == [0, 1, 1, 0]
    # region {0, 1}: mean of softmax(3,0) and softmax(0,1) favours class 0
    region = torch.tensor([7, 7, -1, -1])
    assert losses.scene_pseudo_labels(logits, tags, region).tolist() == [0, 0, 1, 0]


@pytest.mark.gpu
def test_losses_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(5)
    logits, teacher = torch.randn(40, 4, generator=gen), torch.randn(40, 4, generator=gen)
    offset, tags = torch.tensor([15, 40]), torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    region = torch.randint(-1, 6, (40,), generator=gen)
    link_point, link_view = torch.arange(40).repeat(2), torch.tensor([0] * 40 + [1] * 40)
    state = losses.ThresholdState(4, 0.8, adaptive=True)
    state.update(torch.tensor([5, 3, 0, 1]))

    def run(device):
        d = {k: v.to(device) for k, v in dict(logits=logits, teacher=teacher, offset=offset, tags=tags,
                                                region=region, lp=link_point, lv=link_view).items()}
        row_tags = losses.gather_tags(d["tags"], d["offset"])
        label, mask = losses.rpc_targets(d["teacher"], row_tags, d["region"], state.thresholds(), "region")
        pool, pool_offset = losses.link_pool(d["lp"], d["lv"], d["offset"], 16, 4, torch.Generator().manual_seed(1))
        rows, pair_offset = losses.draw_pairs(pool_offset, 8, torch.Generator().manual_seed(2))
        sel = pool[rows]
        q = d["logits"][d["lp"][sel]]
        return [losses.multilabel_cls_loss(d["logits"], d["offset"], d["tags"]).item(),
                losses.rpc_loss(d["logits"], label, mask).item(),
                losses.guidance_loss("contrastive", pair_offset, query=q, target=q.flip(0)).item(),
                losses.accepted_counts(label, mask, 4).tolist(), sel.tolist()]

    cpu, cuda = run("cpu"), run("cuda")
    assert cuda[3:] == cpu[3:]
    assert cuda[:3] == pytest.approx(cpu[:3], rel=1e-5)
