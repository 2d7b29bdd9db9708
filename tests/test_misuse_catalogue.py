"""The misuse catalogue: what a new user, a beamline at 3 a.m. or a service account does wrong, and what each gets.

Every case is of one class:

* **error**: one ``dctstream: error:`` line naming the thing and what was expected, a non-zero exit, no traceback,
  and the files that were there before (a finished run's folder beside it, or the folder it names) byte-identical;
* **warned**: processed, with a warning in the log, ``status.json`` and ``run.json``;
* **handled**: processed correctly (a lock released, earlier results restored, a partial scan resumed).

Command lines run in-process through ``dctstream.cli.main`` (a traceback would fail the test as an exception);
a subprocess only where a process boundary is the point (another process holding a folder, a signal, a
crash, an environment without a writable cache).  Bad inputs older than this catalogue are in
``test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_util import assert_one_line_error, snapshot
from dctstream import outdir
from dctstream.cli import main
from dctstream.config import SourceConfig, load_config, _CHECKS
from dctstream.daemon import Daemon, Scan, _file_stat, plan
from dctstream.errors import InputError
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_spot_table
from dctstream.sources.hdf5_live import Hdf5WatchSource
from simulators.dct_scan import simulate_scan

TIMEOUT_S = 120
FRAMES = "/1.1/measurement/marana"
# dark.url and source.angles null: the built-in defaults the "good" run has, not the packaged default's auto
TINY = ["--set", "background.window=11", "--set", "segmentation.max_blob_size=[20,20,5]",
        "--set", "quicklook.enabled=false", "--set", "dark.url=null", "--set", "source.angles=null"]
OLD = time.time() - 3600  # an mtime that says "nobody is writing this"


def _env():
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args, cwd, env=None, timeout=TIMEOUT_S, **kw):
    return subprocess.run([sys.executable, "-m", "dctstream", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env or _env(), **kw)


def _main(argv, cwd, monkeypatch, capsys):
    monkeypatch.chdir(cwd)
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tiny_scan, tmp_path_factory):
    """Broken and awkward inputs built from the tiny scan, and a finished run of it (``good``)."""
    root = tmp_path_factory.mktemp("misuse_files")
    with h5py.File(tiny_scan.path, "r") as f:
        frames = f[FRAMES][()]
    (root / "zero.h5").write_bytes(b"")
    (root / "random.h5").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    data = Path(tiny_scan.path).read_bytes()
    (root / "truncated.h5").write_bytes(data[: len(data) // 2])
    with h5py.File(root / "odd.h5", "w") as f:
        big = frames.astype(np.int64) + 10**9  # counts with an offset beyond float32's exact range
        f["offset"] = big
        dset = f.create_dataset("unwritten", shape=frames.shape, dtype=frames.dtype, chunks=(1, 64, 64))
        f.create_dataset("none_written", shape=frames.shape, dtype=frames.dtype, chunks=(1, 64, 64))
        f["frames_last"] = np.moveaxis(frames[:, :, :48], 0, -1)  # (y, x, frames): 64 x 48 x 40
        f["angles_last"] = np.arange(frames.shape[0]) * 1.0
        for k in range(frames.shape[0]):
            if k not in (7, 8, 20):
                dset[k] = frames[k]
        gaps = frames.astype(np.uint32)
        gaps[:, 40, :] = 0xFFFFFFFF  # an Eiger module gap: the detector marks its pixels with all bits set
        f["eiger"] = gaps
        f["radians"] = np.linspace(0, 2 * np.pi, frames.shape[0])
        f["extra_angles"] = np.arange(frames.shape[0] + 5, dtype=np.float64)
        f["dark_high"] = np.full(frames.shape[1:], 60000.0, np.float32)
        # above the counts of 95 % of frame 0's pixels, not of its brightest (the beam)
        f["dark_most"] = np.full(frames.shape[1:], np.percentile(frames[0], 95), np.float32)
        f["dark_over_most"] = np.full(frames.shape[1:], np.percentile(frames[0], 70) + 1.5, np.float32)
        f["still_angles"] = np.zeros(frames.shape[0])
    for part in (0, 1):  # a virtual dataset of two files, the second missing
        with h5py.File(root / f"part{part}.h5", "w") as f:
            f["data"] = frames[20 * part:20 * (part + 1)]
    layout = h5py.VirtualLayout(shape=frames.shape, dtype=frames.dtype)
    for part in (0, 1):
        layout[20 * part:20 * (part + 1)] = h5py.VirtualSource(root / f"part{part}.h5", "data",
                                                               shape=(20, 64, 64))
    with h5py.File(root / "vds.h5", "w") as f:
        f.create_virtual_dataset("frames", layout, fillvalue=0)
    (root / "part1.h5").unlink()
    for name in ("zero.h5", "random.h5", "truncated.h5"):
        os.utime(root / name, (OLD, OLD))
    good = root / "good"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"output.dir={good}", "background.window=11",
                             "segmentation.max_blob_size=[20,20,5]", "quicklook.enabled=false"])
    from dctstream.runner import process_scan
    process_scan(cfg, display=False)
    assert (good / "run.json").exists() and not (good / ".dctstream").exists()
    return root


@dataclass
class Ctx:
    scan: object
    files: Path
    dir: Path

    def write(self, name, text) -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)

    @property
    def src(self):
        return ["--source", self.scan.frames_url]


def _yaml(c, text):
    return c.write("c.yml", text)


def _held(c):
    """``busy/`` with its lock held by another open file (as another process would)."""
    (c.dir / "busy").mkdir()
    c.lock = outdir.OutputLock(c.dir / "busy")
    return str(c.dir / "busy")


# name -> ctx -> (argv, exit code, strings the error line must hold)
CASES = {
    # -- run: the output folder
    "run_out_holds_results": lambda c: (["run", *c.src, "--out", "keep"], 1, ["keep", "already holds results"]),
    "run_out_is_a_file": lambda c: (["run", *c.src, "--out", c.write("f", "x")], 1, ["expected a folder"]),
    "run_out_under_a_file": lambda c: (["run", *c.src, "--out", c.write("f", "x") + "/sub"], 1,
                                       ["f/sub", "cannot create the output folder"]),
    "run_out_in_use": lambda c: (["run", *c.src, "--out", _held(c)], 1,
                                 ["busy", "in use by another dctstream run", f"pid {os.getpid()}"]),
    # -- run: files that are not what they say
    "run_zero_byte_file": lambda c: (["run", "--source", f"{c.files}/zero.h5::{FRAMES}", "--out", "o"], 1,
                                     ["zero.h5", "is empty (0 bytes)", "expected an HDF5 file"]),
    "run_random_bytes": lambda c: (["run", "--source", f"{c.files}/random.h5::{FRAMES}", "--out", "o"], 1,
                                   ["random.h5", "is not an HDF5 file", "signature"]),
    "run_truncated_file": lambda c: (["run", "--source", f"{c.files}/truncated.h5::{FRAMES}", "--out", "o"], 1,
                                     ["truncated.h5", "cannot be opened as HDF5"]),
    "run_zero_bytes_as_recorded": lambda c: (["run", "--source", f"{c.files}/zero.h5::{FRAMES}", "--out", "o",
                                              "--set", "source.protocol=hdf5"], 1,
                                             ["zero.h5", "cannot open as HDF5"]),
    "run_source_is_a_folder": lambda c: (["run", "--source", f"{c.files}::{FRAMES}", "--out", "o"], 1,
                                         [str(c.files), "is a folder"]),
    "run_recorded_missing": lambda c: (["run", "--source", f"{c.dir}/none.h5::{FRAMES}", "--out", "o",
                                        "--set", "source.protocol=hdf5"], 1, ["none.h5", "file not found"]),
    "run_counts_beyond_float32": lambda c: (["run", "--source", f"{c.files}/odd.h5::/offset", "--out", "o"], 1,
                                            ["odd.h5::/offset", "frame 0", "beyond 16777216", "float32"]),
    "run_unwritten_chunks": lambda c: (["run", "--source", f"{c.files}/odd.h5::/unwritten", "--out", "o"], 1,
                                       ["odd.h5::/unwritten", "3 frames 7..8, 20 never written",
                                        "source.missing: repeat-background"]),
    "run_nothing_written_to_stand_in_from": lambda c: (
        ["run", "--source", f"{c.files}/odd.h5::/none_written", "--out", "o", "--set", "source.missing=repeat-background"],
        1, ["frame 0: lost, and no frame before it arrived to stand in for it", "expected at least the first frame"]),
    "run_dark_never_written": lambda c: (
        ["run", "--source", c.scan.frames_url, "--dark", f"{c.files}/odd.h5::/none_written", "--out", "o"],
        1, ["dark.url", "odd.h5::/none_written", "40 of its 40 frames never written", "expected written dark frames"]),
    "run_frames_along_the_last_axis": lambda c: (
        ["run", "--source", f"{c.files}/odd.h5::/frames_last", "--set",
         f"source.angles={c.files}/odd.h5::/angles_last", "--out", "o"],
        1, ["source.url", "odd.h5::/frames_last", "shape (64, 48, 40)", "40 angles", "along its axis 2",
            "expected the frames along the first axis"]),
    "run_dark_not_there": lambda c: (["run", "--source", c.scan.frames_url, "--dark", "dark.edf", "--out", "o"], 1,
                                     ["dark.url: dark.edf: file not found", "file.h5::/dataset, file.edf"]),
    "run_dark_not_an_image": lambda c: (["run", "--source", c.scan.frames_url, "--dark", c.write("dark.txt", "x"),
                                         "--out", "o"], 1, ["dark.url", "dark.txt", "cannot read as EDF, TIFF or "
                                                                                     "NumPy"]),
    "run_vds_missing_source": lambda c: (["run", "--source", f"{c.files}/vds.h5::/frames", "--out", "o"], 1,
                                         ["vds.h5::/frames", "20 frames 20..39 never written",
                                          "1 of its virtual-dataset sources are not there: ", "part1.h5"]),
    "run_stream_without_protocol": lambda c: (["run", "--source", "tcp://127.0.0.1:1234", "--out", "o"], 2,
                                              ["source.protocol", "stream1 or stream2"]),
    "run_dark_file_missing": lambda c: (["run", *c.src, "--dark", f"{c.dir}/d.h5::/x", "--out", "o"], 1,
                                        ["dark.url", "file not found"]),
    "run_mask_file_missing": lambda c: (["run", *c.src, "--set", f"detector.mask={c.dir}/m.npy", "--out", "o"], 1,
                                        ["detector.mask", "m.npy", "file not found"]),
    "run_flat_not_an_image": lambda c: (["run", *c.src, "--set", f"detector.flat={c.write('f.npy', 'x')}",
                                         "--out", "o"], 1, ["detector.flat", "f.npy", "cannot read"]),
    "run_angles_file_missing": lambda c: (["run", *c.src, "--set", f"source.angles={c.dir}/a.h5::/a",
                                           "--out", "o"], 1, ["source.angles", "file not found"]),
    # -- run: resources
    "run_absurd_window": lambda c: (["run", *c.src, "--out", "o", "--set", "background.window=1000000001"], 1,
                                    ["background.window: 1000000001 frames of 64 x 64 px", "GiB",
                                     "this process may use", "lower background.window"]),
    # -- configuration files
    "config_duplicate_key": lambda c: (["run", _yaml(c, "background:\n  window: 11\n  window: 21\n"), *c.src], 2,
                                       ["c.yml: background.window: duplicate key, at lines 2 and 3"]),
    "config_duplicate_section": lambda c: (["run", _yaml(c, "background:\n  window: 11\nfilter:\n  median_size: 3\n"
                                                            "background:\n  mode: block\n"), *c.src], 2,
                                           ["c.yml: background: duplicate section, at lines 1 and 5"]),
    "config_duplicate_in_flow": lambda c: (["check", _yaml(c, "output: {dir: a, dir: b}\n")], 2,
                                           ["output.dir: duplicate key, at lines 1 and 1"]),
    "config_is_a_folder": lambda c: (["check", str(c.dir)], 2, [str(c.dir), "cannot read config file"]),
    "config_not_utf8": lambda c: (["check", c.write("b.yml", "") and _binary(c)], 2, ["not UTF-8"]),
    "config_a_list": lambda c: (["check", _yaml(c, "- a\n- b\n")], 2, ["must be a mapping of sections"]),
    "config_section_a_number": lambda c: (["check", _yaml(c, "background: 3\n")], 2,
                                          ["background: must be a mapping, got 3"]),
    "config_unknown_section": lambda c: (["check", "--set", "backgroud.window=11"], 2,
                                         ["backgroud: unknown section"]),
    "config_set_without_value": lambda c: (["check", "--set", "background.window"], 2,
                                           ["--set", "expected section.key=value"]),
    "watch_glob_absolute": lambda c: (["watch", str(c.dir), "--set", "watch.glob=/data/*.h5"], 2,
                                      ["watch.glob", "relative to the watched folder"]),
    "watch_glob_up": lambda c: (["watch", str(c.dir), "--set", "watch.glob=../*.h5"], 2,
                                ["watch.glob", "no .."]),
    # -- simulate
    "simulate_size_zero": lambda c: (["simulate", "s.h5", "--size", "0"], 2, ["--size", "integer >= 32, got 0"]),
    "simulate_size_text": lambda c: (["simulate", "s.h5", "--size", "big"], 2, ["--size", "got 'big'"]),
    "simulate_frames_zero": lambda c: (["simulate", "s.h5", "--frames", "0"], 2, ["--frames", ">= 8"]),
    "simulate_spots_negative": lambda c: (["simulate", "s.h5", "--spots", "-3"], 2, ["--spots", ">= 0"]),
    "simulate_fraction_above_one": lambda c: (["simulate", "s.h5", "--hot-pixels", "2"], 2,
                                              ["--hot-pixels", "in [0, 1]"]),
    "simulate_fraction_nan": lambda c: (["simulate", "s.h5", "--dead-pixels", "nan"], 2, ["--dead-pixels"]),
    "simulate_missing_folder": lambda c: (["simulate", "no/such/s.h5", "--frames", "8", "--size", "32"], 1,
                                          ["simulate: no/such/s.h5", "no folder"]),
    "simulate_into_a_folder": lambda c: (["simulate", str(c.dir), "--frames", "8", "--size", "32"], 1,
                                         ["is a folder, expected a file"]),
    "simulate_under_a_file": lambda c: (["simulate", c.write("f", "x") + "/s.h5", "--frames", "8", "--size", "32"],
                                        1, ["no folder"]),
    # -- replay
    "replay_missing_scan": lambda c: (["replay", f"{c.dir}/none.h5::/x", "--to", "o.h5"], 1,
                                      ["replay SCAN", "none.h5", "file not found"]),
    "replay_missing_dataset": lambda c: (["replay", f"{c.scan.path}::/nope", "--to", "o.h5"], 1,
                                         ["replay SCAN", "no such dataset"]),
    "replay_unknown_scheme": lambda c: (["replay", c.scan.frames_url, "--to", "udp://127.0.0.1:9"], 1,
                                        ["udp://127.0.0.1:9", "unknown address"]),
    "replay_bad_address": lambda c: (["replay", c.scan.frames_url, "--to", "tcp://999.1.2.3:5"], 1,
                                     ["tcp://999.1.2.3:5", "cannot serve there"]),
    "replay_negative_fps": lambda c: (["replay", c.scan.frames_url, "--to", "o.h5", "--fps", "-1"], 2, ["--fps"]),
    "replay_file_in_missing_folder": lambda c: (["replay", c.scan.frames_url, "--to", "no/o.h5"], 1,
                                                ["replay --to", "no folder"]),
    "replay_folder_is_a_file": lambda c: (["replay", c.scan.frames_url, "--to", c.write("f", "x") + "/*.edf"], 1,
                                          ["replay --to", "is a file, expected a folder"]),
    "replay_without_target": lambda c: (["replay", c.scan.frames_url], 2, ["--to"]),
    # -- demo and bench
    "demo_size_zero": lambda c: (["demo", "--size", "0"], 2, ["--size"]),
    "demo_window_even": lambda c: (["demo", "--window", "100"], 2, ["--window", "odd"]),
    "demo_frames_zero": lambda c: (["demo", "--frames", "0"], 2, ["--frames"]),
    "demo_keep_is_a_file": lambda c: (["demo", "--keep", c.write("f", "x"), "--frames", "20", "--size", "32"], 1,
                                      ["demo --keep", "is a file, expected a folder"]),
    "bench_size_zero": lambda c: (["bench", "--size", "0"], 2, ["--size"]),
    "bench_window_even": lambda c: (["bench", "--window", "4"], 2, ["--window", "odd"]),
    "bench_frames_zero": lambda c: (["bench", "--frames", "0"], 2, ["--frames"]),
    "bench_batch_zero": lambda c: (["bench", "--batch", "0"], 2, ["--batch"]),
    "bench_unknown_mode": lambda c: (["bench", "--mode", "fast"], 2, ["--mode", "invalid choice"]),
    # -- watch
    "watch_missing_root": lambda c: (["watch", f"{c.dir}/none"], 1, ["none", "expected a folder"]),
    "watch_root_is_a_file": lambda c: (["watch", c.write("f", "x")], 1, ["expected a folder"]),
    "watch_max_scans_zero": lambda c: (["watch", str(c.dir), "--max-scans", "0"], 2, ["--max-scans"]),
    "watch_out_is_a_file": lambda c: (["watch", str(c.dir), "--out", c.write("f", "x")], 1,
                                      ["output.dir", "is a file, expected a folder"]),
    # -- status
    "status_missing_folder": lambda c: (["status", f"{c.dir}/none"], 1, ["none", "no status.json or run.json"]),
    "status_of_a_file": lambda c: (["status", c.write("f", "x")], 1, ["no status.json or run.json"]),
    "status_broken_json": lambda c: (["status", _broken_status(c)], 1, ["status.json", "expected JSON"]),
    "status_interval_zero": lambda c: (["status", "keep", "--interval", "0"], 2, ["--interval"]),
    # -- export
    "export_missing_folder": lambda c: (["export", f"{c.dir}/none"], 1, ["spots.h5", "cannot read the spot table"]),
    "export_no_table": lambda c: (["export", str(c.dir)], 1, ["spots.h5", "cannot read the spot table"]),
    "export_table_of_garbage": lambda c: (["export", _garbage_table(c)], 1, ["spots.h5",
                                                                          "cannot read the spot table"]),
    "export_output_missing_folder": lambda c: (["export", "keep", "--output", "no/x.flt"], 1,
                                               ["export --output", "no folder"]),
    "export_output_is_a_folder": lambda c: (["export", "keep", "--output", str(c.dir)], 1,
                                            ["export --output", "is a folder"]),
    "export_unknown_format": lambda c: (["export", "keep", "--format", "xds"], 2, ["--format"]),
    # -- the command line itself
    "no_command": lambda c: ([], 2, ["required"]),
    "unknown_command": lambda c: (["go"], 2, ["invalid choice"]),
    "unknown_option": lambda c: (["run", "--fast"], 2, ["unrecognized arguments: --fast"]),
}


def _binary(c):
    path = c.dir / "b.yml"
    path.write_bytes(b"\xff\xfe\x00bad")
    return str(path)


def _broken_status(c):
    (c.dir / "s").mkdir()
    (c.dir / "s" / "status.json").write_text("{half")
    return str(c.dir / "s")


def _garbage_table(c):
    (c.dir / "g").mkdir()
    (c.dir / "g" / "spots.h5").write_bytes(b"\x00garbage" * 10)
    return str(c.dir / "g")


# A wrong value for every key of every section: each refused naming its key path.
BAD_VALUE = "{a: 1}"
KEY_CASES = sorted(f"{section}.{key}" for section, keys in _CHECKS.items() for key in keys)


@pytest.fixture
def case_dir(tmp_path, files):
    """The case's own folder (its cwd), holding ``keep/``: a finished run that no failed command may change."""
    shutil.copytree(files / "good", tmp_path / "keep")
    return tmp_path


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_case(name, case_dir, files, tiny_scan, monkeypatch, capsys):
    ctx = Ctx(tiny_scan, files, case_dir)
    argv, code, needles = CASES[name](ctx)
    if argv and argv[0] == "run":  # the tiny scan's settings, but not over what the case sets on purpose
        set_keys = {a.split("=")[0] for a in argv if "=" in a}
        argv = [*argv, *(a for o in TINY[1::2] if o.split("=")[0] not in set_keys for a in ("--set", o))]
    before = snapshot(case_dir)
    start = time.monotonic()
    try:
        rc, out, err = _main(argv, case_dir, monkeypatch, capsys)
    except SystemExit as exc:  # argparse
        rc, captured = exc.code, capsys.readouterr()
        out, err = captured.out, captured.err
    finally:
        getattr(ctx, "lock", None) and ctx.lock.release()
    assert_one_line_error(rc, out, err, code, needles)
    assert time.monotonic() - start < 30, "an error that must be said at once took its time"
    after = snapshot(case_dir)
    assert {k: after.get(k) for k in before} == before, "a failed command changed files that were there before it"


