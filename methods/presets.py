"""Named method settings: a sweep's `methods.<name>.preset: <preset>` expands to these
overrides (explicit `overrides` win). Each names a published setting exactly, or the
harness's earlier defaults (`legacy`: what committed results before the defaults moved to the
official code's were produced with). The defaults table (methods/defaults.py) says where each
value comes from; tests/test_methods.py checks every preset validates and the `official`
ones equal the official code's values listed here.
"""

from __future__ import annotations

from typing import Any

METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lora_ga": {
        # Outsider565/LoRA-GA: conf/init/gradient.yaml (bsz 1, iters 8, ArB2r, stable, gamma
        # 16), reproduce/conf/peft/all.yaml (alpha 16), README "peft.use_rslora=True",
        # peft/src/peft/tuners/lora/layer.py lora_ga_init (svd_lowrank q = min(4r, m, n),
        # niter 4; B0 and A0 both x m^(1/4)/sqrt(gamma); W0 -= s B0 A0).
        "official": {
            "convention": "official", "use_rslora": True, "alpha": 16.0, "init_examples": 8,
            "stable_gamma": 16.0, "direction": "ArB2r", "svd_niter": 4,
        },
        # peft 0.21's lora_ga_init, as this harness ran it before (committed results).
        "legacy": {"convention": "peft", "use_rslora": False, "init_batches": 8},
        "peft": {"convention": "peft", "use_rslora": False, "init_batches": 8},
    },
    "lora_one": {
        # YuanheZ/LoRA-One: conf/init/gradient.yaml (bsz 1, iters 8, stable, gamma 128),
        # README commands (peft.use_rslora=True, peft.lora_alpha=16), conf/model/llama.yaml
        # (prec_reg 1e-6), run_exp.py direction "LoRA-One" (no offset), AdamW training.
        "official": {
            "use_rslora": True, "alpha": 16.0, "init_examples": 8, "stable_gamma": 128.0,
            "precond_damping": 1e-6, "optimizer": "adamw", "weight_shift": False,
        },
        "legacy": {"use_rslora": False, "precond_damping": 1e-2, "init_batches": 8},
    },
    "lora_sb": {
        # CERT-Lab/lora-sb train_glue.py: num_samples=2 examples, eff_lr = lr / (warmup_ratio
        # x total steps), lora_alpha = r (s = 1), models.py RoBERTa targets (the GLUE family
        # default, methods/lora_xs.py OFFICIAL_TARGETS); scripts/run_glue.sh RANK=24.
        "official-glue": {
            "rank": 24, "scaling": 1.0, "init_examples": 2, "init_eta_rule": "warmup_increment",
        },
        # train_arithmetic.py / train_cr.py: 50 of 50K and 170 of 170K examples = 1/1000.
        "official-llm": {
            "scaling": 1.0, "init_fraction": 0.001, "init_unit": "examples",
            "init_eta_rule": "warmup_increment",
        },
        "legacy": {"init_unit": "batches", "init_eta_rule": "peak"},
    },
    "sds_lora": {
        # The paper (no public code): alpha 4 (s = alpha/sqrt(r)), T_w = 10, K = 5, and the
        # literal QR refresh (`procrustes`, our default, spans the same subspaces).
        "paper": {
            "alpha": 4.0, "warmup_steps": 10, "refresh_phases": 5, "refresh_basis": "qr",
        },
    },
    "cg_lora": {
        # The paper (no public code): rsLoRA scaling, 8 x 32 = 256 init examples; the rest of
        # its values are lost in extraction (methods/cg_lora.py marks each CHOICE).
        "paper": {"use_rslora": True, "init_examples": 256},
    },
    "lora": {
        # Hu et al. 2021, RoBERTa GLUE (Table 9): r 8, alpha 8, W_q and W_v.
        "paper-roberta": {"rank": 8, "alpha": 8.0, "target_modules": ["query", "value"]},
        "peft": {"rank": 8, "alpha": 8.0, "dropout": 0.0},  # peft LoraConfig defaults
    },
}  # fmt: skip


def preset_names(method: str) -> list[str]:
    return sorted(METHOD_PRESETS.get(method, {}))


def preset_overrides(method: str, preset: str) -> dict[str, Any]:
    """The overrides a named preset stands for (a fresh dict); KeyError names the known ones."""
    known = METHOD_PRESETS.get(method, {})
    if preset not in known:
        raise KeyError(
            f"method {method!r} has no preset {preset!r}; known: {', '.join(sorted(known)) or '-'}"
        )
    return dict(known[preset])


def apply_preset(method: str, sweep: dict[str, Any]) -> dict[str, Any]:
    """A sweep's method section with `preset` expanded: preset values, then `overrides`."""
    if not isinstance(sweep, dict) or "preset" not in sweep:
        return sweep
    sweep = dict(sweep)
    preset = sweep.pop("preset")
    overrides = sweep.get("overrides") or {}
    sweep["overrides"] = {**preset_overrides(method, preset), **overrides}
    return sweep
