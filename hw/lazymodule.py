"""Modules a library imports at its top but the agent never uses, executed on first use instead.

Why: on the way to the first code on the panel, Pillow's EXIF/TIFF tag tables (``PIL.ExifTags``
~5 ms of CPU on x86, ``PIL.TiffTags`` ~1 ms), segno's writers (SVG/EPS/PDF/..., which pull in
``xml.sax`` and ``gzip``: ~4 ms) and what msal and urllib3 import for flows the agent never runs
are paid by every start and used by none (docs/PERFORMANCE.md "Sign-in"). After ``defer(name)``
the import of ``name`` gives an empty module that runs the real module's code into itself the
first time an attribute it does not have yet is read (a module ``__getattr__``, PEP 562): the
importing library binds the same object, and anything that ever uses it gets the real thing.
Unlike ``importlib.util.LazyLoader`` the import system's own look-ups (``__spec__``) do not set
it off. The empty module is made by the import system itself (a finder first on
``sys.meta_path`` serves the deferred names), so it hangs from its package as any submodule does,
and deferring a module imports nothing, not even its package. A top-level module (``shutil``) is
deferred the same way when it is a file on ``sys.path`` (not a built-in one).

Two more shapes of import, for libraries that name what they take:

- a deferred *package* gives a submodule read from it (``from urllib3.http2 import probe``) by
  importing that submodule alone; the package's own code still waits for a name of its own;
- ``stand_ins``: names a library takes at its import (``from msal.oauth2cli.authcode import
  AuthCodeReceiver``) but only ever calls. Until the module has run, each is answered with a
  function that runs the module on its first call and calls the real one (a class is
  constructed, a function called); the module's own attribute is the real one once it ran.
  Only for names that are only called: a stand-in is no class to subclass or to test with
  ``isinstance``;
- ``answers``: a name a library calls at its import whose answer the caller can give without
  the module (``certifi.where()``, a path): the given function answers until the module has run
  (it may run it with ``load``, e.g. where its shortcut does not apply).

Until its first use a deferred module is empty: ``dir()`` lists nothing, and a name *assigned*
to it before then is overwritten when its code runs (``mock.patch`` and ``monkeypatch`` read the
name first, which runs it). Defer only what the agent never patches that way.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_lock = threading.Lock()           # only around _planned and sys.meta_path, never around module code
_planned: dict[str, _Plan] = {}      # name -> what it answers before it runs, until it is imported


def defer(name: str, *, stand_ins: Iterable[str] = (),
          answers: Mapping[str, Callable[..., Any]] | None = None) -> bool:
    """Defer ``name`` (``package.module``, or a top-level module) unless it is already imported
    (then nothing changes). Imports nothing and looks nothing up (each look-up costs a start ~0.2 ms): a
    name that does not exist fails at its import as it always would. True if deferred."""
    if name in sys.modules:
        return False
    with _lock:
        _planned[name] = _Plan(frozenset(stand_ins), dict(answers or {}))
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    return True


def is_deferred(module: types.ModuleType) -> bool:
    """Still waiting for its first use (its code has not run)."""
    hook = module.__dict__.get("__getattr__")
    return isinstance(hook, _Hook) and not hook.done and not hook.running and not hook.replaced()


def load(module: types.ModuleType) -> types.ModuleType:
    """``module`` with its code run (at once, if it was still deferred)."""
    hook = module.__dict__.get("__getattr__")
    return hook.run() if isinstance(hook, _Hook) else module


class _Plan:
    """What a deferred module answers before its code runs."""

    __slots__ = ("stand_ins", "answers")

    def __init__(self, stand_ins: frozenset[str], answers: dict[str, Callable[..., Any]]) -> None:
        self.stand_ins = stand_ins
        self.answers = answers


class _Finder:
    """First on ``sys.meta_path`` once a name is deferred: serves each once, as an empty module.
    It stays there (a dict look-up per import): taking it out while another thread's import
    walks ``sys.meta_path`` would make that import skip the finder after it."""

    @staticmethod
    def find_spec(fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _planned:
            return None
        with _lock:
            plan = _planned.pop(fullname, None)
        if plan is None:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None or real.loader is None:
            return real
        spec = importlib.machinery.ModuleSpec(fullname, _Loader(real, plan), origin=real.origin,  # type: ignore[arg-type]  # stubs want abc.Loader; any loader works
                                              is_package=real.submodule_search_locations is not None)
        spec.submodule_search_locations = real.submodule_search_locations
        spec.has_location, spec.cached = real.has_location, real.cached
        return spec

    @staticmethod
    def invalidate_caches() -> None:
        """Nothing cached (importlib.invalidate_caches asks every finder)."""


_FINDER = _Finder()


class _Loader:
    """Makes the empty module: its code runs on the first read of a name it does not have."""

    def __init__(self, real: importlib.machinery.ModuleSpec, plan: _Plan) -> None:
        self.real = real
        self.plan = plan

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None                     # the import system's default module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__getattr__"] = _Hook(module, self.real, self.plan, self)


class _Hook:
    """The deferred module's ``__getattr__`` (PEP 562). It stays in the module until the real
    code has run to its end: another thread that reads a name the running code has not set yet
    waits for it (the hook's own lock), instead of a false AttributeError from a half-run
    module. Each hook has its lock, so running one module's code (and the imports it makes,
    with the import system's own locks) never waits for another deferred module's."""

    def __init__(self, module: types.ModuleType, real: importlib.machinery.ModuleSpec, plan: _Plan,
                 loader: _Loader) -> None:
        self.module = module
        self.real = real
        self.loader = loader
        self.stand_ins = plan.stand_ins
        self.answers = plan.answers
        self.given: dict[str, Callable[..., Any]] = {}
        self.lock = threading.RLock()
        self.running = False            # its code runs now, in the thread holding ``lock``
        self.done = False

    def replaced(self) -> bool:
        """The module's code ran without this hook (``importlib.reload``): the hook is a leftover."""
        if self.done or self.running:
            return False
        return getattr(self.module.__dict__.get("__spec__"), "loader", None) is not self.loader

    def _drop(self) -> None:
        self.done = True
        if self.module.__dict__.get("__getattr__") is self:
            del self.module.__dict__["__getattr__"]

    def run(self) -> types.ModuleType:
        """The real module's code, once (the import system's spec and loader, then its code).
        Its own thread, back here from that code, gets the module as it is (a circular import);
        a failed run leaves the module deferred again, and the error goes to the caller."""
        module = self.module
        if self.done:
            return module
        with self.lock:
            if self.done or self.running:
                return module
            if self.replaced():
                self._drop()
                return module
            ours = module.__spec__, module.__loader__
            module.__spec__, module.__loader__ = self.real, self.real.loader
            self.running = True
            try:
                self.real.loader.exec_module(module)        # type: ignore[union-attr]
            except BaseException:
                module.__spec__, module.__loader__ = ours
                module.__dict__["__getattr__"] = self
                raise
            finally:
                self.running = False
            self._drop()
        return module

    def __call__(self, attr: str) -> Any:
        module, name = self.module, self.module.__name__
        if self.replaced():
            self._drop()
        if not self.done and not self.running:
            if attr == "__path__":        # the import system asking "a package?" (no)
                raise AttributeError(attr)
            if attr in self.answers:
                return self.answers[attr]
            if attr in self.stand_ins:
                return self.given.setdefault(attr, self._stand_in(attr))
            search = self.real.submodule_search_locations
            if search and not attr.startswith("__") and importlib.machinery.PathFinder.find_spec(
                    f"{name}.{attr}", list(search)) is not None:
                return importlib.import_module(f"{name}.{attr}")   # sets module.<attr>
        self.run()
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    def _stand_in(self, attr: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.run(), attr)(*args, **kwargs)

        name = self.module.__name__
        call.__name__ = call.__qualname__ = attr
        call.__module__ = name
        call.__doc__ = f"Runs {name} on the first call, then calls its {attr} (hw.lazymodule)."
        return call
