"""Modules a library imports at its top but the panel never uses, executed on first use instead.

Why: on the way to the first code on the panel, Pillow's EXIF/TIFF tag tables (``PIL.ExifTags``
~5 ms of CPU on x86, ``PIL.TiffTags`` ~1 ms) and segno's writers (SVG/EPS/PDF/..., which pull in
``xml.sax`` and ``gzip``: ~4 ms) are paid by every start and read by none of our displays
(docs/PERFORMANCE.md "Sign-in"). ``defer(name)`` puts an empty module under ``name`` in
``sys.modules`` that runs the real module's code into itself the first time an attribute it does
not have yet is read (a module ``__getattr__``, PEP 562): the importing library binds the same
object, and anything that ever uses it gets the real thing. Unlike ``importlib.util.LazyLoader``
the import system's own look-ups (``__spec__``) do not set it off.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.RLock()


def defer(name: str) -> bool:
    """Defer ``name`` (``package.module``) unless it or its package is already imported, or it
    cannot be found without importing the package (then nothing changes). True if deferred."""
    parent_name, _, child = name.rpartition(".")
    if not parent_name or name in sys.modules or parent_name in sys.modules and hasattr(
            sys.modules[parent_name], child):
        return False
    try:
        parent_spec = importlib.util.find_spec(parent_name)   # a top-level name: not imported
    except (ImportError, ValueError):
        return False
    if parent_spec is None or not parent_spec.submodule_search_locations:
        return False
    spec = importlib.machinery.PathFinder.find_spec(name, list(parent_spec.submodule_search_locations))
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> Any:  # noqa: N807 - PEP 562's name
        with _lock:
            if module.__dict__.get("__getattr__") is __getattr__:
                del module.__dict__["__getattr__"]
                loader.exec_module(module)          # type: ignore[union-attr]
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = module
    if parent_name in sys.modules:
        setattr(sys.modules[parent_name], child, module)   # as the import system does
    return True


def is_deferred(module: types.ModuleType) -> bool:
    """Still waiting for its first use (its code has not run)."""
    return "__getattr__" in module.__dict__ and module.__dict__["__getattr__"].__qualname__.startswith("defer.")
