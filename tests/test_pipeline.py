"""End to end: simulated scan -> streamed pipeline -> difspots, against references and ground truth."""

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dctstream import api
from dctstream.config import load_config
from dctstream.pipeline import INTEGER_NOISE_FLOOR, Pipeline
from dctstream.sinks import read_spot_table
from dctstream.sources import read_dataset
from dctstream.sources.base import NO_DATA
from dctstream.segment.segmenter import flood_limit
from reference import reference_blobs, reference_corrected, reference_thresholds
from simulators.dct_scan import simulate_scan
from simulators.evaluate import score


def config(truth, out, *overrides):
    return load_config(None, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                              f"dark.url={truth.dark_url}", f"output.dir={out}", *overrides])


def difspot_voxels(path: Path):
    """(frame, y, x) voxel arrays of a difspot file, from its Mask and 1-based bounding box."""
    with h5py.File(path) as h5:
        mask = h5["Mask"][()]
        origin = h5["BoundingBoxOriginSize"][0] - 1  # (z, y, x), 1-based
    voxels = np.argwhere(mask) + origin
    return tuple(np.ascontiguousarray(voxels[:, i], dtype=np.int64).tobytes() for i in range(3))


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scan")
    return simulate_scan(str(tmp / "scan.h5"), frames=120, size=96, spots=40, seed=3)


@pytest.mark.parametrize("overrides", [
    ["background.window=21"],
    ["background.window=21", "background.normalise=margin"],
    ["background.window=21", "background.mode=block", "background.stride=7", "segmentation.connectivity=6"],
])
def test_difspots_equal_whole_volume_reference(small_scan, tmp_path, overrides):
    cfg = config(small_scan, tmp_path / "out", "segmentation.max_blob_size=[20,20,6]", *overrides)
    pipeline = Pipeline(cfg)
    stats = pipeline.run()
    bg = cfg.background

    raw = read_dataset(small_scan.frames_url)
    dark = read_dataset(small_scan.dark_url).mean(axis=0, dtype=np.float64).astype(np.float32)
    # the scales each frame was measured to have (background tests check how), then everything from scratch
    scales = np.asarray(pipeline.background.frame_scales, np.float32)
    corrected = reference_corrected(raw, window=bg.window, mode=bg.mode, stride=bg.stride, dark=dark,
                                    scales=scales, filter_size=cfg.filter.median_size)
    mask = np.zeros(raw.shape[1:], bool)
    x0, y0, w, h = stats.direct_beam
    mask[y0:y0 + h, x0:x0 + w] = True
    seed, low = reference_thresholds(corrected, mask, cfg.segmentation)
    expected, rejected = reference_blobs(corrected, pipeline.segmenter.params, mask, seed, low, flood_limit(mask))

    files = sorted((tmp_path / "out" / "difspots").glob("*.h5"))
    assert len(files) == len(expected) == stats.difspots_written > 10
    assert sorted(difspot_voxels(f) for f in files) == sorted(
        tuple(np.ascontiguousarray(v[:, i], dtype=np.int64).tobytes() for i in range(3)) for v in expected)
    assert {k: v for k, v in rejected.items() if v} == dict(stats.rejected)
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    assert sorted(table["id"]) == [int(f.stem) for f in files]


def test_difspots_are_on_disk_while_the_scan_is_still_being_read(small_scan, tmp_path):
    window, reach = 21, 6
    cfg = config(small_scan, tmp_path / "out", f"background.window={window}",
                 f"segmentation.max_blob_size=[10,10,{reach}]", "background.normalise=margin")
    folder = tmp_path / "out" / "difspots"
    seen = {}  # difspot file -> frames taken by the background stage when it was first seen

    def watch(stats):
        # the reader thread runs ahead of the stages: count what the stages have taken
        taken = stats.frames_segmented + window // 2 if stats.frames_segmented else stats.frames_read
        for f in folder.glob("*.h5"):
            seen.setdefault(f.name, taken)

    pipeline = Pipeline(cfg)
    pipeline.run(progress=watch)
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    n_frames = 120
    latency = window // 2 + 2 * reach + 1  # frames read when a blob's difspot is due
    due = {f"{i:06d}.h5": m + latency for i, m in zip(table["id"], table["max_frame"])}
    early = [name for name, frames in due.items() if frames < n_frames]
    assert len(early) > 10
    for name in early:
        assert seen[name] <= n_frames - 1, f"{name} was not written while the scan was running"
    # most are written exactly when due; the rest wait for a brighter spot whose
    # growth box overlaps theirs, which is itself written 2F frames after its maximum
    delays = np.array([seen[name] - due[name] for name in early])
    assert np.mean(delays <= 0) > 0.75
    assert delays.max() <= 4 * reach


