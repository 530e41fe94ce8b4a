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
from pathlib import Path

from tests.agentproc import ROOT

# What the service does: the module first, the libraries of the start, save once the code shows.
_START = """
import json, re, sys
import agent.regexcache as rc
import urllib3, http.cookiejar, email.utils, requests
cache = rc.started
loaded, compiled = (cache.loaded, cache.compiled) if cache else (None, None)
# Every pattern re now holds, compiled again without its cache: the same code, flags, groups.
same = all(obj == re._compiler.compile(key[1], key[2]) for key, obj in list(re._cache.items()))
from urllib3.util.url import parse_url
url = str(parse_url("https://[fe80::1%25eth0]:8443/a/b?c=d#e"))
print(json.dumps({"loaded": loaded, "compiled": compiled, "saved": rc.save_started(), "same": same,
                  "url": url, "count": len(re._cache)}))
"""


def _start(cache_dir: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CACHE_DIRECTORY"}
    env["PYTHONPATH"] = str(ROOT)
    if cache_dir is not None:
        env["CACHE_DIRECTORY"] = str(cache_dir)
    res = subprocess.run([sys.executable, "-c", _START], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


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
    header, entries = marshal.loads(path.read_bytes())
    path.write_bytes(marshal.dumps(((header[0], "3.11.0 (other build)", *header[2:]), entries)))
    other = _start(tmp_path)
    assert other["loaded"] == 0 and other["compiled"] > 30 and other["saved"] is True and other["same"]
    assert _start(tmp_path)["loaded"] >= 30, "rewritten for this interpreter"
    path.write_bytes(path.read_bytes()[:5000])                   # cut short
    damaged = _start(tmp_path)
    assert damaged["loaded"] == 0 and damaged["same"] and damaged["url"].startswith("https://[fe80::1")
    path.write_bytes(marshal.dumps((header, [(False, "(", 0, 32, b"\\x00" * 8, 0, {}, (None,))])))
    assert _start(tmp_path)["loaded"] == 0, "code _sre refuses: nothing of the file is used"


def test_without_a_cache_directory_nothing_is_kept(tmp_path: Path) -> None:
    out = _start(None)
    assert out["loaded"] is None and out["saved"] is False and out["same"]
    assert list(tmp_path.iterdir()) == []
