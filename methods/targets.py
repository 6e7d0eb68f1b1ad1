"""Default target modules per model family (HF `config.model_type`).

Encoders: every linear layer of each transformer block (attention q/k/v/output, FFN in/out),
as LoRA-SB and LoRA-GA use on RoBERTa/T5; the pooler and the task head are not targets.
Decoders: the seven projections the SDS-LoRA/LoRA-SB papers adapt (q,k,v,o,gate,up,down).
"""

from __future__ import annotations

_ENCODER_BLOCK = [
    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
]  # fmt: skip
_DECODER_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _ENCODER_BLOCK,
    "roberta": _ENCODER_BLOCK,
    "xlm-roberta": _ENCODER_BLOCK,
    "vit": _ENCODER_BLOCK,
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],  # fmt: skip
    "t5": ["q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"],
    "llama": _DECODER_BLOCK,
    "mistral": _DECODER_BLOCK,
    "gemma": _DECODER_BLOCK,
    "gemma2": _DECODER_BLOCK,
    "qwen2": _DECODER_BLOCK,
    "qwen3": _DECODER_BLOCK,
}


def default_target_modules(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; set the method's "
            f"`target_modules` override (known types: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])