@pytest.mark.parametrize("defects", [{}, {"dead_pixel_fraction": 1e-3, "module_gap_px": 4, "gain_spread": 0.2}],
                         ids=["perfect-detector", "dead-pixels-gaps-gain"])
def test_accuracy_on_a_720_frame_512px_scan(tmp_path, defects):
    truth = simulate_scan(str(tmp_path / "scan512.h5"), frames=720, size=512, spots=400, seed=0,
                          flat_frames=20 if defects else 0, **defects)
    # with defects, the pipeline is given the flat scan and finds the bad pixels itself
    corrections = ["detector.auto_mask=true", f"detector.flat={truth.flat_url}"] if defects else []
    cfg = load_config(Path(__file__).parent.parent / "configs" / "sim512.yml",
                      [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                       f"dark.url={truth.dark_url}", f"output.dir={tmp_path / 'out'}", *corrections])
    stats = Pipeline(cfg).run()
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    result = score(truth.spots, table, direct_beam=stats.direct_beam, snr_min=5.0)
    print(result)
    assert result["eligible"] > 200
    assert result["recall"] >= 0.95
    assert result["precision"] >= 0.95
    assert result["rms_x_px"] <= 0.3 and result["rms_y_px"] <= 0.3
    assert result["rms_frame"] <= 0.3
    # psi of each spot follows from its centroid frame and the scan's angles
    psi = read_dataset(truth.angles_url)
    np.testing.assert_allclose(table["centroid_psi_deg"], np.interp(table["centroid_frame"],
                                                                    np.arange(psi.size), psi))


def test_a_frame_lost_in_transit_is_replaced_by_the_background(small_scan, tmp_path, monkeypatch):
    import dctstream.pipeline as pipeline_module
    from dctstream.sources import FrameSource, Hdf5FileSource
    from dctstream.types import Frame

    with Hdf5FileSource(small_scan.frames_url, small_scan.angles_url) as source:
        frames = [Frame(f.index, f.psi_deg, None if f.index == 50 else f.data.copy()) for f in source]

    class StreamLike(FrameSource):  # the shape is only known from the first frame, as with a detector stream
        rereadable = True  # a list: read again, nothing to spool
        end_reason = "series_end"

        def __iter__(self):
            return iter(frames)

        def close(self):
            pass

    monkeypatch.setattr(pipeline_module, "open_source", lambda cfg: StreamLike())
    cfg = config(small_scan, tmp_path / "out", "background.window=21", "segmentation.max_blob_size=[10,10,6]")
    stats = Pipeline(cfg).run()
    assert stats.frames_missing == 1
    assert stats.frames_corrected == 120
    assert stats.source_end == "series_end"
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    assert len(table["id"]) == stats.difspots_written > 5
    assert set(stats.stage_s) == {"read", "background", "segment", "write", "export"}  # the sparse scan
    assert 0 < stats.write_cpu_s <= stats.stage_s["write"]  # the writing thread's CPU in its write seconds


def _photon_counting_run(tmp_path, rng, truth, rate, sigma_px):
    """A uint32 scan of 80 frames of 96 x 96 px, Poisson counts: ``rate`` per pixel plus spots at ``truth``'s
    (x, y, frame, peak), ``sigma_px`` wide and a frame long, run at default settings (window 31). Returns
    the run's stats and each found spot's distance to each true one (x, y, frame)."""
    n, ny, nx = 80, 96, 96
    y, x = np.mgrid[0:ny, 0:nx]
    frames = np.empty((n, ny, nx), np.uint32)
    for k in range(n):
        lam = np.full((ny, nx), rate)
        for sx, sy, sf, peak in truth:
            lam += peak * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma_px ** 2) - (k - sf) ** 2 / 2)
        frames[k] = rng.poisson(lam)
    path = tmp_path / "eiger.h5"
    with h5py.File(path, "w") as f:
        f["/1.1/measurement/eiger"] = frames
        f["/1.1/measurement/diffrz"] = np.arange(n) * 0.5
        f["/1.1/end_time"] = "2024-01-01T10:00:00"
    cfg = load_config(None, [f"source.url={path}::/1.1/measurement/eiger",
                             f"source.angles={path}::/1.1/measurement/diffrz",
                             f"output.dir={tmp_path / 'out'}", "background.window=31"])
    stats = Pipeline(cfg).run()
    spots = read_spot_table(tmp_path / "out" / "spots.h5")
    found = np.stack([spots["centroid_x"], spots["centroid_y"], spots["centroid_frame"]], axis=1)
    return stats, np.linalg.norm(found[:, None] - truth[None, :, :3], axis=2)


