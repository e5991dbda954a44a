"""The one place rayseg imports torchvision.

The torchvision wheel that matches the CPU torch pin is a CUDA build: its C extension does not
load on CPU torch and `import torchvision` then fails on the missing `torchvision::nms` operator
schema. Declaring the two schemas it looks up makes the import work (the models run; the
detection ops such as `torchvision.ops.nms` do not). Only done when the plain import fails.
"""

from __future__ import annotations

import importlib
import sys

_schema_library = None  # kept alive: dropping the Library object would undefine the schemas


def import_torchvision():
    """`torchvision`, imported with the CPU workaround when the plain import fails."""
    global _schema_library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules behind
    if _schema_library is None:
        _schema_library = torch.library.Library("torchvision", "DEF")
        _schema_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schema_library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")
