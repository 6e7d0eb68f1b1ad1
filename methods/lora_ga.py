"""LoRA-GA (Wang et al. 2024): adapters from the SVD of the estimated full gradient (peft).

G = mean gradient of the target weights over `init_batches` training batches (the shared
estimator, methods/grad_estimator.py, in place of peft's `preprocess_loraga`: float32,
layer-wise, all-reduced across ranks); svd(G) = U S V^T (peft: svd_lowrank, q = 4r);
direction ArB2r: A0 = V[:, :r]^T, B0 = U[:, r:2r], and peft 0.21 also multiplies B0 by
diag(S[r:2r]); "stable" scaling multiplies B0 by m^(1/4)/sqrt(gamma).
W0 <- W0 - s B0 A0, so training starts at the base function.
"""

from peft import LoraGAConfig, get_peft_model
from pydantic import Field

from methods.grad_estimator import layer_gradients
from methods.peft_lora import LoraHyperparams, PeftLoraMethod, matching_linear_layers
from methods.registry import register_method

B_CONVENTION = "peft-0.21: B0 = U[:, r:2r] diag(S[r:2r]) * m^(1/4)/sqrt(gamma); A0 = V[:, :r]^T"


class LoraGaHyperparams(LoraHyperparams):
    init_batches: int = Field(8, gt=0, description="training batches the gradient is averaged on")
    stable_gamma: float = Field(16.0, gt=0, description="stable-scaling gamma (peft default 16)")
    direction: str = Field("ArB2r", pattern="^(ArBr|A2rBr|ArB2r)$")


@register_method("lora_ga")
class LoraGa(PeftLoraMethod):
    description = "LoRA-GA: adapters from the SVD of the estimated gradient, offset W0 (peft)"
    hyperparams_cls = LoraGaHyperparams
    needs_init_batches = True

    def init_batches_wanted(self, hp, ctx=None):
        return hp.init_batches

    def extra_lora_kwargs(self, hp):
        return {
            "init_lora_weights": "lora_ga",
            "lora_ga_config": LoraGAConfig(
                direction=hp.direction, scale="stable", stable_gamma=hp.stable_gamma
            ),
        }

    def prepare(self, model, hp, ctx):
        if ctx.init_batches is None:
            raise ValueError("lora_ga needs training batches for its gradient estimate")
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        grads = layer_gradients(
            model, layers, ctx.init_batches(hp.init_batches), offload=ctx.offload_statistics
        )
        for name in grads:
            # peft's lora_ga_init reads the estimate from here (what preprocess_loraga sets);
            # ours is all-reduced across ranks and accumulated layer-wise in float32.
            layers[name]._peft_loraga_grad = grads.pop_mean(name)
        return get_peft_model(model, self.lora_config(hp, ctx))

    def resolved_config(self, hp, ctx):
        return {**super().resolved_config(hp, ctx), "b_convention": B_CONVENTION}
