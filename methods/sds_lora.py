"""SDS-LoRA (Oh, Baik, Lee 2026, arXiv 2606.16454): Structurally Decoupled Singular values.

Parameterisation (paper Eq. 5, spec `specs/methods.md`): per target layer W0 (m, n),
    W = W0 + s (B Q_A^T + Q_B A),      B (m, r), A (r, n) trainable,
where Q_B (m, r) is an orthonormal basis of col(B) (QR of B) and Q_A (n, r) one of row(A)
(QR of A^T). The bases are buffers, constants in backward, so (Eq. 6, with G = dL/dW)
    dL/dB = s G Q_A,   dL/dA = s Q_B^T G:
B's and A's singular values never scale the gradient, while the forward still represents
any rank-r matrix (svd_r = U S V^T is B = U S/(2s), A = S V^T/(2s), Q_B = U, Q_A = V).
Scaling: s = alpha / sqrt(r) with alpha = 4, as the paper uses for every method but plain
LoRA ("following rsLoRA").

Training procedure (paper Sec. 3.3 "Training Procedure", Algorithm 1; our reading):
- Warm-up: the first T_w optimizer steps (paper T_w = 10) are standard LoRA, W0 + s B A,
  with peft's init (A Kaiming-uniform, B = 0), because Q_B is undefined for B = 0. After
  step T_w, svd_r(s B A) = U S V^T (exact, via QR of B and A^T and an r x r SVD, in
  float64) and Eq. 8: Q_B = U, Q_A = V, B = U S/(2s), A = S V^T/(2s); the function is
  unchanged (s (B Q_A^T + Q_B A) = U S V^T = s B A). Then "we reset all optimizer
  states": every parameter's AdamW state (moments and step counter) is dropped, the head's
  included (its moments are still meaningful, but the paper resets all, and its LLM runs
  train nothing but the adapters). The LR schedule is not restarted.
- Refresh: Q_B, Q_A are recomputed from the current B, A on the phased schedule: with T
  the total number of optimizer steps, step t (1-based, the harness's count, warm-up
  included) is in phase k = ceil(K t / T) and the bases are refreshed after step t iff
  t mod k == 0 ("training is divided into K phases, with the update interval in the k-th
  phase set to k"). The refreshed fraction of steps is H_K / K (harmonic number): 0.61,
  0.52, 0.46, 0.41, 0.37 for K = 3..7, exactly Table 7's column; K = 5 is the default.
  Warm-up: the phases span the whole run [1, T] (the paper's t and T are the global
  iteration and the total); no refresh fires at t <= T_w (there are no bases yet, and the
  reparameterisation after step T_w sets them). Phase 1 refreshes every step anyway, so
  this only removes T_w of its T/K candidate refreshes. The refreshed fraction we report
  is (refreshes after steps t > T_w) / T: 447/1000 = 0.447 at T = 1000, K = 5, T_w = 10
  (0.448 if the reparameterisation at T_w is counted as one), against Table 7's 0.46 =
  H_5/5, which counts every step of [1, T]. `refresh_interval` gives Table 7's
  uniform ablation schedule instead (every k-th step: fractions 1, 0.5, 0.33).
- What a refresh does to the function: the paper keeps B and A and only replaces the bases,
  so the function changes by s (B dQ_A^T + dQ_B A): its Eq. 7 term "arising from the
  change in Q_A and Q_B", argued negligible because the subspaces move slowly (App. D,
  Assumption B.3). An exactly function-preserving refresh is impossible in general: between
  refreshes col(B) drifts away from col(Q_B), so B Q_A^T + Q_B A has rank up to 2r, while
  right after any refresh (Q_B spanning col(B), Q_A spanning row(A)) the update has rank
  <= r. What *can* be avoided is change that is not subspace change: a QR basis is only
  defined up to a rotation within the subspace (LAPACK's Householder QR even flips column
  signs arbitrarily: Q_B A would jump by up to the whole update, e.g. at the first refresh
  after Eq. 8 sets Q_B = U). So the default `refresh_basis = "procrustes"` takes, among all
  orthonormal bases of col(B), the one closest to the old Q_B (orthogonal Procrustes:
  Q = qr(B).Q, Q_B <- Q P with P the polar factor of Q^T Q_B_old; likewise Q_A), and B, A
  and their optimizer states are left alone. If the subspaces did not move the function is
  exactly unchanged; otherwise the change is the paper's subspace term only.
  `refresh_basis = "qr"` is the literal reading: Q of the QR with a positive diagonal of R
  (the unique, continuous Gram-Schmidt convention; it reproduces Q_B = U right after Eq. 8),
  which also rotates the basis within the subspace as B moves.

Implementation: a plug-in adapter (methods/plugin_adapter.py: `inject`, `save_adapter` /
`load_adapter` as a peft-style folder, `merge_and_unload`), not a peft LoRA variant: peft
0.21 selects variants from `LoraConfig` dataclass fields (`LoraLayer.resolve_lora_variant`),
so a new variant needs a forked config, and peft's state-dict filter would not save the Q
buffers. The adapter path is one rank-2r product,
s x [Q_A, A^T] [B, Q_B]^T, in a custom autograd function whose backward computes exactly
dL/dB = s G Q_A, dL/dA = s Q_B^T G and dL/dx (no gradient for the bases, nothing else
saved but x and the (N, r) product x Q_A, as LoRA saves x A^T). QR and SVD run only at the
reparameterisation and on refresh steps, batched over layers of the same shape. Paper cost
(Table 6): +4-5% time, +0.5-0.8% memory over LoRA; `harness/bench/sds_lora_step.py` measures ours.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods.base import LocalParamAccess, ParamAccess, PrepareContext, TrainCallback
from methods.peft_lora import LoraHyperparams
from methods.plugin_adapter import AdapterLayer, PluginAdapterMethod
from methods.registry import register_method

PEFT_TYPE = "SDS_LORA"


class SdsLoraHyperparams(LoraHyperparams):
    rank: int = Field(8, gt=0, description="adapter rank r (paper: 8 and 32)")
    alpha: float = Field(
        4.0, gt=0, description="scaling s = alpha / sqrt(r) (rsLoRA-style; paper alpha = 4)"
    )
    warmup_steps: int = Field(
        10, gt=0, description="T_w: standard-LoRA steps before the SDS reparameterisation (10)"
    )
    refresh_phases: int = Field(
        5, gt=0, description="K: K equal phases, bases refreshed every k-th step in phase k (5)"
    )
    refresh_interval: int | None = Field(
        None, gt=0, description="uniform schedule (Table 7 ablation) instead; None = phased"
    )
    refresh_basis: Literal["procrustes", "qr"] = Field(
        "procrustes",
        description="refreshed basis of the same subspace col(B) / row(A): closest to the "
        "old one (default) or the paper's plain QR (R_ii > 0); they differ by a rotation only",
    )


def scaling_of(hp: SdsLoraHyperparams) -> float:
    return hp.alpha / math.sqrt(hp.rank)


# ---------------------------------------------------------------- the adapter layer


class _SdsDelta(torch.autograd.Function):
    """s (x Q_A B^T + x A^T Q_B^T) as one rank-2r product; Q_A, Q_B constant in backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, lora_B, lora_A, q_B, q_A, scaling: float):
        r = lora_A.shape[0]
        down = torch.cat([q_A.mT, lora_A])  # (2r, n): rows Q_A^T then A
        up = torch.cat([lora_B, q_B], dim=1) * scaling  # (m, 2r)
        h = F.linear(x, down)  # (..., 2r) = [x Q_A, x A^T]
        ctx.save_for_backward(x, h[..., :r].contiguous(), lora_B, lora_A, q_B, q_A)
        ctx.scaling = scaling
        return F.linear(h, up)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, h_qa, lora_B, lora_A, q_B, q_A = ctx.saved_tensors
        s, r = ctx.scaling, lora_A.shape[0]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, m)
        need_x, need_B, need_A = ctx.needs_input_grad[:3]
        grad_x = grad_B = grad_A = None
        if need_x or need_A:
            gh = g @ (torch.cat([lora_B, q_B], dim=1) * s)  # (N, 2r) = s [g B, g Q_B]
            if need_x:
                grad_x = (gh @ torch.cat([q_A.mT, lora_A])).reshape(x.shape)
            if need_A:
                grad_A = gh[:, r:].mT @ x.reshape(-1, x.shape[-1])  # s Q_B^T g^T x
        if need_B:
            grad_B = (g.mT @ h_qa.reshape(-1, r)).mul_(s)  # s g^T x Q_A
        return grad_x, grad_B, grad_A, None, None, None


