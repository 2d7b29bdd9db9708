"""Pixel masks, flat field, dark from the data, binning and the corrected-frame export, against obvious references."""

import dataclasses
import re
from pathlib import Path

import fabio
import h5py
import numpy as np
import pytest
import scipy.ndimage as ndi

from dctstream.config import load_config
from dctstream.detector import DEAD_MAX_FRACTION, DEAD_MIN_FRAMES, Detector, bin_image, dead_pixels, stuck_and_hot
from dctstream.direct_beam import margin_mean
from dctstream.errors import InputError
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_corrected, read_spot_table
from dctstream.sources import read_dataset
from dctstream.types import Blob
from dctstream.segment.segmenter import flood_limit
from reference import reference_blobs, reference_corrected, reference_thresholds
from simulators.dct_scan import ScanModel, simulate_scan

SCAN = dict(frames=120, size=96, spots=40, seed=3)
DEFECTS = dict(dead_pixel_fraction=0.003, module_gap_px=2, gain_spread=0.3)
FIT = ("background.window=21", "segmentation.max_blob_size=[20,20,6]")


def config(truth, out, *overrides, dark=True):
    return load_config(None, [f"source.url={truth.frames_url}", f"output.dir={out}", *FIT,
                              *([f"dark.url={truth.dark_url}"] if dark else []), *overrides])


def mean_dark(truth):
    return read_dataset(truth.dark_url).mean(axis=0, dtype=np.float64).astype(np.float32)


def difspot_voxels(out: Path) -> list[np.ndarray]:
    """(frame, y, x) of every voxel of every difspot file in ``out``, one (n, 3) array per difspot."""
    voxels = []
    for path in sorted((out / "difspots").glob("*.h5")):
        with h5py.File(path) as h5:
            voxels.append(np.argwhere(h5["Mask"][()]) + h5["BoundingBoxOriginSize"][0] - 1)
    return voxels


def difspot_pixels(out: Path) -> list[np.ndarray]:
    """(y, x) of every voxel of every difspot file in ``out``, one (n, 2) array per difspot."""
    return [v[:, 1:] for v in difspot_voxels(out)]


def voxel_keys(voxel_arrays):
    return sorted(tuple(np.ascontiguousarray(v[:, i], dtype=np.int64).tobytes() for i in range(3))
                  for v in voxel_arrays)


@pytest.fixture(scope="module")
def defect_scan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defects")
    return simulate_scan(str(tmp / "scan.h5"), **SCAN, **DEFECTS, flat_frames=10)


@pytest.fixture(scope="module")
def plain_scan(tmp_path_factory):
    """The same spots as ``defect_scan``, on a perfect detector."""
    tmp = tmp_path_factory.mktemp("plain")
    return simulate_scan(str(tmp / "scan.h5"), **SCAN)


@pytest.fixture(scope="module")
def spot_mask(tmp_path_factory):
    """``(url, mask)``: a mask file marking the hot pixels and the 3 x 3 pixels around every true spot centre."""
    model = ScanModel(**SCAN)
    mask = np.zeros(model.shape, np.uint8)
    mask[tuple(model.hot_pixels.T)] = 1
    for x, y in zip(np.rint(model.spots["x"]).astype(int), np.rint(model.spots["y"]).astype(int)):
        mask[y - 1:y + 2, x - 1:x + 2] = 1
    path = tmp_path_factory.mktemp("mask") / "mask.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/mask"] = mask
    return f"{path}::/entry/mask", mask.astype(bool)


# ---- pixel mask ---------------------------------------------------------------------------------------


def test_a_mask_reads_the_same_from_hdf5_edf_and_npy_and_a_wrong_shape_is_one_line(spot_mask, tmp_path):
    url, mask = spot_mask
    fabio.edfimage.EdfImage(data=mask.astype(np.uint8) * 7).write(str(tmp_path / "mask.edf"))
    np.save(tmp_path / "mask.npy", mask.astype(np.int32))
    cfgs = [load_config(None, [f"detector.mask={m}"]).detector
            for m in (url, tmp_path / "mask.edf", tmp_path / "mask.npy")]
    dark = load_config(None).dark
    for cfg in cfgs:
        np.testing.assert_array_equal(Detector(cfg, dark, mask.shape, np.uint16).mask, mask)
    with pytest.raises(InputError) as err:
        Detector(cfgs[2], dark, (64, 96), np.uint16)
    assert str(err.value) == (f"detector.mask: {tmp_path / 'mask.npy'}: expected an image of 64 x 96 pixels (y, x) "
                              f"of numbers like the frames, got shape (96, 96) dtype int32")


