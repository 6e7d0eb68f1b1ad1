"""AltLoRA (Yu, Wang, Chen & Xue 2025, arXiv 2505.12455): alternating projected-gradient steps
on the LoRA factors, with momentum kept (and transported) in the low-rank space.

What the official code does (LucasXinYu/AltLoRA, read at commit 94b2198; the paper's own
text is not in shared/papers, only its abstract pages were reachable, so its equation numbers
cannot be cited; "Algorithm 1" is what the README calls `optim_notes=altlora`):

- optimizer_new.py `class altlora.step` (Algorithm 1), for each LoRA pair (A: r x d,
  B: k x r, s the peft scaling, G the full-weight gradient, so g_A = s B^T G, g_B = s G A^T):

      A (when it has a gradient):  g~ = (B^T B + reg I)^-1 g_A       = s argmin_X ||B X - G||
                                   P  = (B^T B + reg I)^-1 B^T B_old   (B_old: B at A's last step)
                                   M_A <- beta1 P M_A + (1 - beta1) g~
                                   A  <- A - lr / (1 - beta1^n_A) M_A  (n_A: A's own step count)
      B (when it has a gradient):  g~ = g_B (A A^T + reg I)^-1       = s argmin_Y ||Y A - G||
                                   P  = A_old A^T (A A^T + reg I)^-1   (A_old: A at B's last step)
                                   M_B <- beta1 M_B P + (1 - beta1) g~
                                   B  <- B - lr / (1 - beta1^n_B) M_B

  (with reg = 0 these are the least-squares projections of G onto the factor's span; M lives
  in r x d / k x r, and P re-expresses the old momentum B_old M_A, or M_B A_old, in the
  current factor's span). No second moment: betas[1] and eps are unused by `altlora`
  (they are AltLoRA+'s, `altlora_plus`, not implemented here).
- logtrainer.py `LogTrainer.training_step` (the alternation, when `alt` is True): a counter
  per micro-batch; every `alter_freq` = 10 optimizer steps it freezes one factor
  (requires_grad False, grad None) and unfreezes the other, starting with "update A". With
  one micro-batch per step: steps 1..9 update both factors, steps 10..19 only A, 20..29
  only B, 30..39 only A, ... (phase = step // 10: 0 both, odd A, even B), `active_factors`.
- logtrainer.py `create_optimizer`: altlora(betas=(0.9, 0.999), eps=1e-4, weight_decay=1e-5,
  correct_bias=True, reg=1e-5); main_lora.py: peft LoraConfig(r=8, lora_alpha=16,
  lora_dropout=0.05, q/k/v/o_proj), plain alpha / r scaling, peft's init (Kaiming A, B = 0);
  run_main.sh: lr 5e-5, cosine schedule, LLaMA-3-8B on MetaMathQA.

Here: a plain peft LoRA adapter (peft's init, so training starts at W0), trained by
`torch.optim.SGD` (no momentum) on the output of `altlora_transform`, a `gradient_transform`
that computes the official update direction, M / (1 - beta1^n), for the active factors and
zero for the inactive one. The transform runs once per optimizer step, in order, identically
on every rank, so its step count, momenta and previous factors live in its closure; it sees
full tensors, so the same code runs on one device and under ZeRO (harness.deepspeed
ClipAndTransform assembles the full gradients; SGD is elementwise on the partitions).

Deviations from the official code, each deliberate:
- Schedule: `alternate` defaults to True (the method's defining alternation; the README's
  Algorithm 1), but the committed main_lora.py hard-codes `lora_alt = False`, i.e. its runs
  update both factors every step with the same rule; `alternate: false` gives that. The
  phase counts optimizer steps; with gradient accumulation the official counter toggles on
  the last micro-batch of every 10th step, so the newly frozen factor's accumulated gradient
  is dropped and the newly unfrozen one sees only that last micro-batch - not reproduced.
- Joint steps (steps 1..alternate_every-1, or every step with alternate: false): both
  projections use the factors before the step (as peft's Riemannian optimizer and
  methods/scaled_adamw.py); the official step updates A first and projects g_B with the
  already-updated A (and stores that A as B's A_old). Single-factor steps are unaffected.
- Learning rate: the harness's schedule (warm-up, then linear / cosine) scales the step, as
  for every method; the official optimizer reads `self.defaults["lr"]`, so its HF cosine
  scheduler never changes the step size (constant lr in the official runs).
- Weight decay: the harness's `budget.weight_decay` (default 0) as SGD's L2 term,
  W <- W - lr (d + wd W), on every trainable each step, the inactive factor included; the
  official code hard-codes 1e-5 and decays only the factor it just updated, after its step,
  W <- W (1 - lr wd) with the unscheduled lr.
- Clipping: the harness clips the raw gradients of all trainables (the inactive factor's
  included) before the transform; official HF clipping sees no gradient for the frozen
  factor. The inactive factor's gradient is still computed (official: requires_grad False).
- Inverses: torch.linalg.solve on the damped Gram matrix (positive definite for reg > 0) in
  at least fp32; the official torch.inverse with an identity fallback on failure.
- Non-LoRA trainables (the task head): the official optimizer updates only lora_A/lora_B pairs
  (its causal-LM runs have no other trainables), so a classification head would stay at its
  random init. Here the transform turns the head's gradient into torch AdamW's direction
  (betas 0.9 / 0.999, eps 1e-8, bias-corrected; with SGD's L2 term this is exactly torch
  AdamW's decoupled decay) - what every other method here trains the head with.
- State: the closure's state (step count, momenta, previous factors, head moments) is not
  part of the optimizer's state dict, so a DeepSpeed checkpoint resume restarts it (step 1 of
  the schedule, zero momenta).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pydantic import Field

from methods.base import GradientTransform
from methods.peft_lora import LoraHyperparams, PeftLoraMethod
from methods.registry import register_method

HEAD_BETAS = (0.9, 0.999)  # torch AdamW defaults, as the harness's other methods' head
HEAD_EPS = 1e-8


class AltLoraHyperparams(LoraHyperparams):
    alternate: bool = Field(
        True, description="alternate A / B blocks (official LogTrainer alt); False = joint"
    )
    alternate_every: int = Field(
        10, gt=0, description="optimizer steps per block (official LogTrainer.alter_freq 10)"
    )
    beta1: float = Field(
        0.9, ge=0, lt=1, description="low-rank momentum (official create_optimizer betas[0])"
    )
    precond_damping: float = Field(
        1e-5, gt=0, description="reg in (X + reg I)^-1 (official create_optimizer reg 1e-5)"
    )
    bias_correction: bool = Field(
        True, description="step / (1 - beta1^n) (official correct_bias=True)"
    )
    use_rslora: bool = Field(
        False, description="s = alpha/sqrt(r); else alpha/r, as the official LoraConfig"
    )


def active_factors(step: int, every: int, alternate: bool = True) -> frozenset[str]:
    """Which factors the official LogTrainer lets step `step` (1-based) update: "A", "B".

    Its counter toggles at every multiple of `every` steps, starting with A (both factors are
    trainable before the first toggle): phase = step // every, 0 both, odd A, even B.
    """
    phase = step // every
    if not alternate or phase == 0:
        return frozenset({"A", "B"})
    return frozenset({"A"}) if phase % 2 == 1 else frozenset({"B"})


def project_a(b: torch.Tensor, grad_a: torch.Tensor, damping: float) -> torch.Tensor:
    """(B^T B + damping I)^-1 g_A: with g_A = s B^T G, s times the (ridge) least-squares X of
    min ||B X - G||."""
    eye = torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    return torch.linalg.solve(b.T @ b + damping * eye, grad_a)


def project_b(a: torch.Tensor, grad_b: torch.Tensor, damping: float) -> torch.Tensor:
    """g_B (A A^T + damping I)^-1: with g_B = s G A^T, s times the least-squares Y of
    min ||Y A - G|| (the Gram matrix is symmetric: g (X)^-1 = (X^-1 g^T)^T)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a @ a.T + damping * eye, grad_b.T).T


