"""LoRA-GA (Wang et al. 2024): adapters from the SVD of the estimated full gradient (peft).

G = mean gradient of the target weights over `init_batches` training batches (peft's
`preprocess_loraga`); svd(G) = U S V^T; direction ArB2r: A0 = V[:, :r]^T, B0 = U[:, r:2r],
and peft 0.21 also multiplies B0 by diag(S[r:2r]); "stable" scaling multiplies B0 by
m^(1/4)/sqrt(gamma). W0 <- W0 - s B0 A0, so training starts at the base function.
Known gap (issue #3): peft's estimator keeps whole-model gradients and has no cross-rank
reduction; the shared estimator will replace it.
"""

from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from pydantic import Field

from methods.peft_lora import LoraHyperparams, PeftLoraMethod
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

    def init_batches_wanted(self, hp):
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
        config: LoraConfig = self.lora_config(hp, ctx)

        def accumulate_gradients() -> None:
            for batch in ctx.init_batches(hp.init_batches):
                model(**batch).loss.backward()

        preprocess_loraga(model, config, accumulate_gradients)
        return get_peft_model(model, config)

    def resolved_config(self, hp, ctx):
        return {**super().resolved_config(hp, ctx), "b_convention": B_CONVENTION}
