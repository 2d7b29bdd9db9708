"""The DCT scan simulator: file layout, determinism, and that the frames show what the truth says."""

from __future__ import annotations

import datetime as dt
import hashlib

import h5py
import hdf5plugin
import numpy as np
import pytest

from dctstream.errors import InputError
from simulators import ScanModel, ScanTruth, iter_frames, read_truth, simulate_scan
from simulators.dct_scan import QUADRANT_OFFSETS_COUNTS, READ_NOISE_COUNTS, SATURATION_COUNTS

FRAMES, SIZE, SPOTS, SEED = 60, 128, 20, 3


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "scan.h5"
    truth = simulate_scan(path, frames=FRAMES, size=SIZE, spots=SPOTS, seed=SEED, dark_frames=10)
    with h5py.File(path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
        darks = f["/2.1/measurement/marana"][()]
    model = ScanModel(frames=FRAMES, size=SIZE, spots=SPOTS, seed=SEED)
    return truth, frames, darks, model


def quadrant_slices(ny, nx):
    """Quadrants in the order of QUADRANT_OFFSETS_COUNTS: top-left, top-right, bottom-left, bottom-right."""
    rows, cols = (slice(0, ny // 2), slice(ny // 2, ny)), (slice(0, nx // 2), slice(nx // 2, nx))
    return [(r, c) for r in rows for c in cols]


def spot_free_mask(model, radius_sigmas=5.0):
    """Pixels that no spot reaches in any frame, and that are not hot."""
    ny, nx = model.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    free = np.ones(model.shape, dtype=bool)
    s = model.spots
    for x, y, sx, sy in zip(s["x"], s["y"], s["sigma_x"], s["sigma_y"]):
        free &= (np.abs(xx - x) > radius_sigmas * sx) | (np.abs(yy - y) > radius_sigmas * sy)
    free[tuple(model.hot_pixels.T)] = False
    return free


def test_layout(scan):
    truth, _, _, _ = scan
    with h5py.File(truth.path, "r") as f:
        images = f["/1.1/measurement/marana"]
        assert images.shape == (FRAMES, SIZE, SIZE) and images.dtype == np.uint16
        assert images.chunks == (1, SIZE, SIZE)
        angles = f["/1.1/measurement/diffrz"]
        assert angles.dtype == np.float64
        np.testing.assert_allclose(angles[()], np.arange(FRAMES) * 360.0 / FRAMES)
        assert f["/1.1/title"][()].decode() == "dct scan"
        assert f["/2.1/title"][()].decode() == "dark"
        start = dt.datetime.fromisoformat(f["/1.1/start_time"][()].decode())
        end = dt.datetime.fromisoformat(f["/1.1/end_time"][()].decode())
        assert end > start
        darks = f["/2.1/measurement/marana"]
        assert darks.shape == (10, SIZE, SIZE) and darks.dtype == np.uint16
        group = f["/1.1/ground_truth"]
        assert set(group) == {"x", "y", "frame", "sigma_x", "sigma_y", "sigma_frame", "peak", "integral",
                              "noise", "snr", "in_direct_beam"}
        assert group["in_direct_beam"].dtype == np.uint8
        assert all(group[name].dtype == np.float64 for name in group if name != "in_direct_beam")
        assert tuple(group.attrs["direct_beam_bbox"]) == truth.direct_beam_bbox
        assert group.attrs["read_noise"] == READ_NOISE_COUNTS
        np.testing.assert_array_equal(group.attrs["quadrant_offsets"], QUADRANT_OFFSETS_COUNTS)
        assert group.attrs["seed"] == SEED
    assert truth.frames_url == f"{truth.path}::/1.1/measurement/marana"
    assert truth.angles_url == f"{truth.path}::/1.1/measurement/diffrz"
    assert truth.dark_url == f"{truth.path}::/2.1/measurement/marana"


def test_read_truth_round_trips(scan):
    truth = scan[0]
    back = read_truth(truth.path)
    assert isinstance(back, ScanTruth)
    assert (back.path, back.frames_url, back.dark_url, back.direct_beam_bbox) == (
        truth.path, truth.frames_url, truth.dark_url, truth.direct_beam_bbox)
    assert back.spots.keys() == truth.spots.keys()
    for name, column in truth.spots.items():
        np.testing.assert_array_equal(back.spots[name], column)


def test_read_truth_rejects_other_files(tmp_path):
    with pytest.raises(InputError):
        read_truth(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(InputError):
        read_truth(tmp_path / "plain.h5")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    def digest(name, seed):
        simulate_scan(tmp_path / name, frames=12, size=48, spots=4, seed=seed, dark_frames=2)
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    assert digest("a.h5", 7) == digest("b.h5", 7)
    assert digest("c.h5", 8) != digest("a.h5", 7)
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "c.h5", "r") as c:
        assert not np.array_equal(a["/1.1/measurement/marana"][()], c["/1.1/measurement/marana"][()])
        assert not np.array_equal(a["/1.1/ground_truth/x"][()], c["/1.1/ground_truth/x"][()])


def test_frames_do_not_depend_on_threads_or_order(scan):
    _, frames, _, model = scan
    np.testing.assert_array_equal(np.stack(list(iter_frames(model, workers=1))), frames)
    np.testing.assert_array_equal(np.stack(list(iter_frames(model, workers=3))), frames)
    np.testing.assert_array_equal(model.frame(FRAMES - 1), frames[-1])


def test_truth_columns_are_consistent(scan):
    truth, _, _, model = scan
    s = truth.spots
    assert {len(column) for column in s.values()} == {SPOTS}
    np.testing.assert_array_equal(s["snr"], s["peak"] / s["noise"])
    assert np.all(np.diff(s["frame"]) >= 0)
    assert s["x"].min() >= 8 and s["x"].max() <= SIZE - 1 - 8
    assert s["y"].min() >= 8 and s["y"].max() <= SIZE - 1 - 8
    assert s["frame"].min() >= 3 and s["frame"].max() <= FRAMES - 4
    for name in ("sigma_x", "sigma_y"):
        assert s[name].min() >= 0.8 and s[name].max() <= 2.5
    axis_distance = np.abs(s["x"] - (SIZE - 1) / 2) / SIZE
    np.testing.assert_allclose(s["sigma_frame"], np.clip(0.6 + 0.25 / (axis_distance + 0.05), 0.6, 4.0))
    beside = s["in_direct_beam"] == 0
    assert s["snr"][beside].min() >= 2 and s["snr"].max() <= 300
    assert s["snr"][~beside].max(initial=0) < 30
    assert np.all(s["noise"] >= READ_NOISE_COUNTS)
    x0, y0, w, h = truth.direct_beam_bbox
    inside = (s["x"] >= x0 - 0.5) & (s["x"] < x0 + w - 0.5) & (s["y"] >= y0 - 0.5) & (s["y"] < y0 + h - 0.5)
    np.testing.assert_array_equal(s["in_direct_beam"], inside.astype(np.uint8))
    # The noise column is the noise of the noiseless background at the peak pixel and frame.
    k, iy, ix = (np.rint(s[c]).astype(int) for c in ("frame", "y", "x"))
    background = np.array([model.background(kk)[yy, xx] for kk, yy, xx in zip(k, iy, ix)])
    np.testing.assert_allclose(s["noise"], np.sqrt(background + READ_NOISE_COUNTS**2))


def test_integral_is_the_sum_of_rendered_spot_counts(scan):
    _, _, _, model = scan
    rendered = sum(model.add_spots(np.zeros(model.shape), k).sum() for k in range(FRAMES))
    np.testing.assert_allclose(rendered, model.spots["integral"].sum(), rtol=1e-9)


def test_the_brightest_spots_saturate_in_larger_scans():
    model = ScanModel(frames=60, size=128, spots=400, seed=2)
    s = model.spots
    saturated = np.flatnonzero(s["peak"] > SATURATION_COUNTS)
    assert saturated.size == 2
    assert np.all(s["in_direct_beam"][saturated] == 0)
    assert s["peak"][saturated].min() > s["peak"][s["peak"] <= SATURATION_COUNTS].max()
    for i in saturated:
        k, iy, ix = (int(np.rint(s[c][i])) for c in ("frame", "y", "x"))
        assert model.frame(k)[iy, ix] == SATURATION_COUNTS
    assert np.all(s["snr"][s["peak"] <= SATURATION_COUNTS] <= 300)


def test_spots_do_not_clash_in_a_crowded_scan():
    s = ScanModel(frames=60, size=128, spots=60, seed=1).spots
    centre = np.column_stack([s["x"], s["y"], s["frame"]])
    sigma = np.column_stack([s["sigma_x"], s["sigma_y"], s["sigma_frame"]])
    close = np.abs(centre[:, None] - centre[None]) < 3 * (sigma[:, None] + sigma[None])
    clash = np.all(close, axis=2)
    np.fill_diagonal(clash, False)
    assert not clash.any()


def test_temporal_median_is_offset_plus_glow_in_every_quadrant(scan):
    _, frames, _, model = scan
    free = spot_free_mask(model)
    x0, y0, w, h = model.direct_beam_bbox
    free[y0 - 2:y0 + h + 2, x0 - 2:x0 + w + 2] = False
    median = np.median(frames, axis=0)
    # The mean, not the median, over frames: the median of glow * I(psi) + noise lies near the
    # mean because the noise is wider than the source intensity's swing.
    glow = np.mean([model.background(k) for k in range(FRAMES)], axis=0)
    for (rows, cols), offset in zip(quadrant_slices(SIZE, SIZE), QUADRANT_OFFSETS_COUNTS):
        sel = free[rows, cols]
        assert sel.sum() > 100
        level = (median[rows, cols] - glow[rows, cols])[sel].mean()
        assert level == pytest.approx(offset, abs=0.75)


def test_bright_spot_stands_out_by_its_peak(scan):
    truth, frames, _, model = scan
    s = truth.spots
    candidates = np.flatnonzero((s["in_direct_beam"] == 0) & (s["snr"] > 30))
    assert candidates.size > 0
    for i in candidates:
        k, iy, ix = (int(np.rint(s[c][i])) for c in ("frame", "y", "x"))
        quiet = np.abs(np.arange(FRAMES) - s["frame"][i]) > 4 * s["sigma_frame"][i] + 1
        local_median = np.median(frames[quiet, iy, ix].astype(float))
        excess = frames[k, iy, ix] - local_median
        subpixel = np.exp(-0.5 * (((ix - s["x"][i]) / s["sigma_x"][i]) ** 2 + ((iy - s["y"][i]) / s["sigma_y"][i]) ** 2
                                  + ((k - s["frame"][i]) / s["sigma_frame"][i]) ** 2))
        expected = s["peak"][i] * subpixel * model.source_intensity(k) / model.source_intensity(s["frame"][i])
        assert expected > 0.3 * s["peak"][i]
        assert abs(excess - expected) < 5 * np.sqrt(expected + s["noise"][i] ** 2)


def test_direct_beam_is_bright_unsaturated_and_shadowed_by_a_rotating_sample(scan):
    truth, frames, _, model = scan
    x0, y0, w, h = truth.direct_beam_bbox
    # Many spots of the same geometry, for a stable typical peak.
    typical_peak = np.median(ScanModel(frames=720, size=SIZE, spots=400, seed=SEED).spots["peak"])
    beam = frames[:, y0:y0 + h, x0:x0 + w].astype(float)
    assert beam.mean(axis=(1, 2)).min() >= 50 * typical_peak
    assert np.median(beam) < 0.5 * SATURATION_COUNTS
    # The ring of pixels just outside the bbox only sees the glow.
    ring = np.median(frames[:, y0 - 1, x0:x0 + w].astype(float), axis=0) - model.fixed_pattern[y0 - 1, x0:x0 + w]
    assert ring.max() < 1.2 * model.background(0)[y0 - 1, x0] + 10
    # Across the beam: bright margins, a shadow of 0.3-0.5 transmission, wider at psi = 0 than at 90 degrees.
    widths = []
    for k in (0, FRAMES // 4):
        beam_only = model.background(k)[y0 + h // 2, x0:x0 + w] / model.source_intensity(k) - model.glow[y0, x0]
        profile = np.median(frames[k, y0 + 2:y0 + h - 2, x0:x0 + w], axis=0) - model.fixed_pattern[y0 + h // 2, x0]
        np.testing.assert_allclose(profile / model.source_intensity(k) - model.glow[y0, x0], beam_only,
                                   rtol=0.05, atol=200)
        transmission = beam_only[2:-2] / beam_only[w // 8:w // 4].mean()  # inside the blurred edges
        assert 0.28 < transmission.min() < 0.55
        widths.append(np.count_nonzero(transmission < 0.9))
    assert widths[0] > 1.3 * widths[1]


def test_beam_beside_the_sample_follows_the_source_intensity(scan):
    _, frames, darks, model = scan
    x0, y0, w, h = model.direct_beam_bbox
    rows, cols = slice(y0 + 2, y0 + h - 2), slice(x0 + 2, x0 + w // 8)  # inside the edges, beside the sample
    dark = darks.mean(axis=0)
    margin = np.median((frames[:, rows, cols] - dark[rows, cols]).reshape(FRAMES, -1), axis=1)
    intensity = model.source_intensity(np.arange(FRAMES))
    assert intensity.max() / intensity.min() > 1.08
    ratio = margin / intensity
    assert ratio.std() / ratio.mean() < 0.005


def test_zingers_appear_in_exactly_one_frame(scan):
    _, frames, _, model = scan
    x0, y0, w, h = model.direct_beam_bbox
    outside = np.ones(model.shape, dtype=bool)
    outside[y0:y0 + h, x0:x0 + w] = False  # the beam's shot noise hides small zingers
    found, planted = set(), set()
    for k in range(FRAMES):
        signal = model.signal(k)
        residual = frames[k] - (signal + model.fixed_pattern)
        outlier = (residual > 8 * np.sqrt(signal + READ_NOISE_COUNTS**2) + 1) & outside
        found |= {(k, y, x) for y, x in zip(*np.nonzero(outlier))}
        y, x, excess = model.zingers(k)
        assert np.all((excess >= 500) & (excess <= 5000))
        planted |= {(k, yy, xx) for yy, xx in zip(y, x) if outside[yy, xx]}
    assert len(planted) >= 3
    assert found == planted


def test_hot_pixels_are_constant_in_frames_and_darks(scan):
    _, frames, darks, model = scan
    assert len(model.hot_pixels) == max(1, round(1e-4 * SIZE * SIZE))
    offsets = np.asarray(QUADRANT_OFFSETS_COUNTS).reshape(2, 2)
    for (y, x), excess in zip(model.hot_pixels, model.hot_pixel_excess):
        level = offsets[int(y >= SIZE // 2), int(x >= SIZE // 2)] + excess
        assert excess >= 1000
        np.testing.assert_allclose(darks[:, y, x], level, atol=6 * READ_NOISE_COUNTS)
        assert np.all(frames[:, y, x] >= level - 6 * READ_NOISE_COUNTS)


def test_darks_are_offsets_plus_read_noise(scan):
    _, _, darks, model = scan
    not_hot = np.ones(model.shape, dtype=bool)
    not_hot[tuple(model.hot_pixels.T)] = False
    for (rows, cols), offset in zip(quadrant_slices(SIZE, SIZE), QUADRANT_OFFSETS_COUNTS):
        values = darks[:, rows, cols][:, not_hot[rows, cols]].astype(float)
        assert values.mean() == pytest.approx(offset, abs=0.1)
        assert values.std() == pytest.approx(np.hypot(READ_NOISE_COUNTS, 1 / np.sqrt(12)), rel=0.05)


def test_progress_compression_dtype_and_rectangular_frames(tmp_path, scan):
    calls = []
    plain = simulate_scan(tmp_path / "plain.h5", frames=10, size=(48, 80), spots=3, seed=5, dark_frames=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]
    x0, y0, w, h = plain.direct_beam_bbox
    assert x0 + w <= 80 and y0 + h <= 48 and w > h
    with h5py.File(plain.path, "r") as f:
        reference = f["/1.1/measurement/marana"][()]
    assert reference.shape == (10, 48, 80)
    for name, options in [("gzip.h5", {"compression": "gzip"}),
                          ("bshuf.h5", {"compression": hdf5plugin.Bitshuffle()}),
                          ("float.h5", {"dtype": "float32"})]:
        other = simulate_scan(tmp_path / name, frames=10, size=(48, 80), spots=3, seed=5, dark_frames=2, **options)
        with h5py.File(other.path, "r") as f:
            images = f["/1.1/measurement/marana"]
            assert images.chunks == (1, 48, 80)
            assert images.dtype == np.dtype(options.get("dtype", "uint16"))
            np.testing.assert_array_equal(images[()], reference)


@pytest.mark.parametrize("kwargs", [
    {"size": 16}, {"size": (64, 64, 64)}, {"size": 12.5}, {"frames": 3}, {"spots": -1},
    {"dark_frames": 0}, {"seed": -1}, {"dtype": "int8"},
])
def test_bad_arguments_raise_input_error(tmp_path, kwargs):
    with pytest.raises(InputError):
        simulate_scan(tmp_path / "bad.h5", **{"frames": 10, "size": 48, "spots": 2, **kwargs})


def test_detector_defects_keep_the_scene_and_come_with_a_consistent_flat(tmp_path):
    kwargs = dict(frames=30, size=64, spots=8, seed=2)
    plain = ScanModel(**kwargs)
    truth = simulate_scan(tmp_path / "d.h5", **kwargs, dead_pixel_fraction=0.01, module_gap_px=2, gain_spread=0.3,
                          flat_frames=20, shutter_closed_frames=5)
    model = ScanModel(**kwargs, dead_pixel_fraction=0.01, module_gap_px=2, gain_spread=0.3, shutter_closed_frames=5)
    assert len(ScanModel(**kwargs, hot_pixel_fraction=0.01).hot_pixels) == round(0.01 * 64 * 64)
    assert len(ScanModel(**kwargs, hot_pixel_fraction=0).hot_pixels) == 0
    defects_only = ScanModel(**kwargs, dead_pixel_fraction=0.01, module_gap_px=2, gain_spread=0.3)
    for name in plain.spots:  # the same spots with or without the defects
        np.testing.assert_array_equal(defects_only.spots[name], plain.spots[name])
    assert model.spots["frame"].min() >= 5 + 3
    assert model.dead[31:33].all() and model.dead[:, 31:33].all() and 0.005 < model.dead[:30, :30].mean() < 0.02
    assert np.median(model.gain) == pytest.approx(1.0) and 0.5 < model.gain.min() < model.gain.max() < 1.5
    with h5py.File(truth.path) as h5:
        frames = h5["/1.1/measurement/marana"][()]
        darks = h5["/2.1/measurement/marana"][()]
        flats = h5["/3.1/measurement/marana"][()]
    assert truth.flat_url.endswith("::/3.1/measurement/marana")
    for stack in (frames, darks, flats):
        assert (stack[:, model.dead] == 0).all()
    flat = flats.mean(axis=0) - darks.mean(axis=0)
    live = ~model.dead
    np.testing.assert_allclose(flat[live] / 20000.0, model.gain[live], rtol=0.01)
    # shutter closed: offsets and noise only, like the darks (a zinger or two aside)
    assert np.median(np.abs(frames[:5].astype(float) - darks.mean(axis=0)), axis=(1, 2)).max() < 3 * READ_NOISE_COUNTS
    assert frames[5].sum() > 2 * frames[4].sum()
