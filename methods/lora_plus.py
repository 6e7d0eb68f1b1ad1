"""LoRA+ (Hayou et al. 2024): LoRA with lr(B) = ratio x lr(A) (peft create_loraplus_optimizer).

peft puts every trainable 1-d parameter (biases, including the task head's) in the fast
group too; we keep peft's grouping so results match peft users'.
"""

import torch
from peft.optimizers import create_loraplus_optimizer
from pydantic import Field

from methods.peft_lora import LoraHyperparams, PeftLoraMethod
from methods.registry import register_method


class LoraPlusHyperparams(LoraHyperparams):
    loraplus_lr_ratio: float = Field(
        16.0, ge=1, description="lr(B)/lr(A); paper default 2^4 (SDS-LoRA used 4)"
    )


@register_method("lora_plus")
class LoraPlus(PeftLoraMethod):
    description = "LoRA+: LoRA with lr(B) = ratio x lr(A), default ratio 16 (peft)"
    hyperparams_cls = LoraPlusHyperparams

    def build_optimizer(self, model, lr, hp, weight_decay=0.0):
        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=hp.loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
        )
