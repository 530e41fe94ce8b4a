"""The http sink against the simulated API: status mapping, TLS, and the body and headers of
docs/INTERFACE.md#http-your-api-sink--http."""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest

from agent.config import UploadSettings
from agent.errors import UploadError
from agent.net.retry import retry_after_s
from agent.sim.api import SimApi
from agent.state import AgentState, OutboxCounts
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks import claims_challenge, make_sink, redact_text, redact_url
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import Uploader
from tests.fixtures.api import DEVICE, FakeTokens, reading


def test_batch_is_exactly_the_contract_shape(outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi,
                                            tokens: FakeTokens) -> None:
    outbox.put([reading(0), reading(1, "env.humidity")])
    sink = make_sink(api_settings, DEVICE)
    assert isinstance(sink, HttpSink)
    result = sink.send(outbox.claim(10), tokens.token or "")
    sink.close()
    assert result.acked == [1, 2] and not result.retry and not result.dead
    assert sim_api.requests[-1].idempotency_key == f"{DEVICE}:1-2"
    got = sim_api.readings(DEVICE)
    assert got[0] == {"id": f"{DEVICE}:1", "seq": 1, "sensor": "cpu", "type": "cpu_temperature",
                      "value": 40.0, "unit": "°C", "time": "2026-11-25T14:39:32.123Z"}
    assert got[1]["sensor"] == "env.humidity"


@pytest.mark.parametrize(("status", "retryable"), [(301, True), (308, True),   # kept, not dead-lettered
                                                   (408, True), (429, True), (500, True), (503, True),
                                                   (504, True), (400, False), (404, True), (405, True),
                                                   (410, True), (413, False),
                                                   (422, False)])
def test_status_mapping(outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens,
                        status: int, retryable: bool) -> None:
    outbox.put([reading()])
    sim_api.fail(status, retry_after=7)
    sink = HttpSink(api_settings, DEVICE)
    with pytest.raises(UploadError) as info:
        sink.send(outbox.claim(1), tokens.token or "")
    sink.close()
    assert info.value.status == status and info.value.retryable is retryable
    assert info.value.retry_after_s == (7.0 if retryable else None)


def test_401_and_403_carry_their_status(outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi,
                                        tokens: FakeTokens) -> None:
    outbox.put([reading()])
    sink = HttpSink(api_settings, DEVICE)
    with pytest.raises(UploadError) as e401:
        sink.send(outbox.claim(1), "not-a-jwt")
    with pytest.raises(UploadError) as e403:
        sink.send(outbox.claim(1), tokens.keys.mint({"scp": "User.Read"}))
    sink.close()
    assert e401.value.status == 401
    assert e403.value.status == 403 and "check the scopes" in str(e403.value)


def test_env_ca_bundle_never_overrides_ca_file(outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi,
                                               tokens: FakeTokens, monkeypatch: pytest.MonkeyPatch) -> None:
    # certifi's bundle does not hold the test CA: if the env won, TLS verification would fail.
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(var, certifi.where())
    outbox.put([reading()])
    sink = HttpSink(api_settings, DEVICE)
    assert sink.send(outbox.claim(1), tokens.token or "").acked == [1]
    sink.close()


def test_without_ca_file_the_test_ca_is_not_trusted(outbox: Outbox, api_settings: UploadSettings,
                                                    sim_api: SimApi, tokens: FakeTokens) -> None:
    outbox.put([reading()])
    sink = HttpSink(dataclasses.replace(api_settings, ca_file=""), DEVICE)
    with pytest.raises(UploadError) as info:
        sink.send(outbox.claim(1), tokens.token or "")
    sink.close()
    assert info.value.retryable and "SSL" in str(info.value)


def test_a_netrc_never_replaces_the_bearer_token(outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi,
                                                 tokens: FakeTokens, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # requests with trust_env puts a ~/.netrc entry on every request without auth=: Basic auth
    # in place of the Bearer token, which the API refuses (401).
    (tmp_path / ".netrc").write_text("default login someone password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    outbox.put([reading()])
    sink = HttpSink(api_settings, DEVICE)
    assert sink.send(outbox.claim(1), tokens.token or "").acked == [1]
    sink.close()
    assert sim_api.requests[-1].status == 200


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)
    date = email.utils.format_datetime(now, usegmt=True)

    def parse_retry_after(value: str | None) -> float | None:
        return retry_after_s({} if value is None else {"Retry-After": value, "Date": date})

    assert parse_retry_after("120") == 120.0
    later = email.utils.format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later) == 90.0
    earlier = email.utils.format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(earlier) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None and parse_retry_after("") is None


