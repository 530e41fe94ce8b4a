"""Compiled regular expressions kept from one start to the next, in the unit's cache directory.

Why: the libraries on the way to the first code compile ~100 regular expressions at their import
(urllib3's URL and IPv6 patterns alone ~6-14 ms of CPU on x86, then http.cookiejar, email, idna,
platform...): ~15-25 ms of the start, paid again at every boot for the same patterns
(docs/PERFORMANCE.md "Sign-in"). Like the bytecode in the same directory, the result is kept:
``warm()`` (at the service module's import) puts the patterns a previous start compiled into
``re``'s own cache, so ``re.compile`` finds them there; ``save()`` (once the code is on the
glass) writes the file again only when this start compiled patterns it did not hold.

What is kept is exactly what ``re``'s compiler handed ``_sre.compile`` for each pattern (its
code words, groups and names), so a pattern from the file is the object the compiler would have
made. The file is used only by the interpreter that wrote it (version and build, ``_sre``'s
MAGIC and word size, the compiler's source files' size and mtime); anything unexpected (another
Python, a damaged file, ``re`` internals that are not CPython 3.11-3.13's) turns the cache off
and every pattern is compiled as always. Only with ``$CACHE_DIRECTORY`` (systemd's
``CacheDirectory=``, docs/INTERFACE.md "Secrets and files"); without it this module does nothing.
"""

from __future__ import annotations

import logging
import marshal
import os
import re
import sys
from array import array
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
MAX_ENTRIES = 400         # re keeps 512; more would only push the start's own patterns out
_Entry = tuple[bool, Any, int, int, bytes, int, dict[str, int], tuple[Any, ...]]


class _Recorder:
    """Stands in for ``_sre`` in ``re._compiler`` while a start runs: remembers, for every
    pattern compiled, the arguments the compiler gave ``_sre.compile``."""

    def __init__(self, sre: Any) -> None:
        self._sre = sre
        self.made: list[tuple[Any, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sre, name)

    def compile(self, pattern: Any, flags: int, code: list[int], groups: int, groupindex: Any,
                indexgroup: Any) -> Any:
        obj = self._sre.compile(pattern, flags, code, groups, groupindex, indexgroup)
        if isinstance(pattern, str | bytes):
            self.made.append((obj, (int(flags), array("I", code).tobytes(), int(groups), dict(groupindex),
                                    tuple(indexgroup))))
        return obj


class RegexCache:
    """The patterns of ``path`` in ``re``'s cache; records what this start compiles beyond them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[bool, Any, int], _Entry] = {}
        self._recorder: _Recorder | None = None
        self.loaded = 0

    def warm(self) -> RegexCache:
        compiler = _compiler()
        if compiler is None:
            return self
        import _sre

        try:
            # Data only (tuples, strings, numbers), in a directory only the service may write.
            header, entries = marshal.loads(self.path.read_bytes())  # noqa: S302
            if header == _header():
                made = {}
                for entry in entries:
                    is_bytes, pattern, key_flags, flags, code, groups, groupindex, indexgroup = entry
                    made[(bytes if is_bytes else str, pattern, key_flags)] = _sre.compile(
                        pattern, flags, array("I", code).tolist(), groups, groupindex, indexgroup)
                    self._entries[(is_bytes, pattern, key_flags)] = entry
                cache = re._cache      # type: ignore[attr-defined]
                for key, obj in made.items():        # all of the file or nothing
                    cache.setdefault(key, obj)
                self.loaded = len(self._entries)
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001 - any doubt about the file: compile as always
            log.debug("regex cache %s not used: %s", self.path, err)
            self._entries.clear()
        self._recorder = _Recorder(compiler._sre)
        compiler._sre = self._recorder
        return self

    @property
    def compiled(self) -> int:
        """Patterns compiled since ``warm()`` (until ``save()``): what the file did not hold."""
        return len(self._recorder.made) if self._recorder is not None else 0

    def save(self) -> bool:
        """Stop recording; write the file if this start compiled patterns it did not hold.
        True if written."""
        recorder = self._recorder           # kept for ``compiled``, unhooked below
        compiler = _compiler()
        if recorder is None or compiler is None:
            return False
        if compiler._sre is recorder:
            compiler._sre = recorder._sre
        made = {id(obj): (obj, args) for obj, args in recorder.made}
        new = 0
        for (kind, pattern, key_flags), obj in list(re._cache.items()):    # type: ignore[attr-defined]
            found = made.get(id(obj))
            if found is None or found[0] is not obj or len(self._entries) >= MAX_ENTRIES:
                continue
            key = (kind is bytes, pattern, int(key_flags))
            if key not in self._entries:
                self._entries[key] = (*key, *found[1])       # type: ignore[assignment]
                new += 1
        if not new:
            return False
        from agent.fsutil import atomic_write

        try:
            # A cache: a lost write only means compiling again, so no fsync (the SD card).
            atomic_write(self.path, marshal.dumps((_header(), list(self._entries.values()))), durable=False)
        except OSError as err:
            log.debug("regex cache %s not written: %s", self.path, err)
            return False
        return True


def _compiler() -> Any:
    """``re._compiler`` if it has the shape this module relies on (CPython 3.11-3.13), else None."""
    compiler = getattr(re, "_compiler", None)
    if (sys.implementation.name != "cpython" or not isinstance(getattr(re, "_cache", None), dict)
            or compiler is None or not hasattr(compiler, "_sre")):
        return None
    return compiler


def _header() -> tuple[Any, ...]:
    import _sre

    stamps = []
    for name in ("_compiler", "_parser", "_constants"):
        st = os.stat(Path(re.__file__).with_name(f"{name}.py"))
        stamps.append((st.st_size, st.st_mtime_ns))
    return (FORMAT, sys.version, sys.implementation.cache_tag, _sre.MAGIC, _sre.CODESIZE, tuple(stamps))


def cache_path(environ: os._Environ[str] | dict[str, str] = os.environ) -> Path | None:
    """``$CACHE_DIRECTORY/regex.<cache tag>.bin`` (the first directory systemd names), or None."""
    directory = environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if not directory:
        return None
    return Path(directory) / f"regex.{sys.implementation.cache_tag}.bin"


def warm() -> RegexCache | None:
    """The cache of ``$CACHE_DIRECTORY``, loaded and recording; None without one."""
    path = cache_path()
    return RegexCache(path).warm() if path is not None else None


# The service imports this module before anything else of its own (agent/service.py), so the
# patterns its imports and the start compile come from the file; save() once the code is shown.
started: RegexCache | None = warm()


def save_started() -> bool:
    """``save()`` of the start's cache, once (later calls do nothing)."""
    global started
    cache, started = started, None
    return cache.save() if cache is not None else False
