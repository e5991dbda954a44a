"""ScanNet v2 -> rayseg scene records (one Ray task per scene through rayseg.data.prepare).

Inputs per scene directory ``<raw>/<scene>/`` as ScanNet ships them:

- ``<scene>_vh_clean_2.ply``: binary PLY mesh, vertices ``x y z`` float + ``red green blue alpha``
  uchar, faces ``list uchar int vertex_indices``. Points = mesh vertices; colours = vertex colours;
  normals = area-weighted vertex normals of the faces (sum of the unnormalised face normals of the
  triangles around a vertex, whose length is twice the triangle area), zeros for vertices without
  faces.
- ``<scene>_vh_clean_2.labels.ply``: the same vertices with a ``label`` ushort (nyu40 id). The 20
  nyu40 ids of ScanNet's benchmark (1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39, see
  METHOD.md) map to 0..19 in that order, everything else to IGNORE_LABEL. Tags = the classes
  present. Test scenes ship no labels: every point is IGNORE_LABEL and ``tags`` is all zeros with
  ``tags_known = 0`` stored in the record (the tags are unknown, not "no class present"; training
  never reads test scenes).
- ``<scene>.aggregation.json`` + ``<scene>_vh_clean_2.0.010000.segs.json`` (optional): instance
  ids (segGroups[*].objectId over the over-segmentation's segIndices); without them instance = -1.
- ``<scene>.txt``: ``axisAlignment = m00 m01 ... m33`` (16 numbers, row-major 4x4 mapping raw scan
  coordinates to axis-aligned ones). Missing (test scenes) -> identity.
- views from ``<scene>.sens`` (read directly, see rayseg/data/sens.py), or from already exported
  frames as ScanNet's reader (SensReader/python/reader.py) writes them INTO the scene folder:
  ``color/<i>.jpg``, ``depth/<i>.png`` (uint16 millimetres, at the depth sensor's size),
  ``pose/<i>.txt`` (4x4 camera-to-world) and ``intrinsic/intrinsic_depth.txt`` (4x4). The
  intrinsics file does not say which image size it describes: it is the depth PNGs' own size
  (the reader exports depth unresized), checked against the principal point, which ScanNet puts
  within a few pixels of the image centre; depth exported resized is refused by name.

Views: frames 0, k, 2k, ... (k = frame_skip; for exported frames, the files whose index is a
multiple of k). Frames whose pose has a non-finite entry (ScanNet marks tracking failures with
-inf) are dropped and counted (``frames_dropped`` in the record; ``frames_total`` = frames
considered). Depth is resized to the target size by nearest neighbour (no mixing across depth
edges); the intrinsics are the DEPTH intrinsics rescaled to the target size with the pixel-centre
convention of rayseg.data.linking (pixel x covers [x-0.5, x+0.5)): f' = f*s, c' = (c+0.5)*s - 0.5.

Colour/depth registration: ScanNet's colour (1296x968) and depth (640x480) frames are already
registered; the maintainers state that no extrinsic should be applied and that both can simply be
resampled to the same resolution (github.com/ScanNet/ScanNet issues #2 and #92; the colour and
depth intrinsics agree up to scale). So the colour image is resized over the full frame (Pillow,
antialiased bilinear) to the target size and shares the rescaled depth intrinsics; the .sens
extrinsics are not applied.

Coordinates: axis-aligned by default (points AND camera poses are multiplied by the alignment, so
views stay linked); ``axis_align=False`` keeps raw scan coordinates. Either way the scene record
stores ``axis_alignment`` (4x4) and the manifest metadata says which frame the points are in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rayseg.data.ply import read_ply
from rayseg.data.scene import IGNORE_LABEL, SCANNET20
from rayseg.data.sens import decode_color, decode_depth, read_sens, read_sens_header

SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SPLITS = ("train", "val", "test")
# Bumped when the same raw files give other scene records (2: exported frames' intrinsics are
# scaled from the depth images' own size instead of a size guessed from the principal point).
READER_VERSION = 2


def nyu40_to_scannet20(nyu40: np.ndarray) -> np.ndarray:
    """nyu40 ids -> ScanNet-20 class indices (uint8), IGNORE_LABEL for every other id."""
    table = np.full(65536, IGNORE_LABEL, dtype=np.uint8)
    table[list(SCANNET20_NYU40_IDS)] = np.arange(len(SCANNET20_NYU40_IDS), dtype=np.uint8)
    return table[np.asarray(nyu40).astype(np.int64).clip(0, 65535)]


@dataclass(kw_only=True)
class ScanNetOptions:
    """How ScanNet scenes become scene records."""

    frame_skip: int = 20
    """Keep every frame_skip-th RGB-D frame (0, k, 2k, ...)."""
    image_width: int = 320
    """Width the views are resized to."""
    image_height: int = 240
    """Height the views are resized to."""
    axis_align: bool = True
    """Apply the scene's axisAlignment to points and poses (False: raw scan coordinates)."""

    def __post_init__(self) -> None:
        if self.frame_skip < 1:
            raise ValueError(f"frame_skip: must be >= 1, got {self.frame_skip}")
        if self.image_width < 8 or self.image_height < 8:
            raise ValueError(f"image size: must be >= 8x8, got {self.image_width}x{self.image_height}")