def test_masked_pixels_never_join_a_difspot(plain_scan, spot_mask, tmp_path):
    url, mask = spot_mask
    Pipeline(config(plain_scan, tmp_path / "plain")).run()
    unmasked = np.concatenate(difspot_pixels(tmp_path / "plain"))
    assert mask[tuple(unmasked.T)].sum() > 50  # the mask covers the spots' brightest pixels

    stats = Pipeline(config(plain_scan, tmp_path / "masked", f"detector.mask={url}")).run()
    masked = difspot_pixels(tmp_path / "masked")
    assert len(masked) == stats.difspots_written > 5  # the spots' edges remain
    assert not mask[tuple(np.concatenate(masked).T)].any()
    assert stats.masked_pixels == {"file": mask.sum(), "all": mask.sum()}
    with h5py.File(tmp_path / "masked" / "mask.h5") as h5:
        np.testing.assert_array_equal(h5["mask"][()], mask)


def test_what_masked_pixels_hold_changes_nothing(plain_scan, tmp_path):
    """A module gap's pixels, masked, with any dark there (here 1000 counts, over the frames' counts): the same spot
    table. They read 0 before the 3x3 median; the filter took their values in beside the gap (false spots there,
    some with negative integrals, when the beam's scale varied)."""
    gap = np.zeros((SCAN["size"], SCAN["size"]), np.uint8)
    gap[40:42, :] = 1
    gap[:, 30:32] = 1
    dark = read_dataset(plain_scan.dark_url)
    with h5py.File(tmp_path / "gap.h5", "w") as h5:
        h5["mask"] = gap
        h5["dark"] = np.where(gap.astype(bool), np.uint16(1000), dark)
    tables = []
    for name, dark_url in (("dark", plain_scan.dark_url), ("other", f"{tmp_path / 'gap.h5'}::/dark")):
        cfg = config(plain_scan, tmp_path / name, f"detector.mask={tmp_path / 'gap.h5'}::/mask", f"dark.url={dark_url}",
                     dark=False)
        assert Pipeline(cfg).run().difspots_written > 5
        tables.append(read_spot_table(tmp_path / name / "spots.h5"))
    assert list(tables[0]) == list(tables[1])
    for column in tables[0]:
        np.testing.assert_array_equal(tables[0][column], tables[1][column], err_msg=column)


def test_a_dark_with_nan_masks_those_pixels(plain_scan, tmp_path):
    """A float dark with NaN where a pixel has none (a module gap, as float frames hold them): those pixels masked,
    the same spot table as with them in a mask file (refused as not finite before); infinities and a dark all NaN
    are refused, naming the dark."""
    gap = np.zeros((SCAN["size"], SCAN["size"]), bool)
    gap[40:42, :] = True
    gap[:, 30:32] = True
    dark = read_dataset(plain_scan.dark_url).astype(np.float32)
    with h5py.File(tmp_path / "gap.h5", "w") as h5:
        h5["mask"] = gap.astype(np.uint8)
        h5["dark"] = np.where(gap, np.float32(np.nan), dark)
        h5["dark_inf"] = np.where(gap, np.float32(np.inf), dark)
        h5["dark_all_nan"] = np.full(dark.shape, np.nan, np.float32)
    runs = {"mask": (f"detector.mask={tmp_path / 'gap.h5'}::/mask", f"dark.url={plain_scan.dark_url}"),
            "nan": (f"dark.url={tmp_path / 'gap.h5'}::/dark",)}
    tables = {}
    for name, overrides in runs.items():
        stats = Pipeline(config(plain_scan, tmp_path / name, *overrides, dark=False)).run()
        assert stats.difspots_written > 5
        assert stats.masked_pixels == {"dark" if name == "nan" else "file": gap.sum(), "all": gap.sum()}
        tables[name] = read_spot_table(tmp_path / name / "spots.h5")
    for column in tables["mask"]:
        np.testing.assert_array_equal(tables["nan"][column], tables["mask"][column], err_msg=column)
    for name, needle in (("dark_inf", "expected finite dark counts (or NaN where a pixel has none), got inf at "
                                      "frame 0, pixel (y, x) = (0, 30)"),
                         ("dark_all_nan", "every pixel is NaN, expected dark counts")):
        with pytest.raises(InputError, match=re.escape(f"dark.url: {tmp_path / 'gap.h5'}::/{name}: {needle}")):
            Pipeline(config(plain_scan, tmp_path / name, f"dark.url={tmp_path / 'gap.h5'}::/{name}", dark=False)).run()


