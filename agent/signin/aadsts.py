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
from typing import Literal

from hw.records import record

Kind = Literal["pending", "expired", "declined", "bad_code", "reauth", "config", "transient"]

_CODE = re.compile(r"AADSTS(\d+)")


@record
class Problem:
    """One classified IdP error: what to do (``kind``) and what to tell people (``message``)."""

    kind: Kind
    message: str
    aadsts: int | None = None
    short: str | None = None       # the panel's line, when the message is too long to read there

    @property
    def panel(self) -> str | None:
        """The short form for the 128x64 panel, for messages too long to read there."""
        return self.short or PANEL_LINES.get(self.message)


# Conditional Access blocks device code flow (Microsoft's advice to tenants since the 2025
# device-code phishing campaigns): the way out is the certificate flow, README "When your tenant
# blocks device code flow".
DEVICE_CODE_BLOCKED = ('device code sign-in is blocked by your tenant\'s policy: use '
                       'auth.flow = "client_certificate" (README)')
DEVICE_CODE_BLOCKED_PANEL = "Device code blocked by tenant policy: use client_certificate"
# Operator message -> its short form on the panel (one short line saying what to do).
CERT_EXPIRED_AT_IDP = ("The IdP says the registered certificate expired (AADSTS700027): create a new "
                       "one and upload it (README)")
PANEL_LINES: dict[str, str] = {
    DEVICE_CODE_BLOCKED: DEVICE_CODE_BLOCKED_PANEL,
    CERT_EXPIRED_AT_IDP: "Certificate expired (IdP): renew it (README)",
}

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
    53003: ("config", DEVICE_CODE_BLOCKED),
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

# auth.flow = "client_certificate" (app-only, certificate assertion): codes that only this flow
# meets, and codes that mean something else without a person in the loop.
CERTIFICATE_AADSTS: dict[int, tuple[Kind, str]] = {
    700027: ("config", "The IdP refused the certificate (AADSTS700027): upload auth.certificate_file "
                       "to the app registration"),
    # Retried soon: the refusal's Date header is enough to correct the next assertion's time.
    700024: ("transient", "The IdP says the client assertion is outside its valid time (AADSTS700024): "
                          "check the device clock (NTP)"),
    700023: ("config", "The client assertion's audience does not match the IdP (AADSTS700023): check "
                       "auth.authority"),
    700021: ("config", "The client assertion names another app (AADSTS700021): check auth.client_id"),
    7000215: ("config", "The IdP refused the app's credential (AADSTS7000215): check auth.client_id "
                        "and the app registration's certificates"),
    7000218: ("config", "The IdP expects a credential for this app (AADSTS7000218): check "
                        "auth.certificate_file and auth.private_key_file"),
    5002738: ("config", "The IdP refused the assertion's signature algorithm (AADSTS5002738)"),
    50027: ("config", "The IdP could not read the client assertion (AADSTS50027)"),
    70002: ("transient", "The IdP refused a replayed client assertion (AADSTS70002)"),
    1002012: ("config", "App-only sign-in needs a scope \"<resource>/.default\" (AADSTS1002012): set "
                        "auth.scopes"),
    53003: ("config", "Conditional Access blocked the app's sign-in (AADSTS53003): ask your admin to "
                      "allow this app (workload identity) from the device's location"),
    65001: ("config", "The app has no admin consent for its application permissions (AADSTS65001): "
                      "grant admin consent in the app registration"),
    700016: ("config", "The tenant does not know auth.client_id (AADSTS700016): check the app "
                       "registration and auth.authority"),
}
# AADSTS700027 says why in its "[Reason - ...]": which certificate problem it is.
_CERT_REASONS = (
    ("key was not found", "The app registration does not know this certificate (AADSTS700027): "
                          "upload auth.certificate_file to it (README)"),
    ("key used is expired", CERT_EXPIRED_AT_IDP),
    ("signature value did not match", "The IdP could not verify the assertion's signature "
                                      "(AADSTS700027): auth.private_key_file does not belong to the "
                                      "registered certificate"),
)

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
            error_codes: Iterable[object] | None = None, *, flow: str = "device_code") -> Problem:
    """Classify an IdP error reply (the ``error``/``error_description``/``error_codes`` of MSAL);
    ``flow`` is auth.flow (the certificate flow has its own codes and words)."""
    if flow == "client_certificate":
        for code in aadsts_codes(description, error_codes):
            if code == 700027:
                low = (description or "").lower()
                for needle, message in _CERT_REASONS:
                    if needle in low:
                        return Problem("config", message, code)
            if code in CERTIFICATE_AADSTS:
                kind, message = CERTIFICATE_AADSTS[code]
                return Problem(kind, message, code)
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
