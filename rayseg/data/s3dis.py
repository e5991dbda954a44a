"""S3DIS rooms + 2D-3D-S views -> rayseg scene records (one Ray task per room).

Inputs
------
- S3DIS: ``<raw>/Area_N/<room>/Annotations/<class>_<k>.txt``, one ``x y z r g b`` line per point.
  The class is the file-name prefix (``stairs`` -> clutter, as the benchmark does), 13 classes
  (rayseg.data.scene.S3DIS13); instance = index of the annotation file in sorted order. Area 5
  is val (``val_area``), the other areas train. Known corrupt line: a stray byte in one ceiling
  file of Area 5 (hallway_6 in the Aligned_Version, office_19 in v1.2); the reader fails that room
  naming the file and the line.
- 2D-3D-S: ``<images>/area_N/data/{rgb,depth,pose}/camera_<uuid>_<room>_frame_<n>_domain_
  {rgb.png,depth.png,pose.json}``; area 5 comes as ``area_5a`` and ``area_5b``. Views are assigned
  to rooms by the ``<room>`` part of the name (e.g. ``office_1``). RGB 1080x1080; depth 16-bit PNG,
  metres = value / 512, 65535 = missing (stored as 0); pose JSON ``camera_k_matrix`` (3x3) and
  ``camera_rt_matrix`` (3x4 world->camera [R|t], OpenCV axes x right, y down, z forward; the
  camera centre satisfies R c + t = 0). 2D-3D-S intrinsics put pixel centres at +0.5
  (cx = 540 at 1080 px); rayseg's convention (rayseg.data.linking) puts them at integers, so
  0.5 is subtracted from the principal point before rescaling.

Coordinate frames (what was found, and where)
---------------------------------------------
1. The 2D-3D-S camera poses and the S3DIS v1.2 point clouds (``Stanford3dDataset_v1.2``, NOT the
   Aligned_Version) share one frame per area, z up (DeepViewAgg's and Pointcept's S3DIS+2D-3D-S
   loaders project v1.2 rooms with the poses directly: github.com/drprojects/DeepViewAgg
   ``datasets/segmentation/multimodal/s3dis.py``, github.com/Pointcept/Pointcept
   ``datasets/preprocessing/s3dis/preprocess_s3dis.py``; 2D-3D-S issue #12 (ir0): the aligned
   version "is not the globally registered one").
2. Area 5 is scanned as 2D-3D-S ``area_5a`` and ``area_5b``; the area_5b poses are in another
   frame. Both projects apply the same fixed correction, camera-to-world'
   = T @ camera-to-world with T = [[0, 1, 0, -4.09703582], [-1, 0, 0, 6.22617759], [0, 0, 1, 0]]
   (a -90 deg z-rotation and a shift; DeepViewAgg rounds it to -4.10, 6.25). 2D-3D-S issue #11
   reports the area_5b cameras outside the building without it.
3. ``Stanford3dDataset_v1.2_Aligned_Version`` rotates every room about z by its per-room
   ``AlignmentAngle`` (the canonical frame of Armeni et al. CVPR 2016, Sec. 3.2; 2D-3D-S README:
   ``Disjoint_Space.AlignmentAngle``). The angles ship only with the non-aligned v1.2 download as
   ``Area_N/Area_N_alignmentAngle.txt`` (``<room> <degrees>`` lines; Superpoint Transformer's
   README warns the aligned zip lacks them). Pointcept's "align_angle" maps a v1.2 room to the
   aligned frame as p' = Rz(-angle) (p - c) + c, c = the centre of the room's bounding box;
   for multiples of 90 deg the box centre is the same before and after, so c can be taken from
   either frame. That the Aligned_Version zip equals exactly this transform is an assumption
   (no source states it); ``rayseg check-links`` shows per room whether it holds.

Implementation: ``global_to_room(angle, centre)`` and ``AREA_5B_TO_AREA_5`` are the ONLY places
these transforms live; ``camera_to_world`` composes them for every pose. Rooms are written in the
room-aligned frame by default (walls along the axes, as the floor/wall removal augmentation
assumes) or in the area frame (``room_frame="global"``). Where the angle comes from:
``Area_N_alignmentAngle.txt`` under ``--raw`` or ``--angles``; otherwise (an Aligned_Version copy
without angle files) it is estimated per room by trying 0/90/180/270 deg and keeping the one whose
projected points agree best with the views in depth AND colour (depth alone cannot tell a
symmetric room from its 180 deg turn); stored as ``room_angle_source`` = 2 with the four scores. Every record stores ``room_transform`` (area frame -> stored frame, 4x4) and
``room_angle``.

Normals: S3DIS has none; they are estimated by PCA over the k nearest neighbours (k = 16) of
2 cm cell centroids and oriented towards the room's bounding-box centre (floors up, walls
inwards).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rayseg.data.linking import link_points
from rayseg.data.scannet import resize_depth_nearest, resize_rgb, scale_intrinsics, views_to_arrays
from rayseg.data.scene import S3DIS13

CLASS_INDEX = {name: i for i, name in enumerate(S3DIS13)}
CLASS_ALIASES = {"stairs": "clutter"}
AREAS = tuple(f"Area_{i}" for i in range(1, 7))
# 2D-3D-S area folders that hold each S3DIS area's images.
IMAGE_AREAS = {"Area_5": ("area_5a", "area_5b")}
AREA_5B_TO_AREA_5 = np.array([[0.0, 1.0, 0.0, -4.09703582],
                              [-1.0, 0.0, 0.0, 6.22617759],
                              [0.0, 0.0, 1.0, 0.0],
                              [0.0, 0.0, 0.0, 1.0]])
DEPTH_SCALE = 512.0        # 2D-3D-S depth PNG units per metre
DEPTH_MISSING = 65535
K_PIXEL_CENTRE = 0.5       # 2D-3D-S principal point offset vs. integer pixel centres
VIEW_NAME = re.compile(r"^camera_([0-9a-zA-Z]+)_(.+)_frame_(\d+)_domain_pose\.json$")
ANGLE_SOURCES = {"none": 0, "file": 1, "estimated": 2}


@dataclass(kw_only=True)
class S3DISOptions:
    """How S3DIS rooms and 2D-3D-S views become scene records."""

    val_area: int = 5
    """Area used as the val split (the others are train)."""
    image_width: int = 256
    """Width the views are resized to (2D-3D-S images are 1080x1080)."""
    image_height: int = 256
    """Height the views are resized to."""
    frame_skip: int = 1
    """Keep every frame_skip-th view of a room (views sorted by camera uuid, then frame)."""
    max_views: int = 0
    """At most this many views per room, evenly spaced after frame_skip (0 = all)."""
    room_frame: str = "aligned"
    """'aligned': rooms rotated to their canonical (axis-aligned) frame; 'global': 2D-3D-S area frame."""
    normal_knn: int = 16
    """Neighbours for PCA normals (0 = no normals, zeros)."""

    def __post_init__(self) -> None:
        if not 1 <= self.val_area <= 6:
            raise ValueError(f"val_area: must be 1..6, got {self.val_area}")
        if self.image_width < 8 or self.image_height < 8:
            raise ValueError(f"image size: must be >= 8x8, got {self.image_width}x{self.image_height}")
        if self.frame_skip < 1 or self.max_views < 0:
            raise ValueError("frame_skip must be >= 1 and max_views >= 0")
        if self.room_frame not in ("aligned", "global"):
            raise ValueError(f"room_frame: must be 'aligned' or 'global', got {self.room_frame!r}")
        if self.normal_knn != 0 and self.normal_knn < 3:
            raise ValueError(f"normal_knn: must be 0 or >= 3, got {self.normal_knn}")


# --------------------------------------------------------------------------------------------
# Frames: the one place the S3DIS / 2D-3D-S transforms live
# --------------------------------------------------------------------------------------------


def rot_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def global_to_room(angle_deg: float, centre: np.ndarray) -> np.ndarray:
    """4x4 map from the 2D-3D-S area frame to the room's aligned frame: Rz(-angle) about centre."""
    m = np.eye(4)
    r = rot_z(-angle_deg)
    m[:3, :3] = r
    m[:3, 3] = np.asarray(centre, dtype=np.float64) - r @ np.asarray(centre, dtype=np.float64)
    return m


