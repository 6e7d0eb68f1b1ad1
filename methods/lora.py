"""LoRA (Hu et al. 2021): W = W0 + (alpha/r) B A, A Kaiming-uniform, B = 0."""

from methods.peft_lora import PeftLoraMethod
from methods.registry import register_method


@register_method("lora")
class Lora(PeftLoraMethod):
    description = "LoRA: W0 + (alpha/r) B A, B = 0 at init (peft)"
