"""What every source of frames must say: the contract the pipeline, the spool and the status read.

A source is an iterator of `Frame` (index from 0, in order; ``data`` None for a frame lost in transit when
``source.missing: repeat-background``) with ``close()``.  Beside its frames it says:

* ``rereadable`` (class attribute, no default): whether a resumed run can read its frames again (a file,
  a folder, a scan kept in Redis) or must keep them in its spool as they arrive (a detector stream);
* ``frame_shape`` and ``dtype`` once known (before the first frame for a file, with it for a stream): the
  dtype of the frames it delivers (float counts come as int32: `counts_dtype`);
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
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..types import Frame

# Why a source's frames ended (``end_reason``) that means it delivered the whole scan; any other reason
# (idle_timeout, vanished, stopped, scan_aborted, ...) makes the run incomplete.
COMPLETE_ENDS = frozenset({"complete", "end_time", "expected_frames", "series_end", "scan_end"})

# Float frames that hold whole numbers -- photon counts that a simulator or a converter stored as floats --
# are counts, delivered as int32; any other float frame (flat-fielded, normalised) is refused at its first
# fractional pixel: the running median and the photon noise need the detector's counts.
FLOAT_COUNTS = np.dtype(np.int32)


def counts_dtype(dtype, where: str) -> np.dtype:
    """The dtype a source delivers frames stored as ``dtype`` in: integers as they are, floats as int32;
    anything else is refused, ``where`` (e.g. ``source.url: F::/data``) naming the frames."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return dtype
    if dtype.kind == "f":
        return FLOAT_COUNTS
    raise InputError(f"{where}: expected integer detector counts (or floats holding whole numbers), "
                     f"got dtype {dtype}")


def as_counts(data: np.ndarray, where: str) -> np.ndarray:
    """A frame (or a stack) as `counts_dtype` says: float values that are whole numbers as int32, refused
    (naming ``where`` and the first pixel that is not one) otherwise."""
    if data.dtype.kind != "f":
        return data
    limit = np.iinfo(FLOAT_COUNTS).max
    whole = np.isfinite(data) & (np.rint(data) == data) & (np.abs(data) <= limit)
    if not whole.all():
        at = tuple(int(i) for i in np.argwhere(~whole)[0])
        pixel = f"{'frame %d, ' % at[0] if data.ndim == 3 else ''}pixel (y, x) = ({at[-2]}, {at[-1]})"
        raise InputError(f"{where}: expected detector counts, whole numbers, got {data[at]} at {pixel} of "
                         f"{data.dtype} frames (frames already flat-fielded or normalised are not counts: give "
                         "the raw frames, with the dark and detector.flat)")
    return data.astype(FLOAT_COUNTS)

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
