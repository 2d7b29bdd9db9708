"""Crash-resume: a run killed anywhere (SIGKILL included) and started again ends with the outputs of a run
never interrupted; a full disk stops a run cleanly and it resumes once there is space; readers of the spot
table always see a consistent table."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

import pytest
import zmq

from cli_util import SUBPROCESS_TIMEOUT_S, assert_one_line_error
from dctstream import checkpoint
from dctstream.background import BackgroundStage
from dctstream.cli import main
from dctstream.errors import OutputError
from dctstream.segment import Segmenter
from dctstream.sinks import spot_table
from dctstream.types import Frame
from simulators.dct_scan import simulate_scan
from simulators.replay_stream import StreamReplayer
from test_background import make_scan
from test_segment import FLOOD_PARAMS, flooded_volume, params, segment, spotty_volume

# -- the stages take back their state exactly -------------------------------------------------------


@pytest.mark.parametrize("at", [0, 7, 23, 41, 58])
def test_segmenter_restored_from_its_state_continues_identically(at):
    volume = spotty_volume(np.random.default_rng(1), (60, 32, 36), 40)
    p = params()
    expected, _, _ = segment(volume, p)

    first = Segmenter(p, volume.shape[1:])
    blobs = [b for k in range(at + 1) for b in first.push(k, volume[k])]
    state = first.state()
    again = Segmenter(p, volume.shape[1:])
    again.restore(state)
    for k in range(again.first_needed, at + 1):
        again.load_frame(k, volume[k])
    blobs += [b for k in range(at + 1, len(volume)) for b in again.push(k, volume[k])] + again.finish()
    assert len(blobs) == len(expected) > 5
    for got, want in zip(blobs, expected):
        assert got.id == want.id and got.voxel_key() == want.voxel_key() and got.max_value == want.max_value
        np.testing.assert_array_equal(got.volume, want.volume)


@pytest.mark.parametrize("at", [10, 16, 24, 30, 38])
def test_a_flooded_segmenter_restored_from_its_state_continues_identically(at):
    """In a noise flood (test_segment's), before, in and after it: the same blobs, rejections and flooded count."""
    volume, _ = flooded_volume()
    expected = Segmenter(FLOOD_PARAMS, volume.shape[1:])
    want = [b for k, frame in enumerate(volume) for b in expected.push(k, frame)] + expected.finish()
    first = Segmenter(FLOOD_PARAMS, volume.shape[1:])
    blobs = [b for k in range(at + 1) for b in first.push(k, volume[k])]
    again = Segmenter(FLOOD_PARAMS, volume.shape[1:])
    again.restore(first.state())
    for k in range(again.first_needed, at + 1):
        again.load_frame(k, volume[k])
    blobs += [b for k in range(at + 1, len(volume)) for b in again.push(k, volume[k])] + again.finish()
    assert expected.flooded[0] >= 1  # spots grown in the flood
    assert (again.flooded, again.rejected) == (expected.flooded, expected.rejected)
    assert [(b.voxel_key(), b.max_value) for b in blobs] == [(b.voxel_key(), b.max_value) for b in want]


def test_a_valley_past_its_limit_then_cut_by_a_claim_resumes_identically():
    """A region whose valley passed VALLEY_VOXELS (200,000: a plateau of 6 whole frames joined to it through a thin
    path) waits until a claim cuts that path, then closes by the valley rule; resumed from its state at any frame
    (which does not hold that its valley passed the limit), the same blobs close at the same frames with the same
    ids (a valley never searched again once past the limit closed it later in one run than in the other)."""
    nf, n = 32, 192
    v = np.zeros((nf, n, n), np.float32)
    yy, xx = np.mgrid[:n, :n]

    def spot(f, y, x, peak):
        for g in range(f - 1, f + 2):
            r2 = ((yy - y) ** 2 + (xx - x) ** 2) / 1.5
            v[g] += (peak * np.exp(-0.5 * ((g - f) ** 2 / 0.5 + r2))).astype(np.float32)

    spot(12, 96, 96, 12.0)  # the region
    spot(22, 10, 185, 8.0)  # another, far away and dimmer
    v[5:11] = 3.0  # the plateau, not next to the region ...
    v[5:11, 86:107, 86:107] = 0
    v[12, 96, 99:107] = 3.0  # ... but joined to it through a disc whose spot, brighter, claims the path
    v[12:19, 96, 106] = 3.0
    v[18, 96, 106:109] = 3.0
    v[18, 96, 116:121] = 3.0
    v[10:19, 96, 120] = 3.0
    disc = (yy - 96) ** 2 + (xx - 112) ** 2 <= 9
    for g in (17, 18, 19):
        v[g][disc] = 19.0 - 0.01 * np.hypot(yy - 96, xx - 112)[disc]
    v[18, 96, 112] = 20.0
    p = params(max_size=(20, 20, 7))

    def run(at=None):
        segmenter, out = Segmenter(p, (n, n)), []
        for k, frame in enumerate(v):
            if at is not None and k == at + 1:
                again = Segmenter(p, (n, n))
                again.restore(segmenter.state())
                for j in range(again.first_needed, at + 1):
                    again.load_frame(j, v[j])
                segmenter = again
            out += [(k, b.id, tuple(int(c) for c in b.max_index)) for b in segmenter.push(k, frame)]
        return out + [(nf, b.id, tuple(int(c) for c in b.max_index)) for b in segmenter.finish()]

    want = run()
    assert len(want) == 3
    for at in (19, 20, 21, 22, 23, 24):
        assert run(at) == want, at


def _stage(raw, dark, cfg, first=0, **kw):
    return BackgroundStage(cfg, frame_shape=raw.shape[1:], dtype=raw.dtype, dark=dark, direct_beam=(4, 3, 8, 6),
                           filter_size=3, first_frame=first, **kw)


@pytest.mark.parametrize("mode, stride", [("exact", 1), ("block", 4)])
@pytest.mark.parametrize("normalise", ["none", "margin", "auto"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("needed", [2, 13, 30])
def test_background_started_later_gives_the_same_frames(mode, stride, normalise, batch, needed):
    raw, dark = make_scan(np.random.default_rng(needed), 40)
    cfg = types.SimpleNamespace(window=9, mode=mode, stride=stride, normalise=normalise, margin_px=2,
                                batch_frames=batch)
    whole = _stage(raw, dark, cfg)
    expected = {k: (f, d) for frame in raw for k, f, d in whole.push(frame)}
    expected.update((k, (f, d)) for k, f, d in whole.finish())

    first = whole.first_raw_frame(needed)
    assert first <= needed
    later = _stage(raw, dark, cfg, first, margin_ref=whole.margin_ref, known_scales=whole.frame_scales[:first + 20],
                   auto_enabled=None if whole.intensity is None else whole.intensity.enabled)
    later.emitted = needed
    got = {k: (f, d) for frame in raw[first:] for k, f, d in later.push(frame)}
    got.update((k, (f, d)) for k, f, d in later.finish())
    assert sorted(got) == list(range(needed, 40))
    for k, pair in got.items():
        np.testing.assert_array_equal(pair, expected[k], err_msg=f"frame {k}")


# -- whole runs, killed and resumed -------------------------------------------------------------------

FRAMES, SIZE = 64, 64
# seed_sigma 4: more than 20 difspots in these 64 frames of 64 x 64 px, to kill the run among
OVERRIDES = ("background.window=11", "segmentation.max_blob_size=[20,20,5]", "output.checkpoint_every_frames=6",
             "segmentation.seed_sigma=4")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("resume") / "scan.h5", frames=FRAMES, size=SIZE, spots=30, seed=3)


def _args(scan, out, extra=()):
    return ["run", "--source", scan.frames_url, "--set", f"source.angles={scan.angles_url}",
            *[a for o in (*OVERRIDES, *extra) for a in ("--set", o)], "--out", str(out)]


def _run(args, crash_at=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DCTSTREAM_CRASH_AT": crash_at or ""}
    return subprocess.run([sys.executable, "-m", "dctstream", *args], capture_output=True, text=True, env=env,
                          timeout=SUBPROCESS_TIMEOUT_S, **kw)


def outputs(out: Path) -> dict:
    """The spot table (columns and attributes, the output folder left out) and every difspot file's datasets
    and attributes; checks on the way that the table and the files agree and nothing else is left."""
    with h5py.File(out / "spots.h5", "r") as f:
        group = f["spots"]
        table = {name: group[name][()] for name in group}
        attrs = {k: v for k, v in group.attrs.items() if k != "config"}
        attrs["config"] = [line for line in group.attrs["config"].splitlines() if not line.strip().startswith("dir:")]
    names = sorted(p.name for p in (out / "difspots").iterdir())
    assert names == [f"{i:06d}.h5" for i in sorted(table["id"])]  # no temporary file, none missing or extra
    assert not (out / ".dctstream").exists()  # the run is complete: no marker, no checkpoint left
    assert not list(out.glob(".*.tmp"))
    difspots = {}
    for name in names:
        with h5py.File(out / "difspots" / name, "r") as f:
            difspots[name] = ({k: f[k][()] for k in f}, dict(f.attrs))
    sparse = {}
    if (out / "corrected.h5").exists():  # the sparse corrected scan: the same datasets and attributes
        with h5py.File(out / "corrected.h5", "r") as f:
            f.visititems(lambda name, item: sparse.update(
                {name: item[()] if isinstance(item, h5py.Dataset) else dict(item.attrs)}))
    return {"table": table, "attrs": attrs, "difspots": difspots, "sparse": sparse}


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got["table"].keys() == want["table"].keys()
    for column in want["table"]:
        np.testing.assert_array_equal(got["table"][column], want["table"][column], err_msg=column)
    assert {k: str(v) for k, v in got["attrs"].items()} == {k: str(v) for k, v in want["attrs"].items()}
    assert got["sparse"].keys() == want["sparse"].keys()
    for name, value in want["sparse"].items():
        if isinstance(value, dict):
            assert {k: str(v) for k, v in got["sparse"][name].items()} == {k: str(v) for k, v in value.items()}, name
        else:
            np.testing.assert_array_equal(got["sparse"][name], value, err_msg=f"corrected.h5/{name}")
    assert got["difspots"].keys() == want["difspots"].keys()
    for name, (datasets, attrs) in want["difspots"].items():
        got_datasets, got_attrs = got["difspots"][name]
        assert got_attrs == attrs, name
        assert got_datasets.keys() == datasets.keys(), name
        for key, value in datasets.items():
            np.testing.assert_array_equal(got_datasets[key], value, err_msg=f"{name}/{key}")


@pytest.fixture(scope="module")
def reference(scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _run(_args(scan, out))
    assert proc.returncode == 0, proc.stderr
    result = outputs(out)
    assert len(result["difspots"]) > 20
    return result


def _crash_points(seed: int, n: int, n_difspots: int) -> list[str]:
    """``n`` kill points, each kind (inside a difspot write, a table write, a checkpoint write, between
    frames) at least twice, at random places."""
    rng = random.Random(seed)
    kinds = ["difspot", "table", "checkpoint", "frame"] * 2 + rng.choices(["difspot", "frame"], k=n - 8)
    limits = {"difspot": n_difspots, "table": 1, "checkpoint": FRAMES // 6 - 1, "frame": FRAMES - 1}
    return [f"{kind}:{rng.randint(1, limits[kind])}" for kind in kinds]


def test_sigkill_at_10_random_points_then_resume_gives_identical_outputs(scan, reference, tmp_path):
    points = _crash_points(6, 10, len(reference["difspots"]))

    def trial(i_point):
        i, point = i_point
        out = tmp_path / f"kill{i}"
        killed = _run(_args(scan, out), crash_at=point)
        had_checkpoint = (out / checkpoint.RUN_DIR / checkpoint.CHECKPOINT).exists()
        resumed = _run(_args(scan, out))
        return point, killed, had_checkpoint, resumed, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        trials = list(pool.map(trial, enumerate(points)))
    resumed_from = []
    for point, killed, had_checkpoint, resumed, out in trials:
        assert killed.returncode == -9, f"{point}: {killed.stderr}"
        assert resumed.returncode == 0, f"{point}: {resumed.stderr}"
        # a kill after a checkpoint resumes from it; one before starts again
        assert ("resuming" in resumed.stderr) == had_checkpoint, point
        resumed_from.append(had_checkpoint)
        assert_same_outputs(outputs(out), reference)
    # the resume path itself was taken, not only fresh starts
    assert sum(resumed_from) >= 3, list(zip(points, resumed_from))


def test_what_was_made_from_a_stopped_runs_results_goes_when_it_resumes(scan, reference, tmp_path, monkeypatch,
                                                                        caplog):
    """An export, a resegmentation and a tune picture made from a stopped run's results are removed when it
    resumes (they held the results so far, and said so); the export made again holds the whole run's."""
    out = tmp_path / "out"
    frames = iter(range(FRAMES))

    def stop_at_frame_50(kind):  # Ctrl-C there
        if kind == "frame" and next(frames) == 50:
            raise KeyboardInterrupt

    monkeypatch.setattr("dctstream.pipeline.crash_point", stop_at_frame_50)
    assert main(_args(scan, out)) != 0
    monkeypatch.undo()
    assert (out / checkpoint.RUN_DIR / checkpoint.CHECKPOINT).exists()
    for args in (["export", str(out)], ["resegment", str(out)], ["tune", str(out)]):
        assert main(args) == 0, args
    made = ("spots.flt", "resegmented", "tune.png")
    assert all((out / name).exists() for name in made)
    assert "partial" in (out / "spots.flt").read_text()
    caplog.set_level("INFO")
    assert main(_args(scan, out)) == 0
    assert "resuming" in caplog.text
    assert [name for name in made if (out / name).exists()] == []
    assert "removed spots.flt, resegmented, tune.png" in caplog.text
    assert_same_outputs(outputs(out), reference)
    assert main(["export", str(out)]) == 0
    text = (out / "spots.flt").read_text()
    assert "partial" not in text
    assert sum(1 for line in text.splitlines() if line and not line.startswith("#")) == len(reference["table"]["id"])


@pytest.mark.parametrize("protocol", ["hdf5", "hdf5-live"])
def test_killed_again_and_again_while_resuming(scan, tmp_path, protocol):
    """Block mode, margin normalisation: killed four times, each time while resuming the previous kill.
    A followed file (hdf5-live) is read again from its start, the frames before the checkpoint's dropped."""
    extra = ("background.mode=block", "background.stride=3", "background.normalise=margin",
             f"source.protocol={protocol}", "source.idle_timeout_s=2")
    want = tmp_path / "want"
    assert _run(_args(scan, want, extra)).returncode == 0
    out = tmp_path / "out"
    for point in ("frame:20", "frame:15", "difspot:3", "frame:5"):  # counted from each start
        killed = _run(_args(scan, out, extra), crash_at=point)
        assert killed.returncode == -9, f"{point}: {killed.stderr}"
    assert _run(_args(scan, out, extra)).returncode == 0
    assert_same_outputs(outputs(out), outputs(want))
    # the record's noise along the scan: each frame once (a checkpoint held the list the run went on adding to)
    series = [json.loads((o / "run.json").read_text())["stats"]["noise_sigma_by_frame"] for o in (out, want)]
    assert series[0] == series[1] and len(series[1]) >= 2


def test_resumed_with_detector_corrections_keeps_the_first_runs_dark_and_mask(scan, tmp_path):
    """The dark estimated from the data and the automatic bad pixels come from the scan's first window:
    a resumed run takes them from the checkpoint instead of estimating them again mid-scan. (Without
    normalisation or a flat the corrected frames hardly depend on the dark, so this mostly checks that
    binning and the masks survive a resume.)"""
    extra = ("dark.estimate=true", "detector.auto_mask=true", "detector.binning=2")
    want = tmp_path / "want"
    assert _run(_args(scan, want, extra)).returncode == 0
    out = tmp_path / "out"
    assert _run(_args(scan, out, extra), crash_at=f"frame:{FRAMES - 10}").returncode == -9
    resumed = _run(_args(scan, out, extra))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_outputs(outputs(out), outputs(want))


def test_a_beam_followed_along_the_scan_resumes_exactly(tmp_path):
    """direct_beam.bbox: auto follows a beam that moves with psi: killed where it has moved, twice, the run
    resumes with the boxes it had and ends with the outputs (touches_mask included) of a run never killed."""
    from simulators.hard_scans import HardScanModel, write_hard_scan

    model = HardScanModel(frames=FRAMES, size=SIZE, spots=30, seed=3, beam_motion=(0.2, 0.05, 0.2, 0.1))
    moving = write_hard_scan("moving_beam", tmp_path / "scan.h5", model=model)
    want = tmp_path / "want"
    done = _run(_args(moving, want))
    assert done.returncode == 0, done.stderr
    track = json.loads((want / "run.json").read_text())["stats"]["direct_beam_track"]
    assert len(track) >= 3  # it moved
    out = tmp_path / "out"
    for point in ("checkpoint:6", "checkpoint:3"):  # in a checkpoint's write, counted from each start
        assert _run(_args(moving, out), crash_at=point).returncode == -9
    resumed = _run(_args(moving, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert json.loads((out / "run.json").read_text())["stats"]["direct_beam_track"] == track
    assert_same_outputs(outputs(out), outputs(want))


def test_a_run_exporting_a_stack_of_corrected_frames_is_not_resumed(scan, tmp_path):
    out = tmp_path / "out"
    extra = ("export.format=stack",)
    assert _run(_args(scan, out, extra), crash_at=f"frame:{FRAMES - 10}").returncode == -9
    again = _run(_args(scan, out, extra))
    assert_one_line_error(again.returncode, again.stdout, again.stderr, OutputError.exit_code,
                          ["export.format: stack", "--overwrite"])
    assert _run(_args(scan, out, extra) + ["--overwrite"]).returncode == 0


def test_readers_see_a_consistent_table_during_the_scan(scan, tmp_path, monkeypatch):
    """Another process reads spots.h5 again and again while the run rewrites it: each read is whole."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dctstream", *_args(scan, out)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    reads = []
    while proc.poll() is None:
        try:
            f = h5py.File(out / "spots.h5", "r")
        except FileNotFoundError:  # not yet written
            continue
        with f:
            group = f["spots"]
            lengths = {group[name].shape[0] for name in group}
            n = int(group.attrs["n_spots"])
            ids = group["id"][()]
        assert lengths == {n}
        # ids in order, each once (a spot across 0/360 degrees, or a tail of one, joined at the end leaves a gap)
        assert ids.size == n and np.all(np.diff(ids) > 0)
        for spot_id in ids:  # every difspot the table lists is on disk, whole
            with h5py.File(out / "difspots" / f"{spot_id:06d}.h5", "r") as spot:
                assert spot["difspotID"][()] == spot_id
        reads.append(n)
    assert proc.wait() == 0, proc.stderr.read()
    assert len(reads) >= 3 and reads == sorted(reads) and reads[-1] > 0


def test_unfinished_run_of_another_configuration_is_refused(scan, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(_args(scan, out), crash_at="frame:40").returncode == -9
    before = sorted(p.name for p in (out / "difspots").iterdir())
    rc = main(_args(scan, out, ("segmentation.seed_sigma=7",)))
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, 1, [
        str(out), "holds an unfinished run of another configuration (segmentation.seed_sigma: was 4.0, now 7.0)",
        "expected the same command to resume it", "--overwrite"])
    assert sorted(p.name for p in (out / "difspots").iterdir()) == before
    assert main([*_args(scan, out, ("segmentation.seed_sigma=7",)), "--overwrite"]) == 0
    assert not (out / ".dctstream").exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_only_the_same_scan(scan, reference, tmp_path, capsys):
    """A run killed before its first checkpoint starts again from frame 0 when resumed. The same command on
    another scan at the same path (the file replaced) took that for a resume and replaced the first run's
    results with the other scan's, unsaid: it is refused, the results left as they were."""
    import shutil

    path = tmp_path / "scan.h5"
    shutil.copy(scan.path, path)
    args = _args(types.SimpleNamespace(frames_url=f"{path}::/1.1/measurement/marana",
                                       angles_url=f"{path}::/1.1/measurement/diffrz"), tmp_path / "out",
                 ("output.checkpoint_every_frames=100000", "output.checkpoint_every_s=100000"))
    assert _run(args, crash_at="frame:40").returncode == -9
    out = tmp_path / "out"
    assert not (out / ".dctstream" / checkpoint.CHECKPOINT).exists()
    before = sorted(p.name for p in (out / "difspots").iterdir())
    assert before
    other = simulate_scan(tmp_path / "other.h5", frames=FRAMES, size=SIZE, spots=30, seed=4)
    shutil.copy(other.path, path)
    rc = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, 1, [
        f"{path}::/1.1/measurement/marana", "frame 0 is not that of the scan the unfinished run", "--overwrite"])
    assert sorted(p.name for p in (out / "difspots").iterdir()) == before
    shutil.copy(scan.path, path)  # the first scan back: resumed, from its first frame, as a whole run
    assert main(args) == 0
    got = outputs(out)
    np.testing.assert_array_equal(got["table"]["centroid_x"], reference["table"]["centroid_x"])


# -- faults of the world: the output disk fills up -------------------------------------------------------


def test_disk_full_stops_cleanly_and_resumes_once_there_is_space(scan, reference, tmp_path, monkeypatch, capsys):
    """No space left at the 25th file renamed into place: one line, nothing written is damaged; the same
    command, once there is space, ends with the outputs of a run never interrupted."""
    out = tmp_path / "out"
    replace = os.replace
    calls = []

    def full_disk(src, dst):
        calls.append(dst)
        if len(calls) >= 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(spot_table.os, "replace", full_disk)
    rc = main(_args(scan, out))
    captured = capsys.readouterr()
    line = assert_one_line_error(rc, captured.out, captured.err, 1, [
        "cannot write output, No space left on device", "free some space", "run the same command again"])
    assert str(out) in line
    # what is there is whole: each difspot file is complete, the table (if it was written before the disk
    # filled up) lists only difspots on disk, and no temporary file is left
    written = sorted(int(p.stem) for p in (out / "difspots").glob("*.h5"))
    assert written == list(range(len(written))) and len(written) >= 10
    for spot_id in written:
        with h5py.File(out / "difspots" / f"{spot_id:06d}.h5", "r") as f:
            assert f["difspotID"][()] == spot_id
    if (out / "spots.h5").exists():
        with h5py.File(out / "spots.h5", "r") as f:
            assert set(f["spots/id"][()]) <= set(written)
    assert not [p for p in out.rglob(".*.tmp")]
    monkeypatch.setattr(spot_table.os, "replace", replace)  # space is back
    assert main(_args(scan, out)) == 0
    assert_same_outputs(outputs(out), reference)


def test_file_size_limit_in_a_subprocess(scan, reference, tmp_path):
    """``ulimit -f``: the kernel refuses to grow a file (EFBIG) as a full quota would; then resumed."""
    out = tmp_path / "out"
    # without the sparse scan: HDF5 cannot close a file whose writes failed (its handles report the failure
    # again as the process ends, then it crashes), so this tests the difspot files and the table
    limited = _run(_args(scan, out, ("export.format=none",)), preexec_fn=lambda: __import__("resource").setrlimit(
        __import__("resource").RLIMIT_FSIZE, (16 * 1024, 16 * 1024)))
    assert_one_line_error(limited.returncode, limited.stdout, limited.stderr, 1,
                          [str(out), "cannot write output, File too large", "run the same command again"])
    assert not [p for p in out.rglob(".*.tmp")]
    for path in out.rglob("*.h5"):
        with h5py.File(path, "r"):
            pass
    resumed = _run(_args(scan, out, ("export.format=none",)))
    assert resumed.returncode == 0, resumed.stderr
    got = outputs(out)
    assert not got["sparse"]
    assert_same_outputs({**got, "sparse": reference["sparse"], "attrs": reference["attrs"]}, reference)


def test_file_size_limit_with_the_sparse_scan_in_a_subprocess(scan, reference, tmp_path):
    """``ulimit -f`` with the sparse scan (the default export): HDF5 cannot close a file whose writes failed,
    and crashed as the process ended (tracebacks from h5py after the error line, then a segmentation fault,
    exit code -11); the process now ends with the one line and exit code 1, and the same command resumes."""
    out = tmp_path / "out"
    limited = _run(_args(scan, out), preexec_fn=lambda: __import__("resource").setrlimit(
        __import__("resource").RLIMIT_FSIZE, (96 * 1024, 96 * 1024)))
    assert "Exception ignored" not in limited.stderr, limited.stderr
    assert_one_line_error(limited.returncode, limited.stdout, limited.stderr, 1,
                          [str(out), "cannot write output, File too large", "run the same command again"])
    resumed = _run(_args(scan, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(outputs(out), reference)


def test_file_size_limit_in_a_script_of_the_python_api(scan, reference, tmp_path):
    """The same from a script of the Python API that catches the OutputError and goes on: the process crashed as
    the script ended (h5py tracebacks, a segmentation fault, on the sparse scan HDF5 could not close); the
    file's descriptor now leads to the null device, so that HDF5 closes it there, and the file on disk is as
    the failure left it: the same command resumes it."""
    out = tmp_path / "out"
    overrides = dict(o.split("=", 1) for o in OVERRIDES)
    script = (f"import dctstream\ntry:\n    dctstream.run({scan.frames_url!r}, out={str(out)!r}, "
              f"overrides={[f'{k}={v}' for k, v in overrides.items()] + [f'source.angles={scan.angles_url}']!r})\n"
              "except dctstream.OutputError as exc:\n    print('caught:', exc)\nprint('the script goes on')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          preexec_fn=lambda: __import__("resource").setrlimit(
                              __import__("resource").RLIMIT_FSIZE, (96 * 1024, 96 * 1024)))
    assert done.returncode == 0, done.stderr
    assert "caught:" in done.stdout and "cannot write output, File too large" in done.stdout
    assert done.stdout.rstrip().endswith("the script goes on")
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    resumed = _run(_args(scan, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(outputs(out), reference)


def test_output_not_writable_stops_at_once(scan, tmp_path, monkeypatch, capsys):
    """A read-only output (as root, chmod cannot make one: the error is injected where h5py creates files)."""
    out = tmp_path / "out"
    real = h5py.File

    def read_only(name, mode="r", **kw):
        if mode == "w" and str(name).endswith(".tmp") and "difspots" in str(name):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(name, mode, **kw)

    monkeypatch.setattr(spot_table.h5py, "File", read_only)
    rc = main(_args(scan, out))
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, 1,
                          [f"{out}/difspots/000000.h5: cannot write output, Read-only file system"])
    assert list((out / "difspots").iterdir()) == []
    with h5py.File(out / "spots.h5", "r") as f:
        assert f["spots/id"].shape == (0,)


# -- a detector stream: its frames kept in the spool, the live stream continued after them ------------------

STREAM_FRAMES = 80
STREAM_OVERRIDES = (*OVERRIDES, "source.idle_timeout_s=10")


@pytest.fixture(scope="module")
def stream_scan(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("stream") / "scan.h5", frames=STREAM_FRAMES, size=SIZE, spots=40,
                         seed=5)


def _free_endpoint() -> str:
    """A TCP address free now: the senders before and after the kill bind the same one (the same command)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _stream_args(scan, protocol, endpoint, out, extra=()):
    angles = (f"source.angles={scan.angles_url}",) if protocol == "stream1" else ()  # Stream2: the goniometer
    return ["run", "--source", endpoint, *[a for o in (f"source.protocol={protocol}", *angles, *STREAM_OVERRIDES,
                                                         *extra) for a in ("--set", o)], "--out", str(out)]


def _sender(scan, protocol, endpoint, **kw) -> StreamReplayer:
    angles = scan.angles_url if protocol == "stream2" else None
    for _ in range(100):  # ZeroMQ lets the previous sender's port go in its own thread, a little later
        try:
            return StreamReplayer(scan.frames_url, protocol=protocol, bind=endpoint, fps=0, angles_url=angles,
                                  **kw).start()
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            time.sleep(0.05)
    raise AssertionError(f"{endpoint} stays in use")


def _stream_run(scan, protocol, endpoint, out, extra=(), crash_at=None, **sender_kw):
    """Run dctstream on the stream of a sender playing the scan (from ``start_at``, when given)."""
    sender = _sender(scan, protocol, endpoint, **sender_kw)
    try:
        return _run(_stream_args(scan, protocol, endpoint, out, extra), crash_at=crash_at)
    finally:
        sender.close()


def _spooled(out: Path) -> list[int]:
    return sorted(int(p.stem) for p in (out / ".dctstream" / "spool").glob("*.frame"))


def stream_outputs(out: Path) -> dict:
    """``outputs`` without the stream's address (each test binds its own)."""
    result = outputs(out)
    del result["attrs"]["source"]
    result["attrs"]["config"] = [line for line in result["attrs"]["config"] if "url:" not in line]
    return result


@pytest.fixture(scope="module")
def stream_reference(stream_scan, tmp_path_factory):
    """The outputs of an uninterrupted run over each protocol's stream, computed once (in a thread, beside the
    run a test kills)."""
    done, lock = {}, threading.Lock()

    def reference(protocol):
        with lock:
            if protocol not in done:
                out = tmp_path_factory.mktemp("stream_reference") / "out"
                proc = _stream_run(stream_scan, protocol, _free_endpoint(), out)
                assert proc.returncode == 0, proc.stderr
                done[protocol] = stream_outputs(out)
                assert len(done[protocol]["difspots"]) > 20
            return done[protocol]
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield lambda protocol: pool.submit(reference, protocol)


# Frames sent to a run that is to be killed mid-scan: the kill comes at a checkpoint or frame before them,
# however far the writer thread (which saves the checkpoints) is behind the frames read.
SENT_BEFORE_KILL = 50


def _killed(scan, protocol, out, crash_at, extra=(), last_frame=False) -> tuple[str, int]:
    """A run killed mid-scan (or once every frame arrived); its stream's address and the last frame it spooled."""
    endpoint = _free_endpoint()
    faults = {} if last_frame else {"stop_after": SENT_BEFORE_KILL - 1}
    killed = _stream_run(scan, protocol, endpoint, out, extra, crash_at=crash_at, faults=faults)
    assert killed.returncode == -9, killed.stderr
    spooled = _spooled(out)
    assert spooled == list(range(spooled[0], spooled[-1] + 1)), spooled
    assert (spooled[-1] == STREAM_FRAMES - 1) == last_frame, spooled
    assert (out / ".dctstream" / "spool" / "end.json").exists() == last_frame
    return endpoint, spooled[-1]


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_stream_killed_mid_scan_resumes_from_its_spool(stream_scan, stream_reference, tmp_path, protocol):
    """The detector goes on with the series from the frame after the last one spooled, without its header:
    the spooled frames are processed again, psi keeps coming (Stream2: from the spooled goniometer), and the
    outputs are those of a run never interrupted."""
    want = stream_reference(protocol)
    out = tmp_path / "out"
    endpoint, last = _killed(stream_scan, protocol, out, "checkpoint:5")  # killed saving it: the 4th is there
    assert _spooled(out)[0] > 0  # checkpoints pruned the spool
    resumed = _stream_run(stream_scan, protocol, endpoint, out, start_at=last + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and f"the stream continues at frame {last + 1}" in resumed.stderr
    assert "missing" not in resumed.stderr and "arrived without the series' header" not in resumed.stderr
    assert_same_outputs(stream_outputs(out), want.result())


def test_stream_sent_again_from_its_start_after_the_restart(stream_scan, stream_reference, tmp_path):
    """Killed before its first checkpoint, then the detector sends the whole series again, header first:
    the frames already spooled are dropped as they arrive again (one warning), the outputs are the same."""
    want = stream_reference("stream2")
    out = tmp_path / "out"
    endpoint, last = _killed(stream_scan, "stream2", out, "frame:4")
    assert _spooled(out)[0] == 0 and not (out / ".dctstream" / "checkpoint.npz").exists()
    resumed = _stream_run(stream_scan, "stream2", endpoint, out)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("is sent again from its start") == 1
    assert f"frames before {last + 1}, received before the restart, are dropped" in resumed.stderr
    assert "missing" not in resumed.stderr
    assert_same_outputs(stream_outputs(out), want.result())


def test_stream_killed_after_it_ended_resumes_from_the_spool_alone(stream_scan, stream_reference, tmp_path):
    """Killed while finishing, the series' end received: the resumed run does not wait for the detector."""
    want = stream_reference("stream1")
    out = tmp_path / "out"
    endpoint, last = _killed(stream_scan, "stream1", out, f"frame:{STREAM_FRAMES - 3}", last_frame=True)
    resumed = _run(_stream_args(stream_scan, "stream1", endpoint, out))  # no sender: the detector is done
    assert resumed.returncode == 0, resumed.stderr
    assert "the stream had ended (series_end)" in resumed.stderr and "no message in" not in resumed.stderr
    assert_same_outputs(stream_outputs(out), want.result())


def test_frames_sent_while_dctstream_was_down_are_missing(stream_scan, tmp_path):
    """Killed mid-scan; the detector went on meanwhile, so the three frames after the last one spooled never
    arrive: with source.missing: repeat-background the run completes, naming them."""
    out = tmp_path / "out"
    extra = ("source.missing=repeat-background",)
    endpoint, last = _killed(stream_scan, "stream1", out, "frame:40", extra)
    resumed = _stream_run(stream_scan, "stream1", endpoint, out, extra, start_at=last + 4)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"frames {last + 1}..{last + 3} missing (sent while dctstream was not running) "
            f"(frame {last + 4} arrived): replaced by the background") in resumed.stderr
    for k in range(last + 1, last + 4):
        assert f"frame {k}: lost in transit" in resumed.stderr
    result = stream_outputs(out)
    assert len(result["difspots"]) > 20


def test_spool_stays_bounded_and_goes_at_the_end(tmp_path):
    """The spool holds the frames from the last saved checkpoint's first_raw to the newest one read: a bound
    set by the configuration, plus the frames the writer thread is behind (it saves the checkpoints)."""
    from dctstream.config import load_config
    from dctstream.pipeline import FRAME_QUEUE_DEPTH, SEGMENT_QUEUE_DEPTH, Pipeline

    n_frames = 160
    scan = simulate_scan(tmp_path / "scan.h5", frames=n_frames, size=48, spots=60, seed=6)
    out = tmp_path / "out"
    sender = _sender(scan, "stream1", _free_endpoint())
    try:
        cfg = load_config(None, [f"source.url={sender.endpoint}", "source.protocol=stream1", *STREAM_OVERRIDES,
                                 f"output.dir={out}"])
        run = Pipeline(cfg)
        sizes, saves = [], []
        save = run._checkpointer.save

        def save_and_note(meta, arrays, k):  # the checkpoint's frame, what it keeps, how far behind the writer is
            saves.append((k, k - meta["first_raw"], run.stats.frames_segmented - 1 - k))
            save(meta, arrays, k)
        run._checkpointer.save = save_and_note
        stats = run.run(lambda stats: sizes.append(len(run.spool)))
    finally:
        sender.close()
    assert stats.frames_read == n_frames and stats.difspots_written > 20
    window, blob_frames, every = 11, 5, 6  # background.window, max_blob_size in frames, checkpoint_every_frames
    kept = max(keep for _, keep, _ in saves)
    lag = max(behind for _, _, behind in saves)
    # a checkpoint keeps window // 2 + the segmenter's reach (up to 3 x max_blob_size frames) before its frame
    assert kept <= window // 2 + 3 * blob_frames + 1, saves
    # then come the frames up to the next checkpoint, those segmented while the writer saves it, and those
    # read ahead of the segmenter: window // 2 (the background) + the reader's and the segmenter's queues
    # (+ window // 2 once the scan has ended: no checkpoint is taken while the last frames come out)
    bound = kept + every + lag + 2 * (window // 2) + FRAME_QUEUE_DEPTH + SEGMENT_QUEUE_DEPTH + 2
    print(f"spool: at most {max(sizes)} frames (bound {bound}: kept {kept}, writer behind {lag}) over {n_frames}")
    assert max(sizes) <= bound, (sizes, saves)
    assert run.spool.oldest >= saves[-1][0] - kept  # pruned to the last checkpoint
    assert not (out / ".dctstream").exists()


def test_a_spool_missing_a_frame_the_checkpoint_needs(stream_scan, tmp_path):
    out = tmp_path / "out"
    endpoint, _ = _killed(stream_scan, "stream1", out, "checkpoint:3")
    meta, _ = checkpoint.load(out)
    first = meta["first_raw"]
    spool = out / ".dctstream" / "spool"
    (spool / f"{first + 2:09d}.frame").unlink()
    again = _run(_stream_args(stream_scan, "stream1", endpoint, out))
    assert_one_line_error(again.returncode, again.stdout, again.stderr, OutputError.exit_code, [
        f"{spool}/{first + 2:09d}.frame: frame {first + 2} is missing from the spool",
        f"expected every frame from {first} to {meta['spool_until']}", "--overwrite"])


def test_spool_records_are_whole_or_not_read_back(tmp_path, caplog):
    """A record cut short or damaged is never read back as a frame: the frames the checkpoint counts on
    are an error, later ones end the spool there."""
    from dctstream import spool

    rng = np.random.default_rng(0)
    frames = [Frame(k, 0.5 * k if k != 3 else None, rng.poisson(100, (16, 24)).astype(np.uint16) if k != 2 else None)
              for k in range(8)]
    for frame in frames:
        back = spool.decode(spool.encode(frame))
        assert back.index == frame.index and back.psi_deg == frame.psi_deg
        assert (back.data is None) == (frame.data is None)
        if frame.data is not None:
            np.testing.assert_array_equal(back.data, frame.data)
            assert back.data.dtype == frame.data.dtype
    record = spool.encode(frames[5])
    for damaged in (record[:-1], record[: len(record) // 2], b"", record[:40] + bytes([record[40] ^ 1]) + record[41:]):
        assert spool.decode(damaged) is None

    class Source:
        def series_facts(self):
            return {"series": 1}

        def __iter__(self):
            return iter(())

    folder = tmp_path / "spool"
    writer = spool.Spool(folder, resuming=False)
    for frame in frames:
        writer.add(frame, Source())
    assert writer.sync(2) == 7 and len(writer) == 8
    writer.prune(2)
    assert len(writer) == 6
    spool.frame_path(folder, 6).write_bytes(record[:-3])  # cut short while written, yet renamed (power cut)
    (folder / ".000000008.frame.tmp").write_bytes(record[:10])  # the kill came mid-write
    reader = spool.Spool(folder, resuming=True, first=2, needed_until=4)
    assert [f.index for f in reader._read_back()] == [2, 3, 4, 5]
    assert "frames 6..7 of the spool not used (frame 6 is missing or damaged" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == [f"{k:09d}.frame" for k in range(2, 6)] + ["series.json"]
    spool.frame_path(folder, 4).write_bytes(record)  # frame 5's record under frame 4's name
    with pytest.raises(OutputError, match="000000004.frame: frame 4 in the spool is damaged"):
        list(spool.Spool(folder, resuming=True, first=2, needed_until=4)._read_back())
