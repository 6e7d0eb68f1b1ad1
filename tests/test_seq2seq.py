"""T5 text-to-text GLUE (CG-LoRA Table 2): the seq2seq pipeline on a small seeded random T5.

No T5 weights or SentencePiece model can be had offline, so every test runs on
`random-init/t5-d64-l2` with its word-level tokenizer; rows say "random-init: NOT pretrained".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import methods
import tasks
from harness.heads.pipelines import build_pipeline, head_kind, task_protocol
from harness.heads.seq2seq_pipeline import candidate_scores, label_tokens_in
from harness.modeling.models import RANDOM_T5_ID, model_structure, resolve_model
from harness.spec.config import Budget, EvalConfig
from harness.spec.identity import TrialSpec
from harness.training.trial import run_trial
from tasks.glue import PROTOCOL, TEXT_TO_TEXT_PROTOCOL
from tests.conftest import MINILM


def t5_pipeline(mirror_dir: str, task_id: str = "glue/sst2"):
    task = tasks.get_task(task_id)
    splits = task.splits(mirror_dir, train_rows=16, selection_rows=8, test_rows=8)
    source = resolve_model(RANDOM_T5_ID, None, None)
    pipeline = build_pipeline(
        task, splits, source, max_length=32, eval_batch_size=4, max_new_tokens=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    return task, splits, pipeline


def test_glue_tasks_run_text_to_text_on_t5_with_their_own_protocol():
    sst2 = tasks.get_task("glue/sst2")
    assert head_kind(sst2, "t5") == "seq2seq" and head_kind(sst2, "bert") == "classification"
    assert task_protocol(sst2, "t5") == TEXT_TO_TEXT_PROTOCOL != PROTOCOL
    assert task_protocol(sst2, "bert") == PROTOCOL
    # A causal-LM task keeps its own head and protocol (no text-to-text form).
    gsm = tasks.get_task("gsm8k_offline")
    assert head_kind(gsm, "t5") == "causal_lm" and task_protocol(gsm, "t5") == gsm.protocol
    for task_id in [t for t in tasks.task_ids() if t.startswith("glue/")]:
        form = tasks.get_task(task_id).text_to_text()
        assert form.protocol == TEXT_TO_TEXT_PROTOCOL and len(set(form.candidates)) > 1


def test_the_run_key_carries_the_text_to_text_protocol():
    from harness.spec import identity

    def spec(model_id: str) -> TrialSpec:
        return TrialSpec(
            sweep="t", method="lora", method_overrides={}, task="glue/sst2", lr=1e-3, seed=0,
            model_id=model_id, model_revision=None, budget=Budget(max_steps=1, batch_size=2),
            eval=EvalConfig(), data_dir=None, model_dir=None,
        )  # fmt: skip

    t5, minilm = identity.resolve([spec(RANDOM_T5_ID), spec(MINILM)], read_data=False)
    assert t5.protocol == TEXT_TO_TEXT_PROTOCOL and minilm.protocol == PROTOCOL
    assert t5.method_config["target_modules"] == methods.get_method("lora").family_target_modules(
        "t5"
    )


def test_prompts_and_label_words_follow_lora_ga_and_stsb_is_on_t5s_grid():
    import pandas as pd

    cola = tasks.get_task("glue/cola").text_to_text()
    rows = pd.DataFrame({"sentence": ["It rains."], "label": [1]})
    assert cola.sources(rows) == ["classify the grammaticality of the text: It rains.\nresult: "]
    assert cola.targets(rows) == ["acceptable"]
    mnli = tasks.get_task("glue/mnli").text_to_text()
    assert mnli.candidates == ("entailment", "neutral", "contradiction")
    stsb = tasks.get_task("glue/stsb").text_to_text()
    pairs = pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "label": [3.87]})
    assert stsb.targets(pairs) == ["3.8"] and len(stsb.candidates) == 26
    # The prediction is the expectation over the grid under the normalised likelihoods.
    scores = np.full((2, 26), -1e9)
    scores[0, 10] = 0.0  # all mass on "2.0"
    scores[1, [0, 25]] = 0.0  # half on "0.0", half on "5.0"
    assert stsb.predictions(scores) == pytest.approx([2.0, 2.5])


def test_random_t5_structure_and_unknown_random_ids():
    structure = model_structure(RANDOM_T5_ID, None, None)
    assert structure.model_type == "t5"
    targets = methods.get_method("lora").family_target_modules("t5")
    adapted = {n for t in targets for n in structure.matching(t)}
    # q,k,v,o of 2 encoder self-attentions + 2 decoder self- and 2 cross-attentions; no FFN.
    assert targets == ["q", "k", "v", "o"]
    assert len(adapted) == 4 * (2 + 2 + 2) and not any(".w" in n for n in adapted)
    with pytest.raises(ValueError, match="unknown random-init model"):
        model_structure("random-init/t5-huge", None, None)


def test_word_level_tokenizer_is_deterministic_and_keeps_label_words():
    from harness.modeling.models import word_level_tokenizer

    texts = ["b a a", "c b a", "d"]
    one = word_level_tokenizer(texts, 8, ["not_entailment", "entailment"])
    two = word_level_tokenizer(list(reversed(texts)), 8, ["not_entailment", "entailment"])
    assert one.get_vocab() == two.get_vocab()
    # Specials as T5 numbers them, required words next, then by count (ties by word).
    assert one.convert_ids_to_tokens(list(range(8))) == [
        "<pad>", "</s>", "<unk>", "not_entailment", "entailment", "a", "b", "c",
    ]  # fmt: skip
    assert one("A d")["input_ids"] == [5, 2, 1]  # lower-cased, unknown word, EOS appended


def test_loss_is_the_mean_over_target_tokens_only(mirror_dir):
    _, _, pipeline = t5_pipeline(mirror_dir)
    batch = next(pipeline.batches(4, seed=0, device="cpu"))
    labels = batch["labels"]
    target_lengths = [len(r["labels"]) for r in pipeline.train_rows]
    assert set(target_lengths) == {2}  # one label word + EOS
    assert label_tokens_in(batch) == int((labels != -100).sum()) == 4 * 2
    # Teacher forcing: decoder input = start token, then the target shifted right.
    assert (batch["decoder_input_ids"][:, 0] == 0).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], labels[:, :-1])
    model = pipeline.model.eval()
    out = model(**batch)
    logp = torch.log_softmax(out.logits, dim=-1)
    by_hand = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean()
    assert float(out.loss) == pytest.approx(float(by_hand), rel=1e-5)
    # The encoder input never enters the loss: a padded target position (-100) does not
    # either, and the loss is the mean over the remaining target tokens only.
    masked = dict(batch, labels=labels.clone())
    masked["labels"][:, -1] = -100
    kept = -logp[:, 0].gather(-1, labels[:, :1]).mean()
    assert float(model(**masked).loss) == pytest.approx(float(kept), rel=1e-5)


def test_eval_picks_the_label_with_the_higher_sequence_likelihood(mirror_dir):
    task, splits, pipeline = t5_pipeline(mirror_dir, "glue/sst2")
    model, tok = pipeline.model.eval(), pipeline.loaded.tokenizer
    form = task.text_to_text()
    metrics = pipeline.evaluate("selection")
    # By hand: -loss x length = log P(label string + EOS | prompt), one example at a time.
    sources = form.sources(splits.selection)
    hand = np.zeros((len(sources), 2))
    for i, text in enumerate(sources):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=32)
        for k, word in enumerate(form.candidates):
            target = tok(word, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                loss = model(**enc, labels=target).loss
            hand[i, k] = -float(loss) * target.shape[1]
    order = sorted(range(len(sources)), key=lambda i: len(tok(sources[i])["input_ids"]))
    predicted = np.array(pipeline.items["selection"]["pred"])
    assert predicted.tolist() == hand.argmax(axis=1)[order].tolist()
    labels = splits.selection["label"].to_numpy()
    assert metrics == task.metrics(hand.argmax(axis=1), labels)
    # The batched scorer (encoder once, decoder per candidate) gives the same numbers.
    batch = pipeline.collate(
        [{"input_ids": tok(s)["input_ids"][:32], "labels": [1]} for s in sources]
    )
    ids = [tok(w)["input_ids"] for w in form.candidates]
    scored = candidate_scores(model, batch, ids, start_id=0, pad_id=0).numpy()
    assert scored == pytest.approx(hand, abs=1e-4)


def test_stsb_predictions_are_expectations_over_the_grid(mirror_dir):
    _, _, pipeline = t5_pipeline(mirror_dir, "glue/stsb")
    metrics = pipeline.evaluate("test/validation")
    predicted = np.array(pipeline.items["test/validation"]["pred"])
    assert set(metrics) == {"pearson", "spearman"}
    assert ((predicted > 0.0) & (predicted < 5.0)).all()  # a mixture, never one grid point


def test_data_informed_curvature_uses_the_token_loss_of_the_target(mirror_dir):
    from methods.kfac import resolve_loss_kind

    _, _, pipeline = t5_pipeline(mirror_dir)
    batch = next(pipeline.batches(2, seed=0, device="cpu"))
    logits = pipeline.model(**batch).logits
    assert resolve_loss_kind(pipeline.model, logits, batch["labels"], "auto") == "token_ce"


def trial_spec(mirror_dir: str, method: str) -> TrialSpec:
    return TrialSpec(
        sweep="t", method=method, method_overrides={}, task="glue/sst2", lr=1e-3, seed=0,
        model_id=RANDOM_T5_ID, model_revision=None,
        budget=Budget(max_steps=2, batch_size=4, max_length=32, train_rows=16,
                      selection_rows=8, test_rows=8),
        eval=EvalConfig(batch_size=8), data_dir=mirror_dir, model_dir=None,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "lora_ga", "cg_lora", "sds_lora", "lora_sb", "full_ft"])
def test_trials_on_random_t5_are_ok_rows_with_passed_sanity_checks(mirror_dir, method):
    row = run_trial(trial_spec(mirror_dir, method))
    assert row["status"] == "ok", row.get("traceback")
    assert row["protocol"] == TEXT_TO_TEXT_PROTOCOL
    assert row["model_revision"].startswith("random-init: NOT pretrained")
    assert "NOT T5's" in row["model_revision"] and row["model_source"].startswith("random-init:")
    impl = methods.get_method(method)
    starts_at_base = impl.starts_at_base(impl.hyperparams({}))
    assert row["sanity_init"].startswith("identity" if starts_at_base else "offset")
    merge = "not mergeable" if method == "full_ft" else "merged == unmerged"
    assert row["sanity_merge"].startswith(merge)
    assert row["trainable_params"] == row["expected_trainable_params"]
    assert 0 <= row["test_score"] <= 1 and row["majority_baseline"] is not None


def test_t5_base_preset_validates_offline(tmp_path):
    from harness.spec.presets import (
        KNOWN_PARAMS,
        architecture_config,
        load_preset,
        write_config_folder,
    )

    write_config_folder("google-t5/t5-base", tmp_path)
    cfg = load_preset("t5-base-cglora-glue", {"model_dir": str(tmp_path)})
    assert cfg.model.id == "google-t5/t5-base" and cfg.budget.schedule == "cosine"
    assert cfg.methods["cg_lora"].overrides["use_rslora"] is True
    assert cfg.methods["lora_ga"].overrides["init_examples"] == 256
    # The paper's baselines ran LoRA-GA's T5 code: every linear layer but the LM head.
    for name, sweep in cfg.methods.items():
        if name != "full_ft":
            assert sweep.overrides["target_modules"] == ["q", "k", "v", "o", "wi", "wo"]
    with torch.device("meta"):
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_config(architecture_config("google-t5/t5-base"))
    assert sum(p.numel() for p in model.parameters()) == KNOWN_PARAMS["google-t5/t5-base"]
