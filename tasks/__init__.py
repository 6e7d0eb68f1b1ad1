"""Tasks, one module per family; importing this package registers them all."""

from tasks.base import DataSplits, HeadKind, Task
from tasks.registry import get_task, register_task, task_ids

__all__ = ["DataSplits", "HeadKind", "Task", "get_task", "register_task", "task_ids"]

# Importing a family module registers its tasks.
from tasks import code, commonsense, glue, math_reasoning, vision  # noqa: E402,F401
