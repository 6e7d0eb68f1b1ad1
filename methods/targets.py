"""Default target modules per model family (HF `config.model_type`).

Encoders: every linear layer of each transformer block (attention q/k/v/output, FFN in/out),
as LoRA-SB and LoRA-GA use on RoBERTa; the pooler and the task head are not targets. T5
(encoder-decoder): q,k,v,o of every attention layer (the entry says why not the FFN).
Decoders: the seven projections the SDS-LoRA/LoRA-SB papers adapt (q,k,v,o,gate,up,down).

Keys follow peft's matching rule (a module matches when its name equals the key or ends in
"." + key). The module names are those of transformers 5.23, checked in
tests/test_methods.py on tiny random models of each family: every key list matches exactly
the linear layers inside the blocks (6 per encoder block, 7 per decoder block; T5: the 4
attention projections per attention layer, FFN left out), never a pooler, classifier or LM
head. transformers 5 renamed ViT's layers (`attention.q_proj` ... `mlp.fc2`), so ViT no
longer shares BERT's names.
"""

from __future__ import annotations

_BERT_BLOCK = [
    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
]  # fmt: skip
_DECODER_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _BERT_BLOCK,
    "roberta": _BERT_BLOCK,
    "xlm-roberta": _BERT_BLOCK,
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],  # fmt: skip
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    # T5: the attention projections of every block (self- and, in the decoder, cross-
    # attention), the keys every T5 variant has. Its FFN is `wi`/`wo` (ReLU: T5, t5-base) or
    # `wi_0`/`wi_1`/`wo` (gated: T5 v1.1, flan-T5), both reporting model_type "t5", so a list
    # naming both FFN forms always names absent layers, which a sweep refuses. The CG-LoRA
    # paper says only "the same linear layers" for all methods; the LoRA-GA T5 code it ran
    # adapts every linear layer but the LM head (q,k,v,o,wi,wo on t5-base): its preset
    # (t5-base-cglora-glue) names those explicitly.
    "t5": ["q", "k", "v", "o"],
    # SmolLM reports model_type "llama".
    "llama": _DECODER_BLOCK,
    "mistral": _DECODER_BLOCK,
    "gemma": _DECODER_BLOCK,
    "gemma2": _DECODER_BLOCK,
    "qwen2": _DECODER_BLOCK,
    "qwen3": _DECODER_BLOCK,
}


def default_target_modules(model_type: str) -> list[str]:
    """The target-module keys for a model family (a fresh list the caller may modify)."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; set the method's "
            f"`target_modules` override (known types: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])