def test_faint_photon_counting_spots_over_a_counting_background(tmp_path):
    """Spots of 8 counts at their peak over a background of 0.3 counts/px: counting statistics, not a floor
    of 1 count (6-count seeds), set the threshold: every spot found, nothing else."""
    rng = np.random.default_rng(4)
    truth = np.array([(rng.uniform(8, 88), rng.uniform(8, 88), rng.uniform(8, 72), 8.0) for _ in range(12)])
    _, distance = _photon_counting_run(tmp_path, rng, truth, rate=0.3, sigma_px=1.3)
    assert (distance.min(axis=1) < 2.0).all()  # precision 1
    assert (distance.min(axis=0) < 2.0).sum() >= 11  # recall >= 11 of 12


def test_photon_counting_scan_at_default_settings(tmp_path):
    """A photon-counting detector: uint32, almost every pixel 0, Poisson spots of 30-200 counts, no beam.
    The defaults find every spot and nothing else: no beam box, no normalisation (nothing lit to measure
    it on, said in the record), the noise at its floor of half a count (INTEGER_NOISE_FLOOR)."""
    rng = np.random.default_rng(0)
    truth = np.array([(rng.uniform(8, 88), rng.uniform(8, 88), rng.uniform(5, 75), rng.uniform(30, 200))
                      for _ in range(15)])
    stats, distance = _photon_counting_run(tmp_path, rng, truth, rate=0.04, sigma_px=1.5)
    assert stats.direct_beam is None and stats.normalise["measured"] is False
    assert stats.noise_sigma_range == (INTEGER_NOISE_FLOOR, INTEGER_NOISE_FLOOR)
    assert (distance.min(axis=1) < 1.5).all()  # precision 1
    assert (distance.min(axis=0) < 1.5).all()  # recall 1


def test_photon_counting_integrals_are_measured_above_the_counts_mean(tmp_path):
    """Poisson counts of 1.4 a pixel: their median is 1, 0.4 under their mean, and a spot's integral sums its
    box's tails (segment.segmenter). Measured above the level of the corrected frames (segment.noise), each
    integral is within 15 % of the spot's counts (1.05-1.39 of them, 1.23 in the median, without the level);
    the level is in the run record."""
    rng = np.random.default_rng(7)
    n, ny, nx = 160, 96, 96
    truth = np.array([(rng.uniform(8, 88), rng.uniform(8, 88), rng.uniform(6, n - 6), rng.uniform(20, 60))
                      for _ in range(12)])
    y, x = np.mgrid[0:ny, 0:nx]
    frames = np.empty((n, ny, nx), np.uint32)
    integral = np.zeros(len(truth))
    for k in range(n):
        lam = np.full((ny, nx), 1.4)
        for i, (sx, sy, sf, peak) in enumerate(truth):
            spot = peak * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * 1.5 ** 2) - (k - sf) ** 2 / 2)
            integral[i] += spot.sum()
            lam += spot
        frames[k] = rng.poisson(lam)
    path = tmp_path / "eiger.h5"
    with h5py.File(path, "w") as f:
        f["/1.1/measurement/eiger"] = frames
        f["/1.1/measurement/diffrz"] = np.arange(n) * 0.5
    stats = api.run(f"{path}::/1.1/measurement/eiger", out=tmp_path / "out", angles=f"{path}::/1.1/measurement/diffrz",
                    overrides=["background.window=101"]).stats  # the command's run, with its run record
    spots = read_spot_table(tmp_path / "out" / "spots.h5")
    found = np.stack([spots["centroid_x"], spots["centroid_y"], spots["centroid_frame"]], axis=1)
    distance = np.linalg.norm(found[:, None] - truth[None, :, :3], axis=2)
    assert len(found) == len(truth) and (distance.min(axis=1) < 1.5).all()
    ratio = spots["integral"] / integral[distance.argmin(axis=1)]
    assert 0.93 < np.median(ratio) < 1.05 and np.all((ratio > 0.85) & (ratio < 1.15)), np.sort(ratio)
    low, high = stats.background_level_range
    assert 0.25 < low <= high < 0.45  # the mean less the median (a few pixels' median of 101 counts is 2)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["stats"]["background_level_range"] == [low, high]