@pytest.mark.parametrize("overrides", [
    [],  # integer frames: the per-pixel histogram median, exact through the per-pixel map (x - dark) / flat
    ["background.normalise=margin"],
    ["background.mode=block", "background.stride=7", "segmentation.connectivity=6"],
])
def test_difspots_with_mask_and_flat_equal_the_whole_volume_reference(defect_scan, spot_mask, tmp_path, overrides):
    url, file_mask = spot_mask
    cfg = config(defect_scan, tmp_path / "out", f"detector.mask={url}", f"detector.flat={defect_scan.flat_url}",
                 *overrides)
    pipeline = Pipeline(cfg)
    stats = pipeline.run()

    raw = read_dataset(defect_scan.frames_url)
    dark = mean_dark(defect_scan)
    flat = read_dataset(defect_scan.flat_url).mean(axis=0, dtype=np.float64) - dark
    flat /= np.median(flat[(flat > 0) & ~file_mask])
    low = ~(flat >= 0.1)
    bad = file_mask | low
    gain = (1.0 / np.where(low, 1.0, flat)).astype(np.float32)
    bg = cfg.background
    scales = np.asarray(pipeline.background.frame_scales, np.float32)
    if bg.normalise == "margin":
        means = np.array([margin_mean(f, dark, stats.direct_beam, bg.margin_px, bad) for f in raw])
        np.testing.assert_array_equal(scales, (means[0] / means).astype(np.float32))
    corrected = reference_corrected(raw, window=bg.window, mode=bg.mode, stride=bg.stride, dark=dark,
                                    scales=scales, gain=gain, mask=bad)
    beam = np.zeros(raw.shape[1:], bool)
    x0, y0, w, h = stats.direct_beam
    beam[y0:y0 + h, x0:x0 + w] = True
    seed, low = reference_thresholds(corrected, beam | bad, cfg.segmentation)
    expected, rejected = reference_blobs(corrected, pipeline.segmenter.params, beam | bad, seed, low,
                                         flood_limit(beam | bad))

    files = sorted((tmp_path / "out" / "difspots").glob("*.h5"))
    assert len(files) == len(expected) == stats.difspots_written > 5
    assert voxel_keys(difspot_voxels(tmp_path / "out")) == voxel_keys(expected)
    model = ScanModel(**SCAN, **DEFECTS)
    assert (bad & ~file_mask).sum() == stats.masked_pixels["flat"] >= (model.dead & ~file_mask).sum() > 100


def test_automatic_mask_finds_stuck_and_isolated_hot_pixels():
    rng = np.random.default_rng(1)
    ny, nx, n = 40, 50, 15
    yy, xx = np.mgrid[0:ny, 0:nx]
    scene = 200 + 3000 * np.exp(-((xx - 25) ** 2 + (yy - 20) ** 2) / 50.0)  # a bright smooth bump, like the beam
    frames = rng.poisson(scene, size=(n, ny, nx)).astype(np.uint16)
    frames[5:8, 10:13, 40:43] += 2000  # a spot lasting 3 frames
    stuck = np.zeros((ny, nx), bool)
    stuck[3, :] = True  # a gap row
    stuck[30, 7] = True
    frames[:, stuck] = 0
    frames[:, 35, 45] = 65535  # saturated
    stuck[35, 45] = True
    hot = np.zeros((ny, nx), bool)
    hot[[10, 33], [5, 20]] = True
    frames[:, hot] += 600  # 40 x the noise of their neighbours (~15)
    slots = np.arange(n)
    zeros, ones = np.zeros((ny, nx), np.float32), np.ones((ny, nx), np.float32)
    found_stuck, found_hot = stuck_and_hot(frames, slots, zeros, ones)
    np.testing.assert_array_equal(found_stuck, stuck)
    np.testing.assert_array_equal(found_hot, hot)


def test_automatic_mask_of_a_simulated_scan_is_its_dead_pixels_and_gaps(defect_scan, tmp_path):
    stats = Pipeline(config(defect_scan, tmp_path / "out", "detector.auto_mask=true")).run()
    with h5py.File(tmp_path / "out" / "mask.h5") as h5:
        mask = h5["mask"][()].astype(bool)
    dead = ScanModel(**SCAN, **DEFECTS).dead
    np.testing.assert_array_equal(mask, dead)
    assert stats.masked_pixels == {"stuck": dead.sum(), "hot": 0, "all": dead.sum()}


