"""Method contract tests driven by the registry (in the manner of peft's `PeftCommonTester`).

Every registered method runs the same checks on a tiny random BERT, with no per-method test
code: the init promise (`starts_at_base`), the trainable-parameter formula, two short
training runs on one fixed batch whose loss must fall (the method's own parameters alone,
the head frozen; then head and method together, as a trial trains) and which move only
what the method trains, a save/load round trip onto a fresh base (the harness's own
artifact path) and merged == unmerged outputs, or, for a method that declares no merge, no
adapter apart from the model.

The method list is read from the registry at collection time, so a newly registered method
is covered with no new test code; TINY_OVERRIDES is the only per-method table (settings
whose defaults do not fit the tiny model), and a test keeps it honest. The sanity checks
are the harness's own (`harness.training.sanity`), the ones every trial runs. Local == 2-rank ZeRO
for every method: tests/test_distributed_methods.py; task contracts:
tests/test_task_contracts.py.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import methods
from harness.training import sanity
from harness.training.adapters import (
    FORMAT_FULL,
    AdapterSaver,
    check_saved_adapter,
    is_peft_model,
    load_saved_adapter,
)
from harness.training.adapters import read_meta as read_adapter_meta
from harness.training.train import train
from methods.base import Method
from methods.targets import default_target_modules

HEAD = ["classifier"]
NUM_LABELS = 3
STEPS = 8
LR = 1e-2
# The loss on the training batch must fall by at least this fraction in STEPS steps. A broken
# optimizer step or a frozen adapter leaves the method-only run's loss exactly where it was
# (tested below, at lr 0); the weakest method measured falls 11% (LoRA-SB, method only), most
# 50-97%.
LOSS_FALL = 0.05
# Rank 4 fits the tiny model (hidden 32); methods with a rank take it, the rest their defaults.
RANK = 4
# Only where a default does not fit the tiny model or an 8-step run (no method-specific code).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "cg_lora": {"init_examples": 8},  # default 256 init examples
    "cg_lora_shift": {"init_examples": 8},
    "sds_lora": {"warmup_steps": 3},  # so the reparameterisation happens within the run
}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """Weights at std 0.2 (BERT's default 0.02 leaves a 2-layer, 32-wide model so close to
    linear that adapters on SVD factors of W barely move its loss in 8 steps: with the
    head frozen, LoRA-XS, LoRA-SB and AltLoRA fell < 0.1%, and the check could not tell them
    from a frozen adapter)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def tiny_batch(seed: int, n: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (n,), generator=g),
    }


TRAIN_BATCH = tiny_batch(1)
INIT_BATCHES = [tiny_batch(10, n=2), tiny_batch(11, n=2)]
PROBE = tiny_batch(99, n=3)


def context() -> methods.PrepareContext:
    return methods.PrepareContext(
        head_modules=HEAD,
        default_target_modules=default_target_modules("bert"),
        # Cycled, as the harness's loader does when an init wants more batches than exist.
        init_batches=lambda n: itertools.islice(itertools.cycle(INIT_BATCHES), n),
        learning_rate=LR,
        train_examples=64,
        batch_size=int(TRAIN_BATCH["labels"].shape[0]),
        total_steps=STEPS,
        warmup_ratio=0.0,
    )


def hyperparams(method: methods.Method):
    fields = method.hyperparams_cls.model_fields
    overrides = {"rank": RANK} if "rank" in fields else {}
    return method.hyperparams({**overrides, **TINY_OVERRIDES.get(method.name, {})})


def declares_merge(method: Method) -> bool:
    """A method declares it can fold its adapter into plain weights by overriding
    `Method.merge` (whose default, None, means "not mergeable")."""
    return type(method).merge is not Method.merge


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_head(name: str) -> bool:
    return any(head in name for head in HEAD)


def fixed_batch_loss(model: torch.nn.Module) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**TRAIN_BATCH).loss)
    model.train(was_training)
    return loss


def assert_loss_fell(before: float, after: float) -> None:
    assert np.isfinite(after), (before, after)
    assert after < (1 - LOSS_FALL) * before, f"loss {before:.4f} -> {after:.4f}"


def changed_parameters(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])}


