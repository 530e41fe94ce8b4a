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

``_sre.compile`` trusts its code words more than it checks them (CPython 3.11's validator lets
some damaged words through, and the interpreter then crashes), so a damaged file must never reach
it, and a crash must never repeat (with ``Restart=on-failure`` it would at every start):

- the file carries a BLAKE2b digest of everything after it, checked before anything is read
  (a zeroed sector, a torn write);
- the file is moved aside (``.loading``) before it is loaded and put back (or written anew) only
  by ``save()``, once the start got past the load and the first use: a start that dies on the
  way leaves no file, and the next one compiles as always and writes a new one.

The file holds the patterns of the last start that compiled any (looked up from the file or
compiled), not every pattern any start ever used.
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

FORMAT = 2
MAGIC = b"rxc2"
MAX_ENTRIES = 400         # re keeps 512; more would only push the start's own patterns out
_DIGEST = 32
# The dict re._compile looks a pattern up in first: its FIFO one from 3.12 on, else its cache.
_FIRST = "_cache2" if isinstance(getattr(re, "_cache2", None), dict) else "_cache"
_Key = tuple[bool, Any, int]
_Args = tuple[int, bytes, int, dict[str, int], tuple[Any, ...]]     # what _sre.compile got, after pattern
_Entry = tuple[bool, Any, int, int, bytes, int, dict[str, int], tuple[Any, ...]]     # _Key + _Args


class _Recorder:
    """Stands in for ``_sre`` in ``re._compiler`` while a start runs: remembers, for every
    pattern compiled, the arguments the compiler gave ``_sre.compile``."""

    def __init__(self, sre: Any) -> None:
        self._sre = sre
        self.made: list[tuple[Any, _Args]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sre, name)

    def compile(self, pattern: Any, flags: int, code: list[int], groups: int, groupindex: Any,
                indexgroup: Any) -> Any:
        obj = self._sre.compile(pattern, flags, code, groups, groupindex, indexgroup)
        if type(pattern) in (str, bytes):     # a subclass is no data marshal keeps
            self.made.append((obj, (int(flags), array("I", code).tobytes(), int(groups), dict(groupindex),
                                    tuple(indexgroup))))
        return obj


class _Kept(dict):  # type: ignore[type-arg]
    """``re``'s cache while a start runs: a pattern of the file enters it on its first look-up
    (``re._compile`` finds it there), so ``save()`` knows which ones this start used."""

    def __init__(self, cache: dict[Any, Any], kept: dict[Any, Any], hits: set[Any]) -> None:
        super().__init__(cache)
        self.kept = kept
        self.hits = hits

    def __missing__(self, key: Any) -> Any:
        obj = self.kept.pop(key)            # KeyError: not in the file either, re compiles it
        self.hits.add(key)
        self[key] = obj
        return obj


class RegexCache:
    """The patterns of ``path`` in ``re``'s cache; records what this start uses and compiles."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.aside = path.with_name(path.name + ".loading")
        self._entries: dict[_Key, _Entry] = {}
        self._hits: set[Any] = set()
        self._recorder: _Recorder | None = None
        self._held = False                  # the file is aside, loaded: save() puts it back
        self._trouble: str | None = None    # a WARNING for save(), once logging is set up
        self.loaded = 0

    def warm(self) -> RegexCache:
        compiler = _compiler()
        if compiler is None:
            return self
        import _sre

        try:
            # Aside first: should _sre crash on a pattern, the next start finds no file.
            os.replace(self.path, self.aside)
            header, entries = decode(self.aside.read_bytes())
            if header == _header():
                made = {}
                for entry in entries:
                    is_bytes, pattern, key_flags, flags, code, groups, groupindex, indexgroup = entry
                    made[(bytes if is_bytes else str, pattern, key_flags)] = _sre.compile(
                        pattern, flags, array("I", code).tolist(), groups, groupindex, indexgroup)
                    self._entries[(is_bytes, pattern, key_flags)] = entry
                cache = getattr(re, _FIRST)
                kept = {key: obj for key, obj in made.items() if key not in cache}   # all or nothing
                setattr(re, _FIRST, _Kept(cache, kept, self._hits))
                self.loaded = len(self._entries)
                self._held = True
        except FileNotFoundError:
            pass
        except OSError as err:              # a directory it may not write: no guard, no load
            self._trouble = f"not used: {err}"
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
        """Stop recording; write the file (the patterns this start used) if this start compiled
        patterns it did not hold, else put the loaded one back. Never raises: a cache that
        cannot be kept only means compiling again. True if written."""
        try:
            return self._save()
        except Exception as err:  # noqa: BLE001 - the start goes on whatever the cache does
            self._trouble = self._trouble or f"not written: {err}"
            return False
        finally:
            if self._trouble:
                log.warning("regex cache %s %s (patterns are compiled at every start)", self.path,
                            self._trouble)
                self._trouble = None

    def _save(self) -> bool:
        recorder = self._recorder           # kept for ``compiled``, unhooked below
        compiler = _compiler()
        if recorder is None or compiler is None:
            return False
        if compiler._sre is recorder:
            compiler._sre = recorder._sre
        if isinstance(first := getattr(re, _FIRST), _Kept):
            setattr(re, _FIRST, dict(first))
        cache = re._cache                   # type: ignore[attr-defined]
        made = {id(obj): (obj, args) for obj, args in recorder.made}
        used = {(kind is bytes, pattern, int(flags)) for kind, pattern, flags in self._hits}
        entries = {key: entry for key, entry in self._entries.items() if key in used}
        new = 0
        for (kind, pattern, key_flags), obj in list(cache.items()):
            found = made.get(id(obj))
            if found is None or found[0] is not obj or len(entries) >= MAX_ENTRIES:
                continue
            key = (kind is bytes, pattern, int(key_flags))
            if key not in entries:
                entries[key] = (*key, *found[1])
                new += 1
        if not new:
            if self._held:
                os.replace(self.aside, self.path)
            return False
        from agent.fsutil import atomic_write

        # A cache: a lost write only means compiling again, so no fsync (the SD card).
        atomic_write(self.path, encode(_header(), list(entries.values())), durable=False)
        self.aside.unlink(missing_ok=True)
        return True


def encode(header: tuple[Any, ...], entries: list[_Entry]) -> bytes:
    """The file: ``MAGIC``, the digest of the rest, the header and entries (marshal)."""
    body = marshal.dumps((header, entries))
    return MAGIC + _blake2b(body) + body


def decode(data: bytes) -> tuple[tuple[Any, ...], list[_Entry]]:
    """``encode``'s header and entries; ValueError for anything else, before reading a byte
    of it (marshal, and then _sre, only see what was written)."""
    body = data[len(MAGIC) + _DIGEST:]
    if data[:len(MAGIC)] != MAGIC or data[len(MAGIC):len(MAGIC) + _DIGEST] != _blake2b(body):
        raise ValueError("not a regex cache of this format, or damaged (digest)")
    # Data only (tuples, strings, numbers), written by this module, checked above.
    header, entries = marshal.loads(body)  # noqa: S302
    return header, entries


def _blake2b(data: bytes) -> bytes:
    try:
        from _blake2 import blake2b  # without hashlib's OpenSSL (~8 ms of a start on x86)
    except ImportError:                 # pragma: no cover - a build without it
        from hashlib import blake2b
    return blake2b(data, digest_size=_DIGEST).digest()


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
