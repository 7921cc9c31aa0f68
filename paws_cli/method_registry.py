"""The method registry, in the timm style: ``@register_method("name")`` on a ``Method`` subclass.

Built-in methods register when ``paws_cli.methods`` is imported; methods from other packages register through the
Python entry-point group ``paws_cli.methods`` (each entry point names a module or a ``Method`` subclass; loading
it registers the method). This module imports nothing from the rest of the package, so the settings schema can
ask it which method sections exist without an import cycle.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

ENTRY_POINT_GROUP = "paws_cli.methods"

_REGISTRY: dict[str, type[Any]] = {}
_loaded = False

M = TypeVar("M", bound=type)


class UnknownMethodError(ValueError):
    """``method=NAME`` names no registered method; the message lists them with a did-you-mean."""


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``method=name``; its ``settings_class`` becomes the recipe
    section ``name:``. Registering a second class under a taken name is an error (one name, one method)."""

    def wrap(cls: M) -> M:
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} must be a Python identifier (it is a settings section)")
        taken = _REGISTRY.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(
                f"method {name!r} is already registered by {taken.__module__}.{taken.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load() -> None:
    """Register the built-in methods and those of installed packages (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("paws_cli.methods")  # the built-ins register on import
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in must not hide the others; say which one and why
            raise ImportError(
                f"the method plug-in {entry.name!r} ({entry.value}, entry-point group {ENTRY_POINT_GROUP!r}) "
                f"failed to load: {exc}"
            ) from exc


def method_names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Any]:
    """The Method subclass registered as ``name``; an error lists the known names with a did-you-mean."""
    _load()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownMethodError(
        f"method={name!r} is not a registered method.{hint} Registered methods: {', '.join(method_names())}."
    )


def method_sections() -> dict[str, type[Any]]:
    """Every registered method's settings section class, by method name."""
    _load()
    return {name: cls.settings_class for name, cls in sorted(_REGISTRY.items())}


def unregister_method(name: str) -> None:
    """Remove ``name`` (tests that register a toy method clean up with it)."""
    _REGISTRY.pop(name, None)
