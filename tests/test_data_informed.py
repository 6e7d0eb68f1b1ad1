"""The shared gradient estimator, LoRA-One and LoRA-SB (specs/methods.md, issue #3)."""

from __future__ import annotations

import copy
import itertools
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import methods
from methods import lora_xs
from methods.grad_estimator import layer_gradients
from methods.lora_one import lora_one_factors
from methods.peft_lora import matching_linear_layers
from tests.builders import HEAD, LAYER, TARGETS, batch, logits, tiny_bert

INIT = [batch(20), batch(21), batch(22)]
LR = 1e-3


def ctx(batches=INIT, lr=LR) -> methods.PrepareContext:
    return methods.PrepareContext(
        head_modules=HEAD,
        default_target_modules=TARGETS,
        init_batches=lambda n: itertools.islice(itertools.cycle(batches), n),
        learning_rate=lr,
        train_examples=1000,
        batch_size=2,
    )


def autograd_sum(batches, name: str = LAYER) -> torch.Tensor:
    model = tiny_bert().train()
    for b in batches:
        model(**b).loss.backward()
    return model.get_submodule(name).weight.grad.clone()


# ---------------------------------------------------------------- shared estimator


def test_hooked_layer_gradients_equal_autograd_and_leave_no_trace():
    model = tiny_bert()
    layers = dict(matching_linear_layers(model, TARGETS, HEAD))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = layer_gradients(model, layers, iter(INIT))
    assert grads.batches == 3 and set(grads.names()) == set(layers)
    reference = tiny_bert().train()
    for b in INIT:
        reference(**b).loss.backward()
    for name in list(grads):
        expected = reference.get_submodule(name).weight.grad
        torch.testing.assert_close(grads.pop_sum(name), expected, atol=1e-6, rtol=1e-5)
    assert not grads.sums  # consumed layer by layer
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # eval mode restored


def _rank_init(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        own = INIT[rank::world]  # each rank sees different batches
        results = {}
        for name in ("lora_sb", "lora_one"):
            method = methods.get_method(name)
            hp = method.hyperparams({"rank": 4, "init_batches": len(own)})
            model = method.prepare(tiny_bert(), hp, ctx(own))
            results[name] = {
                n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
            } | {n: b.clone() for n, b in model.named_buffers() if "lora_" in n}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_different_batches_initialise_identically():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_init, args=(2, f"{tmp}/rendezvous", tmp), nprocs=2, join=True)
        rank0, rank1 = (torch.load(f"{tmp}/rank{r}.pt") for r in (0, 1))
    for name in ("lora_sb", "lora_one"):
        assert rank0[name].keys() == rank1[name].keys() and rank0[name]
        for key in rank0[name]:
            torch.testing.assert_close(rank0[name][key], rank1[name][key], atol=0, rtol=0)
    # And it is the init a single process gets from all the batches together.
    method = methods.get_method("lora_sb")
    hp = method.hyperparams({"rank": 4, "init_batches": 3})
    single = method.prepare(tiny_bert(), hp, ctx(INIT[0::2] + INIT[1::2]))
    key = next(k for k in rank0["lora_sb"] if k.endswith("lora_R"))
    torch.testing.assert_close(
        single.get_parameter(key), rank0["lora_sb"][key], atol=1e-5, rtol=1e-4
    )


# ---------------------------------------------------------------- LoRA-SB


def prepare_sb(rank: int = 4, scaling: float = 1.0):
    method = methods.get_method("lora_sb")
    hp = method.hyperparams({"rank": rank, "scaling": scaling, "init_batches": 3})
    base = tiny_bert()
    expected = method.expected_trainable_params(base, hp, ctx())
    return base, method.prepare(copy.deepcopy(base), hp, ctx()).eval(), expected


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_lora_sb_bases_orthonormal_and_product_is_best_rank_r_of_first_step(scaling):
    _, model, _ = prepare_sb(scaling=scaling)
    layer = model.get_submodule(LAYER)
    b, a = layer.lora_B, layer.lora_A
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    update = -LR * torch.sign(autograd_sum(INIT))  # the simulated first AdamW step
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-7, rtol=1e-4)