@pytest.mark.parametrize("key", KEY_CASES)
def test_every_key_refuses_a_wrong_value(key, tmp_path, monkeypatch, capsys):
    rc, out, err = _main(["check", "--set", f"{key}={BAD_VALUE}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(rc, out, err, 2, [f"--set: {key}: must be", "got {a: 1}"])


def test_the_catalogue_is_long_enough():
    tests = [name for name in globals() if name.startswith("test_")]
    assert len(CASES) + len(KEY_CASES) + len(tests) >= 120


# -- the output folder: one run at a time, nothing lost by --overwrite ---------------------------------


def _run_argv(scan_url, out, *extra):
    return ["run", "--source", scan_url, "--out", str(out), *TINY, *extra]


def _all_zero(files, tmp_path):
    path = tmp_path / "zeros.h5"
    with h5py.File(path, "w") as f:
        f["z"] = np.zeros((20, 64, 64), np.uint16)
    return f"{path}::/z"


def test_overwrite_that_fails_gives_the_earlier_results_back(files, tmp_path, monkeypatch, capsys, caplog):
    shutil.copytree(files / "good", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    rc, out, err = _main(_run_argv(_all_zero(files, tmp_path), "out", "--overwrite"), tmp_path, monkeypatch, capsys)
    assert_one_line_error(rc, out, err, 1, ["have no noise"])
    assert "the earlier results are back in place" in caplog.text
    assert snapshot(tmp_path / "out") == before


def test_overwrite_that_finishes_replaces_the_results(files, tiny_scan, tmp_path, monkeypatch, capsys):
    shutil.copytree(files / "good", tmp_path / "out")
    (tmp_path / "out" / "difspots" / "999999.h5").write_bytes(b"an old difspot")
    rc, _, err = _main(_run_argv(tiny_scan.frames_url, "out", "--overwrite"), tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    assert not (tmp_path / "out" / "difspots" / "999999.h5").exists()
    assert not (tmp_path / "out" / ".dctstream").exists()
    assert read_spot_table(tmp_path / "out" / "spots.h5")["id"].size == \
        read_spot_table(files / "good" / "spots.h5")["id"].size


def test_overwrite_killed_keeps_the_earlier_results_aside(files, tiny_scan, tmp_path):
    shutil.copytree(files / "good", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    env = {**_env(), "DCTSTREAM_CRASH_AT": "frame:15"}
    killed = _cli(*_run_argv(tiny_scan.frames_url, "out", "--overwrite"), cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    kept = tmp_path / "out" / ".dctstream" / "previous"
    assert snapshot(kept) == {k: v for k, v in before.items()}
    # a second --overwrite run that fails keeps the first results, not the killed run's
    failed = _cli(*_run_argv(_all_zero(files, tmp_path), "out", "--overwrite"), cwd=tmp_path)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert snapshot(tmp_path / "out") == before


def test_a_folder_in_use_by_another_process_is_refused(tiny_scan, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from dctstream.outdir import OutputLock; "
                               "l = OutputLock(sys.argv[1]); print('held', flush=True); sys.stdin.read()",
                               str(tmp_path / "out")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        proc = _cli(*_run_argv(tiny_scan.frames_url, "out"), cwd=tmp_path)
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, 1,
                              ["out: in use by another dctstream run", f"pid {holder.pid}"])
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait(TIMEOUT_S)
    # the holder died: its lock went with it, and the folder is free
    proc = _cli(*_run_argv(tiny_scan.frames_url, "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_a_stale_lock_file_does_not_block(tiny_scan, tmp_path, monkeypatch, capsys):
    (tmp_path / "out" / ".dctstream").mkdir(parents=True)
    (tmp_path / "out" / ".dctstream" / "lock").write_text("999999 elsewhere\n")
    rc, _, err = _main(_run_argv(tiny_scan.frames_url, "out"), tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    assert not (tmp_path / "out" / ".dctstream").exists()


def _live_copy(tiny_scan, path, n, *, end=False):
    with h5py.File(tiny_scan.path, "r") as f:
        frames = f[FRAMES][()]
    with h5py.File(path, "a") as f:
        if FRAMES not in f:
            f.create_dataset(FRAMES, data=frames[:n], maxshape=(None, 64, 64), chunks=(1, 64, 64))
        else:
            dset = f[FRAMES]
            old = dset.shape[0]
            dset.resize((n, 64, 64))
            dset[old:n] = frames[old:n]
        if end:
            f["/1.1/end_time"] = "2026-01-01T00:00:00"


def test_two_runs_into_one_folder_and_a_signal(tiny_scan, tmp_path):
    """A run waiting for a live file holds its folder; a second is refused; SIGTERM stops the first cleanly."""
    _live_copy(tiny_scan, tmp_path / "live.h5", 25)
    first = subprocess.Popen([sys.executable, "-m", "dctstream",
                              *_run_argv(f"{tmp_path}/live.h5::{FRAMES}", "out", "--set", "source.idle_timeout_s=60",
                                         "--set", "source.protocol=hdf5-live", "--set", "status.interval_s=0.2")],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "out" / "run.json").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.poll() else ""
            time.sleep(0.1)
        second = _cli(*_run_argv(f"{tmp_path}/live.h5::{FRAMES}", "out", "--set", "source.protocol=hdf5-live"),
                      cwd=tmp_path)
        assert_one_line_error(second.returncode, second.stdout, second.stderr, 1,
                              ["out: in use by another dctstream run", f"pid {first.pid}"])
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and "Traceback" not in err, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["state"] == "stopped"
    assert (tmp_path / "out" / ".dctstream" / "running").exists()  # the same command resumes it
    assert not (tmp_path / "out" / ".dctstream" / "lock").exists()


def test_resume_accepts_the_folder_by_another_path(files, tiny_scan, tmp_path):
    # killed while saving its 3rd checkpoint: two are on disk whatever the timing of the writer thread
    env = {**_env(), "DCTSTREAM_CRASH_AT": "checkpoint:3"}
    killed = _cli(*_run_argv(tiny_scan.frames_url, "out", "--set", "output.checkpoint_every_frames=5"),
                  cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL
    (tmp_path / "link").symlink_to(tmp_path)
    resumed = _cli(*_run_argv(tiny_scan.frames_url, tmp_path / "link" / "out",
                              "--set", "output.checkpoint_every_frames=5"), cwd=tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    got, expected = read_spot_table(tmp_path / "out" / "spots.h5"), read_spot_table(files / "good" / "spots.h5")
    for column in expected:
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)


def test_resume_refuses_another_scan_in_the_same_file(tiny_scan, tmp_path):
    scan = tmp_path / "scan.h5"
    shutil.copy(tiny_scan.path, scan)
    url = f"{scan}::{FRAMES}"
    env = {**_env(), "DCTSTREAM_CRASH_AT": "checkpoint:3"}  # two checkpoints on disk, whatever the timing
    killed = _cli(*_run_argv(url, "out", "--set", "output.checkpoint_every_frames=5"), cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL
    simulate_scan(scan, frames=40, size=64, spots=10, seed=7)  # the file is replaced by another scan
    before = snapshot(tmp_path / "out")
    proc = _cli(*_run_argv(url, "out", "--set", "output.checkpoint_every_frames=5"), cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, 1,
                          ["frame 0 is not that of the scan", "was the file replaced?", "--overwrite"])
    after = snapshot(tmp_path / "out")
    assert {k: v for k, v in after.items() if "lock" not in k} == {k: v for k, v in before.items() if "lock" not in k}


# -- partial scans are never "finished" -----------------------------------------------------------------


def test_a_quiet_live_file_is_incomplete_and_resumes_when_it_grows(files, tiny_scan, tmp_path, monkeypatch, capsys):
    live = tmp_path / "live.h5"
    _live_copy(tiny_scan, live, 25)
    argv = _run_argv(f"{live}::{FRAMES}", "out", "--set", "source.protocol=hdf5-live",
                     "--set", "source.idle_timeout_s=1", "--set", "output.checkpoint_every_frames=5")
    rc, _, err = _main(argv, tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["state"] == "incomplete" and record["end_reason"] == "idle_timeout"
    assert record["incomplete"] == "idle_timeout after 25 frames"
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "incomplete"
    assert any("scan incomplete: idle_timeout after 25 frames" in w for w in status["warnings"])
    rc, out, _ = _main(["export", "out"], tmp_path, monkeypatch, capsys)
    assert rc == 0 and "PARTIAL" in out
    assert "# partial = the run is incomplete: idle_timeout after 25 frames" in \
        (tmp_path / "out" / "spots.flt").read_text()
    # the acquisition goes on: the same command resumes, and the result is that of the whole scan
    _live_copy(tiny_scan, live, 40, end=True)
    rc, _, err = _main(argv, tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["state"] == "finished"
    got, expected = read_spot_table(tmp_path / "out" / "spots.h5"), read_spot_table(files / "good" / "spots.h5")
    for column in expected:
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)
    assert sorted(p.name for p in (tmp_path / "out" / "difspots").iterdir()) == \
        sorted(p.name for p in (files / "good" / "difspots").iterdir())


def test_fewer_frames_than_expected_is_incomplete(tiny_scan, tmp_path, monkeypatch, capsys):
    live = tmp_path / "live.h5"
    _live_copy(tiny_scan, live, 30, end=True)
    rc, _, err = _main(_run_argv(f"{live}::{FRAMES}", "out", "--set", "source.protocol=hdf5-live",
                                 "--set", "source.expected_frames=40"), tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["state"] == "incomplete"
    assert record["incomplete"] == "end_time after 30 frames of 40 expected"
    assert record["frames_expected"] == 40


def _follow(path, on_frame, **cfg):
    source_cfg = SourceConfig(url=f"{path}::{FRAMES}", protocol="hdf5-live", poll_interval_s=0.05,
                              **{"idle_timeout_s": 1.0, **cfg})
    delivered = []
    with Hdf5WatchSource(source_cfg) as source:
        for frame in source:
            delivered.append(frame.index)
            on_frame(frame.index)
    return delivered, source.end_reason


def test_a_followed_file_that_vanishes_ends_incomplete(tiny_scan, tmp_path):
    live = tmp_path / "live.h5"
    _live_copy(tiny_scan, live, 20)
    delivered, reason = _follow(live, lambda k: k == 10 and live.unlink())
    assert reason == "vanished" and delivered == list(range(len(delivered)))


def test_a_followed_file_replaced_by_another_scan_ends_there(tiny_scan, tmp_path):
    live, other = tmp_path / "live.h5", tmp_path / "other.h5"
    _live_copy(tiny_scan, live, 20)
    simulate_scan(other, frames=40, size=64, spots=5, seed=9)

    def replace(k):
        if k == 5:
            os.replace(other, live)

    delivered, reason = _follow(live, replace)
    assert reason == "replaced"
    assert delivered == list(range(len(delivered))) and len(delivered) < 20  # none of the other scan's 40


def test_watch_tries_an_incomplete_scan_again_when_its_file_changes(tiny_scan, tmp_path):
    out = tmp_path / "out" / "s"
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"state": "incomplete"}))
    (out / "spots.h5").write_text("x")
    assert plan(out) == "redo"
    (out / "run.json").write_text(json.dumps({"state": "finished"}))
    assert plan(out) == "skip"
    live = tmp_path / "scan.h5"
    _live_copy(tiny_scan, live, 10)
    daemon = Daemon(tmp_path, load_config(None, [f"output.dir={tmp_path / 'out'}"]))
    scan = Scan(live, FRAMES, out)
    daemon.retry[scan.key] = (scan, _file_stat(live))
    daemon._discover()
    assert not daemon.queue  # unchanged: not tried again in a loop
    _live_copy(tiny_scan, live, 20)
    daemon._discover()
    assert list(daemon.queue) == [scan] and not daemon.retry


# -- bounded waits ---------------------------------------------------------------------------------------


def test_a_file_not_readable_yet_is_waited_for_at_most_the_idle_timeout(tmp_path, tiny_scan, monkeypatch, capsys):
    (tmp_path / "new.h5").write_bytes(b"")  # just created: a writer may be about to fill it
    start = time.monotonic()
    rc, out, err = _main(["run", "--source", f"{tmp_path}/new.h5::{FRAMES}", "--out", "o", *TINY,
                          "--set", "source.idle_timeout_s=1"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(rc, out, err, 1, ["new.h5", "expected frames within 1 s (source.idle_timeout_s)"])
    assert time.monotonic() - start < 20
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("there, said", [((), ""),
                                         (("sample_0001.h5", "notes.txt"), "; in its folder: sample_0001.h5")],
                         ids=["nothing", "a_close_name"])
def test_a_live_source_says_what_it_waits_for(tmp_path, there, said):
    """A file not there yet (or a mistyped name: the acquisition may still make it) is waited for, and what
    is there instead is said: the closest names in its folder."""
    for name in there:
        (tmp_path / name).write_bytes(b"")
    source = Hdf5WatchSource(SourceConfig(url=f"{tmp_path}/sample_001.h5::{FRAMES}", protocol="hdf5-live",
                                          idle_timeout_s=7))
    try:
        assert source.waiting_for == f"{tmp_path}/sample_001.h5::{FRAMES}: file not found{said} (waiting at most " \
                                     "7 s, source.idle_timeout_s)"
    finally:
        source.close()


def test_a_file_in_a_folder_not_there_says_so_when_the_wait_ends(tmp_path, tiny_scan, monkeypatch, capsys):
    rc, out, err = _main(["run", "--source", f"{tmp_path}/nowhere/sample_0001.h5::{FRAMES}", "--out", "o", *TINY,
                          "--set", "source.idle_timeout_s=1"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(rc, out, err, 1, ["expected frames within 1 s (source.idle_timeout_s), got file not found",
                                            f"its folder {tmp_path}/nowhere is not there either"])


@pytest.mark.parametrize("header, number", [(True, 1_000_000), (False, 1_000_000)],
                         ids=["past_the_announced_count", "implausible_jump"])
def test_a_stream_frame_number_that_jumps_is_not_filled_in(header, number, caplog):
    import zmq

    from dctstream.sources.stream import Stream1Source
    from test_bad_inputs import FRAME, _v1, _v1_image

    messages = []
    if header:
        messages.append(_v1({"htype": "dheader-1.0", "series": 1, "header_detail": "basic"},
                            {"nimages": 3, "ntrigger": 1}))
    messages += [_v1_image(0, FRAME), _v1_image(number, FRAME + 1), _v1_image(1, FRAME + 1),
                 _v1_image(2, FRAME + 2), _v1({"htype": "dseries_end-1.0", "series": 1})]
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind("inproc://jump")
    start = time.monotonic()
    try:
        with Stream1Source(SourceConfig(url="inproc://jump", idle_timeout_s=2, missing="repeat-background"),
                           context=context) as source:
            for message in messages:
                push.send_multipart(message)
            frames = list(source)
    finally:
        push.close()
        context.term()
    assert [f.index for f in frames] == [0, 1, 2] and all(f.data is not None for f in frames)
    assert source.counters["malformed"] == 1 and source.counters["missing"] == 0
    assert time.monotonic() - start < 10
    assert any(f"frame number {number}" in r.getMessage() for r in caplog.records)


# -- resources -------------------------------------------------------------------------------------------


def test_memory_is_checked_against_the_limit_that_binds(tiny_scan, tmp_path, monkeypatch, capsys):
    from dctstream import resources

    monkeypatch.setattr(resources, "available_bytes", lambda: (2**20, "the cgroup's memory limit"))
    rc, out, err = _main(_run_argv(tiny_scan.frames_url, "o", "--set", "background.window=201"), tmp_path,
                         monkeypatch, capsys)
    assert_one_line_error(rc, out, err, 1, ["background.window: 201 frames of 64 x 64 px (uint16) need about",
                                            "the 0.0 GiB this process may use (the cgroup's memory limit)",
                                            "lower background.window or bin the frames (detector.binning)"])
    assert not (tmp_path / "o").exists()


def test_memory_check_sees_ulimit(tiny_scan, tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "dctstream", *_run_argv(tiny_scan.frames_url, "o", "--set",
                                                                         "background.window=2000001")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(),
                          preexec_fn=limit)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, 1, ["need about", "ulimit -v"])


# -- runs anywhere it is installed -------------------------------------------------------------------------


def test_a_service_account_without_a_writable_cache_runs(tmp_path):
    """The package where its kernels' __pycache__ cannot be made, a home that cannot exist: the kernels still
    compile (cached in the temp dir), and the log says where, once."""
    package = tmp_path / "site" / "dctstream"
    shutil.copytree(Path(__file__).resolve().parents[1] / "dctstream", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("background", "segment"):
        (package / name / "__pycache__").write_text("not a folder")  # even root cannot make it one
    (tmp_path / "nohome").write_text("a file")
    env = {k: v for k, v in _env().items() if not k.startswith(("NUMBA_", "XDG_"))}
    env.update(PYTHONPATH=str(tmp_path / "site"), HOME=str(tmp_path / "nohome" / "home"),
               TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = ("import logging, numpy as np, dctstream; from dctstream.cli import main; "
            "print(dctstream.__file__); print(dctstream.NUMBA_CACHE_NOTE); "
            "from dctstream.background.kernels import median_filter; "
            "print(float(median_filter(np.arange(25, dtype=np.float32).reshape(5, 5), 3)[2, 2]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr
    where, note, value = proc.stdout.split("\n")[:3]
    assert where.startswith(str(package))
    assert f"compiled kernels are cached in {tmp_path / 'tmp'}" in note and "is not writable" in note
    assert float(value) == 12.0
    assert list((tmp_path / "tmp").rglob("*.nbi"))


def test_no_writable_place_at_all_compiles_without_a_cache(tmp_path, monkeypatch):
    from numba.core.dispatcher import Dispatcher

    from dctstream import _numba_cache

    (tmp_path / "f").write_text("a file")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(_numba_cache, "_PACKAGE", tmp_path / "f" / "pkg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "f" / "cache"))
    monkeypatch.setattr(_numba_cache.tempfile, "gettempdir", lambda: str(tmp_path / "f" / "tmp"))
    monkeypatch.setattr(Dispatcher, "enable_caching", Dispatcher.enable_caching)  # put back afterwards
    note = _numba_cache.place_numba_cache()
    assert "are not writable: kernels are compiled without a cache" in note
    assert "NUMBA_CACHE_DIR" not in os.environ


# -- no silent wrong result ------------------------------------------------------------------------------


def _run_record(tmp_path, monkeypatch, capsys, caplog, url, *extra):
    with caplog.at_level("WARNING", "dctstream"):
        rc, _, err = _main(_run_argv(url, "o", *extra), tmp_path, monkeypatch, capsys)
    assert rc == 0, err
    return (json.loads((tmp_path / "o" / "run.json").read_text()),
            json.loads((tmp_path / "o" / "status.json").read_text()), caplog.messages)


def _warned(record, status, logged, *needles):
    """The warning is in the log, the last status and the run record."""
    for where in (record["warnings"], status["warnings"], logged):
        assert any(all(n in w for n in needles) for w in where), (needles, where)


def test_unwritten_chunks_are_missing_frames(files, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, f"{files}/odd.h5::/unwritten",
                                      "--set", "source.missing=repeat-background")
    assert record["state"] == "finished" and record["stats"]["frames_missing"] == 3
    _warned(record, status, err, "3 frames 7..8, 20 never written", "replaced by the background")


def test_a_missing_virtual_source_is_missing_frames(files, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, f"{files}/vds.h5::/frames",
                                      "--set", "source.missing=repeat-background")
    assert record["stats"]["frames_missing"] == 20
    _warned(record, status, err, "20 frames 20..39 never written")


def test_eiger_gap_pixels_are_masked(files, tmp_path, monkeypatch, capsys, caplog):
    record, _, _ = _run_record(tmp_path, monkeypatch, capsys, caplog, f"{files}/odd.h5::/eiger")
    assert record["state"] == "finished" and record["spots"] > 0
    assert record["stats"]["masked_pixels"]["invalid"] == 64
    with h5py.File(tmp_path / "o" / "mask.h5", "r") as f:
        assert f["mask"][40].all() and f["mask"][:40].sum() == 0


def test_radian_looking_angles_are_warned(files, tiny_scan, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                      "--set", f"source.angles={files}/odd.h5::/radians")
    _warned(record, status, err, "odd.h5::/radians", "like radians", "expected degrees")


def test_more_angles_than_frames_are_warned(files, tiny_scan, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                      "--set", f"source.angles={files}/odd.h5::/extra_angles")
    _warned(record, status, err, "45 angles for 40 frames")


def test_a_dark_above_every_count_is_warned(files, tiny_scan, tmp_path, monkeypatch, capsys):
    rc, _, err = _main(_run_argv(tiny_scan.frames_url, "o", "--dark", f"{files}/odd.h5::/dark_high",
                                 "--set", "segmentation.seed_threshold=10"), tmp_path, monkeypatch, capsys)
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert any("the dark is above every count of frame 0" in w for w in record["warnings"]), (rc, err)


def test_a_dark_above_most_counts_is_warned(files, tiny_scan, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                      "--dark", f"{files}/odd.h5::/dark_most", "--set",
                                      "segmentation.seed_threshold=10")
    _warned(record, status, err, "odd.h5::/dark_most", "the dark is above the counts of 95 % of the pixels")


def test_a_dark_well_above_most_counts_is_warned(files, tiny_scan, tmp_path, monkeypatch, capsys, caplog):
    """More than a count above 70 % of the pixels (under DARK_ABOVE_FRACTION's 90 %): warned too; the scan's
    own dark is not."""
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                      "--dark", f"{files}/odd.h5::/dark_over_most", "--set",
                                      "segmentation.seed_threshold=10")
    _warned(record, status, err, "odd.h5::/dark_over_most", "the dark is above the counts of 7",
            "unlit pixels are left negative")
    (tmp_path / "own").mkdir()
    record, _, _ = _run_record(tmp_path / "own", monkeypatch, capsys, caplog, tiny_scan.frames_url,
                               "--dark", tiny_scan.dark_url)
    assert not any("the dark is above" in w for w in record["warnings"])


def test_angles_that_never_change_are_warned(files, tiny_scan, tmp_path, monkeypatch, capsys, caplog):
    record, status, err = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                      "--set", f"source.angles={files}/odd.h5::/still_angles")
    _warned(record, status, err, "odd.h5::/still_angles", "all 40 angles are 0 degrees")


def test_recorded_not_hdf5_is_said_at_once_also_in_process(files):
    from dctstream.sources import source_kind

    for name, what in (("zero.h5", "is empty"), ("random.h5", "not an HDF5 file"),
                       ("truncated.h5", "cannot be opened as HDF5")):
        with pytest.raises(InputError, match=what):
            source_kind(SourceConfig(url=f"{files}/{name}::{FRAMES}"))


def test_blobs_rejected_as_too_large_are_warned_when_they_are_not_a_rare_few(tiny_scan, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    """A fine psi step gives spots longer than max_blob_size frames (here 1): they are lost, and said."""
    record, status, logged = _run_record(tmp_path, monkeypatch, capsys, caplog, tiny_scan.frames_url,
                                         "--set", "segmentation.max_blob_size=[80,80,1]")
    assert record["rejected"]["too_large"] >= 5
    _warned(record, status, logged, "blobs reaching past segmentation.max_blob_size [80, 80, 1]", "rejected so far",
            "raise max_blob_size")
    (tmp_path / "default").mkdir()
    record, status, logged = _run_record(tmp_path / "default", monkeypatch, capsys, caplog, tiny_scan.frames_url)
    assert not any("max_blob_size" in w for w in record["warnings"])
