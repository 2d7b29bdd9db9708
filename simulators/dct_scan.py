"""Simulated DCT scans with ground truth, written as Bliss-like HDF5 files.

The detector model follows what raw DCT frames look like: four sensor
quadrants with their own offsets, a direct (transmitted) beam ~100x brighter
than the diffraction spots with the rotating sample's shadow in it, a smooth
glow around the beam, a source intensity that oscillates and decays with the
rotation angle psi, Poisson + read noise, hot pixels and single-frame zingers.
Diffraction spots are 3-D Gaussians in (frame, y, x); spots near the rotation
axis last more frames.  Optional detector defects: dead pixels and gaps between
the four modules (always 0), a gain pattern (per module and per pixel) with a
flat-field scan consistent with it, and frames taken with the shutter closed
at the start of the scan.

Coordinates are 0-based with pixel centres at integers; ``x`` is the column,
``y`` the row, and frame ``k`` is recorded at psi = k * 360 / frames degrees.
All intensities are in detector counts (gain 1).

Every random draw comes from ``numpy.random.default_rng`` seeded with the scan
seed (the scene: hot pixels and spots) or with ``(seed, stream, frame)`` (the
per-frame noise and zingers), so any frame can be rendered on its own, frames
can be rendered in parallel, and the same seed gives byte-identical data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import operator
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

from dctstream.errors import InputError

FRAMES_PATH = "/1.1/measurement/marana"
ANGLES_PATH = "/1.1/measurement/diffrz"
DARK_PATH = "/2.1/measurement/marana"
TRUTH_PATH = "/1.1/ground_truth"
FLAT_PATH = "/3.1/measurement/marana"
# The DCT dataset layout (``layout="dct"``): references before, the rotation scan, references after, the dark.
DCT_REFS_BEFORE, DCT_SCAN, DCT_REFS_AFTER, DCT_DARK = "1.1", "2.1", "3.1", "4.1"
DCT_SCAN_TITLE = "fscan diffrz 0 {step:g} {frames} 0.1"
DCT_REF_TITLE = "loopscan {frames} 0.1 (references, sample out)"
SAMPLE_OUT_SAMY_MM = 5.0  # where the references are taken: the sample moved out of the beam along samy

FLAT_COUNTS = 20000.0  # photons per pixel per flat frame at gain 1

# Sensor quadrants in the order top-left, top-right, bottom-left, bottom-right
# (top = rows below ny // 2, left = columns below nx // 2).
QUADRANT_OFFSETS_COUNTS = (100.0, 106.0, 97.0, 103.0)
READ_NOISE_COUNTS = 2.5
SATURATION_COUNTS = 65535

BEAM_COUNTS = 25000.0
BEAM_WIDTH_FRACTION = 0.40
BEAM_HEIGHT_FRACTION = 0.25
# The beam's half-maximum edges lie 1 px inside the bbox and are blurred by this
# PSF, so the bbox holds the whole beam: its first outside pixel gets < 1 count.
BEAM_EDGE_INSET_PX = 1.0
BEAM_EDGE_SIGMA_PX = 0.5
# Elliptical sample cross-section, half-axes as fractions of the beam width: its
# projected width swings between 30% and 50% of the beam as it rotates.
SAMPLE_HALF_AXES_BEAM_FRACTION = (0.25, 0.15)
# Transmission through the thickest chord of a circle of the mean radius; the
# ellipse's chords then give 0.32-0.50 at the shadow's centre.
SAMPLE_MEAN_TRANSMISSION = 0.4
SAMPLE_EDGE_SIGMA_PX = 1.0

GLOW_COUNTS = 300.0
GLOW_DECAY_SIZE_FRACTION = 1.0 / 6.0

SOURCE_RIPPLE = 0.05
SOURCE_RIPPLE_PERIOD_FRAMES = 97.0
SOURCE_DECAY = 0.10

HOT_PIXEL_FRACTION = 1e-4
HOT_PIXEL_EXCESS_COUNTS = (1000.0, 4000.0)
ZINGERS_PER_512X512 = 2.0
ZINGER_EXCESS_COUNTS = (500.0, 5000.0)
ZINGER_PAIR_PROBABILITY = 0.5

SPOT_BORDER_PX = 8
SPOT_FRAME_MARGIN = (3, 4)  # centres lie in [3, frames - 4]
SPOT_SIGMA_XY_PX = (0.8, 2.5)
SPOT_SIGMA_FRAME = (0.6, 4.0)
SPOT_SNR = (2.0, 300.0)
# One spot in this many (the brightest beside the beam) is made bright enough to
# saturate the detector, as the strongest reflections do in real scans.
SPOTS_PER_SATURATED_SPOT = 200
SATURATED_PEAK_COUNTS = 2.0 * SATURATION_COUNTS
# Spots are rendered out to this many sigmas in every direction.
SPOT_CUTOFF_SIGMAS = 4.0
# Two spots clash when closer than this many (sigma + sigma') on all three axes.
SPOT_SEPARATION_SIGMAS = 3.0
SPOT_PLACEMENT_TRIES = 100

MIN_SIZE_PX = 32
MIN_FRAMES = 8

# Simulated acquisition clock, so that the same seed also gives the same file.
START_TIME = dt.datetime(2024, 1, 1, 9, 0, 0, tzinfo=dt.timezone.utc)
EXPOSURE_S = 0.1

_NOISE_STREAM = 1
_ZINGER_STREAM = 2
_DARK_STREAM = 3
_FLAT_STREAM = 4

_TRUTH_FLOAT_COLUMNS = ("x", "y", "frame", "sigma_x", "sigma_y", "sigma_frame",
                        "peak", "integral", "noise", "snr")
TRUTH_COLUMNS = _TRUTH_FLOAT_COLUMNS + ("in_direct_beam",)
_ALLOWED_DTYPES = tuple(np.dtype(d) for d in ("uint16", "uint32", "int32", "int64", "float32", "float64"))


@dataclass(frozen=True, eq=False)
class ScanTruth:
    """Where a simulated scan lives and what is in it.

    ``spots`` maps each ground-truth column (see ``simulate_scan``) to a 1-D
    array, one row per spot, sorted by frame. ``direct_beam_bbox`` is
    ``(x0, y0, width, height)`` in pixels.
    """

    path: str
    frames_url: str
    angles_url: str
    dark_url: str
    spots: dict[str, np.ndarray]
    direct_beam_bbox: tuple[int, int, int, int]
    flat_url: str | None = None  # the flat-field scan, when one was written


def _gauss(offset: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Unit-height Gaussian, exactly zero beyond the rendering cutoff."""
    inside = np.abs(offset) <= SPOT_CUTOFF_SIGMAS * sigma
    return np.where(inside, np.exp(-0.5 * (offset / sigma) ** 2), 0.0)


