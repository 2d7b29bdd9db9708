"""The streamed background stage equals the whole-volume numpy/scipy reference exactly."""

import logging
import types

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from dctstream.background import BackgroundStage
from dctstream.background import kernels
from dctstream.direct_beam import detect_direct_beam, margin_mean
from reference import reference_corrected

BOX = (4, 3, 8, 6)  # x0, y0, width, height of the bright "beam" in the test frames


def make_scan(rng, n, shape=(12, 16), dtype=np.uint16):
    raw = rng.integers(100, 200, (n, *shape))
    raw[:, BOX[1]:BOX[1] + BOX[3], BOX[0]:BOX[0] + BOX[2]] += 2000
    raw = (raw * (1 + 0.05 * np.sin(np.arange(n) / 3))[:, None, None]).astype(dtype)
    dark = (rng.random(shape) * 10).astype(np.float32)
    return raw, dark


def stream(raw, dark, *, window, mode="exact", stride=1, normalise="none", filter_size=3, bbox=BOX, batch=1):
    cfg = types.SimpleNamespace(window=window, mode=mode, stride=stride, normalise=normalise, margin_px=2,
                                batch_frames=batch)
    stage = BackgroundStage(cfg, frame_shape=raw.shape[1:], dtype=raw.dtype, dark=dark, direct_beam=bbox,
                            filter_size=filter_size)
    emitted = []  # (frame index, frames pushed when it came out)
    frames = []
    stage.differences = []  # the unfiltered ones, beside
    for i, frame in enumerate(raw):
        for k, corrected, difference in stage.push(frame):
            emitted.append((k, i + 1))
            frames.append(corrected)
            stage.differences.append(difference)
    for k, corrected, difference in stage.finish():
        emitted.append((k, None))
        frames.append(corrected)
        stage.differences.append(difference)
    return np.stack(frames), emitted, stage


def margin_scales(raw, dark, margin_px=2):
    means = np.array([margin_mean(f, dark, BOX, margin_px) for f in raw])
    return (means[0] / means).astype(np.float32)


@pytest.mark.parametrize("mode,stride", [("exact", 1), ("block", 1), ("block", 4), ("block", 9)])
@pytest.mark.parametrize("normalise", ["none", "margin"])
@pytest.mark.parametrize("n", [4, 9, 10, 40])
@pytest.mark.parametrize("batch", [1, 3])
def test_streamed_equals_reference(mode, stride, normalise, n, batch):
    raw, dark = make_scan(np.random.default_rng(n), n)
    got, emitted, stage = stream(raw, dark, window=9, mode=mode, stride=stride, normalise=normalise, batch=batch)
    scales = margin_scales(raw, dark) if normalise == "margin" else None
    expected = reference_corrected(raw, window=9, mode=mode, stride=stride, dark=dark, scales=scales)
    assert [k for k, _ in emitted] == list(range(n))
    np.testing.assert_array_equal(got, expected)
    # the unfiltered differences come beside: the same frames before the median filter
    unfiltered = reference_corrected(raw, window=9, mode=mode, stride=stride, dark=dark, scales=scales,
                                     filter_size=1)
    np.testing.assert_array_equal(np.stack(stage.differences), unfiltered)


def test_exact_mode_latency_is_half_the_window():
    raw, dark = make_scan(np.random.default_rng(0), 30)
    window = 7
    _, emitted, _ = stream(raw, dark, window=window)
    for k, pushed in emitted:
        if k <= window // 2:
            assert pushed == window  # the start: once the first window is in
        elif k < 30 - window // 2:
            assert pushed == k + window // 2 + 1  # as soon as frame k + window//2 arrived
        else:
            assert pushed is None  # the end: when the scan ends


