"""The plug-in adapter base (methods/plugin_adapter.py), the `Method` adapter contract
(save_adapter / load_adapter), `WeightedBatch` rebuilds and the `TrainCallback` protocol.

A toy plug-in written here, as a new method would be (a layer and a method subclass, no
plumbing of its own), is checked against a dense float64 computation of what it should do;
the three real plug-ins are checked to keep no plumbing of their own.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Mapping
from typing import Any, Self

import pytest
import torch
from torch import nn

import methods
from harness.training import sanity
from methods.base import (
    LOSS_WEIGHT_KEY,
    Method,
    TrainCallback,
    WeightedBatch,
    loss_weight,
    model_inputs,
)
from methods.peft_lora import LoraHyperparams, PeftLoraMethod, matching_linear_layers
from methods.plugin_adapter import AdapterLayer, PluginAdapterMethod
from tests.builders import HEAD, LAYER, TARGETS, batch, ctx, logits, tiny_bert

# ---------------------------------------------------------------- a toy plug-in


class RowScaleLinear(AdapterLayer):
    """W = W0 + diag(g) W0: one trainable gain per output row."""

    peft_type = "ROW_SCALE"
    adapter_tensor_names = ("row_gain",)

    def __init__(self, base: nn.Linear, gain_std: float = 0.0) -> None:
        super().__init__(base)
        self.gain_std = gain_std
        w = base.weight
        self.row_gain = nn.Parameter(torch.zeros(base.out_features, dtype=w.dtype, device=w.device))

    def delta_weight(self) -> torch.Tensor:
        return self.row_gain[:, None] * self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.base_layer.weight.T) * self.row_gain

    def adapter_config(self) -> dict[str, Any]:
        return {"gain_std": self.gain_std}

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any]) -> Self:
        return cls(base, config["gain_std"])

    @staticmethod
    def trainable_params(base: nn.Linear, rank: int) -> int:
        return base.out_features


class RowScale(PluginAdapterMethod):
    """Not registered (the registry is global); `name` set by hand instead."""

    name = "row_scale"
    description = "toy: W0 + diag(g) W0, g initialised from each row's norm"
    hyperparams_cls = LoraHyperparams
    layer_cls = RowScaleLinear
    official_targets = {"bert": ["query", "value"]}

    def make_layer(self, base: nn.Linear, hp: LoraHyperparams) -> RowScaleLinear:
        return RowScaleLinear(base, gain_std=0.0)

    def initial_values(self, model, layers, hp, ctx) -> dict[str, torch.Tensor]:
        # Read from the base weights before anything is wrapped.
        return {name: layer.weight.detach().norm(dim=1) for name, layer in layers.items()}

    def initialize(self, wrapped, norms, hp, ctx) -> None:
        for name, layer in wrapped.items():
            layer.row_gain.copy_(0.1 / norms[name])

    def starts_at_base(self, hp) -> bool:
        return False


def prepared_toy():
    method = RowScale()
    hp = method.hyperparams({"rank": 1})
    base = tiny_bert()
    expected = method.expected_trainable_params(base, hp, ctx())
    model = method.prepare(copy.deepcopy(base), hp, ctx()).eval()
    return method, hp, base, model, expected


def test_a_toy_plugin_is_its_layer_and_init_only_and_computes_the_dense_update():
    method, hp, base, model, expected = prepared_toy()
    layers = RowScaleLinear.layers_in(model)
    assert len(layers) == len(TARGETS) * 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("row_gain") or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable)  # the head stays trainable
    assert sum(p.numel() for p in trainable.values()) == expected
    linears = matching_linear_layers(base, TARGETS, HEAD)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert expected == sum(lin.out_features for _, lin in linears) + head
    # The init: g = 0.1 / |row| of W0; the forward is W0 + diag(g) W0, in float64.
    dense = copy.deepcopy(base).double()
    with torch.no_grad():
        for name, _ in linears:
            w0 = dense.get_submodule(name).weight
            w0 += (0.1 / w0.norm(dim=1))[:, None] * w0
    expected_logits = logits(dense)
    assert float((expected_logits - logits(base).double()).abs().max()) > 1e-3
    torch.testing.assert_close(logits(model).double(), expected_logits, atol=1e-5, rtol=1e-4)
    assert method.family_target_modules("bert") == ["query", "value"]
    lora = methods.get_method("lora")
    assert method.family_target_modules("llama") == lora.family_target_modules("llama")


def test_a_toy_plugin_merges_saves_and_loads_through_the_method_contract(tmp_path):
    method, _, _, model, _ = prepared_toy()
    with torch.no_grad():
        model.get_submodule(LAYER).row_gain.add_(0.05)  # "trained"
    method.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROW_SCALE" and config["gain_std"] == 0.0
    assert len(config["target_layers"]) == len(TARGETS) * 2 and config["modules_to_save"] == []
    restored = method.load_adapter(tiny_bert(), tmp_path).eval()
    restored.classifier.load_state_dict(model.classifier.state_dict())  # the head is apart
    assert torch.equal(logits(restored), logits(model))
    merged = method.merge(copy.deepcopy(model))
    assert not RowScaleLinear.layers_in(merged)
    assert all(type(m) is nn.Linear for _, m in matching_linear_layers(merged, TARGETS, HEAD))
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-4)


def test_save_refuses_layers_that_one_config_cannot_describe_and_load_another_type(tmp_path):
    _, _, _, model, _ = prepared_toy()
    model.get_submodule(LAYER).gain_std = 0.5
    with pytest.raises(ValueError, match="differ in \\['gain_std'\\]"):
        RowScaleLinear.save(model, tmp_path / "mixed")
    with pytest.raises(ValueError, match="no RowScaleLinear layers"):
        RowScaleLinear.save(tiny_bert(), tmp_path / "none")
    xs = tiny_bert()
    methods.lora_xs.inject(xs, [LAYER], 2, 1.0)
    methods.lora_xs.save_adapter(xs, tmp_path / "xs")
    with pytest.raises(ValueError, match="holds a LORA_XS adapter, not ROW_SCALE"):
        RowScaleLinear.load(tiny_bert(), tmp_path / "xs")


# ---------------------------------------------------------------- the three real plug-ins

PLUGINS = ("lora_xs", "lora_sb", "sds_lora")
SHARED = ("targets", "prepare", "expected_trainable_params", "merge", "save_adapter",
          "load_adapter", "family_target_modules", "target_layers")  # fmt: skip


@pytest.mark.parametrize("name", PLUGINS)
def test_the_real_plugins_keep_no_plumbing_of_their_own(name):
    cls = type(methods.get_method(name))
    assert issubclass(cls, PluginAdapterMethod)
    for member in SHARED:
        assert getattr(cls, member) is getattr(PluginAdapterMethod, member), member
    # One `targets` for every method that adapts linear layers, peft's included.
    assert PeftLoraMethod.targets is PluginAdapterMethod.targets


def test_a_lora_xs_folder_from_before_modules_to_save_still_loads(tmp_path):
    """The folder format LoRA-XS / LoRA-SB wrote before the shared base: no
    `modules_to_save` key, tensors `<layer>.lora_A|lora_B|lora_R`."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    b, r, a = (torch.randn(*shape, generator=gen) for shape in ((32, 2), (2, 2), (2, 32)))
    config = {"peft_type": "LORA_XS", "r": 2, "scaling": 3.0, "target_layers": [LAYER]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"{LAYER}.lora_A": a, f"{LAYER}.lora_B": b, f"{LAYER}.lora_R": r}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    for name in ("lora_xs", "lora_sb"):  # both read LoRA-XS's format
        model = methods.get_method(name).load_adapter(tiny_bert(), tmp_path).eval()
        dense = tiny_bert()
        with torch.no_grad():
            dense.get_submodule(LAYER).weight += 3.0 * b @ r @ a
        torch.testing.assert_close(logits(model), logits(dense), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the Method contract


def test_full_fine_tuning_has_no_adapter_to_save(tmp_path):
    full = methods.get_method("full_ft")
    with pytest.raises(NotImplementedError, match="full_ft"):
        full.save_adapter(tiny_bert(), tmp_path)
    with pytest.raises(NotImplementedError):
        full.load_adapter(tiny_bert(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_peft_methods_save_and_load_through_the_contract(tmp_path):
    method = methods.get_method("lora")
    hp = method.hyperparams({"rank": 2})
    model = method.prepare(tiny_bert(), hp, ctx()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:  # trained adapter and head
                p.add_(0.1)
    method.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    restored = method.load_adapter(tiny_bert(), tmp_path).eval()  # the head comes along
    assert torch.equal(logits(restored), logits(model))
    assert float((logits(restored) - logits(tiny_bert())).abs().max()) > 1e-4


def test_every_registered_method_answers_the_adapter_contract():
    for name in methods.method_names():
        cls = type(methods.get_method(name))
        # Overridden where the method has an adapter; full FT keeps the refusing default.
        has_own = cls.save_adapter is not Method.save_adapter
        assert has_own == (cls.load_adapter is not Method.load_adapter), name
        assert has_own == (name != "full_ft"), name


# ---------------------------------------------------------------- WeightedBatch


def weighted(weight: float = 2.5) -> WeightedBatch:
    b = WeightedBatch(batch(1))
    b.loss_weight = weight  # as harness/deepspeed/rank_data.py sets it
    return b


def test_rebuilding_a_weighted_batch_keeps_its_weight():
    from peft.tuners.lora.eva import move_inputs_to_device  # a third-party rebuild

    original = weighted()
    rebuilt = {
        "WeightedBatch(b)": WeightedBatch(original),
        "b.copy()": original.copy(),
        "b | {}": original | {"extra": torch.ones(1)},
        "b.to(cpu)": original.to("cpu"),
        "b.to(float64)": original.to(torch.float64),
        "b.with_tensors": original.with_tensors(dict(original)),
        "peft move_inputs_to_device": move_inputs_to_device(original, "cpu"),
        "copy.deepcopy": copy.deepcopy(original),
        "pickle": pickle.loads(pickle.dumps(original)),
    }
    for how, b in rebuilt.items():
        assert isinstance(b, WeightedBatch) and loss_weight(b) == 2.5, how
        assert torch.equal(b["input_ids"], original["input_ids"]), how
    assert rebuilt["b.to(float64)"]["labels"].dtype == torch.float64
    assert WeightedBatch(original, loss_weight=0.5).loss_weight == 0.5  # explicit wins
    assert loss_weight(batch(1)) == 1.0 and loss_weight(WeightedBatch(batch(1))) == 1.0


def test_a_plain_dict_copy_of_a_weighted_batch_keeps_its_weight():
    original = weighted()
    plain_copies = {
        "dict(b)": dict(original),
        "comprehension": {k: v for k, v in original.items()},
        "{**b}": {**original},
        "dict.copy(b)": dict.copy(original),
    }
    for how, b in plain_copies.items():
        assert type(b) is dict and loss_weight(b) == 2.5, how
        assert WeightedBatch(b).loss_weight == 2.5, how  # and it rebuilds as that batch


def test_model_inputs_strip_only_the_weight_and_the_model_sees_the_same_tensors():
    b = weighted()
    inputs = model_inputs(b)
    assert type(inputs) is dict and set(inputs) == set(batch(1))
    assert LOSS_WEIGHT_KEY in b and loss_weight(inputs) == 1.0  # the batch keeps its weight
    assert all(inputs[k] is b[k] for k in inputs)  # no tensor copied
    assert model_inputs(batch(1)).keys() == batch(1).keys()  # a plain batch passes as is
    model = tiny_bert()
    torch.testing.assert_close(model(**model_inputs(b)).logits, model(**batch(1)).logits)


def test_a_weighted_batch_checks_its_weight():
    b = weighted()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            b.loss_weight = bad
        with pytest.raises(ValueError, match="finite and >= 0"):
            loss_weight(dict(batch(1), **{LOSS_WEIGHT_KEY: bad}))  # a hand-set entry too
    assert b.loss_weight == 2.5


class StrictRegression(nn.Module):
    """A model whose forward takes exactly its inputs: an unknown keyword (a weight entry
    that reached `model(**batch)`) is a TypeError, unlike transformers' `**kwargs`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        loss = (self.proj(features).squeeze(-1) - labels).pow(2).mean()
        return type("Output", (), {"loss": loss})()


def test_the_init_estimators_call_the_model_with_model_inputs_and_examples_are_unweighted():
    from methods.grad_estimator import example_batches, layer_gradients

    generator = torch.Generator().manual_seed(3)
    rows = {"features": torch.randn(4, 3, generator=generator), "labels": torch.randn(4)}
    model = StrictRegression()
    layers = {"proj": model.proj}
    with pytest.raises(TypeError):
        model(**WeightedBatch(rows, 2.0))  # what a forgotten model_inputs would do
    examples = list(example_batches(iter([WeightedBatch(rows, 2.0)]), 4))
    assert all(LOSS_WEIGHT_KEY not in e and loss_weight(e) == 1.0 for e in examples)
    # Independent reference: each example's gradient by hand, summed once each.
    expected = torch.zeros_like(model.proj.weight)
    for i in range(4):
        model.zero_grad()
        residual = model.proj(rows["features"][i]).squeeze(-1) - rows["labels"][i]
        residual.pow(2).backward()
        expected += model.proj.weight.grad
    model.zero_grad()
    got = layer_gradients(model, layers, iter(examples)).pop_sum("proj")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    whole = layer_gradients(model, layers, iter([WeightedBatch(rows, 2.0)])).pop_sum("proj")
    torch.testing.assert_close(whole, 2.0 * expected / 4, atol=1e-6, rtol=1e-5)


def test_a_moved_weighted_batch_still_counts_its_weight_in_the_gradient_estimate():
    from methods.grad_estimator import layer_gradients

    model = tiny_bert()
    layers = {LAYER: model.get_submodule(LAYER)}
    plain = layer_gradients(model, layers, iter([batch(1)])).pop_sum(LAYER)
    moved = weighted(3.0).to("cpu")  # a device move, as a harness or peft would do it
    scaled = layer_gradients(model, layers, iter([moved])).pop_sum(LAYER)
    torch.testing.assert_close(scaled, 3.0 * plain, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- TrainCallback


class Promising(TrainCallback):
    """Promises to keep the function at `step`; `break_it` makes it move the outputs."""

    def __init__(self, step: int, break_it: bool) -> None:
        self.step, self.break_it = step, break_it
        self.events: list[tuple[int, str]] = []
        self.restored: list[int] = []

    def on_step_end(self, step, model, optimizer, access=None) -> None:
        if step == self.step and self.break_it:
            with torch.no_grad():
                model.classifier.bias.add_(1.0)
        self.events.append((step, "seen"))

    def preserves_function(self, step: int) -> bool:
        return step == self.step

    def on_restore(self, step: int, model: nn.Module) -> None:
        self.restored.append(step)


class Plain(TrainCallback):
    def on_step_end(self, step, model, optimizer, access=None) -> None:
        pass


def test_train_callbacks_get_the_protocol_defaults_and_checked_callbacks_use_them():
    plain = Plain()
    assert plain.preserves_function(1) is False and list(plain.events) == []
    assert plain.on_restore(3, tiny_bert()) is None
    model, probe = tiny_bert(), batch(2)
    kept, plain = Promising(2, break_it=False), Plain()
    checked = sanity.CheckedCallbacks([kept, plain], probe)
    for step in (1, 2, 3):
        checked.on_step_end(step, model, None)
    assert checked.events == [(1, "seen"), (2, "seen"), (3, "seen")]
    assert checked.summary().startswith("Promising step 2: function kept")
    checked.on_restore(7, model)
    assert kept.restored == [7]
    broken = sanity.CheckedCallbacks([Promising(1, break_it=True)], probe)
    with pytest.raises(sanity.SanityError, match="Promising promises to keep"):
        broken.on_step_end(1, model, None)


def test_a_callback_outside_the_protocol_fails_loudly_in_checked_callbacks():
    class OnlyStepEnd:  # the old structural shape: no preserves_function, no events
        def on_step_end(self, step, model, optimizer, access=None) -> None:
            pass

    checked = sanity.CheckedCallbacks([OnlyStepEnd()], batch(2))
    with pytest.raises(AttributeError, match="preserves_function"):
        checked.on_step_end(1, tiny_bert(), None)
