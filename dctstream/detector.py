"""The detector's own defects, dealt with before the background: bad pixels, uneven gain, binning, the dark.

Maps (mask, flat, dark) are given in detector pixels, (y, x) like the frames,
and binned like the frames.  Binning by b takes the top-left
``(ny // b) * b`` x ``(nx // b) * b`` pixels (the remainder rows and columns
are dropped) and sums or averages each b x b block; binned pixel (i, j) covers
detector pixels ``b*i .. b*i + b - 1`` (rows) and ``b*j .. b*j + b - 1``
(columns).  A binned pixel is bad if any of its pixels is.

Pixels are masked for these reasons, counted separately in ``mask_counts``:
``file`` (detector.mask, non-zero = bad), ``flat`` (flat below
``flat_floor`` x its median), ``dead`` (without ``auto_mask``: see DEAD_MIN_FRAMES), and with ``auto_mask``
over the first window of frames: ``stuck`` (the same value in every frame: dead, gap or saturated) and
``hot`` (temporal median, after dark and flat, above the largest of its 8
neighbours' by more than ``HOT_SIGMAS`` x the median of their temporal
standard deviations (a stuck neighbour counting as infinitely noisy): an isolated bright pixel, which a spot, lasting a few
frames, or the smooth beam never is).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from .atomic import atomic_h5
from .background.kernels import pixels_at_least, window_median
from .errors import InputError
from .sources import load_dark, read_dataset, read_image
from .types import Blob

log = logging.getLogger(__name__)

HOT_SIGMAS = 20.0
# Without auto_mask, a pixel that reads one value in every frame of the first window (at least DEAD_MIN_FRAMES)
# while most of the detector varies is dead (a dead module, a region read as 0 or at the dark level): masked
# (``mask_counts["dead"]``). Its corrected value is always 0, and in a noise tile it shares with live pixels it
# took their noise down to nothing: a 40 x 60 px block at 0 counts seeded 150 false spots along its edge. Not
# dead: a value at the top of the frames' range (a saturated beam, left to the beam search), 0 where the
# typical pixel reads under a count (a photon-counting detector's empty pixels), nor any pixel when more than
# DEAD_MAX_FRACTION of them hold still (a simulation without noise).
DEAD_MIN_FRAMES = 20
DEAD_MAX_FRACTION = 0.25
# Largest integer float32 holds exactly: counts beyond it would be rounded in the corrected frames.
FLOAT32_EXACT = 2**24
# A given dark at or above the counts of this share of frame 0's pixels is said to be wrong: the right one
# leaves a pixel without light at or below it by its read noise alone, half the time; or more than a count above
# those of this share (the right one: under half, whatever the read noise, even with no pixel lit). Too high, it
# leaves the unlit pixels negative, and the beam's normalisation makes them jitter from frame to frame: false
# spots, and runs 50-90 x slower (a dark 150 counts high over 70 % of the pixels).
DARK_ABOVE_FRACTION = 0.9
DARK_WELL_ABOVE_FRACTION = 0.5
# More saturated pixels in a frame than this share are not kept to flag spots (see Detector.saturated).
SATURATED_MAX_FRACTION = 0.01
_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)


def _checked_shape(image: np.ndarray, url: str, key: str, shape, *, stack: bool) -> np.ndarray:
    image = np.asarray(image)  # a scalar dataset reads as a Python value (bytes of a string: a traceback before)
    if image.dtype.kind not in "buif" or image.shape[-2:] != tuple(shape) or image.ndim not in ((2, 3) if stack else (2,)):
        what = "an image" + (" or a stack (n, y, x)" if stack else "") + f" of {shape[0]} x {shape[1]} pixels (y, x)"
        raise InputError(f"{key}: {url}: expected {what} of numbers like the frames, "
                         f"got shape {image.shape} dtype {image.dtype}")
    if image.ndim == 3:
        if image.shape[0] == 0:
            raise InputError(f"{key}: {url}: expected at least 1 flat frame, got shape {image.shape}")
        image = image.mean(axis=0, dtype=np.float64)
    return image


def bin_image(image: np.ndarray, b: int, how: str, dtype=None) -> np.ndarray:
    """``image`` binned b x b: ``sum``, ``mean`` or ``any`` of each block (remainder rows/columns dropped)."""
    if b == 1:
        return image if dtype is None else image.astype(dtype)
    ny, nx = image.shape[0] // b, image.shape[1] // b
    blocks = image[:ny * b, :nx * b].reshape(ny, b, nx, b)
    if how == "any":
        return blocks.any(axis=(1, 3))
    if how == "sum":
        return blocks.sum(axis=(1, 3), dtype=dtype)
    return (blocks.sum(axis=(1, 3), dtype=np.float64) / (b * b)).astype(dtype or np.float32)


def binned_dtype(dtype: np.dtype, b: int, how: str) -> np.dtype:
    """Integers stay integers when summed (wide enough for b*b saturated pixels); averages are float32."""
    if b == 1:
        return dtype
    if how == "mean" or dtype.kind == "f":
        return np.dtype(np.float32)
    return np.dtype(np.uint32 if dtype.itemsize <= 2 and dtype.kind == "u" else np.int64)


# Faintest frames whose counts are above this fraction of the window's median frame's are no beam-off frames:
# an estimated dark of them holds the beam and the background (a scan without a closed shutter at its start).
LIT_DARK_FRACTION = 0.8


def faintest_dark(frames: np.ndarray, slots: np.ndarray, n_faintest: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-pixel median of the ``n_faintest`` frames of ``frames[slots]`` with the lowest sum.

    Returns ``(dark, positions, lit)``: positions are indices into ``slots`` (ties: the earlier frame); ``lit``
    the faintest frames' counts over the median frame's (1: no fainter than the others).
    """
    sums = np.array([frames[s].sum(dtype=np.float64) for s in slots])
    positions = np.sort(np.argsort(sums, kind="stable")[:n_faintest])
    typical = float(np.median(sums))
    lit = float(np.median(sums[positions]) / typical) if typical > 0 else 0.0
    return np.median(frames[slots[positions]], axis=0).astype(np.float32), positions, lit


