"""The optimizer step both training loops share (harness.training.train's `boundary_step`,
`LossHistory`): clip, then the method's gradient transform, then the update; the loss rules.

One device reaches the gradients as `.grad` (`LocalGradients`); the ZeRO loop through
ZeroParamAccess, which hands out assembled copies and scatters what it is given back. Here a
copying access stands in for ZeRO, so the two paths' step can be compared bit for bit
without DeepSpeed (tests/test_zero_gradients runs the real ZeRO-2/3 engines)."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness.deepspeed.engine import ClipAndTransform
from harness.training.train import (
    Diverged,
    LocalGradients,
    LossHistory,
    boundary_step,
    clip_then_transform,
    train_step,
)
from methods.lora_one import riemannian_preconditioner


class CopyingAccess:
    """A GradientAccess like ZeroParamAccess: reads hand out copies of the full tensors, and
    only a write changes the gradient the optimizer will see."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, param: nn.Parameter) -> torch.Tensor:
        return param.detach().clone()

    def read_grad(self, param: nn.Parameter) -> torch.Tensor:
        self.reads += 1
        return param.grad.clone()

    def write_grad(self, param: nn.Parameter, value: torch.Tensor) -> None:
        param.grad = value.clone()


class LoraPair(nn.Module):
    """One LoRA pair (peft's parameter names, which the transforms match) and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer = nn.Module()
        self.layer.lora_A = nn.ParameterDict(
            {"default": nn.Parameter(torch.randn(3, 6, generator=g))}
        )
        self.layer.lora_B = nn.ParameterDict(
            {"default": nn.Parameter(torch.randn(5, 3, generator=g))}
        )
        self.head = nn.Linear(5, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, 5, generator=g))
            self.head.bias.copy_(torch.randn(2, generator=g))

    def forward(self, x, labels):
        hidden = x @ self.layer.lora_A["default"].T @ self.layer.lora_B["default"].T
        loss = nn.functional.cross_entropy(self.head(torch.tanh(hidden)), labels)
        return SimpleNamespace(loss=loss)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": 4 * torch.randn(8, 6, generator=g),
        "labels": torch.randint(0, 2, (8,), generator=g),
    }


def _with_grads(module: nn.Module, seed: int) -> list[tuple[str, nn.Parameter]]:
    module(**_batch(seed)).loss.backward()
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def test_the_boundary_step_clips_then_transforms_then_updates_as_computed_by_hand():
    a = nn.Parameter(torch.zeros(2, 2))
    b = nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    b.grad = torch.tensor([4.0, -2.0, 1.0])
    raw = [a.grad.tolist(), b.grad.tolist()]
    max_norm = 2.0

    def transform(params, grads):  # not scale-equivariant: the order of clipping shows
        seen["grads"] = {n: g.clone() for n, g in grads.items()}
        return {"a": 2 * grads["a"], "b": grads["b"] + 1.0}

    def update():  # runs last: it must see the transformed gradients
        seen["at_update"] = (a.grad.clone(), b.grad.clone())

    seen: dict = {}
    norm = boundary_step(
        [a, b], LocalGradients(), update, max_grad_norm=max_norm, transform=transform,
        names=["a", "b"],
    )  # fmt: skip

    flat = [v for row in raw[0] for v in row] + raw[1]
    hand_norm = math.sqrt(sum(v * v for v in flat))
    coef = min(1.0, max_norm / (hand_norm + 1e-6))
    assert coef < 0.5  # clipping really scales here
    assert float(norm) == pytest.approx(hand_norm, rel=1e-6)  # the norm before clipping
    clipped_a = torch.tensor(raw[0]) * coef
    clipped_b = torch.tensor(raw[1]) * coef
    torch.testing.assert_close(seen["grads"]["a"], clipped_a)  # the transform saw clipped
    torch.testing.assert_close(seen["grads"]["b"], clipped_b)
    expected = (2 * clipped_a, clipped_b + 1.0)
    for got, want in zip(seen["at_update"], expected, strict=True):
        torch.testing.assert_close(got, want)
    # The other order (transform, then clip) is a different step: the check can tell.
    transformed = [2 * torch.tensor(raw[0]), torch.tensor(raw[1]) + 1.0]
    other_norm = math.sqrt(sum(float((t * t).sum()) for t in transformed))
    other = transformed[1] * min(1.0, max_norm / (other_norm + 1e-6))
    assert not torch.allclose(other, expected[1], atol=1e-3)


def test_one_device_and_the_zero_hook_take_the_same_step_bit_for_bit():
    """The local step (`.grad` in place) and harness.deepspeed's boundary hook over a
    ZeRO-like copying access: the same clipped, preconditioned gradients, to the bit."""
    transform = riemannian_preconditioner(0.05)
    local, zero_like = LoraPair(), LoraPair()
    named_local, named_zero = _with_grads(local, 1), _with_grads(zero_like, 1)
    before = {n: p.grad.clone() for n, p in named_local}
    assert all(torch.equal(before[n], p.grad) for n, p in named_zero)
    updates = []

    boundary_step(
        [p for _, p in named_local], LocalGradients(), lambda: updates.append("local"),
        max_grad_norm=0.5, transform=transform, names=[n for n, _ in named_local],
    )  # fmt: skip
    access = CopyingAccess()
    ClipAndTransform(zero_like, access, transform, 0.5)(lambda: updates.append("zero"))

    assert updates == ["local", "zero"] and access.reads == len(named_zero)
    for (name, p), (_, q) in zip(named_local, named_zero, strict=True):
        assert torch.equal(p.grad, q.grad), name
        assert not torch.allclose(p.grad, before[name])  # clipped (and preconditioned)
    # The head is clipped only; the LoRA pair is preconditioned after clipping.
    total = torch.nn.utils.get_total_norm(list(before.values()))
    coef = 0.5 / (total + 1e-6)
    assert coef < 1
    torch.testing.assert_close(local.head.weight.grad, before["head.weight"] * coef)


def test_train_step_is_torchs_clip_then_the_transform_in_the_optimizers_order():
    """train_step against the plain torch sequence it stands for: backward, clip_grad_norm_
    over the optimizer's parameters (two groups, in an order unlike the module's), the
    transform on the clipped gradients, optimizer step - equal to the bit, step after step."""
    transform = riemannian_preconditioner(0.05)
    ours, reference = LoraPair(), LoraPair()

    def optimizer(module: LoraPair) -> torch.optim.Optimizer:
        lora = [module.layer.lora_B["default"], module.layer.lora_A["default"]]
        return torch.optim.AdamW(
            [{"params": list(module.head.parameters()), "lr": 1e-2}, {"params": lora, "lr": 3e-2}]
        )

    ours_opt, ref_opt = optimizer(ours), optimizer(reference)
    names = {id(p): n for n, p in reference.named_parameters()}
    for step in range(3):
        stats: dict[str, float] = {}
        loss = train_step(ours, _batch(10 + step), ours_opt, None, 0.3, transform, stats)

        ref_loss = reference(**_batch(10 + step)).loss
        ref_loss.backward()
        params = [p for g in ref_opt.param_groups for p in g["params"]]
        ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
        with torch.no_grad():
            rewritten = transform(
                {names[id(p)]: p.detach() for p in params}, {names[id(p)]: p.grad for p in params}
            )
            for p in params:
                if names[id(p)] in rewritten:
                    p.grad.copy_(rewritten[names[id(p)]])
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

        assert loss == ref_loss.item() and stats["grad_norm"] == float(ref_norm)
        assert stats["lr"] == 1e-2
        for (name, p), (_, q) in zip(
            ours.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert torch.equal(p, q), (step, name)


def test_with_nothing_to_clip_transform_or_measure_no_gradient_is_read():
    # Under ZeRO every gradient read is a collective; a step without harness clipping or a
    # transform must not pay for one.
    class Unreadable(CopyingAccess):
        def read_grad(self, param):
            raise AssertionError("read a gradient")

    calls = []
    norm = boundary_step([nn.Parameter(torch.ones(2))], Unreadable(), lambda: calls.append(1),
                         max_grad_norm=None)  # fmt: skip
    assert norm is None and calls == [1]
    with pytest.raises(ValueError, match="names"):  # a transform finds its pairs by name
        clip_then_transform([nn.Parameter(torch.ones(2))], LocalGradients(), None, lambda p, g: {})


def test_loss_history_keeps_the_curve_and_final_loss_and_stops_a_diverged_run():
    total = 120  # a curve point every 120 // 50 = 2 steps
    g = torch.Generator().manual_seed(0)
    values = [float(v) for v in 0.5 + torch.rand(total, generator=g, dtype=torch.float64)]
    history = LossHistory(total)
    for step, loss in enumerate(values[:60], start=1):
        history.record(step, loss)
    # A restored run continues from its checkpoint's lists, in place.
    restored = LossHistory(total, history.losses, history.curve)
    for step, loss in enumerate(values[60:], start=61):
        restored.record(step, loss)

    assert restored.losses is history.losses and restored.losses == values
    expected = [(s, statistics.fmean(values[s - 2 : s])) for s in range(2, total + 1, 2)]
    assert [s for s, _ in restored.curve] == [s for s, _ in expected]
    assert [v for _, v in restored.curve] == pytest.approx([v for _, v in expected], rel=1e-14)
    assert restored.final_loss == pytest.approx(statistics.fmean(values[-12:]), rel=1e-14)
    assert LossHistory(7, [1.0, 2.0, 4.0]).final_loss == 4.0  # at least one step

    odd = LossHistory(5)  # the last step always closes the curve
    for step in range(1, 6):
        odd.record(step, float(step))
    assert odd.curve == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]

    diverging = LossHistory(10)
    diverging.record(1, 0.7)
    with pytest.raises(Diverged, match="exploded"):
        diverging.record(2, 10.5)  # > 10 x max(1, the first loss)
    with pytest.raises(Diverged, match="nan"):
        diverging.record(2, float("nan"))
    assert diverging.losses == [0.7]  # a diverged loss is never kept
