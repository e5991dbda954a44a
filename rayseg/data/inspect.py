"""`rayseg inspect DIR`: what a prepared dataset holds, and (with --verify) whether it is sound.
(`rayseg doctor`, which also checks runs, sweeps and pseudo-label folders, is rayseg/doctor.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayseg.data import shards
from rayseg.data.scene import IGNORE_LABEL


def class_histogram(root: str | Path, manifest: dict) -> tuple[np.ndarray, int, np.ndarray]:
    """(GT points per class, ignored points, scenes tagged per class) over all shards.

    The point counts come from the ground-truth ``label`` column: evaluation-only information,
    shown for inspection; nothing downstream may use it."""
    num_classes = manifest["num_classes"]
    points = np.zeros(num_classes, dtype=np.int64)
    tagged = np.zeros(num_classes, dtype=np.int64)
    ignored = 0
    for entry in manifest["scenes"]:
        path = Path(root) / entry["path"]
        wanted = [c for c in ("label", "tags") if c in shards.shard_columns(path)]  # errors name the file
        row = shards._table_row(shards._read_table(path, wanted))
        if "label" in row:
            label = shards._npy_array(row["label"], f"{entry['path']}: label")
            counts = np.bincount(label[label != IGNORE_LABEL], minlength=num_classes)
            points += counts[:num_classes]
            ignored += int((label == IGNORE_LABEL).sum())
        tags = shards._npy_array(row["tags"], f"{entry['path']}: tags")
        tagged[: len(tags)] += tags[:num_classes] > 0
    return points, ignored, tagged


def format_summary(root: str | Path, max_scenes: int = 20) -> str:
    """Manifest summary, per-class histogram and per-scene sizes as printable text."""
    root = Path(root)
    manifest = shards.load_manifest(root)
    entries = manifest["scenes"]
    created = manifest.get("created", {})
    lines = [
        f"dataset     {root}",
        f"profile     {manifest['profile']} ({manifest['num_classes']} classes), schema v{manifest['schema_version']}",
        f"scenes      {manifest['num_scenes']}  " + "  ".join(f"{k}: {v}" for k, v in manifest["splits"].items()),
        f"created     {created.get('time', '?')} on {created.get('host', '?')} (rayseg {created.get('rayseg_version', '?')})",
    ]
    for key, value in manifest.get("metadata", {}).items():
        text = str(value)
        lines.append(f"metadata    {key} = {text if len(text) <= 100 else text[:97] + '...'}")
    if entries:
        pts = np.array([e["num_points"] for e in entries])
        mb = np.array([e["bytes"] for e in entries]) / 2**20
        views = np.array([e["num_views"] for e in entries])
        lines.append(f"points      min {pts.min():,}  median {int(np.median(pts)):,}  max {pts.max():,}  total {pts.sum():,}")
        lines.append(f"views       min {views.min()}  max {views.max()}  total {views.sum()}")
        lines.append(f"size        {mb.sum():.1f} MB total, {mb.mean():.2f} MB per scene")
        regions = sorted({m for e in entries for m in e.get("regions", [])})
        for m in regions:
            have = sum(m in e.get("regions", []) for e in entries)
            lines.append(f"regions     region_{m}: {have}/{len(entries)} scenes")

        points, ignored, tagged = class_histogram(root, manifest)
        total = max(int(points.sum()) + ignored, 1)
        lines.append("")
        lines.append("class histogram (points: ground truth, evaluation only; scenes: tags)")
        lines.append(f"  {'id':>3} {'class':<16} {'points':>12} {'%':>6} {'scenes':>7}")
        for c, name in enumerate(manifest["class_names"]):
            lines.append(f"  {c:>3} {name:<16} {points[c]:>12,} {100 * points[c] / total:>6.2f} {tagged[c]:>7}")
        lines.append(f"  {'':>3} {'(ignored)':<16} {ignored:>12,} {100 * ignored / total:>6.2f}")

        lines.append("")
        shown = entries if max_scenes <= 0 else entries[:max_scenes]
        lines.append(f"  {'scene':<28} {'split':<6} {'points':>9} {'views':>5} {'MB':>7}  regions")
        for e in shown:
            lines.append(f"  {e['scene_id']:<28} {e['split']:<6} {e['num_points']:>9,} {e['num_views']:>5} "
                         f"{e['bytes'] / 2**20:>7.2f}  {','.join(e.get('regions', [])) or '-'}")
        if len(shown) < len(entries):
            lines.append(f"  ... {len(entries) - len(shown)} more scenes (--all to list them)")
    return "\n".join(lines)


def verify_dataset(root: str | Path, progress_seconds: float = 0.0) -> list[str]:
    """Every problem of a prepared dataset and of its partitions (rayseg.partition.job)."""
    problems = shards.verify(root, progress_seconds=progress_seconds)
    if (Path(root) / shards.MANIFEST_NAME).is_file():
        from rayseg.partition.job import verify_partitions

        try:
            problems += verify_partitions(root)
        except (FileNotFoundError, shards.ShardError):
            pass  # the manifest itself is broken: shards.verify has said so
    return problems


def run_inspect(root: str | Path, verify: bool = False, max_scenes: int = 20) -> int:
    """Print the summary; with ``verify`` also check every file (and the partitions). Returns
    the exit status. Without ``verify``, missing or truncated shards still stop it with an error
    naming the file (one stat per file), never a half summary."""
    root = Path(root)
    if verify:
        problems = verify_dataset(root, progress_seconds=10.0)
        if problems:
            # The dataset may be too broken to summarise: report problems first, by file name.
            print(f"verify: {len(problems)} problem(s) in {root}:")
            for p in problems:
                print(f"  {p}")
            return 1
    else:
        manifest = shards.load_manifest(root)
        shards.check_listed_files(root, manifest["scenes"], manifest)
    print(format_summary(root, max_scenes))
    if verify:
        n = shards.load_manifest(root)["num_scenes"]
        print(f"\nverify: OK, {n} scenes: every file matches the manifest and reads back valid"
              + ("; partitions match partitions.json" if (root / "partitions.json").is_file() else ""))
    return 0
