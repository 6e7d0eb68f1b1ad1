"""peft_lora: each peft init builds and keeps its promise (tiny random BERT, float64 checks)."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from pydantic import ValidationError
from transformers import BertForSequenceClassification

import methods
from harness.spec import identity
from tests.builders import tiny_bert

RANK = 4
HEAD = ["classifier"]
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LAYER = "bert.encoder.layer.0.attention.self.query"
METHOD = methods.get_method("peft_lora")
PAD = 0  # the padding token: its embedding lies off the others' subspace (see structured_bert)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: thread contention on a shared machine costs 10x (CorDA 17 s -> 1 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def structured_bert() -> BertForSequenceClassification:
    """Layer 0's inputs with a clear spectrum, so EVA's incremental PCA converges in a few
    passes and its components are sharp: word embeddings of rank 6 with singular values
    8, 4, 2, 1, 0.5, 0.25; no position / token-type embeddings; the padding token's
    embedding is large and orthogonal to the rest (counting padding would show)."""
    model = tiny_bert()
    emb = model.bert.embeddings
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, 7, generator=g))
    codes, _ = torch.linalg.qr(torch.randn(100, 6, generator=g))
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]) * 10
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(codes @ torch.diag(spectrum) @ basis[:, :6].T)
        emb.word_embeddings.weight[PAD] = 40 * basis[:, 6]
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
    return model


def batch(seed: int, n: int = 4, length: int = 8, padded: int = 0) -> dict[str, torch.Tensor]:
    """`padded` trailing positions of each example are padding (mask 0, token PAD)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if padded:
        ids[:, -padded:] = PAD
        mask[:, -padded:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


INIT_BATCHES = [batch(10 + i, padded=3) for i in range(4)]


def ctx(init_batches=INIT_BATCHES) -> methods.PrepareContext:
    return methods.PrepareContext(
        head_modules=HEAD,
        default_target_modules=TARGETS,
        init_batches=(
            (lambda n: itertools.islice(itertools.cycle(init_batches), n))
            if init_batches is not None
            else None
        ),
    )


def prepare(init, base=None, context=None, **overrides):
    base = base if base is not None else tiny_bert()
    hp = METHOD.hyperparams({"rank": RANK, "init_lora_weights": init, **overrides})
    context = context or ctx()
    expected = METHOD.expected_trainable_params(base, hp, context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = METHOD.prepare(copy.deepcopy(base), hp, context).eval()
    return base, model, hp, expected


def logits(model) -> torch.Tensor:
    b = batch(99, n=3, length=6)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def lora(model, name: str = LAYER):
    return dict(model.named_modules())["base_model.model." + name]


def factors(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, s) in float64."""
    b = layer.lora_B["default"].weight.detach().double()
    a = layer.lora_A["default"].weight.detach().double()
    return b, a, layer.scaling["default"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def subspace_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """sin of the largest principal angle between the row spaces of x and y."""
    qx = torch.linalg.qr(x.T.double())[0]
    qy = torch.linalg.qr(y.T.double())[0]
    return float(torch.linalg.matrix_norm(qy - qx @ (qx.T @ qy), ord=2))


def unpadded_examples(batches):
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"].bool(), strict=True):
            yield {"input_ids": ids[mask][None], "attention_mask": torch.ones(1, int(mask.sum()))}


def layer_inputs(model, name: str, batches, per_example: bool = False) -> list[torch.Tensor]:
    """What `name` receives on these batches (per example, padding dropped, if asked)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, inputs, out: seen.append(inputs[0].detach().double())
    )
    with torch.no_grad():
        for b in unpadded_examples(batches) if per_example else batches:
            model(**b)
    handle.remove()
    return seen


# ---------------------------------------------------------------- the plain inits


@pytest.mark.parametrize(
    "init", [True, "gaussian", "orthogonal", "olora", "pissa", "pissa_niter_4", "mica"]
)
def test_init_starts_at_the_base_function_with_the_formula_count(init):
    base, model, hp, expected = prepare(init)
    assert METHOD.starts_at_base(hp)
    torch.testing.assert_close(logits(model), logits(base), atol=2e-5, rtol=1e-4)
    assert trainable(model) == expected
    b, a, _ = factors(lora(model))
    assert torch.count_nonzero(a if init != "mica" else b) > 0  # an init was applied


def test_false_is_random_A_and_B_off_the_base_function():
    base, model, hp, expected = prepare(False)
    assert not METHOD.starts_at_base(hp)
    b, a, s = factors(lora(model))
    assert torch.count_nonzero(b) == b.numel() and torch.count_nonzero(a) == a.numel()
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    assert trainable(model) == expected


@pytest.mark.parametrize("init", ["olora", "pissa", "pissa_niter_4", "corda"])
def test_weight_moving_inits_offset_W0_by_exactly_the_adapter(init):
    base, model, *_ = prepare(init)
    adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }
    assert len(adapted) == 12
    moved = []
    for name, layer in adapted.items():
        b, a, s = factors(layer)
        w0 = base.get_submodule(name).weight.detach().double()
        residual = layer.base_layer.weight.detach().double()
        # W0' + s B A == W0 to float32 round-off; W0' alone is far from W0.
        gap = torch.linalg.matrix_norm(residual + s * b @ a - w0)
        assert gap < 1e-5 * torch.linalg.matrix_norm(w0), name
        moved.append(float(torch.linalg.matrix_norm(residual - w0) / torch.linalg.matrix_norm(w0)))
    assert min(moved) > 1e-2


