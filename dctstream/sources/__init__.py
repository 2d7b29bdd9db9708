"""Sources of frames: iterators of ``Frame`` with ``close()``."""

from .hdf5 import Hdf5FileSource, load_dark, parse_url, read_dataset

__all__ = ["Hdf5FileSource", "load_dark", "parse_url", "read_dataset", "open_source"]


def open_source(cfg):
    """The source that ``cfg.url`` (the ``source`` config section) names.

    Only recorded HDF5 files (``file.h5::/dataset``) so far.
    """
    return Hdf5FileSource(cfg.url, cfg.angles)