class SdsLoraLinear(AdapterLayer):
    """base(x) + s B A x during warm-up, then base(x) + s (B Q_A^T + Q_B A) x.

    B (out, r) and A (r, in) are parameters; Q_B (out, r) and Q_A (in, r) are buffers
    (saved with the adapter, never trained). `reparameterized` says which form is active.
    """

    peft_type = PEFT_TYPE
    adapter_tensor_names = ("lora_A", "lora_B", "sds_QA", "sds_QB")

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.rank = rank
        self.scaling = scaling
        self.reparameterized = False
        dtype, device = base.weight.dtype, base.weight.device
        m, n = base.out_features, base.in_features
        self.lora_A = nn.Parameter(torch.empty(rank, n, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default LoRA init
        self.register_buffer("sds_QB", torch.zeros(m, rank, dtype=dtype, device=device))
        self.register_buffer("sds_QA", torch.zeros(n, rank, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, reparameterized={self.reparameterized}"

    def delta_weight(self) -> torch.Tensor:
        if not self.reparameterized:
            return self.scaling * self.lora_B @ self.lora_A
        return self.scaling * (self.lora_B @ self.sds_QA.mT + self.sds_QB @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        xd = self.lora_dropout(x).to(self.lora_A.dtype)
        if not self.reparameterized:
            delta = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
        else:
            delta = _SdsDelta.apply(
                xd, self.lora_B, self.lora_A, self.sds_QB, self.sds_QA, self.scaling
            )
        return out + delta.to(out.dtype)

    def adapter_config(self) -> dict[str, Any]:
        return {
            "r": self.rank,
            "scaling": self.scaling,
            "lora_dropout": getattr(self.lora_dropout, "p", 0.0),
            "reparameterized": self.reparameterized,  # the save refuses a model in both forms
        }

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any]) -> Self:
        layer = cls(base, config["r"], config["scaling"], config["lora_dropout"])
        layer.reparameterized = bool(config["reparameterized"])
        return layer

    @staticmethod
    def trainable_params(base: nn.Linear, rank: int) -> int:
        # B (m, r) and A (r, n) train: r (m + n), as LoRA; Q_B, Q_A are buffers.
        return rank * (base.in_features + base.out_features)


# The adapter API of these layers, as module functions (`save_adapter(model, dir,
# modules_to_save=...)` also saves the task head).
inject = SdsLoraLinear.inject  # (model, layer names, rank, scaling, dropout=0.0)
adapter_layers = SdsLoraLinear.layers_in
save_adapter = SdsLoraLinear.save
load_adapter = SdsLoraLinear.load
merge_and_unload = SdsLoraLinear.merge_and_unload


# ---------------------------------------------------------------- reparameterisation, refresh


def _positive_qr(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR (batched) with diag(R) >= 0: the unique, continuous (Gram-Schmidt) one."""
    q, r = torch.linalg.qr(mat)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2), r * sign.unsqueeze(-1)


def sds_factors(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float):
    """Eq. 8 for (batched) B (..., m, r), A (..., r, n): svd_r(s B A) = U S V^T ->
    (B', A', Q_B, Q_A) = (U S/(2s), S V^T/(2s), U, V), computed in float64 without forming
    the m x n product (QR of B and A^T, then the SVD of the r x r core)."""
    q_b, r_b = torch.linalg.qr(lora_B.double())
    q_a, r_a = torch.linalg.qr(lora_A.double().mT)
    u, sv, vh = torch.linalg.svd(scaling * r_b @ r_a.mT)
    left, right = q_b @ u, q_a @ vh.mT  # U (..., m, r), V (..., n, r)
    half = sv / (2 * scaling)
    return left * half.unsqueeze(-2), half.unsqueeze(-1) * right.mT, left, right


def orthonormal_basis(
    mat: torch.Tensor, previous: torch.Tensor | None = None, mode: str = "procrustes"
) -> torch.Tensor:
    """An orthonormal basis (..., d, r) of the column space of mat (..., d, r).

    "qr": Q of the QR with diag(R) >= 0. "procrustes": of all orthonormal bases of that
    space, the one closest (Frobenius) to `previous`: Q P with P = polar(Q^T previous).
    """
    q, _ = _positive_qr(mat.float())
    if mode == "qr" or previous is None:
        return q
    if mode != "procrustes":
        raise ValueError(f"unknown refresh basis {mode!r}")
    u, _, vh = torch.linalg.svd(q.mT @ previous.float())
    return q @ (u @ vh)


def _groups(layers: Iterable[SdsLoraLinear], access: ParamAccess) -> list[list[SdsLoraLinear]]:
    """Layers of one shape, scaling, dtype and device, so QR/SVD run batched per group."""
    groups: dict[tuple, list[SdsLoraLinear]] = defaultdict(list)
    for layer in layers:
        b = layer.lora_B
        shape = (tuple(access.shape(b)), tuple(access.shape(layer.lora_A)))
        groups[(shape, layer.scaling, b.dtype, b.device)].append(layer)
    return list(groups.values())


def _local(access: ParamAccess | None) -> ParamAccess:
    # Outside a training loop (tests, tools) there is no optimizer state to reset.
    return access if access is not None else LocalParamAccess(torch.optim.SGD([torch.zeros(1)]))


@torch.no_grad()
def reparameterize(layers: Iterable[SdsLoraLinear], access: ParamAccess | None = None) -> int:
    """Warm-up LoRA -> SDS form (Eq. 8), function unchanged; returns how many layers.

    Parameters are read and written through `access` (collective under ZeRO; the bases are
    buffers, replicated, so every rank computes and stores the same ones)."""
    access = _local(access)
    todo = [layer for layer in layers if not layer.reparameterized]
    for group in _groups(todo, access):
        b, a, q_b, q_a = sds_factors(
            torch.stack([access.read(layer.lora_B) for layer in group]),
            torch.stack([access.read(layer.lora_A) for layer in group]),
            group[0].scaling,
        )
        updates = []
        for i, layer in enumerate(group):
            updates += [(layer.lora_B, b[i]), (layer.lora_A, a[i])]
            layer.sds_QB.copy_(q_b[i])
            layer.sds_QA.copy_(q_a[i])
            layer.reparameterized = True
        access.write(updates)
    return len(todo)


@torch.no_grad()
def refresh_bases(
    layers: Iterable[SdsLoraLinear], mode: str = "procrustes", access: ParamAccess | None = None
) -> int:
    """Q_B <- basis of col(B), Q_A <- basis of row(A); B and A untouched. Returns count."""
    access = _local(access)
    active = [layer for layer in layers if layer.reparameterized]
    for group in _groups(active, access):
        q_b = orthonormal_basis(
            torch.stack([access.read(layer.lora_B) for layer in group]),
            torch.stack([layer.sds_QB for layer in group]),
            mode,
        )
        q_a = orthonormal_basis(
            torch.stack([access.read(layer.lora_A).mT for layer in group]),
            torch.stack([layer.sds_QA for layer in group]),
            mode,
        )
        for i, layer in enumerate(group):
            layer.sds_QB.copy_(q_b[i])
            layer.sds_QA.copy_(q_a[i])
    return len(active)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Drop every parameter's state (AdamW: moments and step); it is re-created lazily."""
    LocalParamAccess(optimizer).reset_optimizer_state()


# ---------------------------------------------------------------- the schedule


def refresh_fires(
    step: int,
    total_steps: int,
    phases: int,
    warmup_steps: int,
    interval: int | None = None,
) -> bool:
    """Whether the bases are refreshed after optimizer step `step` (1-based).

    Phased (paper): phase k = ceil(K t / T), refresh iff t mod k == 0; never during warm-up
    (t <= T_w). Steps past T (should the loop run longer) stay in phase K.
    """
    if step <= warmup_steps:
        return False
    if interval is None:
        interval = min(phases, max(1, -(-phases * step // total_steps)))
    return step % interval == 0


def refresh_steps(
    total_steps: int, phases: int, warmup_steps: int, interval: int | None = None
) -> list[int]:
    return [
        t
        for t in range(1, total_steps + 1)
        if refresh_fires(t, total_steps, phases, warmup_steps, interval)
    ]


class SdsSchedule(TrainCallback):
    """The training callback: reparameterise after step T_w, refresh on the schedule.

    `events` records (step, "reparameterize" | "refresh") for inspection and logs.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        phases: int,
        interval: int | None = None,
        basis: str = "procrustes",
    ) -> None:
        if total_steps < 1 or warmup_steps < 1 or phases < 1:
            raise ValueError("total_steps, warmup_steps and phases must be >= 1")
        if warmup_steps >= total_steps:
            warnings.warn(
                f"sds_lora: warm-up ({warmup_steps} steps) covers the whole run "
                f"({total_steps} steps); this trains plain LoRA",
                stacklevel=2,
            )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.phases = phases
        self.interval = interval
        self.basis = basis
        self.events: list[tuple[int, str]] = []
        self._layers: tuple[int, list[SdsLoraLinear]] | None = None

    def layers(self, model: nn.Module) -> list[SdsLoraLinear]:
        if self._layers is None or self._layers[0] != id(model):
            self._layers = (id(model), list(adapter_layers(model).values()))
        return self._layers[1]

    def on_step_end(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        access: ParamAccess | None = None,
    ) -> None:
        access = access if access is not None else LocalParamAccess(optimizer)
        if step == self.warmup_steps:
            if reparameterize(self.layers(model), access):
                access.reset_optimizer_state()
                self.events.append((step, "reparameterize"))
        elif refresh_fires(step, self.total_steps, self.phases, self.warmup_steps, self.interval):
            refresh_bases(self.layers(model), self.basis, access)
            self.events.append((step, "refresh"))

    def preserves_function(self, step: int) -> bool:
        """The reparameterisation (Eq. 8) keeps the function; a basis refresh does not."""
        return step == self.warmup_steps

    def on_restore(self, step: int, model: nn.Module) -> None:
        """A run resumed from a checkpoint after `step`: the bases come back with the
        buffers, the form (warm-up LoRA or SDS) is set from the schedule."""
        for layer in self.layers(model):
            layer.reparameterized = step >= self.warmup_steps


# ---------------------------------------------------------------- the method


@register_method("sds_lora")
class SdsLora(PluginAdapterMethod):
    description = (
        "SDS-LoRA: W0 + s(B Q_A^T + Q_B A), orthonormal bases constant in backward; "
        "LoRA warm-up, then phased basis refresh. Refresh basis default 'procrustes': the "
        "same subspaces col(B), row(A) as the paper's QR, only the rotation within them "
        "differs (kept closest to the old basis). Refresh fraction = refreshes after steps "
        "t > T_w over T (warm-up excluded: 0.447 at T=1000, K=5, T_w=10; Table 7's H_K/K = "
        "0.46 counts all T steps). ViT: q and v only, as the paper"
    )
    hyperparams_cls = SdsLoraHyperparams
    callbacks_support_zero = True  # the schedule goes through ParamAccess
    layer_cls = SdsLoraLinear  # its own init is the method's: peft's warm-up LoRA init
    official_targets = {"vit": ["q_proj", "v_proj"]}  # the paper adapts ViT's q and v only

    def scaling(self, hp: SdsLoraHyperparams) -> float:
        return scaling_of(hp)

    def make_layer(self, base: nn.Linear, hp: SdsLoraHyperparams) -> SdsLoraLinear:
        return SdsLoraLinear(base, hp.rank, self.scaling(hp), hp.dropout)

    def callbacks(self, hp: SdsLoraHyperparams, total_steps: int) -> list[TrainCallback]:
        return [
            SdsSchedule(
                total_steps,
                hp.warmup_steps,
                hp.refresh_phases,
                hp.refresh_interval,
                hp.refresh_basis,
            )
        ]

    def starts_at_base(self, hp: SdsLoraHyperparams) -> bool:
        return True  # warm-up LoRA with B = 0

    def resolved_config(self, hp: SdsLoraHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        return {
            **super().resolved_config(hp, ctx),
            "scaling": scaling_of(hp),
            "schedule": (
                f"uniform every {hp.refresh_interval}"
                if hp.refresh_interval
                else f"phased K={hp.refresh_phases}: refresh after t iff t % ceil(K t/T) == 0"
            ),
        }
