"""CG-LoRA and its K-FAC machinery (specs/methods.md "CG-LoRA"; methods/cg_lora.py).

References are written independently of methods/kfac.py and methods/cg_lora.py: dense numpy
eigendecompositions, explicit Jacobians from autograd, lstsq on the vectorised problem.
"""

from __future__ import annotations

import copy
import math
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel
from pydantic import ValidationError
from torch import nn

import methods
import methods.cg_lora  # noqa: F401  (registers cg_lora)
from methods.cg_lora import cg_lora_factors
from methods.kfac import (
    Eigenspace,
    collect_kfac,
    output_noise,
    projected_gradients,
    randomized_eigh,
)
from methods.peft_lora import matching_linear_layers
from tests.builders import (
    HEAD,
    LAYER,
    TARGETS,
    batch,
    lm_batch,
    logits,
    reference_init,
    rel,
    tiny_bert,
    tiny_llama,
)

INIT = [batch(30, n=8, length=6), batch(31, n=8, length=6), batch(32, n=8, length=6)]


def ctx(batches=INIT, batch_size=8) -> methods.PrepareContext:
    return methods.PrepareContext(
        head_modules=HEAD,
        default_target_modules=TARGETS,
        init_batches=lambda n: iter(batches[:n]),
        learning_rate=1e-3,
        batch_size=batch_size,
    )


def cg(overrides=None):
    method = methods.get_method("cg_lora")
    return method, method.hyperparams({"rank": 4, "init_batches": 3, **(overrides or {})})


def exact_space(f: np.ndarray) -> Eigenspace:
    w, v = np.linalg.eigh(f)
    return Eigenspace(torch.tensor(w[::-1].copy()), torch.tensor(v[:, ::-1].copy()))


def random_psd(dim: int, rng, decay: float = 0.7) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * decay ** np.arange(dim)) @ q.T


# ---------------------------------------------------------------- steps 4-7 on exact data


def test_whitened_gradient_modes_and_factors_equal_the_explicit_formulas():
    rng = np.random.default_rng(0)
    m, n, rank = 6, 7, 2
    s, a_in = random_psd(m, rng), random_psd(n, rng)
    g = rng.standard_normal((m, n))
    space_s, space_a = exact_space(s), exact_space(a_in)
    gp = space_s.vectors.numpy().T @ g @ space_a.vectors.numpy()
    f = cg_lora_factors(torch.tensor(gp), space_s, space_a, rank, out_features=m, scale="none")
    whitened, b_hat, a_hat, product = reference_init(a_in, s, g, rank)
    u_s, u_a = space_s.vectors.numpy(), space_a.vectors.numpy()
    # Gw in the eigenbases is S^-1/2 G A^-1/2 in weight space (sign-free comparison).
    np.testing.assert_allclose(u_s @ f.whitened.numpy() @ u_a.T, whitened, atol=1e-10)
    # Left/right modes pair up (SVD signs flip P_j and Q_j together).
    for j in range(rank):
        ours = np.outer(f.b_hat[:, j].numpy(), f.a_hat[j].numpy())
        np.testing.assert_allclose(ours, np.outer(b_hat[:, j], a_hat[j]), atol=1e-10)
    b0, a0 = f.b0.numpy(), f.a0.numpy()
    # B0 A0 = Bh M* Ah = the orthogonal projection of -G onto {Bh M Ah}.
    np.testing.assert_allclose(b0 @ a0, f.b_hat.numpy() @ f.m_star.numpy() @ f.a_hat.numpy())
    np.testing.assert_allclose(b0 @ a0, product, atol=1e-10)
    # M* is the least-squares solution of the vectorised problem (Prop. 5.1).
    kron = np.kron(f.a_hat.numpy().T, f.b_hat.numpy())  # vec(Bh M Ah) = (Ah^T kron Bh) vec M
    m_vec = np.linalg.lstsq(kron, (-g).flatten(order="F"), rcond=None)[0]
    np.testing.assert_allclose(f.m_star.numpy(), m_vec.reshape(rank, rank, order="F"))
    # Balanced realization of the product's thin SVD (Def. 5.2).
    u, d, vh = np.linalg.svd(product)
    np.testing.assert_allclose(b0.T @ b0, a0 @ a0.T, atol=1e-12)
    np.testing.assert_allclose(b0.T @ b0, np.diag(d[:rank]), atol=1e-12)
    np.testing.assert_allclose(b0 @ b0.T, (u[:, :rank] * d[:rank]) @ u[:, :rank].T, atol=1e-12)
    np.testing.assert_allclose(a0.T @ a0, (vh[:rank].T * d[:rank]) @ vh[:rank], atol=1e-12)
    # The whitening matters: the init is not the plain svd_r(-G).
    ug, sg, vgh = np.linalg.svd(-g)
    assert rel(b0 @ a0, (ug[:, :rank] * sg[:rank]) @ vgh[:rank]) > 0.1