def test_a_photon_counting_scan_followed_live_from_a_dectris_master_file(tmp_path):
    """An Eiger-like scan (uint32, 0-0.5 counts of background, module gaps at 0xFFFFFFFF) written as a DECTRIS
    master file and data files appearing one after another: the run that follows them gives the spot table
    of the recorded frames, with the gaps masked (the master's pixel mask) and psi from the master's omega."""
    from simulators.dct_scan import GLOW_COUNTS
    from simulators.hard_scans import PHOTON_BACKGROUND_MAX, HardScanModel
    from simulators.replay_file import replay_dectris, start_in_process

    model = HardScanModel(frames=80, size=64, spots=10, seed=3, beam=False, photon_counting=True,
                          glow_scale=PHOTON_BACKGROUND_MAX / GLOW_COUNTS, module_gap_px=2)
    truth = simulate_scan(tmp_path / "eiger.h5", model=model, dtype="uint32", dark_frames=1, workers=1)
    master = tmp_path / "live" / "eiger_master.h5"
    master.parent.mkdir()
    writer = start_in_process(replay_dectris, truth.frames_url, str(master), frames_per_file=20, fps=400,
                              angles_url=truth.angles_url)
    deadline = time.monotonic() + 60
    while not (tmp_path / "live" / "eiger_data_000001.h5").exists():
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.01)
    fit = ["background.window=31", "source.idle_timeout_s=30"]
    pipeline = Pipeline(load_config(None, [f"source.url={master}", "source.angles=auto",
                                           f"output.dir={tmp_path / 'live_out'}", *fit]))
    assert pipeline.cfg.source.url == f"{master}::/entry/data"  # the master file's path alone says it all
    assert pipeline.cfg.source.angles == f"{master}::/entry/sample/goniometer/omega"
    live = pipeline.run()
    writer.join(60)
    recorded = Pipeline(load_config(None, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                                           f"output.dir={tmp_path / 'out'}", *fit])).run()
    assert live.source_end == "complete" and live.frames_corrected == 80
    gaps = 2 * 64 * 2 - 4
    assert live.masked_pixels == {"detector": gaps, "invalid": 0, "all": gaps}  # the master's mask came first
    assert recorded.masked_pixels == {"invalid": gaps, "all": gaps}
    a, b = read_spot_table(tmp_path / "live_out" / "spots.h5"), read_spot_table(tmp_path / "out" / "spots.h5")
    assert len(b["id"]) >= 8
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def moving_beam_scan(tmp_path_factory):
    """A beam whose box moves right and grows with psi (its right edge 0.2 px a frame), and spots about it."""
    from simulators.hard_scans import HardScanModel, write_hard_scan

    model = HardScanModel(frames=160, size=128, spots=60, seed=0, beam_motion=(0.1, 0.0, 0.15, 0.05))
    return model, write_hard_scan("moving_beam", tmp_path_factory.mktemp("moving") / "scan.h5", model=model)


