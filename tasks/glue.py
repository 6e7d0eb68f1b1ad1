"""GLUE: nine tasks from one table (one declarative place per task).

Protocol glue-v1: GLUE test labels are hidden, so the learning rate is selected on a split
carved from train with a fixed protocol seed (0), min(10% of train, 2000) rows unless the
budget says otherwise; the train budget is a fixed seeded subset of the remaining pool; the
official validation split(s) are reported once as the test metric. Metrics are computed
offline (scikit-learn / scipy). Degenerate inputs: MCC of constant predictions is 0.0
(sklearn's convention); Pearson/Spearman of a constant vector is reported as 0.0 rather
than NaN, so a collapsed regressor scores as uninformative instead of vanishing from means.

Text-to-text form (encoder-decoders such as T5; `TEXT_TO_TEXT_PROTOCOL`, CG-LoRA Sec. 6.1 /
Table 2): the model reads `instruction + fields joined by newlines + "\nresult: "` and is
trained to generate the class's label word (loss on the target tokens only). The prompts and
label words of SST-2, CoLA, QQP, MRPC, MNLI and QNLI are those of LoRA-GA's `reproduce/
data.py` (Wang et al. 2024; github.com/Outsider565/LoRA-GA), the implementation the CG-LoRA
paper ran its baselines with; its one quoted prompt ("classify the grammaticality of
{sentence}" for CoLA) is LoRA-GA's. RTE, WNLI and STS-B, absent there, follow the same
pattern (ours). T5's own GLUE prefixes ("sst2 sentence: ...", Raffel et al. 2020, App. D)
are not used on purpose: the original T5 checkpoints were pre-trained on a multi-task mixture
that includes GLUE under exactly those prefixes, so they would start from a model already
fine-tuned on the test task's training set, which is not the paper's setting.

Scoring: each class's label string is scored by its full-sequence log-likelihood (every
label token and EOS, teacher-forced), and the highest wins. The paper: "For T5-base, we
compute the true multi-token class probability while LoRA-GA considers only the first token
class probability" - so not the first-token logits. STS-B is text-to-text too: the target is
the score rounded to T5's 0.2 grid as a string ("3.8"); the prediction is the expectation of
the 26 grid values "0.0".."5.0" under their softmax-normalised sequence likelihoods (a
continuous score, so Pearson/Spearman do not see 26-way ties; the argmax string would be T5's
decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.base import DataSplits, HeadKind, Task, TextToText
from tasks.data import load_split, roles_provenance, split_roles, subsample
from tasks.registry import register_task

HUB_ID = "nyu-mll/glue"
PROTOCOL_SEED = 0
PROTOCOL = "glue-v1:select=train-carve(seed0,min(10%,2000));test=official-validation"
TEXT_TO_TEXT_PROTOCOL = (
    PROTOCOL + ";text-to-text-v1:prompts=lora-ga-data.py(+ours:rte,wnli,stsb);"
    "score=label-sequence-loglik(+eos);stsb=expectation-over-0.0..5.0-step-0.2"
)
STSB_GRID = tuple(f"{i / 5:.1f}" for i in range(26))  # "0.0", "0.2", ..., "5.0"


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
    # Text-to-text form: the prompt's instruction and each class's label word (label order).
    instruction: str = ""
    label_words: tuple[str, ...] = ()

    @property
    def head(self) -> HeadKind:
        return "regression" if self.num_labels == 1 else "classification"


_SIMILARITY = "classify the semantic similarity of the text: "
_NLI = ("entailment", "not_entailment")
SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        "cola", ("sentence",), 2, _mcc, "mcc", "CoLA grammatical acceptability, MCC",
        instruction="classify the grammaticality of the text: ",
        label_words=("unacceptable", "acceptable"),
    ),
    "sst2": GlueSpec(
        "sst2", ("sentence",), 2, _accuracy, "accuracy", "SST-2 movie-review sentiment, accuracy",
        instruction="classify the sentiment of the text: ", label_words=("negative", "positive"),
    ),
    "mrpc": GlueSpec(
        "mrpc", ("sentence1", "sentence2"), 2, _accuracy_f1, "accuracy",
        "MRPC paraphrase, accuracy and F1",
        instruction=_SIMILARITY, label_words=("different", "equivalent"),
    ),
    "stsb": GlueSpec(
        "stsb", ("sentence1", "sentence2"), 1, _correlations, "pearson",
        "STS-B similarity regression (0-5), Pearson and Spearman",
        instruction="rate the semantic similarity of the text: ",  # ours (no LoRA-GA prompt)
    ),
    "qqp": GlueSpec(
        "qqp", ("question1", "question2"), 2, _accuracy_f1, "accuracy",
        "QQP duplicate questions, accuracy and F1",
        instruction=_SIMILARITY, label_words=("different", "duplicate"),
    ),
    "mnli": GlueSpec(
        "mnli", ("premise", "hypothesis"), 3, _accuracy, "matched/accuracy",
        "MNLI entailment, matched and mismatched accuracy",
        test_splits=(("matched", "validation_matched"), ("mismatched", "validation_mismatched")),
        instruction=_SIMILARITY, label_words=("entailment", "neutral", "contradiction"),
    ),
    "qnli": GlueSpec(
        "qnli", ("question", "sentence"), 2, _accuracy, "accuracy", "QNLI question answering NLI",
        instruction="classify the semantic similarity of the question and the sentence: ",
        label_words=_NLI,
    ),
    "rte": GlueSpec(
        "rte", ("sentence1", "sentence2"), 2, _accuracy, "accuracy", "RTE entailment, accuracy",
        instruction="classify the entailment of the text: ", label_words=_NLI,  # ours
    ),
    "wnli": GlueSpec(
        "wnli", ("sentence1", "sentence2"), 2, _accuracy, "accuracy", "WNLI coreference NLI",
        instruction="classify the entailment of the text: ",  # ours; GLUE: 0 = not_entailment
        label_words=("not_entailment", "entailment"),
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

    def text_to_text(self) -> TextToText:
        """The prompt/verbalizer form (module docstring): one table entry serves both the
        encoder (logits) and the encoder-decoder (label words) pipelines."""
        spec = self.spec

        def sources(rows: pd.DataFrame) -> list[str]:
            fields = zip(*(rows[f].astype(str).tolist() for f in spec.text_fields), strict=True)
            return [spec.instruction + "\n".join(parts) + "\nresult: " for parts in fields]

        if self.head == "regression":
            grid = np.array([float(v) for v in STSB_GRID])

            def targets(rows: pd.DataFrame) -> list[str]:
                # T5's STS-B target: the score rounded to the nearest 0.2, as a string.
                return [f"{round(float(v) * 5) / 5:.1f}" for v in rows["label"]]

            def expectation(scores: np.ndarray) -> np.ndarray:
                weights = np.exp(scores - scores.max(axis=1, keepdims=True))
                return (weights / weights.sum(axis=1, keepdims=True)) @ grid

            return TextToText(TEXT_TO_TEXT_PROTOCOL, sources, targets, STSB_GRID, expectation)

        if len(spec.label_words) != spec.num_labels:
            raise ValueError(
                f"{self.id}: {len(spec.label_words)} label words for {spec.num_labels} labels"
            )

        def words(rows: pd.DataFrame) -> list[str]:
            return [spec.label_words[int(v)] for v in rows["label"]]

        def argmax(scores: np.ndarray) -> np.ndarray:
            return scores.argmax(axis=-1)

        return TextToText(TEXT_TO_TEXT_PROTOCOL, sources, words, spec.label_words, argmax)


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
