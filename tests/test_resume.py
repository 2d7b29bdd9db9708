"""Crash-resume: a run killed anywhere (SIGKILL included) and started again ends with the outputs of a run
never interrupted; a full disk stops a run cleanly and it resumes once there is space; readers of the spot
table always see a consistent table."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
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
from dctstream.config import SourceConfig
from dctstream.errors import OutputError
from dctstream.segment import Segmenter
from dctstream.sinks import spot_table
from dctstream.sources.stream import Stream1Source
from simulators.dct_scan import simulate_scan
from test_background import make_scan
from test_segment import params, segment, spotty_volume

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


def _stage(raw, dark, cfg, first=0, **kw):
    return BackgroundStage(cfg, frame_shape=raw.shape[1:], dtype=raw.dtype, dark=dark, direct_beam=(4, 3, 8, 6),
                           filter_size=3, first_frame=first, **kw)


@pytest.mark.parametrize("mode, stride", [("exact", 1), ("block", 4)])
@pytest.mark.parametrize("normalise", ["none", "margin"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("needed", [2, 13, 30])
def test_background_started_later_gives_the_same_frames(mode, stride, normalise, batch, needed):
    raw, dark = make_scan(np.random.default_rng(needed), 40)
    cfg = types.SimpleNamespace(window=9, mode=mode, stride=stride, normalise=normalise, margin_px=2,
                                batch_frames=batch)
    whole = _stage(raw, dark, cfg)
    expected = dict(pair for frame in raw for pair in whole.push(frame))
    expected.update(whole.finish())

    first = whole.first_raw_frame(needed)
    assert first <= needed
    later = _stage(raw, dark, cfg, first, margin_ref=whole.margin_ref)
    later.emitted = needed
    got = dict(pair for frame in raw[first:] for pair in later.push(frame))
    got.update(later.finish())
    assert sorted(got) == list(range(needed, 40))
    for k, frame in got.items():
        np.testing.assert_array_equal(frame, expected[k], err_msg=f"frame {k}")


# -- whole runs, killed and resumed -------------------------------------------------------------------

FRAMES, SIZE = 64, 64
OVERRIDES = ("background.window=11", "segmentation.max_blob_size=[20,20,5]", "output.checkpoint_every_frames=6")


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
    return {"table": table, "attrs": attrs, "difspots": difspots}


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got["table"].keys() == want["table"].keys()
    for column in want["table"]:
        np.testing.assert_array_equal(got["table"][column], want["table"][column], err_msg=column)
    assert {k: str(v) for k, v in got["attrs"].items()} == {k: str(v) for k, v in want["attrs"].items()}
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
        resumed = _run(_args(scan, out))
        return point, killed, resumed, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        trials = list(pool.map(trial, enumerate(points)))
    resumed_from = []
    for point, killed, resumed, out in trials:
        assert killed.returncode == -9, f"{point}: {killed.stderr}"
        assert resumed.returncode == 0, f"{point}: {resumed.stderr}"
        resumed_from.append("resuming" in resumed.stderr)
        assert_same_outputs(outputs(out), reference)
    # most kills came after the first checkpoint: those resumed from it rather than started again
    assert sum(resumed_from) >= 6, list(zip(points, resumed_from))


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
        assert _run(_args(scan, out, extra), crash_at=point).returncode == -9, point
    assert _run(_args(scan, out, extra)).returncode == 0
    assert_same_outputs(outputs(out), outputs(want))


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


def test_a_run_exporting_corrected_frames_is_not_resumed(scan, tmp_path):
    out = tmp_path / "out"
    extra = ("export.format=sparse",)
    assert _run(_args(scan, out, extra), crash_at=f"frame:{FRAMES - 10}").returncode == -9
    again = _run(_args(scan, out, extra))
    assert_one_line_error(again.returncode, again.stdout, again.stderr, OutputError.exit_code,
                          ["export.format: sparse", "--overwrite"])
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
        np.testing.assert_array_equal(ids, np.arange(n))
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
        str(out), "holds an unfinished run of another configuration", "seed_sigma: 6.0", "seed_sigma: 7.0",
        "expected the same command to resume it", "--overwrite"])
    assert sorted(p.name for p in (out / "difspots").iterdir()) == before
    assert main([*_args(scan, out, ("segmentation.seed_sigma=7",)), "--overwrite"]) == 0
    assert not (out / ".dctstream").exists()


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
    limited = _run(_args(scan, out), preexec_fn=lambda: __import__("resource").setrlimit(
        __import__("resource").RLIMIT_FSIZE, (16 * 1024, 16 * 1024)))
    assert_one_line_error(limited.returncode, limited.stdout, limited.stderr, 1,
                          [str(out), "cannot write output, File too large", "run the same command again"])
    assert not [p for p in out.rglob(".*.tmp")]
    for path in out.rglob("*.h5"):
        with h5py.File(path, "r"):
            pass
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


def test_a_stream_cannot_be_read_again_to_resume():
    context = zmq.Context()
    try:
        with Stream1Source(SourceConfig(url="inproc://resume"), context=context) as source:
            with pytest.raises(OutputError, match="a stream cannot be read again to resume the unfinished run"):
                next(checkpoint.frames_from(source, 10))
    finally:
        context.term()
