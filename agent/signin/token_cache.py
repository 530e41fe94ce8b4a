"""Atomic 0600 persistence of the MSAL token cache (``state_dir/token_cache.json``).

Refresh tokens rotate on every refresh and some providers revoke the whole grant when an old
one is replayed, so the cache is written right after every MSAL call that changed it, through
``fsutil.atomic_write`` (temp file, fsync, rename): a power cut leaves the old or the new cache,
never half of one. A file that cannot be used (truncated, garbage, unreadable) is moved aside
and the device signs in again rather than crash-looping; msal-extensions does not fit here
(its Linux backend needs a desktop keyring, its plain file is written in place without fsync).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msal

from agent.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

# The top-level sections MSAL writes; anything else at the top level means the file is not ours.
_SECTIONS = ("AccessToken", "RefreshToken", "IdToken", "Account", "AppMetadata")
# Anything long enough to be (part of) a token: removed from the post-mortem copy of a bad file,
# because no file in the state dir but the cache itself may hold a secret.
_TOKENISH = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


class TokenCacheFile:
    """An ``msal.SerializableTokenCache`` bound to a file. Thread-safe.

    The auth thread polls the device flow while the uploader thread asks for tokens; both go
    through :meth:`using`, which serialises MSAL calls on the cache and persists any change.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cache = msal.SerializableTokenCache()
        self._lock = threading.RLock()

    # -- loading --------------------------------------------------------------------------

    def load(self) -> bool:
        """Read the file into the cache; returns True if a usable cache was loaded.

        A missing file is normal (first start). A file readable by others is tightened to 0600.
        A file that cannot be read or parsed is renamed to ``token_cache.json.corrupt-<n>``
        with a WARNING, and the cache starts empty (the device signs in again).
        """
        with self._lock:
            try:
                ensure_private_dir(self.path.parent)
                self._remove_stale_temp_files()
                st = self.path.stat()
            except FileNotFoundError:
                self.cache.deserialize("")
                return False
            except OSError as err:
                log.warning("token cache %s cannot be examined (%s); starting without it",
                            self.path, err.strerror or err)
                self.cache.deserialize("")
                return False
            if not stat.S_ISREG(st.st_mode):
                self._quarantine("it is not a regular file")
                return False
            if st.st_mode & 0o077:
                log.warning("token cache %s was readable by others (mode %o); tightening to 0600",
                            self.path, stat.S_IMODE(st.st_mode))
                try:
                    os.chmod(self.path, 0o600)
                except OSError as err:
                    log.warning("cannot chmod %s: %s", self.path, err.strerror or err)
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                self._quarantine(f"it cannot be read ({_reason(err)})")
                return False
            problem = _check(text)
            if problem:
                self._quarantine(problem)
                return False
            self.cache.deserialize(text)
            return True

    def quarantine(self, why: str) -> None:
        """The file parsed, but msal cannot use it (e.g. a field of the wrong type, an account
        it cannot remove): set it aside like an unparseable file and start empty."""
        with self._lock:
            self._quarantine(why)

    def _quarantine(self, why: str) -> None:
        """Set the unusable file aside for a post-mortem, with anything token-like removed
        (a half-written cache may still hold a valid refresh token), and start empty."""
        self.cache.deserialize("")
        if not os.path.lexists(self.path):
            log.warning("token cache %s is unusable (%s); starting without it and signing in again",
                        self.path, why)
            return
        for n in range(1, 1000):
            target = self.path.with_name(f"{self.path.name}.corrupt-{n}")
            if not target.exists():
                break
        try:
            if self.path.is_file():
                raw = self.path.read_bytes()
                scrubbed = _TOKENISH.sub("[removed]", raw.decode("utf-8", "replace"))
                atomic_write(target, scrubbed.encode(), mode=0o600)
                self.path.unlink()
            else:
                os.replace(self.path, target)
        except OSError as err:
            log.warning("token cache %s is unusable (%s) and could not be moved aside (%s); "
                        "signing in again", self.path, why, err.strerror or err)
            try:
                self.path.unlink()
            except OSError:
                pass
            return
        log.warning("token cache %s is unusable (%s); set it aside as %s (secrets removed) and "
                    "signing in again", self.path, why, target.name)

    def _remove_stale_temp_files(self) -> None:
        """A power cut during atomic_write can leave its temp file, with tokens, behind."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            try:
                tmp.unlink()
                log.info("removed %s left by an interrupted write", tmp.name)
            except OSError as err:
                log.warning("cannot remove %s: %s", tmp, err.strerror or err)

    # -- saving ---------------------------------------------------------------------------

    @contextmanager
    def using(self) -> Iterator[msal.SerializableTokenCache]:
        """Hold the cache for one MSAL call and save it afterwards if the call changed it.

        The save also runs when the call raised: MSAL may have removed a refresh token before
        the error surfaced.
        """
        with self._lock:
            try:
                yield self.cache
            finally:
                self.save_if_changed()

    def save_if_changed(self) -> bool:
        """Persist the cache when MSAL changed it; returns True if the file was written.

        A failed write is logged and retried at the next change (the in-memory cache stays
        authoritative until then).
        """
        with self._lock:
            if not self.cache.has_state_changed:
                return False
            data = self.cache.serialize()
            try:
                atomic_write(self.path, data.encode("utf-8"), mode=0o600)
            except OSError as err:
                self.cache.has_state_changed = True
                log.error("cannot save the token cache to %s: %s; the sign-in will be lost at "
                          "the next restart", self.path, err.strerror or err)
                return False
            return True

    def clear(self) -> None:
        """Forget every account and token, in memory and on disk (sign-out)."""
        with self._lock:
            self.cache.deserialize("")
            atomic_write(self.path, b"{}", mode=0o600)

    def clear_or_log(self) -> bool:
        """``clear()`` for a sign-out: a file that cannot be written is an ERROR in the journal
        (a person must look), never an exception: the sign-out goes on in memory."""
        try:
            self.clear()
        except OSError as err:
            log.error("cannot clear the token cache %s: %s", self.path, err.strerror or err)
            return False
        return True

    def accounts(self) -> list[dict[str, Any]]:
        """Accounts in the cache, without going to the network."""
        with self._lock:
            return list(self.cache.search(msal.TokenCache.CredentialType.ACCOUNT))


def _check(text: str) -> str | None:
    """Why ``text`` is not a usable MSAL cache, or None if it is."""
    if not text.strip():
        return "it is empty (truncated)"  # atomic_write never leaves an empty file behind
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at line {err.lineno})"
    if not isinstance(data, dict):
        return "not a JSON object"
    for section, entries in data.items():
        if section in _SECTIONS and not (
                isinstance(entries, dict) and all(isinstance(e, dict) for e in entries.values())):
            return f"section {section!r} is malformed"
    if data and not any(s in data for s in _SECTIONS):
        return "not an MSAL token cache"
    return None


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return type(err).__name__
