"""`rayseg predict MODEL INPUT... --out DIR`: a trained 3D network on a user's own scans.

MODEL is a run directory (a seg run: its segmenter; a train run: its EMA teacher's 3D branch) or
an MLflow model (``models:/<model id or name/version>``, ``runs:/<run id>/<name>``, or a local
folder holding an ``MLmodel`` file) logged by rayseg. INPUT is PLY files or prepared datasets
(a folder with manifest.json; ``--split`` picks one split).

A PLY needs vertex x, y, z (metres, z up, as in training) and red, green, blue (uchar, or float
in [0, 1]); nx, ny, nz are used when present, otherwise normals are estimated (PCA over the 16
nearest 2 cm cells, oriented towards the scan's box centre, as for S3DIS). A PLY without colours
is refused unless ``--allow-no-color``, which gives every point mid-grey (predictions are then
much worse: colour is half of the network's input).

Inference is a Ray Data job: one actor per model copy (GPU when asked and present), one scan per
call. Per scan it writes ``DIR/<name>.labels.ply`` (the points coloured by class, the class
names as header comments, a ``label`` property), ``DIR/<name>.labels.npy`` (uint8 class id per
point, in the input's point order) and ``DIR/<name>.histogram.json``; for all scans
``DIR/histogram.csv`` (points per class per scan) and ``DIR/predict.json``.

The network is wrapped as `PointSegmenter`: points (N, 9) = x y z, r g b (0-255), nx ny nz ->
logits (N, C), voxelised exactly as the training pipeline's "infer" mode. That module is what
rayseg logs as an MLflow model (`mlflow.pytorch.load_model` gives it back; MLflow asks for
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true because the pytorch flavour pickles). rayseg itself
never unpickles code: it reads the model file with ``torch.load(weights_only=True)``, where the
only callable allowed is `rebuild_segmenter` (architecture spec + state dict).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rayseg import config as cfgmod

INPUT_COLUMNS = ("x", "y", "z", "red", "green", "blue", "nx", "ny", "nz")
NORMAL_KNN = 16
MODEL_FILE = "model.pth"
SUMMARY_FILE = "predict.json"
HISTOGRAM_FILE = "histogram.csv"
GREY = 128


class PredictError(ValueError):
    """Bad model or input for `rayseg predict`; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# The model: points -> per-point logits
# --------------------------------------------------------------------------------------------


def points_to_input(points: np.ndarray, voxel_size: float) -> dict[str, np.ndarray]:
    """(N, 9) points -> the network's input, as the pipeline's infer mode builds it for one
    scene: coordinates centred (x/y box centre, lowest z = 0), features colour / 127.5 - 1 and the
    normal averaged per voxel, voxel coordinates shifted to a minimum of 0 with batch index 0."""
    from rayseg.data import transforms as T

    points = np.asarray(points, np.float32)
    coord = T.center(points[:, :3])
    feat = np.concatenate([points[:, 3:6] / 127.5 - 1.0, points[:, 6:9]], axis=1)
    vox = T.voxelize(coord, feat, voxel_size)
    vc = vox["voxel_coord"] - vox["voxel_coord"].min(0)
    coord4 = np.concatenate([np.zeros((len(vc), 1), np.int32), vc], axis=1).astype(np.int32)
    return {"coord": coord4, "feat": vox["voxel_feat"].astype(np.float32), "inverse": vox["inverse"]}


def _build_net(spec: dict):
    from rayseg.models.minkunet import build_minkunet
    from rayseg.sparse import BackendUnavailable

    try:
        return build_minkunet(spec["backbone"], spec["in_channels"], spec["num_classes"], spec["backend"])
    except BackendUnavailable:  # both backends share parameter names and layout
        return build_minkunet(spec["backbone"], spec["in_channels"], spec["num_classes"], "torch")