@pytest.mark.parametrize("window", [None, 31])  # default: one window shifted over the whole scan
def test_spots_beside_a_beam_that_moves_with_psi_are_found_and_its_edge_gives_none(moving_beam_scan, tmp_path,
                                                                                    window):
    model, truth = moving_beam_scan
    out = tmp_path / "out"
    stats = Pipeline(config(truth, out, *([f"background.window={window}"] if window else []))).run()
    spots, t = read_spot_table(out / "spots.h5"), truth.spots
    result = score(t, spots, in_beam=t["in_direct_beam"])
    # each true spot's distance (px) to the beam box of its frame
    boxes = np.array([model.beam_box(f) for f in t["frame"]])
    outside = np.maximum.reduce([boxes[:, 0] - t["x"], t["x"] - boxes[:, 0] - boxes[:, 2],
                                 boxes[:, 1] - t["y"], t["y"] - boxes[:, 1] - boxes[:, 3], np.zeros(len(boxes))])
    beside = (t["snr"] >= 5) & ~t["in_direct_beam"].astype(bool) & (outside > 3)
    assert (beside & (outside < 15)).sum() >= 8
    assert (result["truth_to_detection"][beside] >= 0).all()
    # no detection from the beam's moving edge: each is a true spot, whole or partly hidden by the beam
    # (its centroid then near its visible part's, off the truth's, and the row says it touches the mask)
    d = np.minimum(*(np.hypot(spots["centroid_x"][:, None] - t[f"{at}x"], spots["centroid_y"][:, None] - t[f"{at}y"])
                     for at in ("", "visible_")))
    near = (d <= 6) & (np.abs(spots["centroid_frame"][:, None] - t["frame"]) <= 4)
    assert near.any(axis=1).all()
    matched = np.zeros(len(d), bool)
    matched[result["truth_to_detection"][result["truth_to_detection"] >= 0]] = True
    assert spots["touches_mask"][~matched].all()
    # the track in the run record: the beam box it followed, each frame's box holding that frame's beam
    track = stats.direct_beam_track
    assert len(track) >= 3 and track[0][0] == 0
    for k in range(model.frames):
        x0, y0, w, h = [b for f, b in track if f <= k][-1]
        bx0, by0, bw, bh = model.beam_box(k)
        assert x0 <= bx0 and y0 <= by0 and x0 + w >= bx0 + bw and y0 + h >= by0 + bh, k
    # touches_mask, against the pixels: the box grown by 1 px meets the bad pixels or a frame's beam box
    with h5py.File(out / "mask.h5") as f:
        bad = f["mask"][()].astype(bool)
    for row in range(len(spots["id"])):
        x0, y0 = spots["bbox_x0"][row], spots["bbox_y0"][row]
        grown = np.zeros(bad.shape, bool)
        grown[max(y0 - 1, 0):y0 + spots["bbox_y_size"][row] + 1, max(x0 - 1, 0):x0 + spots["bbox_x_size"][row] + 1] = 1
        hidden = bad.copy()
        for k in range(spots["start_frame"][row], spots["end_frame"][row] + 1):
            bx, by, bw, bh = [b for f, b in track if f <= k][-1]
            hidden[by:by + bh, bx:bx + bw] = True
        assert spots["touches_mask"][row] == (grown & hidden).any(), row
    assert 0 < spots["touches_mask"].sum() < len(spots["id"])


def test_noise_made_beside_the_correction_is_the_segmenting_threads_own(moving_beam_scan, tmp_path, monkeypatch):
    # Each frame's own noise and level are made in the thread that corrects the frames (Pipeline._own_noise);
    # made in the segmenting thread instead, as before, they give the same run: the mask of a beam followed
    # along psi is that of the frame's own box in both.
    import dctstream.pipeline as pipeline_module

    _, truth = moving_beam_scan
    runs = {}
    own_noise = Pipeline._own_noise
    for where in ("correcting", "segmenting"):
        frames, masks = [], []
        if where == "segmenting":
            monkeypatch.setattr(Pipeline, "_own_noise", lambda self, k, frame, difference: None)
        else:
            monkeypatch.setattr(Pipeline, "_own_noise", lambda self, k, *a: frames.append(k) or own_noise(self, k, *a))
        monkeypatch.setattr(pipeline_module, "own_maps", lambda frame, measure, mask, *a, _own=pipeline_module.own_maps:
                            masks.append(mask) or _own(frame, measure, mask, *a))
        out = tmp_path / where
        stats = Pipeline(config(truth, out, "background.window=31")).run()
        runs[where] = (read_spot_table(out / "spots.h5"), stats, frames, masks)
    (ours, ours_stats, frames, masks), (theirs, _, _, masks_there) = runs["correcting"], runs["segmenting"]
    assert len(masks) > 100 and not masks_there  # all but the first frames' noise made beside the correction
    # each frame's mask: the detector's and the beam box followed to that frame
    track = ours_stats.direct_beam_track
    assert len(track) >= 3  # the beam was followed: masks that change with psi
    with h5py.File(tmp_path / "correcting" / "mask.h5") as f:
        bad = f["mask"][()].astype(bool)
    for k, mask in zip(frames[-len(masks):], masks):  # the frames after the segmenter started
        x0, y0, w, h = [b for f, b in track if f <= k][-1]
        expected = bad.copy()
        expected[y0:y0 + h, x0:x0 + w] = True
        np.testing.assert_array_equal(mask, expected, err_msg=f"frame {k}")
    assert ours.keys() == theirs.keys() and len(ours["id"]) > 20
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # each frame's noise and level maps, as the sparse scan keeps them
    with h5py.File(tmp_path / "correcting" / "corrected.h5") as a, h5py.File(tmp_path / "segmenting" / "corrected.h5") as b:
        for name in ("noise_sigma", "level", "cut"):
            np.testing.assert_array_equal(a[f"1.1/{name}"][()], b[f"1.1/{name}"][()], err_msg=name)


