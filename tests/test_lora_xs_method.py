"""The `lora_xs` method (methods/lora_xs.py), checked against a dense float64 derivation, plus
what both new baselines (`lora_xs`, `scaled_adamw`) share: the ZeRO config check and a
single CPU trial on MiniLM with the offline mirror."""

from __future__ import annotations

import copy

import pytest
import torch

import methods
from methods import lora_xs
from tests.builders import LAYER, TARGETS, batch, ctx, logits, tiny_bert

RANK = 4


def prepare_xs(**overrides):
    method = methods.get_method("lora_xs")
    hp = method.hyperparams({"rank": RANK, **overrides})
    base = tiny_bert()
    expected = method.expected_trainable_params(base, hp, ctx())
    model = method.prepare(copy.deepcopy(base), hp, ctx()).eval()
    return base, model, method, hp, expected


def best_rank_r(weight: torch.Tensor, rank: int):
    """Dense float64 SVD of W0: (U_r, S_r, V_r^T) and the Eckart-Young optimum U_r S_r V_r^T."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank], u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def test_init_is_the_top_r_svd_of_w0_with_s_on_a_as_the_official_code():
    base, model, *_ = prepare_xs()
    layers = lora_xs.adapter_layers(model)
    assert len(layers) == len(TARGETS) * 2  # 6 block linears x 2 layers
    for name, layer in layers.items():
        w0 = base.get_submodule(name).weight
        _, s, _, best = best_rank_r(w0, RANK)
        b, a = layer.lora_B.double(), layer.lora_A.double()
        torch.testing.assert_close(b @ a, best, atol=1e-5, rtol=1e-5)
        # Official split: B = U_r (orthonormal columns), A = S_r V_r^T (A A^T = S_r^2).
        torch.testing.assert_close(b.T @ b, torch.eye(RANK, dtype=b.dtype), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.diag(s**2), atol=1e-4, rtol=1e-4)
        assert torch.equal(layer.base_layer.weight, w0)  # no weight offset
        assert layer.scaling == 16.0 / RANK  # peft's alpha / r, official alpha 16


def test_R_starts_small_random_as_official_and_zero_gives_the_base_function():
    _, model, method, hp, _ = prepare_xs()
    r = torch.cat([m.lora_R.detach().flatten() for m in lora_xs.adapter_layers(model).values()])
    assert 0.5e-5 < float(r.std()) < 2e-5 and float(r.abs().max()) < 1e-4  # N(0, 1e-5^2)
    assert not method.starts_at_base(hp)
    base, exact, method, hp, _ = prepare_xs(init_std=0.0)
    assert method.starts_at_base(hp)
    assert all(not m.lora_R.any() for m in lora_xs.adapter_layers(exact).values())
    assert torch.equal(logits(exact), logits(base))


def test_forward_is_w0_plus_alpha_over_r_B_R_A_in_float64():
    alpha = 6.0
    base, model, *_ = prepare_xs(alpha=alpha)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in lora_xs.adapter_layers(model).values():
            layer.lora_R.copy_(torch.randn_like(layer.lora_R))  # "trained"
    dense = copy.deepcopy(base).double()
    with torch.no_grad():
        for name, layer in lora_xs.adapter_layers(model).items():
            b, r, a = (t.detach().double() for t in (layer.lora_B, layer.lora_R, layer.lora_A))
            dense.get_submodule(name).weight += alpha / RANK * b @ r @ a
    expected = logits(dense)
    gap = float((expected - logits(base).double()).abs().max())
    assert gap > 1e-3  # the update matters: a wrong scaling (alpha, 1) would show
    torch.testing.assert_close(logits(model).double(), expected, atol=gap * 1e-3, rtol=1e-4)


def test_only_R_and_the_head_get_gradients_and_the_count_is_r_squared_per_layer():
    base, model, method, hp, expected = prepare_xs()
    model.train()
    model(**batch(5)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_R") or n.startswith("classifier") for n in trainable)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all("lora_A" not in n and "lora_B" not in n for n, _ in model.named_parameters())
    layer = model.get_submodule(LAYER)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # frozen buffers
    n_layers = len(TARGETS) * 2
    assert expected == n_layers * RANK**2 + (32 * 3 + 3)
    assert sum(model.get_parameter(n).numel() for n in trainable) == expected


def test_merge_equals_unmerged_and_save_load_round_trips(tmp_path):
    base, model, *_ = prepare_xs()
    with torch.no_grad():
        for layer in lora_xs.adapter_layers(model).values():
            layer.lora_R.add_(torch.randn_like(layer.lora_R) * 1e-2)
        model.classifier.weight.add_(0.1)
    lora_xs.save_adapter(model, tmp_path)
    restored = lora_xs.load_adapter(tiny_bert(), tmp_path).eval()
    restored.classifier.load_state_dict(model.classifier.state_dict())  # the head trains too
    assert torch.equal(logits(restored), logits(model))
    assert restored.get_submodule(LAYER).scaling == 16.0 / RANK
    merged = methods.get_method("lora_xs").merge(copy.deepcopy(model))
    assert not lora_xs.adapter_layers(merged)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-4)
    assert (logits(merged) - logits(base)).abs().max() > 1e-4


def test_defaults_targets_and_rank_bound():
    method = methods.get_method("lora_xs")
    hp = method.hyperparams({})
    assert (hp.rank, hp.alpha, hp.init_std) == (8, 16.0, 1e-5)
    official = ["query", "value", "attention.output.dense", "output.dense"]
    assert method.family_target_modules("roberta") == official  # main_glue.py targets
    assert method.family_target_modules("llama") == methods.get_method(
        "lora"
    ).family_target_modules("llama")
    with pytest.raises(ValueError, match="rank 64 exceeds"):
        method.prepare(tiny_bert(), method.hyperparams({"rank": 64}), ctx())
    assert method.resolved_config(hp, ctx())["scaling_used"] == 2.0


# ---------------------------------------------------------------- both new baselines

NEW = ["lora_xs", "scaled_adamw"]


@pytest.mark.parametrize("name", NEW)
def test_zero_path_accepts_them_by_the_existing_contract(name):
    """No training callbacks (lora_xs: a plug-in adapter like LoRA-SB's; scaled_adamw: a
    gradient transform, applied to assembled gradients under ZeRO), so validation passes."""
    from harness.spec.config import validate_config, zero_unsupported_reason
    from tests.builders import sweep_config

    method = methods.get_method(name)
    assert zero_unsupported_reason(method, method.hyperparams({})) is None
    assert validate_config(
        sweep_config(distributed={"workers": 2}, methods={name: {"lrs": [1e-3]}})
    )


@pytest.mark.parametrize("name", NEW)
def test_single_cpu_trial_gives_an_ok_row_with_passing_checks(mirror_dir, name):
    from harness.training.trial import run_trial
    from tests.builders import trial_spec

    row = run_trial(trial_spec(mirror_dir, method=name))
    assert row["status"] == "ok", row.get("traceback")
    assert row["method"] == name and row["steps"] == 2
    assert row["trainable_params"] == row["expected_trainable_params"] < row["total_params"]
    method = methods.get_method(name)
    kind = "identity" if method.starts_at_base(method.hyperparams({})) else "offset"
    assert row["sanity_init"].startswith(kind)
    assert row["sanity_merge"].startswith("merged == unmerged")
