"""A method's gradient transform under ZeRO equals the single-device step (issue #6).

LoRA-One's preconditioners need whole A and B matrices, but ZeRO's optimizer holds flat
partitions; the harness assembles the full gradients at the accumulation boundary, clips
them and applies the transform (`ClipAndTransform`), with DeepSpeed's own clipping off.
Here 2 gloo ranks x 2 micro-batches train a toy under ZeRO-2 and ZeRO-3 (parameters really
partitioned) and must land on the parameters of `harness.training.train.train_step` on one device.

The toy's loss is a mean over "kept" terms, like a causal LM's mean over labelled tokens:
with micro-batches holding different numbers of terms, `global_batch_step` must weight them
so the gradient is the whole batch's mean, not a mean of micro-batch means.
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
from harness.spec.config import DistributedConfig
from harness.training.train import apply_gradient_transform, train_step

STEPS, LR, WEIGHT_DECAY, MAX_NORM, RANK = 3, 0.05, 0.01, 0.05, 4
GLOBAL_BATCH, WORLD, MICRO = 8, 2, 2


class Regressor(nn.Module):
    """A 2-layer regression model with the `model(**batch).loss` interface (no dropout, so
    every path computes the same function)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(32, 24), nn.Linear(24, 1)

    def forward(self, x, labels, keep):
        out = self.fc2(torch.tanh(self.fc1(x)))
        errors = (out.squeeze(-1) - labels) ** 2
        return SimpleNamespace(loss=(errors * keep).sum() / keep.sum(), logits=out)


def kept_terms(batch: dict) -> int:  # the pipeline's `loss_terms` for this toy
    return int(batch["keep"].sum())


# Per row of the global batch; rank r holds rows 4r..4r+3 as micro-batches of 2, so the
# uneven mask gives the four micro-batches 2, 2, 1 and 1 terms.
KEEP = {"even": [1.0] * 8, "uneven": [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]}


def _data(keep: str = "even") -> tuple[list[dict], dict]:
    g = torch.Generator().manual_seed(7)
    init = [{"x": torch.randn(8, 32, generator=g), "labels": torch.randn(8, generator=g),
             "keep": torch.ones(8)}]  # fmt: skip
    train = {
        "x": torch.randn(GLOBAL_BATCH, 32, generator=g),
        "labels": 3 * torch.randn(GLOBAL_BATCH, generator=g),
        "keep": torch.tensor(KEEP[keep]),
    }
    return init, train


def _prepared(optimizer: str, keep: str = "even"):
    """LoRA-One on fc1 (the preconditioned pair) with fc2 as a trainable head (clipped, not
    preconditioned)."""
    init, train = _data(keep)
    method = methods.get_method("lora_one")
    hp = method.hyperparams(
        {"rank": RANK, "alpha": 8, "init_batches": 1, "stable_gamma": 1.0,
         "target_modules": ["fc1"], "optimizer": optimizer, "precond_damping": 0.05}
    )  # fmt: skip
    ctx = methods.PrepareContext(["fc2"], ["fc1"], init_batches=lambda n: iter(init))
    return method, hp, method.prepare(Regressor(), hp, ctx), train


def _single_device(
    optimizer: str, keep: str = "even", transform_first: bool = False
) -> dict[str, torch.Tensor]:
    method, hp, model, train = _prepared(optimizer, keep)
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


def _zero_rank(rank: int, stage: int, optimizer: str, keep: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import deepspeed

    from harness.deepspeed.config import render
    from harness.deepspeed.engine import ClipAndTransform, disable_shm_comm, global_batch_step
    from harness.deepspeed.zero_access import ZeroParamAccess, trainable_parameters

    disable_shm_comm(deepspeed)
    method, hp, model, train = _prepared(optimizer, keep)
    transform = method.gradient_transform(hp)
    config = render(
        DistributedConfig(workers=WORLD, zero_stage=stage, micro_batch_size=MICRO),
        global_batch=GLOBAL_BATCH,
        # As DeepSpeedBackend renders it: the harness clips for a method with a gradient transform.
        max_grad_norm=None if transform else MAX_NORM,
        on_gpu=False,
    )
    if stage == 3:  # partition even these small matrices, as an 8B model's would be
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=method.build_optimizer(model, LR, hp, WEIGHT_DECAY), config=config
    )
    access = ZeroParamAccess(engine, stage)
    hook = ClipAndTransform(engine.module, access, transform, MAX_NORM) if transform else None
    share = GLOBAL_BATCH // WORLD
    rows = range(rank * share, (rank + 1) * share)
    micro = [{k: v[list(rows)[i : i + MICRO]] for k, v in train.items()}
             for i in range(0, share, MICRO)]  # fmt: skip
    for _ in range(STEPS):
        global_batch_step(engine, micro, kept_terms, hook)
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


