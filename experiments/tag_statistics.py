"""How much of a synthetic dataset's scene tags its room types decide (no training, no GT labels).

    .venv/bin/python experiments/tag_statistics.py CONFIG

Scene tags are the only training signal of the method. When a class is tagged exactly in the rooms
of one type (toilet in every bathroom and nowhere else), the tags cannot tell that class apart from
anything else typical of that room type: a classifier can learn "bathroom" and fire "toilet" on
every point. Per class this prints the tag frequency, the tag's entropy H (bits) and its entropy
given the room type H|type, and the share of the total tag entropy the room types explain. Reads
only the tags of the prepared shards (CONFIG's data.root) and the room type the generator assigns
to each scene index (CONFIG's synthetic settings).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from rayseg import config as cfgmod
from rayseg.data import shards
from rayseg.data.synthetic import room_type


def binary_entropy(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def tag_table(tags: np.ndarray, types: list[str], class_names: list[str]) -> tuple[list[dict], float]:
    """Per class: frequency, H, H|type and the per-type frequencies; and the explained share."""
    kinds = sorted(set(types))
    which = np.array([kinds.index(t) for t in types])
    rows, total, given = [], 0.0, 0.0
    for c, name in enumerate(class_names):
        h = binary_entropy(tags[:, c].mean())
        h_type = sum((which == k).mean() * binary_entropy(tags[which == k, c].mean()) for k in range(len(kinds)))
        total, given = total + h, given + h_type
        rows.append({"class": name, "freq": float(tags[:, c].mean()), "H": h, "H_given_type": h_type,
                     "by_type": {kinds[k]: float(tags[which == k, c].mean()) for k in range(len(kinds))}})
    return rows, (1 - given / total) if total else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="synthetic experiment TOML (its data.root must be prepared)")
    args = parser.parse_args(argv)
    cfg = cfgmod.load(args.config).config
    root = Path(cfg.data.root)
    class_names = list(shards.load_manifest(root)["class_names"])
    tags, types = [], []
    for path in sorted(root.glob("*/*.parquet")):
        scene = shards.read_scene(path, ["scene_id", "tags"])
        index = int(re.findall(r"\d+", str(scene["scene_id"]))[-1])
        tags.append(np.asarray(scene["tags"]) > 0.5)
        types.append(room_type(cfg.synthetic, index))
    rows, explained = tag_table(np.array(tags), types, class_names)
    print(f"{len(tags)} scenes of {root}; tags by room type (synthetic)")
    print(f"{'class':16s} {'freq':>5s} {'H':>5s} {'H|type':>6s}  tagged share per room type")
    for r in rows:
        shares = " ".join(f"{k[:8]}={v:.1f}" for k, v in r["by_type"].items() if v > 0)
        print(f"{r['class']:16s} {r['freq']:5.2f} {r['H']:5.2f} {r['H_given_type']:6.2f}  {shares}")
    print(f"room types explain {100 * explained:.0f} % of the tags' entropy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
