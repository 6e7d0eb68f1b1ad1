"""Forgetting: how much a fine-tune moves a causal LM's loss on general text.

As peft's method_comparison reports it: the language-modelling loss on a fixed general-text
corpus, measured on the base model before the method is applied and on the trained model
after training; `forgetting` = after - before (positive: the model got worse at general
text). Every run of a setting reads the same tokens: the first `tokens` tokens of the
corpus, cut into non-overlapping windows of `window` tokens, each scored on its own (no
context across windows); the loss is the mean next-token cross-entropy over all predicted
tokens (window - 1 per window). It changes no trained number, so it is not in the run key;
the row records the corpus and a fingerprint of the exact token ids measured.

Corpora (`eval.forgetting_corpus`):
- `auto` (default): with a data mirror (`data_dir`), WikiText-2 from the mirror if it has
  it, else the shipped file (a mirror run reads no hub data); without one, WikiText-2 from
  the hub, falling back to the shipped file when the hub is offline or unreachable.
- `wikitext`: WikiText-2 (raw, test split), from the mirror with `data_dir`, else the hub.
- `shipped`: `harness/training/forgetting_corpus/public_domain_english.txt` (see its README).
- a path to a UTF-8 text file.
- `none`: not measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHIPPED_CORPUS = Path(__file__).parent / "forgetting_corpus" / "public_domain_english.txt"
# (hub id, config, split): the hub default, as `tasks.data.load_split` reads it.
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
NAMED_CORPORA = ("auto", "none", "shipped", "wikitext")
# Characters read per wanted token before tokenizing a long corpus (read more if short).
_CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class Corpus:
    text: str
    provenance: dict[str, Any]  # where the text came from, with its sha256


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(flag, "") not in ("", "0") for flag in flags)


def _shipped(note: str | None = None) -> Corpus:
    text = SHIPPED_CORPUS.read_text(encoding="utf-8")
    prov: dict[str, Any] = {
        "source": "shipped",
        "path": f"harness/training/forgetting_corpus/{SHIPPED_CORPUS.name}",
        "sha256": _text_sha(text),
    }
    if note:
        prov["note"] = note
    return Corpus(text, prov)


def _wikitext(data_dir: str | None) -> Corpus:
    from tasks.data import load_split

    df, prov = load_split(*WIKITEXT, data_dir)
    # Lines joined as in the transformers perplexity guide ("\n\n".join(test["text"])).
    text = "\n\n".join(df["text"])
    return Corpus(text, {**prov, "name": "wikitext-2-raw-v1/test", "sha256": _text_sha(text)})


def _mirror_has_wikitext(data_dir: str) -> bool:
    hub_id, config, split = WIKITEXT
    return (Path(data_dir) / hub_id / config / f"{split}.parquet").is_file()


def load_corpus(choice: str, data_dir: str | None) -> Corpus | None:
    """The corpus `choice` names (module docstring), or None for `none`."""
    if choice == "none":
        return None
    if choice == "shipped":
        return _shipped()
    if choice == "wikitext":
        return _wikitext(data_dir)
    if choice == "auto":
        if data_dir:
            if _mirror_has_wikitext(data_dir):
                return _wikitext(data_dir)
            return _shipped("auto: the data mirror has no WikiText-2")
        if _hub_offline():
            return _shipped("auto: hub offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
        try:
            return _wikitext(None)
        except Exception as err:  # noqa: BLE001 - unreachable hub: the offline corpus
            return _shipped(f"auto: hub unreachable ({type(err).__name__})")
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(
            f"forgetting corpus {choice!r} is neither one of {', '.join(NAMED_CORPORA)} nor a "
            "text file"
        )
    text = path.read_text(encoding="utf-8")
    return Corpus(text, {"source": "file", "path": str(path), "sha256": _text_sha(text)})


def corpus_windows(tokenizer, text: str, tokens: int, window: int) -> torch.Tensor:
    """(n_windows, window) token ids: the first `tokens` tokens of `text` (no special
    tokens), in full windows only. A short corpus gives fewer windows, never a ragged one."""
    if window < 2:
        raise ValueError(f"a window needs at least 2 tokens to predict one, not {window}")
    # Tokenize a prefix long enough for the budget (the whole text if that falls short), so
    # a large corpus is not tokenized whole; the cut lies far past the last token used.
    chars = tokens * _CHARS_PER_TOKEN_BOUND
    ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
    if len(ids) < tokens + 1 and len(text) > chars:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_windows = min(len(ids), tokens) // window
    if n_windows == 0:
        raise ValueError(
            f"the forgetting corpus has {len(ids)} tokens, less than one window of {window}"
        )
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).view(n_windows, window)


def windows_fingerprint(windows: torch.Tensor) -> str:
    """Identifies the exact token ids measured (corpus, tokenizer and budget together)."""
    blob = f"{tuple(windows.shape)}:".encode() + windows.numpy().astype("<i8").tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token cross-entropy over every predicted token of `windows`, eval mode
    (no dropout), each window scored on its own."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            total += float(F.cross_entropy(predicted, ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


class ForgettingProbe:
    """Measures a trial's forgetting: `before` on the base model, `after` on the trained
    one, both into the row (columns `forgetting_*`)."""

    def __init__(self, corpus: Corpus, tokenizer, tokens: int, window: int, batch_size: int):
        self.corpus = corpus
        self.windows = corpus_windows(tokenizer, corpus.text, tokens, window)
        self.batch_size = batch_size
        self.loss_before: float | None = None

    def before(self, model: torch.nn.Module, device, row: dict[str, Any]) -> None:
        self.loss_before = lm_loss(model, self.windows, self.batch_size, device)
        n_windows, window = self.windows.shape
        row.update(
            forgetting_corpus=json.dumps(self.corpus.provenance, sort_keys=True, default=str),
            forgetting_corpus_fingerprint=windows_fingerprint(self.windows),
            forgetting_window=window,
            forgetting_tokens=n_windows * (window - 1),  # tokens predicted
            forgetting_lm_loss_before=self.loss_before,
        )

    def after(self, model: torch.nn.Module, device, row: dict[str, Any]) -> None:
        if self.loss_before is None:
            raise RuntimeError("ForgettingProbe.after before .before")
        after = lm_loss(model, self.windows, self.batch_size, device)
        row.update(forgetting_lm_loss_after=after, forgetting=after - self.loss_before)


def probe_for(spec, task, tokenizer) -> ForgettingProbe | None:
    """The trial's forgetting probe: causal-LM tasks only, unless the corpus is `none`."""
    if task.head != "causal_lm" or spec.eval.forgetting_corpus == "none":
        return None
    corpus = load_corpus(spec.eval.forgetting_corpus, spec.data_dir)
    if corpus is None:
        return None
    return ForgettingProbe(
        corpus,
        tokenizer,
        spec.eval.forgetting_tokens,
        spec.eval.forgetting_window,
        batch_size=max(1, min(spec.eval.batch_size, 8)),  # bounded: logits are (B, W, vocab)
    )
