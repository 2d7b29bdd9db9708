"""Frames placed by their angle, not by their arrival (``source.order``).

A DCT scan need not arrive in psi order: interlaced turns (a second turn at the
angles between those of the first), back-and-forth rotation (every other pass
reversed) or a recorded file written in any order.  The segmenter joins frames
that are neighbours in psi, so frames reach the background stage and the
segmenter in psi order:

* a recorded scan whose angles are all known is read in psi order
  (`PsiOrderedSource`): its spot table is that of the psi-sorted file;
* a live scan of passes (turns, declared by ``source.interlaced_turns``) from a
  source that can read a frame again (``read_again``: a growing file, a folder)
  is handed on in psi order too (`PsiOrderFollow`): a frame goes on once the
  last pass has passed its psi, read again from the source then; only the
  angles are kept meanwhile, and the spot table is that of the psi-sorted file;
* a scan of passes from a source that cannot read a frame again (a stream,
  frames in memory) gets a background per pass and is segmented across the
  passes by `PassMerge`, which holds the earlier passes' corrected frames as
  sparse pixels (at or above the lower growth threshold, the only ones a spot
  can hold) until the last pass has covered their psi.

Frame numbers: the segmenter's frame ``k`` (``start_frame``, ``max_frame``,
``centroid_frame`` in spots.h5, the difspot files) counts along psi; the
acquisition index of a spot's ``max_frame`` is the column ``max_frame_acquired``.
"""

from __future__ import annotations

import bisect
import heapq
import logging
from collections.abc import Iterator

import numpy as np

from .errors import ConfigError, InputError
from .sources.base import COMPLETE_ENDS, FrameSource
from .types import Frame

log = logging.getLogger(__name__)

# A pass of an interlaced or back-and-forth scan covers most of the scan's psi range; shorter runs are
# a disorder, not a pass.
PASS_MIN_SPAN = 0.5
PASS_MIN_FRAMES = 3
# Frames named in a warning about frames out of psi order.
DISORDER_LISTED = 10


def pass_starts(psi) -> list[int]:
    """Where each pass begins (arrival indices): a pass runs one way; a step against it starts the next."""
    tracker = PassTracker()
    for a in psi:
        tracker.add(float(a))
    return tracker.starts


def backward_steps(psi) -> np.ndarray:
    """Arrival indices of the frames that go against the scan's first direction."""
    steps = np.sign(np.diff(np.asarray(psi, np.float64)))
    nonzero = steps[steps != 0]
    if not nonzero.size:
        return np.zeros(0, np.int64)
    return np.flatnonzero(steps == -nonzero[0]) + 1


def classify(psi) -> tuple[str, list[int]]:
    """``("monotonic" | "passes" | "unordered", pass starts)`` for a scan's angles in arrival order."""
    psi = np.asarray(psi, np.float64)
    starts = pass_starts(psi)
    if len(starts) == 1:
        return "monotonic", starts
    span = float(np.ptp(psi))
    bounds = list(zip(starts, starts[1:] + [psi.size]))
    if all(b - a >= PASS_MIN_FRAMES and np.ptp(psi[a:b]) >= PASS_MIN_SPAN * span for a, b in bounds):
        return "passes", starts
    return "unordered", starts


def frames_text(frames, limit: int = DISORDER_LISTED) -> str:
    frames = [int(f) for f in frames]
    shown = ", ".join(map(str, frames[:limit]))
    return f"{'frame' if len(frames) == 1 else 'frames'} {shown}" + (
        f" and {len(frames) - limit} more" if len(frames) > limit else "")


def _jitter_hint(angles: np.ndarray, back: np.ndarray) -> str:
    """What to say when every frame that goes back does so by less than a step: angles read with noise
    (an encoder's) from frames that came in rotation order, which sorting them would shuffle (a new user's
    scan with a jitter of 0.3 of a step: 33 spots for 30, split rocking curves)."""
    steps = np.abs(np.diff(angles))
    step = float(np.median(steps)) if steps.size else 0.0
    largest = float(np.max(angles[back - 1] - angles[back]))
    if not step > 0 or largest >= step:
        return ""
    return (f"; each goes back by less than a step ({largest:.3g} degrees at most, a step being {step:.3g}): "
            "angles read with noise? If the frames came in rotation order, source.order: arrival keeps it "
            "(sorted by noisy angles, a spot's rocking curve can be cut)")


