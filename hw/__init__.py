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
