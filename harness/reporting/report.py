"""A static report of one output directory, from its Parquet files alone.

`write_report(out_dir)` reads `<out>/runs.parquet` (with rows not yet compacted from the
journal, `harness.reporting.results.read_runs`) and `<out>/leaderboard.parquet`. The
leaderboard is a function of the runs: leaderboard.parquet is used only when it agrees with
a rebuild from the runs on every row (methods, tasks, run/seed/failure counts, chosen LR,
means, stds); otherwise (stale: written before a seed was appended, or edited) the report uses the
rebuilt one and says so. Without runs.parquet, leaderboard.parquet is shown as it is. It
writes
`<out>/report/index.html` (self-contained: inline CSS, plots as base64 PNG, no network
fetch; one inline script, `harness.reporting.report_interactive`, makes the leaderboard sortable and
filterable and adds a Pareto explorer with axes of the reader's choice; without JavaScript
the page is the static report) and `<out>/report/report.md` with the same plots as PNG
files beside it (no interaction).

Sections: leaderboard (test mean +- std over seeds at the chosen LR, n seeds, chosen LR,
failed/diverged counts, majority baseline; 95% CI and paired-vs-LoRA columns when
leaderboard.parquet has them, an interval over fewer than 3 seeds marked * with a
footnote; a board written before `few_seeds` is shown as stored, with a warning), score vs
LR per task (selection split and test split, each labelled; every method of the study),
training loss at the chosen LR (mean and a band over seeds, all methods of a task on the
same axes), cost vs score with the Pareto front, published numbers
(`harness.reporting.published.compare`), the mean rank of each method over tasks with a bootstrap
interval and the seed papers' claims with verdicts (`harness.reporting.claims`), failed runs, method
configurations, provenance.
Every text taken from the data is HTML-escaped (Markdown: table-escaped and HTML-escaped).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reporting import report_interactive
from harness.reporting.results import (
    CLIPPED_NOTE,
    DOUBT_MARK,
    DOUBT_NOTE,
    FEW_SEEDS_MARK,
    FEW_SEEDS_NOTE,
    LEADERBOARD_FILE,
    MIN_RELIABLE_SEEDS,
    RUNS_FILE,
    ResultsError,
    board_doubts,
    build_leaderboard,
    has_runs,
    leaderboard_warnings,
    read_parquet_file,
    read_runs,
    write_files_atomically,
)
from harness.sweeps.plan import planned_keys

REPORT_DIR = "report"
HTML_FILE = "index.html"
MD_FILE = "report.md"
FIG_PREFIX = "fig_"

# Optional leaderboard columns another part of the harness may add; shown when present.
CI_COLUMNS = ("test_ci_low", "test_ci_high")
PAIRED_RE = re.compile(r"(paired|vs_lora|_vs_|p_value|pvalue)", re.IGNORECASE)

COST_AXES = (
    ("init_time_s", "init time (s)"),
    ("train_time_s", "train time (s)"),
    ("peak_memory_mb", "peak memory (MB)"),
    ("trainable_params", "trainable parameters"),
)
NA = "n/a"


# -- formatting -------------------------------------------------------------------------------
def _blank(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, float | np.floating) and math.isnan(float(v)):
        return True
    return isinstance(v, str) and v.strip() == ""


def fmt_score(v: Any) -> str:
    """Scores, stds, CIs, deltas: 4 decimals."""
    return NA if _blank(v) else f"{float(v):.4f}"


def fmt_delta(v: Any) -> str:
    return NA if _blank(v) else f"{float(v):+.4f}"


def fmt_lr(v: Any) -> str:
    return NA if _blank(v) else f"{float(v):.3g}"


def fmt_num(v: Any) -> str:
    """Times, memory, throughput: 3 significant digits, whole numbers from 1000 up."""
    if _blank(v):
        return NA
    v = float(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def fmt_int(v: Any) -> str:
    return NA if _blank(v) else f"{int(v):,}"


def fmt_mean_std(mean: Any, std: Any) -> str:
    if _blank(mean):
        return NA
    return fmt_score(mean) if _blank(std) else f"{fmt_score(mean)} ± {fmt_score(std)}"


def _fmt_any(v: Any) -> str:
    if _blank(v):
        return NA
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}"
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "x"


def _json(text: Any) -> Any:
    if _blank(text):
        return None
    try:
        return json.loads(str(text))
    except (json.JSONDecodeError, TypeError):
        return None


def _h(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _md(v: Any) -> str:
    text = str(v).replace("\r", " ").replace("\n", " ")
    text = html.escape(text, quote=False)
    return text.replace("|", "\\|")


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]  # plain-text cells, escaped on output
    # The raw value behind each cell (the leaderboard's in-page sorting), when there is one.
    sort_keys: list[list[Any]] | None = None

    def html(self, cls: str = "") -> str:
        head = "".join(f"<th>{_h(c)}</th>" for c in self.headers)
        body = "\n".join(
            "<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in self.rows
        )
        klass = f' class="{cls}"' if cls else ""
        return f"<table{klass}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"

    def md(self) -> str:
        lines = [
            "| " + " | ".join(_md(c) for c in self.headers) + " |",
            "|" + "|".join("---" for _ in self.headers) + "|",
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(_md(c) for c in row) + " |")
        return "\n".join(lines)


@dataclass
class Figure:
    name: str  # file name (PNG beside report.md)
    title: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    # ("p" | "h3" | "warn", text), ("table", Table), ("fig", Figure)
    blocks: list[tuple[str, Any]]


# -- data -----------------------------------------------------------------------------------
# What a stored leaderboard must agree on with a rebuild from the runs to be used as it is.
CONSISTENCY_COLUMNS = (
    "n_runs", "n_failed", "n_diverged", "n_seeds", "seeds", "chosen_lr", "test_mean",
    "test_std", "selection_mean",
)  # fmt: skip


def leaderboard_is_current(stored: pd.DataFrame, fresh: pd.DataFrame) -> bool:
    """Whether `stored` has the rows and numbers a rebuild from the runs (`fresh`) has."""
    if len(stored) != len(fresh) or not {"method", "task"} <= set(stored.columns):
        return False
    a = stored.set_index(["method", "task"]).sort_index()
    b = fresh.set_index(["method", "task"]).sort_index()
    if not a.index.equals(b.index):
        return False
    for col in CONSISTENCY_COLUMNS:
        if col not in a.columns:
            if col in ("n_seeds", "test_mean"):
                return False
            continue
        x, y = a[col], b[col]
        if col == "seeds":
            if not (x.astype("string").fillna("") == y.astype("string").fillna("")).all():
                return False
            continue
        x = pd.to_numeric(x, errors="coerce").to_numpy(float)
        y = pd.to_numeric(y, errors="coerce").to_numpy(float)
        if not np.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True):
            return False
    return True


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(runs, leaderboard, notes); ResultsError for unreadable or inconsistent files."""
    runs_there, board_path = has_runs(out), out / LEADERBOARD_FILE
    if not runs_there and not board_path.is_file():
        raise FileNotFoundError(f"neither {RUNS_FILE} nor {LEADERBOARD_FILE} in {out}")
    stored = read_parquet_file(board_path)
    if not runs_there:
        return pd.DataFrame(), stored, []
    runs = read_runs(out)
    planned = planned_keys(out)
    quick = build_leaderboard(runs, compare=False, planned=planned)  # no bootstrap: cheap
    if stored is not None and leaderboard_is_current(stored, quick):
        # Doubts come from the runs and methods/DEFAULTS.md as they are now, so a board
        # written before a default was doubted (or before the column) still shows them.
        doubts = quick.set_index(["method", "task"])["doubted_defaults"]
        keys = pd.MultiIndex.from_frame(stored[["method", "task"]])
        board, notes = stored.assign(doubted_defaults=doubts.reindex(keys).to_numpy()), []
    else:
        board = build_leaderboard(runs, planned=planned)
        notes = (
            [
                f"{LEADERBOARD_FILE} is out of date with {RUNS_FILE} (its rows or numbers "
                "differ from a rebuild, e.g. runs were appended after it was written); this "
                f"report uses a leaderboard rebuilt from {RUNS_FILE}. `harness leaderboard "
                f"{out}` updates the file."
            ]
            if stored is not None
            else []
        )
    if "partial" in board and board["partial"].fillna(False).astype(bool).any():
        rows = board[board["partial"].fillna(False).astype(bool)]
        pairs = ", ".join(f"{r.method} on {r.task} ({r.n_missing} of {r.n_planned} trials "
                          "missing)" for r in rows.itertuples())  # fmt: skip
        notes.append(f"PARTIAL: the sweep has not finished: {pairs}; rerun it to complete them")
    return runs, board, notes + leaderboard_warnings(board)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index)


