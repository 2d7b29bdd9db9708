"""The noise followed along psi equals a slow numpy reference, and is not moved by spots."""

import warnings

import numpy as np
import pytest

from dctstream.segment.noise import (PHOTON_FRAMES, NoiseTracker, frame_level, frame_noise, photon_gain,
                                     subtract_level)
from reference import reference_frame_level, reference_frame_noise


@pytest.mark.parametrize("shape", [(64, 64), (70, 45)])
def test_frame_noise_equals_reference(shape):
    rng = np.random.default_rng(0)
    frame = rng.normal(0, 1, shape) * np.linspace(1, 4, shape[1])
    frame = np.round(frame).astype(np.float32)  # integer steps, as corrected integer counts are
    mask = rng.random(shape) < 0.2
    mask[:32, :32] = True  # a tile with no unmasked pixel: NaN
    np.testing.assert_allclose(frame_noise(frame, mask), reference_frame_noise(frame, mask, 32), rtol=1e-12)
    assert np.isnan(frame_noise(frame, mask)[0, 0])


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 64, 255, 256])
def test_bucket_median_equals_numpys_median(n):
    """The bucket select (segment._kernels._median) gives np.median's value exactly: noise, integer ties, one
    value repeated, spots far above the rest, two clusters, infinities, values a few ulps apart."""
    from dctstream.segment._kernels import BUCKETS, _median

    rng = np.random.default_rng(n)
    cases = [rng.normal(0, 2.3, n), np.round(rng.normal(0, 1.0, n)), np.full(n, 7.5),
             np.where(rng.random(n) < 0.1, 1e4, rng.normal(0, 1, n)), np.where(rng.random(n) < 0.7, 50.0, 0.0)
             + rng.normal(0, 1, n), np.where(rng.random(n) < 0.05, np.inf, rng.normal(0, 1, n)),
             1.0 + np.arange(n) * np.finfo(float).eps * rng.permutation(n % 5 + 1).repeat(n)[:n],
             np.concatenate([np.full(n - n // 3, -np.inf), rng.normal(0, 1, n // 3)])]
    work, counts, ids = np.empty(n), np.empty((4, BUCKETS + 1), np.int64), np.empty(n, np.uint8)
    for values in cases:
        assert _median(values, work, counts, ids) == np.median(values)


def grain_over_tiles(rng, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise 2 (integer steps) on 96 x 96 px, a flat-topped spot of 31 x 31 px over tile (1, 1) but its last
    4 rows and columns (and a bit of its neighbours), and a pedestal of 3 sigmas over tile (0, 2) (a
    background not followed)."""
    frame = np.round(rng.normal(0, 2.0, (96, 96)))
    frame[29:60, 29:60] += amplitude * (1 + 0.5 * rng.random((31, 31)))
    frame[:32, 64:] += 6.0
    return frame.astype(np.float32), np.zeros(frame.shape, bool)


@pytest.mark.parametrize("amplitude", [10.0, 100.0])
def test_frame_noise_of_a_tile_a_spot_covers_equals_reference(amplitude):
    frame, mask = grain_over_tiles(np.random.default_rng(5), amplitude)
    np.testing.assert_allclose(frame_noise(frame, mask), reference_frame_noise(frame, mask, 32), rtol=1e-12)


def test_a_spot_covering_a_tile_does_not_raise_its_noise_a_pedestal_does_not_lower_it():
    """A grain's projection as wide as a tile puts the tile's median in the spot: the spread about the
    median is the spot's (about 25x the noise here). The residual's noise is centred on 0, and the values
    below 0 are noise alone: the tile's noise stays 2. A pedestal shifts every value up: the spread about
    0 is wider than about the median, which stays the noise."""
    frame, mask = grain_over_tiles(np.random.default_rng(6), 100.0)
    sigma = frame_noise(frame, mask)
    assert abs(sigma[1, 1] - 2.0) < 0.4  # was 26 with the spread about the median alone
    assert abs(sigma[0, 2] - 2.0) < 0.3  # the pedestal's spread, not less
    assert np.all(np.abs(np.delete(sigma.ravel(), [4, 2]) - 2.0) < 0.6)  # the neighbours the spot edges
    covered = frame[32:64, 32:64][::2, ::2]
    assert 1.4826 * np.median(np.abs(covered - np.median(covered))) > 10  # what the median alone saw


def test_clipped_noise_follows_integer_counts_the_mad_does_not():
    """Integer counts with a noise of 2.5: the median absolute deviation is a multiple of 1/2, so its sigma
    steps by 0.74 (1.48, 2.22, 2.97); the clipped deviation finds 2.5 in every tile."""
    rng = np.random.default_rng(1)
    frame = np.round(rng.normal(0, 2.5, (64, 64 * 20))).astype(np.float32)
    sigma = frame_noise(frame, np.zeros(frame.shape, bool), tile_px=64)  # 256 samples a tile
    assert np.all(np.abs(sigma - 2.5) < 0.35)
    mad = np.array([np.median(np.abs(t - np.median(t))) for t in np.split(frame[::4, ::4], 20, axis=1)])
    np.testing.assert_array_equal(mad * 2, np.round(mad * 2))
    assert np.max(np.abs(1.4826 * mad - 2.5)) > 0.45


def test_tracker_follows_a_noise_step_and_ignores_a_passing_spot():
    rng = np.random.default_rng(2)
    shape = (64, 64)
    mask = np.zeros(shape, bool)
    tracker = NoiseTracker(shape, mask, history=9)
    level = [1.0] * 30 + [3.0] * 30
    frames = [rng.normal(0, s, shape).astype(np.float32) for s in level]
    for k in range(20, 23):  # a spot over a whole tile for 3 frames
        frames[k][:32, :32] += 50
    tracker.prime(frames[:5])
    got = [tracker.push(k, f) for k, f in enumerate(frames)]
    assert all(abs(g[0, 0] - 1.0) < 0.15 for g in got[:30])  # the spot's 3 frames of 9 do not move it
    assert all(abs(g[1, 1] - 3.0) < 0.4 for g in got[37:])  # the step is followed within history / 2 + 2
    assert len(tracker.series) == 60


def test_tracker_reference_median_of_history():
    rng = np.random.default_rng(3)
    shape = (64, 96)
    mask = np.zeros(shape, bool)
    frames = [rng.normal(0, 1 + 0.1 * k, shape).astype(np.float32) for k in range(12)]
    tracker = NoiseTracker(shape, mask, history=4, floor=0.0)
    tracker.prime(frames[:3])
    per_frame = [reference_frame_noise(f, mask, 32) for f in frames]
    for k, f in enumerate(frames):
        got = tracker.push(k, f)
        want = np.median(per_frame[:3], axis=0) if k < 3 else np.median(per_frame[max(0, k - 3):k + 1], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_tracker_floor_for_photon_counting_frames():
    """Mostly zeros: the spread is 0, the floor (one count) is the noise."""
    rng = np.random.default_rng(4)
    frames = [(rng.random((64, 64)) < 0.02).astype(np.float32) for _ in range(5)]
    tracker = NoiseTracker((64, 64), np.zeros((64, 64), bool), floor=1.0)
    assert np.all(tracker.prime(frames) == 1.0)


@pytest.mark.parametrize("gain", [0.5, 1.0, 4.0])
def test_photon_gain_is_the_counts_per_photon_of_poisson_frames(gain):
    """Frames of Poisson photons times a gain, on a dark offset with read noise, under a glow and a few spots
    that move from frame to frame: the photon transfer gives the gain (read noise makes it a little high)."""
    rng = np.random.default_rng(int(gain * 10))
    ny, nx = 192, 256
    y, x = np.mgrid[0:ny, 0:nx]
    level = 40 + 3000 * np.exp(-((y - 96) ** 2 + (x - 100) ** 2) / (2 * 50 ** 2))  # photons
    dark = np.full((ny, nx), 100.0, np.float32)
    flat = rng.uniform(0.9, 1.1, (ny, nx)).astype(np.float32)  # corrected counts: (raw - dark) x flat
    frames = []
    for k in range(PHOTON_FRAMES):
        photons = level.copy()
        photons[20 + 30 * k:26 + 30 * k, 200:206] += 5000  # a spot, somewhere else in each frame
        frames.append((rng.poisson(photons) * gain / flat + dark + rng.normal(0, 2, (ny, nx))).astype(np.float32))
    mask = np.zeros((ny, nx), bool)
    got = photon_gain(frames, dark, flat, mask)
    assert gain <= got < 1.1 * gain
    # masked pixels do not count; no counts at all: unknown
    assert photon_gain([np.full((ny, nx), 100, np.float32)] * 3, dark, flat, mask) is None
    assert photon_gain(frames, dark, flat, np.ones((ny, nx), bool)) is None


@pytest.mark.parametrize("planes", [1, 4, 15])
def test_history_median_equals_numpys_nanmedian(planes):
    from dctstream.segment._kernels import nan_median_along_first

    rng = np.random.default_rng(7)
    held = np.round(rng.normal(3, 1, (planes, 9, 11)), 1)  # ties, as integer-step noise gives
    held[rng.random(held.shape) < 0.3] = np.nan
    held[:, 0, 0] = np.nan  # a tile masked in every frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN tile
        want = np.nanmedian(held, axis=0)
    np.testing.assert_array_equal(nan_median_along_first(held, np.empty(held.shape[1:])), want)


def test_frame_noise_of_a_tile_without_its_background_equals_reference_nan():
    """The beam off over tile (0, 1): its residual sits far below 0 with the read noise alone."""
    rng = np.random.default_rng(11)
    frame = np.round(rng.normal(0, 5.0, (64, 96))).astype(np.float32)
    frame[:32, 32:64] = np.round(rng.normal(-300, 1.0, (32, 32)))
    mask = np.zeros(frame.shape, bool)
    got = frame_noise(frame, mask)
    np.testing.assert_allclose(got, reference_frame_noise(frame, mask, 32), rtol=1e-12)
    assert np.isnan(got[0, 1]) and np.all(np.abs(np.delete(got.ravel(), 1) - 5.0) < 0.8)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("closed", [range(0, 12), range(30, 40)])
def test_frames_without_the_beam_do_not_lower_the_noise_of_the_frames_after_them(closed, zero):
    """A shutter that opens late, or the beam off for 10 frames: those corrected frames are the background's
    negative with the read noise alone (1 count against 5 lit). The frames after them keep the noise of
    the lit frames (a history median that took them would give ~1 for the next 7 frames: false spots)."""
    rng = np.random.default_rng(12)
    shape = (64, 64)
    frames = [np.round(rng.normal(0, 5.0, shape)).astype(np.float32) for _ in range(60)]
    for k in closed:  # zero: unusable frames, which read 0 once corrected (they are not in the history)
        frames[k] = np.zeros(shape, np.float32) if zero else np.round(rng.normal(-300, 1.0, shape)).astype(np.float32)
    tracker = NoiseTracker(shape, np.zeros(shape, bool), floor=1.0)
    tracker.prime(frames[:5])
    got = [tracker.push(k, f) for k, f in enumerate(frames)]
    lit = [k for k in range(60) if k not in closed]
    assert all(np.all(np.abs(got[k] - 5.0) < 0.8) for k in lit)


def _level_frames(rng, shape, mean):
    """A filtered-looking frame and its unfiltered copy: noise about ``mean``, spots (high in both), zingers (in
    the unfiltered one only) and masked pixels."""
    measure = rng.normal(mean, 2.0, shape).astype(np.float32)
    frame = rng.normal(mean, 0.8, shape).astype(np.float32)
    frame[10:20, 40:52] += 30.0  # a spot: lit in the filtered frame
    measure[10:20, 40:52] += 30.0
    measure[rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)] += 500.0  # zingers: clipped
    mask = np.zeros(shape, bool)
    mask[:, :6] = True
    mask[64:, 96:] = True  # a whole tile masked: NaN
    return frame, measure, mask


def test_frame_level_equals_reference():
    rng = np.random.default_rng(11)
    shape = (96, 128)
    frame, measure, mask = _level_frames(rng, shape, 0.7)
    sigma = frame_noise(frame, mask)
    sigma[0, 3] = np.nan  # a tile without a noise estimate has no level either
    got = frame_level(frame, measure, mask, sigma)
    want = reference_frame_level(frame, measure, mask, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert np.isnan(got[0, 3]) and np.isnan(got[2, 3])
    ok = np.isfinite(got)
    assert np.all(np.abs(got[ok] - 0.7) < 0.5)  # the spot (+3.5) and the zingers (+2) left out: the noise's mean


def test_subtract_level_takes_each_tiles_level_in_float32():
    rng = np.random.default_rng(12)
    measure = rng.normal(0, 3, (70, 100)).astype(np.float32)
    level = rng.normal(0, 1, (3, 4)).astype(np.float32)
    want = measure - np.repeat(np.repeat(level, 32, 0), 32, 1)[:70, :100]
    got = subtract_level(measure.copy(), level)
    np.testing.assert_array_equal(got, want)
    beam = measure.copy()
    beam[20:30, 40:70] = 0.0  # a followed beam's box reads 0, and stays 0: nothing to measure there
    got = subtract_level(beam, level, box=(40, 20, 30, 10))
    assert not got[20:30, 40:70].any()
    outside = np.ones(got.shape, bool)
    outside[20:30, 40:70] = False
    np.testing.assert_array_equal(got[outside], want[outside])
    with pytest.raises(ValueError, match="tile map"):
        subtract_level(measure, level[:2])


def _reference_neighbourhood_median(tiles):
    out = np.full(tiles.shape, np.nan)
    for y in range(tiles.shape[0]):
        for x in range(tiles.shape[1]):
            near = tiles[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            if np.isfinite(near).any():
                out[y, x] = np.median(near[np.isfinite(near)])
    return out


def test_tracker_level_is_the_median_of_the_last_frames_levels_and_0_where_none():
    """Each frame's level: over the pixels within its own noise of 0, the median of 3 x 3 tiles; frame k's:
    the median of the last frames' (the primed frames: of theirs)."""
    rng = np.random.default_rng(13)
    shape = (96, 128)
    pairs = [_level_frames(rng, shape, 0.1 * k) for k in range(10)]
    mask = pairs[0][2]
    tracker = NoiseTracker(shape, mask, history=4, floor=0.0)
    tracker.prime([f for f, _, _ in pairs[:3]], [m for _, m, _ in pairs[:3]])
    per_frame = [_reference_neighbourhood_median(reference_frame_level(f, m, mask, reference_frame_noise(f, mask)))
                 for f, m, _ in pairs]
    for k, (frame, measure, _) in enumerate(pairs):
        tracker.push(k, frame, measure)
        held = per_frame[:3] if k < 3 else per_frame[max(0, k - 3):k + 1]
        with np.errstate(all="ignore"):
            want = np.round(np.nanmedian(np.stack(held), axis=0) * 64) / 64  # on a grid of 1/64 count
        np.testing.assert_allclose(tracker.level[np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=1e-6)
        assert np.all(tracker.level[~np.isfinite(want)] == 0)  # not measured: not corrected
    assert tracker.level.dtype == np.float32 and abs(float(np.median(tracker.level)) - 0.8) < 0.15
    state = tracker.state()
    again = NoiseTracker(shape, mask, history=4, floor=0.0)
    again.restore(state)
    frame, measure, _ = _level_frames(rng, shape, 2.0)
    tracker.push(10, frame, measure), again.push(10, frame, measure)
    np.testing.assert_array_equal(tracker.level, again.level)


def test_a_spot_that_covers_a_tile_for_the_whole_history_is_not_its_level():
    """A grain's projection over one tile for every frame, below the thresholds (its skirt): the tile's own
    mean is the spot's, its 3 x 3 tiles' median the background's."""
    rng = np.random.default_rng(14)
    shape = (128, 128)
    mask = np.zeros(shape, bool)
    tracker = NoiseTracker(shape, mask, history=5)
    for k in range(8):
        measure = rng.normal(0.3, 2.0, shape).astype(np.float32)
        frame = rng.normal(0.3, 0.8, shape).astype(np.float32)
        measure[32:64, 32:64] += 1.5  # under 3 sigmas of the filtered frame: not excluded
        frame[32:64, 32:64] += 1.5
        sigma = tracker.push(k, frame, measure)
    own = frame_level(frame, measure, mask, sigma)
    assert own[1, 1] > 1.2  # the tile alone takes the skirt
    assert abs(tracker.level[1, 1] - 0.3) < 0.15
