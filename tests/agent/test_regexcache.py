"""agent/regexcache.py: a start's regular expressions kept in the cache directory are exactly
what re's compiler makes, are used by the next start instead of compiling, and anything doubtful
(another interpreter, a damaged file, no cache directory) means compiling as always. Fresh
interpreters: the point is what an import compiles."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
from array import array
from pathlib import Path

from agent import regexcache as rc
from tests.agentproc import ROOT

# What the service does: the module first, the libraries of the start, save once the code shows.
_START = """
import json, re, sys
import agent.regexcache as rc
import urllib3, http.cookiejar, email.utils, requests
import os
exec(os.environ.get("START_EXTRA", ""))
rx = re.match(r"(?P<a>\\d+)-(\\w+)?x{2,5}", "12-abxxx").groups()
cache = rc.started
loaded, compiled = (cache.loaded, cache.compiled) if cache else (None, None)
# Every pattern re now holds, compiled again without its cache: the same code, flags, groups.
same = all(obj == re._compiler.compile(key[1], key[2]) for key, obj in list(re._cache.items()))
from urllib3.util.url import parse_url
url = str(parse_url("https://[fe80::1%25eth0]:8443/a/b?c=d#e"))
print(json.dumps({"rx": rx, "loaded": loaded, "compiled": compiled, "saved": rc.save_started(), "same": same,
                  "url": url, "count": len(re._cache)}))