def test_float_frames_with_fractions_give_the_spots_of_their_rounded_counts(tiny_scan, tiny_overrides, tmp_path):
    """The simulated scan with Gaussian read noise added, stored as float32 (as another simulator may write
    it): the spots, every column, of the same frames rounded to whole counts and stored as int32."""
    with h5py.File(tiny_scan.path) as f:
        counts = f["/1.1/measurement/marana"][()]
    noisy = (counts + np.random.default_rng(2).normal(0, 1.0, counts.shape)).astype(np.float32)
    assert (noisy != np.rint(noisy)).mean() > 0.99
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["float"], f["rounded"] = noisy, np.rint(noisy).astype(np.int32)
    tables = []
    for name in ("float", "rounded"):  # the command's runs, with their run records
        api.run(f"{path}::/{name}", out=tmp_path / name, angles=tiny_scan.angles_url, dark=tiny_scan.dark_url,
                overrides=list(tiny_overrides))
        tables.append(read_spot_table(tmp_path / name / "spots.h5"))
    assert len(tables[0]["id"]) >= 5
    assert tables[0].keys() == tables[1].keys()
    for column in tables[0]:
        np.testing.assert_array_equal(tables[0][column], tables[1][column], err_msg=column)
    record = json.loads((tmp_path / "float" / "run.json").read_text())
    assert record["source_counters"]["frames_rounded"] >= len(noisy)
    assert "frames_rounded" not in json.loads((tmp_path / "rounded" / "run.json").read_text())["source_counters"]


def test_float_frames_with_a_column_without_numbers_mask_it(tiny_scan, tiny_overrides, tmp_path):
    """A float scan whose column 20 holds NaN in every frame (a converter's module gap): that column is the
    mark of a pixel without data, masked (``masked_pixels`` in the run record), no spot takes a voxel of
    it, and the spots clear of it are those of the same counts without the NaN, the column masked by a mask
    file (its values then differ only in the 3 x 3 filter of the columns beside it)."""
    with h5py.File(tiny_scan.path) as f:
        counts = f["/1.1/measurement/marana"][()]
    noisy = (counts + np.random.default_rng(3).normal(0, 1.0, counts.shape)).astype(np.float32)
    gap = noisy.copy()
    gap[:, :, 20] = np.nan
    mask = np.zeros(counts.shape[1:], np.uint8)
    mask[:, 20] = 1
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["gap"], f["rounded"], f["mask"] = gap, np.rint(noisy).astype(np.int32), mask
    tables = []
    for name, extra in (("gap", []), ("rounded", [f"detector.mask={path}::/mask"])):
        api.run(f"{path}::/{name}", out=tmp_path / name, angles=tiny_scan.angles_url, dark=tiny_scan.dark_url,
                overrides=[*tiny_overrides, *extra])
        tables.append(read_spot_table(tmp_path / name / "spots.h5"))
    record = json.loads((tmp_path / "gap" / "run.json").read_text())
    assert record["stats"]["masked_pixels"] == {"invalid": counts.shape[1], "all": counts.shape[1]}
    for difspot in (tmp_path / "gap" / "difspots").glob("*.h5"):
        with h5py.File(difspot) as h5:
            x0 = int(h5["BoundingBoxXorigin"][()]) - 1  # 1-based
            assert not h5["Mask"][()][:, :, max(20 - x0, 0):max(21 - x0, 0)].any(), difspot.name

    def clear(table):
        keep = (table["bbox_x0"] > 23) | (table["bbox_x0"] + table["bbox_x_size"] < 17)
        order = np.lexsort((table["centroid_x"][keep], table["centroid_frame"][keep]))
        return {k: v[keep][order] for k, v in table.items() if k != "id"}

    got, want = clear(tables[0]), clear(tables[1])
    assert len(got["centroid_x"]) >= 5
    for column in got:
        np.testing.assert_array_equal(got[column], want[column], err_msg=column)


