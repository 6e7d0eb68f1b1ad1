"""Full fine-tuning: every parameter trains (typical LRs 10-100x below LoRA's)."""

from methods.base import Method, PrepareContext
from methods.registry import register_method


@register_method("full_ft")
class FullFineTuning(Method):
    description = "Full fine-tuning: all parameters trainable"

    def prepare(self, model, hp, ctx: PrepareContext):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, base_model, hp, ctx):
        return sum(p.numel() for p in base_model.parameters())
