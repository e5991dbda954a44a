"""The losses of METHOD.md (Eq. 1-9), written as small functions on batched tensors.

Batch conventions (shared with ``rayseg.data.pipeline``):

- per-point tensors are concatenated over the B scenes of a batch: shape (N, ...);
- ``offset`` int64 (B,) holds cumulative counts: scene b owns rows ``offset[b-1]:offset[b]``
  (``offset[-1] == N``). The same convention is used for voxels, views and sampled pairs;
- ``tags`` (B, C) float multi-hot scene tags (the only supervision);
- ``region`` int64 (N,) region ids, globally unique over the batch, ``NO_REGION`` (-1) = none;
- 2D logits are (V, C, H, W) for all V views of the batch, ``view_offset`` (B,) cumulative view
  counts. 2D losses work on pixels as rows: see ``flatten_pixels`` / ``pixel_offset``;
- links: ``link_point`` (K,) batch point, ``link_view`` (K,) batch view, ``link_pixel`` (K,) flat
  pixel y * W + x at H x W.

One training step wires them like this (``rayseg.train.loop.two_branch_step``; 3D rows are the
student's voxels, as in the reference; ``first`` = voxel_representatives(inverse, M)):

    lcls3 = multilabel_cls_loss(logits3_vox, offset, tags)
    lcls2 = multilabel_cls_loss_2d(logits2, view_offset, view_tags)
    pool, pool_offset = link_pool(link_point, link_view, point_offset, max_links_per_view,
                                  min_links_per_view, generator, keep_point=is_first_point)
    rows, pair_offset = draw_pairs(pool_offset, max_pairs, generator)   # once per direction
    lcon3 = guidance_loss("contrastive", pair_offset, query=proj3d(f3[rows]), target=f2[rows])
    label, mask = rpc_targets(t_logits3_vox[t_inverse[first]], row_tags[first], region[first],
                              state3.thresholds(), mode)
    state3.update(metrics.all_reduce_sum(accepted_counts(label, mask, C)))
    lrpc3 = rpc_loss(logits3_vox, label, mask)
    total, log = total_loss({...}, cfg.loss, stage, step)

Nothing here reads ground truth: pseudo-labels come from the teacher's logits and scene tags only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayseg.config import LossConfig

# Logit given to classes absent from the scene tag before a softmax (METHOD.md "masked softmax").
ABSENT_LOGIT = -1e6

STAGES = ("cmg", "cmg_rpc", "seg")
TERMS = ("cls_3d", "cls_2d", "con_3d", "con_2d", "rpc_3d", "rpc_2d")


# --------------------------------------------------------------------------------------------
# Offsets
# --------------------------------------------------------------------------------------------


def counts_from_offset(offset: torch.Tensor) -> torch.Tensor:
    """Cumulative offsets (B,) -> per-scene counts (B,)."""
    offset = offset.long()
    return torch.diff(offset, prepend=offset.new_zeros(1))


def batch_index(offset: torch.Tensor) -> torch.Tensor:
    """Cumulative offsets (B,) -> scene index of every row (N,)."""
    counts = counts_from_offset(offset)
    if (counts < 0).any():
        raise ValueError(f"offset must be non-decreasing cumulative counts, got {offset.tolist()}")
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)


def gather_tags(tags: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-scene tags (B, C) -> per-row tags (N, C) using the rows' cumulative offsets."""
    if tags.shape[0] != offset.shape[0]:
        raise ValueError(f"tags has {tags.shape[0]} scenes but offset has {offset.shape[0]}")
    return tags[batch_index(offset.to(tags.device))]