def camera_to_world(rt: np.ndarray, image_area: str, area_to_room: np.ndarray) -> np.ndarray:
    """Camera-to-world (room frame) pose from a 2D-3D-S ``camera_rt_matrix`` (3x4 world->camera)."""
    w2c = np.eye(4)
    w2c[:3, :] = np.asarray(rt, dtype=np.float64).reshape(3, 4)
    c2w = np.linalg.inv(w2c)
    if image_area.lower() == "area_5b":
        c2w = AREA_5B_TO_AREA_5 @ c2w
    return area_to_room @ c2w


def read_alignment_angles(path: Path) -> dict[str, float]:
    """{room: degrees} from an Area_N_alignmentAngle.txt ('#' lines are comments)."""
    angles = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            angles[parts[0]] = float(parts[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{i}: expected '<room> <degrees>', got {line!r}") from None
    return angles


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def read_annotation_file(path: Path) -> np.ndarray:
    """(N, 6) float64 of one 'x y z r g b' text file; errors name the file and line."""
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                               parse_options=pacsv.ParseOptions(delimiter=" "),
                               convert_options=pacsv.ConvertOptions(column_types={f"f{i}": "float64" for i in range(6)}))
        if table.num_columns == 6:
            return np.stack([table.column(i).to_numpy() for i in range(6)], axis=1)
    except Exception:  # noqa: BLE001 - fall through to the slow reader for a precise message
        pass
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            parts = raw.split()
            if not parts:
                continue
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise ValueError(f"{path}:{i}: not a number in line {raw[:80]!r}") from None
            if len(values) != 6:
                raise ValueError(f"{path}:{i}: expected 6 values 'x y z r g b', got {len(values)}")
            rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def class_of_annotation(path: Path) -> int:
    name = path.stem.split("_")[0]
    name = CLASS_ALIASES.get(name, name)
    if name not in CLASS_INDEX:
        raise ValueError(f"{path}: unknown S3DIS class '{name}' (known: {', '.join(S3DIS13)}, stairs)")
    return CLASS_INDEX[name]


def read_room_points(room_dir: Path) -> dict:
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{room_dir / 'Annotations'}: no annotation files")
    coords, colors, labels, instances = [], [], [], []
    for k, path in enumerate(files):
        cls = class_of_annotation(path)
        table = read_annotation_file(path)
        if not np.isfinite(table).all():
            raise ValueError(f"{path}: non-finite values")
        coords.append(table[:, :3])
        colors.append(np.clip(table[:, 3:6], 0, 255))
        labels.append(np.full(len(table), cls, np.uint8))
        instances.append(np.full(len(table), k, np.int32))
    return {"coord": np.concatenate(coords), "color": np.concatenate(colors).round().astype(np.uint8),
            "label": np.concatenate(labels), "instance": np.concatenate(instances)}


def pca_normals(xyz: np.ndarray, k: int, towards: np.ndarray, voxel: float = 0.02,
                chunk: int = 200_000) -> np.ndarray:
    """Unit normals: the smallest-eigenvalue direction of the k-NN covariance, flipped to face
    ``towards``. Computed on the centroids of ``voxel``-sized cells (S3DIS rooms hold ~1M points
    a few mm apart; a 2 cm grid keeps the surface shape at a fraction of the k-NN cost) and given
    to every point of the cell."""
    from scipy.spatial import cKDTree

    if k == 0 or len(xyz) < 3:
        return np.zeros(xyz.shape, np.float32)
    ijk = np.floor((xyz - xyz.min(axis=0)) / voxel).astype(np.int64)
    if ijk.max() >= 1 << 21:
        raise ValueError(f"room spans more than {(1 << 21) * voxel:.0f} m: not a room")
    keys = (ijk[:, 0] << 42) | (ijk[:, 1] << 21) | ijk[:, 2]  # one int64 per cell: fast unique
    _, cell, counts = np.unique(keys, return_inverse=True, return_counts=True)
    centroids = np.zeros((len(counts), 3))
    for axis in range(3):
        centroids[:, axis] = np.bincount(cell, weights=xyz[:, axis], minlength=len(counts)) / counts
    k = min(k, len(centroids))
    _, nn = cKDTree(centroids).query(centroids, k=k)
    normal = np.zeros_like(centroids)
    for lo in range(0, len(centroids), chunk):  # bounded memory: (chunk, k, 3) at a time
        nbrs = centroids[nn[lo:lo + chunk]]
        centred = nbrs - nbrs.mean(axis=1, keepdims=True)
        _, vecs = np.linalg.eigh(centred.transpose(0, 2, 1) @ centred)  # ascending eigenvalues
        normal[lo:lo + chunk] = vecs[:, :, 0]
    flip = np.einsum("ni,ni->n", normal, towards[None, :] - centroids) < 0
    normal[flip] *= -1
    return normal[cell].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewFiles:
    image_area: str   # 2D-3D-S area folder name, e.g. area_5b
    uuid: str
    frame: int
    pose: str
    rgb: str
    depth: str


def index_views(images_root: Path, area: str) -> dict[str, list[ViewFiles]]:
    """{room: [ViewFiles]} of one S3DIS area, from its 2D-3D-S pose files."""
    out: dict[str, list[ViewFiles]] = {}
    for image_area in IMAGE_AREAS.get(area, (area.lower(),)):
        data = images_root / image_area / "data"
        pose_dir = data / "pose"
        if not pose_dir.is_dir():
            continue
        for p in sorted(pose_dir.iterdir()):
            m = VIEW_NAME.match(p.name)
            if not m:
                continue
            uuid, room, frame = m.group(1), m.group(2), int(m.group(3))
            stem = p.name[: -len("pose.json")]
            out.setdefault(room, []).append(ViewFiles(
                image_area, uuid, frame, str(p), str(data / "rgb" / f"{stem}rgb.png"),
                str(data / "depth" / f"{stem}depth.png")))
    for views in out.values():
        views.sort(key=lambda v: (v.image_area, v.uuid, v.frame))
    return out


def select_views(views: list[ViewFiles], opts: S3DISOptions) -> list[tuple[int, ViewFiles]]:
    """(position in the room's sorted view list, files), every frame_skip-th, at most max_views."""
    chosen = list(enumerate(views))[:: opts.frame_skip]
    if opts.max_views and len(chosen) > opts.max_views:
        keep = np.linspace(0, len(chosen) - 1, opts.max_views).round().astype(int)
        chosen = [chosen[i] for i in keep]
    return chosen


def read_view(vf: ViewFiles) -> dict:
    """Native-resolution view: rgb (H,W,3) u8, depth (H,W) metres, rt (3,4), K (3,3) integer-centre."""
    for path in (vf.pose, vf.rgb, vf.depth):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: missing view file (its pose/rgb/depth siblings exist)")
    try:
        pose = json.loads(Path(vf.pose).read_text())
        K = np.asarray(pose["camera_k_matrix"], dtype=np.float64).reshape(3, 3)
        rt = np.asarray(pose["camera_rt_matrix"], dtype=np.float64).reshape(3, 4)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{vf.pose}: bad pose JSON ({type(exc).__name__}: {exc})") from None
    if not (np.isfinite(K).all() and np.isfinite(rt).all()):
        raise ValueError(f"{vf.pose}: non-finite camera matrices")
    try:
        rgb = np.asarray(Image.open(vf.rgb).convert("RGB"))
        depth_raw = np.asarray(Image.open(vf.depth))
    except OSError as exc:
        raise ValueError(f"view {Path(vf.pose).name}: unreadable image: {exc}") from None
    if depth_raw.ndim != 2:
        raise ValueError(f"{vf.depth}: expected a single-channel 16-bit PNG, got shape {depth_raw.shape}")
    if depth_raw.shape != rgb.shape[:2]:
        raise ValueError(f"{vf.depth}: depth {depth_raw.shape} and rgb {rgb.shape[:2]} sizes differ")
    depth_raw = depth_raw.astype(np.int64)
    depth = np.where(depth_raw == DEPTH_MISSING, 0, depth_raw).astype(np.float32) / DEPTH_SCALE
    K = K.copy()
    K[0, 2] -= K_PIXEL_CENTRE
    K[1, 2] -= K_PIXEL_CENTRE
    return {"rgb": rgb, "depth": depth, "rt": rt, "K": K}


def _agreement(coord: np.ndarray, color: np.ndarray, views: list[dict], tol: float,
               max_color_diff: float = 40.0) -> float:
    """Alignment score: the fraction of in-frustum point projections (valid depth) whose depth
    agrees within tol AND whose colour is close to the pixel's. Colour breaks the ties of
    symmetric rooms that depth alone cannot (a box room rotated by 180 deg fits its walls)."""
    agree = frustum = 0
    for v in views:
        idx, pix = link_points(coord, v["depth"], v["pose"], v["K"], tol)
        diff = np.abs(color[idx].astype(np.int32) - v["rgb"].reshape(-1, 3)[pix].astype(np.int32)).mean(axis=1)
        agree += int((diff <= max_color_diff).sum())
        frustum += len(link_points(coord, v["depth"], v["pose"], v["K"], np.inf)[0])
    return agree / frustum if frustum else 0.0


def estimate_room_angle(coord_room: np.ndarray, color: np.ndarray, centre: np.ndarray,
                        views_area: list[dict], seed: int = 0) -> tuple[float, np.ndarray]:
    """For a room given in its aligned frame (angle unknown), the angle in {0, 90, 180, 270}
    whose area->room transform makes the points agree best with the views (depth and colour);
    and the four scores. ``views_area``: a few native views (rgb, depth, K, pose in the area
    frame); 20k sampled points are scored."""
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(coord_room), min(len(coord_room), 20000), replace=False)
    scores = []
    for angle in (0.0, 90.0, 180.0, 270.0):
        to_room = global_to_room(angle, centre)
        posed = [{**v, "pose": to_room @ v["pose"]} for v in views_area]
        scores.append(_agreement(coord_room[keep], color[keep], posed, tol=0.1))
    scores = np.array(scores)
    return float(90.0 * np.argmax(scores)), scores


