"""A scan published by Bliss through blissdata (Redis): ``source.url: redis://host:port``, ``protocol: bliss``.

Everything goes through blissdata's own reader API (>= 2.x): a ``DataStore``
on the URL; the scan is ``source.scan`` when that is a scan key
(``esrf:scan:...``), else the next scan created after the source was opened
whose name matches ``source.scan`` (a shell pattern; null = any scan).  The
frames are the scan's 2-D image stream (``source.stream``, e.g.
``marana:image``; null = the only one), read with a blissdata ``Cursor``: a
plain image-array stream, its HDF5-backed variant (frames gone from Redis are
read from the scan file, ``hdf5_fallback``), or a Lima/Lima2 detector stream
(frames referenced in Redis and read from the detector server or, once saved,
from the file: blissdata's ``LimaClient`` decides).  The angles are a scalar
stream (``source.angles``: ``axis:diffrz`` or ``diffrz``; ``auto``: the only
``axis:`` stream, or the one the scan's title names).

The source ends when the frame stream is sealed and the scan closed:
``end_reason`` is ``scan_end`` (Bliss said SUCCESS), ``scan_aborted``
(USER_ABORT) or ``scan_failed`` (FAILURE), the latter two also logged as a
warning; or ``idle_timeout`` after ``source.idle_timeout_s`` without a frame
(also the longest wait for the next scan).  ``found`` says which scan and
streams were taken, for the run record.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time

import numpy as np

from ..errors import ConfigError, InputError
from ..types import Frame
from .base import FrameSource

log = logging.getLogger(__name__)

END_REASONS = {"SUCCESS": "scan_end", "USER_ABORT": "scan_aborted", "FAILURE": "scan_failed",
               "DELETION": "scan_deleted"}
# seconds a frame waits for its angle once the angle stream has fallen behind
ANGLE_WAIT_S = 5.0
# blissdata reads block at most this long, so that close() is noticed
_READ_S = 0.2


def _blissdata(where: str = "source.protocol: bliss"):
    try:
        from blissdata.exceptions import EndOfStream, NoScanAvailable
        from blissdata.redis_engine.scan import ScanState
        from blissdata.redis_engine.store import DataStore
    except ImportError as exc:
        raise ConfigError(f"{where} needs blissdata ({exc}), expected it installed: "
                          "pip install 'dctstream[bliss]'") from None
    return DataStore, ScanState, EndOfStream, NoScanAvailable


def _redis_errors() -> tuple[type[BaseException], ...]:
    """redis' connection errors (not Python's ConnectionError), as blissdata raises them."""
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
    except ImportError:
        return ()
    return RedisConnectionError, RedisTimeoutError


class BlissdataSource(FrameSource):
    """Frames of one blissdata scan, in order, as Bliss publishes them."""

    rereadable = True  # the scan stays in Redis (and its file) for a while: a resumed run reads it again

    def __init__(self, cfg):
        DataStore, self._ScanState, self._EndOfStream, self._NoScanAvailable = _blissdata()
        self.url = cfg.url
        self._cfg = cfg
        try:
            self._store = DataStore(cfg.url)
            # the next scan is one created from now on: a timetag taken before anything is awaited
            self._since = self._store.get_last_scan_timetag()
        except Exception as exc:  # redis' ConnectionError and friends, or a server without RedisJSON/RediSearch
            raise InputError(f"source.url: {cfg.url}: cannot reach the blissdata server "
                             f"({' '.join(str(exc).split())}), expected Redis with blissdata's modules") from None
        self.frame_shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.n_frames: int | None = cfg.expected_frames
        self.end_reason: str | None = None
        self.first_frame = 0  # a resumed run skips the frames before this one without reading their pixels
        self.counters = {"angles_missing": 0}
        self.found: dict[str, dict] = {}
        self._closed = False

    # -- finding the scan and its streams ------------------------------------

    def _scan(self):
        wanted = self._cfg.scan
        if wanted and ":scan:" in wanted:  # a key, esrf:scan:<id>; anything else is a name pattern
            try:
                scan = self._store.load_scan(wanted)
            except Exception as exc:
                raise InputError(f"source.scan: {wanted}: no such scan in {self.url} "
                                 f"({' '.join(str(exc).split())})") from None
            reason = "named by source.scan"
        else:
            scan, reason = self._next_scan(wanted)
        self.found["source.scan"] = {"url": scan.key, "reason": f"{reason}; name {scan.name!r}, number {scan.number}"}
        log.info("source.scan: %s (%s)", scan.key, self.found["source.scan"]["reason"])
        deadline = time.monotonic() + self._cfg.idle_timeout_s
        while scan.state < self._ScanState.PREPARED:  # its streams exist from PREPARED on
            if self._closed or time.monotonic() > deadline:
                raise InputError(f"source.scan: {scan.key}: not prepared within {self._cfg.idle_timeout_s:g} s "
                                 f"(state {scan.state.name}), expected its streams")
            scan.update(timeout=_READ_S)
        # Loaded again: Scan loading reads the scan's description before its state, so a scan loaded while
        # it was being prepared can say PREPARED and still list none of its streams.
        return self._store.load_scan(scan.key)

    def _next_scan(self, pattern):
        deadline = time.monotonic() + self._cfg.idle_timeout_s
        while not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._since, key = self._store.get_next_scan(since=self._since, timeout=min(max(left, 0.01), 1.0))
            except self._NoScanAvailable:
                continue
            scan = self._store.load_scan(key)
            if pattern is None or fnmatch.fnmatchcase(scan.name, pattern):
                return scan, ("the next scan" if pattern is None else f"the next scan whose name matches {pattern!r}")
            log.info("%s: scan %s (%s) does not match source.scan %r: skipped", self.url, key, scan.name, pattern)
        raise InputError(f"source.url: {self.url}: no new scan{'' if pattern is None else f' matching {pattern!r}'} "
                         f"within source.idle_timeout_s ({self._cfg.idle_timeout_s:g} s), expected Bliss to start one")

    def _frames_stream(self, scan):
        streams = scan.streams
        name = self._cfg.stream
        if name is not None:
            matches = [s for key, s in streams.items() if key == name or key.split(":")[0] == name]
            if len(matches) != 1:
                raise InputError(f"source.stream: {name}: no such stream in scan {scan.key}, expected one of "
                                 f"{', '.join(sorted(streams)) or 'none'}")
            return matches[0], "named by source.stream"
        images = [s for s in streams.values() if _is_image(s)]
        if len(images) != 1:
            raise InputError(f"source.stream: scan {scan.key} has {len(images)} 2-D image streams "
                             f"({', '.join(sorted(s.name for s in images)) or 'none'}) among its streams "
                             f"({', '.join(sorted(streams)) or 'none'}), expected one; name it")
        return images[0], "the scan's only image stream"

    def _angles_stream(self, scan):
        streams = scan.streams
        wanted = self._cfg.angles
        if wanted is None:
            return None, "source.angles is null"
        if wanted != "auto":
            for key in (wanted, f"axis:{wanted}"):
                if key in streams:
                    return streams[key], "named by source.angles"
            raise InputError(f"source.angles: {wanted}: no such stream in scan {scan.key}, expected one of "
                             f"{', '.join(sorted(streams))}")
        axes = {key: s for key, s in streams.items() if key.startswith("axis:") and _is_scalar(s)}
        title = str(scan.info.get("title", ""))
        words = set(re.split(r"[\s(),]+", title))
        named = [s for key, s in axes.items() if key.split(":", 1)[1] in words]
        if len(named) == 1:
            return named[0], f"the axis the scan's title names ({title!r})"
        if len(axes) == 1:
            return next(iter(axes.values())), "the scan's only axis stream"
        return None, (f"the scan has {len(axes)} axis streams ({', '.join(sorted(axes)) or 'none'}) and its title "
                      f"({title!r}) names {'none' if not named else 'several'}; name one with source.angles")

    # -- frames ----------------------------------------------------------------

    def __iter__(self):
        scan = self._scan()
        frames, why = self._frames_stream(scan)
        self.found["source.stream"] = {"url": frames.name, "reason": f"{why} ({frames.plugin or 'array'} stream)"}
        angles, why = self._angles_stream(scan)
        self.found["source.angles"] = {"url": None if angles is None else angles.name, "reason": why}
        for key in ("source.stream", "source.angles"):
            log.info("%s: %s (%s)", key, self.found[key]["url"], self.found[key]["reason"])
        npoints = scan.info.get("npoints")
        if self.n_frames is None and isinstance(npoints, int) and npoints > 0:
            self.n_frames = npoints
        try:
            self.frame_shape, self.dtype = tuple(frames.shape)[-2:], np.dtype(frames.dtype)
        except Exception as exc:  # a plugin that learns them from the first frame: they come with it
            log.debug("%s: frame shape and type not known before the first frame (%s)", frames.name, exc)
        psi = _Angles(angles, self._EndOfStream)
        cursor = frames.cursor()
        k = 0
        last_frame_s = time.monotonic()
        while not self._closed:
            try:
                view = cursor.read(timeout=_READ_S)
            except self._EndOfStream:
                break
            except (ConnectionError, OSError, *_redis_errors()) as exc:  # the server went away under the scan
                raise InputError(f"source.url: {self.url}: the blissdata server stopped answering during scan "
                                 f"{scan.key}, after {k} frames ({' '.join(str(exc).split())}), expected it up "
                                 "until the scan ends (restarted? the same command resumes the scan if the server "
                                 "still has it)") from None
            if view is None:
                if time.monotonic() - last_frame_s > self._cfg.idle_timeout_s:
                    log.warning("%s: no frame for %g s after frame %d: the scan is taken as over",
                                scan.key, self._cfg.idle_timeout_s, k - 1)
                    self.end_reason = "idle_timeout"
                    return
                continue
            last_frame_s = time.monotonic()
            if view.index != k:
                raise InputError(f"source.stream: {frames.name}: frame {k}: the stream went on at frame {view.index}, "
                                 "expected every frame in order")
            skip = max(0, min(len(view), self.first_frame - k))  # resuming: frames already processed
            data = view.get_data(skip, None) if skip < len(view) else []
            k += skip
            for image in data:
                image = np.asarray(image)
                if image.ndim != 2:
                    raise InputError(f"source.stream: {frames.name}: frame {k}: expected a 2-D image, "
                                     f"got shape {image.shape}")
                if self.frame_shape is None or self.dtype is None:
                    self.frame_shape, self.dtype = image.shape, image.dtype
                angle = psi.get(k)
                if angles is not None and angle is None:
                    self.counters["angles_missing"] += 1
                yield Frame(k, angle, image)
                k += 1
                if self._closed:
                    return
        if self._closed:
            return
        self._finish(scan, k)

    def _finish(self, scan, frames: int) -> None:
        deadline = time.monotonic() + self._cfg.idle_timeout_s
        while scan.state < self._ScanState.CLOSED and time.monotonic() < deadline and not self._closed:
            scan.update(timeout=_READ_S)
        if scan.state >= self._ScanState.CLOSED:
            # loaded again for the same reason as in _scan: a scan loaded as it closed can say CLOSED and
            # still show the description from before (without its end_reason)
            scan = self._store.load_scan(scan.key)
        reason = scan.info.get("end_reason")
        self.end_reason = END_REASONS.get(reason, "scan_end" if reason is None else f"scan_{str(reason).lower()}")
        if self.end_reason != "scan_end":
            log.warning("%s: the scan ended with %s after %d frames: the frames received are processed",
                        scan.key, reason, frames)

    def stop(self) -> None:
        """End the frames at the next read (they wait at most a fraction of a second), from any thread."""
        self._closed = True

    def close(self) -> None:
        self.stop()


class _Angles:
    """The angle of each frame from a scalar stream, read as far as needed."""

    def __init__(self, stream, end_of_stream):
        self._cursor = None if stream is None else stream.cursor()
        self._end_of_stream = end_of_stream
        self._values: list[float] = []
        self._ended = stream is None

    def get(self, k: int) -> float | None:
        deadline = None
        while k >= len(self._values) and not self._ended:
            deadline = deadline or time.monotonic() + ANGLE_WAIT_S
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                view = self._cursor.read(timeout=min(left, _READ_S))
            except self._end_of_stream:
                self._ended = True
                break
            if view is not None:
                self._values.extend(float(v) for v in np.ravel(view.get_data()))
        return self._values[k] if k < len(self._values) else None


def _is_image(stream) -> bool:
    try:
        return stream.kind == "array" and len(stream.shape) == 2
    except Exception:  # a stream whose plugin is missing
        return False


def _is_scalar(stream) -> bool:
    try:
        return stream.kind == "array" and tuple(stream.shape) == ()
    except Exception:
        return False