def test_the_specs_svd_of_M_star_is_not_balanced_but_ours_is():
    # The spec's step 6 (B0 = Bh U_M D_M^1/2) is balanced only for orthonormal Bh, Ah^T.
    rng = np.random.default_rng(1)
    m, n, rank = 6, 5, 3
    s, a_in = random_psd(m, rng), random_psd(n, rng)
    space_s, space_a = exact_space(s), exact_space(a_in)
    gp = space_s.vectors.numpy().T @ rng.standard_normal((m, n)) @ space_a.vectors.numpy()
    f = cg_lora_factors(torch.tensor(gp), space_s, space_a, rank, out_features=m, scale="none")
    u_m, d_m, vh_m = np.linalg.svd(f.m_star.numpy())
    b_spec = f.b_hat.numpy() @ u_m * np.sqrt(d_m)
    a_spec = (np.sqrt(d_m)[:, None] * vh_m) @ f.a_hat.numpy()
    np.testing.assert_allclose(b_spec @ a_spec, f.b0.numpy() @ f.a0.numpy(), atol=1e-10)
    assert rel(b_spec.T @ b_spec, a_spec @ a_spec.T) > 1e-2
    b0, a0 = f.b0.numpy(), f.a0.numpy()
    np.testing.assert_allclose(b0.T @ b0, a0 @ a0.T, atol=1e-12)


def test_eig_dim_equal_to_rank_reduces_to_projecting_G_on_top_eigenvectors():
    rng = np.random.default_rng(2)
    m, n, rank = 8, 9, 3
    s, a_in = random_psd(m, rng), random_psd(n, rng)
    g = rng.standard_normal((m, n))
    top_s, top_a = exact_space(s), exact_space(a_in)
    top_s = Eigenspace(top_s.values[:rank], top_s.vectors[:, :rank])
    top_a = Eigenspace(top_a.values[:rank], top_a.vectors[:, :rank])
    u_s, u_a = top_s.vectors.numpy(), top_a.vectors.numpy()
    f = cg_lora_factors(
        torch.tensor(u_s.T @ g @ u_a), top_s, top_a, rank, out_features=m, scale="none"
    )
    np.testing.assert_allclose(f.b0.numpy() @ f.a0.numpy(), -u_s @ u_s.T @ g @ u_a @ u_a.T)


@pytest.mark.parametrize("scale", ["stable", "stable_raw"])
def test_global_stable_scaling(scale):
    rng = np.random.default_rng(3)
    m, n, rank, gamma = 16, 12, 3, 16.0
    space_s, space_a = exact_space(random_psd(m, rng)), exact_space(random_psd(n, rng))
    gp = torch.tensor(rng.standard_normal((m, n)) * 1e-3)  # gradient magnitude is arbitrary
    raw = cg_lora_factors(gp, space_s, space_a, rank, out_features=m, scale="none")
    f = cg_lora_factors(gp, space_s, space_a, rank, out_features=m, scale=scale, gamma=gamma)
    zeta2 = math.sqrt(m) / gamma  # LoRA-GA's (m^1/4 / sqrt(gamma))^2 on the product
    top = float(torch.linalg.matrix_norm(raw.b0 @ raw.a0, ord=2))
    expected = raw.b0 @ raw.a0 * zeta2 / (top if scale == "stable" else 1.0)
    torch.testing.assert_close(f.b0 @ f.a0, expected)
    if scale == "stable":  # unit top singular value times zeta^2, whatever |G|
        assert float(torch.linalg.matrix_norm(f.b0 @ f.a0, ord=2)) == pytest.approx(zeta2)
    torch.testing.assert_close(f.b0.T @ f.b0, f.a0 @ f.a0.T)