def test_lora_sb_trains_only_R_and_the_head_with_the_right_count():
    base, model, expected = prepare_sb()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("lora_R") or n.startswith("classifier") for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == expected
    assert expected == 12 * 4 * 4 + (32 * 3 + 3)


def test_lora_sb_gradient_of_R_is_s_Bt_G_At():
    scaling = 2.0
    _, model, _ = prepare_sb(scaling=scaling)
    layer = model.get_submodule(LAYER)
    b = batch(7)
    model.train()
    model(**b).loss.backward()
    # G = dL/dW at the effective weight W0 + s B R A, from an equivalent plain model.
    plain = lora_xs.merge_and_unload(copy.deepcopy(model))
    plain.zero_grad()
    for p in plain.parameters():
        p.requires_grad_(True)
    plain(**b).loss.backward()
    g = plain.get_submodule(LAYER).weight.grad
    expected = scaling * layer.lora_B.T @ g @ layer.lora_A.T
    torch.testing.assert_close(layer.lora_R.grad, expected, atol=1e-6, rtol=1e-4)


def test_lora_sb_save_load_is_exact_and_merge_matches(tmp_path):
    _, model, _ = prepare_sb()
    with torch.no_grad():
        for layer in lora_xs.adapter_layers(model).values():
            layer.lora_R.add_(torch.randn_like(layer.lora_R) * 1e-2)  # "trained"
    lora_xs.save_adapter(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    restored = lora_xs.load_adapter(tiny_bert(), tmp_path).eval()
    restored.classifier.load_state_dict(model.classifier.state_dict())  # the head trains too
    assert torch.equal(logits(restored), logits(model))
    merged = lora_xs.merge_and_unload(copy.deepcopy(model))
    assert not lora_xs.adapter_layers(merged)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-4)
    assert (logits(merged) - logits(tiny_bert())).abs().max() > 1e-4  # the adapter matters


# ---------------------------------------------------------------- LoRA-One


def test_lora_one_initial_product_is_the_spectral_one_step_term():
    gamma, rank = 128.0, 4
    method = methods.get_method("lora_one")
    hp = method.hyperparams({"rank": rank, "init_batches": 3, "stable_gamma": gamma})
    base = tiny_bert()
    model = method.prepare(copy.deepcopy(base), hp, ctx())
    layer = model.base_model.model.get_submodule(LAYER)
    b0, a0 = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    s = layer.scaling["default"]
    g = autograd_sum(INIT).double() / 3
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    svd_r = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    expected = -(s / (gamma * sv[0])) * svd_r
    torch.testing.assert_close((s * b0 @ a0).double(), expected, atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(b0.T @ b0, a0 @ a0.T, atol=1e-7, rtol=1e-4)  # balanced
    # No offset: the base weight is untouched, so the model starts off the base function.
    torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(LAYER).weight)


def test_lora_one_weight_shift_starts_at_the_base_function():
    method = methods.get_method("lora_one")
    hp = method.hyperparams({"rank": 4, "init_batches": 3, "weight_shift": True})
    base = tiny_bert()
    model = method.prepare(copy.deepcopy(base), hp, ctx()).eval()
    torch.testing.assert_close(logits(model), logits(base), atol=2e-5, rtol=1e-4)
    unshifted = method.prepare(
        tiny_bert(), method.hyperparams({"rank": 4, "init_batches": 3}), ctx()
    )
    assert (logits(unshifted.eval()) - logits(base)).abs().max() > 1e-6  # the default moves


