"""rsLoRA (Kalajdzievski 2023): LoRA with the rank-stabilised scaling alpha / sqrt(r)."""

from methods.peft_lora import PeftLoraMethod
from methods.registry import register_method


@register_method("rslora")
class RsLora(PeftLoraMethod):
    description = "rsLoRA: LoRA with scaling alpha/sqrt(r) (peft use_rslora)"

    def extra_lora_kwargs(self, hp):
        return {"use_rslora": True}
