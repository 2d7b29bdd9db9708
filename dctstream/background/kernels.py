"""Checked wrappers around the numba kernels: shapes, dtypes and contiguity are verified here."""

from __future__ import annotations

import numpy as np

from . import _kernels


def _require(name: str, arr: np.ndarray, *, ndim: int, dtype=None) -> None:
    if not isinstance(arr, np.ndarray) or arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got {getattr(arr, 'shape', type(arr))}")
    if dtype is not None and arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")


def window_median(ring: np.ndarray, slots: np.ndarray, dark: np.ndarray, scales: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel median over the ring slots of the normalised frames (ring - dark) * scale, float32."""
    _require("ring", ring, ndim=3)
    _require("dark", dark, ndim=2, dtype=np.float32)
    _require("scales", scales, ndim=1, dtype=np.float32)
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if slots.size % 2 != 1:
        raise ValueError(f"slots: expected an odd number of frames, got {slots.size}")
    if dark.shape != ring.shape[1:]:
        raise ValueError(f"dark: expected shape {ring.shape[1:]}, got {dark.shape}")
    if out is None:
        out = np.empty(ring.shape[1:], dtype=np.float32)
    _require("out", out, ndim=2, dtype=np.float32)
    _kernels.window_median_normalised(ring, slots, dark, scales, out)
    return out


def median_filter(img: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """size x size median filter with scipy.ndimage's 'reflect' edges; size 1 copies."""
    _require("img", img, ndim=2)
    if size < 1 or size % 2 != 1:
        raise ValueError(f"size: expected an odd integer >= 1, got {size}")
    if out is None:
        out = np.empty_like(img)
    if size == 1:
        out[...] = img
        return out
    _require("out", out, ndim=2, dtype=img.dtype)
    _kernels.median_filter_2d(img, size, out)
    return out


class SortedWindow:
    """Per-pixel sorted copy of the frames in the window: the median is the middle column.

    Sliding by one frame replaces one value per pixel, which costs the number of
    ranks the pixel's value moves, instead of a new selection over the window.
    """

    def __init__(self, frames: np.ndarray):
        _require("frames", frames, ndim=3)
        if frames.shape[0] % 2 != 1:
            raise ValueError(f"frames: expected an odd number of frames, got {frames.shape[0]}")
        self.frame_shape = frames.shape[1:]
        flat = frames.reshape(frames.shape[0], -1)
        self.win = np.empty((flat.shape[1], flat.shape[0]), dtype=frames.dtype)
        _kernels.sorted_window_init(flat, self.win)

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """Remove frame ``old`` from the window and add frame ``new``."""
        for name, arr in (("old", old), ("new", new)):
            _require(name, arr, ndim=2, dtype=self.win.dtype)
            if arr.shape != self.frame_shape:
                raise ValueError(f"{name}: expected shape {self.frame_shape}, got {arr.shape}")
        _kernels.sorted_window_replace(self.win, old.reshape(-1), new.reshape(-1))

    def median(self) -> np.ndarray:
        return self.win[:, self.win.shape[1] // 2].reshape(self.frame_shape)
