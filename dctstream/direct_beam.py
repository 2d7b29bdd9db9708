"""Finding the direct (transmitted) beam, the region that is never segmented."""

from __future__ import annotations

import bisect

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
# A single frame holds spots as well as the beam, some beside it a fifth as bright (the simulator's); half
# the way up, only the beam shows: a frame's beam edges are compared with its background's there.
_EDGE_LEVEL = 0.5
_MIN_PLATEAU = 0.75
# A beam is wide, and its parts (where a slit blade or an absorbing sample cuts it) alike in level: a bright
# part thinner than _MIN_THICKNESS_PX (hot pixels, a hot cluster, a bright column, module gaps stored as the
# largest count), or whose median (above the typical level) lies outside _PART_LEVELS x that of the largest
# part, is not part of it. Without these, one hot column made the box 40 % of the detector, 4-px gap lines
# all of it, a 5 x 5 hot cluster half of it (a new user's scans made elsewhere: recall 0.55, 0 and 0.83).
_MIN_THICKNESS_PX = 7
_PART_LEVELS = (0.25, 4.0)
_PART_SAMPLES = 1 << 14
# The typical and brightest levels are taken from at most this many pixels (an even stride over the
# rest): exact up to 512 x 512; at 2048 x 2048 the two percentiles of every pixel took 150 ms, too long
# for a beam found again every few frames, and a 1-in-16 sample moves them by far less than the noise.
_LEVEL_SAMPLES = 1 << 18


