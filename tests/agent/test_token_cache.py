"""The token cache file: atomic 0600 writes, damaged files moved aside, thread safety.

The cache contents come from msal's own ``TokenCache.add`` fed with a token response, the same
path a real sign-in takes, so the file on disk has msal's real shape.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path

import msal
import pytest

from agent.signin.token_cache import TokenCacheFile

AUTHORITY_ENDPOINT = "https://login.example/tenant/oauth2/v2.0/token"


def fake_sign_in(cache: msal.SerializableTokenCache, n: int = 0) -> None:
    """Feed msal's cache one token response, as acquire_token_by_device_flow would."""
    cache.add({
        "client_id": "cid",
        "scope": ["api://telemetry/Readings.Write"],
        "token_endpoint": AUTHORITY_ENDPOINT,
        "response": {
            "access_token": f"access-token-{n}", "refresh_token": f"refresh-token-{n}",
            "token_type": "Bearer", "expires_in": 3600,
            "client_info": "eyJ1aWQiOiAidWlkIiwgInV0aWQiOiAidXRpZCJ9",   # {"uid": "uid", "utid": "utid"}
        },
    })


def secrets_in(path: Path) -> set[str]:
    data = json.loads(path.read_text())
    return {e["secret"] for section in ("AccessToken", "RefreshToken")
            for e in data.get(section, {}).values()}


@pytest.fixture
def path(state_dir: Path) -> Path:
    return state_dir / "token_cache.json"


def test_missing_file_is_a_first_start(path: Path) -> None:
    tc = TokenCacheFile(path)
    assert tc.load() is False
    assert tc.accounts() == []
    assert not path.exists()


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    tc = TokenCacheFile(tmp_path / "new" / "state" / "token_cache.json")
    tc.load()
    assert stat.S_IMODE((tmp_path / "new" / "state").stat().st_mode) == 0o700


def test_saved_after_a_change_only_and_round_trips(path: Path) -> None:
    tc = TokenCacheFile(path)
    tc.load()
    with tc.using() as cache:
        pass
    assert not path.exists(), "nothing changed, nothing written"
    with tc.using() as cache:
        fake_sign_in(cache)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secrets_in(path) == {"access-token-0", "refresh-token-0"}
    mtime = path.stat().st_mtime_ns
    assert tc.save_if_changed() is False
    assert path.stat().st_mtime_ns == mtime

    again = TokenCacheFile(path)
    assert again.load() is True
    assert [a["home_account_id"] for a in again.accounts()] == ["uid.utid"]


def test_saved_even_when_the_msal_call_raises(path: Path) -> None:
    tc = TokenCacheFile(path)
    tc.load()
    with pytest.raises(RuntimeError), tc.using() as cache:
        fake_sign_in(cache)          # msal changed the cache, then the call failed
        raise RuntimeError("network")
    assert secrets_in(path) == {"access-token-0", "refresh-token-0"}


