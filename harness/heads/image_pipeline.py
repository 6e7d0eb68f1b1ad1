"""The image-classification pipeline: ViT (pretrained, or random-init for offline smoke runs),
task-owned transforms (augmented train items, deterministic eval items), logits -> top-1."""

from __future__ import annotations

import numpy as np

from harness.heads.pipeline_base import Pipeline, item_record, make_loader
from harness.modeling.image_models import RANDOM_INIT_ID, load_image_classifier
from harness.modeling.models import LoadedModel, ModelSource
from harness.training.train import predict
from tasks.vision import collate

# Random-init runs are smoke runs on a CPU: small images keep them quick; the row's model
# revision says "random-init", so nothing mistakes them for pretrained results.
RANDOM_INIT_IMAGE_SIZE = 64


def image_pipeline(task, splits, source: ModelSource, eval_batch_size: int, device) -> Pipeline:
    label_names = splits.label_names
    num_labels = len(label_names) if label_names else task.num_labels
    random_init = source.kind == "random-init"
    loaded = load_image_classifier(
        None if random_init else source,
        num_labels,
        random_init=random_init,
        image_size=RANDOM_INIT_IMAGE_SIZE,
        seed=0,  # the same "pretrained" body for every method and seed
        label_names=label_names,
    )
    loaded.model.to(device)
    wrapped = LoadedModel(loaded.model, None, loaded.head_modules, source, loaded.model_type)
    train_rows = task.dataset(splits.train, loaded.settings, train=True, seed=0)
    pipeline = Pipeline(wrapped, train_rows, collate, {})

    def evaluator(name: str, df):
        rows = task.dataset(df, loaded.settings, train=False)
        labels = np.asarray(rows.labels)
        loader = make_loader(rows, collate, eval_batch_size, shuffle=False)

        def run() -> dict[str, float]:
            predictions = predict(wrapped.model, loader, device).argmax(axis=-1)
            pipeline.items[name] = item_record(predictions, labels, regression=False)
            return task.metrics(predictions, labels)

        return run

    pipeline.evaluators["selection"] = evaluator("selection", splits.selection)
    for name, df in splits.test.items():
        pipeline.evaluators[f"test/{name}"] = evaluator(f"test/{name}", df)
    return pipeline


def is_random_init(model_id: str) -> bool:
    return model_id == RANDOM_INIT_ID
