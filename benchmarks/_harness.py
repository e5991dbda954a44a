"""Shared pieces of benchmarks/train_step.py and benchmarks/gpu_check.py: a Ray-free demo dataset,
the two-branch training step with its time split into parts, and a prefetching batch source.

Imports only numpy / scipy / pyarrow / torch and rayseg's config, data, model, loss and training
step modules: no Ray, no MLflow (the GPU check runs where neither is installed).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

from rayseg import config as cfgmod

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "experiments" / "synthetic-demo.toml"
# Step parts, in the order they run; "data" is the batch's wait (make_sample + collate when it
# is produced in the same thread, the queue wait when prefetched).
PARTS = ("data", "3d_fwd", "teacher_fwd", "2d_fwd", "losses", "3d_bwd", "2d_bwd", "optimizer", "ema")


def demo_config(root: str | Path, num_scenes: int, overrides: list[str] = ()) -> cfgmod.Config:
    """experiments/synthetic-demo.toml with its dataset at `root`, `num_scenes` synthetic scenes
    and the plain in-process loader."""
    import rayseg

    config = Path(rayseg.__file__).resolve().parents[1] / "experiments" / DEMO_CONFIG.name  # this rayseg's own
    return cfgmod.load(config if config.is_file() else DEMO_CONFIG, [f"data.root={root}", f"synthetic.num_scenes={num_scenes}",
                                     "data.loader=local", *overrides]).config


def prepare_demo_data(cfg: cfgmod.Config, log=print) -> Path:
    """The demo's synthetic scenes + region partition at cfg.data.root, made in this process (no
    Ray; the same functions `rayseg demo` runs as Ray tasks). Reused when its manifest exists."""
    from rayseg.data import shards, synthetic
    from rayseg.partition.job import partition_scene

    root = Path(cfg.data.root)
    if (root / shards.MANIFEST_NAME).is_file():
        return root
    start = time.perf_counter()
    syn = cfg.synthetic
    for index, (scene_id, split) in enumerate(synthetic.scene_ids(syn)):
        scene = synthetic.generate_scene(syn, index)
        if cfg.data.region_column:
            scene.update(partition_scene(scene, [cfg.data.region_column], cfg.partition))
        shards.write_scene(root, scene)
    shards.write_manifest(root, syn.profile)
    log(f"prepared {syn.num_scenes} synthetic scenes with region column {cfg.data.region_column!r} "
        f"in {time.perf_counter() - start:.1f} s -> {root}")
    return root


def batches(cfg: cfgmod.Config, epoch: int, batch_size: int | None = None):
    """Collated train batches of one epoch of the stage cmg / cmg_rpc pipeline (plain loop)."""
    from rayseg.data import pipeline

    p = pipeline.plan(cfg.data.root, cfg.data.train_split, cfg, "train", epoch, cfg.seed)
    return pipeline.batches(p, cfg, epoch, cfg.seed, batch_size or cfg.optim.batch_size)


def endless_batches(cfg: cfgmod.Config):
    """Train batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        yield from batches(cfg, epoch)
        epoch += 1


class Prefetcher:
    """Batches made by `workers` background processes (or one thread for workers=0) while the
    trainer computes; `next()` returns (batch, seconds waited)."""

    def __init__(self, cfg: cfgmod.Config, workers: int = 0, depth: int = 4):
        self.cfg = cfg
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pool = None
        if workers > 0:
            import multiprocessing as mp

            self._pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            if self._pool is None:
                for b in endless_batches(self.cfg):
                    if not self._put(b):
                        return
            else:
                from rayseg.data import pipeline

                epoch = 0
                while True:
                    p = pipeline.plan(self.cfg.data.root, self.cfg.data.train_split, self.cfg, "train", epoch,
                                      self.cfg.seed)
                    args = [(self.cfg, path, p, epoch) for path in p.paths]
                    buf = []
                    for sample in self._pool.imap(_make_sample, args):
                        buf.append(sample)
                        if len(buf) == self.cfg.optim.batch_size:
                            if not self._put(pipeline.collate(buf)):
                                return
                            buf = []
                    if buf and not self._put(pipeline.collate(buf)):
                        return
                    epoch += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[dict, float]:
        t0 = time.perf_counter()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.terminate()


def _worker_init() -> None:
    torch.set_num_threads(1)


def _make_sample(args) -> dict:
    from rayseg.data import pipeline

    cfg, path, p, epoch = args
    return pipeline.read_sample(path, p, cfg, epoch, cfg.seed)


# --------------------------------------------------------------------------------------------
# The training step, split into parts
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLOP_COUNTER = None  # set by count_flops(): each timed part then also records its FLOPs


def _now() -> tuple[float, float, float]:
    """(wall, process CPU) seconds and the FLOPs counted so far (0 unless inside count_flops):
    CPU time is what the work costs, robust to other load on a shared machine (with one thread);
    wall time is what a user waits."""
    flops = float(_FLOP_COUNTER.get_total_flops()) if _FLOP_COUNTER is not None else 0.0
    return time.perf_counter(), time.process_time(), flops


def _add(times: dict, part: str, t0: tuple[float, ...]) -> tuple[float, float, float]:
    """Add the time (and FLOPs) since t0 to times[part] = [wall, cpu, flops]; returns now."""
    t = _now()
    acc = times.setdefault(part, [0.0, 0.0, 0.0])
    for i in range(3):
        acc[i] += t[i] - t0[i]
    return t


