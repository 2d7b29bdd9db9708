"""Sources of frames: iterators of ``Frame`` with ``close()``."""

from .hdf5 import Hdf5FileSource, load_dark, parse_url, read_dataset

__all__ = ["Hdf5FileSource", "load_dark", "parse_url", "read_dataset", "open_source"]


def open_source(url: str, angles: str | None = None):
    """The source for ``url``; only recorded HDF5 files (``file.h5::/dataset``) so far."""
    return Hdf5FileSource(url, angles)