def test_lora_one_factors_on_a_known_matrix():
    torch.manual_seed(0)
    g = torch.randn(6, 5, dtype=torch.float64)
    b0, a0 = lora_one_factors(g, rank=2, gamma=4.0)
    u, s, vh = torch.linalg.svd(-g, full_matrices=False)
    torch.testing.assert_close(b0 @ a0, (u[:, :2] * s[:2]) @ vh[:2] / (4.0 * s[0]))


class Toy(nn.Module):
    """A 2-layer regression model with the `model(**batch).loss` interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 1)

    def forward(self, x, labels):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return SimpleNamespace(loss=((out.squeeze(-1) - labels) ** 2).mean(), logits=out)


def _toy_lora_one(overrides: dict, seed: int = 4):
    """A LoRA-One toy (fc1 adapted, fc2 a trainable head) and a training batch."""
    g = torch.Generator().manual_seed(seed)
    data = [{"x": torch.randn(8, 6, generator=g), "labels": torch.randn(8, generator=g)}]
    method = methods.get_method("lora_one")
    hp = method.hyperparams({"rank": 2, "init_batches": 1, "target_modules": ["fc1"], **overrides})
    toy_ctx = methods.PrepareContext(["fc2"], ["fc1"], init_batches=lambda n: iter(data))
    model = method.prepare(Toy(), hp, toy_ctx)
    step = {"x": torch.randn(8, 6, generator=g), "labels": torch.randn(8, generator=g)}
    return method, hp, model, step


def test_one_preconditioned_step_equals_the_hand_formula():
    from harness.training.train import train_step

    method, hp, model, step = _toy_lora_one({"optimizer": "precond_sgd", "precond_damping": 0.1})
    lr = 0.05
    optimizer = method.build_optimizer(model, lr, hp)
    layer = model.base_model.model.fc1
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a, b = lora_a.detach().clone(), lora_b.detach().clone()
    model(**step).loss.backward()
    ga, gb = lora_a.grad.clone(), lora_b.grad.clone()
    optimizer.zero_grad()
    eye = torch.eye(2)
    expected_a = a - lr * torch.linalg.inv(b.T @ b + 0.1 * eye) @ ga
    expected_b = b - lr * gb @ torch.linalg.inv(a @ a.T + 0.1 * eye)
    train_step(model, step, optimizer, None, None, method.gradient_transform(hp))
    torch.testing.assert_close(lora_a.detach(), expected_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lora_b.detach(), expected_b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["precond_sgd", "precond_adamw"])
def test_preconditioned_steps_equal_peft_riemannian_optimizer(optimizer):
    """Our gradient transform + base optimizer == peft's create_riemannian_optimizer (which
    preconditions inside step()), with clipping active and applied first in both (the order
    of a Trainer-style loop), over 3 steps (AdamW state included)."""
    from peft.optimizers import create_riemannian_optimizer

    from harness.training.train import train_step

    overrides = {"optimizer": optimizer, "precond_damping": 0.05}
    method, hp, ours, step = _toy_lora_one(overrides)
    _, _, theirs, _ = _toy_lora_one(overrides)
    lr, max_norm = 0.05, 0.02
    ours_opt = method.build_optimizer(ours, lr, hp, weight_decay=0.01)
    base = torch.optim.SGD if optimizer == "precond_sgd" else torch.optim.AdamW
    peft_opt = create_riemannian_optimizer(theirs, base, lr=lr, reg=0.05, weight_decay=0.01)
    transform = method.gradient_transform(hp)
    for _ in range(3):
        train_step(ours, step, ours_opt, None, max_norm, transform)
        theirs(**step).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in theirs.parameters() if p.requires_grad], max_norm
        )
        assert norm > 5 * max_norm  # clipping is active, so its order matters
        peft_opt.step()
        peft_opt.zero_grad()
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    moved = ours.base_model.model.fc1.lora_A["default"].weight
    assert not torch.equal(moved, _toy_lora_one(overrides)[2].base_model.model.fc1.lora_A[
        "default"].weight)  # fmt: skip


def test_default_optimizer_has_no_gradient_transform():
    method = methods.get_method("lora_one")
    assert method.gradient_transform(method.hyperparams({})) is None


@pytest.mark.parametrize("name", ["lora_one", "lora_sb"])
def test_registered_with_paper_defaults(name):
    hp = methods.get_method(name).hyperparams({})
    if name == "lora_one":
        assert hp.stable_gamma == 128 and hp.optimizer == "adamw" and hp.precond_damping == 1e-6
        assert hp.use_rslora and hp.init_examples == 8 and hp.init_batches is None
    else:
        assert hp.init_fraction == 0.001 and hp.scaling == 1.0
        assert methods.get_method(name).init_batches_wanted(hp, ctx()) == 1  # 1000 x 1e-3 / 2


def test_rank_above_layer_size_is_refused_clearly():
    method = methods.get_method("lora_sb")
    with pytest.raises(ValueError, match="rank 64 exceeds"):
        method.prepare(tiny_bert(), method.hyperparams({"rank": 64, "init_batches": 1}), ctx())


# ---------------------------------------------------------------- large-model settings


@pytest.mark.parametrize("name", ["lora_ga", "lora_one", "lora_sb"])
def test_offload_flag_reaches_the_estimator_and_changes_no_number(name, monkeypatch):
    import methods.grad_estimator as estimator

    seen = []
    original = estimator.layer_gradients

    def spy(*args, offload=False, **kw):
        seen.append(offload)
        return original(*args, offload=offload, **kw)

    monkeypatch.setattr(f"methods.{name}.layer_gradients", spy)
    method = methods.get_method(name)
    hp = method.hyperparams(
        {"rank": 2, "target_modules": TARGETS, "init_batches": 3}
        if name != "lora_sb"
        else {"rank": 2, "target_modules": TARGETS}
    )
    plain = method.prepare(tiny_bert(), hp, ctx())
    offloaded_ctx = ctx()
    offloaded_ctx.offload_statistics = True
    offloaded = method.prepare(tiny_bert(), hp, offloaded_ctx)
    assert seen == [False, True]
    for (n, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", ["pissa", "lora_ga"])
def test_bf16_loaded_model_passes_the_init_check_at_bf16_tolerance(name):
    """A large distributed trial loads bf16 weights: an init that rewrites them (PiSSA's
    residual, LoRA-GA's offset) rounds them, which the fp32 tolerance would call a broken
    promise; the bf16 tolerance accepts it and still refuses an O(1) move."""
    from harness.training import sanity

    model = tiny_bert().to(torch.bfloat16)
    probe = {k: v for k, v in batch(30).items()}
    base = sanity.outputs(model, probe)
    method = methods.get_method(name)
    hp = method.hyperparams({"rank": 2, "target_modules": TARGETS})
    prepared = method.prepare(model, hp, ctx())
    after = sanity.outputs(prepared, probe)
    assert method.starts_at_base(hp)
    assert sanity.check_init(base, after, True, torch.bfloat16).startswith("identity")
    with pytest.raises(sanity.SanityError):
        sanity.check_init(base, after + 1.0 + base.abs().max(), True, torch.bfloat16)


# ---------------------------------------------------------------- init sample sizes, official


def per_example_grads(batches, examples: int, name: str = LAYER) -> list[torch.Tensor]:
    """Float64 per-example mean-loss gradients of the first `examples` examples."""
    rows = [
        {k: v[i : i + 1] for k, v in b.items()}
        for b in itertools.islice(itertools.cycle(batches), examples)
        for i in range(b["labels"].shape[0])
    ][:examples]
    grads = []
    for row in rows:
        model = tiny_bert().double().train()
        model(**row).loss.backward()
        grads.append(model.get_submodule(name).weight.grad.clone())
    return grads


def test_example_batches_yield_exactly_n_single_examples_and_refuse_too_few():
    from methods.grad_estimator import example_batches

    out = list(example_batches(iter(INIT), 5))
    assert len(out) == 5 and all(b["input_ids"].shape[0] == 1 for b in out)
    torch.testing.assert_close(out[2]["input_ids"], INIT[1]["input_ids"][:1])
    torch.testing.assert_close(out[4]["labels"], INIT[2]["labels"][:1])
    with pytest.raises(ValueError, match="held 6 examples, 7 were asked"):
        list(example_batches(iter(INIT), 7))


def test_lora_one_default_is_rslora_on_8_single_examples():
    gamma, rank, alpha = 128.0, 4, 16.0
    method = methods.get_method("lora_one")
    model = method.prepare(tiny_bert(), method.hyperparams({"rank": rank}), ctx())
    layer = model.base_model.model.get_submodule(LAYER)
    s = layer.scaling["default"]
    assert s == pytest.approx(alpha / rank**0.5)  # rsLoRA: sqrt(r) = 2x alpha/r here
    g = torch.stack(per_example_grads(INIT, 8)).mean(0)  # 8 examples = the cycled 3 batches
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    expected = -(s / (gamma * sv[0])) * (u[:, :rank] * sv[:rank]) @ vh[:rank]
    b0, a0 = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    torch.testing.assert_close((s * b0 @ a0).double(), expected, atol=1e-8, rtol=1e-4)


@pytest.mark.parametrize(("rule", "eta"), [("warmup_increment", LR / (0.06 * 100)), ("peak", LR)])
def test_lora_sb_first_step_eta_and_init_examples_follow_the_official_code(rule, eta):
    method = methods.get_method("lora_sb")
    c = ctx()
    c.total_steps, c.warmup_ratio, c.train_examples = 100, 0.06, 3000  # 1/1000 -> 3 examples
    hp = method.hyperparams({"rank": 4, "init_eta_rule": rule})
    assert method.eta(hp, c) == pytest.approx(eta)
    assert method.init_examples_used(hp, c) == 3 and method.init_batches_wanted(hp, c) == 2
    config = method.resolved_config(hp, c)
    assert config["init_eta_used"] == pytest.approx(eta) and config["init_examples_used"] == 3
    layer = method.prepare(tiny_bert(), hp, c).get_submodule(LAYER)
    update = -eta * torch.sign(sum(per_example_grads(INIT, 3)))  # exactly 3 examples
    u, sv, vh = torch.linalg.svd(update, full_matrices=False)
    best = (u[:, :4] * sv[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-9, rtol=1e-4)
    no_warmup = ctx()
    no_warmup.total_steps, no_warmup.warmup_ratio = 100, 0.0
    assert method.eta(hp, no_warmup) == LR  # no warm-up: the first step runs at the peak
    no_warmup.total_steps, no_warmup.warmup_ratio = 3, 0.06  # 0.18 rounds to no warm-up step
    assert method.eta(hp, no_warmup) == LR


def test_lora_sb_legacy_whole_batches_and_glue_targets():
    method = methods.get_method("lora_sb")
    c = ctx()
    c.train_examples, c.batch_size = 8551, 16  # CoLA at batch 16
    legacy = method.hyperparams({"init_unit": "batches"})
    assert method.init_examples_used(legacy, c) is None
    assert method.init_batches_wanted(legacy, c) == 1  # 16 examples
    assert method.init_examples_used(method.hyperparams({}), c) == 9  # round(8.551)
    glue = ["query", "value", "attention.output.dense", "output.dense"]
    for family in ("bert", "roberta", "xlm-roberta"):
        assert method.family_target_modules(family) == glue
    assert method.family_target_modules("deberta-v2")[:2] == ["query_proj", "value_proj"]
    assert method.family_target_modules("llama") == methods.get_method(
        "lora"
    ).family_target_modules("llama")
    layers = [n for n, _ in matching_linear_layers(tiny_bert(), glue, HEAD)]
    assert len(layers) == 2 * 4  # q, v, attention out, FFN out per block; not key, FFN in
