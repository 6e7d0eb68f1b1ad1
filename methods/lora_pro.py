"""LoRA-Pro (Wang, Liang, He, Wang & Tan, ICLR 2025, arXiv 2407.18242): LoRA whose A and B
gradients are adjusted so that the weight update they imply best approximates full fine-tuning.

A plain peft LoRA adapter (peft's default init: Kaiming-uniform A, B = 0, so training starts
at W0); W = W0 + s B A with A: r x n, B: m x r. Notation: g_A = s B^T g and g_B = s g A^T are
the LoRA gradients a full-weight gradient g (m x n) induces.

The mathematics (the paper's Sec. 2; the full text is not in shared/papers, so the equations
are the official code's, re-derived here and checked in tests/test_lora_pro.py):
- Equivalent gradient (the paper's Definition): adjusted gradients g_A', g_B' move W by
  -lr * g~ with g~ = s (B g_A' + g_B' A), to first order.
- Optimal adjustment (the paper's Theorem on min ||g~ - g||_F): with P = (B^T B)^-1,
  Q = (A A^T)^-1 and any r x r matrix X,
      g_A' = (1/s^2) P g_A + X A,
      g_B' = (1/s^2) (I - B P B^T) g_B Q - B X,
  and then g~ = P_B g + g P_A - P_B g P_A (P_B = B P B^T, P_A = A^T Q A): the orthogonal
  projection of g onto {B Y + Z A}, the best approximation the factors allow; X cancels in g~.
- The free X (the paper's next Theorem): the X that keeps g_A', g_B' closest to g_A, g_B
  (min ||g_A' - g_A||^2 + ||g_B' - g_B||^2) solves the Sylvester equation
      B^T B X + X A A^T = -(1/s^2) P g_A A^T
  (setting the derivative in X to zero, using B^T (I - B P B^T) = 0 and B^T g_B = g_A A^T).
  Solved here by the eigendecompositions of the two symmetric PSD r x r matrices; where a
  pair of eigenvalues sums to ~0 (B = 0 and A rank-deficient) the minimum-norm solution.

Two variants, `full_momentum`:
- True (the default; the paper's Algorithm and the only path of the official code,
  DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py `lorapro_full_adjustment`, called
  in `step()` before the optimizer; scripts/llama-2-7b_transformers.sh `--lora lora-pro-full`,
  Trainer `optim="sgd"`): per layer, (1) g~ from the raw g_A, g_B (X = 0: it cancels),
  (2) full-size Adam moments M, V of g~ (m x n each: AdamW of full fine-tuning on the
  equivalent gradient), (3) G = M^ / (sqrt(V^) + eps), (4) g_A = s B^T G, g_B = s G A^T,
  (5) adjusted g_A', g_B' with the Sylvester X, (6) SGD: A -= lr g_A', B -= lr g_B'. The state
  is not a pure function of one step's full tensors, so this is a torch optimizer
  (`LoraProAdamW`, `build_optimizer`); DeepSpeed ZeRO would hand it flat partitions of A and B,
  so harness.spec.config refuses it under ZeRO (`zero_unsupported_reason`).
- False (SDS-LoRA, the paragraph on Table 4: "LoRA-Pro without tracking the momentum of full
  fine-tuning gradients"): the optimal adjustment (with the Sylvester X) of each step's raw
  gradients, then plain torch AdamW on A and B. A pure `gradient_transform`, so it runs on one
  device and under ZeRO (applied to assembled full gradients at the accumulation boundary,
  harness.deepspeed.engine.ClipAndTransform).

Every place this differs from the official code:
- Adam bias correction uses step t (1, 2, ...); the official increments `global_step` before
  `lorapro_full_adjustment` and then uses `step = global_step + 1`, i.e. t + 1 (first update
  0.74 sign(g~) instead of sign(g~)). The same off-by-one makes its `global_step == 0` branch
  (B = 0 handling: g_A kept, no X) dead code; at B = 0 the general formulas give the same
  result (g_A' = 0, X = 0, g_B' = (1/s^2) g_B Q), tested.
- V is accumulated in fp32; the official multiplies g~ * g~ in bf16 (`addcmul_` on bf16 casts)
  after a fp32 first step. Everything is computed in at least fp32 (official: the LoRA
  modules are cast to fp32 too).
- s is the adapter's scaling (alpha / r, or alpha / sqrt(r) with `use_rslora`); the official
  hard-codes `scaling_factor = 16 / 8` whatever the config (= ours at its r = 8, alpha = 16).
- Pairs are found by name (`.lora_A.` / `.lora_B.`); the official pairs the partition's
  gradients by position (A, B, A, B, ...), which assumes only LoRA factors are trainable.
  Other trainables (the task head) get torch-AdamW updates from the same moments' constants
  (their equivalent gradient is their gradient: full fine-tuning's AdamW); the official run
  has none (its SGD would train them with raw gradients).
- Clipping: the harness clips the raw gradients (max_grad_norm) before the optimizer; the
  official computes the clip coefficient from the raw gradients' norm but applies it to the
  final adjusted SGD direction. Weight decay (official 0, HF SGD's coupled L2) is decoupled
  here, p <- p (1 - lr wd) on A and B, as torch AdamW.
- The Sylvester solve uses `eigh` of the symmetric PSD coefficients (official: the general
  complex `torch.linalg.eig`, with inverse of the eigenvector matrix); same solution when
  unique. The (B^T B + delta I)^+ and (A A^T + delta I)^+ pseudo-inverses and delta = 1e-8
  (`damping`) are the official's; the projection I - B P B^T is applied without forming the
  m x m matrix.
- Adam constants beta = (0.9, 0.999), eps = 1e-8 are the official's hard-coded values
  (`betas`, `eps` of `LoraProAdamW`; not hyperparameters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from methods.base import GradientTransform
from methods.peft_lora import LoraHyperparams, PeftLoraMethod
from methods.registry import register_method


class LoraProHyperparams(LoraHyperparams):
    full_momentum: bool = Field(
        True,
        description="Adam moments of the full equivalent gradient (official); False = SDS-LoRA's "
        "'without tracking the momentum': adjusted gradients into plain AdamW",
    )
    use_rslora: bool = Field(
        False, description="s = alpha/sqrt(r); else alpha/r (official lora-pro-full: alpha/r)"
    )
    damping: float = Field(
        1e-8, ge=0, description="delta in (B^T B + delta I)^+, (A A^T + delta I)^+ (official 1e-8)"
    )


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's s: alpha / sqrt(r) (rsLoRA) or alpha / r."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def damped_pinv(gram: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return torch.linalg.pinv(gram + damping * eye)


def solve_sylvester_psd(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric PSD P, Q (r x r): with P = U diag(l) U^T and
    Q = V diag(m) V^T, X = U [(U^T C V)_ij / (l_i + m_j)] V^T. Entries whose l_i + m_j is
    ~0 (relative to the largest) are set to 0: the minimum-norm least-squares solution."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    denom = lam.clamp(min=0)[:, None] + mu.clamp(min=0)[None, :]
    tol = denom.max() * max(denom.shape) * torch.finfo(denom.dtype).eps
    f = u.T @ c @ v
    safe = torch.where(denom > tol, denom, torch.ones_like(denom))
    y = torch.where(denom > tol, f / safe, torch.zeros_like(f))
    return u @ y @ v.T


def optimal_lora_gradients(
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    damping: float,
    free_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LoRA-Pro's adjusted (g_A', g_B') from the LoRA gradients (g_A, g_B), and X.

    g_A' = (1/s^2) P g_A + X A, g_B' = (1/s^2) (I - B P B^T) g_B Q - B X with
    P = (B^T B + damping I)^+, Q = (A A^T + damping I)^+ and X the Sylvester solution of
    B^T B X + X A A^T = -(1/s^2) P g_A A^T (`free_x`; else X = 0, which leaves the equivalent
    gradient unchanged). Inputs in one float dtype (>= fp32)."""
    btb, aat = b.T @ b, a @ a.T
    p_inv, q_inv = damped_pinv(btb, damping), damped_pinv(aat, damping)
    inv_s2 = 1.0 / scaling**2
    new_a = inv_s2 * (p_inv @ grad_a)
    projected_b = grad_b - b @ (p_inv @ (b.T @ grad_b))  # (I - B P B^T) g_B, no m x m matrix
    new_b = inv_s2 * (projected_b @ q_inv)
    if not free_x:
        return new_a, new_b, None
    x = solve_sylvester_psd(btb, aat, -new_a @ a.T)
    return new_a + x @ a, new_b - b @ x, x


