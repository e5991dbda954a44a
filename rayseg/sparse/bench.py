"""MinkUNet18A forward + backward on a scanned-surface-like scene: torch backend vs MinkowskiEngine.

    rayseg bench-model [--voxels 100000] [--voxel-size 0.02] [--repeats 3] [--threads N]
    python benchmarks/sparse_conv.py ...   (the same command)

Each backend runs in its own fresh subprocess (so peak RSS is its own), on the same voxels,
features and weights. Reported per backend: the median wall time of forward, backward and
their sum over `--repeats` timed steps after one warm-up step (every step rebuilds the
coordinate manager and kernel maps, as training does for each new batch), the process CPU time
of a step (robust to other load on a shared machine when --threads 1), and the peak RSS growth
over the process's state before the first step (model, data and imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_backend(backend: str, voxels: int, voxel_size: float, repeats: int, seed: int, threads: int) -> dict:
    """One backend's measurements (runs in the worker subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from rayseg.models.minkunet import build_minkunet
    from rayseg.sparse.surface import scanned_surface_voxels

    v = scanned_surface_voxels(voxels, voxel_size, seed=seed)
    coord = torch.from_numpy(np.concatenate([np.zeros((len(v), 1), np.int32), v], axis=1))
    gen = torch.Generator().manual_seed(seed)
    feat = torch.rand(len(v), 6, generator=gen) * 2 - 1
    labels = torch.randint(0, 20, (len(v),), generator=gen)
    torch.manual_seed(seed)  # the torch backend's init; ME gets the same weights loaded below
    model = build_minkunet("MinkUNet18A", 6, 20, backend="torch")
    if backend != "torch":
        state = model.state_dict()
        model = build_minkunet("MinkUNet18A", 6, 20, backend=backend)
        model.load_state_dict(state)
    model.train()
    base_rss = _rss_mb()
    fwd, bwd, cpu = [], [], []
    loss_value = None
    for step in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        c0, t0 = time.process_time(), time.perf_counter()
        _, logits = model(coord, feat)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        if step > 0:  # step 0 warms up allocators and thread pools
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            cpu.append(c2 - c0)
        loss_value = float(loss)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "backend": backend, "voxels": len(v), "loss": loss_value, "threads": torch.get_num_threads(),
        "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
        "step_s": statistics.median(f + b for f, b in zip(fwd, bwd)), "step_cpu_s": statistics.median(cpu),
        "peak_rss_growth_mb": peak_rss - base_rss,
    }


def run(args: argparse.Namespace) -> int:
    """Run each backend in a fresh subprocess and print the comparison."""
    if args.worker:
        print(json.dumps(run_backend(args.worker, args.voxels, args.voxel_size, args.repeats, args.seed, args.threads)))
        return 0

    env = dict(os.environ)
    if args.threads:  # read at start-up by OpenMP, MKL and MinkowskiEngine's OpenBLAS
        env.update({var: str(args.threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    results = {}
    for backend in args.backends.split(","):
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "rayseg", "bench-model", "--worker", backend, "--voxels", str(args.voxels),
               "--voxel-size", str(args.voxel_size), "--repeats", str(args.repeats), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{backend}: failed\n{proc.stderr.strip()}", file=sys.stderr)
            return 1
        results[backend] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{backend:>10}: {r['voxels']} voxels, {r['threads']} threads | forward {r['forward_s'] * 1e3:7.0f} ms"
              f" | backward {r['backward_s'] * 1e3:7.0f} ms | step {r['step_s'] * 1e3:7.0f} ms"
              f" (CPU time {r['step_cpu_s'] * 1e3:.0f} ms)"
              f" | peak RSS +{r['peak_rss_growth_mb']:.0f} MiB | loss {r['loss']:.6f}"
              f" | machine load before: {load:.1f} on {os.cpu_count()} CPUs")
    if "torch" in results and "minkowski" in results:
        t, m = results["torch"], results["minkowski"]
        print(f"speed-up torch vs minkowski: {m['step_s'] / t['step_s']:.2f}x wall, "
              f"{m['step_cpu_s'] / t['step_cpu_s']:.2f}x CPU time "
              f"(forward {m['forward_s'] / t['forward_s']:.2f}x, backward {m['backward_s'] / t['backward_s']:.2f}x); "
              f"peak memory torch/minkowski: {t['peak_rss_growth_mb'] / m['peak_rss_growth_mb']:.2f}")
    return 0