@contextlib.contextmanager
def count_flops():
    """Count matrix-product and convolution FLOPs (torch's FlopCounterMode, plus the in-place
    addmm_ the sparse backend accumulates with) into every part timed inside. Slows the work down:
    time a step without it."""
    from torch.utils import flop_counter

    global _FLOP_COUNTER

    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as torch counts addmm: the product's

    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_})
    with counter:
        _FLOP_COUNTER = counter
        try:
            yield counter
        finally:
            _FLOP_COUNTER = None


def gemm_peak_flops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of one large square matrix product (float32 and bfloat16), CPU time on CPU: the
    roof the step's matrix work can at best run at with this machine's BLAS and threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = {}
    for name, (x, y) in {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}.items():
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            x @ y
            best = min(best, time.process_time() - t)
        out[name] = 2 * size**3 / best
    return out


class _Branches:
    """Stands in for the two-branch model inside `two_branch_step`: forward_3d / forward_2d run the
    real networks, timed, and hand the loss code detached leaf copies of their outputs, so the
    step's backward can be run in three timed parts: loss terms (down to those leaves), then the
    3D and the 2D network from the leaves' gradients (the chain rule split at the branch
    outputs: the same gradients as one backward)."""

    def __init__(self, model, device, times: dict, teacher: bool = False, split: bool = True):
        self._model, self._device, self._times, self._teacher = model, device, times, teacher
        self._split = split
        self.outputs: dict[str, tuple[dict, dict]] = {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _run(self, part: str, side: str, fn, *args) -> dict:
        _sync(self._device)
        t0 = _now()
        out = fn(*args)
        _sync(self._device)
        _add(self._times, part, t0)
        if self._teacher or not self._split or not torch.is_grad_enabled():
            return out
        leaves = {k: v.detach().requires_grad_(True) for k, v in out.items()}
        self.outputs[side] = (out, leaves)
        return leaves

    def forward_3d(self, coord, feat):
        return self._run("teacher_fwd" if self._teacher else "3d_fwd", "3d", self._model.forward_3d, coord, feat)

    def forward_2d(self, images):
        return self._run("teacher_fwd" if self._teacher else "2d_fwd", "2d", self._model.forward_2d, images)


class Trainer:
    """Student, EMA teacher, optimiser and the per-side RPC thresholds of stage `stage`, and the
    step of rayseg.train.loop (two_branch_step, backward, SGD, EMA) as training runs it."""

    def __init__(self, cfg: cfgmod.Config, device: torch.device | str = "cpu", stage: str = "cmg_rpc",
                 start_step: int = 1000, bf16_2d: bool = False):
        from rayseg import losses as L
        from rayseg.data import shards
        from rayseg.train import loop

        if bf16_2d:  # the 2D branch under bfloat16 autocast, as model.autocast_2d runs it in training
            cfg = cfgmod.replace(cfg, **{"model.autocast_2d": "bfloat16"})
        self.cfg, self.stage, self.device = cfg, stage, torch.device(device)
        self.num_classes = len(shards.load_manifest(cfg.data.root)["class_names"])
        self.student, self.teacher = loop.build_models(cfg, self.num_classes, stage)
        self.student.to(self.device).train()
        self.teacher.to(self.device).eval()
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=loop.stage_schedule(cfg, stage)[1],
                                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.thresholds = {side: L.ThresholdState.from_config(cfg.loss.rpc, self.num_classes) for side in ("3d", "2d")}
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000)
        self.step_index = start_step  # past the warm-ups: every loss term of the stage is on

    def step(self, batch: dict, split: bool = False) -> tuple[float, dict[str, list[float]]]:
        """One training step on a collated batch; returns (loss, {part: [wall s, CPU s]}). split=False
        runs exactly loop.train_func's step (its time is reported as "step"); split=True
        times the parts (the same arithmetic, backward in three calls)."""
        from rayseg import metrics as M
        from rayseg.teacher import ema_update
        from rayseg.train import loop

        times: dict[str, list[float]] = {}
        dev = self.device

        def mark(part: str, t0: tuple[float, float]) -> tuple[float, float]:
            _sync(dev)
            return _add(times, part, t0)

        _sync(dev)
        t_start = _now()
        b = loop.to_device(batch, dev)
        model, teacher = self.student, self.teacher
        if split:
            model = _Branches(self.student, dev, times, split=split)
            teacher = _Branches(self.teacher, dev, times, teacher=True, split=split)
        t = _now()
        loss, log, accepted = loop.two_branch_step(model, teacher, b, self.cfg, self.stage, self.step_index,
                                                   self.thresholds, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        if split:
            t = mark("losses", t)
            for k in ("3d_fwd", "teacher_fwd", "2d_fwd"):  # timed inside; not the losses'
                for i in range(3):
                    times["losses"][i] -= times.get(k, [0.0, 0.0, 0.0])[i]
            loss.backward()
            t = mark("losses", t)
            for side, part in (("3d", "3d_bwd"), ("2d", "2d_bwd")):
                if side in model.outputs:
                    out, leaves = model.outputs[side]
                    pairs = [(out[k], leaves[k].grad) for k in out if leaves[k].grad is not None]
                    if pairs:
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                t = mark(part, t)
        else:
            loss.backward()
        self.optimizer.step()
        if split:
            t = mark("optimizer", t)
        ema_update(self.teacher, self.student, self.cfg.loss.rpc.ema_decay)
        for side, counts in accepted.items():
            self.thresholds[side].update(M.all_reduce_sum(counts.cpu()))
        if split:
            mark("ema", t)
        _sync(dev)
        _add(times, "step", t_start)
        self.step_index += 1
        return float(loss.detach()), times


def env_threads(threads: int) -> None:
    """Fix the intra-op thread count (and the OpenMP / BLAS pools' sizes for child processes)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
