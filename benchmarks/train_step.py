"""The two-branch training step of experiments/synthetic-demo.toml (stage cmg_rpc, every loss term on),
old code vs new code side by side, in ms per step broken down into data, 3D forward, teacher
forward, 2D forward, losses, 3D backward, 2D backward, optimizer and EMA.

    .venv/bin/python benchmarks/train_step.py [--old 5795995] [--repeats 3] [--steps 3] [--threads 1]

"old" is rayseg's source at a git commit (extracted with `git archive` into a temp folder, the
working tree is not touched), "new" the working tree; each runs in its own subprocess with that
source first on PYTHONPATH (the new side with OMP_WAIT_POLICY=PASSIVE, as the new CLI sets it,
unless the variable is set already), alternating old/new `--repeats` times so that load from other
processes on a shared machine hits both alike. Both sides read the same prepared demo scenes
(made once by the new code, without Ray) and step on the same batches. A step is timed in
two ways: whole (exactly rayseg.train.loop's step) and split into parts (backward run in three
calls, from the loss down to the branch outputs, then each branch: the same gradients). Wall
and process CPU time are both shown: with --threads 1 the CPU time is the cost of the work and
the steadier number on a loaded machine. `--bf16-2d` adds a third side: the new code with
`model.autocast_2d = "bfloat16"` (the 2D branch under bfloat16 autocast; off by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> dict:
    """One side's measurements, in this process (rayseg imported from PYTHONPATH)."""
    import _harness as H
    import torch

    import rayseg

    H.env_threads(args.threads)
    cfg = H.demo_config(args.data, args.scenes)
    data_times, batches = [], []
    it = H.batches(cfg, 0)
    while True:
        t0 = H._now()
        b = next(it, None)
        if b is None:
            break
        t1 = H._now()
        data_times.append([t1[0] - t0[0], t1[1] - t0[1]])
        batches.append(b)
    trainer = H.Trainer(cfg, "cpu", bf16_2d=args.bf16_2d)
    trainer.step(batches[0])  # warm-up: allocators, thread pools, lazy imports
    whole, parts, losses = [], {}, []
    for i in range(args.steps):
        b = batches[i % len(batches)]
        loss, t = trainer.step(b)
        whole.append(t["step"])
        losses.append(loss)
        _, t = trainer.step(b, split=True)
        for k, v in t.items():
            parts.setdefault(k, []).append(v)
    # FLOPs per part: one more split step under a FLOP counter (not timed: counting slows it)
    with H.count_flops():
        _, counted = trainer.step(batches[0], split=True)
    med = {k: [statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), counted.get(k, [0, 0, 0])[2]]
           for k, v in parts.items()}
    med["data"] = [statistics.median(x[0] for x in data_times), statistics.median(x[1] for x in data_times)]
    med["whole_step"] = [statistics.median(x[0] for x in whole), statistics.median(x[1] for x in whole)]
    return {"source": str(Path(rayseg.__file__).parent.parent), "parts": med, "losses": losses,
            "gemm_peak": H.gemm_peak_flops(),
            "threads": torch.get_num_threads(), "voxels": [int(b["coord"].shape[0]) for b in batches],
            "views": [int(b["images"].shape[0]) for b in batches]}


