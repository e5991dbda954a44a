"""EMA teacher: whole-state EMA (parameters and BN buffers), frozen copy, DDP unwrapping."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rayseg.teacher import decay_at, ema_update, make_teacher, unwrap


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def train_step(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = model(torch.randn(8, 3, generator=gen) * 3 + 1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_make_teacher_is_a_frozen_eval_copy():
    student = small_net()
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (name, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), f"{name} shares storage with the student"


def test_ema_update_parameters_and_bn_buffers():
    student = small_net()
    teacher = make_teacher(student)
    decay = 0.9
    for step in range(3):
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        train_step(student, seed=step)  # moves weights and BN running stats, bumps num_batches_tracked
        ema_update(teacher, student, decay)
        current = student.state_dict()
        for name, value in teacher.state_dict().items():
            if name.endswith("num_batches_tracked"):
                assert value.dtype == torch.int64 and value.item() == step + 1  # copied
                assert value.item() == current[name].item()
            else:
                expected = decay * before[name] + (1 - decay) * current[name]
                torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
    # the BN running stats really moved (the test above was not comparing constants)
    assert not torch.allclose(teacher[1].running_mean, torch.zeros(4))
    assert not torch.allclose(teacher[1].running_var, torch.ones(4))


def test_teacher_forward_in_eval_mode_leaves_its_bn_buffers_alone():
    teacher = make_teacher(small_net())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        teacher(torch.randn(8, 3) * 5)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_decay_extremes_and_errors():
    student = small_net()
    teacher = make_teacher(student)
    train_step(student, seed=1)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)  # decay 1: floats unchanged
    assert torch.equal(teacher[0].weight, frozen["0.weight"])
    ema_update(teacher, student, 0.0)  # decay 0: exact copy
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError, match="teacher and student differ in parameters"):
        ema_update(teacher, nn.Sequential(nn.Linear(3, 4)), 0.9)


def test_ema_ramp_makes_the_teacher_the_mean_of_the_students_so_far():
    """With the ramp the teacher after step t is the plain mean of the t+1 students (until the
    decay caps it), so none of its random init is left; without it, decay^t of the init stays."""
    student = small_net()
    init = {k: v.clone() for k, v in student.state_dict().items()}
    ramped, fixed = make_teacher(student), make_teacher(student)
    with torch.no_grad():
        for p in ramped.parameters():  # a teacher unlike the student, as a random init would be
            p.add_(10.0)
    seen = []
    for step in range(5):
        train_step(student, seed=step)
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
        ema_update(ramped, student, decay_at(0.99, step, ramp=True))
        ema_update(fixed, student, decay_at(0.99, step, ramp=False))
    for name, value in ramped.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([s[name] for s in seen]).mean(0), rtol=1e-5, atol=1e-6)
    w = "0.weight"  # the fixed decay keeps 0.99^5 of the init
    expected = init[w] * 0.99 ** 5 + sum(0.01 * 0.99 ** (4 - i) * s[w] for i, s in enumerate(seen))
    torch.testing.assert_close(fixed.state_dict()[w], expected, rtol=1e-5, atol=1e-6)
    assert decay_at(0.99, 0, True) == 0.0 and decay_at(0.99, 10_000, True) == 0.99
    assert decay_at(0.999, 3, False) == 0.999


def test_state_dict_round_trip():
    student = small_net()
    teacher = make_teacher(student)
    train_step(student, seed=2)
    ema_update(teacher, student, 0.999)
    restored = make_teacher(small_net())
    restored.load_state_dict(teacher.state_dict())
    for name, value in restored.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(restored(x), teacher(x))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student = nn.parallel.DistributedDataParallel(small_net())
        teacher = make_teacher(student)
        assert unwrap(student) is student.module
        assert not any(k.startswith("module.") for k in teacher.state_dict())
        train_step(student, seed=10 + rank)  # different data per rank; DDP averages the gradients
        ema_update(teacher, student, 0.5)
        weight = teacher[0].weight.detach().clone()
        gathered = [torch.zeros_like(weight) for _ in range(world)]
        torch.distributed.all_gather(gathered, weight)
        assert torch.equal(gathered[0], gathered[1]), "teacher weights differ across ranks"
        torch.testing.assert_close(weight, 0.5 * small_net()[0].weight + 0.5 * student.module[0].weight)
    finally:
        torch.distributed.destroy_process_group()


def test_ema_on_ddp_wrapped_student_two_gloo_processes():
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)
