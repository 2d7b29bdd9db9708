"""Compiled kernels are cached where this process can write, or not at all: never a failure to start.

numba caches a ``cache=True`` kernel next to its module (``__pycache__``), else in the user's cache folder,
and refuses to compile it at all (``cannot cache function``) when neither is writable: a package installed
by root and run by a service account without a home.  So, unless ``NUMBA_CACHE_DIR`` is set, the first of
these that is writable is used: the package's own folders, ``$XDG_CACHE_HOME`` (or ``~/.cache``)
``/dctstream/numba``, ``<temp dir>/dctstream-numba-<uid>``; with none, the kernels are compiled without a
cache (each process compiles them again, a few seconds).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The folders whose modules hold cached kernels.
_KERNEL_DIRS = ("background", "segment")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False


def place_numba_cache() -> str | None:
    """Choose where numba caches; returns a sentence for the log when it is not beside the package."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if all(_writable(_PACKAGE / name / "__pycache__") for name in _KERNEL_DIRS):
        return None
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    for folder in (Path(xdg) / "dctstream" / "numba", Path(tempfile.gettempdir()) / f"dctstream-numba-{uid}"):
        if _writable(folder):
            os.environ["NUMBA_CACHE_DIR"] = str(folder)
            if "numba" in sys.modules:
                from numba.core import config
                config.reload_config()
            return f"{_PACKAGE} is not writable: compiled kernels are cached in {folder} (NUMBA_CACHE_DIR)"
    from numba.core.dispatcher import Dispatcher

    Dispatcher.enable_caching = lambda self: None
    return (f"{_PACKAGE} and the cache folders ({xdg}, {tempfile.gettempdir()}) are not writable: kernels are "
            "compiled without a cache, in every run (set NUMBA_CACHE_DIR to a writable folder to keep them)")
