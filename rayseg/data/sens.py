"""ScanNet ``.sens`` files (SensorData version 4): a streaming reader and a writer for fixtures.

Layout, checked against ScanNet's own code (``SensReader/python/SensorData.py`` and the C++
``sensorData.h`` ``loadFromFile`` / ``saveToFile`` in github.com/ScanNet/ScanNet); all values
little endian, matrices row-major float32:

header
    uint32   version (must be 4)
    uint64   sensor name length L, then L bytes of name (the length is 8 bytes, not 4)
    4x4 f32  intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth
    int32    color_compression_type  (-1 unknown, 0 raw, 1 png, 2 jpeg)
    int32    depth_compression_type  (-1 unknown, 0 raw_ushort, 1 zlib_ushort, 2 occi_ushort)
    uint32   color_width, color_height, depth_width, depth_height
    float32  depth_shift (uint16 depth / depth_shift = metres; 1000 for ScanNet)
    uint64   number of RGB-D frames
per frame
    4x4 f32  camera_to_world (invalid frames carry -inf entries)
    uint64   timestamp_color, timestamp_depth, color_size_bytes, depth_size_bytes
    bytes    compressed colour (color_size_bytes), compressed depth (depth_size_bytes)
trailer
    uint64   number of IMU frames, then 128 bytes each (5 x vec3 double + uint64 timestamp);
             rayseg does not use them (and the writer writes 0).

``read_sens`` streams the file: frames that are not requested are skipped with ``seek``, so
reading every 20th frame of a 1 GB file touches only those frames' bytes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rayseg import atomic

COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
SENS_VERSION = 4


class SensError(ValueError):
    """A .sens file is malformed, truncated or uses an unsupported compression."""


@dataclass
class SensHeader:
    version: int
    sensor_name: str
    intrinsic_color: np.ndarray  # (4, 4) f32
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: str
    depth_compression: str
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int


@dataclass
class SensFrame:
    index: int                   # position in the file's frame sequence
    camera_to_world: np.ndarray  # (4, 4) f32
    timestamp_color: int
    timestamp_depth: int
    color_bytes: bytes
    depth_bytes: bytes


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SensError(f"{path}: truncated while reading {what} ({len(data)} of {n} bytes)")
    return data


def _read_header(f, path: Path) -> SensHeader:
    (version,) = struct.unpack("<I", _read_exact(f, 4, path, "version"))
    if version != SENS_VERSION:
        raise SensError(f"{path}: .sens version {version}, expected {SENS_VERSION}")
    (name_len,) = struct.unpack("<Q", _read_exact(f, 8, path, "sensor name length"))
    if name_len > 4096:
        raise SensError(f"{path}: implausible sensor name length {name_len} (corrupt header)")
    name = _read_exact(f, name_len, path, "sensor name").decode("utf-8", errors="replace")
    mats = np.frombuffer(_read_exact(f, 4 * 64, path, "calibration matrices"), dtype="<f4").reshape(4, 4, 4)
    ctype, dtype_ = struct.unpack("<ii", _read_exact(f, 8, path, "compression types"))
    cw, ch, dw, dh = struct.unpack("<IIII", _read_exact(f, 16, path, "image sizes"))
    (shift,) = struct.unpack("<f", _read_exact(f, 4, path, "depth shift"))
    (num_frames,) = struct.unpack("<Q", _read_exact(f, 8, path, "frame count"))
    if ctype not in COLOR_COMPRESSION or dtype_ not in DEPTH_COMPRESSION:
        raise SensError(f"{path}: unknown compression types colour={ctype} depth={dtype_}")
    return SensHeader(version, name, *(m.astype(np.float32) for m in mats),
                      COLOR_COMPRESSION[ctype], DEPTH_COMPRESSION[dtype_], cw, ch, dw, dh,
                      float(shift), int(num_frames))


def read_sens_header(path: str | Path) -> SensHeader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: .sens file not found")
    with open(path, "rb") as f:
        return _read_header(f, path)


def read_sens(path: str | Path, frames: list[int] | range | None = None) -> tuple[SensHeader, list[SensFrame]]:
    """Header and the requested frames (all if None), in file order. Unrequested frames are
    skipped without reading their image bytes. Truncation raises SensError naming the frame."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: .sens file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = _read_header(f, path)
        wanted = set(range(header.num_frames) if frames is None else frames)
        last = max(wanted) if wanted else -1
        out = []
        for i in range(header.num_frames):
            if i > last:
                break
            what = f"frame {i} header"
            pose = np.frombuffer(_read_exact(f, 64, path, what), dtype="<f4").reshape(4, 4)
            ts_c, ts_d, n_c, n_d = struct.unpack("<QQQQ", _read_exact(f, 32, path, what))
            if f.tell() + n_c + n_d > size:
                raise SensError(f"{path}: frame {i} declares {n_c}+{n_d} image bytes but the file "
                                f"ends {size - f.tell()} bytes later (truncated)")
            if i in wanted:
                color = _read_exact(f, n_c, path, f"frame {i} colour")
                depth = _read_exact(f, n_d, path, f"frame {i} depth")
                out.append(SensFrame(i, pose.astype(np.float32), ts_c, ts_d, color, depth))
            else:
                f.seek(n_c + n_d, os.SEEK_CUR)
    return header, out


