"""hw.lazymodule (docs/PERFORMANCE.md "Sign-in"): Pillow's tag tables and segno's writers are
not executed by a display's start or a code screen, and are the real modules, working, the
moment something uses them. Fresh interpreters: the point is what an agent's start imports."""

from __future__ import annotations

import subprocess
import sys

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
