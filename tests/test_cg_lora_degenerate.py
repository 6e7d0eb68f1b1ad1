"""CG-LoRA on layers whose K-FAC-reduce factor is degenerate (attention keys without rotary
embeddings; methods/cg_lora.py step 1b, methods/kfac.py `degenerate_factors`).

References are independent of methods/kfac.py: output gradients from autograd in float64,
dense numpy projections.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import transformers

import methods
import methods.cg_lora as cg_lora
import methods.kfac as kfac
from methods.kfac import DEGENERATE_POOLING_RATIO, collect_kfac, degenerate_factors
from methods.peft_lora import matching_linear_layers
from methods.targets import default_target_modules
from tests.builders import lm_batch, reference_init, rel, tiny_bert, tiny_llama


def tiny_vit() -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def tiny_t5() -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def _batches(family: str, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """Seeded init batches of 8 examples; text ones with a right-padded first example."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(30 + i)
        if family == "vit":
            out.append({
                "pixel_values": torch.randn(8, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (8,), generator=g),
            })  # fmt: skip
            continue
        ids = torch.randint(1, 100, (8, 6), generator=g)
        mask = torch.ones(8, 6, dtype=torch.long)
        mask[0, 4:] = 0
        if family == "bert":
            labels = torch.randint(0, 3, (8,), generator=g)
        else:  # t5: a target sequence with an ignored position
            labels = torch.randint(1, 100, (8, 4), generator=g)
            labels[1, 3:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


FAMILIES = {"bert": (tiny_bert, ["classifier"]), "vit": (tiny_vit, ["classifier"]),
            "t5": (tiny_t5, [])}  # fmt: skip


def _is_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("key", "k_proj", "k")


def _setup(family: str, dtype: torch.dtype = torch.float32):
    build, head = FAMILIES[family]
    model = build().to(dtype)
    batches = [
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()}
        for b in _batches(family)
    ]
    targets = default_target_modules(model.config.model_type)
    layers = dict(matching_linear_layers(model, targets, head))
    ctx = methods.PrepareContext(
        head_modules=head,
        default_target_modules=targets,
        init_batches=lambda n: iter(batches[:n]),
        batch_size=8,
    )
    return model, layers, batches, ctx


