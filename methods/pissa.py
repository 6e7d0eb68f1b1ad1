"""PiSSA (Meng et al. 2024): adapters from svd_r(W0), residual W0 - s B A stays frozen (peft)."""

from pydantic import Field

from methods.peft_lora import LoraHyperparams, PeftLoraMethod
from methods.registry import register_method


class PissaHyperparams(LoraHyperparams):
    pissa_niter: int | None = Field(
        None, gt=0, description="randomized-SVD iterations (pissa_niter_K); None = exact SVD"
    )


@register_method("pissa")
class Pissa(PeftLoraMethod):
    description = "PiSSA: B A from the top-r SVD of W0, residual frozen (peft)"
    hyperparams_cls = PissaHyperparams

    def extra_lora_kwargs(self, hp):
        init = f"pissa_niter_{hp.pissa_niter}" if hp.pissa_niter else "pissa"
        return {"init_lora_weights": init}
