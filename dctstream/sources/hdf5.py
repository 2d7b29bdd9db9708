"""Recorded scans in HDF5 files, addressed as ``path/to/file.h5::/path/to/dataset``."""

from __future__ import annotations

import os

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4 and friends with h5py)
import numpy as np

from ..errors import InputError
from ..types import Frame

# Frames are read a few at a time: one HDF5 call per frame costs more than the copy.
_READ_BATCH = 8


def parse_url(url: str) -> tuple[str, str]:
    """Split ``file.h5::/dataset`` into its file path and dataset path."""
    path, sep, dataset = url.partition("::")
    if not sep or not path or not dataset:
        raise InputError(f"{url}: expected a URL of the form path/to/file.h5::/path/to/dataset")
    return path, dataset


def _open(url: str) -> tuple[h5py.File, h5py.Dataset]:
    path, name = parse_url(url)
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found (from {url})")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5 ({exc})") from None
    obj = h5.get(name)
    if not isinstance(obj, h5py.Dataset):
        h5.close()
        what = "is a group, not a dataset" if obj is not None else "no such dataset"
        raise InputError(f"{url}: {what}")
    return h5, obj


def read_dataset(url: str) -> np.ndarray:
    """The whole dataset at ``url`` (for small things: angles, darks)."""
    h5, dset = _open(url)
    with h5:
        return dset[()]


class Hdf5FileSource:
    """Frames of a complete (recorded) scan: a 3-D dataset (frames, y, x) of integers."""

    def __init__(self, url: str, angles: str | None = None):
        self.url = url
        self._h5, self._dset = _open(url)
        shape, dtype = self._dset.shape, self._dset.dtype
        if len(shape) != 3:
            self.close()
            raise InputError(f"{url}: expected a 3-D stack of frames (frames, y, x), got shape {shape}")
        if dtype.kind not in "ui":
            self.close()
            raise InputError(f"{url}: expected integer detector counts, got dtype {dtype}")
        self.n_frames = shape[0]
        self.frame_shape = tuple(shape[1:])
        self.dtype = dtype
        self.angles = None
        if angles:
            psi = np.asarray(read_dataset(angles), dtype=np.float64)
            if psi.ndim != 1 or psi.size < self.n_frames:
                self.close()
                raise InputError(f"{angles}: expected a 1-D array of at least {self.n_frames} angles "
                                 f"(one per frame), got shape {psi.shape}")
            self.angles = psi[: self.n_frames]

    def __iter__(self):
        for start in range(0, self.n_frames, _READ_BATCH):
            try:
                block = self._dset[start:start + _READ_BATCH]
            except OSError as exc:
                raise InputError(f"{self.url}: frame {start}: cannot read ({exc})") from None
            for i, data in enumerate(block):
                k = start + i
                yield Frame(k, None if self.angles is None else float(self.angles[k]), data)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_dark(url: str | None, value: float | None, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """The dark/offset image to subtract: the mean of a stack of dark frames, a 2-D image, or a constant."""
    if value is not None:
        return np.full(frame_shape, value, dtype=np.float32)
    if url is None:
        return None
    data = read_dataset(url)
    if data.ndim == 3:
        data = data.mean(axis=0, dtype=np.float64)
    if data.ndim != 2 or data.shape != tuple(frame_shape):
        raise InputError(f"dark.url: {url}: expected dark frames of shape {tuple(frame_shape)}, got {data.shape}")
    return data.astype(np.float32)
