"""The streamed background stage.

Frame k's background is the per-pixel median of the normalised frames in the
window of ``window`` frames centred on k's *centre* frame (k itself in
``exact`` mode, the middle of k's block of ``stride`` frames in ``block``
mode), shifted to stay inside the scan at its two ends. Each frame is first
brought to the beam intensity of the scan (``scale_j``, see ``BeamIntensity``)
and kept in raw counts: ``q_j = (raw_j - dark) * scale_j + dark``, rounded and
clipped for integer frames (a rounding of at most half a count, far below the
noise), so that the fast histogram median serves normalised scans too.
Normalised frame j is ``(float32(q_j) - dark) * gain`` (gain = 1 / flat field,
per pixel); corrected frame k is its normalised frame minus its background
(the difference), then the 2-D median filter. Both are emitted: the filtered
frame to find the spots, the difference to measure them.

Frame k is emitted as soon as the last frame of its window has arrived (and,
with ``batch_frames`` > 1, the batch holding it is complete): a fixed latency
of ``window // 2`` (+ ``batch_frames - 1``) frames in exact mode.

Medians come from, in order of preference: the per-pixel windowed histogram
(integer frames), the per-pixel sorted window (float frames, exact mode), a
selection over the ring (everything else).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from ..config import frames_per_batch
from ..direct_beam import (beam_mask, box_ahead, box_moved, box_union, detect_direct_beam, edges_moved,
                           followed_box, margin_mean)
from ..errors import InputError
from ..ring import ArrayPool, FrameRing
from .kernels import (HistogramWindow, SortedWindow, median_filter, normalise_into, normalised_minus_background,
                      window_median, window_median_box)

log = logging.getLogger(__name__)

# normalise: auto. The beam intensity of a frame is the median, over a grid of at most SAMPLES_PER_SIDE^2
# pixels, of the frame's ratio to a recent background of the normalised scan (the per-pixel median of the
# last few frames' samples): the source's decay, oscillation and top-up steps scale every pixel lit by the
# beam (direct beam, glow, scattering) alike, while spots and the rotating sample's shadow change only a
# minority of them, which the median ignores.
SAMPLES_PER_SIDE = 128
# Pixels darker than this (counts above the dark) carry too little of the beam to measure it; with
# too few such pixels (a photon-counting detector, a dark background) frames are not normalised.
AUTO_MIN_COUNTS = 20.0
AUTO_MIN_PIXELS = 64
# A ratio outside this range is not the source drifting but the beam off (shutter closed, beam lost) or a
# different scene. Such a frame, and one where more than UNUSABLE_STUCK_FRACTION of the sampled pixels that
# the beam lights (and leaves well below the detector's top) read 0 or the detector's top value (a readout
# glitch, a frame cut short, a saturated frame), is unusable: it holds no spot that can be measured. Its scale
# is recorded as 0, its samples stay out of the references, it is in no median (BackgroundStage._normalise)
# and once corrected it reads 0 -- not segmented, in no spot's integral --, or, between two usable frames,
# their mean (BackgroundStage._bridge). Unscaled, a frame without the beam read minus the background (a spot
# beside 15 such frames reported -1.2 x its integral) and a saturated frame lost every spot it touched. The
# first UNUSABLE_WARNINGS are said one by one, the rest counted (status, run record).
AUTO_RATIO_RANGE = (0.25, 4.0)
UNUSABLE_STUCK_FRACTION = 0.01
UNUSABLE_WARNINGS = 3
# direct_beam.bbox: auto follows the beam along psi: it is found again every BEAM_EVERY frames emitted,
# on the frame's background (and, where the median window is shifted inside the scan, on the frame itself,
# whose beam is then not the median's), a few ms of whole-frame work at 2048 x 2048.
BEAM_EVERY = 10
# direct_beam.bbox: auto. The pixels more than BEAM_CORE_PX inside the followed beam's box (the beam's core)
# are never segmented and read 0 in the corrected frames: the histogram median skips them (on the bench's
# 2048 x 2048 scan its 25,000-count beam, a tenth of the detector, took a third of the median's CPU, rebuilding
# bins the bright pixels' noise leaves), and the beam found again on frame k sees frame k itself there. When
# a box no longer holds the core (the beam moved or shrank into it), the core is followed again, exactly, from
# that frame on. A core under MIN_CORE_PIXELS is not worth it.
BEAM_CORE_PX = 16
MIN_CORE_PIXELS = 4096


def _holds(box, core) -> bool:
    """Whether beam box ``box`` (x0, y0, width, height, or None) holds ``core`` (y0, y1, x0, x1)."""
    if box is None:
        return False
    x0, y0, w, h = box
    return x0 <= core[2] and y0 <= core[0] and x0 + w >= core[3] and y0 + h >= core[1]


def frame_runs(frames) -> list[list[int]]:
    """Sorted frames as [first, last] runs of consecutive ones."""
    runs: list[list[int]] = []
    for k in frames:
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return runs


def window_start(centre: int, window: int, n_frames: int) -> int:
    """First frame of the window centred on ``centre``, shifted inside a scan of ``n_frames``."""
    return int(min(max(centre - window // 2, 0), n_frames - window))


class BeamIntensity:
    """Each frame's scale to the beam intensity of the scan, measured from the frames themselves.

    The reference for frame j is the per-pixel median of the normalised samples of frames
    [u - history, u), u = j rounded down to a multiple of ``every``; before enough frames
    have been seen, the median of the raw samples of the first window (``start``).
    Deterministic in the frames and the scales of earlier frames, so a resumed run that
    is given the scales it cannot measure again continues exactly.
    """

    def __init__(self, frame_shape, dark: np.ndarray, gain: np.ndarray, mask: np.ndarray, window: int):
        ny, nx = frame_shape
        sy, sx = max(1, ny // SAMPLES_PER_SIDE), max(1, nx // SAMPLES_PER_SIDE)
        ys, xs = np.mgrid[sy // 2:ny:sy, sx // 2:nx:sx]
        self.index = (ys * nx + xs).ravel()
        self.keep = ~np.asarray(mask, bool).ravel()[self.index]
        self.dark = np.ascontiguousarray(dark, np.float32).ravel()[self.index]
        self.gain = np.ascontiguousarray(gain, np.float32).ravel()[self.index]
        self.history = max(1, min(101, window // 4))
        self.every = max(1, min(50, window // 8))
        self.enabled = True
        self.beam_off: list[int] = []  # frames whose ratio was outside AUTO_RATIO_RANGE
        self.unusable: dict[int, str] = {}  # frame -> why (scale 0): the beam off, or stuck pixels
        self._samples: dict[int, np.ndarray] = {}
        self._first_reference: np.ndarray | None = None
        self._reference: np.ndarray | None = None
        self._reference_at: int | None = None
        self._taken: tuple[int, np.ndarray] | None = None  # the last frame's samples, for add() after scale()

    def _values(self, raw: np.ndarray) -> np.ndarray:
        return (raw.reshape(-1)[self.index].astype(np.float32) - self.dark) * self.gain

    def start(self, raws, enabled: bool | None = None) -> None:
        """The raw frames of the first window: the first reference, and whether the beam can be measured."""
        samples = np.stack([self._values(r) for r in raws])
        reference = np.median(samples, axis=0)
        lit = self.keep & (reference >= AUTO_MIN_COUNTS)
        if enabled is None and np.count_nonzero(lit) < AUTO_MIN_PIXELS and self.keep.any():
            # more than half the window without the beam (a shutter that opened late): the frames with it, if
            # there are some, else a beam too weak to measure, as said below
            level = samples[:, self.keep].mean(axis=1)
            bright = level > 0.5 * np.percentile(level, 90)
            if 3 <= np.count_nonzero(bright) < level.size:
                bright_reference = np.median(samples[bright], axis=0)
                if np.count_nonzero(self.keep & (bright_reference >= AUTO_MIN_COUNTS)) >= AUTO_MIN_PIXELS:
                    log.warning("background.normalise: auto: %d of the %d frames of the first window without the "
                                "beam (a shutter that opened late?): the beam measured on the %d with it",
                                level.size - np.count_nonzero(bright), level.size, np.count_nonzero(bright))
                    reference = bright_reference
                    lit = self.keep & (reference >= AUTO_MIN_COUNTS)
        self.enabled = int(np.count_nonzero(lit)) >= AUTO_MIN_PIXELS if enabled is None else enabled
        if self.enabled:
            # each frame brought to one beam first, then the reference to the median frame's beam: a per-pixel
            # median of frames at different beams (a top-up, a beam lost or weaker for part of the window) lies
            # off every one of them (3.5 % below the median frame's with 136 frames at 80 % and 15 without beam
            # in 501), and every scale with it
            ratios = np.median(samples[:, lit] / reference[lit], axis=1)
            lit_frames = (ratios > AUTO_RATIO_RANGE[0]) & (ratios < AUTO_RATIO_RANGE[1])
            if lit_frames.any():
                ratios = ratios[lit_frames].astype(np.float32)
                reference = np.median(samples[lit_frames] / ratios[:, None], axis=0) * np.median(ratios)
        self._first_reference = reference
        if not self.enabled:
            log.info("background.normalise: auto: only %d sampled pixels are %g counts above the dark, "
                     "expected %d: frames are not normalised", int(np.count_nonzero(lit)), AUTO_MIN_COUNTS,
                     AUTO_MIN_PIXELS)

    def scale(self, j: int, raw: np.ndarray) -> float:
        if not self.enabled:
            return 1.0
        u = (j // self.every) * self.every
        if self._reference_at != u:
            frames = [f for f in range(u - self.history, u) if f in self._samples]  # unusable ones are not
            if u - self.history >= 0 and 2 * len(frames) > self.history:
                self._reference = np.median(np.stack([self._samples[f] for f in frames]), axis=0)
            else:
                self._reference = self._first_reference
            self._reference_at = u
        reference = self._reference
        values = self._values(raw)
        self._taken = (j, values)
        use = self.keep & (reference >= AUTO_MIN_COUNTS)
        if raw.dtype.kind in "ui":
            counts = raw.reshape(-1)[self.index]
            top = np.iinfo(raw.dtype).max
            far = use & (self.dark + reference / self.gain < 0.5 * top)  # well below the top in the reference
            stuck = int(np.count_nonzero(far & ((counts == 0) | (counts == top))))
            if stuck > UNUSABLE_STUCK_FRACTION * max(int(np.count_nonzero(far)), 1):
                self.unusable[j] = (f"{stuck} of the {int(np.count_nonzero(far))} sampled lit pixels read 0 or "
                                    f"{top} (a readout glitch, a frame cut short or saturated)")
                return 0.0
            use &= counts < top  # saturated pixels say nothing
        if not use.any():
            return 1.0
        ratio = float(np.median(values[use] / reference[use]))
        if not AUTO_RATIO_RANGE[0] < ratio < AUTO_RATIO_RANGE[1]:
            self.beam_off.append(j)
            self.unusable[j] = f"the beam off ({max(ratio, 0.0):.2f} x the recent beam)"
            return 0.0
        return 1.0 / ratio

    def samples(self) -> dict[int, np.ndarray]:
        """The samples the references of the next frames take: a resumed run cannot make them all again."""
        return dict(self._samples)  # one C-level copy: safe beside the thread that adds to it

    def restore(self, samples: dict[int, np.ndarray]) -> None:
        for j, values in samples.items():
            self._samples.setdefault(int(j), np.asarray(values, np.float32))

    def add(self, j: int, raw: np.ndarray, scale: float) -> None:
        """Frame j's normalised samples, for the references of the frames after it."""
        if not self.enabled or scale == 0.0:
            return
        values = self._taken[1] if self._taken is not None and self._taken[0] == j else self._values(raw)
        self._samples[j] = values * np.float32(scale)
        self._samples.pop(j - self.history - self.every, None)