class PointSegmenter(nn.Module):
    """forward(points (N, 9) float32: x y z, r g b in 0..255, nx ny nz) -> logits (N, C).

    spec: backbone, in_channels, num_classes, backend, class_names, voxel_size, kind ('segmenter'
    or 'teacher'), source (where the weights came from)."""

    def __init__(self, spec: dict, state: dict | None = None):
        super().__init__()
        from rayseg.models.minkunet import load_minkunet_state

        if spec["in_channels"] != 6:
            raise PredictError(f"model input has {spec['in_channels']} channels; rayseg predict feeds 6 "
                               f"(colour + normal)")
        self.spec = dict(spec)
        self.class_names = tuple(spec["class_names"])
        self.net = _build_net(spec)
        if state is not None:
            load_minkunet_state(self.net, state, source=str(spec.get("source", "state dict")))
        self.eval()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.ndim != 2 or points.shape[1] != len(INPUT_COLUMNS):
            raise PredictError(f"points: expected shape (N, {len(INPUT_COLUMNS)}) = {' '.join(INPUT_COLUMNS)}, "
                               f"got {tuple(points.shape)}")
        if points.shape[0] == 0:
            raise PredictError("points: no points")
        device = next(self.net.parameters()).device
        x = points_to_input(points.detach().cpu().numpy(), float(self.spec["voxel_size"]))
        _, logits = self.net(torch.from_numpy(x["coord"]).to(device), torch.from_numpy(x["feat"]).to(device))
        return logits[torch.from_numpy(x["inverse"]).to(device)]

    @torch.no_grad()
    def predict(self, points: np.ndarray) -> np.ndarray:
        """Class id per point (int64)."""
        return self(torch.from_numpy(np.asarray(points, np.float32))).argmax(1).cpu().numpy()

    def __reduce__(self):
        # Pickled as (spec, weights): loadable with torch.load(weights_only=True) given
        # rebuild_segmenter as the one allowed callable (load_model_dir).
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return rebuild_segmenter, (dict(self.spec), state)


def rebuild_segmenter(spec: dict, state: dict) -> PointSegmenter:
    return PointSegmenter(spec, state)


