"""Builders shared by several test modules: tiny random models, batches, configs and rows.

Plain functions and constants, imported like any module (`from tests.builders import ...`);
pytest fixtures live in tests/conftest.py. No test module imports from another test module
(tests/test_layout.py checks it), so whatever two of them share is defined here.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import methods
from harness.spec.config import Budget, EvalConfig
from harness.spec.identity import TrialSpec
from methods.targets import default_target_modules
from tests.conftest import MINILM

# ---------------------------------------------------------------- tiny BERT for method maths

HEAD = ["classifier"]
TARGETS = default_target_modules("bert")
LAYER = "bert.encoder.layer.0.attention.self.query"


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def batch(seed: int, n: int = 2, length: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


INIT_BATCHES = [batch(10), batch(11)]


def ctx() -> methods.PrepareContext:
    return methods.PrepareContext(
        head_modules=HEAD,
        default_target_modules=TARGETS,
        # Cycled, as the harness's loader: 8 single-example init batches need 4 of these.
        init_batches=lambda n: itertools.islice(itertools.cycle(INIT_BATCHES), n),
        learning_rate=1e-3,
    )


def logits(model, b=None) -> torch.Tensor:
    b = b or batch(99, n=3, length=6)
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


# ---------------------------------------------------------------- CG-LoRA references


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def psd_power(f: np.ndarray, power: float, rtol: float = 1e-6) -> np.ndarray:
    """F^power on the eigenvalues above rtol * max (pseudo-inverse powers), numpy."""
    w, v = np.linalg.eigh(f)
    keep = w > rtol * w.max()
    return (v[:, keep] * w[keep] ** power) @ v[:, keep].T


def projector(m: np.ndarray) -> np.ndarray:
    return m @ np.linalg.pinv(m)


def reference_init(a_in, s, g, rank, rtol=1e-6):
    """Dense reference of steps 4-6: the projection of -G onto the whitened modes' span."""
    s_half, a_half = psd_power(s, -0.5, rtol), psd_power(a_in, -0.5, rtol)
    whitened = s_half @ g @ a_half
    p, d, qh = np.linalg.svd(whitened)
    b_hat = s_half @ p[:, :rank]
    a_hat = qh[:rank] @ a_half
    product = projector(b_hat) @ (-g) @ projector(a_hat.T)
    return whitened, b_hat, a_hat, product


def tiny_llama() -> LlamaForCausalLM:
    """A tiny random Llama with tiny_bert's vocabulary of 100, for `lm_batch`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- word-level causal LM

WORDS = ["<pad>", "<eos>", "<bos>", "Q:", "A:", "what", "is", "two", "plus", "three", "five"]
WORDS += [f"w{i}" for i in range(20)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def word_llama(vocab: int = len(WORDS)) -> LlamaForCausalLM:
    """A tiny random Llama over `word_tokenizer`'s vocabulary and its pad/eos/bos ids."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- sweep configs and trials

SWEEP_CONFIG = {
    "name": "t",
    "model": {"id": MINILM},
    "tasks": ["glue/sst2"],
    "methods": {"lora": {"lrs": [1e-3]}},
    "seeds": [0],
    "budget": {"max_steps": 2, "batch_size": 8, "max_length": 16},
    "output_dir": "unused",
}


def sweep_config(**top) -> dict:
    """A raw sweep config that validates, with top-level sections replaced by `top`."""
    raw = copy.deepcopy(SWEEP_CONFIG)
    raw.update(top)
    return raw


def trial_spec(data_dir: str, method: str = "lora", **budget) -> TrialSpec:
    return TrialSpec(
        sweep="t", method=method, method_overrides={}, task="glue/sst2", lr=1e-3, seed=0,
        model_id=MINILM, model_revision=None,
        budget=Budget(**{"max_steps": 2, "batch_size": 4, "max_length": 16, "train_rows": 16,
                         "selection_rows": 8, "test_rows": 8, **budget}),
        eval=EvalConfig(batch_size=8), data_dir=data_dir, model_dir=None,
    )  # fmt: skip


def tiny_bert_folder(dest: Path, dropout: float | None = None) -> Path:
    """A 2-layer random BERT (hidden 32) with MiniLM's tokenizer, saved as a model folder.
    `dropout`: hidden and attention dropout (None: BERT's default 0.1); 0 makes training
    deterministic across ways of splitting a batch (one device vs ranks x micro-batches)."""
    from transformers import BertModel

    from harness.modeling.models import resolve_model

    no_default = {} if dropout is None else {
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
    }  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, **no_default,
    )  # fmt: skip
    BertModel(config).save_pretrained(dest)  # no classifier: the task head is new, as usual
    tokenizer = Path(resolve_model(MINILM, None, None).location)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, dest / name)
    return dest


# ---------------------------------------------------------------- results rows


def result_row(method, lr, seed, select, test, status="ok", task="glue/sst2") -> dict:
    """One runs.csv row with the given scores (the same row tests/test_results.py builds)."""
    return {
        "key": f"{method}-{task}-{lr}-{seed}",
        "status": status,
        "method": method,
        "task": task,
        "model_id": "m",
        "lr": lr,
        "seed": seed,
        "selection_metric": "accuracy",
        "selection_score": select,
        "test_metric": "accuracy",
        "test_score": test,
        "test_metrics": json.dumps({"accuracy": test}),
        "majority_baseline": 0.5,
        "trainable_params": 10,
        "init_time_s": 0.1,
        "train_time_s": 1.0,
        "peak_memory_mb": 100.0,
        "samples_per_s": 50.0,
        "protocol": "p",
        "git_commit": "abc",
        "packages": "{}",
        "device": "cpu",
        "data_kind": "mirror",
        "data_source": "{}",
        "model_revision": "r",
        "method_config": "{}",
    }


def two_rank_sweep_file(
    tmp_path: Path, mirror_dir: str, methods: dict, *, model_dropout: float | None = None, **dist
) -> Path:
    """A sweep YAML of tiny-BERT trials on 2 gloo ranks under ZeRO-3 (`dist` overrides the
    distributed section; `model_dropout` as `tiny_bert_folder`'s). 8 train rows = one global
    batch: every step sees the same examples, so the loss must fall; micro 2 x accumulation
    2 x 2 ranks = 8."""
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "dist",
                "model": {"id": str(tiny_bert_folder(tmp_path / "tiny-bert", model_dropout))},
                "tasks": ["glue/sst2"],
                "methods": methods,
                "seeds": [0],
                "budget": {"max_steps": 10, "batch_size": 8, "max_length": 32, "train_rows": 8,
                           "selection_rows": 16, "test_rows": 16, "warmup_ratio": 0.0},
                "eval": {"batch_size": 16},
                "distributed": {"workers": 2, "cpus_per_worker": 0.5, "zero_stage": 3,
                                "micro_batch_size": 2, **dist},
                "output_dir": str(tmp_path / "out"),
                "data_dir": mirror_dir,
            }
        )
    )  # fmt: skip
    return config
