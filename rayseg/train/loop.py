"""The per-worker training function: stages cmg -> cmg_rpc (two branches, EMA teacher, Eq. 9)
and stage seg (a fresh MinkUNet, cross-entropy on pseudo-labels).

Plain PyTorch in the middle, Ray only at the edges: the worker's rank / world size and
`ray.train.report` (metrics + checkpoint) come from `ray.train`, which also works in Ray Train's
local mode (`ScalingConfig(num_workers=0)`: the same function in the driver process), so tests
run exactly this code without spawning workers.

Distributed data parallelism is explicit: every rank starts from the same seeded weights, sees
its own slice of the epoch's scenes (equal counts, so every rank takes the same number of
steps), and gradients are averaged with one all-reduce of a flat buffer after backward. This
avoids DDP's forward hooks, which the two-branch model (separate 3D / 2D entry points, some
heads unused in some ablations) would need special-casing for; BN statistics stay per rank,
as with DDP.

Each epoch a worker builds its own dataset of (its scenes, this epoch's seed): the random
augmentation of a scene derives from (seed, epoch, scene id), so a resumed run sees exactly the
data the interrupted one would have seen.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rayseg import config as cfgmod
from rayseg import losses as L
from rayseg import metrics as M
from rayseg.data import pipeline, shards
from rayseg.data.scene import IGNORE_LABEL
from rayseg.oracle import is_oracle_folder
from rayseg.partition import is_oracle
from rayseg.teacher import decay_at, ema_update, make_teacher, unwrap
from rayseg.train.checkpoint import (CHECKPOINT_FILE, UnsafeCheckpointError, checkpoint_dir_name, checkpoints,
                                     link_into_ray_storage, load_state, parse_checkpoint_name,
                                     ray_checkpoint_file, remove_partial_ray_copies)
from rayseg.train.checkpoint import latest_checkpoint  # noqa: F401 - still importable from here
from rayseg.train.device import to_device
from rayseg.train.stages import stage_config
PROGRESS_SECONDS = 10.0  # a progress line at most this often (rank 0)


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def stage_schedule(cfg: cfgmod.Config, stage: str) -> tuple[int, float]:
    """(epochs, base learning rate) of a stage."""
    o = cfg.optim
    return {"cmg": (o.cmg_epochs, o.cmg_lr), "cmg_rpc": (o.cmg_rpc_epochs, o.cmg_rpc_lr),
            "seg": (o.seg_epochs, o.seg_lr)}[stage]


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    return base_lr * max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of the gradients over ranks in one all-reduce (a missing grad counts as zero so
    every rank contributes the same buffer layout)."""
    if world_size <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def rank_paths(paths: list[Path], rank: int, world: int, drop_last: bool) -> list[Path]:
    """This rank's slice of an epoch's scene list (equal length on every rank when drop_last)."""
    n = len(paths) - (len(paths) % world if drop_last else 0)
    return paths[rank:n:world]


def rank_plan(cfg: cfgmod.Config, split: str, mode: str, epoch: int, rank: int, world: int,
              limit: int | None = None) -> pipeline.DatasetPlan:
    """The plan of this rank's scenes for one pass (its paths may be empty)."""
    p = pipeline.plan(cfg.data.root, split, cfg, mode, epoch, cfg.seed)
    paths = p.paths if limit is None else p.paths[:limit]
    return p.only(rank_paths(paths, rank, world, drop_last=(mode == "train")))


def train_pass_stream(cfg: cfgmod.Config, data_epochs: list[int], rank: int, world: int,
                      batch_size: int) -> pipeline.RayPassStream | None:
    """With the Ray Data loader: one stream over all of a stage's remaining training passes, so
    the next epoch's scenes are made while this one trains and no dataset is rebuilt per epoch;
    None for the local loader."""
    if cfg.data.loader != "ray":
        return None
    plans = [(e, rank_plan(cfg, cfg.data.train_split, "train", e, rank, world)) for e in data_epochs]
    if not plans or not all(p.paths for _, p in plans):  # no scenes for this rank: nothing to stream
        return None
    return pipeline.RayPassStream(plans, cfg, cfg.seed, batch_size)


def timed_batches(batches: Iterator[dict], wait: list[float]) -> Iterator[dict]:
    """The batches, adding the seconds spent waiting for each to wait[0] (the trainer's data wait)."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        wait[0] += time.perf_counter() - t
        if batch is None:
            return
        yield batch


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def iter_rank_batches(cfg: cfgmod.Config, split: str, mode: str, epoch: int, rank: int, world: int,
                      batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """Collated batches of this rank's scenes for one pass (Ray Data or the local loop)."""
    sub = rank_plan(cfg, split, mode, epoch, rank, world, limit)
    if not sub.paths:
        return
    yield from pipeline.batches(sub, cfg, epoch, cfg.seed, batch_size, loader=cfg.data.loader)


def pixel_tags(view_tags: torch.Tensor, view_offset: torch.Tensor, hw: int) -> torch.Tensor:
    """Per-scene tags (B, C) -> per-pixel tags (V*H*W, C)."""
    per_view = L.gather_tags(view_tags, view_offset)
    return per_view.repeat_interleave(hw, dim=0)