def equivalent_gradient(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """g~ = s (B g_A + g_B A): the full-weight gradient whose SGD step equals the LoRA step."""
    return scaling * (b @ grad_a + grad_b @ a)


def _pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    names = set(names)
    return sorted(
        (n, n.replace(".lora_A.", ".lora_B."))
        for n in names
        if ".lora_A." in n and n.replace(".lora_A.", ".lora_B.") in names
    )


def lora_pro_transform(alpha: float, use_rslora: bool, damping: float) -> GradientTransform:
    """SDS-LoRA's LoRA-Pro: every LoRA pair's gradients -> `optimal_lora_gradients` (with the
    Sylvester X), s from alpha and the pair's rank (A's rows). Other trainables unchanged."""

    def transform(params, grads) -> dict[str, torch.Tensor]:
        rewritten: dict[str, torch.Tensor] = {}
        for name_a, name_b in _pairs(params):
            if params[name_a].ndim != 2 or name_a not in grads or name_b not in grads:
                continue
            dtype = torch.promote_types(params[name_a].dtype, torch.float32)
            a, b = params[name_a].to(dtype), params[name_b].to(dtype)
            scaling = lora_scaling(alpha, a.shape[0], use_rslora)
            new_a, new_b, _ = optimal_lora_gradients(
                a, b, grads[name_a].to(dtype), grads[name_b].to(dtype), scaling, damping
            )
            rewritten[name_a] = new_a.to(grads[name_a].dtype)
            rewritten[name_b] = new_b.to(grads[name_b].dtype)
        return rewritten

    return transform


class LoraProAdamW(torch.optim.Optimizer):
    """The official LoRA-Pro step (full-gradient momentum), one torch optimizer.

    `pairs`: (A, B, s) per LoRA layer, each A and B also in `params`. Per pair: Adam moments
    (fp32, m x n, kept in `state[A]`) of the equivalent gradient of the X-free adjusted raw
    gradients, then the Sylvester-adjusted gradients of the Adam direction, applied by SGD
    (after decoupled weight decay). Every other parameter: torch AdamW with the same
    constants. The group's `lr` is read at each step (LR schedulers work)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        pairs: list[tuple[nn.Parameter, nn.Parameter, float]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = 1e-8,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(list(params), defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LoraProAdamW takes one parameter group")
        members = {id(p) for p in self.param_groups[0]["params"]}
        for a, b, _ in pairs:
            if id(a) not in members or id(b) not in members:
                raise ValueError("every LoRA factor of `pairs` must be among `params`")
        self.pairs = pairs
        self.damping = damping

    @staticmethod
    def _adam_direction(state: dict[str, Any], grad: torch.Tensor, betas, eps) -> torch.Tensor:
        """Update the moments with `grad`; return M^ / (sqrt(V^) + eps) (torch Adam's)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        t, (beta1, beta2) = state["step"], betas
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        return (state["exp_avg"] / (1 - beta1**t)) / denom

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, wd, betas, eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        in_pairs: set[int] = set()
        updates: list[tuple[nn.Parameter, torch.Tensor]] = []
        for a_param, b_param, scaling in self.pairs:
            in_pairs.update((id(a_param), id(b_param)))
            if a_param.grad is None and b_param.grad is None:
                continue
            dtype = torch.promote_types(a_param.dtype, torch.float32)
            a, b = a_param.detach().to(dtype), b_param.detach().to(dtype)
            grad_a = torch.zeros_like(a) if a_param.grad is None else a_param.grad.to(dtype)
            grad_b = torch.zeros_like(b) if b_param.grad is None else b_param.grad.to(dtype)
            adj_a, adj_b, _ = optimal_lora_gradients(
                a, b, grad_a, grad_b, scaling, self.damping, free_x=False
            )
            full = equivalent_gradient(a, b, adj_a, adj_b, scaling)
            direction = self._adam_direction(self.state[a_param], full, betas, eps)
            new_a, new_b, _ = optimal_lora_gradients(
                a, b, scaling * (b.T @ direction), scaling * (direction @ a.T), scaling,
                self.damping,
            )  # fmt: skip
            updates.append((a_param, a * (1 - lr * wd) - lr * new_a))
            updates.append((b_param, b * (1 - lr * wd) - lr * new_b))
        for p in group["params"]:
            if id(p) in in_pairs or p.grad is None:
                continue
            grad = p.grad.to(torch.promote_types(p.dtype, torch.float32))
            direction = self._adam_direction(self.state[p], grad, betas, eps)
            updates.append((p, p.detach().to(grad.dtype) * (1 - lr * wd) - lr * direction))
        for p, value in updates:
            p.copy_(value.to(p.dtype))
        return loss


@register_method("lora_pro")
class LoraPro(PeftLoraMethod):
    description = "LoRA-Pro: A/B gradients adjusted so the equivalent gradient best fits full FT"
    hyperparams_cls = LoraProHyperparams

    def extra_lora_kwargs(self, hp: LoraProHyperparams) -> dict[str, Any]:
        return {"use_rslora": hp.use_rslora}

    def build_optimizer(
        self, model: nn.Module, lr: float, hp: LoraProHyperparams, weight_decay: float = 0.0
    ) -> torch.optim.Optimizer:
        if not hp.full_momentum:  # SDS-LoRA's variant: the transform, then plain AdamW
            return super().build_optimizer(model, lr, hp, weight_decay)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        pairs = [
            (named[a], named[b], lora_scaling(hp.alpha, named[a].shape[0], hp.use_rslora))
            for a, b in _pairs(named)
        ]
        return LoraProAdamW(
            named.values(), pairs, lr=lr, weight_decay=weight_decay, damping=hp.damping
        )

    def gradient_transform(self, hp: LoraProHyperparams) -> GradientTransform | None:
        if hp.full_momentum:  # the adjustment lives inside LoraProAdamW.step
            return None
        return lora_pro_transform(hp.alpha, hp.use_rslora, hp.damping)

    def zero_unsupported_reason(self, hp: LoraProHyperparams) -> str | None:
        """Read by harness.spec.config.zero_unsupported_reason."""
        if not hp.full_momentum:
            return None
        return (
            "full_momentum keeps full-size (m x n) Adam moments of each layer's equivalent "
            "gradient inside its own optimizer (LoraProAdamW), which needs whole A and B "
            "matrices; ZeRO hands the optimizer flat partitions. Use full_momentum: false "
            "(a gradient transform) under DeepSpeed"
        )