class Prepared:
    """One method prepared on the tiny BERT, as `harness.training.trial.prepare_method` does it."""

    def __init__(self, name: str, adapter_dir) -> None:
        self.method = methods.get_method(name)
        self.hp = hyperparams(self.method)
        self.base = tiny_bert()
        self.expected_trainable = self.method.expected_trainable_params(
            self.base, self.hp, context()
        )
        self.base_outputs = sanity.outputs(self.base, PROBE)
        self.saver = AdapterSaver(adapter_dir)
        model = copy.deepcopy(self.base)
        self.saver.before_init(model)
        self.model = self.method.prepare(model, self.hp, context())
        self.saver.after_init(self.model)
        self.prepared_outputs = sanity.outputs(self.model, PROBE)
        self.initial_params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.trained_names = {n for n, p in self.model.named_parameters() if p.requires_grad}

    def train(
        self,
        model: torch.nn.Module,
        lr: float = LR,
        frozen: Callable[[str], bool] = lambda name: False,
    ) -> tuple[float, float]:
        """STEPS steps of the harness's loop on one fixed batch, with the `frozen` parameters
        not trained; (loss before, after)."""
        for name, param in model.named_parameters():
            if frozen(name):
                param.requires_grad_(False)
        before = fixed_batch_loss(model)
        optimizer = self.method.build_optimizer(model, lr, self.hp)
        checked = sanity.CheckedCallbacks(self.method.callbacks(self.hp, STEPS), PROBE)
        train(
            model, optimizer, [TRAIN_BATCH], STEPS, warmup_ratio=0.0, max_grad_norm=1.0,
            callbacks=checked, grad_transform=self.method.gradient_transform(self.hp),
        )  # fmt: skip
        return before, fixed_batch_loss(model)


METHOD_NAMES = methods.method_names()  # read at collection: a new method is a new case


@dataclass
class Trained:
    prepared: Prepared
    method_only: torch.nn.Module  # a copy trained with the head frozen
    method_only_losses: tuple[float, float]
    losses: tuple[float, float]  # prepared.model's, head and method trained together


@pytest.fixture(scope="module", params=METHOD_NAMES)
def trained(request, tmp_path_factory) -> Trained:
    prepared = Prepared(request.param, tmp_path_factory.mktemp(request.param) / "artifact")
    # The head alone lowers this loss by a third in 8 steps: only with it frozen does the
    # loss say that the method's own parameters train.
    method_only = copy.deepcopy(prepared.model)
    method_only_losses = prepared.train(method_only, frozen=is_head)
    losses = prepared.train(prepared.model)
    return Trained(prepared, method_only, method_only_losses, losses)


# ------------------------------------------------------------ the registry and its tables


