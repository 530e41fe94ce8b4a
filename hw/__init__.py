"""Hardware abstraction layer: GPIO, displays and sensors, real and fake. Never imports agent."""

import importlib.util
import sys


def _defer_exif_tags() -> None:
    """``PIL.Image`` imports ``PIL.ExifTags`` (EXIF tag names as ~500 enum members, ~5 ms of
    CPU on x86, a fifth of PIL.Image's import) that no display here ever reads: it becomes a
    lazy module, executed on its first attribute access (``importlib.util.LazyLoader``; the same
    module, loaded when EXIF is first used). docs/PERFORMANCE.md "Sign-in"."""
    if "PIL.ExifTags" in sys.modules or "PIL.Image" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("PIL.ExifTags")
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["PIL.ExifTags"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["PIL"], "ExifTags", module)  # noqa: B010 - as the import system does


_defer_exif_tags()
