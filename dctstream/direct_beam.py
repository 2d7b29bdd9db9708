"""Finding the direct (transmitted) beam, the region that is never segmented."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

# A pixel belongs to the beam when it is above this fraction of the way from the
# detector's typical level to its brightest: the beam is ~100x the spots and the
# glow, and the sample's shadow inside the beam still transmits a good fraction.
_LEVEL = 0.1
# Bright parts smaller than this fraction of the largest are glints, not beam.
_MIN_PART = 0.01
# A beam stands this many times above the detector's typical level (both above the dark)...
_MIN_CONTRAST = 10.0
# ... and is a plateau cut by slits: most of the pixels above _LEVEL are above _PLATEAU_LEVEL of the
# way up (a box beam with the sample's shadow in it: 0.9; a glow, smooth and peaked: 0.6 for a Gaussian,
# 0.4 for an exponential).
_PLATEAU_LEVEL = 0.25
_MIN_PLATEAU = 0.75


def beam_mask(bbox: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of the box ``(x0, y0, width, height)`` in a frame of ``shape``; none for no box."""
    mask = np.zeros(shape, bool)
    if bbox is not None and len(bbox):
        x0, y0, w, h = bbox
        mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def detect_direct_beam(image: np.ndarray, margin_px: int,
                       mask: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, width, height)`` of the bright transmitted beam, grown by ``margin_px``.

    ``image`` is a background image above the dark (a per-pixel median over
    frames), so spots and zingers are already gone; pixels where ``mask`` is
    true (the detector's bad pixels) are left out. Returns None when there is
    no beam: nothing stands ``_MIN_CONTRAST`` times above the typical level, or
    what does is a smooth glow rather than a plateau.
    """
    valid = image if mask is None else image[~np.asarray(mask, bool)]
    if valid.size == 0:
        return None
    typical = max(float(np.percentile(valid, 50)), 0.0)
    brightest = float(np.percentile(valid, 99.9))
    if brightest <= typical or brightest < _MIN_CONTRAST * max(typical, 1.0):
        return None
    usable = np.ones(image.shape, bool) if mask is None else ~np.asarray(mask, bool)
    bright = usable & (image > typical + _LEVEL * (brightest - typical))
    plateau = usable & (image > typical + _PLATEAU_LEVEL * (brightest - typical))
    if plateau.sum() < _MIN_PLATEAU * bright.sum():
        return None
    labels, n = ndi.label(bright)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= _MIN_PART * sizes.max()))
    ys, xs = np.nonzero(keep)
    ny, nx = image.shape
    x0 = max(int(xs.min()) - margin_px, 0)
    y0 = max(int(ys.min()) - margin_px, 0)
    x1 = min(int(xs.max()) + margin_px, nx - 1)
    y1 = min(int(ys.max()) + margin_px, ny - 1)
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def margin_mean(frame: np.ndarray, dark: np.ndarray, bbox: tuple[int, int, int, int], margin_px: int,
                mask: np.ndarray | None = None) -> float:
    """Mean of (frame - dark) over the strips ``margin_px`` wide at the left and right edges of ``bbox``,
    leaving out the pixels where ``mask`` is true.

    Those strips see the incoming beam beside the sample, so their mean follows
    the source intensity.
    """
    x0, y0, w, h = bbox
    m = min(margin_px, w)
    rows = slice(y0, y0 + h)
    strips = (slice(x0, x0 + m), slice(x0 + w - m, x0 + w))
    left, right = (frame[rows, cols].astype(np.float64) - dark[rows, cols] for cols in strips)
    keep_left, keep_right = (np.ones(0, bool) if mask is None else ~mask[rows, cols] for cols in strips)
    if mask is None or (keep_left.all() and keep_right.all()):
        return float((left.sum() + right.sum()) / (left.size + right.size))
    return float((left[keep_left].sum() + right[keep_right].sum()) / max(keep_left.sum() + keep_right.sum(), 1))
