"""K-FAC curvature statistics of linear layers, label-free, for curvature-aware LoRA inits.

Used by CG-LoRA (methods/cg_lora.py); nothing in here is specific to it.

What is collected, per target `nn.Linear` with weight (m, n) = (out, in):
- `A_in = E[x x^T]` (n, n) and `S = E[g g^T]` (m, m), with x the layer input and g the
  pre-activation derivative (gradient of a scalar with respect to the layer output). Under
  weight sharing (a sequence of tokens through one layer) K-FAC-reduce (Eschenhagen et al.
  2023): per example, x is *mean*-pooled and g *sum*-pooled over the valid tokens (padding,
  i.e. attention_mask == 0, is excluded), so `sum_t g_t x_t^T ~ (sum_t g_t)(mean_t x_t)^T`,
  exact when the tokens' inputs are equal. Global scalars (1/N, 1/R) never matter to CG-LoRA
  (it uses only eigenvectors and eigenvalue *ratios*), but per-example weights would, hence
  mean/sum pooling with per-example lengths rather than one global R.
- g without labels (CG-LoRA paper, App. B): one Hutchinson backward per example and sample
  from the model outputs f with a random vector e, E[e e^T] = H, the loss Hessian in f:
  squared loss: Rademacher e (H = I, so E[g g^T] = J^T J, the GGN); binary cross-entropy
  (independent sigmoids): e = sqrt(p (1 - p)) * Rademacher; softmax cross-entropy:
  e = sqrt(p) * z - p (sqrt(p) . z), z ~ N(0, I), a Gaussian with covariance
  Lambda = diag(p) - p p^T (centred: 1^T e = 0); token-level LM (logits (B, T, V)): the
  same per token, zero at positions whose label is -100 (causal LMs: logits[t] predicts
  labels[t + 1], so the last position and those before an ignored label are zero).
  The backward passes compute only activation gradients: every parameter is frozen for the
  duration, a zero scalar leaf is added to each target output that does not already require
  grad (`_Taps`), and autograd is asked for the gradient with respect to those leaves only,
  so it reaches every target output and forms no weight gradient (`.grad` is never
  touched). A target output the loss does not reach is an error, not a silent gap.

Degenerate factors: each factor also records its pooled energy sum_i |sum_t v_it|^2 and
per-token energy sum_i sum_t |v_it|^2 (two scalars, all-reduced with the row counts), so
`degenerate_factors` can tell a pooled factor that is pure round-off (attention keys without
rotary embeddings) against a scale round-off cannot reach.

Storage (the design choice): per layer, the pooled rows themselves, float32, X (N, n) and
Gs (N K, m) (K = Hutchinson samples), so `A_in v = X^T (X v) / N`; once a factor holds as
many rows as its dimension it folds them into the dense d x d Gram matrix (cheaper from there
on). Memory per factor is O(min(N, d) d): for the paper's 256 examples and RoBERTa-base's
768-wide layers, 0.8 MiB per factor. Keeping the rows (rather than accumulating sketches on
the fly) makes power iterations and the Rayleigh-Ritz step free (no extra forward/backward
pass, and all of them see the *same* Hutchinson draw, so the eigenbasis is that of one fixed
matrix); nothing of size (mn)^2 or m x n is ever formed.

Top eigenspaces: `randomized_eigh`, the randomized range finder with Rayleigh-Ritz (Halko,
Martinsson & Tropp 2011, alg. 4.4 + 5.3; Puiu 2022 for K-FAC): Omega (d, k + p) Gaussian,
Y = F Omega, q power iterations Y = F qr(Y), Q = qr(Y), eigh(Q^T F Q), top k. Matrix-vector
products are computed in float64 from the float32 rows.

Loss-gradient projections: `projected_gradients` returns U_S^T G U_A per layer from a second
pass with the bases known: G = sum over tokens of delta_t x_t^T (delta = dL/d output), so
U_S^T G U_A = sum_t (U_S^T delta_t)(U_A^T x_t)^T from per-token projections (forward hook
projects x, tensor hook projects delta); G itself is never formed.

Distributed: under torch.distributed every matrix-vector product, every row count and every
projected-gradient sum is all-reduced, and the sketch matrices come from a seeded generator,
so every rank computes the identical eigenbases and projections from all ranks' batches.
The Hutchinson draws are seeded per rank (seed, rank).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from methods.base import Batch, loss_weight, model_inputs
from methods.grad_estimator import is_distributed

LossKind = Literal["auto", "mse", "ce", "bce", "causal_lm", "token_ce"]
IGNORE_INDEX = -100


# ------------------------------------------------------------------ output noise (App. B)


def resolve_loss_kind(model: nn.Module, logits: torch.Tensor, labels, kind: LossKind) -> str:
    """The loss whose Hessian the Hutchinson vectors sample, as HF models choose their loss."""
    if kind != "auto":
        return kind
    config = getattr(model, "config", None)
    if logits.dim() == 3:
        if labels is None or labels.dim() != 2:
            raise ValueError("token-level logits need (B, T) labels to find the ignored tokens")
        return "token_ce" if getattr(config, "is_encoder_decoder", False) else "causal_lm"
    problem = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", logits.shape[-1])
    if problem == "regression" or (problem is None and num_labels == 1):
        return "mse"
    if problem == "multi_label_classification":
        return "bce"
    if problem is None and labels is not None and labels.is_floating_point():
        return "bce"  # HF's own rule for unset problem_type with float labels
    return "ce"


def _rademacher(shape, generator, device) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return bits.to(torch.float32) * 2 - 1


def output_noise(
    kind: str, logits: torch.Tensor, labels, generator: torch.Generator
) -> torch.Tensor:
    """e with E[e e^T] = the loss Hessian in the logits, per example (or per token), float32.

    Positions that do not enter the loss (label -100) get e = 0.
    """
    lf = logits.detach().float()
    if kind == "mse":
        e = _rademacher(lf.shape, generator, lf.device)
    elif kind == "bce":
        p = torch.sigmoid(lf)
        e = _rademacher(lf.shape, generator, lf.device).mul_(p.mul_(1 - p).sqrt_())
    elif kind in ("ce", "causal_lm", "token_ce"):
        # e = sqrt(p) z - p (sqrt(p) . z), in place: two vocabulary-sized buffers at a time
        root = torch.softmax(lf, dim=-1).sqrt_()
        e = torch.randn(lf.shape, generator=generator, device=lf.device).mul_(root)
        dot = e.sum(dim=-1, keepdim=True)  # sqrt(p) . z
        e.addcmul_(root.square_(), dot, value=-1)  # covariance diag(p) - p p^T
        del root
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    valid = None
    if kind == "causal_lm":
        valid = torch.zeros(lf.shape[:2], dtype=torch.bool, device=lf.device)
        valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    elif kind == "token_ce" or (labels is not None and labels.dim() == 1 and kind == "ce"):
        valid = labels != IGNORE_INDEX
    if valid is not None:
        e.mul_(valid.unsqueeze(-1).to(e.dtype))
    return e


# ------------------------------------------------------------------ factor storage


class FactorStat:
    """Sum of v v^T over pooled rows v (float32): the rows while fewer than the dimension,
    then the dense Gram matrix. `matmul` gives the local (this rank's) sum times V."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0  # local rows
        self._rows: list[torch.Tensor] = []
        self._gram: torch.Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self._gram is not None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float32).reshape(-1, self.dim)
        self.count += rows.shape[0]
        if self._gram is not None:
            self._gram.addmm_(rows.T, rows)
            return
        self._rows.append(rows)
        if self.count >= self.dim:  # rows would now cost more than the Gram matrix
            stacked = torch.cat(self._rows)
            self._rows.clear()
            self._gram = stacked.T @ stacked

    def _stacked(self) -> torch.Tensor | None:
        if len(self._rows) > 1:
            self._rows[:] = [torch.cat(self._rows)]
        return self._rows[0] if self._rows else None

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """(sum_i v_i v_i^T) @ v over the local rows, computed in v's dtype (float64)."""
        if self._gram is not None:
            return self._gram.to(v.dtype) @ v
        rows = self._stacked()
        if rows is None:
            return torch.zeros_like(v)
        rows = rows.to(v.dtype)
        return rows.T @ (rows @ v)

    def device(self) -> torch.device:
        if self._gram is not None:
            return self._gram.device
        rows = self._stacked()
        return rows.device if rows is not None else torch.device("cpu")

    def nbytes(self) -> int:
        if self._gram is not None:
            return self._gram.numel() * 4
        return sum(r.numel() * 4 for r in self._rows)


