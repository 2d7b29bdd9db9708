"""``OUT/corrected.h5``: the corrected frames, written one by one as the scan runs.

``export.format: stack`` writes dataset ``/corrected`` (frames, y, x), one
frame per chunk, bitshuffle + LZ4 (hdf5plugin; readers need ``import
hdf5plugin``).  ``sparse`` writes group ``/sparse`` in the manner of
ImageD11's sparse frames: the pixels at or above the threshold map
``/sparse/threshold`` (y, x), outside the segmenter's mask, as 1-D datasets
``row``, ``col`` (uint16) and ``intensity``, concatenated over frames in
(frame, row, col) order, and ``nnz`` (frames,): the count of each frame (frame
k's pixels start at ``sum(nnz[:k])``), not compressed.

With ``export.dtype`` uint8 or uint16 the values are stretched:
``q = clip(round((v - lo) / (hi - lo) * qmax), 0, qmax)`` with lo, hi the
``export.percentiles`` of the first exported frame's unmasked pixels; ``lo``
and ``hi`` are attributes, so ``v ~ lo + q * (hi - lo) / qmax``.

The file is in SWMR mode while written, so it can be read during the scan; the
datasets' first axis (or ``nnz``) says how many frames are in.  Coordinates
are in the frames' (binned) pixels, attribute ``binning``.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from ..atomic import output_error


class CorrectedFrameWriter:
    """Appends each corrected frame to ``path``; ``reduction`` = raw bytes read / bytes written, after ``close``."""

    def __init__(self, path: str | os.PathLike, cfg, frame_shape, mask: np.ndarray, grow_low: np.ndarray,
                 raw_frame_bytes: float, *, binning: int = 1):
        self.path = Path(path)
        self.cfg = cfg
        self.frame_shape = tuple(frame_shape)
        self.keep = ~np.asarray(mask, bool)
        self.threshold = np.broadcast_to(np.float32(grow_low if cfg.threshold == "auto" else cfg.threshold),
                                         self.frame_shape).astype(np.float32)
        self.raw_frame_bytes = raw_frame_bytes
        self.dtype = np.dtype(cfg.dtype)
        self.stretch: tuple[float, float] | None = None
        self.frames = 0
        self.reduction: float | None = None
        ny, nx = self.frame_shape
        try:
            self.h5 = h5py.File(self.path, "w", libver="latest")
            self.h5.attrs.update({"binning": binning, "format": cfg.format, "dtype": cfg.dtype})
            if cfg.format == "stack":
                self.data = self.h5.create_dataset("corrected", shape=(0, ny, nx), maxshape=(None, ny, nx),
                                                   dtype=self.dtype, chunks=(1, ny, nx),
                                                   **hdf5plugin.Bitshuffle(cname="lz4"))
            else:
                group = self.h5.create_group("sparse")
                group["threshold"] = self.threshold
                # Not compressed: a chunk filled over several frames is then rewritten in place,
                # where a compressed one would take new space in the file at every frame.
                self.sparse = {name: group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                          chunks=(chunk,))
                               for name, dtype, chunk in (("row", np.uint16, 4096), ("col", np.uint16, 4096),
                                                          ("intensity", self.dtype, 4096), ("nnz", np.int64, 512))}
            self.h5.swmr_mode = True
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def write(self, k: int, frame: np.ndarray) -> None:
        if k != self.frames:
            raise ValueError(f"frame {k}: expected frame {self.frames}")
        if self.dtype != np.float32 and self.stretch is None:
            lo, hi = np.percentile(frame[self.keep], self.cfg.percentiles)
            self.stretch = (float(lo), float(max(hi, lo + 1e-6)))
            self.h5.attrs.update({"stretch_lo": self.stretch[0], "stretch_hi": self.stretch[1],
                                  "stretch": "value ~ stretch_lo + q * (stretch_hi - stretch_lo) / qmax"})
        if self.cfg.format == "stack":
            self.data.resize(k + 1, axis=0)
            self.data[k] = self._values(frame)
        else:
            rows, cols = np.nonzero((frame >= self.threshold) & self.keep)
            start = self.sparse["row"].shape[0]
            for name, values in (("row", rows), ("col", cols), ("intensity", self._values(frame[rows, cols]))):
                self.sparse[name].resize(start + rows.size, axis=0)
                self.sparse[name][start:] = values
            self.sparse["nnz"].resize(k + 1, axis=0)
            self.sparse["nnz"][k] = rows.size
        self.frames += 1
        self.h5.flush()

    def _values(self, values: np.ndarray) -> np.ndarray:
        if self.stretch is None:
            return values.astype(np.float32, copy=False)
        lo, hi = self.stretch
        qmax = np.iinfo(self.dtype).max
        return np.clip(np.rint((values - lo) / (hi - lo) * qmax), 0, qmax).astype(self.dtype)

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()
            written = self.path.stat().st_size
            self.reduction = float(self.frames * self.raw_frame_bytes / written)


def read_corrected(path: str | os.PathLike) -> list[np.ndarray] | list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The frames of a ``corrected.h5``: (y, x) arrays for a stack, (row, col, intensity) per frame for sparse."""
    with h5py.File(path, "r") as h5:
        if "corrected" in h5:
            return list(h5["corrected"][()])
        sparse = h5["sparse"]
        ends = np.cumsum(sparse["nnz"][()])
        rows, cols, values = (sparse[name][()] for name in ("row", "col", "intensity"))
        return [(rows[a:b], cols[a:b], values[a:b]) for a, b in zip(np.r_[0, ends[:-1]], ends)]
