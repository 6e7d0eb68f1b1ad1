"""`lora_pro` (methods/lora_pro.py): the adjusted gradients against a dense float64 least-squares
derivation, the Sylvester X by substitution and by a Kronecker solve, a step of each variant
against a hand formula, the B = 0 case, the ZeRO refusal and one CPU trial on MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch

import methods
from harness.training.train import train_step
from methods import lora_pro
from tests.builders import LAYER, batch, ctx, tiny_bert

RANK = 4
LR, WD = 0.01, 0.1
BETAS, EPS = (0.9, 0.999), 1e-8
S = 16.0 / RANK  # the default scaling alpha / r at this rank


def factors(m: int = 7, n: int = 6, r: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    full = torch.randn(m, n, generator=g, dtype=torch.float64)
    return a, b, full


def vec(x: torch.Tensor) -> torch.Tensor:
    return x.T.reshape(-1)  # column-major: vec(P X Q) = (Q^T kron P) vec(X)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def sylvester_dense(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """P X + X Q = C as (I kron P + Q^T kron I) vec X = vec C, solved densely."""
    r, k = c.shape
    eye_k, eye_r = torch.eye(k, dtype=c.dtype), torch.eye(r, dtype=c.dtype)
    op = torch.kron(eye_k, p) + torch.kron(q.T.contiguous(), eye_r)
    return unvec(torch.linalg.solve(op, vec(c)), r, k)


def hand_adjust(a, b, grad_a, grad_b, s):
    """The official formulas written out densely: explicit inverses by solve, the m x m
    projection formed, X by the Kronecker solve."""
    btb, aat = b.T @ b, a @ a.T
    eye_m = torch.eye(b.shape[0], dtype=b.dtype)
    new_a = torch.linalg.solve(btb, grad_a) / s**2
    proj = eye_m - b @ torch.linalg.solve(btb, b.T)
    new_b = torch.linalg.solve(aat, (proj @ grad_b).T).T / s**2
    x = sylvester_dense(btb, aat, -new_a @ a.T)
    return new_a + x @ a, new_b - b @ x, x


def lstsq_optimum(a, b, full, grad_a, grad_b, s):
    """Dense: M maps vec(g_A', g_B') to vec(s (B g_A' + g_B' A)); among the minimisers of
    ||M z - vec g||, the one nearest z0 = (g_A, g_B) is z0 + M^+ (vec g - M z0)."""
    (r, n), m = a.shape, b.shape[0]
    size_a = r * n
    cols = []
    for k in range(size_a + m * r):
        z = torch.zeros(size_a + m * r, dtype=a.dtype)
        z[k] = 1.0
        da, db = unvec(z[:size_a], r, n), unvec(z[size_a:], m, r)
        cols.append(vec(s * (b @ da + db @ a)))
    op = torch.stack(cols, dim=1)
    z0 = torch.cat([vec(grad_a), vec(grad_b)])
    z = z0 + torch.linalg.pinv(op) @ (vec(full) - op @ z0)
    fitted = unvec(op @ z, m, n)
    return unvec(z[:size_a], r, n), unvec(z[size_a:], m, r), fitted


# ---------------------------------------------------------------- the mathematics


def test_adjusted_gradients_are_the_dense_least_squares_optimum_nearest_the_lora_gradients():
    a, b, full = factors()
    grad_a, grad_b = S * b.T @ full, S * full @ a.T
    got_a, got_b, x = lora_pro.optimal_lora_gradients(a, b, grad_a, grad_b, S, damping=0.0)
    want_a, want_b, fitted = lstsq_optimum(a, b, full, grad_a, grad_b, S)
    torch.testing.assert_close(got_a, want_a, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_b, want_b, atol=1e-10, rtol=1e-9)
    # The equivalent gradient is the least-squares fit = P_B g + g P_A - P_B g P_A.
    equiv = lora_pro.equivalent_gradient(a, b, got_a, got_b, S)
    torch.testing.assert_close(equiv, fitted, atol=1e-10, rtol=1e-9)
    pb = b @ torch.linalg.solve(b.T @ b, b.T)
    pa = a.T @ torch.linalg.solve(a @ a.T, a)
    torch.testing.assert_close(equiv, pb @ full + full @ pa - pb @ full @ pa, atol=1e-10, rtol=0)
    # The plain LoRA gradients fit worse, and X = 0 gives the same fit but lies farther away.
    plain = lora_pro.equivalent_gradient(a, b, grad_a, grad_b, S)
    assert (plain - full).norm() > (equiv - full).norm() + 1e-3
    no_x_a, no_x_b, _ = lora_pro.optimal_lora_gradients(
        a, b, grad_a, grad_b, S, damping=0.0, free_x=False
    )
    torch.testing.assert_close(lora_pro.equivalent_gradient(a, b, no_x_a, no_x_b, S), equiv)
    far = (no_x_a - grad_a).norm() ** 2 + (no_x_b - grad_b).norm() ** 2
    near = (got_a - grad_a).norm() ** 2 + (got_b - grad_b).norm() ** 2
    assert near < far - 1e-6 and x.abs().max() > 1e-3
    # The official delta = 1e-8 changes nothing measurable on well-conditioned factors.
    d_a, d_b, _ = lora_pro.optimal_lora_gradients(a, b, grad_a, grad_b, S, damping=1e-8)
    torch.testing.assert_close(d_a, got_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_b, got_b, atol=1e-6, rtol=1e-6)


def test_sylvester_solution_by_substitution_and_by_the_kronecker_solve():
    a, b, full = factors(seed=3)
    grad_a = S * b.T @ full
    _, _, x = lora_pro.optimal_lora_gradients(a, b, grad_a, S * full @ a.T, S, damping=0.0)
    btb, aat = b.T @ b, a @ a.T
    rhs = -torch.linalg.solve(btb, grad_a) @ a.T / S**2
    torch.testing.assert_close(btb @ x + x @ aat, rhs, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x, sylvester_dense(btb, aat, rhs), atol=1e-10, rtol=1e-9)
    # Singular operator (both coefficients rank-deficient): the minimum-norm least squares.
    p = torch.diag(torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64))
    q = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
    c = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 1
    eye2, eye3 = torch.eye(2, dtype=c.dtype), torch.eye(3, dtype=c.dtype)
    op = torch.kron(eye2, p) + torch.kron(q.T.contiguous(), eye3)
    want = unvec(torch.linalg.pinv(op) @ vec(c), 3, 2)
    torch.testing.assert_close(lora_pro.solve_sylvester_psd(p, q, c), want)


def test_b_zero_gives_the_projection_onto_the_row_space_of_a():
    """At peft's init (B = 0) with the official delta: g_A' = 0, X = 0,
    g_B' = (1/s^2) g_B (A A^T)^-1 (the official's global_step == 0 branch), and the equivalent
    gradient is g A^T (A A^T)^-1 A, the projection of g onto the row space of A."""
    a, b, full = factors(seed=5)
    b = torch.zeros_like(b)
    grad_a, grad_b = S * b.T @ full, S * full @ a.T
    got_a, got_b, x = lora_pro.optimal_lora_gradients(a, b, grad_a, grad_b, S, damping=1e-8)
    assert not got_a.any() and not x.any()
    torch.testing.assert_close(got_b, torch.linalg.solve(a @ a.T, grad_b.T).T / S**2)
    pa = a.T @ torch.linalg.solve(a @ a.T, a)
    torch.testing.assert_close(lora_pro.equivalent_gradient(a, b, got_a, got_b, S), full @ pa)


# ---------------------------------------------------------------- steps of the two variants


def prepared(full_momentum: bool, seed: int = 1, move_b: bool = True):
    """A float64 lora_pro model (damping 0: exact inverses), B moved off zero."""
    method = methods.get_method("lora_pro")
    hp = method.hyperparams({"rank": RANK, "full_momentum": full_momentum, "damping": 0.0})
    model = method.prepare(tiny_bert().double(), hp, ctx()).train()
    torch.manual_seed(seed)
    if move_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn_like(p) * 0.3)
    return method, hp, model


def adamw_update(state, name, grad, value, t):
    m, v = state.get(name, (torch.zeros_like(grad), torch.zeros_like(grad)))
    m = BETAS[0] * m + (1 - BETAS[0]) * grad
    v = BETAS[1] * v + (1 - BETAS[1]) * grad**2
    state[name] = (m, v)
    return m / (1 - BETAS[0] ** t) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)


def hand_steps(model, batches, full_momentum: bool) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t, b in enumerate(batches, start=1):
        model.zero_grad()
        model(**b).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        values = {n: p.detach().clone() for n, p in params.items()}
        new = {}
        for n in params:
            if ".lora_B." in n:
                continue
            if ".lora_A." not in n:  # the head: AdamW (both variants)
                direction = adamw_update(state, n, grads[n], values[n], t)
                new[n] = values[n] * (1 - LR * WD) - LR * direction
                continue
            nb = n.replace(".lora_A.", ".lora_B.")
            a, bm, ga, gb = values[n], values[nb], grads[n], grads[nb]
            if full_momentum:
                adj_a, adj_b, _ = hand_adjust(a, bm, ga, gb, S)
                equiv = S * (bm @ adj_a + adj_b @ a)
                direction = adamw_update(state, n, equiv, None, t)
                up_a, up_b, _ = hand_adjust(a, bm, S * bm.T @ direction, S * direction @ a.T, S)
            else:
                adj_a, adj_b, _ = hand_adjust(a, bm, ga, gb, S)
                up_a = adamw_update(state, n, adj_a, a, t)
                up_b = adamw_update(state, nb, adj_b, bm, t)
            new[n] = a * (1 - LR * WD) - LR * up_a
            new[nb] = bm * (1 - LR * WD) - LR * up_b
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(new[n])
    model.zero_grad()
    return {n: p.detach().clone() for n, p in params.items()}


def ours_steps(method, hp, model, batches, max_norm=None):
    optimizer = method.build_optimizer(model, LR, hp, weight_decay=WD)
    grad_transform = method.gradient_transform(hp)
    for b in batches:
        train_step(model, b, optimizer, None, max_norm, grad_transform)
    return optimizer, {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("full_momentum", [True, False])
def test_three_steps_equal_the_hand_formula(full_momentum):
    batches = [batch(5), batch(6), batch(7)]
    expected = hand_steps(prepared(full_momentum)[2], batches, full_momentum)
    method, hp, model = prepared(full_momentum)
    optimizer, got = ours_steps(method, hp, model, batches)
    if full_momentum:
        assert type(optimizer) is lora_pro.LoraProAdamW and method.gradient_transform(hp) is None
        layer_a = model.get_parameter(f"base_model.model.{LAYER}.lora_A.default.weight")
        assert optimizer.state[layer_a]["exp_avg"].shape == (32, 32)  # full m x n moments
    else:
        assert type(optimizer) is torch.optim.AdamW
    assert any("classifier" in n for n in got) and any(".lora_B." in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=1e-9, msg=name)
    # The other variant's hand formula lands elsewhere (so the test can tell them apart).
    other = hand_steps(prepared(full_momentum)[2], batches, not full_momentum)
    gap = max(float((other[n] - got[n]).abs().max()) for n in got if ".lora_" in n)
    assert gap > 1e-3


def test_first_official_step_from_b_zero_is_the_sign_of_the_projected_full_gradient():
    """peft init B = 0, wd 0: A does not move and the weight moves by
    -lr * sign(g P_A) P_A (Adam's first step is g~/|g~| up to eps), g the base model's full
    gradient of W (taken on the unadapted model), P_A = A^T (A A^T)^-1 A."""
    method = methods.get_method("lora_pro")
    hp = method.hyperparams({"rank": RANK})
    base = tiny_bert().double().train()
    model = method.prepare(copy.deepcopy(base), hp, ctx()).train()
    layer = model.base_model.model.get_submodule(LAYER)
    a0 = layer.lora_A["default"].weight.detach().clone()
    assert not layer.lora_B["default"].weight.any()
    b = batch(8)
    base(**b).loss.backward()
    full = base.get_submodule(LAYER).weight.grad
    optimizer = method.build_optimizer(model, LR, hp, weight_decay=0.0)
    train_step(model, b, optimizer, None, None, None)
    a1, b1 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(a1, a0, atol=0, rtol=0)
    pa = a0.T @ torch.linalg.solve(a0 @ a0.T, a0)
    equiv = full @ pa
    want = -LR * (equiv / (equiv.abs() + EPS)) @ pa
    torch.testing.assert_close(layer.scaling["default"] * b1 @ a1, want, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- contract and harness


def test_defaults_scaling_and_variants():
    method = methods.get_method("lora_pro")
    hp = method.hyperparams({})
    assert (hp.rank, hp.alpha, hp.full_momentum, hp.use_rslora, hp.damping) == (
        8, 16.0, True, False, 1e-8
    )  # fmt: skip
    assert method.starts_at_base(hp)
    for rslora, want in [(False, 16.0 / RANK), (True, 16.0 / RANK**0.5)]:
        hp = method.hyperparams({"rank": RANK, "use_rslora": rslora})
        model = method.prepare(tiny_bert(), hp, ctx())
        assert model.base_model.model.get_submodule(LAYER).scaling["default"] == want
        assert lora_pro.lora_scaling(hp.alpha, RANK, rslora) == want
        optimizer = method.build_optimizer(model, LR, hp)
        assert {s for _, _, s in optimizer.pairs} == {want}
        assert len(optimizer.pairs) == 2 * 6  # 2 layers x 6 targets


def test_zero_refuses_full_momentum_with_the_reason_and_accepts_the_transform():
    from harness.spec.config import ConfigError, validate_config, zero_unsupported_reason
    from tests.builders import sweep_config

    method = methods.get_method("lora_pro")
    reason = zero_unsupported_reason(method, method.hyperparams({}))
    assert reason and "flat partitions" in reason and "full_momentum: false" in reason
    assert zero_unsupported_reason(method, method.hyperparams({"full_momentum": False})) is None
    with pytest.raises(ConfigError, match="lora_pro: not supported under DeepSpeed ZeRO"):
        validate_config(
            sweep_config(distributed={"workers": 2}, methods={"lora_pro": {"lrs": [1e-3]}})
        )
    sds = {"lora_pro": {"lrs": [1e-3], "overrides": {"full_momentum": False}}}
    assert validate_config(sweep_config(distributed={"workers": 2}, methods=sds))


@pytest.mark.parametrize("full_momentum", [True, False])
def test_single_cpu_trial_gives_an_ok_row_with_passing_checks(mirror_dir, full_momentum):
    from harness.training.trial import run_trial
    from tests.builders import trial_spec

    trial = trial_spec(mirror_dir, method="lora_pro").model_copy(
        update={"method_overrides": {"full_momentum": full_momentum}}
    )
    row = run_trial(trial)
    assert row["status"] == "ok", row.get("traceback")
    assert row["method"] == "lora_pro" and row["steps"] == 2
    assert row["trainable_params"] == row["expected_trainable_params"] < row["total_params"]
    assert row["sanity_init"].startswith("identity")
    assert row["sanity_merge"].startswith("merged == unmerged")
