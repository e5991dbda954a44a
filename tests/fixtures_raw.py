"""Miniature raw ScanNet / S3DIS / 2D-3D-S datasets written in the real file formats.

The truth is a synthetic scene record (rayseg.data.synthetic.generate_scene): its points, labels
and posed RGB-D views are known exactly, so what `prepare` reads back can be checked against it.
Each writer documents how the raw files relate to the truth (frames, alignments, label codes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial import Delaunay

from rayseg.data.ply import write_ply
from rayseg.data.s3dis import AREA_5B_TO_AREA_5, DEPTH_MISSING, DEPTH_SCALE, K_PIXEL_CENTRE
from rayseg.data.scannet import SCANNET20_NYU40_IDS
from rayseg.data.scene import IGNORE_LABEL, S3DIS13, SCANNET20
from rayseg.data.sens import write_sens

NYU40_OTHERPROP = 40  # a nyu40 id outside the benchmark's 20: must become IGNORE_LABEL


def transform(m: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    return xyz.astype(np.float64) @ m[:3, :3].T + m[:3, 3]


def z_rotation(degrees: float, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.deg2rad(degrees)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = translation
    return m


def floor_faces(coord: np.ndarray, label: np.ndarray, floor_class: int) -> np.ndarray:
    """Triangles over the floor points (Delaunay in xy), wound so their normals point +z."""
    idx = np.nonzero(label == floor_class)[0]
    tri = idx[Delaunay(coord[idx, :2]).simplices]
    a, b, c = coord[tri[:, 0]], coord[tri[:, 1]], coord[tri[:, 2]]
    down = np.cross(b - a, c - a)[:, 2] < 0
    tri[down] = tri[down][:, [0, 2, 1]]
    return tri


# --------------------------------------------------------------------------------------------
# ScanNet
# --------------------------------------------------------------------------------------------


def scannet_nyu40(truth: dict, rng: np.random.Generator, otherprop_fraction: float = 0.02):
    """nyu40 ids for the truth labels (0 for unlabelled) with a few points relabelled to a nyu40
    id outside the 20; returns (nyu40 ids, expected ScanNet-20 labels)."""
    ids = np.zeros(len(truth["label"]), np.uint16)
    labelled = truth["label"] != IGNORE_LABEL
    ids[labelled] = np.asarray(SCANNET20_NYU40_IDS, np.uint16)[truth["label"][labelled]]
    expected = truth["label"].copy()
    other = rng.random(len(ids)) < otherprop_fraction
    ids[other] = NYU40_OTHERPROP
    expected[other] = IGNORE_LABEL
    return ids, expected


def write_scannet_scene(raw: Path, scene_id: str, truth: dict, align: np.ndarray, *,
                        nyu40: np.ndarray | None, frame_skip: int, bad_view: int | None,
                        exported: bool = False, color_scale: int = 2) -> dict:
    """Write <raw>/<scene_id>/ as ScanNet ships it, from a truth scene in the ALIGNED frame.

    - mesh/labels PLY: vertices = truth points mapped to the raw scan frame by inv(align);
      faces over the floor points; labels PLY only if nyu40 is given (test scenes have none);
    - <scene>.txt with axisAlignment = align;
    - frames: truth view i is frame i * frame_skip; the frames in between are decoys with a
      shuffled pose (prepare must skip them); the pose of truth view ``bad_view`` is -inf;
    - colour at ``color_scale`` x the depth resolution (intrinsics scaled to match), depth uint16
      millimetres; as a .sens file, or as exported color/ depth/ pose/ intrinsic/ files.

    Returns what prepare should produce: the expected view indices into the truth views."""
    d = raw / scene_id
    d.mkdir(parents=True, exist_ok=True)
    to_raw = np.linalg.inv(align)
    xyz = transform(to_raw, truth["coord"]).astype(np.float32)
    color = truth["color"]
    vertex = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "red": color[:, 0], "green": color[:, 1],
              "blue": color[:, 2], "alpha": np.full(len(xyz), 255, np.uint8)}
    faces = floor_faces(truth["coord"], truth["label"], SCANNET20.index("floor"))
    write_ply(d / f"{scene_id}_vh_clean_2.ply", vertex, faces)
    if nyu40 is not None:
        write_ply(d / f"{scene_id}_vh_clean_2.labels.ply", {**vertex, "label": nyu40}, faces)
    m = " ".join(f"{v:.9f}" for v in align.reshape(-1))
    (d / f"{scene_id}.txt").write_text(f"axisAlignment = {m}\ncolorHeight = 968\nsceneType = Test\n")

    num_views, h, w = truth["view_depth"].shape
    K = truth["view_intrinsics"][0].astype(np.float64)
    K_color = K.copy()
    K_color[:2] *= color_scale
    K_color[0, 2] = (K[0, 2] + 0.5) * color_scale - 0.5
    K_color[1, 2] = (K[1, 2] + 0.5) * color_scale - 0.5
    rng = np.random.default_rng(1)
    colors, depths, poses = [], [], []
    for f in range(num_views * frame_skip):
        i, decoy = divmod(f, frame_skip)
        rgb = truth["view_rgb"][i]
        big = np.repeat(np.repeat(rgb, color_scale, axis=0), color_scale, axis=1)
        depth_mm = np.round(truth["view_depth"][i] * 1000).astype(np.uint16)
        pose = to_raw @ truth["view_pose"][i].astype(np.float64)
        if decoy:
            pose = to_raw @ truth["view_pose"][rng.integers(num_views)] @ z_rotation(37.0 * decoy)
            big = 255 - big
        elif i == bad_view:
            pose = np.full((4, 4), -np.inf)
        colors.append(big)
        depths.append(depth_mm)
        poses.append(pose)
    if exported:
        for sub in ("color", "depth", "pose", "intrinsic"):
            (d / sub).mkdir(exist_ok=True)
        for f, (c, dm, p) in enumerate(zip(colors, depths, poses)):
            Image.fromarray(c).save(d / "color" / f"{f}.jpg", quality=95)
            Image.fromarray(dm).save(d / "depth" / f"{f}.png")
            np.savetxt(d / "pose" / f"{f}.txt", p, fmt="%f")
        K4 = np.eye(4)
        K4[:3, :3] = K
        np.savetxt(d / "intrinsic" / "intrinsic_depth.txt", K4, fmt="%f")
    else:
        write_sens(d / f"{scene_id}.sens", colors, depths, np.stack(poses), K_color, K)
    return {"views": [i for i in range(num_views) if i != bad_view]}


# What ScanNet's reader writes for a real scene (scene0000_00's numbers, rounded): depth 640x480
# whose principal point is NOT at the image centre, colour 1296x968.
SCANNET_DEPTH_WH, SCANNET_COLOR_WH = (640, 480), (1296, 968)
SCANNET_K_DEPTH = np.array([[577.59, 0.0, 318.91], [0.0, 578.73, 242.68], [0.0, 0.0, 1.0]])
SCANNET_K_COLOR = np.array([[1170.19, 0.0, 647.75], [0.0, 1170.19, 483.75], [0.0, 0.0, 1.0]])
ROOM_MIN, ROOM_MAX = np.array([0.0, 0.0, 0.0]), np.array([6.0, 5.0, 3.0])  # a box room, metres


def look_at(eye, target) -> np.ndarray:
    """Camera-to-world (OpenCV axes: x right, y down, z forward) at eye looking at target."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    m = np.eye(4)
    m[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    m[:3, 3] = eye
    return m


def box_depth(K: np.ndarray, wh: tuple[int, int], c2w: np.ndarray) -> np.ndarray:
    """Exact depth (z along the optical axis, metres) of the box room's inside, seen by a pinhole
    camera with intrinsics K (pixel centres at integer coordinates) at ``wh``."""
    w, h = wh
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(u.shape)], -1)  # z = 1
    d = rays @ c2w[:3, :3].T
    o = c2w[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.stack([np.where(d[..., a] > 0, (ROOM_MAX[a] - o[a]) / d[..., a], (ROOM_MIN[a] - o[a]) / d[..., a])
                      for a in range(3)], -1)
    return np.nanmin(np.where(t > 0, t, np.inf), axis=-1)


def box_distance(xyz: np.ndarray) -> np.ndarray:
    """Distance of points (inside the box room) to its nearest face."""
    return np.minimum(xyz - ROOM_MIN, ROOM_MAX - xyz).min(axis=1)


def write_scannet_real_export(raw: Path, scene_id: str, num_frames: int = 3, *, depth_wh=SCANNET_DEPTH_WH,
                              points: int = 6000) -> dict:
    """<raw>/<scene_id>/ in ScanNet's real exported-frames layout, as its reader writes it into the
    scene folder: intrinsic/{intrinsic,extrinsic}_{color,depth}.txt, color/<i>.jpg at 1296x968,
    depth/<i>.png (uint16 mm) at ``depth_wh`` (the sensor's 640x480 unless a test resizes them),
    pose/<i>.txt; plus the scan: vertices sampled on the walls, floor and ceiling of a box room
    (nyu40 wall 1 / floor 2 / ceiling 22) and the axis alignment (identity). Depth is rendered
    exactly from the 640x480 intrinsics SCANNET_K_DEPTH. Returns the poses."""
    d = raw / scene_id
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    face = rng.integers(0, 6, points)
    xyz = rng.uniform(ROOM_MIN, ROOM_MAX, (points, 3))
    axis, side = face // 2, face % 2
    xyz[np.arange(points), axis] = np.where(side == 1, ROOM_MAX[axis], ROOM_MIN[axis])
    nyu40 = np.where(axis < 2, 1, np.where(side == 0, 2, 22)).astype(np.uint16)
    color = (np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]])[axis]).astype(np.uint8)
    vertex = {"x": xyz[:, 0].astype(np.float32), "y": xyz[:, 1].astype(np.float32),
              "z": xyz[:, 2].astype(np.float32), "red": color[:, 0], "green": color[:, 1], "blue": color[:, 2],
              "alpha": np.full(points, 255, np.uint8)}
    write_ply(d / f"{scene_id}_vh_clean_2.ply", vertex)
    write_ply(d / f"{scene_id}_vh_clean_2.labels.ply", {**vertex, "label": nyu40})
    (d / f"{scene_id}.txt").write_text("axisAlignment = " + " ".join(["1", "0", "0", "0", "0", "1", "0", "0",
                                                                       "0", "0", "1", "0", "0", "0", "0", "1"]) + "\n")
    for name, K in (("intrinsic_depth", SCANNET_K_DEPTH), ("intrinsic_color", SCANNET_K_COLOR)):
        K4 = np.eye(4)
        K4[:3, :3] = K
        np.savetxt(d / "intrinsic" / f"{name}.txt", K4, fmt="%f")
    for name in ("extrinsic_depth", "extrinsic_color"):
        np.savetxt(d / "intrinsic" / f"{name}.txt", np.eye(4), fmt="%f")
    poses = []
    for i in range(num_frames):
        c2w = look_at([1.5 + i, 1.2 + 0.5 * i, 1.5], [3.0 + 0.8 * i, 5.0, 0.6 + 0.3 * i])
        depth = box_depth(SCANNET_K_DEPTH, SCANNET_DEPTH_WH, c2w)
        depth_mm = np.round(depth * 1000).astype(np.uint16)
        if tuple(depth_wh) != SCANNET_DEPTH_WH:  # exported resized (nearest): intrinsics no longer fit
            ys = (np.arange(depth_wh[1]) * SCANNET_DEPTH_WH[1] // depth_wh[1])
            xs = (np.arange(depth_wh[0]) * SCANNET_DEPTH_WH[0] // depth_wh[0])
            depth_mm = depth_mm[ys[:, None], xs[None, :]]
        Image.fromarray(depth_mm).save(d / "depth" / f"{i}.png")
        gray = np.full((SCANNET_COLOR_WH[1], SCANNET_COLOR_WH[0], 3), 90 + 40 * i, np.uint8)
        Image.fromarray(gray).save(d / "color" / f"{i}.jpg", quality=90)
        np.savetxt(d / "pose" / f"{i}.txt", c2w, fmt="%.6f")
        poses.append(c2w)
    return {"poses": np.stack(poses)}


def write_scannet_splits(splits_dir: Path, splits: dict[str, list[str]]) -> None:
    splits_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (splits_dir / f"scannetv2_{split}.txt").write_text("".join(f"{s}\n" for s in ids))


# --------------------------------------------------------------------------------------------
# S3DIS + 2D-3D-S
# --------------------------------------------------------------------------------------------


def write_s3dis_room(raw: Path, area: str, room: str, coord: np.ndarray, truth: dict) -> list[np.ndarray]:
    """<raw>/<area>/<room>/Annotations/<class>_<k>.txt, one file per truth instance, 'x y z r g b'
    with millimetre precision; the clutter instance with most points is written as 'stairs'.
    Returns the truth point indices of each file in the order prepare reads them (sorted names),
    so ``np.concatenate(result)`` is the expected point order."""
    ann = raw / area / room / "Annotations"
    ann.mkdir(parents=True, exist_ok=True)
    inst, label = truth["instance"], truth["label"]
    clutter = S3DIS13.index("clutter")
    clutter_inst = [i for i in np.unique(inst[label == clutter])]
    stairs = max(clutter_inst, key=lambda i: (inst == i).sum()) if clutter_inst else None
    counts: dict[str, int] = {}
    files = {}
    for i in np.unique(inst):
        sel = np.nonzero(inst == i)[0]
        cls = S3DIS13[int(label[sel][0])]
        name = "stairs" if i == stairs else cls
        counts[name] = counts.get(name, 0) + 1
        fname = f"{name}_{counts[name]}.txt"
        table = np.column_stack([coord[sel], truth["color"][sel]])
        np.savetxt(ann / fname, table, fmt=["%.3f"] * 3 + ["%d"] * 3)
        files[fname] = sel
    # The whole-room file S3DIS also ships (rayseg reads the annotations only).
    (raw / area / room / f"{room}.txt").write_text("")
    return [files[name] for name in sorted(files)]


def write_angle_file(raw: Path, area: str, angles: dict[str, float]) -> None:
    lines = [f"## Global alignment angle per disjoint space in {area} ##",
             "## Disjoint Space Name Global Alignment Angle ##"]
    lines += [f"{room} {int(a)}" for room, a in angles.items()]
    (raw / area / f"{area}_alignmentAngle.txt").write_text("\n".join(lines) + "\n")


def write_2d3ds_views(images: Path, image_area: str, room: str, truth: dict, area_poses: np.ndarray,
                      transpose_rotation: bool = False) -> list[str]:
    """2D-3D-S data/{rgb,depth,pose} files of the truth views; ``area_poses`` are the views'
    camera-to-world in the S3DIS area frame (for area_5b they are mapped to that frame's own
    convention). ``transpose_rotation`` writes a broken pose (R^T instead of R)."""
    data = images / image_area / "data"
    for sub in ("rgb", "depth", "pose"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for i, c2w in enumerate(area_poses):
        c2w = np.asarray(c2w, np.float64)
        if image_area == "area_5b":
            c2w = np.linalg.inv(AREA_5B_TO_AREA_5) @ c2w
        w2c = np.linalg.inv(c2w)
        if transpose_rotation:
            w2c[:3, :3] = w2c[:3, :3].T
        K = truth["view_intrinsics"][i].astype(np.float64).copy()
        K[0, 2] += K_PIXEL_CENTRE
        K[1, 2] += K_PIXEL_CENTRE
        # uuids sort in truth-view order, so the i-th view prepare keeps is truth view i
        uuid = f"{i:04x}" + hashlib.md5(f"{image_area}/{room}/{i}".encode()).hexdigest()[:28]
        stem = f"camera_{uuid}_{room}_frame_{i}_domain_"
        depth = np.round(truth["view_depth"][i] * DEPTH_SCALE)
        depth = np.where(truth["view_depth"][i] > 0, depth, DEPTH_MISSING).astype(np.uint16)
        Image.fromarray(truth["view_rgb"][i]).save(data / "rgb" / f"{stem}rgb.png")
        Image.fromarray(depth).save(data / "depth" / f"{stem}depth.png")
        pose = {"camera_k_matrix": K.tolist(), "camera_rt_matrix": w2c[:3].tolist(),
                "camera_location": c2w[:3, 3].tolist(), "frame_num": i, "camera_uuid": uuid,
                "room": f"{room}_{image_area[5:]}", "field_of_view_rads": 1.0}
        (data / "pose" / f"{stem}pose.json").write_text(json.dumps(pose))
        names.append(stem)
    return names


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------


def truth_scene(profile: str, index: int, scene_id: str, split: str, *, width: int, height: int,
                num_views: int = 4) -> dict:
    """A small synthetic scene (rayseg.data.synthetic) used as the truth of a raw fixture."""
    from rayseg.data.synthetic import generate_scene
    from rayseg.config import SyntheticConfig

    cfg = SyntheticConfig(profile=profile, num_scenes=max(8, index + 1), num_views=num_views,
                          image_width=width, image_height=height, points_per_m2=60.0,
                          min_points=4000, max_points=12000, seed=7)
    scene = generate_scene(cfg, index)
    return {**scene, "scene_id": scene_id, "split": split}