def segmenter_from_run(run_dir: str | Path) -> PointSegmenter:
    """The network of a run directory's newest checkpoint: a seg run's segmenter, or a train
    run's EMA teacher (its 3D branch)."""
    from rayseg.train.checkpoint import latest_checkpoint, load_state
    from rayseg.train.launch import load_run

    run_dir = Path(run_dir).resolve()
    cfg = load_run(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise PredictError(f"{run_dir}: no checkpoint under checkpoints/ (train the run first)")
    state = load_state(ckpt)
    is_seg = list(state["stages"]) == ["seg"]
    if is_seg:
        weights, backbone, voxel = state["student"], cfg.optim.seg_backbone, cfg.optim.seg_voxel_size
    else:
        weights = {k[len("net3d."):]: v for k, v in state["teacher"].items() if k.startswith("net3d.")}
        backbone, voxel = cfg.model.backbone_3d, cfg.data.voxel_size
    spec = {"backbone": backbone, "in_channels": cfg.model.in_channels, "num_classes": len(state["class_names"]),
            "backend": cfg.model.backend, "class_names": list(state["class_names"]), "voxel_size": float(voxel),
            "kind": "segmenter" if is_seg else "teacher", "source": str(ckpt)}
    return PointSegmenter(spec, weights)


def _mlflow_model_dir(model: str) -> Path:
    """A local folder with an MLmodel file for a model URI or path (downloaded if remote)."""
    path = Path(model)
    if path.is_dir() and (path / "MLmodel").is_file():
        return path
    if "://" in model or model.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
            raise PredictError(f"model {model}: cannot be fetched from MLflow ({type(exc).__name__}: {exc}); "
                               f"is MLFLOW_TRACKING_URI (or --tracking-uri) the store it was logged to?") from None
    raise PredictError(f"model {model}: neither a run directory (no config.toml) nor an MLflow model "
                       f"(no MLmodel file), nor a models:/ or runs:/ URI")


def load_model_dir(model_dir: str | Path) -> PointSegmenter:
    """A rayseg MLflow model folder -> PointSegmenter, without unpickling code (weights_only)."""
    import yaml

    model_dir = Path(model_dir)
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    flavor = (meta.get("flavors") or {}).get("pytorch")
    if flavor is None:
        raise PredictError(f"{model_dir}: an MLflow model without the pytorch flavour (not logged by rayseg)")
    if not (meta.get("metadata") or {}).get("rayseg"):
        raise PredictError(f"{model_dir}: not a rayseg model (its MLmodel metadata has no 'rayseg' entry)")
    path = model_dir / flavor.get("model_data", "data") / MODEL_FILE
    try:
        with torch.serialization.safe_globals([rebuild_segmenter]):
            model = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad or foreign file
        raise PredictError(f"{path}: does not load as a rayseg model ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, PointSegmenter):
        raise PredictError(f"{path}: holds a {type(model).__name__}, not a rayseg PointSegmenter")
    return model


def load_segmenter(model: str | Path) -> PointSegmenter:
    """MODEL of `rayseg predict`: a run directory or an MLflow model (URI or local folder)."""
    model = str(model)
    if (Path(model) / "config.toml").is_file():
        return segmenter_from_run(model)
    return load_model_dir(_mlflow_model_dir(model))


# --------------------------------------------------------------------------------------------
# Logging a network as an MLflow model
# --------------------------------------------------------------------------------------------


def log_segmenter(cfg: cfgmod.Config, run_id: str, segmenter: PointSegmenter, name: str, step: int = 0,
                  registered_name: str | None = None):
    """Log `segmenter` as an MLflow model (a LoggedModel, output of run `run_id`) with its
    signature, class names and voxel size; registered as `registered_name` when given.
    Returns MLflow's ModelInfo (model_uri = models:/<model id>)."""
    import mlflow
    import numpy as np_
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from rayseg.train.tracking import tracking_uri

    num_classes = len(segmenter.class_names)
    signature = ModelSignature(inputs=Schema([TensorSpec(np_.dtype(np_.float32), (-1, len(INPUT_COLUMNS)), "points")]),
                               outputs=Schema([TensorSpec(np_.dtype(np_.float32), (-1, num_classes), "logits")]))
    meta = {"rayseg": {**{k: v for k, v in segmenter.spec.items() if k != "source"},
                       "input_columns": list(INPUT_COLUMNS), "output": "per-point logits (N, C)"},
            "class_names": list(segmenter.class_names)}
    tags = {"rayseg.kind": segmenter.spec["kind"], "rayseg.class_names": json.dumps(list(segmenter.class_names)),
            "rayseg.voxel_size": str(segmenter.spec["voxel_size"])}
    mlflow.set_tracking_uri(tracking_uri(cfg))
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", "scipy", "rayseg"]
    # MLflow warns that pickled models can run code when loaded: rayseg's own loader reads this
    # file weights-only (load_model_dir), and the README says what mlflow.pytorch.load_model needs.
    flavor_log = logging.getLogger("mlflow.pytorch")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(segmenter.cpu(), name=name, signature=signature, metadata=meta,
                                            tags=tags, step=int(step), registered_model_name=registered_name,
                                            serialization_format="pickle", pip_requirements=requirements,
                                            await_registration_for=0)
    finally:
        flavor_log.setLevel(level)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _ply_vertex_header(path: Path) -> tuple[int, list[str]]:
    """(vertex count, vertex property names) from a PLY header; PredictError for an empty or
    non-PLY file."""
    from rayseg.data.ply import PlyError, _parse_header

    if path.stat().st_size == 0:
        raise PredictError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        try:
            _, elements = _parse_header(f, path)
        except PlyError as exc:
            raise PredictError(str(exc)) from None
    vertex = next((e for e in elements if e["name"] == "vertex"), None)
    if vertex is None:
        raise PredictError(f"{path}: no 'vertex' element in the PLY header")
    return vertex["count"], [p[0] for p in vertex["props"]]


def _color_names(props: list[str]) -> tuple[str, str, str] | None:
    for names in (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue")):
        if all(n in props for n in names):
            return names
    return None


def check_ply(path: Path, allow_no_color: bool) -> None:
    """Fail before Ray starts on what a scan cannot be predicted from."""
    count, props = _ply_vertex_header(path)
    if count == 0:
        raise PredictError(f"{path}: the PLY has 0 vertices")
    missing = [p for p in "xyz" if p not in props]
    if missing:
        raise PredictError(f"{path}: vertex properties {missing} missing (has {props})")
    if _color_names(props) is None and not allow_no_color:
        raise PredictError(f"{path}: no vertex colours (red/green/blue; has {props}). The network takes colour as "
                           f"input; pass --allow-no-color to predict with every point mid-grey (much less accurate)")


def estimate_normals(coord: np.ndarray) -> np.ndarray:
    """Unit normals of a point cloud: PCA over the 16 nearest 2 cm cells, oriented towards the
    box centre (rayseg.data.s3dis.pca_normals, what S3DIS rooms get)."""
    from rayseg.data.s3dis import pca_normals

    centre = (coord.min(0) + coord.max(0)) / 2
    return pca_normals(coord.astype(np.float64), NORMAL_KNN, centre)


def read_ply_points(path: Path, allow_no_color: bool = False) -> tuple[np.ndarray, dict]:
    """(points (N, 9) float32, notes) from a PLY; normals estimated when missing."""
    from rayseg.data.ply import read_ply

    check_ply(path, allow_no_color)
    vertex = read_ply(path)["vertex"]
    coord = np.stack([vertex[a] for a in "xyz"], 1).astype(np.float64)
    if not np.isfinite(coord).all():
        raise PredictError(f"{path}: {int((~np.isfinite(coord)).any(1).sum())} vertices have non-finite coordinates")
    notes: dict[str, Any] = {}
    names = _color_names(list(vertex))
    if names is None:
        color = np.full((len(coord), 3), GREY, np.float32)
        notes["color"] = "none in file: mid-grey used (--allow-no-color)"
    else:
        color = np.stack([vertex[n] for n in names], 1).astype(np.float32)
        if vertex[names[0]].dtype.kind == "f" and color.max(initial=0) <= 1.0:
            color *= 255.0
        color = np.clip(color, 0, 255)
    if all(n in vertex for n in ("nx", "ny", "nz")):
        normal = np.stack([vertex[n] for n in ("nx", "ny", "nz")], 1).astype(np.float32)
        normal = np.nan_to_num(normal)
    else:
        normal = estimate_normals(coord)
        notes["normals"] = f"estimated (PCA, {NORMAL_KNN} neighbours)"
    return np.concatenate([coord.astype(np.float32), color, normal], 1).astype(np.float32), notes


def read_shard_points(path: Path) -> tuple[np.ndarray, dict]:
    """(points (N, 9), notes) of one prepared scene (no ground truth read)."""
    from rayseg.data import shards

    scene = shards.read_scene(path, ["coord", "color", "normal"])
    n = len(scene["coord"])
    if n == 0:
        raise PredictError(f"{path}: scene {scene['scene_id']} has 0 points")
    normal = scene.get("normal", np.zeros((n, 3), np.float32))
    return np.concatenate([scene["coord"], scene["color"].astype(np.float32), normal], 1).astype(np.float32), {}


def list_inputs(inputs: list[str], split: str | None, class_names: tuple[str, ...],
                allow_no_color: bool) -> list[dict]:
    """[{"name", "path", "kind": "ply" | "shard"}] for PLY files and prepared datasets, checked
    (before Ray starts): files exist, PLYs are readable with vertices and colours, a dataset has
    the model's class set, no two outputs share a name."""
    from rayseg.data import shards

    items: list[dict] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            try:
                manifest = shards.load_manifest(path)
            except (FileNotFoundError, NotADirectoryError, shards.ShardError) as exc:
                raise PredictError(f"input {path}: a folder but not a prepared dataset ({exc})") from None
            theirs = tuple(manifest["class_names"])
            if theirs != class_names:
                raise PredictError(f"input {path}: dataset classes ({len(theirs)}: {', '.join(theirs)}) differ from the "
                                   f"model's ({len(class_names)}: {', '.join(class_names)})")
            paths = shards.scene_paths(path, split)
            if not paths:
                raise PredictError(f"input {path}: no scenes" + (f" in split {split!r}" if split else ""))
            items += [{"name": p.stem, "path": str(p.resolve()), "kind": "shard"} for p in paths]
        elif path.is_file():
            if path.suffix.lower() != ".ply":
                raise PredictError(f"input {path}: not a .ply file (give PLY files or prepared dataset folders)")
            check_ply(path, allow_no_color)
            items.append({"name": path.stem, "path": str(path.resolve()), "kind": "ply"})
        else:
            raise PredictError(f"input {path}: no such file or folder")
    seen: dict[str, str] = {}
    for item in items:
        if item["name"] in seen:
            raise PredictError(f"inputs {seen[item['name']]} and {item['path']} would both write "
                               f"{item['name']}.labels.*; rename one")
        seen[item["name"]] = item["path"]
    return items


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_outputs(out: Path, name: str, points: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
                  meta: dict) -> dict:
    """<name>.labels.ply / .labels.npy / .histogram.json (atomic); returns the histogram row."""
    from rayseg import atomic
    from rayseg.data.ply import write_ply
    from rayseg.export import colorize, palette

    labels = labels.astype(np.uint8)
    rgb = colorize(labels, palette(class_names), name)
    comments = [f"rayseg predict: label = class id; colours by class. model {meta.get('model', '')}"]
    comments += [f"class {i} {n}" for i, n in enumerate(class_names)]
    write_ply(out / f"{name}.labels.ply", {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2],
                                           "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2],
                                           "label": labels}, comments=comments)
    buf = io.BytesIO()
    np.save(buf, labels)
    atomic.write_bytes(out / f"{name}.labels.npy", buf.getvalue())
    counts = np.bincount(labels, minlength=len(class_names))[:len(class_names)]
    hist = {"scan": name, "points": int(len(labels)), "counts": {c: int(k) for c, k in zip(class_names, counts)},
            "fractions": {c: float(k) / max(1, len(labels)) for c, k in zip(class_names, counts)}, **meta}
    atomic.write_bytes(out / f"{name}.histogram.json", json.dumps(hist, indent=2).encode())
    return hist


class ScanPredictor:
    """Ray Data actor: loads the model once, predicts one scan per call."""

    def __init__(self, model: str, name: str, out: str, allow_no_color: bool, use_gpu: bool):
        self.model = load_segmenter(model)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.model_name = name
        self.out = Path(out)
        self.allow_no_color = allow_no_color

    def __call__(self, row: dict) -> dict:
        t0 = time.time()
        path = Path(row["path"])
        try:
            if row["kind"] == "ply":
                points, notes = read_ply_points(path, self.allow_no_color)
            else:
                points, notes = read_shard_points(path)
            labels = self.model.predict(points)
            hist = write_outputs(self.out, row["name"], points, labels, self.model.class_names,
                                 {"input": str(path), "model": self.model_name, **notes})
            return {"name": row["name"], "error": "", "seconds": time.time() - t0,
                    "result": json.dumps(hist)}
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the others
            return {"name": row["name"], "error": f"{path}: {type(exc).__name__}: {exc}", "seconds": time.time() - t0,
                    "result": ""}


def run_predict(model: str, inputs: list[str], out: str | Path, split: str | None = None,
                allow_no_color: bool = False, actors: int = 1, use_gpu: bool = False, log=print) -> dict:
    """Predict every input scan; returns {"scans": [histogram rows], "errors": [messages], ...}."""
    import ray
    import ray.data

    from rayseg import atomic
    from rayseg.train import launch

    # An MLflow URI is fetched once here; the actors load the local copy (no store access needed).
    local = str(model) if (Path(model) / "config.toml").is_file() else str(_mlflow_model_dir(str(model)))
    segmenter = load_segmenter(local)  # fail fast on a bad model, before Ray
    class_names = segmenter.class_names
    items = list_inputs(list(inputs), split, class_names, allow_no_color)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"[rayseg] predict: {len(items)} scan(s) with {segmenter.spec['kind']} {segmenter.spec['backbone']} "
        f"({len(class_names)} classes, voxel {segmenter.spec['voxel_size']} m) -> {out}")
    del segmenter
    launch.init_ray(cfgmod.Config())
    t0 = time.time()
    ds = ray.data.from_items(items).map(
        ScanPredictor, fn_constructor_kwargs=dict(model=local, name=str(model), out=str(out),
                                                  allow_no_color=allow_no_color, use_gpu=use_gpu),
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        num_gpus=1 if use_gpu else 0, num_cpus=1)
    scans, errors = [], []
    for row in ds.iter_rows():
        if row["error"]:
            errors.append(row["error"])
            log(f"[rayseg] predict: FAILED {row['error']}")
            continue
        hist = json.loads(row["result"])
        scans.append(hist)
        top = sorted(hist["fractions"].items(), key=lambda kv: -kv[1])[:3]
        log(f"[rayseg] predict: {row['name']}: {hist['points']} points in {row['seconds']:.1f} s; "
            + ", ".join(f"{c} {100 * f:.0f}%" for c, f in top))
    scans.sort(key=lambda h: h["scan"])
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["scan", "points", *class_names])
    for h in scans:
        writer.writerow([h["scan"], h["points"], *(h["counts"][c] for c in class_names)])
    atomic.write_bytes(out / HISTOGRAM_FILE, text.getvalue().encode())
    summary = {"model": str(model), "class_names": list(class_names), "scans": [h["scan"] for h in scans],
               "errors": errors, "seconds": time.time() - t0}
    atomic.write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return {**summary, "histograms": scans, "out": out}
