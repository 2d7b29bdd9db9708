"""dctstream resegment / tune: segmenting a run again from its sparse corrected scan gives exactly the spot
table of a full run with the same settings, whenever those need no voxel below the sparse scan's cut."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from cli_util import assert_one_line_error
from dctstream.cli import main
from dctstream.config import load_config
from dctstream.errors import ConfigError, InputError, OutputError
from dctstream.pipeline import Pipeline, resolve_segmentation, sparse_cut
from dctstream.resegment import check_cut, draw_tune, format_tune, knee_index, resegment, tune
from dctstream.sinks import SparseScan, read_corrected, read_spot_table
from simulators.dct_scan import simulate_scan
from simulators.evaluate import score

BASE = ("background.window=31", "segmentation.max_blob_size=[30,30,10]", "quicklook.enabled=false")


def _config(truth, out, *overrides):
    return load_config(None, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                              f"dark.url={truth.dark_url}", f"output.dir={out}", *BASE, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A simulated scan, run once with the defaults (the sparse scan on), once with a stack export, and once
    with a stack of its frames before the median filter (the values spots are measured with)."""
    tmp = tmp_path_factory.mktemp("reseg")
    truth = simulate_scan(str(tmp / "scan.h5"), frames=100, size=96, spots=60, seed=4)
    stats = Pipeline(_config(truth, tmp / "run")).run()
    Pipeline(_config(truth, tmp / "stack", "export.format=stack")).run()
    Pipeline(_config(truth, tmp / "unfiltered", "export.format=stack", "filter.median_size=1")).run()
    return truth, tmp, stats


def _same_table(got, want):
    """Every column equal but the integral: its tails sum the unclaimed voxels around a spot, below the
    cut too, where a sparse scan holds nothing (see `_integral_gap_is_below_the_cut`)."""
    assert got.keys() == want.keys()
    for name in want:
        if name != "integral":
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got["integral"], want["integral"])


