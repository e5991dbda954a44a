"""Pictures of scenes: coloured PLY files and PNG renders of ground truth, pseudo-labels and
predictions, one fixed colour per class.

``rayseg export SCENE_OR_RUN --what gt,pseudo,pred --format ply`` writes one binary PLY per scene
and label set (vertex x y z float, red green blue uchar, label uchar) that opens in MeshLab,
CloudCompare and Open3D, and prints the legend. ``rayseg render ...`` / ``render_comparison``
draw a scene from above and from one oblique angle, the label sets side by side (matplotlib Agg,
no GPU, no display), for reports and MLflow (``Tracker.log_file``).

SCENE_OR_RUN is one of
- a shard file ``ROOT/<split>/<scene>.parquet`` of a prepared dataset;
- a prepared dataset folder (``manifest.json``), scenes chosen with ``--scene ID`` or the first
  ``--scenes N`` (of ``--split``);
- a run directory (``config.toml`` + checkpoints): its dataset, its network and its pseudo-labels.

Label sets:
- ``gt``: the shard's ``label`` column. Ground truth is read here for pictures only; nothing
  computed from it goes back into training.
- ``pseudo``: the pseudo-label shard of the scene (``rayseg.pseudo``): ``--pseudo-labels DIR``,
  else a train run's ``pseudo_labels/`` folder, else the folder a seg run was trained on.
- ``pred``: the run's network on the un-augmented scene, argmax per point, no scene tags (a
  deployed network has none): a seg run's MinkUNet, a train run's EMA-teacher 3D branch.
"""

from __future__ import annotations

import colorsys
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rayseg import atomic
from rayseg.data.scene import IGNORE_LABEL, S3DIS13, SCANNET20

LABEL_SETS = ("gt", "pseudo", "pred")
TITLES = {"gt": "ground truth", "pseudo": "pseudo-labels", "pred": "prediction"}
IGNORE_COLOR = (0, 0, 0)

# The ScanNet benchmark's colours for its 20 classes.
SCANNET20_COLORS = (
    (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34),
    (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189),
    (196, 156, 148), (23, 190, 207), (247, 182, 210), (219, 219, 141), (255, 127, 14),
    (158, 218, 229), (44, 160, 44), (112, 128, 144), (227, 119, 194), (82, 84, 163),
)
# The colours S3DIS pictures usually use for its 13 classes.
S3DIS13_COLORS = (
    (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 255), (100, 100, 255),
    (200, 200, 100), (170, 120, 200), (255, 0, 0), (200, 100, 100), (10, 200, 100),
    (200, 200, 200), (50, 50, 50),
)
PALETTES = {SCANNET20: SCANNET20_COLORS, S3DIS13: S3DIS13_COLORS}


class ExportError(ValueError):
    """A scene, run or label set cannot be exported; the message names it and what is wrong."""


# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------