def test_a_dead_block_is_masked_and_seeds_no_spot_beside_it(tiny_scan, tmp_path):
    """A block of pixels at 0 in every frame (a dead module) took the noise of the tile it shares with live
    pixels down to nothing, which then seeded false spots along it; found dead in the first window, it is
    masked (``masked_pixels: dead``) and the spots clear of it are those of the same counts with the block
    masked by a mask file (their values within 1 %, or 40 counts of an integral: the 3 x 3 filter of the pixels
    beside the block, and so their tile's noise and level, differ)."""
    with h5py.File(tiny_scan.path) as f:
        counts = f["/1.1/measurement/marana"][()]
    dead = counts.copy()
    dead[:, 34:64, 2:30] = 0  # most of a noise tile (32 x 32 px)
    mask = np.zeros(counts.shape[1:], np.uint8)
    mask[34:64, 2:30] = 1
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["dead"], f["counts"], f["mask"] = dead, counts, mask
    overrides = ["background.window=21", "segmentation.max_blob_size=[20,20,5]"]
    tables = []
    for name, extra in (("dead", []), ("counts", [f"detector.mask={path}::/mask"])):
        api.run(f"{path}::/{name}", out=tmp_path / name, angles=tiny_scan.angles_url, dark=tiny_scan.dark_url,
                overrides=[*overrides, *extra])
        tables.append(read_spot_table(tmp_path / name / "spots.h5"))
    def clear(table):  # two pixels beside the block: its 3 x 3 filter differs there
        x0, y0 = table["bbox_x0"], table["bbox_y0"]
        x1, y1 = x0 + table["bbox_x_size"], y0 + table["bbox_y_size"]
        keep = (x0 > 31) | (y1 < 33)
        order = np.lexsort((table["centroid_x"][keep], table["centroid_frame"][keep]))
        return {k: v[keep][order] for k, v in table.items() if k != "id"}

    got, want = clear(tables[0]), clear(tables[1])
    assert len(want["centroid_x"]) >= 5
    for column in got:
        if column in ("integral", "max_value", "centroid_x", "centroid_y", "centroid_frame", "centroid_psi_deg"):
            np.testing.assert_allclose(got[column], want[column], rtol=0.01,
                                       atol={"integral": 40.0, "max_value": 1.0}.get(column, 0.02), err_msg=column)
        else:
            np.testing.assert_array_equal(got[column], want[column], err_msg=column)
    record = json.loads((tmp_path / "dead" / "run.json").read_text())
    assert record["stats"]["masked_pixels"]["dead"] == 30 * 28


@pytest.mark.parametrize("cached", [False, True])
def test_a_first_run_says_that_it_compiles_the_kernels(tiny_scan, tiny_overrides, tmp_path, caplog, monkeypatch,
                                                      cached):
    """Its first frames wait 20-60 s on the compiler: said at the start, so that a status showing no frame
    for that long is understood; not said once the kernels are cached."""
    import logging

    import dctstream.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "kernels_cached", lambda: cached)
    with caplog.at_level(logging.INFO, logger="dctstream.pipeline"):
        api.run(tiny_scan.frames_url, out=tmp_path / "out", angles=tiny_scan.angles_url, dark=tiny_scan.dark_url,
                overrides=list(tiny_overrides))
    said = [r.getMessage() for r in caplog.records if "compiling the numba kernels" in r.getMessage()]
    assert len(said) == (0 if cached else 1)


