"""What every source of frames must say: the contract the pipeline, the spool and the status read.

A source is an iterator of `Frame` (index from 0, in order; ``data`` None for a frame lost in transit when
``source.missing: repeat-background``) with ``close()``.  Beside its frames it says:

* ``rereadable`` (class attribute, no default): whether a resumed run can read its frames again (a file,
  a folder, a scan kept in Redis) or must keep them in its spool as they arrive (a detector stream);
* ``frame_shape`` and ``dtype`` once known (before the first frame for a file, with it for a stream): the
  dtype of the frames it delivers (float counts come as int32: `counts_dtype`, `FloatCounts`);
* ``n_frames``: the frames known to be in the scan, or None while that is unknown;
* ``end_reason`` once its frames have ended (a word: `COMPLETE_ENDS` or why not), None before;
* ``counters``: name -> count of what it met on the way (frames dropped, reopens, waits, ...), for the
  status and the run record.

Optional, with the defaults here: ``frames_announced`` (what the scan said it would have), ``waiting_for``
(what it waits for now, for the status), ``frames_listed`` (frames seen but not yet read), ``found`` (what
it found for ``auto`` settings, for the record), ``stop()`` (from another thread: end the frames within a
fraction of a second, a wait for the next one included, leaving what it holds open until ``close()``; a
source whose waits are short needs none).

Optional, without a default: ``read_frame(k)``, any frame of a recorded scan whose angles are all known
(``angles``), and ``read_again(k)``, a frame of a live scan once delivered (a growing file, a folder).  A
scan out of psi order is read in psi order with them (`dctstream.order`); a source without either (a
stream, frames in memory) has its passes segmented as they come.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..types import Frame
from ._kernels import float_counts

log = logging.getLogger(__name__)

# Why a source's frames ended (``end_reason``) that means it delivered the whole scan; any other reason
# (idle_timeout, vanished, stopped, scan_aborted, ...) makes the run incomplete.
COMPLETE_ENDS = frozenset({"complete", "end_time", "expected_frames", "series_end", "scan_end"})
# ... and those after which no more frames can come: a run so ended is over, not to be resumed (the same command
# would take the next scan that matches)
FINAL_ENDS = frozenset({"scan_aborted"})

# Float frames that hold whole numbers -- photon counts that a simulator or a converter stored as floats --
# are counts, delivered as int32. Float frames with fractions whose noise is at least ROUND_MIN_NOISE counts
# (a simulator's Poisson counts plus Gaussian read noise, a dark subtracted in floats) are rounded to whole
# counts: the rounding adds 1/sqrt(12) = 0.29 counts of noise, under 4 % of such a noise's variance. Any
# other float frame (flat-fielded, normalised: values about 1) would lose its noise to a rounding and is
# refused at its first fractional pixel: the running median and the photon noise need the detector's counts.
FLOAT_COUNTS = np.dtype(np.int32)
ROUND_MIN_NOISE = 1.5
# ... or whose values reach ROUND_MIN_LEVEL counts (the 99th percentile of a frame): a simulation without noise
# loses under 0.3 % to the rounding there.
ROUND_MIN_LEVEL = 100.0
# Whole numbers up to a float computation's error (99.9999 for 100): counts, whatever their noise (a
# photon-counting frame of 0s and 1s has none to tell).
WHOLE_TOLERANCE = 1e-3
# A float pixel without a number (NaN, infinite: a converter's mark of a module gap or a dead pixel) is read as
# this, which the sources of float frames give as their ``invalid_value``: masked where the first frame holds
# it (`Detector.check_first_frame`); elsewhere a lone spike, which the 3 x 3 median keeps from seeding.
NO_DATA = int(np.iinfo(FLOAT_COUNTS).max)


def counts_dtype(dtype, where: str) -> np.dtype:
    """The dtype a source delivers frames stored as ``dtype`` in: integers as they are, floats as int32;
    anything else is refused, ``where`` (e.g. ``source.url: F::/data``) naming the frames."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return dtype.newbyteorder("=")
    if dtype.kind == "f":
        return FLOAT_COUNTS
    raise InputError(f"{where}: expected integer detector counts (or floats holding whole numbers), "
                     f"got dtype {dtype}")


