"""A method's gradient transform under ZeRO equals the single-device step (issue #6).

LoRA-One's preconditioners need whole A and B matrices, but ZeRO's optimizer holds flat
partitions; the harness assembles the full gradients at the accumulation boundary, clips
them and applies the transform (`ClipAndTransform`), with DeepSpeed's own clipping off.
Here 2 gloo ranks x 2 micro-batches train a toy under ZeRO-2 and ZeRO-3 (parameters really
partitioned) and must land on the parameters of `harness.train.train_step` on one device.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import methods
from harness.config import DistributedConfig
from harness.train import apply_gradient_transform, train_step

STEPS, LR, WEIGHT_DECAY, MAX_NORM, RANK = 3, 0.05, 0.01, 0.05, 4
GLOBAL_BATCH, WORLD, MICRO = 8, 2, 2


class Regressor(nn.Module):
    """A 2-layer regression model with the `model(**batch).loss` interface (no dropout, so
    every path computes the same function)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(32, 24), nn.Linear(24, 1)

    def forward(self, x, labels):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return SimpleNamespace(loss=((out.squeeze(-1) - labels) ** 2).mean(), logits=out)


def _data() -> tuple[list[dict], dict]:
    g = torch.Generator().manual_seed(7)
    init = [{"x": torch.randn(8, 32, generator=g), "labels": torch.randn(8, generator=g)}]
    train = {
        "x": torch.randn(GLOBAL_BATCH, 32, generator=g),
        "labels": 3 * torch.randn(GLOBAL_BATCH, generator=g),
    }
    return init, train


def _prepared(optimizer: str):
    """LoRA-One on fc1 (the preconditioned pair) with fc2 as a trainable head (clipped, not
    preconditioned)."""
    init, train = _data()
    method = methods.get_method("lora_one")
    hp = method.hyperparams(
        {"rank": RANK, "alpha": 8, "init_batches": 1, "stable_gamma": 1.0,
         "target_modules": ["fc1"], "optimizer": optimizer, "precond_damping": 0.05}
    )  # fmt: skip
    ctx = methods.PrepareContext(["fc2"], ["fc1"], init_batches=lambda n: iter(init))
    return method, hp, method.prepare(Regressor(), hp, ctx), train


def _single_device(optimizer: str, transform_first: bool = False) -> dict[str, torch.Tensor]:
    method, hp, model, train = _prepared(optimizer)
    opt = method.build_optimizer(model, LR, hp, WEIGHT_DECAY)
    transform = method.gradient_transform(hp)
    for _ in range(STEPS):
        if transform_first:  # DeepSpeed's order had it clipped: transform, then clip
            model(**train).loss.backward()
            apply_gradient_transform(model, transform)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           MAX_NORM)  # fmt: skip
            opt.step()
            opt.zero_grad()
        else:
            train_step(model, train, opt, None, MAX_NORM, transform)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _zero_rank(rank: int, stage: int, optimizer: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import deepspeed

    from harness.deepspeed_config import render
    from harness.distributed import (
        ClipAndTransform,
        ZeroParamAccess,
        _no_shm_comm,
        micro_step,
        trainable_parameters,
    )

    _no_shm_comm(deepspeed)
    method, hp, model, train = _prepared(optimizer)
    config = render(
        DistributedConfig(workers=WORLD, zero_stage=stage, micro_batch_size=MICRO),
        global_batch=GLOBAL_BATCH,
        max_grad_norm=None,  # as _run_rank renders it for a method with a gradient transform
        on_gpu=False,
    )
    if stage == 3:  # partition even these small matrices, as an 8B model's would be
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=method.build_optimizer(model, LR, hp, WEIGHT_DECAY), config=config
    )
    access = ZeroParamAccess(engine, stage)
    hook = ClipAndTransform(engine.module, access, method.gradient_transform(hp), MAX_NORM)
    share = GLOBAL_BATCH // WORLD
    rows = range(rank * share, (rank + 1) * share)
    micro = [{k: v[list(rows)[i : i + MICRO]] for k, v in train.items()}
             for i in range(0, share, MICRO)]  # fmt: skip
    for _ in range(STEPS):
        for batch in micro:
            micro_step(engine, batch, hook)
    named = trainable_parameters(engine.module)
    partitioned = any(p.numel() == 0 for _, p in named)
    final = {n: access.read(p).cpu() for n, p in named}
    # Parameter writes (SDS-LoRA's path) also take sizes that do not divide by the world
    # size (fc2.bias: 1 element on 2 ranks); write() reads each value back and raises.
    access.write([(p, final[n] + 1.0) for n, p in named])
    assert all(torch.equal(access.read(p).cpu(), final[n] + 1.0) for n, p in named)
    if rank == 0:
        torch.save({"params": final, "partitioned": partitioned}, out)
    dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "optimizer"), [(2, "precond_sgd"), (3, "precond_adamw")])
def test_preconditioned_steps_under_zero_equal_one_device(tmp_path: Path, stage, optimizer):
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_zero_rank, args=(stage, optimizer, _free_port(), out), nprocs=WORLD, join=True)
    result = torch.load(out)
    assert result["partitioned"] == (stage == 3)  # ZeRO-3 really split the parameters
    zero, reference = result["params"], _single_device(optimizer)
    assert set(zero) == set(reference) and any(".lora_A." in n for n in zero)
    initial = {n: p.detach() for n, p in _prepared(optimizer)[2].named_parameters()}
    for name, value in reference.items():
        assert not torch.allclose(value, initial[name])  # every trainable moved
        torch.testing.assert_close(zero[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # The same tolerance tells the orders apart: DeepSpeed's (clip after the transform)
    # would have failed this test.
    other = _single_device(optimizer, transform_first=True)
    with pytest.raises(AssertionError):
        for name, value in other.items():
            torch.testing.assert_close(zero[name], value, atol=1e-5, rtol=1e-4)
