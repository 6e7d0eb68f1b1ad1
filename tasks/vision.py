"""Vision: five image-classification tasks from one table, plus their image transforms.

Protocol vision-v1 (the string in `PROTOCOL`): the learning rate is selected on a split carved
from train with a fixed protocol seed (0), min(10% of train, 2000) rows unless the budget says
otherwise; the train budget is a fixed seeded subset of the remaining pool; the dataset's
official test split is reported once (a fixed seeded subset of it when `test_rows` is set).
Metric: top-1 accuracy. Images: train = RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4,
4/3)) + horizontal flip (p=0.5); eval = resize the shorter side to int(S * 256 / 224) +
center crop S; both bilinear (antialiased, PIL), then /255 and normalised by the model's
image-processor mean/std. S is the model's input size (224 for ViT-B/16).

Sources (`SPECS`): the hub copies the vision LoRA papers' code loads (task-arithmetic /
FusionBench copies by tanganke, with the official train/test splits; Food-101 from its
owner's repo, whose official test split is named "validation"; CUB from a parquet copy of
the official 5,994/5,794 split). Hub loading goes through `datasets.load_dataset`; the image
and label columns are the dataset's first `Image` and `ClassLabel` features, and the label
names come from that `ClassLabel`.

Offline (`data_dir` given): each task reads an imagefolder `<data_dir>/<mirror id>/<split>/
<class>/<file>` (labels = sorted class folder names). Only DTD has one in this project's
mirror, and it is a SUBSET: `tanganke/dtd-10class`, 10 of DTD's 47 classes (800 train / 400
test). Its provenance says so ("subset") and `label_names` has the 10 names; since DTD's
classes are sorted alphabetically on the hub too, these are its first 10 label ids. The
task's `num_labels` is the full dataset's; the head must be sized by `len(label_names)`.

Rows: `image` (a file path for an imagefolder, encoded image bytes from the hub), `label`
(int) and `idx` (the row's position in its source split, for disjointness checks).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from tasks.base import DataSplits, Task
from tasks.data import (
    carve_selection,
    dataset_fingerprint,
    load_hub_dataset,
    manifest_entry,
    subsample,
)
from tasks.registry import register_task

PROTOCOL_SEED = 0
PROTOCOL = (
    "vision-v1:select=train-carve(seed0,min(10%,2000));test=official-test(seeded-subset);"
    "eval=resize-short(int(S*256/224),bilinear)+center-crop(S)+normalize(processor);"
    "train=rrc(S,scale=0.08-1,ratio=3/4-4/3)+hflip(0.5);metric=top1"
)
HEAD = "image_classification"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class VisionSpec:
    hub_id: str
    config: str | None
    train_split: str
    test_split: str  # the hub's name for the official test split
    num_labels: int  # of the full dataset on the hub
    description: str
    mirror_id: str | None = None  # imagefolder under data_dir; defaults to hub_id
    mirror_subset: str | None = None  # set when the mirror copy is not the whole dataset

    def mirror_path(self) -> str:
        return self.mirror_id or self.hub_id


SPECS: dict[str, VisionSpec] = {
    "cars": VisionSpec(
        "tanganke/stanford_cars", None, "train", "test", 196,
        "Stanford Cars, 196 car models (8,144 train / 8,041 test), top-1 accuracy",
    ),
    "cub200": VisionSpec(
        "Donghyun99/CUB-200-2011", None, "train", "test", 200,
        "CUB-200-2011 birds, 200 species (5,994 train / 5,794 test), top-1 accuracy",
    ),
    "dtd": VisionSpec(
        "tanganke/dtd", None, "train", "test", 47,
        "DTD textures, 47 classes (3,760 train / 1,880 test), top-1 accuracy; offline: the "
        "10-class subset tanganke/dtd-10class (800 / 400)",
        mirror_id="tanganke/dtd-10class",
        mirror_subset="dtd-10class: 10 of 47 classes",
    ),
    "food101": VisionSpec(
        "ethz/food101", None, "train", "validation", 101,
        "Food-101, 101 dishes (75,750 train / 25,250 test, named 'validation'), top-1 accuracy",
    ),
    "sun397": VisionSpec(
        "tanganke/sun397", None, "train", "test", 397,
        "SUN397 scenes, 397 classes (19,850 train / 19,850 test), top-1 accuracy",
    ),
}  # fmt: skip


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return {"accuracy": float((predictions == labels).mean())}


# ---------------------------------------------------------------- loading


def _files_fingerprint(folder: Path, files: list[Path]) -> str:
    """sha256 over the sorted relative paths and sizes (content is not read: fast)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def load_imagefolder(
    data_dir: str, dataset_path: str, split: str, label_names: list[str] | None = None
) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """`<data_dir>/<dataset_path>/<split>/<class>/<file>` as rows, provenance, label names.

    Labels index the sorted class folder names, or `label_names` when given (another split's
    label space: a class folder not in it is an error).
    """
    root = Path(data_dir)
    base = root / dataset_path
    folder = base / split
    if not folder.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(
            f"{dataset_path} split {split!r} is not in the data mirror: {folder} is missing; "
            f"splits there: {have or 'none'} (unset HARNESS_DATA_DIR to use the hub)"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders (expected <split>/<class>/*)")
    if label_names is None:
        label_names = classes
    unknown = sorted(set(classes) - set(label_names))
    if unknown:
        raise ValueError(f"{folder} has classes not in the label space: {unknown}")
    index = {name: i for i, name in enumerate(label_names)}
    files, labels = [], []
    for name in classes:
        for f in sorted((folder / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(index[name])
    if not files:
        raise FileNotFoundError(f"{folder} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    df = pd.DataFrame(
        {
            "image": [str(f) for f in files],
            "label": np.asarray(labels, dtype=np.int64),
            "idx": np.arange(len(files), dtype=np.int64),
        }
    )
    rel = f"{dataset_path}/{split}"
    prov: dict[str, Any] = {
        "source": "mirror",
        "format": "imagefolder",
        "path": rel,
        "rows": len(df),
        "classes": len(classes),
        "fingerprint": _files_fingerprint(folder, files),
    }
    entry = manifest_entry(root, rel)
    if entry:
        prov.update(origin=entry.get("source"), license=entry.get("license"))
    return df, prov, list(label_names)


def _hub_columns(features: Any) -> tuple[str, str]:
    import datasets

    image = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    label = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    image_col = image[0] if image else "image"
    label_col = label[0] if label else "label"
    missing = [c for c in (image_col, label_col) if c not in features]
    if missing:
        raise ValueError(f"no image/label column {missing} among {list(features)}")
    return image_col, label_col


class _HubSplit:
    """A hub split whose rows are chosen on labels alone; images are read for chosen rows."""

    def __init__(self, spec: VisionSpec, split: str):
        import datasets

        self.ds, revision = load_hub_dataset(spec.hub_id, spec.config, split)
        self.image_col, self.label_col = _hub_columns(self.ds.features)
        feature = self.ds.features[self.label_col]
        self.label_names = (
            list(feature.names)
            if isinstance(feature, datasets.ClassLabel)
            else [str(i) for i in range(spec.num_labels)]
        )
        labels = self.ds.select_columns([self.label_col]).to_pandas()[self.label_col]
        self.index = pd.DataFrame(
            {
                "label": labels.to_numpy(dtype=np.int64),
                "idx": np.arange(len(labels), dtype=np.int64),
            }
        )
        self.provenance = {
            "source": "hub",
            "hub_id": spec.hub_id,
            "config": spec.config,
            "split": split,
            "revision": revision,  # the commit read (None: offline, from the datasets cache)
            "rows": len(self.ds),
            "classes": len(self.label_names),
            # sha256 of the loaded table (images included: read once per task and trial)
            "fingerprint": dataset_fingerprint(self.ds),
        }

    def materialise(self, rows: pd.DataFrame) -> pd.DataFrame:
        import datasets

        chosen = self.ds.select(rows["idx"].tolist()).select_columns([self.image_col])
        chosen = chosen.cast_column(self.image_col, datasets.Image(decode=False))
        images = [
            item["bytes"] if item.get("bytes") is not None else item["path"]
            for item in chosen[self.image_col]
        ]
        out = rows.copy()
        out.insert(0, "image", images)
        return out


def _check_labels(df: pd.DataFrame, n_labels: int, where: str) -> None:
    bad = (df["label"] < 0) | (df["label"] >= n_labels)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} labels outside [0, {n_labels})")


class VisionTask(Task):
    spec: VisionSpec
    protocol = PROTOCOL
    head = HEAD
    selection_metric = "accuracy"
    headline_metric = "accuracy"

    def splits(self, data_dir, *, train_rows=None, selection_rows=None, test_rows=None):
        spec = self.spec
        if data_dir:
            path = spec.mirror_path()
            train_full, train_prov, names = load_imagefolder(data_dir, path, spec.train_split)
            test_full, test_prov, _ = load_imagefolder(data_dir, path, spec.test_split, names)
            materialise = None
            if spec.mirror_subset:
                train_prov["subset"] = test_prov["subset"] = spec.mirror_subset
        else:
            hub_train = _HubSplit(spec, spec.train_split)
            hub_test = _HubSplit(spec, spec.test_split)
            if hub_train.label_names != hub_test.label_names:
                raise ValueError(f"{self.id}: train and test label names differ on the hub")
            names = hub_train.label_names
            train_full, train_prov = hub_train.index, hub_train.provenance
            test_full, test_prov = hub_test.index, hub_test.provenance
            materialise = (hub_train.materialise, hub_test.materialise)
        _check_labels(train_full, len(names), f"{self.id} {spec.train_split}")
        _check_labels(test_full, len(names), f"{self.id} {spec.test_split}")

        n_select = selection_rows or min(len(train_full) // 10, 2000)
        pool, selection = carve_selection(train_full, n_select, seed=PROTOCOL_SEED)
        train = subsample(pool, train_rows, seed=PROTOCOL_SEED)
        test = subsample(test_full, test_rows, seed=PROTOCOL_SEED)
        if materialise:
            train, selection = materialise[0](train), materialise[0](selection)
            test = materialise[1](test)
        provenance: dict[str, Any] = {
            "train": train_prov,
            "test": {"test": test_prov},
            "train_pool_rows": len(pool),
            "train_rows": len(train),
            "selection_rows": len(selection),
            "test_rows": {"test": len(test)},
            "num_labels": len(names),
            "label_names": list(names),
        }
        if data_dir and spec.mirror_subset:
            provenance["subset"] = spec.mirror_subset
        return DataSplits(
            train=train,
            selection=selection,
            test={"test": test},
            provenance=provenance,
            label_names=list(names),
        )

    def encode(self, tokenizer, rows, max_length):
        raise NotImplementedError(
            f"{self.id} is an image task: build batches with task.dataset(rows, settings, "
            "train=...) and tasks.vision.collate, not a tokenizer"
        )

    def dataset(
        self, rows: pd.DataFrame, settings: ImageSettings, *, train: bool, seed: int = 0
    ) -> ImageRows:
        return ImageRows(rows, settings, train=train, seed=seed)

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return accuracy(predictions, labels)


def _register(name: str, spec: VisionSpec) -> None:
    cls = type(
        f"Vision_{name}",
        (VisionTask,),
        {"spec": spec, "description": spec.description, "num_labels": spec.num_labels},
    )
    register_task(f"vision/{name}")(cls)


for _name, _spec in SPECS.items():
    _register(_name, _spec)


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class ImageSettings:
    """What the transforms need from the model's image processor."""

    size: int  # square input side S
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_size(self) -> int:
        """Shorter side before the eval center crop (256 for S = 224)."""
        return int(self.size * 256 / 224)


def open_image(image: Any) -> Image.Image:
    """A row's `image` (path, bytes, {"bytes","path"} dict or PIL image) as an RGB image."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, Path)):
        with Image.open(image) as f:
            f.load()
            image = f.copy() if f.mode == "RGB" else f.convert("RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image, settings: ImageSettings) -> torch.Tensor:
    """(3, H, W) float32: pixels / 255, then (x - mean) / std per channel."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(settings.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(settings.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(int): shorter side to `size`, the longer side scaled (truncated)."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image.resize(new, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop (the image is at least `size` on both sides here)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_transform(image: Any, settings: ImageSettings) -> torch.Tensor:
    img = open_image(image)
    img = center_crop(resize_shorter(img, settings.resize_size), settings.size)
    return to_tensor(img, settings)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params as (left, top, width, height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image, clamped to the ratio range, centered.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(
    image: Any,
    settings: ImageSettings,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> torch.Tensor:
    """RandomResizedCrop(S, scale, ratio) + RandomHorizontalFlip(flip_p), drawn from `rng`."""
    img = open_image(image)
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    img = img.resize(
        (settings.size, settings.size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + w, top + h),
    )
    if rng.random() < flip_p:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img, settings)


class ImageRows:
    """Map-style dataset over rows: {"pixel_values": (3,S,S), "labels": int} per item.

    Train items draw their augmentation from a generator seeded by (seed, epoch, index), so
    a run is reproducible whatever the DataLoader's worker count or order; call
    `set_epoch` before each epoch for fresh augmentations. Eval items are deterministic.
    """

    def __init__(self, rows: pd.DataFrame, settings: ImageSettings, *, train: bool, seed=0):
        self.images = rows["image"].tolist()
        self.labels = rows["label"].astype(np.int64).tolist()
        self.settings, self.train, self.seed, self.epoch = settings, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            pixels = train_transform(self.images[i], self.settings, rng)
        else:
            pixels = eval_transform(self.images[i], self.settings)
        return {"pixel_values": pixels, "labels": self.labels[i]}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items to {"pixel_values": (B, 3, S, S) float32, "labels": (B,) int64}."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]).float(),
        "labels": torch.tensor([int(it["labels"]) for it in items], dtype=torch.long),
    }
