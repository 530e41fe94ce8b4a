"""Hardware exceptions.

    HardwareError
     └── HardwareUnavailable   library, device node or permission missing; message says the fix
"""

from __future__ import annotations


class HardwareError(Exception):
    """A hardware operation failed (bad pin use, bus error, unreadable sensor)."""


class HardwareUnavailable(HardwareError):
    """The backend cannot be used here; the message names the package or group needed."""
