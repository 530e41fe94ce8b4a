"""Logging setup: one line per event on stderr; no timestamps under journald (it adds its own)."""

from __future__ import annotations

import logging
import os
import re
import sys

# Belt and braces: the agent never passes tokens to the logger, but a library might echo a
# response. JWTs (three base64url parts) and long opaque refresh tokens are masked.
_SECRETISH = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
                        r"|(?i:(?:access|refresh|id)_token[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{8,}"
                        r"|(?i:bearer\s+)[^\s\"',}]{8,}")


def redact(text: str) -> str:
    """``text`` with anything shaped like a token (JWT, ``Bearer …``, ``*_token=…``) masked."""
    return _SECRETISH.sub("[redacted]", text)


class RedactingFormatter(logging.Formatter):
    """Masks token-shaped text in the whole formatted record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup(level: str = "info", *, stream=None) -> None:  # type: ignore[no-untyped-def]
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(RedactingFormatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # msal and urllib3 are chatty at DEBUG and msal may log response bodies there.
    # People read the sign-in code off the journal: it is logged even at level "warning".
    logging.getLogger("agent.signin.authenticator.code").setLevel(min(logging.INFO, root.level))
    for noisy in ("msal", "urllib3", "paho"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