@dataclass
class Factor:
    """One K-FAC factor across ranks: F = (sum over all ranks' rows of v v^T) / total rows.

    `pooled_energy` = sum_i |sum_t v_it|^2 and `token_energy` = sum_i sum_t |v_it|^2 (valid
    tokens, all ranks, float64) compare the sum-pooled rows with the per-token ones of the
    same pass: see `pooling_ratio`.
    """

    stat: FactorStat
    total: int  # rows over all ranks
    pooled_energy: float = 1.0
    token_energy: float = 1.0

    @property
    def pooling_ratio(self) -> float:
        """|sum_t v_t|^2 / sum_t |v_t|^2 over all examples: about 1 for uncorrelated tokens,
        up to T for equal ones, 0 when an example's tokens cancel exactly (a K-FAC-reduce
        factor that is round-off, e.g. attention keys: see `degenerate_factors`)."""
        if self.token_energy <= 0:
            return 0.0
        return self.pooled_energy / self.token_energy

    @property
    def dim(self) -> int:
        return self.stat.dim

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.stat.matmul(v.to(self.stat.device()))
        if is_distributed():
            dist.all_reduce(out)
        return out / self.total

    def dense(self) -> torch.Tensor:
        return self.matvec(torch.eye(self.dim, dtype=torch.float64))


