"""Contract tests driven by the registries (in the manner of peft's `PeftCommonTester`).

Every registered method runs the same checks on a tiny random BERT, with no per-method test
code: the init promise (`starts_at_base`), the trainable-parameter formula, a short training
run whose loss falls and which moves only what the method trains, a save/load round trip
onto a fresh base (the harness's own artifact path) and merged == unmerged outputs. Every
registered task runs the checks that need no data: a versioned protocol id, a known head
kind with a consistent label count, and its metrics on perfect / wrong predictions.

The method and task lists are read from the registries at collection time, so a newly
registered method or task is covered with no new test code. The sanity checks are the
harness's own (`harness.sanity`), the ones every trial runs.
"""

from __future__ import annotations

import copy
import itertools
import re
import typing
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import methods
import tasks
from harness import sanity
from harness.adapters import FORMAT_FULL, AdapterSaver, check_saved_adapter, load_saved_adapter
from harness.adapters import read_meta as read_adapter_meta
from harness.train import train
from methods.targets import default_target_modules
from tasks.base import HeadKind, Task
from tasks.generative import GenerativeTask

HEAD = ["classifier"]
NUM_LABELS = 3
STEPS = 8
LR = 1e-2
# Rank 4 fits the tiny model (hidden 32); methods with a rank take it, the rest their defaults.
RANK = 4
# Only where a default does not fit the tiny model or an 8-step run (no method-specific code).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "cg_lora": {"init_examples": 8},  # default 256 init examples
    "cg_lora_shift": {"init_examples": 8},
    "sds_lora": {"warmup_steps": 3},  # so the reparameterisation happens within the run
}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
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


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fixed_batch_loss(model: torch.nn.Module) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**TRAIN_BATCH).loss)
    model.train(was_training)
    return loss


class Prepared:
    """One method prepared on the tiny BERT, as `harness.trial.prepare_method` does it."""

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

    def train(self) -> tuple[float, float]:
        """STEPS steps of the harness's loop on one fixed batch; (loss before, after)."""
        before = fixed_batch_loss(self.model)
        optimizer = self.method.build_optimizer(self.model, LR, self.hp)
        checked = sanity.CheckedCallbacks(self.method.callbacks(self.hp, STEPS), PROBE)
        train(
            self.model, optimizer, [TRAIN_BATCH], STEPS, warmup_ratio=0.0, max_grad_norm=1.0,
            callbacks=checked, grad_transform=self.method.gradient_transform(self.hp),
        )  # fmt: skip
        return before, fixed_batch_loss(self.model)


METHOD_NAMES = methods.method_names()  # read at collection: a new method is a new case


@pytest.fixture(scope="module", params=METHOD_NAMES)
def trained(request, tmp_path_factory) -> tuple[Prepared, float, float]:
    prepared = Prepared(request.param, tmp_path_factory.mktemp(request.param) / "artifact")
    before, after = prepared.train()
    return prepared, before, after


def test_the_registry_lists_every_method_module():
    # A method module in methods/ that forgot `@register_method` would escape these checks.
    assert len(METHOD_NAMES) >= 16
    assert {"cg_lora", "sds_lora", "lora_xs", "lora_pro", "altlora", "scaled_adamw"} <= set(
        METHOD_NAMES
    )


def test_init_keeps_its_promise(trained):
    prepared, *_ = trained
    # Raises SanityError when the method starts off the base function despite promising to,
    # or claims an offset but left the outputs bit-identical.
    sanity.check_init(
        prepared.base_outputs,
        prepared.prepared_outputs,
        prepared.method.starts_at_base(prepared.hp),
    )


def test_trainable_parameters_match_the_formula(trained):
    prepared, *_ = trained
    assert prepared.expected_trainable > 0
    assert trainable_count(prepared.model) == prepared.expected_trainable


def test_short_training_run_lowers_the_loss_and_moves_only_trainables(trained):
    prepared, before, after = trained
    assert np.isfinite(after)
    assert after < 0.95 * before, (before, after)
    changed = {
        n for n, p in prepared.model.named_parameters()
        if not torch.equal(p.detach(), prepared.initial_params[n])
    }  # fmt: skip
    trained_names = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert changed <= trained_names
    assert any("classifier" in n for n in changed)  # the task head always trains
    assert changed - {n for n in changed if "classifier" in n}  # and so does the method


def test_save_and_reload_on_a_fresh_base_gives_the_same_outputs(trained):
    prepared, *_ = trained
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


def test_merged_outputs_equal_unmerged(trained):
    prepared, *_ = trained
    model = copy.deepcopy(prepared.model)
    unmerged = sanity.outputs(model, PROBE)
    merged = prepared.method.merge(model)
    if merged is None:
        pytest.skip(f"{prepared.method.name} is not mergeable")
    sanity.check_merge(unmerged, sanity.outputs(merged, PROBE))
    assert not any("lora" in n.lower() for n, _ in merged.named_parameters())


# ------------------------------------------------------------------------------------ tasks

TASK_IDS = tasks.task_ids()
HEAD_KINDS = set(typing.get_args(HeadKind))
# A protocol id names its version: "glue-v1:...", "humaneval-v3:...".
VERSIONED = re.compile(r"^[a-z0-9][a-z0-9_.-]*-v\d+\b")


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_task_declares_a_versioned_protocol_and_a_known_head(task_id):
    task = tasks.get_task(task_id)
    assert task.id == task_id
    assert VERSIONED.match(task.protocol), task.protocol
    assert task.head in HEAD_KINDS - {"seq2seq"}  # seq2seq is the harness's, never a task's
    assert task.description.strip()
    if task.head == "regression":
        assert task.num_labels == 1
    elif task.head == "causal_lm":
        assert isinstance(task, GenerativeTask) and task.num_labels == 0
    else:
        assert task.num_labels >= 2
    assert task.selection_metric and task.headline_metric


def _labels(task: Task, n: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    if task.head == "regression":
        return rng.uniform(0.0, 5.0, n)
    return np.arange(n) % task.num_labels  # every class present


def _wrong(task: Task, labels: np.ndarray) -> np.ndarray:
    if task.head == "regression":
        return np.random.default_rng(1).uniform(0.0, 5.0, len(labels))  # independent of them
    return (labels + 1) % task.num_labels


CLASSIFIERS = [t for t in TASK_IDS if type(tasks.get_task(t)).metrics is not Task.metrics]


@pytest.mark.parametrize("task_id", CLASSIFIERS)
def test_task_metrics_are_at_their_max_on_perfect_predictions(task_id):
    task = tasks.get_task(task_id)
    labels = _labels(task)
    perfect = task.metrics(labels.copy(), labels)
    assert task.selection_metric in perfect
    # accuracy, F1, MCC, Pearson and Spearman all top out at 1.
    for name, value in perfect.items():
        assert value == pytest.approx(1.0), (name, value)
    wrong = task.metrics(_wrong(task, labels), labels)
    assert wrong[task.selection_metric] < 0.9
