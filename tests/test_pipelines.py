"""The head-kind registry of pipelines: every head kind a task can declare is served, the
dispatch goes through the registry (one place to add a kind), and refusals come first."""

from __future__ import annotations

import typing

import pytest
import torch

import tasks
from harness.heads import pipelines
from harness.modeling.models import RANDOM_T5_ID, resolve_model
from tasks.base import HeadKind
from tests.conftest import MINILM


def test_every_head_kind_has_exactly_one_builder():
    assert set(pipelines.PIPELINE_BUILDERS) == set(typing.get_args(HeadKind))
    for task_id in tasks.task_ids():
        assert tasks.get_task(task_id).head in pipelines.PIPELINE_BUILDERS, task_id


def _request_args(task_id: str, mirror_dir: str):
    task = tasks.get_task(task_id)
    splits = task.splits(mirror_dir, train_rows=8, selection_rows=4, test_rows=4)
    return task, splits


def test_build_pipeline_dispatches_through_the_registry(monkeypatch, mirror_dir):
    seen: list[pipelines.PipelineRequest] = []
    sentinel = object()

    def fake_builder(request):
        seen.append(request)
        return sentinel

    monkeypatch.setitem(pipelines.PIPELINE_BUILDERS, "regression", fake_builder)
    task, splits = _request_args("glue/stsb", mirror_dir)
    source = resolve_model(MINILM, None, None)
    out = pipelines.build_pipeline(
        task, splits, source, max_length=16, eval_batch_size=4, max_new_tokens=None,
        device=torch.device("cpu"), head_pooling="mean",
    )  # fmt: skip
    assert out is sentinel and len(seen) == 1
    assert seen[0].task is task and seen[0].head_pooling == "mean" and seen[0].max_length == 16
    # Served text-to-text on an encoder-decoder, the same task reaches the seq2seq entry.
    monkeypatch.setitem(pipelines.PIPELINE_BUILDERS, "seq2seq", fake_builder)
    t5 = resolve_model(RANDOM_T5_ID, None, None)
    pipelines.build_pipeline(
        task, splits, t5, max_length=16, eval_batch_size=4, max_new_tokens=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert len(seen) == 2 and seen[1].source is t5


def test_a_head_kind_without_a_builder_is_one_clear_error(monkeypatch, mirror_dir):
    monkeypatch.delitem(pipelines.PIPELINE_BUILDERS, "classification")
    task, splits = _request_args("glue/sst2", mirror_dir)
    with pytest.raises(ValueError, match="no pipeline serves"):
        pipelines.build_pipeline(
            task, splits, resolve_model(MINILM, None, None), max_length=16, eval_batch_size=4,
            max_new_tokens=None, device=torch.device("cpu"),
        )  # fmt: skip