def test_block_mode_emits_a_block_once_its_window_is_in():
    raw, dark = make_scan(np.random.default_rng(0), 40)
    window, stride = 9, 5
    _, emitted, _ = stream(raw, dark, window=window, mode="block", stride=stride)
    for k, pushed in emitted:
        centre = (k // stride) * stride + stride // 2
        if pushed is not None:
            assert pushed == max(centre + window // 2 + 1, window)


@pytest.mark.parametrize("batch", [1, 4])
def test_ring_keeps_native_dtype_and_window_plus_batch_frames(batch):
    raw, dark = make_scan(np.random.default_rng(0), 20, dtype=np.uint16)
    _, _, stage = stream(raw, dark, window=7, batch=batch)
    assert stage.ring.data.dtype == np.uint16
    assert stage.ring.data.shape == (7 + batch, 12, 16)


def test_batched_exact_mode_latency():
    raw, dark = make_scan(np.random.default_rng(0), 40)
    window, batch = 7, 4
    _, emitted, _ = stream(raw, dark, window=window, batch=batch)
    for k, pushed in emitted:
        if window // 2 < k < 40 - window // 2 - batch:
            # frame k + window//2 arrived, and the batch of frames slid with it is complete
            last = k + window // 2
            assert pushed == window + ((last - window) // batch + 1) * batch


def test_int32_frames_and_no_dark():
    raw, _ = make_scan(np.random.default_rng(3), 15, dtype=np.int32)
    got, _, _ = stream(raw, None, window=5)
    np.testing.assert_array_equal(got, reference_corrected(raw, window=5))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 25), half=st.integers(1, 6), mode=st.sampled_from(["exact", "block"]),
       stride=st.integers(1, 13), size=st.sampled_from([1, 3, 5]), ny=st.integers(3, 9), nx=st.integers(3, 9),
       seed=st.integers(0, 2**16), batch=st.integers(1, 5), spread=st.sampled_from([30, 3000]))
def test_hypothesis_shapes_windows_modes(n, half, mode, stride, size, ny, nx, seed, batch, spread):
    window = 2 * half + 1
    stride = min(stride, window)
    rng = np.random.default_rng(seed)
    # a small spread gives many ties; a large one sends medians out of the histogram's bins
    raw = rng.integers(0, spread, (n, ny, nx)).astype(np.uint16)
    dark = rng.integers(0, 5, (ny, nx)).astype(np.float32)
    got, emitted, _ = stream(raw, dark, window=window, mode=mode, stride=stride, filter_size=size, bbox=None,
                             batch=batch)
    expected = reference_corrected(raw, window=window, mode=mode, stride=stride, dark=dark, filter_size=size)
    np.testing.assert_array_equal(got, expected)


# ---- kernels against numpy / scipy -------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (17, 23)])
def test_median_filter_equals_scipy(size, shape):
    img = np.random.default_rng(size).normal(size=shape).astype(np.float32)
    img[0, 0] = img[-1, -1]  # a tie
    np.testing.assert_array_equal(kernels.median_filter(img, size), ndi.median_filter(img, size=size, mode="reflect"))


def test_window_median_equals_numpy():
    rng = np.random.default_rng(0)
    ring = rng.integers(0, 1000, (11, 8, 9)).astype(np.uint16)
    dark = rng.random((8, 9)).astype(np.float32)
    scales = (0.9 + 0.2 * rng.random(11)).astype(np.float32)
    slots = np.array([5, 6, 7, 8, 9, 10, 0, 1, 2])
    expected = np.median((ring[slots].astype(np.float32) - dark) * scales[slots, None, None], axis=0)
    np.testing.assert_array_equal(kernels.window_median(ring, slots, dark, scales), expected)


def slide_and_check(frames, window, nbins, steps, emit_rate, rng, spare):
    """Slide a HistogramWindow over ``frames`` by ``steps``, asking for medians at ``emit_rate``: every median
    asked for, and the median after each slide, equal np.median of its window. Returns the window."""
    ring = np.zeros((window + spare, *frames.shape[1:]), frames.dtype)
    for f in range(window):
        ring[f % len(ring)] = frames[f]
    hist = kernels.HistogramWindow(ring, 0, window, nbins=nbins)
    np.testing.assert_array_equal(hist.median(), np.median(frames[:window], axis=0))
    f = window
    for step in steps:
        step = min(step, len(frames) - f)
        if step == 0:
            break
        for g in range(f, f + step):
            ring[g % len(ring)] = frames[g]
        emit = rng.random(step) < emit_rate
        medians = hist.slide(step, emit, np.zeros((step, *frames.shape[1:]), frames.dtype))
        for j in np.flatnonzero(emit):
            np.testing.assert_array_equal(medians[j], np.median(frames[f + j - window + 1:f + j + 1], axis=0))
        f += step
        np.testing.assert_array_equal(hist.median(), np.median(frames[f - window:f], axis=0))
    return hist


@pytest.mark.parametrize("sparse_emit", [False, True])
@pytest.mark.parametrize("nbins", [4, 256])
def test_histogram_window_slides_exactly(nbins, sparse_emit):
    """Every median asked for is exact; with few asked for (block mode), the median between calls still is."""
    rng = np.random.default_rng(nbins)
    n, window = 120, 15
    frames = (rng.normal(1000, 30, (n, 6, 7)) + np.linspace(0, 900, n)[:, None, None]).astype(np.uint16)
    frames[:, 0, 0] = rng.integers(0, 65535, n)  # jumps far out of any bins
    hist = slide_and_check(frames, window, nbins, [1, 5, 3, 2, 5, 4] * 20, 0.3 if sparse_emit else 1.0, rng,
                           spare=5)
    assert hist.rebuilds.sum() > 0  # the out-of-bins path was exercised
    with pytest.raises(ValueError):
        hist.slide(6)  # the ring cannot hold the window plus 6 new frames


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_histogram_window_leaves_its_dormant_box_and_wakes_it_exact(dtype):
    """Pixels of a dormant box are not slid, every other median is exact; woken, the box's medians are exact
    from the next slide on. `window_median_box` fills a box of a frame with its exact medians, nothing else."""
    rng = np.random.default_rng(4)
    n, window, ny, nx = 90, 15, 9, 11
    frames = (rng.normal(1000, 40, (n, ny, nx)) + np.linspace(0, 600, n)[:, None, None]).astype(dtype)
    ring = np.zeros((window + 4, ny, nx), dtype)
    for f in range(window):
        ring[f] = frames[f]
    hist = kernels.HistogramWindow(ring, 0, window, nbins=8)
    hist.dormant = box = (2, 6, 3, 9)  # rows 2-5, columns 3-8
    inside = np.zeros((ny, nx), bool)
    inside[2:6, 3:9] = True
    f = window
    for step in [4, 3, 4, 1, 4] * 3:
        for g in range(f, f + step):
            ring[g % len(ring)] = frames[g]
        if f >= 40 and hist.dormant is not None:
            assert (hist.median()[inside] != np.median(frames[f - window:f], axis=0)[inside]).any()  # left behind
            hist.wake()
            np.testing.assert_array_equal(hist.median(), np.median(frames[f - window:f], axis=0))
        medians = hist.slide(step, None, np.zeros((step, ny, nx), dtype))
        for j in range(step):
            want = np.median(frames[f + j - window + 1:f + j + 1], axis=0)
            seen = ~inside if hist.dormant is not None else np.ones((ny, nx), bool)
            np.testing.assert_array_equal(medians[j][seen], want[seen])
        f += step
    assert hist.dormant is None and f > 50
    out = np.full((ny, nx), 7, dtype)
    slots = np.array([(f - window + i) % len(ring) for i in range(window)])
    kernels.window_median_box(ring, slots, box, out)
    np.testing.assert_array_equal(out[inside], np.median(frames[f - window:f], axis=0)[inside])
    assert (out[~inside] == 7).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), half=st.integers(0, 8), nbins=st.sampled_from([2, 4, 16, 128]),
       n_extra=st.integers(1, 40), steps=st.lists(st.integers(1, 6), min_size=1, max_size=12),
       emit_rate=st.sampled_from([0.0, 0.3, 1.0]))