def _integral_gap_is_below_the_cut(got, want, run_dir, stack_dir, reach_f):
    """For most spots, full-run integral - resegmented integral = the unfiltered corrected values (less the
    frame's level) where the filtered ones are below the cut, in the tails' box (the spot's box grown by half its extent, at least
    2 px and 1 frame: segmenter.py). The others closed before their box's last frame was segmented (their
    tails stop there, in both runs), or hold a zinger taken out of the unfiltered values. Spots longer than
    ``reach_f`` (max_blob_size frames) are left out: their tails' box reaches past the frames the segmenter
    holds (it keeps reach_f frames before the earliest maximum still to grow) and stops there."""
    frames = np.stack(read_corrected(stack_dir / "corrected.h5"))
    unfiltered = np.stack(read_corrected(stack_dir.parent / "unfiltered" / "corrected.h5"))
    n, ny, nx = frames.shape
    with SparseScan(run_dir / "corrected.h5") as scan:
        cut, mask = _pixel_maps(scan.cut, scan.tile_px, (ny, nx)), scan.mask
        level = _pixel_maps(scan.level, scan.tile_px, (ny, nx))  # the unfiltered values are measured above it
    assert np.any(level != 0)
    below = np.where((frames < cut) & ~mask, unfiltered.astype(np.float32) - level, 0.0).astype(np.float64)
    same = 0
    within = np.flatnonzero(want["end_frame"] - want["start_frame"] + 1 <= reach_f)
    assert within.size > 10
    for i in within:
        (f0, f1), x0, y0 = (want["start_frame"][i], want["end_frame"][i]), want["bbox_x0"][i], want["bbox_y0"][i]
        w, h = want["bbox_x_size"][i], want["bbox_y_size"][i]
        mf, my, mx = max(1, -(-(f1 - f0 + 1) // 2)), max(2, -(-h // 2)), max(2, -(-w // 2))
        tails = below[max(f0 - mf, 0):min(f1 + mf, n - 1) + 1, max(y0 - my, 0):min(y0 + h - 1 + my, ny - 1) + 1,
                      max(x0 - mx, 0):min(x0 + w - 1 + mx, nx - 1) + 1].sum()
        same += abs(want["integral"][i] - got["integral"][i] - tails) < 1e-3 * max(1.0, abs(tails))
    assert same >= 0.5 * within.size


def _full_run_table(truth, out, settings):
    stats = Pipeline(_config(truth, out, *settings, "export.format=none")).run()
    return stats, read_spot_table(out / "spots.h5")


@pytest.mark.parametrize("settings", [
    (),
    ("segmentation.seed_sigma=9",),
    ("segmentation.seed_sigma=5",),  # grow_low auto (2.5 sigma) then 25 % above the cut (2 sigma)
    ("segmentation.min_blob_size=[3,3,2]",),
    ("segmentation.max_blob_size=[12,12,4]", "segmentation.grow_ratio=0.2"),
    ("segmentation.connectivity=6", "segmentation.seed_min_voxels=5"),
    ("segmentation.seed_threshold=40", "segmentation.grow_low=20"),  # counts, not sigmas
])
def test_resegmented_table_equals_a_full_run_with_the_same_settings(run, settings, tmp_path):
    truth, tmp, _ = run
    summary = resegment(tmp / "run", settings, tmp_path / "re")
    _, want = _full_run_table(truth, tmp_path / "full", settings)
    got = read_spot_table(tmp_path / "re" / "spots.h5")
    assert len(want["id"]) > 10 and summary["difspots"] == len(want["id"])
    _same_table(got, want)
    reach_f = _config(truth, tmp_path, *settings).segmentation.max_blob_size[2]
    _integral_gap_is_below_the_cut(got, want, tmp / "run", tmp / "stack", reach_f)
    assert sorted(p.name for p in (tmp_path / "re" / "difspots").iterdir()) == [f"{i:06d}.h5" for i in want["id"]]


def _with_flood(truth, path, frames=range(50, 53)):
    """The scan with a burst of 3 x 3 px blobs on ``frames`` (they outlive the 3 x 3 median filter), 2 px apart
    from one another: more seed regions than the flood guard lets through."""
    with h5py.File(truth.frames_url.partition("::")[0], "r") as f, h5py.File(path, "w") as out:
        for name in ("/1.1/measurement/marana", "/1.1/measurement/diffrz", "/2.1/measurement/marana"):
            out[name] = f[name][()]
        data = out["/1.1/measurement/marana"]
        burst = data[list(frames)].astype(np.float64)
        rng = np.random.default_rng(1)
        for b in burst:
            for y in range(0, b.shape[0] - 2, 5):
                for x in range(0, b.shape[1] - 2, 5):
                    b[y:y + 3, x:x + 3] += rng.uniform(50, 400)
        data[list(frames)] = np.clip(burst, 0, 65535).astype(data.dtype)
    return SimpleNamespace(frames_url=f"{path}::/1.1/measurement/marana",
                           angles_url=f"{path}::/1.1/measurement/diffrz", dark_url=f"{path}::/2.1/measurement/marana")


def test_a_flooded_scan_resegments_as_its_full_run(run, tmp_path, monkeypatch):
    """The flood guard raises a frame's thresholds from its seed count: the same with the sparse scan."""
    truth, _, _ = run
    flooded = _with_flood(truth, tmp_path / "flood.h5")
    stats = Pipeline(_config(flooded, tmp_path / "run")).run()
    assert stats.flood_frames_total >= 2
    for i, settings in enumerate([(), ("segmentation.seed_sigma=5",)]):
        summary = resegment(tmp_path / "run", settings, tmp_path / f"re{i}")
        full_stats, want = _full_run_table(flooded, tmp_path / f"full{i}", settings)
        assert summary["flood_frames"] == full_stats.flood_frames_total >= 2
        _same_table(read_spot_table(tmp_path / f"re{i}" / "spots.h5"), want)
    # the second half in a second process, its segmenter started before the flood: counted once
    monkeypatch.setattr("dctstream.resegment.SPLIT_MIN_PIXELS", 0)
    monkeypatch.setattr("dctstream.resegment._cpus", lambda: 2)
    two = resegment(tmp_path / "run", (), tmp_path / "two")
    assert (two["flood_frames"], two["difspots"]) == (stats.flood_frames_total, len(read_spot_table(
        tmp_path / "re0" / "spots.h5")["id"]))


@pytest.mark.parametrize("difspots,spots", [(True, None), (False, None), (True, [(36.0, 1.6, 10000.0)]),
                                            (False, [(3.0, 1.6, 10000.0)])])
def test_a_full_turn_resegments_with_its_spot_across_the_seam_joined(tmp_path, tiny_scan, tiny_overrides, difspots,
                                                                     spots):
    """A spot across the seam, or one whose tail alone crosses it (``spots``: test_seam's)."""
    from test_seam import _scan_with_seam_spot

    src, angles, dark = _scan_with_seam_spot(tiny_scan, tmp_path / "seam.h5", 39.5, spots=spots)
    scan = SimpleNamespace(frames_url=src, angles_url=angles, dark_url=dark)

    def config(out, *settings):
        return load_config(None, [f"source.url={src}", f"source.angles={angles}", f"dark.url={dark}",
                                  f"output.dir={out}", "quicklook.enabled=false", *tiny_overrides, *settings])

    assert Pipeline(config(tmp_path / "run")).run().seam_joined == 1
    settings = ("segmentation.seed_sigma=7",)
    summary = resegment(tmp_path / "run", settings, tmp_path / "re", difspots=difspots)
    full = Pipeline(config(tmp_path / "full", *settings, "export.format=none")).run()
    assert summary["seam_joined"] == full.seam_joined == 1
    got, want = (read_spot_table(tmp_path / name / "spots.h5") for name in ("re", "full"))
    _same_table(got, want)
    files = sorted(p.name for p in (tmp_path / "re" / "difspots").glob("*.h5"))
    assert files == ([f"{i:06d}.h5" for i in sorted(want["id"])] if difspots else [])
    del scan


def test_the_size_filters_reject_in_a_resegmentation_as_in_a_run(run, tmp_path):
    _, tmp, _ = run
    loose = resegment(tmp / "run", (), tmp_path / "a")
    strict = resegment(tmp / "run", ("segmentation.min_blob_size=[4,4,3]",), tmp_path / "b")
    assert strict["rejected"]["too_small"] > loose["rejected"].get("too_small", 0)
    assert strict["difspots"] < loose["difspots"]


def _pixel_maps(tiles, tile, shape):
    return np.repeat(np.repeat(tiles, tile, -2), tile, -1)[..., :shape[0], :shape[1]]


def test_sparse_scan_holds_the_corrected_pixels_at_or_above_each_frames_cut(run):
    truth, tmp, stats = run
    frames = np.stack(read_corrected(tmp / "stack" / "corrected.h5"))
    with SparseScan(tmp / "run" / "corrected.h5") as scan:
        assert len(scan) == len(frames) and scan.finished
        cut, mask, sigma = scan.cut, scan.mask, scan.noise_sigma
        assert cut.shape == sigma.shape == (len(frames), 3, 3)
        x0, y0, w, h = stats.direct_beam_track[0][1]  # the followed beam reads 0: never stored
        assert not frames[0, y0:y0 + h, x0:x0 + w].any() and w * h > 100
        assert np.all(cut <= np.float32(2.0) * sigma.astype(np.float32) + 1e-6)  # cut_sigma x the noise
        assert np.mean(cut >= np.float32(1.99) * sigma) > 0.9  # lowered only where the segmentation needs less
        assert np.ptp(sigma, axis=0).max() > 0  # followed along psi, not one map for the scan
        np.testing.assert_allclose(np.diff(scan.psi), np.diff(scan.psi)[0])
        for (k, rows, cols, values), frame in zip(scan.frames(), frames):
            expected = np.nonzero((frame >= _pixel_maps(cut[k], scan.tile_px, frame.shape)) & ~mask)
            np.testing.assert_array_equal(rows, expected[0], err_msg=f"frame {k}")
            np.testing.assert_array_equal(cols, expected[1], err_msg=f"frame {k}")
            np.testing.assert_array_equal(values, frame[expected], err_msg=f"frame {k}")
        assert all("32008" in scan.group[name]._filters for name in ("row", "col", "intensity"))  # bitshuffle
    raw_frame_bytes = 96 * 96 * 2
    assert 0 < stats.sparse_fill_fraction < 0.3
    assert stats.sparse_bytes_per_frame < raw_frame_bytes / 2
    assert stats.export_reduction == pytest.approx(raw_frame_bytes / stats.sparse_bytes_per_frame)
    assert "2 x noise" in stats.sparse_cut


def test_imaged11_reads_the_sparse_scan_as_the_corrected_pixels(run):
    sparseframe = pytest.importorskip("ImageD11.sparseframe")
    _, tmp, _ = run
    path = tmp / "run" / "corrected.h5"
    theirs = sparseframe.SparseScan(str(path), "1.1")
    with SparseScan(path) as scan:
        assert theirs.shape == (len(scan), *scan.frame_shape)
        np.testing.assert_array_equal(theirs.motors["omega"], scan.psi)
        dense = theirs.to_dense()
        cut = _pixel_maps(scan.cut, scan.tile_px, scan.frame_shape)
        mask = scan.mask
    frames = np.stack(read_corrected(tmp / "stack" / "corrected.h5"))
    kept = (frames >= cut) & ~mask
    np.testing.assert_array_equal(dense[kept], frames[kept])
    assert not dense[~kept].any() and kept.sum() == theirs.nnz.sum()


@pytest.mark.parametrize("settings, keys", [
    # auto grow_low: 1.5 sigma, below the cut of 2 sigma; where a tile's noise is 1.5x its neighbours' (the
    # beam's edge), their 3-sigma seeds within reach are below its cut too: either is the key to raise
    (("segmentation.seed_sigma=3",), ("segmentation.grow_low", "segmentation.seed_sigma")),
    (("segmentation.grow_low=0.5",), ("segmentation.grow_low",)),
    (("segmentation.seed_threshold=1", "segmentation.grow_low=40"), ("segmentation.seed_threshold",)),
])
def test_settings_needing_voxels_below_the_cut_are_refused_naming_it(run, settings, keys, tmp_path, capsys):
    _, tmp, _ = run
    args = ["resegment", str(tmp / "run"), "--out", str(tmp_path / "re")]
    code = main(args + [a for s in settings for a in ("--set", s)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, ConfigError.exit_code, ["below the sparse scan's cut"])
    named = captured.err.split(":")[2].strip()  # "dctstream: error: segmentation.KEY: ..."
    assert named in keys, captured.err
    assert not (tmp_path / "re").exists()


@pytest.mark.parametrize("inside", ["difspots", "quicklook/re", ".dctstream"])
def test_out_inside_the_runs_own_folders_is_refused(run, tmp_path, capsys, inside):
    """``--out RUN/difspots``: the new spots.h5, config.yml and quicklook/ were written in among the run's
    difspot files (and with --difspots, its difspots/ inside them). Refused now, nothing written there."""
    import shutil

    _, tmp, _ = run
    out = tmp_path / "run"
    shutil.copytree(tmp / "run", out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code = main(["resegment", str(out), "--no-difspots", "--out", str(out / inside)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, ConfigError.exit_code,
                          [f"--out: {out / inside} is inside the run's own {inside.split('/')[0]}/"])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main(["resegment", str(out), "--no-difspots", "--out", str(out / "try1")]) == 0  # another folder


def test_a_whole_resegmentation_has_a_record_and_its_export_is_not_partial(run, tmp_path, capsys):
    """Without a run.json of its own, the export of every resegmentation said PARTIAL (no run record), so one
    interrupted half-way (spots.h5 and some difspots, no quick-look) read the same as a whole one. Its record
    is now written once its results are whole: finished when the run was, else incomplete with why."""
    import json
    import shutil

    from dctstream import open_run

    _, tmp, _ = run
    src = tmp_path / "run"
    shutil.copytree(tmp / "run", src, ignore=shutil.ignore_patterns("difspots"))
    assert main(["resegment", str(src), "--no-difspots", "--set", "segmentation.seed_sigma=7"]) == 0
    out = src / "resegmented"
    record = open_run(out).record
    assert record["state"] == "finished" and record["resegmented_from"] == str(src)
    assert record["spots"] == len(open_run(out).spots) > 0
    assert record["config"]["segmentation"]["seed_sigma"] == 7
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    assert "PARTIAL" not in capsys.readouterr().out
    # a resegmentation of a run that did not finish is not whole either
    (src / "run.json").write_text(json.dumps({"state": "incomplete", "incomplete": "idle_timeout after 80 frames"}))
    assert main(["resegment", str(src), "--no-difspots", "--out", str(tmp_path / "re2")]) == 0
    assert open_run(tmp_path / "re2").record["state"] == "incomplete"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "re2")]) == 0
    assert "PARTIAL, marked so in the file: the run is incomplete: resegmented from an unfinished run: the run " \
           "is incomplete: idle_timeout after 80 frames" in capsys.readouterr().out


def test_only_segmentation_settings_can_change(run, tmp_path, capsys):
    _, tmp, _ = run
    code = main(["resegment", str(tmp / "run"), "--out", str(tmp_path / "re"), "--set", "background.window=5"])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, ConfigError.exit_code, ["background.window", "segmentation"])


@pytest.mark.parametrize("kept", [0.3, 0.95])
def test_a_sparse_scan_cut_short_is_one_error_not_a_hang(run, tmp_path, kept):
    """corrected.h5 of a finished run cut short (a copy that stopped, a full disk): opened as a SWMR reader
    (the file may be growing) a failed checksum is read again and again, and resegment and tune hung for
    minutes; a traceback (RuntimeError: bad object header version number) where HDF5 gave up. Now a closed
    file is opened plainly: one line naming it, at once."""
    import shutil

    _, tmp, _ = run
    out = tmp_path / "run"
    shutil.copytree(tmp / "run", out, ignore=shutil.ignore_patterns("difspots"))
    path = out / "corrected.h5"
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * kept))
    for command in ("resegment", "tune"):
        try:
            done = subprocess.run([sys.executable, "-m", "dctstream", command, str(out)], capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dctstream {command} of a cut-short corrected.h5 still running after 60 s")
        assert_one_line_error(done.returncode, done.stdout, done.stderr, InputError.exit_code,
                              [f"{path}: cannot read the sparse corrected scan", "truncated file"])


def test_frames_counted_but_never_written_are_left_out(run, tmp_path, caplog):
    """A run whose writes failed (a full disk) left corrected.h5 with nnz grown over frames whose maps and
    pixels were never written (HDF5's fill value, 0): resegment found 0 difspots in them, 'from the sparse scan
    of 177 frames', and tune failed on a NaN ('every value swept was refused'). Those last frames are left out
    (said in a warning); none written at all is an error saying why."""
    import shutil

    _, tmp, _ = run
    out = tmp_path / "run"
    shutil.copytree(tmp / "run", out, ignore=shutil.ignore_patterns("difspots"))
    with SparseScan(out / "corrected.h5") as scan:
        n, nnz = len(scan), scan.nnz.copy()
    with h5py.File(out / "corrected.h5", "a") as f:  # as its writer left it: not closed, the last maps blank
        f["1.1"].attrs["nframes"] = 0
        f["1.1/noise_sigma"][n - 10:] = 0
    with caplog.at_level(logging.WARNING), SparseScan(out / "corrected.h5") as scan:
        assert len(scan) == n - 10 and not scan.finished
        np.testing.assert_array_equal(scan.nnz, nnz[:n - 10])
        assert [k for k, *_ in scan.frames()] == list(range(n - 10))
    assert f"frames {n - 10} to {n - 1} counted but never written" in caplog.text
    with h5py.File(out / "corrected.h5", "a") as f:
        f["1.1/noise_sigma"][:] = 0
    with pytest.raises(InputError, match=f"no frame written: the {n} it counts were never"):
        resegment(out, [], tmp_path / "re")


def test_a_sparse_scan_without_its_counts_says_so(run, tmp_path):
    """/1.1/nnz deleted from a sparse scan: 'expected a sparse corrected scan (export.format: sparse), got
    sparse'; now it says which dataset the sparse scan lacks."""
    import shutil

    _, tmp, _ = run
    path = tmp_path / "corrected.h5"
    shutil.copy(tmp / "run" / "corrected.h5", path)
    with h5py.File(path, "a") as f:
        del f["1.1/nnz"]
    with pytest.raises(InputError, match=r"got a sparse scan without /1\.1/nnz \(damaged\?\)$"):
        SparseScan(path)


def test_knee_is_the_lowest_value_without_an_excess_over_the_real_spots_trend():
    x = np.arange(4.0, 13.0)
    real = 140 - 3 * x  # ever fainter real spots lost, a few a step
    noise = 1000 * np.exp(-(x - 4) * 2.0)  # noise spots vanish fast: 18 at 6, 2.5 at 7, 0.3 at 8
    assert knee_index(x, real + noise) == 3  # at 7, 2.5 of 121.5 spots (2 %) are noise; at 6, 18 (14 %)
    assert knee_index(x, real) == 0  # no noise in the sweep: its lowest value
    assert knee_index(x, np.full(x.size, 7.0)) is None


# The simulator's spots last up to 13 frames above 0.3 x their peak (sigma along psi up to 4 frames): a
# 10-frame max_blob_size rejected the brightest of them as too large at every threshold.
TUNE_SETTINGS = ("segmentation.max_blob_size=[30,30,15]",)


def _recall_precision(truth, outcome, direct_beam):
    table = {name: np.array([r[name] for r in outcome.rows]) for name in ("centroid_x", "centroid_y",
                                                                         "centroid_frame")}
    s = score(truth.spots, table, direct_beam=direct_beam)
    return s["recall"], s["precision"]


@pytest.mark.parametrize("seed,cut", [(1, []), (2, []), (3, []), (4, []), (5, []), (2, ["export.cut_sigma=1.5"])])
def test_tune_marks_a_seed_threshold_where_recall_and_precision_reach_097(tmp_path, capsys, seed, cut):
    """The default sweep of a run of 150 spots: every value's spots scored against the simulator's truth; the
    knee lies in the band of values whose recall and precision are both >= 0.97, which does not hold at
    the highest value (faint spots lost) nor, with a lower cut, at the lowest (noise seeds). The "kneedle"
    rule (the point farthest below the chord) fell out of the band on seeds 1, 4 and 5 at the default cut."""
    truth = simulate_scan(str(tmp_path / "scan.h5"), frames=150, size=128, spots=150, seed=seed)
    stats = Pipeline(_config(truth, tmp_path / "run", *TUNE_SETTINGS, *cut)).run()
    result = tune(tmp_path / "run")
    values = [r["value"] for r in result["rows"]]
    assert result["key"] == "seed_sigma" and len(values) >= 6
    recall, precision = np.array([_recall_precision(truth, o, stats.direct_beam) for o in result["outcomes"]]).T
    band = (recall >= 0.97) & (precision >= 0.97)
    table = list(zip(values, [r["spots"] for r in result["rows"]], recall.round(3), precision.round(3)))
    assert not band[-1], table  # the sweep reaches thresholds too high
    if cut:  # and, with the lower cut, too low (noise seeds): a knee at either end fails
        assert not band[0], table
    assert result["knee"] is not None and band[result["knee"]], table
    # what the command prints and draws for it: a table, the knee and the command that applies it, a picture
    out = format_tune(result, tmp_path / "run")
    assert f"dctstream resegment {tmp_path / 'run'} --set segmentation.seed_sigma={values[result['knee']]:g}" in out
    assert sum("<- knee" in line for line in out.splitlines()) == 1
    assert draw_tune(result).size == (720, 420)
    # the command line, on three of those values (one pass)
    chosen = ",".join(f"{v:g}" for v in (values[0], values[len(values) // 2], values[-1]))
    assert main(["tune", str(tmp_path / "run"), "--values", chosen, "--png", str(tmp_path / "tune.png")]) == 0
    printed = capsys.readouterr().out
    assert "swept over 3 values" in printed
    assert (tmp_path / "tune.png").stat().st_size > 1000


def test_tune_says_when_the_cut_kept_the_sweep_above_the_noise():
    row = {"median_area": 9.0, "median_frames": 3.0, "noisy": 0, "too_small": 0, "too_large": 0,
           "seed_min_voxels": 0, "floods": 0}
    result = {"key": "seed_sigma", "knee": 1, "frames": 10, "finished_scan": True, "seconds": 1.0,
              "rows": [{**row, "value": v, "spots": n} for v, n in ((5.0, 60), (6.0, 40), (8.0, 38))]}
    cut = "segmentation.grow_low: needs corrected values down to 3 counts ..., below the sparse scan's cut of 4 ..."
    below = format_tune({**result, "refused": [(4.0, cut)]}, "OUT")
    assert "below 5: a run with a lower export.cut_sigma" in below
    assert "export.cut_sigma" not in format_tune({**result, "refused": [(9.0, cut)]}, "OUT")
    # a value refused for itself, not for the cut: no lower cut would take it
    invalid = "replace_config: segmentation.seed_sigma: must be > 0, got -1.0"
    assert "export.cut_sigma" not in format_tune({**result, "refused": [(-1.0, invalid)]}, "OUT")


# ---- the sparse scan writer ----------------------------------------------------------------------

TILE = 16


def _writer(path, shape, resume=None):
    from dctstream.sinks import SparseScanWriter

    cfg = SimpleNamespace(format="sparse", dtype="float32", percentiles=(1.0, 99.0))
    mask = np.zeros(shape, bool)
    mask[:3, :5] = True
    return SparseScanWriter(path, cfg, shape, mask, TILE, 100.0, angles=True, resume=resume), mask


def _frame_maps(k, shape):
    """Frame k's cut and noise tile maps: they change from frame to frame."""
    tiles = (-(-shape[0] // TILE), -(-shape[1] // TILE))
    sigma = 0.5 + 0.01 * k + np.linspace(0, 0.5, tiles[0] * tiles[1]).reshape(tiles)
    return (2 * sigma).astype(np.float32), sigma


def _datasets(path):
    with h5py.File(path, "r") as h5:
        return {name: h5["1.1"][name][()] for name in ("row", "col", "intensity", "nnz", "measurement/rot", "cut",
                                                       "noise_sigma")}


def test_sparse_writer_keeps_exactly_the_pixels_at_or_above_the_cut_and_readers_see_whole_frames(tmp_path):
    shape, n = (64, 80), 30
    frames = np.random.default_rng(0).normal(0, 1.5, (n, *shape)).astype(np.float32)
    writer, mask = _writer(tmp_path / "s.h5", shape)
    assert writer.chunk_px == 4096  # several chunks over the scan: each written whole, once
    for k in range(n):
        writer.write(k, frames[k], *_frame_maps(k, shape), 0.5 * k)
        if k == n // 2:  # a reader during the scan: only frames whose pixels and maps are all in
            with SparseScan(tmp_path / "s.h5") as live:
                assert 0 < len(live) <= k and not live.finished and len(live.cut) == len(live)
                for f, rows, cols, values in live.frames():
                    np.testing.assert_array_equal(values, frames[f][rows, cols])
    writer.close()
    kept = 0
    with SparseScan(tmp_path / "s.h5") as scan:
        assert len(scan) == n and scan.finished and scan.tile_px == TILE
        np.testing.assert_array_equal(scan.psi, 0.5 * np.arange(n))
        for k, rows, cols, values in scan.frames():
            cut, sigma = _frame_maps(k, shape)
            np.testing.assert_array_equal(scan.cut[k], cut)
            np.testing.assert_array_equal(scan.noise_sigma[k], sigma)
            want = np.nonzero((frames[k] >= _pixel_maps(cut, TILE, shape)) & ~mask)  # the obvious reference
            np.testing.assert_array_equal(rows, want[0])
            np.testing.assert_array_equal(cols, want[1])
            np.testing.assert_array_equal(values, frames[k][want])
            kept += want[0].size
    assert 0 < kept < n * (~mask).sum()
    assert writer.fill_fraction == pytest.approx(kept / (n * (~mask).sum()))


def test_sparse_writer_keeps_every_pixel_of_frames_past_the_room_it_first_makes(tmp_path):
    """A frame whose pixels are all at or above the cut holds more than the selection's first room (a sixteenth of
    a frame, at least 1,024): the room grows, and each frame, before and after, is kept whole."""
    shape = (64, 80)
    frames = np.random.default_rng(2).normal(0, 1.5, (3, *shape)).astype(np.float32)
    writer, mask = _writer(tmp_path / "s.h5", shape)
    for k in range(3):
        cut, sigma = _frame_maps(k, shape)
        writer.write(k, frames[k], np.full_like(cut, -100.0) if k == 1 else cut, sigma, 0.5 * k)
    writer.close()
    with SparseScan(tmp_path / "s.h5") as scan:
        for k, rows, cols, values in scan.frames():
            cut = scan.cut[k]
            want = np.nonzero((frames[k] >= _pixel_maps(cut, TILE, shape)) & ~mask)
            assert rows.size == (int((~mask).sum()) if k == 1 else want[0].size)
            np.testing.assert_array_equal(rows, want[0])
            np.testing.assert_array_equal(cols, want[1])
            np.testing.assert_array_equal(values, frames[k][want])


def test_sparse_writer_closes_while_another_process_reads_the_scan(tmp_path):
    """A reader following the scan (tune, resegment, a viewer: another process, SWMR) holds the file when the
    run ends: its last step, the attributes, is written all the same (its file lock failed the run before)."""
    shape, n = (32, 40), 6
    frames = np.random.default_rng(1).normal(0, 1.5, (n, *shape)).astype(np.float32)
    writer, _ = _writer(tmp_path / "s.h5", shape)
    for k in range(n):
        writer.write(k, frames[k], *_frame_maps(k, shape), 0.5 * k)
    reader = subprocess.Popen([sys.executable, "-c", "import sys, h5py, hdf5plugin; f = h5py.File(sys.argv[1], 'r', "
                               "swmr=True); print('open', flush=True); sys.stdin.read()", str(tmp_path / "s.h5")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        writer.close()
    finally:
        reader.communicate("", timeout=60)
    with SparseScan(tmp_path / "s.h5") as scan:
        assert scan.finished and len(scan) == n


def test_sparse_writer_flushes_at_a_checkpoints_state_and_every_flush_s(tmp_path, monkeypatch):
    """What another process reads of the file: a checkpoint's ``state()`` flushes what it counts (a resumed
    run copies that much from the file), and between checkpoints the file is flushed every FLUSH_S seconds,
    not at every chunk of pixels."""
    import subprocess
    import sys

    from dctstream.sinks import corrected

    def seen():  # frames counted and pixels in the file, read by another process as a follower would
        code = ("import sys, h5py, hdf5plugin\n"
                "with h5py.File(sys.argv[1], 'r', swmr=True) as f:\n"
                "    print(f['1.1/nnz'].shape[0], f['1.1/row'].shape[0])")
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return tuple(int(v) for v in done.stdout.split())

    monkeypatch.setattr(corrected, "FLUSH_S", 3600.0)
    shape, n = (64, 80), 30
    path = tmp_path / "s.h5"
    frames = np.random.default_rng(1).normal(0, 1.5, (2 * n, *shape)).astype(np.float32)
    writer, _ = _writer(path, shape)
    for k in range(n):
        writer.write(k, frames[k], *_frame_maps(k, shape), 0.5 * k)
    assert writer.file_px >= 2 * writer.chunk_px and seen() == (0, 0)  # chunks written, not flushed
    state = writer.state()
    assert state["file_px"] == writer.file_px and seen() == (state["file_frames"], state["file_px"])
    monkeypatch.setattr(corrected, "FLUSH_S", 0.0)  # due at every chunk
    for k in range(n, 2 * n):
        writer.write(k, frames[k], *_frame_maps(k, shape), 0.5 * k)
    assert writer.file_px > state["file_px"] and seen() == (writer.file_frames, writer.file_px)
    writer.close()
    assert seen() == (2 * n, writer.pixels)


@pytest.mark.parametrize("at", [0, 9, 17])
def test_sparse_writer_resumed_from_its_state_writes_the_same_datasets(tmp_path, at):
    shape, n = (64, 80), 30
    frames = np.random.default_rng(at).normal(0, 1.5, (n, *shape)).astype(np.float32)
    whole, _ = _writer(tmp_path / "whole.h5", shape)
    for k in range(n):
        whole.write(k, frames[k], *_frame_maps(k, shape), float(k))
    whole.close()
    killed, _ = _writer(tmp_path / "s.h5", shape)
    for k in range(at + 1):
        killed.write(k, frames[k], *_frame_maps(k, shape), float(k))
    state = killed.state()
    for k in range(at + 1, at + 8):  # written after the checkpoint, then lost with the process
        killed.write(k, frames[k], *_frame_maps(k, shape), float(k))
    killed.h5.close()
    resumed, _ = _writer(tmp_path / "s.h5", shape, resume=state)
    for k in range(at + 1, n):
        resumed.write(k, frames[k], *_frame_maps(k, shape), float(k))
    resumed.close()
    got, want = _datasets(tmp_path / "s.h5"), _datasets(tmp_path / "whole.h5")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert resumed.bytes_per_frame == whole.bytes_per_frame


def test_tune_sweeps_counts_when_the_config_sets_counts(run):
    _, tmp, _ = run
    result = tune(tmp / "run", overrides=("segmentation.seed_threshold=40", "segmentation.grow_low=20"))
    values = [r["value"] for r in result["rows"]]
    assert result["key"] == "seed_threshold" and not result["refused"]
    assert len(values) >= 5 and 40 / 3 - 0.01 <= values[0] < 40 < values[-1] <= 80
    spots = [r["spots"] for r in result["rows"]]
    assert spots[0] > spots[-1] > 0


# ---- the second half of the scan in a second process ----------------------------------------------------


def _difspot_files(folder):
    files = {}
    for path in sorted((folder / "difspots").glob("*.h5")):
        with h5py.File(path, "r") as h5:
            files[path.name] = ({name: h5[name][()] for name in h5}, dict(h5.attrs))
    return files


def _closing_frames(run_dir, settings) -> list[int]:
    """The frames whose push closed a blob, in one process."""
    from dctstream.resegment import open_scan, resolve, run_config, segment_scan

    cfg = run_config(run_dir, settings)
    pushed, closed = [-1], []
    with open_scan(run_dir) as scan:
        segment_scan(scan, [(cfg, resolve(cfg, scan))], lambda _, blobs: closed.extend([pushed[0] + 1] * len(blobs)),
                     lambda k, _: pushed.__setitem__(0, k), rows=False)
    return closed


@pytest.mark.parametrize("settings", [("quicklook.enabled=true",), ("segmentation.min_blob_size=[3,3,2]",)])
def test_a_resegmentation_in_two_processes_equals_one_in_one(run, tmp_path, monkeypatch, caplog, settings):
    _, tmp, _ = run
    one = resegment(tmp / "run", settings, tmp_path / "one")
    # the second half from a frame that closes blobs: those are the second process's
    start = next(k for k in _closing_frames(tmp / "run", settings) if k >= 50)
    monkeypatch.setattr("dctstream.resegment._second_half", lambda scan, cfg: start)
    with caplog.at_level(logging.INFO, "dctstream.resegment"):
        two = resegment(tmp / "run", settings, tmp_path / "two")
    assert [r.getMessage() for r in caplog.records if "second process" in r.getMessage()] == \
        [f"resegment: frames {start} to 99 segmented in a second process"]
    for key in ("difspots", "rejected", "flood_frames", "quicklook"):
        assert two[key] == one[key], key
    assert one["difspots"] > 10 and (one["rejected"] or one["quicklook"])
    got, want = (read_spot_table(tmp_path / name / "spots.h5") for name in ("two", "one"))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    files, want_files = _difspot_files(tmp_path / "two"), _difspot_files(tmp_path / "one")
    assert files.keys() == want_files.keys()
    for name, (data, attrs) in want_files.items():
        assert files[name][1] == attrs and files[name][0].keys() == data.keys()
        for key in data:
            np.testing.assert_array_equal(files[name][0][key], data[key], err_msg=f"{name}: {key}")
    for picture in one["quicklook"]:
        assert (tmp_path / "two" / picture).read_bytes() == (tmp_path / "one" / picture).read_bytes()


def test_a_second_process_whose_state_never_agrees_leaves_the_scan_to_the_first(run, tmp_path, monkeypatch,
                                                                                 caplog):
    _, tmp, _ = run
    one = resegment(tmp / "run", (), tmp_path / "one")
    monkeypatch.setattr("dctstream.resegment.SPLIT_MIN_PIXELS", 0)
    monkeypatch.setattr("dctstream.resegment._cpus", lambda: 2)
    monkeypatch.setattr("dctstream.resegment.fingerprint", lambda seg, offset: "never the other process's")
    with caplog.at_level(logging.INFO, "dctstream.resegment"):
        two = resegment(tmp / "run", (), tmp_path / "two")
    assert not any("second process" in r.getMessage() for r in caplog.records)
    assert (two["difspots"], two["rejected"]) == (one["difspots"], one["rejected"])
    got, want = (read_spot_table(tmp_path / name / "spots.h5") for name in ("two", "one"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_an_error_in_the_second_process_is_raised_in_the_first(run, tmp_path):
    from dctstream.errors import InputError, OutputError
    from dctstream.resegment import _HalfProcess, run_config

    _, tmp, _ = run
    missing = tmp_path / "corrected.h5"
    seg = run_config(tmp / "run").segmentation
    with SparseScan(tmp / "run" / "corrected.h5") as scan:
        params = resolve_segmentation(seg, scan.noise_sigma[0], scan.tile_px)
    second = _HalfProcess((str(missing), seg, params, 10, 20, 60, [20]))
    with pytest.raises(InputError, match=str(missing)):
        second.edges()
    second.close()
    second = _HalfProcess((str(tmp / "run" / "corrected.h5"), seg, params, 10, 20, 60, [50]))
    second.close()  # killed before it answered
    with pytest.raises(OutputError, match="frames 10 on ended with exit status"):
        second.edges()


def test_a_followed_beam_and_unusable_frames_resegment_with_the_runs_touches_mask(tmp_path):
    """A beam that moves along the scan (its box followed, frame by frame) and a frame through a spot that reads
    0 (unusable): the spots beside either are flagged touches_mask by the run, and by its resegmentation, which
    reads the beam's boxes and the unusable frames from the run record (it took the first box only, and no
    frame)."""
    from dctstream.record import read_record
    from dctstream.runner import process_scan
    from simulators.hard_scans import HardScanModel, write_hard_scan

    path = tmp_path / "scan.h5"
    write_hard_scan("moving_beam", path, model=HardScanModel(frames=160, size=64, spots=30, seed=5,
                                                             beam_motion=(0.2, 0.0, 0.3, 0.1)))

    def run(out):
        process_scan(load_config(None, [f"source.url={path}::/1.1/measurement/marana", "source.angles=auto",
                                        "dark.url=auto", f"output.dir={out}", "background.window=11",
                                        "segmentation.max_blob_size=[20,20,5]", "quicklook.enabled=false"]),
                     display=False)
        return read_spot_table(out / "spots.h5")

    clean = run(tmp_path / "clean")
    inside = np.flatnonzero((clean["touches_mask"] == 0) & (clean["end_frame"] - clean["start_frame"] >= 2))
    lost = int(clean["max_frame"][inside[np.argmax(clean["integral"][inside])]])
    with h5py.File(path, "r+") as f:
        frames = f["/1.1/measurement/marana"]
        frames[lost] = np.zeros(frames.shape[1:], frames.dtype)  # a frame cut short, through that spot
    want = run(tmp_path / "run")
    stats = read_record(tmp_path / "run")["stats"]
    assert len(stats["direct_beam_track"]) > 4 and stats["normalise"]["unusable"] == [[lost, lost]]
    resegment(tmp_path / "run", (), tmp_path / "re")
    _same_table(read_spot_table(tmp_path / "re" / "spots.h5"), want)
    beside = (want["start_frame"] <= lost + 1) & (want["end_frame"] >= lost - 1)
    assert beside.any() and want["touches_mask"][beside].all()


def test_tune_and_resegment_misuse_is_one_line_before_any_sweep(run, tmp_path, capsys):
    _, tmp, _ = run
    stack = ["no group /1.1 with nnz and noise_sigma", "expected a sparse corrected scan", "got stack"]
    cases = [
        (["tune", tmp / "stack"], InputError.exit_code, stack),  # a KeyError traceback before
        (["resegment", tmp / "stack", "--out", tmp_path / "re"], InputError.exit_code, stack),
        (["tune", tmp / "run", "--png", tmp_path / "sweep.pdf"], OutputError.exit_code,
         ["--png", "sweep.pdf", "expected a .png file in an existing folder"]),  # PIL's traceback after the sweep
        (["tune", tmp / "run", "--png", tmp_path], OutputError.exit_code, ["--png", "expected a .png file"]),
        # the scan file given for the run's folder: said so (it said "--png: FILE/tune.png: expected a .png file")
        (["tune", _a_file(tmp_path)], InputError.exit_code,
         ["scan.h5: not a folder", "output folder of a dctstream run"]),
        (["tune", tmp / "run", "--key", "seed_sigmaa"], ConfigError.exit_code,
         ["--key: segmentation.seed_sigmaa: no such setting, expected one of", "seed_sigma"]),
        (["tune", tmp / "run", "--key", "drop_zingers", "--values", "0,1"], ConfigError.exit_code,
         ["segmentation.drop_zingers: every value swept was refused", "must be true or false"]),
        # a list that starts negative is the list (argparse took it for an option: 'expected one argument')
        (["tune", tmp / "run", "--key", "grow_ratio", "--values", "-1,-0.5"], ConfigError.exit_code,
         ["segmentation.grow_ratio: every value swept was refused"]),
    ]
    for args, code, needles in cases:
        got = main([str(a) for a in args])
        captured = capsys.readouterr()
        assert_one_line_error(got, captured.out, captured.err, code, needles)
    assert not (tmp_path / "re").exists()


def _a_file(folder):
    path = folder / "scan.h5"
    path.write_bytes(b"")
    return path


def test_tune_sweeps_whole_number_settings(run):
    """--values are read as numbers: a whole-number setting takes them as integers (refused as 2.0 before)."""
    _, tmp, _ = run
    result = tune(tmp / "run", "seed_min_voxels", [2.0, 3.0, 4.0])
    assert [r["value"] for r in result["rows"]] == [2, 3, 4] and not result["refused"]
    assert result["rows"][0]["spots"] >= result["rows"][-1]["spots"] > 0


class _Scan(SimpleNamespace):
    def __len__(self):
        return len(self.cut)


def test_the_runs_own_settings_are_checked_against_each_frames_own_thresholds():
    """A tile at a third of its neighbour's noise (the detector's edge beside the glow), 1.4 % lower from frame 30
    on (the `zingers` validation scan): each frame's cut, set from that frame's noise alone as the run sets it,
    lies above the seed threshold of the edge's tile 25 frames on, which other settings are checked against (a
    region's peak may lie there); the run's own settings are checked as the run set the cut, and pass (they were
    refused: "needs 13.02 counts ... below the cut of 13.1")."""
    cfg = load_config()
    sigma = np.full((60, 4, 8), 6.55)
    sigma[:, :, 7] = 2.2
    sigma[30:, :, 7] = 2.17
    cut = np.stack([sparse_cut(cfg.export, cfg.segmentation, s, 32) for s in sigma])
    scan = _Scan(cut=cut, noise_sigma=sigma, mask=np.zeros((128, 256), bool), tile_px=32, photon_gain=None,
                 path="corrected.h5")
    params = resolve_segmentation(cfg.segmentation, sigma[0], 32)
    check_cut(cfg, params, scan, own=True)  # no ConfigError
    # the edge's seed threshold counts within 2 x max_blob_size (160 px, 5 tiles: a touching spot's component box)
    with pytest.raises(ConfigError, match=r"seed_sigma: needs corrected values down to 13\.02 counts .* at frame "
                                          r"5, pixels y 0\.\.31, x 64\.\.95, below the sparse scan's cut of 13\.1"):
        check_cut(cfg, params, scan)
