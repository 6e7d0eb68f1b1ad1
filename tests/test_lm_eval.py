"""`harness eval --lm-eval`: a peft adapter through lm-eval's HFLM on a local 4-doc task,
checked against loglikelihoods computed here from the same base model + adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness import cli
from harness.reporting.lm_eval_interop import task_config_hash
from tests.tiny_causal_lm import save_tiny_causal_lm

lm_eval = pytest.importorskip("lm_eval", reason="optional extra: pip install '.[lmeval]'")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "a fish", "blue"], "answer": 0},
    {"question": "Four score and seven years", "choices": ["ago", "later", "hence"], "answer": 0},
    {"question": "Call me", "choices": ["Ishmael", "tomorrow", "please"], "answer": 1},
    {"question": "It was the best of", "choices": ["times", "the end", "cats"], "answer": 2},
]


def task_yaml(data: str) -> str:
    return f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny random Llama folder and a peft LoRA on it with non-zero B (it changes outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_causal_lm(tmp_path_factory.mktemp("base"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    adapter_dir = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)  # where eval finds the base
    return base_dir, adapter_dir


def choice_loglikelihoods(model, tokenizer, doc) -> list[float]:
    """log p(" " + choice | question), summed over the choice's tokens, computed directly."""
    out = []
    with torch.no_grad():
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return out


def write_task(folder) -> str:
    """The 4-doc multiple-choice task as a local YAML + jsonl; returns the folder."""
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(task_yaml(str(data)))
    return str(folder)


def test_lm_eval_accuracy_equals_an_independent_loglikelihood_argmax(adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir = adapter
    tasks_dir = write_task(tmp_path / "tasks")
    out_file = tmp_path / "out.json"
    code = cli.main([
        "eval", str(adapter_dir), "--lm-eval", "tiny_mc", "--include-path", tasks_dir,
        "--output", str(out_file), "--log-samples", "--batch-size", "2",
    ])  # fmt: skip
    assert code == 0
    out = json.loads(out_file.read_text())

    # Independently: the base model from its folder, the adapter by peft, scored by hand.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.eval()
    expected = [choice_loglikelihoods(model, tokenizer, d) for d in DOCS]
    predicted = [max(range(len(ll)), key=ll.__getitem__) for ll in expected]
    accuracy = sum(p == d["answer"] for p, d in zip(predicted, DOCS, strict=True)) / len(DOCS)
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    got = [[resp[0][0] for resp in s["resps"]] for s in samples]
    for want, have in zip(expected, got, strict=True):
        assert have == pytest.approx(want, rel=1e-4, abs=1e-4)
    # The adapter was applied: the base alone scores the choices differently.
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_ll = [choice_loglikelihoods(plain, tokenizer, d) for d in DOCS]
    assert max(abs(a - b) for x, y in zip(base_ll, expected, strict=True)
               for a, b in zip(x, y, strict=True)) > 1e-3  # fmt: skip

    # Provenance: lm-eval's version, each task's config hash, where the model came from.
    assert out["lm_eval_version"] == lm_eval.__version__
    assert out["tasks"]["tiny_mc"]["config_sha256"] == task_config_hash(out["configs"]["tiny_mc"])
    assert out["tasks"]["tiny_mc"]["n_samples"]["effective"] == 4
    assert out["model"]["kind"] == "peft adapter" and out["model"]["base_model"] == str(base_dir)
    assert all(not math.isnan(v) for ll in got for v in ll)


def test_task_config_hash_ignores_the_yaml_location_not_the_content():
    config = {"task": "t", "doc_to_text": "{{q}}", "metadata": {"config_source": "/a/t.yaml"}}
    moved = {**config, "metadata": {"config_source": "/b/t.yaml"}}
    changed = {**config, "doc_to_text": "Q: {{q}}"}
    assert task_config_hash(config) == task_config_hash(moved)
    assert task_config_hash(config) != task_config_hash(changed)
    assert len(task_config_hash(config)) == 64


def test_an_adapter_trained_for_classification_is_refused_before_loading(tmp_path, capsys):
    from harness.training.adapters import META_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / META_FILE).write_text(json.dumps({"task": "glue/sst2", "model_id": "m",
                                             "format": "peft"}))  # fmt: skip
    code = cli.main(["eval", str(run), "--lm-eval", "tiny_mc"])
    assert code == cli.EXIT_BAD_INPUT and "evaluates causal LMs" in capsys.readouterr().err


def test_a_saved_trial_artifact_evaluates_as_the_trained_adapter(adapter, mirror_dir, tmp_path):
    """`harness eval OUT/adapters/<key>`: the run's own base model and trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.spec.config import Budget, EvalConfig
    from harness.spec.identity import TrialSpec
    from harness.training.trial import run_trial

    base_dir, _ = adapter
    spec = TrialSpec(
        sweep="t", method="lora", method_overrides={}, task="gsm8k_offline", lr=5e-2, seed=0,
        model_id=str(base_dir), model_revision=None,
        budget=Budget(max_steps=2, batch_size=2, max_length=64, train_rows=4, selection_rows=2,
                      test_rows=1),
        eval=EvalConfig(batch_size=2, max_new_tokens=1, forgetting_corpus="none"),
        data_dir=mirror_dir, model_dir=None,
    )  # fmt: skip
    row = run_trial(spec, adapters_dir=str(tmp_path / "adapters"))
    assert row["status"] == "ok", row.get("traceback")
    run_dir = tmp_path / "adapters" / row["key"]
    out_file = tmp_path / "out.json"
    code = cli.main(["eval", str(run_dir), "--lm-eval", "tiny_mc", "--include-path",
                     write_task(tmp_path / "tasks"), "--output", str(out_file),
                     "--log-samples"])  # fmt: skip
    assert code == 0
    out = json.loads(out_file.read_text())
    assert out["model"]["kind"] == "harness run" and out["model"]["run"]["key"] == row["key"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter"
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    moved = 0.0
    for doc, sample in zip(DOCS, samples, strict=True):
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(choice_loglikelihoods(trained, tokenizer, doc), rel=1e-4)
        base_ll = choice_loglikelihoods(plain, tokenizer, doc)
        moved = max(moved, *(abs(a - b) for a, b in zip(got, base_ll, strict=True)))
    assert moved > 1e-3  # training moved the adapter, so the base alone would not match
