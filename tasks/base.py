"""The contract every task implements: data, head, preprocessing, metrics, protocol.

A task knows nothing of methods. It turns rows into model inputs and predictions into
metrics; the harness runs the model in between.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

# "seq2seq" is never a task's own head: the harness serves a classification/regression task
# text-to-text when the model is an encoder-decoder (harness.heads.pipelines.head_kind), through
# the task's `text_to_text()` form.
HeadKind = Literal["classification", "regression", "causal_lm", "image_classification", "seq2seq"]

# The values each metric can take, by name: the one declaration of metric ranges (the
# leaderboard clips an interval over seeds to it). A name not listed (a loss, a perplexity)
# is unbounded. `metric_range` reads a split-qualified name ("matched/accuracy") by its last
# part, and any pass@<k> as "pass@k".
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "pass@k": (0.0, 1.0),
    "mcc": (-1.0, 1.0),  # Matthews correlation
    "pearson": (-1.0, 1.0),
    "spearman": (-1.0, 1.0),
}
UNBOUNDED = (-math.inf, math.inf)
PASS_AT_K = re.compile(r"pass@\d+")


def metric_range(metric: str) -> tuple[float, float]:
    """(lowest, highest) value of the metric named `metric`; UNBOUNDED when not declared."""
    name = metric.split("/")[-1]
    if PASS_AT_K.fullmatch(name):
        name = "pass@k"
    return METRIC_RANGES.get(name, UNBOUNDED)


@dataclass(frozen=True)
class TextToText:
    """A classification/regression task read as text-to-text (an encoder-decoder generates
    the class as a word), declared by the task so the harness needs no per-task code.

    protocol: the eval protocol id of this form (prompts, verbalizer, scoring rule), recorded
        in the row instead of the task's own: the same rows scored another way are another
        setting.
    sources / targets: rows -> input strings / target strings (what the loss is on).
    candidates: the strings scored at evaluation, one per class (classification, in label
        order) or per value on a grid (regression).
    predictions: (N, len(candidates)) log-likelihoods -> the predictions `Task.metrics` takes.
    """

    protocol: str
    sources: Callable[[pd.DataFrame], list[str]]
    targets: Callable[[pd.DataFrame], list[str]]
    candidates: tuple[str, ...]
    predictions: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DataSplits:
    """The three roles a task's data plays in a trial.

    train: rows the model trains on (already subset to the budget).
    selection: rows the learning rate is chosen on (carved from train, disjoint from it).
    test: the reported split(s), by name (one for most tasks; MNLI has matched/mismatched).
        Never used for selection.
    provenance: where each came from, JSON-serialisable: {"train": {...}, "test": {name:
        {...}}, ...}, each split's dict with at least "source" ("hub" or "mirror"), "rows"
        and "fingerprint" (plus mirror path or hub id/revision).
    label_names: the classes, when their number depends on the data source (an offline
        subset of a hub dataset has fewer); None means `Task.num_labels` holds.
    """

    train: pd.DataFrame
    selection: pd.DataFrame
    test: dict[str, pd.DataFrame]
    provenance: dict[str, Any]
    label_names: list[str] | None = None


class Task:
    """Base class; a task family module subclasses it and registers instances."""

    id: ClassVar[str]
    description: ClassVar[str]
    protocol: ClassVar[str]  # eval protocol id + version, recorded in every row
    head: ClassVar[HeadKind]
    num_labels: ClassVar[int]  # 1 for regression
    selection_metric: ClassVar[str]  # key of `metrics()` the LR is chosen by (higher is better)
    headline_metric: ClassVar[str]  # key of the test metrics shown first on the leaderboard

    def splits(
        self,
        data_dir: str | None,
        *,
        train_rows: int | None = None,
        selection_rows: int | None = None,
        test_rows: int | None = None,
    ) -> DataSplits:
        raise NotImplementedError

    def encode(self, tokenizer: Any, rows: pd.DataFrame, max_length: int) -> dict[str, list]:
        """Tokenise rows; returns input_ids/attention_mask(/token_type_ids) and `labels`."""
        raise NotImplementedError

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Model outputs (N, num_labels) to predictions (argmax, or the regression value)."""
        if self.head == "regression":
            return logits.reshape(-1)
        return logits.argmax(axis=-1)

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def metric_range(self, metric: str) -> tuple[float, float]:
        """The values `metric` (a key of this task's metrics) can take. A task whose own
        metric's name is not in METRIC_RANGES (a suite average) says which declared metric
        it is a range of."""
        return metric_range(metric)

    def text_to_text(self) -> TextToText | None:
        """The task's text-to-text form for encoder-decoder models; None: it has none."""
        return None

    def summarize(self, test_metrics: dict[str, float]) -> dict[str, float]:
        """Add suite-level metrics computed across test splits (e.g. a macro average)."""
        return test_metrics