def test_hypothesis_histogram_window_saturation_constant_pixels_rebuilds(seed, half, nbins, n_extra, steps,
                                                                        emit_rate):
    """Pixels constant, saturated at 65535 part of the time, at 0, drifting out of the bins, jumping:
    every median asked for, and the median between calls, equal np.median."""
    rng = np.random.default_rng(seed)
    window = 2 * half + 1
    n = window + n_extra
    frames = rng.normal(30000, 200, (n, 4, 5)).clip(0, 65535).astype(np.uint16)
    frames[:, 0, 0] = 1234  # constant
    frames[:, 0, 1] = 65535  # saturated throughout
    frames[:, 0, 2] = np.where(rng.random(n) < 0.5, 65535, 65000)  # saturated half of the time
    frames[:, 0, 3] = 0
    frames[:, 0, 4] = np.where(rng.random(n) < 0.5, 0, 65535)  # the two ends of the range
    frames[:, 1, :] = (np.linspace(0, 60000, n)[:, None] + rng.integers(0, 3, (n, 5))).astype(np.uint16)  # drift
    frames[:, 2, :] = rng.integers(0, 65536, (n, 5))  # anywhere
    slide_and_check(frames, window, nbins, steps, emit_rate, rng, spare=6)


@pytest.mark.parametrize("window", [511, 513])  # the longest window with byte counts, the shortest without
def test_histogram_window_counts_past_a_byte(window):
    """Bins holding 256 values or more, filling and emptying: one value for most of the window, two values
    taking turns, saturation at 65535 more often than not; every median equals np.median."""
    rng = np.random.default_rng(window)
    n = window + 700
    frames = rng.normal(2000, 3, (n, 2, 4)).astype(np.uint16)
    frames[:, 0, 0] = 1500  # one bin holds the whole window
    frames[:350, 0, 1] = 1500  # a full bin that empties ...
    frames[n - 400:, 0, 2] = 2000  # ... and one that fills
    frames[:, 0, 3] = np.where(rng.random(n) < 0.5, 700, 701)  # two bins around 256 taking turns
    frames[:, 1, 0] = np.where(rng.random(n) < 0.6, 65535, 65534)
    frames[:, 1, 1] = np.where(np.arange(n) % 3 == 0, 9, 10)  # 2/3 of the values in one bin
    frames[:, 1, 2] = np.where(np.arange(n) < n // 2, 40000, 40001)  # all in one bin, then all in the next
    frames[:, 1, 3] = 1 + (rng.random(n) < 0.3)
    hist = slide_and_check(frames, window, 8, rng.integers(1, 40, 60), 0.5, rng, spare=40)
    assert hist.hist.dtype == (np.uint8 if window < 512 else np.uint16)
    # a miscounted overflowing bin would still give exact medians, from a rebuild at nearly every step;
    # the one jump of the median out of the bins (pixel 0, 1) takes one or two
    assert hist.rebuilds.sum() < 10


def test_sorted_window_slides_exactly():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 20, (60, 6, 7)).astype(np.uint16)
    window = kernels.SortedWindow(frames[:9].copy())
    for j in range(9, 60):
        window.replace(frames[j - 9], frames[j])
        np.testing.assert_array_equal(window.median(), np.median(frames[j - 8:j + 1], axis=0))
        assert np.all(np.diff(window.win, axis=1) >= 0)