def test_damping_whitens_with_shifted_eigenvalues():
    rng = np.random.default_rng(4)
    m, n, rank, damping = 6, 6, 2, 0.1
    s, a_in = random_psd(m, rng), random_psd(n, rng)
    g = rng.standard_normal((m, n))
    space_s, space_a = exact_space(s), exact_space(a_in)
    gp = torch.tensor(space_s.vectors.numpy().T @ g @ space_a.vectors.numpy())
    f = cg_lora_factors(gp, space_s, space_a, rank, out_features=m, damping=damping)
    s_damped = s + damping * np.linalg.eigvalsh(s).max() * np.eye(m)
    a_damped = a_in + damping * np.linalg.eigvalsh(a_in).max() * np.eye(n)
    _, _, _, product = reference_init(a_damped, s_damped, g, rank)
    got = f.b0.numpy() @ f.a0.numpy()
    np.testing.assert_allclose(got / np.linalg.norm(got, 2), product / np.linalg.norm(product, 2))


# ---------------------------------------------------------------- randomized eigenspaces


def _spectrum_matrix(dim, values, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * values) @ q.T


def test_randomized_eigh_equals_the_exact_eigendecomposition_when_oversampled():
    dim, k = 60, 5
    values = np.concatenate([[100.0, 50, 25, 12, 6], 0.05 * 0.9 ** np.arange(dim - 5)])
    f = _spectrum_matrix(dim, values)
    ft = torch.tensor(f)
    w, v = np.linalg.eigh(f)
    exact_proj = v[:, -k:] @ v[:, -k:].T
    space = randomized_eigh(
        lambda x: ft @ x,
        dim,
        k,
        oversampling=10,
        power_iters=2,
        generator=torch.Generator().manual_seed(0),
    )
    u = space.vectors.numpy()
    assert np.linalg.norm(u @ u.T - exact_proj, 2) < 1e-6
    np.testing.assert_allclose(space.values.numpy(), w[-k:][::-1], rtol=1e-8)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
    # k + p >= dim: the exact decomposition, eigenvalues and all.
    full = randomized_eigh(
        lambda x: ft @ x,
        dim,
        dim,
        oversampling=0,
        power_iters=0,
        generator=torch.Generator().manual_seed(1),
    )
    np.testing.assert_allclose(full.values.numpy(), w[::-1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        full.vectors.numpy() @ np.diag(w[::-1]) @ full.vectors.numpy().T, f, atol=1e-10
    )


def test_power_iterations_improve_the_sketch_on_a_slowly_decaying_spectrum():
    dim, k = 80, 6
    f = torch.tensor(_spectrum_matrix(dim, 0.93 ** np.arange(dim), seed=5))
    w, v = np.linalg.eigh(f.numpy())
    exact_proj = v[:, -k:] @ v[:, -k:].T

    def error(q: int) -> float:
        space = randomized_eigh(
            lambda x: f @ x,
            dim,
            k,
            oversampling=4,
            power_iters=q,
            generator=torch.Generator().manual_seed(7),
        )
        u = space.vectors.numpy()
        return float(np.linalg.norm(u @ u.T - exact_proj, 2))

    e0, e3 = error(0), error(3)
    assert e0 > 0.3 and e3 < 0.5 * e0


def test_randomized_eigh_keeps_only_nonzero_eigenvalues():
    dim = 20
    f = torch.tensor(_spectrum_matrix(dim, np.r_[5.0, 3.0, 1.0, np.zeros(dim - 3)], seed=2))
    space = randomized_eigh(
        lambda x: f @ x,
        dim,
        8,
        oversampling=5,
        power_iters=0,
        generator=torch.Generator().manual_seed(0),
        rtol=1e-8,
    )
    np.testing.assert_allclose(space.values.numpy(), [5.0, 3.0, 1.0], rtol=1e-10)


# ---------------------------------------------------------------- Hutchinson curvature


class Mlp(nn.Module):
    """x -> fc1 (the target) -> tanh -> fc2 -> logits, with a loss; no weight sharing."""

    def __init__(self, n=5, m=6, c=3) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.fc1, self.fc2 = nn.Linear(n, m), nn.Linear(m, c)

    def forward(self, x, labels=None):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return SimpleNamespace(loss=(out**2).mean(), logits=out)


def _mlp_curvature(kind: str, samples: int):
    model = Mlp()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    layers = {"fc1": model.fc1}
    result = collect_kfac(model, layers, [{"x": x}], loss_kind=kind, samples=samples, seed=samples)
    # Exact: J_i = d logits_i / d h_i (c, m); H_i the loss Hessian in the logits.
    with torch.no_grad():
        h = model.fc1(x)
        z = model.fc2(torch.tanh(h))
    exact_s = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: model.fc2(torch.tanh(v)), h[i]).double()
        if kind == "mse":
            hess = torch.eye(3, dtype=torch.float64)
        elif kind == "ce":
            p = torch.softmax(z[i].double(), -1)
            hess = torch.diag(p) - torch.outer(p, p)
        else:
            p = torch.sigmoid(z[i].double())
            hess = torch.diag(p * (1 - p))
        exact_s += jac.T @ hess @ jac / x.shape[0]
    exact_a = x.double().T @ x.double() / x.shape[0]
    factors = result.factors["fc1"]
    return factors.s.dense(), exact_s, factors.a_in.dense(), exact_a


