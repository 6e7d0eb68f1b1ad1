"""Scaled AdamW: Riemannian-preconditioned LoRA (Zhang & Pilanci 2024, arXiv 2402.02347), the
"rsLoRA + ScaledAdamW" baseline of SDS-LoRA Table 4.

A plain peft LoRA adapter (peft's default init: Kaiming-uniform A, B = 0, so training starts
at W0) trained by AdamW on preconditioned gradients, for every LoRA pair (A: r x in,
B: out x r):

    g_A <- (B^T B + lambda I_r)^-1 g_A,        g_B <- g_B (A A^T + lambda I_r)^-1,

then one AdamW step on the rewritten gradients (the paper's "scaled AdamW": the r x r
preconditioners are applied before the moments, so Adam's state tracks the scaled
gradients). The preconditioner is LoRA-One's `riemannian_preconditioner` (methods/lora_one.py,
imported, not copied), the same `gradient_transform` the harness applies after clipping on
one device and on assembled full gradients under ZeRO (harness/deepspeed/), so the method
also trains under DeepSpeed by the existing contract. It equals peft's
`peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW, lr=..., reg=lambda)`
(src/peft/optimizers/riemannian.py: simultaneous preconditioning of A and B from the current
factors, pinv of the damped Gram matrix in at least fp32, then torch AdamW), tested in
tests/test_scaled_adamw.py.

Defaults and where they come from:
- `precond_damping` lambda = 1e-6: the official code (pilancilab/Riemannian_Preconditioned_LoRA
  Mistral-7B/mistral/custom_optimizer.py `AdamWr(optimizer_reg=1e-6)`; the GPT-2 copy hard-codes
  `self.reg = 1e-6`), as LoRA-One's `precond_damping`. peft's create_riemannian_optimizer
  defaults to reg = 1e-2 (set `precond_damping: 0.01` for peft's).
- `use_rslora` False (s = alpha / r, plain LoRA, as the official loralib code). SDS-LoRA
  Table 4 ran it on rsLoRA (s = alpha / sqrt(r), alpha = 4): set `use_rslora: true,
  alpha: 4` to reproduce that row. `alpha` 16 is the harness's LoRA-family alpha.

Deviations from the official AdamWr (which the paper's numbers come from):
- AdamW itself is torch's (bias correction on, eps 1e-8, decoupled weight decay before the
  step), as peft; the official AdamWr defaults to `correct_bias=False`, eps = 1e-6 and applies
  weight decay after the step.
- The official AdamWr updates A first and then preconditions g_B with the *updated* A
  (`c1 = p1.data` aliases A, modified in place), pairing parameters by their position in the
  param group; here (and in peft) both preconditioners use the factors before the step, and
  pairs are found by name. It inverts with torch.inverse (identity on failure); we use pinv.
- Clipping (the harness's max_grad_norm) acts on the raw gradients before preconditioning.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from methods.base import GradientTransform
from methods.lora_one import riemannian_preconditioner
from methods.peft_lora import LoraHyperparams, PeftLoraMethod
from methods.registry import register_method


class ScaledAdamwHyperparams(LoraHyperparams):
    precond_damping: float = Field(
        1e-6, gt=0, description="lambda in (X + lambda I)^-1 (official reg 1e-6; peft 1e-2)"
    )
    use_rslora: bool = Field(
        False, description="s = alpha/sqrt(r) (SDS-LoRA Table 4's rsLoRA); else alpha/r"
    )


@register_method("scaled_adamw")
class ScaledAdamw(PeftLoraMethod):
    description = "Scaled AdamW: LoRA + AdamW on Riemannian-preconditioned gradients (r x r)"
    hyperparams_cls = ScaledAdamwHyperparams

    def extra_lora_kwargs(self, hp: ScaledAdamwHyperparams) -> dict[str, Any]:
        return {"use_rslora": hp.use_rslora}

    def gradient_transform(self, hp: ScaledAdamwHyperparams) -> GradientTransform:
        return riemannian_preconditioner(hp.precond_damping)

    # build_optimizer: Method's default, one torch AdamW group over the trainables.
