"""Streaming double-threshold segmentation of corrected frames into blobs.

The result is defined on the whole volume V of corrected frames and computed
frame by frame:

1. Seeds are voxels with V >= seed_threshold outside the direct-beam mask,
   connected in 3-D (6 or 26 neighbours) into seed regions. A region's maximum
   M sits at its brightest voxel (the first in (frame, y, x) order on ties).
   Regions with fewer than ``seed_min_voxels`` voxels are rejected.
2. Regions are grown brightest first (ties: by position of M). Region R's blob
   is the connected component containing M of the voxels with
   V >= t = min(clamp(grow_ratio * M, grow_low, grow_high), M) that are not
   masked and not claimed by an earlier blob, searched in the box
   M +- max_blob_size. A component smaller than min_blob_size (x, y, frames),
   or one that reaches an edge of that box inside the frame and the scan
   (cut by the box: a streak, a direct-beam leak), is rejected; otherwise its
   voxels are claimed and it becomes a blob (up to 2 x max_blob_size + 1 long:
   a rocking curve longer than max_blob_size frames but centred on its
   maximum is a spot).

Streaming: a blob can only take voxels inside its box, so R's outcome depends
only on brighter regions whose boxes overlap R's box, all of which have their
maximum at most 2F frames after R's (F = max_blob_size in frames). R is
grown once frame f_R + 2F has been segmented and every brighter region whose
box overlaps R's box is done: grown, or still open but with a maximum that
cannot interfere.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np

from ..ring import fault_in, release, releasable_frames
from ..types import Blob
from ._kernels import (CLAIMED, FLAG_PLANES, SPIKE, claim, claimed_beside_max, despike, flood_from, grow_region,
                       grow_region_on, label_seeds, moments, saddle_beside_brighter, seed_rows, shared_light,
                       split_maxima, stands_out, unclaimed_sum, unclaimed_sum_of)

# Largest valley searched around a maximum to close its blob early; bigger ones wait for the boxes rule.
VALLEY_VOXELS = 200_000
# A noise flood (the background not followed: a dark 150 counts too high) lifts whole frames above the lower
# growth threshold: the component around each maximum there filled its growth box (190,000 voxels in the median),
# and growing and splitting them, 0.3 us a voxel, took the run from 140 to 2.4 frames/s. A region is flooded when
# more than FLOOD_SHARE of the unmasked pixels of the rim (FLOOD_RIM_PX wide) of its growth box in its maximum's
# frame are above that threshold (the validation scans' spots light at most 5 % of it), or its component passes
# COMPONENT_VOXELS: its spot is then grown unsplit at its own threshold (grow_ratio of the way from the rim's median
# to its peak) in the same box, and rejected as `flooded` where that is no spot or floods the rim too. The rim test
# reads the frames alone (a resumed run tells the same): a region it finds flooded does not search its valley but
# waits for the boxes rule. All this only where the growth box, cut by the frame and frame 0, holds more than
# COMPONENT_VOXELS voxels: a smaller one is grown whole in no time.
FLOOD_SHARE = 0.2
FLOOD_RIM_PX = 8
COMPONENT_VOXELS = 200_000
# Free frame slots kept resident for the next frames: one is taken a frame, and a spot that closes frees a
# few at once; a slot given back is faulted in and zeroed by the system when taken again (33 MiB at 2048 x
# 2048). A 651-frame 2048 x 2048 scan: 159 of its frames took a given-back slot with 1 kept, 33 with 8, the
# first ones; `dctstream bench --frames 600`: the segmenting thread 49.4 -> 44.6 ms a frame, the same peak
# within 0.02 GiB (at the peak, 28 frames held and 5 hot slots: fewer resident than frames held a moment
# before; capping the hot slots at the most frames held, tried, changed nothing).
HOT_SLOTS = 8
# A frame with more seed regions than this (or one per FLOOD_PIXELS unmasked pixels, if more) is flooded:
# a background change the median has not followed, not spots. Its thresholds are doubled until it is
# not (at most FLOOD_DOUBLINGS times), so that growing noise never takes the run's speed.
FLOOD_REGIONS = 200
FLOOD_PIXELS = 1000
FLOOD_DOUBLINGS = 4
# A spot's integral: the double threshold keeps the voxels above tau * M, about half of a Gaussian spot's
# counts in 3-D; its tails are in the blob's box grown by half its extent on each axis (at least
# INTEGRAL_MARGIN_PX, INTEGRAL_MARGIN_FRAMES; along psi up to the last frame segmented when it closes),
# summed where no other blob has claimed them (the corrected background is 0 on average, so the noise
# there adds nothing on average) and no touching spot's part of their component lies (see SPLIT_LOW): the
# box of a big spot held the whole of a neighbour not yet claimed (`independent`: 1.2-3 x the true integral
# for 9 spots; intensity ratio 1.035 [0.98-1.16] -> 0.984 [0.95-1.03]).
INTEGRAL_MARGIN_PX = 2
INTEGRAL_MARGIN_FRAMES = 1
# The unfiltered frames still hold the zingers that the 3x3 median took out of the filtered ones: a pixel
# more than SPIKE_LOW x its frame's grow_low (15 sigma at the auto thresholds) plus SPIKE_VALUE x its 3x3
# median above that median is one, and takes the median's value. A spot's own peak pixel stands less
# than 3x its median above it down to 0.6 px sigma; a zinger of thousands of counts tripled a spot's integral.
SPIKE_LOW = 5.0
SPIKE_VALUE = 3.0
# A zinger -- a cosmic ray or a photon caught by the sensor itself -- is one frame deep: a blob of one frame,
# of at most ZINGER_VOXELS, whose peak is ZINGER_PEAK_LOWS x its grow_low (30 sigma at the auto thresholds)
# or more, with fewer than ZINGER_TAIL_PIXELS of its pixels at or above grow_low in the frame before and in
# the frame after it (no rocking curve: one pixel may be noise, 6 % of 24-pixel blobs at 3 sigma; the sparse
# scan holds every such pixel, so `resegment` decides the same), is one and is dropped (its voxels claimed).
# The 3x3 median takes out zingers of one or two pixels, not those of 2 x 3 pixels or more: an independent
# generator's 3 a frame at 256^2 (dots, blocks up to 3 x 3, tracks) made 316 false spots of 402 without this
# rule, 9 with it. A spot's rocking curve puts a tenth of its peak or more into the next frame unless it is
# narrower than 0.35 frames (sigma); a spot of 12 voxels or fewer above tau x its peak is one of 1.3 px sigma
# or less.
# A small blob one frame deep that holds a spike (a pixel whose unfiltered value was a zinger's, SPIKE_LOW) is one
# too, whatever its peak and the frames beside: a zinger of 2 x 2 px leaves the filtered frame a blob of a few
# sigmas over its own pixels, spikes (each 3 x 3 median there holds 4 of its pixels, 1 short of half). A spot's
# own pixels are no spikes (see SPIKE_VALUE). A scan of sCMOS-like artefacts (not the project's simulator: 20
# zingers a frame of 1-2 x 1-3 px, 512^2, 400 frames, 150 spots) had 6 false spots of 2 x 2 zingers, none after.
ZINGER_VOXELS = 12
ZINGER_PEAK_LOWS = 10.0
ZINGER_TAIL_PIXELS = 2
# ... at or above this fraction of its peak as well: a spot's rocking curve puts a tenth of its peak into the
# next frame (above), while a zinger that lands on a spot finds the spot's few hundred counts beside its
# thousands, and the tail test alone took it for a spot: a false spot, and the spot's voxels below tau x the
# zinger lost with it (the `zingers` validation scan, 256^2: recall 0.90, 9 false, see README).
ZINGER_TAIL_FRACTION = 0.1
# ... or of at most ZINGER_TRACK_VOXELS in a line: a particle crossing the sensor at a slant. Line: the
# variances of its pixels' positions along their two principal axes (each pixel a unit square, 1/12 more)
# in a ratio of ZINGER_TRACK_ELONGATION or more, a length 2.5x the width (a track 2 px wide, 5 px long or
# more); a spot is round unless far bigger (polyxsim's one-frame spots: 17 voxels or more, a ratio under 2).
ZINGER_TRACK_VOXELS = 48
ZINGER_TRACK_ELONGATION = 6.0
# ZINGER_PAIR: two zingers in a row, a blob of two frames, each frame's part a zinger's by the rules above with the
# other frame left out, and neither part's peak with ZINGER_TAIL_FRACTION of itself at its pixel in the other
# frame (a spot's rocking curve lies at its own pixels). Two zingers touch in consecutive frames as often as the
# square of their rate: the `zingers` scan at 2048^2 (320 a frame) had 100 such false spots of 182.
# Touching spots: the component of voxels >= grow_low around a maximum holds a second spot when a second
# maximum stands out above the saddle s that joins it to a brighter one by its noise there: by
# sqrt((SPLIT_LOW x grow_low)^2 + SPLIT_PHOTON^2 x g x s), the background's noise (SPLIT_LOW x grow_low is
# the seed threshold at the auto thresholds) and the photon noise of the spots' own counts (g counts per
# photon, from the scan's first frames: segment.noise.photon_gain). The unfiltered photon noise, though
# the 3x3 median's is lower: its noise is correlated over 3x3 pixels and a bright spot has many maxima to
# test (at the filtered noise, a long spot of `overlaps` was cut in two). 4 such sigmas, not 6: at full size
# `overlaps` recall 0.978 -> 0.983, centroid 0.165 -> 0.139 px, `polyxsim` recall 0.996 -> 0.998, no false
# split on any validation scan; a bright flat-topped spot with a long rocking curve stays one down to 2.
# Without a known gain it must stand out by tau x its own peak too, the double threshold's rule (pairs
# closer than that were merged: 12 of the 201 `independent` spots). The component is split where their
# slopes meet (split_maxima), and each part is the double threshold of its own peak P: its voxels
# >= clamp(tau * P, grow_low, grow_high) connected to P.
SPLIT_LOW = 2.0
SPLIT_PHOTON = 4.0
# REST_OF_PART: a part whose blob (its voxels >= tau x its peak) is rejected as too small or as a zinger, one
# frame deep and ZINGER_PEAK_LOWS x grow_low high (a zinger's remnant, not a spot's core), does not take the
# rest of its voxels with it: the voxels of the component no part has taken are split again without the blob's
# box grown by REST_MARGIN_PX in its frame (the 3x3 median there holds the zinger's pixels: a voxel lifted
# beside it stood out as a second spot's peak), and each part there with seed_min_voxels seeds (SPLIT_LOW x
# grow_low) is a spot's (the rest of the zinger's part alone, split apart from the spot beside it, was found as
# pieces of that spot's rocking curve). A zinger of 2 x 3 px the 3x3 median left beside a spot
# (thousands of counts, 2 px from it) made the spot's voxels part of its own, all below tau x its peak: the
# spot was lost with the zinger (a scan of sCMOS-like artefacts).
REST_MARGIN_PX = 2
# A spot's centroid (SPOT_CENTROID): over its part of that component (its voxels >= grow_low, unfiltered
# values), not over the double threshold's voxels >= tau * P alone. A grain's projection is lopsided: the
# centroid of its voxels >= 0.3 P lay 0.6 px from the whole spot's, and a rocking curve cut by the scan's first
# frame kept one side only; below grow_low the noise would move it more than the tails do. A part whose
# centroid lies further from the blob's box than the box's own extent (at least 2) is no spot's alone but a
# background left above grow_low (a wrong dark under a decaying beam: up to 40 px from the spot): the blob's
# own voxels give it then.


# Spots that touch (SPOT_SHARES: parts of one component, each a blob) take their centroids over their shares of
# the light of the voxels they hold together, and count those voxels in their integral box by their shares: from
# the split's parts, each voxel's value is shared among them in proportion to a model of each: its image times
# its share's rocking curve (`shared_light`). The image: first, SHARE_ROUNDS times (fewer once no centroid moves
# by SHARE_SETTLED_PX: 1,290 of the 2,011 rounds of quick `independent` were Gaussian ones, 1,520 in all once
# they stop there, the centroids the same to 1e-5 px), a 2-D Gaussian of its share's
# mean and covariance in x, y (SHARE_SPREAD_PX2 added to each variance: a part one pixel wide has a width); then,
# until no centroid moves by SHARE_TOL_PX in a round (at most SHARE_SHAPED_ROUNDS), its own share summed over
# frames to the power SHARE_SHAPE times that Gaussian to the power 1 - SHARE_SHAPE. The split gives a voxel whole
# to the part of its brightest neighbour: where two grains' projections overlap a frame or two apart, the frame
# between them went whole to the brighter one, and both centroids moved towards each other by 1-4 px (then
# matched to neither, within 4 px: a miss and a false spot). The Gaussian alone put them back where spots are
# round (the `overlaps` scan), not where a grain's projection is a flat slab whose edge ramps down under a small
# bright neighbour: it gave the ramp to the neighbour (xrdsim spots 85 and 86: 2.6 and 3.0 px off; 0.75 and
# 0.71 with the shapes), though the shares the true spots give (their noiseless counts) put each within 0.05 px.
# On the validation's grain-shaped scans, split alone -> Gaussian -> shapes: quick xrdsim centroid RMS 0.407 ->
# 0.322 -> 0.268 px, independent 0.292 -> 0.258 -> 0.162; full size (512^2) xrdsim 0.249 -> 0.236 -> 0.172,
# independent 0.482 -> 0.387 -> 0.280 (psi 0.065 -> 0.022 frames, recall 0.958 -> 0.972), `overlaps` 0.063 ->
# 0.058 -> 0.058. What is left: pairs in the same frames whose shapes no model here tells apart end 2-4 px off
# or not on a small change (SHARE_TOL_PX 1e-4: independent's 169 3.9 px off, 0.255 px RMS at 256^2, while full
# size went 0.280 -> 0.199: single pairs decide these figures). Its share alone as the image (SHARE_SHAPE 1)
# drifts: a small part takes a few % of a big neighbour's light in the frames they share (a free image can take
# any of the other's), 0.29, 0.32, 0.47 px on quick xrdsim after 20, 50, 200 rounds; the Gaussian's part holds
# it (0.8 still drifted on independent); the shares' rocking curves taken from the voxels that one part holds
# alone: worse (independent 0.31 px). Started from the split's parts or after 10 Gaussian rounds: other, worse
# fixed points (xrdsim 0.34 px).
SHARE_ROUNDS = 30
SHARE_SETTLED_PX = 1e-5
SHARE_SPREAD_PX2 = 0.25
SHARE_SHAPE = 0.7
SHARE_TOL_PX = 1e-3
SHARE_SHAPED_ROUNDS = 300
# Shared where parts x voxels is at most SHARE_MAX_WORK (about 0.4 s of CPU in SHARE_ROUNDS rounds; the most on
# the validation's scans, 127,230 at 512 x 512 px, took 0.024 s), with as many shaped rounds as
# SHARE_ROUND_BUDGET parts x voxels x rounds allows: beyond, a cluster of many big spots keeps the split's
# centroids (or the Gaussians') and its speed.
SHARE_MAX_WORK = 2_000_000
SHARE_ROUND_BUDGET = SHARE_ROUNDS * SHARE_MAX_WORK
NEAR_SLACK = 1e-9  # px or frames, see centroid_near
# A region's component is grown within +- PART_REACH x max_blob_size in x and y of its maximum (+- max_blob_size
# frames), and each of its spots is cut (too large) where its blob reaches an edge of its own peak's box (+-
# max_blob_size) or of that one: in the box of the region's maximum alone, a touching spot up to max_blob_size
# from it lost the half beyond the box's edge and was rejected as too large, bright or not (full-size `independent`:
# 4 of its 6 missed spots, 48-61 px wide, snr 60-140; `xrdsim`: 5 of 8).
PART_REACH = 2


def centroid_near(moments, low, high) -> bool:
    """Whether the centroid of ``moments`` (sum, and sums of frame, y, x times value) lies within the box
    ``low`` .. ``high`` (f, y, x, inclusive) grown by its own extent (at least 2) along each axis, give or take
    NEAR_SLACK (shares can gather on whole frames: a centroid on the edge, 2 + 4e-16, is on it)."""
    total = moments[0]
    if not total > 0:
        return False
    return all(a - max(b - a + 1, 2) - NEAR_SLACK <= m / total <= b + max(b - a + 1, 2) + NEAR_SLACK
               for m, a, b in zip(moments[1:], low, high))


def cut_by_box(extent, centre, max_size) -> bool:
    """Whether a blob of ``extent`` (f0, f1, y0, y1, x0, x1, inclusive) reaches an edge of the box ``centre`` +-
    ``max_size`` (x, y, frames), or beyond: an edge inside the frame and the scan (one outside them is no voxel of
    anything)."""
    f, y, x = centre
    reach_x, reach_y, reach_f = max_size
    fa, fb, ya, yb, xa, xb = extent
    return (fa <= f - reach_f or fb >= f + reach_f or ya <= y - reach_y or yb >= y + reach_y
            or xa <= x - reach_x or xb >= x + reach_x)


@dataclass(frozen=True)
class SegmentParams:
    """Resolved numbers of the segmentation section (no ``auto`` left)."""

    seed_threshold: float | np.ndarray  # counts; a (tiles_y, tiles_x) map gives each tile of pixels its own
    grow_ratio: float
    grow_low: float | np.ndarray  # counts; scalar or (tiles_y, tiles_x) map
    grow_high: float | None
    seed_min_voxels: int
    min_size: tuple[int, int, int]  # (x, y, frames)
    max_size: tuple[int, int, int]  # (x, y, frames)
    connectivity: int
    tile_px: int = 32  # side of the tiles of the threshold maps
    # counts per photon of the unfiltered corrected frames (segment.noise.photon_gain); None: not known
    photon_gain: float | None = None
    drop_zingers: bool = False  # see ZINGER_VOXELS (segmentation.drop_zingers, true by default, sets it)

    def split_rule(self) -> tuple[float, float]:
        """(ratio, photon) of `split_maxima`: with a known photon gain, a maximum stands out by SPLIT_PHOTON
        x the photon noise at the saddle; without, by tau x its own peak."""
        if self.photon_gain is None:
            return self.grow_ratio, 0.0
        return 0.0, SPLIT_PHOTON ** 2 * self.photon_gain

    @property
    def component_size(self) -> tuple[int, int, int]:
        """(x, y, frames) half-size of the box a region's component is grown in (see PART_REACH)."""
        reach_x, reach_y, reach_f = self.max_size
        return PART_REACH * reach_x, PART_REACH * reach_y, reach_f

    def tiles(self, frame_shape) -> tuple[int, int]:
        ny, nx = frame_shape
        return -(-ny // self.tile_px), -(-nx // self.tile_px)

    def tile_maps(self, frame_shape) -> tuple[np.ndarray, np.ndarray]:
        """The seed threshold and the lower grow clamp as float64 (tiles_y, tiles_x) maps."""
        return tuple(np.ascontiguousarray(np.broadcast_to(np.asarray(v, np.float64), self.tiles(frame_shape)))
                     for v in (self.seed_threshold, self.grow_low))

    def maps(self, frame_shape) -> tuple[np.ndarray, np.ndarray]:
        """The seed threshold and the lower grow clamp as float64 (y, x) maps."""
        return tuple(pixel_map(t, self.tile_px, frame_shape) for t in self.tile_maps(frame_shape))


def pixel_map(tiles: np.ndarray, tile_px: int, frame_shape) -> np.ndarray:
    """A (y, x) map from a (tiles_y, tiles_x) one: each pixel takes its tile's value."""
    ny, nx = frame_shape
    return np.ascontiguousarray(np.repeat(np.repeat(tiles, tile_px, 0), tile_px, 1)[:ny, :nx])


def flood_limit(mask: np.ndarray) -> int:
    """Seed regions in one frame beyond which it is flooded."""
    return max(FLOOD_REGIONS, int(np.count_nonzero(~mask)) // FLOOD_PIXELS)


def _inside(voxels: np.ndarray, frame_shape: tuple[int, int], box: tuple[int, ...]) -> bool:
    """Whether the voxels (sorted indices (f * ny + y) * nx + x) all lie in the inclusive box f0, f1, y0, y1, x0,
    x1."""
    if voxels.size == 0:
        return True
    ny, nx = frame_shape
    f0, f1, y0, y1, x0, x1 = box
    ys, xs = (voxels // nx) % ny, voxels % nx
    return (f0 <= voxels[0] // (ny * nx) and voxels[-1] // (ny * nx) <= f1 and y0 <= ys.min() and ys.max() <= y1
            and x0 <= xs.min() and xs.max() <= x1)


def elongation(ys: np.ndarray, xs: np.ndarray) -> float:
    """The ratio of the variances of pixels' positions along their principal axes, each pixel a unit square."""
    cov = np.cov(np.stack((ys, xs)).astype(np.float64), bias=True) + np.eye(2) / 12.0
    low, high = np.linalg.eigvalsh(cov)
    return float(high / low)


def _round_up_to_float32(threshold: np.ndarray) -> np.ndarray:
    """The least float32 >= each threshold: a float32 v is >= t exactly when it is >= this, and a
    float32 map is half the memory of a float64 one, and half the traffic per frame."""
    t32 = threshold.astype(np.float32)
    return np.where(t32 < threshold, np.nextafter(t32, np.float32(np.inf)), t32)


class _Region:
    __slots__ = ("count", "max_value", "max_index", "first", "valley", "capped", "flooded")

    def __init__(self, count, max_value, max_index, first):
        self.count = count
        self.max_value = max_value
        self.max_index = max_index
        self.first = first
        self.valley = None  # `Segmenter._valley_clear`'s last component and its box's last frame (not a state)
        self.capped = None  # claims made when its last valley reached VALLEY_VOXELS (see there; not a state)
        self.flooded = False  # its growth box's rim is flooded (see FLOOD_SHARE): it waits for the boxes rule

    @property
    def order(self):
        return (-self.max_value, *self.max_index)

    def absorb(self, other: _Region) -> None:
        self.count += other.count
        self.first = min(self.first, other.first)
        if other.order < self.order:
            self.max_value, self.max_index = other.max_value, other.max_index


class Segmenter:
    """Push corrected frames in order; get back the blobs that no later frame can change."""

    hot_slots = HOT_SLOTS

    def __init__(self, params: SegmentParams, frame_shape: tuple[int, int], mask: np.ndarray | None = None,
                 measured: bool = False):
        self.params = params
        # measured: each frame comes with a second, unfiltered copy whose values the blobs report (their
        # voxels' values, box and integral); the filtered one only finds them. A 3x3 median flattens a
        # spot a pixel or two wide: its integral measured on the filtered frame was 10-15 % low.
        self.measured = measured
        self.frame_shape = tuple(frame_shape)
        self.mask = np.zeros(self.frame_shape, bool) if mask is None else np.ascontiguousarray(mask, bool)
        self._seed_tiles, self._low_tiles_default = params.tile_maps(self.frame_shape)
        self._seed_scratch: dict[np.dtype, np.ndarray] = {}
        self.flood_limit = flood_limit(self.mask)
        self.floods: list[tuple[int, int, float]] = []  # (frame, seed regions found, factor applied)
        self._component_fyx = params.component_size[::-1]
        reach = params.max_size[2]
        # Frames from _low to last: most regions close a frame after their spot ends (the valley rule),
        # within about a reach; the boxes rule needs 3 reaches and more. A chain of spots that needs
        # more than the ring grows it.
        self._new_pools(4 * reach + 4)
        # The slots the first frames take, faulted in ahead by a thread of their own (see ring.fault_in): no more
        # than the frames held once the segmenter runs (a reach and a few), which are resident then anyway.
        pools = (self._values, self._measures) if self.measured else (self._values,)
        self.faulting_in = [fault_in(pool, range(reach + 4)) for pool in pools]
        self._low = 0  # oldest frame still needed
        self.last = -1  # last frame pushed
        self._claims = 0  # claims made (see `_valley_clear`)
        # spots grown unsplit in a flood (see FLOOD_SHARE), and the maximum of the first flooded region, grown or not
        self.flooded: list[int] = [0, -1, -1, -1]
        self._prev_labels = np.zeros(self.frame_shape, np.int32)  # seed labels of the last frame
        self._spare_labels = np.zeros(self.frame_shape, np.int32)  # this frame's, swapped with the last's
        self._prev_dirty = np.zeros(self.frame_shape[0], bool)  # rows of _prev_labels that hold labels
        self._spare_dirty = np.zeros(self.frame_shape[0], bool)
        self._seed_rows = np.zeros(self.frame_shape[0], bool)
        self._parent_scratch = np.empty(self._prev_labels.size + 1, np.int32)
        self._prev_offset = 0  # label + offset = region id
        self._parent: dict[int, int] = {}
        self._regions: dict[int, _Region] = {}  # open regions, by root id
        self._open: list[int] = []
        self._pending: list[_Region] = []
        self._next_id = 1
        self.n_blobs = 0
        self.rejected: Counter = Counter()
        self.too_large_size = (0, 0, 0)  # the largest (x, y, frames) of the blobs rejected as too large

    # ---- public --------------------------------------------------------------
    def push(self, k: int, frame: np.ndarray, seed: np.ndarray | None = None,
             low: np.ndarray | None = None, measure: np.ndarray | None = None) -> list[Blob]:
        """Segment frame k; ``seed`` and ``low`` are this frame's own (tiles_y, tiles_x) threshold maps
        (the noise followed along psi), else the parameters' ones; ``measure`` is its unfiltered copy
        (required when ``measured``)."""
        if k != self.last + 1:
            raise ValueError(f"frame {k}: expected frame {self.last + 1}")
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame {k}: expected shape {self.frame_shape}, got {frame.shape}")
        tiles = self.params.tiles(self.frame_shape)
        for name, m in (("seed", seed), ("low", low)):
            if m is not None and np.shape(m) != tiles:
                raise ValueError(f"frame {k}: {name}: expected a {tiles} tile map, got {np.shape(m)}")
        self._check_measure(k, measure)
        self._store(k, frame, measure)
        self.last = k
        self._link(k, frame, seed, self._low_tiles_default if low is None else low)
        if self.measured:  # with the frame's grow_low, set by _link
            self._despike(int(self._slot_of[k % self._capacity]))
        return self._close(ended=False)

    def finish(self) -> list[Blob]:
        """The scan has ended: every remaining region is grown."""
        for root in {self._find(i) for i in self._open}:
            self._complete(root)
        self._open = []
        return self._close(ended=True)

    @property
    def open_regions(self) -> int:
        return len(self._regions)

    @property
    def pending_regions(self) -> int:
        return len(self._pending)

    # ---- checkpoint ----------------------------------------------------------------
    def state(self) -> dict:
        """Everything but the frames: the regions, the frontier and the claimed voxels, as arrays.

        With the corrected frames from ``max(self._low, 0)`` to ``self.last`` put back by
        ``load_frame``, ``restore`` of this gives a segmenter that continues exactly as this one.
        """
        def regions(items):
            items = list(items)
            return {"count": np.array([r.count for r in items], np.int64),
                    "max_value": np.array([r.max_value for r in items], np.float64),
                    "max_index": np.array([r.max_index for r in items], np.int64).reshape(-1, 3),
                    "first": np.array([r.first for r in items], np.int64)}

        return {
            "low": self._low, "last": self.last, "prev_offset": self._prev_offset, "next_id": self._next_id,
            "n_blobs": self.n_blobs, "rejected": dict(self.rejected), "capacity": self._capacity,
            "too_large_size": list(self.too_large_size),
            "prev_labels": self._prev_labels.copy(),
            "parent": np.array(sorted(self._parent.items()), np.int64).reshape(-1, 2),
            "region_ids": np.array(list(self._regions), np.int64),
            "regions": regions(self._regions.values()),
            "open": np.array(self._open, np.int64),
            "pending": regions(self._pending),
            "claimed": self._claimed_voxels(range(max(self._low, 0), self.last + 1)),
            "low_tiles": self._low_tiles[self._frame_slots(np.arange(max(self._low, 0), self.last + 1))].copy(),
            "floods": np.array(self.floods, np.float64).reshape(-1, 3),
            "flooded": list(self.flooded),
        }

    def restore(self, state: dict) -> None:
        """Take back a ``state()``; the frames come next, through ``load_frame``."""
        def regions(r):
            return [_Region(int(c), float(v), tuple(int(i) for i in m), int(f))
                    for c, v, m, f in zip(r["count"], r["max_value"], r["max_index"], r["first"])]

        self._low, self.last = int(state["low"]), int(state["last"])
        self._prev_offset, self._next_id = int(state["prev_offset"]), int(state["next_id"])
        self.n_blobs, self.rejected = int(state["n_blobs"]), Counter(state["rejected"])
        self.too_large_size = tuple(int(v) for v in state.get("too_large_size", (0, 0, 0)))  # older checkpoints: none
        self._new_pools(int(state["capacity"]))
        self._prev_labels = np.array(state["prev_labels"], np.int32, order="C")
        self._spare_labels = np.zeros_like(self._prev_labels)
        self._prev_dirty = self._prev_labels.any(axis=1)
        self._spare_dirty = np.zeros_like(self._prev_dirty)
        self._parent = {int(a): int(b) for a, b in state["parent"]}
        self._regions = dict(zip((int(i) for i in state["region_ids"]), regions(state["regions"])))
        self._open = [int(i) for i in state["open"]]
        self._pending = regions(state["pending"])
        for i, k in enumerate(range(max(self._low, 0), self.last + 1)):
            self._low_tiles[self._take_slot(k)] = state["low_tiles"][i]
        self.floods = [(int(f), int(n), float(c)) for f, n, c in state["floods"]]
        self.flooded = [int(v) for v in state.get("flooded", (0, -1, -1, -1))]  # older checkpoints: none
        f, y, x = state["claimed"]
        self._claim(f, y, x)

    @property
    def first_needed(self) -> int:
        """The first frame whose corrected values a restored segmenter needs back."""
        return max(self._low, 0)

    def load_frame(self, k: int, frame: np.ndarray, measure: np.ndarray | None = None) -> None:
        """Put back corrected frame ``k`` (``first_needed <= k <= last``) after ``restore``; its flags stay."""
        if not max(self._low, 0) <= k <= self.last:
            raise ValueError(f"frame {k}: expected a frame from {max(self._low, 0)} to {self.last}")
        self._check_measure(k, measure)
        slot = self._take_slot(k)
        self._values[slot] = frame
        if self.measured:
            self._measures[slot] = measure
            self._despike(slot)

    def _despike(self, slot: int) -> None:
        despike(self._measures[slot], self._values[slot], self._low_tiles[slot], self.params.tile_px,
                SPIKE_LOW, SPIKE_VALUE, self._flags, slot)

    def _check_measure(self, k: int, measure) -> None:
        if self.measured and (measure is None or measure.shape != self.frame_shape):
            raise ValueError(f"frame {k}: measure: expected the unfiltered frame of shape {self.frame_shape}, "
                             f"got {None if measure is None else measure.shape}")

    # ---- frame store ---------------------------------------------------------------
    # Frame f's values and flags are in slot _slot_of[f % cap] of the values and flags pools. A slot
    # given up is taken again first (no page faults, no zeroing: a fresh 16 MiB slot at 2048 x 2048
    # costs more to fault in than to segment); beyond a few such slots, their memory goes back to
    # the system, so only the frames still needed are resident.
    def _new_pools(self, cap: int) -> None:
        ny, nx = self.frame_shape
        self._values = releasable_frames(cap, self.frame_shape, np.float32)
        self._measures = releasable_frames(cap, self.frame_shape, np.float32) if self.measured else self._values
        self._flags = releasable_frames(cap, (FLAG_PLANES, ny, (nx + 7) // 8), np.uint8)  # see _kernels.CLAIMED
        self._low_tiles = np.zeros((cap, *self.params.tiles(self.frame_shape)), np.float32)  # each frame's grow_low
        self._slot_of = np.full(cap, -1, np.int64)
        self._hot: list[int] = []  # free slots still resident, the last freed last
        self._cold = list(range(cap - 1, -1, -1))  # free slots without memory (they read as zeros)

    @property
    def _capacity(self) -> int:
        return self._slot_of.size

    def _take_slot(self, k: int) -> int:
        """The slot of frame k, taken (its flags cleared) if k has none yet."""
        pos = k % self._capacity
        if self._slot_of[pos] < 0:
            slot = self._hot.pop() if self._hot else self._cold.pop()
            self._flags[slot] = 0  # a slot given back keeps its bytes where it does not fill whole pages
            self._slot_of[pos] = slot
        return int(self._slot_of[pos])

    def _give_slot(self, f: int) -> None:
        pos = f % self._capacity
        slot = int(self._slot_of[pos])
        if slot < 0:
            return
        self._slot_of[pos] = -1
        self._hot.append(slot)
        if len(self._hot) > self.hot_slots:
            slot = self._hot.pop(0)
            release(self._values, slot)
            if self.measured:
                release(self._measures, slot)
            release(self._flags, slot)
            self._cold.append(slot)

    def _frame_slots(self, frames) -> np.ndarray:
        return self._slot_of[np.asarray(frames, np.int64) % self._capacity]

    def _store(self, k: int, frame: np.ndarray, measure: np.ndarray | None) -> None:
        cap = self._capacity
        if k - self._low + 1 > cap:
            # a chain of overlapping spots holds old frames: make room
            values, measures, flags, lows = self._values, self._measures, self._flags, self._low_tiles
            slots = self._frame_slots(np.arange(self._low, k))
            self._new_pools(max(k - self._low + 1, cap + self.params.max_size[2]))
            for f, slot in zip(range(self._low, k), slots):
                new = self._take_slot(f)
                self._values[new], self._flags[new], self._low_tiles[new] = values[slot], flags[slot], lows[slot]
                if self.measured:
                    self._measures[new] = measures[slot]
        self._give_slot(k)  # the frame a ring's length before, if still held
        self._put(self._take_slot(k), frame, measure)

    def _put(self, slot: int, frame, measure) -> None:
        """Frame values into a free slot (a sparse segmenter writes only its pixels: see sparse.py)."""
        self._values[slot] = frame
        if self.measured:
            self._measures[slot] = measure

    def _claimed_voxels(self, frames) -> np.ndarray:
        """(frame, y, x) of the claimed voxels of ``frames``, (3, n); a frame at a time, bytes set first:
        unpacking every bit of the frames at once would take a byte per voxel (GiB at 2048 x 2048)."""
        found = [np.zeros((3, 0), np.int64)]
        for f in frames:
            plane = self._flags[self._slot_of[f % self._capacity], CLAIMED]
            y, xb = np.nonzero(plane)
            i, bit = np.nonzero(np.unpackbits(plane[y, xb][:, None], axis=1, bitorder="little"))
            found.append(np.stack([np.full(i.size, f), y[i], xb[i] * 8 + bit]).astype(np.int64))
        return np.concatenate(found, axis=1)

    def _claim(self, f, y, x) -> None:
        claim(self._flags, self._slot_of, *(np.asarray(v, np.int64) for v in (f, y, x)))
        self._claims += 1

    # ---- seed regions --------------------------------------------------------------
    def _find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._regions[ra].absorb(self._regions.pop(rb))

    def _seed(self, dtype, tiles: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The seed threshold tile map for frames of ``dtype``, rounded up to float32 for float32 frames (see
        _round_up_to_float32), and the per-pixel map `seed_rows` fills for the rows holding seeds.
        ``tiles``: this frame's own map, else the parameters'."""
        kind = np.dtype(np.float32 if np.dtype(dtype) == np.float32 else np.float64)
        tiles = np.asarray(self._seed_tiles if tiles is None else tiles, np.float64)
        if kind == np.float32:
            tiles = _round_up_to_float32(tiles)
        if kind not in self._seed_scratch:
            self._seed_scratch[kind] = np.empty(self.frame_shape, kind)
        return np.ascontiguousarray(tiles, kind), self._seed_scratch[kind]

    def _mark_seed_rows(self, frame: np.ndarray, seed_tiles: np.ndarray, seed: np.ndarray) -> None:
        seed_rows(frame, seed_tiles, self.params.tile_px, self.mask, self._seed_rows, seed)

    def _link(self, k: int, frame: np.ndarray, seed_tiles=None, low_tiles=None) -> None:
        labels, dirty = self._spare_labels, self._spare_dirty
        factor = 1.0
        while True:
            tiles = None if seed_tiles is None and factor == 1.0 else \
                factor * (self._seed_tiles if seed_tiles is None else np.asarray(seed_tiles, np.float64))
            seed_tiles, seed = self._seed(frame.dtype, tiles)
            self._mark_seed_rows(frame, seed_tiles, seed)
            n, counts, max_value, max_y, max_x, prev, here = label_seeds(
                frame, seed, self._seed_rows, self._prev_labels, self.params.connectivity == 26,
                labels, dirty, self._parent_scratch)
            if n <= self.flood_limit or factor >= 2.0 ** FLOOD_DOUBLINGS:
                break
            if factor == 1.0:
                found = n
            factor *= 2.0
        if factor > 1.0:
            self.floods.append((k, int(found), factor))
        self._low_tiles[self._slot_of[k % self._capacity]] = _round_up_to_float32(
            factor * np.asarray(low_tiles, np.float64))
        for c in range(n):
            gid = self._next_id + c
            self._parent[gid] = gid
            self._regions[gid] = _Region(int(counts[c]), float(max_value[c]), (k, int(max_y[c]), int(max_x[c])), k)
        if prev.size:
            # ids outgrow 32 bits over a long scan
            pairs = np.unique(np.stack((prev + self._prev_offset, here + self._next_id - 1), axis=1), axis=0)
            for a, b in pairs:
                self._union(int(a), int(b))
        self._spare_labels, self._spare_dirty = self._prev_labels, self._prev_dirty
        self._prev_dirty = dirty
        # frame k's ids are its labels + offset: no frame-sized id array to fill
        self._prev_labels, self._prev_offset = labels, self._next_id - 1
        self._next_id += n
        root_of = {int(g): self._find(int(g)) for g in range(self._prev_offset + 1, self._next_id)}
        now = set(root_of.values())
        for root in {self._find(i) for i in self._open} - now:
            self._complete(root)
        self._open = sorted(now)
        # only this frame's ids are looked up again: forget the rest of the forest
        self._parent = {**root_of, **{r: r for r in now}}

    def _complete(self, root: int) -> None:
        region = self._regions.pop(root)
        if region.count < self.params.seed_min_voxels:
            self.rejected["seed_min_voxels"] += 1
        else:
            self._pending.append(region)

    # ---- growing -------------------------------------------------------------------
    def _close(self, ended: bool) -> list[Blob]:
        reach_f = self.params.max_size[2]
        reach = 2 * np.array(self._component_fyx)  # where two component boxes overlap
        open_regions = sorted((self._regions[r] for r in self._open), key=attrgetter("order"))
        open_orders = [q.order for q in open_regions]
        open_at = np.array([q.max_index for q in open_regions]).reshape(-1, 3)
        pending = sorted(self._pending, key=attrgetter("order"))
        at = np.array([r.max_index for r in pending]).reshape(-1, 3)
        waiting = np.ones(len(pending), bool)  # not grown yet: holds dimmer regions it may touch
        blobs = []
        for i, region in enumerate(pending):
            # the open regions brighter than this one: the first ones in order
            brighter = np.concatenate([at[:i][waiting[:i]], open_at[:bisect.bisect_left(open_orders, region.order)]])
            grown = None
            if not (ended or self._boxes_clear(region, brighter, reach)):
                clear, grown = self._valley_clear(region, brighter, reach)
                if not clear:
                    continue
            waiting[i] = False
            blobs += self._grow(region, grown)
        self._pending = [r for r, w in zip(pending, waiting) if w]
        first_needed = min([r.first for r in open_regions] + [r.max_index[0] for r in self._pending]
                           + [self.last + 1])
        low, self._low = self._low, first_needed - reach_f
        for f in range(max(low, 0), min(self._low, self.last + 1)):
            self._give_slot(f)
        return blobs

    def _boxes_clear(self, region: _Region, brighter: np.ndarray, reach: np.ndarray) -> bool:
        """No brighter region, known or still to come, has a growth box overlapping this one's.

        ``brighter`` holds the maxima of the brighter regions not grown yet,
        open ones included: an open region can only end up brighter than this
        one through a voxel it already has (a later maximum is too far along
        psi to matter), so its current maximum tells.
        """
        if region.max_index[0] > self.last - reach[0]:
            return False  # a brighter region may still appear within reach along psi
        return not np.all(np.abs(brighter - region.max_index) <= reach, axis=1).any()

    def _valley_clear(self, region: _Region, brighter: np.ndarray, reach: np.ndarray) -> tuple[bool, np.ndarray | None]:
        """No brighter region can reach this one's voxels: the valley around it is closed; and the component
        around its maximum that told (`_grow`'s own where it lies in the growth box), None if none was grown.

        A brighter region Q can only take a voxel this one would take through a
        path of voxels >= min(grow_low, grow_high, M) joining the two maxima
        (both thresholds are at least that) inside the union of the two growth
        boxes. For Q at or after this maximum along psi that union starts F
        frames before it. So once that component around M has stopped growing
        along psi and holds no such maximum still to be grown, and no earlier
        brighter region's box overlaps, nothing to come can change this blob:
        it closes a frame after the spot ends.
        """
        p = self.params
        f, y, x = region.max_index
        reach_f, reach_y, reach_x = self._component_fyx
        earlier = brighter[:, 0] < f
        if np.all(np.abs(brighter[earlier] - region.max_index) <= reach, axis=1).any():
            return False, None
        ny, nx = self.frame_shape
        box = (max(f - reach_f, 0), min(f + 3 * reach_f, self.last), max(y - 3 * reach_y, 0),
               min(y + 3 * reach_y, ny - 1), max(x - 3 * reach_x, 0), min(x + 3 * reach_x, nx - 1))
        high = np.inf if p.grow_high is None else p.grow_high
        if not region.flooded and region.valley is None and region.capped is None:
            rim = self._rim(region)
            if self._flooded(rim):
                own = self._own_threshold(region, rim)
                if own is None or self._flooded(rim, own):
                    return True, None  # rejected as flooded in `_grow`, whatever comes: not held
                region.flooded = True  # told by the frames alone: a resumed run tells the same
        if region.flooded:
            return False, None
        if region.capped == self._claims:
            # Its valley reached VALLEY_VOXELS and nothing was claimed since: in the box grown by the frames since,
            # the component holds at least those voxels again. Not grown again (a flood of noise seeds kept each
            # pending region growing 200,000 voxels at every frame: 1 frame/s).
            return False, None
        kernel_args = (self._values, self._slot_of, self._flags, self.mask, self._low_tiles, p.tile_px, *box)
        valid = False
        if region.valley is not None:  # tried at an earlier frame: grown on from there
            grown, grown_f1 = region.valley
            voxels, complete, valid = grow_region_on(*kernel_args, -np.inf, high, region.max_value,
                                                     p.connectivity == 26, VALLEY_VOXELS, grown, grown_f1)
        if not valid:
            voxels, complete = grow_region(*kernel_args, f, y, x, -np.inf, high, region.max_value,
                                           p.connectivity == 26, VALLEY_VOXELS)
        region.valley = (voxels, box[1]) if complete and voxels.size else None
        region.capped = None if complete else self._claims
        if not complete:
            return False, None
        if voxels.size == 0:
            return True, voxels  # its maximum is already claimed: nothing can change that
        if f + 3 * reach_f > self.last and voxels[-1] // (ny * nx) == self.last:
            return False, None  # still growing along psi
        later = brighter[~earlier]
        keys = (later[:, 0] * ny + later[:, 1]) * nx + later[:, 2]
        at = np.minimum(np.searchsorted(voxels, keys), voxels.size - 1)  # voxels are sorted: np.isin sorts again
        return not (voxels[at] == keys).any(), voxels

    def _grow(self, region: _Region, grown: np.ndarray | None = None) -> list[Blob]:
        """The blobs of ``region``; ``grown``: the component `_valley_clear` has just grown around its maximum,
        with the same thresholds in a box around the growth box (taken as the blob's when it lies in it)."""
        p = self.params
        f, y, x = region.max_index
        reach_x, reach_y, reach_f = p.component_size
        ny, nx = self.frame_shape
        f0, f1 = max(f - reach_f, 0), min(f + reach_f, self.last)
        y0, y1 = max(y - reach_y, 0), min(y + reach_y, ny - 1)
        x0, x1 = max(x - reach_x, 0), min(x + reach_x, nx - 1)
        peak = region.max_value
        high = np.inf if p.grow_high is None else p.grow_high
        if grown is not None and _inside(grown, (ny, nx), (f0, f1, y0, y1, x0, x1)):
            voxels = grown  # the component from the same voxel with the same thresholds: the same voxels
        else:
            args = (self._values, self._slot_of, self._flags, self.mask, self._low_tiles, p.tile_px, f0, f1, y0, y1,
                    x0, x1, f, y, x)
            rim = self._rim(region)
            complete = not self._flooded(rim)
            if complete:
                voxels, complete = grow_region(*args, -np.inf, high, peak, p.connectivity == 26, COMPONENT_VOXELS)
            if not complete:  # see FLOOD_SHARE
                if self.flooded[1] < 0:
                    self.flooded[1:] = [f, y, x]
                own = self._own_threshold(region, rim)
                complete = own is not None and not self._flooded(rim, own)
                if complete:
                    voxels, complete = grow_region(*args, own, high, peak, p.connectivity == 26, COMPONENT_VOXELS)
                if not complete:
                    self.rejected["flooded"] += 1
                    return []
                self.flooded[0] += 1
        if voxels.size == 0:
            self.rejected["maximum_claimed"] += 1
            return []
        fs, ys, xs = np.unravel_index(voxels, (self.last + 1, ny, nx))
        slots = self._frame_slots(fs)
        found = self._values[slots, ys, xs].astype(np.float64)
        low = self._low_tiles[slots, ys // p.tile_px, xs // p.tile_px].astype(np.float64)
        component, box, conn26 = (fs, ys, xs, found, low), (f0, f1, y0, y1, x0, x1), p.connectivity == 26
        blobs, zingers, parts = [], [], []
        alive = np.ones(fs.size, bool)  # the voxels no part has taken yet
        first = True
        while alive.any():
            at = np.flatnonzero(alive)
            top = at[split_maxima(fs[at], ys[at], xs[at], found[at], SPLIT_LOW * low[at], *p.split_rule(), conn26)]
            skirt = self._skirt(region, voxels, top, component) if first else -1
            again = False
            roots = np.unique(top)  # each part's peak: brightest first, then by index
            for root in roots[np.lexsort((roots, -found[roots]))]:
                part = np.zeros(fs.size, bool)
                part[at[top == root]] = True
                if root == skirt:
                    self.rejected["tail_of_blob"] += 1
                elif first or np.count_nonzero(found[part] >= SPLIT_LOW * low[part]) >= p.seed_min_voxels:
                    whole = (fs[root], ys[root], xs[root]) == tuple(region.max_index)
                    got, zinger, remnant = self._part(component, root, part,
                                                      region.max_value if whole else float(found[root]), box, (f, y, x))
                    blobs += got
                    parts += [part] * len(got)
                    if zinger is not None:
                        zingers.append(zinger)
                    if remnant:  # see REST_OF_PART: the rest is split again without it
                        alive &= ~self._zinger_reach(component, zinger)
                        again = True
                        break
                alive &= ~part
            if not again:
                break
            first = False
        for zinger in zingers:  # claimed once the component is split: no later region grows into them
            self._claim(fs[zinger], ys[zinger], xs[zinger])
        return self._shared(component, blobs, parts) if len(blobs) > 1 else blobs

    def _rim(self, region: _Region) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The values and lower clamps (``low`` tiles) of the unmasked pixels of the rim of the region's growth box,
        FLOOD_RIM_PX wide (beyond its own spot), in its maximum's frame, and the top of `grow_region`'s threshold
        there (grow_high, its peak); None where the box is small enough to be grown whole in no time."""
        p = self.params
        f, y, x = region.max_index
        reach_x, reach_y, reach_f = p.component_size
        ny, nx = self.frame_shape
        y0, y1, x0, x1 = max(y - reach_y, 0), min(y + reach_y, ny - 1) + 1, max(x - reach_x, 0), min(x + reach_x, nx - 1) + 1
        # the box in the frame and from frame 0, not cut at the last frame pushed: the same whenever it is asked
        if (y1 - y0) * (x1 - x0) * (f + reach_f - max(f - reach_f, 0) + 1) <= COMPONENT_VOXELS:
            return None
        slot, tile, rim = self._slot_of[f % self._capacity], p.tile_px, FLOOD_RIM_PX
        strips = ((y0, y0 + rim, x0, x1), (y1 - rim, y1, x0, x1), (y0 + rim, y1 - rim, x0, x0 + rim),
                  (y0 + rim, y1 - rim, x1 - rim, x1))
        if y1 - y0 <= 2 * rim or x1 - x0 <= 2 * rim:  # cut by the frame's edges: the whole box
            strips = ((y0, y1, x0, x1),)
        values, lows = [], []
        for ya, yb, xa, xb in strips:
            unmasked = ~self.mask[ya:yb, xa:xb]
            values.append(self._values[slot, ya:yb, xa:xb][unmasked])
            lows.append(self._low_tiles[slot][np.ix_(np.arange(ya, yb) // tile, np.arange(xa, xb) // tile)][unmasked])
        top = min(np.inf if p.grow_high is None else p.grow_high, region.max_value)
        return np.concatenate(values).astype(np.float64), np.concatenate(lows).astype(np.float64), top

    @staticmethod
    def _flooded(rim: tuple[np.ndarray, np.ndarray, float] | None, scaled_peak: float = -np.inf) -> bool:
        """More than FLOOD_SHARE of the `_rim`'s pixels are at or above `grow_region`'s threshold with
        ``scaled_peak``."""
        if rim is None:
            return False
        values, low, top = rim
        return np.count_nonzero(values >= np.minimum(np.maximum(low, scaled_peak), top)) > FLOOD_SHARE * values.size

    def _own_threshold(self, region: _Region, rim: tuple[np.ndarray, np.ndarray, float] | None) -> float | None:
        """A flooded region's threshold: ``grow_ratio`` of the way from the median of its `_rim` (the level the
        flood lifted the frame to there) to its peak; None where the peak does not stand the seed threshold above
        that level (noise lifted by the flood, not a spot). The rim's values are taken at least at the lower
        threshold: a sparse scan holds none below it (`resegment` tells the same level)."""
        level = 0.0
        if rim is not None and rim[0].size:
            values, low, top = rim
            level = float(np.median(np.maximum(values, np.minimum(low, top))))
        f, y, x = region.max_index
        tile = self.params.tile_px
        if region.max_value - max(level, 0.0) < self._seed_tiles[y // tile, x // tile]:
            return None
        return level + self.params.grow_ratio * (region.max_value - level)

    def _shared(self, component, blobs: list[Blob], parts: list[np.ndarray]) -> list[Blob]:
        """The ``blobs`` of one component, each with the moments of its share of the voxels of all their
        ``parts`` and those voxels in its integral counted by that share (see SPOT_SHARES), where its centroid
        lies near its box (`centroid_near`)."""
        fs, ys, xs, _, _ = component
        owner = np.full(fs.size, -1, np.int64)
        for p, part in enumerate(parts):
            owner[part] = p
        held = np.flatnonzero(owner >= 0)
        work = len(blobs) * held.size
        if work > SHARE_MAX_WORK:
            return blobs
        shaped = min(SHARE_SHAPED_ROUNDS, max(SHARE_ROUND_BUDGET // work - SHARE_ROUNDS, 0))
        owner, f, y, x = owner[held], fs[held], ys[held], xs[held]
        values = self._measures[self._frame_slots(f), y, x].astype(np.float64)
        light = np.empty((len(blobs), held.size))
        shared_light(f, y, x, values, owner, len(blobs), SHARE_ROUNDS, SHARE_SETTLED_PX, shaped, SHARE_SPREAD_PX2,
                     SHARE_SHAPE, SHARE_TOL_PX, light)
        # float coordinates: a float64 @ int64 product takes numpy's generic loop, 80 x BLAS's time
        moments = light @ np.stack((f, y, x), axis=1).astype(np.float64)
        out = []
        for p, (blob, share) in enumerate(zip(blobs, light)):
            fa, ya, xa, fb, yb, xb = blob.bbox
            weights = (float(share.sum()), *(float(m) for m in moments[p]))
            if not centroid_near(weights, (fa, ya, xa), (fb, yb, xb)):
                out.append(blob)
                continue
            # in its box, the parts' voxels count by its share, not whole where its own
            f0, f1, y0, y1, x0, x1 = self._integral_box(fa, fb, ya, yb, xa, xb)
            inside = (f >= f0) & (f <= f1) & (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
            total = blob.total - float(values[inside & (owner == p)].sum()) + float(share[inside].sum())
            out.append(replace(blob, moments=weights, total=total))
        return out

    def _skirt(self, region: _Region, voxels, top, component) -> int:
        """The root of the part (``top``: each voxel's, ``voxels`` their sorted flat indices) that holds this region's
        own maximum where that part's peak is brighter and the part touches a claimed voxel (its skirt, see below),
        else -1."""
        # This region's own maximum in the part of a brighter voxel: it lies on the slope of a spot grown
        # before it (brighter regions are grown first), in what that spot left below tau x its peak -- a
        # noise-lifted seed in a big spot's rocking tail, whose part would take a bump of that skirt for a peak.
        # A spot whose peak lies where the seed threshold is higher (another tile or frame) is no seed there,
        # and its region's maximum lies on its slope too: a skirt touches the blob that left it -- in the frames
        # of the growth box: those before it may no longer be held (a blob there went unseen, and the skirt's
        # bump became a spot of its own).
        fs, ys, xs, found, _ = component
        ny, nx = self.frame_shape
        f, y, x = region.max_index
        reach_f = self.params.max_size[2]
        own = top[np.searchsorted(voxels, (f * ny + y) * nx + x)]
        if found[own] > region.max_value:
            part = top == own
            box = (max(f - reach_f, 0), min(f + reach_f, self.last), 0, ny - 1, 0, nx - 1)
            if self._claimed_beside(fs[part], ys[part], xs[part], box) > -np.inf:
                return int(own)
        return -1

    def _part(self, component, root: int, part: np.ndarray, peak: float, box, centre
              ) -> tuple[list[Blob], np.ndarray | None, bool]:
        """The blob of one part (``part``: which voxels of the ``component`` (fs, ys, xs, found, low) it holds,
        ``root`` its maximum, of value ``peak``) of a region grown in ``box`` around ``centre``, in a list; the
        voxels of its blob where that is rejected as a zinger, else None; and whether it is a zinger's remnant
        (see REST_OF_PART): then those voxels, too, if it was rejected as too small."""
        p = self.params
        fs, ys, xs, found, low = component
        if self._on_brighter_blob(fs[part], ys[part], xs[part], found[part], peak, SPLIT_LOW * low[root], box):
            self.rejected["tail_of_blob"] += 1
            return [], None, False
        high = np.inf if p.grow_high is None else p.grow_high
        threshold = np.minimum(np.minimum(np.maximum(p.grow_ratio * peak, low), high), peak)
        keep = flood_from(fs, ys, xs, part & (found >= threshold), root, p.connectivity == 26)
        blob = self._blob(fs[keep], ys[keep], xs[keep], (int(fs[root]), int(ys[root]), int(xs[root])),
                          (fs[part], ys[part], xs[part]), centre, (fs[~part], ys[~part], xs[~part]))
        if isinstance(blob, Blob):
            return [blob], None, False
        zinger = blob == "zinger"
        remnant = (zinger or blob == "too_small" and fs[keep].min() == fs[keep].max()) \
            and peak >= ZINGER_PEAK_LOWS * low[root]
        return [], (keep if zinger or remnant else None), remnant

    @staticmethod
    def _zinger_reach(component, zinger: np.ndarray) -> np.ndarray:
        """The voxels of the zinger's blob and those of each of its frames within REST_MARGIN_PX of its box there:
        what the 3x3 median made of its pixels."""
        fs, ys, xs, _, _ = component
        reach = zinger.copy()
        for g in np.unique(fs[zinger]):
            ky, kx = ys[zinger & (fs == g)], xs[zinger & (fs == g)]
            reach |= (fs == g) & (ys >= ky.min() - REST_MARGIN_PX) & (ys <= ky.max() + REST_MARGIN_PX) \
                & (xs >= kx.min() - REST_MARGIN_PX) & (xs <= kx.max() + REST_MARGIN_PX)
        return reach

    def _claimed_beside(self, fs, ys, xs, box) -> float:
        """The greatest value of the claimed voxels next to these (through which they could grow), in the
        inclusive box f0, f1, y0, y1, x0, x1; -inf if none is."""
        return claimed_beside_max(self._values, self._slot_of, self._flags, fs, ys, xs, *box,
                                  self.params.connectivity == 26)

    def _on_brighter_blob(self, fs, ys, xs, values, peak: float, prominence: float, box) -> bool:
        """This part (its voxels, their values and its peak) meets a blob brighter than its peak, claimed before
        it, where it does not stand out above the saddle by the rule that splits touching spots
        (`split_maxima`; ``prominence`` its absolute term): it is no spot but what that blob left unclaimed
        below tau x its peak, its skirt -- a maximum beside the blob's voxels, or a noise-lifted seed a frame
        or two beyond a long rocking curve's voxels (a second detection around a faint spot of a fine psi
        step). The saddle: the brightest of its voxels beside the blob's (in the growth box ``box``: f0, f1,
        y0, y1, x0, x1). Only neighbours through which the blob could grow count, so this depends on the
        brighter regions the closing rules already wait for. Within one component no part meets a voxel
        brighter than its peak (the flooding would have given it that part), so spots split there are left
        as the split made them."""
        saddle = saddle_beside_brighter(self._values, self._slot_of, self._flags, fs, ys, xs, values, peak, *box,
                                        self.params.connectivity == 26)
        return bool(saddle > -np.inf and not stands_out(peak, saddle, prominence, *self.params.split_rule()))

    def _zinger_pair(self, k: int, fs, ys, xs) -> bool:
        """A blob of frames k and k + 1 that is two zingers in a row (ZINGER_PAIR): each frame's pixels a zinger's
        by `_zinger` with the other frame left out, and neither frame's peak with ZINGER_TAIL_FRACTION of itself
        (and grow_low) at its pixel in the other frame: no rocking curve joins them."""
        parts = []
        for g in (k, k + 1):
            py, px = ys[fs == g], xs[fs == g]
            values = self._values[self._slot_of[g % self._capacity], py, px]
            i = int(np.argmax(values))
            parts.append((g, py, px, (g, int(py[i]), int(px[i])), float(values[i])))
        tile = self.params.tile_px
        for (g, py, px, at, peak), other in zip(parts, (k + 1, k)):
            slot = self._slot_of[other % self._capacity]
            # at or above grow_low too: what the sparse scan holds decides the same
            floor = max(self._low_tiles[slot, at[1] // tile, at[2] // tile], ZINGER_TAIL_FRACTION * peak)
            if self._values[slot, at[1], at[2]] >= floor or not self._zinger(g, py, px, at, beside=other):
                return False
        return True

    def _zinger(self, k: int, ys, xs, max_index, beside: int | None = None) -> bool:
        """A blob of frame k alone (its pixels ys, xs): at most ZINGER_VOXELS (or ZINGER_TRACK_VOXELS in a line),
        and either a zinger taken out of its unfiltered values (a spike), or a peak ZINGER_PEAK_LOWS x its
        grow_low or more with fewer than ZINGER_TAIL_PIXELS of its pixels at or above grow_low and
        ZINGER_TAIL_FRACTION x that peak in the frame before and in the frame after (those of the scan): no
        rocking curve there; ``beside``: a frame beside it left out of that."""
        if ys.size > ZINGER_TRACK_VOXELS:
            return False
        tile = self.params.tile_px
        slot = self._slot_of[k % self._capacity]
        _, y, x = max_index
        spiked = self._spiked(slot, ys, xs)
        peak = self._values[slot, y, x]
        if peak < ZINGER_PEAK_LOWS * self._low_tiles[slot, y // tile, x // tile] and not spiked:
            return False
        for g in (k - 1, k + 1):
            if 0 <= g <= self.last and g != beside and not spiked:
                s = self._slot_of[g % self._capacity]
                tail = np.maximum(self._low_tiles[s, ys // tile, xs // tile], ZINGER_TAIL_FRACTION * peak)
                if np.count_nonzero(self._values[s, ys, xs] >= tail) >= ZINGER_TAIL_PIXELS:
                    return False
        return ys.size <= ZINGER_VOXELS or elongation(ys, xs) >= ZINGER_TRACK_ELONGATION

    def _spiked(self, slot: int, ys, xs) -> bool:
        """Whether a zinger was taken out of the unfiltered values of any of these pixels of slot ``slot``."""
        return bool(np.any((self._flags[slot, SPIKE, ys, xs >> 3] >> (xs & 7)) & 1))

    def _integral_box(self, fa, fb, ya, yb, xa, xb) -> tuple[int, int, int, int, int, int]:
        """The box (f0, f1, y0, y1, x0, x1, inclusive) a blob's integral is taken over: its own grown by half its
        extent (at least INTEGRAL_MARGIN_*), in the frame and the frames held."""
        ny, nx = self.frame_shape
        my, mx = (max(INTEGRAL_MARGIN_PX, -(-(b - a + 1) // 2)) for a, b in ((ya, yb), (xa, xb)))
        mf = max(INTEGRAL_MARGIN_FRAMES, -(-(fb - fa + 1) // 2))
        return (max(fa - mf, self._low, 0), min(fb + mf, self.last),
                max(ya - my, 0), min(yb + my, ny - 1), max(xa - mx, 0), min(xb + mx, nx - 1))

    def _blob(self, fs, ys, xs, max_index, spot, centre, others) -> Blob | str:
        """The blob of these voxels around its maximum, measured and claimed, its centroid taken over the
        ``spot``'s voxels (frames, ys, xs); else why it is rejected (counted in ``rejected``): ``too_small``
        (smaller than min_size), ``too_large`` (reaching an edge, inside the frame and the scan, of its own box,
        ``max_index`` +- max_blob_size, or of the component's around ``centre`` (f, y, x: the region's maximum;
        see PART_REACH), where it was cut) or ``zinger``.
        ``others``: the voxels (frames, ys, xs) of the other parts of its component, touching spots' voxels,
        which are none of its tails."""
        p = self.params
        fa, fb, ya, yb, xa, xb = (int(v) for v in (fs.min(), fs.max(), ys.min(), ys.max(), xs.min(), xs.max()))
        size = (xb - xa + 1, yb - ya + 1, fb - fa + 1)
        if any(s < m for s, m in zip(size, p.min_size)):
            self.rejected["too_small"] += 1
            return "too_small"
        extent = (fa, fb, ya, yb, xa, xb)
        if cut_by_box(extent, max_index, p.max_size) or cut_by_box(extent, centre, p.component_size):
            self.rejected["too_large"] += 1
            self.too_large_size = tuple(max(a, b) for a, b in zip(self.too_large_size, size))
            return "too_large"
        if p.drop_zingers and (fa == fb and self._zinger(fa, ys, xs, max_index)  # one frame deep: claimed by _grow
                               or fb == fa + 1 and self._zinger_pair(fa, fs, ys, xs)):
            self.rejected["zinger"] += 1
            return "zinger"
        self._claim(fs, ys, xs)
        volume = self._measures[self._frame_slots(np.arange(fa, fb + 1)), ya:yb + 1, xa:xb + 1]  # copies the box only
        value = volume[fs - fa, ys - ya, xs - xa]
        box = self._integral_box(fa, fb, ya, yb, xa, xb)
        tails = (unclaimed_sum(self._measures, self._slot_of, self._flags, self.mask, *box)
                 - unclaimed_sum_of(self._measures, self._slot_of, self._flags, *others, *box))
        peak_f, peak_y, peak_x = max_index
        # the value the blob reports at its maximum: the measured one, as all its values
        max_value = float(volume[peak_f - fa, peak_y - ya, peak_x - xa])
        weights = moments(self._measures, self._slot_of, *spot)
        if not centroid_near(weights, (fa, ya, xa), (fb, yb, xb)):  # see SPOT_CENTROID
            weights = moments(self._measures, self._slot_of, fs, ys, xs)
        blob = Blob(id=self.n_blobs, frame=fs.astype(np.int64), y=ys.astype(np.int64), x=xs.astype(np.int64),
                    value=value, max_index=tuple(max_index), max_value=max_value, volume=volume,
                    total=float(value.sum(dtype=np.float64)) + tails, moments=weights)
        self.n_blobs += 1
        return blob
