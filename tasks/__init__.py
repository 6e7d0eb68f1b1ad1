"""Tasks, one module per family; importing this package registers them all."""

from tasks.base import DataSplits, HeadKind, Task
from tasks.registry import get_task, register_task, task_ids

__all__ = ["DataSplits", "HeadKind", "Task", "get_task", "register_task", "task_ids"]

from tasks import glue  # noqa: E402,F401  (registers the GLUE tasks)
