"""The IdP error table: every Entra code docs/DESIGN.md#what-the-libraries-and-peers-do lists has
a kind and a short operator line.

The error bodies come from the simulated IdP's own table of Entra replies (the same
``error``/``error_description``/``error_codes`` msal hands back), so a drift between what the
IdP sends and what the agent understands shows up here.
"""

from __future__ import annotations

import pytest

from agent.signin.aadsts import AADSTS, OAUTH, aadsts_codes, explain, message_for
from agent.sim.idp import AADSTS_ERRORS

FIELD_NOTES_KINDS = {
    70016: "pending", 70019: "expired", 70020: "expired",
    50059: "config", 90133: "config", 9001023: "config", 7000218: "config",
    53003: "config", 65001: "config",
    50076: "reauth", 700082: "reauth", 50173: "reauth",
}


def entra_reply(code: int) -> dict[str, object]:
    error, _extra, text = AADSTS_ERRORS[code]
    return {"error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: 0f3a Correlation ID: 9b2c "
                                 "Timestamp: 2026-11-25 14:39:32Z",
            "error_codes": [code]}


@pytest.mark.parametrize("code", sorted(FIELD_NOTES_KINDS))
def test_each_field_notes_code_maps_to_kind_and_message(code: int) -> None:
    reply = entra_reply(code)
    problem = explain(reply["error"], reply["error_description"], reply["error_codes"])  # type: ignore[arg-type]
    assert problem.kind == FIELD_NOTES_KINDS[code]
    assert problem.aadsts == code
    if code != 53003:   # its line is the README's remedy, word for word (test below)
        assert f"(AADSTS{code})" in problem.message
    assert problem.message == message_for(code)
    assert len(problem.message) <= 130, "one short line for the screen and status"
    assert "Trace ID" not in problem.message and "9b2c" not in problem.message


def test_conditional_access_message_says_what_to_do() -> None:
    assert explain("invalid_grant", "AADSTS53003: blocked", [53003]).message == (
        'device code sign-in is blocked by your tenant\'s policy: use auth.flow = "client_certificate" '
        "(README)")


def test_conditional_access_on_the_certificate_flow_names_the_app_not_device_code() -> None:
    problem = explain("invalid_grant", "AADSTS53003: blocked", [53003], flow="client_certificate")
    assert "device code" not in problem.message and "(AADSTS53003)" in problem.message


@pytest.mark.parametrize(("reason", "words"), [
    ("The key was not found.", "does not know this certificate"),
    ("The key used is expired.", "registered certificate expired"),
    ("The provided signature value did not match the expected signature value.",
     "does not belong to the registered certificate"),
])
def test_each_certificate_refusal_says_which(reason: str, words: str) -> None:
    """AADSTS700027 covers three different mistakes; the sim's own reply text is parsed."""
    error, _extra, text = AADSTS_ERRORS[700027]
    description = "AADSTS700027: " + text.format(reason=reason, thumbprint="AB12", found="", client="c")
    problem = explain(error, description, [700027], flow="client_certificate")
    assert words in problem.message and "(AADSTS700027)" in problem.message
    assert problem.kind == "config"


@pytest.mark.parametrize("code", [700024, 700023, 700021, 7000215, 1002012, 50027, 5002738])
def test_every_simulated_assertion_error_has_an_operator_line(code: int) -> None:
    reply = entra_reply(code)
    problem = explain(reply["error"], reply["error_description"], reply["error_codes"],  # type: ignore[arg-type]
                      flow="client_certificate")
    assert f"(AADSTS{code})" in problem.message and len(problem.message) <= 130


@pytest.mark.parametrize("code", [c for c, k in FIELD_NOTES_KINDS.items() if k in ("config", "reauth")])
def test_actionable_messages_name_an_action(code: int) -> None:
    message = AADSTS[code][1]
    head, sep, action = message.partition("): " if code != 53003 else ": use ")
    assert sep and action, f"{message!r} does not say what to do"


def test_code_only_in_the_description_is_found() -> None:
    problem = explain("invalid_grant", "AADSTS700082: The refresh token has expired due to inactivity.")
    assert problem.kind == "reauth" and problem.aadsts == 700082


def test_error_codes_list_wins_over_description_mentions() -> None:
    assert aadsts_codes("AADSTS50173: x, see also AADSTS70016", [53003]) == [53003, 50173, 70016]
    assert explain("invalid_grant", "AADSTS50173: revoked", [53003]).aadsts == 53003


@pytest.mark.parametrize(("error", "kind"), [
    ("authorization_pending", "pending"), ("slow_down", "pending"), ("expired_token", "expired"),
    ("access_denied", "declined"), ("authorization_declined", "declined"),
    ("bad_verification_code", "bad_code"), ("invalid_grant", "reauth"),
    ("interaction_required", "reauth"), ("invalid_client", "config"), ("invalid_scope", "config"),
    ("temporarily_unavailable", "transient"), ("server_error", "transient"),
])
def test_plain_oauth_errors_of_generic_providers(error: str, kind: str) -> None:
    problem = explain(error, "")
    assert problem.kind == kind
    assert problem.message == OAUTH[error][1]


def test_unknown_error_is_a_config_problem_with_a_short_sanitised_line() -> None:
    problem = explain("weird<error>\n", "AADSTS1234567: Something odd happened.\nSecond line. Trace ID: x")
    assert problem.kind == "config"
    assert problem.message == "Sign-in failed (weirderror, AADSTS1234567): Something odd happened."
    assert explain(None, None).message == "Sign-in failed (unknown error)"


def test_oauth_error_with_an_unlisted_aadsts_code_gets_the_code_appended() -> None:
    problem = explain("authorization_declined", "AADSTS70000: The request was denied", [70000])
    assert problem.kind == "declined"
    assert problem.message == "The sign-in was declined (AADSTS70000)"


def test_every_sim_idp_error_is_understood() -> None:
    # The simulated IdP can send these; none may fall through to the generic line.
    for code in AADSTS_ERRORS:
        reply = entra_reply(code)
        problem = explain(reply["error"], reply["error_description"], reply["error_codes"])  # type: ignore[arg-type]
        assert not problem.message.startswith("Sign-in failed ("), (code, problem)
