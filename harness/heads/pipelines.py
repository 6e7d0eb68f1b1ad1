"""How a task's rows reach a model and how its outputs become metrics, per head kind.

A pipeline owns the model loading, batching and evaluation that differ between
sequence classification/regression (logits), causal LMs (greedy generation scored by the
task's answer extraction), image classification, and text-to-text classification/regression
on encoder-decoders (label strings scored by likelihood, harness.heads.seq2seq_pipeline);
`harness.training.trial` reads the same for all. The pipeline kind is the task's head, except that a
classification/regression task on an encoder-decoder family (`SEQ2SEQ_MODEL_TYPES`) is served
text-to-text (`head_kind`), and then its row records the text-to-text protocol
(`task_protocol`): a task stays one declarative entry whichever model family runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from harness.heads.generate import greedy_generate
from harness.heads.pipeline_base import Pipeline, item_record, make_loader, target_tokens_in
from harness.modeling.models import (
    MEAN_POOLING_MODEL_TYPES,
    SEQ2SEQ_MODEL_TYPES,
    ModelSource,
    load_causal_lm,
    load_sequence_model,
    source_model_type,
)
from harness.training.train import predict
from tasks.base import DataSplits, HeadKind, Task
from tasks.generative import IGNORE_INDEX, GenerativeTask


def _to_rows(encoded: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(encoded)
    return [dict(zip(keys, values, strict=True)) for values in zip(*encoded.values(), strict=True)]


def head_kind(task: Task, model_type: str | None) -> HeadKind:
    """The pipeline a task runs on this model family: "seq2seq" for a classification or
    regression task on an encoder-decoder, the task's own head otherwise."""
    if model_type in SEQ2SEQ_MODEL_TYPES and task.head in ("classification", "regression"):
        return "seq2seq"
    return task.head


def task_protocol(task: Task, model_type: str | None) -> str:
    """The eval protocol a row of this task on this model family records (and is keyed by):
    the text-to-text form's when served text-to-text, the task's own otherwise."""
    form = task.text_to_text() if head_kind(task, model_type) == "seq2seq" else None
    return form.protocol if form is not None else task.protocol


def pooling_problem(task: Task, model_type: str | None, pooling: str) -> str | None:
    """Why `head.pooling` cannot serve this task on this family, or None: only a sequence
    head on a family with a pooler seam (MEAN_POOLING_MODEL_TYPES) reads anything but cls."""
    if pooling == "cls":
        return None
    if head_kind(task, model_type) not in ("classification", "regression"):
        return f"head.pooling {pooling!r} applies to sequence heads; task {task.id} is not one"
    if model_type not in MEAN_POOLING_MODEL_TYPES:
        return (
            f"head.pooling {pooling!r} is implemented for {', '.join(MEAN_POOLING_MODEL_TYPES)} "
            f"encoders, not {model_type}"
        )
    return None


@dataclass(frozen=True)
class PipelineRequest:
    """Everything a pipeline builder reads: the task and its splits, the model, the budget's
    lengths and where the weights live. `dtype`: the weights as loaded (float32, or bfloat16
    for large distributed trials); `head_pooling`: what a sequence head reads
    (harness.modeling.models.HEAD_POOLINGS)."""

    task: Task
    splits: DataSplits
    source: ModelSource
    max_length: int
    eval_batch_size: int
    max_new_tokens: int | None
    device: torch.device
    dtype: torch.dtype = torch.float32
    head_pooling: str = "cls"


PipelineBuilder = Callable[[PipelineRequest], Pipeline]


def build_pipeline(
    task: Task,
    splits: DataSplits,
    source: ModelSource,
    *,
    max_length: int,
    eval_batch_size: int,
    max_new_tokens: int | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    head_pooling: str = "cls",
) -> Pipeline:
    """The pipeline `PIPELINE_BUILDERS` registers for this task's head kind on this family."""
    request = PipelineRequest(
        task, splits, source, max_length, eval_batch_size, max_new_tokens, device, dtype,
        head_pooling,
    )  # fmt: skip
    model_type = source_model_type(source)
    if problem := pooling_problem(task, model_type, head_pooling):
        raise ValueError(problem)
    if model_type in SEQ2SEQ_MODEL_TYPES and task.head not in ("classification", "regression"):
        raise ValueError(
            f"task {task.id} (head {task.head!r}) has no pipeline on the encoder-decoder "
            f"{source.model_id} ({model_type}); only classification/regression run text-to-text"
        )
    kind = head_kind(task, model_type)
    if kind not in PIPELINE_BUILDERS:
        raise ValueError(f"task {task.id} has head kind {kind!r}, which no pipeline serves")
    return PIPELINE_BUILDERS[kind](request)


# ---------------------------------------------------------------- sequence classification