def _ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty or "status" not in runs.columns:
        return runs.iloc[0:0]
    return runs[runs["status"] == "ok"]


def _method_colors(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _new_figure(width: float, height: float):
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _unique_str(series: pd.Series) -> list[str]:
    return sorted({str(v) for v in series if not _blank(v)})


# -- plots ----------------------------------------------------------------------------------
def _lr_figure(task: str, runs: pd.DataFrame, board: pd.DataFrame, colors) -> Figure | None:
    ok = _ok_runs(runs)
    ok = ok[ok["task"] == task]
    if ok.empty:
        return None
    sel_metric = ", ".join(_unique_str(_col(ok, "selection_metric"))) or "selection score"
    test_metric = ", ".join(_unique_str(_col(ok, "test_metric"))) or "test score"
    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    panels = (
        ("selection_score", f"selection split: {sel_metric}\n(used to choose the LR)"),
        ("test_score", f"test split: {test_metric}\n(reported; not used to choose the LR)"),
    )
    brows = board[board["task"] == task]
    has_base = bool(_col(brows, "majority_baseline").notna().any())
    for ax, (col, title) in zip(axes, panels, strict=True):
        for method, g in ok.groupby("method", sort=True):
            stats = g.groupby("lr")[col].agg(["mean", "std", "count"]).sort_index()
            stats = stats[stats["mean"].notna()]
            if stats.empty:
                continue
            ax.errorbar(
                stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", ms=4,
                capsize=3, lw=1.3, color=colors.get(method), label=method,
            )  # fmt: skip
            chosen = brows.loc[brows["method"] == method, "chosen_lr"]
            if len(chosen) and not _blank(chosen.iloc[0]) and chosen.iloc[0] in stats.index:
                lr = chosen.iloc[0]
                ax.plot(
                    [lr], [stats.loc[lr, "mean"]], marker="*", ms=14, mfc="none",
                    mec=colors.get(method), mew=1.5,
                )  # fmt: skip
        if col == "test_score":
            base = _col(brows, "majority_baseline").dropna()
            if len(base):
                ax.axhline(float(base.iloc[0]), color="grey", ls="--", lw=1, label="majority class")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (mean ± std over seeds)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.subplots_adjust(top=0.80, wspace=0.22)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.91, 0.5), fontsize=8)
    fig.suptitle(f"{task}: score vs learning rate", fontsize=11)
    n = ok.groupby(["method", "lr"]).size()
    seeds = str(n.min()) if n.min() == n.max() else f"{n.min()}-{n.max()}"
    absent = sorted(set(colors) - set(ok["method"].astype(str)))
    return Figure(
        name=f"{FIG_PREFIX}lr_{_slug(task)}.png",
        title=f"{task}: score vs learning rate",
        caption=(
            "Each point: mean ± std over the seeds that finished ok at that LR "
            f"({seeds} seeds). Left: selection split (carved from train; "
            "the LR with the best mean here is chosen). Right: test split (what the leaderboard "
            "reports). Hollow star: the chosen LR (only LRs whose every seed finished ok are "
            "eligible)."
            + (" Dashed: majority-class baseline." if has_base else "")
            + (
                " Every method of the study is drawn; no finished run on this task: "
                + ", ".join(absent)
                + "."
                if absent
                else " Every method of the study is drawn."
            )
        ),
        png=_png(fig),
    )


