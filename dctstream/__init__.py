"""dctstream: live background correction and difspot segmentation for DCT scans."""

__version__ = "0.1.0"

from ._numba_cache import place_numba_cache  # noqa: E402  (before any kernel is compiled)

# Where numba keeps the compiled kernels, when not next to them (a root-installed package run by a service
# account): said once in the log by the command line.
NUMBA_CACHE_NOTE = place_numba_cache()