def segment_mean(values: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of each scene: (N, C) -> ((B, C) means, (B,) bool "scene has rows").

    Scenes without rows get a zero mean and False in the second output."""
    counts = counts_from_offset(offset).to(values.device)
    idx = batch_index(offset.to(values.device))
    sums = values.new_zeros(len(counts), values.shape[1]).index_add_(0, idx, values)
    nonempty = counts > 0
    return sums / counts.clamp(min=1).unsqueeze(1).to(values.dtype), nonempty


# --------------------------------------------------------------------------------------------
# 2D rows
# --------------------------------------------------------------------------------------------


def flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """(V, C, H, W) -> (V*H*W, C) rows, or (V, H, W) -> (V*H*W,), pixel order v, y, x."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 3:
        return x.reshape(-1)
    raise ValueError(f"expected a (V, C, H, W) or (V, H, W) tensor, got shape {tuple(x.shape)}")


def pixel_offset(view_offset: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cumulative view counts (B,) -> cumulative pixel counts (B,) of flatten_pixels rows."""
    return view_offset.long() * (height * width)


def gather_pixels(feature_map: torch.Tensor, view: torch.Tensor, pixel: torch.Tensor,
                  image_hw: tuple[int, int]) -> torch.Tensor:
    """Rows (K, D) of a (V, D, h, w) map at links (view, flat pixel y * W + x at the image size
    (H, W) = image_hw), as the batch's link_view / link_pixel give them. A coarser map (e.g.
    stride-8 features) is read at the cell covering the pixel; a full-size map (e.g. upsampled
    logits) at the pixel itself."""
    height, width = image_hw
    h, w = feature_map.shape[2:]
    pixel = pixel.long()
    if len(pixel) and (pixel.min() < 0 or pixel.max() >= height * width):
        raise ValueError(f"link pixels must lie in 0..{height * width - 1} for images of {height} x {width}")
    y = torch.div(pixel, width, rounding_mode="floor")
    x = pixel - y * width
    r = torch.div(y * h, height, rounding_mode="floor")
    c = torch.div(x * w, width, rounding_mode="floor")
    return feature_map[view.long(), :, r, c]


# --------------------------------------------------------------------------------------------
# Multi-label classification (Lcls)
# --------------------------------------------------------------------------------------------


def multilabel_cls_loss(logits: torch.Tensor, offset: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Lcls for 3D: multi-label soft margin (sigmoid BCE averaged over classes, then over scenes)
    between each scene's tags and its average-pooled logits.

    logits (N, C) per voxel (or point) rows, offset (B,) cumulative row counts, tags (B, C).
    Scenes without rows are left out; with none at all the loss is a zero that keeps the graph."""
    pooled, nonempty = segment_mean(logits.float(), offset)
    if not nonempty.any():
        return logits.sum() * 0.0
    return F.multilabel_soft_margin_loss(pooled[nonempty], tags[nonempty].float())


def tag_prior_loss(tags: torch.Tensor) -> float:
    """Lcls of the best scene-blind predictor: every scene gets the same pooled logits, the
    log-odds of each class's tag frequency over `tags` (S, C) multi-hot. That is the mean binary
    entropy of the frequencies (a class tagged everywhere or nowhere costs 0). A cls loss near
    this value means the network has learned the tag frequencies and little else."""
    freq = tags.double().mean(dim=0).clamp(1e-12, 1 - 1e-12)
    entropy = -(freq * freq.log() + (1 - freq) * (1 - freq).log())
    return float(entropy.mean())


def multilabel_cls_loss_2d(logits: torch.Tensor, view_offset: torch.Tensor, tags: torch.Tensor,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Lcls for 2D: the same loss on logits (V, C, H, W) average-pooled over all pixels of all the
    views of each scene. valid (V, H, W) bool, optional: pool only these pixels (pixels of removed
    floor/wall/ceiling regions are not); a scene with no valid pixel is left out."""
    if logits.dim() != 4:
        raise ValueError(f"2D logits must be (V, C, H, W), got shape {tuple(logits.shape)}")
    if valid is None:  # views share H x W, so the mean of per-view means is the pixel mean
        return multilabel_cls_loss(logits.float().mean(dim=(2, 3)), view_offset, tags)
    if valid.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"valid must be (V, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, "
                         f"got {tuple(valid.shape)}")
    weight = valid.to(torch.float32).unsqueeze(1)
    view_sums = (logits.float() * weight).sum(dim=(2, 3))
    scene_sums, _ = segment_mean(view_sums, view_offset)  # means of sums over the same views:
    scene_pixels, _ = segment_mean(weight.sum(dim=(2, 3)), view_offset)  # their ratio is the mean
    nonempty = scene_pixels[:, 0] > 0
    if not nonempty.any():
        return logits.sum() * 0.0
    pooled = scene_sums[nonempty] / scene_pixels[nonempty]
    return F.multilabel_soft_margin_loss(pooled, tags[nonempty].float())


# --------------------------------------------------------------------------------------------
# Masked softmax and region pooling
# --------------------------------------------------------------------------------------------


def masked_softmax(logits: torch.Tensor, row_tags: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes present in each row's scene tag (absent classes get logit -1e6,
    hence probability 0). logits (N, C), row_tags (N, C) multi-hot. Computed in float32 so that
    -1e6 is finite under half precision. A row whose scene has no tag at all gets the uniform
    distribution (every class equally absent)."""
    present = row_tags > 0.5
    masked = torch.where(present, logits.float(), torch.full_like(logits, ABSENT_LOGIT, dtype=torch.float32))
    return torch.softmax(masked, dim=1)


def region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3: every row gets the mean of the rows sharing its region id; rows with region -1
    keep their own values. values (N, C), region (N,) ids unique over the batch."""
    if region.shape[0] != values.shape[0]:
        raise ValueError(f"region has {region.shape[0]} rows but values have {values.shape[0]}")
    out = values.clone()
    has_region = region >= 0
    if has_region.any():
        ids, inverse = torch.unique(region[has_region], return_inverse=True)
        sums = values.new_zeros(len(ids), values.shape[1]).index_add_(0, inverse, values[has_region])
        counts = torch.bincount(inverse, minlength=len(ids)).to(values.dtype)
        out[has_region] = (sums / counts.unsqueeze(1))[inverse]
    return out


# --------------------------------------------------------------------------------------------
# Region-point consistency (Lrpc) with fixed / adaptive thresholds
# --------------------------------------------------------------------------------------------


class ThresholdState:
    """Per-class thresholds of Eq. 5-7 and the counts Q they are computed from.

    Q[c] is the cumulative number of rows (points or pixels) accepted with pseudo-label c since
    the start of training, summed over all ranks; it is updated after masking, never reset, and
    travels in checkpoints through state_dict / load_state_dict.

    - adaptive: T[c] = eta * Q[c] / max(Q). While max(Q) == 0 (the first step) the ratio 0/0 is
      defined as 0, so T = 0 and every row passes (the mask is prob >= T). Later, a class never
      accepted has T[c] = 0 as well.
    - fixed: T[c] = eta for every class (Q is still counted, for logging).
    """

    def __init__(self, num_classes: int, eta: float, adaptive: bool):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.num_classes = num_classes
        self.eta = float(eta)
        self.adaptive = bool(adaptive)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> "ThresholdState":
        """From an RPCConfig (eta, threshold = 'adaptive' | 'fixed')."""
        return cls(num_classes, cfg.eta, cfg.threshold == "adaptive")

    def thresholds(self) -> torch.Tensor:
        """T (C,) float32 on the CPU (move it to the logits' device)."""
        if not self.adaptive:
            return torch.full((self.num_classes,), self.eta, dtype=torch.float32)
        top = int(self.counts.max())
        if top == 0:  # 0/0 := 0: nothing counted yet, everything passes
            return torch.zeros(self.num_classes, dtype=torch.float32)
        return (self.eta * self.counts.double() / top).float()

    def update(self, accepted_counts: torch.Tensor) -> None:
        """Q += accepted_counts (C,), which must already be summed over all DDP ranks
        (see rayseg.metrics.all_reduce_sum) so that every rank keeps the same Q."""
        accepted_counts = accepted_counts.detach().to("cpu", torch.int64).reshape(-1)
        if accepted_counts.shape[0] != self.num_classes:
            raise ValueError(f"accepted_counts has {accepted_counts.shape[0]} classes, expected {self.num_classes}")
        if (accepted_counts < 0).any():
            raise ValueError("accepted_counts must be >= 0")
        self.counts += accepted_counts

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_classes", "counts"):
            if key not in state:
                raise KeyError(f"threshold state: missing key {key!r}")
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"threshold state: num_classes is {state['num_classes']}, expected {self.num_classes}")
        counts = torch.as_tensor(state["counts"], dtype=torch.int64)
        if counts.shape != (self.num_classes,):
            raise ValueError(f"threshold state: counts has shape {tuple(counts.shape)}, expected ({self.num_classes},)")
        self.counts = counts.clone()


def rpc_targets(teacher_logits: torch.Tensor, row_tags: torch.Tensor, region: torch.Tensor | None,
                thresholds: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher side of RPC (Eq. 2-3, 5-7): pseudo-labels (N,) int64 and the keep mask (N,) bool.

    teacher_logits (N, C) per row (already mapped from voxels to the rows), row_tags (N, C) the
    rows' tags on the TEACHER side (3D: gather_tags(teacher_tags, teacher_point_offset); 2D:
    gather_tags(teacher_view_tags, pixel_offset(teacher_view_offset, H, W))): under Mix3D the
    teacher sees the two scenes separately, so these are each original scene's tags,
    region (N,) ids (-1 = none; ignored in 'point' mode), thresholds (C,) from ThresholdState.
    mode 'region': masked-softmax probabilities are mean-pooled within regions before the argmax
    and the threshold test; 'point': no pooling. A row is kept iff its (pooled) probability of
    the chosen class c is >= T[c] (the reference's test)."""
    if mode not in ("region", "point"):
        raise ValueError(f"rpc mode must be 'region' or 'point', got {mode!r}")
    with torch.no_grad():
        probs = masked_softmax(teacher_logits.detach(), row_tags)
        if mode == "region":
            if region is None:
                raise ValueError("rpc mode 'region' needs a region tensor")
            probs = region_mean(probs, region.to(probs.device))
        confidence, label = probs.max(dim=1)
        mask = confidence >= thresholds.to(probs.device)[label]
    return label, mask


def accepted_counts(label: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows kept per pseudo-label class (C,) int64: this rank's contribution to Q."""
    return torch.bincount(label[mask], minlength=num_classes).long()


def rpc_loss(student_logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
             row_tags: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8: cross-entropy of the student's logits (N, C) against the pseudo-labels, times the
    mask, averaged over ALL N rows (masked-out rows count in the denominator). With `row_tags`
    (N, C) the softmax runs over each row's tagged classes only, like the teacher's (the
    reference's CE is over all C classes: `loss.rpc.student_classes`)."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    logits = student_logits.float()
    if row_tags is not None:  # the target's own class always counts (the teacher's tags may be a subset's)
        allowed = (row_tags > 0.5) | F.one_hot(label, logits.shape[1]).bool()
        logits = torch.where(allowed, logits, torch.full_like(logits, ABSENT_LOGIT))
    ce = F.cross_entropy(logits, label, reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / student_logits.shape[0]


# --------------------------------------------------------------------------------------------
# Cross-modal guidance (Lcon), four variants
# --------------------------------------------------------------------------------------------


def voxel_representatives(inverse: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """The first point (lowest index) of every voxel: (M,) point indices from inverse (N,) point ->
    voxel row. The reference keeps one point per voxel (its voxeliser's unique index) and reads
    links and region ids from it; rayseg uses the first point of the voxel for the same role."""
    inverse = inverse.long()
    first = torch.full((num_voxels,), len(inverse), dtype=torch.long, device=inverse.device)
    return first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), "amin")


def link_pool(link_point: torch.Tensor, link_view: torch.Tensor, point_offset: torch.Tensor,
              max_links_per_view: int, min_links_per_view: int, generator: torch.Generator | None = None,
              keep_point: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The links cross-modal guidance draws its pairs from, per view as the reference does.

    Links are rows (point index into the batch's points, view index into the batch's views).
    1. keep_point (N,) bool, optional: only links of these points count (the training step passes
       the voxels' representative points, so that a voxel has at most one link per view, as in
       the reference where links belong to voxels);
    2. views with at most min_links_per_view links are skipped (the reference: `> 64` keeps);
    3. every remaining view keeps at most max_links_per_view of its links, drawn uniformly
       without replacement with `generator` (deterministic for a seeded CPU generator).
    Returns (link indices grouped by scene, views in batch order, links sorted within a view;
    pool_offset (B,) cumulative pool sizes per scene), both on the links' device."""
    device = link_point.device
    point = link_point.detach().long().cpu()
    view = link_view.detach().long().cpu()
    offset = point_offset.detach().long().cpu()
    if point.shape != view.shape:
        raise ValueError(f"link_point {tuple(point.shape)} and link_view {tuple(view.shape)} differ")
    if len(point) and (point.min() < 0 or point.max() >= (offset[-1] if len(offset) else 0)):
        raise ValueError("link_point holds indices outside the batch's points")
    candidates = torch.arange(len(point))
    if keep_point is not None:
        candidates = candidates[keep_point.detach().cpu()[point]]
    chosen = []
    if len(candidates):
        by_view = candidates[torch.argsort(view[candidates], stable=True)]
        counts = torch.bincount(view[by_view])
        for rows in by_view.split(counts.tolist()):
            if len(rows) <= min_links_per_view:
                continue
            if len(rows) > max_links_per_view:
                rows = rows[torch.randperm(len(rows), generator=generator)[:max_links_per_view]].sort().values
            chosen.append(rows)
    pool = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
    # Views of a scene follow each other, so the pool is grouped by scene already.
    scene = torch.searchsorted(offset, point[pool], right=True)
    pool_offset = torch.cumsum(torch.bincount(scene, minlength=len(offset)), 0)
    return pool.to(device), pool_offset.to(device)


def draw_pairs(pool_offset: torch.Tensor, max_pairs: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most max_pairs rows of each scene's pool, uniformly without replacement (sorted within
    the scene). The reference draws the pairs of each guidance direction separately: call this
    once per direction. Returns (rows into the pool, pair_offset (B,) cumulative pair counts)."""
    device = pool_offset.device
    offset = pool_offset.detach().long().cpu()
    starts = torch.cat([offset.new_zeros(1), offset[:-1]])
    rows, counts = [], []
    for start, end in zip(starts.tolist(), offset.tolist()):
        scene_rows = torch.arange(start, end)
        if len(scene_rows) > max_pairs:
            scene_rows = scene_rows[torch.randperm(len(scene_rows), generator=generator)[:max_pairs]].sort().values
        rows.append(scene_rows)
        counts.append(len(scene_rows))
    selected = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return selected.to(device), torch.cumsum(torch.tensor(counts, dtype=torch.long), 0).to(device)


def contrastive_guidance(query: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of Eq. 1 for one scene, rows only: q = normalise(query) (P, D), k = normalise(
    target).detach() (P, D), logits = q k^T / tau, cross-entropy with target i for row i,
    averaged over the P rows."""
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(target.detach().float(), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def mse_guidance(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between normalise(query) and normalise(target).detach() (P, D),
    summed over D and averaged over the P pairs."""
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(target.detach().float(), dim=1)
    return ((q - k) ** 2).sum(dim=1).mean()


def affinity_guidance(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Match pairwise cosine-similarity matrices: A_q = q q^T (P, P) of this branch's normalised
    features, A_k = k k^T of the other branch's normalised features (detached); the mean of
    (A_q - A_k)^2 over the P x P entries. query and target may have different widths."""
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(target.detach().float(), dim=1)
    return ((q @ q.t() - k @ k.t()) ** 2).mean()


def cam_guidance(logits: torch.Tensor, target_logits: torch.Tensor, pair_tags: torch.Tensor) -> torch.Tensor:
    """CAM guidance: targets are the argmax of the other branch's masked softmax (its class
    activation map, detached) at the paired locations; cross-entropy of this branch's logits
    (P, C) against them, averaged over the P pairs. pair_tags (P, C) = the pairs' scene tags."""
    target = masked_softmax(target_logits.detach(), pair_tags).argmax(dim=1)
    return F.cross_entropy(logits.float(), target)


def fused_guidance(logits: torch.Tensor, target_logits: torch.Tensor, pair_tags: torch.Tensor) -> torch.Tensor:
    """Not in the paper (rayseg's variant): like 'cam', but the target at each pair is the argmax
    of both branches' masked softmax averaged (both detached), so a class only the other branch
    sees is taught where it is more confident than this branch, and a class this branch sees but
    the other never does is not overwritten (measured: 'cam' 2D -> 3D erased curtain, which the 2D
    branch never labels). Cross-entropy of this branch's logits (P, C), averaged over the pairs."""
    both = masked_softmax(logits.detach(), pair_tags) + masked_softmax(target_logits.detach(), pair_tags)
    return F.cross_entropy(logits.float(), both.argmax(dim=1))


GUIDANCE_VARIANTS = ("contrastive", "mse", "affinity", "cam", "fused")


def guidance_inputs(variant: str, rows: torch.Tensor, *, feat: torch.Tensor, other_feat: torch.Tensor,
                    project, logits: torch.Tensor, other_logits: torch.Tensor,
                    pair_tags: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one direction's guidance_loss reads at the drawn pair rows, by variant: the one
    place that knows it (a new variant adds a branch here and one in guidance_loss). feat /
    logits: this branch's features / class logits at the pooled links; other_*: the other
    branch's; project: this branch's projection head into the other's feature width."""
    if variant in ("contrastive", "mse"):
        return {"query": project(feat[rows]), "target": other_feat[rows]}
    if variant == "affinity":
        return {"query": feat[rows], "target": other_feat[rows]}
    if variant in ("cam", "fused"):
        return {"logits": logits[rows], "target_logits": other_logits[rows], "pair_tags": pair_tags[rows]}
    raise ValueError(f"unknown guidance variant {variant!r} (choose from {', '.join(GUIDANCE_VARIANTS)})")


def guidance_loss(variant: str, pair_offset: torch.Tensor, *, query: torch.Tensor | None = None,
                  target: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                  target_logits: torch.Tensor | None = None, pair_tags: torch.Tensor | None = None,
                  temperature: float = 0.07, reduction: str = "sum") -> torch.Tensor:
    """One direction of cross-modal guidance, computed per scene and then summed (reduction
    'sum', the reference's `cmg_loss`: a batch of 4 scenes weighs 4x one scene) or averaged
    ('mean') over the scenes that have at least one pair (drawn by link_pool / draw_pairs; rows
    of every tensor below are those pairs, grouped by scene as pair_offset says). For Lcon3D
    "this branch" is 3D and the other is 2D; for Lcon2D the reverse.

    Inputs by variant:
    - 'contrastive', 'mse': query = this branch's projection-head output at the pairs (P, D_other),
      target = the other branch's raw features at the pairs (P, D_other), detached here.
    - 'affinity': query = this branch's features at the pairs, target = the other branch's raw
      features at the pairs (detached here); widths may differ.
    - 'cam', 'fused': logits = this branch's class logits at the pairs (P, C), target_logits = the
      other branch's logits at the pairs (detached here), pair_tags = the pairs' scene tags (P, C).
    Query/target features are L2-normalised here. With no pair at all the result is a zero that
    keeps the graph (so DDP sees every parameter used)."""
    if variant in ("contrastive", "mse", "affinity"):
        if query is None or target is None:
            raise ValueError(f"guidance {variant!r} needs query and target features")
        if query.shape[0] != target.shape[0]:
            raise ValueError(f"guidance {variant!r}: query has {query.shape[0]} rows, target {target.shape[0]}")
        anchor = query
    elif variant in ("cam", "fused"):
        if logits is None or target_logits is None or pair_tags is None:
            raise ValueError(f"guidance {variant!r} needs logits, target_logits and pair_tags")
        anchor = logits
    else:
        raise ValueError(f"unknown guidance variant {variant!r} (choose from {', '.join(GUIDANCE_VARIANTS)})")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"guidance reduction must be 'sum' or 'mean', got {reduction!r}")
    num_pairs = int(pair_offset[-1]) if len(pair_offset) else 0
    if num_pairs != anchor.shape[0]:
        raise ValueError(f"pair_offset covers {num_pairs} pairs but inputs have {anchor.shape[0]} rows")
    starts = torch.cat([pair_offset.new_zeros(1), pair_offset[:-1]]).tolist()
    per_scene = []
    for start, end in zip(starts, pair_offset.tolist()):
        if end == start:
            continue
        rows = slice(start, end)
        if variant == "contrastive":
            per_scene.append(contrastive_guidance(query[rows], target[rows], temperature))
        elif variant == "mse":
            per_scene.append(mse_guidance(query[rows], target[rows]))
        elif variant == "affinity":
            per_scene.append(affinity_guidance(query[rows], target[rows]))
        elif variant == "cam":
            per_scene.append(cam_guidance(logits[rows], target_logits[rows], pair_tags[rows]))
        else:
            per_scene.append(fused_guidance(logits[rows], target_logits[rows], pair_tags[rows]))
    if not per_scene:
        return anchor.sum() * 0.0
    return torch.stack(per_scene).sum() if reduction == "sum" else torch.stack(per_scene).mean()


# --------------------------------------------------------------------------------------------
# Eq. 9 and warm-ups
# --------------------------------------------------------------------------------------------


def warmup_weight(step: int, warmup_steps: int) -> float:
    """Linear ramp min(step / warmup_steps, 1); warmup_steps 0 means no warm-up (always 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(max(step, 0) / warmup_steps, 1.0)


def active_terms(cfg: LossConfig, stage: str, has_2d: bool = True) -> tuple[str, ...]:
    """The Eq. 9 terms a step must compute, from the switches: cls_3d / cls_2d; con_3d / con_2d
    when guidance.loss_3d / loss_2d != 'none' (guidance needs views); rpc_3d / rpc_2d only in
    stage 'cmg_rpc'. has_2d=False (no views, e.g. num_views 0) drops every 2D-dependent term."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    if stage == "seg":
        raise ValueError("stage 'seg' trains with plain cross-entropy, not Eq. 9")
    terms = []
    if cfg.cls_3d:
        terms.append("cls_3d")
    if cfg.cls_2d and has_2d:
        terms.append("cls_2d")
    if cfg.guidance.loss_3d != "none" and has_2d:
        terms.append("con_3d")
    if cfg.guidance.loss_2d != "none" and has_2d:
        terms.append("con_2d")
    if stage == "cmg_rpc":
        if cfg.rpc.enabled_3d:
            terms.append("rpc_3d")
        if cfg.rpc.enabled_2d and has_2d:
            terms.append("rpc_2d")
    return tuple(terms)


def term_weights(cfg: LossConfig, stage: str, step: int) -> dict[str, float]:
    """Eq. 9 weights at `step` (steps since the start of the current stage, counted from 0), with
    the reference's warm-ups (each stage is a fresh run there, so its ramps count from the
    stage's first step):

    - stage cmg: cls = min(step / cls_warmup_steps, 1) (0 at the first step: the reference
      counts a step after using it); con = alpha * min((step + 1) / guidance.warmup_steps, 1);
    - stage cmg_rpc: cls and con at full weight (not ramped again: they were on in stage cmg);
      rpc = beta * min((step + 1) / rpc.warmup_steps, 1).

    A warm-up of 0 steps means full weight from the first step."""
    if stage == "cmg":
        cls = warmup_weight(step, cfg.cls_warmup_steps)
        con = warmup_weight(step + 1, cfg.guidance.warmup_steps)
    else:
        cls, con = 1.0, 1.0
    rpc = warmup_weight(step + 1, cfg.rpc.warmup_steps)
    alpha, beta = cfg.guidance.alpha * con, cfg.rpc.beta * rpc
    return {"cls_3d": cls, "cls_2d": cls, "con_3d": alpha, "con_2d": alpha, "rpc_3d": beta, "rpc_2d": beta}


def total_loss(terms: dict[str, torch.Tensor], cfg: LossConfig, stage: str, step: int,
               has_2d: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: L = Lcls3D + Lcls2D + alpha(Lcon3D + Lcon2D) + beta(Lrpc3D + Lrpc2D).

    terms maps names in TERMS to scalar losses; every term active_terms() lists must be there
    (a missing one is a bug in the caller and raises), others are logged but not added.
    Returns the total and floats for logging: 'loss', 'loss/<term>', 'weight/<term>'."""
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown} (known: {', '.join(TERMS)})")
    active = active_terms(cfg, stage, has_2d)
    missing = [t for t in active if t not in terms]
    if missing:
        raise ValueError(f"stage {stage!r}: loss terms {missing} are switched on but were not computed")
    if not active:
        raise ValueError(f"stage {stage!r}: every loss term is switched off (loss.cls_3d, loss.cls_2d, "
                         f"loss.guidance.loss_3d/loss_2d, loss.rpc.enabled_3d/enabled_2d)")
    weights = term_weights(cfg, stage, step)
    total = sum(weights[t] * terms[t] for t in active)
    log = {"loss": float(total.detach())}
    for name, value in terms.items():
        log[f"loss/{name}"] = float(value.detach())
    for name in active:
        log[f"weight/{name}"] = weights[name]
    return total, log


# --------------------------------------------------------------------------------------------
# Pseudo-labels for inference
# --------------------------------------------------------------------------------------------


def scene_pseudo_labels(logits: torch.Tensor, tags: torch.Tensor, region: torch.Tensor | None,
                        mode: str = "region") -> torch.Tensor:
    """Pseudo-labels of one scene (METHOD.md): logits (N, C) -> masked softmax with the scene's
    tags (C,) -> region mean (mode 'region'; region (N,), -1 = none) -> argmax. No threshold."""
    if mode not in ("region", "point"):
        raise ValueError(f"pseudo-label mode must be 'region' or 'point', got {mode!r}")
    with torch.no_grad():
        probs = masked_softmax(logits, tags.reshape(1, -1).expand(logits.shape[0], -1))
        if mode == "region":
            if region is None:
                raise ValueError("pseudo-label mode 'region' needs a region tensor")
            probs = region_mean(probs, region.to(probs.device).long())
        return probs.argmax(dim=1)