def beam_mask(bbox: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of the box ``(x0, y0, width, height)`` in a frame of ``shape``; none for no box."""
    mask = np.zeros(shape, bool)
    if bbox is not None and len(bbox):
        x0, y0, w, h = bbox
        mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def detect_direct_beam(image: np.ndarray, margin_px: int, mask: np.ndarray | None = None,
                       level: float = _LEVEL, near: Box | None = None) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, width, height)`` of the bright transmitted beam, grown by ``margin_px``.

    ``image`` is a background image above the dark (a per-pixel median over
    frames), so spots and zingers are already gone; pixels where ``mask`` is
    true (the detector's bad pixels) are left out. Returns None when there is
    no beam: nothing stands ``_MIN_CONTRAST`` times above the typical level, or
    what does is a smooth glow rather than a plateau. ``level``: the fraction of the way from the typical
    level to the brightest above which a pixel is beam. The beam's parts are thick and alike in level (see
    _MIN_THICKNESS_PX); ``near``: a box they must touch (a frame's beam is where its background's is).
    """
    valid = (image if mask is None else image[~np.asarray(mask, bool)]).reshape(-1)
    if valid.size == 0:
        return None
    typical, brightest = (float(v) for v in np.percentile(valid[::-(-valid.size // _LEVEL_SAMPLES)], [50, 99.9]))
    typical = max(typical, 0.0)
    if brightest <= typical or brightest < _MIN_CONTRAST * max(typical, 1.0):
        return None
    usable = np.ones(image.shape, bool) if mask is None else ~np.asarray(mask, bool)
    # Every pixel above either level lies in the box of those above the lower one: the parts are labelled
    # there alone, the same as over the whole frame (at 2048 x 2048 a beam found again every few frames
    # spent most of its 58 ms labelling, counting and boxing the parts of the whole frame).
    above = usable & (image > typical + min(level, _PLATEAU_LEVEL) * (brightest - typical))
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if not rows.size:
        return None
    full_ny, full_nx = image.shape
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    image, usable = image[box], usable[box]
    bright = usable & (image > typical + level * (brightest - typical))
    plateau = usable & (image > typical + _PLATEAU_LEVEL * (brightest - typical))
    if plateau.sum() < _MIN_PLATEAU * bright.sum():
        return None
    # an opening by a square, as two separable filters: 10x faster than ndi.binary_opening's, the same
    thick = ndi.maximum_filter(ndi.minimum_filter(bright, _MIN_THICKNESS_PX, mode="constant", cval=0),
                               _MIN_THICKNESS_PX, mode="constant", cval=0)
    labels, n = ndi.label(thick)
    if n == 0:
        return None
    parts = ndi.find_objects(labels)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    if near is not None:  # only the parts that touch it
        nx0, ny0, nw, nh = near
        for i, (ys, xs) in enumerate(parts):
            if (rows[0] + ys.stop <= ny0 or rows[0] + ys.start >= ny0 + nh or cols[0] + xs.stop <= nx0
                    or cols[0] + xs.start >= nx0 + nw):
                sizes[i] = 0
        if not sizes.any():
            return None
    main = int(sizes.argmax())
    large = np.flatnonzero(sizes >= _MIN_PART * sizes[main])
    levels = {int(i): _part_level(image, labels, parts[i], i + 1) - typical for i in large}
    low, high = _PART_LEVELS[0] * levels[main], _PART_LEVELS[1] * levels[main]
    parts = [parts[i] for i in large if low <= levels[int(i)] <= high]
    x0 = max(cols[0] + min(p[1].start for p in parts) - margin_px, 0)
    y0 = max(rows[0] + min(p[0].start for p in parts) - margin_px, 0)
    x1 = min(cols[0] + max(p[1].stop for p in parts) - 1 + margin_px, full_nx - 1)
    y1 = min(rows[0] + max(p[0].stop for p in parts) - 1 + margin_px, full_ny - 1)
    return (int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1))


def _part_level(image: np.ndarray, labels: np.ndarray, where, label: int) -> float:
    """The median of ``image`` over the part ``label`` of ``labels`` (its box ``where``): of every pixel up to
    _PART_SAMPLES of them, else of an even stride over them (a 2048 x 2048 beam's took 57 ms whole)."""
    values = image[where][labels[where] == label]
    return float(np.median(values[::-(-values.size // _PART_SAMPLES)]))


def edges_moved(background: np.ndarray, frame: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """How far the beam's edges (x0, y0, x1, y1) in ``frame`` lie from those in its ``background`` (both above
    the dark), each measured half the way up the beam so that no spot beside it counts; None when either
    shows no beam."""
    a = detect_direct_beam(background, 0, mask, _EDGE_LEVEL)
    if a is None:
        return None
    b = detect_direct_beam(frame, 0, mask, _EDGE_LEVEL, near=box_grown(a, max(a[2], a[3]) // 4, frame.shape))
    if b is None:
        return None
    return (b[0] - a[0], b[1] - a[1], b[0] + b[2] - a[0] - a[2], b[1] + b[3] - a[1] - a[3])


def box_moved(box: Box, moved: tuple[int, int, int, int], shape: tuple[int, int]) -> Box:
    """``box`` with its edges (x0, y0, x1, y1) moved by ``moved``, inside a frame of ``shape``."""
    ny, nx = shape
    x0, y0 = min(max(box[0] + moved[0], 0), nx - 1), min(max(box[1] + moved[1], 0), ny - 1)
    x1, y1 = max(min(box[0] + box[2] + moved[2], nx), x0 + 1), max(min(box[1] + box[3] + moved[3], ny), y0 + 1)
    return (x0, y0, x1 - x0, y1 - y0)


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


Box = tuple[int, int, int, int]


def box_union(a: Box | None, b: Box | None) -> Box | None:
    """The smallest box ``(x0, y0, width, height)`` holding both (either may be None)."""
    if a is None or b is None:
        return a if b is None else b
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0)


def box_grown(box: Box, px: int, shape: tuple[int, int]) -> Box:
    """``box`` grown by ``px`` on each side, inside a frame of ``shape``."""
    x0, y0, w, h = box
    ny, nx = shape
    x1, y1 = min(x0 + w + px, nx), min(y0 + h + px, ny)
    x0, y0 = max(x0 - px, 0), max(y0 - px, 0)
    return (x0, y0, x1 - x0, y1 - y0)


def box_ahead(found: Box | None, before: Box | None, shape: tuple[int, int]) -> Box | None:
    """``found`` with each edge that moved outwards since ``before`` (the beam found last time) moved as
    far again: where a beam that moves steadily will be by the next finding."""
    if found is None or before is None:
        return found
    fx0, fy0, fw, fh = found
    bx0, by0, bw, bh = before
    ny, nx = shape
    x0, y0 = max(fx0 - max(bx0 - fx0, 0), 0), max(fy0 - max(by0 - fy0, 0), 0)
    x1 = min(fx0 + fw + max(fx0 + fw - bx0 - bw, 0), nx)
    y1 = min(fy0 + fh + max(fy0 + fh - by0 - bh, 0), ny)
    return (x0, y0, x1 - x0, y1 - y0)


def followed_box(current: Box | None, found: Box | None, band: int, shape: tuple[int, int]) -> Box | None:
    """The beam box to use from now on, ``current`` the one in use and ``found`` the one just found.

    Hysteresis, so that the mask neither flickers nor lags behind a beam that
    moves: ``current`` is kept while it holds ``found`` with at most
    ``2 * band`` px to spare on every side; otherwise (the beam reaches out
    of it, or shrank well inside it) the new box is ``found`` grown by
    ``band``, room for the beam to move until it is found again. A beam not
    found (shutter closed, a frame without it) keeps the box in use.
    """
    if found is None:
        return current
    if current is None:
        return found
    fx0, fy0, fw, fh = found
    cx0, cy0, cw, ch = current
    spare = (fx0 - cx0, fy0 - cy0, (cx0 + cw) - (fx0 + fw), (cy0 + ch) - (fy0 + fh))
    if min(spare) >= 0 and max(spare) <= 2 * band:
        return current
    return box_grown(found, band, shape)


def box_at(track, k: int) -> Box | None:
    """Frame k's box in ``track`` (``(first frame, box or None)`` in frame order), None before its first."""
    i = bisect.bisect_right(track, k, key=lambda entry: entry[0]) - 1
    return track[i][1] if i >= 0 else None


def saturated_arrays(saturated: dict[int, np.ndarray], below: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``saturated`` (frame -> flat pixel indices, `NeverSegmented`) as two int64 arrays, the frame of each pixel
    (in order) and its flat index, for a file; ``below``: the frames before it only."""
    frames = sorted(f for f in list(saturated) if below is None or f < below)
    counts = [saturated[f].size for f in frames]
    flat = np.concatenate([saturated[f] for f in frames]) if frames else np.zeros(0)
    return np.repeat(np.asarray(frames, np.int64), counts), flat.astype(np.int64)


def saturated_from_arrays(frames: np.ndarray, flat: np.ndarray) -> dict[int, np.ndarray]:
    """The frame -> flat pixel indices (int32) that `saturated_arrays` gave."""
    firsts, starts = np.unique(frames, return_index=True)
    return {int(f): part.astype(np.int32) for f, part in zip(firsts, np.split(np.asarray(flat), starts[1:]))}


class NeverSegmented:
    """Whether a spot's box touches pixels never segmented or never measured in full: the fixed mask (bad
    pixels, gaps, a fixed beam box), the beam box of any of its frames (``track``: ``(first frame, box or
    None)`` in frame order, a box holding from its frame to the next entry's), an unusable frame
    (``unusable``, a set of frames: without the beam, or glitched; see background.stage) among its frames or
    beside them, or a saturated pixel in one of its frames (``saturated``: frame -> sorted flat pixel indices,
    `Detector.saturated`)."""

    def __init__(self, mask: np.ndarray, track=None, unusable=frozenset(), saturated=None):
        self.shape = mask.shape
        # a summed-area table: any box's masked pixels in four look-ups
        self._sum = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
        self._sum[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
        self.track = track if track is not None else []
        self.unusable = unusable  # another thread may add to it: only looked up
        self.saturated = saturated if saturated is not None else {}  # the same

    def touches(self, f0: int, f1: int, y0: int, y1: int, x0: int, x1: int) -> bool:
        """The inclusive box [f0..f1, y0..y1, x0..x1] grown by 1 px in x and y (and 1 frame, for unusable
        frames)."""
        if self.unusable and any(f in self.unusable for f in range(f0 - 1, f1 + 2)):
            return True
        ny, nx = self.shape
        y0, x0, y1, x1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 2, ny), min(x1 + 2, nx)
        for f in range(f0, f1 + 1) if self.saturated else ():
            flat = self.saturated.get(f)
            if flat is None:
                continue
            # the rows y0 .. y1 - 1 are one run of flat indices: the pixels there, then their columns
            rows = flat[np.searchsorted(flat, y0 * nx):np.searchsorted(flat, y1 * nx)]
            if np.any((rows % nx >= x0) & (rows % nx < x1)):
                return True
        s = self._sum
        if s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0] > 0:
            return True
        track = list(self.track)  # another thread appends to it
        for i, (start, box) in enumerate(track):
            end = track[i + 1][0] if i + 1 < len(track) else None
            if box is None or start > f1 or (end is not None and end <= f0):
                continue
            bx0, by0, bw, bh = box
            if bx0 < x1 and x0 < bx0 + bw and by0 < y1 and y0 < by0 + bh:
                return True
        return False
