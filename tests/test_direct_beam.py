"""The direct beam's box followed along the scan, and which spots touch pixels never segmented."""

import numpy as np
import pytest

from dctstream.direct_beam import NeverSegmented, beam_mask, box_grown, box_union, followed_box

SHAPE = (60, 80)


def test_box_union_and_growth_stay_in_the_frame():
    assert box_union((2, 3, 4, 5), None) == (2, 3, 4, 5) == box_union(None, (2, 3, 4, 5))
    assert box_union((2, 3, 4, 5), (10, 1, 2, 2)) == (2, 1, 10, 7)
    assert box_grown((1, 2, 10, 10), 3, SHAPE) == (0, 0, 14, 15)
    assert box_grown((70, 50, 10, 10), 3, SHAPE) == (67, 47, 13, 13)


def test_followed_box_holds_still_within_its_band_and_moves_when_the_beam_leaves_it():
    band = 2
    first = (20, 10, 30, 20)
    assert followed_box(None, first, band, SHAPE) == first  # first sight: as found
    assert followed_box(first, None, band, SHAPE) == first  # not found: kept
    assert followed_box(first, first, band, SHAPE) == first
    inside = (22, 12, 26, 16)  # 2 px to spare on each side: kept, no flicker
    assert followed_box(first, inside, band, SHAPE) == first
    leaking = (21, 10, 30, 20)  # one column out of the box: the found box grown by the band
    assert followed_box(first, leaking, band, SHAPE) == (19, 8, 34, 24)
    shrunk = (30, 15, 10, 10)  # far inside: the box shrinks to it, grown by the band
    assert followed_box(first, shrunk, band, SHAPE) == (28, 13, 14, 14)


@pytest.mark.parametrize("seed", range(5))
def test_saturated_pixels_touch_the_spots_of_their_frame_as_a_pixel_by_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    pixels = {f: np.zeros(SHAPE, bool) for f in range(60)}
    for f in rng.choice(60, size=20, replace=False):
        pixels[f].ravel()[rng.choice(pixels[f].size, size=int(rng.integers(1, 6)), replace=False)] = True
    saturated = {f: np.flatnonzero(p) for f, p in pixels.items() if p.any()}
    never = NeverSegmented(np.zeros(SHAPE, bool), saturated=saturated)
    hits = 0
    for _ in range(400):
        f0 = int(rng.integers(0, 60))
        f1 = min(f0 + int(rng.integers(0, 5)), 59)
        y0, x0 = int(rng.integers(0, SHAPE[0])), int(rng.integers(0, SHAPE[1]))
        y1, x1 = min(y0 + int(rng.integers(0, 12)), SHAPE[0] - 1), min(x0 + int(rng.integers(0, 12)), SHAPE[1] - 1)
        grown = np.zeros(SHAPE, bool)
        grown[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = True
        want = any(bool((grown & pixels[f]).any()) for f in range(f0, f1 + 1))
        hits += want
        assert never.touches(f0, f1, y0, y1, x0, x1) == want, (f0, f1, y0, y1, x0, x1)
    assert 10 < hits < 390  # both answers were asked for


@pytest.mark.parametrize("seed", range(5))
def test_touches_equals_a_pixel_by_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(SHAPE) < 0.002
    track = []
    for start in sorted(rng.choice(50, size=4, replace=False)):
        x0, y0 = rng.integers(0, 60), rng.integers(0, 40)
        track.append((int(start), None if rng.random() < 0.2 else (int(x0), int(y0), int(rng.integers(1, 20)),
                                                                  int(rng.integers(1, 20)))))
    never = NeverSegmented(mask, track)
    for _ in range(300):
        f0 = int(rng.integers(0, 60))
        f1 = f0 + int(rng.integers(0, 8))
        y0, x0 = int(rng.integers(0, SHAPE[0])), int(rng.integers(0, SHAPE[1]))
        y1, x1 = min(y0 + int(rng.integers(0, 10)), SHAPE[0] - 1), min(x0 + int(rng.integers(0, 10)), SHAPE[1] - 1)
        grown = np.zeros(SHAPE, bool)
        grown[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = True
        want = bool((grown & mask).any())
        for f in range(f0, f1 + 1):  # each frame's beam: the last entry of the track at or before it
            boxes = [box for start, box in track if start <= f]
            if boxes and boxes[-1] is not None:
                want |= bool((grown & beam_mask(boxes[-1], SHAPE)).any())
        assert never.touches(f0, f1, y0, y1, x0, x1) == want, (f0, f1, y0, y1, x0, x1)
