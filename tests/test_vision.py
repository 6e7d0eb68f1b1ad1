"""Vision tasks: DTD-10 from the mirror, fixture imagefolders, transforms, the ViT models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import tasks
import tasks.vision  # noqa: F401  (registers the vision tasks)
from harness.modeling.image_models import RANDOM_INIT_ID, load_image_classifier
from harness.modeling.models import ModelSource
from methods.targets import default_target_modules
from tasks.vision import (
    PROTOCOL,
    SPECS,
    ImageRows,
    ImageSettings,
    collate,
    eval_transform,
    load_imagefolder,
    random_resized_crop_box,
    train_transform,
)
from tests.conftest import MIRROR

DTD10 = MIRROR / "tanganke" / "dtd-10class"
DTD10_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy",
    "chequered", "cobwebbed", "cracked", "crosshatched", "crystalline",
]  # fmt: skip
HALF = ImageSettings(14, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ImageSettings(14, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def dtd_mirror() -> str:
    if not DTD10.is_dir():
        pytest.skip(f"DTD-10 mirror not found at {DTD10}")
    return str(MIRROR)


def _solid(w: int, h: int, colour) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _stripes(w: int, h: int, bounds: list[tuple[int, tuple]]) -> Image.Image:
    """Vertical stripes: [(x_end, colour), ...] left to right."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    start = 0
    for end, colour in bounds:
        a[:, start:end] = colour
        start = end
    return Image.fromarray(a)


COLOURS = {"a_red": RED, "b_green": GREEN, "c_blue": BLUE}


@pytest.fixture(scope="module")
def fixture_mirror(tmp_path_factory) -> str:
    """tanganke/stanford_cars in imagefolder layout: 3 classes of solid-colour images."""
    root = tmp_path_factory.mktemp("vision-mirror")
    for split, n in (("train", 12), ("test", 4)):
        for name, colour in COLOURS.items():
            folder = root / "tanganke" / "stanford_cars" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                _solid(20 + i, 16, colour).save(folder / f"{name}_{i:02d}.png")
            (folder / "notes.txt").write_text("not an image")
    return str(root)


# ---------------------------------------------------------------- splits


def test_registry_has_the_five_vision_tasks():
    ids = {f"vision/{n}" for n in ("cars", "cub200", "dtd", "food101", "sun397")}
    assert ids <= set(tasks.task_ids())
    for task_id in ids:
        task = tasks.get_task(task_id)
        assert task.head == "image_classification" and task.protocol == PROTOCOL
        assert task.selection_metric == task.headline_metric == "accuracy"
    assert tasks.get_task("vision/dtd").num_labels == 47  # the full dataset's
    assert {s.hub_id for s in SPECS.values()} >= {"tanganke/dtd", "ethz/food101"}
    assert "center-crop" in PROTOCOL and "train-carve(seed0" in PROTOCOL


def test_dtd10_offline_splits(dtd_mirror):
    task = tasks.get_task("vision/dtd")
    splits = task.splits(dtd_mirror)
    assert len(splits.train) + len(splits.selection) == 800
    assert len(splits.selection) == 80 and set(splits.test) == {"test"}
    test = splits.test["test"]
    assert len(test) == 400
    assert splits.label_names == DTD10_CLASSES == sorted(splits.label_names)
    assert not set(splits.train["idx"]) & set(splits.selection["idx"])
    assert not set(splits.train["image"]) & set(splits.selection["image"])
    # Labels agree with the class folder, in train and test alike (one label space).
    for df in (splits.train, splits.selection, test):
        folders = df["image"].map(lambda p: p.split("/")[-2])
        assert (folders == [DTD10_CLASSES[i] for i in df["label"]]).all()
    assert np.bincount(test["label"], minlength=10).tolist() == [40] * 10
    prov = splits.provenance
    assert prov["subset"] == "dtd-10class: 10 of 47 classes"
    assert prov["train"]["subset"] == prov["test"]["test"]["subset"] == prov["subset"]
    assert prov["label_names"] == DTD10_CLASSES and prov["num_labels"] == 10
    assert prov["train"]["source"] == "mirror" and prov["train"]["rows"] == 800
    assert prov["train"]["path"] == "tanganke/dtd-10class/train"
    assert len(prov["train"]["fingerprint"]) == 16 and prov["train"]["origin"]
    assert prov["test"]["test"]["rows"] == 400
    assert prov["train"]["fingerprint"] != prov["test"]["test"]["fingerprint"]


