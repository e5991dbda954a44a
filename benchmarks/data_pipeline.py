"""Data pipeline throughput: scenes/s through decode + augment + voxelise + link (train mode,
teacher and student, 6 views of 320x240, Mix3D and collate included), in the plain Python loop and
through Ray Data on one CPU, printed side by side.

It prepares its own small synthetic dataset in a temp folder. The region column is a stand-in
(0.5 m grid cells for points, the cell of each back-projected pixel for views): the benchmark
measures the pipeline, not a partition algorithm, and floor/wall removal needs some regions.

    .venv/bin/python benchmarks/data_pipeline.py [--scenes 8] [--epochs 2] [--density 250] [--keep DIR]
"""

from __future__ import annotations

import os

# One CPU: no hidden BLAS/OpenMP threads in this process or in Ray workers.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rayseg import config as cfgmod  # noqa: E402
from rayseg.data import pipeline as P  # noqa: E402
from rayseg.data import shards, synthetic  # noqa: E402

CELL = 0.5  # metres, stand-in region size


def grid_regions(coord: np.ndarray) -> tuple[np.ndarray, dict]:
    """Region id = index of the point's occupied 0.5 m cell; also the cell -> id table."""
    cells = np.floor(coord / CELL).astype(np.int64)
    uniq, ids = np.unique(cells, axis=0, return_inverse=True)
    return ids.astype(np.int32).ravel(), {tuple(c): i for i, c in enumerate(uniq.tolist())}


def grid_view_regions(scene: dict, table: dict) -> np.ndarray:
    """Per-pixel region: the cell of the pixel back-projected with its depth (-1 if invalid)."""
    v, h, w = scene["view_depth"].shape
    out = np.full((v, h, w), -1, np.int32)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(v):
        depth, K, pose = scene["view_depth"][i], scene["view_intrinsics"][i], scene["view_pose"][i]
        ok = (depth > 0) & np.isfinite(depth)
        z = depth[ok]
        cam = np.stack([(xs[ok] - K[0, 2]) / K[0, 0] * z, (ys[ok] - K[1, 2]) / K[1, 1] * z, z], 1)
        world = cam @ pose[:3, :3].T + pose[:3, 3]
        cells = np.floor(world / CELL).astype(np.int64)
        out[i][ok] = [table.get(tuple(c), -1) for c in cells.tolist()]
    return out


def prepare(root: Path, num_scenes: int, density: float) -> float:
    """Write num_scenes synthetic train scenes with stand-in regions; returns seconds taken."""
    start = time.perf_counter()
    syn = cfgmod.SyntheticConfig(num_scenes=num_scenes, val_fraction=0.0, num_views=8, seed=0,
                                 points_per_m2=density)
    for index in range(num_scenes):
        scene = synthetic.generate_scene(syn, index)
        scene["region_grid"], table = grid_regions(scene["coord"])
        scene["view_region_grid"] = grid_view_regions(scene, table)
        shards.write_scene(root, scene)
    shards.write_manifest(root, syn.profile)
    return time.perf_counter() - start


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], np.ndarray):
                if x[k].dtype != y[k].dtype or not np.array_equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def timed(batches) -> tuple[tuple[float, float], list[dict]]:
    """((seconds for all batches, seconds to the first batch), batches)."""
    start = time.perf_counter()
    out, first = [], 0.0
    for batch in batches:
        out.append(batch)
        if len(out) == 1:
            first = time.perf_counter() - start
    return (time.perf_counter() - start, first), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=8, help="synthetic train scenes (default 8)")
    parser.add_argument("--epochs", type=int, default=2, help="passes per runner; the first includes start-up")
    parser.add_argument("--density", type=float, default=cfgmod.SyntheticConfig().points_per_m2,
                        help="synthetic surface points per m^2 (scene size; default: the generator's)")
    parser.add_argument("--keep", default="", help="prepare the dataset here and keep it (default: temp dir)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rayseg-bench-")) / "synth"
    try:
        if not (root / shards.MANIFEST_NAME).is_file():
            secs = prepare(root, args.scenes, args.density)
            print(f"prepared {args.scenes} synthetic scenes in {secs:.1f} s -> {root}")
        manifest = shards.load_manifest(root)
        points = [e["num_points"] for e in manifest["scenes"]]
        cfg = cfgmod.replace(cfgmod.Config(), **{
            "data.region_column": "grid", "data.num_views": 6, "data.image_width": 320,
            "data.image_height": 240, "data.voxel_size": 0.04, "optim.batch_size": 4})
        n = len(points)
        print(f"{n} scenes, {np.mean(points):.0f} points on average, {cfg.data.num_views} views of "
              f"{cfg.data.image_width}x{cfg.data.image_height}, voxel {cfg.data.voxel_size} m, "
              f"batch {cfg.optim.batch_size}, Mix3D {cfg.augment.mix3d}")

        plain, plain_batches = [], []
        for epoch in range(args.epochs):
            p = P.plan(root, "train", cfg, "train", epoch)
            timing, batches = timed(P.batches(p, cfg, epoch, cfg.seed, cfg.optim.batch_size))
            plain.append(timing)
            plain_batches.append(batches)

        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        via_ray, identical = [], True
        try:
            for epoch in range(args.epochs):
                p = P.plan(root, "train", cfg, "train", epoch)
                timing, batches = timed(P.batches(p, cfg, epoch, cfg.seed, cfg.optim.batch_size, loader="ray"))
                via_ray.append(timing)
                identical &= same_batches(batches, plain_batches[epoch])
        finally:
            ray.shutdown()

        bs = cfg.optim.batch_size
        print()
        print(f"{'':<10}{'plain loop':^36}{'Ray Data (1 CPU + consumer)':^36}")
        print(f"{'pass':<10}" + f"{'all':>10}{'1st batch':>12}{'after it':>14}" * 2)
        for epoch in range(args.epochs):
            row = f"{'epoch ' + str(epoch):<10}"
            for total, first in (plain[epoch], via_ray[epoch]):
                steady = (n - bs) / (total - first) if n > bs else float("nan")
                row += f"{n / total:>6.2f} sc/s{first:>10.2f} s{steady:>9.2f} sc/s"
            print(row)
        print("(all: scenes/s over the pass incl. start-up; 1st batch: seconds to the first batch; "
              "after it: scenes/s from the first batch to the last)")
        print(f"Ray Data batches identical to the plain loop's: {'yes' if identical else 'NO'}")
    finally:
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