@dataclass
class KfacFactors:
    a_in: Factor  # E[x x^T], (n, n)
    s: Factor  # E[g g^T], (m, m)


# ------------------------------------------------------------------ hooks and masks


def _token_mask(name: str, x: torch.Tensor, masks: dict, enc_dec: bool) -> torch.Tensor | None:
    """(B, T) validity of the tokens of input x (B, T, n), or None when every token counts."""
    rows = masks.get("batch_size")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(
            f"layer {name}: input of shape {tuple(x.shape)} does not start with the batch "
            f"dimension {rows} (tokens flattened or unpadded?); K-FAC-reduce pools per example"
        )
    if x.dim() != 3:
        return None
    key = "encoder"
    if enc_dec and "decoder" in name.split("."):
        # cross-attention keys/values read the encoder's states
        cross_kv = (
            "EncDecAttention.k",
            "EncDecAttention.v",
            "encoder_attn.k_proj",
            "encoder_attn.v_proj",
        )
        key = "encoder" if name.endswith(cross_kv) else "decoder"
    mask = masks.get(key)
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"layer {name}: input tokens {tuple(x.shape[:2])} do not match the {key} mask "
            f"{tuple(mask.shape)}; K-FAC-reduce pooling cannot tell padding from tokens"
        )
    return mask.to(device=x.device, dtype=torch.float32)


