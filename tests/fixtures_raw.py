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
