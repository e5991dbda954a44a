"""One-go GPU check (one H100, < 8 minutes): CUDA vs CPU parity of the torch sparse backend,
MinkUNet18A forward + backward at 100k voxels on CUDA, and a few hundred two-branch training
steps of experiments/synthetic-demo.toml on CUDA with steps/s and the trainer's data-wait share.

    python benchmarks/gpu_check.py [--steps 300] [--workers N] [--out gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --steps 3      # the tiny CPU run that checks the script

Needs only torch, numpy, scipy, pyarrow and this repository: no Ray, no MLflow (checked at the
end), and no torchvision (a stand-in with torchvision's ResNet layout is used when it is
missing; random init, as the demo). The demo's scenes are generated and partitioned in this
process into a temp folder (or --data). Batches are made by --workers processes while the GPU
trains; the data-wait share is the fraction of the training loop's wall time spent waiting for
the next batch. Prints one line per check and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # rayseg from this checkout, not installed
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the rayseg CLI: before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_parity(device: str, voxels: int) -> dict:
    """The gpu-marked tests' check: MinkUNet18A in float64, forward and every gradient on `device`
    vs CPU (on CPU itself: the blocked vs the per-offset algorithm), plus each kernel-map kind
    through sparse_conv."""
    from rayseg.models.minkunet import build_minkunet
    from rayseg.sparse import torch_backend as tb
    from rayseg.sparse.coords import CoordinateManager
    from rayseg.sparse.surface import scanned_surface_voxels

    v = scanned_surface_voxels(voxels, seed=7)
    coord = torch.from_numpy(np.c_[np.zeros(len(v), np.int64), v])
    gen = torch.Generator().manual_seed(0)
    feat = torch.rand(len(v), 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 20, (len(v),), generator=gen)
    torch.manual_seed(0)
    model = build_minkunet("MinkUNet18A", 6, 20).double()
    results = []
    runs = [("cpu", None), (device, None)] if device != "cpu" else [("cpu", "blocked"), ("cpu", "per_offset")]
    original = tb.sparse_conv
    for dev, method in runs:
        tb.sparse_conv = original if method is None else (
            lambda f, k, m, chunk_rows=None, method=method: original(f, k, m, chunk_rows=chunk_rows, method=method))
        try:
            model.to(dev).zero_grad()
            f = feat.to(dev).requires_grad_(True)
            features, logits = model(coord.to(dev), f)
            torch.nn.functional.cross_entropy(logits, labels.to(dev)).backward()
        finally:
            tb.sparse_conv = original
        results.append([t.detach().cpu() for t in (features, logits, f.grad)] + [p.grad.cpu() for p in model.parameters()])
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(*results))
    # every kernel-map kind on its own (stem kernel 5, kernel 3, down, up)
    manager = CoordinateManager(coord[: min(len(coord), 5000)])
    kinds = {"conv3": (manager.conv_map(1, 3), 27), "conv5": (manager.conv_map(1, 5), 125),
             "down": (manager.down_map(1), 8), "up": (manager.up_map(2), 8)}
    per_map = {}
    for name, (kmap, volume) in kinds.items():
        x = torch.randn(kmap.num_in, 5, dtype=torch.float64, generator=gen)
        k = torch.randn(volume, 5, 7, dtype=torch.float64, generator=gen)
        out = []
        for dev, method in runs:
            xd, kd = x.to(dev).requires_grad_(True), k.to(dev).requires_grad_(True)
            y = tb.sparse_conv(xd, kd, _map_to(kmap, dev), method=method)
            y.square().sum().backward()
            out.append([y.detach().cpu(), xd.grad.cpu(), kd.grad.cpu()])
        per_map[name] = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(*out))
    ok = worst < 1e-8 and max(per_map.values()) < 1e-8
    return {"ok": ok, "voxels": len(v), "model_max_rel_diff": worst, "per_map_max_rel_diff": per_map,
            "compared": [f"{d}:{m or 'default'}" for d, m in runs]}


def _map_to(kmap, device: str):
    from rayseg.sparse.coords import KernelMap

    return KernelMap(kmap.num_in, kmap.num_out, [(w, i.to(device), o.to(device)) for w, i, o in kmap.pairs],
                     kmap.identity)


def bench_minkunet(device: str, voxels: int, repeats: int) -> dict:
    """MinkUNet18A forward + backward (float32, 20 classes, kernel maps rebuilt every step as in
    training) on a scanned-surface scene at 2 cm."""
    from rayseg.models.minkunet import build_minkunet
    from rayseg.sparse.surface import scanned_surface_voxels

    v = scanned_surface_voxels(voxels, 0.02, seed=0)
    coord = torch.from_numpy(np.c_[np.zeros(len(v), np.int32), v]).to(device)
    gen = torch.Generator().manual_seed(0)
    feat = (torch.rand(len(v), 6, generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, 20, (len(v),), generator=gen).to(device)
    torch.manual_seed(0)
    model = build_minkunet("MinkUNet18A", 6, 20).to(device).train()
    fwd, bwd = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        _, logits = model(coord, feat)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        if step:  # step 0 warms up kernels and the allocator
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
    out = {"voxels": len(v), "forward_ms": 1e3 * statistics.median(fwd), "backward_ms": 1e3 * statistics.median(bwd),
           "step_ms": 1e3 * statistics.median(f + b for f, b in zip(fwd, bwd)), "repeats": repeats}
    if device == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --device cpu: the demo's networks on small scenes and images (the code paths, in a minute or two)
TINY_DEMO = ["synthetic.num_views=2", "synthetic.image_width=64", "synthetic.image_height=48",
             "synthetic.min_points=2000", "synthetic.max_points=3000", "data.image_width=64", "data.image_height=48",
             "data.voxel_size=0.1", "optim.batch_size=2"]


def train_steps(device: str, steps: int, workers: int, data: Path, scenes: int, split_steps: int,
                overrides: list[str] = ()) -> dict:
    """`steps` two-branch steps (stage cmg_rpc, every loss term on) of the demo config, batches
    from `workers` background processes; then `split_steps` more, timed part by part."""
    import _harness as H

    cfg = H.demo_config(data, scenes, list(overrides))
    H.prepare_demo_data(cfg, log=_log)
    trainer = H.Trainer(cfg, device)
    feed = H.Prefetcher(cfg, workers=workers, depth=max(4, 2 * workers))
    try:
        batch, _ = feed.next()  # warm-up step (and the workers' start-up) outside the timing
        trainer.step(batch)
        _sync(device)
        wait, scene_count, losses = 0.0, 0, []
        t0 = time.perf_counter()
        for _ in range(steps):
            batch, waited = feed.next()
            wait += waited
            loss, _ = trainer.step(batch)
            losses.append(loss)
            scene_count += len(batch["teacher_scene_id"])
        _sync(device)
        elapsed = time.perf_counter() - t0
        parts: dict[str, list[float]] = {}
        for _ in range(split_steps):
            batch, _ = feed.next()
            _, t = trainer.step(batch, split=True)
            for k, v in t.items():
                parts.setdefault(k, []).append(v[0])
    finally:
        feed.close()
    finite = bool(np.isfinite(losses).all())
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "scenes_per_s": scene_count / elapsed,
            "data_wait_share": wait / elapsed, "workers": workers, "losses_finite": finite,
            "loss_first_last": [losses[0], losses[-1]] if losses else [],
            "split_ms": {k: 1e3 * statistics.median(v) for k, v in parts.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny run of the same checks)")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps (default 300)")
    parser.add_argument("--split-steps", type=int, default=5, help="extra steps timed part by part")
    parser.add_argument("--workers", type=int, default=-1, help="batch-making processes (default: CPUs - 2, <= 12)")
    parser.add_argument("--voxels", type=int, default=100_000, help="MinkUNet18A benchmark scene size")
    parser.add_argument("--parity-voxels", type=int, default=20_000, help="parity check scene size")
    parser.add_argument("--scenes", type=int, default=32, help="demo scenes to generate (3/4 train)")
    parser.add_argument("--data", default="", help="demo scenes folder (default: a temp folder)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the numbers")
    args = parser.parse_args()
    os.environ.setdefault("RAYSEG_OFFLINE", "1")
    tiny = args.device == "cpu"
    if tiny:  # the checks' code paths at a size that runs in a minute or two on a laptop
        args.voxels, args.parity_voxels, args.scenes = min(args.voxels, 2000), min(args.parity_voxels, 1000), 4
        args.split_steps = min(args.split_steps, 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here (use --device cpu for the tiny CPU run)", file=sys.stderr)
        return 2
    if args.workers < 0:
        args.workers = 0 if tiny else max(1, min(12, (os.cpu_count() or 4) - 2))

    import _tv_fallback

    start = time.time()
    report: dict = {"device": args.device, "torch": torch.__version__, "torchvision": _tv_fallback.install(),
                    "cpus": os.cpu_count()}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    _log(f"{report}")
    failed = []

    _log(f"1/3 sparse backend parity ({'CUDA vs CPU' if not tiny else 'blocked vs per-offset on CPU'}, float64)")
    report["parity"] = r = check_parity(args.device, args.parity_voxels)
    _log(f"    MinkUNet18A at {r['voxels']} voxels: max relative difference {r['model_max_rel_diff']:.2e}; per map "
         + ", ".join(f"{k} {v:.1e}" for k, v in r["per_map_max_rel_diff"].items()) + f" -> {'OK' if r['ok'] else 'FAIL'}")
    if not r["ok"]:
        failed.append("parity")

    _log(f"2/3 MinkUNet18A forward + backward at {args.voxels} voxels (2 cm) on {args.device}")
    report["minkunet18a"] = r = bench_minkunet(args.device, args.voxels, 2 if tiny else 10)
    _log(f"    {r['voxels']} voxels: forward {r['forward_ms']:.1f} ms, backward {r['backward_ms']:.1f} ms, step "
         f"{r['step_ms']:.1f} ms" + (f", peak GPU memory {r['peak_gpu_memory_gib']:.2f} GiB" if "peak_gpu_memory_gib" in r else ""))

    data = Path(args.data) if args.data else Path(tempfile.gettempdir()) / f"rayseg-gpu-check-{args.scenes}{'-tiny' if tiny else ''}"
    _log(f"3/3 {args.steps} two-branch steps of synthetic-demo.toml (stage cmg_rpc) on {args.device}, "
         f"{args.workers} data worker(s)")
    report["train"] = r = train_steps(args.device, args.steps, args.workers, data, args.scenes, args.split_steps,
                                      TINY_DEMO if tiny else [])
    _log(f"    {r['steps_per_s']:.2f} steps/s, {r['scenes_per_s']:.1f} scenes/s, data wait {100 * r['data_wait_share']:.0f}% "
         f"of the loop, losses finite: {r['losses_finite']}; one step by parts (ms): "
         + ", ".join(f"{k} {v:.0f}" for k, v in r["split_ms"].items()))
    if not r["losses_finite"]:
        failed.append("train")

    banned = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "mlflow"})
    report["imported_ray_or_mlflow"] = banned
    if banned:
        failed.append("imports")
    report["seconds"] = time.time() - start
    report["failed"] = failed
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    _log(f"done in {report['seconds']:.0f} s; Ray/MLflow imported: {banned or 'no'}; "
         f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; numbers in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