@dataclass
class _FactorState:
    momentum: torch.Tensor  # M: the factor's shape
    partner_old: torch.Tensor  # the other factor at this factor's last update (zeros at first)
    steps: int = 0


@dataclass
class _AdamState:
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: int = 0


def _role(name: str) -> tuple[str | None, str | None]:
    if ".lora_A." in name:
        return "A", name.replace(".lora_A.", ".lora_B.")
    if ".lora_B." in name:
        return "B", name.replace(".lora_B.", ".lora_A.")
    return None, None


def altlora_transform(
    beta1: float = 0.9,
    damping: float = 1e-5,
    every: int = 10,
    alternate: bool = True,
    bias_correction: bool = True,
) -> GradientTransform:
    """The official `altlora.step` direction for each LoRA factor (zero for the inactive one),
    torch AdamW's direction for every other trainable; a plain SGD step at the scheduled lr
    then applies it. Stateful: call it once per optimizer step, in order."""
    state: dict[str, _FactorState] = {}
    head: dict[str, _AdamState] = {}
    step = 0

    def factor_direction(
        kind: str, name: str, value: torch.Tensor, partner: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        st = state.get(name)
        if st is None:
            st = state[name] = _FactorState(torch.zeros_like(value), torch.zeros_like(partner))
        if kind == "A":
            projected = project_a(partner, grad, damping)
            transport = project_a(partner, partner.T @ st.partner_old, damping)
            momentum = beta1 * transport @ st.momentum + (1 - beta1) * projected
        else:
            projected = project_b(partner, grad, damping)
            transport = project_b(partner, st.partner_old @ partner.T, damping)
            momentum = beta1 * st.momentum @ transport + (1 - beta1) * projected
        st.steps += 1
        st.momentum, st.partner_old = momentum, partner.clone()
        return momentum / (1 - beta1**st.steps) if bias_correction else momentum

    def adam_direction(name: str, grad: torch.Tensor) -> torch.Tensor:
        st = head.get(name)
        if st is None:
            st = head[name] = _AdamState(torch.zeros_like(grad), torch.zeros_like(grad))
        b1, b2 = HEAD_BETAS
        st.steps += 1
        st.exp_avg = b1 * st.exp_avg + (1 - b1) * grad
        st.exp_avg_sq = b2 * st.exp_avg_sq + (1 - b2) * grad * grad
        denom = st.exp_avg_sq.sqrt() / (1 - b2**st.steps) ** 0.5 + HEAD_EPS
        return st.exp_avg / (1 - b1**st.steps) / denom

    def transform(
        params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        nonlocal step
        step += 1
        active = active_factors(step, every, alternate)
        out: dict[str, torch.Tensor] = {}
        for name, grad in grads.items():
            dtype = torch.promote_types(grad.dtype, torch.float32)
            kind, partner_name = _role(name)
            if kind is None:
                out[name] = adam_direction(name, grad.to(dtype)).to(grad.dtype)
                continue
            if partner_name not in params or params[name].ndim != 2:
                raise ValueError(f"altlora: LoRA factor {name} has no 2-D partner {partner_name}")
            if kind not in active:
                out[name] = torch.zeros_like(grad)
                continue
            value, partner = params[name].to(dtype), params[partner_name].to(dtype)
            direction = factor_direction(kind, name, value, partner, grad.to(dtype))
            out[name] = direction.to(grad.dtype)
        return out

    return transform


@register_method("altlora")
class AltLora(PeftLoraMethod):
    description = (
        "AltLoRA: alternating A / B steps on least-squares-projected gradients, "
        "momentum kept in the low-rank space"
    )
    hyperparams_cls = AltLoraHyperparams

    def extra_lora_kwargs(self, hp: AltLoraHyperparams) -> dict[str, bool]:
        return {"use_rslora": hp.use_rslora}

    def build_optimizer(
        self, model: torch.nn.Module, lr: float, hp: AltLoraHyperparams, weight_decay: float = 0.0
    ) -> torch.optim.Optimizer:
        # The transform supplies the whole update direction; SGD only scales it by the
        # scheduled lr (and adds the harness's L2 weight decay).
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    def gradient_transform(self, hp: AltLoraHyperparams) -> GradientTransform:
        return altlora_transform(
            hp.beta1, hp.precond_damping, hp.alternate_every, hp.alternate, hp.bias_correction
        )
