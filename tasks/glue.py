"""GLUE: nine tasks from one table (one declarative place per task).

Protocol glue-v1: GLUE test labels are hidden, so the learning rate is selected on a split
carved from train with a fixed protocol seed (0), min(10% of train, 2000) rows unless the
budget says otherwise; the train budget is a fixed seeded subset of the remaining pool; the
official validation split(s) are reported once as the test metric. Metrics are computed
offline (scikit-learn / scipy). Degenerate inputs: MCC of constant predictions is 0.0
(sklearn's convention); Pearson/Spearman of a constant vector is reported as 0.0 rather
than NaN, so a collapsed regressor scores as uninformative instead of vanishing from means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.base import DataSplits, HeadKind, Task
from tasks.data import load_split, roles_provenance, split_roles, subsample
from tasks.registry import register_task

HUB_ID = "nyu-mll/glue"
PROTOCOL_SEED = 0
PROTOCOL = "glue-v1:select=train-carve(seed0,min(10%,2000));test=official-validation"


def _accuracy(p, y):
    return {"accuracy": float(accuracy_score(y, p))}


def _accuracy_f1(p, y):
    return {"accuracy": float(accuracy_score(y, p)), "f1": float(f1_score(y, p, pos_label=1))}


def _mcc(p, y):
    return {"mcc": float(matthews_corrcoef(y, p))}


def _correlations(p, y):
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}


@dataclass(frozen=True)
class GlueSpec:
    config: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric_fn: Any
    headline: str
    description: str
    test_splits: tuple[tuple[str, str], ...] = (("validation", "validation"),)

    @property
    def head(self) -> HeadKind:
        return "regression" if self.num_labels == 1 else "classification"


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec("cola", ("sentence",), 2, _mcc, "mcc", "CoLA grammatical acceptability, MCC"),
    "sst2": GlueSpec(
        "sst2", ("sentence",), 2, _accuracy, "accuracy", "SST-2 movie-review sentiment, accuracy"
    ),
    "mrpc": GlueSpec(
        "mrpc", ("sentence1", "sentence2"), 2, _accuracy_f1, "accuracy",
        "MRPC paraphrase, accuracy and F1",
    ),
    "stsb": GlueSpec(
        "stsb", ("sentence1", "sentence2"), 1, _correlations, "pearson",
        "STS-B similarity regression (0-5), Pearson and Spearman",
    ),
    "qqp": GlueSpec(
        "qqp", ("question1", "question2"), 2, _accuracy_f1, "accuracy",
        "QQP duplicate questions, accuracy and F1",
    ),
    "mnli": GlueSpec(
        "mnli", ("premise", "hypothesis"), 3, _accuracy, "matched/accuracy",
        "MNLI entailment, matched and mismatched accuracy",
        test_splits=(("matched", "validation_matched"), ("mismatched", "validation_mismatched")),
    ),
    "qnli": GlueSpec(
        "qnli", ("question", "sentence"), 2, _accuracy, "accuracy", "QNLI question answering NLI"
    ),
    "rte": GlueSpec(
        "rte", ("sentence1", "sentence2"), 2, _accuracy, "accuracy", "RTE entailment, accuracy"
    ),
    "wnli": GlueSpec(
        "wnli", ("sentence1", "sentence2"), 2, _accuracy, "accuracy", "WNLI coreference NLI"
    ),
}  # fmt: skip


class GlueTask(Task):
    spec: GlueSpec
    protocol = PROTOCOL

    def splits(self, data_dir, *, train_rows=None, selection_rows=None, test_rows=None):
        train_full, train_prov = load_split(HUB_ID, self.spec.config, "train", data_dir)
        train_full = self._labelled(train_full, "train")
        pool, selection, train = split_roles(
            train_full, train_rows=train_rows, selection_rows=selection_rows,
            selection_cap=2000, seed=PROTOCOL_SEED,
        )  # fmt: skip
        test, test_prov = {}, {}
        for name, split in self.spec.test_splits:
            df, prov = load_split(HUB_ID, self.spec.config, split, data_dir)
            test[name] = subsample(self._labelled(df, split), test_rows, seed=PROTOCOL_SEED)
            test_prov[name] = prov
        provenance = roles_provenance(train_prov, test_prov, pool, train, selection, test)
        return DataSplits(train=train, selection=selection, test=test, provenance=provenance)

    def _labelled(self, df: pd.DataFrame, split: str) -> pd.DataFrame:
        if self.head == "classification" and (df["label"] < 0).any():
            raise ValueError(
                f"{self.id} split {split!r} has hidden labels (-1); it cannot be trained or scored"
            )
        return df

    def encode(self, tokenizer, rows: pd.DataFrame, max_length: int) -> dict[str, list]:
        texts = [rows[f].astype(str).tolist() for f in self.spec.text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
        out = {k: list(v) for k, v in enc.items()}
        cast = float if self.head == "regression" else int
        out["labels"] = [cast(v) for v in rows["label"]]
        return out

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return self.spec.metric_fn(predictions, labels)


def _register(name: str, spec: GlueSpec) -> None:
    selection = spec.headline.split("/")[-1]
    cls = type(
        f"Glue_{name}",
        (GlueTask,),
        {
            "spec": spec,
            "description": spec.description,
            "head": spec.head,
            "num_labels": spec.num_labels,
            "selection_metric": selection,
            "headline_metric": spec.headline,
        },
    )
    register_task(f"glue/{name}")(cls)


for _name, _spec in SPECS.items():
    _register(_name, _spec)