# --------------------------------------------------------------------------------------------
# One room
# --------------------------------------------------------------------------------------------


@dataclass
class RoomTask:
    """Everything one Ray task needs to build a room's scene record (picklable)."""

    room_dir: str
    scene_id: str
    split: str
    points_frame: str                 # 'global' (v1.2) or 'aligned' (Aligned_Version)
    angle: float | None               # from an angle file, None = unknown
    views: list[ViewFiles] = field(default_factory=list)
    opts: S3DISOptions = field(default_factory=S3DISOptions)
    problem: str = ""                 # found while planning; fails this room only

    def __call__(self) -> dict:
        return load_room(self)


def _native_view(vf: ViewFiles) -> dict:
    """A view at its native size with its camera-to-world pose in the S3DIS area frame."""
    v = read_view(vf)
    v["pose"] = camera_to_world(v["rt"], vf.image_area, np.eye(4))
    return v


def load_room(task: RoomTask) -> dict:
    if task.problem:
        raise ValueError(f"room {task.scene_id}: {task.problem}")
    opts = task.opts
    room_dir = Path(task.room_dir)
    pts = read_room_points(room_dir)
    coord = pts["coord"]
    centre = (coord.min(axis=0) + coord.max(axis=0)) / 2
    target = (opts.image_width, opts.image_height)

    chosen = select_views(task.views, opts)
    angle, source, scores = task.angle, "file", np.full(4, np.nan)
    if angle is None:
        if task.points_frame == "global" or not chosen:
            angle, source = 0.0, "none"
        else:
            probe = [_native_view(vf) for _, vf in chosen[:: max(1, len(chosen) // 8)][:8]]
            angle, scores = estimate_room_angle(coord, pts["color"], centre, probe)
            source = "estimated"
    if task.points_frame == "aligned" and angle % 90 != 0:
        raise ValueError(f"room {task.scene_id}: alignment angle {angle} is not a multiple of 90 deg; "
                         "the box centre of an aligned room then does not give the rotation centre")
    area_to_aligned = global_to_room(angle, centre)
    area_to_out = area_to_aligned if opts.room_frame == "aligned" else np.eye(4)
    # Points: bring them to the area frame first if they came aligned, then to the output frame.
    points_to_out = area_to_out if task.points_frame == "global" else area_to_out @ np.linalg.inv(area_to_aligned)
    coord_out = (coord @ points_to_out[:3, :3].T + points_to_out[:3, 3]).astype(np.float32)
    out_centre = (coord_out.min(axis=0) + coord_out.max(axis=0)) / 2
    normal = pca_normals(coord_out.astype(np.float64), opts.normal_knn, out_centre)

    out_views = []
    for position, vf in chosen:  # one native view at a time: a 1080x1080 RGB-D view is ~8 MB
        v = _native_view(vf)
        h, w = v["depth"].shape
        out_views.append({"rgb": resize_rgb(v["rgb"], target), "depth": resize_depth_nearest(v["depth"], target),
                          "pose": area_to_out @ v["pose"], "K": scale_intrinsics(v["K"], (w, h), target),
                          "frame": position})
    tags = np.zeros(len(S3DIS13), np.uint8)
    tags[np.unique(pts["label"])] = 1
    return {
        "scene_id": task.scene_id, "split": task.split, "coord": coord_out, "color": pts["color"],
        "normal": normal, "label": pts["label"], "instance": pts["instance"], "tags": tags,
        **views_to_arrays(out_views, target),
        # Per-room facts as arrays (1-element for scalars: shards store arrays).
        "room_transform": area_to_out.astype(np.float32), "room_angle": np.array([angle], np.float32),
        "room_angle_source": np.array([ANGLE_SOURCES[source]], np.int32),
        "room_angle_scores": scores.astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def _angle_files(roots: list[Path], area: str) -> dict[str, float] | None:
    for root in roots:
        path = root / area / f"{area}_alignmentAngle.txt"
        if path.is_file():
            return read_alignment_angles(path)
    return None


def plan_tasks(raw: str | Path, images: str | Path | None, opts: S3DISOptions,
               angles_root: str | Path | None = None, max_rooms_per_area: int = 0) -> tuple[list, dict]:
    """SceneTasks for every room under raw/Area_N, and notes for the manifest metadata."""
    from rayseg.data.prepare import SceneTask

    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"S3DIS directory {raw} not found")
    images_root = Path(images) if images is not None else None
    if images_root is not None and not images_root.is_dir():
        raise FileNotFoundError(f"2D-3D-S directory {images_root} not found")
    if angles_root is not None and not Path(angles_root).is_dir():
        raise FileNotFoundError(f"alignment angle directory {angles_root} not found")
    areas = [a for a in AREAS if (raw / a).is_dir()]
    if not areas:
        raise FileNotFoundError(f"{raw}: no Area_1..Area_6 folders (expected the S3DIS layout "
                                "Area_N/<room>/Annotations/*.txt)")
    tasks, notes = [], {"areas": areas, "points_frame": {}, "angle_file": {}, "rooms_without_views": []}
    for area in areas:
        # v1.2 (global frame) ships the angle files beside the rooms; the Aligned_Version does not.
        own = _angle_files([raw], area)
        points_frame = "global" if own is not None else "aligned"
        angles = own if own is not None else (_angle_files([Path(angles_root)], area) if angles_root else None)
        notes["points_frame"][area] = points_frame
        notes["angle_file"][area] = angles is not None
        views = index_views(images_root, area) if images_root is not None else {}
        rooms = sorted(p.name for p in (raw / area).iterdir() if (p / "Annotations").is_dir())
        if max_rooms_per_area:
            rooms = rooms[:max_rooms_per_area]
        split = "val" if area == f"Area_{opts.val_area}" else "train"
        for room in rooms:
            angle = None if angles is None else angles.get(room)
            problem = (f"no line for {room} in {area}_alignmentAngle.txt"
                       if angles is not None and angle is None else "")
            if not views.get(room):
                notes["rooms_without_views"].append(f"{area}/{room}")
            task = RoomTask(str(raw / area / room), f"{area}_{room}", split, points_frame, angle,
                            views.get(room, []), opts, problem)
            tasks.append(SceneTask(task.scene_id, split, task))
    return tasks, notes


def prepare_s3dis(raw: str | Path, images: str | Path | None, out_root: str | Path,
                  opts: S3DISOptions, angles_root: str | Path | None = None,
                  max_rooms_per_area: int = 0):
    """Prepare S3DIS (+ 2D-3D-S views) into rayseg shards; returns run_prepare's summary."""
    from rayseg.data.prepare import run_prepare

    tasks, notes = plan_tasks(raw, images, opts, angles_root, max_rooms_per_area)
    if notes["rooms_without_views"]:
        print(f"note: {len(notes['rooms_without_views'])} room(s) have no 2D-3D-S views "
              f"(kept 3D-only): {', '.join(notes['rooms_without_views'][:10])}")
    metadata = {
        "dataset": "s3dis",
        "coordinates": "room_aligned" if opts.room_frame == "aligned" else "area_global",
        "alignment_note": "each room stores room_transform (2D-3D-S area frame -> stored frame), "
                          "room_angle and room_angle_source (0 none, 1 angle file, 2 estimated "
                          "from the views' depth); poses are in the stored frame",
        "val_area": opts.val_area,
        "image_size": [opts.image_width, opts.image_height],
        "depth": "2D-3D-S PNG / 512 m, 65535 missing -> 0",
        **notes,
    }
    # What the records depend on: a folder prepared otherwise is refused, not topped up.
    settings = {"reader": "s3dis", **dataclasses.asdict(opts), "with_views": images is not None}
    return run_prepare(out_root, tasks, "s3dis13", metadata=metadata, settings=settings)