def arrange(source, cfg, report=None) -> tuple[object, int | None, dict | None]:
    """``(source, passes, facts)``: the source to read (in psi order when it must be), the number of passes
    to segment across (None: no passes) and how the frames are placed, for the run record; ``cfg`` is the
    ``source`` section; ``report(facts)`` is given the latency of a live scan handed on in psi order
    (`PsiOrderFollow`) whenever a frame arrives."""
    angles = getattr(source, "angles", None)
    known = isinstance(angles, np.ndarray)  # every angle known ahead: a recorded file, or frames given with angles
    recorded = known and hasattr(source, "read_frame")
    declared = None if cfg.interlaced_turns is None else cfg.interlaced_turns + 1
    if cfg.order == "arrival":
        return source, None, {"mode": "arrival"}
    if cfg.order == "psi" and not recorded:
        raise ConfigError("source.order: psi reads a recorded file in psi order, expected auto or arrival "
                          "for a live source (declare source.interlaced_turns for turns)")
    if not known:
        if not declared or declared < 2:
            return source, None, None
        if hasattr(source, "read_again"):
            log.info("source.interlaced_turns: %d passes, read again from %s in psi order once the last pass has "
                     "passed their angle", declared, source.url)
            return PsiOrderFollow(source, declared, report), None, {"mode": "psi", "passes": declared}
        return source, declared, {"mode": "passes", "passes": declared}
    kind, starts = classify(angles)
    where = f"source.angles: {cfg.angles}"
    if kind == "monotonic":
        if declared and declared > 1:
            log.warning("%s: source.interlaced_turns is %d but the angles go one way only: one turn", where,
                        cfg.interlaced_turns)
        return source, None, None
    back = backward_steps(angles)
    first = int(back[0])
    how = f"frame {first} goes back from {angles[first - 1]:g} to {angles[first]:g} degrees"
    if kind == "unordered" and not recorded:
        return source, None, None  # cannot be read again in psi order: each frame that goes back is said
    if kind == "unordered" and back.size == 1 and angles[first - 1] - angles[first] > 180 and angles[-1] < angles[0]:
        # one turn whose angles wrap past 360 (recorded modulo 360): frames in psi order, neighbours the same
        log.info("%s: the angles wrap back past 360 degrees at frame %d (%g to %g degrees): one turn, read in psi "
                 "order; the frames of the results count along psi, max_frame_acquired in spots.h5 is the "
                 "acquisition index", where, first, angles[first - 1], angles[first])
        return PsiOrderedSource(source), None, {"mode": "psi", "frames_back": [first], "frames_back_total": 1}
    if kind == "unordered":
        log.warning("%s: the frames are not in psi order (%s; %d frames go back in all: %s): read in psi order; "
                    "the frames of the results count along psi, max_frame_acquired in spots.h5 is the acquisition "
                    "index%s", where, how, back.size, frames_text(back), _jitter_hint(angles, back))
        return PsiOrderedSource(source), None, {"mode": "psi", "frames_back": [int(f) for f in back[:DISORDER_LISTED]],
                                                "frames_back_total": int(back.size)}
    if declared and declared != len(starts):
        log.warning("%s: source.interlaced_turns is %d but the angles hold %d passes: %d passes", where,
                    cfg.interlaced_turns, len(starts), len(starts))
    if recorded:
        log.info("%s: %d passes (interlaced turns or back-and-forth) starting at frames %s: read in psi order",
                 where, len(starts), starts)
        return PsiOrderedSource(source), None, {"mode": "psi", "passes": len(starts), "pass_starts": starts}
    log.info("%s: %d passes (interlaced turns or back-and-forth) starting at frames %s, not to be read again: a "
             "background per pass, segmented across them in psi order", where, len(starts), starts)
    return source, len(starts), {"mode": "passes", "passes": len(starts), "pass_starts": starts}


