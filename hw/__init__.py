"""Hardware abstraction layer: GPIO, displays and sensors, real and fake. Never imports agent."""

import sys as _sys

from hw.lazymodule import defer as _defer

# Pillow's tag tables, read by none of our displays: executed on first use (hw.lazymodule).
if "PIL.Image" not in _sys.modules:
    try:
        import PIL  # noqa: F401 - the package only (its version), so the modules hang from it
    except ImportError:
        pass
    else:
        _defer("PIL.ExifTags")
        _defer("PIL.TiffTags")

# tempfile imports shutil at its top for TemporaryDirectory's cleanup and SpooledTemporaryFile's
# rollover only; mkstemp and gettempdir, all that the png panel and the agent's files take from
# it, need none of it. shutil's code (with bz2, lzma and their libraries; zipfile binds it too)
# runs on first use instead: ~0.3 MiB of a Pi Zero's process (docs/PERFORMANCE.md "Memory").
# Here, the bottom of the import order, before anything imports tempfile.
_defer("shutil")

