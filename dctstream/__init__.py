"""dctstream: live background correction and difspot segmentation for DCT scans.

The Python API: `run` processes a scan into an output folder as ``dctstream run``
does, `open_run` reads such a folder back, and `segment` finds the difspots of
frames held in memory.  Errors are the classes of `dctstream.errors`.
"""

import os
import sys

# OpenMP's threads spin on their core after each parallel kernel, waiting for the next (GNU's default): the
# stages' own threads then wait for a core. Sleeping instead: a 256 x 256 scan of 199 grain spots in 4.8 s
# instead of 7.0 (2 cores). Read once, when numba first runs a parallel kernel; a value set by the user stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__  # noqa: E402

from ._numba_cache import place_numba_cache  # noqa: E402  (before any kernel is compiled)

# Where numba keeps the compiled kernels, when not next to them (a root-installed package run by a service
# account): said once in the log by the command line.
NUMBA_CACHE_NOTE = place_numba_cache()

from .api import run
from .config import Config, load_config
from .errors import ConfigError, DctStreamError, InputError, OptionalDependencyError, OutputError
from .results import Run, open_run
from .types import Difspot

# the segmenter's subpackage, which `api` made callable as the function `segment` (the name means both)
segment = sys.modules[f"{__name__}.segment"]  # noqa: F811

__all__ = [
    "Config",
    "ConfigError",
    "DctStreamError",
    "Difspot",
    "InputError",
    "OptionalDependencyError",
    "OutputError",
    "Run",
    "__version__",
    "load_config",
    "open_run",
    "run",
    "segment",
]