# ---- flat field ---------------------------------------------------------------------------------------


def test_flat_field_restores_the_spot_integrals(tmp_path):
    # The same noiseless scene recorded by a perfect detector and by one with a gain pattern:
    # with the flat, every spot's integral over the perfect run's difspot voxels is restored.
    model = ScanModel(**SCAN, gain_spread=0.3)
    offset = 100.0
    with h5py.File(tmp_path / "scans.h5", "w") as h5:
        for name, gain in (("perfect", 1.0), ("gain", model.gain)):
            h5[name] = np.stack([np.rint(model.signal(k) * gain + offset) for k in range(model.frames)]
                                ).astype(np.uint16)
        h5["flat"] = np.rint(20000 * model.gain + offset).astype(np.uint16)

    def corrected(name, out, *overrides):
        cfg = load_config(None, [f"source.url={tmp_path / 'scans.h5'}::/{name}", f"dark.value={offset}", *FIT,
                                 "segmentation.seed_threshold=50", "export.format=stack",
                                 f"output.dir={tmp_path / out}", *overrides])
        Pipeline(cfg).run()
        return np.stack(read_corrected(tmp_path / out / "corrected.h5"))

    perfect = corrected("perfect", "perfect")
    flat = corrected("gain", "flat", f"detector.flat={tmp_path / 'scans.h5'}::/flat")
    raw = corrected("gain", "raw")
    spots = [tuple(v.T) for v in difspot_voxels(tmp_path / "perfect")]
    integrals = np.array([[frames[v].sum(dtype=np.float64) for frames in (perfect, flat, raw)] for v in spots])
    bright = integrals[integrals[:, 0] > 1000]
    assert len(bright) > 10
    np.testing.assert_allclose(bright[:, 1], bright[:, 0], rtol=0.01)
    assert np.max(np.abs(bright[:, 2] / bright[:, 0] - 1)) > 0.1  # the gain pattern is there without the flat


# ---- dark from the data -------------------------------------------------------------------------------


@pytest.mark.parametrize("closed", [7, 0])
def test_dark_estimated_from_the_faintest_frames_is_the_offset_map(tmp_path, closed, caplog):
    """... and, on a scan without beam-off frames, it is said that the frames it took are lit (they were taken
    for the dark unsaid, then called 'the beam off', and most spots were lost)."""
    if not closed:
        truth = simulate_scan(str(tmp_path / "scan.h5"), frames=60, size=64, spots=10, seed=5)
        Pipeline(config(truth, tmp_path / "out", "dark.estimate=true", "dark.estimate_frames=5", dark=False)).run()
        lit = [r for r in caplog.records if "lit, not beam-off frames" in r.getMessage()]
        assert len(lit) == 1 and lit[0].levelname == "WARNING"
        return
    truth = simulate_scan(str(tmp_path / "scan.h5"), frames=60, size=64, spots=10, seed=5,
                          shutter_closed_frames=closed)
    pipeline = Pipeline(config(truth, tmp_path / "out", "dark.estimate=true", "dark.estimate_frames=5", dark=False))
    stats = pipeline.run()
    model = ScanModel(frames=60, size=64, spots=10, seed=5, shutter_closed_frames=closed)
    frames_used = [int(k) for k in stats.dark.split("frames [")[1].split("]")[0].split(", ")]
    assert len(frames_used) == 5 and max(frames_used) < closed
    error = pipeline.background.dark - model.fixed_pattern
    assert np.sqrt(np.mean(error ** 2)) < model.read_noise
    assert abs(error.mean()) < 0.1 * model.read_noise
    with h5py.File(tmp_path / "out" / "spots.h5") as h5:
        assert h5["spots"].attrs["dark"] == stats.dark
    assert not [r for r in caplog.records if "lit, not beam-off frames" in r.getMessage()]