def palette(class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(C, 3) uint8 colours: the ScanNet-20 / S3DIS-13 palettes for those class sets, otherwise
    well-separated hues in class order (golden-ratio steps), the same on every call."""
    names = tuple(class_names)
    if not names:
        raise ExportError("palette: no class names")
    if names in PALETTES:
        return np.array(PALETTES[names], np.uint8)
    hues = (np.arange(len(names)) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.65 if i % 2 else 0.9, 0.95 if i % 3 else 0.75) for i, h in enumerate(hues)]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def colorize(labels: np.ndarray, colors: np.ndarray, what: str = "labels") -> np.ndarray:
    """(N, 3) uint8 colours of per-point labels; IGNORE_LABEL is black, any other id outside the
    palette raises ExportError naming `what`."""
    labels = np.asarray(labels)
    bad = (labels != IGNORE_LABEL) & ((labels < 0) | (labels >= len(colors)))
    if bad.any():
        raise ExportError(f"{what}: label {int(labels[bad][0])} is not a class id 0..{len(colors) - 1} "
                          f"nor the ignore label {IGNORE_LABEL}")
    table = np.concatenate([colors, np.zeros((256 - len(colors), 3), np.uint8)])
    table[IGNORE_LABEL] = IGNORE_COLOR
    return table[labels.astype(np.int64) % 256]


def format_legend(class_names, colors: np.ndarray) -> str:
    """'class -> RGB' lines, ignore included."""
    width = max(len(n) for n in class_names)
    lines = [f"  {i:3d} {name:<{width}}  ->  RGB {tuple(int(v) for v in colors[i])}"
             for i, name in enumerate(class_names)]
    lines.append(f"  {IGNORE_LABEL:3d} {'(ignore)':<{width}}  ->  RGB {IGNORE_COLOR}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What SCENE_OR_RUN names
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The scenes to draw and where their label sets come from."""

    data_root: Path
    paths: list[Path]
    class_names: tuple[str, ...]
    run_dir: Path | None = None
    pseudo_dir: Path | None = None


def _dataset_root_of_shard(path: Path) -> Path:
    root = path.parent.parent
    if not (root / "manifest.json").is_file():
        raise ExportError(f"shard {path} is not inside a prepared dataset (no {root / 'manifest.json'}: "
                          f"expected ROOT/<split>/<scene>.parquet)")
    return root


def _pick_scenes(root: Path, scene_ids: list[str], num_scenes: int, split: str | None) -> list[Path]:
    from rayseg.data import shards

    entries = shards.load_manifest(root)["scenes"]
    if scene_ids:
        by_id = {e["scene_id"]: e for e in entries}
        missing = [s for s in scene_ids if s not in by_id]
        if missing:
            raise ExportError(f"{root}: no scene {', '.join(missing)} in the dataset "
                              f"(it has {len(entries)} scenes, e.g. {', '.join(sorted(by_id)[:5])})")
        chosen = [by_id[s] for s in scene_ids]
    else:
        if num_scenes < 1:
            raise ExportError(f"--scenes must be >= 1, got {num_scenes}")
        pool = sorted((e for e in entries if split is None or e["split"] == split), key=lambda e: e["scene_id"])
        if not pool:
            splits = sorted({e["split"] for e in entries})
            raise ExportError(f"{root}: no scenes in split {split!r} (splits: {', '.join(splits)})")
        chosen = pool[:num_scenes]
    paths = [root / e["path"] for e in chosen]
    for p in paths:
        if not p.is_file():
            raise ExportError(f"shard {p} listed in {root / 'manifest.json'} does not exist")
    return paths


def resolve_source(target: str | Path, what: tuple[str, ...], scene_ids: list[str] = (), num_scenes: int = 1,
                   split: str | None = None, pseudo_labels: str | Path | None = None) -> Source:
    """Turn SCENE_OR_RUN and the selection options into a Source; errors name what is missing."""
    from rayseg.data import shards

    target = Path(target)
    unknown = [w for w in what if w not in LABEL_SETS]
    if unknown or not what:
        raise ExportError(f"--what: unknown label set(s) {unknown or what!r}; choose from {', '.join(LABEL_SETS)}")
    run_dir = None
    if target.is_file():
        if scene_ids:
            raise ExportError(f"{target} is one shard file: --scene selects scenes of a dataset or run folder")
        root, paths = _dataset_root_of_shard(target), [target]
    elif target.is_dir() and (target / "config.toml").is_file():
        from rayseg.train.launch import load_run

        run_dir = target.resolve()
        cfg = load_run(run_dir)
        root = Path(cfg.data.root)
        if not (root / "manifest.json").is_file():
            raise ExportError(f"run {run_dir}: its dataset data.root = {root} has no manifest.json "
                              f"(moved? run from the directory the run was started in)")
        if split is None:
            split = cfg.data.train_split if "pseudo" in what else cfg.data.val_split
        paths = _pick_scenes(root, list(scene_ids), num_scenes, split)
    elif target.is_dir() and (target / "manifest.json").is_file():
        root, paths = target, _pick_scenes(target, list(scene_ids), num_scenes, split)
    elif target.exists():
        raise ExportError(f"{target} is neither a shard file, a prepared dataset (manifest.json) nor a run "
                          f"directory (config.toml)")
    else:
        raise ExportError(f"{target} does not exist")
    class_names = tuple(shards.load_manifest(root).get("class_names", ()))
    if not class_names:
        raise ExportError(f"{root / 'manifest.json'} lists no class_names")
    if "pred" in what and run_dir is None:
        raise ExportError("--what pred needs a run directory as SCENE_OR_RUN (the network to run)")
    pseudo_dir = None
    if "pseudo" in what:
        pseudo_dir = _pseudo_dir(run_dir, pseudo_labels)
    return Source(data_root=root, paths=paths, class_names=class_names, run_dir=run_dir, pseudo_dir=pseudo_dir)


def _pseudo_dir(run_dir: Path | None, given: str | Path | None) -> Path:
    if given:
        candidates = [Path(given)]
    elif run_dir is not None:
        from rayseg.train.launch import load_run

        candidates = [run_dir / "pseudo_labels"]
        if load_run(run_dir).data.pseudo_labels:  # a seg run: the labels it was trained on
            candidates.append(Path(load_run(run_dir).data.pseudo_labels))
    else:
        raise ExportError("--what pseudo needs --pseudo-labels DIR (or a run directory that has them)")
    for d in candidates:
        if d.is_dir():
            return d
    raise ExportError(f"no pseudo-label folder: {' nor '.join(str(d) for d in candidates)} exists "
                      f"(make one with `rayseg pseudo-label RUN --out DIR`)")


# --------------------------------------------------------------------------------------------
# Label sets of one scene
# --------------------------------------------------------------------------------------------


class Predictor:
    """A run's 3D network, loaded once: per-point argmax on un-augmented scenes."""

    def __init__(self, run_dir: Path):
        import torch

        from rayseg import config as cfgmod
        from rayseg.models.minkunet import build_minkunet
        from rayseg.train.launch import load_run_checkpoint
        from rayseg.train.stages import stage_config

        cfg, _, state = load_run_checkpoint(run_dir)
        num_classes = len(state["class_names"])
        self.is_seg = list(state["stages"]) == ["seg"]
        # Infer mode on 3D alone: no views, no regions (a prediction needs neither).
        cfg = cfgmod.replace(stage_config(cfg, "seg" if self.is_seg else "cmg"),
                             **{"data.num_views": 0, "data.region_column": ""})
        if self.is_seg:
            net = build_minkunet(cfg.optim.seg_backbone, cfg.model.in_channels, num_classes, cfg.model.backend)
            weights = state["student"]
        else:  # the EMA teacher's 3D branch of the two-branch model
            net = build_minkunet(cfg.model.backbone_3d, cfg.model.in_channels, num_classes, cfg.model.backend)
            weights = {k.removeprefix("net3d."): v for k, v in state["teacher"].items() if k.startswith("net3d.")}
        net.load_state_dict(weights)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.to(self.device).eval()
        self.cfg = cfg
        self.num_classes = num_classes
        self.what = "segmentation network" if self.is_seg else "EMA teacher (3D)"

    def __call__(self, shard: Path) -> np.ndarray:
        import torch

        from rayseg.data import pipeline
        from rayseg.train.device import to_device

        p = pipeline.plan(shard.parent.parent, shard.parent.name, self.cfg, "infer")
        sample = pipeline.read_sample(shard, p, self.cfg, 0, self.cfg.seed)
        b = to_device(pipeline.collate([sample]), self.device)
        with torch.no_grad():
            _, logits = self.net(b["coord"], b["feat"])
        return logits[b["inverse"]].argmax(1).to(torch.uint8).cpu().numpy()


def scene_label_sets(source: Source, shard: Path, what: tuple[str, ...],
                     predictor: Predictor | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """({scene_id, split, coord}, {label set: (N,) uint8 labels}) for one shard."""
    from rayseg.data import shards
    from rayseg.data.pseudo_store import META_FILE, pseudo_path, read_pseudo

    columns = ["coord"] + (["label"] if "gt" in what else [])
    try:
        scene = shards.read_scene(shard, columns)
    except shards.ShardError as exc:
        if "gt" in what and "'label'" in str(exc):
            raise ExportError(f"scene {shard.stem}: --what gt: the shard has no label column "
                              f"(unlabelled split?): {shard}") from None
        raise
    sid, n = scene["scene_id"], scene["coord"].shape[0]
    out: dict[str, np.ndarray] = {}
    for w in what:
        if w == "gt":
            out[w] = scene["label"].astype(np.uint8)
        elif w == "pseudo":
            path = pseudo_path(source.pseudo_dir, scene["split"], sid)
            if not path.is_file():
                meta = source.pseudo_dir / META_FILE
                covered = json.loads(meta.read_text()).get("split") if meta.is_file() else None
                raise ExportError(f"scene {sid} (split {scene['split']}): no pseudo-labels {path}"
                                  + (f"; {source.pseudo_dir} covers split {covered!r}" if covered else ""))
            try:
                out[w] = read_pseudo(path, sid, n)
            except ValueError as exc:
                raise ExportError(f"scene {sid}: {exc}") from None
        elif w == "pred":
            out[w] = predictor(shard)
    meta = {"scene_id": sid, "split": scene["split"], "coord": scene["coord"]}
    return meta, out


# --------------------------------------------------------------------------------------------
# PLY
# --------------------------------------------------------------------------------------------


def write_labelled_ply(path: str | Path, coord: np.ndarray, labels: np.ndarray, colors: np.ndarray,
                       what: str = "labels") -> Path:
    """Binary PLY: vertex x y z (float), red green blue (uchar), label (uchar). Atomic."""
    from rayseg.data.ply import write_ply

    coord = np.asarray(coord, np.float32)
    labels = np.asarray(labels)
    if coord.ndim != 2 or coord.shape[1] != 3 or labels.shape != (coord.shape[0],):
        raise ExportError(f"{what}: {labels.shape} labels for coordinates of shape {coord.shape}")
    rgb = colorize(labels, colors, what)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return (write_ply(path, {"x": coord[:, 0], "y": coord[:, 1], "z": coord[:, 2],
                                      "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2],
                                      "label": labels.astype(np.uint8)}))


def export_ply(source: Source, what: tuple[str, ...], out: str | Path, log=print) -> list[Path]:
    """One PLY per scene and label set: OUT/<scene_id>-<what>.ply. Returns the paths."""
    colors = palette(source.class_names)
    predictor = Predictor(source.run_dir) if "pred" in what else None
    out = Path(out)
    written = []
    for shard in source.paths:
        meta, sets = scene_label_sets(source, shard, what, predictor)
        for w, labels in sets.items():
            path = write_labelled_ply(out / f"{meta['scene_id']}-{w}.ply", meta["coord"], labels, colors,
                                      f"scene {meta['scene_id']} {w}")
            written.append(path)
            log(f"[rayseg] {path}  ({len(labels)} points, {TITLES[w]})")
    return written


# --------------------------------------------------------------------------------------------
# PNG renders
# --------------------------------------------------------------------------------------------


def _views(coord: np.ndarray, azimuth_deg: float, elevation_deg: float,
           near_wall_band: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, screen xy (N, 2), indices to draw far -> near) of the top-down and the oblique view
    (orthographic; later points are drawn over earlier ones). The oblique view leaves out the
    points within `near_wall_band` metres of the two bounding-box sides that face the camera
    (a dollhouse cut: scenes are axis-aligned, so those are the near walls)."""
    top = ("top-down", coord[:, :2], np.argsort(coord[:, 2], kind="stable"))
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    x = coord[:, 0] * np.cos(a) - coord[:, 1] * np.sin(a)
    y = coord[:, 0] * np.sin(a) + coord[:, 1] * np.cos(a)
    z = coord[:, 2]
    # Camera in front (-y after the azimuth turn) and above, looking down by the elevation angle.
    screen = np.stack([x, y * np.sin(e) + z * np.cos(e)], axis=1)
    depth = y * np.cos(e) - z * np.sin(e)
    toward_camera = np.array([-np.sin(a), -np.cos(a)])  # world x/y direction of the camera
    keep = np.ones(len(coord), bool)
    if near_wall_band > 0:
        for axis in (0, 1):
            if toward_camera[axis] > 0:
                keep &= coord[:, axis] < coord[:, axis].max() - near_wall_band
            elif toward_camera[axis] < 0:
                keep &= coord[:, axis] > coord[:, axis].min() + near_wall_band
    idx = np.flatnonzero(keep)
    oblique = ("oblique", screen, idx[np.argsort(-depth[idx], kind="stable")])
    return [top, oblique]


def render_comparison(coord: np.ndarray, label_sets: dict[str, np.ndarray], class_names, out: str | Path,
                      title: str = "", max_points: int = 60_000, ceiling_cut: float = 0.15,
                      near_wall_band: float = 0.25, azimuth_deg: float = 35.0, elevation_deg: float = 40.0,
                      panel_inches: float = 4.0) -> Path:
    """PNG of one scene: rows = top-down and oblique view, columns = the label sets (e.g.
    {"gt": ..., "pseudo": ..., "pred": ...}), one colour per class, a legend of the classes shown.

    The top `ceiling_cut` fraction of the scene's height is left out so the view from above sees
    the room's interior, and the oblique view also leaves out the near walls (`near_wall_band`
    metres); at most `max_points` points are drawn (the same points in every panel).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    coord = np.asarray(coord, np.float64)
    if coord.ndim != 2 or coord.shape[1] != 3 or not len(coord):
        raise ExportError(f"render: coordinates must be a non-empty (N, 3) array, got shape {coord.shape}")
    if not label_sets:
        raise ExportError("render: no label sets to draw")
    for name, labels in label_sets.items():
        if np.shape(labels) != (len(coord),):
            raise ExportError(f"render: label set {name!r} has shape {np.shape(labels)}, expected ({len(coord)},)")
    colors = palette(class_names)
    rgb = {name: colorize(labels, colors, f"render {name}") for name, labels in label_sets.items()}

    keep = np.arange(len(coord))
    if ceiling_cut > 0:
        zmin, zmax = coord[:, 2].min(), coord[:, 2].max()
        keep = keep[coord[:, 2] <= zmax - ceiling_cut * (zmax - zmin)]
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(0).choice(keep, max_points, replace=False))
    pts = coord[keep]
    views = _views(pts, azimuth_deg, elevation_deg, near_wall_band)

    shown = sorted({int(v) for labels in label_sets.values() for v in np.unique(np.asarray(labels)[keep])})
    handles = [Patch(color=colors[v] / 255.0 if v != IGNORE_LABEL else (0, 0, 0),
                     label=class_names[v] if v != IGNORE_LABEL else "ignore") for v in shown]
    cols = len(label_sets)
    legend_cols = max(1, int(cols * panel_inches / 1.4))
    legend_inches = 0.25 * -(-len(handles) // legend_cols) + 0.2
    height = panel_inches * 2 + 0.6 + legend_inches
    fig = Figure(figsize=(panel_inches * cols, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    size = float(np.clip(40000.0 / max(len(pts), 1), 0.5, 8.0))  # marker area: dense clouds, small dots
    for r, (view, xy, order) in enumerate(views):
        for c, name in enumerate(label_sets):
            ax = axes[r][c]
            ax.scatter(xy[order, 0], xy[order, 1], c=rgb[name][keep][order] / 255.0, s=size, marker="s",
                       linewidths=0, rasterized=True)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(TITLES.get(name, name))
            if c == 0:
                ax.set_ylabel(view)
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic.write_bytes(Path(out), buf.getvalue())


def render_source(source: Source, what: tuple[str, ...], out: str | Path, log=print) -> list[Path]:
    """One comparison PNG per scene: OUT/<scene_id>-compare.png. Returns the paths."""
    predictor = Predictor(source.run_dir) if "pred" in what else None
    written = []
    for shard in source.paths:
        meta, sets = scene_label_sets(source, shard, what, predictor)
        title = f"{meta['scene_id']} ({meta['split']})"
        if source.run_dir is not None:
            title += f" - {source.run_dir.name}"
        path = render_comparison(meta["coord"], sets, source.class_names, Path(out) / f"{meta['scene_id']}-compare.png",
                                 title=title)
        written.append(path)
        log(f"[rayseg] {path}")
    return written


def render_run_scenes(run_dir: str | Path, out: str | Path, num_scenes: int = 3, split: str | None = None,
                      what: tuple[str, ...] = LABEL_SETS, pseudo_labels: str | Path | None = None) -> list[Path]:
    """Comparison PNGs of the first `num_scenes` scenes of a run (for reports / MLflow:
    ``for p in render_run_scenes(run, tmp): tracker.log_file(p, "renders")``)."""
    source = resolve_source(run_dir, tuple(what), num_scenes=num_scenes, split=split, pseudo_labels=pseudo_labels)
    return render_source(source, tuple(what), out, log=lambda _: None)


# --------------------------------------------------------------------------------------------
# CLI entry points
# --------------------------------------------------------------------------------------------


def parse_what(text: str) -> tuple[str, ...]:
    what = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    bad = [w for w in what if w not in LABEL_SETS]
    if bad or not what:
        raise ExportError(f"--what {text!r}: choose a comma-separated subset of {','.join(LABEL_SETS)}")
    return what


def default_out(source: Source) -> Path:
    return source.run_dir / "export" if source.run_dir is not None else Path("export")


def run_export(target, what: str, out=None, fmt: str = "ply", scene_ids=(), num_scenes: int = 1,
               split=None, pseudo_labels=None) -> list[Path]:
    """`rayseg export`: PLY files + the printed legend."""
    if fmt != "ply":
        raise ExportError(f"--format {fmt!r}: only 'ply' is supported (use `rayseg render` for PNG pictures)")
    sets = parse_what(what)
    source = resolve_source(target, sets, list(scene_ids), num_scenes, split, pseudo_labels)
    paths = export_ply(source, sets, out or default_out(source))
    legend = format_legend(source.class_names, palette(source.class_names))
    print(f"legend ({len(source.class_names)} classes):\n{legend}")
    return paths


def run_render(target, what: str, out=None, scene_ids=(), num_scenes: int = 1, split=None,
               pseudo_labels=None) -> list[Path]:
    """`rayseg render`: comparison PNGs (top-down + oblique, label sets side by side)."""
    sets = parse_what(what)
    source = resolve_source(target, sets, list(scene_ids), num_scenes, split, pseudo_labels)
    return render_source(source, sets, out or default_out(source))