@pytest.mark.parametrize("bad", [
    dict(slots=np.array([0, 1])),  # even
    dict(dark=np.zeros((3, 3), np.float32)),  # wrong shape
    dict(scales=np.ones(5, np.float64)),  # wrong dtype
])
def test_window_median_wrapper_rejects(bad):
    args = dict(ring=np.zeros((5, 4, 4), np.uint16), slots=np.array([0, 1, 2]),
                dark=np.zeros((4, 4), np.float32), scales=np.ones(5, np.float32))
    args.update(bad)
    with pytest.raises(ValueError):
        kernels.window_median(**args)


def test_detect_direct_beam_finds_the_bright_box_with_margin():
    image = np.full((100, 120), 100.0)
    image[30:60, 40:90] = 20000.0
    image[30:60, 60:70] = 7000.0  # the sample's shadow splits the beam's brightness
    image[5, 5] = 300.0
    assert detect_direct_beam(image, margin_px=3) == (37, 27, 56, 36)
    assert detect_direct_beam(np.full((10, 10), 5.0), margin_px=3) is None


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("level", [0.1, 0.5])
def test_detect_direct_beam_equals_a_whole_frame_reference(seed, level):
    """The beam's parts are labelled in the box of the pixels above the lower level only: the same box as
    labelling the whole frame, with glints, a second slit part, a glow, bad pixels, a beam at the edge."""
    from reference import reference_direct_beam

    rng = np.random.default_rng(seed)
    ny, nx = 96, 128
    y, x = np.mgrid[:ny, :nx]
    image = 40 + 30 * np.exp(-((y - 50) ** 2 + (x - 60) ** 2) / 800.0) + rng.normal(0, 2, (ny, nx))
    x0, y0 = rng.integers(-10, 100), rng.integers(-10, 70)
    image[max(y0, 0):y0 + 30, max(x0, 0):x0 + 40] += rng.uniform(2000, 5000)  # the beam, maybe cut by an edge
    if seed % 2:
        image[max(y0, 0):y0 + 30, x0 + 44:x0 + 54] += 1500  # a second part beyond a slit blade's shadow
    for _ in range(seed):  # glints, from a pixel to a few
        gy, gx = rng.integers(0, ny - 3), rng.integers(0, nx - 3)
        image[gy:gy + rng.integers(1, 4), gx:gx + rng.integers(1, 4)] += rng.uniform(500, 4000)
    mask = rng.random((ny, nx)) < 0.01 if seed > 2 else None
    image = image.astype(np.float32)
    got = detect_direct_beam(image, 3, mask, level)
    assert got == reference_direct_beam(image, 3, mask, level)
    assert got[0] <= max(x0, 0) < max(x0, 0) + 30 < got[0] + got[2] and got[1] <= max(y0, 0)  # it holds the beam


@pytest.mark.parametrize("defect", ["hot column", "hot cluster", "gap lines", "saturated spot"])
def test_detector_defects_and_bright_spots_are_no_part_of_the_beam(defect):
    """A bright column, a 5 x 5 cluster at 3x the beam, 4-px module gaps at the largest count: thin or unlike
    the beam in level, no part of its box (they made it 40 %, half and all of the detector). In a frame
    looked at for its own beam edges, a spot brighter than the beam beside it does not move them."""
    from dctstream.direct_beam import edges_moved

    rng = np.random.default_rng(3)
    clean = rng.poisson(300.0, (256, 256)).astype(np.float32)
    clean[109:145, 100:155] += 20000
    image = clean.copy()
    if defect == "hot column":
        image[:, 200] = rng.poisson(8000.0, 256)
    elif defect == "hot cluster":
        image[10:15, 10:15] = 60000
    elif defect == "gap lines":
        image[126:130, :] = image[:, 60:64] = 65535
    else:
        image[40:47, 30:37] = 65535  # a spot at the top of the range, clipped
    want = detect_direct_beam(clean, 2)
    assert want == (98, 107, 59, 40)
    if defect == "saturated spot":
        assert edges_moved(clean, image) == (0, 0, 0, 0)
    else:
        assert detect_direct_beam(image, 2) == want