@pytest.mark.parametrize("kind", ["mse", "ce", "bce"])
def test_hutchinson_S_converges_to_the_exact_GGN_factor(kind):
    errors = []
    for samples in (1, 30, 1500):
        s, exact_s, a_in, exact_a = _mlp_curvature(kind, samples)
        torch.testing.assert_close(a_in, exact_a, atol=1e-6, rtol=1e-5)  # no noise in A_in
        errors.append(rel(s, exact_s))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.06


def _exact_pooled_S(model, b, name):
    """mean_b Jbar_b^T Lambda_b Jbar_b, Jbar_b = sum over valid tokens of d logits / d out_t."""
    layer = model.get_submodule(name)
    store = {}

    def hook(module, inputs, output):
        delta = torch.zeros_like(output, requires_grad=True)
        store["delta"] = delta
        return output + delta

    handle = layer.register_forward_hook(hook)
    try:
        out = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    finally:
        handle.remove()
    n_ex, classes = out.shape
    mask = b["attention_mask"].double()
    jbar = torch.zeros(n_ex, classes, layer.out_features, dtype=torch.float64)
    for c in range(classes):
        (grad,) = torch.autograd.grad(out[:, c].sum(), store["delta"], retain_graph=True)
        jbar[:, c] = torch.einsum("bt,btm->bm", mask, grad.double())
    p = torch.softmax(out.detach().double(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcm,bcd,bdk->mk", jbar, lam, jbar) / n_ex


def test_hutchinson_S_converges_to_J_Lambda_J_under_token_pooling():
    # Softmax CE on a sequence model: S -> mean Jbar^T (diag p - p p^T) Jbar.
    model = tiny_bert()
    b = batch(40, n=4, length=5)
    exact = _exact_pooled_S(model, b, LAYER)
    layers = dict(matching_linear_layers(model, [LAYER], HEAD))
    errors = []
    for samples in (2, 300):
        result = collect_kfac(model, layers, [b], samples=samples, seed=1)
        assert result.loss_kind == "ce"
        errors.append(rel(result.factors[LAYER].s.dense(), exact))
    assert errors[0] > 2 * errors[1] and errors[1] < 0.15


def test_output_noise_has_the_loss_hessian_as_covariance_and_skips_ignored_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    labels = torch.tensor([[1, -100, 2]])  # causal: position t predicts labels[t + 1]
    reps = 40000  # as many sequences, drawn at once
    draws = output_noise("causal_lm", logits.expand(reps, -1, -1), labels.expand(reps, -1), gen)
    assert torch.all(draws[:, 0] == 0) and torch.all(draws[:, 2] == 0)  # ignored, last
    e = draws[:, 1].double()
    torch.testing.assert_close(
        e.sum(-1), torch.zeros(len(e), dtype=torch.float64), atol=1e-6, rtol=0
    )
    p = torch.softmax(logits[0, 1].double(), -1)
    cov = e.T @ e / len(e)
    torch.testing.assert_close(cov, torch.diag(p) - torch.outer(p, p), atol=6e-3, rtol=0)
    token = output_noise("token_ce", logits, labels, gen)  # seq2seq: no shift
    assert torch.all(token[0, 1] == 0) and torch.any(token[0, 0] != 0)
    bce = output_noise("bce", logits[0].expand(20000, -1, -1), None, gen).double()
    q = torch.sigmoid(logits[0].double())
    torch.testing.assert_close((bce**2).mean(0), q * (1 - q), atol=5e-3, rtol=0)
    assert abs(float((bce[:, 0, 0] * bce[:, 0, 1]).mean())) < 5e-3  # independent outputs


def test_kfac_reduce_pooling_ignores_padded_tokens():
    model = tiny_bert()
    layers = dict(matching_linear_layers(model, TARGETS, HEAD))
    short = batch(50, n=1, length=4)
    padded = {
        "input_ids": torch.cat([short["input_ids"], torch.tensor([[77, 13]])], dim=1),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
        "labels": short["labels"],
    }
    one = collect_kfac(model, layers, [short], seed=3).factors
    two = collect_kfac(model, layers, [padded], seed=3).factors
    for name in layers:
        torch.testing.assert_close(
            two[name].a_in.dense(), one[name].a_in.dense(), atol=1e-6, rtol=1e-4
        )
        torch.testing.assert_close(two[name].s.dense(), one[name].s.dense(), atol=1e-7, rtol=1e-4)
    # The pooled input is the mean over the valid tokens (per example), not over all six.
    seen = {}

    def capture(module, inputs, output) -> None:
        seen["x"] = inputs[0].detach().double()

    handle = model.get_submodule(LAYER).register_forward_hook(capture)
    with torch.no_grad():
        model(**padded)
    handle.remove()
    xbar = seen["x"][0, :4].mean(0)
    torch.testing.assert_close(
        two[LAYER].a_in.dense(), torch.outer(xbar, xbar), atol=1e-6, rtol=1e-4
    )
    naive = seen["x"][0].mean(0)
    assert rel(torch.outer(naive, naive), torch.outer(xbar, xbar)) > 1e-2  # padding mattered


def test_projected_gradient_from_hooks_equals_autograd():
    model = tiny_bert()
    names = [LAYER, "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    layers = {n: model.get_submodule(n) for n in names}
    g = torch.Generator().manual_seed(0)
    bases = {
        n: (
            torch.linalg.qr(torch.randn(lay.out_features, 5, generator=g, dtype=torch.float64))[0],
            torch.linalg.qr(torch.randn(lay.in_features, 3, generator=g, dtype=torch.float64))[0],
        )
        for n, lay in layers.items()
    }
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = projected_gradients(model, layers, iter(INIT), bases)
    assert result.batches == 3
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training
    reference = tiny_bert().train()
    for b in INIT:
        reference(**b).loss.backward()
    for n, (u_s, u_a) in bases.items():
        grad = reference.get_submodule(n).weight.grad.double() / 3
        torch.testing.assert_close(result.mean(n), u_s.T @ grad @ u_a, atol=1e-7, rtol=1e-5)


def test_weighted_batches_scale_their_share_of_both_init_estimators():
    """A distributed micro-batch (methods.base.WeightedBatch) counts `loss_weight` times in
    the averaged init gradient, in the shared estimator and in CG-LoRA's projected pass."""
    from methods.base import WeightedBatch
    from methods.grad_estimator import layer_gradients

    model = tiny_bert()
    layers = {LAYER: model.get_submodule(LAYER)}
    u_s = torch.linalg.qr(torch.randn(layers[LAYER].out_features, 4, dtype=torch.float64))[0]
    u_a = torch.linalg.qr(torch.randn(layers[LAYER].in_features, 4, dtype=torch.float64))[0]
    bases = {LAYER: (u_s, u_a)}
    weighted = WeightedBatch(INIT[1])
    weighted.loss_weight = 2.5
    plain = [INIT[0], INIT[1]]
    for estimate in (
        lambda bs: layer_gradients(model, layers, iter(bs)).pop_sum(LAYER),
        lambda bs: projected_gradients(model, layers, iter(bs), bases).sums[LAYER],
    ):
        parts = [estimate([b]).double() for b in plain]
        expected = parts[0] + 2.5 * parts[1]
        assert rel(estimate([INIT[0], weighted]).double(), expected) < 1e-5
        assert rel(parts[0] + parts[1], expected) > 0.1  # the weight matters here


def test_token_level_lm_curvature_is_label_free_but_respects_ignored_tokens():
    model = tiny_llama()
    layers = dict(matching_linear_layers(model, ["q_proj", "down_proj"], []))
    b = lm_batch()
    relabelled = dict(b, labels=torch.where(b["labels"] == -100, -100, (b["labels"] + 7) % 100))
    prompt_masked = dict(b, labels=b["labels"].clone())
    prompt_masked["labels"][1, :3] = -100  # a prompt whose tokens are not trained on
    one, two, three = (
        collect_kfac(model, layers, [x], seed=5) for x in (b, relabelled, prompt_masked)
    )
    assert one.loss_kind == "causal_lm"
    for name in layers:
        s1 = one.factors[name].s.dense()
        torch.testing.assert_close(two.factors[name].s.dense(), s1, atol=0, rtol=0)
        torch.testing.assert_close(
            three.factors[name].a_in.dense(), one.factors[name].a_in.dense(), atol=0, rtol=0
        )
        assert rel(three.factors[name].s.dense(), s1) > 1e-3


def test_causal_lm_shift_variant_keeps_the_base_logits():
    method = methods.get_method("cg_lora")
    hp = method.hyperparams({"rank": 2, "init_batches": 2, "variant": "shift"})
    batches = [lm_batch(1), lm_batch(2)]
    lm_ctx = methods.PrepareContext(
        head_modules=[], default_target_modules=["q_proj", "v_proj", "down_proj"],
        init_batches=lambda n: iter(batches[:n]),
    )  # fmt: skip
    base = tiny_llama()
    model = method.prepare(copy.deepcopy(base), hp, lm_ctx).eval()
    probe = {k: v for k, v in lm_batch(3).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, base(**probe).logits, atol=2e-5,
                                   rtol=1e-4)  # fmt: skip
        layer = model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
        assert layer.lora_B["default"].weight.abs().max() > 0  # a real, non-zero init


# ---------------------------------------------------------------- the method end to end


def test_prepared_adapter_equals_the_dense_reference_on_tiny_bert():
    # Exact eigendecompositions (k >= every layer size, no oversampling needed): every
    # layer's s B0 A0 equals the dense formula built from the same K-FAC factors and the
    # autograd gradient. With only 24 examples the factors' spectra reach 1e-8 of their top;
    # whitening by eigenvalues down to eig_rtol amplifies float32 rounding in G (hooks vs
    # autograd, ~1e-8) by up to eig_rtol^-1/2, so this exact comparison keeps 1e-4 of the top.
    # The key layers' pooled S is round-off (step 1b): their reference uses S = I.
    method, hp = cg({"eig_dim": 64, "oversampling": 0, "eig_rtol": 1e-4})
    context = ctx()
    base = tiny_bert()
    layers = dict(matching_linear_layers(base, TARGETS, HEAD))
    twin = copy.deepcopy(base)  # same weights and seed as inside prepare: same statistics
    twin_layers = dict(matching_linear_layers(twin, TARGETS, HEAD))
    curvature = collect_kfac(twin, twin_layers, iter(INIT), seed=hp.seed)
    reference = tiny_bert().train()
    for b in INIT:
        reference(**b).loss.backward()
    model = method.prepare(copy.deepcopy(base), hp, context)
    keys = {n for n in layers if n.endswith(".key")}
    assert set(context.init_notes["degenerate_curvature"]) == keys and len(keys) == 2
    for name, base_layer in layers.items():
        f = curvature.factors[name]
        s, a_in = f.s.dense().numpy(), f.a_in.dense().numpy()
        if name in keys:
            s = np.eye(len(s))
        g = reference.get_submodule(name).weight.grad.double().numpy() / 3
        _, _, _, product = reference_init(a_in, s, g, hp.rank, rtol=hp.eig_rtol)
        m = base_layer.out_features
        expected = product * (math.sqrt(m) / hp.stable_gamma) / np.linalg.norm(product, 2)
        layer = model.base_model.model.get_submodule(name)
        b0, a0 = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        assert layer.scaling["default"] == pytest.approx(hp.alpha / math.sqrt(hp.rank))  # rsLoRA
        assert rel((b0 @ a0).double().numpy(), expected) < 1e-4
        torch.testing.assert_close(b0.T @ b0, a0 @ a0.T, atol=1e-6, rtol=1e-4)


def test_init_under_gradient_checkpointing_equals_the_init_without():
    """DeepSpeed trials enable gradient checkpointing, which re-runs each layer's forward
    during the backward: the init passes turn it off (and back on), so the adapter equals
    the one without it (before, the recomputed forwards failed the init)."""
    method, hp = cg()
    plain = method.prepare(tiny_bert(), hp, ctx())
    checkpointed_base = tiny_bert()
    checkpointed_base.gradient_checkpointing_enable({"use_reentrant": False})
    checkpointed = method.prepare(checkpointed_base, hp, ctx())
    recomputed = []
    layer = checkpointed.base_model.model.bert.encoder.layer[0].attention.self.query
    handle = layer.register_forward_hook(lambda *_: recomputed.append(1))
    checkpointed.train()
    checkpointed(**INIT[0]).loss.backward()
    handle.remove()
    assert len(recomputed) == 2  # the forward really ran twice: checkpointing is on
    for (name, p), (_, q) in zip(
        plain.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        if ".lora_" in name:
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


def test_shift_keeps_the_base_logits_and_no_shift_starts_at_W0_plus_sBA():
    base = tiny_bert()
    method, no_shift_hp = cg()
    shifted = method.prepare(copy.deepcopy(base), cg({"variant": "shift"})[1], ctx()).eval()
    unshifted = method.prepare(copy.deepcopy(base), no_shift_hp, ctx()).eval()
    torch.testing.assert_close(logits(shifted), logits(base), atol=2e-5, rtol=1e-4)
    assert (logits(unshifted) - logits(base)).abs().max() > 1e-3
    by_hand = copy.deepcopy(base)
    for name, _ in matching_linear_layers(base, TARGETS, HEAD):
        lu = unshifted.base_model.model.get_submodule(name)
        ls = shifted.base_model.model.get_submodule(name)
        b0, a0 = lu.lora_B["default"].weight, lu.lora_A["default"].weight
        torch.testing.assert_close(ls.lora_B["default"].weight, b0)  # same init both ways
        w0 = base.get_submodule(name).weight
        delta = lu.scaling["default"] * b0 @ a0
        torch.testing.assert_close(lu.base_layer.weight, w0)  # untouched
        torch.testing.assert_close(ls.base_layer.weight, w0 - delta, atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            by_hand.get_submodule(name).weight.add_(delta)
    torch.testing.assert_close(logits(unshifted), logits(by_hand), atol=2e-5, rtol=1e-4)


def test_no_shift_adapter_saves_and_loads_as_plain_peft_lora(tmp_path):
    method, hp = cg()
    model = method.prepare(tiny_bert(), hp, ctx()).eval()
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(logits(restored), logits(model), atol=1e-6, rtol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(model), atol=2e-5, rtol=1e-4)


def test_trainable_count_is_the_lora_formula():
    method, hp = cg()
    base = tiny_bert()
    expected = method.expected_trainable_params(base, hp, ctx())
    assert expected == 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32)) * 4 + (32 * 3 + 3)
    model = method.prepare(copy.deepcopy(base), hp, ctx())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_defaults_and_resolved_config():
    method = methods.get_method("cg_lora")
    hp = method.hyperparams({})
    assert (hp.variant, hp.use_rslora, hp.stable_gamma, hp.power_iters, hp.scale) == (
        "no_shift",
        True,
        16.0,
        0,
        "stable",
    )
    assert hp.hutchinson_samples == 1 and hp.damping == 0.0
    assert method.init_batches_wanted(hp, ctx(batch_size=8)) == 32  # paper: 8 x 32
    assert method.init_batches_wanted(hp, ctx(batch_size=16)) == 16
    config = method.resolved_config(hp, ctx())
    assert config["eig_dim"] == 32 and config["init_batches"] == 32
    assert config["scaling_s"] == pytest.approx(16 / math.sqrt(8))
    assert config["target_modules"] == TARGETS


@pytest.mark.parametrize(
    "bad",
    [
        {"eig_dim": 2},  # < rank 4
        {"oversampling": -1},
        {"power_iters": -1},
        {"stable_gamma": 0},
        {"damping": -0.1},
        {"eig_rtol": 1.0},
        {"variant": "both"},
        {"scale": "unit"},
        {"hutchinson_samples": 0},
        {"curvature_loss": "hinge"},
        {"gamma": 16},  # unknown key
    ],
)
def test_bad_hyperparameters_are_rejected(bad):
    with pytest.raises(ValidationError):
        methods.get_method("cg_lora").hyperparams({"rank": 4, **bad})


def test_too_few_examples_for_the_rank_and_oversized_rank_are_refused():
    method = methods.get_method("cg_lora")
    one = [batch(60, n=2, length=4)]  # K-FAC-reduce factors of rank <= 2 < rank 4
    with pytest.raises(ValueError, match="curvature directions"):
        method.prepare(tiny_bert(), method.hyperparams({"rank": 4, "init_batches": 1}), ctx(one))
    with pytest.raises(ValueError, match="rank 64 exceeds"):
        method.prepare(tiny_bert(), method.hyperparams({"rank": 64, "init_batches": 1}), ctx())


# ---------------------------------------------------------------- two ranks


def _rank_init(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        own = INIT[rank::world]  # different batches (and a different count) per rank
        method = methods.get_method("cg_lora")
        hp = method.hyperparams({"rank": 4, "init_batches": len(own), "power_iters": 1})
        model = method.prepare(tiny_bert(), hp, ctx(own))
        torch.save(
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_different_batches_initialise_identically():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_init, args=(2, f"{tmp}/rendezvous", tmp), nprocs=2, join=True)
        rank0, rank1 = (torch.load(f"{tmp}/rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 2 * 12
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0)
    # and not what either rank would compute from its own batches alone
    method = methods.get_method("cg_lora")
    alone = method.prepare(
        tiny_bert(),
        method.hyperparams({"rank": 4, "init_batches": 2, "power_iters": 1}),
        ctx(INIT[0::2]),
    )
    key = next(k for k in rank0 if "lora_B" in k)
    b_alone = alone.get_parameter(key).detach()
    assert rel(b_alone @ b_alone.T, rank0[key] @ rank0[key].T) > 1e-3


def _held_bytes(stat) -> int:
    held = [stat._gram] if stat.is_dense else stat._rows
    return sum(t.numel() * t.element_size() for t in held)


def test_init_statistics_bytes_is_what_the_kfac_factors_hold():
    """The memory estimate's CG-LoRA term (Method.init_statistics_bytes) against the bytes
    collect_kfac's factors really hold: rows below the dimension, a Gram matrix above it."""
    from methods import get_method

    model = Mlp(n=40, m=12, c=3)  # 16 examples: X stays rows (16 < 40), S folds (32 > 12)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    result = collect_kfac(model, {"fc1": model.fc1}, [{"x": x}], loss_kind="mse", samples=2)
    factors = result.factors["fc1"]
    assert not factors.a_in.stat.is_dense and factors.s.stat.is_dense
    held = _held_bytes(factors.a_in.stat) + _held_bytes(factors.s.stat)
    cg = get_method("cg_lora")
    hp = cg.hyperparams({"hutchinson_samples": 2})
    assert cg.init_statistics_bytes(hp, [(12, 40)], examples=16) == held == 4 * (16 * 40 + 12 * 12)
    # LoRA-GA's accumulator term is the dense m x n gradient: the claim's other side
    lora_ga = get_method("lora_ga")
    assert lora_ga.init_statistics_bytes(lora_ga.hyperparams({}), [(12, 40)], 16) == 4 * 12 * 40
