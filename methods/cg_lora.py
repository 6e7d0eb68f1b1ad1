"""CG-LoRA (Zheng & Proutiere 2026, arXiv 2603.29824 v1): curvature-guided LoRA init.

A plain peft LoRA adapter (saves, loads, merges as one) whose B0, A0 come from the loss
gradient G whitened by the layer's K-FAC curvature. There is no public code; the paper's
extracted text lost almost every symbol. What follows is my reading of the text (sections
3-6, appendices A-D, Table 3) against shared/specs/methods.md, step by step, with every place
where a choice had to be made marked CHOICE.

1. K-FAC factors (Sec. 4.2, Assumption 4.3): A_in = E[x x^T] (n, n), S = E[g g^T] (m, m),
   g a pre-activation derivative; with weight sharing the K-FAC-reduce approximation
   (Eschenhagen et al. 2023), "which first does pooling over the tokens". CHOICE (the
   pooling operator is lost; the spec says "sum" for both): x mean-pooled and g sum-pooled
   over each example's valid tokens, padding excluded, so sum_t g_t x_t^T is approximated
   by (sum_t g_t)(mean_t x_t)^T, exact when the tokens' inputs agree (my reading of
   K-FAC-reduce's 1/R^2 on the input factor; per example here because lengths vary -
   with sum/sum, long sequences would weigh R^2 more). Computed by methods/kfac.py
   (float32, all-reduced).
1b. Degenerate factors (CHOICE; not in the paper). Under softmax attention without rotary
   embeddings (BERT, RoBERTa, T5 including cross-attention, ViT), adding one vector to all
   of an example's keys leaves every softmax unchanged, so the key outputs' gradients sum to
   exactly 0 over the tokens: the K-FAC-reduce S = E[(sum_t g_t)(sum_t g_t)^T] is 0 and what
   is computed is round-off. The layer's true per-example Jacobian
   sum_t g_t x_t^T = sum_t g_t (x_t - mean_t x_t)^T does not vanish, only its pooled
   surrogate (sum_t g_t)(mean_t x_t)^T does; so Assumption 4.3 (ii) holds with S = 0, the
   thin decomposition of S in Def. 4.4 is empty and the whitened gradient is undefined.
   Whitening by the round-off instead (eig_rtol is relative to S's own top) moved B0 A0 of
   the key layers by ~130% between a float32 and a float64 copy of one model. Detection:
   `kfac.degenerate_factors`, the factor's pooled energy against the per-token energy of
   the same pass (threshold 1e-3, reasoning and measured ratios there). Treatment: that
   factor is replaced by the identity (U = I, L = 1; any c I gives the same init, steps 4-6
   use only spans and eigenvalue ratios), i.e. the layer is whitened on its other side
   only: Gw = G U_A L_A^{-1/2}, Bh = P_r. It says the pooled curvature carries no
   information on that side, so no direction there is preferred. Rejected, measured:
   K-FAC-expand (per-token rows for the layer's factors, the other approximation of the same
   GGN; one more pass): the per-token key S of a tiny ViT has a tail at 1e-5 of its top that
   amplifies float32 round-off of G, and its float32 and float64 inits differed by
   0.8-1.4e-3 (identity: 6e-7; BERT, T5 keys: 3e-6 either way). A plain LoRA init for the
   layer would drop its gradient information too. Flagged layers are recorded per run in
   ctx.init_notes["degenerate_curvature"]. Rotary models (Llama) are not affected: the
   position-dependent rotation breaks the invariance (ratio 0.15-0.23); nothing is flagged.
2. Label-free g (App. B): squared loss - backpropagate Rademacher vectors from the outputs
   (E[g g^T] = J^T J); binary CE - the same weighted by sqrt(p(1-p)) (App. A.1's Lambda =
   diag(p(1-p))); multiclass CE - e = sqrt(p) * z - p (sqrt(p) . z), z ~ N(0, I), which the
   text derives as "itself Gaussian" with covariance diag(p) - p p^T and 1^T e = 0 (the
   centred version, App. A.3/B.3-4); token-level LMs per token with ignored labels zeroed.
   "In practice, we do a one-shot estimation": one sample per example (`hutchinson_samples`).
3. Eigenspaces (Sec. 5.3, Algorithm 1, after Puiu 2022): randomized range finder on
   matrix-vector products, "sketching, QR decomposition, and Rayleigh-Ritz projection,
   optionally with power iterations"; never forms an (mn)^2 object. CHOICE: the eigenspace
   dimension k is not recoverable. Def. 4.4 uses the thin decompositions of A_in and S
   (all nonzero eigenvalues), Algorithm 1 approximates their top part. k must exceed r for
   the whitening to matter at all: with k = r the init reduces to the projection of -G on
   the top-r eigenvectors of S and A_in, whatever the eigenvalues (tested). Default
   k = `eig_dim` = 4r (clamped to the layer size); eigenvalues <= `eig_rtol` x the largest
   are dropped (the thin decomposition keeps nonzero eigenvalues only; this matters when
   fewer examples than k were seen), and fewer than r surviving directions is an error.
   The power-iteration count q (CHOICE, inferred): the values of p and q ("we consider low
   values") and the pass-count formula are lost from Sec. 5.3, but its words - a count in
   q "where q is the number of power iterations", "the factor [2] comes from computing
   U_A and U_S", "the additional [1] ... the loss gradient", and with the chosen q
   "two additional backward passes" over LoRA-GA's one - fit 2(q + 1) + 1 = 3 only with
   q = 0: default `power_iters` 0. The oversampling p is not recoverable: default 10
   (Halko et al.'s usual 5-10). Here the sketch runs on the stored pooled vectors, so
   power iterations (and Rayleigh-Ritz) cost no extra pass over the data; raising q only
   costs small matrix products (see methods/kfac.py for the storage design).
4. Whitened gradient (Def. 4.4, eq. 8): Gw = L_S^{-1/2} U_S^T G U_A L_A^{-1/2};
   svd_r(Gw) = P_r D_r Q_r^T; left modes Bh = U_S L_S^{-1/2} P_r, right modes
   Ah = Q_r^T L_A^{-1/2} U_A^T ("full column rank left and right modes"). G enters only as
   U_S^T G U_A, from per-token projections in a second pass (Sec. 5.3: "we do not compute
   the full loss gradient"; for linear layers it "can be written as" a sum over examples and
   tokens of inputs times "the pre-activation token derivative of the loss gradient", i.e.
   G = sum_it delta_it x_it^T); G = the mean over the init batches of the mean-loss
   gradient, as in methods/grad_estimator.py. `damping` (CHOICE, not
   in the text, default 0 = the paper's formula) replaces L by L + damping * L_max.
5. Relative column scaling (Prop. 5.1, eq. 12): M* = argmin_M ||-G - Bh M Ah||_F, the
   orthogonal projection of -G onto {Bh M Ah}; closed form with the Cholesky factors of
   C_B = Bh^T Bh = L_B L_B^T and C_A = Ah Ah^T = L_A L_A^T:
   M* = C_B^{-1} Bh^T (-G) Ah^T C_A^{-1}, where Bh^T G Ah^T = P_r^T Gw Q_r = D_r needs only
   the projected gradient.
6. Balanced realization (Def. 5.2, Sec. 5.3, Thm. 5.3). DIFFERS FROM THE SPEC: the spec
   takes the SVD of M* itself (B0 = Bh U_M D_M^{1/2}); the paper takes the thin SVD of the
   product Bh M* Ah. Sec. 5.3 (symbols lost) introduces "the lower triangular Cholesky
   factors" of two matrices, rewrites a product, takes an SVD and says the result "is a
   valid SVD since [...], and similarly for [...]"; a Cholesky-based argument is needed
   only for the product's SVD (the SVD of the r x r M* needs none), and the term
   "balanced realization" means equal Gramians. Reconstructed: with C_B = L_B L_B^T,
   C_A = L_A L_A^T and core K = L_B^T M* L_A = U D V^T,
   Bh M* Ah = (Bh L_B^{-T} U) D (V^T L_A^{-1} Ah) is a thin SVD because
   (Bh L_B^{-T})^T (Bh L_B^{-T}) = I. So B0 = Bh L_B^{-T} U D^{1/2},
   A0 = D^{1/2} V^T L_A^{-1} Ah: B0^T B0 = A0 A0^T = D (the spec's version is not
   balanced unless Bh, Ah^T have orthonormal columns; tested), col(B0) = col(Bh) and
   row(A0) = row(Ah) ("by construction ... since [M*] is invertible"), B0 A0 = Bh M* Ah.
7. Global scaling (Sec. 5.1): "an additional global scaling ... (see Theorem 3.2 in Wang et
   al. 2024)", "in conjunction with" rsLoRA's s = alpha/sqrt(r) (Sec. 6.1: all methods use
   rsLoRA), gamma "as considered in Wang et al. (2024)". The formula is lost. CHOICE
   (`scale`): "stable" (default) = LoRA-GA's stable factor zeta = m^{1/4}/sqrt(gamma) on both
   factors of the balanced realization normalised to unit top singular value, i.e.
   B0 <- zeta B0 / sqrt(D_1), A0 <- zeta A0 / sqrt(D_1) (with a flat spectrum these are
   exactly LoRA-GA's zeta-scaled orthonormal factors; independent of the loss's
   normalisation), so ||s B0 A0||_2 = s sqrt(m) / gamma; "stable_raw" = zeta on the
   unnormalised factors (the gradient's magnitude kept, as peft's LoRA-GA keeps S in B0);
   "none" = the balanced realization of the projection of -G itself. gamma default 16
   (LoRA-GA's and peft's default; the paper's value is lost).
8. Variants (Sec. 6.1): "no_shift" (default; the paper's better one on RoBERTa, Table 1:
   CoLA 80.53 vs 72.77, MRPC 82.27 vs 75.40) starts at W0 + s B0 A0; "shift" subtracts
   s B0 A0 from W0, LoRA-GA style, so training starts at the base function.
Other defaults from the paper: init data "batch 8 accumulated 32 times" = 256 examples
(`init_examples`; batches = ceil(256 / trial batch size)); rsLoRA scaling (`use_rslora`).
Cost: 2 forward + 2 activation-only backward passes per init batch (no weight gradient is
ever formed); the paper's Table 3 claims 3.58 s / 510 MiB vs LoRA-GA's 7.01 s / 1.28 GiB
(harness/bench/cg_lora_init.py measures ours against this harness's LoRA-GA).
Caveats: the init uses the model in train mode (dropout on, as the shared gradient
estimator does); ctx.init_batches is called twice and must yield the same batches both times
(the harness's is seeded; a mismatch is warned about); gradient checkpointing during the
init would double-count inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from peft import get_peft_model
from pydantic import Field, model_validator

from methods.kfac import (
    DEGENERATE_POOLING_RATIO,
    Eigenspace,
    collect_kfac,
    degenerate_factors,
    projected_gradients,
    randomized_eigh,
)
from methods.peft_lora import (
    LoraHyperparams,
    PeftLoraMethod,
    check_rank_fits,
    matching_linear_layers,
)
from methods.registry import register_method

PAPER_INIT_EXAMPLES = 256  # "batch size 8, accumulated 32 times"
DEGENERATE_TREATMENT = (
    f"a K-FAC-reduce factor with pooled/per-token energy ratio < {DEGENERATE_POOLING_RATIO:g}"
    " (attention keys without rotary embeddings) is replaced by the identity: no whitening"
    " on that side (eigenbasis = all of R^d, equal eigenvalues); the other factor as usual"
)


class CgLoraHyperparams(LoraHyperparams):
    init_examples: int = Field(
        PAPER_INIT_EXAMPLES, gt=0, description="examples the statistics see (paper: 8 x 32)"
    )
    init_batches: int | None = Field(
        None, gt=0, description="override: exact number of init batches (else from examples)"
    )
    eig_dim: int | None = Field(
        None, gt=0, description="k, eigenspace dimension of A_in and S; None = 4 x rank (>= r)"
    )
    oversampling: int = Field(10, ge=0, description="p: the sketch has k + p random vectors")
    power_iters: int = Field(0, ge=0, description="q: power iterations of the range finder")
    eig_rtol: float = Field(
        1e-6, ge=0, lt=1, description="drop eigenvalues <= eig_rtol x the largest (thin SVD)"
    )
    damping: float = Field(
        0.0, ge=0, description="whiten with (L + damping x L_max)^-1/2; 0 = the paper's formula"
    )
    stable_gamma: float = Field(16.0, gt=0, description="gamma of the stable scaling")
    scale: Literal["stable", "stable_raw", "none"] = Field(
        "stable", description="global scaling of the balanced factors (see module docstring)"
    )
    variant: Literal["no_shift", "shift"] = Field(
        "no_shift", description="no_shift: start at W0 + s B0 A0; shift: W0 <- W0 - s B0 A0"
    )
    use_rslora: bool = Field(True, description="s = alpha / sqrt(r), as the paper's runs")
    hutchinson_samples: int = Field(
        1, gt=0, description="Hutchinson vectors per example (paper: one-shot)"
    )
    curvature_loss: Literal["auto", "mse", "ce", "bce", "causal_lm", "token_ce"] = Field(
        "auto", description="loss whose Hessian weights S; auto = as the HF model's loss"
    )
    seed: int = Field(0, description="seed of the sketch matrices and Hutchinson draws")

    @model_validator(mode="after")
    def _eig_dim_covers_rank(self):
        if self.eig_dim is not None and self.eig_dim < self.rank:
            raise ValueError(f"eig_dim {self.eig_dim} must be >= rank {self.rank}")
        return self


def identity_space(dim: int) -> Eigenspace:
    """The whole space with unit eigenvalues: a factor that does not whiten (step 1b)."""
    return Eigenspace(torch.ones(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64))


@dataclass
class CgFactors:
    """The init of one layer and the intermediate quantities (float64)."""

    b0: torch.Tensor  # (m, r), after the global scaling
    a0: torch.Tensor  # (r, n)
    whitened: torch.Tensor  # Gw, (kS, kA), in the eigenbases' coordinates
    b_hat: torch.Tensor  # Bh = U_S L_S^-1/2 P_r, (m, r)
    a_hat: torch.Tensor  # Ah = Q_r^T L_A^-1/2 U_A^T, (r, n)
    m_star: torch.Tensor  # (r, r)
    singular: torch.Tensor  # D: singular values of Bh M* Ah (before the global scaling)
    global_factor: float  # what B0 and A0 were multiplied by


def cg_lora_factors(
    projected: torch.Tensor,
    space_s: Eigenspace,
    space_a: Eigenspace,
    rank: int,
    *,
    out_features: int,
    damping: float = 0.0,
    scale: str = "stable",
    gamma: float = 16.0,
) -> CgFactors:
    """Steps 4-7 from the projected gradient U_S^T G U_A and the two eigenspaces."""
    u_s, u_a = space_s.vectors.double(), space_a.vectors.double()
    l_s, l_a = space_s.values.double(), space_a.values.double()
    if min(l_s.numel(), l_a.numel()) < rank:
        raise ValueError(
            f"only {l_s.numel()} (S) / {l_a.numel()} (A_in) curvature directions above "
            f"eig_rtol, fewer than rank {rank}: use more init examples or a lower rank"
        )
    gp = projected.double().to(u_s.device)
    w_s = (l_s + damping * l_s[0]).rsqrt()
    w_a = (l_a + damping * l_a[0]).rsqrt()
    gw = w_s[:, None] * gp * w_a[None, :]
    p, d, qh = torch.linalg.svd(gw, full_matrices=False)
    p_r, d_r, q_r = p[:, :rank], d[:rank], qh[:rank].T
    if not d_r[0] > 0:
        raise ValueError("the projected loss gradient is zero: no direction to initialise")
    if d_r[-1] <= d_r[0] * 1e-12:
        warnings.warn(
            f"whitened gradient has rank < {rank}: some adapter directions start at zero",
            stacklevel=2,
        )
    bh_small = w_s[:, None] * p_r  # (kS, r): Bh = U_S bh_small
    ah_small = (w_a[:, None] * q_r).T  # (r, kA): Ah = ah_small U_A^T
    c_b = bh_small.T @ bh_small  # Bh^T Bh (U_S orthonormal)
    c_a = ah_small @ ah_small.T  # Ah Ah^T
    chol_b = torch.linalg.cholesky(c_b)
    chol_a = torch.linalg.cholesky(c_a)
    rhs = -(p_r.T @ gw @ q_r)  # Bh^T (-G) Ah^T = -D_r
    m_star = torch.cholesky_solve(rhs, chol_b)  # C_B^-1 rhs
    m_star = torch.cholesky_solve(m_star.T, chol_a).T  # ... C_A^-1
    core = chol_b.T @ m_star @ chol_a
    u_k, d_k, vh_k = torch.linalg.svd(core)
    left = torch.linalg.solve_triangular(chol_b.T, u_k, upper=True)  # L_B^-T U
    right = torch.linalg.solve_triangular(chol_a.T, vh_k.T, upper=True).T  # V^T L_A^-1
    root = d_k.sqrt()
    b_hat, a_hat = u_s @ bh_small, ah_small @ u_a.T
    b0 = u_s @ (bh_small @ (left * root))
    a0 = ((root[:, None] * right) @ ah_small) @ u_a.T
    if scale == "none":
        factor = 1.0
    elif scale in ("stable", "stable_raw"):
        factor = out_features**0.25 / math.sqrt(gamma)
        if scale == "stable":
            factor /= math.sqrt(float(d_k[0]))
    else:
        raise ValueError(f"unknown scale {scale!r}")
    return CgFactors(b0 * factor, a0 * factor, gw, b_hat, a_hat, m_star, d_k, factor)


@register_method("cg_lora")
class CgLora(PeftLoraMethod):
    description = "CG-LoRA: LoRA init from the K-FAC-whitened gradient (curvature-guided)"
    hyperparams_cls = CgLoraHyperparams
    needs_init_batches = True
    init_keeps_gradient_checkpointing = False  # methods.kfac._FrozenForward turns it off

    def init_batches_wanted(self, hp: CgLoraHyperparams, ctx=None) -> int:
        if hp.init_batches is not None:
            return hp.init_batches
        batch_size = (ctx.batch_size if ctx is not None else None) or 8  # paper: batch 8
        return math.ceil(hp.init_examples / batch_size)

    def init_statistics_bytes(
        self, hp: CgLoraHyperparams, layer_shapes: list[tuple[int, int]], examples: int
    ) -> int:
        """The K-FAC factors' pooled float32 rows (methods.kfac.FactorStat): per layer X
        (N, n) and Gs (N K, m), each folded into its d x d Gram once it has d rows; no
        m x n accumulator. The whitened-gradient projections (eig_dim^2) are negligible."""
        k = hp.hutchinson_samples
        return 4 * sum(
            min(examples, n) * n + min(examples * k, m) * m for m, n in layer_shapes
        )

    def starts_at_base(self, hp: CgLoraHyperparams) -> bool:
        return hp.variant == "shift"  # no_shift starts at W0 + s B0 A0

    def eig_dim(self, hp: CgLoraHyperparams) -> int:
        return hp.eig_dim if hp.eig_dim is not None else 4 * hp.rank

    def extra_lora_kwargs(self, hp: CgLoraHyperparams):
        return {"use_rslora": hp.use_rslora}

    def compute_factors(self, model, layers, hp: CgLoraHyperparams, ctx) -> dict[str, CgFactors]:
        """The per-layer init (before peft wraps the model)."""
        n_batches = self.init_batches_wanted(hp, ctx)
        curvature = collect_kfac(
            model,
            layers,
            ctx.init_batches(n_batches),
            loss_kind=hp.curvature_loss,
            samples=hp.hutchinson_samples,
            seed=hp.seed,
        )
        flagged = degenerate_factors(curvature.factors)  # step 1b (module docstring)
        if flagged:
            ctx.init_notes["degenerate_curvature"] = {
                name: ", ".join(f"{k}: pooled/per-token energy {r:.1e}" for k, r in low.items())
                + " -> identity (not whitened)"
                for name, low in flagged.items()
            }
        sketch = torch.Generator().manual_seed(hp.seed)  # the same on every rank
        k = self.eig_dim(hp)
        spaces: dict[str, tuple[Eigenspace, Eigenspace]] = {}
        for name in layers:  # layer by layer, each factor's rows freed once decomposed
            factors = curvature.factors.pop(name)
            # Decomposed even where degenerate (a few small products): the sketch stream,
            # hence every other layer's init, is the same as without the treatment.
            s_space, a_space = (
                randomized_eigh(
                    f.matvec,
                    f.dim,
                    k,
                    oversampling=hp.oversampling,
                    power_iters=hp.power_iters,
                    generator=sketch,
                    rtol=hp.eig_rtol,
                )
                for f in (factors.s, factors.a_in)
            )
            low = flagged.get(name, {})
            spaces[name] = (
                identity_space(factors.s.dim) if "S" in low else s_space,
                identity_space(factors.a_in.dim) if "A_in" in low else a_space,
            )
            del factors
        bases = {name: (s.vectors, a.vectors) for name, (s, a) in spaces.items()}
        grads = projected_gradients(model, layers, ctx.init_batches(n_batches), bases)
        if grads.fingerprints != curvature.fingerprints:
            warnings.warn(
                "cg_lora: the init batches differed between the curvature pass and the "
                "gradient pass (ctx.init_batches is not deterministic)",
                stacklevel=2,
            )
        return {
            name: cg_lora_factors(
                grads.mean(name),
                *spaces[name],
                hp.rank,
                out_features=layer.out_features,
                damping=hp.damping,
                scale=hp.scale,
                gamma=hp.stable_gamma,
            )
            for name, layer in layers.items()
        }

    def prepare(self, model, hp: CgLoraHyperparams, ctx):
        if ctx.init_batches is None:
            raise ValueError("cg_lora needs training batches for its curvature and gradient")
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        check_rank_fits(layers, hp.rank)
        factors = self.compute_factors(model, layers, hp, ctx)
        model = get_peft_model(model, self.lora_config(hp, ctx))
        with torch.no_grad():
            for name, f in factors.items():
                layer = model.base_model.model.get_submodule(name)
                lora_b, lora_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
                lora_b.copy_(f.b0)
                lora_a.copy_(f.a0)
                if hp.variant == "shift":
                    weight = layer.base_layer.weight
                    offset = layer.scaling["default"] * (lora_b.float() @ lora_a.float())
                    weight.copy_((weight.float() - offset).to(weight.dtype))
        return model

    def resolved_config(self, hp: CgLoraHyperparams, ctx):
        return {
            **super().resolved_config(hp, ctx),
            "eig_dim": self.eig_dim(hp),
            "init_batches": self.init_batches_wanted(hp, ctx),
            "init_batch_size": ctx.batch_size,
            "scaling_s": hp.alpha / (math.sqrt(hp.rank) if hp.use_rslora else hp.rank),
            "balanced": "thin SVD of Bh M* Ah via Cholesky (paper Sec. 5.3), B0^T B0 = A0 A0^T",
            "pooling": "K-FAC-reduce: mean of inputs, sum of output grads, per example",
            "degenerate_curvature": DEGENERATE_TREATMENT,
        }


class CgLoraShiftHyperparams(CgLoraHyperparams):
    variant: Literal["no_shift", "shift"] = Field(
        "shift", description="shift (this entry's default): W0 <- W0 - s B0 A0"
    )


@register_method("cg_lora_shift")
class CgLoraShift(CgLora):
    """CG-LoRA's "shift" variant as its own entry, as the paper's tables list it beside
    "no shift" (Table 1): the same method with `variant: shift` by default, so one sweep and
    one leaderboard hold both."""

    description = "CG-LoRA (shift): W0 <- W0 - s B0 A0, training starts at the base function"
    hyperparams_cls = CgLoraShiftHyperparams