def decode_color(header: SensHeader, frame: SensFrame, path: str | Path = "<sens>") -> np.ndarray:
    """(color_height, color_width, 3) uint8."""
    shape = (header.color_height, header.color_width, 3)
    try:
        if header.color_compression in ("jpeg", "png"):
            img = np.asarray(Image.open(io.BytesIO(frame.color_bytes)).convert("RGB"))
        elif header.color_compression == "raw":
            img = np.frombuffer(frame.color_bytes, dtype=np.uint8).reshape(shape)
        else:
            raise SensError(f"{path}: unsupported colour compression '{header.color_compression}'")
    except (OSError, ValueError) as exc:
        if isinstance(exc, SensError):
            raise
        raise SensError(f"{path}: frame {frame.index}: cannot decode colour: {exc}") from None
    if img.shape != shape:
        raise SensError(f"{path}: frame {frame.index}: colour is {img.shape}, header says {shape}")
    return img


def decode_depth(header: SensHeader, frame: SensFrame, path: str | Path = "<sens>") -> np.ndarray:
    """(depth_height, depth_width) uint16 in 1/depth_shift metres (0 = invalid)."""
    n = header.depth_width * header.depth_height
    if header.depth_compression == "zlib_ushort":
        try:
            raw = zlib.decompress(frame.depth_bytes)
        except zlib.error as exc:
            raise SensError(f"{path}: frame {frame.index}: corrupt zlib depth: {exc}") from None
    elif header.depth_compression == "raw_ushort":
        raw = frame.depth_bytes
    else:
        raise SensError(f"{path}: unsupported depth compression '{header.depth_compression}'")
    if len(raw) != 2 * n:
        raise SensError(f"{path}: frame {frame.index}: depth has {len(raw)} bytes, expected {2 * n}")
    return np.frombuffer(raw, dtype="<u2").reshape(header.depth_height, header.depth_width).astype(np.uint16)


def write_sens(path: str | Path, colors: list[np.ndarray], depths: list[np.ndarray],
               poses: np.ndarray, intrinsic_color: np.ndarray, intrinsic_depth: np.ndarray,
               depth_shift: float = 1000.0, extrinsic_color: np.ndarray | None = None,
               extrinsic_depth: np.ndarray | None = None, sensor_name: str = "rayseg-fixture",
               color_compression: str = "jpeg", jpeg_quality: int = 95) -> Path:
    """Write a version-4 .sens file (zlib_ushort depth, JPEG or PNG colour). ``depths`` are
    uint16 arrays in 1/depth_shift metres; ``intrinsic_*`` may be 3x3 or 4x4. Atomic."""
    path = Path(path)
    if not (len(colors) == len(depths) == len(poses)):
        raise ValueError(f"{path}: {len(colors)} colours, {len(depths)} depths, {len(poses)} poses")
    ch, cw = colors[0].shape[:2]
    dh, dw = depths[0].shape

    def mat4(m):
        out = np.eye(4, dtype="<f4")
        m = np.asarray(m, dtype=np.float32)
        out[: m.shape[0], : m.shape[1]] = m
        return out

    ctype = {v: k for k, v in COLOR_COMPRESSION.items()}[color_compression]
    name = sensor_name.encode("utf-8")
    parts = [struct.pack("<IQ", SENS_VERSION, len(name)), name]
    for m in (intrinsic_color, extrinsic_color if extrinsic_color is not None else np.eye(4),
              intrinsic_depth, extrinsic_depth if extrinsic_depth is not None else np.eye(4)):
        parts.append(mat4(m).tobytes())
    parts.append(struct.pack("<iiIIIIfQ", ctype, 1, cw, ch, dw, dh, depth_shift, len(colors)))
    for i, (color, depth, pose) in enumerate(zip(colors, depths, poses)):
        buf = io.BytesIO()
        if color_compression == "jpeg":
            Image.fromarray(color).save(buf, format="JPEG", quality=jpeg_quality)
        else:
            Image.fromarray(color).save(buf, format="PNG")
        cbytes = buf.getvalue()
        dbytes = zlib.compress(np.ascontiguousarray(depth, dtype="<u2").tobytes())
        parts.append(np.asarray(pose, dtype="<f4").reshape(4, 4).tobytes())
        parts.append(struct.pack("<QQQQ", 1000 * i, 1000 * i, len(cbytes), len(dbytes)))
        parts += [cbytes, dbytes]
    parts.append(struct.pack("<Q", 0))  # no IMU frames
    return atomic.write_bytes(path, b"".join(parts))