def frame_noise_counts(frame: np.ndarray) -> float:
    """The pixel noise of a frame, robustly: 1.4826 x the median absolute second difference along x, over
    sqrt(6) (a smooth background has none; the few spots do not move the median); 0 where it cannot tell."""
    frame = np.asarray(frame, np.float64)
    if frame.ndim != 2 or frame.shape[1] < 3:
        return 0.0
    rows = frame[::max(1, frame.shape[0] // 256)]  # a few hundred rows are plenty
    second = rows[:, 2:] - 2 * rows[:, 1:-1] + rows[:, :-2]
    second = np.abs(second[np.isfinite(second)])
    return float(1.4826 * np.median(second) / np.sqrt(6)) if second.size else 0.0


class FloatCounts:
    """A source's float frames as counts (see ROUND_MIN_NOISE): whole numbers as int32; fractions rounded if
    the first frame met with any has a noise of at least ROUND_MIN_NOISE counts or values of ROUND_MIN_LEVEL
    (said once, and from then on for every frame of the source), refused otherwise, naming the frame and the
    pixel; NaN and infinities as NO_DATA (said once)."""

    def __init__(self):
        self.rounding: bool | None = None  # decided at the first frame with fractions
        self.noise: float | None = None
        self.level: float | None = None
        self.rounded_frames = 0
        self.no_data_said = False

    def __call__(self, data: np.ndarray, where: str) -> np.ndarray:
        """Float ``data`` (a frame or a stack) as int32 counts."""
        top = np.iinfo(FLOAT_COUNTS).max - 1
        flat = np.ascontiguousarray(data).reshape(-1)
        counts = np.empty(flat.shape, FLOAT_COUNTS)
        fractional, nonfinite, beyond = float_counts(flat, WHOLE_TOLERANCE, top, NO_DATA, counts)
        counts = counts.reshape(data.shape)
        if not (fractional or nonfinite or beyond):
            return counts  # whole numbers, every pixel a number: the common case, in one pass
        if beyond:
            self._refuse(data, np.abs(data) > top, where, "")  # False where not a number
        if fractional:
            if self.rounding is None:
                first = data[0] if data.ndim == 3 else data
                self.noise = frame_noise_counts(first)
                lit = np.abs(first[np.isfinite(first)])
                self.level = float(np.percentile(lit, 99)) if lit.size else 0.0
                self.rounding = self.noise >= ROUND_MIN_NOISE or self.level >= ROUND_MIN_LEVEL
                if self.rounding:
                    log.warning("%s: float frames with fractions, of a noise of %.3g counts and values up to "
                                "%.3g (99th percentile): rounded to whole counts (that adds 0.29 counts of "
                                "noise)", where, self.noise, self.level)
            if not self.rounding:
                self._refuse(data, np.abs(np.rint(data) - data) > WHOLE_TOLERANCE, where,
                             f", their noise {self.noise:.3g} counts and values under {ROUND_MIN_LEVEL:g}, where "
                             f"fractions are rounded from a noise of {ROUND_MIN_NOISE:g}")
            self.rounded_frames += data.shape[0] if data.ndim == 3 else 1
        if nonfinite and not self.no_data_said:
            log.warning("%s: %d pixels hold no number (NaN or infinite): read as %d, the mark of a pixel without "
                        "data (masked where the first frame has it)", where, nonfinite, NO_DATA)
            self.no_data_said = True
        return counts

    @staticmethod
    def _refuse(data: np.ndarray, bad: np.ndarray, where: str, why: str):
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        pixel = f"{'frame %d, ' % at[0] if data.ndim == 3 else ''}pixel (y, x) = ({at[-2]}, {at[-1]})"
        raise InputError(f"{where}: expected detector counts, whole numbers, got {data[at]} at {pixel} of "
                         f"{data.dtype} frames{why} (frames already flat-fielded or normalised are not counts: "
                         "give the raw frames, with the dark and detector.flat)")


_NONE: Mapping = MappingProxyType({})


class FrameSource(abc.ABC):
    """The base of every source (see the module's description)."""

    rereadable: ClassVar[bool]
    url: str = ""
    frame_shape: tuple[int, int] | None = None
    dtype: np.dtype | None = None
    n_frames: int | None = None
    end_reason: str | None = None
    counters: Mapping[str, int] = _NONE
    frames_announced: int | None = None
    waiting_for: str | None = None
    frames_listed: int | None = None
    found: Mapping[str, dict] = _NONE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__iter__" in cls.__dict__ and not isinstance(getattr(cls, "rereadable", None), bool):
            raise TypeError(f"{cls.__name__}.rereadable: expected True or False (can a resumed run read its "
                            f"frames again?), got {getattr(cls, 'rereadable', None)!r}")

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Frame]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def _counts(self, data: np.ndarray, where: str) -> np.ndarray:
        """A frame as counts: float frames by the source's `FloatCounts` (and NO_DATA its ``invalid_value``);
        the frames it rounded are counted (``frames_rounded``)."""
        if not data.dtype.isnative:  # a big-endian file's: the kernels take the machine's own byte order
            data = data.astype(data.dtype.newbyteorder("="))
        if data.dtype.kind != "f":
            # a view of an array held elsewhere (a transposed or strided stack): the kernels take C order
            return np.ascontiguousarray(data)
        if data.dtype.itemsize < 4:  # float16: as float32, which holds each of its values exactly
            data = data.astype(np.float32)
        self.invalid_value = NO_DATA  # what a pixel without a number is read as, masked where frame 0 has it
        counts = self.__dict__.setdefault("_float_counts", FloatCounts())
        data = counts(data, where)
        if counts.rounded_frames:
            self.counters = {**self.counters, "frames_rounded": counts.rounded_frames}
        return data

    def stop(self) -> None:
        """From another thread: end the frames soon, a wait for the next one included (see the module)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_source(source) -> FrameSource:
    """``source`` if it is a `FrameSource` (a source object handed to the pipeline: `segment`, bench, tests)."""
    if not isinstance(source, FrameSource):
        raise InputError(f"source: {type(source).__name__} is not a dctstream.sources.FrameSource, expected one "
                         "(it says whether it can be read again, its frames' shape, why it ended, its counters)")
    return source