# ---- binning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [2, 4])
def test_binned_difspots_map_back_to_detector_pixels(plain_scan, tmp_path, b):
    raw = read_dataset(plain_scan.frames_url)
    binned = tmp_path / "binned.h5"
    with h5py.File(binned, "w") as h5:
        h5["frames"] = np.stack([bin_image(f, b, "sum", np.uint32) for f in raw])
        h5["dark"] = bin_image(mean_dark(plain_scan), b, "sum", np.float32)
    bbox = [20, 24, 56, 48]  # multiples of b, so the binned box covers the same pixels
    reference = load_config(None, [f"source.url={binned}::/frames", f"dark.url={binned}::/dark", *FIT,
                                   f"output.dir={tmp_path / 'ref'}", f"direct_beam.bbox={[v // b for v in bbox]}"])
    Pipeline(reference).run()
    stats = Pipeline(config(plain_scan, tmp_path / "out", f"detector.binning={b}", f"direct_beam.bbox={bbox}")).run()
    ref, got = (read_spot_table(tmp_path / name / "spots.h5") for name in ("ref", "out"))
    assert len(got["id"]) == len(ref["id"]) > 5
    for name in ("centroid_x", "centroid_y"):
        np.testing.assert_allclose(got[name], b * ref[name] + (b - 1) / 2, rtol=0, atol=1e-9)
    for name in ("bbox_x0", "bbox_y0", "bbox_x_size", "bbox_y_size"):
        np.testing.assert_array_equal(got[name], b * ref[name])
    np.testing.assert_array_equal(got["area"], b * b * ref["area"])
    np.testing.assert_allclose(got["integral"], ref["integral"], rtol=1e-6)
    np.testing.assert_array_equal(got["centroid_frame"], ref["centroid_frame"])
    assert stats.direct_beam == tuple(bbox) and stats.binning == f"{b} x {b} sum"
    with h5py.File(tmp_path / "out" / "difspots" / f"{got['id'][0]:06d}.h5") as h5:
        assert h5["BoundingBoxXorigin"][()] == got["bbox_x0"][0] + 1
        assert h5["Data"].shape[1:] == (got["bbox_y_size"][0], got["bbox_x_size"][0])


@pytest.mark.parametrize("mode, share", [("sum", 0.25), ("mean", 1.0)])
def test_unbinned_blob_spreads_each_binned_voxel_over_its_pixels(mode, share):
    cfg = load_config(None, ["detector.binning=2", f"detector.binning_mode={mode}"])
    detector = Detector(cfg.detector, cfg.dark, (8, 8), np.uint16)
    blob = Blob(id=1, frame=np.array([0, 0, 1]), y=np.array([1, 1, 2]), x=np.array([1, 2, 2]),
                value=np.array([4.0, 8.0, 12.0], np.float32), max_index=(1, 2, 2), max_value=12.0)
    out = detector.unbin_blob(blob)
    f, y, x = (np.repeat(v, 4) for v in (blob.frame, blob.y, blob.x))
    reference = sorted(zip(f, 2 * y + np.tile([0, 0, 1, 1], 3), 2 * x + np.tile([0, 1, 0, 1], 3),
                           np.repeat(blob.value * share, 4)))
    assert list(zip(out.frame, out.y, out.x, out.value)) == reference
    assert out.integral == pytest.approx(24.0 * 4 * share)
    np.testing.assert_allclose(out.centroid, (blob.centroid[0], *(2 * c + 0.5 for c in blob.centroid[1:])))
    # a centroid taken over more voxels than the blob's (its spot down to grow_low): the one of those
    # voxels spread over their pixels
    spot = np.array([[0, 1, 1, 4.0], [0, 1, 2, 8.0], [1, 2, 2, 12.0], [1, 3, 2, 5.0]])
    moments = (spot[:, 3].sum(), *(spot[:, 3] @ spot[:, i] for i in range(3)))
    out = detector.unbin_blob(dataclasses.replace(blob, moments=moments))
    pixels = np.array([(f, 2 * y + dy, 2 * x + dx, v * share) for f, y, x, v in spot for dy in (0, 1) for dx in (0, 1)])
    np.testing.assert_allclose(out.centroid, (pixels[:, 3:] * pixels[:, :3]).sum(axis=0) / pixels[:, 3].sum())
    assert out.moments[0] == pytest.approx(pixels[:, 3].sum())


# ---- corrected-frame export ---------------------------------------------------------------------------


def _reference_frames(truth, pipeline):
    """The corrected frames from scratch, with the beam-intensity scales the pipeline measured; the direct
    beam it followed reads 0."""
    frames = reference_corrected(read_dataset(truth.frames_url), window=21, dark=mean_dark(truth),
                                 scales=np.asarray(pipeline.background.frame_scales, np.float32))
    for k, frame in enumerate(frames):
        x0, y0, w, h = [box for start, box in pipeline.stats.direct_beam_track if start <= k][-1]
        frame[y0:y0 + h, x0:x0 + w] = 0
    return frames


