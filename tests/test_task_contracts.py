"""Task contract tests driven by the registry: every registered task, the same checks.

- declaration: a known head with a consistent label count, a versioned protocol id, the
  selection and headline metrics it reports;
- protocol: what a row records for the task on its model family (and on an encoder-decoder,
  its text-to-text form's) - for sequence tasks in the mirror, read off a real row;
- splits, from the data mirror at HARNESS_DATA_DIR: the requested train / selection / test
  row counts, selection carved disjoint from train (`DataSplits`' contract);
- metrics on a small known input, against values computed by hand: accuracy, F1 and MCC of a
  fixed prediction vector, Pearson and Spearman for regression, exact match of gold answers
  for generative tasks, pass@1 of a right and a wrong program for executed ones.

Task ids are read from the registry at collection time, so a newly registered task is
covered with no new test code. A task whose data the mirror lacks is skipped with the
error that names the missing file; the GLUE tasks the mirror holds must never be skipped.
"""

from __future__ import annotations

import functools
import math
import os
import re
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tasks
from tasks.base import DataSplits, HeadKind, Task
from tasks.generative import GenerativeTask
from tests.conftest import MIRROR

DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR") or MIRROR)
ROWS = {"train_rows": 16, "selection_rows": 8, "test_rows": 4}
TASK_IDS = tasks.task_ids()  # read at collection: a new task is a new case
HEAD_KINDS = set(typing.get_args(HeadKind))
# A protocol id names its version: "glue-v1:...", "humaneval-v3:...".
VERSIONED = re.compile(r"^[a-z0-9][a-z0-9_.-]*-v\d+\b")
# The model family a row of each head kind is recorded on (encoder-decoders: text-to-text).
HEAD_FAMILY = {
    "classification": "bert",
    "regression": "bert",
    "causal_lm": "llama",
    "image_classification": "vit",
}
SEQUENCE_TASKS = [t for t in TASK_IDS if tasks.get_task(t).head in ("classification", "regression")]


@functools.cache
def _load(task_id: str) -> DataSplits | str:
    try:
        return tasks.get_task(task_id).splits(str(DATA_DIR), **ROWS)
    except FileNotFoundError as err:  # the loaders name the missing file
        return str(err)


def splits_or_skip(task_id: str) -> DataSplits:
    if not DATA_DIR.is_dir():
        pytest.skip(f"no data mirror at {DATA_DIR} (HARNESS_DATA_DIR)")
    loaded = _load(task_id)
    if isinstance(loaded, str):
        pytest.skip(f"{task_id}: data not in the mirror: {loaded}")
    return loaded


# ------------------------------------------------------------------------- declaration


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_task_declares_a_versioned_protocol_and_a_known_head(task_id):
    task = tasks.get_task(task_id)
    assert task.id == task_id
    assert isinstance(task.protocol, str) and VERSIONED.match(task.protocol), task.protocol
    assert task.head in set(HEAD_FAMILY)  # seq2seq is the harness's, never a task's own
    assert task.head in HEAD_KINDS
    assert task.description.strip()
    if task.head == "regression":
        assert task.num_labels == 1
    elif task.head == "causal_lm":
        assert isinstance(task, GenerativeTask) and task.num_labels == 0
    else:
        assert task.num_labels >= 2
    assert task.selection_metric and task.headline_metric


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_the_protocol_is_what_a_row_records_on_each_model_family(task_id):
    from harness.heads.pipelines import task_protocol  # what load_data_and_model records

    task = tasks.get_task(task_id)
    assert task_protocol(task, HEAD_FAMILY[task.head]) == task.protocol
    form = task.text_to_text()
    if form is not None:  # the same rows scored another way: another, versioned protocol
        assert task_protocol(task, "t5") == form.protocol != task.protocol
        assert VERSIONED.match(form.protocol), form.protocol


@pytest.mark.parametrize("task_id", SEQUENCE_TASKS)
def test_a_real_row_records_the_protocol_and_the_split_sizes(task_id):
    """The trial's own data step (`load_data_and_model`) on the packaged MiniLM."""
    import torch

    from harness.spec import identity
    from harness.training.trial import load_data_and_model
    from tests.builders import trial_spec

    splits_or_skip(task_id)
    spec = trial_spec(str(DATA_DIR), **ROWS).model_copy(update={"task": task_id})
    (spec,) = identity.resolve([spec])
    row: dict = {}
    load_data_and_model(spec, row, torch.device("cpu"))
    assert row["protocol"] == spec.protocol == tasks.get_task(task_id).protocol
    assert row["train_rows"] == ROWS["train_rows"]
    assert row["selection_rows"] == ROWS["selection_rows"]


# ------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_splits_have_the_requested_sizes(task_id):
    splits = splits_or_skip(task_id)
    assert len(splits.train) == ROWS["train_rows"]
    assert len(splits.selection) == ROWS["selection_rows"]
    assert splits.test and all(len(df) == ROWS["test_rows"] for df in splits.test.values())
    prov = splits.provenance
    assert (prov["train_rows"], prov["selection_rows"]) == (16, 8)
    assert prov["test_rows"] == {name: len(df) for name, df in splits.test.items()}
    assert prov["train"]["source"] == "mirror"


