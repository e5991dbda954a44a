"""``rayseg check-links``: are the 2D views and the 3D points of a prepared dataset aligned?

For a few sample scenes, every point (a random subsample) is projected into a few of the scene's
views (rayseg.data.linking.link_points). The numbers per scene:

- ``linked_fraction``: points that link (|depth(pixel) - z| <= tol) to at least one view;
- ``median_link_error``: median |depth(pixel) - z| over the accepted links (those <= tol): how
  well the depth maps and the points agree where they are linked (what training uses);
- ``median_window_error``: median |depth(pixel) - z| over candidate links, i.e. projections that
  land on a valid pixel with |depth - z| <= ``loose`` (0.5 m), occluded ones included: aligned
  data concentrates near 0, a wrong pose spreads over the whole window (median ~ loose / 2). It
  decides the verdict, and is larger than the accepted links' figure even on aligned data;
- ``color_diff`` vs ``shuffled_color_diff``: mean absolute RGB difference (0..255) between linked
  points and their pixels, and between the same points and the pixels of randomly permuted links.
  Aligned data shows a clear gap (ratio well below 1); a broken pose convention shows none.

A scene is "aligned" when it has at least ``min_links`` links, median_window_error <=
``max_median_error`` and color_diff / shuffled_color_diff <= ``max_color_ratio``. The dataset
verdict is "aligned" only if every checked scene with views is; the CLI exits 1 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rayseg.data.linking import link_points

COLUMNS = ["coord", "color", "view_rgb", "view_depth", "view_pose", "view_intrinsics"]


@dataclass(kw_only=True)
class CheckLinksOptions:
    """Sampling and thresholds of the alignment check."""

    num_scenes: int = 5
    """Scenes checked (evenly spaced over the dataset's scenes that have views)."""
    tol: float = 0.05
    """Occlusion tolerance of a link, metres (the voxel size)."""
    loose: float = 0.5
    """Window for candidate links in the depth-error median, metres."""
    max_views: int = 8
    """Views checked per scene (evenly spaced)."""
    max_points: int = 50_000
    """Points checked per scene (random subsample)."""
    min_links: int = 100
    """A scene with fewer links is misaligned (nothing lines up)."""
    max_median_error: float = 0.1
    """Largest median |depth - z| over the candidate window of an aligned scene, metres."""
    max_color_ratio: float = 0.8
    """Largest linked / shuffled colour difference of an aligned scene."""
    seed: int = 0
    """Seed of the point subsample and the shuffle."""

    def __post_init__(self) -> None:
        if self.num_scenes < 1 or self.max_views < 1 or self.max_points < 1:
            raise ValueError("num_scenes, max_views and max_points must be >= 1")
        if not 0 < self.tol < self.loose:
            raise ValueError(f"need 0 < tol < loose, got tol={self.tol}, loose={self.loose}")


def scene_link_stats(scene: dict, opts: CheckLinksOptions) -> dict:
    """The check's numbers for one scene record (needs coord, color and the view_* keys)."""
    rng = np.random.default_rng(opts.seed)
    coord, color = scene["coord"], scene["color"]
    keep = rng.choice(len(coord), min(len(coord), opts.max_points), replace=False)
    coord, color = coord[keep], color[keep].astype(np.float64)
    num_views = len(scene["view_rgb"])
    chosen = np.unique(np.linspace(0, num_views - 1, min(num_views, opts.max_views)).round().astype(int))
    linked_any = np.zeros(len(coord), bool)
    errors, point_colors, pixel_colors = [], [], []
    for v in chosen:
        depth = scene["view_depth"][v]
        pose = scene["view_pose"][v].astype(np.float64)
        K = scene["view_intrinsics"][v].astype(np.float64)
        idx, pix = link_points(coord, depth, pose, K, opts.loose)
        if len(idx) == 0:
            continue
        cam = (coord[idx] - pose[:3, 3]) @ pose[:3, :3]  # world -> camera (rotation transposed)
        err = np.abs(depth.reshape(-1)[pix] - cam[:, 2])
        errors.append(err)
        ok = err <= opts.tol
        linked_any[idx[ok]] = True
        point_colors.append(color[idx[ok]])
        pixel_colors.append(scene["view_rgb"][v].reshape(-1, 3)[pix[ok]].astype(np.float64))
    errors = np.concatenate(errors) if errors else np.zeros(0)
    pc = np.concatenate(point_colors) if point_colors else np.zeros((0, 3))
    xc = np.concatenate(pixel_colors) if pixel_colors else np.zeros((0, 3))
    num_links = len(pc)
    if num_links:
        color_diff = float(np.abs(pc - xc).mean())
        shuffled = float(np.abs(pc - xc[rng.permutation(num_links)]).mean())
    else:
        color_diff = shuffled = float("nan")
    stats = {
        "scene_id": scene["scene_id"], "views_checked": int(len(chosen)), "points_checked": int(len(coord)),
        "links": int(num_links), "linked_fraction": float(linked_any.mean()) if len(coord) else 0.0,
        "median_link_error": float(np.median(errors[errors <= opts.tol])) if num_links else float("nan"),
        "median_window_error": float(np.median(errors)) if len(errors) else float("nan"),
        "color_diff": color_diff, "shuffled_color_diff": shuffled,
    }
    ratio = color_diff / shuffled if num_links and shuffled > 0 else float("nan")
    stats["color_ratio"] = ratio
    stats["aligned"] = bool(num_links >= opts.min_links
                            and stats["median_window_error"] <= opts.max_median_error
                            and ratio <= opts.max_color_ratio)
    return stats


def sample_scene_paths(root: str | Path, num_scenes: int, split: str | None = None) -> list[Path]:
    """Evenly spaced shards of the dataset whose scenes have views (manifest order)."""
    from rayseg.data import shards

    manifest = shards.load_manifest(root)
    with_views = {e["path"] for e in manifest["scenes"] if e.get("num_views")}
    paths = shards.scene_paths(root, split)
    candidates = [p for p in paths if p.relative_to(Path(root)).as_posix() in with_views] or paths
    if len(candidates) <= num_scenes:
        return candidates
    pick = np.linspace(0, len(candidates) - 1, num_scenes).round().astype(int)
    return [candidates[i] for i in pick]


def check_links(root: str | Path, opts: CheckLinksOptions, split: str | None = None) -> dict:
    """Run the check on sample scenes of a prepared dataset: {'scenes': [...], 'aligned': bool}."""
    from rayseg.data import shards

    results = []
    for path in sample_scene_paths(root, opts.num_scenes, split):
        scene = shards.read_scene(path, COLUMNS)
        if len(scene["view_rgb"]) == 0:
            results.append({"scene_id": scene["scene_id"], "views_checked": 0, "aligned": None})
            continue
        results.append(scene_link_stats(scene, opts))
    checked = [r for r in results if r["aligned"] is not None]
    return {"root": str(root), "scenes": results, "checked": len(checked),
            "aligned": bool(checked) and all(r["aligned"] for r in checked)}


def format_report(report: dict, opts: CheckLinksOptions) -> str:
    lines = [f"check-links {report['root']}: tol {opts.tol} m, candidate window {opts.loose} m",
             f"  link|d-z|: median |depth - z| of the accepted links (<= {opts.tol} m), m; "
             f"window|d-z|: median over every candidate within {opts.loose} m (occluded ones too), m",
             f"{'scene':<28} {'views':>5} {'links':>8} {'linked%':>8} {'link|d-z|':>10} {'window|d-z|':>11} "
             f"{'rgb diff':>9} {'shuffled':>9} {'ratio':>6}  verdict"]
    for r in report["scenes"]:
        if r["aligned"] is None:
            lines.append(f"{r['scene_id']:<28} {0:>5}  (no views: not checked)")
            continue
        lines.append(f"{r['scene_id']:<28} {r['views_checked']:>5} {r['links']:>8} "
                     f"{100 * r['linked_fraction']:>7.1f}% {r['median_link_error']:>10.4f} "
                     f"{r['median_window_error']:>11.3f} "
                     f"{r['color_diff']:>9.1f} {r['shuffled_color_diff']:>9.1f} {r['color_ratio']:>6.2f}  "
                     f"{'aligned' if r['aligned'] else 'MISALIGNED'}")
    if not report["checked"]:
        lines.append("verdict: MISALIGNED (no scene with views to check)")
    else:
        bad = [r["scene_id"] for r in report["scenes"] if r["aligned"] is False]
        lines.append("verdict: aligned" if report["aligned"] else
                     f"verdict: MISALIGNED ({len(bad)} of {report['checked']} scenes: {', '.join(bad)}); "
                     f"aligned needs >= {opts.min_links} links, window|d-z| <= {opts.max_median_error} m, "
                     f"colour ratio <= {opts.max_color_ratio}")
    return "\n".join(lines)