def test_exported_stack_reads_back_equal_to_the_corrected_frames(plain_scan, tmp_path):
    pipeline = Pipeline(config(plain_scan, tmp_path / "out", "export.format=stack"))
    stats = pipeline.run()
    path = tmp_path / "out" / "corrected.h5"
    np.testing.assert_array_equal(np.stack(read_corrected(path)), _reference_frames(plain_scan, pipeline))
    raw_bytes = read_dataset(plain_scan.frames_url).nbytes
    assert stats.export_reduction == pytest.approx(raw_bytes / path.stat().st_size)
    with h5py.File(tmp_path / "out" / "spots.h5") as h5:
        assert h5["spots"].attrs["export_reduction"] == stats.export_reduction


def test_exported_sparse_frames_are_the_pixels_at_or_above_each_frames_cut(plain_scan, tmp_path):
    pipeline = Pipeline(config(plain_scan, tmp_path / "out"))  # the sparse scan is the default export
    stats = pipeline.run()
    out = tmp_path / "out"
    with h5py.File(out / "corrected.h5") as h5, h5py.File(out / "mask.h5") as m:
        cut, tile = h5["1.1/cut"][()], int(h5["1.1"].attrs["tile_px"])
        ignored = m["mask"][()].astype(bool) | m["direct_beam"][()].astype(bool)
    frames = read_corrected(out / "corrected.h5")
    assert len(frames) == len(cut) == 120 and ignored.sum() > 0
    for k, (frame, (rows, cols, values)) in enumerate(zip(_reference_frames(plain_scan, pipeline), frames)):
        pixel_cut = np.repeat(np.repeat(cut[k], tile, 0), tile, 1)[:frame.shape[0], :frame.shape[1]]
        expected = np.nonzero((frame >= pixel_cut) & ~ignored)
        np.testing.assert_array_equal(rows, expected[0], err_msg=f"frame {k}")
        np.testing.assert_array_equal(cols, expected[1], err_msg=f"frame {k}")
        np.testing.assert_array_equal(values, frame[expected], err_msg=f"frame {k}")
    # raw bytes / sparse bytes: > 10 when the unfiltered values were integers (raw - median); less a level
    # (segment.noise) on a 1/64-count grid they take ~15 % more bytes on this integer scan
    assert stats.export_reduction > 8.5


def test_stretched_export_maps_back_within_one_step(plain_scan, tmp_path):
    pipeline = Pipeline(config(plain_scan, tmp_path / "out", "export.format=stack", "export.dtype=uint8",
                               "export.percentiles=[1, 99.9]"))
    pipeline.run()
    with h5py.File(tmp_path / "out" / "corrected.h5") as h5:
        lo, hi = h5.attrs["stretch_lo"], h5.attrs["stretch_hi"]
        q = h5["corrected"][()]
    assert q.dtype == np.uint8
    frames = _reference_frames(plain_scan, pipeline)
    assert (lo, hi) == pytest.approx(np.percentile(frames[0][~_ignored(tmp_path / "out")], [1, 99.9]))
    inside = (frames >= lo) & (frames <= hi)
    assert inside.mean() > 0.9
    np.testing.assert_array_less(np.abs(lo + q * (hi - lo) / 255 - frames)[inside], (hi - lo) / 255 / 2 + 1e-3)
    assert (q[frames > hi] == 255).all() and (q[frames < lo] == 0).all()


def _ignored(out):
    with h5py.File(out / "mask.h5") as m:
        return m["mask"][()].astype(bool) | m["direct_beam"][()].astype(bool)


def test_the_detectors_own_pixel_mask_and_invalid_value_are_masked():
    """What a photon-counting source says of its detector: its pixel mask (non-zero = bad) and the value its
    pixels without data hold (all bits set at its bit depth: 0xFFFF for a 16-bit image, not a count)."""
    cfg = load_config(None, ["detector.binning=2"])
    frame = np.zeros((8, 8), np.uint16)
    frame[0, 0] = 0xFFFF
    frame[5, 6] = 0xFFFE  # a count, however high
    own = np.zeros((8, 8), np.uint32)
    own[7, 2] = 4  # DECTRIS: bit 2 = under-responding
    det = Detector(cfg.detector, cfg.dark, frame.shape, frame.dtype)
    det.check_first_frame(frame, "x.h5::/d", invalid_value=0xFFFF, pixel_mask=own)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[3, 1] = True
    np.testing.assert_array_equal(det.mask, expected)
    assert det.mask_counts == {"detector": 1, "invalid": 1}
    # a uint16 frame is an sCMOS's too: 65535 there is saturation, masked only when the source says so
    det = Detector(cfg.detector, cfg.dark, frame.shape, frame.dtype)
    det.check_first_frame(frame, "x.h5::/d")
    assert not det.mask.any()
    with pytest.raises(InputError, match=r"source.url \(its detector's pixel mask\): x.h5::/d: expected an image "
                                         r"of 8 x 8 pixels"):
        det.check_first_frame(frame, "x.h5::/d", pixel_mask=np.zeros((4, 4)))


