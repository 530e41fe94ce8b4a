"""What an IdP error means for the device, and the one line an operator reads.

OAuth errors (RFC 6749 §5.2, RFC 8628 §3.5) say what kind of failure it is; Entra adds an
``AADSTSnnnnn`` code (in ``error_codes`` and in ``error_description``) that says why. The table is
here, free of msal, so the screen and the MQTT status can show the same words the journal does.

Kinds, and what ``agent.signin.authenticator`` does with each:

    pending    keep polling (authorization_pending, slow_down)
    expired    the code expired: start a new one (counts against auth.auto_renew_codes)
    declined   someone declined the sign-in: new code (counts)
    bad_code   the IdP refused the code: new code (counts)
    reauth     the saved sign-in is dead (revoked, idle 90 days, MFA): forget it, new code
    config     the tenant or app registration is wrong: show it, retry with a long back-off
    transient  the IdP is struggling: retry with exponential back-off
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["pending", "expired", "declined", "bad_code", "reauth", "config", "transient"]

_CODE = re.compile(r"AADSTS(\d+)")


@dataclass(frozen=True)
class Problem:
    """One classified IdP error: what to do (``kind``) and what to tell people (``message``)."""

    kind: Kind
    message: str
    aadsts: int | None = None


# AADSTS code -> (kind, operator message). Messages: what happened, then what to do.
AADSTS: dict[int, tuple[Kind, str]] = {
    70016: ("pending", "Waiting for someone to enter the code (AADSTS70016)"),
    70019: ("expired", "The sign-in code expired (AADSTS70019)"),
    70020: ("expired", "The sign-in code expired (AADSTS70020)"),
    50059: ("config", "The authority names no tenant (AADSTS50059): set auth.authority to "
                      "https://login.microsoftonline.com/<your tenant>"),
    90133: ("config", "Device code sign-in is not allowed on this authority (AADSTS90133): use your "
                      "tenant in auth.authority, not /common or /consumers"),
    9001023: ("config", "Device code sign-in is not supported on /common or /consumers "
                        "(AADSTS9001023): use your tenant in auth.authority"),
    7000218: ("config", "Public client flows are disabled for this app (AADSTS7000218): ask your "
                        "admin to set 'Allow public client flows' to Yes"),
    53003: ("config", "Device code sign-in is blocked by Conditional Access (AADSTS53003): ask your "
                      "admin to allow it for this device"),
    50076: ("reauth", "Multi-factor authentication is required again (AADSTS50076): sign in with "
                      "a new code"),
    700082: ("reauth", "The sign-in expired after 90 days without use (AADSTS700082): sign in with "
                       "a new code"),
    50173: ("reauth", "The sign-in was revoked, e.g. after a password change (AADSTS50173): sign in "
                      "with a new code"),
    65001: ("config", "The app has no consent for auth.scopes (AADSTS65001): ask your admin to "
                      "grant consent"),
    700016: ("config", "The tenant does not know auth.client_id (AADSTS700016): check the app "
                       "registration and auth.authority"),
    90002: ("config", "The tenant in auth.authority does not exist (AADSTS90002): check it"),
    70011: ("config", "The IdP rejected auth.scopes (AADSTS70011): check the scope names"),
}

# Plain OAuth error codes, for providers without AADSTS codes (and Entra codes not listed above).
OAUTH: dict[str, tuple[Kind, str]] = {
    "authorization_pending": ("pending", "Waiting for someone to enter the code"),
    "slow_down": ("pending", "Waiting for someone to enter the code"),
    "expired_token": ("expired", "The sign-in code expired"),
    "authorization_declined": ("declined", "The sign-in was declined"),
    "access_denied": ("declined", "The sign-in was declined"),
    "bad_verification_code": ("bad_code", "The sign-in code was not accepted"),
    "invalid_grant": ("reauth", "The saved sign-in is no longer valid: sign in with a new code"),
    "interaction_required": ("reauth", "The saved sign-in needs a new sign-in: sign in with a new code"),
    "login_required": ("reauth", "The saved sign-in needs a new sign-in: sign in with a new code"),
    "consent_required": ("config", "The app has no consent for auth.scopes: ask your admin to grant "
                                   "consent"),
    "invalid_client": ("config", "The IdP rejected auth.client_id (invalid_client): check the app "
                                 "registration"),
    "unauthorized_client": ("config", "The app may not use device code sign-in (unauthorized_client): "
                                      "check the app registration"),
    "invalid_scope": ("config", "The IdP rejected auth.scopes (invalid_scope): check the scope names"),
    "invalid_request": ("config", "The IdP rejected the sign-in request (invalid_request): check "
                                  "auth.authority and auth.client_id"),
    "unsupported_grant_type": ("config", "The IdP does not offer device code sign-in "
                                         "(unsupported_grant_type): check auth.authority"),
    "temporarily_unavailable": ("transient", "The sign-in service is temporarily unavailable"),
    "server_error": ("transient", "The sign-in service had an internal error"),
}


def aadsts_codes(description: str | None, error_codes: Iterable[object] | None = None) -> list[int]:
    """Every AADSTS code mentioned, ``error_codes`` first (Entra puts the primary one there)."""
    found: list[int] = []
    for c in error_codes or ():
        if isinstance(c, int) and not isinstance(c, bool) and c not in found:
            found.append(c)
    for m in _CODE.finditer(description or ""):
        c = int(m.group(1))
        if c not in found:
            found.append(c)
    return found


def explain(error: str | None, description: str | None = None,
            error_codes: Iterable[object] | None = None) -> Problem:
    """Classify an IdP error reply (the ``error``/``error_description``/``error_codes`` of MSAL)."""
    for code in aadsts_codes(description, error_codes):
        if code in AADSTS:
            kind, message = AADSTS[code]
            return Problem(kind, message, code)
    codes = aadsts_codes(description, error_codes)
    first = codes[0] if codes else None
    err = (error or "").strip()
    if err in OAUTH:
        kind, message = OAUTH[err]
        if first is not None and kind not in ("pending",):
            message = _with_code(message, first)
        return Problem(kind, message, first)
    shown = re.sub(r"[^A-Za-z0-9_.-]", "", err)[:40] or "unknown error"
    detail = _first_line(description)
    message = f"Sign-in failed ({shown}" + (f", AADSTS{first}" if first is not None else "") + ")"
    if detail:
        message += f": {detail}"
    return Problem("config", message, first)


def message_for(code: int) -> str:
    """The operator line for an AADSTS code; a generic line for codes not in the table."""
    if code in AADSTS:
        return AADSTS[code][1]
    return f"Sign-in failed (AADSTS{code})"


def _with_code(message: str, code: int) -> str:
    head, sep, tail = message.partition(":")
    head = head.rstrip()
    if head.endswith(")"):
        return message
    return f"{head} (AADSTS{code})" + (f":{tail}" if sep else "")


def _first_line(description: str | None) -> str:
    """The human part of an Entra description, short: no trace ids, no timestamps."""
    if not description:
        return ""
    line = description.strip().splitlines()[0]
    line = _CODE.sub("", line).lstrip(": ").strip()
    line = line.split(" Trace ID:")[0].strip()
    return line[:100]
