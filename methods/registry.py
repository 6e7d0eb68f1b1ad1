"""One registry of methods: `@register_method` in a module per method, plus entry points."""

from __future__ import annotations

from importlib.metadata import entry_points

from methods.base import Method

ENTRY_POINT_GROUP = "lowrank_harness.methods"
_METHODS: dict[str, type[Method]] = {}
_entry_points_loaded = False


def register_method(name: str):
    """Class decorator: `@register_method("lora")` over a `Method` subclass."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_entry_points() -> None:
    # Third-party methods: `[project.entry-points."lowrank_harness.methods"] x = "pkg.module"`.
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_method(name: str) -> Method:
    _load_entry_points()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]()


def method_names() -> list[str]:
    _load_entry_points()
    return sorted(_METHODS)
