"""Forgetting: the general-text LM loss before/after a trial, its corpus and its numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from harness.spec.config import Budget, EvalConfig
from harness.spec.identity import TrialSpec
from harness.training import forgetting
from harness.training.trial import run_trial
from tests.conftest import with_identity
from tests.tiny_causal_lm import byte_level_tokenizer, save_tiny_causal_lm, tiny_random_llama


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def test_shipped_corpus_is_small_general_text_with_a_readme():
    text = forgetting.SHIPPED_CORPUS.read_text(encoding="utf-8")
    assert 5_000 < len(text.encode()) < 50_000
    readme = (forgetting.SHIPPED_CORPUS.parent / "README.md").read_text()
    assert "public domain" in readme and forgetting.SHIPPED_CORPUS.name in readme


def test_windows_are_the_first_tokens_in_full_fixed_windows(tokenizer):
    text = forgetting.SHIPPED_CORPUS.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = forgetting.corpus_windows(tokenizer, text, tokens=1000, window=64)
    assert windows.shape == (1000 // 64, 64)
    assert windows.flatten().tolist() == ids[: 15 * 64]
    # A budget past the corpus: all full windows there are, never a ragged last one.
    whole = forgetting.corpus_windows(tokenizer, text, tokens=10**6, window=64)
    assert whole.shape == (len(ids) // 64, 64)
    with pytest.raises(ValueError, match="less than one window"):
        forgetting.corpus_windows(tokenizer, "short text", tokens=100, window=64)


def test_lm_loss_equals_a_manual_cross_entropy_over_the_windows(tokenizer):
    model = tiny_random_llama(len(tokenizer))
    text = forgetting.SHIPPED_CORPUS.read_text(encoding="utf-8")
    windows = forgetting.corpus_windows(tokenizer, text, tokens=512, window=48)
    assert windows.shape == (10, 48)
    model.train()  # the measurement must switch dropout off and restore the mode
    measured = forgetting.lm_loss(model, windows, batch_size=3, device="cpu")  # ragged batches
    assert model.training
    # Independently: one window at a time, log-probability of each next token.
    model.eval()
    nll = []
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            nll += (-logp[:-1].gather(1, window[1:, None])).flatten().tolist()
            # and transformers' own causal-LM loss agrees window by window
            hf = float(model(window[None], labels=window[None]).loss)
            assert hf == pytest.approx(sum(nll[-47:]) / 47, rel=1e-5)
    assert len(nll) == 10 * 47
    assert measured == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    # A random model over a 400-token vocabulary is near-uniform: loss ~ log(400).
    assert measured == pytest.approx(torch.log(torch.tensor(400.0)).item(), rel=0.1)


def test_corpus_choice_auto_mirror_shipped_file_and_errors(tmp_path, monkeypatch):
    # auto with a mirror that lacks WikiText-2: the shipped file, and the row says why.
    shipped = forgetting.load_corpus("auto", str(tmp_path))
    assert shipped.provenance["source"] == "shipped"
    assert "no WikiText-2" in shipped.provenance["note"]
    assert shipped.text == forgetting.SHIPPED_CORPUS.read_text(encoding="utf-8")
    # auto with a mirror that has it (hub-id layout): read from the mirror, lines joined.
    hub_id, config, split = forgetting.WIKITEXT
    folder = tmp_path / hub_id / config
    folder.mkdir(parents=True)
    lines = pd.DataFrame({"text": [" = Title = \n", " Some text . \n"]})
    lines.to_parquet(folder / f"{split}.parquet")
    wiki = forgetting.load_corpus("auto", str(tmp_path))
    assert wiki.provenance["source"] == "mirror" and wiki.text == " = Title = \n\n\n Some text . \n"
    assert forgetting.load_corpus("wikitext", str(tmp_path)).text == wiki.text
    # auto without a mirror, hub offline: the shipped file (no network attempted).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert forgetting.load_corpus("auto", None).provenance["source"] == "shipped"
    # A text file, and refusals.
    path = tmp_path / "mine.txt"
    path.write_text("general text", encoding="utf-8")
    mine = forgetting.load_corpus(str(path), None)
    assert mine.text == "general text" and mine.provenance["source"] == "file"
    assert forgetting.load_corpus("none", None) is None
    with pytest.raises(FileNotFoundError, match="neither one of"):
        forgetting.load_corpus("wikitext-103", None)


def test_forgetting_options_are_outside_the_run_key():
    def spec(**eval_options) -> TrialSpec:
        return TrialSpec(
            sweep="t", method="lora", method_overrides={}, task="gsm8k_offline", lr=1e-3,
            seed=0, model_id="m", model_revision=None, budget=Budget(max_steps=2),
            eval=EvalConfig(**eval_options), data_dir=None, model_dir=None,
        )  # fmt: skip

    default, other = with_identity(
        [spec(), spec(forgetting_corpus="none", forgetting_tokens=64, forgetting_window=8)]
    )
    assert default.key() == other.key() and default.setting_key() == other.setting_key()
    capped = with_identity([spec(max_new_tokens=8)])[0]
    assert capped.key() != default.key()  # eval options that change numbers still count
    with pytest.raises(ValueError, match="neither one of"):  # a typo fails before any work
        EvalConfig(forgetting_corpus="wikitxt")


def _trial(folder, data_dir: str, lr: float, method: str = "lora") -> dict:
    spec = TrialSpec(
        sweep="t", method=method, method_overrides={}, task="gsm8k_offline", lr=lr, seed=0,
        model_id=str(folder), model_revision=None,
        budget=Budget(max_steps=3, batch_size=2, max_length=96, train_rows=6, selection_rows=2,
                      test_rows=2, warmup_ratio=0.0),
        eval=EvalConfig(batch_size=4, max_new_tokens=2, forgetting_tokens=640,
                        forgetting_window=64),
        data_dir=data_dir, model_dir=None,
    )  # fmt: skip
    row = run_trial(spec)
    assert row["status"] == "ok", row.get("traceback")
    return row


def test_a_run_that_does_not_move_the_weights_forgets_exactly_zero(tiny_lm_folder, mirror_dir):
    still = _trial(tiny_lm_folder, mirror_dir, lr=0.0)
    assert still["forgetting"] == 0.0
    assert still["forgetting_lm_loss_after"] == still["forgetting_lm_loss_before"]
    # The mirror has no WikiText-2: the shipped text, recorded with a fingerprint.
    corpus = json.loads(still["forgetting_corpus"])
    assert corpus["source"] == "shipped" and corpus["sha256"]
    assert still["forgetting_tokens"] == 10 * 63 and still["forgetting_window"] == 64
    # Training does move it, on the same tokens (same fingerprint), by after - before.
    moved = _trial(tiny_lm_folder, mirror_dir, lr=5e-2, method="full_ft")
    assert moved["forgetting_corpus_fingerprint"] == still["forgetting_corpus_fingerprint"]
    assert moved["forgetting_lm_loss_before"] == still["forgetting_lm_loss_before"]
    assert abs(moved["forgetting"]) > 1e-3
    assert moved["forgetting"] == pytest.approx(
        moved["forgetting_lm_loss_after"] - moved["forgetting_lm_loss_before"]
    )