def test_olora_B_is_orthonormal_and_A_the_top_rows_of_R():
    base, model, *_ = prepare("olora")
    b, a, s = factors(lora(model))
    torch.testing.assert_close(b.T @ b, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.allclose(a, torch.triu(a), atol=1e-6)  # R[:r] of W0 = QR
    q, r = torch.linalg.qr(base.get_submodule(LAYER).weight.detach().double())
    torch.testing.assert_close((b @ a).abs(), (q[:, :RANK] @ r[:RANK]).abs(), atol=1e-5, rtol=0)


def test_pissa_adapter_is_the_best_rank_r_part_of_W0():
    base, model, *_ = prepare("pissa")
    b, a, s = factors(lora(model))
    u, sv, vh = torch.linalg.svd(base.get_submodule(LAYER).weight.detach().double())
    best = u[:, :RANK] @ torch.diag(sv[:RANK]) @ vh[:RANK]
    torch.testing.assert_close(s * b @ a, best, atol=1e-5, rtol=0)


def test_orthogonal_init_has_B_A_zero_from_complementary_halves():
    _, model, *_ = prepare("orthogonal")
    b, a, _ = factors(lora(model))
    # peft: A's columns lie in span(Q[0::2]), B's rows in span(Q[1::2]) of a random
    # orthogonal Q, so B A = 0 though both are dense, each of rank r/2.
    assert float((b @ a).abs().max()) < 1e-6 * float(b.abs().max() * a.abs().max())
    for factor in (a, b):  # rank r/2 up to float32 round-off
        assert int(torch.linalg.matrix_rank(factor, rtol=1e-5)) == RANK // 2
    with pytest.raises(ValidationError, match="even rank"):
        METHOD.hyperparams({"rank": 3, "init_lora_weights": "orthogonal"})


def test_mica_B_is_the_minor_left_singular_vectors_frozen_and_A_zero():
    base, model, *_ = prepare("mica")
    layer = lora(model)
    b, a, _ = factors(layer)
    assert torch.count_nonzero(a) == 0
    assert not layer.lora_B["default"].weight.requires_grad
    assert layer.lora_A["default"].weight.requires_grad
    u, _, _ = torch.linalg.svd(base.get_submodule(LAYER).weight.detach().double())
    assert subspace_gap(b.T, u[:, -RANK:].T) < 1e-5
    assert subspace_gap(b.T, u[:, :RANK].T) > 0.5  # the top ones would fail


# ---------------------------------------------------------------- EVA


def test_eva_A_rows_are_the_top_principal_directions_of_the_unpadded_layer_inputs():
    base = structured_bert()
    _, model, hp, expected = prepare(
        "eva", base=base, target_modules=["layer.0.attention.self.query"]
    )
    torch.testing.assert_close(logits(model), logits(base), atol=2e-5, rtol=1e-4)
    assert trainable(model) == expected
    b, a, _ = factors(lora(model))
    assert torch.count_nonzero(b) == 0
    torch.testing.assert_close(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-4, rtol=0)
    # Independent PCA of the inputs EVA read (hp.init_batches cycled), padding dropped.
    read = list(itertools.islice(itertools.cycle(INIT_BATCHES), hp.init_batches))
    seen = layer_inputs(base, LAYER, read)
    masks = [bt["attention_mask"].bool() for bt in read]
    tokens = torch.cat([x[m] for x, m in zip(seen, masks, strict=True)])
    top = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)[2][:RANK]
    assert subspace_gap(a, top) < 1e-2
    # Counting the padding positions gives another subspace: the check can tell.
    everything = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    with_padding = torch.linalg.svd(everything - everything.mean(0), full_matrices=False)[2]
    assert subspace_gap(a, with_padding[:RANK]) > 0.5


def test_eva_and_corda_refuse_without_init_batches_and_read_them():
    assert METHOD.init_batches_wanted(METHOD.hyperparams({"init_lora_weights": "eva"})) == 8
    assert METHOD.init_batches_wanted(METHOD.hyperparams({"init_lora_weights": "pissa"})) == 0
    for init in ("eva", "corda"):
        with pytest.raises(ValueError, match="needs the trial's init batches"):
            prepare(init, context=ctx(init_batches=None))


