"""hw.lazymodule (docs/PERFORMANCE.md "Sign-in"): Pillow's tag tables and segno's writers are
not executed by a display's start or a code screen, and are the real modules, working, the
moment something uses them. Fresh interpreters: the point is what an agent's start imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.agentproc import ROOT

_PILLOW = """
import io, sys
import hw.png
from hw.lazymodule import is_deferred
from PIL import Image
assert "PIL.Image" in sys.modules
before = [is_deferred(sys.modules[m]) for m in ("PIL.ExifTags", "PIL.TiffTags")]
import PIL.ExifTags
from PIL import ExifTags
assert PIL.ExifTags is ExifTags
im = Image.new("RGB", (4, 4))
exif = im.getexif()
exif[ExifTags.Base.Orientation] = 3
buf = io.BytesIO()
im.save(buf, "PNG", exif=exif)
back = Image.open(io.BytesIO(buf.getvalue())).getexif()[274]
buf = io.BytesIO()
Image.new("L", (4, 4)).save(buf, "TIFF")
size = Image.open(io.BytesIO(buf.getvalue())).size
after = [is_deferred(sys.modules[m]) for m in ("PIL.ExifTags", "PIL.TiffTags")]
print(*before, int(ExifTags.Base.Orientation), back, *size, *after)
"""

_SEGNO = """
import io, sys
from agent.panel import screens
from hw.lazymodule import is_deferred
rows = screens._qr_rows("https://login.example/device?code=ABC")
before = ["xml.sax" in sys.modules, "gzip" in sys.modules, is_deferred(sys.modules["segno.writers"])]
import segno
buf = io.BytesIO()
segno.make("hello").save(buf, kind="svg")
print(*before, len(rows), buf.getvalue().startswith(b"<?xml"), "xml.sax" in sys.modules,
      is_deferred(segno.writers))
"""


def _run(script: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.split()


def test_pillow_tag_tables_load_on_first_use_only() -> None:
    assert _run(_PILLOW) == ["True", "True", "274", "3", "4", "4", "False", "False"]


def test_segno_writers_load_on_first_use_only() -> None:
    assert _run(_SEGNO) == ["False", "False", "True", "31", "True", "True", "False"]


_PACKAGE = {
    "lib/__init__.py": "import sys\nsys.ran.append('lib')\nfrom lib import tool\nfrom lib.tool import Maker, helper\n",
    "lib/tool.py": "import sys\nsys.ran.append('tool')\nclass Maker:\n    def __init__(self, n):\n"
                   "        self.n = n\ndef helper(x):\n    return x * 2\nVALUE = 7\n__all__ = ['VALUE', 'helper']\n",
    "lib/sub/__init__.py": "import sys\nsys.ran.append('sub')\nfrom importlib import metadata\nPKG = 1\n",
    "lib/sub/leaf.py": "import sys\nsys.ran.append('leaf')\nLEAF = 3\n",
}

_SHAPES = """
import json, sys
sys.ran = []
from hw.lazymodule import defer, is_deferred
out = {"deferred": [defer("lib.tool", stand_ins=("Maker", "helper")), defer("lib.sub"), defer("lib.none"),
                    defer("hw.lazymodule")],
       "imported_by_defer": [m for m in ("lib", "lib.tool", "lib.sub") if m in sys.modules]}
import lib
from lib.sub import leaf
out["after_import"] = list(sys.ran)
out["hangs"] = [lib.tool is sys.modules["lib.tool"], is_deferred(lib.tool), is_deferred(sys.modules["lib.sub"]),
                hasattr(lib.tool, "__path__"), leaf.LEAF]
made = lib.Maker(5)                                # a stand-in: the real class, constructed
out["called"] = [type(made).__qualname__, made.n, isinstance(made, lib.tool.Maker), lib.helper(4), list(sys.ran)]
import lib.sub
out["package"] = [lib.sub.PKG, "importlib.metadata" in sys.modules, is_deferred(lib.sub), list(sys.ran)]
ns = {}
exec("from lib.tool import *", ns)
out["star"] = sorted(k for k in ns if not k.startswith("__"))
try:
    import lib.none
except ModuleNotFoundError as err:
    out["none"] = err.name
print(json.dumps(out))
"""


def test_deferring_imports_nothing_and_each_shape_of_import_gets_the_real_thing(tmp_path: Path) -> None:
    """A package's submodule deferred before the package is imported (msal.oauth2cli.authcode):
    it still hangs from its package; names only called (stand-ins) run it on the first call; a
    deferred package (urllib3.http2) gives its submodule without running its own code; the
    import system asking whether it is a package does not set it off."""
    for rel, text in _PACKAGE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", _SHAPES], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["deferred"] == [True, True, True, False] and out["imported_by_defer"] == []
    assert out["after_import"] == ["lib", "leaf"], "neither lib.tool nor lib.sub ran at their import"
    assert out["hangs"] == [True, True, True, False, 3]
    assert out["called"] == ["Maker", 5, True, 8, ["lib", "leaf", "tool"]]
    assert out["package"] == [1, True, False, ["lib", "leaf", "tool", "sub"]]
    assert out["star"] == ["VALUE", "helper"]
    assert out["none"] == "lib.none", "a name that does not exist fails at its import as always"


_ANSWERS = """
import json, sys
sys.ran = []
from hw.lazymodule import defer, is_deferred, load
defer("lib.tool", answers={"helper": lambda x: -x})
from lib.tool import helper
out = {"before": [helper(4), is_deferred(sys.modules["lib.tool"]), list(sys.ran)]}
tool = load(sys.modules["lib.tool"])
out["after"] = [tool.helper(4), helper(4), is_deferred(tool), list(sys.ran), load(tool) is tool]
print(json.dumps(out))
"""


def test_an_answer_stands_for_a_name_until_the_module_runs(tmp_path: Path) -> None:
    """certifi.where(), which requests calls at its import, is answered without running
    certifi's importlib.resources; the module, run, has its own again."""
    for rel, text in _PACKAGE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "lib/__init__.py").write_text("import sys\nsys.ran.append('lib')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", _ANSWERS], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["before"] == [-4, True, ["lib"]], "the answer, and the module's code has not run"
    assert out["after"] == [8, -4, False, ["lib", "tool"], True]


