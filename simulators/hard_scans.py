"""Hard DCT scans for validating spot finding at default settings.

Each scan reuses `ScanModel`'s detector (quadrant offsets, hot pixels, read
noise, zingers, 16-bit saturation) and background (direct beam with the
sample's shadow, glow, source ripple and decay), changes one thing that makes
spot finding hard, and draws its own spots: Gaussian spots like `ScanModel`'s
or grain-shaped ones (random convex polygons 8-50 px across with an intensity
ramp and soft edges), each with a Gaussian rocking curve over frames.  A spot's
counts in frame ``k`` are ``amplitude * source_intensity(k) * rocking(k) *
footprint``, so its truth -- centroid, integral, peak -- is computed from
exactly what is added to the noiseless frames.

The scans (`SCANS`): ``clean`` (a steady source: the reference for speed), ``no_beam`` (no direct beam on the detector), ``topup``
(+3 % source step at 55 % of the scan), ``oscillating`` (20 % source ripple,
41-frame period), ``strong_glow`` (10x the glow), ``wrap360`` (spots crossing
0/360 deg), ``grains`` (grain-shaped spots), ``grains_topup_wrap`` (grain
spots, a top-up and the 0/360 crossing together), ``overlaps`` (touching spot
pairs with separate maxima), ``bright_start`` (bright spots in the first 5
frames) and ``photon_counting`` (uint32 counts, no offsets or read noise, a
background of 0-0.5 counts per pixel, no direct beam, gaps between the 2 x 2
modules at the invalid value 0xFFFFFFFF, as an Eiger writes them), ``moving_beam`` (a direct
beam whose box moves and grows with psi) and ``beam_lost`` (the beam lost for a few frames, and two frames
of a readout glitch: one all 0, one all at the top of the type).

Frames are written by `simulate_scan` in its Bliss-like layout; the ground
truth holds `simulate_scan`'s columns (``x``, ``y``, ``frame`` are the centroid
of the noiseless spot; ``integral`` its total counts as added to the raw
frames; ``sigma_*`` second moments; ``noise`` the raw noise at the peak pixel,
sqrt(background + read_noise**2), at least 1 count for photon counting) and
more: ``size_x``, ``size_y`` (footprint extent, px), ``first_frame``,
``last_frame`` (the frames the spot is drawn in; first > last when it crosses
0/360 deg), ``crosses_wrap``, ``partner`` (the other spot of a touching
pair, -1 if none), ``frame_normalised`` (the centroid along psi of its counts
divided by the source intensity of their frame: its rocking curve's, which a
rippling or stepping source does not move) and ``visible_x``, ``visible_y``,
``visible_frame``, ``visible_fraction`` (the same centroid of its normalised
counts outside the direct beam, and their fraction of them all).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numba
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import ConvexHull
from scipy.special import erf

from simulators.dct_scan import (_NOISE_STREAM, BEAM_COUNTS, BEAM_EDGE_INSET_PX, BEAM_EDGE_SIGMA_PX, GLOW_COUNTS,
                                 READ_NOISE_COUNTS, SOURCE_DECAY, SOURCE_RIPPLE, SOURCE_RIPPLE_PERIOD_FRAMES,
                                 SPOT_CUTOFF_SIGMAS, TRUTH_PATH, ScanModel, ScanTruth, _truth, simulate_scan)

_SPOT_STREAM = 10  # rng stream of the hard scans' spots, apart from ScanModel's
_ZINGER_BLOCK_STREAM = 11
# zinger_blocks: counts of a zinger the 3x3 median does not take out (ScanModel's are 1 or 2 px), on 16 bits
ZINGER_BLOCK_COUNTS = (2000.0, 10000.0)
ZINGER_BLOCK_NEAR_SPOT_PX = 4
_DARK_STREAM = 3

GAUSS_SIGMA_XY_PX = (0.8, 2.5)
GRAIN_SIZE_PX = (8.0, 50.0)
GRAIN_SIGMA_FRAME = (0.7, 2.5)
GRAIN_EDGE_SIGMA_PX = 0.6
# Streaks: a grain's mosaic spread draws its spot out along the Debye-Scherrer ring, tangential about the
# detector's centre; sigma along and across it.
STREAK_SIGMA_LONG_PX = (3.0, 10.0)
STREAK_SIGMA_WIDE_PX = (0.8, 1.5)
SPOT_SNR = (3.0, 200.0)
BRIGHT_SNR = (30.0, 300.0)
MAX_PEAK_COUNTS = 20000.0  # well below saturation, so the raw frames hold the whole integral
BORDER_PX = 6
PLACEMENT_TRIES = 200
# A footprint pixel below this fraction of its maximum is left out (so a spot's extent is finite).
FOOTPRINT_FLOOR = 1e-3

EXTERNAL_PEAK_COUNTS = 3000.0  # peak of the thickest external spot (no structure factors: thickness only)
EXTERNAL_SIGMA_FRAME = (0.6, 1.5)

# Overlapping spots are told apart when the dimmer one has a maximum of its own in the noiseless frames
# that stands this many times the noise there (background and photon noise at the saddle) above the saddle
# joining it to a brighter one -- as a spot is detectable when its peak stands 5 x the noise above 0.
RESOLVE_SIGMAS = 5.0

PHOTON_BACKGROUND_MAX = 0.5  # counts a pixel a frame, where the glow is brightest
INVALID_UINT32 = np.iinfo(np.uint32).max  # a photon-counting detector's mark of a pixel without data

FULL_FRAMES, FULL_SIZE = 720, 512
QUICK_FRAMES, QUICK_SIZE = 360, 256

# name -> HardScanModel options (spots are for the full size; scaled down by quick).
SCANS: dict[str, dict] = {
    "clean": dict(ripple=0.0, decay=0.0, spots=250),  # steady source: the fps reference
    "no_beam": dict(beam=False, glow_scale=0.3, spots=250),
    "topup": dict(topup_at=0.55, topup_step=0.03, spots=250),
    "oscillating": dict(ripple=0.20, ripple_period_frames=41.0, spots=250),
    "strong_glow": dict(glow_scale=10.0, spots=250),
    "wrap360": dict(wrap=True, wrap_spots=16, spots=250),
    "grains": dict(spot_shape="grain", spots=220),
    # far-field spots drawn out along the ring by mosaic spread: sigma 3-10 px along, 0.8-1.5 px across
    "streaks": dict(spot_shape="streak", spots=220),
    "grains_topup_wrap": dict(spot_shape="grain", spots=220, topup_at=0.55, topup_step=0.03, wrap=True,
                              wrap_spots=12),
    "overlaps": dict(pairs=40, spots=150),
    "bright_start": dict(early_spots=16, spots=250),
    # a beam whose footprint follows psi: over the scan it moves right by 6 % of the detector and grows
    # 10 % wider and 4 % taller (its right edge 0.08 px a frame)
    "moving_beam": dict(beam_motion=(0.06, 0.0, 0.10, 0.04), spots=250),
    # the beam lost for 12 frames at 40 % of the scan, and frames read all 0 and all 65535 at 70 and 75 %
    "beam_lost": dict(beam_lost=(0.4, 12), glitches=(0.7, 0.75), spots=250),
    # a psi step 3 x finer (0.033 deg where the others are 0.1): rocking curves 3 x as many frames, 3.4-12 frames
    # sigma (longer near the rotation axis), up to 40 frames above 0.3 x their peak: more than max_blob_size's 25
    "fine_step": dict(rocking_scale=3.0, spots=250),
    # an Eiger-like detector: a background of 0-0.5 counts a pixel, gaps between its 2 x 2 modules
    "photon_counting": dict(photon_counting=True, beam=False, glow_scale=PHOTON_BACKGROUND_MAX / GLOW_COUNTS,
                            module_gap_px=4, spots=250),
    # the same detector under 5x the glow: 0-2.5 counts a pixel, where a count's median steps from 0 to 2 and
    # lies up to 0.69 below its mean
    "photon_counting_glow": dict(photon_counting=True, beam=False,
                                 glow_scale=5 * PHOTON_BACKGROUND_MAX / GLOW_COUNTS, module_gap_px=4, spots=250),
    # 20 zingers a 512 x 512 frame that the 3x3 median leaves (blocks of up to 3 x 3 px, tracks), and one on a
    # third of the spots
    "zingers": dict(zinger_blocks=20.0, spots=250),
}


class HardScanModel(ScanModel):
    """A `ScanModel` background and detector with one hard feature, and its own spots (see the module doc).

    ``beam``: a direct beam on the detector; ``glow_scale``: factor on the glow; ``ripple``,
    ``ripple_period_frames``, ``decay``: the source intensity's ripple and decay; ``topup_at``,
    ``topup_step``: the source steps up by ``topup_step`` from frame ``topup_at * frames`` on;
    ``wrap``: the scan is a full turn whose last frame neighbours the first, spots may cross it and
    ``wrap_spots`` of them are centred within 1.5 frames of 0/360 deg; ``spot_shape``: ``gauss`` or
    ``grain``; ``pairs``: touching spot pairs (Gaussian, 3-4.5 sigma apart, brightness within 2x);
    ``early_spots``: bright spots centred in frames 0-5; ``photon_counting``: uint32 Poisson counts,
    no offsets, read noise or zingers, hot pixels counting 10-40 a frame, ``module_gap_px`` gaps at 0xFFFFFFFF
    (no spot is placed on them).  ``external_spots``: an HDF5 file
    of spots made elsewhere (`benchmarks/independent_scan.py`: footprints, places and fractional frames)
    used instead of drawn ones, each given a rocking curve and a peak of `EXTERNAL_PEAK_COUNTS` x its
    thickness relative to the thickest.  ``beam_motion``: ``(shift_x, shift_y, grow_x, grow_y)``, fractions
    of the detector's width and height by which the beam box moves and grows (about its centre) linearly
    from the first frame to the last; ``direct_beam_bbox`` is then the box that holds every position, and
    ``in_direct_beam`` says whether a spot's centre is in the beam at its brightest frame.  ``rocking_scale``:
    every spot's rocking curve that many times as many frames long (a finer psi step).  ``beam_lost``:
    ``(at, frames)``, the source off (no background, no spots: the dark alone) for that many frames from
    that fraction of the scan; a spot there is seen only in its other frames (``visible_*``, as a spot the
    direct beam partly hides).  ``glitches``: fractions of the scan at which a frame is read wrong, all 0
    and all at the top of the type in turn (the truth as if it were read right).  ``zinger_blocks``: zingers a
    512 x 512 px frame besides ScanModel's (which the 3x3 median takes out): blocks of 1-3 x 1-3 px and, one
    in five, tracks 2 px wide and 4-10 long, of `ZINGER_BLOCK_COUNTS` each; and one more on a third of the spots,
    within `ZINGER_BLOCK_NEAR_SPOT_PX` of its centre in one of its frames above 0.3 x its peak.
    """

    def __init__(self, *, frames: int = FULL_FRAMES, size: int = FULL_SIZE, spots: int = 250, seed: int = 0,
                 beam: bool = True, glow_scale: float = 1.0, ripple: float = SOURCE_RIPPLE,
                 ripple_period_frames: float = SOURCE_RIPPLE_PERIOD_FRAMES, decay: float = SOURCE_DECAY,
                 topup_at: float | None = None, topup_step: float = 0.03, wrap: bool = False,
                 wrap_spots: int = 0, spot_shape: str = "gauss", pairs: int = 0, early_spots: int = 0,
                 photon_counting: bool = False, external_spots: str | os.PathLike | None = None,
                 module_gap_px: int = 0, beam_motion: tuple[float, float, float, float] | None = None,
                 rocking_scale: float = 1.0, beam_lost: tuple[float, int] | None = None,
                 glitches: tuple[float, ...] = (), zinger_blocks: float = 0.0):
        if spot_shape not in ("gauss", "grain", "streak"):
            raise ValueError(f"HardScanModel: spot_shape must be gauss, grain or streak, got {spot_shape!r}")
        if wrap_spots and not wrap:
            raise ValueError("HardScanModel: wrap_spots needs wrap=True")
        self._ripple, self._ripple_period, self._decay = ripple, ripple_period_frames, decay
        start = None if beam_lost is None else int(beam_lost[0] * frames)
        self._lost = None if beam_lost is None else (start, start + beam_lost[1])
        self.glitches = tuple(int(g * frames) for g in glitches)
        self.zinger_blocks = float(zinger_blocks)
        self._topup_frame = None if topup_at is None else topup_at * frames
        self._topup_step = topup_step
        self.rocking_scale = float(rocking_scale)
        self.beam, self.wrap, self.photon_counting = beam, wrap, photon_counting
        super().__init__(frames=frames, size=size, spots=0, seed=seed, module_gap_px=module_gap_px)
        self.glow = self.glow * glow_scale
        if photon_counting:
            self.read_noise = 0.0
            self.quadrant_offsets = (0.0, 0.0, 0.0, 0.0)
            self._hot_rate = self.hot_pixel_excess / 100.0
        if not beam:
            self.direct_beam_bbox = (0, 0, 0, 0)
        self.beam_motion = None if not beam or beam_motion is None else tuple(float(v) for v in beam_motion)
        if self.beam_motion is not None:
            ny, nx = self.shape
            self._beam_start = tuple(float(v) for v in self.direct_beam_bbox)
            self._sample_offset_px = np.arange(nx) - (nx - 1) / 2  # the sample's transmission over every column
            boxes = np.array([self.beam_box(0), self.beam_box(frames - 1)])
            x0, y0 = np.floor(boxes[:, :2].min(axis=0)).astype(int)
            x1, y1 = np.ceil((boxes[:, :2] + boxes[:, 2:]).max(axis=0)).astype(int)
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, nx), min(y1, ny)
            self.direct_beam_bbox = (int(x0), int(y0), int(x1 - x0), int(y1 - y0))
        rng = np.random.default_rng((self.seed, _SPOT_STREAM))
        self._patches: list[np.ndarray] = []
        self._origin: list[tuple[int, int]] = []
        self._rock: list[tuple[np.ndarray, np.ndarray]] = []  # (frames drawn in, unwrapped frames) per spot
        self._sigma_frames: list[float] = []
        self._frame0: list[float] = []
        self._amp: list[float] = []
        self._partner: list[int] = []
        self._boxes: list[tuple[float, float, float, float, float, float]] = []  # x, y, frame, half extents
        if external_spots is not None:
            self._load_external(rng, external_spots)
        for _ in range(pairs):
            self._place_pair(rng)
        for _ in range(early_spots):
            self._place(rng, "gauss", frame_range=(0.0, 5.0), snr_range=BRIGHT_SNR)
        for _ in range(wrap_spots):
            self._place(rng, spot_shape, frame_range=(-1.5, 1.5), snr_range=SPOT_SNR, sigma_frame_min=1.0)
        full = (0.0, float(frames)) if wrap else (3.0, frames - 4.0)
        for _ in range(spots):
            self._place(rng, spot_shape, frame_range=full, snr_range=SPOT_SNR)
        self._by_frame: list[list[tuple[int, float]]] = [[] for _ in range(frames)]
        for i, (ks, ku) in enumerate(self._rock):
            for k, g in zip(ks, self._rocking(i, ku)):
                self._by_frame[k].append((i, g))
        self.spots = self._truth_columns()
        self._zingers_on_spots = self._aim_zingers() if self.zinger_blocks else {}

    # --- background ---------------------------------------------------------

    def source_intensity(self, frame):
        frame = np.asarray(frame, dtype=np.float64)
        ripple = 1.0 + self._ripple * np.sin(2 * np.pi * frame / self._ripple_period)
        out = ripple * (1.0 - self._decay * frame / self.frames)
        if self._topup_frame is not None:
            out = out * np.where(frame >= self._topup_frame, 1.0 + self._topup_step, 1.0)
        if self._lost is not None:
            out = out * np.where((frame >= self._lost[0]) & (frame < self._lost[1]), 0.0, 1.0)
        return out

    def _source_on(self, frame):
        """The source intensity had the beam not been lost: what spots are placed by (their brightness
        does not depend on when the beam was lost)."""
        lost, self._lost = self._lost, None
        try:
            return self.source_intensity(frame)
        finally:
            self._lost = lost

    def _beam_counts(self, k: int) -> np.ndarray:
        counts = super()._beam_counts(k)
        return counts if self.beam else np.zeros_like(counts)

    def beam_box(self, k: float) -> tuple[float, float, float, float]:
        """The moving beam's box ``(x0, y0, width, height)`` at frame ``k`` (pixels, fractional)."""
        ny, nx = self.shape
        t = k / max(self.frames - 1, 1)
        sx, sy, gx, gy = self.beam_motion
        x0, y0, w, h = self._beam_start
        return (x0 + (sx - gx / 2) * nx * t, y0 + (sy - gy / 2) * ny * t, w + gx * nx * t, h + gy * ny * t)

    def background(self, k: int) -> np.ndarray:
        if self.beam_motion is None:
            return super().background(k)
        x0, y0, w, h = self.beam_box(k)
        scale = math.sqrt(2) * BEAM_EDGE_SIGMA_PX

        def edges(start, size, n):  # ScanModel's flat top with blurred edges, at a fractional place
            pos = np.arange(n, dtype=np.float64)
            return 0.5 * (erf((pos - start - BEAM_EDGE_INSET_PX) / scale)
                          - erf((pos - (start + size - 1 - BEAM_EDGE_INSET_PX)) / scale))

        ny, nx = self.shape
        beam = BEAM_COUNTS * np.outer(edges(y0, h, ny), edges(x0, w, nx) * self._transmission(k))
        return (self.glow + beam) * self.source_intensity(k)

    # --- spots --------------------------------------------------------------

    def _footprint(self, rng: np.random.Generator, shape: str, fx: float, fy: float,
                   at: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """A footprint with max 1 whose drawn centre is (half + fx, half + fy) in its own pixels; ``at``: that
        centre's (x, y) on the detector (a streak runs tangential about the detector's centre)."""
        if shape == "streak":
            along, across = rng.uniform(*STREAK_SIGMA_LONG_PX), rng.uniform(*STREAK_SIGMA_WIDE_PX)
            ny, nx = self.shape
            radial = math.atan2(at[1] - (ny - 1) / 2, at[0] - (nx - 1) / 2)
            cos, sin = math.cos(radial + math.pi / 2), math.sin(radial + math.pi / 2)
            half = math.ceil(SPOT_CUTOFF_SIGMAS * along)
            ox = (np.arange(2 * half + 1) - half - fx)[None, :]
            oy = (np.arange(2 * half + 1) - half - fy)[:, None]
            u, v = (ox * cos + oy * sin) / along, (-ox * sin + oy * cos) / across
            r2 = u ** 2 + v ** 2
            patch = np.where(r2 <= SPOT_CUTOFF_SIGMAS ** 2, np.exp(-0.5 * r2), 0.0)
        elif shape == "gauss":
            sx, sy = rng.uniform(*GAUSS_SIGMA_XY_PX, size=2)
            half = math.ceil(SPOT_CUTOFF_SIGMAS * max(sx, sy))
            ox = np.arange(2 * half + 1) - half - fx
            oy = np.arange(2 * half + 1) - half - fy
            gx = np.where(np.abs(ox) <= SPOT_CUTOFF_SIGMAS * sx, np.exp(-0.5 * (ox / sx) ** 2), 0.0)
            gy = np.where(np.abs(oy) <= SPOT_CUTOFF_SIGMAS * sy, np.exp(-0.5 * (oy / sy) ** 2), 0.0)
            patch = np.outer(gy, gx)
        else:
            diameter = rng.uniform(*GRAIN_SIZE_PX)
            a = diameter / 2
            b = a * rng.uniform(0.5, 1.0)
            theta = rng.uniform(0, np.pi)
            phi = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(5, 11)))
            r = rng.uniform(0.75, 1.0, size=phi.size)
            u, v = a * r * np.cos(phi), b * r * np.sin(phi)
            vx = u * math.cos(theta) - v * math.sin(theta)
            vy = u * math.sin(theta) + v * math.cos(theta)
            hull = ConvexHull(np.column_stack([vx, vy]))
            half = math.ceil(a) + 3
            sub = 4  # supersampling per pixel side: partial coverage at the edges
            grid = (np.arange((2 * half + 1) * sub) + 0.5) / sub - 0.5 - half
            px, py = grid[None, :] - fx, grid[:, None] - fy
            inside = np.ones((grid.size, grid.size), bool)
            for nx_, ny_, c in hull.equations:
                inside &= nx_ * px + ny_ * py + c <= 0
            coverage = inside.reshape(2 * half + 1, sub, 2 * half + 1, sub).mean(axis=(1, 3))
            # Grains diffract unevenly (orientation spread, strain): an intensity ramp across the spot.
            direction = rng.uniform(0, 2 * np.pi)
            cx = np.arange(2 * half + 1) - half - fx
            ramp = 1 + 0.4 * (np.cos(direction) * cx[None, :] + np.sin(direction) * cx[:, None]) / a
            patch = gaussian_filter(coverage * np.clip(ramp, 0.3, None), GRAIN_EDGE_SIGMA_PX)
        patch = patch / patch.max()
        patch[patch < FOOTPRINT_FLOOR] = 0.0
        return patch

    def _frames_of(self, frame0: float, sigma_frame: float) -> tuple[np.ndarray, np.ndarray]:
        ku = np.arange(math.ceil(frame0 - SPOT_CUTOFF_SIGMAS * sigma_frame),
                       math.floor(frame0 + SPOT_CUTOFF_SIGMAS * sigma_frame) + 1)
        if self.wrap:
            return ku % self.frames, ku
        ku = ku[(ku >= 0) & (ku < self.frames)]
        return ku, ku

    def _rocking(self, i: int, ku: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((ku - self._frame0[i]) / self._sigma_frames[i]) ** 2)

    def _clashes(self, box, ignore: int = -1) -> bool:
        x, y, f, hx, hy, hf = box
        for j, (x2, y2, f2, hx2, hy2, hf2) in enumerate(self._boxes):
            if j == ignore:
                continue
            df = abs(f - f2)
            if self.wrap:
                df = min(df, self.frames - df)
            if abs(x - x2) < hx + hx2 and abs(y - y2) < hy + hy2 and df < hf + hf2:
                return True
        return False

    def _draw(self, rng, shape, frame_range, sigma_frame_min=0.0, centre=None):
        """One candidate spot: (patch, origin, frame0, sigma_frame, box), or None if it does not fit."""
        ny, nx = self.shape
        if centre is None:
            x, y = rng.uniform(0, nx), rng.uniform(0, ny)
            frame0 = rng.uniform(*frame_range)
        else:
            x, y, frame0 = centre
        ix, iy = math.floor(x), math.floor(y)
        patch = self._footprint(rng, shape, x - ix, y - iy, at=(x, y))
        half = patch.shape[0] // 2
        origin = (iy - half, ix - half)
        if (origin[0] < BORDER_PX or origin[1] < BORDER_PX or origin[0] + patch.shape[0] > ny - BORDER_PX
                or origin[1] + patch.shape[1] > nx - BORDER_PX):
            return None
        if self.dead[origin[0] - 1:origin[0] + patch.shape[0] + 1, origin[1] - 1:origin[1] + patch.shape[1] + 1].any():
            return None  # on a module gap: its counts would not be there to find
        if shape == "grain":
            sigma_frame = rng.uniform(*GRAIN_SIGMA_FRAME)
        else:
            sigma_frame = self._sigma_frame(x)  # as ScanModel: longer near the rotation axis
        sigma_frame = max(self.rocking_scale * sigma_frame, sigma_frame_min)
        if self.wrap:
            frame0 = frame0 % self.frames
        cols, rows = np.nonzero(patch.any(axis=0))[0], np.nonzero(patch.any(axis=1))[0]
        hx = (cols[-1] - cols[0] + 1) / 2 + 1
        hy = (rows[-1] - rows[0] + 1) / 2 + 1
        box = (x, y, frame0, hx, hy, 3.0 * sigma_frame)
        return patch, origin, frame0, sigma_frame, box

    def _add(self, rng, drawn, snr_range, partner=-1, snr=None) -> int:
        patch, origin, frame0, sigma_frame, box = drawn
        i = len(self._patches)
        self._patches.append(patch)
        self._origin.append(origin)
        self._sigma_frames.append(sigma_frame)
        self._frame0.append(frame0)
        ks, ku = self._frames_of(frame0, sigma_frame)
        self._rock.append((ks, ku))
        self._boxes.append(box)
        self._partner.append(partner)
        weight = self._source_on(ks) * self._rocking(i, ku)
        ix, iy = round(box[0]), round(box[1])
        k_peak = int(ks[np.argmax(weight)])
        noise = self._noise_beside_beam(k_peak, iy, ix)
        snr = math.exp(rng.uniform(*np.log(snr_range))) if snr is None else snr
        self._amp.append(min(snr * noise, MAX_PEAK_COUNTS) / weight.max())
        return i

    def _noise_beside_beam(self, k: int, iy: int, ix: int) -> float:
        """Noise a spot would have at (iy, ix) without the direct beam (its brightness then does not
        depend on landing in the beam), at least 1 count."""
        glow = self.glow[iy, ix] * float(self._source_on(k))
        return max(math.sqrt(glow + self.read_noise ** 2), 1.0)

    def _place(self, rng, shape, *, frame_range, snr_range, sigma_frame_min=0.0) -> None:
        drawn = None
        for _ in range(PLACEMENT_TRIES):
            drawn = self._draw(rng, shape, frame_range, sigma_frame_min)
            if drawn is not None and not self._clashes(drawn[4]):
                break
            drawn = None
        if drawn is not None:  # a crowded scan gets fewer spots, never overlapping ones
            self._add(rng, drawn, snr_range)

    def _place_pair(self, rng) -> None:
        for _ in range(PLACEMENT_TRIES):
            first = self._draw(rng, "gauss", (3.0, self.frames - 4.0))
            if first is None or self._clashes(first[4]):
                continue
            sigma = 0.5 * (first[4][3] + first[4][4]) / SPOT_CUTOFF_SIGMAS  # about the spot's sigma
            angle = rng.uniform(0, 2 * np.pi)
            distance = rng.uniform(3.0, 4.5) * max(sigma, GAUSS_SIGMA_XY_PX[0])
            centre = (first[4][0] + distance * math.cos(angle), first[4][1] + distance * math.sin(angle),
                      first[2] + rng.uniform(-1.0, 1.0) * first[3])
            second = self._draw(rng, "gauss", None, centre=centre)
            if second is None or self._clashes(second[4]):
                continue
            snr = math.exp(rng.uniform(math.log(20.0), math.log(200.0)))
            i = self._add(rng, first, None, partner=len(self._patches) + 1, snr=snr)
            self._add(rng, second, None, partner=i, snr=snr * math.exp(rng.uniform(-math.log(2), math.log(2))))
            return

    def _load_external(self, rng, path) -> None:
        with h5py.File(path, "r") as f:
            shapes, values = f["patch_shape"][()], f["patch_values"][()]
            origins, frames = f["origin"][()], f["frame"][()]
            if (f.attrs["frames"], f.attrs["size"]) != (self.frames, self.shape[0]):
                raise ValueError(f"{path}: spots for {f.attrs['frames']} frames of {f.attrs['size']} px, "
                                 f"expected {self.frames} of {self.shape[0]}")
        ends = np.cumsum(shapes.prod(axis=1))
        thickest = values.max()
        for shape, end, origin, frame0 in zip(shapes, ends, origins, frames):
            patch = values[end - shape.prod():end].reshape(shape).astype(np.float64)
            peak = EXTERNAL_PEAK_COUNTS * patch.max() / thickest
            patch /= patch.max()
            patch[patch < FOOTPRINT_FLOOR] = 0.0
            sigma_frame = rng.uniform(*EXTERNAL_SIGMA_FRAME)
            i = len(self._patches)
            self._patches.append(patch)
            self._origin.append((int(origin[0]), int(origin[1])))
            self._sigma_frames.append(sigma_frame)
            self._frame0.append(float(frame0))
            ks, ku = self._frames_of(float(frame0), sigma_frame)
            self._rock.append((ks, ku))
            self._partner.append(-1)
            self._boxes.append((origin[1] + shape[1] / 2, origin[0] + shape[0] / 2, frame0,
                                shape[1] / 2, shape[0] / 2, 3 * sigma_frame))
            self._amp.append(peak / (self._source_on(ks) * self._rocking(i, ku)).max())

    def _visible_centroid(self, i: int, weight: np.ndarray, ku: np.ndarray) -> tuple[float, float, float, float]:
        """Centroid (x, y, frame) of spot ``i``'s counts outside the direct beam, each frame's weighted by
        ``weight`` (over ``ku``), and the fraction of them there: what any spot finder can see of it (the
        whole spot, mostly). NaN when none is."""
        patch, (oy, ox) = self._patches[i], self._origin[i]
        if not self.beam:
            boxes = [None] * len(ku)
        elif self.beam_motion is None:
            boxes = [self.direct_beam_bbox] * len(ku)
        else:
            boxes = [self.beam_box(int(k)) for k in self._rock[i][0]]
        rows, cols_ = np.arange(patch.shape[0]) + oy, np.arange(patch.shape[1]) + ox
        total = sx = sy = sf = 0.0
        if self._lost is not None:  # nothing of it in the frames without the beam
            weight = weight * (self.source_intensity(np.asarray(ku) % self.frames) > 0)
        for w, k, box in zip(weight, ku, boxes):
            seen = patch if box is None or box[2] == 0 else patch * ~_in_box(box, *patch.shape, oy, ox)
            counts = w * seen.sum()
            total, sf = total + counts, sf + counts * k
            sx, sy = sx + w * (seen.sum(axis=0) @ cols_), sy + w * (seen.sum(axis=1) @ rows)
        if total <= 0:
            return float("nan"), float("nan"), float("nan"), 0.0
        frame = sf / total
        return (sx / total, sy / total, frame % self.frames if self.wrap else frame,
                total / (self._rocking(i, ku).sum() * patch.sum()))

    def _merged_into(self, noise, peak) -> np.ndarray:
        """For each spot, the brighter spot it is one with in the noiseless frames (-1 if it stands alone):
        in the sum of the spots that overlap it, its peak belongs to a maximum that is another's, or to
        one that stands less than `RESOLVE_SIGMAS` x the noise at the saddle (sqrt(noise^2 + saddle
        counts)) above the saddle joining it to a brighter one."""
        n = len(self._patches)
        out = np.full(n, -1, np.int64)
        boxes = []  # (y0, y1, x0, x1, first unwrapped frame, last)
        for i in range(n):
            (oy, ox), shape, ku = self._origin[i], self._patches[i].shape, self._rock[i][1]
            boxes.append((oy, oy + shape[0], ox, ox + shape[1], int(ku[0]), int(ku[-1])))
        boxes = np.array(boxes, np.int64).reshape(-1, 6)
        group = list(range(n))

        def root(i):
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        for i in range(n):  # spots whose boxes overlap, in x, y and (over a full turn, wrapped) psi
            b = boxes[i]
            for shift in (0, self.frames, -self.frames) if self.wrap else (0,):
                near = np.flatnonzero((boxes[:, 0] < b[1]) & (boxes[:, 1] > b[0]) & (boxes[:, 2] < b[3])
                                      & (boxes[:, 3] > b[2]) & (boxes[:, 4] + shift <= b[5])
                                      & (boxes[:, 5] + shift >= b[4]))
                for j in near:
                    group[root(int(j))] = root(i)
        clusters: dict[int, list[int]] = {}
        for i in range(n):
            clusters.setdefault(root(i), []).append(i)
        for members in clusters.values():
            if len(members) < 2:
                continue
            # frames unwrapped next to the first member's; a box around them all
            f_ref = self._frame0[members[0]]
            shifts = {i: (round((f_ref - self._frame0[i]) / self.frames) * self.frames if self.wrap else 0)
                      for i in members}
            b = boxes[members]
            y0, x0 = b[:, 0].min(), b[:, 2].min()
            f0 = min(int(boxes[i, 4]) + shifts[i] for i in members)
            f1 = max(int(boxes[i, 5]) + shifts[i] for i in members)
            volume = np.zeros((f1 - f0 + 1, b[:, 1].max() - y0, b[:, 3].max() - x0))
            tops = {}
            for i in members:
                oy, ox = self._origin[i]
                ph, pw = self._patches[i].shape
                best = -1.0
                for k, k_unwrapped in zip(*self._rock[i]):
                    counts, _ = self.spot_counts(i, int(k))
                    f = int(k_unwrapped) + shifts[i] - f0
                    volume[f, oy - y0:oy - y0 + ph, ox - x0:ox - x0 + pw] += counts
                    if counts.max() > best:
                        best = counts.max()
                        py, px = np.unravel_index(np.argmax(counts), counts.shape)
                        tops[i] = (f, oy - y0 + py, ox - x0 + px)
            sigma = float(np.median([noise[i] for i in members]))
            part = _resolved_parts(volume, sigma, RESOLVE_SIGMAS)
            by_part: dict[int, list[int]] = {}
            for i in members:
                by_part.setdefault(int(part[tops[i]]), []).append(i)
            for together in by_part.values():
                brightest = max(together, key=lambda i: peak[i])
                for i in together:
                    if i != brightest:
                        out[i] = brightest
        return out

    # --- rendering ----------------------------------------------------------

    def spot_counts(self, i: int, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Noiseless counts of spot ``i`` in frame ``k`` (its footprint patch) and the patch's (row, col) origin."""
        ks, ku = self._rock[i]
        hit = ku[ks == k]
        g = float(self._rocking(i, hit)[0]) if hit.size else 0.0
        return self._amp[i] * float(self.source_intensity(k)) * g * self._patches[i], self._origin[i]

    def add_spots(self, image: np.ndarray, k: int) -> np.ndarray:
        scale = float(self.source_intensity(k))
        for i, g in self._by_frame[k]:
            patch = self._patches[i]
            oy, ox = self._origin[i]
            image[oy:oy + patch.shape[0], ox:ox + patch.shape[1]] += (self._amp[i] * scale * g) * patch
        return image

    def frame(self, k: int) -> np.ndarray:
        if k in self.glitches:
            dtype = np.uint32 if self.photon_counting else np.uint16
            return np.full(self.shape, 0 if self.glitches.index(k) % 2 == 0 else np.iinfo(dtype).max, dtype)
        if not self.photon_counting:
            return self._add_zinger_blocks(k, super().frame(k))
        rng = np.random.default_rng((self.seed, _NOISE_STREAM, k))
        counts = rng.poisson(self.signal(k)).astype(np.uint32)
        counts[tuple(self.hot_pixels.T)] += rng.poisson(self._hot_rate).astype(np.uint32)
        counts[self.dead] = INVALID_UINT32
        return counts

    def _add_zinger_blocks(self, k: int, image: np.ndarray) -> np.ndarray:
        """Frame ``k`` with its ``zinger_blocks`` added (clipped to the type's top)."""
        if not self.zinger_blocks:
            return image
        ny, nx = self.shape
        rng = np.random.default_rng((self.seed, _ZINGER_BLOCK_STREAM, k))
        places = [(rng.uniform(0, ny), rng.uniform(0, nx))
                  for _ in range(rng.poisson(self.zinger_blocks * ny * nx / 512**2))]
        out = image.astype(np.float64)
        for y, x in places + self._zingers_on_spots.get(k, []):
            h, w = (int(v) for v in rng.integers(1, 4, 2))
            if rng.random() < 0.2:  # a track
                h, w = (2, int(rng.integers(4, 11)))[::1 if rng.random() < 0.5 else -1]
            y0, x0 = min(max(int(y), 0), ny - h), min(max(int(x), 0), nx - w)
            out[y0:y0 + h, x0:x0 + w] += rng.uniform(*ZINGER_BLOCK_COUNTS)
        return np.clip(out, 0, np.iinfo(image.dtype).max).astype(image.dtype)

    def _aim_zingers(self) -> dict[int, list[tuple[float, float]]]:
        """frame -> places (y, x) of the zingers that hit a third of the spots, each once, in one of its frames
        above 0.3 x its peak, within ZINGER_BLOCK_NEAR_SPOT_PX of its centre."""
        rng = np.random.default_rng((self.seed, _ZINGER_BLOCK_STREAM))
        aimed: dict[int, list[tuple[float, float]]] = {}
        for i, (ks, ku) in enumerate(self._rock):
            lit = sorted({int(k) for k, g in zip(ks, self._rocking(i, ku)) if g > 0.3})
            if not lit or rng.random() >= 1 / 3:
                continue
            x, y = self._boxes[i][:2]
            k = lit[int(rng.integers(len(lit)))]
            aimed.setdefault(k, []).append(tuple(c + rng.uniform(-ZINGER_BLOCK_NEAR_SPOT_PX, ZINGER_BLOCK_NEAR_SPOT_PX)
                                                 for c in (y, x)))
        return aimed

    def dark_frame(self, i: int) -> np.ndarray:
        if not self.photon_counting:
            return super().dark_frame(i)
        rng = np.random.default_rng((self.seed, _DARK_STREAM, i))
        counts = np.zeros(self.shape, np.uint32)
        counts[tuple(self.hot_pixels.T)] = rng.poisson(self._hot_rate)
        counts[self.dead] = INVALID_UINT32
        return counts

    # --- truth --------------------------------------------------------------

    def _truth_columns(self) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {name: [] for name in (
            "x", "y", "frame", "sigma_x", "sigma_y", "sigma_frame", "peak", "integral", "noise", "snr",
            "in_direct_beam", "size_x", "size_y", "first_frame", "last_frame", "crosses_wrap", "partner",
            "frame_normalised", "visible_x", "visible_y", "visible_frame", "visible_fraction", "merged_into")}
        x0, y0, w, h = self.direct_beam_bbox
        for i, patch in enumerate(self._patches):
            ks, ku = self._rock[i]
            weight = self.source_intensity(ks) * self._rocking(i, ku)
            total = patch.sum()
            rows, cols_ = np.arange(patch.shape[0]), np.arange(patch.shape[1])
            oy, ox = self._origin[i]
            x = ox + (patch.sum(axis=0) @ cols_) / total
            y = oy + (patch.sum(axis=1) @ rows) / total
            # (all of it in frames without the beam: where its curve is, not seen)
            curve = weight if weight.sum() > 0 else self._rocking(i, ku)
            frame = (curve @ ku) / curve.sum()
            if self.wrap:
                frame %= self.frames
            k_peak = int(ks[np.argmax(weight)])
            iy, ix = np.unravel_index(np.argmax(patch), patch.shape)
            background = self.background(k_peak)[oy + iy, ox + ix]
            noise = max(math.sqrt(background + self.read_noise ** 2), 1.0)
            peak = self._amp[i] * weight.max()
            cols["x"].append(x)
            cols["y"].append(y)
            cols["frame"].append(frame)
            cols["sigma_x"].append(math.sqrt((patch.sum(axis=0) @ (cols_ + ox - x) ** 2) / total))
            cols["sigma_y"].append(math.sqrt((patch.sum(axis=1) @ (rows + oy - y) ** 2) / total))
            cols["sigma_frame"].append(self._sigma_frames[i])
            cols["peak"].append(peak)
            cols["integral"].append(self._amp[i] * weight.sum() * total)
            cols["noise"].append(noise)
            cols["snr"].append(peak / noise)
            bx0, by0, bw, bh = (x0, y0, w, h) if self.beam_motion is None else self.beam_box(k_peak)
            cols["in_direct_beam"].append(self.beam and bx0 - 0.5 <= x < bx0 + bw - 0.5
                                          and by0 - 0.5 <= y < by0 + bh - 0.5)
            cols["size_x"].append(int(patch.any(axis=0).sum()))
            cols["size_y"].append(int(patch.any(axis=1).sum()))
            cols["first_frame"].append(int(ks[0]))
            cols["last_frame"].append(int(ks[-1]))
            cols["crosses_wrap"].append(bool(ku[0] < 0 or ku[-1] >= self.frames))
            cols["partner"].append(self._partner[i])
            rocking = self._rocking(i, ku)  # the counts over the source intensity of their frame
            cols["frame_normalised"].append((rocking @ ku) / rocking.sum() % (self.frames if self.wrap else np.inf))
            for name, value in zip(("visible_x", "visible_y", "visible_frame", "visible_fraction"),
                                   self._visible_centroid(i, rocking, ku)):
                cols[name].append(value)
        cols["merged_into"] = list(self._merged_into(cols["noise"], cols["peak"]))
        types = {"in_direct_beam": np.uint8, "crosses_wrap": np.uint8, "size_x": np.int64, "size_y": np.int64,
                 "first_frame": np.int64, "last_frame": np.int64, "partner": np.int64, "merged_into": np.int64}
        return {name: np.asarray(v, dtype=types.get(name, np.float64)) for name, v in cols.items()}


def _in_box(box, n_rows: int, n_cols: int, oy: int, ox: int) -> np.ndarray:
    """Which pixels of an (n_rows, n_cols) patch at (oy, ox) have their centre in ``box`` (x0, y0, w, h; as
    ``in_direct_beam``: the pixel centre c with x0 - 0.5 <= c < x0 + w - 0.5)."""
    x0, y0, w, h = box
    cx, cy = np.arange(n_cols) + ox, np.arange(n_rows) + oy
    return np.outer((cy >= y0 - 0.5) & (cy < y0 + h - 0.5), (cx >= x0 - 0.5) & (cx < x0 + w - 0.5))


@numba.njit(cache=True)
def _resolved_parts(volume, sigma, sigmas):
    """Each voxel's part of ``volume`` (the flat index of the part's maximum; -1 below ``sigma``), flooding
    26-connected voxels from the brightest down: where parts meet at a voxel of value s, a dimmer one whose
    maximum p stands less than ``sigmas`` x sqrt(sigma^2 + s) above s joins the brightest one met."""
    nf, ny, nx = volume.shape
    flat = volume.ravel()
    parent = np.full(flat.size, -1, np.int64)
    order = np.argsort(-flat, kind="mergesort")
    roots = np.empty(26, np.int64)
    for i in order:
        v = flat[i]
        if v < sigma:
            break
        f, rest = divmod(i, ny * nx)
        y, x = divmod(rest, nx)
        n_roots = 0
        for df in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    g, u, w = f + df, y + dy, x + dx
                    if (df == 0 and dy == 0 and dx == 0) or not (0 <= g < nf and 0 <= u < ny and 0 <= w < nx):
                        continue
                    j = (g * ny + u) * nx + w
                    if parent[j] < 0:
                        continue
                    while parent[j] != j:
                        j = parent[j]
                    if j not in roots[:n_roots]:
                        roots[n_roots] = j
                        n_roots += 1
        if n_roots == 0:
            parent[i] = i
            continue
        top = roots[0]
        for r in roots[1:n_roots]:
            if flat[r] > flat[top]:
                top = r
        for r in roots[:n_roots]:
            if r != top and flat[r] - v < sigmas * np.sqrt(sigma * sigma + max(v, 0.0)):
                parent[r] = top
        parent[i] = top
    out = np.full(flat.size, -1, np.int64)
    for i in range(flat.size):
        if parent[i] >= 0:
            j = i
            while parent[j] != j:
                j = parent[j]
            out[i] = j
    return out.reshape(volume.shape)


def scan_model(name: str, *, quick: bool = False, seed: int = 0, frames: int | None = None,
               size: int | None = None) -> HardScanModel:
    """The model of hard scan ``name`` (see `SCANS`): 720 frames of 512 x 512 px, or 360 of 256 x 256 if quick,
    or ``frames`` of ``size`` x ``size`` px where given."""
    if name not in SCANS:
        raise ValueError(f"hard scan: unknown name, expected one of {', '.join(SCANS)}, got {name!r}")
    options = dict(SCANS[name])
    frames = frames or (QUICK_FRAMES if quick else FULL_FRAMES)
    size = size or (QUICK_SIZE if quick else FULL_SIZE)
    scale = size**2 / FULL_SIZE**2  # by area only: a quick scan keeps enough spots to score
    for key in ("spots", "pairs"):  # the few wrap and early spots stay as many
        if key in options:
            options[key] = max(10, round(options[key] * scale))
    return HardScanModel(frames=frames, size=size, seed=seed, **options)


def independent_model(spots_path: str | os.PathLike, *, seed: int = 0) -> HardScanModel:
    """The spots of an independent simulator (`benchmarks/independent_scan.py`) over a `ScanModel` background
    with a +3 % top-up at 55 % of a full turn, and no direct beam: `ScanModel`'s beam box is twice as wide as
    that simulator's sample, and would hide spots that a beam fitted to the sample leaves in view."""
    with h5py.File(spots_path, "r") as f:
        frames, size = int(f.attrs["frames"]), int(f.attrs["size"])
    return HardScanModel(frames=frames, size=size, seed=seed, spots=0, wrap=True, topup_at=0.55, beam=False,
                         external_spots=spots_path)


def write_hard_scan(name: str, path: str | os.PathLike, *, quick: bool = False, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    model: HardScanModel | None = None) -> ScanTruth:
    """Write hard scan ``name`` to ``path`` in `simulate_scan`'s layout, with the extra truth columns
    (``model``, if given, instead of `scan_model`'s)."""
    model = model or scan_model(name, quick=quick, seed=seed)
    dtype = "uint32" if model.photon_counting else "uint16"
    truth = simulate_scan(path, model=model, dtype=dtype, progress=progress)
    with h5py.File(path, "a") as f:
        f[TRUTH_PATH].attrs["scan"] = name
        f[TRUTH_PATH].attrs["wrap"] = model.wrap
        if model.beam_motion is not None:
            f[TRUTH_PATH].attrs["beam_motion"] = np.asarray(model.beam_motion)
    return truth


def read_hard_truth(path: str | os.PathLike) -> ScanTruth:
    """Every truth column of a scan written by `write_hard_scan` (or `simulate_scan`)."""
    path = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"read_hard_truth: no such file, expected a simulated scan, got {path}")
    with h5py.File(path, "r") as f:
        group = f[TRUTH_PATH]
        spots = {name: group[name][()] for name in group}
        bbox = group.attrs["direct_beam_bbox"]
    return _truth(path, spots, bbox)


__all__ = ["SCANS", "HardScanModel", "scan_model", "write_hard_scan", "read_hard_truth", "READ_NOISE_COUNTS"]
