"""Moving a collated batch to a device: shared by training, evaluation, pseudo-labelling and
export without importing the training loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Batch keys that stay numpy / python (never tensors).
_NON_TENSOR = {"scene_id"}


def to_device(batch: dict, device: torch.device) -> dict:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k in _NON_TENSOR or not isinstance(v, np.ndarray):
            out[k] = v
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
    return out