def old_source(commit: str, into: Path) -> Path:
    """rayseg's package at `commit`, extracted (read-only use of the repository)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "rayseg", "experiments"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_side(src: Path, args: argparse.Namespace, bf16_2d: bool = False, new: bool = True) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    if new and "OMP_WAIT_POLICY" not in os.environ:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what the new `rayseg` CLI sets before torch loads
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", "--data", str(args.data), "--scenes", str(args.scenes),
           "--steps", str(args.steps), "--threads", str(args.threads)] + (["--bf16-2d"] if bf16_2d else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(src))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker for {src} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PART_NAMES = {"data": "data (make_sample + collate)", "3d_fwd": "3D forward (student)",
              "teacher_fwd": "teacher forward (3D + 2D)", "2d_fwd": "2D forward (student)",
              "losses": "losses (fwd + bwd to branch outputs)", "3d_bwd": "3D backward", "2d_bwd": "2D backward",
              "optimizer": "optimizer (SGD)", "ema": "EMA update", "step": "step, split into parts",
              "whole_step": "step, whole (as training runs it)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="5795995", help="git commit of the old code (default 5795995)")
    parser.add_argument("--repeats", type=int, default=3, help="old/new subprocess pairs, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--scenes", type=int, default=16, help="synthetic demo scenes to prepare (3/4 train)")
    parser.add_argument("--data", default="", help="where the demo scenes are prepared / reused "
                        "(default: a folder under the system temp dir)")
    parser.add_argument("--bf16-2d", action="store_true", help="also run the new code with "
                        "model.autocast_2d = bfloat16")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = Path(args.data or Path(tempfile.gettempdir()) / f"rayseg-train-step-{args.scenes}").resolve()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import _harness as H

    H.prepare_demo_data(H.demo_config(args.data, args.scenes))
    sides = {"old": None, "new": REPO}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    if args.bf16_2d:
        results["new+bf16 2D"] = []
    with tempfile.TemporaryDirectory(prefix="rayseg-old-") as tmp:
        sides["old"] = old_source(args.old, Path(tmp) / "src")
        start = time.time()
        for rep in range(args.repeats):
            load = os.getloadavg()[0]
            for name in results:
                results[name].append(run_side(sides["new" if name != "old" else "old"], args,
                                              bf16_2d=name != "old" and name != "new", new=name != "old"))
            print(f"repeat {rep + 1}/{args.repeats} done ({time.time() - start:.0f} s; load average "
                  f"{load:.1f} on {os.cpu_count()} CPUs before it)", flush=True)
    first = results["new"][0]
    print(f"\nstage cmg_rpc of {Path(H.DEMO_CONFIG).name}: batches of {first['voxels']} student voxels, "
          f"{first['views'][0]} views, {first['threads']} thread(s); medians over {args.repeats} runs x "
          f"{args.steps} steps; old = {args.old}, new = working tree")
    names = list(results)
    width = {n: max(9, len(n) + 5) for n in names}
    header = f"{'ms per step':<40}" + "".join(f"{n + ' wall':>{width[n]}}{n + ' CPU':>{width[n] + 5}}" for n in names)
    print(header + f"{'old/new CPU':>13}")
    for part in list(H.PARTS) + ["step", "whole_step"]:
        row = f"{PART_NAMES.get(part, part):<40}"
        cpu = {}
        for n in names:
            vals = [r["parts"].get(part, [0.0, 0.0]) for r in results[n]]
            wall = statistics.median(v[0] for v in vals) * 1e3
            cpu[n] = statistics.median(v[1] for v in vals) * 1e3
            spread = (max(v[1] for v in vals) - min(v[1] for v in vals)) * 1e3
            row += f"{wall:>{width[n]}.0f}{cpu[n]:>{width[n] + 1}.0f}±{spread / 2:<3.0f}"
        ratio = cpu["old"] / cpu["new"] if cpu["new"] > 0 else float("nan")
        print(row + f"{ratio:>12.2f}x")
    for n in names:
        print(f"losses {n}: {[round(x, 6) for x in results[n][0]['losses']]}")
    print("(± is half the spread of the CPU time over the runs; losses differ between old and new only "
          "where the method's code changed in between)")
    print_roofline(results, names, args.threads)
    return 0


def print_roofline(results: dict[str, list[dict]], names: list[str], threads: int) -> None:
    """Where the step stands against the machine: each part's matrix/convolution FLOPs, the rate
    the new code runs them at (FLOPs / CPU time), and the fastest the step could be if every part
    ran at the measured peak of one large float32 GEMM. With one thread, old CPU time / that floor
    is the largest speed-up any float32 code path can give the step on this CPU."""
    import _harness as H

    new = results["new"]
    peak = statistics.median(r["gemm_peak"]["float32"] for r in new)
    peak_bf16 = statistics.median(r["gemm_peak"]["bfloat16"] for r in new)
    print(f"\nroofline, new code ({threads} thread(s)): one large GEMM runs at {peak / 1e9:.0f} GFLOP/s in "
          f"float32, {peak_bf16 / 1e9:.0f} in bfloat16 (CPU time)")
    print(f"{'part':<40}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'ms at peak':>12}")
    floor = 0.0
    for part in [p for p in H.PARTS if p != "data"]:
        vals = [r["parts"].get(part, [0.0, 0.0, 0.0]) for r in new]
        flops = vals[0][2]
        cpu = statistics.median(v[1] for v in vals)
        at_peak = flops / peak
        floor += at_peak
        rate = flops / cpu if cpu > 0 else 0.0
        print(f"{PART_NAMES.get(part, part):<40}{flops / 1e9:>8.1f}{rate / 1e9:>9.0f}{rate / peak:>8.0%}"
              f"{at_peak * 1e3:>12.0f}")
    old_cpu = statistics.median(r["parts"]["whole_step"][1] for r in results["old"])
    new_cpu = statistics.median(r["parts"]["whole_step"][1] for r in new)
    print(f"the step's FLOPs at float32 peak: {floor * 1e3:.0f} ms; the step now {new_cpu * 1e3:.0f} ms, old "
          f"{old_cpu * 1e3:.0f} ms: at most {old_cpu / floor:.2f}x over old for any float32 code path "
          f"(the parts' FLOPs fixed by the config), {new_cpu / floor:.2f}x over new")


if __name__ == "__main__":
    sys.exit(main())