def _uploader(outbox: Outbox, sink: HttpSink, tokens: FakeTokens, settings: UploadSettings) -> Uploader:
    return Uploader(outbox, sink, tokens, AgentState(), settings, clock=lambda: 0.0, rng=lambda: 0.5)


def test_413_halves_the_batch_until_it_fits_and_delivers_everything(
        outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(40)])
    sim_api.max_body_bytes = 2500                 # ~14 readings of ~160 bytes
    api_settings = dataclasses.replace(api_settings, compress="none")   # sizes as written
    sink = HttpSink(api_settings, DEVICE)
    try:
        assert _uploader(outbox, sink, tokens, api_settings).step() == 10.0
    finally:
        sink.close()
    assert outbox.counts() == OutboxCounts(pending=0, dead=0, dropped=0)
    assert sim_api.seqs(DEVICE) == set(range(1, 41))
    assert [(r.status, r.count) for r in sim_api.requests if r.status == 413][:2] == [(413, 40), (413, 20)]
    assert [r.idempotency_key for r in sim_api.requests if r.status == 200] == [
        f"{DEVICE}:1-10", f"{DEVICE}:11-20", f"{DEVICE}:21-30", f"{DEVICE}:31-40"]


def test_413_for_a_single_reading_dead_letters_only_that_one(
        outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(5)] + [reading(5, sensor="x" * 4000)]
               + [reading(i) for i in range(6, 12)])
    sim_api.max_body_bytes = 3000
    api_settings = dataclasses.replace(api_settings, compress="none")
    sink = HttpSink(api_settings, DEVICE)
    try:
        _uploader(outbox, sink, tokens, api_settings).step()
    finally:
        sink.close()
    assert outbox.counts() == OutboxCounts(pending=0, dead=1, dropped=0)
    seq, reason, _ = outbox.dead_rows()[0]
    assert seq == 6 and "413" in reason
    assert sim_api.seqs(DEVICE) == set(range(1, 13)) - {6}


def test_function_key_in_the_url_never_reaches_logs_or_dead_letter_reasons(
        outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cretFunctionKey=="
    keyed = dataclasses.replace(api_settings, url=f"{sim_api.url}?code={secret}")
    outbox.put([reading(i) for i in range(3)])
    sim_api.fail(500)
    sim_api.poison(seqs={1, 2, 3})
    sink = HttpSink(keyed, DEVICE)
    clock = [0.0]
    up = Uploader(outbox, sink, tokens, AgentState(), keyed, clock=lambda: clock[0], rng=lambda: 0.5)
    # (urllib3 logs the request line at DEBUG; agent.logs caps urllib3 at INFO.)
    with caplog.at_level(logging.DEBUG, logger="agent"):
        clock[0] += up.step()                     # 500: logged, retried
        up.step()                                 # 422: dead-lettered with a reason
    sink.close()
    # And a network failure: requests quotes the whole URL (query included) in its exception.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    down = HttpSink(dataclasses.replace(keyed, url=f"https://user:pw@127.0.0.1:{port}/v1/readings?code={secret}"),
                    DEVICE)
    outbox.put([reading()])
    with pytest.raises(UploadError) as info:
        down.send(outbox.claim(1), tokens.token or "")
    down.close()
    reasons = " ".join(r for _, r, _ in outbox.dead_rows())
    assert "500" in caplog.text and "422" in reasons and "/v1/readings" in reasons
    for text in (caplog.text, reasons, str(info.value)):
        assert secret not in text and "code=" not in text and "pw@" not in text


def test_claims_challenge_parsing() -> None:
    import base64

    claims = '{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}'
    b64 = base64.b64encode(claims.encode()).decode()
    entra = (f'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
             f'client_id="00000003-0000-0000-c000-000000000000", error="insufficient_claims", claims="{b64}"')
    assert claims_challenge(entra) == claims
    assert claims_challenge(f'Bearer error="insufficient_claims", claims="{b64.rstrip("=")}"') == claims
    raw = claims.replace('"', '\\"')
    assert claims_challenge(f'Bearer error="insufficient_claims", claims="{raw}"') == claims
    for garbage in (None, "", "Basic realm=x", 'Bearer error="invalid_token"', f'Bearer claims="{b64}"',
                    'Bearer error="insufficient_claims", claims="²"',
                    'Bearer error="insufficient_claims", claims="W10="'):
        assert claims_challenge(garbage) is None, garbage