def test_detect_direct_beam_finds_no_beam_in_a_glow_or_a_dim_scene():
    """No direct beam on the detector: a smooth glow, however bright, and a dim scene give no box."""
    y, x = np.mgrid[0:128, 0:160]
    glow = 40.0 + 3000.0 * np.exp(-((x - 80) ** 2 + (y - 64) ** 2) / (2 * 25.0 ** 2))
    assert detect_direct_beam(glow, margin_px=3) is None
    sharp_glow = 40.0 + 3000.0 * np.exp(-np.hypot(x - 80, y - 64) / 15.0)
    assert detect_direct_beam(sharp_glow, margin_px=3) is None
    assert detect_direct_beam(np.full((64, 64), 50.0) + (x[:64, :64] % 7), margin_px=3) is None
    beam = glow.copy()
    beam[40:90, 50:110] += 25000.0  # a slit-cut box beam over the same glow
    assert detect_direct_beam(beam, margin_px=2) == (48, 38, 64, 54)


def _source_gain(n):
    """A source that decays, oscillates and steps up 3% at a top-up."""
    k = np.arange(n)
    return (1 - 0.1 * k / n) * (1 + 0.05 * np.sin(2 * np.pi * k / 17)) * np.where(k >= 0.55 * n, 1.03, 1.0)


