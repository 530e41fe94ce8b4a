"""Host names the agent treats as this machine (plain ``mqtt://`` is allowed only to them)."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True only for an IP literal in 127.0.0.0/8, ``::1``, or exactly ``localhost``.

    Never a prefix match: ``127.evil.com`` and ``127.0.0.1.nip.io`` are names anyone can point
    anywhere, so a sign-in code sent to them in clear could leave the box.
    """
    if host == "localhost":
        return True
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return address == ipaddress.IPv6Address("::1")
    return address in ipaddress.IPv4Network("127.0.0.0/8")