def test_dtd10_budgets_are_fixed_by_the_protocol_seed(dtd_mirror):
    task = tasks.get_task("vision/dtd")
    a = task.splits(dtd_mirror, train_rows=100, selection_rows=50, test_rows=60)
    b = task.splits(dtd_mirror, train_rows=100, selection_rows=50, test_rows=60)
    assert (len(a.train), len(a.selection), len(a.test["test"])) == (100, 50, 60)
    for x, y in ((a.train, b.train), (a.selection, b.selection), (a.test["test"], b.test["test"])):
        pd.testing.assert_frame_equal(x, y)
    assert not set(a.train["idx"]) & set(a.selection["idx"])
    assert a.provenance["test_rows"] == {"test": 60}


def test_fixture_imagefolder_loads_with_correct_labels(fixture_mirror):
    task = tasks.get_task("vision/cars")
    splits = task.splits(fixture_mirror, selection_rows=6)
    assert splits.label_names == ["a_red", "b_green", "c_blue"]
    assert len(splits.train) == 30 and len(splits.selection) == 6
    assert len(splits.test["test"]) == 12
    assert "subset" not in splits.provenance  # only the DTD mirror is a subset
    for df in (splits.train, splits.selection, splits.test["test"]):
        assert not df["image"].str.endswith(".txt").any()
        for path, label in zip(df["image"], df["label"], strict=True):
            pixel = Image.open(path).convert("RGB").getpixel((0, 0))
            assert pixel == list(COLOURS.values())[label]


def test_test_split_uses_the_train_label_space(tmp_path):
    for split, names in (("train", ["x", "y", "z"]), ("test", ["x", "z"])):
        for name in names:
            (tmp_path / "ds" / split / name).mkdir(parents=True)
            _solid(4, 4, RED).save(tmp_path / "ds" / split / name / "0.png")
    _, _, names = load_imagefolder(str(tmp_path), "ds", "train")
    assert names == ["x", "y", "z"]
    # The test split lacks class y but keeps train's label ids: z is 2, not 1.
    test, _, _ = load_imagefolder(str(tmp_path), "ds", "test", names)
    assert test["label"].tolist() == [0, 2]
    (tmp_path / "ds" / "test" / "w").mkdir()
    _solid(4, 4, RED).save(tmp_path / "ds" / "test" / "w" / "0.png")
    with pytest.raises(ValueError, match=r"not in the label space: \['w'\]"):
        load_imagefolder(str(tmp_path), "ds", "test", names)


