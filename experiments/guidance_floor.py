"""How far has contrastive guidance got? Its InfoNCE against the lowest value the same pairs allow.

    .venv/bin/python experiments/guidance_floor.py RUN_DIR [--checkpoint DIR] [--scenes 48]
                                                   [--views N] [--out FILE]

Lcon3D asks the 3D branch to pick, among a scene's sampled pairs, the pixel feature of its own
point (InfoNCE, tau 0.07). Its value alone does not say much: pairs on one wall have nearly equal
2D features, so even a 3D branch that reproduced the 2D features exactly could not tell them
apart. This script draws pairs exactly as training does (training-mode batches: augmentation,
random views; `loop.guidance_links` + `losses.draw_pairs`, the training step's own) from one checkpoint's student and, per
scene, compares:

  - actual  : InfoNCE(proj3d(F3D), F2D), the Lcon3D the step computes;
  - floor   : InfoNCE(F2D, F2D), a 3D branch whose projection equals the 2D target exactly
              (the value the pairs' own near-duplicates leave);
  - chance  : ln(#pairs), uniform guesses;
  - the 2D direction's floor, InfoNCE(F3D, F3D), and how many distinct 2D feature cells and
    near-duplicate negatives (cosine > 0.9) the pairs hold.

No ground truth is read. On whatever data the run trained on (in this repository: synthetic rooms).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def infonce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> float:
    """Rows-only InfoNCE of L2-normalised query against key, target i for row i (as Lcon)."""
    q, k = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    return float(F.cross_entropy(q @ k.t() / temperature, torch.arange(len(q))))


def scene_stats(f3: torch.Tensor, projected: torch.Tensor, f2: torch.Tensor, cells: torch.Tensor,
                temperature: float) -> dict[str, float]:
    """One scene's pairs: f3 (P, D3) 3D features, projected (P, D2) = proj3d(f3), f2 (P, D2) the 2D
    features at the pairs' pixels, cells (P,) an id of each pair's 2D feature-map cell."""
    k = F.normalize(f2.float(), dim=1)
    near = (k @ k.t() > 0.9).sum(1) - 1
    return {"actual_3d": infonce(projected, f2, temperature), "floor_3d": infonce(f2, f2, temperature),
            "floor_2d": infonce(f3, f3, temperature), "chance": math.log(len(f2)),
            "cells": float(len(torch.unique(cells))), "pairs": float(len(f2)),
            "near_duplicate_negatives": float(near.float().mean())}


def main(argv: list[str] | None = None) -> int:
    from rayseg import losses as L
    from rayseg.config import replace as cfg_replace
    from rayseg.data import shards
    from rayseg.models.twobranch import TwoBranchModel
    from rayseg.train.device import to_device
    from rayseg.train.launch import load_run_checkpoint
    from rayseg.train.loop import guidance_links, iter_rank_batches

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a training run directory (its config, and its last checkpoint by default)")
    parser.add_argument("--checkpoint", default=None, help="a state.pt of this run or its folder")
    parser.add_argument("--scenes", type=int, default=48, help="train scenes to read (default 48)")
    parser.add_argument("--views", type=int, default=None, help="views per scene (default: the run's data.num_views)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, ckpt, state = load_run_checkpoint(args.run, args.checkpoint)
    cfg = cfg_replace(cfg, **{"data.loader": "local", "data.num_views": args.views or cfg.data.num_views})
    model = TwoBranchModel(cfg.model, len(shards.load_manifest(cfg.data.root)["class_names"]))
    model.load_state_dict(state["student"])
    model.eval()
    g = cfg.loss.guidance
    generator = torch.Generator().manual_seed(cfg.seed)
    rows_out: list[dict[str, float]] = []
    with torch.no_grad():
        for batch in iter_rank_batches(cfg, cfg.data.train_split, "train", 0, 0, 1, cfg.optim.batch_size,
                                       limit=args.scenes):
            b = to_device(batch, torch.device("cpu"))
            out3, out2 = model.forward_3d(b["coord"], b["feat"]), model.forward_2d(b["images"])
            first = L.voxel_representatives(b["inverse"], out3["logits"].shape[0])
            links = guidance_links(model, b, out3, out2, g, generator, first)
            f3, f2, lv, lpx = links["feat_3d"], links["feat_2d"], links["view"], links["pixel"]
            height, width = b["images"].shape[-2:]
            fh, fw = out2["feat"].shape[-2:]
            cell = (lv * fh + (lpx // width) * fh // height) * fw + (lpx % width) * fw // width
            rows, pair_offset = L.draw_pairs(links["pool_offset"], g.max_pairs, generator)
            start = 0
            for end in pair_offset.tolist():
                r, start = rows[start:end], end
                if len(r) >= 2:
                    rows_out.append(scene_stats(f3[r], model.project_3d(f3[r]), f2[r], cell[r], g.temperature))
    mean = {k: sum(r[k] for r in rows_out) / len(rows_out) for k in rows_out[0]}
    print(f"{args.run} at {ckpt.parent.name}: {len(rows_out)} scenes, {cfg.data.num_views} views of "
          f"{width}x{height} (2D feature map {fw}x{fh}), pairs per scene {mean['pairs']:.0f}")
    for key in ("actual_3d", "floor_3d", "chance", "floor_2d", "cells", "near_duplicate_negatives"):
        print(f"  {key:<26}{mean[key]:8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "checkpoint": str(ckpt), "views": cfg.data.num_views,
                                              "mean": mean, "scenes": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