class PsiOrderedSource(FrameSource):
    """A recorded source read in psi order: frame ``j`` is the j-th by angle (a stable sort)."""

    rereadable = True

    def __init__(self, source: FrameSource):
        self.source = source
        self.url = source.url
        self.frame_shape, self.dtype, self.n_frames = source.frame_shape, source.dtype, source.n_frames
        self.order = np.argsort(source.angles, kind="stable")  # psi-order index -> acquisition index
        self.angles = source.angles[self.order]
        self.first_frame = 0  # where iterating starts (checkpoint.frames_from sets it to resume)
        missing = getattr(source, "missing", None)  # frames never written (Hdf5FileSource)
        self._missing = set(missing.tolist()) if isinstance(missing, np.ndarray) else set()

    @property
    def end_reason(self) -> str | None:
        return self.source.end_reason

    @property
    def counters(self):
        return self.source.counters

    def __iter__(self) -> Iterator[Frame]:
        for j in range(self.first_frame, len(self.order)):
            k = int(self.order[j])
            yield Frame(j, float(self.angles[j]), None if k in self._missing else self.source.read_frame(k))
        self.source.end_reason = "complete"

    def read_frame(self, j: int) -> np.ndarray:
        return self.source.read_frame(int(self.order[j]))

    def acquired(self, j: int) -> int:
        return int(self.order[j])

    def stop(self) -> None:
        self.source.stop()

    def close(self) -> None:
        self.source.close()


class PsiOrderFollow(FrameSource):
    """A live scan of ``passes`` passes (``source.interlaced_turns``) handed on in psi order, frame ``j`` the
    j-th by angle as `PsiOrderedSource` reads the recorded scan (ties in acquisition order).

    ``source`` must read a frame again once it has delivered it (``read_again``: a growing file, a folder).
    A frame is due once no frame still to come can come before it: the last pass has begun and, going up
    in psi, passed its angle (a last pass going down passes none: everything waits for the scan's end).
    Until then only its angle is kept; it is read again from the source when its turn comes (an arriving
    frame due at once goes on as it came).  A frame that arrives after its place in psi has gone (a pass
    more than declared) goes on where it came, and is said.
    """

    rereadable = True  # read again from its start on resume, the frames before the checkpoint's dropped

    def __init__(self, source: FrameSource, passes: int, report=None):
        self.source = source
        self.url = source.url
        self.passes = passes
        self.tracker = PassTracker()
        self._report = report
        self._waiting: list[tuple[float, int]] = []  # (psi, acquisition index) arrived, not yet handed on
        self._order: list[int] = []  # psi-order index -> acquisition index
        self._lost: set[int] = set()  # frames the source delivered without data (lost in transit)
        self._last: tuple[float, int] | None = None  # the last frame handed on
        self.most_behind = 0
        self.disorder: list[int] = []  # acquisition indices that came after their place in psi had gone
        # where the frames handed on after a scan ended incomplete begin: their places hold only if it never
        # goes on (a checkpoint must not count them); None: every frame is in its place
        self.provisional_from: int | None = None

    frame_shape = property(lambda self: self.source.frame_shape)
    dtype = property(lambda self: self.source.dtype)
    n_frames = property(lambda self: self.source.n_frames)
    counters = property(lambda self: self.source.counters)
    frames_announced = property(lambda self: self.source.frames_announced)
    found = property(lambda self: self.source.found)
    # a detector's own invalid value and pixel mask, where its source knows them (the pipeline masks them)
    invalid_value = property(lambda self: getattr(self.source, "invalid_value", None))
    pixel_mask = property(lambda self: getattr(self.source, "pixel_mask", None))

    @property
    def end_reason(self) -> str | None:
        return self.source.end_reason

    @property
    def waiting_for(self) -> str | None:
        waiting = self.source.waiting_for
        if waiting or self._order or not self.tracker.psi:
            return waiting
        return (f"the last of {self.passes} passes (source.interlaced_turns) to pass the angles of the "
                f"{len(self.tracker.psi)} frames acquired: they go on in psi order")

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.source:
            k, psi = frame.index, frame.psi_deg
            if psi is None:
                raise InputError(f"frame {k}: no angle, expected one for every frame of a scan of passes "
                                 "(source.interlaced_turns)")
            self.tracker.add(psi)
            if frame.data is None:
                self._lost.add(k)
            if self._last is not None and (psi, k) < self._last:
                if not self.disorder:
                    log.warning("frame %d: came after the frames beside it in psi went on (a pass more than "
                                "source.interlaced_turns says, or one out of order): processed where it came", k)
                self.disorder.append(k)
                yield self._hand_on(psi, k, frame.data)
            else:
                heapq.heappush(self._waiting, (psi, k))
                limit = self._due_until()
                while limit is not None and self._waiting and self._waiting[0] <= limit:
                    yield self._next(frame)
            self._say()
        if self.source.end_reason not in COMPLETE_ENDS:
            self.provisional_from = len(self._order)
        while self._waiting:  # the scan has ended: nothing can come before them now
            yield self._next(None)
        self._say()

    def _due_until(self) -> tuple[float, int] | None:
        """The last frame (psi, acquisition index) that nothing still to come can precede, or None."""
        t = self.tracker
        if len(t.starts) < self.passes or t.direction <= 0:
            return None
        return t.psi[-1], len(t.psi) - 1

    def _next(self, arrived: Frame | None) -> Frame:
        psi, k = heapq.heappop(self._waiting)
        if k in self._lost:
            data = None
        elif arrived is not None and arrived.index == k:
            data = arrived.data
        else:
            data = self.source.read_again(k)
        return self._hand_on(psi, k, data)

    def _hand_on(self, psi: float, k: int, data) -> Frame:
        self._last = max(self._last or (psi, k), (psi, k))
        self._order.append(k)
        return Frame(len(self._order) - 1, psi, data)

    def _say(self) -> None:
        behind = len(self.tracker.psi) - len(self._order)
        self.most_behind = max(self.most_behind, behind)
        if self._report is not None:
            facts = {"passes_seen": len(self.tracker.starts), "frames_acquired": len(self.tracker.psi),
                     "frames_behind": behind, "most_frames_behind": self.most_behind}
            if self.disorder:
                facts.update(out_of_order=self.disorder[:DISORDER_LISTED], out_of_order_total=len(self.disorder))
            self._report(facts)

    def acquired(self, j: int) -> int:
        return self._order[j]

    def stop(self) -> None:
        self.source.stop()

    def close(self) -> None:
        self.source.close()


