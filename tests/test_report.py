"""The report (harness/reporting/report.py) and the published numbers
(harness/reporting/published.py).

Report tests run on a copy of the committed results/glue-minilm-main output in tmp_path
(nothing is ever written into results/). The browser test needs a chromium binary; CI
installs it with `apt-get update && apt-get install -y --no-install-recommends chromium`.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.reporting.published import (
    COLUMNS,
    PUBLISHED_CSV,
    PublishedDataError,
    compare,
    load_published,
    model_family,
)
from harness.reporting.report import pareto_front, write_report
from harness.reporting.report_interactive import DATA_ID, LOWER_IS_BETTER_RE, json_for_script
from harness.reporting.results import write_leaderboard

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "glue-minilm-main"
CHROMIUM_INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium"


def _copy_output(dest: Path) -> Path:
    out = dest / "glue-minilm-main"
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("report"))
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    before = _snapshot(COMMITTED)
    out = _copy_output(tmp_path_factory.mktemp("report"))
    html_path, md_path = write_report(out)
    assert _snapshot(COMMITTED) == before, "the committed results folder was modified"
    board = pd.read_parquet(out / "leaderboard.parquet")
    return {
        "out": out,
        "html_path": html_path,
        "md_path": md_path,
        "html": html_path.read_text(encoding="utf-8"),
        "md": md_path.read_text(encoding="utf-8"),
        "board": board,
    }


def _html_rows(html: str) -> list[list[str]]:
    """Table rows as lists of cell texts (cells hold no nested tags in these tables)."""
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S):
        rows.append(re.findall(r"<td>(.*?)</td>", tr, flags=re.S))
    return rows


def _expected_cells(r: dict) -> dict[str, str]:
    """The leaderboard numbers as the report documents its formats (independent of its code)."""
    std = "" if pd.isna(r["test_std"]) else f" ± {r['test_std']:.4f}"
    base = r["majority_baseline"]
    return {
        "mean_std": f"{r['test_mean']:.4f}{std}",
        "lr": f"{r['chosen_lr']:.3g}",
        "selection": f"{r['selection_mean']:.4f}",
        "majority": "n/a" if pd.isna(base) else f"{base:.4f}",
        "params": f"{int(r['trainable_params']):,}",
    }


# -- the report on the committed output ------------------------------------------------------
def test_report_writes_self_contained_html_and_markdown(report):
    html_path, md_path, html, md = (report[k] for k in ("html_path", "md_path", "html", "md"))
    assert html_path == report["out"] / "report" / "index.html" and html_path.stat().st_size > 0
    assert md_path == report["out"] / "report" / "report.md" and md_path.stat().st_size > 0
    assert html.startswith("<!DOCTYPE html>")
    # Self-contained: inline CSS and JS only (the JSON data block and the sort/filter/Pareto
    # script), no stylesheet link, nothing fetched from elsewhere.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S | re.I)
    assert [attrs for attrs, _ in scripts] == [f' type="application/json" id="{DATA_ID}"', ""]
    assert html.lower().count("<script") == 2
    code = scripts[1][1]
    for network in ("fetch(", "XMLHttpRequest", "import(", "WebSocket", "sendBeacon", "src="):
        assert network not in code, network
    assert re.findall(r"https?://[^\s\"']*", code) == ["http://www.w3.org/2000/svg"]  # a name
    assert "<link" not in html.lower()
    assert "<script" not in md and "Pareto explorer" not in md  # the Markdown stays static
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, flags=re.I)
    assert "url(" not in html
    tasks = report["board"]["task"].unique()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3 * len(tasks)  # score-vs-LR, loss, cost per task
    # Markdown: the same plots as PNG files beside it.
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(pngs) == 3 * len(tasks)
    for name in pngs:
        png = md_path.parent / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_every_leaderboard_row_with_its_numbers(report):
    html_rows = _html_rows(report["html"])
    md_lines = report["md"].splitlines()
    for r in report["board"].to_dict("records"):
        exp = _expected_cells(r)
        found = [c for c in html_rows if c[:2] == [r["task"], r["method"]]]
        assert len(found) == 1, (r["task"], r["method"])
        cells = found[0]
        assert cells[2] == r["test_metric"]
        assert cells[3] == exp["mean_std"]
        assert cells[4] == str(r["n_seeds"])
        assert cells[5] == exp["lr"]
        assert cells[6] == exp["selection"]
        assert cells[7:9] == [str(r["n_failed"]), str(r["n_diverged"])]
        assert cells[9] == exp["majority"]
        assert exp["params"] in cells
        md_row = [ln for ln in md_lines if ln.startswith(f"| {r['task']} | {r['method']} |")]
        assert md_row and exp["mean_std"] in md_row[0] and f"| {exp['lr']} |" in md_row[0]
        # The committed output records per-item outcomes: the intervals are the leaderboard's.
        assert cells[10:12] == [f"{r['test_ci_low']:.4f}", f"{r['test_ci_high']:.4f}"]
    assert "95% CI low" in report["html"]


def _report_data(html: str) -> dict:
    block = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', html)
    assert block
    return json.loads(block.group(1))


def test_report_embeds_the_raw_leaderboard_values_for_sorting_and_plotting(report):
    data, board = _report_data(report["html"]), report["board"]
    headers = re.search(r'<div id="leaderboard-table"><table[^>]*>\n<thead><tr>(.*?)</tr>',
                        report["html"]).group(1)  # fmt: skip
    assert data["headers"] == [html_lib.unescape(h) for h in re.findall(r"<th>(.*?)</th>", headers)]
    assert len(data["keys"]) == len(board) and data["method"] == board["method"].tolist()
    col = {h: j for j, h in enumerate(data["headers"])}
    for i, r in enumerate(board.to_dict("records")):
        keys = data["keys"][i]
        assert keys[col["task"]] == r["task"] and keys[col["method"]] == r["method"]
        assert keys[col["test mean ± std"]] == pytest.approx(r["test_mean"])
        assert keys[col["trainable params"]] == int(r["trainable_params"])
        base = keys[col["majority baseline"]]
        assert base is None if pd.isna(r["majority_baseline"]) else base == r["majority_baseline"]
    # Axes on offer: every numeric (non-boolean) column, with its values, NaN as null.
    names = [c["name"] for c in data["columns"]]
    assert {"test_mean", "trainable_params", "train_time_s", "majority_baseline"} <= set(names)
    assert "vs_lora_within_noise" not in names and "method" not in names
    for name in names:
        expected = [None if pd.isna(v) else float(v) for v in board[name]]
        assert data["values"][name] == pytest.approx(expected, nan_ok=False), name
    assert (data["x"], data["y"]) == ("trainable_params", "test_mean")
    lower = {c["name"]: c["lower_better"] for c in data["columns"]}
    assert lower["train_time_s"] and lower["peak_memory_mb"] and lower["trainable_params"]
    assert not lower["test_mean"] and not lower["samples_per_s"]


def test_json_for_script_cannot_end_the_script_block():
    value = {"m": "</script><script>alert(1)</script> & <!-- \u2028", "x": [1.5, None]}
    text = json_for_script(value)
    assert json.loads(text) == value
    assert not re.search("[<>&\u2028]", text)
    assert not LOWER_IS_BETTER_RE.search("test_mean") and LOWER_IS_BETTER_RE.search("init_time_s")


def test_report_labels_selection_and_test_curves_and_provenance(report):
    html = report["html"]
    for task in report["board"]["task"].unique():
        assert f"{task}: score vs learning rate" in html
        assert f"{task}: training loss at the chosen LR" in html
        assert f"{task}: cost vs score" in html
    assert "selection split" in html and "test split" in html and "Pareto" in html
    runs = pd.read_parquet(report["out"] / "runs.parquet")
    for col in ("model_id", "model_revision", "model_source", "git_commit", "device"):
        for value in runs[col].dropna().unique():
            assert str(value) in html, col
    # The offline mirror data and the packaged model copy are called what they are.
    assert "data_kind &#x27;mirror&#x27;: not read from the Hugging Face hub" in html
    assert "loaded from a packaged copy" in html
    assert "&quot;torch&quot;" not in html  # packages are tabulated, not dumped as JSON
    assert "<td>torch</td><td>2.13.0+cpu</td>" in html


def test_a_model_installed_at_several_paths_gets_one_packaged_copy_note(tmp_path: Path):
    """A resumed sweep's rows name each clone's venv as the model source (the study's name
    three); the reader gets the note once per section, while the Model table lists every source."""
    out = _copy_output(tmp_path)
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs["model_source"].str.startswith("pypi-package:").all()
    other = runs["model_source"].str.replace("/.venv/", "/other-clone/.venv/", regex=False)
    runs.loc[runs.index[::2], "model_source"] = other[::2]
    runs.to_parquet(out / "runs.parquet")
    _, md_path = write_report(out)
    md = md_path.read_text(encoding="utf-8")
    summary, rest = md.split("\n## Leaderboard", 1)
    provenance = rest.split("\n## Provenance", 1)[1]
    assert summary.count("loaded from a packaged copy") == 1
    assert provenance.count("loaded from a packaged copy") == 1
    assert all(source in md for source in runs["model_source"].unique())


def test_report_says_when_no_published_number_matches(report):
    assert "No published number matches this output" in report["html"]
    assert "sentence-transformers/all-MiniLM-L6-v2" in report["html"]
    assert "No published number matches this output" in report["md"]


# -- escaping and optional columns ------------------------------------------------------------
def test_report_escapes_html_and_labels_random_init_and_stand_ins(tmp_path):
    out = _copy_output(tmp_path)
    runs = pd.read_parquet(out / "runs.parquet")
    evil_cfg = '{"note": "<script>alert(\\"cfg\\")</script>", "rank": 8}'
    evil_err = '<img src=x onerror=alert(1)> & "quoted" | pipe'
    i = runs.index[(runs["method"] == "lora") & (runs["task"] == "glue/sst2")][0]
    runs.loc[i, "status"] = "failed"
    runs.loc[i, "error"] = evil_err
    runs.loc[runs["method"] == "lora", "method_config"] = evil_cfg
    # Every seed of dora on STS-B diverged: its row has no chosen LR and no test numbers.
    runs.loc[(runs["method"] == "dora") & (runs["task"] == "glue/stsb"), "status"] = "diverged"
    # A random-init model and a stand-in split must be called what they are.
    runs["model_source"] = "random-init:seed0"
    source = json.loads(runs["data_source"].iloc[0])
    source["train"]["stand_in"] = "not the named training set"
    runs.loc[runs["task"] == "glue/sst2", "data_source"] = json.dumps(source)
    runs.to_parquet(out / "runs.parquet", index=False)
    write_leaderboard(out)
    html_path, md_path = write_report(out)
    html, md = html_path.read_text(), md_path.read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert html.count("<script") == 2  # the report's own data block and script
    assert "&lt;script&gt;alert(\\&quot;cfg\\&quot;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quoted&quot; | pipe" in html
    assert "<script" not in md and "<img src=x" not in md
    assert '&lt;img src=x onerror=alert(1)&gt; &amp; "quoted" \\| pipe' in md
    # The failed run is counted on the leaderboard row.
    row = [c for c in _html_rows(html) if c[:2] == ["glue/sst2", "lora"]][0]
    assert row[7] == "1"
    assert "RANDOM-INIT, NOT PRETRAINED" in html and "RANDOM-INIT, NOT PRETRAINED" in md
    assert "mentions a stand-in: some split is not the named dataset" in html
    assert "not the named training set" in html
    dora = [c for c in _html_rows(html) if c[:2] == ["glue/stsb", "dora"]][0]
    assert dora[3:6] == ["n/a", "0", "n/a"] and dora[8] == "4"


@pytest.fixture(scope="module")
def variant_report(tmp_path_factory):
    """The committed output with shifted CI columns and a RoBERTa-large model id."""
    out = _copy_output(tmp_path_factory.mktemp("variant"))
    board = pd.read_parquet(out / "leaderboard.parquet")
    board["test_ci_low"] = board["test_mean"] - 0.0123
    board["test_ci_high"] = board["test_mean"] + 0.0456
    board["model_id"] = "FacebookAI/roberta-large"  # pretend: exercises the matched path
    board.to_parquet(out / "leaderboard.parquet", index=False)
    return board, write_report(out)[0].read_text()


def test_report_shows_ci_and_paired_columns_when_present(variant_report):
    board, html = variant_report
    assert "<th>95% CI low</th><th>95% CI high</th><th>vs_lora_delta</th>" in html
    rows = [c for c in _html_rows(html) if len(c) == 21]  # the leaderboard with CI + paired
    assert len(rows) == len(board)
    for r in board.to_dict("records"):
        cells = [c for c in rows if c[:2] == [r["task"], r["method"]]][0]
        assert cells[3] == _expected_cells(r)["mean_std"]
        assert cells[10:12] == [f"{r['test_ci_low']:.4f}", f"{r['test_ci_high']:.4f}"]


# -- published numbers ---------------------------------------------------------------------------
def test_published_csv_loads_and_validates():
    pub = load_published()
    assert list(pub.columns) == COLUMNS
    papers = pub["source"].str.extract(r"^(LoRA-SB|SDS-LoRA|CG-LoRA) \(arXiv ")[0]
    assert papers.notna().all()
    assert papers.value_counts().to_dict() == {"SDS-LoRA": 448, "LoRA-SB": 48, "CG-LoRA": 20}
    assert pub["source"].str.contains(r"Table \d+").all()
    # value is the printed percentage / 100 (and std likewise where printed).
    for r in pub.to_dict("records"):
        printed = re.match(r"^(-?\d+\.\d+)(?: \+- (\d+\.\d+))?$", r["reported"])
        assert printed, r
        assert r["value"] == pytest.approx(float(printed.group(1)) / 100, abs=1e-9)
        if printed.group(2):
            assert r["std"] == pytest.approx(float(printed.group(2)) / 100, abs=1e-9)

    # Rows checked by hand against the papers' text.
    def one(**kw):
        sel = pub
        for k, v in kw.items():
            sel = sel[sel[k].isna()] if v is None else sel[sel[k] == v]
        assert len(sel) == 1, kw
        return sel.iloc[0]

    r = one(model="roberta-large", task="glue/cola", method="lora", rank=8)
    assert (r["metric"], r["value"]) == ("mcc", 0.6802)
    r = one(model="roberta-large", task="glue/stsb", method="lora_sb", rank=24)
    assert (r["metric"], r["value"]) == ("pearson", 0.9165)
    r = one(model="gemma-2b", metric="hellaswag/accuracy", method="sds_lora", rank=32)
    assert (r["task"], r["value"], r["std"]) == ("commonsense170k", 0.8493, 0.0052)
    r = one(model="llama-3-8b", task="code_feedback", method="lora_ga", rank=8)
    assert (r["metric"], r["value"], r["std"]) == ("pass@1", 0.4512, 0.0122)
    r = one(model="llama-3-8b", task="metamathqa_full_math", method="full_ft", rank=None)
    assert (r["metric"], r["value"], r["std"]) == ("math/accuracy", 0.2647, 0.0041)
    r = one(model="vit-large", task="vision/dtd", method="full_ft", rank=None)
    assert (r["value"], r["std"]) == (0.8171, 0.0009)
    r = one(model="roberta-base", task="glue/mrpc", method="cg_lora", variant="no shift")
    assert (r["metric"], r["value"]) == ("accuracy", 0.8227)


def test_published_commonsense_averages_agree_with_their_rows():
    """The paper's Avg. column against the mean of the eight transcribed per-set numbers:
    a shifted column or a mistyped number shows up here."""
    pub = load_published()
    cs = pub[pub["task"] == "commonsense170k"]
    groups = cs.groupby(["model", "method", "rank"], dropna=False)
    assert groups.ngroups == 26
    for key, g in groups:
        per_set = g[g["metric"] != "average"]
        assert len(per_set) == 8, key
        average = g.loc[g["metric"] == "average", "value"].item()
        assert per_set["value"].mean() == pytest.approx(average, abs=1e-4), key


@pytest.mark.parametrize(
    ("column", "bad", "message"),
    [
        ("value", "68.44", "0-1 scale"),
        ("metric", "acc", "unknown metric 'acc'"),
        ("method", "lora_xs", "unknown method 'lora_xs'"),
        ("model", "roberta-huge", "unknown model family 'roberta-huge'"),
        ("rank", "eight", "not a positive integer"),
        ("source", "", "empty source"),
    ],
)
def test_bad_published_row_fails_validation(tmp_path, column, bad, message):
    df = pd.read_csv(PUBLISHED_CSV, dtype=str, keep_default_na=False)
    i = df.index[(df["method"] == "lora") & (df["rank"] != "")][5]
    df.loc[i, column] = bad
    path = tmp_path / "published.csv"
    df.to_csv(path, index=False)
    with pytest.raises(PublishedDataError, match=re.escape(message)) as err:
        load_published(path)
    assert f"line {i + 2} " in str(err.value)  # the CSV line (header = line 1)


def test_duplicate_published_row_fails_validation(tmp_path):
    df = pd.read_csv(PUBLISHED_CSV, dtype=str, keep_default_na=False)
    path = tmp_path / "published.csv"
    pd.concat([df, df.iloc[[3]]]).to_csv(path, index=False)
    with pytest.raises(PublishedDataError, match="duplicate rows"):
        load_published(path)


def _board_row(model_id: str, method: str = "lora", rank: int = 8, **kw) -> dict:
    row = {
        "method": method,
        "task": "glue/cola",
        "model_id": model_id,
        "test_metric": "mcc",
        "test_mean": 0.6500,
        "test_std": 0.0100,
        "n_seeds": 3,
        "method_config": json.dumps({"rank": rank, "alpha": 16}),
        "test_metrics_mean": json.dumps({"mcc": 0.65}),
        "protocol": "glue-v1",
    }
    row.update(kw)
    return row


def test_compare_matches_roberta_large_cola_and_not_minilm():
    board = pd.DataFrame(
        [
            _board_row("FacebookAI/roberta-large"),
            _board_row("sentence-transformers/all-MiniLM-L6-v2"),
            _board_row("FacebookAI/roberta-large-mnli"),
            _board_row("roberta-large", method="lora_sb", rank=16, test_mean=0.6),
        ]
    )
    got = compare(board)
    lora = got[got["method"] == "lora"]
    assert len(lora) == 1
    m = lora.iloc[0]
    assert m["model_id"] == "FacebookAI/roberta-large" and m["model_family"] == "roberta-large"
    assert (m["metric"], m["published_value"], m["published_rank"]) == ("mcc", 0.6802, 8)
    assert m["delta"] == pytest.approx(0.65 - 0.6802)
    assert bool(m["rank_match"]) and "LoRA-SB" in m["source"] and "Table 3" in m["source"]
    assert not got["model_id"].str.contains("MiniLM|mnli").any()
    sb = got[got["method"] == "lora_sb"].sort_values("published_rank")
    assert sb["published_rank"].tolist() == [8, 16, 24]
    assert sb["rank_match"].tolist() == [False, True, False]
    assert sb["delta"].tolist() == pytest.approx([0.6 - 0.6357, 0.6 - 0.6436, 0.6 - 0.6828])
    # A MiniLM leaderboard matches nothing at all.
    assert compare(board.iloc[[1]]).empty


def test_compare_skips_stand_in_data_and_uses_task_aliases():
    gsm = {
        "task": "metamathqa_full_math",
        "test_metric": "gsm8k/accuracy",
        "test_mean": 0.7,
        "test_metrics_mean": json.dumps({"gsm8k/accuracy": 0.7, "math/accuracy": 0.2}),
    }
    full = _board_row("meta-llama/Meta-Llama-3-8B", method="lora", rank=8, **gsm)
    stand_in = _board_row(
        "meta-llama/Meta-Llama-3-8B", method="lora", rank=8,
        **{**gsm, "task": "gsm8k_offline"},
        data_source=json.dumps({"train": {"source": "mirror", "stand_in": "not MetaMathQA"}}),
    )  # fmt: skip
    got = compare(pd.DataFrame([full, stand_in]))
    assert set(got["task"]) == {"metamathqa_full_math"}
    assert sorted(got["metric"]) == ["gsm8k/accuracy"] * 2 + ["math/accuracy"] * 2  # r8, r32
    r8 = got[(got["metric"] == "gsm8k/accuracy") & (got["published_rank"] == 8)].iloc[0]
    assert r8["published_value"] == 0.7344 and r8["delta"] == pytest.approx(0.7 - 0.7344)


def test_model_family_mapping():
    assert model_family("FacebookAI/roberta-large") == "roberta-large"
    assert model_family("roberta-large") == "roberta-large"
    assert model_family("/models/FacebookAI/roberta-large/") == "roberta-large"
    assert model_family("google/vit-base-patch16-224-in21k") == "vit-base"
    for other in ("sentence-transformers/all-MiniLM-L6-v2", "roberta-large-mnli",
                  "random-init/vit-h128-l4-p16", "", None):  # fmt: skip
        assert model_family(other) is None


def test_report_sets_published_numbers_beside_ours(variant_report):
    board, html = variant_report
    assert "No published number matches" not in html
    assert "Same model family, task, method, metric and rank" in html
    lora = board[(board["method"] == "lora") & (board["task"] == "glue/sst2")].iloc[0]
    published_rows = [c for c in _html_rows(html) if len(c) == 12]  # the comparison tables
    rows = [c for c in published_rows if c[:3] == ["glue/sst2", "lora", "accuracy"]]
    assert len(rows) == 1
    cells = rows[0]
    assert cells[4] == f"{lora['test_mean']:.4f} ± {lora['test_std']:.4f}"
    assert (cells[6], cells[8]) == ("8", "8")  # our rank, published rank
    assert cells[7] == "0.9598"  # LoRA-SB Table 3, LoRA r=8, SST-2 95.98
    assert cells[9] == f"{lora['test_mean'] - 0.9598:+.4f}"
    # STS-B Pearson of the LoRA family and full FT is there too; MNLI-style tasks are not.
    assert any(c[:3] == ["glue/stsb", "full_ft", "pearson"] for c in published_rows)


# -- rendering in a real browser ----------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(
    _chromium() is None,
    reason=f"no chromium binary on PATH; install it with: {CHROMIUM_INSTALL}",
)
def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    shot = tmp_path / "shot.png"
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1280,2200",
        report["html_path"].resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 0, proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2200, 1280)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 1, "blank screenshot"
    non_white = (pixels < 245).any(axis=2).mean()
    assert non_white > 0.02, f"almost blank screenshot ({non_white:.3%} non-white)"
    # The report itself rendered (not an error page): its table-header fill is on screen.
    assert (pixels == np.array([238, 240, 246])).all(axis=2).sum() > 500


def _dom_order(board: pd.DataFrame, column: str, descending: bool) -> list[tuple[str, str]]:
    """(task, method) in the order a sort on `column` must leave: values ascending (or
    descending), ties in table order, missing values last either way."""
    recs = board.to_dict("records")
    have = [i for i, r in enumerate(recs) if not pd.isna(r[column])]
    lack = [i for i, r in enumerate(recs) if pd.isna(r[column])]
    have.sort(key=lambda i: (-recs[i][column] if descending else recs[i][column], i))
    return [(recs[i]["task"], recs[i]["method"]) for i in have + lack]


def _front_rows(board: pd.DataFrame, x: str, y: str, x_lower: bool, y_lower: bool) -> set[int]:
    """Leaderboard rows on the Pareto front of their task, by
    `harness.reporting.report.pareto_front`
    (which wants a cost to minimise and a score to maximise)."""
    rows: set[int] = set()
    for _, g in board.reset_index(drop=True).groupby("task"):
        xs, ys = g[x].to_numpy(float), g[y].to_numpy(float)
        front = pareto_front(xs if x_lower else -xs, -ys if y_lower else ys)
        rows |= {int(i) for i, f in zip(g.index, front, strict=True) if f}
    return rows


@pytest.mark.skipif(
    _chromium() is None,
    reason=f"no chromium binary on PATH; install it with: {CHROMIUM_INSTALL}",
)
def test_report_sorts_filters_and_replots_in_headless_chromium(report, tmp_path):
    from PIL import Image

    from tests.headless_chromium import HeadlessChromium

    board = report["board"].reset_index(drop=True)
    rows = "[...document.querySelectorAll('#leaderboard-table tbody tr')]"
    points = "#pareto-explorer svg .pt"
    with HeadlessChromium(_chromium(), tmp_path / "profile") as page:

        def shown() -> list[tuple[str, str]]:
            cells = page.evaluate(
                f"{rows}.filter(r => !r.hidden).map(r => [r.cells[0].textContent,"
                " r.cells[1].textContent])"
            )
            return [tuple(c) for c in cells]

        def plotted() -> tuple[int, set[int], str, str]:
            got = page.evaluate(
                f"[document.querySelectorAll('{points}').length,"
                f" [...document.querySelectorAll('{points}.front')].map(g => +g.dataset.row),"
                " document.querySelector('#pareto-explorer .xlabel').textContent,"
                " document.querySelector('#pareto-explorer .ylabel').textContent]"
            )
            return got[0], set(got[1]), got[2], got[3]

        page.open(report["html_path"].resolve().as_uri())
        assert shown() == list(zip(board["task"], board["method"], strict=True))
        headers = page.evaluate("[...document.querySelectorAll('#leaderboard-table th')]"
                                ".map(th => th.textContent)")  # fmt: skip

        # Sorting: numeric (not the text "22,713,986" < "332,546"; not "-0.055" < "-0.1467"),
        # reversed on a second click, missing (n/a) last both ways.
        for header, column in (("trainable params", "trainable_params"),
                               ("vs_lora_delta", "vs_lora_delta")):  # fmt: skip
            assert board[column].notna().sum() >= 2
            th = f"#leaderboard-table thead th:nth-child({headers.index(header) + 1})"
            page.click(th)
            assert shown() == _dom_order(board, column, descending=False), header
            assert page.evaluate(f"document.querySelector('{th}').ariaSort") == "ascending"
            page.click(th)
            assert shown() == _dom_order(board, column, descending=True), header
        assert board["vs_lora_delta"].isna().any()  # the missing-last case was exercised
        page.click(f"#leaderboard-table thead th:nth-child({headers.index('method') + 1})")
        assert [m for _, m in shown()] == sorted(board["method"])

        # The plot on load: trainable params (lower better) vs test mean (higher better).
        n, front, xlabel, ylabel = plotted()
        assert n == len(board)
        assert (xlabel, ylabel) == ("trainable_params (lower is better)",
                                    "test_mean (higher is better)")  # fmt: skip
        assert front == _front_rows(board, "trainable_params", "test_mean", True, False)
        svg_box = (
            "(() => { document.getElementById('pareto-explorer').scrollIntoView();"
            " const r = document.querySelector('#pareto-explorer svg').getBoundingClientRect();"
            " return [r.top, r.bottom, r.left, r.right].map(Math.round); })()"
        )
        box_before = page.evaluate(svg_box)
        plot_before = page.screenshot(tmp_path / "plot_before.png")

        # Filtering: one method, then one task too; the plot follows the filters.
        method, task = "dora", board["task"].iloc[-1]
        page.click("fieldset[data-filter=method] button[data-set=none]")
        assert shown() == [] and plotted()[0] == 0
        page.click(f"fieldset[data-filter=method] input[value={method}]")
        mine = board[board["method"] == method]
        assert sorted(shown()) == sorted(zip(mine["task"], mine["method"], strict=True))
        assert len(shown()) == board["task"].nunique() >= 2
        assert plotted()[0] == len(mine)
        page.click(f'fieldset[data-filter=task] input[value="{task}"]')  # untick one task
        assert shown() == [(t, method) for t in mine["task"] if t != task]
        count = page.evaluate("document.querySelector('#leaderboard-filters .count').textContent")
        assert count == f"showing {len(mine) - 1} of {len(board)} rows"
        page.click("fieldset[data-filter=method] button[data-set=all]")
        page.click("fieldset[data-filter=task] button[data-set=all]")
        assert len(shown()) == len(board)

        # Other axes: rows missing a value drop out, the front is recomputed, labels follow.
        page.choose("#pareto-y", "majority_baseline")
        n, front, _, ylabel = plotted()
        assert n == int(board["majority_baseline"].notna().sum()) < len(board)
        assert ylabel == "majority_baseline (higher is better)"
        assert front == _front_rows(board, "trainable_params", "majority_baseline", True, False)
        page.choose("#pareto-x", "train_time_s")
        page.choose("#pareto-y", "selection_mean")
        n, front, xlabel, ylabel = plotted()
        assert n == len(board) and xlabel == "train_time_s (lower is better)"
        expected = _front_rows(board, "train_time_s", "selection_mean", True, False)
        assert front == expected
        page.choose("#pareto-x-dir", "higher")  # the direction is the reader's to set
        flipped = _front_rows(board, "train_time_s", "selection_mean", False, False)
        assert plotted()[1] == flipped != expected
        box_after = page.evaluate(svg_box)
        plot_after = page.screenshot(tmp_path / "plot_after.png")

    before = np.asarray(Image.open(plot_before).convert("RGB")).astype(int)
    after = np.asarray(Image.open(plot_after).convert("RGB")).astype(int)
    assert before.shape == after.shape == (2200, 1280, 3)
    for shot in (before, after):
        assert (shot < 245).any(axis=2).mean() > 0.02, "almost blank screenshot"
    # The redrawn plot is on screen, at the same place: inside it the pixels changed, and its
    # markers are drawn in the methods' colours (the static figures' tab10: dora #1f77b4).
    assert box_before == box_after and box_after[1] - box_after[0] > 300
    top, bottom, left, right = box_after
    inside_before, inside_after = before[top:bottom, left:right], after[top:bottom, left:right]
    changed = (np.abs(inside_before - inside_after) > 30).any(axis=2).mean()
    assert 0.01 < changed < 0.6, f"{changed:.3%} of the plot's pixels changed"
    for plot in (inside_before, inside_after):
        dora_blue = (np.abs(plot - np.array([31, 119, 180])) <= 2).all(axis=2).sum()
        assert dora_blue > 30, dora_blue
