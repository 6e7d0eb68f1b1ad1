"""Progress bars on long local work (data-informed inits, evaluation loops).

Shown only when stderr is a terminal: Ray workers, CI logs and redirected output get no
bar characters. tqdm comes with transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(
    items: Iterable[T], *, total: int | None = None, desc: str | None = None
) -> Iterator[T]:
    """`items`, iterated with a bar on stderr when it is a TTY (the plain iterator else)."""
    if not progress_enabled():
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr) as bar:
        yield from bar