"""


def _run(cache_dir: Path | None, extra: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CACHE_DIRECTORY"}
    env["PYTHONPATH"], env["START_EXTRA"] = str(ROOT), extra
    if cache_dir is not None:
        env["CACHE_DIRECTORY"] = str(cache_dir)
    return subprocess.run([sys.executable, "-c", _START], capture_output=True, text=True, cwd=ROOT, env=env)


def _start(cache_dir: Path | None, extra: str = "") -> dict:
    res = _run(cache_dir, extra)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rx"] == ["12", "abx"]
    return out


def _file(cache_dir: Path) -> Path:
    return cache_dir / f"regex.{sys.implementation.cache_tag}.bin"


def test_the_next_start_compiles_nothing_it_kept_and_gets_the_same_patterns(tmp_path: Path) -> None:
    first = _start(tmp_path)
    assert first["loaded"] == 0 and first["compiled"] > 30 and first["saved"] is True
    assert (_file(tmp_path).stat().st_mode & 0o777) == 0o600
    second = _start(tmp_path)
    assert second["loaded"] >= 30 and second["compiled"] == 0, "every pattern came from the file"
    assert second["saved"] is False, "nothing new: the file is not written again"
    assert first["same"] and second["same"], "identical to what the compiler makes"
    assert second["url"] == first["url"] == "https://[fe80::1%eth0]:8443/a/b?c=d#e"


def test_another_interpreters_or_a_damaged_file_is_compiled_around_and_replaced(tmp_path: Path) -> None:
    _start(tmp_path)
    path = _file(tmp_path)
    header, entries = rc.decode(path.read_bytes())
    path.write_bytes(rc.encode((header[0], "3.11.0 (other build)", *header[2:]), entries))
    other = _start(tmp_path)
    assert other["loaded"] == 0 and other["compiled"] > 30 and other["saved"] is True and other["same"]
    assert _start(tmp_path)["loaded"] >= 30, "rewritten for this interpreter"
    path.write_bytes(path.read_bytes()[:5000])                   # cut short
    damaged = _start(tmp_path)
    assert damaged["loaded"] == 0 and damaged["same"] and damaged["url"].startswith("https://[fe80::1")
    path.write_bytes(rc.encode(header, [(False, "(", 0, 32, b"\\x00" * 8, 0, {}, (None,))]))
    assert _start(tmp_path)["loaded"] == 0, "code _sre refuses: nothing of the file is used"


def test_without_a_cache_directory_nothing_is_kept(tmp_path: Path) -> None:
    out = _start(None)
    assert out["loaded"] is None and out["saved"] is False and out["same"]
    assert list(tmp_path.iterdir()) == []


# re's code words for _START's own pattern, and the same with one word damaged: CPython 3.11's
# validator lets it through and _sre.compile crashes the interpreter (SIGSEGV).
_GOOD = [14, 4, 0, 4, 4294967295, 17, 0, 24, 9, 1, 4294967295, 13, 4, 8, 10, 0, 1, 17, 1, 16, 45, 23, 17, 0,
         1, 17, 2, 24, 9, 1, 4294967295, 13, 4, 8, 14, 0, 1, 17, 3, 18, 24, 6, 2, 5, 16, 120, 1, 1]
_BAD = [*_GOOD[:32], 0, *_GOOD[33:]]


def test_a_damaged_code_word_in_the_file_is_refused_without_crashing(tmp_path: Path) -> None:
    """A sector of the SD card gone bad in the middle of the file, the header intact: refused
    (the digest), compiled as always, the file written anew."""
    _start(tmp_path)
    path = _file(tmp_path)
    data = path.read_bytes()
    good, bad = (array("I", code).tobytes() for code in (_GOOD, _BAD))
    assert data.count(good) == 1, "the pattern is in the file, as re's compiler made it"
    path.write_bytes(data.replace(good, bad))
    res = _run(tmp_path)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    out = json.loads(res.stdout)
    assert out["loaded"] == 0 and out["compiled"] > 30 and out["saved"] is True and out["same"]
    assert _start(tmp_path)["loaded"] >= 30


def test_a_crash_while_loading_the_file_does_not_happen_again(tmp_path: Path) -> None:
    """What the digest cannot see (a file written with the damage, a bug): the start that
    crashes on it is the only one (with Restart=on-failure it would be every start)."""
    header = _ours()
    path = _file(tmp_path)
    path.write_bytes(rc.encode(header, [(False, r"(?P<a>\d+)-(\w+)?x{2,5}", 0, 32, array("I", _BAD).tobytes(),
                                         2, {"a": 1}, (None, "a", None))]))
    assert _run(tmp_path).returncode != 0, "the interpreter crashes on this file"
    out = _start(tmp_path)
    assert out["loaded"] == 0 and out["compiled"] > 30 and out["saved"] is True
    assert _start(tmp_path)["loaded"] >= 30, "and the next start has a good one"


def _ours() -> tuple:
    probe = "import agent.regexcache as rc, marshal, sys; sys.stdout.buffer.write(marshal.dumps(rc._header()))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return marshal.loads(res.stdout)


def test_the_file_keeps_what_the_last_start_used_not_every_pattern_ever(tmp_path: Path) -> None:
    first = _start(tmp_path, "re.compile('stale-one[0-9]+')")
    assert first["saved"] is True
    assert "stale-one" in str(rc.decode(_file(tmp_path).read_bytes())[1])
    second = _start(tmp_path, "re.compile('fresh-one[0-9]+')")
    assert second["loaded"] >= 30 and second["compiled"] == 1 and second["saved"] is True
    kept = str(rc.decode(_file(tmp_path).read_bytes())[1])
    assert "fresh-one" in kept and "stale-one" not in kept
    third = _start(tmp_path)
    assert third["compiled"] == 0 and third["saved"] is False and third["loaded"] == second["loaded"]


_SUBCLASS = """
import logging, re, sys
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
import agent.regexcache as rc
class S(str):
    pass
re.compile(S(r"ab+c")); re.compile(r"only-this-start[0-9]")
print("saved", rc.save_started())
"""


def test_saving_never_fails_the_start_and_a_cache_it_cannot_write_says_so_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CACHE_DIRECTORY": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", _SUBCLASS], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["saved", "True"], res.stderr
    assert "only-this-start" in str(rc.decode(_file(tmp_path).read_bytes())[1])
    (tmp_path / "file").write_text("")    # a directory it cannot write: the start goes on, one WARNING
    env["CACHE_DIRECTORY"] = str(tmp_path / "file" / "cache")
    res = subprocess.run([sys.executable, "-c", _SUBCLASS], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "saved False" and len(lines) == 2 and lines[0].startswith("WARNING regex cache "), lines