def test_rotation_replaces_the_file_atomically(path: Path) -> None:
    tc = TokenCacheFile(path)
    tc.load()
    with tc.using() as cache:
        fake_sign_in(cache, 0)
    inode = path.stat().st_ino
    with tc.using() as cache:
        fake_sign_in(cache, 1)
    assert "refresh-token-1" in secrets_in(path)
    assert path.stat().st_ino != inode, "rewritten in place instead of renamed over"
    assert [p.name for p in path.parent.iterdir()] == ["token_cache.json"], "temp file left behind"


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b'{"AccessToken": {"k": {"secret": "x"', id="truncated"),
    pytest.param(b"\x00\x01garbage\xff\xfe", id="garbage-bytes"),
    pytest.param(b"not json at all", id="garbage-text"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(b'{"AccessToken": "oops"}', id="bad-section"),
    pytest.param(b'{"AccessToken": {"k": 5}}', id="bad-entry"),
    pytest.param(b'{"hello": "world"}', id="not-msal"),
])
def test_damaged_file_is_moved_aside_with_a_warning(path: Path, content: bytes,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path.write_bytes(content)
    tc = TokenCacheFile(path)
    with caplog.at_level(logging.WARNING, logger="agent.signin.token_cache"):
        assert tc.load() is False
    assert tc.accounts() == []
    aside = path.with_name("token_cache.json.corrupt-1")
    # Kept for a post-mortem (these samples hold nothing token-like, so nothing is removed).
    assert aside.read_bytes() == content.decode("utf-8", "replace").encode()
    assert not path.exists()
    assert any("set it aside as token_cache.json.corrupt-1" in r.getMessage() for r in caplog.records)
    # And the next sign-in saves a fresh file next to it.
    with tc.using() as cache:
        fake_sign_in(cache)
    assert secrets_in(path) == {"access-token-0", "refresh-token-0"}


def test_second_corrupt_file_gets_the_next_number(path: Path) -> None:
    for expected in (1, 2):
        path.write_text("garbage")
        TokenCacheFile(path).load()
        assert path.with_name(f"token_cache.json.corrupt-{expected}").exists()


def test_a_directory_in_its_place_is_moved_aside(path: Path) -> None:
    path.mkdir()
    tc = TokenCacheFile(path)
    assert tc.load() is False
    assert path.with_name("token_cache.json.corrupt-1").is_dir()
    with tc.using() as cache:
        fake_sign_in(cache)
    assert path.is_file()


def test_permissive_file_is_tightened_to_0600(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed = TokenCacheFile(path)
    with seed.using() as cache:
        fake_sign_in(cache)
    os.chmod(path, 0o644)
    tc = TokenCacheFile(path)
    with caplog.at_level(logging.WARNING, logger="agent.signin.token_cache"):
        assert tc.load() is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any("readable by others" in r.getMessage() for r in caplog.records)
    assert tc.accounts(), "the tokens are still used"


def test_write_failure_is_logged_and_retried(path: Path, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import agent.signin.token_cache as mod

    real = mod.atomic_write
    calls: list[Path] = []

    def disk_full_once(p: Path, data: bytes, *, mode: int = 0o600) -> None:
        calls.append(p)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(p, data, mode=mode)

    monkeypatch.setattr(mod, "atomic_write", disk_full_once)
    tc = TokenCacheFile(path)
    tc.load()
    with caplog.at_level(logging.ERROR, logger="agent.signin.token_cache"), tc.using() as cache:
        fake_sign_in(cache)
    assert any("cannot save the token cache" in r.getMessage() and "No space left" in r.getMessage()
               for r in caplog.records)
    assert not path.exists()
    assert tc.save_if_changed() is True, "the change is still pending after the failure"
    assert secrets_in(path) == {"access-token-0", "refresh-token-0"}


def test_clear_forgets_everything(path: Path) -> None:
    tc = TokenCacheFile(path)
    with tc.using() as cache:
        fake_sign_in(cache)
    tc.clear()
    assert tc.accounts() == []
    assert json.loads(path.read_text()) == {}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TokenCacheFile(path).load() is True   # an empty cache is a valid file, not damage


def test_concurrent_changes_all_reach_the_disk(path: Path) -> None:
    tc = TokenCacheFile(path)
    tc.load()
    errors: list[BaseException] = []

    def worker(base: int) -> None:
        try:
            for i in range(10):
                with tc.using() as cache:
                    fake_sign_in(cache, base + i)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reloaded = TokenCacheFile(path)
    assert reloaded.load() is True
    # Same account each time: the last response wins, and the file is whole and parseable.
    assert len(reloaded.accounts()) == 1
    assert json.loads(path.read_text())["RefreshToken"]


def test_a_set_aside_cache_keeps_no_secret(tmp_path: Path) -> None:
    """A cache msal cannot use may still hold a live refresh token: the copy kept for a
    post-mortem must not (no file in the state dir but the cache holds a secret)."""
    from agent.signin.token_cache import TokenCacheFile

    secret = "0.AAAA" + "x7Qm2-Lp_9" * 12
    path = tmp_path / "token_cache.json"
    path.write_text('{"RefreshToken": {"k": {"secret": "' + secret + '"}}, "AppMetadata": []')  # truncated
    path.chmod(0o600)
    assert TokenCacheFile(path).load() is False
    aside = list(tmp_path.glob("token_cache.json.corrupt-*"))
    assert len(aside) == 1 and not path.exists()
    kept = aside[0].read_text()
    assert secret not in kept and secret[:16] not in kept and "RefreshToken" in kept
    assert oct(aside[0].stat().st_mode & 0o777) == "0o600"


def test_temp_file_left_by_a_power_cut_is_removed(tmp_path: Path) -> None:
    from agent.signin.token_cache import TokenCacheFile

    leftover = tmp_path / ".token_cache.json.abc123.tmp"
    leftover.write_text('{"RefreshToken": {"k": {"secret": "live-refresh-token-value-123"}}}')
    TokenCacheFile(tmp_path / "token_cache.json").load()
    assert not leftover.exists()


def test_quarantine_of_a_parseable_cache_msal_cannot_use(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # auth calls this when msal raises on the cache's content (a field of the wrong type, ...).
    tc = TokenCacheFile(path)
    tc.load()
    with tc.using() as cache:
        fake_sign_in(cache)
    data = json.loads(path.read_text())
    secret = "0.AAAA" + "x7Qm2-Lp_9" * 12          # what a real refresh token looks like
    for rt in data["RefreshToken"].values():
        rt["secret"] = secret
    path.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING, logger="agent.signin.token_cache")
    tc.quarantine("msal cannot read it: KeyError in acquire_token_silent")
    assert not path.exists() and tc.accounts() == []
    aside = path.with_name("token_cache.json.corrupt-1")
    kept = aside.read_text()
    assert secret not in kept and secret[:16] not in kept and "RefreshToken" in kept
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    assert "KeyError in acquire_token_silent" in caplog.text and "corrupt-1" in caplog.text
    with tc.using() as cache:            # the next sign-in is saved as usual
        fake_sign_in(cache, 1)
    assert secrets_in(path) == {"access-token-1", "refresh-token-1"}


def test_quarantine_without_a_file_just_starts_empty(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tc = TokenCacheFile(path)
    tc.load()
    fake_sign_in(tc.cache)               # in memory only (never saved)
    caplog.set_level(logging.WARNING, logger="agent.signin.token_cache")
    tc.quarantine("msal cannot remove the account it holds")
    assert tc.accounts() == [] and not path.exists()
    assert not list(path.parent.glob("*.corrupt-*"))
    assert "starting without it" in caplog.text
