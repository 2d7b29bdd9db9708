"""The noise of the corrected frames, followed along psi, per detector tile.

The noise follows the background (Poisson), which changes across the detector
(glow, direct-beam tails) and along the scan (source decay, top-ups, a
background the median does not quite follow). Each corrected frame gives a
robust noise per tile (``tile_sigma``: a standard deviation clipped around the
median, which the few voxels of spots in a tile do not move); the noise of frame k is the
per-tile median of those of the last ``history`` frames, so a spot that
covers a tile for fewer than ``history // 2`` frames does not raise it. The
first frames share the estimate of the first ``prime`` frames.

The level of the unfiltered corrected frames is followed the same way (``tile_level``:
the mean of a tile's pixels that no spot lights, then the median of its 3 x 3
tiles). A median along psi is not the
mean of the counts it is taken over: a Poisson count's median lies up to 0.69
below its mean and 1/3 above, by where the mean falls between two integers, and
1/6 below on average (the skew); read noise narrows that, but the integer
steps stay. A spot's integral sums its box (its tails) and takes that level
from each voxel: an Eiger-like scan's integrals, a background of 0.5-2.5 counts
a pixel, were 8-12 % high in the median and up to 2.8x for the faint ones.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._kernels import nan_median_along_first, neighbourhood_median, subtract_tiles, tile_level, tile_sigma

TILE_PX = 32
HISTORY_FRAMES = 15
# Every other pixel in each direction: 256 samples of a 32 x 32 tile (a 5% error per frame), a quarter of
# the work. Every 4th pixel (64 samples) was 3x faster but too few beside the masked beam: the demo's
# precision fell from 1.000 to 0.964.
SAMPLE_STEP = 2
MIN_TILE_SAMPLES = 32
# The clipped standard deviation (see _kernels.robust_sigma): values beyond CLIP sigmas are spots; a
# Gaussian keeps 99.99% of itself within 4 sigmas (its deviation 0.1% low). Two passes bring a median
# absolute deviation 40% off to within 1%.
CLIP_SIGMAS = 4.0
CLIP_PASSES = 3
# A tile that a spot covers nearly whole (a grain's projection is as wide as a tile): its noise is taken
# from the values about 0 when their spread is under half the spread about the median, and at least 8
# values sit below 0 (see _kernels.robust_sigma). Without it a 33 px spot lasting 13 frames raised its
# tile's noise 13-fold for 6 frames (the median over HISTORY_FRAMES did not hide it), and with it the
# threshold its own tail was grown to.
COVERED_SPREAD = 2.0
MIN_BELOW_ZERO = 8
# A tile whose median is this many of its sigmas below 0 is not followed: the beam was off or the shutter
# closed for that frame, and its spread is the read noise alone (16x under the lit frames' in a scan of an
# independent generator with the beam off for 10 frames). Kept out of the history (NaN), it does not lower
# the thresholds of the frames after it (18 false spots in the 4 frames after a late shutter, 12 after a
# gap). A followed tile's median is within a fraction of a sigma of 0.
SHIFTED_SIGMAS = 3.0


def tiles_shape(frame_shape, tile_px: int = TILE_PX) -> tuple[int, int]:
    ny, nx = frame_shape
    return -(-ny // tile_px), -(-nx // tile_px)


def frame_noise(frame: np.ndarray, mask: np.ndarray, tile_px: int = TILE_PX) -> np.ndarray:
    """Robust noise of one corrected frame per tile, NaN where a tile is (nearly) all masked or shifted below
    0 (see SHIFTED_SIGMAS)."""
    if frame.ndim != 2 or mask.shape != frame.shape:
        raise ValueError(f"frame, mask: expected two 2-D arrays of one shape, got {frame.shape}, {mask.shape}")
    out = np.empty(tiles_shape(frame.shape, tile_px), np.float64)
    step = SAMPLE_STEP if tile_px >= 4 * SAMPLE_STEP else 1
    tile_sigma(np.ascontiguousarray(frame), np.ascontiguousarray(mask, bool), tile_px, step,
               min(MIN_TILE_SAMPLES, max((tile_px // step) ** 2 // 4, 1)), CLIP_SIGMAS, CLIP_PASSES,
               COVERED_SPREAD, MIN_BELOW_ZERO, SHIFTED_SIGMAS, out)
    return out


# The level (see the module doc) is taken over pixels whose filtered value is below LEVEL_EXCLUDE_SIGMAS x the
# tile's noise (a spot's, at the auto grow_low) and whose unfiltered value is within LEVEL_CLIP_SIGMAS of them of 0
# (about 4 sigmas of the unfiltered noise: a spot's peak pixel, a zinger), symmetric so that noise keeps its mean.
LEVEL_EXCLUDE_SIGMAS = 3.0
LEVEL_CLIP_SIGMAS = 10.0
LEVEL_STEPS = 64


def frame_level(frame: np.ndarray, measure: np.ndarray, mask: np.ndarray, sigma: np.ndarray,
                tile_px: int = TILE_PX) -> np.ndarray:
    """Level per tile of the unfiltered corrected frame ``measure`` (see LEVEL_EXCLUDE_SIGMAS), ``frame`` its
    filtered copy and ``sigma`` the frame's noise map; NaN where too few pixels (or ``sigma`` NaN)."""
    if frame.ndim != 2 or mask.shape != frame.shape or measure.shape != frame.shape:
        raise ValueError(f"frame, measure, mask: expected three 2-D arrays of one shape, got {frame.shape}, "
                         f"{measure.shape}, {mask.shape}")
    out = np.empty(tiles_shape(frame.shape, tile_px), np.float64)
    step = SAMPLE_STEP if tile_px >= 4 * SAMPLE_STEP else 1
    tile_level(np.ascontiguousarray(frame), np.ascontiguousarray(measure), np.ascontiguousarray(mask, bool),
               np.ascontiguousarray(sigma, np.float64), tile_px, step,
               min(MIN_TILE_SAMPLES, max((tile_px // step) ** 2 // 4, 1)), LEVEL_EXCLUDE_SIGMAS,
               LEVEL_CLIP_SIGMAS, out)
    return out


def subtract_level(measure: np.ndarray, level: np.ndarray, tile_px: int = TILE_PX, box=None) -> np.ndarray:
    """In place: each tile of the float32 frame ``measure`` less its ``level``, but for ``box`` (x0, y0, w, h),
    left at 0 (a followed beam's pixels read 0: never segmented, nothing to measure there); returns
    ``measure``."""
    tiles = tiles_shape(measure.shape, tile_px)
    if measure.dtype != np.float32 or not measure.flags.c_contiguous or level.shape != tiles:
        raise ValueError(f"measure, level: expected a C-contiguous float32 frame and its {tiles} tile map, "
                         f"got {measure.dtype} {measure.shape} and {level.shape}")
    subtract_tiles(measure, np.ascontiguousarray(level, np.float32), tile_px)
    if box is not None:
        x0, y0, w, h = box
        measure[y0:y0 + h, x0:x0 + w] = 0.0
    return measure


# Frames of the first window whose consecutive pairs give the photon gain (see photon_gain).
PHOTON_FRAMES = 5


def photon_gain(frames, dark: np.ndarray, flat: np.ndarray, mask: np.ndarray, tile_px: int = TILE_PX) -> float | None:
    """Counts per photon of the corrected frames, from raw ``frames`` (consecutive, the scan's first):
    the photon transfer. Two consecutive frames differ by their noise (the background cancels, the few
    spots that change are clipped by the robust spread), so per tile half the variance of their
    difference, over their mean level ((raw - dark) x flat), is the gain, read noise aside. The median over
    the brighter half of the tiles: read noise makes it an upper bound, the safe side for splitting
    touching spots (segment.segmenter). None where no tile holds counts."""
    ratios = []
    for a, b in zip(frames, frames[1:]):
        a = (np.asarray(a, np.float32) - dark) * flat
        b = (np.asarray(b, np.float32) - dark) * flat
        spread = frame_noise(a - b, mask, tile_px)
        level = _tile_medians(0.5 * (a + b), mask, tile_px)
        ok = np.isfinite(spread) & np.isfinite(level) & (level > 0) & (spread > 0)
        if ok.any():
            bright = ok & (level >= np.median(level[ok]))
            ratios.append(spread[bright] ** 2 / 2 / level[bright])
    if not ratios:
        return None
    return float(np.median(np.concatenate(ratios)))


def _tile_medians(frame: np.ndarray, mask: np.ndarray, tile_px: int) -> np.ndarray:
    """Median of each tile's unmasked pixels (every SAMPLE_STEP-th in each direction), NaN where none."""
    ty, tx = tiles_shape(frame.shape, tile_px)
    step = SAMPLE_STEP if tile_px >= 4 * SAMPLE_STEP and tile_px % SAMPLE_STEP == 0 else 1
    padded = np.full((ty * tile_px, tx * tile_px), np.nan, np.float32)
    padded[:frame.shape[0], :frame.shape[1]] = np.where(mask, np.nan, frame)
    samples = padded[::step, ::step].reshape(ty, tile_px // step, tx, tile_px // step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-masked tile
        return np.nanmedian(samples, axis=(1, 3))


def own_maps(frame: np.ndarray, measure: np.ndarray | None, mask: np.ndarray, floor: float = 0.0,
             tile_px: int = TILE_PX) -> tuple[np.ndarray, np.ndarray | None]:
    """A corrected frame's own noise per tile (`frame_noise`) and, with its unfiltered copy ``measure``, its own
    level (None without, or where the frame reads 0): what `NoiseTracker` follows, of that frame alone, so that
    any thread can make them (the one that corrects the frames waits for the one that segments them)."""
    sigma = frame_noise(frame, mask, tile_px)
    if measure is None or not np.any(sigma > 0):
        return sigma, None
    # then the median of 3 x 3 tiles: a grain's projection covers a tile for more than half the history,
    # its skirt below the thresholds taken for the level (13 counts, 4x the noise, on one validation scan:
    # its integral lost three quarters). The frame's own noise, not the one followed: a frame's level
    # depends on that frame alone (a chunk of a split scan starts HISTORY_FRAMES frames before its first)
    level = neighbourhood_median(frame_level(frame, measure, mask, np.maximum(sigma, floor), tile_px),
                                 np.empty(sigma.shape))
    return sigma, level


class NoiseTracker:
    """Push corrected frames in order; get each one's noise per tile (a (tiles_y, tiles_x) map), and with the
    frame's unfiltered copy, its level per tile (``level``, that of the frame pushed last; 0 where not
    measured)."""

    def __init__(self, frame_shape, mask: np.ndarray, *, tile_px: int = TILE_PX, history: int = HISTORY_FRAMES,
                 floor: float = 0.0):
        self.frame_shape = tuple(frame_shape)
        self.mask = np.ascontiguousarray(mask, bool)
        self.tile_px = tile_px
        self.floor = float(floor)
        tiles = tiles_shape(frame_shape, tile_px)
        self._history = np.full((history, *tiles), np.nan)
        self._levels = np.full((history, *tiles), np.nan)
        self._pushed = 0  # frames put in the history
        self._primed: np.ndarray | None = None
        self._primed_level = np.zeros(tiles)
        self._n_primed = 0
        self.level = np.zeros(tiles, np.float32)
        self.series: list[float] = []  # median noise over the detector, frame by frame

    def prime(self, frames, measures=None) -> np.ndarray:
        """The first frames (and their unfiltered copies), at once: each of them gets the noise and level of
        them all."""
        skipped = sum(not self.add(frame, None if measures is None else measures[i]) for i, frame in enumerate(frames))
        self._n_primed = self._pushed + skipped
        self._primed = self._current()
        self._primed_level = self._current_level()
        return self._primed

    def push(self, k: int, frame: np.ndarray, measure: np.ndarray | None = None, own=None) -> np.ndarray:
        """Frame k's noise map (and ``level``). Frames before the primed count take the primed maps (their
        noise is in them). ``own``: see `add`."""
        if k < self._n_primed:
            sigma, level = self._primed, self._primed_level
        elif self.add(frame, measure, own):
            sigma, level = self._current(), self._current_level()
        else:  # a frame that reads 0: nothing to take off it
            sigma, level = self._current(), np.zeros(self._levels.shape[1:])
        # on a grid of 1/LEVEL_STEPS count, finer than its error (0.02 count): values that were integers keep
        # few mantissa bits for the sparse scan's compression (a 96 x 96 integer scan without normalisation:
        # 2,298 bytes a frame with a level on a 1/256 grid, 2,219 on 1/64, 1,936 without a level)
        self.level = (np.round(level * LEVEL_STEPS) / LEVEL_STEPS).astype(np.float32)
        if k == len(self.series):
            self.series.append(float(np.median(sigma)))
        return sigma

    def add(self, frame: np.ndarray, measure: np.ndarray | None = None, own=None) -> bool:
        """One frame more in the history only (a chunk of a split scan: the frames before its first); False if
        it is not taken: a frame that reads 0 (unusable, see background.stage) says nothing of the noise.
        ``own``: the frame's `own_maps`, made elsewhere with this tracker's mask for it."""
        sigma, level = own_maps(frame, measure, self.mask, self.floor, self.tile_px) if own is None else own
        if not np.any(sigma > 0):
            return False
        slot = self._pushed % len(self._history)
        self._history[slot] = sigma
        self._pushed += 1
        self._levels[slot] = np.nan if level is None else level
        return True

    def _held(self, history: np.ndarray) -> np.ndarray:
        held = history[:min(self._pushed, len(history))]
        return nan_median_along_first(held, np.empty(held.shape[1:]))

    def _current(self) -> np.ndarray:
        sigma = self._held(self._history)  # an all-NaN tile: filled below
        valid = np.isfinite(sigma)
        fill = float(np.median(sigma[valid])) if valid.any() else self.floor
        sigma = np.where(valid, sigma, fill)
        return np.maximum(sigma, self.floor)

    def _current_level(self) -> np.ndarray:
        level = self._held(self._levels)
        return np.where(np.isfinite(level), level, 0.0)  # not measured there: not corrected

    # ---- checkpoint ----------------------------------------------------------------
    def state(self) -> dict:
        return {"history": self._history.copy(), "pushed": self._pushed, "n_primed": self._n_primed,
                "primed": self._primed if self._primed is not None else np.zeros(0), "series": np.array(self.series),
                "levels": self._levels.copy(), "primed_level": self._primed_level.copy()}

    def restore(self, state: dict) -> None:
        self._history = np.array(state["history"], np.float64)
        self._pushed, self._n_primed = int(state["pushed"]), int(state["n_primed"])
        self._primed = np.array(state["primed"], np.float64) if np.size(state["primed"]) else None
        self.series = [float(v) for v in state["series"]]
        self._levels = np.array(state["levels"], np.float64)
        self._primed_level = np.array(state["primed_level"], np.float64)