def test_dead_pixels_are_those_that_never_vary_unless_saturated_photon_zeros_or_most():
    """A pixel holding one value over the frames is dead, against np.all over the stack; not one at the top
    of the range, not 0 on a photon-counting detector, none when most hold still or the frames are few."""
    rng = np.random.default_rng(0)
    n = DEAD_MIN_FRAMES + 5
    frames = rng.poisson(100.0, (n, 40, 50)).astype(np.uint16)
    frames[:, 5:15, 5:20] = 0  # a dead block
    frames[:, 30, 40] = 100  # one at the dark level
    frames[:, 20:25, 30:35] = 65535  # saturated
    frames[:, 2, 2] = 7
    mask = np.zeros((40, 50), bool)
    mask[2, 2] = True  # already masked: not counted again
    slots = np.arange(n)
    expected = np.all(frames == frames[0], axis=0) & (frames[0] != 65535) & ~mask
    got = dead_pixels(frames, slots, mask)
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == 10 * 15 + 1
    assert not dead_pixels(frames, slots[:DEAD_MIN_FRAMES - 1], mask).any()  # too few frames to tell
    photons = rng.poisson(0.3, (n, 40, 50)).astype(np.uint32)
    photons[:, 10, 10] = 3  # stuck at a count: dead; the many pixels at 0 throughout are not
    assert np.all(photons == photons[0], axis=0).sum() > 1
    np.testing.assert_array_equal(np.flatnonzero(dead_pixels(photons, slots, np.zeros((40, 50), bool))), [510])
    still = frames.copy()
    still[:, : int(40 * (DEAD_MAX_FRACTION + 0.05)), :] = 500  # a simulation without noise: nothing is dead
    assert not dead_pixels(still, slots, np.zeros((40, 50), bool)).any()


