"""EMA teacher (METHOD.md, RPC step 1): an exponential moving average of the student's WHOLE state.

- Initialised as a deep copy of the (unwrapped) student; its parameters never require grad.
- ``ema_update`` after every optimiser step: every floating-point parameter AND floating-point
  buffer (BatchNorm running_mean / running_var) becomes ``decay * teacher + (1 - decay) * student``;
  integer buffers (BatchNorm num_batches_tracked) are copied from the student.
- BatchNorm semantics: the teacher is kept in eval mode, so it normalises with its own running
  statistics (themselves the EMA of the student's) and its forward passes never change them;
  its state changes only through ``ema_update``. Call ``teacher.eval()`` again if anything put
  it in train mode.
- A DDP-wrapped (or torch.compile'd) student is unwrapped first, so teacher keys never carry a
  ``module.`` prefix; the teacher itself is a plain module and is not wrapped in DDP. Every rank
  applies the same update to the same (all-reduced) student parameters, so teacher parameters
  stay identical across ranks; BN running statistics follow each rank's student buffers (DDP
  re-broadcasts rank 0's student buffers every forward), so they may differ slightly per rank
  unless the student uses SyncBatchNorm. Checkpoint rank 0's teacher.
- Checkpoints: ``teacher.state_dict()`` / ``load_state_dict`` as for any module.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student (parameters without grad, eval mode)."""
    teacher = copy.deepcopy(unwrap(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def decay_at(decay: float, step: int, ramp: bool) -> float:
    """The EMA decay used after optimiser step `step` (0-based): `decay`, or with Mean Teacher's
    ramp min(decay, 1 - 1/(step + 1)) (the first update copies the student)."""
    return min(decay, 1.0 - 1.0 / (step + 1)) if ramp else decay


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for float parameters and buffers;
    non-float buffers copied. Raises if the two modules do not hold the same named tensors."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    student = unwrap(student)
    for kind, t_items, s_items in (
        ("parameter", teacher.named_parameters(), student.named_parameters()),
        ("buffer", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            diff = sorted(set(t_dict) ^ set(s_dict))
            raise ValueError(f"teacher and student differ in {kind}s: {diff[:5]}")
        for name, t in t_dict.items():
            s = s_dict[name].detach()
            if t.shape != s.shape:
                raise ValueError(f"{kind} {name}: teacher shape {tuple(t.shape)} != student {tuple(s.shape)}")
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - decay)  # t + (1-decay)(s - t) = decay t + (1-decay) s
            else:
                t.copy_(s)
