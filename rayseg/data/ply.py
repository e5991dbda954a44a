"""PLY reading and writing (vertices with any scalar properties, faces as index lists).

Written from the PLY format description (Greg Turk's "The PLY Polygon File Format"): an ASCII
header (``ply``, ``format ascii|binary_little_endian|binary_big_endian 1.0``, ``element`` and
``property`` lines, ``end_header``) followed by the elements in header order. Scalar property
types: char/int8, uchar/uint8, short/int16, ushort/uint16, int/int32, uint/uint32,
float/float32, double/float64. A list property is ``property list <count type> <item type>``.

This covers what ScanNet ships: ``<scene>_vh_clean_2.ply`` (binary little endian; vertex x y z
float, red green blue alpha uchar; face ``list uchar int vertex_indices``) and
``<scene>_vh_clean_2.labels.ply`` (the same plus vertex ``label`` ushort, the nyu40 id).

``read_ply`` returns ``{element_name: {property_name: numpy array}}``; a list property whose
lists all have the same length k comes back as an (M, k) array, otherwise as a list of arrays.
Errors name the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayseg import atomic

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint",
          "f4": "float", "f8": "double"}
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


class PlyError(ValueError):
    """A PLY file is malformed or truncated; the message names the file."""


def _parse_header(f, path: Path) -> tuple[str, list[dict]]:
    first = f.readline()
    if first.strip() != b"ply":
        raise PlyError(f"{path}: not a PLY file (first line {first[:20]!r})")
    fmt = None
    elements: list[dict] = []
    while True:
        line = f.readline()
        if not line:
            raise PlyError(f"{path}: header has no end_header line")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            if len(words) < 2 or words[1] not in _FORMATS:
                raise PlyError(f"{path}: unsupported format line {line.strip()!r}")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise PlyError(f"{path}: bad element line {line.strip()!r}")
            elements.append({"name": words[1], "count": int(words[2]), "props": []})
        elif words[0] == "property":
            if not elements:
                raise PlyError(f"{path}: property before any element: {line.strip()!r}")
            if words[1] == "list":
                if len(words) != 5 or words[2] not in _TYPES or words[3] not in _TYPES:
                    raise PlyError(f"{path}: bad list property {line.strip()!r}")
                elements[-1]["props"].append((words[4], _TYPES[words[2]], _TYPES[words[3]]))
            else:
                if len(words) != 3 or words[1] not in _TYPES:
                    raise PlyError(f"{path}: bad property {line.strip()!r}")
                elements[-1]["props"].append((words[2], _TYPES[words[1]], None))
        else:
            raise PlyError(f"{path}: unknown header line {line.strip()!r}")
    if fmt is None:
        raise PlyError(f"{path}: header has no format line")
    return fmt, elements


def _read_binary_element(buf: memoryview, pos: int, el: dict, order: str, path: Path):
    """Parse one element from a binary buffer; return (dict of arrays, new position)."""
    n = el["count"]
    props = el["props"]
    name = el["name"]
    if all(item is None for _, _, item in props):  # all scalars: one structured read
        dtype = np.dtype([(p, order + t) for p, t, _ in props])
        need = n * dtype.itemsize
        if pos + need > len(buf):
            raise PlyError(f"{path}: truncated in element '{name}' ({len(buf) - pos} of {need} bytes)")
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=pos)
        return {p: arr[p].astype(arr[p].dtype.newbyteorder("=")) for p, _, _ in props}, pos + need
    # Elements with lists (faces). Fast path: a single list property whose lists all have the
    # length of the first one (triangles), checked after reading.
    if len(props) == 1 and n > 0:
        pname, ctype, itype = props[0]
        cdt, idt = np.dtype(order + ctype), np.dtype(order + itype)
        if pos + cdt.itemsize > len(buf):
            raise PlyError(f"{path}: truncated in element '{name}'")
        k = int(np.frombuffer(buf, dtype=cdt, count=1, offset=pos)[0])
        rec = np.dtype([("n", cdt), ("v", idt, (k,))])
        if pos + n * rec.itemsize <= len(buf):
            arr = np.frombuffer(buf, dtype=rec, count=n, offset=pos)
            if (arr["n"] == k).all():
                return {pname: arr["v"].astype(idt.newbyteorder("="))}, pos + n * rec.itemsize
    # General path: walk the records one by one.
    out: dict[str, list] = {p: [] for p, _, _ in props}
    for _ in range(n):
        for pname, ctype, itype in props:
            cdt = np.dtype(order + ctype)
            if pos + cdt.itemsize > len(buf):
                raise PlyError(f"{path}: truncated in element '{name}'")
            value = np.frombuffer(buf, dtype=cdt, count=1, offset=pos)[0]
            pos += cdt.itemsize
            if itype is None:
                out[pname].append(value)
                continue
            idt = np.dtype(order + itype)
            k = int(value)
            if k < 0 or pos + k * idt.itemsize > len(buf):
                raise PlyError(f"{path}: truncated or bad list length {k} in element '{name}'")
            out[pname].append(np.frombuffer(buf, dtype=idt, count=k, offset=pos).astype(idt.newbyteorder("=")))
            pos += k * idt.itemsize
    return {p: _finish_list(v, t, it) for (p, t, it), v in zip(props, out.values())}, pos


def _finish_list(values: list, ctype: str, itype: str | None):
    if itype is None:
        return np.asarray(values, dtype=ctype)
    lengths = {len(v) for v in values}
    if len(lengths) == 1:
        return np.stack(values).astype(itype)
    return values


def _read_ascii(text: bytes, elements: list[dict], path: Path) -> dict:
    tokens = text.split()
    pos = 0
    result = {}
    for el in elements:
        props = el["props"]
        name = el["name"]
        if all(item is None for _, _, item in props):
            need = el["count"] * len(props)
            if pos + need > len(tokens):
                raise PlyError(f"{path}: truncated in element '{name}'")
            try:
                table = np.array(tokens[pos:pos + need], dtype=np.float64).reshape(el["count"], len(props))
            except ValueError as exc:
                raise PlyError(f"{path}: bad number in element '{name}': {exc}") from None
            pos += need
            result[name] = {p: table[:, i].astype(t) for i, (p, t, _) in enumerate(props)}
            continue
        out: dict[str, list] = {p: [] for p, _, _ in props}
        try:
            for _ in range(el["count"]):
                for pname, ctype, itype in props:
                    value = float(tokens[pos])
                    pos += 1
                    if itype is None:
                        out[pname].append(value)
                    else:
                        k = int(value)
                        out[pname].append(np.array(tokens[pos:pos + k], dtype=np.float64).astype(itype))
                        if len(out[pname][-1]) != k:
                            raise IndexError
                        pos += k
        except (IndexError, ValueError):
            raise PlyError(f"{path}: truncated or bad value in element '{name}'") from None
        result[name] = {p: _finish_list(v, t, it) for (p, t, it), v in zip(props, out.values())}
    return result


def read_ply(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read a PLY file: {element: {property: array}}. Raises PlyError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PLY file not found")
    with open(path, "rb") as f:
        fmt, elements = _parse_header(f, path)
        body = f.read()
    if fmt == "ascii":
        return _read_ascii(body, elements, path)
    order = _FORMATS[fmt]
    buf = memoryview(body)
    pos = 0
    result = {}
    for el in elements:
        result[el["name"]], pos = _read_binary_element(buf, pos, el, order, path)
    return result


def write_ply(path: str | Path, vertex: dict[str, np.ndarray], faces: np.ndarray | None = None,
              binary: bool = True, comments: list[str] | tuple[str, ...] = ()) -> Path:
    """Write vertices (ordered dict of equal-length 1-D arrays; dtypes kept) and optional (M, k)
    faces as ``list uchar int vertex_indices``; `comments` become header comment lines (one line
    each). Atomic: temp file in the same dir + os.replace."""
    path = Path(path)
    names = list(vertex)
    n = len(vertex[names[0]]) if names else 0
    for name in names:
        if vertex[name].shape != (n,):
            raise ValueError(f"{path}: vertex property '{name}' has shape {vertex[name].shape}, expected ({n},)")
    lines = ["ply", "format " + ("binary_little_endian" if binary else "ascii") + " 1.0",
             "comment written by rayseg"]
    lines += ["comment " + " ".join(str(c).split()) for c in comments]
    lines.append(f"element vertex {n}")
    for name in names:
        lines.append(f"property {_NAMES[np.dtype(vertex[name].dtype).str[1:]]} {name}")
    if faces is not None:
        faces = np.asarray(faces)
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    header = ("\n".join(lines) + "\n").encode("ascii")
    if binary:
        dtype = np.dtype([(nm, "<" + np.dtype(vertex[nm].dtype).str[1:]) for nm in names])
        table = np.empty(n, dtype=dtype)
        for nm in names:
            table[nm] = vertex[nm]
        body = table.tobytes()
        if faces is not None:
            rec = np.dtype([("n", "u1"), ("v", "<i4", (faces.shape[1],))])
            frec = np.empty(len(faces), dtype=rec)
            frec["n"] = faces.shape[1]
            frec["v"] = faces
            body += frec.tobytes()
    else:
        rows = [" ".join(str(vertex[nm][i].item()) for nm in names) for i in range(n)]
        if faces is not None:
            rows += [" ".join([str(faces.shape[1])] + [str(int(v)) for v in face]) for face in faces]
        body = ("\n".join(rows) + "\n").encode("ascii")
    return atomic.write_bytes(path, header + body)