def test_unusable_frames_are_said_flagged_and_make_no_spot(tiny_scan, tiny_overrides, tmp_path):
    """The tiny scan with a saturated frame through a spot (frame 20) and the beam lost for frames 30-33: the run
    record and the status say which frames were unusable; every spot has a positive integral and is one of the
    unspoilt scan's (2 px, 2 frames) or flagged touches_mask (a piece beyond the lost beam); the spot across
    frame 20 is one spot, flagged. Kept in every median as they came, the lost frames made false spots and a
    saturated frame lost the spot."""
    def path_of(url):
        return url.split("::")
    spoilt = tmp_path / "spoilt.h5"
    with h5py.File(tiny_scan.path, "r") as f, h5py.File(spoilt, "w") as g:
        frames = f[path_of(tiny_scan.frames_url)[1]][()]
        dark = f[path_of(tiny_scan.dark_url)[1]][()]
        g["angles"] = f[path_of(tiny_scan.angles_url)[1]][()]
        frames[20] = np.iinfo(frames.dtype).max
        frames[30:34] = dark[:4]  # the shutter closed: dark frames
        g["frames"], g["dark"] = frames, dark
    clean = api.run(tiny_scan.frames_url, out=tmp_path / "clean", dark=tiny_scan.dark_url,
                    angles=tiny_scan.angles_url, overrides=list(tiny_overrides))
    run = api.run(f"{spoilt}::/frames", out=tmp_path / "spoilt", dark=f"{spoilt}::/dark", angles=f"{spoilt}::/angles",
                  overrides=list(tiny_overrides))
    record = json.loads((tmp_path / "spoilt" / "run.json").read_text())
    assert record["stats"]["normalise"]["unusable"] == [[20, 20], [30, 33]]
    assert "5 frames unusable (beam off, or pixels stuck at 0 or the top value), read as 0: 20, 30-33" \
        in record["warnings"]
    want = read_spot_table(clean.out / "spots.h5")
    got = read_spot_table(run.out / "spots.h5")
    assert (got["integral"] > 0).all()
    for i in range(len(got["id"])):
        near = ((np.abs(want["centroid_x"] - got["centroid_x"][i]) <= 2)
                & (np.abs(want["centroid_y"] - got["centroid_y"][i]) <= 2)
                & (np.abs(want["centroid_frame"] - got["centroid_frame"][i]) <= 2))
        assert near.any() or got["touches_mask"][i] == 1
    was = np.flatnonzero((want["start_frame"] < 20) & (want["end_frame"] > 20))
    assert was.size == 1
    here = np.hypot(got["centroid_x"] - want["centroid_x"][was[0]], got["centroid_y"] - want["centroid_y"][was[0]]) < 1
    assert here.sum() == 1 and got["start_frame"][here][0] < 20 < got["end_frame"][here][0]
    assert got["touches_mask"][here][0] == 1


@pytest.mark.parametrize("overrides, message", [
    (["direct_beam.bbox=[0,0,64,64]", "segmentation.seed_threshold=50"],
     "direct_beam.bbox: [0, 0, 64, 64]: the beam box [0, 0, 64, 64] covers every pixel of the 64 x 64 frames, "
     "expected pixels left to segment"),
    (["detector.mask={left}", "direct_beam.bbox=[32,0,32,64]"],
     "detector: the masked pixels ({{'file': 2048}}) and the direct beam [32, 0, 32, 64] cover every pixel of the "
     "64 x 64 frames, expected pixels left to segment"),
])
def test_nothing_left_to_segment_is_said_naming_what_covers_the_frames(tiny_scan, tiny_overrides, tmp_path,
                                                                        overrides, message):
    """A beam box over the whole frame, or a mask and a beam box that cover it together: the run said the frames
    had no noise (set a seed threshold), or with a seed threshold found nothing, unsaid."""
    from dctstream.errors import InputError
    from dctstream.runner import process_scan

    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 1
    np.save(tmp_path / "left.npy", left)
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"dark.url={tiny_scan.dark_url}",
                             f"output.dir={tmp_path / 'out'}", *tiny_overrides,
                             *(o.format(left=tmp_path / "left.npy") for o in overrides)])
    with pytest.raises(InputError) as err:
        process_scan(cfg, display=False)
    assert str(err.value) == message.format()


def test_a_flood_closed_at_the_scans_end_is_counted_and_said(tmp_path, caplog):
    """A scan too short for the boxes rule to close anything before its end: every region in its flood of noise (frames
    lifted 3.6 sigma) is grown at the end; the run counts them (`flooded_spots`) and says so once (nothing was said
    when they were all grown at the end: the count was read before)."""
    from dctstream.api import MEMORY_URL, resolve_config
    from dctstream.sources.memory import MemorySource
    from test_segment import flooded_volume

    volume, _ = flooded_volume()
    volume[15:35] += 1.4  # 3.6 sigma in all
    frames = np.round(1000 + 30 * volume).astype(np.float32)
    cfg = resolve_config(None, ["filter.median_size=1", "quicklook.enabled=false", "background.normalise=none"],
                         {"source.url": MEMORY_URL, "output.dir": str(tmp_path / "out"), "dark.value": 0.0}, "test")
    with caplog.at_level("WARNING", logger="dctstream.pipeline"):
        stats = Pipeline(cfg, source=MemorySource(frames, None, name="frames")).run()
    assert stats.flooded_spots >= 1 and stats.difspots_written >= 5
    said = [r.getMessage() for r in caplog.records if "lies in a flood of noise" in r.getMessage()]
    assert len(said) == 1