def test_unknown_split_and_missing_mirror_are_clear_errors(tmp_path, dtd_mirror):
    with pytest.raises(FileNotFoundError, match=r"'validation' is not in the data mirror.*test"):
        load_imagefolder(dtd_mirror, "tanganke/dtd-10class", "validation")
    with pytest.raises(FileNotFoundError, match="tanganke/sun397 split 'train' is not in the"):
        tasks.get_task("vision/sun397").splits(str(tmp_path))
    (tmp_path / "tanganke" / "stanford_cars" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        tasks.get_task("vision/cars").splits(str(tmp_path))


def test_hub_path_reads_classlabel_names_and_only_chosen_images(monkeypatch):
    datasets = pytest.importorskip("datasets")
    names = ["cat", "dog", "eel"]
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names)}
    )
    colours = [RED, GREEN, BLUE]

    def fake_load_dataset(hub_id, config, split, revision=None):
        assert (hub_id, config) == ("tanganke/sun397", None) and split in ("train", "test")
        assert revision is None  # the hub is unreachable in tests: no commit to pin
        n = 30 if split == "train" else 9
        labels = [i % 3 for i in range(n)]
        images = [_solid(8, 8, colours[y]) for y in labels]
        return datasets.Dataset.from_dict({"img": images, "fine_label": labels}, features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = tasks.get_task("vision/sun397").splits(None, selection_rows=5, test_rows=6)
    assert splits.label_names == names and len(splits.selection) == 5
    assert len(splits.train) == 25 and len(splits.test["test"]) == 6
    assert splits.provenance["train"]["source"] == "hub"
    assert splits.provenance["train"]["hub_id"] == "tanganke/sun397"
    assert "subset" not in splits.provenance
    batch = collate(list(ImageRows(splits.test["test"], HALF, train=False)))
    for pixels, label in zip(batch["pixel_values"], batch["labels"], strict=True):
        expected = torch.tensor(colours[label], dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(pixels[:, 0, 0], expected)


# ---------------------------------------------------------------- transforms


def test_eval_center_crop_exact_tensor():
    # 24x16 image: S=14 resizes the shorter side to int(14*256/224) = 16, i.e. not at all,
    # then crops [5, 19) x [1, 15): red columns 5..11, blue 12..18; the green top row and
    # the white columns outside are cut away.
    a = np.zeros((16, 24, 3), dtype=np.uint8)
    a[:, :12], a[:, 12:] = RED, BLUE
    a[0, :], a[:, :5], a[:, 19:] = GREEN, (255, 255, 255), (255, 255, 255)
    image = Image.fromarray(a)
    out = eval_transform(image, IMAGENET)
    mean, std = torch.tensor(IMAGENET.mean), torch.tensor(IMAGENET.std)
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    blue = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std
    expected = torch.empty(3, 14, 14)
    expected[:, :, :7] = red.view(3, 1, 1)
    expected[:, :, 7:] = blue.view(3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (3, 14, 14)
    torch.testing.assert_close(out, expected)
    assert expected[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)
    torch.testing.assert_close(eval_transform(image, IMAGENET), out, rtol=0, atol=0)


def test_eval_resizes_the_shorter_side_before_the_center_crop():
    # 64x32 -> 32x16 (shorter side 16), crop columns [9, 23): 3 red, 8 green, 3 blue.
    # Without the resize the crop would be all green; off-centre it would not be 3/8/3.
    image = _stripes(64, 32, [(24, RED), (40, GREEN), (64, BLUE)])
    out = eval_transform(image, HALF)
    assert out.shape == (3, 14, 14)
    dominant = out.mean(dim=1).argmax(dim=0).tolist()
    assert dominant == [0] * 3 + [1] * 8 + [2] * 3
    tall = eval_transform(_solid(30, 90, GREEN), HALF)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 14, 14)
    torch.testing.assert_close(tall, green)


def test_train_transform_shape_range_and_seeding():
    rng = np.random.default_rng(123)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = train_transform(image, HALF, np.random.default_rng(0))
    assert out.shape == (3, 14, 14) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    same = train_transform(image, HALF, np.random.default_rng(0))
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    other = train_transform(image, HALF, np.random.default_rng(1))
    assert not torch.equal(out, other)


def test_random_resized_crop_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    areas, ratios, corners = [], [], set()
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(200, 150, rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        assert 0.08 * 0.9 <= w * h / (200 * 150) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        areas.append(w * h / (200 * 150))
        ratios.append(w / h)
        corners.add((left, top))
    # The whole scale and ratio ranges are drawn from.
    assert min(areas) < 0.2 and max(areas) > 0.8
    assert min(ratios) < 0.8 and max(ratios) > 1.25
    assert len({c[0] for c in corners}) > 20 and len({c[1] for c in corners}) > 20
    # A 10:1 strip cannot hold a 4:3 crop by sampling: the clamped central fallback.
    assert random_resized_crop_box(100, 10, rng, scale=(1.0, 1.0)) == (43, 0, 13, 10)


def test_train_flip_actually_flips():
    image = _stripes(28, 14, [(14, RED), (28, BLUE)])  # 2:1; the full crop is asked for
    kw = dict(scale=(1.0, 1.0), ratio=(2.0, 2.0))
    kept = train_transform(image, HALF, np.random.default_rng(0), flip_p=0.0, **kw)
    flipped = train_transform(image, HALF, np.random.default_rng(0), flip_p=1.0, **kw)
    assert kept[0, :, 0].min() == 1.0 and kept[2, :, -1].min() == 1.0  # red left, blue right
    torch.testing.assert_close(flipped, kept.flip(-1), rtol=0, atol=0)
    lefts = {
        train_transform(image, HALF, np.random.default_rng(s), **kw)[0, 7, 0].item()
        for s in range(20)
    }
    assert lefts == {1.0, -1.0}  # p=0.5: both outcomes happen


def test_image_rows_are_reproducible_per_seed_and_epoch(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(paths[-1])
    rows = pd.DataFrame({"image": paths, "label": [2, 0, 1, 2], "idx": range(4)})
    settings = ImageSettings(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    a = ImageRows(rows, settings, train=True, seed=3)
    b = ImageRows(rows, settings, train=True, seed=3)
    assert len(a) == 4 and a[1]["labels"] == 0
    torch.testing.assert_close(a[1]["pixel_values"], b[1]["pixel_values"], rtol=0, atol=0)
    assert not torch.equal(a[1]["pixel_values"], a[2]["pixel_values"])
    assert not torch.equal(
        a[1]["pixel_values"], ImageRows(rows, settings, train=True, seed=4)[1]["pixel_values"]
    )
    first = a[1]["pixel_values"]
    a.set_epoch(1)
    assert not torch.equal(first, a[1]["pixel_values"])  # fresh augmentation per epoch
    b.set_epoch(1)
    torch.testing.assert_close(a[1]["pixel_values"], b[1]["pixel_values"], rtol=0, atol=0)
    evals = ImageRows(rows, settings, train=False)
    torch.testing.assert_close(evals[0]["pixel_values"], eval_transform(paths[0], settings))
    batch = collate([a[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [2, 0, 1, 2]


def test_resizing_is_antialiased_bilinear():
    # 1-pixel black/white columns, downscaled 2x: bilinear averages them to grey (about 0
    # after normalising); nearest-neighbour would keep pure black/white (+-1).
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    a[:, 1::2] = 255
    image = Image.fromarray(a)
    settings = ImageSettings(7, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # resize to 8, crop 7
    assert eval_transform(image, settings).abs().max() < 0.2
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = train_transform(
        image, ImageSettings(8, (0.5,) * 3, (0.5,) * 3), np.random.default_rng(0), **kw
    )
    assert out.abs().max() < 0.2


# ---------------------------------------------------------------- models


def test_random_init_vit_trains_and_matches_the_vit_targets(fixture_mirror):
    splits = tasks.get_task("vision/cars").splits(fixture_mirror, selection_rows=6)
    loaded = load_image_classifier(None, 3, random_init=True, image_size=32, seed=0)
    model, settings, head, model_type, description = loaded
    assert description.startswith("random-init") and RANDOM_INIT_ID in description
    assert model_type == "vit" and head == ["classifier"] and settings.size == 32
    rows = ImageRows(splits.train.iloc[:6], settings, train=True, seed=0)
    batch = collate([rows[i] for i in range(len(rows))])
    out = model(**batch)
    assert out.logits.shape == (6, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vit.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    # methods/targets.py's "vit" keys match every block linear layer, and nothing else.
    keys = default_target_modules(model_type)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = {n for n in linear if any(n == k or n.endswith("." + k) for k in keys)}
    assert set(linear) - matched == {"classifier"}
    assert len(matched) == 6 * model.config.num_hidden_layers
    for k in keys:
        assert any(n.endswith("." + k) for n in matched), k
    again = load_image_classifier(None, 3, random_init=True, image_size=32, seed=0).model
    torch.testing.assert_close(again.classifier.weight, model.classifier.weight)
    other = load_image_classifier(None, 3, random_init=True, image_size=32, seed=1).model
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


def test_pretrained_path_loads_weights_new_head_and_processor_settings(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    cfg = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=16,
    )  # fmt: skip
    backbone = ViTModel(ViTConfig(**cfg))  # the in21k layout: an encoder without classifier
    backbone.save_pretrained(tmp_path / "enc")
    processor = ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size={"height": 32, "width": 32}
    )
    processor.save_pretrained(tmp_path / "enc")
    source = ModelSource("tiny/vit-enc", str(tmp_path / "enc"), "local", "local-folder")
    loaded = load_image_classifier(source, 4, random_init=False, label_names=list("abcd"))
    assert loaded.head_modules == ["classifier"] and loaded.model_type == "vit"
    assert loaded.settings == ImageSettings(32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert loaded.model.config.id2label[3] == "d" and loaded.model.classifier.out_features == 4
    torch.testing.assert_close(
        loaded.model.vit.layers[0].mlp.fc1.weight, backbone.layers[0].mlp.fc1.weight
    )
    assert loaded.description == "tiny/vit-enc@local-folder (local)"
    # A classifier for another label count is reinitialised and is the head too.
    ViTForImageClassification(ViTConfig(**cfg, num_labels=3)).save_pretrained(tmp_path / "cls")
    processor.save_pretrained(tmp_path / "cls")
    source = ModelSource("tiny/vit-cls", str(tmp_path / "cls"), "local", "local-folder")
    loaded = load_image_classifier(source, 5, random_init=False)
    assert loaded.head_modules == ["classifier"] and loaded.model.classifier.out_features == 5
    with pytest.raises(ValueError, match="random_init"):
        load_image_classifier(source, 5, random_init=True)


# ---------------------------------------------------------------- metric


def test_accuracy_and_argmax_on_hand_made_predictions():
    task = tasks.get_task("vision/food101")
    y = np.array([0, 1, 2, 2, 1, 0, 3, 3])
    p = np.array([0, 1, 2, 1, 1, 3, 3, 0])
    assert task.metrics(p, y) == {"accuracy": 5 / 8}
    assert task.metrics(y, y) == {"accuracy": 1.0}
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert task.predictions(logits).tolist() == [1, 0]
    with pytest.raises(ValueError):
        task.metrics(p[:3], y)
    with pytest.raises(NotImplementedError, match="image task"):
        task.encode(None, pd.DataFrame(), 16)


def test_a_real_trial_on_the_dtd_subset_with_a_random_init_vit(mirror_dir):
    import json

    from harness.modeling.image_models import RANDOM_INIT_ID
    from harness.spec.config import Budget, EvalConfig
    from harness.spec.identity import TrialSpec
    from harness.training.trial import run_trial

    spec = TrialSpec(
        sweep="t", method="lora", method_overrides={}, task="vision/dtd", lr=1e-3, seed=0,
        model_id=RANDOM_INIT_ID, model_revision=None,
        budget=Budget(max_steps=3, batch_size=4, train_rows=16, selection_rows=8, test_rows=12),
        eval=EvalConfig(batch_size=8), data_dir=mirror_dir, model_dir=None,
    )  # fmt: skip
    row = run_trial(spec)
    assert row["status"] == "ok", row.get("traceback")
    assert row["model_revision"] == "random-init: NOT pretrained"
    assert "10 of 47 classes" in row["data_source"]
    assert json.loads(row["test_rows"]) == {"test": 12} and 0 <= row["test_score"] <= 1
    # 10-way head (the offline subset), trained; LoRA on the 6 linear layers of 4 blocks.
    assert row["trainable_params"] == 4 * 8 * (4 * (128 + 128) + 2 * (128 + 512)) + 128 * 10 + 10
    assert row["sanity_init"].startswith("identity")
