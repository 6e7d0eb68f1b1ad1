"""GLUE tasks: loading (real mirror + fixtures in the hub schema), splits, metrics, encoding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tasks
from tasks.data import carve_selection, load_split, subsample

IN_MIRROR = ["cola", "sst2", "rte", "stsb"]
FIXTURE_SCHEMAS = {  # the hub's columns for the sets the mirror lacks
    "mrpc": (("sentence1", "sentence2"), 2, ["train", "validation"]),
    "qqp": (("question1", "question2"), 2, ["train", "validation"]),
    "mnli": (
        ("premise", "hypothesis"),
        3,
        ["train", "validation_matched", "validation_mismatched"],
    ),
    "qnli": (("question", "sentence"), 2, ["train", "validation"]),
    "wnli": (("sentence1", "sentence2"), 2, ["train", "validation"]),
}


@pytest.fixture(scope="module")
def fixture_mirror(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mirror")
    rng = np.random.default_rng(0)
    for config, (fields, n_labels, splits) in FIXTURE_SCHEMAS.items():
        for split in splits:
            n = 60 if split == "train" else 20
            df = pd.DataFrame({f: [f"{f} {split} text {i}" for i in range(n)] for f in fields})
            df["label"] = rng.integers(0, n_labels, n)
            df["idx"] = np.arange(n, dtype=np.int32)
            path = root / "nyu-mll" / "glue" / config / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(path, index=False)
    return str(root)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from harness.modeling.models import resolve_model

    return AutoTokenizer.from_pretrained(
        resolve_model("sentence-transformers/all-MiniLM-L6-v2", None, None).location
    )


def test_registry_has_all_nine_glue_tasks():
    expected = {f"glue/{c}" for c in IN_MIRROR + list(FIXTURE_SCHEMAS)}
    assert expected <= set(tasks.task_ids())
    with pytest.raises(KeyError, match="unknown task"):
        tasks.get_task("glue/sst3")


@pytest.mark.parametrize("config", IN_MIRROR)
def test_real_mirror_splits_are_disjoint_deterministic_and_sized(config, mirror_dir):
    task = tasks.get_task(f"glue/{config}")
    splits = task.splits(mirror_dir, train_rows=300, selection_rows=100, test_rows=50)
    again = task.splits(mirror_dir, train_rows=300, selection_rows=100, test_rows=50)
    assert len(splits.train) == 300 and len(splits.selection) == 100
    assert set(splits.test) == {"validation"} and len(splits.test["validation"]) == 50
    assert not set(splits.train["idx"]) & set(splits.selection["idx"])
    pd.testing.assert_frame_equal(splits.train, again.train)
    pd.testing.assert_frame_equal(splits.selection, again.selection)
    prov = splits.provenance["train"]
    assert prov["source"] == "mirror" and prov["rows"] > 1000 and len(prov["fingerprint"]) == 16
    assert prov["origin"]  # the MANIFEST's upstream source is carried along
    assert splits.provenance["selection_rows"] == 100


def test_default_selection_is_ten_percent_capped(mirror_dir):
    splits = tasks.get_task("glue/rte").splits(mirror_dir)
    total = splits.provenance["train"]["rows"]
    assert len(splits.selection) == min(total // 10, 2000)
    assert len(splits.train) + len(splits.selection) == total


@pytest.mark.parametrize("config", list(FIXTURE_SCHEMAS))
def test_fixture_tasks_load_in_the_hub_schema(config, fixture_mirror):
    task = tasks.get_task(f"glue/{config}")
    splits = task.splits(fixture_mirror, selection_rows=10)
    assert len(splits.selection) == 10 and len(splits.train) == 50
    names = {"mnli": {"matched", "mismatched"}}.get(config, {"validation"})
    assert set(splits.test) == names


def test_mnli_headline_is_matched_accuracy():
    task = tasks.get_task("glue/mnli")
    assert task.headline_metric == "matched/accuracy" and task.selection_metric == "accuracy"
    assert task.num_labels == 3


def test_missing_split_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the data mirror.*train.parquet"):
        load_split("nyu-mll/glue", "mrpc", "train", str(tmp_path))


def test_hidden_test_labels_are_refused(tmp_path):
    path = tmp_path / "nyu-mll" / "glue" / "rte"
    path.mkdir(parents=True)
    df = pd.DataFrame({"sentence1": ["a"] * 20, "sentence2": ["b"] * 20, "label": [-1] * 20})
    df["idx"] = range(20)
    df.to_parquet(path / "train.parquet")
    with pytest.raises(ValueError, match="hidden labels"):
        tasks.get_task("glue/rte").splits(str(tmp_path))


def test_carve_and_subsample_are_fixed_by_the_protocol_seed():
    df = pd.DataFrame({"idx": range(100)})
    pool, sel = carve_selection(df, 10, seed=0)
    assert len(pool) == 90 and len(sel) == 10 and not set(pool.idx) & set(sel.idx)
    assert list(carve_selection(df, 10, seed=0)[1].idx) == list(sel.idx)
    assert list(carve_selection(df, 10, seed=1)[1].idx) != list(sel.idx)
    assert len(subsample(df, 7)) == 7 and subsample(df, None).equals(df)
    with pytest.raises(ValueError):
        carve_selection(df, 100)


def test_metrics_on_hand_made_predictions():
    cola = tasks.get_task("glue/cola")
    y = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    p = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cola.metrics(p, y)["mcc"] == pytest.approx(mcc)
    assert cola.metrics(np.ones(8, int), y)["mcc"] == 0.0  # constant prediction
    mrpc = tasks.get_task("glue/mrpc").metrics(p, y)
    assert mrpc["accuracy"] == pytest.approx(6 / 8)
    assert mrpc["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    stsb = tasks.get_task("glue/stsb")
    pred, gold = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    # Pearson by hand: deviations (-1.5,-.5,.5,1.5) and (-1.75,.25,-.75,2.25).
    num = 1.5 * 1.75 - 0.5 * 0.25 - 0.5 * 0.75 + 1.5 * 2.25
    den = math.sqrt(5.0) * math.sqrt(1.75**2 + 0.25**2 + 0.75**2 + 2.25**2)
    scores = stsb.metrics(pred, gold)
    assert scores["pearson"] == pytest.approx(num / den)
    assert scores["spearman"] == pytest.approx(0.8)  # ranks 1234 vs 1324: 1 - 6*2/60
    assert stsb.metrics(np.ones(4), gold) == {"pearson": 0.0, "spearman": 0.0}
    assert tasks.get_task("glue/sst2").metrics(p, y) == {"accuracy": 0.75}


def test_predictions_argmax_and_regression():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert list(tasks.get_task("glue/sst2").predictions(logits)) == [1, 0]
    assert list(tasks.get_task("glue/stsb").predictions(np.array([[1.5], [3.0]]))) == [1.5, 3.0]


def test_encode_pairs_and_label_types(tokenizer):
    rows = pd.DataFrame(
        {"sentence1": ["a cat sat"], "sentence2": ["the dog ran"], "label": [3.2], "idx": [0]}
    )
    enc = tasks.get_task("glue/stsb").encode(tokenizer, rows, max_length=32)
    text = tokenizer.decode(enc["input_ids"][0])
    assert text == "[CLS] a cat sat [SEP] the dog ran [SEP]"
    assert enc["labels"] == [3.2] and isinstance(enc["labels"][0], float)
    assert set(enc["token_type_ids"][0]) == {0, 1}
    single = pd.DataFrame({"sentence": ["word " * 50], "label": [1], "idx": [0]})
    enc = tasks.get_task("glue/sst2").encode(tokenizer, single, max_length=16)
    assert len(enc["input_ids"][0]) == 16 and enc["labels"] == [1]


def test_mirror_layout_matches_manifest_paths(mirror_dir):
    # The loader's path rule is the mirror's documented layout.
    for config in IN_MIRROR:
        df, prov = load_split("nyu-mll/glue", config, "validation", mirror_dir)
        assert prov["path"] == f"nyu-mll/glue/{config}/validation.parquet"
        assert prov["rows"] == len(df) and Path(mirror_dir, prov["path"]).is_file()