def _lit_scan(rng, n, shape=(48, 64), beam=True):
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    scene = 300.0 * np.exp(-np.hypot(x - 32, y - 24) / 20.0) + 50.0
    if beam:
        scene[16:32, 20:44] += 5000.0
    dark = np.full(shape, 100.0, np.float32)
    gain = _source_gain(n)
    raw = rng.poisson(scene[None] * gain[:, None, None]) + 100
    raw[n // 2, 5:8, 5:8] += 3000  # a spot
    return raw.astype(np.uint16), dark, gain


@pytest.mark.parametrize("beam", [True, False])
def test_auto_normalise_measures_the_source_with_or_without_a_beam(beam):
    """normalise: auto finds each frame's intensity from the frames: the scales undo the decay, the
    oscillation (5%) and the top-up step (3%) to a slow drift under 1% (which the median follows) and a
    frame-to-frame jitter under 0.4% (3,000 pixels of 50-350 counts), whether or not a direct beam is in the frame."""
    rng = np.random.default_rng(7)
    raw, dark, gain = _lit_scan(rng, 120, beam=beam)
    got, emitted, stage = stream(raw, dark, window=21, normalise="auto", bbox="none")
    scales = np.asarray(stage.frame_scales)
    assert scales.size == 120
    level = scales * gain
    assert np.max(np.abs(level / np.median(level) - 1)) < 0.01
    assert np.std(np.diff(level)) < 0.004 and abs(level[66] - level[65]) < 0.008  # 66: the top-up
    assert np.std(np.diff(gain)) > 0.01
    assert stage.normalise_facts()["measured"] is True
    # and the corrected frames are exactly those of the quantised reference with these scales
    expected = reference_corrected(raw, window=21, dark=dark, scales=scales.astype(np.float32))
    np.testing.assert_array_equal(got, expected)


def test_auto_normalise_gives_intensities_in_units_of_the_first_windows_median_beam():
    """A source that decays 60 % over the scan, no top-up: every frame is brought to the median beam of the
    first window (that of its middle frame), the documented unit, not to frame 0's beam."""
    rng = np.random.default_rng(10)
    n, window = 120, 21
    y, x = np.mgrid[0:48, 0:64]
    scene = 300.0 * np.exp(-np.hypot(x - 32, y - 24) / 20.0) + 50.0
    gain = 1 - 0.6 * np.arange(n) / n
    raw = (rng.poisson(scene[None] * gain[:, None, None]) + 100).astype(np.uint16)
    _, _, stage = stream(raw, np.full((48, 64), 100.0, np.float32), window=window, normalise="auto", bbox="none")
    level = np.asarray(stage.frame_scales) * gain
    np.testing.assert_allclose(level, np.median(gain[:window]), rtol=0.02)  # the drift of 1.5 % the median follows
    assert abs(np.median(gain[:window]) - gain[0]) > 0.04


def test_auto_normalise_leaves_dark_frames_alone():
    """A photon-counting-like scan (almost all zeros): nothing to measure the beam on, no scaling."""
    rng = np.random.default_rng(8)
    raw = (rng.random((40, 32, 32)) < 0.03).astype(np.uint32)
    got, _, stage = stream(raw, np.zeros((32, 32), np.float32), window=11, normalise="auto", bbox="none")
    assert stage.normalise_facts()["measured"] is False
    assert set(stage.frame_scales) == {1.0}
    np.testing.assert_array_equal(got, reference_corrected(raw, window=11, dark=np.zeros((32, 32), np.float32)))


def test_auto_normalise_makes_a_top_up_step_vanish_from_the_corrected_frames():
    """Without normalisation the source's oscillation and step leave a residual of hundreds of counts in
    the beam (5,300 counts); with auto, a few tens at most (the scales' 0.3% jitter on these small frames)."""
    rng = np.random.default_rng(9)
    raw, dark, _ = _lit_scan(rng, 160)
    residual = {}
    for mode in ("none", "auto"):
        got, _, _ = stream(raw, dark, window=41, normalise=mode, bbox="none", filter_size=1)
        residual[mode] = np.abs(got[80:100, 16:32, 20:44].mean(axis=(1, 2))).max()  # the beam, after the step
    assert residual["none"] > 100 and residual["auto"] < residual["none"] / 8


def _spoilt(raw):
    """The frames of a lit scan spoilt as detectors and sources spoil them, and a spot across the glitch at 30."""
    raw = raw.copy()
    raw[29:32, 40:43, 50:53] += 2000  # a spot across frame 30
    raw[30] = 0  # a readout glitch
    raw[50] = np.iinfo(raw.dtype).max  # a saturated frame
    raw[60:65] = 100 + (raw[60:65] % 3)  # the beam lost for 5 frames: the dark and its noise
    raw[70, 30:] = 0  # a frame cut short: its last 18 rows read 0
    return raw


@pytest.mark.parametrize("batch", [1, 4])
def test_unusable_frames_read_their_neighbours_mean_or_zero(batch):
    """Frames without the beam, or with many lit pixels stuck at 0 or the top value, are unusable (scale 0): one
    between two usable frames reads their mean against its own background, a run of them 0 -- exactly as the
    whole-volume reference -- and the others are scaled as before. A spot across the glitch stays in it."""
    rng = np.random.default_rng(21)
    clean, dark, _ = _lit_scan(rng, 90)
    raw = _spoilt(clean)
    got, _, stage = stream(raw, dark, window=21, normalise="auto", bbox="none", batch=batch)
    assert stage.unusable == {30, 50, 60, 61, 62, 63, 64, 70}
    scales = np.asarray(stage.frame_scales)
    assert set(np.flatnonzero(scales == 0)) == stage.unusable
    np.testing.assert_array_equal(got, reference_corrected(raw, window=21, dark=dark, scales=scales.astype(np.float32)))
    assert not got[60:65].any()
    assert got[30, 41, 51] > 1000  # the spot, bridged (0 before: cut in two)
    facts = stage.normalise_facts()
    assert facts["unusable_frames"] == 8 and facts["unusable"] == [[30, 30], [50, 50], [60, 64], [70, 70]]
    assert facts["beam_off_frames"] == 5  # the lost beam (30: stuck at 0)
    assert facts["scale_min"] > 0.8  # no 0 in the range


def test_stuck_pixels_of_every_frame_make_no_frame_unusable():
    """Pixels that read 0 or the top value in the reference too (a dead row, a saturated beam core) are no
    glitch; 1 % of the lit samples stuck anew is."""
    rng = np.random.default_rng(22)
    raw, dark, _ = _lit_scan(rng, 60)
    raw[:, 5, :] = 0
    raw[:, 20:24, 28:36] = np.iinfo(raw.dtype).max
    raw[40, 40:, :] = 0  # 8 of 48 rows: a frame cut short
    _, _, stage = stream(raw, dark, window=21, normalise="auto", bbox="none")
    assert stage.unusable == {40}


def test_auto_normalise_units_are_the_median_frames_beam_whatever_the_first_window_holds():
    """A first window of 29 frames at the full beam, 4 without it and 16 at 80 %: every frame is brought to
    the full beam (the median frame's) -- a per-pixel median of the mixture lay between them."""
    rng = np.random.default_rng(23)
    n, window = 120, 49
    y, x = np.mgrid[0:48, 0:64]
    scene = 300.0 * np.exp(-np.hypot(x - 32, y - 24) / 20.0) + 50.0
    gain = np.where(np.arange(n) < 33, 1.0, 0.8)
    gain[29:33] = 0.0
    raw = (rng.poisson(scene[None] * gain[:, None, None]) + 100).astype(np.uint16)
    _, _, stage = stream(raw, np.full((48, 64), 100.0, np.float32), window=window, normalise="auto", bbox="none")
    scales = np.asarray(stage.frame_scales)
    lit = gain > 0
    assert set(np.flatnonzero(~lit)) == stage.unusable
    np.testing.assert_allclose(scales[lit] * gain[lit], 1.0, atol=0.01)


def test_a_first_window_mostly_without_the_beam_is_measured_on_its_frames_with_it(caplog):
    """The shutter opened at frame 30 of a first window of 49: the beam is measured on the frames with it (a
    per-pixel median of the window is the dark, which left `normalise: auto` off and every dark frame in the
    medians); the frames without it are unusable, a top-up at frame 80 is followed, and it is said."""
    rng = np.random.default_rng(5)
    n, window = 120, 49
    y, x = np.mgrid[0:48, 0:64]
    scene = 300.0 * np.exp(-np.hypot(x - 32, y - 24) / 20.0) + 50.0
    gain = np.where(np.arange(n) < 80, 1.0, 1.05)
    gain[:30] = 0.0
    raw = (rng.poisson(scene[None] * gain[:, None, None]) + 100).astype(np.uint16)
    with caplog.at_level(logging.WARNING):
        _, _, stage = stream(raw, np.full((48, 64), 100.0, np.float32), window=window, normalise="auto",
                             bbox="none")
    scales = np.asarray(stage.frame_scales)
    assert stage.unusable == set(range(30))
    np.testing.assert_allclose(scales[30:] * gain[30:], 1.0, atol=0.01)
    assert "30 of the 49 frames of the first window without the beam" in caplog.text


def moving_beam_box(k: int) -> tuple[int, int, int, int]:
    """A beam that moves right 1 px every 6 frames and grows 1 px wider every 9 (its right edge 0.28 px a
    frame, 3.5 times faster than the validation's moving_beam scan)."""
    return (10 + k // 6, 12, 20 + k // 9, 14)


def moving_beam_scan(rng, n, shape=(40, 72)):
    raw = rng.poisson(100.0, (n, *shape))
    for k in range(n):
        x0, y0, w, h = moving_beam_box(k)
        raw[k, y0:y0 + h, x0:x0 + w] += 5000
    return raw.astype(np.uint16), np.zeros(shape, np.float32)


def follow(raw, dark, window, **kw):
    cfg = types.SimpleNamespace(window=window, mode="exact", stride=1, normalise="none", margin_px=2, batch_frames=1)
    stage = BackgroundStage(cfg, frame_shape=raw.shape[1:], dtype=raw.dtype, dark=dark, direct_beam="auto",
                            beam_margin_px=2, follow_beam=True, **kw)
    return stage, drain(stage, raw)


def drain(stage, raw):
    """Every frame the stage emits for ``raw``, with the beam box it had: {k: (box, filtered, difference)}."""
    out = {}
    for frame in [*raw, None]:
        for k, filtered, difference in stage.push(frame) if frame is not None else stage.finish():
            out[k] = (stage.beam, filtered, difference)
    return out


def test_followed_beam_covers_each_frames_beam_and_leaves_no_edge_behind():
    n, window = 90, 15
    raw, dark = moving_beam_scan(np.random.default_rng(0), n)
    stage, out = follow(raw, dark, window)
    assert sorted(out) == list(range(n))
    assert len(stage.beam_track) > 3  # it moved
    for k, (box, filtered, difference) in out.items():
        x0, y0, w, h = box
        tx0, ty0, tw, th = moving_beam_box(k)
        assert x0 <= tx0 and y0 <= ty0 and x0 + w >= tx0 + tw and y0 + h >= ty0 + th, (k, box)
        if window // 2 <= k < n - window // 2:  # a centred window: the box hugs the beam
            assert tx0 - x0 <= 9 and (x0 + w) - (tx0 + tw) <= 9, (k, box)
        inside = np.zeros(raw.shape[1:], bool)
        inside[y0:y0 + h, x0:x0 + w] = True
        assert not filtered[inside].any() and not difference[inside].any()  # never segmented
        assert np.abs(filtered[~inside]).max() < 100, k  # the beam's moving edge left no residual
    # the track is where the box changed, and nothing else
    changes = [k for k in range(1, n) if out[k][0] != out[k - 1][0]]
    assert [f for f, _ in stage.beam_track] == [0, *changes]


@pytest.mark.parametrize("moving", [False, True])
def test_the_beams_core_left_out_of_the_median_changes_no_frame(monkeypatch, moving):
    """The pixels well inside a followed beam's box (its core) are not slid: every frame, filtered and
    unfiltered, and every box equal those of a run that slides them. A beam that moves out of the core wakes
    it, at the frame whose box no longer holds it."""
    import dctstream.background.stage as stage_module

    n, window = 90, 15
    if moving:
        raw, dark = moving_beam_scan(np.random.default_rng(0), n)
    else:
        rng = np.random.default_rng(2)
        raw = rng.poisson(100.0, (n, 40, 72))
        raw[:, 8:32, 10:50] += 5000
        raw, dark = raw.astype(np.uint16), np.zeros((40, 72), np.float32)
    monkeypatch.setattr(stage_module, "MIN_CORE_PIXELS", 10**9)  # no core
    _, want = follow(raw, dark, window)
    monkeypatch.setattr(stage_module, "MIN_CORE_PIXELS", 8)
    monkeypatch.setattr(stage_module, "BEAM_CORE_PX", 4)
    stage, got = follow(raw, dark, window)
    assert stage._core is not None
    x0, y0, w, h = stage.direct_beam
    assert stage._core == (y0 + 4, y0 + h - 4, x0 + 4, x0 + w - 4)
    if moving:  # woken where the box left it
        until = stage._core_until
        assert until is not None and stage._hist.dormant is None
        assert [f for f, box in stage.beam_track if not stage_module._holds(box, stage._core)][0] == until
    else:  # never woken: its medians were never kept
        assert stage._core_until is None and stage._hist.dormant == stage._core
    assert sorted(got) == sorted(want) == list(range(n))
    for k in range(n):
        assert got[k][0] == want[k][0], k
        np.testing.assert_array_equal(got[k][1], want[k][1], err_msg=f"frame {k}")
        np.testing.assert_array_equal(got[k][2], want[k][2], err_msg=f"frame {k}")


def test_a_spot_beside_a_still_beam_at_the_scans_ends_leaves_its_box_alone():
    """In the first and last half-window a frame's own beam is looked at: a spot touching the beam's edge
    there, a fifth as bright as the beam, is no beam (it grew the box before, and hid spots beside it)."""
    n, window = 60, 15
    rng = np.random.default_rng(2)
    raw = rng.poisson(100.0, (n, 40, 72))
    raw[:, 12:26, 10:30] += 5000
    for k in (0, 1, n - 2, n - 1):  # spots in the frames looked at: 0 and 50 (frames 0-7 and 53-59 share a median)
        raw[k, 16:20, 30:34] += 1000
    raw[n - 10, 16:20, 30:34] += 1000
    stage, out = follow(raw.astype(np.uint16), np.zeros((40, 72), np.float32), window)
    assert len(stage.beam_track) == 1, stage.beam_track
    assert out[n - 10][0] == out[0][0] == stage.direct_beam

@pytest.mark.parametrize("core", [False, True])
@pytest.mark.parametrize("needed", [3, 31, 52])
def test_followed_beam_started_later_with_its_track_gives_the_same_frames(needed, core, monkeypatch):
    """Also with the beam's core left out of the median (see BEAM_CORE_PX), woken between 31 and 52."""
    if core:
        import dctstream.background.stage as stage_module

        monkeypatch.setattr(stage_module, "MIN_CORE_PIXELS", 8)
        monkeypatch.setattr(stage_module, "BEAM_CORE_PX", 4)
    raw, dark = moving_beam_scan(np.random.default_rng(1), 70)
    whole, expected = follow(raw, dark, 15)
    first = whole.first_raw_frame(needed)
    cfg = types.SimpleNamespace(window=15, mode="exact", stride=1, normalise="none", margin_px=2, batch_frames=1)
    later = BackgroundStage(cfg, frame_shape=raw.shape[1:], dtype=raw.dtype, dark=dark,
                            direct_beam=whole.direct_beam, beam_margin_px=2, follow_beam=True, first_frame=first,
                            beam_track=[(f, b) for f, b in whole.beam_track if f < needed],
                            beam_found=[(f, b) for f, b in whole.beam_found if f < needed])
    later.emitted = needed
    got = drain(later, raw[first:])
    assert (later._core_until, later._core) == (whole._core_until, whole._core)
    assert (whole._core is not None) == core and (not core or 31 < whole._core_until <= 52)
    assert sorted(got) == list(range(needed, 70))
    for k, (box, filtered, difference) in got.items():
        assert box == expected[k][0], k
        np.testing.assert_array_equal(filtered, expected[k][1], err_msg=f"frame {k}")
        np.testing.assert_array_equal(difference, expected[k][2], err_msg=f"frame {k}")


def test_kernels_cached_tells_whether_the_medians_kernel_was_compiled_before(monkeypatch, tmp_path):
    """The first run after installing compiles every kernel (20-60 s): told by the median kernels' cache
    indexes, the running median's or, for scans shorter than the window, the whole window's."""
    from dctstream.background import _kernels

    files = [getattr(getattr(k, "_cache", None), "_cache_file", None)
             for k in (_kernels.hist_slide, _kernels.window_median_normalised)]
    if None in files:
        pytest.skip("numba caches nothing here")
    for name, cache_file in zip(("hist_slide", "window_median"), files):
        monkeypatch.setattr(cache_file, "_index_path", str(tmp_path / f"{name}.nbi"))
    assert kernels.kernels_cached() is False
    for name in ("window_median", "hist_slide"):
        (tmp_path / f"{name}.nbi").write_bytes(b"")
        assert kernels.kernels_cached() is True
        (tmp_path / f"{name}.nbi").unlink()