def sequence_pipeline(request: PipelineRequest) -> Pipeline:
    """Classification/regression on an encoder's logits."""
    from transformers import DataCollatorWithPadding

    task, splits, device = request.task, request.splits, request.device
    max_length, eval_batch_size = request.max_length, request.eval_batch_size
    source, dtype, pooling = request.source, request.dtype, request.head_pooling

    loaded = load_sequence_model(
        source, task.num_labels, task.head == "regression", dtype, pooling=pooling
    )
    loaded.model.to(device)
    tokenizer = loaded.tokenizer
    collate = DataCollatorWithPadding(tokenizer)

    def encode(df: pd.DataFrame) -> list[dict[str, Any]]:
        return _to_rows(task.encode(tokenizer, df, max_length))

    pipeline = Pipeline(loaded, encode(splits.train), collate, {})

    def evaluator(name: str, df: pd.DataFrame):
        # Sorted by length so eval batches carry little padding; metrics ignore order.
        rows = sorted(encode(df), key=lambda r: len(r["input_ids"]))
        labels = np.array([r["labels"] for r in rows])
        loader = make_loader(rows, collate, eval_batch_size, shuffle=False)

        def logits_of(part: list) -> np.ndarray:
            return predict(loaded.model, make_loader(part, collate, eval_batch_size, False), device)

        def run() -> dict[str, float]:
            if pipeline.shard is None:
                logits = predict(loaded.model, loader, device)
            else:
                logits = np.stack(pipeline.shard.map(rows, logits_of, eval_batch_size))
            predictions = task.predictions(logits)
            # Per item, in a fixed order, for paired comparisons between methods.
            pipeline.items[name] = item_record(predictions, labels, task.head == "regression")
            return task.metrics(predictions, labels)

        return run

    pipeline.evaluators["selection"] = evaluator("selection", splits.selection)
    for name, df in splits.test.items():
        pipeline.evaluators[f"test/{name}"] = evaluator(f"test/{name}", df)
    return pipeline


# ---------------------------------------------------------------- causal language models


def pad_causal_batch(pad_id: int):
    """Right-pad input_ids with the pad id, attention 0 and labels IGNORE_INDEX."""

    def collate(rows: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {
            "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(r["labels"])
        return out

    return collate


def causal_lm_pipeline(request: PipelineRequest) -> Pipeline:
    """Generative tasks on a causal LM: greedy generation scored by the task's answer
    extraction; selection by held-out response loss where the task asks for it."""
    task, splits, device = request.task, request.splits, request.device
    max_length, eval_batch_size = request.max_length, request.eval_batch_size
    max_new_tokens = request.max_new_tokens
    if not isinstance(task, GenerativeTask):
        raise TypeError(f"task {task.id} has head causal_lm but is not a GenerativeTask")
    loaded = load_causal_lm(request.source, request.dtype)
    loaded.model.to(device)
    tokenizer = loaded.tokenizer
    rows = _to_rows(task.encode(tokenizer, splits.train, max_length))
    pipeline = Pipeline(
        loaded, rows, pad_causal_batch(tokenizer.pad_token_id), {}, loss_terms=target_tokens_in
    )

    def evaluator(name: str, df: pd.DataFrame):
        prompts = task.encode_prompts(tokenizer, df, max_length)

        def generate(part: list, synced: bool = False) -> list[str]:
            return greedy_generate(
                loaded.model,
                tokenizer,
                part,
                max_new_tokens=max_new_tokens or task.max_new_tokens,
                batch_size=eval_batch_size,
                device=device,
                synced_gpus=synced,
            )

        def run() -> dict[str, float]:
            shard = pipeline.shard
            if shard is None:
                texts = generate(prompts)
            else:
                texts = shard.map(prompts, lambda p: generate(p, shard.synced), eval_batch_size)
            metrics, correct = task.score(texts, df)
            pipeline.items[name] = {"correct": correct}
            return metrics

        return run

    if task.selection_by_loss:
        pipeline.evaluators["selection"] = _loss_evaluator(
            task.encode(tokenizer, splits.selection, max_length), pipeline, device
        )
    else:
        pipeline.evaluators["selection"] = evaluator("selection", splits.selection)
    for name, df in splits.test.items():
        pipeline.evaluators[f"test/{name}"] = evaluator(f"test/{name}", df)
    return pipeline


def _loss_evaluator(encoded, pipeline: Pipeline, device):
    """{"neg_loss": -(mean response-token loss)} on held-out rows (higher is better)."""
    rows = _to_rows(encoded)
    loader = make_loader(rows, pipeline.collate, 8, shuffle=False)

    @torch.no_grad()
    def run() -> dict[str, float]:
        current = pipeline.loaded.model
        was_training = current.training
        current.eval()
        total, tokens = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(current(**batch).loss) * n
            tokens += n
        current.train(was_training)
        return {"neg_loss": -total / max(tokens, 1)}

    return run


def _seq2seq(request: PipelineRequest) -> Pipeline:
    from harness.heads.seq2seq_pipeline import seq2seq_pipeline  # imported when used: T5 only

    r = request
    return seq2seq_pipeline(
        r.task, r.splits, r.source, r.max_length, r.eval_batch_size, r.device, r.dtype
    )


def _image(request: PipelineRequest) -> Pipeline:
    if request.dtype != torch.float32:
        raise ValueError(f"image pipelines load float32 only, not {request.dtype}")
    from harness.heads.image_pipeline import image_pipeline  # imported when used: vision only

    r = request
    return image_pipeline(r.task, r.splits, r.source, r.eval_batch_size, r.device)


# One entry per head kind (tasks.base.HeadKind); a new head kind is one builder and one line.
PIPELINE_BUILDERS: dict[HeadKind, PipelineBuilder] = {
    "classification": sequence_pipeline,
    "regression": sequence_pipeline,
    "causal_lm": causal_lm_pipeline,
    "image_classification": _image,
    "seq2seq": _seq2seq,
}
