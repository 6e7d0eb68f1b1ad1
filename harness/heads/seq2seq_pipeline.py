"""The text-to-text pipeline: a classification/regression task on an encoder-decoder (T5).

Why a pipeline of its own: T5 has no classification head to add. It is trained to generate
the class as a word (`Task.text_to_text()`: input string -> label string), with the loss on
the target tokens only (the encoder input never enters it; padded target positions are
-100), and evaluated by scoring every candidate label string: its full-sequence
log-likelihood under teacher forcing, EOS included, i.e. log P(label string | input). The
CG-LoRA paper computes "the true multi-token class probability" for T5-base (not LoRA-GA's
first-token probability), which is this. The task maps the (N, candidates) scores to its
predictions (argmax; STS-B's expectation over its value grid) and computes its usual metrics.

Batches carry explicit `decoder_input_ids` (the target shifted right behind the decoder start
token) besides `labels`, so the model also runs without labels: the sanity checks and
`harness.training.train.predict` drop `labels` and compare the teacher-forced logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness.heads.pipeline_base import Pipeline, item_record, make_loader
from harness.modeling.models import ModelSource, load_seq2seq_lm
from tasks.base import Task, TextToText
from tasks.generative import IGNORE_INDEX


def label_tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms of an encoder-decoder's token-mean loss: the labelled target tokens (no
    shift: label t is predicted at decoder position t)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: start token, then the target without its last
    token; ignored positions (-100) become padding (T5's `_shift_right`)."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


def pad_seq2seq_batch(pad_id: int, start_id: int):
    """Right-pad inputs (pad id, attention 0) and targets (labels -100), add decoder inputs."""

    def collate(rows: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        target_width = max(len(r["labels"]) for r in rows)
        out = {
            "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), target_width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, r in enumerate(rows):
            n, m = len(r["input_ids"]), len(r["labels"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :m] = torch.tensor(r["labels"])
        out["decoder_input_ids"] = shift_right(out["labels"], start_id, pad_id)
        return out

    return collate


def encode_pairs(
    tokenizer: Any, sources: list[str], targets: list[str], max_length: int
) -> list[dict[str, list]]:
    """Token ids of each (input, target) pair, both truncated to `max_length` (EOS kept)."""
    enc = tokenizer(sources, truncation=True, max_length=max_length, padding=False)
    tgt = tokenizer(targets, truncation=True, max_length=max_length, padding=False)
    return [
        {"input_ids": list(i), "labels": list(t)}
        for i, t in zip(enc["input_ids"], tgt["input_ids"], strict=True)
    ]


def candidate_ids(tokenizer: Any, candidates: tuple[str, ...]) -> list[list[int]]:
    """Each candidate's target ids (EOS included); two candidates with the same ids could
    never be told apart, which is an error rather than a silent tie."""
    ids = [list(tokenizer(c)["input_ids"]) for c in candidates]
    seen: dict[tuple[int, ...], str] = {}
    for c, i in zip(candidates, ids, strict=True):
        if tuple(i) in seen:
            raise ValueError(f"label strings {seen[tuple(i)]!r} and {c!r} tokenize identically")
        seen[tuple(i)] = c
    return ids


@torch.no_grad()
def candidate_scores(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    candidates: list[list[int]],
    *,
    start_id: int,
    pad_id: int,
) -> torch.Tensor:
    """(B, K) log P(candidate k | input b): the sum of the candidate's token log-probs, EOS
    included. The encoder runs once per batch; the decoder once per candidate."""
    encoder_outputs = model.get_encoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True
    )
    rows = batch["input_ids"].shape[0]
    scores = []
    for ids in candidates:
        labels = torch.tensor(ids, device=batch["input_ids"].device).expand(rows, -1)
        logits = model(
            encoder_outputs=encoder_outputs,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=shift_right(labels, start_id, pad_id),
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores.append(logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(dim=-1))
    return torch.stack(scores, dim=1)


def decoder_start_id(model: nn.Module, pad_id: int) -> int:
    config_value = getattr(model.config, "decoder_start_token_id", None)
    generation = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    start = config_value if config_value is not None else generation
    return int(start) if start is not None else pad_id  # T5 starts from its pad token


def seq2seq_pipeline(
    task: Task,
    splits,
    source: ModelSource,
    max_length: int,
    eval_batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Pipeline:
    form: TextToText | None = task.text_to_text()
    if form is None:
        raise ValueError(f"task {task.id} has no text-to-text form for an encoder-decoder")
    train_sources, train_targets = form.sources(splits.train), form.targets(splits.train)
    loaded = load_seq2seq_lm(
        source,
        dtype,
        tokenizer_texts=train_sources + train_targets,  # random-init only: its vocabulary
        required_words=list(form.candidates),
    )
    loaded.model.to(device)
    tokenizer = loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    start_id = decoder_start_id(loaded.model, pad_id)
    collate = pad_seq2seq_batch(pad_id, start_id)
    candidates = candidate_ids(tokenizer, form.candidates)
    rows = encode_pairs(tokenizer, train_sources, train_targets, max_length)
    pipeline = Pipeline(loaded, rows, collate, {}, loss_terms=label_tokens_in)
    regression = task.head == "regression"

    def scores_of(part: list[dict[str, list]]) -> np.ndarray:
        current = pipeline.loaded.model
        was_training = current.training
        current.eval()
        try:
            out = []
            for batch in make_loader(part, collate, eval_batch_size, shuffle=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                scored = candidate_scores(
                    current, batch, candidates, start_id=start_id, pad_id=pad_id
                )
                out.append(scored.cpu().numpy())
            return np.concatenate(out, axis=0)
        finally:
            current.train(was_training)

    def evaluator(name: str, df: pd.DataFrame):
        cast = float if regression else int
        encoded = encode_pairs(tokenizer, form.sources(df), form.targets(df), max_length)
        items = [dict(r, label=cast(v)) for r, v in zip(encoded, df["label"], strict=True)]
        # Sorted by length so eval batches carry little padding; metrics ignore order.
        order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
        items = [items[i] for i in order]
        labels = np.array([r["label"] for r in items])
        model_rows = [{k: r[k] for k in ("input_ids", "labels")} for r in items]

        def run() -> dict[str, float]:
            if pipeline.shard is None:
                scores = scores_of(model_rows)
            else:
                scores = np.stack(pipeline.shard.map(model_rows, scores_of, eval_batch_size))
            predictions = form.predictions(scores)
            pipeline.items[name] = item_record(predictions, labels, regression)
            return task.metrics(predictions, labels)

        return run

    pipeline.evaluators["selection"] = evaluator("selection", splits.selection)
    for name, df in splits.test.items():
        pipeline.evaluators[f"test/{name}"] = evaluator(f"test/{name}", df)
    return pipeline
