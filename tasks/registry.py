"""One registry of tasks: `@register_task` in a module per task family, plus entry points."""

from __future__ import annotations

from importlib.metadata import entry_points

from tasks.base import Task

ENTRY_POINT_GROUP = "lowrank_harness.tasks"
_TASKS: dict[str, Task] = {}
_entry_points_loaded = False


def register_task(task_id: str):
    """Class decorator: `@register_task("glue/sst2")` over a `Task` subclass (no-arg init)."""

    def wrap(cls: type[Task]) -> type[Task]:
        if task_id in _TASKS:
            raise ValueError(f"task {task_id!r} is registered twice")
        cls.id = task_id
        _TASKS[task_id] = cls()
        return cls

    return wrap


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_task(task_id: str) -> Task:
    _load_entry_points()
    if task_id not in _TASKS:
        raise KeyError(f"unknown task {task_id!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[task_id]


def task_ids() -> list[str]:
    _load_entry_points()
    return sorted(_TASKS)
