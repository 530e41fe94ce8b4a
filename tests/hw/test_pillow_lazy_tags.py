"""hw defers PIL.ExifTags and PIL.TiffTags (docs/PERFORMANCE.md "Sign-in"): not executed by a display's start,
and still the real module, with its tags, the moment EXIF is used."""

from __future__ import annotations

import subprocess
import sys

from tests.agentproc import ROOT

_SCRIPT = """
import io, sys
import hw.png
from PIL import Image
assert "PIL.Image" in sys.modules
before = type(sys.modules["PIL.ExifTags"]).__name__   # type() does not load it
tiff_before = type(sys.modules["PIL.TiffTags"]).__name__
from PIL import ExifTags
im = Image.new("RGB", (4, 4))
exif = im.getexif()
exif[ExifTags.Base.Orientation] = 3
buf = io.BytesIO()
im.save(buf, "PNG", exif=exif)
back = Image.open(io.BytesIO(buf.getvalue())).getexif()[274]
buf = io.BytesIO()
Image.new("L", (4, 4)).save(buf, "TIFF")
size = Image.open(io.BytesIO(buf.getvalue())).size
print(before, type(ExifTags).__name__, int(ExifTags.Base.Orientation), back,
      tiff_before, type(sys.modules["PIL.TiffTags"]).__name__, *size)
"""


def test_tag_tables_load_on_first_use_only() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["_LazyModule", "module", "274", "3", "_LazyModule", "module", "4", "4"]
