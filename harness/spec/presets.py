"""Sweep presets for the papers' large settings, and offline architecture cards.

Presets (YAML under harness/configs/presets/, loaded like any sweep file):

- `llama3-8b-sds`, `gemma-2b-sds`: SDS-LoRA Table 10 - AdamW, zero weight decay, cosine
  schedule, 1 epoch, global batch 32, targets q,k,v,o,up,down,gate; LR full FT 2e-5 (Gemma-2B)
  / 1e-5 (LLaMA3-8B), LoRA-based 2e-4 (Gemma-2B) / 1e-4 (LLaMA3-8B); rank 32 (the paper also
  reports 8); scaling 2 for LoRA (alpha = 2r), alpha/sqrt(r) with alpha = 4 for the others
  (rsLoRA-style; for peft methods without rsLoRA scaling, alpha = 4 sqrt(r)); LoRA+ ratio 4.
- `mistral-7b-lorasb`, `gemma2-9b-lorasb`: LoRA-SB on 50K MetaMathQA rows -> GSM8K/MATH;
  rank 96 (Mistral) / 64 (Gemma-2), alpha = r, 1 epoch, cosine, warm-up 0.02, max 512 tokens,
  lr 1e-4, global batch 32 (the official code: batch 1 x 32 accumulation on one GPU). The
  paper's Table 8 did not survive text extraction; these are the official code's defaults.

- `roberta-base-cglora-glue`: CG-LoRA Sec. 6.1 on RoBERTa-base GLUE (MNLI, SST-2, CoLA,
  QNLI, MRPC) - AdamW, cosine schedule, 1 epoch, rsLoRA scaling for all methods, inits on
  256 examples; CG-LoRA, LoRA-GA (official preset), LoRA-One (official preset), rsLoRA, full
  FT. Rank, LR grids and batch size are lost in extraction (our choices, marked in the file).
- `t5-base-cglora-glue`: the same on T5-base (CG-LoRA Table 2), text-to-text: the class is
  generated as a word and scored by its label-sequence likelihood (harness.heads.seq2seq_pipeline,
  tasks/glue.py); every method adapts q,k,v,o,wi,wo (LoRA-GA's T5 code: all linear layers
  but the LM head; the T5 family default is q,k,v,o).

Method sections may name a method preset (`preset: official`, methods/presets.py): its
values, with the section's `overrides` on top.

Architecture cards: the published config.json dimensions of each preset's model, so the
sweep can be validated and its per-rank memory estimated on the meta device with the hub
out of reach (`write_config_folder` + `model_dir`). Parameter counts are the known totals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.spec.config import SweepConfig, load_config

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"

PRESETS: dict[str, str] = {
    "llama3-8b-sds": "llama3_8b_sds.yaml",
    "gemma-2b-sds": "gemma_2b_sds.yaml",
    "mistral-7b-lorasb": "mistral_7b_lorasb.yaml",
    "gemma2-9b-lorasb": "gemma2_9b_lorasb.yaml",
    "roberta-base-cglora-glue": "roberta_base_cglora_glue.yaml",
    "t5-base-cglora-glue": "t5_base_cglora_glue.yaml",
}

# config.json fields that determine the parameter shapes (rope, dropout etc. left default).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    },
    "google/gemma-2b": {
        "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "google/gemma-2-9b": {
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "google-t5/t5-base": {
        "model_type": "t5", "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
        "num_heads": 12, "vocab_size": 32128, "feed_forward_proj": "relu",
        "decoder_start_token_id": 0, "tie_word_embeddings": True,
    },
}  # fmt: skip

# Published totals (embeddings included; tied embeddings counted once).
KNOWN_PARAMS: dict[str, int] = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "google/gemma-2b": 2_506_172_416,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "google/gemma-2-9b": 9_241_705_984,
    "google-t5/t5-base": 222_903_552,  # with its LM head (tied to the embeddings)
}


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESET_DIR / PRESETS[name]


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """The preset as a validated sweep config (model structure read on the meta device)."""
    return load_config(preset_path(name), overrides)


def architecture_config(model_id: str):
    """A transformers config with the model's published dimensions (no download)."""
    from transformers import AutoConfig

    if model_id not in ARCHITECTURES:
        raise KeyError(f"no architecture card for {model_id!r}; known: {', '.join(ARCHITECTURES)}")
    card = dict(ARCHITECTURES[model_id])
    return AutoConfig.for_model(card.pop("model_type"), **card)


def write_config_folder(model_id: str, model_dir: str | Path) -> Path:
    """`<model_dir>/<model_id>/config.json` from the card: enough for validation and the
    meta-device memory estimate (HARNESS_MODEL_DIR / `model_dir`), never for training."""
    folder = Path(model_dir) / model_id
    folder.mkdir(parents=True, exist_ok=True)
    config = architecture_config(model_id).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder
