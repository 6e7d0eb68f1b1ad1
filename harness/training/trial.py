"""One trial, top to bottom: data -> model -> method -> train -> evaluate -> one result row.

`run_recipe` is the one recipe; a `Backend` (harness.training.backend) does what differs between one
device and a rank of a DeepSpeed trial. `run_trial` is the single-device trial, a plain
function (no Ray), so it is testable and benchmarkable on its own; the sweep only decides
where it runs. It never raises: a failure becomes a row with status "failed" (or
"diverged") and the error text. Each rank's distributed trial is harness.deepspeed.launch's
`rank_trial`, on the same recipe.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import methods
import tasks
from harness.heads.pipelines import build_pipeline, task_protocol
from harness.modeling.models import resolve_model, source_model_type
from harness.spec import identity, provenance
from harness.spec.identity import KEY_VERSION, TrialSpec
from harness.sweeps.tracking import LiveReport
from harness.training import memory, sanity
from harness.training.backend import Backend, LocalBackend
from harness.training.forgetting import probe_for
from harness.training.train import Diverged, planned_steps, train_loop
from tasks.data import pinned_revisions

STATUS_OK, STATUS_FAILED, STATUS_DIVERGED = "ok", "failed", "diverged"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def base_row(spec: TrialSpec, status: str = STATUS_OK, error: str = "") -> dict[str, Any]:
    """The identity and provenance columns every row has, whatever happened."""
    return {
        "key": spec.key(),
        "key_version": KEY_VERSION,
        "setting_key": spec.setting_key(),
        "data_fingerprint": spec.data_fingerprint,
        "sweep": spec.sweep,
        "status": status,
        "error": error,
        "method": spec.method,
        "task": spec.task,
        "model_id": spec.model_id,
        "seed": spec.seed,
        "lr": spec.lr,
        "budget": identity.recorded_budget(spec.budget),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": provenance.git_commit(),
        "packages": json.dumps(provenance.package_versions(), sort_keys=True),
    }


def run_trial(
    spec: TrialSpec | dict,
    *,
    live: LiveReport | None = None,
    adapters_dir: str | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """`live`: report while training (harness.sweeps.tracking); `adapters_dir`: save the trained
    adapter under `<adapters_dir>/<run key>/` (harness.training.adapters). Neither changes numbers.
    `autocast`: compute in this dtype with float32 weights (harness.training.backend.LocalBackend;
    cluster/gpu_check.py's bf16 trials); sweeps never set it, so rows are float32."""
    spec = spec if isinstance(spec, TrialSpec) else TrialSpec(**spec)
    if not spec.resolved:  # called directly rather than by a sweep's driver
        try:
            spec = identity.resolve([spec])[0]
        except Exception:  # noqa: BLE001 - the trial below fails with the real reason
            spec = identity.resolve([spec], read_data=False)[0]
    started = time.perf_counter()
    row = base_row(spec)
    try:
        run_recipe(spec, row, LocalBackend(spec, live, adapters_dir, autocast))
    except Diverged as err:
        row.update(status=STATUS_DIVERGED, error=str(err))
    except Exception as err:  # noqa: BLE001 - recorded, never silently dropped
        row.update(status=STATUS_FAILED, error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc(limit=20)
    row["wall_time_s"] = time.perf_counter() - started
    return row


def load_data_and_model(
    spec: TrialSpec, row: dict[str, Any], device, dtype: torch.dtype = torch.float32
):
    """The task's splits and the model pipeline for its head kind, with their provenance
    recorded in `row`; shared by single-device and distributed trials."""
    # Data: the task owns splits, preprocessing and metrics.
    task = tasks.get_task(spec.task)
    budget = spec.budget
    with pinned_revisions(spec.data_revisions):  # the hub commits the driver resolved
        splits = task.splits(
            spec.data_dir,
            train_rows=budget.train_rows,
            selection_rows=budget.selection_rows,
            test_rows=budget.test_rows,
        )
    # The protocol depends on the model family too (text-to-text on encoder-decoders).
    source = resolve_model(spec.model_id, spec.model_revision, spec.model_dir)
    protocol = task_protocol(task, source_model_type(source))
    row["protocol"] = protocol
    row["data_source"] = json.dumps(splits.provenance, sort_keys=True, default=str)
    identity.check_worker_data(spec, protocol, identity.data_fingerprint(splits.provenance))
    row["data_kind"] = _data_kind(splits.provenance)
    row["train_rows"], row["selection_rows"] = len(splits.train), len(splits.selection)
    row["test_rows"] = json.dumps({k: len(v) for k, v in splits.test.items()})

    # Model and batching for the head kind (sequence, causal LM, image, seq2seq).
    row["model_revision"], row["model_source"] = source.revision, f"{source.kind}:{source.location}"
    pipeline = build_pipeline(
        task,
        splits,
        source,
        max_length=budget.max_length,
        eval_batch_size=spec.eval.batch_size,
        max_new_tokens=spec.eval.max_new_tokens,
        device=device,
        dtype=dtype,
        head_pooling=spec.head_pooling,
    )
    row["head_pooling"] = spec.head_pooling
    return task, splits, pipeline


def run_recipe(spec: TrialSpec, row: dict[str, Any], backend: Backend) -> None:
    """The one trial recipe, on one device (`run_trial`) and on every rank of a DeepSpeed
    trial (harness.deepspeed.launch's `rank_trial`) alike; `backend` does what differs
    (harness.training.backend). Fills `row`; raises on failure (the callers decide what is
    caught)."""
    backend.start()
    device = backend.device
    row.update(provenance.hardware(device))
    seed_everything(spec.seed)

    # Data and model: the task's splits, the pipeline for its head kind.
    task, splits, pipeline = load_data_and_model(spec, row, device, backend.weights_dtype)
    backend.adapt_model(pipeline.model)
    budget = spec.budget
    # Forgetting (causal LMs): general-text LM loss of the base model, before the method.
    forgetting = None
    if backend.probes_forgetting:
        forgetting = probe_for(spec, task, pipeline.loaded.tokenizer)
    if forgetting is not None:
        forgetting.before(pipeline.model, device, row)

    # Method: parameterisation + (data-informed) init, timed, memory-measured and checked.
    saver = backend.adapter_saver()
    if saver is not None:
        saver.before_init(pipeline.model)
    with backend.compute():
        method, hp, model, probe = prepare_method(
            spec,
            pipeline,
            row,
            device,
            backend.init_batches(pipeline),
            dtype=backend.checks_dtype,
            offload_statistics=backend.offload_init_statistics,
        )
    backend.check_init(model)
    if saver is not None:
        saver.after_init(model)

    # Train: one loop over the backend's steps (under ZeRO, the partitioned model).
    total_steps = planned_steps(budget, len(pipeline.train_rows))
    optimizer = method.build_optimizer(model, spec.lr, hp, budget.weight_decay)
    stepper = backend.wrap(pipeline, model, optimizer, method.gradient_transform(hp), total_steps)
    model = stepper.module
    pipeline.loaded.model = model  # evaluators run the prepared (and wrapped) model
    pipeline.shard = backend.eval_shard()
    checked = sanity.CheckedCallbacks(method.callbacks(hp, total_steps), probe,
                                      backend.checks_dtype)  # fmt: skip
    state = backend.restore()
    if state.step:  # e.g. SDS-LoRA: which form the restored adapter is in
        checked.on_restore(state.step, model)
    on_report, report_every = backend.live_reporting(total_steps)
    with backend.compute():
        result = train_loop(
            stepper,
            backend.training_batches(pipeline, state),
            total_steps,
            state=state,
            callbacks=checked,
            evaluate_every=spec.eval.every_steps,
            evaluate=lambda: pipeline.evaluate("selection")[task.selection_metric],
            on_report=on_report,
            report_every=report_every,
        )
    row["sanity_callbacks"] = checked.summary()
    backend.check_after_training(model)
    row["peak_memory_mb"], row["peak_memory_kind"] = backend.peak_memory()
    row.update(
        steps=result.steps,
        train_time_s=result.train_time_s,
        samples_per_s=result.samples / result.train_time_s,
        tokens_per_s=result.tokens / result.train_time_s,
        final_train_loss=result.final_loss,
        loss_curve=json.dumps(result.loss_curve),
        eval_curve=json.dumps(result.eval_curve),
    )

    # Evaluate: select on the selection split, report the test split(s) (sharded over
    # the ranks of a distributed trial, gathered: rank 0's row has them all).
    with backend.compute():
        evaluate_into_row(task, splits, pipeline, row)
    if forgetting is not None:
        forgetting.after(model, device, row)

    # Last, since merging may change the model in place: merged == unmerged outputs.
    unmerged_outputs = sanity.outputs(model, probe)
    if saver is not None:  # before the merge, which may fold the adapter in place
        row.update(saver.save(model, method, spec, probe, unmerged_outputs,
                              pipeline.loaded.head_modules))  # fmt: skip
    row["sanity_merge"] = backend.merge_check(method, model, probe, unmerged_outputs)
    backend.record(row, checked)


def prepare_method(
    spec: TrialSpec,
    pipeline,
    row: dict[str, Any],
    device,
    init_batches,
    *,
    dtype: torch.dtype = torch.float32,
    offload_statistics: bool = False,
):
    """The method's parameterisation and (data-informed) init on the pipeline's model:
    timed, peak memory reset before it, and checked on a fixed probe batch (init promise,
    trainable-parameter formula). Returns (method, hp, prepared model, probe). Shared by
    single-device and distributed trials (where `init_batches` yields this rank's share)."""
    method = methods.get_method(spec.method)
    model_type = pipeline.loaded.model_type
    resolved_here = identity.method_config(spec.method, spec.method_overrides, model_type)
    identity.check_worker_method_config(spec, resolved_here)
    hp = method.hyperparams(spec.method_overrides)
    model = pipeline.model
    ctx = methods.PrepareContext(
        head_modules=pipeline.loaded.head_modules,
        default_target_modules=method.family_target_modules(model_type),
        init_batches=init_batches if method.needs_init_batches else None,
        learning_rate=spec.lr,
        train_examples=len(pipeline.train_rows),
        batch_size=spec.budget.batch_size,
        total_steps=planned_steps(spec.budget, len(pipeline.train_rows)),
        warmup_ratio=spec.budget.warmup_ratio,
        offload_statistics=offload_statistics,
    )
    expected_trainable = method.expected_trainable_params(model, hp, ctx)
    resolved = method.resolved_config(hp, ctx)
    row["method_config"] = json.dumps(resolved, sort_keys=True, default=str)
    probe = next(pipeline.batches(2, seed=0, device=device))  # fixed inputs for the checks
    base_outputs = sanity.outputs(model, probe)
    memory.reset_peak(device)
    init_started = time.perf_counter()
    model = method.prepare(model, hp, ctx)
    row["init_time_s"] = time.perf_counter() - init_started
    if ctx.init_notes:  # what the init decided (e.g. layers it treated specially)
        resolved["init_notes"] = ctx.init_notes
        row["method_config"] = json.dumps(resolved, sort_keys=True, default=str)
    row["sanity_init"] = sanity.check_init(
        base_outputs, sanity.outputs(model, probe), method.starts_at_base(hp), dtype
    )
    trainable, total = count_params(model)
    row.update(trainable_params=trainable, total_params=total)
    row["expected_trainable_params"] = expected_trainable
    if trainable != expected_trainable:
        raise sanity.SanityError(
            f"sanity check: {trainable} trainable parameters, the method's formula says "
            f"{expected_trainable}"
        )
    return method, hp, model, probe


def evaluate_into_row(task, splits, pipeline, row: dict[str, Any]) -> None:
    """Selection metrics on the selection split, test metrics on every test split (plus the
    task's suite-level summary), per-item outcomes and the majority baseline, into `row`.
    Shared by single-device and distributed trials (where every rank runs it)."""
    eval_started = time.perf_counter()
    selection = pipeline.evaluate("selection")
    test: dict[str, float] = {}
    for name in splits.test:
        metrics = pipeline.evaluate(f"test/{name}")
        prefix = f"{name}/" if len(splits.test) > 1 else ""
        test.update({prefix + k: v for k, v in metrics.items()})
    test = task.summarize(test)
    row["eval_time_s"] = time.perf_counter() - eval_started
    row.update(
        selection_metric=task.selection_metric,
        selection_score=selection[task.selection_metric],
        selection_metrics=json.dumps(selection, sort_keys=True),
        test_metric=task.headline_metric,
        test_score=test[task.headline_metric],
        test_metrics=json.dumps(test, sort_keys=True),
        test_items=json.dumps({k: v for k, v in pipeline.items.items() if k != "selection"}),
        majority_baseline=_majority_baseline(task, splits),
    )


def _data_kind(prov: dict[str, Any]) -> str:
    """'hub', 'mirror' (or both, '+'-joined) from the task's per-split provenance."""
    sources = {prov["train"]["source"], *(p["source"] for p in prov["test"].values())}
    return "+".join(sorted(sources))


def _majority_baseline(task, splits) -> float | None:
    """The headline test metric of always predicting the train majority class."""
    if task.head != "classification":
        return None
    majority = splits.train["label"].mode().iloc[0]
    scores: dict[str, float] = {}
    for name, df in splits.test.items():
        preds = np.full(len(df), majority)
        prefix = f"{name}/" if len(splits.test) > 1 else ""
        scores.update(
            {prefix + k: v for k, v in task.metrics(preds, df["label"].to_numpy()).items()}
        )
    return scores.get(task.headline_metric)