def test_redact_url_and_text() -> None:
    assert redact_url("https://u:p@fn.example.net:8443/api/r?code=K#frag") == "https://fn.example.net:8443/api/r"
    assert redact_url("https://[::1]/x?code=K") == "https://[::1]/x"
    text = ("HTTPSConnectionPool(host='h', port=1): Max retries exceeded with url: /api/r?code=K "
            "(Caused by ...) see https://a:b@h/p?code=K")
    assert redact_text(text) == ("HTTPSConnectionPool(host='h', port=1): Max retries exceeded with url: "
                                 "/api/r (Caused by ...) see https://h/p")


def _wire_bytes(sim_api: SimApi) -> int:
    return sum(r.wire_bytes for r in sim_api.requests if r.status == 200)


def test_gzip_is_the_default_and_cuts_the_bytes_on_the_wire(
        tmp_path: Path, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens) -> None:
    sizes = {}
    for compress in ("gzip", "none"):
        with Outbox(tmp_path / f"{compress}.sqlite3", DEVICE, max_rows=10**6, max_bytes=10**9) as box:
            box.put([reading(i % 50, sensor=f"env{i % 3}.temperature") for i in range(300)])
            sink = HttpSink(dataclasses.replace(api_settings, compress=compress), DEVICE)
            assert sink.send(box.claim(300), tokens.token or "").acked == list(range(1, 301))
            sink.close()
        assert sim_api.requests[-1].encoding == ("gzip" if compress == "gzip" else "")
        sizes[compress] = sim_api.requests[-1].wire_bytes
    assert sizes["gzip"] <= 0.4 * sizes["none"], sizes
    assert sim_api.count(DEVICE) == 300 and sim_api.readings(DEVICE)[0]["sensor"] == "env0.temperature"


def test_a_gzip_body_costs_little_memory_and_decodes_as_the_json(tmp_path: Path) -> None:
    """A Pi Zero's budget (docs/PERFORMANCE.md "Memory"): zlib's default compressor holds
    ~256 KiB while a batch is sent (a 500-reading body then peaks ~390 KiB), the sink's ~48 KiB
    (~190 KiB), and any gzip reader gets exactly the uncompressed body back."""
    import gzip
    import tracemalloc

    from agent.telemetry.sinks.http import encode_body

    with Outbox(tmp_path / "o.sqlite3", DEVICE, max_rows=10**6, max_bytes=10**9) as box:
        box.put([reading(i % 50, sensor=f"env{i % 3}.temperature") for i in range(500)])
        batch = box.claim(500)
    plain = encode_body(DEVICE, batch, gzipped=False)
    tracemalloc.start()
    try:
        encode_body(DEVICE, batch, gzipped=True)       # warm: json's and zlib's first-use tables
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        body = encode_body(DEVICE, batch, gzipped=True)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert gzip.decompress(body) == plain
    assert len(body) <= 0.2 * len(plain)
    # the JSON parts (~len(plain) and their objects) are held while compressing; beyond them
    # ~115 KiB with the sink's compressor, ~325 KiB with zlib's default one
    assert peak - len(plain) < 160 * 1024, (peak, len(plain))


def test_415_once_switches_to_identity_for_good_and_says_so_once(
        outbox: Outbox, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens,
        caplog: pytest.LogCaptureFixture) -> None:
    outbox.put([reading(i) for i in range(4)])
    sim_api.refuse_gzip(count=1)
    sink = HttpSink(api_settings, DEVICE)
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.sinks.http"):
        assert sink.send(outbox.claim(2), tokens.token or "").acked == [1, 2]
        outbox.ack([1, 2])
        assert sink.send(outbox.claim(2), tokens.token or "").acked == [3, 4]
    sink.close()
    assert [(r.status, r.encoding) for r in sim_api.requests] == [(415, "gzip"), (200, ""), (200, "")]
    assert sim_api.seqs(DEVICE) == {1, 2, 3, 4}
    said = [r.getMessage() for r in caplog.records if "415" in r.getMessage()]
    assert len(said) == 1 and "uncompressed" in said[0]


def test_sim_api_refuses_an_encoding_it_does_not_know(api_settings: UploadSettings, sim_api: SimApi,
                                                      tokens: FakeTokens) -> None:
    import requests

    resp = requests.post(sim_api.url, data=b"\x00garbage", timeout=5, verify=api_settings.ca_file,
                         headers={"Content-Encoding": "br", "Content-Type": "application/json",
                                  "Authorization": f"Bearer {tokens.token}"})
    assert resp.status_code == 415 and resp.headers.get("Date")