def stuck_and_hot(frames: np.ndarray, slots: np.ndarray, dark: np.ndarray, gain: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(stuck, hot) pixel masks over ``frames[slots]`` (an odd count); the rules are in the module docstring."""
    low = frames[slots[0]].copy()
    high = low.copy()
    total = np.zeros(low.shape, np.float64)
    squares = np.zeros(low.shape, np.float64)
    for s in slots:
        np.minimum(low, frames[s], out=low)
        np.maximum(high, frames[s], out=high)
        values = frames[s].astype(np.float64)
        total += values
        squares += values * values
    stuck = low == high
    n = len(slots)
    noise = np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0.0)) * gain
    median = window_median(frames, slots, dark, np.ones(frames.shape[0], np.float32), gain=gain)
    brightest = ndi.maximum_filter(np.where(stuck, -np.inf, median), footprint=_NEIGHBOURS, mode="nearest")
    # a stuck neighbour has no noise: count it as noisy, so that it cannot make a pixel beside a gap look hot
    spread = ndi.median_filter(np.where(stuck, np.inf, noise), footprint=_NEIGHBOURS, mode="nearest")
    hot = ~stuck & (median - brightest > HOT_SIGMAS * np.maximum(spread, 1.0))
    return stuck, hot


def dead_pixels(frames: np.ndarray, slots: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pixels, outside ``mask``, dead over ``frames[slots]`` (see DEAD_MIN_FRAMES); none if too few frames.
    The candidates shrink frame by frame: a few compares a pixel, not one a frame."""
    dead = np.zeros(mask.shape, bool)
    live = ~mask.reshape(-1)
    n_live = int(live.sum())
    if len(slots) < DEAD_MIN_FRAMES or not n_live:
        return dead
    first = frames[slots[0]].reshape(-1)
    candidates = live & (frames[slots[1]].reshape(-1) == first)
    if first.dtype.kind in "ui":
        candidates &= first != np.iinfo(first.dtype).max
    if np.median(first[live][::max(1, n_live // 65536)]) < 1:  # photon counting: 0 is a count
        candidates &= first != 0
    most = DEAD_MAX_FRACTION * n_live
    index = np.flatnonzero(candidates)
    for s in slots[2:]:
        if index.size > most:
            return dead
        index = index[frames[s].reshape(-1)[index] == first[index]]
    if index.size <= most:
        dead.reshape(-1)[index] = True
    return dead


def unbin_blob(blob: Blob, b: int, binning_mode: str) -> Blob:
    """``blob`` in detector pixels: each binned voxel becomes its b x b pixels, sharing its counts.

    Binned value v becomes v / b² per pixel (``sum``) or v (``mean``), so the
    integral is the sum of the detector counts either way; the centroid is
    b x (binned centroid) + (b - 1) / 2, the box b x (binned box).
    """
    if b == 1:
        return blob
    share = 1.0 / (b * b) if binning_mode == "sum" else 1.0
    dy, dx = (a.ravel() for a in np.mgrid[0:b, 0:b])
    frame = np.repeat(blob.frame, b * b)
    y = (blob.y[:, None] * b + dy).ravel()
    x = (blob.x[:, None] * b + dx).ravel()
    value = np.repeat(blob.value * np.float32(share), b * b)
    order = np.lexsort((x, y, frame))
    volume = None
    if blob.volume is not None:
        volume = np.repeat(np.repeat(blob.volume * np.float32(share), b, axis=1), b, axis=2)
    f, my, mx = blob.max_index
    moments = None
    if blob.moments is not None:
        s, sf, sy, sx = (m * share * b * b for m in blob.moments)
        moments = (s, sf, b * sy + (b - 1) / 2 * s, b * sx + (b - 1) / 2 * s)
    return Blob(id=blob.id, frame=frame[order], y=y[order], x=x[order], value=value[order],
                max_index=(f, my * b, mx * b), max_value=float(blob.max_value * share), volume=volume,
                total=None if blob.total is None else blob.total * share * b * b, touches_mask=blob.touches_mask,
                moments=moments)


class Detector:
    """The ``detector`` and ``dark`` sections applied to frames of ``frame_shape`` and ``dtype`` from the source.

    ``shape``/``dtype`` are those of the frames after binning; ``mask``,
    ``gain`` (1 / flat) and ``dark`` are binned maps (``dark`` None until
    known).  ``first_window`` is what the background stage calls with the first
    window of frames.
    """

    def __init__(self, cfg, dark_cfg, frame_shape, dtype):
        self.cfg, self.dark_cfg = cfg, dark_cfg
        self.binning = b = cfg.binning
        self.raw_shape = tuple(frame_shape)
        self.raw_dtype = np.dtype(dtype)
        if min(self.raw_shape) < b:
            raise InputError(f"detector.binning: frames of {self.raw_shape} pixels, expected at least {b} x {b}")
        self.shape = (self.raw_shape[0] // b, self.raw_shape[1] // b)
        self.dtype = binned_dtype(self.raw_dtype, b, cfg.binning_mode)
        self.mask_counts: dict[str, int] = {}
        raw_mask = np.zeros(self.raw_shape, bool)
        if cfg.mask:
            image = _checked_shape(read_image(cfg.mask, "detector.mask"), cfg.mask, "detector.mask",
                                   self.raw_shape, stack=False)
            if image.dtype.kind == "f" and not np.isfinite(image).all():
                y, x = np.argwhere(~np.isfinite(image))[0]
                raise InputError(f"detector.mask: {cfg.mask}: {int((~np.isfinite(image)).sum())} pixels hold no number "
                                 f"(NaN or infinite), the first at (y, x) = ({y}, {x}), expected 0 for a good pixel "
                                 "and non-zero for a bad one")
            raw_mask = image != 0
            if raw_mask.all():  # it seeded nothing, and the run said the frames had no noise
                raise InputError(f"detector.mask: {cfg.mask}: every pixel is marked bad (non-zero), expected 0 for "
                                 "a good pixel and non-zero for a bad one (an inverted mask, 1 = good?)")
            self.mask_counts["file"] = int(raw_mask.sum())
        file_dark = dark_cfg.url is not None and dark_cfg.value is None and "::" not in dark_cfg.url
        raw_dark = load_dark(dark_cfg.url, dark_cfg.value, self.raw_shape,
                             read_image(dark_cfg.url, "dark.url") if file_dark else None)
        if raw_dark is not None and np.isnan(raw_dark).any():
            # a pixel without a dark (a module gap written as NaN, as frames of float counts hold them): masked
            nan = np.isnan(raw_dark)
            if nan.all():
                raise InputError(f"dark.url: {dark_cfg.url}: every pixel is NaN, expected dark counts")
            self.mask_counts["dark"] = int((nan & ~raw_mask).sum())
            raw_mask |= nan
            raw_dark[nan] = 0.0  # load_dark's own array
            log.info("dark.url: %s: %d pixels hold no dark (NaN): masked", dark_cfg.url, int(nan.sum()))
        self.dark = None if raw_dark is None else bin_image(raw_dark, b, cfg.binning_mode, np.float32)
        self.dark_source = ("dark.value" if dark_cfg.value is not None else "dark.url" if dark_cfg.url
                            else "estimated" if dark_cfg.estimate else "none")
        self.gain = None
        if cfg.flat:
            flat = _checked_shape(read_image(cfg.flat, "detector.flat"), cfg.flat, "detector.flat",
                                  self.raw_shape, stack=True).astype(np.float64)
            if raw_dark is not None:
                flat = flat - raw_dark
            elif dark_cfg.estimate:
                log.warning("detector.flat: %s: no dark subtracted from it: dark.estimate takes the dark from the "
                            "scan's frames, after the flat is made (its offset is taken for beam in the gain); give "
                            "dark.url or dark.value for the flat", cfg.flat)
            good = ~raw_mask & np.isfinite(flat) & (flat > 0)
            if not good.any():
                raise InputError(f"detector.flat: {cfg.flat}: expected a flat field > 0 (after the dark), "
                                 f"got no such pixel")
            flat = flat / np.median(flat[good])
            low = ~((flat >= cfg.flat_floor) & np.isfinite(flat))  # NaN and infinite too (a gain of 0: dead pixels)
            self.mask_counts["flat"] = int((low & ~raw_mask).sum())
            raw_mask |= low
            binned = bin_image(np.where(low, 1.0, flat), b, "mean", np.float64)
            self.gain = (1.0 / binned).astype(np.float32)
        self.mask = bin_image(raw_mask, b, "any")

    def check_first_frame(self, frame: np.ndarray, url: str, *, invalid_value: int | None = None,
                          pixel_mask: np.ndarray | None = None) -> None:
        """What the first frame shows about the counts, before any is used (raw frame, detector pixels).

        * Pixels with all bits set in 32-bit unsigned frames, or at ``invalid_value`` (what the source says
          its detector writes there: all bits set at its bit depth), are the detector's own mark of a pixel
          without data (Eiger module gaps and dead pixels): masked (``mask_counts["invalid"]``), not taken as
          counts.
        * ``pixel_mask`` (the detector's own, from the source: non-zero = bad) is masked too
          (``mask_counts["detector"]``).
        * Counts beyond 2**24, which float32 (the corrected frames' type) cannot hold exactly, are refused, and a
          dark of such counts where pixels are not masked.
        * A dark above the counts of most pixels of the frame (DARK_ABOVE_FRACTION) is logged.
        """
        valid = None
        if pixel_mask is not None:
            bad = _checked_shape(np.asarray(pixel_mask), url, "source.url (its detector's pixel mask)",
                                 self.raw_shape, stack=False) != 0
            binned = bin_image(bad, self.binning, "any")
            self.mask_counts["detector"] = int((binned & ~self.mask).sum())
            self.mask |= binned  # in place: the background stage holds this array
            log.info("%d pixels marked bad in the detector's own pixel mask: masked", int(bad.sum()))
        if invalid_value is None and self.raw_dtype == np.uint32:
            invalid_value = int(np.iinfo(np.uint32).max)
        if invalid_value is not None:
            invalid = frame == invalid_value
            if invalid.any():
                valid = ~invalid
                binned = bin_image(invalid, self.binning, "any")
                self.mask_counts["invalid"] = int((binned & ~self.mask).sum())
                self.mask |= binned
                log.info("%d pixels hold %#x (the detector's mark of a pixel without data): masked (%d not masked "
                         "already: masked_pixels.invalid)", int(invalid.sum()), invalid_value,
                         self.mask_counts["invalid"])
        if self.raw_dtype.itemsize >= 4:
            values = frame if valid is None else frame[valid]
            if values.size:
                low, high = int(values.min()), int(values.max())
                worst = high if abs(high) >= abs(low) else low
                if abs(worst) > FLOAT32_EXACT:
                    raise InputError(f"source.url: {url}: frame 0: counts up to {worst}, beyond {FLOAT32_EXACT} "
                                     "(2**24), the largest integer float32 holds exactly, expected detector counts "
                                     "within it (counts with a large offset? remove it at the detector or in the "
                                     "file; the background correction works in float32)")
        if self.dark is not None and self.dark_source in ("dark.url", "dark.value") and (~self.mask).any():
            # where counts are (a photon-counting detector's dark holds its mark of no data, all bits set,
            # where the frames do: masked above)
            worst = float(np.nanmax(np.abs(self.dark[~self.mask])))
            if worst > FLOAT32_EXACT:
                where = (f"dark.value: {self.dark_cfg.value:g}" if self.dark_source == "dark.value"
                         else f"dark.url: {self.dark_cfg.url}")
                raise InputError(f"{where}: dark counts of {worst:g} in size, beyond {FLOAT32_EXACT} (2**24), the "
                                 "largest integer float32 holds exactly, expected a detector's dark within it (the "
                                 "background correction works in float32)")
        if self.dark is not None and self.dark_source in ("dark.url", "dark.value"):
            binned = self.bin(frame).astype(np.float32) - self.dark
            keep = ~self.mask
            left = binned[keep]
            above = float(np.mean(left <= 0)) if left.size else 0.0
            well_above = float(np.mean(left < -1.0)) if left.size else 0.0
            if above >= DARK_ABOVE_FRACTION or well_above >= DARK_WELL_ABOVE_FRACTION:
                where = self.dark_cfg.url if self.dark_cfg.url else f"{self.dark_cfg.value:g}"
                what = ("every count of frame 0: nothing is left positive after subtracting it" if above == 1.0
                        else f"the counts of {100 * above:.0f} % of the pixels of frame 0")
                log.warning("%s: %s: the dark is above %s (dark median %.4g, frame median %.4g), expected a dark "
                            "below the frames (another exposure time or detector?): the unlit pixels are left "
                            "negative, which makes false spots and slow runs", self.dark_source, where, what,
                            float(np.median(self.dark[keep])), float(np.median(self.bin(frame)[keep])))

    def bin(self, frame: np.ndarray) -> np.ndarray:
        """The frame binned, in the detector's dtype: the frame itself, not a copy, when there is nothing to do
        (its consumers only read it: 0.8 ms a frame at 2048 x 2048)."""
        if self.binning == 1 and frame.dtype == self.dtype:
            return frame
        return bin_image(frame, self.binning, self.cfg.binning_mode, self.dtype)

    def saturated(self, frame: np.ndarray) -> np.ndarray | None:
        """The unmasked pixels of raw ``frame`` at the top of its 8- or 16-bit type -- the ADC saturated, their
        counts a lower bound -- as sorted flat indices of the binned frame; None for other types, when there are
        none, or more than `SATURATED_MAX_FRACTION` of the pixels (a frame the background stage finds unusable,
        or a saturated direct beam, whose box is never segmented)."""
        if self.raw_dtype.kind != "u" or self.raw_dtype.itemsize > 2:
            return None
        limit = int(SATURATED_MAX_FRACTION * frame.size)
        n, flat = pixels_at_least(frame, np.iinfo(self.raw_dtype).max, limit)
        if n == 0 or n > limit:
            return None
        if self.binning > 1:
            b, nx = self.binning, frame.shape[1]
            y, x = flat // nx // b, flat % nx // b
            inside = (y < self.shape[0]) & (x < self.shape[1])
            flat = np.unique(y[inside] * self.shape[1] + x[inside])
        flat = flat[~self.mask.ravel()[flat]]
        return flat.astype(np.int32) if flat.size else None

    def first_window(self, frames: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(dark estimated from the frames or None, the mask with the automatic detection added)."""
        if self.dark_cfg.estimate:
            self.dark, positions, lit = faintest_dark(frames, slots, self.dark_cfg.estimate_frames)
            self.dark_source = (f"estimated: per-pixel median of frames {positions.tolist()}, the "
                                f"{len(positions)} with the lowest sum among frames 0..{len(slots) - 1}")
            log.info("dark %s", self.dark_source)
            if lit > LIT_DARK_FRACTION:
                log.warning("dark.estimate: the faintest frames of the first window, %s, hold %.0f%% of the counts of "
                            "its median frame: lit, not beam-off frames, so the estimated dark holds the beam "
                            "and the background, and the spots' counts are measured above it (give dark.url or "
                            "dark.value)", positions.tolist(), 100 * lit)
        if self.cfg.auto_mask:
            stuck, hot = stuck_and_hot(frames, slots,
                                       np.zeros(self.shape, np.float32) if self.dark is None else self.dark,
                                       np.ones(self.shape, np.float32) if self.gain is None else self.gain)
            self.mask_counts["stuck"] = int((stuck & ~self.mask).sum())
            self.mask_counts["hot"] = int((hot & ~self.mask).sum())
            self.mask = self.mask | stuck | hot
        else:
            dead = dead_pixels(frames, slots, self.mask)
            if dead.any():
                self.mask_counts["dead"] = int(dead.sum())
                self.mask = self.mask | dead
                log.info("%d pixels read one value in each of the first %d frames while the others vary: dead, "
                         "masked", int(dead.sum()), len(slots))
        return self.dark, self.mask

    def bin_bbox(self, bbox):
        """A box in detector pixels -> the binned box covering it; other values pass."""
        b = self.binning
        if b == 1 or not isinstance(bbox, tuple):
            return bbox
        x0, y0, w, h = bbox
        x1, y1 = min(-(-(x0 + w) // b), self.shape[1]), min(-(-(y0 + h) // b), self.shape[0])
        return (x0 // b, y0 // b, max(x1 - x0 // b, 1), max(y1 - y0 // b, 1))

    def unbin_bbox(self, bbox):
        b = self.binning
        return bbox if bbox is None or b == 1 else tuple(int(v) * b for v in bbox)

    def unbin_blob(self, blob: Blob) -> Blob:
        """``blob`` in detector pixels (see `unbin_blob`)."""
        return unbin_blob(blob, self.binning, self.cfg.binning_mode)

    def attrs(self) -> dict:
        """Facts for the run record: where the dark came from, masked pixels, binning."""
        return {"dark": self.dark_source, "binning": f"{self.binning} x {self.binning} {self.cfg.binning_mode}",
                "masked_pixels": int(self.mask.sum()),
                **{f"masked_pixels_{why}": n for why, n in self.mask_counts.items()}}

    def write_mask(self, path, mask: np.ndarray, beam: np.ndarray) -> None:
        """``OUT/mask.h5``: the pixels the segmenter ignored, binned, with their reasons' counts as attributes."""
        with atomic_h5(Path(path)) as f:
            f["mask"] = mask.astype(np.uint8)
            f["direct_beam"] = beam.astype(np.uint8)
            f.attrs.update({k: v for k, v in self.attrs().items() if k != "dark"})
            f.attrs["interpretation"] = ("1 = bad pixel (mask file, flat below floor, stuck or hot), "
                                         "never segmented; in binned pixels")