def _loss_figure(task: str, runs: pd.DataFrame, board: pd.DataFrame, colors) -> Figure | None:
    ok = _ok_runs(runs)
    ok = ok[(ok["task"] == task)] if not ok.empty else ok
    if ok.empty or "loss_curve" not in ok.columns:
        return None
    fig = _new_figure(9, 4.2)
    ax = fig.subplots()
    drawn, windows, n_seeds = 0, set(), set()
    for row in board[board["task"] == task].itertuples():
        if _blank(row.chosen_lr):
            continue
        g = ok[(ok["method"] == row.method) & (ok["lr"] == row.chosen_lr)]
        per_step: dict[float, list[float]] = {}
        for curve in g["loss_curve"]:
            for point in _json(curve) or []:
                if len(point) >= 2 and point[1] is not None and math.isfinite(point[1]):
                    per_step.setdefault(float(point[0]), []).append(float(point[1]))
        if not per_step:
            continue
        steps = np.array(sorted(per_step))
        mean = np.array([np.mean(per_step[s]) for s in steps])
        std = np.array([np.std(per_step[s], ddof=1) if len(per_step[s]) > 1 else 0.0
                        for s in steps])  # fmt: skip
        window = max(1, len(steps) // 15)
        windows.add(window)
        smooth = pd.Series(mean).rolling(window, min_periods=1, center=True).mean()
        band = pd.Series(std).rolling(window, min_periods=1, center=True).mean()
        n_seeds.add(len(g))
        color = colors.get(row.method)
        ax.fill_between(steps, smooth - band, smooth + band, color=color, alpha=0.15, lw=0)
        ax.plot(steps, mean, color=color, alpha=0.25, lw=0.8)
        ax.plot(
            steps, smooth, color=color, lw=1.6, label=f"{row.method} (lr {fmt_lr(row.chosen_lr)})"
        )
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"{task}: training loss at each method's chosen LR", fontsize=11)
    w = ", ".join(str(x) for x in sorted(windows))
    return Figure(
        name=f"{FIG_PREFIX}loss_{_slug(task)}.png",
        title=f"{task}: training loss at the chosen LR",
        caption=(
            "runs.parquet `loss_curve`, averaged over the seeds at each method's chosen LR, "
            "every method of the task on the same axes. "
            f"Faint: the per-step mean; solid: its centred moving average over {w} step(s); "
            "band: ± the std over seeds at each step (ddof 1, same moving average; "
            f"{', '.join(str(n) for n in sorted(n_seeds))} seeds)."
        ),
        png=_png(fig),
    )


