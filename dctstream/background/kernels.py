"""Checked wrappers around the numba kernels: shapes, dtypes and contiguity are verified here."""

from __future__ import annotations

import os

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
                  out: np.ndarray | None = None, *, gain: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel median over the ring slots of the normalised frames (ring - dark) * gain * scale, float32."""
    _require("ring", ring, ndim=3)
    _require("dark", dark, ndim=2, dtype=np.float32)
    _require("scales", scales, ndim=1, dtype=np.float32)
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if slots.size % 2 != 1:
        raise ValueError(f"slots: expected an odd number of frames, got {slots.size}")
    if dark.shape != ring.shape[1:]:
        raise ValueError(f"dark: expected shape {ring.shape[1:]}, got {dark.shape}")
    if gain is None:
        gain = np.ones(ring.shape[1:], np.float32)
    _require("gain", gain, ndim=2, dtype=np.float32)
    if gain.shape != ring.shape[1:]:
        raise ValueError(f"gain: expected shape {ring.shape[1:]}, got {gain.shape}")
    if out is None:
        out = np.empty(ring.shape[1:], dtype=np.float32)
    _require("out", out, ndim=2, dtype=np.float32)
    _kernels.window_median_normalised(ring, slots, dark, gain, scales, out)
    return out


def normalised_minus_background(raw: np.ndarray, dark: np.ndarray, gain: np.ndarray, scale,
                                background: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(float32(raw) - dark) * gain * scale - background, float32, into ``out``: one pass, no temporaries.

    A ``background`` of the raw frames' type is a median of raw frames, taken as
    (float32(background) - dark) * gain.
    """
    _require("raw", raw, ndim=2)
    for name, arr in (("dark", dark), ("gain", gain), ("out", out)):
        _require(name, arr, ndim=2, dtype=np.float32)
    _require("background", background, ndim=2, dtype=np.float32 if background.dtype == np.float32 else raw.dtype)
    for name, arr in (("dark", dark), ("gain", gain), ("background", background), ("out", out)):
        if arr.shape != raw.shape:
            raise ValueError(f"{name}: expected shape {raw.shape}, got {arr.shape}")
    kernel = (_kernels.normalised_minus_background if background.dtype == np.float32
              else _kernels.normalised_minus_raw_median)
    kernel(raw, dark, gain, np.float32(scale), background, out)
    return out


def normalise_into(raw: np.ndarray, dark: np.ndarray, scale, out: np.ndarray) -> np.ndarray:
    """Frame ``raw`` scaled to the beam intensity of the scan's reference, kept in raw counts:
    ``(raw - dark) * scale + dark`` into ``out`` (may be ``raw``), rounded and clipped to an integer ``out``."""
    _require("raw", raw, ndim=2)
    _require("dark", dark, ndim=2, dtype=np.float32)
    _require("out", out, ndim=2)
    if dark.shape != raw.shape or out.shape != raw.shape:
        raise ValueError(f"dark, out: expected shape {raw.shape}, got {dark.shape}, {out.shape}")
    if out.dtype.kind in "ui":
        info = np.iinfo(out.dtype)
        _kernels.quantise_normalised(raw, dark, np.float32(scale), float(info.min), float(info.max), out)
    elif out.dtype == np.float32:
        _kernels.normalise_float(raw, dark, np.float32(scale), out)
    else:
        raise ValueError(f"out: expected integer or float32 frames, got {out.dtype}")
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
    if size == 3:
        _kernels.median_filter_3x3(img, out)
    else:
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


# Bins per pixel, a byte each (see HistogramWindow): on the bench's drifting, oscillating direct beam
# 128 bins rebuild 33% less often than 96 (8% faster), for 0.125 GiB more at 2048 x 2048. 96 against 112:
# 18% more rebuilds, the median alone on 2 threads 29.5-35.8 against 30.0-38.8 frames/s (`dctstream bench`'s
# kernel timing, alternated in one process), the whole pipeline within the noise (12.5 and 12.6 against
# 11.3 and 13.0 frames/s, 701 frames of the bench's scan, alternated), and 0.0625 GiB less: the bench's peak
# 1.59 x a window of raw frames, against 1.61 x.
NBINS = 96