def _run_with(tmp_path: Path, files: dict[str, str], script: str) -> dict:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


_RACE = """
import json, sys, threading
sys.entered, sys.go = threading.Event(), threading.Event()
from hw.lazymodule import _FINDER, defer
defer("pk.slow")
import pk.slow as m                  # a library binds the module at its import
got = {}
def read(who):
    try:
        got[who] = m.LATE
    except AttributeError as err:
        got[who] = str(err)
a = threading.Thread(target=read, args=("A",)); a.start()
sys.entered.wait(10)                 # A runs the module's code: EARLY set, LATE not yet
b = threading.Thread(target=read, args=("B",)); b.start()
b.join(0.3)
sys.go.set()
a.join(10); b.join(10)
print(json.dumps({"got": got, "finder": _FINDER in sys.meta_path}))
"""


def test_a_thread_reading_a_module_another_thread_runs_gets_the_finished_module(tmp_path: Path) -> None:
    """Never a half-run module: the second thread's read waits for the first one's run to end
    (it got a false AttributeError)."""
    out = _run_with(tmp_path, {
        "pk/__init__.py": "",
        "pk/slow.py": "import sys\nEARLY = 1\nsys.entered.set()\nsys.go.wait(10)\nLATE = 2\n",
    }, _RACE)
    assert out["got"] == {"A": 2, "B": 2}
    assert out["finder"], "left in sys.meta_path: another thread's import never skips the finder after it"


_DEADLOCK = """
import json, sys, threading
sys.in_shared, sys.a_waiting = threading.Event(), threading.Event()
from hw.lazymodule import defer
defer("pk.d1"); defer("pk.d2")
import pk.d1 as d1
def b():
    import pk.shared                 # holds pk.shared's import lock, then imports deferred pk.d2
def a():
    sys.in_shared.wait(10)
    getattr(d1, "shared", None)      # runs pk.d1, which imports pk.shared (B's)
ts = [threading.Thread(target=b, daemon=True), threading.Thread(target=a, daemon=True)]
[t.start() for t in ts]; [t.join(8) for t in ts]
print(json.dumps({"alive": [t.is_alive() for t in ts], "x": getattr(sys.modules.get("pk.shared"), "X", None)}))
"""


def test_running_a_module_never_waits_for_another_deferred_ones_import(tmp_path: Path) -> None:
    """One lock per module, none held while the module's code (and its imports) run: a thread
    importing a module that imports a deferred one does not deadlock with a thread whose first
    use runs a deferred module importing the first."""
    out = _run_with(tmp_path, {
        "pk/__init__.py": "",
        "pk/d1.py": "import sys\nsys.a_waiting.set()\nimport pk.shared\n",
        "pk/d2.py": "VALUE = 2\n",
        "pk/shared.py": "import sys\nsys.in_shared.set()\nsys.a_waiting.wait(10)\nimport pk.d2 as _d2\n"
                        "X = _d2.VALUE\n",
    }, _DEADLOCK)
    assert out == {"alive": [False, False], "x": 2}


_FAILS = """
import json, sys
sys.runs = 0
from hw.lazymodule import defer, is_deferred
defer("pk.broken")
import pk.broken as m
out = []
for name in ("X", "Y"):
    try:
        out.append(getattr(m, name))
    except Exception as err:
        out.append(type(err).__name__)
print(json.dumps({"out": out, "runs": sys.runs, "deferred": is_deferred(m)}))
"""


def test_a_module_whose_code_fails_fails_again_at_the_next_use_not_half_run(tmp_path: Path) -> None:
    out = _run_with(tmp_path, {
        "pk/__init__.py": "",
        "pk/broken.py": "import sys\nsys.runs += 1\nX = 1\nraise RuntimeError('no device')\n",
    }, _FAILS)
    assert out == {"out": ["RuntimeError", "RuntimeError"], "runs": 2, "deferred": True}


_RELOAD = """
import importlib, json, sys
sys.runs = 0
from hw.lazymodule import defer, is_deferred
defer("pk.counted")
import pk.counted as m
importlib.reload(m)
out = [sys.runs, is_deferred(m), hasattr(m, "missing"), sys.runs, m.X]
print(json.dumps(out))
"""


def test_a_reloaded_module_is_no_longer_deferred(tmp_path: Path) -> None:
    out = _run_with(tmp_path, {"pk/__init__.py": "", "pk/counted.py": "import sys\nsys.runs += 1\nX = 1\n"}, _RELOAD)
    assert out == [1, False, False, 1, 1], "reload ran it once; no second run on the next missing name"