def pareto_front(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Boolean mask of points no other point beats (cost <= and score >=, one strictly)."""
    costs, scores = np.asarray(costs, float), np.asarray(scores, float)
    valid = np.isfinite(costs) & np.isfinite(scores)
    front = np.zeros(len(costs), dtype=bool)
    for i in np.flatnonzero(valid):
        better = (
            valid
            & (costs <= costs[i])
            & (scores >= scores[i])
            & ((costs < costs[i]) | (scores > scores[i]))
        )
        front[i] = not better.any()
    return front


def _cost_figure(task: str, board: pd.DataFrame, colors) -> tuple[Figure | None, list[list]]:
    b = board[(board["task"] == task) & board["test_mean"].notna()]
    rows: list[list] = []
    if b.empty:
        return None, rows
    fig = _new_figure(16, 4.0)
    axes = fig.subplots(1, len(COST_AXES), sharey=True)
    scores = b["test_mean"].to_numpy(float)
    stds = b["test_std"].fillna(0.0).to_numpy(float)
    for ax, (col, label) in zip(axes, COST_AXES, strict=True):
        costs = pd.to_numeric(_col(b, col), errors="coerce").to_numpy(float)
        front = pareto_front(costs, scores)
        for j, method in enumerate(b["method"]):
            if not math.isfinite(costs[j]):
                continue
            ax.errorbar(
                costs[j], scores[j], yerr=stds[j], fmt="o", ms=7 if front[j] else 5,
                color=colors.get(method), mec="black" if front[j] else colors.get(method),
                mew=1.2, capsize=2,
            )  # fmt: skip
            ax.annotate(method, (costs[j], scores[j]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        if front.any():
            order = np.argsort(costs[front])
            fx, fy = costs[front][order], scores[front][order]
            ax.step(fx, fy, where="post", color="black", lw=1, ls="--", label="Pareto front")
        finite = costs[np.isfinite(costs)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:
            ax.set_xscale("log")
        ax.set_xlabel(label + " (lower is cheaper)")
        ax.grid(alpha=0.3)
        rows.append(
            [task, label, ", ".join(str(m) for m, f in zip(b["method"], front, strict=True) if f)]
        )
    metric = ", ".join(_unique_str(b["test_metric"]))
    axes[0].set_ylabel(f"test {metric} (mean ± std)")
    fig.subplots_adjust(wspace=0.08)
    fig.suptitle(f"{task}: test score vs cost (black edge, dashed: Pareto front)", fontsize=11)
    figure = Figure(
        name=f"{FIG_PREFIX}cost_{_slug(task)}.png",
        title=f"{task}: cost vs score",
        caption=(
            "Leaderboard rows (chosen LR): test mean ± std against the mean init time, "
            "train time (optimizer steps only), peak memory (see peak_memory_kind in the "
            "provenance) and trainable parameter count. Black-edged points joined by the "
            "dashed line are Pareto-optimal: no other method is both at most as costly and at "
            "least as good (one of them strictly)."
        ),
        png=_png(fig),
    )
    return figure, rows


# -- sections -------------------------------------------------------------------------------
def _leaderboard_table(board: pd.DataFrame) -> Table:
    ci = [c for c in CI_COLUMNS if c in board.columns]
    paired = [c for c in board.columns if PAIRED_RE.search(c) and c not in ci]
    headers = [
        "task", "method", "metric", "test mean ± std", "n seeds", "chosen LR",
        "selection mean", "failed", "diverged", "majority baseline",
    ]  # fmt: skip
    headers += ["95% CI low" if c == "test_ci_low" else "95% CI high" for c in ci]
    headers += paired
    headers += ["trainable params", "init s", "train s", "peak MB", "samples/s"]
    # A board written before `few_seeds` existed is shown as stored (_interval_notes says so).
    marked = "few_seeds" in board.columns
    rows, keys = [], []
    for r in board.to_dict("records"):
        row = [
            r.get("task"), _method_cell(r), _fmt_any(r.get("test_metric")),
            fmt_mean_std(r.get("test_mean"), r.get("test_std")), _fmt_any(r.get("n_seeds")),
            fmt_lr(r.get("chosen_lr")), fmt_score(r.get("selection_mean")),
            _fmt_any(r.get("n_failed")), _fmt_any(r.get("n_diverged")),
            fmt_score(r.get("majority_baseline")),
        ]  # fmt: skip
        few = marked and not _blank(r.get("few_seeds")) and bool(r.get("few_seeds"))
        row += [_ci_text(r.get(c), few) for c in ci]
        row += [_fmt_any(r.get(c)) for c in paired]
        row += [
            fmt_int(r.get("trainable_params")), fmt_num(r.get("init_time_s")),
            fmt_num(r.get("train_time_s")), fmt_num(r.get("peak_memory_mb")),
            fmt_num(r.get("samples_per_s")),
        ]  # fmt: skip
        rows.append(row)
        # The same columns, unformatted: what a click on a header sorts by.
        keys.append(
            [r.get(c) for c in ("task", "method", "test_metric", "test_mean", "n_seeds",
                                "chosen_lr", "selection_mean", "n_failed", "n_diverged",
                                "majority_baseline", *ci, *paired, "trainable_params",
                                "init_time_s", "train_time_s", "peak_memory_mb",
                                "samples_per_s")]
        )  # fmt: skip
    return Table(headers, rows, sort_keys=keys)


def _method_cell(record: dict[str, Any]) -> str:
    method = str(record.get("method"))
    return f"{method} {DOUBT_MARK}" if board_doubts(record.get("doubted_defaults")) else method


def _ci_text(value: Any, few_seeds: bool) -> str:
    text = fmt_score(value)
    return f"{text}{FEW_SEEDS_MARK}" if few_seeds and text != NA else text


def _interval_notes(board: pd.DataFrame) -> list[tuple[str, str]]:
    """The footnote under the leaderboard: what its interval marks mean (or, for a board
    written before intervals were cut and marked, that it is shown as stored)."""
    if board.empty or "test_ci_low" not in board.columns:
        return []
    has_interval = board["test_ci_low"].notna()
    if "few_seeds" not in board.columns:
        seeds = pd.to_numeric(_col(board, "n_seeds"), errors="coerce")
        few = int((has_interval & (seeds < MIN_RELIABLE_SEEDS)).sum())
        if not few:
            return []
        return [
            (
                "warn",
                f"{LEADERBOARD_FILE} predates the few_seeds and ci_clipped columns: its 95% "
                f"intervals are shown as stored, not cut to the metric's range, and {few} "
                f"row(s) have one over fewer than {MIN_RELIABLE_SEEDS} seeds (n < "
                f"{MIN_RELIABLE_SEEDS} seeds: interval unreliable). `harness leaderboard` "
                "rewrites it.",
            )
        ]
    notes = []
    if (has_interval & board["few_seeds"].fillna(False).astype(bool)).any():
        notes.append(("p", FEW_SEEDS_NOTE + " (the n seeds column says how many)."))
    if _col(board, "ci_clipped").fillna(False).astype(bool).any():
        notes.append(("p", CLIPPED_NOTE + "."))
    doubts = sorted({d for cell in _col(board, "doubted_defaults") for d in board_doubts(cell)})
    if doubts:
        notes.append(("p", f"{DOUBT_NOTE}: " + "; ".join(doubts) + "."))
    return notes


def _published_section(board: pd.DataFrame, runs: pd.DataFrame) -> Section:
    from harness.reporting.published import (
        MODEL_FAMILIES,
        PUBLISHED_CSV,
        compare,
        model_family,
        stand_in_reason,
    )

    blocks: list[tuple[str, Any]] = []
    try:
        matches = compare(board)
    except (OSError, ValueError) as err:
        blocks.append(("warn", f"Published numbers could not be loaded: {err}"))
        return Section("Published numbers", blocks)
    blocks.append(
        (
            "p",
            f"Numbers transcribed from the papers' tables ({PUBLISHED_CSV.name}, "
            "results/published/). A published number is set beside ours only when model "
            "family, task, method and metric all match (harness/reporting/published.py "
            "documents the "
            "model-id mapping); rank is shown beside it. Training budget and data are the "
            "papers' own (their settings column) and differ from this sweep's; read a delta "
            "as a sanity check, not a reproduction.",
        )
    )
    excluded = [
        f"{r.get('task')} / {r.get('method')} ({reason})"
        for r in board.to_dict("records")
        if model_family(r.get("model_id")) and (reason := stand_in_reason(r))
    ]
    if excluded:
        blocks.append(
            (
                "warn",
                "Not compared, their data is a labelled stand-in or subset, not the paper's "
                "dataset: " + "; ".join(excluded),
            )
        )
    if matches.empty:
        ids = _unique_str(_col(board, "model_id"))
        fams = sorted({f for f in (model_family(m) for m in ids) if f})
        if not fams:
            msg = (
                f"No published number matches this output: its model(s) {', '.join(ids)} "
                "belong to no model family with published numbers "
                f"({', '.join(sorted(MODEL_FAMILIES))}), so nothing is compared."
            )
        else:
            msg = (
                f"No published number matches this output: model family {', '.join(fams)} "
                "has published numbers, but none for these (task, method, metric) "
                "combinations on the named datasets."
            )
        blocks.append(("p", msg))
        return Section("Published numbers", blocks)
    budgets = _unique_str(_col(runs, "budget")) if not runs.empty else []
    if budgets:
        blocks.append(("p", "This sweep's budget: " + "; ".join(budgets)))
    headers = [
        "task", "method", "metric", "variant", "ours (mean ± std)", "n seeds", "our rank",
        "published", "published rank", "delta (ours - published)", "source", "published setting",
    ]  # fmt: skip

    def as_rows(df: pd.DataFrame) -> list[list]:
        return [
            [
                r["task"],
                r["method"],
                r["metric"],
                r["variant"] or "-",
                fmt_mean_std(r["our_mean"], r["our_std"]),
                _fmt_any(r["our_n_seeds"]),
                _fmt_any(r["our_rank"]),
                fmt_mean_std(r["published_value"], r["published_std"]),
                _fmt_any(r["published_rank"]),
                fmt_delta(r["delta"]),
                r["source"],
                r["setting"],
            ]  # fmt: skip
            for r in df.to_dict("records")
        ]

    same = matches[matches["rank_match"].fillna(False).astype(bool)]
    other = matches[~matches.index.isin(same.index)]
    if len(same):
        blocks.append(("h3", "Same model family, task, method, metric and rank"))
        blocks.append(("table", Table(headers, as_rows(same))))
    if len(other):
        blocks.append(("h3", "Same model family, task, method and metric; rank differs or unknown"))
        blocks.append(("table", Table(headers, as_rows(other))))
    return Section("Published numbers", blocks)


def _rank_section(runs: pd.DataFrame, board: pd.DataFrame) -> Section:
    from harness.reporting.claims import mean_ranks

    title = "Mean rank over tasks"
    try:
        table, notes = mean_ranks(runs, board)
    except (ResultsError, ValueError) as err:
        return Section(title, [("warn", f"Mean ranks could not be computed: {err}")])
    blocks: list[tuple[str, Any]] = [
        (
            "p",
            "Each method's rank on each task (1 = best mean test score over seeds at its "
            "chosen LR; ties share the average rank) and its mean over tasks. The 95% interval "
            "is the bootstrap the leaderboard uses: every replicate resamples, per task, the "
            "seeds (common to all methods) and the test items (the same for every method), "
            "recomputes each method's score and re-ranks (200 replicates). A task enters only "
            "if every method has a chosen LR there, on the same settings and test items.",
        )
    ]
    blocks += [("warn", n) for n in notes]
    if table.empty:
        blocks.append(("p", "No task has every method ranked on comparable runs."))
        return Section(title, blocks)
    rank_cols = [c for c in table.columns if c.startswith("rank ")]
    headers = ["method", *rank_cols, "mean rank", "95% CI low", "95% CI high", "tasks"]
    rows = [
        [r["method"], *(f"{r[c]:.1f}" for c in rank_cols), f"{r['mean_rank']:.2f}",
         f"{r['ci_low']:.2f}", f"{r['ci_high']:.2f}", _fmt_any(r["n_tasks"])]
        for r in table.to_dict("records")
    ]  # fmt: skip
    blocks.append(("table", Table(headers, rows)))
    return Section(title, blocks)


def _claims_section(runs: pd.DataFrame) -> Section:
    from harness.reporting.claims import CLAIMS_YAML, ClaimsError, evaluate_claims, load_claims

    title = "Claims"
    try:
        claims = load_claims()
    except ClaimsError as err:
        return Section(title, [("warn", f"The claims registry could not be loaded: {err}")])
    blocks: list[tuple[str, Any]] = [
        (
            "p",
            f"The seed papers' claims ({CLAIMS_YAML.name}, results/published/), each checked "
            "on this output's runs, one row per claim and task. delta = A - B; the interval is "
            "a paired 95% bootstrap (beats: over seeds and test items at each side's chosen "
            "LR; loss, std and LR-spread forms: over paired seeds). Supported: the interval "
            "excludes 0 in the claimed direction; contradicted: it excludes 0 in the other; "
            "within noise: it contains 0. A claim is checked only between runs of the same "
            "task, model, protocol, data, budget and test items; otherwise, or with no runs of "
            "a side, or fewer than 2 paired seeds, it is not testable here and the row says why.",
        )
    ]
    if runs.empty:
        blocks.append(("p", f"No {RUNS_FILE} here: every claim is not testable."))
    result = evaluate_claims(runs if not runs.empty else pd.DataFrame(), claims)
    counts = result["verdict"].value_counts()
    blocks.append(
        (
            "p",
            f"{len(claims)} claims, {len(result)} rows: "
            + ", ".join(f"{int(v)} {k}" for k, v in counts.items())
            + _caveat_count(result),
        )
    )
    headers = [
        "claim", "paper", "about", "task", "A", "B", "verdict", "caveat", "delta (A - B)",
        "95% CI", "seeds", "why / detail", "checkable form", "claim in words", "source",
    ]  # fmt: skip
    rows = []
    for r in result.to_dict("records"):
        ci = NA if _blank(r["ci_low"]) else f"[{fmt_delta(r['ci_low'])}, {fmt_delta(r['ci_high'])}]"
        rows.append(
            [
                r["claim_id"],
                r["paper"],
                r["about"],
                r["task"],
                r["a"],
                r["b"],
                r["verdict"],
                r["caveat"] or "-",
                fmt_delta(r["delta"]),
                ci,
                _fmt_any(r["n_seeds"] or None),
                "; ".join(x for x in (r["why"], r["detail"]) if x),
                r["form"],
                r["claim"],
                r["source"],
            ]  # fmt: skip
        )
    blocks.append(("table", Table(headers, rows)))
    return Section(title, blocks)


def _caveat_count(result: pd.DataFrame) -> str:
    """'; of the supported and contradicted rows, N rest on a doubted default' (or "")."""
    decided = result[result["verdict"].isin(["supported", "contradicted"])]
    n = int((decided["caveat"] != "").sum())
    if not n:
        return ""
    return (
        f". Of the {len(decided)} supported or contradicted rows, {n} rest on a default that "
        "methods/DEFAULTS.md doubts is the authors' (the caveat column names it): they judge "
        "our reconstruction of that method, not necessarily the paper's"
    )


def _data_flags(kinds: list[str], sources: list[str]) -> list[str]:
    flags = []
    for kind in kinds:
        if "stand" in kind.lower():
            flags.append(
                f"data_kind {kind!r}: STAND-IN data - real data of the same kind, not the "
                "named dataset; not comparable to published numbers on the named dataset."
            )
        elif kind != "hub":
            flags.append(
                f"data_kind {kind!r}: not read from the Hugging Face hub; a local copy "
                "(origin, path and fingerprint per split below)."
            )
    if any(re.search(r"stand[- _]?in", s, re.IGNORECASE) for s in sources):
        flags.append(
            "data_source or protocol mentions a stand-in: some split is not the named dataset "
            "(see the Data table below)."
        )
    return flags


def _model_flags(models: pd.DataFrame) -> list[str]:
    flags = []
    for r in models.to_dict("records"):
        text = " ".join(str(r.get(c) or "") for c in ("model_id", "model_revision", "model_source"))
        if "random-init" in text.lower() or "random_init" in text.lower():
            flags.append(
                f"model {r.get('model_id')}: RANDOM-INIT, NOT PRETRAINED - a pipeline check "
                "only; its scores say nothing about the method on a pretrained model."
            )
        if str(r.get("model_source") or "").startswith("pypi-package:"):
            flags.append(
                f"model {r.get('model_id')}: loaded from a packaged copy "
                f"({r.get('model_revision')}), not from the hub."
            )
    return list(dict.fromkeys(flags))  # one note per model, however many install paths


def _split_rows(task: str, source: Any) -> list[list]:
    prov = _json(source)
    if not isinstance(prov, dict):
        return [[task, "-", _fmt_any(source), "", "", "", "", ""]]
    used_test = prov.get("test_rows") if isinstance(prov.get("test_rows"), dict) else {}
    splits = []
    if isinstance(prov.get("train"), dict):
        used = f"{prov.get('train_rows', NA)} train + {prov.get('selection_rows', NA)} selection"
        splits.append(("train", prov["train"], used))
    for name, p in (prov.get("test") or {}).items():
        if isinstance(p, dict):
            splits.append((f"test:{name}", p, _fmt_any(used_test.get(name))))
    out = []
    for name, p, used in splits:
        known = {"source", "path", "origin", "rows", "fingerprint"}
        rest = {k: v for k, v in p.items() if k not in known}
        out.append(
            [
                task,
                name,
                _fmt_any(p.get("source")),
                _fmt_any(p.get("path") or p.get("hub_id") or p.get("repo")),
                _fmt_any(p.get("origin")),
                _fmt_any(p.get("rows")),
                used,
                _fmt_any(p.get("fingerprint"))
                + (f" {json.dumps(rest, sort_keys=True)}" if rest else ""),
            ]
        )
    return out


def _provenance_section(runs: pd.DataFrame, board: pd.DataFrame) -> Section:
    src = runs if not runs.empty else board
    blocks: list[tuple[str, Any]] = []
    mcols = [c for c in ("model_id", "model_revision", "model_source") if c in src.columns]
    models = src[mcols].drop_duplicates() if mcols else pd.DataFrame()
    kinds = _unique_str(_col(src, "data_kind"))
    sources = _unique_str(_col(src, "data_source")) + _unique_str(_col(src, "protocol"))
    for flag in _model_flags(models) + _data_flags(kinds, sources):
        blocks.append(("warn", flag))
    blocks.append(("h3", "Model"))
    blocks.append(
        (
            "table",
            Table(
                ["model_id", "model_revision", "model_source"],
                [[_fmt_any(r.get(c)) for c in mcols] for r in models.to_dict("records")],
            ),
        )
    )
    blocks.append(("h3", "Data"))
    blocks.append(("p", "data_kind: " + (", ".join(kinds) or NA)))
    data_rows: list[list] = []
    if {"task", "data_source"} <= set(src.columns):
        for task, g in src.groupby("task", sort=True):
            for source in _unique_str(g["data_source"]):
                data_rows += _split_rows(str(task), source)
    blocks.append(
        (
            "table",
            Table(
                [
                    "task",
                    "split",
                    "source",
                    "path",
                    "origin",
                    "rows in split",
                    "rows used",
                    "fingerprint",
                ],
                data_rows,
            ),
        )
    )
    info = []
    for col, label in (
        ("sweep", "sweep"), ("protocol", "protocol"), ("budget", "budget"),
        ("git_commit", "git commit"), ("device", "device"), ("hostname", "hostname"),
        ("threads", "threads per trial"), ("peak_memory_kind", "peak memory kind"),
    ):  # fmt: skip
        values = _unique_str(_col(src, col))
        if values:
            info.append([label, "; ".join(values)])
    started = _unique_str(_col(src, "started_at"))
    if started:
        info.append(["started", f"{started[0]} … {started[-1]}"])
    if any("+dirty" in v for v in _unique_str(_col(src, "git_commit"))):
        blocks.append(("warn", "A git commit is marked +dirty: uncommitted code produced rows."))
    blocks.append(("h3", "Runs"))
    blocks.append(("table", Table(["field", "value(s)"], info)))
    versions: dict[str, set[str]] = {}
    for text in _unique_str(_col(src, "packages")):
        parsed = _json(text)
        if isinstance(parsed, dict):
            for k, v in parsed.items():
                versions.setdefault(str(k), set()).add(str(v))
        elif isinstance(parsed, list):  # leaderboard _unique of several JSON strings
            for item in parsed:
                inner = _json(item)
                if isinstance(inner, dict):
                    for k, v in inner.items():
                        versions.setdefault(str(k), set()).add(str(v))
    blocks.append(("h3", "Packages"))
    blocks.append(
        (
            "table",
            Table(
                ["package", "version(s)"],
                [[k, ", ".join(sorted(v))] for k, v in sorted(versions.items())],
            ),
        )
    )
    return Section("Provenance", blocks)


def _build_sections(
    runs: pd.DataFrame, board: pd.DataFrame, notes: list[str] | None = None
) -> tuple[str, list[Section]]:
    sweep = ", ".join(_unique_str(_col(runs if not runs.empty else board, "sweep"))) or "sweep"
    tasks = list(dict.fromkeys(str(t) for t in board["task"])) if len(board) else []
    methods = sorted({str(m) for m in board["method"]}) if len(board) else []
    colors = _method_colors(methods)
    sections: list[Section] = []

    n_runs = len(runs)
    status = runs["status"].value_counts().to_dict() if "status" in runs.columns else {}
    summary = [
        (
            "p",
            f"{n_runs} runs ({', '.join(f'{v} {k}' for k, v in sorted(status.items())) or 'none'}"
            f"), {len(methods)} methods x {len(tasks)} tasks; models: "
            f"{', '.join(_unique_str(_col(board, 'model_id'))) or NA}.",
        ),
        (
            "p",
            "Each method's LR is chosen by the mean selection score (a split carved from "
            "train); the test columns are the official evaluation split at that LR, mean ± "
            "std (ddof 1) over seeds. An LR with any failed or diverged seed is not eligible.",
        ),
    ]
    src = runs if not runs.empty else board
    mcols = [c for c in ("model_id", "model_revision", "model_source") if c in src.columns]
    flags = _model_flags(src[mcols].drop_duplicates() if mcols else pd.DataFrame())
    sources = _unique_str(_col(src, "data_source")) + _unique_str(_col(src, "protocol"))
    flags += _data_flags(_unique_str(_col(src, "data_kind")), sources)
    summary += [("warn", f) for f in flags]
    summary += [("warn", n) for n in notes or []]
    protocols = _unique_str(_col(src, "protocol"))
    if protocols:
        summary.append(
            (
                "p",
                "Protocol(s), as the rows record them (which split stands in as the test split, "
                "e.g. GLUE's official validation split since its test labels are hidden): "
                + "; ".join(protocols),
            )
        )
    sections.append(Section("Summary", summary))

    leaderboard = _leaderboard_table(board)
    leaderboard_blocks: list[tuple[str, Any]] = [("ltable", leaderboard)]
    leaderboard_blocks += _interval_notes(board)
    if len(board):
        from matplotlib.colors import to_hex

        payload = report_interactive.explorer_payload(
            board, leaderboard.headers, leaderboard.sort_keys or [],
            {m: to_hex(c) for m, c in colors.items()},
        )  # fmt: skip
        leaderboard_blocks.append(("explorer", payload))  # HTML only: sorting, filters, plot
    sections.append(Section("Leaderboard", leaderboard_blocks))
    sections.append(_rank_section(runs, board))

    lr_blocks: list[tuple[str, Any]] = []
    loss_blocks: list[tuple[str, Any]] = []
    cost_blocks: list[tuple[str, Any]] = []
    front_rows: list[list] = []
    for task in tasks:
        if not runs.empty:
            fig = _lr_figure(task, runs, board, colors)
            if fig:
                lr_blocks.append(("fig", fig))
            fig = _loss_figure(task, runs, board, colors)
            if fig:
                loss_blocks.append(("fig", fig))
        fig, rows = _cost_figure(task, board, colors)
        if fig:
            cost_blocks.append(("fig", fig))
        front_rows += rows
    if front_rows:
        cost_blocks.append(("table", Table(["task", "cost", "Pareto-optimal methods"], front_rows)))
    none = ("p", "No finished runs to plot.")
    sections.append(Section("Score vs learning rate", lr_blocks or [none]))
    sections.append(Section("Training loss", loss_blocks or [none]))
    sections.append(Section("Cost vs score", cost_blocks or [none]))
    sections.append(_published_section(board, runs))
    sections.append(_claims_section(runs))

    if "status" in runs.columns:
        bad = runs[runs["status"] != "ok"]
        if len(bad):
            rows = [
                [
                    r.get("task"),
                    r.get("method"),
                    fmt_lr(r.get("lr")),
                    _fmt_any(r.get("seed")),
                    r.get("status"),
                    str(r.get("error") or "")[:500],
                ]  # fmt: skip
                for r in bad.to_dict("records")
            ]
            table = Table(["task", "method", "LR", "seed", "status", "error"], rows)
            sections.append(Section("Failed and diverged runs", [("table", table)]))

    cfg_rows = []
    cfg_src = runs if "method_config" in runs.columns else board
    if "method_config" in cfg_src.columns:
        for method, g in cfg_src.groupby("method", sort=True):
            for cfg in _unique_str(g["method_config"]):
                cfg_rows.append([method, cfg])
    sections.append(
        Section("Method configurations", [("table", Table(["method", "method_config"], cfg_rows))])
    )
    sections.append(_provenance_section(runs, board))
    return sweep, sections


# -- rendering ------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em;
color:#1a1a1a;background:#fff;max-width:1500px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef0f6}tbody tr:nth-child(even){background:#f8f9fc}
td{max-width:40em;overflow-wrap:anywhere}
.nowrap td{white-space:nowrap}
.warn{background:#fff4d6;border-left:5px solid #e0a000;padding:.5em .8em;margin:.5em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #dde}
figcaption{font-size:.85em;color:#444;max-width:70em}
"""


def _render_html(title: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(title)}</title>",
        f"<style>{CSS}{report_interactive.CSS}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
        "<nav><p>" + " · ".join(
            f'<a href="#{_slug(s.title)}">{_h(s.title)}</a>' for s in sections
        ) + "</p></nav>",
    ]  # fmt: skip
    for s in sections:
        parts.append(f'<section id="{_slug(s.title)}"><h2>{_h(s.title)}</h2>')
        for kind, item in s.blocks:
            if kind == "p":
                parts.append(f"<p>{_h(item)}</p>")
            elif kind == "h3":
                parts.append(f"<h3>{_h(item)}</h3>")
            elif kind == "warn":
                parts.append(f'<div class="warn">{_h(item)}</div>')
            elif kind == "table":
                parts.append(item.html())
            elif kind == "ltable":
                wrap = report_interactive.TABLE_WRAP_ID
                parts.append(f'<div id="{wrap}">{item.html(cls="nowrap")}</div>')
            elif kind == "explorer":
                parts.append(report_interactive.explorer_html(item))
            elif kind == "fig":
                data = base64.b64encode(item.png).decode("ascii")
                parts.append(
                    f'<figure><img alt="{_h(item.title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_h(item.caption)}</figcaption></figure>"
                )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _render_md(title: str, sections: list[Section]) -> str:
    lines = [f"# {_md(title)}", ""]
    for s in sections:
        lines += [f"## {_md(s.title)}", ""]
        for kind, item in s.blocks:
            if kind == "p":
                lines += [_md(item), ""]
            elif kind == "h3":
                lines += [f"### {_md(item)}", ""]
            elif kind == "warn":
                lines += [f"> **Note:** {_md(item)}", ""]
            elif kind in ("table", "ltable"):
                lines += [item.md(), ""]
            elif kind == "fig":
                lines += [f"![{_md(item.title)}]({item.name})", "", f"*{_md(item.caption)}*", ""]
    return "\n".join(lines)