# --------------------------------------------------------------------------------------------
# One step of stages cmg / cmg_rpc
# --------------------------------------------------------------------------------------------


def shift_voxels(coord: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(M, 4) [batch, x, y, z] voxel coords + one random integer offset in [0, max_shift) per
    axis for the whole batch (the reference's per-step shift: the networks see every parity of
    coordinates under their stride-2 convolutions). max_shift 0 = unchanged."""
    if max_shift <= 0:
        return coord
    shift = torch.randint(0, max_shift, (3,), generator=generator).to(coord.device, coord.dtype)
    return torch.cat([coord[:, :1], coord[:, 1:] + shift], dim=1)


def guidance_links(model, b: dict, out3: dict, out2: dict, g: cfgmod.GuidanceConfig, generator: torch.Generator,
                   first: torch.Tensor) -> dict[str, torch.Tensor]:
    """The links guidance draws its pairs from (losses.link_pool: one link per voxel and view, at
    most g.max_links_per_view per view, views with <= g.min_links_per_view links skipped) and each
    link's 3D and 2D features: pool_offset (B,) per-scene cumulative counts, point / view / pixel
    per link, voxel (the student voxel of its point), feat_3d, feat_2d (bilinear at its pixel).
    first: each student voxel's first point (losses.voxel_representatives)."""
    is_rep = torch.zeros(b["inverse"].shape[0], dtype=torch.bool, device=b["inverse"].device)
    is_rep[first] = True
    pool, pool_offset = L.link_pool(b["link_point"], b["link_view"], b["teacher_point_offset"], g.max_links_per_view,
                                    g.min_links_per_view, generator, keep_point=is_rep)
    lp, lv, lpx = b["link_point"][pool], b["link_view"][pool], b["link_pixel"][pool]
    vox = b["inverse"][lp]
    return {"pool_offset": pool_offset, "point": lp, "view": lv, "pixel": lpx, "voxel": vox,
            "feat_3d": out3["feat"][vox],
            "feat_2d": model.sample_2d(out2["feat"], lv, lpx, tuple(b["images"].shape[-2:]))}


def guidance_terms(model, b: dict, out3: dict, out2: dict, cfg: cfgmod.Config, active: tuple[str, ...],
                   generator: torch.Generator, world: int, first: torch.Tensor,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Lcon3D / Lcon2D as the reference computes them: a pool of links per scene (guidance_links),
    then max_pairs pairs drawn from the pool separately for each direction; per-scene
    losses summed over the batch (loss.guidance.scene_reduction 'sum'). Gradients are averaged
    over the Ray Train workers, so each worker's sum is scaled by the world size: the update is
    then the sum over the global batch whatever the number of workers. Returns (terms, floats to
    log: each term's value per scene, and for InfoNCE its chance level, the scenes' mean ln(#pairs)).
    first: each student voxel's first point (losses.voxel_representatives)."""
    g = cfg.loss.guidance
    links = guidance_links(model, b, out3, out2, g, generator, first)
    pool_offset, f3, f2 = links["pool_offset"], links["feat_3d"], links["feat_2d"]
    height, width = b["images"].shape[-2:]
    logit3 = out3["logits"][links["voxel"]]
    logit2 = L.flatten_pixels(out2["logits"])[links["view"] * height * width + links["pixel"]]
    pair_tags = L.gather_tags(b["teacher_tags"], b["teacher_point_offset"])[links["point"]]
    scale = float(world) if g.scene_reduction == "sum" else 1.0
    terms, log = {}, {}
    for term, variant, mine_feat, other_feat, project, mine_logit, other_logit in (
            ("con_3d", g.loss_3d, f3, f2, model.project_3d, logit3, logit2),
            ("con_2d", g.loss_2d, f2, f3, model.project_2d, logit2, logit3)):
        if term not in active:
            continue
        rows, pair_offset = L.draw_pairs(pool_offset, g.max_pairs, generator)
        inputs = L.guidance_inputs(variant, rows, feat=mine_feat, other_feat=other_feat, project=project,
                                   logits=mine_logit, other_logits=other_logit, pair_tags=pair_tags)
        value = L.guidance_loss(variant, pair_offset, temperature=g.temperature, reduction=g.scene_reduction, **inputs)
        terms[term] = value * scale
        pairs = L.counts_from_offset(pair_offset)
        scenes = int((pairs > 0).sum())
        log[f"{term}_per_scene"] = float(value.detach()) / max(1, scenes if g.scene_reduction == "sum" else 1)
        if scenes and variant == "contrastive":  # InfoNCE of uniform guesses: ln(#pairs), per scene
            log[f"{term}_chance"] = float(pairs[pairs > 0].double().log().mean())
    return terms, log


def two_branch_step(model, teacher, b: dict, cfg: cfgmod.Config, stage: str, stage_step: int,
                    thresholds: dict[str, L.ThresholdState], generator: torch.Generator, world: int = 1,
                    ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Eq. 9 on one batch. Returns (loss, floats to log, accepted counts per RPC side).
    3D rows are voxels, as in the reference: Lcls pools voxel logits, guidance pairs voxels with
    pixels, and RPC compares the student's voxel logits with the teacher's probabilities at each
    voxel's first point (its region id read there too)."""
    lc = cfg.loss
    has_2d = cfg.data.num_views > 0 and "images" in b and b["images"].shape[0] > 0
    active = L.active_terms(lc, stage, has_2d)
    terms: dict[str, torch.Tensor] = {}
    accepted: dict[str, torch.Tensor] = {}
    extra_log: dict[str, float] = {}
    max_shift = cfg.augment.voxel_shift if cfg.augment.enabled else 0

    out3 = model.forward_3d(shift_voxels(b["coord"], max_shift, generator), b["feat"])
    num_voxels = out3["logits"].shape[0]
    first = L.voxel_representatives(b["inverse"], num_voxels)  # student voxel -> its first point
    if "cls_3d" in active:
        terms["cls_3d"] = L.multilabel_cls_loss(out3["logits"], b["offset"], b["tags"])

    # The 2D branch is never mixed: group views by the real scenes (the teacher side's offsets).
    if has_2d:
        out2 = model.forward_2d(b["images"])
        height, width = b["images"].shape[-2:]
        if "cls_2d" in active:
            terms["cls_2d"] = L.multilabel_cls_loss_2d(out2["logits"], b["teacher_view_offset"], b["teacher_view_tags"],
                                                        b["view_valid"])
        if "con_3d" in active or "con_2d" in active:
            con, extra_log = guidance_terms(model, b, out3, out2, cfg, active, generator, world, first)
            terms.update(con)

    if "rpc_3d" in active or "rpc_2d" in active:
        with torch.no_grad():
            t3 = teacher.forward_3d(shift_voxels(b["teacher_coord"], max_shift, generator), b["teacher_feat"])
        if "rpc_3d" in active:
            row_tags = L.gather_tags(b["teacher_tags"], b["teacher_point_offset"])[first]
            label, mask = L.rpc_targets(t3["logits"][b["teacher_inverse"][first]], row_tags, b["teacher_region"][first],
                                        thresholds["3d"].thresholds(), lc.rpc.mode)
            student_tags = L.gather_tags(b["tags"], b["offset"]) if lc.rpc.student_classes == "tagged" else None
            terms["rpc_3d"] = L.rpc_loss(out3["logits"], label, mask, student_tags)
            accepted["3d"] = L.accepted_counts(label, mask, out3["logits"].shape[1])
        if "rpc_2d" in active:
            with torch.no_grad():
                t2 = teacher.forward_2d(b["teacher_images"])
            hw = height * width
            row_tags = pixel_tags(b["teacher_view_tags"], b["teacher_view_offset"], hw)
            label, mask = L.rpc_targets(L.flatten_pixels(t2["logits"]), row_tags, b["teacher_view_region"].reshape(-1),
                                        thresholds["2d"].thresholds(), lc.rpc.mode)
            mask &= b["view_valid"].reshape(-1)  # removed structures: their tags are cleared
            terms["rpc_2d"] = L.rpc_loss(L.flatten_pixels(out2["logits"]), label, mask,
                                         row_tags if lc.rpc.student_classes == "tagged" else None)
            accepted["2d"] = L.accepted_counts(label, mask, out3["logits"].shape[1])

    loss, log = L.total_loss(terms, lc, stage, stage_step, has_2d)
    log.update(extra_log)
    for side, counts in accepted.items():
        log[f"rpc_{side}_kept"] = float(counts.sum()) / max(1, (num_voxels if side == "3d"
                                                              else b["images"].shape[0] * height * width))
    return loss, log, accepted


def seg_step(net, b: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage seg: cross-entropy of the point logits against the pseudo-labels."""
    _, logits = net(b["coord"], b["feat"])
    loss = F.cross_entropy(logits[b["inverse"]], b["pseudo_label"], ignore_index=IGNORE_LABEL)
    return loss, {"loss": float(loss.detach())}


# --------------------------------------------------------------------------------------------
# Evaluation on this rank's scenes (confusion counts, all-reduced)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def pseudo_label_confusion(model, cfg: cfgmod.Config, num_classes: int, rank: int, world: int,
                           device: torch.device, limit: int | None, with_3d: bool = True) -> dict[str, torch.Tensor]:
    """Confusion of the teacher's pseudo-labels (masked softmax -> region mean -> argmax) against
    GT on the first `limit` train scenes, 3D (unless not `with_3d`: left at zero) and 2D. GT is
    read here for the metric only."""
    model.eval()
    conf = {"3d": torch.zeros(num_classes, num_classes, dtype=torch.int64),
            "2d": torch.zeros(num_classes, num_classes, dtype=torch.int64)}
    mode = cfg.loss.rpc.mode
    for batch in iter_rank_batches(cfg, cfg.data.train_split, "eval", 0, rank, world, 1, limit):
        b = to_device(batch, device)
        if with_3d:
            out3 = model.forward_3d(b["coord"], b["feat"])
            pred = L.scene_pseudo_labels(out3["logits"][b["inverse"]], b["tags"][0], b.get("region"), mode)
            conf["3d"] += M.confusion_matrix(pred.cpu(), b["label"].cpu(), num_classes)
        if cfg.data.num_views and b["images"].shape[0]:
            out2 = model.forward_2d(b["images"])
            pred2 = L.scene_pseudo_labels(L.flatten_pixels(out2["logits"]), b["view_tags"][0],
                                          b["view_region"].reshape(-1), mode)
            conf["2d"] += M.confusion_matrix(pred2.cpu(), b["view_label"].reshape(-1).cpu(), num_classes)
    return {k: M.all_reduce_sum(v) for k, v in conf.items()}


def val_miou_3d(teacher, cfg: cfgmod.Config, class_names: tuple[str, ...], rank: int, world: int,
                device: torch.device) -> float:
    """3D mIoU of the teacher on the val split, as the reference validates stage cmg to pick its
    best checkpoint: logits masked by the scene tags, argmax per point (no region pooling). Reads
    val GT: used only by the oracle option optim.cmg_rpc_init = 'best_val'."""
    val = cfgmod.replace(cfg, **{"data.train_split": cfg.data.val_split, "loss.rpc.mode": "point"})
    conf = pseudo_label_confusion(teacher, val, len(class_names), rank, world, device, None)["3d"]
    return float(M.metrics_dict(conf, class_names, prefix="val_")["val_miou"])


@torch.no_grad()
def segmentation_confusion(net, cfg: cfgmod.Config, split: str, num_classes: int, rank: int, world: int,
                           device: torch.device) -> torch.Tensor:
    """Confusion of a segmentation network's argmax on a split (GT read for the metric only)."""
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in iter_rank_batches(cfg, split, "eval", 0, rank, world, 1):
        b = to_device(batch, device)
        _, logits = net(b["coord"], b["feat"])
        conf += M.confusion_matrix(logits[b["inverse"]].argmax(1).cpu(), b["label"].cpu(), num_classes)
    return M.all_reduce_sum(conf)


# --------------------------------------------------------------------------------------------
# State and checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands: the next epoch of the current stage and the step counters."""

    stage_index: int = 0
    epoch: int = 0
    step: int = 0
    stage_step: int = 0
    mlflow_run_id: str | None = None
    history: list[dict] = field(default_factory=list)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep 0 = delete none) and the last
    one of each earlier stage: stage cmg's last is where `rayseg train --from` branches."""
    if keep > 0:
        found = checkpoints(run_dir)
        stage_of = [(parse_checkpoint_name(p.parent.name) or (0, "", 0))[1] for p in found]
        stage_ends = {p for i, p in enumerate(found[:-1]) if stage_of[i] != stage_of[i + 1]}
        for old in found[:-keep]:
            if old not in stage_ends:
                shutil.rmtree(old.parent, ignore_errors=True)


def resume_state(ray_file: Path | None, run_dir: Path, device: torch.device | str = "cpu",
                 ) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from: (file, loaded state), or (None, None) for a fresh start.

    Candidates: Ray Train's checkpoint (what a restarted worker is handed; on a cluster the only
    one a worker on another node can see) and the run directory's, newest first. The one with
    the most progress wins, ties going to Ray's. A file that does not load (e.g. truncated when a
    disk filled mid-copy) is skipped with a warning, not fatal: the next candidate is used."""
    def load(path: Path) -> dict | None:
        try:
            return load_state(path, map_location=device)
        except UnsafeCheckpointError:
            raise  # a planted file is refused, not skipped: someone wrote into the run directory
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
            print(f"[rayseg] WARNING: checkpoint {path} does not load ({type(exc).__name__}: {exc}); "
                  "trying an older one", flush=True)
            return None

    best: tuple[Path | None, dict | None] = (None, None)
    if ray_file is not None:
        best = (ray_file, load(ray_file))
        if best[1] is None:
            best = (None, None)
    for path in reversed(checkpoints(run_dir)):
        state = load(path)
        if state is None:
            continue
        if best[1] is None or state["progress"]["step"] > best[1]["progress"]["step"]:
            best = (path, state)
        break  # the newest loadable one of the run directory
    return best


def save_checkpoint(run_dir: Path, state: dict, progress: Progress, stage: str, keep: int = 0) -> Path:
    """Rank 0 writes checkpoints/<step>/state.pt atomically (temp dir + rename), then deletes
    all but the newest `keep` (0 = none deleted)."""
    final = run_dir / "checkpoints" / checkpoint_dir_name(progress.step, stage, progress.epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    torch.save({**state, "progress": progress.__dict__}, tmp / CHECKPOINT_FILE)
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(run_dir, keep)
    return final


# --------------------------------------------------------------------------------------------
# The training function
# --------------------------------------------------------------------------------------------


def build_models(cfg: cfgmod.Config, num_classes: int, stage: str):
    """(student, teacher or None) for a stage, seeded identically on every rank."""
    torch.manual_seed(cfg.seed)
    if stage == "seg":
        from rayseg.models.minkunet import build_minkunet

        return build_minkunet(cfg.optim.seg_backbone, cfg.model.in_channels, num_classes, cfg.model.backend), None
    from rayseg.models.twobranch import TwoBranchModel

    student = TwoBranchModel(cfg.model, num_classes)
    return student, make_teacher(student)


def make_optimizer(model: torch.nn.Module, cfg: cfgmod.Config, stage: str) -> torch.optim.SGD:
    """One SGD over both branches at the stage's base learning rate (the poly schedule sets it
    every step, times each group's "lr_scale"). Each stage starts a fresh one (no momentum carried
    over), as the reference's stage cmg_rpc is a new run started from stage cmg's weights. With
    optim.lr_scale_2d_backbone != 1 the 2D backbone is a second parameter group at that scale."""
    scale = cfg.optim.lr_scale_2d_backbone
    trainable = [p for p in model.parameters() if p.requires_grad]
    net2d = getattr(unwrap(model), "net2d", None)
    if scale == 1.0 or net2d is None or stage == "seg":
        groups = [{"params": trainable, "lr_scale": 1.0}]
    else:
        backbone = {id(p) for p in net2d.backbone.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in backbone], "lr_scale": 1.0},
                  {"params": [p for p in trainable if id(p) in backbone], "lr_scale": scale}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=stage_schedule(cfg, stage)[1],
                           momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def log_tag_prior(cfg: cfgmod.Config, tracker) -> float:
    """Log and print Lcls of the scene-blind tag-frequency predictor over the train split (tags
    only): the reference line below which cls_3d / cls_2d show that the networks recognise
    classes rather than just their frequencies."""
    paths = pipeline.plan(cfg.data.root, cfg.data.train_split, cfg, "train", 0, cfg.seed).paths
    tags = np.stack([shards.read_scene(p, ["tags"])["tags"] for p in paths]).astype(np.float32)
    prior = L.tag_prior_loss(torch.from_numpy(tags))
    tracker.log_metrics({"cls_prior_loss": prior}, step=0)
    print(f"[rayseg] Lcls of the tag-frequency predictor on {len(paths)} train scenes: {prior:.4f} "
          "(cls losses near it: the networks know little beyond how often each class is tagged)", flush=True)
    return prior


def quiet_ray_train_logs() -> None:
    """rayseg prints its own progress and epoch lines: not Ray Train's INFO echo of every report
    (its warnings and errors still show). Its "Reported metrics" lines log under `ray.train`, but
    the worker's "Reporting training result N: TrainingReport(...)" lines log under a logger
    named after the file that emits them (`logging.getLogger(__file__)` in Ray's
    train/v2/_internal/execution/context.py), outside `ray.train`, so that one is named here."""
    import importlib.util

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    except ImportError:  # another Ray layout: nothing to quiet
        spec = None
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


@dataclass
class TrainState:
    """Everything a checkpoint holds and a resume restores. `state_dict` and `load_state_dict`
    are the only two places that know the checkpoint's training keys, so saving and resuming
    cannot drift apart (torchtitan's TrainState)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.SGD
    thresholds: dict[str, L.ThresholdState]  # RPC's adaptive thresholds, per side
    generator: torch.Generator  # this rank's pair sampling
    progress: Progress = field(default_factory=Progress)
    best_cmg: dict | None = None  # optim.cmg_rpc_init 'best_val' (an oracle): stage cmg's best weights on val

    @classmethod
    def fresh(cls, cfg: cfgmod.Config, num_classes: int, stage: str, device: torch.device, rank: int) -> "TrainState":
        student, teacher = build_models(cfg, num_classes, stage)
        student.to(device)
        if teacher is not None:
            teacher.to(device)
        return cls(student, teacher, make_optimizer(student, cfg, stage),
                   {side: L.ThresholdState.from_config(cfg.loss.rpc, num_classes) for side in ("3d", "2d")},
                   torch.Generator().manual_seed(cfg.seed * 1000 + rank))

    def state_dict(self, world: int) -> dict:
        """Collective when world > 1 (every rank's generator state is gathered)."""
        return {"student": self.student.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "thresholds": {side: ts.state_dict() for side, ts in self.thresholds.items()},
                "generator": _gather_generator_states(self.generator, world),
                "best_cmg": self.best_cmg,
                "progress": self.progress.__dict__}

    def load_state_dict(self, state: dict, rank: int) -> None:
        self.student.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        for side, ts in self.thresholds.items():
            ts.load_state_dict(state["thresholds"][side])
        self.progress = Progress(**state["progress"])
        self.best_cmg = state.get("best_cmg")
        if state.get("generator") is not None:
            generators = state["generator"]
            self.generator.set_state(generators[rank] if rank < len(generators) else generators[0])


@dataclass
class Worker:
    """What one training process knows about its run and its place in it (fixed for the run)."""

    cfg: cfgmod.Config
    run_dir: Path
    stages: list[str]
    loop_config: dict
    class_names: tuple[str, ...]
    rank: int
    world: int
    device: torch.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class EpochTotals:
    """Sums over one epoch's steps, for its summary line, MLflow and RPC's target shares."""

    scenes: int = 0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    data_wait: list[float] = field(default_factory=lambda: [0.0])  # timed_batches adds to it in place
    # RPC's targets per class, and how many trained scenes tagged each class: a tagged class RPC
    # never teaches is on its way out of the pseudo-labels (no GT needed)
    taught: dict[str, torch.Tensor] = field(default_factory=dict)
    tagged: torch.Tensor | None = None
    last_print: float = 0.0


def train_func(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: {"config": flat dotted config, "run_dir": str,
    "stages": ["cmg", "cmg_rpc"] or ["seg"], "run_name": str, "parent_run_id": str | None}."""
    import ray.train

    quiet_ray_train_logs()
    worker = make_worker(loop_config, ray.train.get_context())
    state = TrainState.fresh(worker.cfg, worker.num_classes, worker.stages[0], worker.device, worker.rank)
    resumed = restore(state, worker, ray.train.get_checkpoint())
    tracker = None
    try:
        while state.progress.stage_index < len(worker.stages):
            stage = worker.stages[state.progress.stage_index]
            tracker = open_stage_tracker(worker, state, stage, resumed)
            run_stage(worker, state, stage, tracker)
            state.progress.stage_index += 1
            state.progress.epoch = 0
            state.progress.stage_step = 0
            tracker.end("FINISHED")
            tracker = None
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise


def make_worker(loop_config: dict, ctx) -> Worker:
    cfg = cfgmod.build(loop_config["config"])
    device = torch.device("cpu")
    if cfg.ray.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    class_names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
    return Worker(cfg, Path(loop_config["run_dir"]), list(loop_config["stages"]), loop_config, class_names,
                  ctx.get_world_rank(), ctx.get_world_size(), device)


def restore(state: TrainState, worker: Worker, ray_checkpoint) -> bool:
    """Resume from Ray Train's checkpoint (a worker restart) or the run directory's (a driver
    restart), whichever is further along; False for a fresh start."""
    with ray_checkpoint_file(ray_checkpoint) as ray_file:
        ckpt_file, saved = resume_state(ray_file, worker.run_dir, worker.device)
    if worker.rank == 0:
        for partial in remove_partial_ray_copies(worker.run_dir):
            print(f"[rayseg] removed {partial}: Ray Train's copy of a checkpoint, cut short by a kill", flush=True)
    if saved is None:
        return False
    state.load_state_dict(saved, worker.rank)
    if worker.rank == 0:
        p = state.progress
        print(f"[rayseg] resumed from {ckpt_file} at stage {worker.stages[p.stage_index]} "
              f"epoch {p.epoch} step {p.step}", flush=True)
    return True


def open_stage_tracker(worker: Worker, state: TrainState, stage: str, resumed: bool):
    """The stage's MLflow run (rank 0): one child run per stage under the pipeline run,
    reattached on resume (tracking.stage_tracker); steps continue across stages
    (loop_config["step_offset"] first). Oracles are tagged: the GT partition or the GT-selected
    stage-2 init (stages cmg / cmg_rpc), stage seg trained on an ORACLE label folder
    (`rayseg oracle-labels`: ground truth, the fully supervised bound)."""
    from rayseg.train.tracking import stage_tracker

    cfg, stages = worker.cfg, worker.stages
    oracle_labels = stages == ["seg"] and is_oracle_folder(cfg.data.pseudo_labels)
    oracle = oracle_labels or (stages != ["seg"] and (is_oracle(cfg.data.region_column)
                                                      or cfg.optim.cmg_rpc_init == "best_val"))
    tags = {"rayseg.region_column": cfg.data.region_column, "rayseg.oracle": str(oracle).lower()}
    if oracle_labels:
        from rayseg.oracle import MLFLOW_WHAT

        tags["rayseg.oracle_what"] = MLFLOW_WHAT
    tracker = stage_tracker(stage_config(cfg, stage), worker.run_dir, stage, enabled=(worker.rank == 0), tags=tags,
                            parent_run_id=worker.loop_config.get("parent_run_id"),
                            step_offset=worker.loop_config.get("step_offset", 0),
                            create=state.progress.epoch < stage_schedule(cfg, stage)[0])
    state.progress.mlflow_run_id = tracker.run_id or state.progress.mlflow_run_id
    if resumed:
        tracker.skip_logged_steps()  # the steps after the checkpoint were logged before the crash
    if worker.rank == 0 and not resumed and state.progress.step == 0 and stage != "seg":
        log_tag_prior(cfg, tracker)
    return tracker


def run_stage(worker: Worker, state: TrainState, stage: str, tracker) -> None:
    """The stage's remaining epochs; each ends with the monitor, its metrics and a checkpoint."""
    from rayseg.train.tracking import step_metrics

    cfg, world, progress = worker.cfg, worker.world, state.progress
    scfg = stage_config(cfg, stage)
    epochs, base_lr = stage_schedule(cfg, stage)
    if progress.stage_index > 0 and progress.stage_step == 0:
        if stage == "cmg_rpc" and state.best_cmg is not None:
            best = state.best_cmg
            state.student.load_state_dict(best["student"])
            state.teacher.load_state_dict(best["teacher"])
            if worker.rank == 0:
                print(f"[rayseg] ORACLE: stage cmg_rpc starts from stage cmg's epoch {best['epoch']}, "
                      f"the best on val GT (3D mIoU {best['miou']:.4f})", flush=True)
        state.optimizer = make_optimizer(state.student, cfg, stage)  # a fresh SGD per stage, as the reference
    per_rank_batch = max(1, cfg.optim.batch_size // world)
    n_train = len(pipeline.plan(scfg.data.root, scfg.data.train_split, scfg, "train", 0, cfg.seed).paths)
    steps_per_loop = math.ceil((n_train // world if world > 1 else n_train) / per_rank_batch)
    total_steps = max(1, epochs * cfg.optim.loops_per_epoch * steps_per_loop)

    def data_epoch_of(epoch: int, loop_i: int) -> int:
        return (progress.stage_index * 100_000) + epoch * cfg.optim.loops_per_epoch + loop_i

    stream = train_pass_stream(scfg, [data_epoch_of(e, i) for e in range(progress.epoch, epochs)
                                      for i in range(cfg.optim.loops_per_epoch)], worker.rank, world, per_rank_batch)
    stage_clock = (time.time(), progress.stage_step)
    while progress.epoch < epochs:
        t0 = time.time()
        totals = EpochTotals(tagged=torch.zeros(worker.num_classes, dtype=torch.long), last_print=t0)
        state.student.train()
        for loop_i in range(cfg.optim.loops_per_epoch):
            data_epoch = data_epoch_of(progress.epoch, loop_i)
            batches = stream.batches(data_epoch) if stream is not None else iter_rank_batches(
                scfg, scfg.data.train_split, "train", data_epoch, worker.rank, world, per_rank_batch)
            for batch in timed_batches(batches, totals.data_wait):
                lr = poly_lr(base_lr, progress.stage_step, total_steps, cfg.optim.poly_power)
                log = train_step(worker, state, scfg, stage, batch, lr, totals)
                tracker.log_metrics(step_metrics(stage, log, lr), progress.step)
                if worker.rank == 0 and time.time() - totals.last_print > PROGRESS_SECONDS:
                    totals.last_print = time.time()
                    print_progress(stage, progress, epochs, total_steps, log, lr, totals, t0, stage_clock, world)
        end_epoch(worker, state, scfg, stage, epochs, tracker, totals, time.time() - t0)


def train_step(worker: Worker, state: TrainState, scfg: cfgmod.Config, stage: str, batch: dict, lr: float,
               totals: EpochTotals) -> dict[str, float]:
    """One optimiser step of the stage at learning rate lr, then the EMA teacher and RPC's
    thresholds; returns the step's logged values."""
    cfg, progress = worker.cfg, state.progress
    b = to_device(batch, worker.device)
    for group in state.optimizer.param_groups:
        # checkpoints from before optim.lr_scale_2d_backbone hold one group, no scale
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if stage == "seg":
        loss, log = seg_step(state.student, b)
        accepted = {}
    else:
        state.teacher.train(cfg.loss.rpc.teacher_bn == "batch_first_epoch" and progress.epoch == 0)
        loss, log, accepted = two_branch_step(state.student, state.teacher, b, scfg, stage, progress.stage_step,
                                              state.thresholds, state.generator, worker.world)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients([p for p in state.student.parameters() if p.requires_grad], worker.world)
    state.optimizer.step()
    if state.teacher is not None:
        ema_update(state.teacher, state.student, decay_at(cfg.loss.rpc.ema_decay, progress.step, cfg.loss.rpc.ema_ramp))
    for side, counts in accepted.items():
        counts = M.all_reduce_sum(counts.cpu())
        state.thresholds[side].update(counts)
        totals.taught[side] = totals.taught.get(side, 0) + counts
    if accepted:
        totals.tagged += (b["teacher_tags"] > 0).sum(0).long().cpu()
    progress.step += 1
    progress.stage_step += 1
    totals.scenes += len(batch["scene_id"])
    totals.steps += 1
    for k, v in log.items():
        totals.sums[k] = totals.sums.get(k, 0.0) + v
    return log


def print_progress(stage: str, progress: Progress, epochs: int, total_steps: int, log: dict, lr: float,
                   totals: EpochTotals, t0: float, stage_clock: tuple[float, int], world: int) -> None:
    now = time.time()
    per_step = (now - stage_clock[0]) / max(1, progress.stage_step - stage_clock[1])
    print(f"[rayseg] {stage} epoch {progress.epoch + 1}/{epochs} step {progress.stage_step}/"
          f"{total_steps} ({100 * progress.stage_step / total_steps:.0f}%) loss={log['loss']:.4f} lr={lr:.4g} "
          f"{totals.scenes * world / max(now - t0, 1e-9):.2f} scenes/s, data wait "
          f"{100 * totals.data_wait[0] / max(now - t0, 1e-9):.0f}%, stage ETA "
          f"{format_seconds(per_step * (total_steps - progress.stage_step))}", flush=True)


def end_epoch(worker: Worker, state: TrainState, scfg: cfgmod.Config, stage: str, epochs: int, tracker,
              totals: EpochTotals, elapsed: float) -> None:
    """The epoch's summary and monitor (MLflow, printed line, history), then a checkpoint."""
    from rayseg.train.tracking import epoch_metrics

    cfg, progress = worker.cfg, state.progress
    n = max(1, totals.steps)
    summary = {f"{stage}/epoch_{k}": v / n for k, v in totals.sums.items()}
    summary[f"{stage}/scenes_per_s"] = totals.scenes * worker.world / max(elapsed, 1e-9)
    summary[f"{stage}/data_wait_share"] = totals.data_wait[0] / max(elapsed, 1e-9)
    report = dict(summary)
    last_epoch = progress.epoch + 1 == epochs
    if (stage != "seg" and cfg.data.monitor_scenes
            and (last_epoch or (progress.epoch + 1) % cfg.data.monitor_every == 0)):
        report.update(monitor(worker, state, scfg, tracker))
    if stage == "cmg" and cfg.optim.cmg_rpc_init == "best_val":
        miou = val_miou_3d(state.teacher, scfg, worker.class_names, worker.rank, worker.world, worker.device)
        report["oracle_val_miou_3d"] = summary[f"{stage}/oracle_val_miou_3d"] = miou
        if state.best_cmg is None or miou > state.best_cmg["miou"]:
            state.best_cmg = {"miou": miou, "epoch": progress.epoch + 1,
                              "student": {k: v.detach().cpu().clone() for k, v in state.student.state_dict().items()},
                              "teacher": {k: v.detach().cpu().clone() for k, v in state.teacher.state_dict().items()}}
    tracker.log_metrics(epoch_metrics(stage, summary, progress.epoch + 1), progress.step)
    if totals.taught:
        log_rpc_targets(totals.taught, M.all_reduce_sum(totals.tagged), worker.class_names, tracker, progress.step,
                        worker.rank, f"{stage} epoch {progress.epoch + 1}")
    progress.epoch += 1
    progress.history.append({"stage": stage, "epoch": progress.epoch, **report})
    if worker.rank == 0:
        print(f"[rayseg] {stage} epoch {progress.epoch}/{epochs} step {progress.step} "
              + " ".join(f"{k.removeprefix(stage + '/epoch_')}={v:.4g}" for k, v in report.items()
                         if "weight/" not in k), flush=True)
    saved = {**state.state_dict(worker.world), "config": worker.loop_config["config"],
             "class_names": worker.class_names, "stages": worker.stages}
    _report(saved, progress, stage, worker.run_dir, worker.rank,
            {**report, "step": progress.step, "stage": stage, "epoch": progress.epoch}, cfg.tracking.keep_checkpoints)


def monitor(worker: Worker, state: TrainState, scfg: cfgmod.Config, tracker) -> dict[str, float]:
    """Pseudo-label quality of the EMA teacher (and of the student: it leads the teacher, so
    learning shows there first) on the monitor scenes; ground truth is read only here."""
    cfg, progress, report = worker.cfg, state.progress, {}
    args = (scfg, worker.num_classes, worker.rank, worker.world, worker.device, cfg.data.monitor_scenes)
    for side, c in pseudo_label_confusion(state.teacher, *args).items():
        if int(c.sum()):
            vals = tracker.log_confusion(c, worker.class_names, f"pseudo_{side}", progress.step,
                                         epoch=progress.epoch + 1) \
                if worker.rank == 0 else M.metrics_dict(c, worker.class_names, prefix=f"pseudo_{side}_")
            report[f"pseudo_miou_{side}"] = vals[f"pseudo_{side}_miou"]
    if cfg.data.monitor_student:
        for side, c in pseudo_label_confusion(state.student, *args).items():
            if int(c.sum()):
                vals = M.metrics_dict(c, worker.class_names, prefix=f"student_pseudo_{side}_")
                tracker.log_metrics(vals, progress.step)
                report[f"student_pseudo_miou_{side}"] = vals[f"student_pseudo_{side}_miou"]
    return report


def log_rpc_targets(taught: dict[str, torch.Tensor], tagged: torch.Tensor, class_names: tuple[str, ...],
                    tracker, step: int, rank: int, when: str) -> None:
    """Per side, each class's share of the rows RPC trained towards this epoch
    (`rpc_<side>_targets/<class>`), and a printed warning naming the classes that trained scenes
    tagged but RPC taught no row: self-training is removing them from the pseudo-labels. Uses
    the teacher's labels and the scene tags only (no ground truth)."""
    for side, counts in taught.items():
        total = max(1, int(counts.sum()))
        tracker.log_metrics({f"rpc_{side}_targets/{name}": int(counts[i]) / total
                             for i, name in enumerate(class_names)}, step)
        untaught = [f"{class_names[i]} ({int(tagged[i])} scenes)" for i in range(len(class_names))
                    if tagged[i] > 0 and counts[i] == 0]
        if untaught and rank == 0:
            print(f"[rayseg] {when}: RPC {side.upper()} taught no row as " + ", ".join(untaught)
                  + ": tagged, but the teacher labels none of their rows confidently; RPC is training them "
                  "out of the pseudo-labels (per-class shares: MLflow rpc_" + side + "_targets/*)", flush=True)


def _gather_generator_states(generator: torch.Generator, world: int) -> list[torch.Tensor]:
    """Every rank's pair-sampling generator state (so a resumed run samples the same pairs)."""
    state = generator.get_state()
    if world <= 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world)]
    torch.distributed.all_gather(states, state)
    return states


def _report(state: dict, progress: Progress, stage: str, run_dir: Path, rank: int, metrics: dict,
            keep: int) -> None:
    """Checkpoint every epoch: rank 0 writes it to the run directory and hands it to Ray Train
    (which restores it into restarted workers); the other ranks report metrics only."""
    import ray.train

    if rank == 0:
        path = save_checkpoint(run_dir, state, progress, stage, keep)
        # Ray's copy keeps the checkpoint's name, so a copy cut short by a kill can be told apart
        # (remove_partial_ray_copies); on local storage it is hard links, not a copy.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_dir_name=path.name, checkpoint_upload_fn=link_into_ray_storage)
    else:
        ray.train.report(metrics)