@pytest.mark.parametrize("binning", [1, 2])
def test_saturated_pixels_are_the_unmasked_ones_at_the_top_of_the_frames_type(binning):
    cfg = load_config(None, [f"detector.binning={binning}"])
    frame = np.full((40, 48), 1000, np.uint16)
    frame[3, 4] = frame[3, 5] = frame[7, 11] = frame[0, 0] = 65535
    frame[5, 5] = 65534  # one count short of saturated
    detector = Detector(cfg.detector, cfg.dark, frame.shape, frame.dtype)
    detector.mask[0, 0] = True  # a bad pixel (its binned pixel): not a spot's
    want = {(3, 4), (3, 5), (7, 11)}
    want = {(y // binning, x // binning) for y, x in want}
    flat = detector.saturated(frame)
    assert sorted(zip(*np.unravel_index(flat, detector.shape))) == sorted(want)
    assert detector.saturated(np.full_like(frame, 1000)) is None
    frame[:1] = 65535  # 48 pixels of 1920: more than 1 %, a frame the background stage leaves out
    assert detector.saturated(frame) is None
    wide = Detector(cfg.detector, cfg.dark, frame.shape, np.uint32)
    assert wide.saturated(frame.astype(np.uint32) + 2**20) is None  # 32-bit counts: no top to saturate at


@pytest.mark.parametrize("value", [-1e9, 3e7])
def test_a_dark_beyond_what_float32_holds_exactly_is_refused_naming_it(value, tmp_path):
    """A dark of -1e9 counts was taken: the corrected frames, in float32, lost every count (168 spots instead of
    37 in the campaign's scan)."""
    frame = np.full((8, 8), 100, np.uint16)
    cfg = load_config(None, [f"dark.value={value}"])
    with pytest.raises(InputError, match=r"^dark\.value: .*beyond 16777216 \(2\*\*24\)"):
        Detector(cfg.detector, cfg.dark, (8, 8), np.uint16).check_first_frame(frame, "scan.h5::/f")
    path = tmp_path / "dark.h5"
    with h5py.File(path, "w") as f:
        f["dark"] = np.full((2, 8, 8), value, np.float64)
    cfg = load_config(None, [f"dark.url={path}::/dark"])
    with pytest.raises(InputError, match=r"^dark\.url: .*dark\.h5::/dark: dark counts of"):
        Detector(cfg.detector, cfg.dark, (8, 8), np.uint16).check_first_frame(frame, "scan.h5::/f")


def test_a_photon_counting_dark_with_the_detectors_mark_of_no_data_is_a_dark(tmp_path):
    """uint32 frames and their dark hold all bits set in the module gaps: masked there, not dark counts beyond
    2**24 (the validation's photon-counting scans were refused)."""
    gap = np.iinfo(np.uint32).max
    dark = np.zeros((3, 8, 8), np.uint32)
    dark[:, :, 4] = gap
    with h5py.File(tmp_path / "dark.h5", "w") as f:
        f["dark"] = dark
    frame = np.ones((8, 8), np.uint32)
    frame[:, 4] = gap
    cfg = load_config(None, [f"dark.url={tmp_path / 'dark.h5'}::/dark"])
    detector = Detector(cfg.detector, cfg.dark, (8, 8), np.uint32)
    detector.check_first_frame(frame, "scan.h5::/f")
    assert detector.mask[:, 4].all() and not detector.mask[:, :4].any()


def test_a_mask_marking_every_pixel_or_holding_nan_is_refused_naming_it(tmp_path):
    """An inverted mask (every pixel non-zero) or one of NaN masked the whole detector, and the run failed saying
    that the frames had no noise (set a seed threshold): the mask is named instead."""
    dark = load_config(None).dark
    np.save(tmp_path / "all.npy", np.ones((16, 16), np.uint8))
    nan = np.zeros((16, 16)); nan[3, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(InputError, match=r"detector.mask: .*all.npy: every pixel is marked bad \(non-zero\), "
                                         r"expected 0 for a good pixel"):
        Detector(load_config(None, [f"detector.mask={tmp_path / 'all.npy'}"]).detector, dark, (16, 16), np.uint16)
    with pytest.raises(InputError, match=r"detector.mask: .*nan.npy: 1 pixels hold no number \(NaN or infinite\), "
                                         r"the first at \(y, x\) = \(3, 5\)"):
        Detector(load_config(None, [f"detector.mask={tmp_path / 'nan.npy'}"]).detector, dark, (16, 16), np.uint16)


def test_a_flat_holding_infinities_masks_them_and_a_string_dataset_is_one_line(tmp_path):
    """Infinite flat pixels got a gain of 0 (dead pixels reading 0 in every frame, unmasked); a flat (or mask)
    dataset holding a string was a traceback (AttributeError: 'bytes' object has no attribute 'dtype')."""
    flat = np.full((16, 16), 1000.0, np.float32)
    flat[:, :3] = np.inf
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["flat"] = flat
        f["text"] = b"not a flat"
    dark = load_config(None).dark
    det = Detector(load_config(None, [f"detector.flat={tmp_path}/f.h5::/flat"]).detector, dark, (16, 16), np.uint16)
    assert det.mask[:, :3].all() and not det.mask[:, 3:].any()
    assert det.mask_counts["flat"] == 48 and np.all(det.gain > 0)
    for key in ("flat", "mask"):
        with pytest.raises(InputError, match=rf"detector.{key}: .*f.h5::/text: expected an image .* got shape \(\) "
                                             r"dtype \|S10"):
            Detector(load_config(None, [f"detector.{key}={tmp_path}/f.h5::/text"]).detector, dark, (16, 16),
                     np.uint16)


def test_a_flat_with_an_estimated_dark_says_that_no_dark_is_taken_from_it(tmp_path, caplog):
    """dark.estimate comes from the scan's frames, after the flat is made: the flat kept its dark offset, unsaid."""
    import logging

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["flat"] = np.full((16, 16), 1000.0, np.float32)
    flat = f"detector.flat={tmp_path}/f.h5::/flat"
    with caplog.at_level(logging.WARNING, logger="dctstream"):
        cfg = load_config(None, [flat, "dark.estimate=true"])
        Detector(cfg.detector, cfg.dark, (16, 16), np.uint16)
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith(f"detector.flat: {tmp_path}/f.h5::/flat: no dark subtracted")
        caplog.clear()
        cfg = load_config(None, [flat, "dark.value=100"])
        Detector(cfg.detector, cfg.dark, (16, 16), np.uint16)
        assert not caplog.records  # a dark given: subtracted from the flat
