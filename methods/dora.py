"""DoRA (Liu et al. 2024): W = m * (W0 + s B A) / ||W0 + s B A||_row, norm detached (peft)."""

import torch

from methods.peft_lora import PeftLoraMethod, matching_linear_layers
from methods.registry import register_method


@register_method("dora")
class Dora(PeftLoraMethod):
    description = "DoRA: magnitude x direction of W0 + s B A (peft use_dora)"

    def extra_lora_kwargs(self, hp):
        return {"use_dora": True}

    def prepare(self, model, hp, ctx):
        # peft#2049: a zero row norm makes the direction NaN; refuse instead of training NaNs.
        for name, layer in matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules):
            if (torch.linalg.vector_norm(layer.weight.detach(), dim=1) == 0).any():
                raise ValueError(f"DoRA: layer {name} has a weight row with zero norm")
        return super().prepare(model, hp, ctx)

    def per_layer_params(self, layer, hp):
        return super().per_layer_params(layer, hp) + layer.out_features  # magnitude vector