def _run_zero(tmp_path: Path, stage: int, optimizer: str, keep: str) -> dict:
    out = str(tmp_path / "rank0.pt")
    args = (stage, optimizer, keep, _free_port(), out)
    mp.spawn(_zero_rank, args=args, nprocs=WORLD, join=True)
    result = torch.load(out)
    assert result["partitioned"] == (stage == 3)  # ZeRO-3 really split the parameters
    return result["params"]


def _assert_equal_to_one_device(zero: dict, optimizer: str, keep: str) -> None:
    reference = _single_device(optimizer, keep)
    assert set(zero) == set(reference) and any(".lora_A." in n for n in zero)
    initial = {n: p.detach() for n, p in _prepared(optimizer)[2].named_parameters()}
    for name, value in reference.items():
        assert not torch.allclose(value, initial[name])  # every trainable moved
        torch.testing.assert_close(zero[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "optimizer"), [(2, "precond_sgd"), (3, "precond_adamw")])
def test_preconditioned_steps_under_zero_equal_one_device(tmp_path: Path, stage, optimizer):
    pytest.importorskip("deepspeed")
    zero = _run_zero(tmp_path, stage, optimizer, "even")
    _assert_equal_to_one_device(zero, optimizer, "even")
    # The same tolerance tells the orders apart: DeepSpeed's (clip after the transform)
    # would have failed this test.
    other = _single_device(optimizer, transform_first=True)
    with pytest.raises(AssertionError):
        for name, value in other.items():
            torch.testing.assert_close(zero[name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "optimizer"), [(3, "adamw"), (2, "precond_sgd")])
def test_uneven_loss_terms_give_the_whole_batch_mean(tmp_path: Path, stage, optimizer):
    """Micro-batches with 2, 2, 1 and 1 loss terms (a causal LM's labelled tokens vary so):
    the ZeRO run equals one device's mean over the batch's terms, with DeepSpeed clipping
    (adamw) or the harness's (precond_sgd)."""
    pytest.importorskip("deepspeed")
    zero = _run_zero(tmp_path, stage, optimizer, "uneven")
    _assert_equal_to_one_device(zero, optimizer, "uneven")


# ------------------------------------------------ data-informed init batches, token-weighted


def _causal_pipeline():
    from harness.heads.pipelines import Pipeline, pad_causal_batch, target_tokens_in
    from tasks.generative import IGNORE_INDEX

    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(16):  # answers of 1 to 12 labelled tokens: micro-batches differ a lot
        prompt, answer = (int(v) for v in torch.randint(1, 13, (2,), generator=g))
        ids = torch.randint(3, 20, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})  # fmt: skip
    return Pipeline(None, rows, pad_causal_batch(0), {}, loss_terms=target_tokens_in)


def _init_gradients(batches) -> dict[str, torch.Tensor]:
    from methods.grad_estimator import layer_gradients
    from methods.peft_lora import matching_linear_layers
    from tests.builders import word_llama

    model = word_llama(vocab=20)
    layers = dict(matching_linear_layers(model, ["q_proj", "v_proj"], []))
    grads = layer_gradients(model, layers, batches)
    return {name: grads.pop_mean(name) for name in list(grads)}


def _init_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from harness.deepspeed.rank_data import RankShares
    from harness.training.batching import batch_plan
    from methods.base import model_inputs

    shares = RankShares(_causal_pipeline(), batch_plan(GLOBAL_BATCH, WORLD, MICRO), rank, "cpu")
    weighted = _init_gradients(shares.init_batches(seed=1)(2))
    unweighted = _init_gradients(model_inputs(b) for b in shares.init_batches(seed=1)(2))
    if rank == 0:
        torch.save({"weighted": weighted, "unweighted": unweighted}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_init_gradient_equals_one_device_for_token_losses(tmp_path: Path):
    """LoRA-GA / LoRA-One / LoRA-SB start from the mean init gradient: on 2 ranks x 2
    micro-batches of a causal LM with uneven answer lengths it equals one device's mean over
    the same whole batches; the plain mean over micro-batches would not."""
    from itertools import islice

    out = str(tmp_path / "init.pt")
    mp.spawn(_init_rank, args=(_free_port(), out), nprocs=WORLD, join=True)
    result = torch.load(out)
    single = _init_gradients(islice(_causal_pipeline().batches(GLOBAL_BATCH, 1, "cpu"), 2))
    assert set(single) == set(result["weighted"]) and single
    for name, value in single.items():
        torch.testing.assert_close(result["weighted"][name], value, atol=1e-6, rtol=1e-5)
    gaps = [float((result["unweighted"][n] - v).norm() / v.norm()) for n, v in single.items()]
    assert max(gaps) > 0.05, gaps