def _row_keys(df: pd.DataFrame) -> set[str]:
    """Each row by its content (the loaders reset the index)."""
    return {repr(tuple(map(repr, row))) for row in df.itertuples(index=False)}


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_selection_is_carved_disjoint_from_train(task_id):
    splits = splits_or_skip(task_id)
    assert list(splits.selection.columns) == list(splits.train.columns)
    assert not _row_keys(splits.train) & _row_keys(splits.selection)


def test_the_glue_tasks_in_the_mirror_are_not_skipped():
    glue = DATA_DIR / "nyu-mll" / "glue"
    if not glue.is_dir():
        pytest.skip(f"no GLUE in the data mirror at {DATA_DIR}")
    present = sorted(f"glue/{d.name}" for d in glue.iterdir() if (d / "train.parquet").is_file())
    assert present and set(present) <= set(TASK_IDS)
    assert {t: _load(t) for t in present if isinstance(_load(t), str)} == {}


# --------------------------------------------------------------- metrics on known inputs

# Labels and predictions within {0, 1}, valid for any number of classes:
# tp = 4, tn = 2, fp = 1, fn = 1.
LABELS = np.array([1, 1, 1, 0, 0, 1, 0, 1])
PREDICTIONS = np.array([1, 0, 1, 0, 1, 1, 0, 1])
# Regression: deviations (-1.5, -.5, .5, 1.5) and (-1.75, .25, -.75, 2.25); ranks 1234 / 1324.
GOLD = np.array([1.0, 3.0, 2.0, 5.0])
PREDICTED = np.array([1.0, 2.0, 3.0, 4.0])
BY_HAND = {
    "accuracy": 6 / 8,
    "f1": 2 * 4 / (2 * 4 + 1 + 1),
    "mcc": (4 * 2 - 1 * 1) / math.sqrt((4 + 1) * (4 + 1) * (2 + 1) * (2 + 1)),
    "pearson": (1.5 * 1.75 - 0.5 * 0.25 - 0.5 * 0.75 + 1.5 * 2.25)
    / (math.sqrt(5.0) * math.sqrt(1.75**2 + 0.25**2 + 0.75**2 + 2.25**2)),
    "spearman": 1 - 6 * 2 / (4 * (4**2 - 1)),
}
# Executed tasks (selection by loss: their data has no answer key): one right and one wrong
# program for a hand-written problem in the HumanEval format, pass@1 = 1/2.
PROBLEM = {
    "prompt": 'def add(a, b):\n    """a + b"""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}
PROGRAMS = {
    "right": "```python\ndef add(a, b):\n    return a + b\n```",
    "wrong": "```python\ndef add(a, b):\n    return a - b\n```",
}


def _sequence_metrics(task: Task) -> dict[str, float]:
    if task.head == "regression":
        return task.metrics(PREDICTED, GOLD)
    return task.metrics(PREDICTIONS, LABELS)


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_metrics_on_a_known_input_equal_the_hand_computed_values(task_id):
    task = tasks.get_task(task_id)
    if not isinstance(task, GenerativeTask):
        scores = _sequence_metrics(task)
        assert task.selection_metric in scores
        missing = set(scores) - set(BY_HAND)
        assert not missing, f"add the hand-computed value of {missing} to BY_HAND"
        assert scores == pytest.approx({name: BY_HAND[name] for name in scores})
        return
    if task.selection_by_loss:
        from tasks.sandbox import SandboxUnavailableError

        rows = pd.DataFrame([{**PROBLEM, "task_id": f"known/{k}"} for k in PROGRAMS])
        rows["prompt_messages"] = [[{"role": "user", "content": PROBLEM["prompt"]}]] * 2
        try:
            scores, passed = task.score(list(PROGRAMS.values()), rows)
        except SandboxUnavailableError as err:
            pytest.skip(f"no sandbox to execute programs here: {err}")
        assert passed == [True, False]
        assert scores == {task.headline_metric: 0.5}
        return
    # Exact match: the gold targets of two held-out training rows, then two empty answers.
    rows = splits_or_skip(task_id).selection.head(4)
    generations = [task.target(row) for _, row in rows.head(2).iterrows()] + ["", ""]
    scores, correct = task.score(generations, rows)
    assert correct == [True, True, False, False]
    assert scores[task.selection_metric] == 0.5


def _labels(task: Task, n: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    if task.head == "regression":
        return rng.uniform(0.0, 5.0, n)
    return np.arange(n) % task.num_labels  # every class present


def _wrong(task: Task, labels: np.ndarray) -> np.ndarray:
    if task.head == "regression":
        return np.random.default_rng(1).uniform(0.0, 5.0, len(labels))  # independent of them
    return (labels + 1) % task.num_labels


@pytest.mark.parametrize(
    "task_id", [t for t in TASK_IDS if not isinstance(tasks.get_task(t), GenerativeTask)]
)
def test_metrics_are_at_their_max_on_perfect_predictions(task_id):
    task = tasks.get_task(task_id)
    labels = _labels(task)
    perfect = task.metrics(labels.copy(), labels)
    assert task.selection_metric in perfect
    # accuracy, F1, MCC, Pearson and Spearman all top out at 1.
    for name, value in perfect.items():
        assert value == pytest.approx(1.0), (name, value)
    wrong = task.metrics(_wrong(task, labels), labels)
    assert wrong[task.selection_metric] < 0.9