# ---------------------------------------------------------------- CorDA


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_adapter_is_the_chosen_part_of_W_C_from_the_layer_input_covariance(mode):
    options = {"corda_config": {"corda_method": mode}}
    base, model, hp, expected = prepare("corda", lora_options=options)
    torch.testing.assert_close(logits(model), logits(base), atol=2e-5, rtol=1e-4)
    assert trainable(model) == expected
    b, a, s = factors(lora(model))
    read = list(itertools.islice(itertools.cycle(INIT_BATCHES), hp.init_batches))

    def expected_delta(per_example: bool) -> torch.Tensor:
        # CorDA: C = mean over sequences of X^T X, X scaled by its max; damped 1% of the
        # mean diagonal; W C = U S V^T; adapter = chosen r of U S V^T C^-1.
        seen = layer_inputs(base, LAYER, read, per_example=per_example)
        xs = [x.reshape(-1, x.shape[-1]) for x in seen]
        cov = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs) / len(xs)
        cov = cov + torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diag().mean() * 0.01
        w = base.get_submodule(LAYER).weight.detach().double()
        u, sv, vh = torch.linalg.svd(w @ cov, full_matrices=False)
        keep = slice(0, RANK) if mode == "ipm" else slice(-RANK, None)
        return u[:, keep] @ torch.diag(sv[keep]) @ vh[keep] @ torch.linalg.inv(cov)

    delta = s * b @ a
    right = expected_delta(per_example=True)
    assert torch.linalg.matrix_norm(delta - right) < 1e-3 * torch.linalg.matrix_norm(right)
    # Whole padded batches (what peft's hook would get without our per-example feed) differ.
    wrong = expected_delta(per_example=False)
    assert torch.linalg.matrix_norm(delta - wrong) > 1e-2 * torch.linalg.matrix_norm(right)


# ---------------------------------------------------------------- options and refusals


def test_lora_options_pass_through_and_the_count_follows_them():
    options = {"use_dora": True, "use_rslora": True, "rank_pattern": {"intermediate.dense": 2}}
    base, model, hp, expected = prepare(True, lora_options=options)
    assert trainable(model) == expected
    assert lora(model).scaling["default"] == pytest.approx(16 / RANK**0.5)
    assert lora(model, "bert.encoder.layer.1.intermediate.dense").r["default"] == 2
    assert "default" in lora(model).lora_magnitude_vector
    plain = METHOD.expected_trainable_params(base, METHOD.hyperparams({"rank": RANK}), ctx())
    assert expected != plain


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_options": {"use_dorra": True, "r": 2, "bias": "all"}},
         r"unknown LoraConfig option\(s\) \['use_dorra'\].*r -> rank.*\['bias'\] not supported"),
        ({"init_lora_weights": "loftq"}, "bitsandbytes"),
        ({"init_lora_weights": "lora_ga"}, "convention: peft"),
        ({"init_lora_weights": "pissa_niter_x"}, "unknown init_lora_weights"),
        ({"init_lora_weights": "eva", "lora_options": {"eva_config": {"rho": 2.0}}}, "rho"),
        ({"init_lora_weights": "eva", "lora_options": {"eva_config": {"rhoo": 1}}},
         "unknown EvaConfig"),
        ({"init_lora_weights": "corda",
          "lora_options": {"corda_config": {"cache_file": "/tmp/x"}}}, "cache_file"),
        ({"init_lora_weights": "pissa", "lora_options": {"eva_config": {}}}, "only read with"),
        ({"init_lora_weights": "gaussian", "lora_options": {"lora_bias": True}}, "peft LoraConfig"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_error_when_the_config_is_read(overrides, message):
    with pytest.raises(ValidationError, match=message):
        METHOD.hyperparams(overrides)


def test_run_identity_includes_the_init_and_the_options():
    plain = identity.method_config("peft_lora", {}, "bert")
    assert plain["init_lora_weights"] is True and plain["lora_options"] == {}
    configs = [
        plain,
        identity.method_config("peft_lora", {"init_lora_weights": "gaussian"}, "bert"),
        identity.method_config("peft_lora", {"lora_options": {"use_rslora": True}}, "bert"),
    ]
    assert len({repr(sorted(c.items())) for c in configs}) == 3


def test_three_training_steps_lower_the_loss():
    _, model, hp, _ = prepare("pissa")
    model.train()
    optimizer = METHOD.build_optimizer(model, 1e-2, hp)
    data = batch(5, n=8)
    losses = []
    for _ in range(3):
        loss = model(**data).loss
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[0]
