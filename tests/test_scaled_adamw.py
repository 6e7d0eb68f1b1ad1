"""`scaled_adamw` (methods/scaled_adamw.py): Riemannian-preconditioned LoRA + AdamW, checked
against the hand formula in float64 and against peft's create_riemannian_optimizer."""

from __future__ import annotations

import copy

import torch

import methods
from harness.training.train import train_step
from tests.builders import LAYER, batch, ctx, tiny_bert

RANK = 4
LR, WD, DAMPING = 0.02, 0.01, 0.05
BETAS, EPS = (0.9, 0.999), 1e-8


def prepared(seed: int = 1, **overrides):
    """A scaled_adamw model whose B is moved off zero, so both preconditioners matter."""
    method = methods.get_method("scaled_adamw")
    hp = method.hyperparams({"rank": RANK, "precond_damping": DAMPING, **overrides})
    model = method.prepare(tiny_bert(), hp, ctx())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return method, hp, model.train()


def hand_steps(model, batches) -> dict[str, torch.Tensor]:
    """Textbook float64: g_A' = (B^T B + l I)^-1 g_A, g_B' = g_B (A A^T + l I)^-1 (inverse by
    solve, not pinv), then AdamW (decoupled decay, bias-corrected moments) per step."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {n: (torch.zeros_like(p, dtype=torch.float64),) * 2 for n, p in params.items()}
    eye = torch.eye(RANK, dtype=torch.float64)
    for t, b in enumerate(batches, start=1):
        model.zero_grad()
        model(**b).loss.backward()
        grads = {n: p.grad.double() for n, p in params.items()}
        values = {n: p.detach().double() for n, p in params.items()}
        for n in params:
            if ".lora_A." in n:
                bmat = values[n.replace(".lora_A.", ".lora_B.")]
                grads[n] = torch.linalg.solve(bmat.T @ bmat + DAMPING * eye, grads[n])
            elif ".lora_B." in n:
                amat = values[n.replace(".lora_B.", ".lora_A.")]
                gram = amat @ amat.T + DAMPING * eye  # symmetric: g (G)^-1 = (G^-1 g^T)^T
                grads[n] = torch.linalg.solve(gram, grads[n].T).T
        with torch.no_grad():
            for n, p in params.items():
                m, v = state[n]
                m = BETAS[0] * m + (1 - BETAS[0]) * grads[n]
                v = BETAS[1] * v + (1 - BETAS[1]) * grads[n] ** 2
                state[n] = (m, v)
                m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
                new = values[n] * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)
                p.copy_(new.to(p.dtype))
    model.zero_grad()
    return {n: p.detach().clone() for n, p in params.items()}


def ours_steps(method, hp, model, batches, transform="method", max_norm=None):
    optimizer = method.build_optimizer(model, LR, hp, weight_decay=WD)
    assert type(optimizer) is torch.optim.AdamW
    grad_transform = method.gradient_transform(hp) if transform == "method" else None
    for b in batches:
        train_step(model, b, optimizer, None, max_norm, grad_transform)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_two_steps_equal_the_hand_formula_and_plain_adamw_does_not():
    batches = [batch(5), batch(6)]
    expected = hand_steps(prepared()[2], batches)
    method, hp, model = prepared()
    got = ours_steps(method, hp, model, batches)
    assert set(got) == set(expected)
    assert any(".lora_A." in n for n in got) and any("classifier" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # Without the preconditioner the same steps land elsewhere (the test can fail).
    method, hp, model = prepared()
    plain = ours_steps(method, hp, model, batches, transform=None)
    gap = max(float((plain[n] - expected[n]).abs().max()) for n in plain if "lora_" in n)
    assert gap > 1e-3


def test_three_clipped_steps_equal_peft_create_riemannian_optimizer():
    """The approach of tests/test_data_informed.py for LoRA-One's precond_adamw: peft
    preconditions inside step(); we clip, transform, then step - same order, same result."""
    from peft.optimizers import create_riemannian_optimizer

    method, hp, ours = prepared()
    _, _, theirs = prepared()
    max_norm = 0.02
    peft_opt = create_riemannian_optimizer(
        theirs, torch.optim.AdamW, lr=LR, reg=DAMPING, weight_decay=WD
    )
    steps = [batch(7), batch(8), batch(9)]
    got = ours_steps(method, hp, ours, steps, max_norm=max_norm)
    for b in steps:
        theirs(**b).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in theirs.parameters() if p.requires_grad], max_norm
        )
        assert norm > 5 * max_norm  # clipping is active, so its order matters
        peft_opt.step()
        peft_opt.zero_grad()
    for name, q in theirs.named_parameters():
        if q.requires_grad:
            torch.testing.assert_close(got[name], q, atol=1e-6, rtol=1e-5, msg=name)
    start = prepared()[2].get_parameter(f"base_model.model.{LAYER}.lora_A.default.weight")
    assert not torch.equal(got[f"base_model.model.{LAYER}.lora_A.default.weight"], start)


def test_defaults_plain_lora_init_and_rslora_switch():
    method = methods.get_method("scaled_adamw")
    hp = method.hyperparams({})
    assert hp.precond_damping == 1e-6 and hp.use_rslora is False  # official reg 1e-6
    assert (hp.rank, hp.alpha) == (8, 16.0)
    assert method.starts_at_base(hp) and method.gradient_transform(hp) is not None
    base = tiny_bert()
    model = method.prepare(copy.deepcopy(base), method.hyperparams({"rank": RANK}), ctx())
    layer = model.base_model.model.get_submodule(LAYER)
    assert not layer.lora_B["default"].weight.any()  # peft's default init: B = 0
    assert layer.scaling["default"] == 16.0 / RANK
    rs = method.prepare(tiny_bert(), method.hyperparams({"rank": RANK, "use_rslora": True}), ctx())
    assert rs.base_model.model.get_submodule(LAYER).scaling["default"] == 16.0 / RANK**0.5