def _bench_sections(out: Path, bench_json: str | Path | None) -> list[Section]:
    """The `harness bench --all` table: the JSON given, else the newest found beside the
    output dir (harness.bench.suite.find_bench_json); none when there is none."""
    from harness.bench import suite

    path = Path(bench_json) if bench_json else suite.find_bench_json(out)
    if path is None:
        return []
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResultsError(f"cannot read the bench JSON {path}: {err}") from err
    blocks: list[tuple[str, Any]] = [("p", f"From {path.name}.")]
    blocks += [("p", line) for line in suite.describe(payload)]
    blocks.append(("table", Table(suite.METHOD_HEADERS, suite.method_rows(payload))))
    blocks.append(("h3", "Paper cost targets"))
    blocks.append(("table", Table(suite.TARGET_HEADERS, suite.target_rows(payload))))
    return [Section("Cost benchmark", blocks)]


def write_report(out_dir: str | Path, bench_json: str | Path | None = None) -> tuple[Path, Path]:
    """Write `<out>/report/index.html` and `<out>/report/report.md` (+ PNGs); return both paths.

    Every file is staged before any is replaced: on an error (ResultsError, one line) no
    existing report file has been changed."""
    out = Path(out_dir)
    runs, board, notes = _read(out)
    sweep, sections = _build_sections(runs, board, notes)
    sections += _bench_sections(out, bench_json)
    title = f"Report: {sweep} ({out.name})"
    report = out / REPORT_DIR
    html_path, md_path = report / HTML_FILE, report / MD_FILE
    files = [
        (report / item.name, lambda f, png=item.png: f.write(png))
        for s in sections
        for kind, item in s.blocks
        if kind == "fig"
    ]
    html_text = _render_html(title, sections).encode("utf-8")
    md_text = _render_md(title, sections).encode("utf-8")
    files += [(html_path, lambda f: f.write(html_text)), (md_path, lambda f: f.write(md_text))]
    try:
        report.mkdir(parents=True, exist_ok=True)
        write_files_atomically(files)
        new = {path.name for path, _ in files}
        for old in report.glob(f"{FIG_PREFIX}*.png"):  # figures of a previous report
            if old.name not in new:
                old.unlink()
    except OSError as err:
        raise ResultsError(
            f"cannot write the report in {report}: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename else "")
            + "; no existing report file was changed"
        ) from err
    return html_path, md_path