def _init(model, layers, ctx, detect: bool = True, **overrides) -> dict[str, torch.Tensor]:
    """B0 A0 per layer from CgLora.compute_factors; detect=False is the code before the fix."""
    method = methods.get_method("cg_lora")
    hp = method.hyperparams({"rank": 4, "init_batches": 3, **overrides})
    original = cg_lora.degenerate_factors
    if not detect:
        cg_lora.degenerate_factors = lambda factors: {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factors = method.compute_factors(model, layers, hp, ctx)
    finally:
        cg_lora.degenerate_factors = original
    return {name: (f.b0 @ f.a0).double() for name, f in factors.items()}


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("family", ["bert", "vit", "t5"])
def test_key_factors_are_flagged_and_no_other(family):
    model, layers, batches, _ = _setup(family)
    factors = collect_kfac(model, layers, iter(batches), seed=0).factors
    flagged = degenerate_factors(factors)
    keys = {name for name in layers if _is_key(name)}
    assert len(keys) == (6 if family == "t5" else 2)  # T5: encoder, decoder, cross-attention
    assert set(flagged) == keys
    for name, f in factors.items():
        if name in keys:
            assert set(flagged[name]) == {"S"}
            assert f.s.pooling_ratio < 1e-10  # float32 round-off of an exact cancellation
        else:
            assert f.s.pooling_ratio > 100 * DEGENERATE_POOLING_RATIO
        assert f.a_in.pooling_ratio > 0.5  # inputs never cancel
        # the pooled energy is the trace of the stored sum of pooled outer products
        assert f.s.pooled_energy == pytest.approx(float(torch.trace(f.s.dense())) * f.s.total)


def test_energies_equal_autograd_sums_and_the_key_sum_vanishes_in_float64(monkeypatch):
    """With a fixed output vector e = 1 (instead of the Hutchinson draw), g_t is the gradient
    of sum(logits) with respect to the layer's output, from plain autograd in float64: the
    energies are its pooled and per-token squared norms, and for the key the per-example
    sum over tokens is 0 while the per-token gradients and the key weight's gradient
    sum_t g_t x_t^T are not."""
    model, layers, batches, _ = _setup("bert", torch.float64)
    monkeypatch.setattr(
        kfac, "output_noise", lambda kind, logits, labels, gen: torch.ones_like(logits)
    )
    b = batches[0]
    names = ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    factors = collect_kfac(model, {n: layers[n] for n in names}, [b], seed=0).factors
    mask = b["attention_mask"].double()
    for name in names:
        store = {}

        def hook(module, inputs, output, store=store):
            store["x"] = inputs[0].detach()
            store["out"] = output
            output.retain_grad()

        handle = model.get_submodule(name).register_forward_hook(hook)
        try:
            model(**b).logits.sum().backward()
        finally:
            handle.remove()
        g = store["out"].grad.double() * mask[:, :, None]
        pooled = float(g.sum(1).square().sum())
        token = float(g.square().sum())
        assert factors[name].s.token_energy == pytest.approx(token, rel=1e-5)
        assert factors[name].s.pooled_energy == pytest.approx(pooled, rel=1e-4, abs=1e-12 * token)
        weight_grad = torch.einsum("btm,btn->mn", g, store["x"].double())
        if name.endswith("key"):
            assert pooled < 1e-24 * token  # exactly 0 up to float64 round-off
            assert float(weight_grad.norm()) > 1e-3 * token**0.5 * store["x"].norm()
        else:
            assert pooled > 0.1 * token
        model.zero_grad()


# ---------------------------------------------------------------- float32 vs float64


@pytest.mark.parametrize("family", ["bert", "vit", "t5"])
def test_float32_and_float64_inits_agree_on_every_layer(family):
    single, fp32_layers, _, fp32_ctx = _setup(family, torch.float32)
    double, fp64_layers, _, fp64_ctx = _setup(family, torch.float64)
    ours32, ours64 = _init(single, fp32_layers, fp32_ctx), _init(double, fp64_layers, fp64_ctx)
    for name in fp32_layers:
        assert rel(ours32[name], ours64[name]) < 1e-3, name
    keys = {name for name in fp32_layers if _is_key(name)}
    for notes in (fp32_ctx.init_notes, fp64_ctx.init_notes):
        assert set(notes["degenerate_curvature"]) == keys
        assert all("identity" in v for v in notes["degenerate_curvature"].values())
    # Before the fix (whitening by the round-off): the key layers' inits disagree.
    old32 = _init(single, fp32_layers, _setup(family, torch.float32)[3], detect=False)
    old64 = _init(double, fp64_layers, _setup(family, torch.float64)[3], detect=False)
    for name in keys:
        assert rel(old32[name], old64[name]) > 0.1, name


def test_degenerate_side_is_not_whitened_and_other_layers_are_unchanged():
    """Exact eigendecompositions (as the end-to-end dense test in test_cg_lora.py): a key
    layer's B0 A0 is the dense reference with S = I, i.e. the projection of -G onto the
    modes of G A_in^-1/2; every other layer's init is bitwise the one without the fix."""
    model, layers, batches, ctx = _setup("bert")
    overrides = {"eig_dim": 64, "oversampling": 0, "eig_rtol": 1e-4}
    fixed = _init(model, layers, ctx, **overrides)
    before = _init(model, layers, _setup("bert")[3], detect=False, **overrides)
    curvature = collect_kfac(model, layers, iter(batches), seed=0)  # the same draws
    reference = copy.deepcopy(model).train()
    for b in batches:
        reference(**b).loss.backward()
    hp = methods.get_method("cg_lora").hyperparams({"rank": 4, "init_batches": 3, **overrides})
    for name, layer in layers.items():
        if not _is_key(name):
            torch.testing.assert_close(fixed[name], before[name], atol=0, rtol=0)
            continue
        a_in = curvature.factors[name].a_in.dense().numpy()
        g = reference.get_submodule(name).weight.grad.double().numpy() / len(batches)
        m = layer.out_features
        _, _, _, product = reference_init(a_in, np.eye(m), g, hp.rank, rtol=hp.eig_rtol)
        expected = product * (np.sqrt(m) / hp.stable_gamma) / np.linalg.norm(product, 2)
        assert rel(fixed[name].numpy(), expected) < 1e-4
        assert rel(before[name].numpy(), expected) > 0.1  # whitening by round-off differs


# ---------------------------------------------------------------- rotary: unaffected


def test_rotary_llama_init_is_unchanged_and_nothing_is_flagged():
    model = tiny_llama()
    targets = default_target_modules("llama")
    layers = dict(matching_linear_layers(model, targets, []))
    batches = [lm_batch(1), lm_batch(2), lm_batch(4)]

    def context() -> methods.PrepareContext:
        return methods.PrepareContext(
            head_modules=[], default_target_modules=targets,
            init_batches=lambda n: iter(batches[:n]),
        )  # fmt: skip

    factors = collect_kfac(model, layers, iter(batches), seed=0).factors
    assert degenerate_factors(factors) == {}
    assert min(f.s.pooling_ratio for f in factors.values()) > 0.05  # rotary keys: ~0.15
    fixed_ctx = context()
    fixed = _init(model, layers, fixed_ctx)
    before = _init(model, layers, context(), detect=False)
    assert "degenerate_curvature" not in fixed_ctx.init_notes
    for name in layers:
        torch.testing.assert_close(fixed[name], before[name], atol=0, rtol=0)


def test_resolved_config_states_the_rule():
    method = methods.get_method("cg_lora")
    _, _, _, ctx = _setup("bert")
    config = method.resolved_config(method.hyperparams({"rank": 4}), ctx)
    assert config["degenerate_curvature"] == cg_lora.DEGENERATE_TREATMENT
    assert f"{DEGENERATE_POOLING_RATIO:g}" in config["degenerate_curvature"]