class HistogramWindow:
    """Exact running median of integer frames with a per-pixel windowed histogram.

    ``ring`` is the caller's ring of raw frames (frame f in slot f % len(ring)),
    which must hold the current window plus the frames being slid in.

    ``dormant``: a box ``(y0, y1, x0, x1)`` (rows y0 .. y1 - 1, columns x0 .. x1 - 1) whose pixels are not
    slid, their medians left undefined, until `wake` (None: every pixel is slid).
    """

    def __init__(self, ring: np.ndarray, first_frame: int, window: int, nbins: int = NBINS):
        _require("ring", ring, ndim=3)
        if ring.dtype.kind not in "ui" or ring.dtype.itemsize > 4:
            raise ValueError(f"ring: expected integer frames of at most 32 bits, got {ring.dtype}")
        if window % 2 != 1 or window > ring.shape[0] or window >= 65536:
            raise ValueError(f"window: expected an odd number of frames <= {min(ring.shape[0], 65535)}, got {window}")
        self.ring = ring
        self.window = window
        self.last = first_frame + window - 1  # last frame in the window
        npix = ring.shape[1] * ring.shape[2]
        # 16-bit frames: 32-bit bookkeeping is enough, and less to stream through per batch (7% faster)
        state = np.int32 if ring.dtype.itemsize <= 2 else np.int64
        self.base = np.empty(npix, state)
        # byte counts where at most one bin per pixel can overflow them (see _kernels): half the memory
        self.hist = np.empty((npix, nbins), np.uint8 if window < 512 else np.uint16)
        self.over = np.empty(npix, np.int16)  # each pixel's overflowing bin, or -1
        self.lt = np.empty(npix, state)
        self.med = np.empty(npix, state)
        self.rebuilds = np.zeros(ring.shape[1], np.int64)
        self._u16 = ring.dtype == np.uint16
        self.dormant: tuple[int, int, int, int] | None = None
        self._init(first_frame, (0, ring.shape[1], 0, ring.shape[2]))

    def _init(self, first_frame: int, box) -> None:
        _kernels.hist_init(self.ring, first_frame, self.window, self.base, self.hist, self.over, self.lt, self.med,
                           self._u16, np.asarray(box, np.int64))

    def wake(self) -> None:
        """Build the dormant box's histograms again from the window in the ring: slid from here on."""
        if self.dormant is not None:
            self._init(self.last - self.window + 1, self.dormant)
            self.dormant = None

    def slide(self, n_frames: int, emit=None, out: np.ndarray | None = None) -> np.ndarray:
        """Advance the window by ``n_frames`` (already in the ring); medians after each step where ``emit``."""
        frames = np.arange(self.last + 1, self.last + 1 + n_frames, dtype=np.int64)
        if n_frames + self.window > self.ring.shape[0]:
            raise ValueError(f"n_frames: the ring of {self.ring.shape[0]} frames cannot hold "
                             f"a window of {self.window} plus {n_frames} new frames")
        emit = np.ones(n_frames, bool) if emit is None else np.ascontiguousarray(emit, bool)
        if out is None:
            out = np.empty((n_frames, *self.ring.shape[1:]), np.int64)
        _kernels.hist_slide(self.ring, frames, self.window, emit, out, self.base, self.hist, self.over,
                            self.lt, self.med, self.rebuilds, self._u16,
                            np.asarray(self.dormant or (0, 0, 0, 0), np.int64))
        self.last += n_frames
        return out

    def median(self) -> np.ndarray:
        """The current window's median (undefined in the dormant box)."""
        return self.med.reshape(self.ring.shape[1:])


def window_median_box(ring: np.ndarray, slots: np.ndarray, box, out: np.ndarray) -> np.ndarray:
    """The exact median of integer frames ``ring[slots]`` over the pixels of ``box`` (y0, y1, x0, x1), into
    ``out`` (a frame of the ring's type) there; ``out`` is left as it is elsewhere."""
    _require("ring", ring, ndim=3)
    _require("out", out, ndim=2, dtype=ring.dtype)
    if ring.dtype.kind not in "ui" or out.shape != ring.shape[1:]:
        raise ValueError(f"ring, out: expected integer frames of shape {ring.shape[1:]}, got {ring.dtype} {out.shape}")
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if slots.size % 2 != 1:
        raise ValueError(f"slots: expected an odd number of frames, got {slots.size}")
    y0, y1, x0, x1 = (int(v) for v in box)
    box = np.array([max(y0, 0), min(y1, out.shape[0]), max(x0, 0), min(x1, out.shape[1])], np.int64)
    _kernels.window_median_box(ring, slots, box, ring.dtype == np.uint16, out)
    return out


def pixels_at_least(frame: np.ndarray, level, limit: int) -> tuple[int, np.ndarray]:
    """(how many pixels of ``frame`` are at or above ``level``, the flat indices of the first ``limit`` of them,
    int64, in order)."""
    _require("frame", frame, ndim=2)
    out = np.empty(max(int(limit), 0), np.int64)
    n = _kernels.pixels_at_least(frame, frame.dtype.type(level), out)
    return int(n), out[:min(n, out.size)]


def kernels_cached() -> bool:
    """Whether a median kernel has been compiled and cached before (its cache index exists): the running
    median's, or the whole window's of a scan shorter than the window (which never slides: said at every run
    of such scans before); not in the first run after installing or changing dctstream, which compiles every
    kernel (20-60 s, once). True where that cannot be told (no cache, another numba version): nothing is said."""
    for kernel in (_kernels.hist_slide, _kernels.window_median_normalised):
        cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
        index = getattr(cache_file, "_index_path", None)
        if not isinstance(index, str) or os.path.exists(index):
            return True
    return False