# --------------------------------------------------------------------------------------------
# View resizing (also used by rayseg/data/s3dis.py)
# --------------------------------------------------------------------------------------------


def parse_image_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240) = (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"image size {text!r}: expected WIDTHxHEIGHT, e.g. 320x240")
    return int(m.group(1)), int(m.group(2))


def scale_intrinsics(K: np.ndarray, src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> np.ndarray:
    """K at src (w, h) -> K at dst (w, h), pixel centres at integer coordinates."""
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    K = np.asarray(K, dtype=np.float64)[:3, :3]
    out = np.array([[K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] + 0.5) * sx - 0.5],
                    [0.0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5],
                    [0.0, 0.0, 1.0]])
    return out.astype(np.float32)


def resize_depth_nearest(depth: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: target pixel i samples source pixel floor((i + 0.5) / s)."""
    h, w = depth.shape
    dw, dh = dst_wh
    ys = np.minimum(((np.arange(dh) + 0.5) * h / dh).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(dw) + 0.5) * w / dw).astype(np.int64), w - 1)
    return depth[ys[:, None], xs[None, :]]


def resize_rgb(rgb: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """Full-frame antialiased bilinear resize of an (H, W, 3) uint8 image."""
    if rgb.shape[1] == dst_wh[0] and rgb.shape[0] == dst_wh[1]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(dst_wh, Image.BILINEAR))


def views_to_arrays(views: list[dict], image_wh: tuple[int, int]) -> dict:
    """Stack per-view dicts (rgb, depth metres, pose, K, frame) into the scene's view_* keys."""
    w, h = image_wh
    if not views:
        return {"view_rgb": np.zeros((0, h, w, 3), np.uint8), "view_depth": np.zeros((0, h, w), np.float32),
                "view_pose": np.zeros((0, 4, 4), np.float32), "view_intrinsics": np.zeros((0, 3, 3), np.float32),
                "view_frame": np.zeros(0, np.int32)}
    return {"view_rgb": np.stack([v["rgb"] for v in views]).astype(np.uint8),
            "view_depth": np.stack([v["depth"] for v in views]).astype(np.float32),
            "view_pose": np.stack([v["pose"] for v in views]).astype(np.float32),
            "view_intrinsics": np.stack([v["K"] for v in views]).astype(np.float32),
            "view_frame": np.array([v["frame"] for v in views], dtype=np.int32)}


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals from triangle faces; zeros where no face touches."""
    v = vertices.astype(np.float64)
    normals = np.zeros_like(v)
    if faces is None or len(faces) == 0:
        return normals.astype(np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] < 3:
        raise ValueError(f"faces must have shape (M, >=3), got {faces.shape}")
    if faces.min() < 0 or faces.max() >= len(v):
        raise ValueError(f"face indices out of range [0, {len(v)}): {faces.min()}..{faces.max()}")
    # Polygons are fanned into triangles (ScanNet's meshes are all triangles).
    for k in range(1, faces.shape[1] - 1):
        a, b, c = faces[:, 0], faces[:, k], faces[:, k + 1]
        fn = np.cross(v[b] - v[a], v[c] - v[a])  # length = 2 * area: area weighting for free
        for idx in (a, b, c):
            np.add.at(normals, idx, fn)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    ok = length[:, 0] > 1e-12
    normals[ok] /= length[ok]
    normals[~ok] = 0.0
    return normals.astype(np.float32)


def read_axis_alignment(path: Path) -> np.ndarray | None:
    """The 4x4 axisAlignment of a ScanNet <scene>.txt, or None if the file/line is absent."""
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "axisAlignment":
            try:
                numbers = [float(x) for x in value.split()]
            except ValueError:
                raise ValueError(f"{path}: axisAlignment has a non-number: {value.strip()!r}") from None
            if len(numbers) != 16:
                raise ValueError(f"{path}: axisAlignment has {len(numbers)} numbers, expected 16")
            m = np.array(numbers, dtype=np.float64).reshape(4, 4)
            if not np.isfinite(m).all():
                raise ValueError(f"{path}: axisAlignment has non-finite entries")
            return m
    return None


def transform_points(m: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    return (xyz.astype(np.float64) @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


def read_instances(scene_dir: Path, scene_id: str, num_points: int) -> np.ndarray:
    """Instance id per vertex from the aggregation + over-segmentation files, -1 if absent."""
    agg = scene_dir / f"{scene_id}.aggregation.json"
    segs = scene_dir / f"{scene_id}_vh_clean_2.0.010000.segs.json"
    instance = np.full(num_points, -1, dtype=np.int32)
    if not (agg.is_file() and segs.is_file()):
        return instance
    try:
        seg_indices = np.asarray(json.loads(segs.read_text())["segIndices"], dtype=np.int64)
        groups = json.loads(agg.read_text())["segGroups"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{agg.name}/{segs.name}: malformed instance files: {exc}") from None
    if len(seg_indices) != num_points:
        raise ValueError(f"{segs}: {len(seg_indices)} segIndices for {num_points} mesh vertices")
    seg_to_obj: dict[int, int] = {}
    for group in groups:
        obj = int(group.get("objectId", group.get("id")))
        for seg in group["segments"]:
            seg_to_obj.setdefault(int(seg), obj)
    if seg_to_obj:
        keys = np.array(list(seg_to_obj), dtype=np.int64)
        vals = np.array(list(seg_to_obj.values()), dtype=np.int32)
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        pos = np.clip(np.searchsorted(keys, seg_indices), 0, len(keys) - 1)
        hit = keys[pos] == seg_indices
        instance[hit] = vals[pos[hit]]
    return instance


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def _read_matrix_txt(path: Path, shape=(4, 4)) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a matrix: {exc}") from None
    if m.size != shape[0] * shape[1]:
        raise ValueError(f"{path}: expected {shape[0]}x{shape[1]} numbers, got {m.size}")
    return m.reshape(shape)


def _frames_from_sens(sens_path: Path, opts: ScanNetOptions) -> tuple[list[dict], int, int]:
    header = read_sens_header(sens_path)
    wanted = range(0, header.num_frames, opts.frame_skip)
    header, frames = read_sens(sens_path, wanted)
    target = (opts.image_width, opts.image_height)
    K = scale_intrinsics(header.intrinsic_depth, (header.depth_width, header.depth_height), target)
    views, dropped = [], 0
    for fr in frames:
        if not np.isfinite(fr.camera_to_world).all():
            dropped += 1
            continue
        depth = decode_depth(header, fr, sens_path).astype(np.float32) / header.depth_shift
        rgb = decode_color(header, fr, sens_path)
        views.append({"rgb": resize_rgb(rgb, target), "depth": resize_depth_nearest(depth, target),
                      "pose": fr.camera_to_world.astype(np.float64), "K": K, "frame": fr.index})
    return views, len(frames), dropped


EXPORT_INTRINSICS = "intrinsic/intrinsic_depth.txt"


def check_principal_point(K: np.ndarray, wh: tuple[int, int], what: str) -> None:
    """Refuse intrinsics whose principal point is not near the centre of a ``wh`` image.

    ScanNet's principal points sit within a few pixels of the centre of the image they describe
    (e.g. 318.9, 242.7 for 640x480 depth). One far from it means the intrinsics describe another
    size than these images: depth exported resized, or the colour intrinsics next to depth frames."""
    w, h = wh
    cx, cy = float(K[0, 2]), float(K[1, 2])
    if abs(cx - (w - 1) / 2) > w / 8 or abs(cy - (h - 1) / 2) > h / 8:
        raise ValueError(f"{what}: principal point ({cx:.1f}, {cy:.1f}) is not near the centre of the "
                         f"{w}x{h} depth images ({(w - 1) / 2:.1f}, {(h - 1) / 2:.1f}): the intrinsics "
                         f"describe images of another size (depth exported resized?). Export the depth "
                         f"frames at the sensor's size, as ScanNet's reader does by default.")


def _frames_from_exported(scene_dir: Path, opts: ScanNetOptions) -> tuple[list[dict], int, int]:
    """Frames exported by ScanNet's reader (SensReader/python/reader.py) into the scene folder.

    Its intrinsics files hold the sensor's intrinsics but not the image size they belong to; the
    depth images it writes are at the depth sensor's size, so each depth PNG's own size is that
    size (checked against the principal point, which must sit near the image centre)."""
    color_dir, depth_dir, pose_dir = scene_dir / "color", scene_dir / "depth", scene_dir / "pose"
    intr = scene_dir / EXPORT_INTRINSICS
    if not intr.is_file():
        raise FileNotFoundError(f"{intr}: missing (exported frames need {EXPORT_INTRINSICS}, which "
                                "ScanNet's reader writes with --export_intrinsics)")
    K_native = _read_matrix_txt(intr)[:3, :3]
    if not (np.isfinite(K_native).all() and K_native[0, 0] > 0 and K_native[1, 1] > 0):
        raise ValueError(f"{intr}: not a camera matrix (needs finite entries and positive fx, fy): {K_native.tolist()}")
    target = (opts.image_width, opts.image_height)
    indices = sorted(int(p.stem) for p in pose_dir.glob("*.txt") if p.stem.isdigit())
    indices = [i for i in indices if i % opts.frame_skip == 0]
    views, dropped, checked = [], 0, set()
    for i in indices:
        pose = _read_matrix_txt(pose_dir / f"{i}.txt")
        if not np.isfinite(pose).all():
            dropped += 1
            continue
        color_path, depth_path = color_dir / f"{i}.jpg", depth_dir / f"{i}.png"
        for p in (color_path, depth_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing frame file (pose {i}.txt exists)")
        try:
            rgb = np.asarray(Image.open(color_path).convert("RGB"))
            depth_mm = np.asarray(Image.open(depth_path))
        except OSError as exc:
            raise ValueError(f"frame {i} of {scene_dir}: unreadable image: {exc}") from None
        if depth_mm.dtype not in (np.uint16, np.int32) or depth_mm.ndim != 2:
            raise ValueError(f"{depth_path}: expected a 16-bit single-channel PNG, got {depth_mm.dtype} {depth_mm.shape}")
        depth = depth_mm.astype(np.float32) / 1000.0
        depth_wh = (depth.shape[1], depth.shape[0])
        if depth_wh not in checked:
            check_principal_point(K_native, depth_wh, f"{intr} with {depth_path}")
            checked.add(depth_wh)
        K = scale_intrinsics(K_native, depth_wh, target)
        views.append({"rgb": resize_rgb(rgb, target), "depth": resize_depth_nearest(depth, target),
                      "pose": pose, "K": K, "frame": i})
    return views, len(indices), dropped


# --------------------------------------------------------------------------------------------
# One scene
# --------------------------------------------------------------------------------------------


def load_scene(scene_dir: str | Path, scene_id: str, split: str, opts: ScanNetOptions) -> dict:
    """Read one ScanNet scene directory into a scene record (rayseg/data/scene.py)."""
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise FileNotFoundError(f"scene {scene_id}: directory {scene_dir} not found")
    mesh_path = scene_dir / f"{scene_id}_vh_clean_2.ply"
    if not mesh_path.is_file():
        hint = (" (the folder holds exported frames but not the scan: export the frames into the "
                "ScanNet scene folder itself, next to the meshes)" if (scene_dir / "pose").is_dir() else "")
        raise FileNotFoundError(f"scene {scene_id}: {mesh_path} not found{hint}")
    mesh = read_ply(mesh_path)
    vert = mesh.get("vertex")
    if vert is None or not all(k in vert for k in ("x", "y", "z", "red", "green", "blue")):
        raise ValueError(f"{mesh_path}: needs vertex x y z red green blue")
    xyz = np.stack([vert["x"], vert["y"], vert["z"]], axis=1).astype(np.float32)
    if not np.isfinite(xyz).all():
        raise ValueError(f"{mesh_path}: non-finite vertex coordinates")
    color = np.stack([vert["red"], vert["green"], vert["blue"]], axis=1).astype(np.uint8)
    faces = mesh.get("face", {}).get("vertex_indices")
    if isinstance(faces, list):  # mixed polygon sizes: keep the triangles
        faces = np.array([f for f in faces if len(f) == 3], dtype=np.int64).reshape(-1, 3)
    try:
        normal = vertex_normals(xyz, faces)
    except ValueError as exc:
        raise ValueError(f"{mesh_path}: {exc}") from None
    n = len(xyz)

    labels_path = scene_dir / f"{scene_id}_vh_clean_2.labels.ply"
    num_classes = len(SCANNET20)
    if split == "test":
        label = np.full(n, IGNORE_LABEL, dtype=np.uint8)
        tags = np.zeros(num_classes, dtype=np.uint8)
        tags_known = 0
    else:
        lab = read_ply(labels_path).get("vertex", {})
        if "label" not in lab:
            raise ValueError(f"{labels_path}: no vertex 'label' property")
        if len(lab["label"]) != n:
            raise ValueError(f"{labels_path}: {len(lab['label'])} vertices, mesh has {n}")
        label = nyu40_to_scannet20(lab["label"])
        tags = np.zeros(num_classes, dtype=np.uint8)
        tags[np.unique(label[label != IGNORE_LABEL])] = 1
        tags_known = 1
    instance = read_instances(scene_dir, scene_id, n)

    align = read_axis_alignment(scene_dir / f"{scene_id}.txt")
    has_alignment = align is not None
    align = np.eye(4) if align is None else align

    sens_path = scene_dir / f"{scene_id}.sens"
    if sens_path.is_file():
        views, total, dropped = _frames_from_sens(sens_path, opts)
        source = "sens"
    elif (scene_dir / "pose").is_dir():
        views, total, dropped = _frames_from_exported(scene_dir, opts)
        source = "exported"
    else:
        raise FileNotFoundError(f"scene {scene_id}: no {sens_path.name} and no exported frames "
                                f"(pose/, color/, depth/) in {scene_dir}")
    if opts.axis_align:
        xyz = transform_points(align, xyz)
        normal = (normal.astype(np.float64) @ align[:3, :3].T).astype(np.float32)
        for v in views:
            v["pose"] = align @ v["pose"]
    scene = {
        "scene_id": scene_id, "split": split, "coord": xyz, "color": color, "normal": normal,
        "label": label, "instance": instance, "tags": tags,
        **views_to_arrays(views, (opts.image_width, opts.image_height)),
        "axis_alignment": align.astype(np.float32),
        # Per-scene facts as 1-element arrays (shards store arrays; 0-d ones come back 1-d).
        "axis_aligned": np.array([opts.axis_align], np.int32),
        "has_axis_alignment": np.array([has_alignment], np.int32),
        "tags_known": np.array([tags_known], np.int32),
        "frames_total": np.array([total], np.int32), "frames_dropped": np.array([dropped], np.int32),
        "frames_from_sens": np.array([source == "sens"], np.int32),
    }
    return scene


# --------------------------------------------------------------------------------------------
# The dataset: splits, tasks, the prepare entry point
# --------------------------------------------------------------------------------------------


def read_split_files(splits_dir: str | Path) -> dict[str, list[str]]:
    """{split: [scene ids]} from scannetv2_{train,val,test}.txt (a missing file = empty split)."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise FileNotFoundError(f"splits directory {splits_dir} not found")
    out = {}
    for split in SPLITS:
        path = splits_dir / f"scannetv2_{split}.txt"
        out[split] = [s.strip() for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []
    if not any(out.values()):
        raise FileNotFoundError(f"{splits_dir}: none of scannetv2_train.txt / _val.txt / _test.txt found")
    return out


@dataclass
class _LoadScanNet:
    """Picklable zero-argument callable for a SceneTask."""

    scene_dir: str
    scene_id: str
    split: str
    opts: ScanNetOptions

    def __call__(self) -> dict:
        return load_scene(self.scene_dir, self.scene_id, self.split, self.opts)


def plan_tasks(raw_dirs: list[str | Path], splits_dir: str | Path, opts: ScanNetOptions,
               max_scenes_per_split: int = 0) -> tuple[list, dict]:
    """SceneTasks for every scene of the split files found in one of the raw dirs, and notes.

    Splits none of whose scenes exist under the raw dirs are skipped (e.g. scans_test/ not
    downloaded) and named in the notes; a split with SOME scenes missing keeps the missing ones
    as tasks, which then fail by name in the summary."""
    from rayseg.data.prepare import SceneTask

    raw_dirs = [Path(r) for r in raw_dirs]
    for r in raw_dirs:
        if not r.is_dir():
            raise FileNotFoundError(f"raw ScanNet directory {r} not found")
    splits = read_split_files(splits_dir)
    tasks, notes = [], {"skipped_splits": []}
    for split, ids in splits.items():
        if max_scenes_per_split:
            ids = ids[:max_scenes_per_split]
        found = {sid: next((r / sid for r in raw_dirs if (r / sid).is_dir()), None) for sid in ids}
        if ids and not any(found.values()):
            notes["skipped_splits"].append(split)
            continue
        for sid in ids:
            scene_dir = found[sid] or (raw_dirs[0] / sid)
            tasks.append(SceneTask(sid, split, _LoadScanNet(str(scene_dir), sid, split, opts)))
    return tasks, notes


def layout_hint(raw_dirs: list[Path]) -> str:
    """Why --raw found no scene, when the folder's layout says so: it is the parent of scans/, one
    scene's folder, or an export of frames without the scans ('' when none of these)."""
    hints = []
    for r in raw_dirs:
        subs = [d for d in ("scans", "scans_test") if (r / d).is_dir()]
        if subs:
            hints.append(f"{r} holds {' and '.join(d + '/' for d in subs)}: "
                         f"pass --raw {' '.join(str(r / d) for d in subs)}")
        elif any((r / d).is_dir() for d in ("color", "depth", "pose", "intrinsic")) or \
                any(r.glob("*_vh_clean_2.ply")) or any(r.glob("*.sens")):
            hints.append(f"{r} is one scene's folder (or one scene's exported frames): pass the folder "
                         f"that holds the scene folders, e.g. --raw {r.parent}")
        else:
            names = sorted(d.name for d in r.iterdir() if d.is_dir())[:3] if r.is_dir() else []
            if names:
                hints.append(f"{r} holds folders such as {', '.join(names)}, none named after a scene of "
                             "the split files")
    layout = ("; expected --raw = folder(s) with one folder per scene, <raw>/<scene>/<scene>_vh_clean_2.ply "
              "+ <scene>.sens or exported frames (color/, depth/, pose/, intrinsic/) inside the scene folder")
    return (" (" + "; ".join(hints) + ")" if hints else "") + layout


def prepare_settings(opts: ScanNetOptions) -> dict:
    """What a prepared scene's content depends on: a folder prepared with other settings is
    refused by run_prepare instead of being topped up with scenes made another way."""
    return {"reader": "scannet", "reader_version": READER_VERSION, "frame_skip": opts.frame_skip,
            "image_size": [opts.image_width, opts.image_height], "axis_align": opts.axis_align}


def prepare_scannet(raw_dirs: list[str | Path], splits_dir: str | Path, out_root: str | Path,
                    opts: ScanNetOptions, max_scenes_per_split: int = 0):
    """Prepare ScanNet into rayseg shards; returns run_prepare's summary."""
    from rayseg.data.prepare import run_prepare

    tasks, notes = plan_tasks(raw_dirs, splits_dir, opts, max_scenes_per_split)
    if not tasks:
        raise FileNotFoundError(f"no ScanNet scenes of {splits_dir} found under {[str(r) for r in raw_dirs]}"
                                + layout_hint([Path(r) for r in raw_dirs]))
    for split in notes["skipped_splits"]:
        print(f"note: no scene of split '{split}' found under the raw dirs; split skipped")
    metadata = {
        "dataset": "scannet",
        "coordinates": "axis_aligned" if opts.axis_align else "raw",
        "alignment_note": "each scene stores axis_alignment (raw -> aligned, 4x4); poses are in "
                          "the same frame as the points",
        "frame_skip": opts.frame_skip,
        "image_size": [opts.image_width, opts.image_height],
        "intrinsics": "depth intrinsics rescaled to image_size; colour resized full-frame (registered)",
        "label_map": "nyu40 " + " ".join(map(str, SCANNET20_NYU40_IDS)) + " -> 0..19, else 255",
        "test_tags": "unknown (all zeros, tags_known = 0)",
        "skipped_splits": notes["skipped_splits"],
    }
    summary = run_prepare(out_root, tasks, "scannet20", metadata=metadata, settings=prepare_settings(opts))
    total, dropped = frame_counts(out_root, [t for t in tasks if t.scene_id not in summary.failed])
    print(f"frames: {total} considered (frame skip {opts.frame_skip}), {dropped} dropped for a "
          f"non-finite pose (per scene: frames_total / frames_dropped in the records)")
    return summary


def frame_counts(out_root: str | Path, tasks: list) -> tuple[int, int]:
    """Frames considered and dropped (non-finite pose), summed over the prepared scenes."""
    from rayseg.data import shards

    total = dropped = 0
    for t in tasks:
        rec = shards.read_scene(shards.scene_path(out_root, t.split, t.scene_id),
                                ["frames_total", "frames_dropped"])
        total += int(rec["frames_total"].sum())
        dropped += int(rec["frames_dropped"].sum())
    return total, dropped
