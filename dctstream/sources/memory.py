"""Frames already in memory: any iterable of 2-D arrays (a stack, another reader, a GUI), for `dctstream.segment`."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import numpy as np

from ..errors import InputError
from ..types import Frame
from .base import FrameSource, counts_dtype
from .hdf5 import check_angles


class MemorySource(FrameSource):
    """The frames of ``frames`` in order, each with its angle from ``angles`` (degrees) when given.

    ``frames`` is read once, lazily, on the pipeline's reader thread; every
    frame must be a 2-D array of detector counts with the shape and dtype of
    the first (float frames as the file sources take them: `base.FloatCounts`).
    ``stop()`` ends the frames early (the pipeline then finishes what it
    holds).  ``name`` starts error messages.
    """

    # Nothing to spool for a resume: `segment` writes to a folder of its own that never outlives it.
    rereadable = True

    def __init__(self, frames: Iterable[Any], angles: Any = None, *, name: str = "frames"):
        if isinstance(frames, (str, bytes)) or not isinstance(frames, Iterable):
            raise InputError(f"{name}: expected an iterable of 2-D arrays (frames), got {type(frames).__name__}")
        self.name = name
        self._frames = frames
        self._stop = threading.Event()
        self.end_reason: str | None = None
        self.n_frames: int | None = len(frames) if isinstance(frames, Sized) else None
        self.frame_shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self._stored: np.dtype | None = None  # the frames' own dtype (float frames come as int32 counts)
        if isinstance(frames, np.ndarray):
            if frames.ndim != 3 or frames.dtype.kind not in "uif" or min(frames.shape[1:], default=0) < 1:
                raise InputError(f"{name}: expected a 3-D stack (frames, y, x) of detector counts, "
                                 f"got shape {frames.shape}, dtype {frames.dtype}")
            self.frame_shape, self._stored = tuple(frames.shape[1:]), frames.dtype
            self.dtype = counts_dtype(frames.dtype, name)
            if frames.shape[0] and frames.dtype.kind == "f":  # frames that are not counts: said at the call
                self._counts(frames[0], f"{name}: frame 0")
        self.angles: np.ndarray | None = None
        if angles is not None:
            psi = np.asarray(angles)
            if psi.ndim != 1 or psi.dtype.kind not in "uif" or (self.n_frames is not None and psi.size < self.n_frames):
                count = "" if self.n_frames is None else f"at least {self.n_frames} "
                raise InputError(f"angles: expected a 1-D array of {count}angles in degrees (one per frame), "
                                 f"got shape {psi.shape}, dtype {psi.dtype}")
            self.angles = check_angles(psi, "segment(angles)")

    def _check(self, k: int, data: Any) -> np.ndarray:
        data = np.asarray(data)
        if data.ndim != 2 or data.dtype.kind not in "uif" or min(data.shape) < 1:
            raise InputError(f"{self.name}: frame {k}: expected a 2-D array of detector counts, "
                             f"got shape {data.shape}, dtype {data.dtype}")
        if self._stored is None:
            self._stored = data.dtype
        if self.frame_shape is not None and (data.shape != self.frame_shape or data.dtype != self._stored):
            raise InputError(f"{self.name}: frame {k}: expected {self.frame_shape} of {self._stored} like the "
                             f"first frame, got {data.shape} of {data.dtype}")
        return self._counts(data, f"{self.name}: frame {k}")

    def __iter__(self) -> Iterator[Frame]:
        k = -1
        for k, data in enumerate(self._frames):
            if self._stop.is_set():
                self.end_reason = "stopped"
                return
            data = self._check(k, data)
            if self.frame_shape is None:
                self.frame_shape, self.dtype = data.shape, data.dtype
            psi = None
            if self.angles is not None:
                if k >= self.angles.size:
                    raise InputError(f"angles: frame {k}: no angle, expected one angle per frame, "
                                     f"got {self.angles.size} angles")
                psi = float(self.angles[k])
            yield Frame(k, psi, data)
        if k < 0:
            raise InputError(f"{self.name}: expected at least 1 frame, got none")
        self.end_reason = "complete"

    def stop(self) -> None:
        """End the frames before the next one (from any thread)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