def _batch_size(batch: Batch) -> int | None:
    for key in ("input_ids", "attention_mask", "pixel_values", "inputs_embeds", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _batch_masks(batch: Batch, enc_dec: bool) -> dict:
    masks: dict = {"encoder": batch.get("attention_mask"), "batch_size": _batch_size(batch)}
    if enc_dec:
        dec = batch.get("decoder_attention_mask")
        labels = batch.get("labels")
        if dec is None and labels is not None and labels.dim() == 2:
            dec = labels != IGNORE_INDEX
        masks["decoder"] = dec
    return masks


def pool_inputs(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean of x over its valid tokens (x (B, n) is returned as is)."""
    x = x.detach().to(torch.float32)
    if x.dim() == 2:
        return x
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is None:
        return x.mean(dim=1)
    weights = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


def pool_output_grads(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example sum of g over its valid tokens."""
    g = g.detach().to(torch.float32)
    if g.dim() == 2:
        return g
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    if mask is None:
        return g.sum(dim=1)
    return torch.bmm(mask.unsqueeze(1), g).squeeze(1)


def pooling_energies(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[sum_i |sum_t v_it|^2, sum_i sum_t |v_it|^2] over the valid tokens, float64 (2,).

    Summed in float32 (one activation-sized copy, as the pooling itself makes): for tokens
    that cancel exactly the pooled sum is then at most ~sqrt(T) float32 ulps of |v|, a ratio
    ~T 1e-14, far below the detection threshold (`degenerate_factors`)."""
    v = v.detach().to(torch.float32)
    if v.dim() == 2:
        energy = v.square().sum().double()
        return torch.stack([energy, energy])
    v = v.reshape(v.shape[0], -1, v.shape[-1])
    if mask is not None:
        v = v * mask.reshape(v.shape[0], -1, 1).to(torch.float32)
    return torch.stack([v.sum(dim=1).square().sum().double(), v.square().sum().double()])


class _FrozenForward:
    """Context: every parameter frozen, given train/eval mode, gradient checkpointing off
    (all restored after).

    Checkpointing (DeepSpeed trials enable it) re-runs each layer's forward inside the
    backward, and the forward hooks would record those recomputations as more calls (the
    activation statistics twice). The passes therefore hold one un-checkpointed
    micro-batch of activations (no weight gradients).
    """

    def __init__(self, model: nn.Module, train: bool) -> None:
        self.model, self.train = model, train

    def __enter__(self):
        self.flags = {p: p.requires_grad for p in self.model.parameters()}
        self.was_training = self.model.training
        # transformers' per-module switch (GradientCheckpointingLayer and older encoders).
        self.checkpointed = [
            m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False) is True
        ]
        for p in self.flags:
            p.requires_grad_(False)
        for m in self.checkpointed:
            m.gradient_checkpointing = False
        self.model.train(self.train)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
        for m in self.checkpointed:
            m.gradient_checkpointing = True
        self.model.train(self.was_training)
        return False


class _Taps:
    """Makes autograd reach every target output with all parameters frozen.

    Every tapped output gets a fresh zero scalar leaf added (`output + 0`, the same values).
    Asking autograd for the gradient with respect to the leaves then computes exactly the
    activation gradients on the way (no weight gradient), firing every hook. Each output
    needs its own leaf: one that requires grad for another reason (transformers' gradient
    checkpointing makes the embedding output require grad) may lead to no leaf, and autograd
    would prune its gradient. Calls are counted so that a hook that did not fire (an output
    the loss does not depend on) is an error, not a silent gap.
    """

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []
        self.calls: dict[str, int] = {}
        self.fired: dict[str, int] = {}

    def __call__(self, name: str, output: torch.Tensor, on_grad: Callable) -> torch.Tensor:
        self.calls[name] = self.calls.get(name, 0) + 1

        def counted(g: torch.Tensor) -> None:
            self.fired[name] = self.fired.get(name, 0) + 1
            on_grad(g)

        zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        self.leaves.append(zero)
        output = output + zero
        output.register_hook(counted)
        return output

    def backward(self, outputs: torch.Tensor, grad_outputs=None, retain_graph=False) -> None:
        if not self.leaves:
            raise ValueError("no target layer ran in the forward pass")
        torch.autograd.grad(
            outputs, self.leaves, grad_outputs=grad_outputs, retain_graph=retain_graph,
            allow_unused=True,
        )  # fmt: skip

    def finish_batch(self, times: int = 1) -> None:
        for name, calls in self.calls.items():
            if self.fired.get(name, 0) != calls * times:
                raise ValueError(
                    f"layer {name}: the output gradient reached {self.fired.get(name, 0)} of "
                    f"{calls * times} times; the loss does not depend on this layer's output"
                )
        self.leaves.clear()
        self.calls.clear()
        self.fired.clear()


def batch_fingerprint(batch: Batch) -> str:
    """A cheap identity of a batch (shapes and value sums), to check two passes agree."""
    h = hashlib.sha1()
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            h.update(f"{key}{tuple(value.shape)}{float(value.double().sum()):.17g}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------ pass 1: curvature


@dataclass
class CurvatureResult:
    factors: dict[str, KfacFactors]
    examples: int  # over all ranks
    loss_kind: str
    fingerprints: list[str] = field(default_factory=list)


@torch.enable_grad()
def collect_kfac(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[Batch],
    *,
    loss_kind: LossKind = "auto",
    samples: int = 1,
    seed: int = 0,
    train_mode: bool = True,
) -> CurvatureResult:
    """K-FAC-reduce factors A_in and S (label-free Hutchinson) of each layer in `layers`,
    each with its pooled and per-token energies (`Factor.pooling_ratio`)."""
    if not layers:
        raise ValueError("no layers to collect curvature for")
    if samples < 1:
        raise ValueError("at least one Hutchinson sample per example")
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    stats = {
        name: (FactorStat(layer.in_features), FactorStat(layer.out_features))
        for name, layer in layers.items()
    }
    taps = _Taps()
    masks: dict = {}
    rank = dist.get_rank() if is_distributed() else 0
    generator: torch.Generator | None = None
    kinds: set[str] = set()
    fingerprints: list[str] = []

    # per layer: pooled and per-token energies of x, then of g (float64, this rank)
    energies: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        a_stat, s_stat = stats[name]

        def hook(module, inputs, output):
            x = inputs[0]
            mask = _token_mask(name, x, masks, enc_dec)
            a_stat.add(pool_inputs(x, mask))
            if name not in energies:  # on the layer's device: no host sync per call
                energies[name] = torch.zeros(4, dtype=torch.float64, device=x.device)
            energy = energies[name]
            energy[:2] += pooling_energies(x, mask)

            def on_grad(g: torch.Tensor) -> None:
                s_stat.add(pool_output_grads(g, mask))
                energy[2:] += pooling_energies(g, mask).to(energy.device)

            return taps(name, output, on_grad)

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    examples = 0
    try:
        with _FrozenForward(model, train_mode):
            for batch in batches:
                fingerprints.append(batch_fingerprint(batch))
                masks.clear()
                masks.update(_batch_masks(batch, enc_dec))
                out = model(**model_inputs(batch))
                logits = out.logits
                labels = batch.get("labels")
                kind = resolve_loss_kind(model, logits, labels, loss_kind)
                kinds.add(kind)
                if generator is None:
                    generator = torch.Generator(device=logits.device)
                    generator.manual_seed(int(seed) * 1_000_003 + rank)
                for i in range(samples):
                    noise = output_noise(kind, logits, labels, generator).to(logits.dtype)
                    taps.backward(logits, noise, retain_graph=i < samples - 1)
                taps.finish_batch(samples)
                examples += logits.shape[0]
                del out, logits
    finally:
        for h in handles:
            h.remove()
    if examples == 0:
        raise ValueError("the init batch iterator yielded no batch")
    counts = torch.tensor(
        [float(examples)] + [float(c) for a, s in stats.values() for c in (a.count, s.count)],
        dtype=torch.float64,
    )
    # one all-reduce: the energies decide which factors are degenerate, identically on all ranks
    zero = torch.zeros(4, dtype=torch.float64)
    counts = torch.cat([counts, *(energies.get(n, zero).cpu() for n in stats)])
    if is_distributed():
        dist.all_reduce(counts)
    totals = iter(int(c) for c in counts[1 : 1 + 2 * len(stats)].tolist())
    sums = iter(counts[1 + 2 * len(stats) :].view(-1, 4).tolist())
    factors = {}
    for name, (a, s) in stats.items():
        ta, ts = next(totals), next(totals)
        if ta == 0 or ts == 0:
            raise ValueError(f"layer {name} saw no input or no output gradient during the init")
        xp, xt, gp, gt = next(sums)
        factors[name] = KfacFactors(Factor(a, ta, xp, xt), Factor(s, ts, gp, gt))
    if len(kinds) > 1:
        raise ValueError(f"batches disagree on the loss kind: {sorted(kinds)}")
    return CurvatureResult(factors, int(counts[0].item()), kinds.pop(), fingerprints)


# ------------------------------------------------------------------ degenerate factors

# A K-FAC-reduce factor whose pooled energy is below this fraction of its per-token energy
# is treated as degenerate. Measured on tiny random BERT, ViT, T5 (and T5 cross-attention)
# key layers, whose pooled output gradients cancel exactly: 3e-14 - 9e-14 in float32,
# 1e-15 in float64, 6e-6 - 3e-5 in bfloat16 (round-off of the per-token gradients, about
# eps^2 of the dtype, independent of T). Every other layer: 0.9 - 17 (about 1 for
# uncorrelated tokens), and the lowest genuine one, Llama's rotary keys, 0.15 - 0.23. 1e-3
# sits 30x above bfloat16 round-off and 100x below the lowest genuine layer; a layer
# genuinely that close to cancellation would be ill-served by pooled statistics anyway.
DEGENERATE_POOLING_RATIO = 1e-3


def degenerate_factors(
    factors: dict[str, KfacFactors], threshold: float = DEGENERATE_POOLING_RATIO
) -> dict[str, dict[str, float]]:
    """{layer: {"S" and/or "A_in": pooling ratio}} for factors whose pooling ratio is below
    threshold.

    Why a per-token reference: under softmax attention without rotary embeddings, adding one
    vector to all of an example's keys leaves every softmax unchanged, so the key outputs'
    gradients sum to exactly 0 over the tokens and the sum-pooled S is round-off. Its own
    eigenvalue ratios (eig_rtol) cannot see that; the per-token energy sum_t |g_t|^2 of the
    same pass is a scale round-off cannot reach. The energies are all-reduced, so every rank
    flags the same layers."""
    flagged: dict[str, dict[str, float]] = {}
    for name, f in factors.items():
        ratios = {"S": f.s.pooling_ratio, "A_in": f.a_in.pooling_ratio}
        low = {k: r for k, r in ratios.items() if r < threshold}
        if low:
            flagged[name] = low
    return flagged


# ------------------------------------------------------------------ eigenspaces (Alg. 1)


@dataclass
class Eigenspace:
    values: torch.Tensor  # (k,) descending, float64
    vectors: torch.Tensor  # (d, k) orthonormal columns, float64


def randomized_eigh(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    oversampling: int,
    power_iters: int,
    generator: torch.Generator,
    rtol: float = 0.0,
) -> Eigenspace:
    """Top-k eigenpairs of a symmetric PSD operator from k + p matrix-vector products.

    Randomized range finder (k + p Gaussian vectors, q power iterations with
    re-orthonormalisation), QR, then Rayleigh-Ritz on the sketched subspace. Eigenvalues at
    most rtol * the largest are dropped (the thin decomposition keeps nonzero ones only), so
    fewer than k pairs may come back. With k + p >= dim it is the exact eigendecomposition.
    """
    k = min(k, dim)
    width = min(k + oversampling, dim)
    omega = torch.randn(dim, width, generator=generator, dtype=torch.float64)
    y = matvec(omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(y)
        y = matvec(q)
    q, _ = torch.linalg.qr(y)
    t = q.T @ matvec(q)
    t = (t + t.T) / 2
    values, vectors = torch.linalg.eigh(t)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    top = float(values[0]) if values.numel() else 0.0
    keep = (values > 0) & (values > rtol * top)
    return Eigenspace(values[keep], q @ vectors[:, keep])


# ------------------------------------------------------------------ pass 2: projected G


@dataclass
class ProjectedGradients:
    sums: dict[str, torch.Tensor]  # U_S^T (sum over batches of dL/dW) U_A, float64
    batches: int  # over all ranks
    fingerprints: list[str] = field(default_factory=list)

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.batches


@torch.enable_grad()
def projected_gradients(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[Batch],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    train_mode: bool = True,
) -> ProjectedGradients:
    """U_S^T G U_A per layer (bases[name] = (U_S (m, kS), U_A (n, kA))), G summed over
    batches of the mean loss, from per-token projections; all-reduced across ranks."""
    sums: dict[str, torch.Tensor] = {}
    taps = _Taps()
    fingerprints: list[str] = []
    projectors = {
        name: (
            u_s.to(layers[name].weight.device, torch.float32),
            u_a.to(layers[name].weight.device, torch.float32),
        )
        for name, (u_s, u_a) in bases.items()
    }
    for name, (u_s, u_a) in projectors.items():
        sums[name] = torch.zeros(u_s.shape[1], u_a.shape[1], dtype=torch.float64, device=u_s.device)

    def make_hook(name: str):
        u_s, u_a = projectors[name]

        def hook(module, inputs, output):
            xa = inputs[0].detach().to(torch.float32).reshape(-1, u_a.shape[0]) @ u_a

            def on_grad(g: torch.Tensor) -> None:
                ds = g.detach().to(torch.float32).reshape(-1, u_s.shape[0]) @ u_s
                sums[name].add_((ds.T @ xa).double())

            return taps(name, output, on_grad)

        return hook

    handles = [layers[name].register_forward_hook(make_hook(name)) for name in projectors]
    count = 0
    try:
        with _FrozenForward(model, train_mode):
            for batch in batches:
                fingerprints.append(batch_fingerprint(batch))
                loss = model(**model_inputs(batch)).loss
                weight = loss_weight(batch)  # a distributed micro-batch's share (WeightedBatch)
                taps.backward(loss * weight if weight != 1.0 else loss)
                taps.finish_batch()
                count += 1
                del loss
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("the init batch iterator yielded no batch")
    total = torch.tensor(float(count), dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(total)
        for name in sums:
            dist.all_reduce(sums[name])
    return ProjectedGradients(sums, int(total.item()), fingerprints)
