"""The claims registry (results/published/claims.yaml) and its check (harness/reporting/claims.py).

Every verdict test builds a small synthetic runs table whose answer is known by construction
(one method right on 90% of the test items, the other on 60%, ...), so a wrong rule (an
inverted direction, a comparison across settings, a too-small seed count accepted) fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.reporting.claims import (
    CLAIMS_YAML,
    UNTESTABLE,
    ClaimsError,
    Side,
    evaluate_claims,
    load_claims,
    mean_ranks,
    parse_claims,
)
from harness.reporting.results import build_leaderboard, normalise_runs, read_runs
from harness.reporting.stats import direction_verdict, paired_seed_bootstrap

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 400
LABELS = np.random.default_rng(0).integers(0, 2, N_ITEMS)


def _preds(wrong: int, seed: int) -> np.ndarray:
    """Predictions wrong on exactly `wrong` items (which ones depends on the seed)."""
    pred = LABELS.copy()
    flip = np.random.default_rng(1000 + seed).choice(N_ITEMS, wrong, replace=False)
    pred[flip] = 1 - pred[flip]
    return pred


def _run(
    method: str,
    seed: int,
    *,
    wrong: int,
    lr: float = 1e-3,
    task: str = "glue/sst2",
    config: dict | None = None,
    loss: list[float] | None = None,
    select: float = 0.5,
    **overrides,
) -> dict:
    pred = _preds(wrong, seed)
    test = float((pred == LABELS).mean())
    config = {"rank": 8} if config is None else config
    curve = [[i + 1, v] for i, v in enumerate(loss if loss is not None else [1.0, 0.9, 0.8])]
    row = {
        "key": f"{method}-{json.dumps(config)}-{task}-{lr}-{seed}",
        "status": "ok",
        "method": method,
        "method_config": json.dumps(config, sort_keys=True),
        "task": task,
        "protocol": "p1",
        "model_id": "m",
        "model_revision": "r",
        "data_fingerprint": "d1",
        "budget": json.dumps({"max_steps": len(curve), "batch_size": 8}),
        "test_rows": json.dumps({"validation": N_ITEMS}),
        "seed": seed,
        "lr": lr,
        "selection_metric": "accuracy",
        "selection_score": select,
        "test_metric": "accuracy",
        "test_score": test,
        "test_metrics": json.dumps({"accuracy": test}),
        "test_items": json.dumps(
            {"test/validation": {"pred": pred.tolist(), "label": LABELS.tolist()}}
        ),
        "loss_curve": json.dumps(curve),
        "final_train_loss": curve[-1][1],
        "majority_baseline": 0.5,
        "trainable_params": 100,
        "init_time_s": 0.1,
        "train_time_s": 1.0,
        "peak_memory_mb": 10.0,
        "samples_per_s": 5.0,
        "packages": "{}",
    }
    row.update(overrides)
    return row


def _runs(rows: list[dict]) -> pd.DataFrame:
    return normalise_runs(rows)


def _claim(check: str = "beats", a: str = "x", b: str = "y", **extra) -> dict:
    return {
        "id": f"{a}-{check}-{b}",
        "paper": "CG-LoRA",
        "source": "synthetic",
        "claim": "synthetic claim",
        "about": "accuracy",
        "check": check,
        "a": a,
        "b": b,
        "tasks": ["glue/sst2"],
        **extra,
    }


def _verdicts(runs: pd.DataFrame, *claims: dict) -> pd.DataFrame:
    return evaluate_claims(runs, parse_claims(list(claims)), replicates=400)


def _one(runs: pd.DataFrame, claim: dict) -> dict:
    result = _verdicts(runs, claim)
    assert len(result) == 1
    return result.iloc[0].to_dict()


SEEDS = (0, 1, 2)


def _better_and_worse(**overrides_b) -> pd.DataFrame:
    rows = [_run("x", s, wrong=40) for s in SEEDS]  # 90% right
    rows += [_run("y", s, wrong=160, **overrides_b) for s in SEEDS]  # 60% right
    return _runs(rows)


# -- verdicts with known answers ---------------------------------------------------------
def test_a_clearly_better_method_is_supported_and_the_reverse_claim_contradicted():
    runs = _better_and_worse()
    yes = _one(runs, _claim(a="x", b="y"))
    assert yes["verdict"] == "supported"
    assert yes["delta"] == pytest.approx(0.9 - 0.6)
    assert 0 < yes["ci_low"] < yes["delta"] < yes["ci_high"]
    assert yes["n_seeds"] == 3
    no = _one(runs, _claim(a="y", b="x"))
    assert no["verdict"] == "contradicted"
    assert no["delta"] == pytest.approx(-0.3) and no["ci_high"] < 0


def test_identical_outcomes_are_within_noise():
    rows = [_run("x", s, wrong=100) for s in SEEDS] + [_run("y", s, wrong=100) for s in SEEDS]
    out = _one(_runs(rows), _claim())
    assert out["verdict"] == "within noise"
    assert out["delta"] == 0 and out["ci_low"] <= 0 <= out["ci_high"]


def test_a_small_difference_on_few_items_is_within_noise():
    rows = [_run("x", s, wrong=100) for s in SEEDS] + [_run("y", s, wrong=104) for s in SEEDS]
    out = _one(_runs(rows), _claim())
    assert out["delta"] > 0  # x is ahead, but by 1% of 400 items: not outside the noise
    assert out["verdict"] == "within noise"


@pytest.mark.parametrize(
    "column, value",
    [
        ("model_id", "another-model"),
        ("model_revision", "r2"),
        ("data_fingerprint", "d2"),
        ("protocol", "p2"),
        ("budget", json.dumps({"max_steps": 99, "batch_size": 8})),
        ("test_rows", json.dumps({"validation": 200})),
    ],
)
def test_mismatched_settings_are_refused_and_say_which(column, value):
    runs = _better_and_worse(**{column: value})
    out = _one(runs, _claim())
    assert out["verdict"] == UNTESTABLE
    assert "settings differ" in out["why"] and column in out["why"]
    assert np.isnan(out["delta"])


def test_different_test_items_are_refused():
    rows = [_run("x", s, wrong=40) for s in SEEDS]
    other = 1 - LABELS  # same count, other labels: not the same test set
    for s in SEEDS:
        r = _run("y", s, wrong=160)
        r["test_items"] = json.dumps(
            {"test/validation": {"pred": _preds(160, s).tolist(), "label": other.tolist()}}
        )
        rows.append(r)
    out = _one(_runs(rows), _claim())
    assert out["verdict"] == UNTESTABLE and "test items" in out["why"]


def test_too_few_seeds_and_absent_methods_are_not_testable():
    one_seed = _runs([_run("x", 0, wrong=40), _run("y", 0, wrong=160)])
    out = _one(one_seed, _claim())
    assert out["verdict"] == UNTESTABLE and "too few paired seeds" in out["why"]
    # Seeds that do not pair up count as missing, too.
    unpaired = _runs([_run("x", s, wrong=40) for s in (0, 1)] + [_run("y", 2, wrong=1)])
    assert "too few paired seeds" in _one(unpaired, _claim())["why"]
    absent = _one(_better_and_worse(), _claim(b="z"))
    assert absent["verdict"] == UNTESTABLE and "no ok runs of z" in absent["why"]
    anywhere = _one(_better_and_worse(), _claim(b="z", tasks="any"))
    assert anywhere["task"] == "glue/sst2" and "no ok runs of z" in anywhere["why"]
    nowhere = _one(_better_and_worse(), _claim(a="w", b="z", tasks="any"))
    assert nowhere["task"] == "-" and "no runs of w or z" in nowhere["why"]


def test_failed_runs_do_not_count_as_runs():
    rows = [_run("x", s, wrong=40) for s in SEEDS]
    rows += [_run("y", s, wrong=160, status="failed") for s in SEEDS]
    out = _one(_runs(rows), _claim())
    assert out["verdict"] == UNTESTABLE and "no ok runs of y" in out["why"]


def test_each_side_is_taken_at_the_lr_its_selection_split_chooses():
    # y at lr 1e-2 is better on test but worse on selection: the claim sees y at 1e-3.
    rows = [_run("x", s, wrong=100, select=0.7) for s in SEEDS]
    rows += [_run("y", s, wrong=160, lr=1e-3, select=0.8) for s in SEEDS]
    rows += [_run("y", s, wrong=10, lr=1e-2, select=0.6) for s in SEEDS]
    out = _one(_runs(rows), _claim())
    assert out["verdict"] == "supported" and out["delta"] == pytest.approx(0.75 - 0.6)


def test_config_filters_tell_variants_of_one_method_apart():
    rows = [_run("cg_lora", s, wrong=40, config={"rank": 8, "variant": "no_shift"}) for s in SEEDS]
    rows += [_run("cg_lora", s, wrong=160, config={"rank": 8, "variant": "shift"}) for s in SEEDS]
    runs = _runs(rows)
    claim = _claim(a="cg_lora[variant=no_shift]", b="cg_lora[variant=shift]", same=["rank"])
    assert _one(runs, claim)["verdict"] == "supported"
    reverse = _claim(a="cg_lora[variant=shift]", b="cg_lora[variant=no_shift]")
    assert _one(runs, reverse)["verdict"] == "contradicted"
    # Without a filter a side holds both variants' runs: two settings, refused.
    rows_keyed = [dict(r, setting_key=json.loads(r["method_config"])["variant"]) for r in rows]
    rows_keyed += [_run("lora", s, wrong=100, setting_key="l") for s in SEEDS]
    out = _one(_runs(rows_keyed), _claim(a="cg_lora", b="lora"))
    assert out["verdict"] == UNTESTABLE and "several settings" in out["why"]


def test_a_verdict_resting_on_a_doubted_default_says_so():
    """CG-LoRA no-shift at our doubted `scale: stable` (methods/DEFAULTS.md) carries a caveat
    on every claim it is a side of; the shift variant, or no-shift with the scale overridden,
    carries none, and the verdict itself is unchanged."""
    stable = {"rank": 8, "variant": "no_shift", "scale": "stable"}
    rows = [_run("cg_lora", s, wrong=40, config=stable) for s in SEEDS]
    rows += [_run("lora_ga", s, wrong=160, config={"rank": 8}) for s in SEEDS]
    rows += [_run("cg_lora_shift", s, wrong=100, config=dict(stable, variant="shift"))
             for s in SEEDS]  # fmt: skip
    runs = _runs(rows)
    out = _one(runs, _claim(a="cg_lora", b="lora_ga"))
    assert out["verdict"] == "supported"
    assert out["caveat"].startswith("cg_lora.scale=stable: ") and "lost" in out["caveat"]
    # Either side: the doubt is named when the doubted method is B too.
    assert _one(runs, _claim(a="lora_ga", b="cg_lora"))["caveat"] == out["caveat"]
    assert _one(runs, _claim(a="cg_lora_shift", b="lora_ga"))["caveat"] == ""
    rescaled = _runs(
        [_run("cg_lora", s, wrong=40, config=dict(stable, scale="none")) for s in SEEDS]
        + rows[3:6]
    )
    out = _one(rescaled, _claim(a="cg_lora", b="lora_ga"))
    assert out["verdict"] == "supported" and out["caveat"] == ""
    # Failed runs ran nothing a verdict uses: they add no caveat.
    failed = _runs([dict(r, status="failed") for r in rows[:3]] + rows[3:6])
    assert _one(failed, _claim(a="cg_lora", b="lora_ga"))["caveat"] == ""


def test_same_fields_must_match_between_sides():
    rows = [_run("x", s, wrong=40, config={"rank": 8}) for s in SEEDS]
    rows += [_run("y", s, wrong=160, config={"rank": 16}) for s in SEEDS]
    runs = _runs(rows)
    out = _one(runs, _claim(same=["rank"]))
    assert out["verdict"] == UNTESTABLE and "rank" in out["why"]
    assert _one(runs, _claim())["verdict"] == "supported"  # without `same`, rank may differ
    # Rank filters pick rows: x[rank=16] has none.
    assert "no ok runs of x[rank=16]" in _one(runs, _claim(a="x[rank=16]"))["why"]


# -- loss, std and LR-sensitivity forms ----------------------------------------------------
def _curve(kind: str, seed: int) -> list[float]:
    jitter = 0.01 * seed
    steps = np.arange(1, 21)
    if kind == "fast":  # falls to 0.5 by step 5, then flat
        return list(1.0 - 0.5 * np.minimum(steps / 5, 1) + jitter)
    return list(1.0 - 0.7 * steps / 20 + jitter)  # slow: linear to 0.3 at step 20


def test_loss_auc_and_loss_at_step_compare_paired_seeds():
    rows = [_run("x", s, wrong=100, loss=_curve("fast", s)) for s in SEEDS]
    rows += [_run("y", s, wrong=100, loss=_curve("slow", s)) for s in SEEDS]
    runs = _runs(rows)
    auc = _one(runs, _claim("loss_auc"))
    assert auc["verdict"] == "supported" and auc["delta"] < 0
    assert _one(runs, _claim("loss_auc", a="y", b="x"))["verdict"] == "contradicted"
    # x is below y early on and above it at the end.
    early = _one(runs, _claim("loss_at_step", step=5))
    assert early["verdict"] == "supported"
    final = _one(runs, _claim("loss_at_step", step="last"))
    assert final["verdict"] == "contradicted"
    assert final["delta"] == pytest.approx(0.5 - np.mean(_curve("slow", 0)[-2:]))  # (18, 20]
    past = _one(runs, _claim("loss_at_step", step=50))
    assert past["verdict"] == UNTESTABLE and "past the last common step" in past["why"]


def test_loss_curves_without_common_steps_are_not_testable():
    rows = [_run("x", s, wrong=100, loss=[1.0, 0.5]) for s in SEEDS]
    shifted = json.dumps([[7, 1.0], [8, 0.9]])
    rows += [_run("y", s, wrong=100, loss=[1.0, 0.9], loss_curve=shifted) for s in SEEDS]
    out = _one(_runs(rows), _claim("loss_auc"))
    assert out["verdict"] == UNTESTABLE and "no step" in out["why"]


def test_seed_std_needs_enough_seeds_to_be_supported():
    seeds = range(6)
    rows = [_run("x", s, wrong=100) for s in seeds]  # exactly 75% every seed: std 0
    spread = (20, 180, 60, 140, 100, 10)
    rows += [_run("y", s, wrong=w) for s, w in zip(seeds, spread, strict=True)]
    runs = _runs(rows)
    out = _one(runs, _claim("seed_std"))
    assert out["verdict"] == "supported" and out["delta"] < 0
    assert _one(runs, _claim("seed_std", a="y", b="x"))["verdict"] == "contradicted"
    # With 3 seeds a resample of one seed (std 0 on both sides) has mass 1/9 > 2.5%.
    three = runs[runs["seed"] < 3]
    out3 = _one(three, _claim("seed_std"))
    assert out3["verdict"] == "within noise" and "always contains 0" in out3["detail"]


def test_lr_sensitivity_is_the_spread_over_the_common_lr_grid():
    rows = []
    for s in SEEDS:
        rows += [_run("x", s, wrong=40, lr=lr) for lr in (1e-4, 1e-3, 1e-2)]  # flat
        rows += [_run("y", s, wrong=w, lr=lr) for lr, w in ((1e-4, 40), (1e-3, 200))]
        rows.append(_run("y", s, wrong=120, lr=1e-2))
    runs = _runs(rows)
    out = _one(runs, _claim("lr_sensitivity"))
    assert out["verdict"] == "supported"
    assert out["delta"] == pytest.approx(0.0 - (0.9 - 0.5))
    assert _one(runs, _claim("lr_sensitivity", a="y", b="x"))["verdict"] == "contradicted"
    disjoint = _runs(
        [_run("x", s, wrong=40, lr=lr) for s in SEEDS for lr in (1e-4, 1e-3)]
        + [_run("y", s, wrong=40, lr=lr) for s in SEEDS for lr in (1e-2, 1e-1)]
    )
    out = _one(disjoint, _claim("lr_sensitivity"))
    assert out["verdict"] == UNTESTABLE and "fewer than 2 LRs in common" in out["why"]


def test_direction_verdict_and_seed_bootstrap():
    assert direction_verdict(0.1, 0.2, 1) == "supported"
    assert direction_verdict(0.1, 0.2, -1) == "contradicted"
    assert direction_verdict(-0.2, -0.1, -1) == "supported"
    assert direction_verdict(-0.1, 0.1, 1) == "within noise"
    assert direction_verdict(float("nan"), 0.1, 1) is None
    with pytest.raises(ValueError):
        direction_verdict(0.1, 0.2, 0)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0])
    r = paired_seed_bootstrap(a, b, np.mean)
    assert r["delta"] == 1.0  # paired: every resample differs by exactly 1
    assert r["ci_low"] == pytest.approx(1.0) and r["ci_high"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_seed_bootstrap(a, b[:2], np.mean)


# -- the registry ----------------------------------------------------------------------------
def _has(claims, a: str, b: str, check: str, tasks: set[str] | None = None) -> bool:
    for c in claims:
        if (str(c.a), str(c.b), c.check) == (a, b, check):
            if tasks is None or c.tasks is None or tasks <= set(c.tasks):
                return True
    return False


def test_registry_has_the_seed_papers_claims():
    claims = load_claims()
    glue3 = {"glue/cola", "glue/sst2", "glue/mrpc"}
    cg = "cg_lora[variant=no_shift]"
    assert _has(claims, cg, "lora_ga", "beats", glue3)
    assert _has(claims, cg, "lora_one", "beats", glue3)
    assert _has(claims, cg, "cg_lora_shift[variant=shift]", "beats")
    assert _has(claims, cg, "lora_ga", "loss_auc", {"glue/cola", "glue/mrpc"})
    assert _has(claims, cg, "lora_ga", "lr_sensitivity") and _has(claims, cg, "lora_ga", "seed_std")
    sb = next(c for c in claims if (str(c.a), str(c.b), c.check) == ("lora_sb", "lora_xs", "beats"))
    assert "rank" in sb.same  # "at equal rank"
    assert any(c.a.method == "lora_sb" and c.b.method == "lora" for c in claims)
    for b in ("lora", "rslora", "lora_plus", "pissa", "dora"):
        assert _has(claims, "sds_lora", b, "beats"), b
    assert _has(claims, "sds_lora", "lora", "loss_auc")
    assert _has(claims, "lora_one", "lora", "beats")
    assert _has(claims, "lora_ga", "lora", "loss_auc")
    assert {c.about for c in claims} == {"accuracy", "training speed"}
    assert {c.paper for c in claims} >= {"CG-LoRA", "LoRA-One", "LoRA-SB", "SDS-LoRA"}


def test_registry_names_real_methods_and_config_fields():
    import methods

    known = set(methods.method_names())
    for c in load_claims():
        for side in (c.a, c.b):
            assert side.method in known, (c.id, side.method)
            fields = set(methods.get_method(side.method).hyperparams({}).model_dump())
            for name, _ in side.filters:
                assert name in fields, (c.id, side, name)
            for name in c.same:
                assert name in fields, (c.id, side, name)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"check": "wins"}, "check"),
        ({"about": "memory"}, "about"),
        ({"a": "x[rank]"}, "filter"),
        ({"tasks": "glue/sst2"}, "tasks"),
        ({"check": "loss_at_step"}, "step"),
        ({"surprise": 1}, "unknown field"),
        ({"b": "x"}, "both sides"),
    ],
)
def test_invalid_claims_are_rejected(change, message):
    with pytest.raises(ClaimsError, match=message):
        parse_claims([{**_claim(), **change}])
    with pytest.raises(ClaimsError, match="duplicate"):
        parse_claims([_claim(), _claim()])


def test_side_parsing():
    side = Side.parse("cg_lora[variant=shift, rank=8]")
    assert side.method == "cg_lora" and dict(side.filters) == {"variant": "shift", "rank": 8}
    assert side.matches("cg_lora", json.dumps({"variant": "shift", "rank": 8, "alpha": 16}))
    assert not side.matches("cg_lora", json.dumps({"variant": "no_shift", "rank": 8}))
    assert not side.matches("lora", json.dumps({"variant": "shift", "rank": 8}))
    assert str(side) == "cg_lora[variant=shift,rank=8]"


# -- mean rank over tasks --------------------------------------------------------------------
def test_mean_ranks_order_methods_with_an_interval():
    rows = []
    for task in ("glue/sst2", "glue/qnli"):
        for method, wrong in (("good", 20), ("mid", 120), ("bad", 200)):
            rows += [_run(method, s, wrong=wrong, task=task) for s in SEEDS]
    rows += [_run("tie", s, wrong=120, task="glue/sst2") for s in SEEDS]
    rows += [_run("tie", s, wrong=120, task="glue/qnli") for s in SEEDS]
    runs = _runs(rows)
    table, notes = mean_ranks(runs, build_leaderboard(runs, compare=False), replicates=100)
    assert not notes
    ranks = table.set_index("method")
    assert ranks.loc["good", "mean_rank"] == 1.0 and ranks.loc["bad", "mean_rank"] == 4.0
    assert ranks.loc["mid", "mean_rank"] == ranks.loc["tie", "mean_rank"] == 2.5  # shared
    assert ranks.loc["good", "ci_high"] < ranks.loc["bad", "ci_low"]
    assert (ranks["ci_low"] <= ranks["mean_rank"]).all()
    assert (ranks["mean_rank"] <= ranks["ci_high"]).all()
    assert list(table["method"])[0] == "good" and (table["n_tasks"] == 2).all()
    # A task lacking one method is left out, and the notes say so.
    partial = runs[~((runs["method"] == "bad") & (runs["task"] == "glue/qnli"))]
    table, notes = mean_ranks(partial, build_leaderboard(partial, compare=False), replicates=50)
    assert (table["n_tasks"] == 1).all() and any("glue/qnli" in n for n in notes)


# -- the report --------------------------------------------------------------------------------
def test_report_has_a_claims_section_matching_the_evaluation(tmp_path):
    from harness.reporting.report import write_report

    out = tmp_path / "glue-minilm-main"
    shutil.copytree(
        REPO / "results" / "glue-minilm-main", out, ignore=shutil.ignore_patterns("report")
    )
    html_path, md_path = write_report(out)
    md, html = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    expected = evaluate_claims(read_runs(out))
    assert "## Claims" in md and ">Claims</h2>" in html
    assert "## Mean rank over tasks" in md
    section = md.split("## Claims", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == len(expected) + 1  # header + one row per (claim, task)
    for r in expected.itertuples():
        cells = [
            line.split(" | ")
            for line in lines
            if line.startswith(f"| {r.claim_id} |") and f"| {r.task} |" in line
        ]
        assert len(cells) == 1, (r.claim_id, r.task)
        assert cells[0][6] == r.verdict
        assert cells[0][7] == (r.caveat or "-")
        if r.verdict != UNTESTABLE:
            assert cells[0][8] == f"{r.delta:+.4f}"
    assert CLAIMS_YAML.is_file()