def method_classes() -> dict[str, type[Method]]:
    """Every concrete method class in the methods package ("module.Class"): one that sets
    its own `description`, as registered methods do (bases such as PeftLoraMethod don't)."""
    found = {}
    for info in pkgutil.iter_modules(methods.__path__):
        module = importlib.import_module(f"methods.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__:
                if "description" in cls.__dict__:
                    found[f"{info.name}.{name}"] = cls
    return found


def test_every_method_class_is_registered_and_is_a_contract_case():
    # A method class that forgot `@register_method` (or a module left out of
    # methods/__init__.py) would escape every check below.
    registered = {type(methods.get_method(n)) for n in methods.method_names()}
    classes = method_classes()
    assert len(classes) >= 17
    assert {where for where, cls in classes.items() if cls not in registered} == set()
    assert METHOD_NAMES == methods.method_names()  # the cases are the registry, all of it


def test_every_method_implements_what_the_contract_calls():
    for name in METHOD_NAMES:
        method = type(methods.get_method(name))
        assert method.description.strip(), name
        for hook in ("prepare", "expected_trainable_params"):
            assert getattr(method, hook) is not getattr(Method, hook), (name, hook)


def test_the_override_table_names_registered_methods_and_real_hyperparameters():
    # A renamed method or option would silently drop its override (the default then runs).
    assert set(TINY_OVERRIDES) <= set(METHOD_NAMES)
    for name, overrides in TINY_OVERRIDES.items():
        fields = methods.get_method(name).hyperparams_cls.model_fields
        assert set(overrides) <= set(fields), (name, set(overrides) - set(fields))


# ------------------------------------------------------------------- the checks, per method


def test_init_keeps_its_promise(trained):
    prepared = trained.prepared
    # Raises SanityError when the method starts off the base function despite promising to,
    # or claims an offset but left the outputs bit-identical.
    sanity.check_init(
        prepared.base_outputs,
        prepared.prepared_outputs,
        prepared.method.starts_at_base(prepared.hp),
    )


def test_trainable_parameters_match_the_formula(trained):
    prepared = trained.prepared
    assert prepared.expected_trainable > 0
    assert trainable_count(prepared.model) == prepared.expected_trainable


def test_the_methods_own_parameters_lower_the_loss(trained):
    """With the head frozen: the loss falls, and what moved is the method's trainables."""
    prepared = trained.prepared
    assert_loss_fell(*trained.method_only_losses)
    changed = changed_parameters(trained.method_only, prepared.initial_params)
    assert changed, "nothing moved"
    assert changed <= prepared.trained_names
    assert not any(is_head(n) for n in changed), changed


def test_training_head_and_method_lowers_the_loss_and_moves_only_trainables(trained):
    prepared = trained.prepared
    assert_loss_fell(*trained.losses)
    changed = changed_parameters(prepared.model, prepared.initial_params)
    assert changed <= prepared.trained_names
    assert any(is_head(n) for n in changed)  # the task head always trains
    assert {n for n in changed if not is_head(n)}  # and so does the method


def test_the_loss_checks_fail_when_nothing_trains(tmp_path):
    # The method-only run at learning rate 0 (an optimizer step that moves nothing, as a
    # frozen adapter would): the checks above must reject it.
    prepared = Prepared("lora", tmp_path / "artifact")
    model = copy.deepcopy(prepared.model)
    before, after = prepared.train(model, lr=0.0, frozen=is_head)
    assert after == before
    assert changed_parameters(model, prepared.initial_params) == set()
    with pytest.raises(AssertionError, match="loss"):
        assert_loss_fell(before, after)


def test_save_and_reload_on_a_fresh_base_gives_the_same_outputs(trained):
    prepared = trained.prepared
    model = prepared.model
    outputs = sanity.outputs(model, PROBE)
    spec = SimpleNamespace(
        key=lambda: "contract", method=prepared.method.name, task="tiny", lr=LR, seed=0,
        model_id="tiny-bert", model_revision=None, method_config={},
    )  # fmt: skip
    prepared.saver.save(model, prepared.method, spec, PROBE, outputs, HEAD)
    folder = prepared.saver.folder
    if read_adapter_meta(folder)["format"] == FORMAT_FULL:
        reloaded = BertForSequenceClassification.from_pretrained(folder / "adapter")
    else:
        reloaded = load_saved_adapter(tiny_bert(), folder)
    gap = check_saved_adapter(reloaded, folder)
    assert gap <= sanity.RELATIVE_TOLERANCE[torch.float32] * (1 + float(outputs.abs().max()))
    # The reload is not the base model (the adapter and the head were restored).
    assert float((sanity.outputs(reloaded, PROBE) - prepared.base_outputs).abs().max()) > 1e-4


def test_merged_outputs_equal_unmerged_or_the_method_declares_no_merge(trained, tmp_path):
    prepared = trained.prepared
    model = copy.deepcopy(prepared.model)
    unmerged = sanity.outputs(model, PROBE)
    merged = prepared.method.merge(model)
    if not declares_merge(prepared.method):
        # Declared not mergeable: then it has no adapter apart from the model that would
        # stay unfolded (full fine-tuning; the harness saves the whole model for it).
        assert merged is None
        assert not is_peft_model(prepared.model), prepared.method.name
        with pytest.raises(NotImplementedError):
            prepared.method.save_adapter(prepared.model, tmp_path)
        return
    assert merged is not None, f"{prepared.method.name} overrides merge() but returned None"
    sanity.check_merge(unmerged, sanity.outputs(merged, PROBE))
    assert not any("lora" in n.lower() for n, _ in merged.named_parameters())
