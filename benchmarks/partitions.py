"""Time every partition method on one ~150k-point room next to its floor, a scipy cKDTree
k=12 query (tree build + query of every point), and print the ratio per method.

    .venv/bin/python benchmarks/partitions.py [--points 150000] [--repeat 5] [--method M ...]

The room is procedural (floor, ceiling, four walls, tables, boxes, a cylinder, sampled with
3 mm noise and per-object colours), so the benchmark needs no dataset. The issue's target is a
ratio <= 5 for every method. Columns: the fastest floor and method times, and the median of the
per-pair ratios (each method run is timed right after a floor run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.spatial import cKDTree

from rayseg.config import PartitionConfig
from rayseg.partition import METHODS, partition_points


def _rect(rng, n, origin, u, v):
    a, b = rng.random((2, n, 1))
    return np.asarray(origin) + a * np.asarray(u) + b * np.asarray(v)


def _box(rng, n, lo, hi):
    """n points on the 5 visible faces (no bottom) of an axis-aligned box."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    size = hi - lo
    faces = [((lo[0], lo[1], hi[2]), (size[0], 0, 0), (0, size[1], 0))]  # top
    for axis in (0, 1):
        other = 1 - axis
        for side in (lo, hi):
            origin = lo.copy()
            origin[axis] = side[axis]
            u = np.zeros(3)
            u[other] = size[other]
            faces.append((origin, u, (0, 0, size[2])))
    areas = np.array([np.linalg.norm(np.cross(u, v)) for _, u, v in faces])
    counts = rng.multinomial(n, areas / areas.sum())
    return np.concatenate([_rect(rng, c, o, u, v) for c, (o, u, v) in zip(counts, faces)])


def make_room(num_points: int = 150_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coord (N,3) float32, color (N,3) uint8) of a 6 x 5 x 3 m furnished room."""
    rng = np.random.default_rng(seed)
    W, D, H = 6.0, 5.0, 3.0
    parts = [
        ("floor", lambda n: _rect(rng, n, (0, 0, 0), (W, 0, 0), (0, D, 0)), (120, 100, 80)),
        ("ceiling", lambda n: _rect(rng, n, (0, 0, H), (W, 0, 0), (0, D, 0)), (230, 230, 230)),
        ("wall0", lambda n: _rect(rng, n, (0, 0, 0), (W, 0, 0), (0, 0, H)), (200, 200, 180)),
        ("wall1", lambda n: _rect(rng, n, (0, D, 0), (W, 0, 0), (0, 0, H)), (200, 190, 180)),
        ("wall2", lambda n: _rect(rng, n, (0, 0, 0), (0, D, 0), (0, 0, H)), (190, 200, 180)),
        ("wall3", lambda n: _rect(rng, n, (W, 0, 0), (0, D, 0), (0, 0, H)), (200, 200, 190)),
        ("table", lambda n: _box(rng, n, (1.0, 1.0, 0.0), (2.6, 1.9, 0.75)), (140, 90, 50)),
        ("desk", lambda n: _box(rng, n, (4.0, 3.5, 0.0), (5.6, 4.3, 0.72)), (90, 60, 40)),
        ("box1", lambda n: _box(rng, n, (3.0, 0.5, 0.0), (3.5, 1.0, 0.5)), (40, 80, 160)),
        ("box2", lambda n: _box(rng, n, (0.3, 3.8, 0.0), (1.2, 4.7, 1.8)), (160, 40, 40)),
    ]
    areas = np.array([6 * 5, 6 * 5, 6 * 3, 6 * 3, 5 * 3, 5 * 3, 5.3, 4.9, 1.25, 7.3])
    cyl_area = 2 * np.pi * 0.25 * 1.0
    areas = np.append(areas, cyl_area)
    counts = rng.multinomial(num_points, areas / areas.sum())
    coords, colors = [], []
    for (name, sample, rgb), n in zip(parts, counts[:-1]):
        coords.append(sample(n))
        colors.append(np.tile(rgb, (n, 1)))
    n = counts[-1]
    angle, height = rng.random(n) * 2 * np.pi, rng.random(n)
    coords.append(np.stack([2.0 + 0.25 * np.cos(angle), 3.0 + 0.25 * np.sin(angle), height], axis=1))
    colors.append(np.tile((60, 160, 60), (n, 1)))
    coord = np.concatenate(coords) + rng.normal(0, 0.003, (num_points, 3))
    color = np.clip(np.concatenate(colors) + rng.normal(0, 6, (num_points, 3)), 0, 255)
    return coord.astype(np.float32), color.astype(np.uint8)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=150_000)
    parser.add_argument("--repeat", type=int, default=5, help="timed pairs per method")
    parser.add_argument("--method", action="append", default=None, choices=list(METHODS))
    args = parser.parse_args()
    cfg = PartitionConfig()
    coord, color = make_room(args.points)

    def floor():
        return cKDTree(coord).query(coord, k=12)

    # On a shared machine the load changes from second to second: each method run is timed
    # right after a floor run, and the ratio of each pair is kept (median over the pairs).
    print(f"room: {coord.shape[0]} points; floor = scipy cKDTree build + k=12 query of every point")
    print(f"{'method':<16} {'floor s':>8} {'method s':>9} {'ratio':>6} {'regions':>8} {'no region':>9}")
    for method in args.method or list(METHODS):
        region = partition_points(method, coord, color, None, cfg)  # warm-up, and the result
        pairs = []
        for _ in range(args.repeat):
            f = _seconds(floor)
            pairs.append((f, _seconds(lambda: partition_points(method, coord, color, None, cfg))))
        ratio = float(np.median([m / f for f, m in pairs]))
        f_min, m_min = min(f for f, _ in pairs), min(m for _, m in pairs)
        print(f"{method:<16} {f_min:8.3f} {m_min:9.3f} {ratio:6.2f} {int(region.max()) + 1:8d} "
              f"{int((region < 0).sum()):9d}", flush=True)


if __name__ == "__main__":
    main()
