"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET, silently nothing elsewhere."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1 / WATCHDOG=1 / STATUS=… to systemd when run as a Type=notify service."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        self._addr = addr or None
        self.watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_s(self) -> float | None:
        """The watchdog timeout systemd set (WatchdogSec=), or None when there is none."""
        return self.watchdog_usec / 1e6 if self.watchdog_usec else None

    def notify(self, *fields: str) -> None:
        if not self._addr:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as err:
            log.warning("sd_notify failed: %s", err)

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None