class BackgroundStage:
    """Push raw frames in acquisition order; get corrected float32 frames back in the same order.

    ``direct_beam`` is a bbox ``(x0, y0, width, height)``, ``"auto"`` (found from
    the median of the first window) or ``"none"``; after the first window it is
    available as ``self.direct_beam`` (a bbox or None).

    ``follow_beam``: the beam is found again along the scan (`followed_box`): ``self.beam`` is the box of
    the frame last emitted, ``self.beam_track`` lists ``(first frame, box)`` each time it changed, and the
    box's pixels read 0 in the corrected frames (never segmented, however the beam moved). A resumed
    stage is given the track of the frames before the first it emits, and ``beam_found``: ``(frame, box)``
    each time the beam was looked for.
    """

    def __init__(self, cfg, *, frame_shape, dtype, dark=None, direct_beam="none",
                 beam_margin_px: int = 10, filter_size: int = 3, gain=None, pixel_mask=None,
                 first_window=None, first_frame: int = 0, margin_ref: float | None = None,
                 known_scales=None, auto_enabled: bool | None = None, known_samples=None,
                 follow_beam: bool = False, beam_track=None, beam_found=None):
        """``gain`` multiplies each pixel after the dark (> 0); ``pixel_mask`` marks pixels left out of the
        margin means; ``first_window(ring, slots) -> (dark or None, pixel_mask)`` is called once the first
        window of frames is in, before they are used (to estimate the dark or find bad pixels from them).
        A resumed run is given the scales of the frames already normalised (``known_scales``, by frame)
        and whether ``normalise: auto`` measured the beam (``auto_enabled``) with the samples of the frames
        its next references take (``known_samples``, frame -> samples)."""
        self.cfg = cfg
        self.window = cfg.window
        self.batch = frames_per_batch(cfg.batch_frames, frame_shape)
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(dtype)
        self.dark = (np.zeros(self.frame_shape, np.float32) if dark is None
                     else np.ascontiguousarray(dark, dtype=np.float32))
        self.gain = (np.ones(self.frame_shape, np.float32) if gain is None
                     else np.ascontiguousarray(gain, dtype=np.float32))
        self.pixel_mask = np.zeros(self.frame_shape, bool) if pixel_mask is None else pixel_mask
        self._masked_of: tuple[np.ndarray, np.ndarray] | None = None  # (pixel_mask, its flat indices)
        self._first_window = first_window
        self._beam_spec = direct_beam
        self._beam_margin_px = beam_margin_px
        self.direct_beam = direct_beam if isinstance(direct_beam, tuple) else None
        self.follow_beam = follow_beam
        self.beam_track: list[tuple[int, tuple | None]] = [(int(f), None if b is None else tuple(b))
                                                          for f, b in (beam_track or [])]
        self.beam = self.beam_track[-1][1] if self.beam_track else self.direct_beam
        self.beam_found: list[tuple[int, tuple | None]] = [(int(f), None if b is None else tuple(b))
                                                          for f, b in (beam_found or [])]
        # room for the beam to move between two findings, and hysteresis (see followed_box)
        self._beam_band = max(1, beam_margin_px)
        self.filter_size = filter_size
        # the histogram drops frame f - window while adding frame f: both must be in the ring
        self.ring = FrameRing(self.window + self.batch, self.frame_shape, self.dtype)
        # A resumed scan starts at ``first_frame`` (see ``first_raw_frame``), with the margin
        # normalisation's reference (frame 0's margin mean) and the direct beam of the first run.
        self.first = self.ring.count = first_frame
        self.ring.fault_in()
        self._ones = np.ones(self.ring.capacity, np.float32)  # the ring holds normalised frames
        self._margin_ref: float | None = margin_ref
        self._known_scales = np.asarray([] if known_scales is None else known_scales, np.float64)
        self._auto_enabled = auto_enabled
        self._known_samples = dict(known_samples or {})
        self.intensity: BeamIntensity | None = None  # normalise: auto
        self.frame_scales: list[float] = list(self._known_scales[:first_frame])  # every frame's scale so far
        # frames whose scale is 0 (those of the first run, resumed): they read 0 once corrected, see _bridge
        self.unusable: set[int] = set(np.flatnonzero(self._known_scales[:first_frame] == 0).tolist())
        limits = np.iinfo(self.dtype) if self.dtype.kind in "ui" else None
        self._extremes = (limits.min, limits.max) if limits is not None else (-np.inf, np.inf)
        self._hist: HistogramWindow | None = None
        self._sorted: SortedWindow | None = None
        self._core: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1): see BEAM_CORE_PX
        self._core_until: int | None = None  # the first frame whose beam box no longer held the core
        # window start -> background (normalised units, float32) or median of raw frames (their type)
        self._medians: dict[int, np.ndarray] = {}
        self._median_batch: np.ndarray | None = None  # the medians of one slide of the histogram
        self._corrected = ArrayPool(6)  # two arrays a corrected frame, three frames on their way to the segmenter
        self.warm = False
        # counts per photon of the corrected frames, from the first window's frames (segment.noise.photon_gain)
        self.photon_gain: float | None = None
        self.n_frames: int | None = None  # known once the scan has ended
        self.emitted = first_frame

    # ---- public --------------------------------------------------------------
    def push(self, frame: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Take raw frame ``ring.count``; the corrected frames it completes come one at a time, as
        ``(k, filtered, difference)``, so that a batch, or the end of a scan, never holds many
        frame-sized arrays at once."""
        j = self.ring.count
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise InputError(f"frame {j}: expected shape {self.frame_shape}, got {frame.shape}")
        if frame.dtype != self.dtype:
            raise InputError(f"frame {j}: expected dtype {self.dtype}, got {frame.dtype}")
        if self.warm:
            slot = self.ring.push(frame)
            self._normalise(j, slot)
            if self._sorted is not None:
                self._sorted.replace(self.ring.data[self.ring.slot(j - self.window)], self.ring.data[slot])
                self._medians[j - self.window + 1] = self._sorted_background()
            if self._hist is not None and j - self._hist.last == self.batch:
                self._slide()
        else:
            self.ring.push(frame)
            if self.ring.count - self.first == self.window:
                self._warm_up(self.window)
        return self._drain()

    def finish(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The scan has ended: emit every frame still held back."""
        n = self.ring.count
        self.n_frames = n
        if n == 0:
            return iter(())
        if not self.warm:
            if self.first:
                raise RuntimeError(f"a scan resumed at frame {self.first} ended before its first window")
            width = n if n % 2 else n - 1
            log.warning("the scan has %d frames, fewer than background.window=%d: using a window of %d frames (a "
                        "pixel lit in %d or more of them, a spot's rocking curve that long, is taken for background)",
                        n, self.window, width, width // 2 + 1)
            self.window = width
            self._warm_up(width)
        if self._hist is not None:
            if self._hist.last < n - 1:
                self._slide()
            elif n - self.window not in self._medians:
                self._medians[n - self.window] = self._hist.median().astype(self.dtype)
        return self._drain()

    def stand_in(self) -> np.ndarray:
        """A raw frame to put in the place of one that was lost: the median of the latest frames."""
        n = min(self.ring.count - self.first, self.window)
        n -= 1 - n % 2
        if n < 1:
            raise InputError(f"frame {self.ring.count}: lost, and no frame before it arrived to stand in for it "
                             "(source.missing: repeat-background), expected at least the first frame")
        first = self.ring.count - n
        zeros = np.zeros(self.frame_shape, np.float32)
        median = window_median(self.ring.data, self.ring.slots(first, first + n), zeros, self._ones,
                               gain=np.ones(self.frame_shape, np.float32))
        return median.astype(self.dtype)

    def first_raw_frame(self, k: int) -> int:
        """The first raw frame a stage needs to emit frame ``k`` and every frame after it, mid-scan."""
        return self._start_mid_scan(k)

    def normalise_facts(self) -> dict:
        """How frames were brought to the beam intensity, for the run record."""
        scales = np.asarray(self.frame_scales, np.float64)
        facts = {"mode": self.cfg.normalise}
        if self.intensity is not None:
            facts["measured"] = bool(self.intensity.enabled)
            facts["beam_off_frames"] = len(self.intensity.beam_off)
        if self.unusable or self.cfg.normalise == "auto":
            facts["unusable_frames"] = len(self.unusable)
            facts["unusable"] = frame_runs(sorted(self.unusable))
        scales = scales[scales > 0]
        if scales.size:
            facts["scale_min"], facts["scale_max"] = round(float(scales.min()), 5), round(float(scales.max()), 5)
        return facts

    @property
    def margin_ref(self) -> float | None:
        return self._margin_ref

    # ---- internals -------------------------------------------------------------
    def _warm_up(self, width: int) -> None:
        first = self.first
        slots = self.ring.slots(first, first + width)
        if self._first_window is not None:
            dark, self.pixel_mask = self._first_window(self.ring.data, slots)
            if dark is not None:
                self.dark = np.ascontiguousarray(dark, dtype=np.float32)
        if self._beam_spec == "auto" and self.cfg.normalise == "margin":  # the margins need the beam first
            image = window_median(self.ring.data, slots, self.dark, self._ones, gain=self.gain)
            self._find_beam(image)
            if self.direct_beam is None:
                raise InputError("background.normalise: margin needs a direct-beam box, "
                                 "but none was found in the first window")
        if self.cfg.normalise == "auto":
            self.intensity = BeamIntensity(self.frame_shape, self.dark, self.gain, self.pixel_mask, self.window)
            self.intensity.start([self.ring.data[s] for s in slots], self._auto_enabled)
            self.intensity.restore(self._known_samples)
        for k in range(first, self.ring.count):
            self._normalise(k, self.ring.slot(k))
        full = width == self.window == self.cfg.window  # a full window: slide from here on
        if full and self.dtype.kind in "ui" and self.dtype.itemsize <= 4:
            self._hist = HistogramWindow(self.ring.data, first, width)
            self._medians[first] = self._hist.median().astype(self.dtype)
        elif full and self.cfg.mode == "exact":
            self._sorted = SortedWindow(np.stack([self.ring.data[s] for s in slots]))
            self._medians[first] = self._sorted_background()
        if self._beam_spec == "auto" and self.cfg.normalise != "margin":
            image = self._medians.get(first)
            if image is None:  # a scan shorter than the window: its first frames' background (see _background)
                image = self._medians[first] = window_median(self.ring.data, slots, self.dark, self._ones,
                                                             gain=self.gain)
            elif image.dtype != np.float32:
                image = self._from_raw(image)
            self._find_beam(image)
        if self.follow_beam and not self.beam_track:
            self.beam = self.direct_beam
            self.beam_track.append((first, self.beam))
        self._start_core()
        from ..segment.noise import PHOTON_FRAMES, photon_gain  # here: segment._kernels imports background's

        usable = [self.ring.data[self.ring.slot(k)] for k in range(first, first + width) if k not in self.unusable]
        self.photon_gain = photon_gain(usable[:PHOTON_FRAMES], self.dark, self.gain,
                                       self.pixel_mask | beam_mask(self.direct_beam, self.frame_shape))
        self.warm = True

    def _find_beam(self, image: np.ndarray) -> None:
        self.direct_beam = detect_direct_beam(image, self._beam_margin_px, self.pixel_mask)
        if self.direct_beam is None:
            log.info("no direct beam found (no plateau 10x above the detector's typical level): none masked")
        else:
            log.info("direct beam found at %s", self.direct_beam)

    def _start_core(self) -> None:
        """The beam's core, from the first box found (that of the first run, resumed), unless the track says
        that a box already left it (see BEAM_CORE_PX)."""
        if not self.follow_beam or self._hist is None or self.direct_beam is None:
            return
        x0, y0, w, h = self.direct_beam
        core = (y0 + BEAM_CORE_PX, y0 + h - BEAM_CORE_PX, x0 + BEAM_CORE_PX, x0 + w - BEAM_CORE_PX)
        if core[1] <= core[0] or core[3] <= core[2] or (core[1] - core[0]) * (core[3] - core[2]) < MIN_CORE_PIXELS:
            return
        self._core = core
        self._core_until = next((f for f, box in self.beam_track if not _holds(box, core)), None)
        if self._core_until is None:
            self._hist.dormant = core

    def _core_at(self, k: int) -> tuple[int, int, int, int] | None:
        """The core whose median is not kept for frame k, or None."""
        if self._core is None or (self._core_until is not None and k >= self._core_until):
            return None
        return self._core

    def _wake_core(self, k: int) -> None:
        """The beam box of frame k no longer holds the core: its median is followed again, and the medians
        already slid for frame k and after get it."""
        self._core_until = k
        self._hist.wake()
        for start, median in self._medians.items():
            if start >= self._start(k) and median.dtype != np.float32:
                window_median_box(self.ring.data, self.ring.slots(start, start + self.window), self._core, median)
        log.info("frame %d: the direct beam %s no longer holds its core (rows %d-%d, columns %d-%d), whose "
                 "median is followed again", k, self.beam, self._core[0], self._core[1] - 1, self._core[2],
                 self._core[3] - 1)

    def _follow(self, k: int) -> None:
        """Find the beam again for frame k (see `followed_box`)."""
        background = self._background(k)
        image = background if background.dtype == np.float32 else self._from_raw(background)
        core = self._core_at(k)
        if core is not None:  # no median there: the frame itself, whatever the histogram holds
            y0, y1, x0, x1 = core
            image = image.copy() if image is background else image
            image[y0:y1, x0:x1] = ((self.ring.data[self.ring.slot(k)][y0:y1, x0:x1].astype(np.float32)
                                    - self.dark[y0:y1, x0:x1]) * self.gain[y0:y1, x0:x1])
        found = detect_direct_beam(image, self._beam_margin_px, self.pixel_mask)
        if found is not None and self._start(k) != self._centre(k) - self.window // 2:
            # the median's beam is not this frame's (the scan's first and last half-window): moved as far as
            # the frame's own beam edges lie from the median's, where they do by more than the band
            frame = (self.ring.data[self.ring.slot(k)].astype(np.float32) - self.dark) * self.gain
            moved = edges_moved(image, frame, self.pixel_mask)
            if moved is not None and max(abs(d) for d in moved) > self._beam_band:
                found = box_union(found, box_moved(found, moved, self.frame_shape))
        before = self.beam_found[-1][1] if self.beam_found else None
        self.beam_found.append((k, found))
        beam = followed_box(self.beam, box_ahead(found, before, self.frame_shape), self._beam_band,
                            self.frame_shape)
        if beam != self.beam:
            log.info("frame %d: the direct beam moved from %s to %s", k, self.beam, beam)
            self.beam = beam
            if self.beam_track and self.beam_track[-1][0] == k:  # found again on the frame it was found for
                self.beam_track.pop()
            self.beam_track.append((k, beam))
        if core is not None and not _holds(beam, core):
            self._wake_core(k)

    def _normalise(self, k: int, slot: int) -> None:
        """Bring frame k, just stored in ``slot``, to the scan's beam intensity, in place."""
        frame = self.ring.data[slot]
        scale = self._scale(k, frame)
        if self.intensity is not None:
            self.intensity.add(k, frame, scale)
        if scale == 0.0:
            self._unusable(k)
            # out of every median: unusable frames alternately at the bottom and the top of the frames' type leave
            # a window's median that of its usable frames (exactly for an even number of them, else half a rank
            # off), however many there are -- the beam lost for 4 frames of a window of 11 made false spots
            frame[...] = self._extremes[k % 2]
        elif scale != 1.0:
            normalise_into(frame, self.dark, scale, frame)
        if k == len(self.frame_scales):
            self.frame_scales.append(float(scale))

    def _unusable(self, k: int) -> None:
        if k in self.unusable:
            return
        self.unusable.add(k)
        if len(self.unusable) <= UNUSABLE_WARNINGS:
            why = self.intensity.unusable.get(k) if self.intensity is not None else None
            log.warning("frame %d: unusable, %s: not segmented on its own (it reads 0 once corrected, or the mean "
                        "of the frames beside it where both are usable)%s", k,
                        why or "so measured by the run resumed", " (the next ones are counted, not logged)"
                        if len(self.unusable) == UNUSABLE_WARNINGS else "")

    def _bridge(self, k: int, out: np.ndarray) -> None:
        """Unusable frame k's corrected frame, into ``out``: the mean of its neighbours' (against frame k's
        background) when both are usable and held -- a spot across one glitch stays one spot, its rocking curve
        interpolated there (at 0 it was cut in two) --, else 0 (a run of them: the beam off for a while)."""
        near = (k - 1, k + 1)
        held = max(self.first, self.ring.count - self.ring.capacity)
        if not all(held <= j < self.ring.count and j not in self.unusable for j in near):
            out.fill(0.0)
            return
        background = self._background(k)
        after = np.empty_like(out)
        normalised_minus_background(self.ring.data[self.ring.slot(k - 1)], self.dark, self.gain, 1.0, background, out)
        normalised_minus_background(self.ring.data[self.ring.slot(k + 1)], self.dark, self.gain, 1.0, background,
                                    after)
        out += after
        out *= np.float32(0.5)

    def _slide(self) -> None:
        """Slide the histogram over the frames that arrived since the last slide."""
        hist, w = self._hist, self.window
        first = hist.last + 1
        n = self.ring.count - first
        starts = np.arange(first - w + 1, first - w + 1 + n)
        emit = np.array([self.cfg.mode == "exact" or self._is_block_start(s) for s in starts])
        if self.n_frames is not None:
            emit[-1] = True  # the last window serves every frame whose window the end of the scan shifts
        # Raw medians, turned into backgrounds frame by frame in _drain. In exact mode they are views
        # of one batch array, used again for every batch (128 MiB at 2048 x 2048 and 16 frames):
        # the medians of the last batch still waiting are copied out of it first.
        batch = self._median_batch
        if batch is None or len(batch) < n:
            batch = self._median_batch = np.empty((max(n, self.batch), *self.frame_shape), self.dtype)
        for start, median in self._medians.items():
            if median.base is batch:
                self._medians[start] = median.copy()
        medians = hist.slide(n, emit, batch[:n])
        for j in np.flatnonzero(emit):
            # block mode: a median a block, copied out, so the batch array is free to be used again
            self._medians[int(starts[j])] = medians[j] if emit.all() else medians[j].copy()

    def _is_block_start(self, start: int) -> bool:
        stride = self.cfg.stride
        centre = start + self.window // 2
        return centre % stride == stride // 2

    def _from_raw(self, median: np.ndarray) -> np.ndarray:
        """Background from a median of raw frames: exact, as the median commutes with the per-pixel
        increasing map raw -> (raw - dark) * gain (gain > 0; float32 rounding keeps it non-decreasing)."""
        return (median.astype(np.float32) - self.dark) * self.gain

    def _sorted_background(self) -> np.ndarray:
        return self._from_raw(self._sorted.median())

    def _scale(self, k: int, frame: np.ndarray) -> float:
        if k < self._known_scales.size:  # resumed: measured by the first run
            return float(self._known_scales[k])
        if self.cfg.normalise == "auto":
            return self.intensity.scale(k, frame)
        if self.cfg.normalise != "margin":
            return 1.0
        mean = margin_mean(frame, self.dark, self.direct_beam, self.cfg.margin_px, self.pixel_mask)
        if not mean > 0:
            raise InputError(f"frame {k}: mean of the direct-beam margins is {mean:g}, expected > 0 "
                             f"to normalise (check direct_beam.bbox and background.margin_px)")
        if self._margin_ref is None:
            self._margin_ref = mean
        return float(np.float32(self._margin_ref / mean))

    def _start_mid_scan(self, k: int) -> int:
        centre = k
        if self.cfg.mode == "block":
            centre = (k // self.cfg.stride) * self.cfg.stride + self.cfg.stride // 2
        return max(centre - self.window // 2, 0)

    def _centre(self, k: int) -> int:
        """The frame k's window is centred on."""
        if self.cfg.mode == "block":
            stride = self.cfg.stride
            return (k // stride) * stride + stride // 2
        return k

    def _start(self, k: int) -> int:
        centre = self._centre(k)
        n = self.n_frames if self.n_frames is not None else self.ring.count + self.window  # end not known yet
        return window_start(centre, self.window, n)

    def _ready(self, k: int) -> bool:
        if k >= self.ring.count or not self.warm:
            return False
        start = self._start(k)
        if self.n_frames is None and self.ring.count < start + self.window:
            return False
        # the histogram's medians exist only once its batch has been slid
        return self._hist is None or start in self._medians

    def _masked(self) -> np.ndarray:
        """Flat indices of the pixel mask's pixels (set once the first window gave it)."""
        if self._masked_of is None or self._masked_of[0] is not self.pixel_mask:
            self._masked_of = (self.pixel_mask, np.flatnonzero(self.pixel_mask))
        return self._masked_of[1]

    def _background(self, k: int) -> np.ndarray:
        start = self._start(k)
        if start not in self._medians:
            slots = self.ring.slots(start, start + self.window)
            self._medians = {start: window_median(self.ring.data, slots, self.dark, self._ones,
                                                  gain=self.gain)}
        return self._medians[start]

    def _drain(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        while self._ready(self.emitted):
            k = self.emitted
            if self.follow_beam and k % BEAM_EVERY == 0 and k not in self.unusable:
                self._follow(k)
            slot = self.ring.slot(k)
            difference = normalised_minus_background(self.ring.data[slot], self.dark, self.gain, 1.0,
                                                     self._background(k),
                                                     self._corrected.take(self.frame_shape, np.float32))
            if k in self.unusable:
                self._bridge(k, difference)
            # masked pixels (gaps, dead, hot) read 0: what they hold is not light, and the 3x3 median beside them
            # took it in (a dark of 1000 in a gap made 11 false spots beside it, the beam's scale times 1000)
            difference.reshape(-1)[self._masked()] = 0.0
            for start in [s for s in self._medians if s < self._start(k)]:
                del self._medians[start]
            self.emitted += 1
            # the filtered frame finds the spots, the unfiltered difference measures them
            filtered = median_filter(difference, self.filter_size, self._corrected.take(self.frame_shape, np.float32)) \
                if self.filter_size > 1 else difference
            if self.follow_beam and self.beam is not None:  # never segmented: nothing to find or to add there
                x0, y0, w, h = self.beam
                filtered[y0:y0 + h, x0:x0 + w] = 0.0
                difference[y0:y0 + h, x0:x0 + w] = 0.0
            yield k, filtered, difference