def _windows(centre: np.ndarray, sigma: np.ndarray, length: int, sigma_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-spot sample indices around ``centre`` and their Gaussian weights.

    Returns ``(index, weight)``, both (n_spots, window): indices are clipped
    into ``[0, length)`` and those that were outside get weight 0.
    """
    half = math.ceil(SPOT_CUTOFF_SIGMAS * sigma_max)
    index = np.rint(centre).astype(np.int64)[:, None] + np.arange(-half, half + 1)
    weight = _gauss(index - centre[:, None], sigma[:, None])
    weight[(index < 0) | (index >= length)] = 0.0
    return np.clip(index, 0, length - 1), weight


def _parse_shape(size: int | Sequence[int]) -> tuple[int, int]:
    try:
        shape = (operator.index(size),) * 2 if not isinstance(size, Sequence) else tuple(map(operator.index, size))
    except TypeError:
        raise InputError(f"simulate_scan: size is not an integer, expected an int or (ny, nx), got {size!r}") from None
    if len(shape) != 2 or min(shape) < MIN_SIZE_PX:
        raise InputError(f"simulate_scan: bad size, expected an int or (ny, nx) of at least {MIN_SIZE_PX} px, "
                         f"got {size!r}")
    return shape


def _check_count(name: str, value: int, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"simulate_scan: {name} is not an integer, expected an int >= {minimum}, "
                         f"got {value!r}") from None
    if value < minimum:
        raise InputError(f"simulate_scan: {name} is too small, expected an int >= {minimum}, got {value}")
    return value


class ScanModel:
    """The noiseless scene of one simulated scan and its per-frame rendering.

    Building it draws the hot pixels and the spot table from ``seed``; the
    frames are then rendered one at a time (``frame(k)``, ``dark_frame(i)``)
    and are independent of each other and of the rendering order.
    Memory is a few frames plus the spot table.
    """

    def __init__(self, *, frames: int = 720, size: int | Sequence[int] = 512, spots: int = 400, seed: int = 0,
                 dead_pixel_fraction: float = 0.0, module_gap_px: int = 0, gain_spread: float = 0.0,
                 shutter_closed_frames: int = 0, hot_pixel_fraction: float = HOT_PIXEL_FRACTION):
        """Defects: ``hot_pixel_fraction`` of the pixels (at least one) read 1000-4000 counts more,
        in frames and darks alike; ``dead_pixel_fraction`` of the pixels and ``module_gap_px`` rows and columns
        through the detector's centre (between its 2 x 2 modules) always read 0; ``gain_spread``
        s > 0 multiplies the photons by a gain with median 1: a factor uniform in [1 - s, 1 + s]
        per module times 1 + s/5 x a normal deviate per pixel.  The first ``shutter_closed_frames``
        frames see no beam and no spots (offsets, read noise and zingers only)."""
        self.frames = _check_count("frames", frames, MIN_FRAMES)
        self.shutter_closed_frames = _check_count("shutter_closed_frames", shutter_closed_frames, 0)
        self.shape = _parse_shape(size)
        self.seed = _check_count("seed", seed, 0)
        ny, nx = self.shape
        rng = np.random.default_rng(self.seed)

        beam_w, beam_h = int(BEAM_WIDTH_FRACTION * nx), int(BEAM_HEIGHT_FRACTION * ny)
        self.direct_beam_bbox = ((nx - beam_w) // 2, (ny - beam_h) // 2, beam_w, beam_h)
        x0, y0, _, _ = self.direct_beam_bbox
        self._beam_cols = slice(x0, x0 + beam_w)
        self._beam_rows = slice(y0, y0 + beam_h)
        self._beam_x = self._beam_edges(beam_w)
        self._beam_y = self._beam_edges(beam_h)
        # Sample: an ellipse on the rotation axis, which is the detector's centre column.
        self._sample_offset_px = np.arange(x0, x0 + beam_w) - (nx - 1) / 2
        half_a, half_b = (f * beam_w for f in SAMPLE_HALF_AXES_BEAM_FRACTION)
        self._sample_half_axes_px = (half_a, half_b)
        self._attenuation_per_px = -math.log(SAMPLE_MEAN_TRANSMISSION) / (half_a + half_b)

        self.glow = self._make_glow()  # counts at full source intensity

        self.quadrant_offsets = QUADRANT_OFFSETS_COUNTS
        self.read_noise = READ_NOISE_COUNTS
        offsets = np.asarray(QUADRANT_OFFSETS_COUNTS, dtype=np.float32).reshape(2, 2)
        lower, right = np.arange(ny) >= ny // 2, np.arange(nx) >= nx // 2
        fixed = offsets[lower.astype(int)[:, None], right.astype(int)[None, :]]
        n_hot = max(1, round(hot_pixel_fraction * ny * nx)) if hot_pixel_fraction > 0 else 0
        hot_flat = np.sort(rng.choice(ny * nx, size=n_hot, replace=False))
        self.hot_pixels = np.column_stack(np.unravel_index(hot_flat, self.shape))  # (n, 2) rows of (y, x)
        self.hot_pixel_excess = rng.uniform(*HOT_PIXEL_EXCESS_COUNTS, size=n_hot)
        fixed.reshape(-1)[hot_flat] += self.hot_pixel_excess.astype(np.float32)
        # Offsets plus hot pixels: what the detector adds with no beam, before read noise.
        self.fixed_pattern = fixed

        spots = self._make_spots(rng, _check_count("spots", spots, 0))
        # Height of each spot's Gaussian before the source-intensity scaling of the frame it is drawn in.
        self._amplitude = spots["peak"] / self.source_intensity(spots["frame"])
        spots["integral"] = self._integrals(spots, self._amplitude)
        self.spots = {name: spots[name] for name in TRUTH_COLUMNS}

        # Drawn after the scene, so that the same seed gives the same spots with or without defects.
        self.gain = np.ones(self.shape)
        if gain_spread > 0:
            module = 1 + gain_spread * rng.uniform(-1, 1, size=(2, 2))
            self.gain = module[lower.astype(int)[:, None], right.astype(int)[None, :]] * np.clip(
                1 + gain_spread / 5 * rng.standard_normal(self.shape), 0.2, None)
            self.gain /= np.median(self.gain)
        self.dead = rng.random(self.shape) < dead_pixel_fraction if dead_pixel_fraction > 0 else np.zeros(self.shape, bool)
        gap = _check_count("module_gap_px", module_gap_px, 0)
        self.dead[ny // 2 - gap // 2:ny // 2 - gap // 2 + gap] = True
        self.dead[:, nx // 2 - gap // 2:nx // 2 - gap // 2 + gap] = True

    # --- static scene -------------------------------------------------------

    @staticmethod
    def _beam_edges(width_px: int) -> np.ndarray:
        """Beam profile across the bbox: flat top, blurred edges 1 px inside it."""
        pos = np.arange(width_px, dtype=np.float64)
        scale = math.sqrt(2) * BEAM_EDGE_SIGMA_PX
        lo, hi = BEAM_EDGE_INSET_PX, width_px - 1 - BEAM_EDGE_INSET_PX
        return 0.5 * (erf((pos - lo) / scale) - erf((pos - hi) / scale))

    def _make_glow(self) -> np.ndarray:
        """Smooth glow A * exp(-r / r0), r the distance to the beam bbox (0 inside)."""
        ny, nx = self.shape
        x0, y0, w, h = self.direct_beam_bbox
        dx = np.maximum(np.maximum(x0 - 0.5 - np.arange(nx), np.arange(nx) - (x0 + w - 0.5)), 0.0)
        dy = np.maximum(np.maximum(y0 - 0.5 - np.arange(ny), np.arange(ny) - (y0 + h - 0.5)), 0.0)
        distance_px = np.hypot(dy[:, None], dx[None, :])
        return GLOW_COUNTS * np.exp(-distance_px / (GLOW_DECAY_SIZE_FRACTION * min(ny, nx)))

    def source_intensity(self, frame: float | np.ndarray) -> float | np.ndarray:
        """Relative source intensity at (possibly fractional) frame index: a ripple on a slow decay."""
        ripple = 1.0 + SOURCE_RIPPLE * np.sin(2 * np.pi * np.asarray(frame) / SOURCE_RIPPLE_PERIOD_FRAMES)
        return ripple * (1.0 - SOURCE_DECAY * np.asarray(frame) / self.frames)

    def psi_deg(self) -> np.ndarray:
        """Rotation angle of every frame in degrees."""
        return np.arange(self.frames) * (360.0 / self.frames)

    def _transmission(self, k: int) -> np.ndarray:
        """Sample transmission across the beam's columns at frame ``k``.

        Beer-Lambert along the chords of the rotating ellipse; the chord length
        at offset u is L_max * sqrt(1 - (u / h)^2) for projected half-width h.
        """
        psi = 2 * np.pi * k / self.frames
        half_a, half_b = self._sample_half_axes_px
        half_width_px = math.hypot(half_a * math.cos(psi), half_b * math.sin(psi))
        thickest_px = 2 * half_a * half_b / half_width_px
        chord_px = thickest_px * np.sqrt(np.clip(1 - (self._sample_offset_px / half_width_px) ** 2, 0, None))
        return gaussian_filter1d(np.exp(-self._attenuation_per_px * chord_px), SAMPLE_EDGE_SIGMA_PX, mode="nearest")

    def _beam_counts(self, k: int) -> np.ndarray:
        """Direct beam over the bbox at frame ``k`` before source scaling, (h, w)."""
        return BEAM_COUNTS * np.outer(self._beam_y, self._beam_x * self._transmission(k))

    def background(self, k: int) -> np.ndarray:
        """Noiseless beam + glow at frame ``k`` (counts, float64, no offsets and no spots)."""
        image = self.glow.copy()
        image[self._beam_rows, self._beam_cols] += self._beam_counts(k)
        image *= self.source_intensity(k)
        return image

    # --- spots --------------------------------------------------------------

    def _make_spots(self, rng: np.random.Generator, n_spots: int) -> dict[str, np.ndarray]:
        ny, nx = self.shape
        first = SPOT_FRAME_MARGIN[0] + self.shutter_closed_frames
        lo = np.array([SPOT_BORDER_PX, SPOT_BORDER_PX, first, SPOT_SIGMA_XY_PX[0], SPOT_SIGMA_XY_PX[0]])
        hi = np.array([nx - 1 - SPOT_BORDER_PX, ny - 1 - SPOT_BORDER_PX, self.frames - SPOT_FRAME_MARGIN[1],
                       SPOT_SIGMA_XY_PX[1], SPOT_SIGMA_XY_PX[1]])
        # columns: x, y, frame, sigma_x, sigma_y, sigma_frame
        placed = np.empty((n_spots, 6))
        for i in range(n_spots):
            for _ in range(SPOT_PLACEMENT_TRIES):
                candidate = np.append(lo + (hi - lo) * rng.random(5), 0.0)
                candidate[5] = self._sigma_frame(candidate[0])
                others = placed[:i]
                reach = SPOT_SEPARATION_SIGMAS * (others[:, 3:6] + candidate[3:6])
                clash = np.all(np.abs(others[:, 0:3] - candidate[0:3]) < reach, axis=1)
                if not clash.any():
                    break
            # After too many clashes the last candidate is kept: crowded scans overlap.
            placed[i] = candidate
        placed = placed[np.argsort(placed[:, 2], kind="stable")]
        x, y, frame = placed[:, 0], placed[:, 1], placed[:, 2]
        sigma_x, sigma_y, sigma_frame = placed[:, 3], placed[:, 4], placed[:, 5]

        k, iy, ix = (np.rint(a).astype(np.int64) for a in (frame, y, x))
        noise = np.sqrt(self._background_at(k, iy, ix) + READ_NOISE_COUNTS**2)
        # Peaks are drawn against the noise the spot would have without the direct beam, so a
        # spot's brightness does not depend on landing in the beam: outside it the snr is
        # log-uniform over SPOT_SNR, inside it the beam's shot noise makes it much lower.
        noise_beside_beam = np.sqrt(self.glow[iy, ix] * self.source_intensity(k) + READ_NOISE_COUNTS**2)
        snr_lo, snr_hi = SPOT_SNR
        peak = noise_beside_beam * np.exp(rng.uniform(math.log(snr_lo), math.log(snr_hi), size=n_spots))

        x0, y0, w, h = self.direct_beam_bbox
        in_beam = (x >= x0 - 0.5) & (x < x0 + w - 0.5) & (y >= y0 - 0.5) & (y < y0 + h - 0.5)
        beside = np.flatnonzero(~in_beam)
        # Twice the saturation level, so that even a spot centred between pixels and frames saturates.
        brightest_beside = beside[np.argsort(peak[beside])[::-1]]
        peak[brightest_beside[:n_spots // SPOTS_PER_SATURATED_SPOT]] = SATURATED_PEAK_COUNTS
        return {"x": x, "y": y, "frame": frame, "sigma_x": sigma_x, "sigma_y": sigma_y, "sigma_frame": sigma_frame,
                "peak": peak, "noise": noise, "snr": peak / noise, "in_direct_beam": in_beam.astype(np.uint8)}

    def _sigma_frame(self, x: float) -> float:
        """Frames a spot lasts grow towards the rotation axis (the centre column)."""
        nx = self.shape[1]
        distance = abs(x - (nx - 1) / 2) / nx
        return float(np.clip(0.6 + 0.25 / (distance + 0.05), *SPOT_SIGMA_FRAME))

    def _background_at(self, k: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Noiseless beam + glow at frames ``k``, rows ``iy`` and columns ``ix`` (integer arrays)."""
        counts = self.glow[iy, ix]
        x0, y0, w, h = self.direct_beam_bbox
        in_beam = (ix >= x0) & (ix < x0 + w) & (iy >= y0) & (iy < y0 + h)
        for frame_k in np.unique(k[in_beam]):
            sel = np.flatnonzero(in_beam & (k == frame_k))
            col = ix[sel] - x0
            transmitted = self._beam_x[col] * self._transmission(frame_k)[col]
            counts[sel] += BEAM_COUNTS * self._beam_y[iy[sel] - y0] * transmitted
        return counts * self.source_intensity(k)

    def _integrals(self, spots: dict[str, np.ndarray], amplitude: np.ndarray) -> np.ndarray:
        """Sum of each spot's rendered, noiseless counts (same windows as the renderer)."""
        ny, nx = self.shape
        _, wx = _windows(spots["x"], spots["sigma_x"], nx, SPOT_SIGMA_XY_PX[1])
        _, wy = _windows(spots["y"], spots["sigma_y"], ny, SPOT_SIGMA_XY_PX[1])
        kf, wf = _windows(spots["frame"], spots["sigma_frame"], self.frames, SPOT_SIGMA_FRAME[1])
        per_frame = (wf * self.source_intensity(kf)).sum(axis=1)
        return amplitude * per_frame * wx.sum(axis=1) * wy.sum(axis=1)

    def add_spots(self, image: np.ndarray, k: int) -> np.ndarray:
        """Add the noiseless spots of frame ``k`` to ``image`` (float64, in place) and return it.

        Only spots within the cutoff of frame ``k`` are rendered, each in a
        small patch.
        """
        s = self.spots
        active = np.flatnonzero(np.abs(k - s["frame"]) <= SPOT_CUTOFF_SIGMAS * s["sigma_frame"])
        if active.size == 0:
            return image
        ny, nx = self.shape
        height = self._amplitude[active] * self.source_intensity(k) * _gauss(k - s["frame"][active],
                                                                             s["sigma_frame"][active])
        ix, wx = _windows(s["x"][active], s["sigma_x"][active], nx, SPOT_SIGMA_XY_PX[1])
        iy, wy = _windows(s["y"][active], s["sigma_y"][active], ny, SPOT_SIGMA_XY_PX[1])
        counts = height[:, None, None] * wy[:, :, None] * wx[:, None, :]
        flat_index = iy[:, :, None] * nx + ix[:, None, :]
        np.add.at(image.reshape(-1), flat_index.ravel(), counts.ravel())
        return image

    def signal(self, k: int) -> np.ndarray:
        """Noiseless photon counts of frame ``k``: beam + glow + spots (float64), 0 with the shutter closed."""
        if k < self.shutter_closed_frames:
            return np.zeros(self.shape)
        return self.add_spots(self.background(k), k)

    # --- noisy frames -------------------------------------------------------

    def zingers(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cosmic-ray hits of frame ``k`` as ``(y, x, excess_counts)``, one entry per hit pixel."""
        ny, nx = self.shape
        rng = np.random.default_rng((self.seed, _ZINGER_STREAM, k))
        n = rng.poisson(ZINGERS_PER_512X512 * ny * nx / 512**2)
        y, x = rng.integers(0, ny, size=n), rng.integers(0, nx, size=n)
        # A pair is the hit pixel plus its right or lower neighbour (the other way at the far edge).
        pair = rng.random(n) < ZINGER_PAIR_PROBABILITY
        down = rng.random(n) < 0.5
        y2 = np.where(down, np.where(y + 1 < ny, y + 1, y - 1), y)[pair]
        x2 = np.where(down, x, np.where(x + 1 < nx, x + 1, x - 1))[pair]
        y_all, x_all = np.concatenate([y, y2]), np.concatenate([x, x2])
        return y_all, x_all, rng.uniform(*ZINGER_EXCESS_COUNTS, size=y_all.size)

    def frame(self, k: int) -> np.ndarray:
        """Raw detector frame ``k`` (uint16): Poisson(signal) + offsets + hot pixels + read noise + zingers."""
        rng = np.random.default_rng((self.seed, _NOISE_STREAM, k))
        signal = self.signal(k)
        counts = rng.poisson(signal * self.gain).astype(np.float32)
        counts += self.fixed_pattern
        counts += self.read_noise * rng.standard_normal(self.shape, dtype=np.float32)
        y, x, excess = self.zingers(k)
        np.add.at(counts, (y, x), excess.astype(np.float32))
        counts[self.dead] = 0
        return _digitise(counts)

    def dark_frame(self, i: int) -> np.ndarray:
        """Dark frame ``i`` (uint16): offsets + hot pixels + read noise, no beam."""
        rng = np.random.default_rng((self.seed, _DARK_STREAM, i))
        counts = self.read_noise * rng.standard_normal(self.shape, dtype=np.float32)
        counts += self.fixed_pattern
        counts[self.dead] = 0
        return _digitise(counts)

    def flat_frame(self, i: int) -> np.ndarray:
        """Flat-field frame ``i`` (uint16): a uniform ``FLAT_COUNTS`` photons x gain, + offsets and read noise."""
        rng = np.random.default_rng((self.seed, _FLAT_STREAM, i))
        counts = rng.poisson(FLAT_COUNTS * self.gain).astype(np.float32)
        counts += self.fixed_pattern
        counts += self.read_noise * rng.standard_normal(self.shape, dtype=np.float32)
        counts[self.dead] = 0
        return _digitise(counts)


def _digitise(counts: np.ndarray) -> np.ndarray:
    """Round to integer counts and saturate like a 16-bit detector."""
    np.rint(counts, out=counts)
    np.clip(counts, 0, SATURATION_COUNTS, out=counts)
    return counts.astype(np.uint16)


def _default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def iter_frames(model: ScanModel, *, workers: int | None = None) -> Iterator[np.ndarray]:
    """Yield the raw frames of ``model`` in order, rendering a few ahead in threads.

    The noise generators release the GIL, so threads give a near-linear
    speed-up; at most ``2 * workers`` frames are in flight at any time.
    """
    workers = workers or _default_workers()
    if workers == 1:
        yield from map(model.frame, range(model.frames))
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for k in range(model.frames):
            pending.append(pool.submit(model.frame, k))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def simulate_scan(
    path: str | os.PathLike,
    *,
    frames: int = 720,
    size: int | Sequence[int] = 512,
    spots: int = 400,
    seed: int = 0,
    dark_frames: int = 20,
    dtype: str | np.dtype = "uint16",
    compression=None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    flat_frames: int = 0,
    model: ScanModel | None = None,
    layout: str = "scan",
    **defects,
) -> ScanTruth:
    """Write a simulated DCT scan and its ground truth to the HDF5 file ``path``.

    ``size`` is the frame size in pixels, an int (square) or ``(ny, nx)``.
    ``dtype`` is the stored type of the frames and darks (the detector itself
    saturates at 65535). ``compression`` goes to h5py as is: None, "gzip" or
    an hdf5plugin filter such as ``hdf5plugin.Bitshuffle()``. ``progress``, if
    given, is called as ``progress(frames_done, frames_total)`` after every
    written frame, darks included. ``workers`` is the number of rendering
    threads (default: up to 4, as many as there are cores). Frames are
    rendered and written one at a time.  ``defects`` are `ScanModel`'s
    ``hot_pixel_fraction``, ``dead_pixel_fraction``, ``module_gap_px``, ``gain_spread`` and
    ``shutter_closed_frames``; ``flat_frames`` > 0 adds a flat-field scan.
    ``model``, if given, is the scene to write (a `ScanModel` or a subclass, e.g.
    ``simulators.hard_scans.HardScanModel``) and ``frames``, ``size``, ``spots``,
    ``seed`` and ``defects`` are not used; its ``spots`` may hold more columns.

    Layout (the file is overwritten)::

        /1.1/title                  "dct scan"
        /1.1/start_time, end_time   ISO 8601 strings (a simulated clock)
        /1.1/measurement/marana     (frames, ny, nx) raw frames, one frame per chunk
        /1.1/measurement/diffrz     (frames,) float64 psi in degrees, k * 360 / frames
        /1.1/ground_truth/          one 1-D dataset per column, one row per spot:
            x, y, frame             float64 true centre, 0-based, pixel centres at integers
            sigma_x, sigma_y        float64 Gaussian widths in pixels
            sigma_frame             float64 Gaussian width in frames
            peak                    float64 peak height above background (counts, noiseless,
                                    scaled by the source intensity at the spot's frame)
            integral                float64 sum of the spot's noiseless counts
            noise                   float64 raw noise std at the peak pixel:
                                    sqrt(background + read_noise**2)
            snr                     float64 peak / noise; log-uniform over [2, 300] outside the
                                    direct beam, much lower inside it (same peaks, more noise);
                                    one spot in 200 (the brightest beside the beam) instead has
                                    peak = 2 * 65535 and saturates the detector
            in_direct_beam          uint8   1 if the centre is inside direct_beam_bbox
          attributes: direct_beam_bbox [x0, y0, width, height], read_noise,
                      quadrant_offsets [top-left, top-right, bottom-left, bottom-right], seed
        /2.1/title                  "dark"
        /2.1/measurement/marana     (dark_frames, ny, nx) offsets + read noise + hot pixels
        /3.1/measurement/marana     (flat_frames, ny, nx) FLAT_COUNTS x gain + offsets + noise,
                                    only when flat_frames > 0

    ``layout="dct"`` writes a DCT dataset file in the Bliss DCT layout instead, each scan with
    ``instrument/positioners`` (diffrz, samy) and ``positioners_start``::

        /1.1  "loopscan N 0.1 (references, sample out)"  flat_frames (default 10) flat frames, samy out
        /2.1  "fscan diffrz 0 <step> <frames> 0.1"      the rotation scan, its ground_truth, diffrz moving
        /3.1  the references after, as /1.1
        /4.1  "dark"                                    dark_frames dark frames
    """
    dtype = np.dtype(dtype)
    if dtype not in _ALLOWED_DTYPES:
        raise InputError(f"simulate_scan: unsupported dtype, expected one of "
                         f"{', '.join(map(str, _ALLOWED_DTYPES))}, got {dtype}")
    if layout not in ("scan", "dct"):
        raise InputError(f"simulate_scan: layout: expected scan or dct, got {layout!r}")
    dark_frames = _check_count("dark_frames", dark_frames, 1)
    if model is None:
        model = ScanModel(frames=frames, size=size, spots=spots, seed=seed, **defects)
    flat_frames = _check_count("flat_frames", flat_frames, 0)
    if layout == "dct":
        flat_frames = flat_frames or 10
    path = os.fspath(path)
    ny, nx = model.shape
    names = ({"scan": DCT_SCAN, "dark": DCT_DARK, "flats": (DCT_REFS_BEFORE, DCT_REFS_AFTER)} if layout == "dct"
             else {"scan": "1.1", "dark": "2.1", "flats": ("3.1",) if flat_frames else ()})
    total = model.frames + dark_frames + flat_frames * len(names["flats"])
    done = 0

    def stack(name: str, n: int, render: Callable[[int], np.ndarray] | Iterator[np.ndarray]) -> None:
        nonlocal done
        images = f.create_dataset(f"{name}/measurement/marana", shape=(n, ny, nx), dtype=dtype,
                                  chunks=(1, ny, nx), compression=compression)
        for i, image in enumerate(map(render, range(n)) if callable(render) else render):
            images[i] = image
            done += 1
            if progress is not None:
                progress(done, total)

    def positioners(name: str, **values) -> None:
        for motor, value in values.items():
            f[f"{name}/instrument/positioners/{motor}"] = value
            f[f"{name}/instrument/positioners_start/{motor}"] = np.ravel(value)[0]

    clock = START_TIME
    with h5py.File(path, "w") as f:
        for name in names["flats"][:1] if layout == "dct" else ():
            f[f"{name}/title"] = DCT_REF_TITLE.format(frames=flat_frames)
            positioners(name, diffrz=0.0, samy=SAMPLE_OUT_SAMY_MM)
            stack(name, flat_frames, model.flat_frame)
        scan = f.create_group(names["scan"])
        scan["title"] = ("dct scan" if layout == "scan"
                         else DCT_SCAN_TITLE.format(step=360.0 / model.frames, frames=model.frames))
        scan["start_time"] = clock.isoformat()
        scan["end_time"] = (clock + dt.timedelta(seconds=EXPOSURE_S * model.frames)).isoformat()
        if layout == "dct":
            positioners(names["scan"], diffrz=model.psi_deg(), samy=0.0)
            scan["measurement/diffrz"] = h5py.SoftLink(f"/{names['scan']}/instrument/positioners/diffrz")
        else:
            f[ANGLES_PATH] = model.psi_deg()
        stack(names["scan"], model.frames, iter_frames(model, workers=workers))

        truth = f.create_group(f"{names['scan']}/ground_truth")
        for name, column in model.spots.items():
            truth[name] = column
        truth.attrs["direct_beam_bbox"] = np.asarray(model.direct_beam_bbox, dtype=np.int64)
        truth.attrs["read_noise"] = model.read_noise
        truth.attrs["quadrant_offsets"] = np.asarray(model.quadrant_offsets)
        truth.attrs["seed"] = model.seed

        for name in names["flats"][1:] if layout == "dct" else names["flats"]:
            f[f"{name}/title"] = DCT_REF_TITLE.format(frames=flat_frames) if layout == "dct" else "flat"
            if layout == "dct":
                positioners(name, diffrz=360.0, samy=SAMPLE_OUT_SAMY_MM)
            stack(name, flat_frames, model.flat_frame)
        f[f"{names['dark']}/title"] = "dark"
        if layout == "dct":
            positioners(names["dark"], diffrz=360.0, samy=SAMPLE_OUT_SAMY_MM)
        stack(names["dark"], dark_frames, model.dark_frame)

    scan_url = f"{path}::/{names['scan']}"
    truth = ScanTruth(path=path, frames_url=f"{scan_url}/measurement/marana",
                      angles_url=(f"{scan_url}/instrument/positioners/diffrz" if layout == "dct"
                                  else f"{path}::{ANGLES_PATH}"),
                      dark_url=f"{path}::/{names['dark']}/measurement/marana", spots=model.spots,
                      direct_beam_bbox=tuple(int(v) for v in model.direct_beam_bbox))
    if flat_frames:
        truth = dataclasses.replace(truth, flat_url=f"{path}::/{names['flats'][0]}/measurement/marana")
    return truth


def _truth(path: str, spots: dict[str, np.ndarray], bbox: Sequence[int]) -> ScanTruth:
    return ScanTruth(path=path, frames_url=f"{path}::{FRAMES_PATH}", angles_url=f"{path}::{ANGLES_PATH}",
                     dark_url=f"{path}::{DARK_PATH}", spots=spots, direct_beam_bbox=tuple(int(v) for v in bbox))


def read_truth(path: str | os.PathLike) -> ScanTruth:
    """Read back the ground truth that ``simulate_scan`` wrote to ``path`` (either layout)."""
    path = os.fspath(path)
    if not Path(path).is_file():
        raise InputError(f"read_truth: no such file, expected a simulated scan, got {path}")
    with h5py.File(path, "r") as f:
        where = TRUTH_PATH if TRUTH_PATH in f else f"/{DCT_SCAN}/ground_truth"
        if where not in f:
            raise InputError(f"read_truth: {path} has no {TRUTH_PATH}, expected a simulated scan, "
                             f"got groups {sorted(f)}")
        group = f[where]
        missing = [name for name in TRUTH_COLUMNS if name not in group]
        if missing:
            raise InputError(f"read_truth: {path}::{where} lacks columns, expected {list(TRUTH_COLUMNS)}, "
                             f"got {sorted(group)}")
        spots = {name: group[name][()] for name in TRUTH_COLUMNS}
        bbox = group.attrs["direct_beam_bbox"]
        dct = where != TRUTH_PATH
    truth = _truth(path, spots, bbox)
    if dct:
        scan = f"{path}::/{DCT_SCAN}"
        truth = dataclasses.replace(truth, frames_url=f"{scan}/measurement/marana",
                                    angles_url=f"{scan}/instrument/positioners/diffrz",
                                    dark_url=f"{path}::/{DCT_DARK}/measurement/marana",
                                    flat_url=f"{path}::/{DCT_REFS_BEFORE}/measurement/marana")
    return truth
