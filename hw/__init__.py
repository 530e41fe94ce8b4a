"""Hardware abstraction layer: GPIO, displays and sensors, real and fake. Never imports agent."""

import importlib.util
import sys


def _defer_pillow_tag_tables() -> None:
    """``PIL.Image`` imports ``PIL.ExifTags`` (EXIF tag names as ~500 enum members, ~5 ms of CPU
    on x86, a fifth of PIL.Image's import) and ``PIL.TiffTags`` (~1 ms) that no display here
    ever reads: each becomes a lazy module, executed on its first attribute access
    (``importlib.util.LazyLoader``: the same module, loaded when EXIF or TIFF is first used).
    docs/PERFORMANCE.md "Sign-in"."""
    if "PIL.Image" in sys.modules:
        return
    for name in ("PIL.ExifTags", "PIL.TiffTags"):
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return
        if spec is None or spec.loader is None:
            return
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["PIL"], name.rpartition(".")[2], module)  # as the import system does


_defer_pillow_tag_tables()