class PassTracker:
    """Which pass each arriving frame belongs to (`pass_starts`, as the angles arrive)."""

    def __init__(self):
        self.psi: list[float] = []  # by acquisition index
        self.starts: list[int] = [0]
        self._direction = 0.0

    def add(self, psi: float) -> bool:
        """Take the next frame's angle; True when it begins a new pass."""
        self.psi.append(psi)
        if len(self.psi) == 1:
            return False
        step = np.sign(psi - self.psi[-2])
        if step == 0:
            return False
        if self._direction == 0:
            self._direction = step
            return False
        if step != self._direction:
            self.starts.append(len(self.psi) - 1)
            self._direction = 0.0
            return True
        return False

    @property
    def direction(self) -> float:
        """psi's direction along the current pass: 1, -1, or 0 until it has moved."""
        return self._direction

    def pass_of(self, k: int) -> int:
        return bisect.bisect_right(self.starts, k) - 1


class PassMerge:
    """Corrected frames of every pass, given in acquisition order, handed on in psi order.

    Each frame is kept as its pixels at or above its lower growth threshold (``low_map``), with its own
    threshold maps.  A frame leaves once the last pass (``passes``; None: not known, every frame leaves at
    the end) has reached its psi: the order is psi along the last pass's direction, then pass, then arrival.
    """

    def __init__(self, tracker: PassTracker, passes: int | None, frame_shape):
        self.tracker = tracker
        self.passes = passes
        self.frame_shape = tuple(frame_shape)
        self._held: list[tuple] = []  # (p, k, psi, idx, values, seed, low); sorted by _key once it is known
        self._keys: list[tuple] = []  # the keys of _held, once the direction is known
        self._last_key: tuple | None = None
        self._direction = 0.0  # psi's direction along the last pass, once known
        self.acquired: list[int] = []  # psi-order index -> acquisition index
        self.psi: list[float] = []  # psi-order index -> psi
        self.held_pixels = 0
        self.most_held = 0
        self.most_held_pixels = 0  # the memory: 8 bytes a pixel (index, value), 12 with a frame to measure on
        self.disorder: list[int] = []  # acquisition indices that came after their place in psi had gone

    def _key(self, item) -> tuple:
        p, k, psi = item[:3]
        return (self._direction * psi, p, k)

    def _learn_direction(self, p: int) -> None:
        """Once the last pass has moved: psi's direction along it, and the frames held sorted by it."""
        if self._direction != 0 or self.passes is None or p < self.passes - 1:
            return
        t = self.tracker
        a = t.starts[self.passes - 1]
        b = t.starts[self.passes] if self.passes < len(t.starts) else len(t.psi)
        steps = np.sign(np.diff(t.psi[a:b]))
        steps = steps[steps != 0]
        if steps.size:
            self._set_direction(float(steps[0]))

    def _set_direction(self, direction: float) -> None:
        self._direction = direction
        self._held.sort(key=self._key)
        self._keys = [self._key(item) for item in self._held]

    def put(self, k: int, frame: np.ndarray, low_map: np.ndarray, seed, low,
            measure: np.ndarray | None = None, sigma=None) -> Iterator[tuple]:
        """Take corrected frame ``k`` (acquisition index) with its lower growth threshold per pixel, its tile
        maps and the frame its spots are measured on (None: ``frame``); yields ``(j, frame, seed, low,
        measure, sigma)`` for every frame now due, j counting along psi (``sigma``, its noise map, is
        carried along)."""
        flat = frame.ravel()
        idx = np.flatnonzero(flat >= low_map.ravel()).astype(np.int32)
        p = self.tracker.pass_of(k)
        measured = None if measure is None else measure.ravel()[idx]
        item = (p, k, self.tracker.psi[k], idx, (flat[idx], measured), seed, low, sigma)
        self._learn_direction(p)
        self.held_pixels += idx.size
        if self._direction == 0:  # the last pass has not begun: every frame waits
            self._held.append(item)
        else:
            key = self._key(item)
            if self._last_key is not None and key < self._last_key:
                self.disorder.append(k)  # its place in psi has gone: it goes on now
                yield from self._emit([item])
                return
            i = bisect.bisect_right(self._keys, key)
            self._held.insert(i, item)
            self._keys.insert(i, key)
        self.most_held = max(self.most_held, len(self._held))
        self.most_held_pixels = max(self.most_held_pixels, self.held_pixels)
        if self._direction != 0 and p >= self.passes - 1:
            yield from self._release(bisect.bisect_right(self._keys, self._key(item)))

    def finish(self) -> Iterator[tuple]:
        """The scan has ended: every frame still held, in order."""
        if self._direction == 0:  # the last pass never moved (or was never known): psi going up
            self._set_direction(1.0)
        yield from self._release(len(self._held))

    def _release(self, n: int) -> Iterator[tuple]:
        due, self._held = self._held[:n], self._held[n:]
        if n:
            self._last_key = self._keys[n - 1]
            self._keys = self._keys[n:]
        yield from self._emit(due)

    def _emit(self, items) -> Iterator[tuple]:
        for p, k, psi, idx, kept, seed, low, sigma in items:
            self.held_pixels -= idx.size
            frame, measure = (None if values is None else self._dense(idx, values) for values in kept)
            j = len(self.acquired)
            self.acquired.append(k)
            self.psi.append(psi)
            yield j, frame, seed, low, measure, sigma

    def _dense(self, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        frame = np.zeros(self.frame_shape, np.float32)
        frame.ravel()[idx] = values
        return frame

    @property
    def held(self) -> int:
        return len(self._held)
