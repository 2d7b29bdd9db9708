"""``dctstream watch``: scans appearing in an acquisition tree are processed, once, even across a kill."""

from __future__ import annotations

import functools
import os
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.daemon import ScanFinder, plan
from dctstream.pipeline import Pipeline
from dctstream.record import write_record
from dctstream.sinks import read_spot_table
from simulators.dct_scan import simulate_scan
from simulators.replay_file import replay_hdf5, start_in_process

SETTINGS = """
background: {{window: 11}}
segmentation: {{max_blob_size: [20, 20, 5], seed_sigma: 4}}
dark: {{url: "{dark}"}}
source: {{idle_timeout_s: 60}}
status: {{interval_s: 0.2, log_every_s: 1.0}}
watch: {{poll_interval_s: 0.2}}
output: {{dir: "{out}", checkpoint_every_frames: 2}}
"""
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 60-frame 64 x 64 px scan and the spot table of its complete file."""
    tmp = tmp_path_factory.mktemp("recorded")
    truth = simulate_scan(str(tmp / "scan.h5"), frames=60, size=64, spots=12, seed=3)
    config = tmp / "watch.yml"
    config.write_text(SETTINGS.format(dark=truth.dark_url, out=tmp / "unused"))
    cfg = load_config(config, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                               f"output.dir={tmp / 'reference'}"])
    stats = Pipeline(cfg).run()
    assert stats.difspots_written >= 5
    return truth, read_spot_table(tmp / "reference" / "spots.h5")


def write_config(tmp_path, truth) -> tuple[Path, Path]:
    out = tmp_path / "out"
    config = tmp_path / "watch.yml"
    config.write_text(SETTINGS.format(dark=truth.dark_url, out=out))
    return config, out


def start_daemon(root, config, tmp_path, name="daemon") -> subprocess.Popen:
    log = open(tmp_path / f"{name}.txt", "ab")
    return subprocess.Popen([sys.executable, "-m", "dctstream", "watch", str(root), "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(what, predicate, timeout_s=TIMEOUT_S, proc=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def record(out_dir) -> dict:
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def logs(*paths, lines=15) -> str:
    """The last lines of each log, for a failed assertion's message (a rare failure seen only in CI)."""
    out = []
    for path in paths:
        text = path.read_text(errors="replace").splitlines() if path.exists() else ["(none)"]
        out.append(f"--- {path}:\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def status(out_dir) -> dict:
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def assert_same_spots(out_dir, expected):
    got = read_spot_table(out_dir / "spots.h5")
    assert list(got) == list(expected)
    for column in expected:
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)
    assert sorted(p.name for p in (out_dir / "difspots").iterdir()) == sorted(f"{i:06d}.h5" for i in got["id"])


def pause_at(resume, frame: int, k: int) -> None:
    """The acquisition's on_frame: after writing ``frame`` it holds the file open until ``resume`` is set."""
    if k == frame:
        resume.wait(TIMEOUT_S)


def paused_acquisition(truth, scan_file, frame=20):
    """A replay of ``truth`` into ``scan_file`` that stops after ``frame`` (mid-scan, for sure) until resumed."""
    resume = multiprocessing.get_context("spawn").Event()
    acquisition = start_in_process(replay_hdf5, truth.frames_url, str(scan_file), fps=50,
                                   angles_url=truth.angles_url, on_frame=functools.partial(pause_at, resume, frame))
    return acquisition, resume


def one_scan(tmp_path, out) -> tuple[Path, Path, Path]:
    """(root, scan file, its output folder) of one scan in the acquisition tree, its folder made."""
    root = tmp_path / "data"
    scan_file = root / "id11" / "sample" / "s_0001" / "s_0001.h5"
    scan_file.parent.mkdir(parents=True)
    return root, scan_file, out / "id11" / "sample" / "s_0001" / "s_0001_1.1"


def another_scan(tmp_path, config):
    """Another simulated scan of the recorded one's size and the spot table of its complete file."""
    other = simulate_scan(str(tmp_path / "other.h5"), frames=60, size=64, spots=12, seed=11)
    cfg = load_config(config, [f"source.url={other.frames_url}", f"source.angles={other.angles_url}",
                               f"output.dir={tmp_path / 'reference'}"])
    Pipeline(cfg).run()
    return other, read_spot_table(tmp_path / "reference" / "spots.h5")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


# -- what to do with a scan, and which files are scans -------------------------------------------


def test_plan(tmp_path):
    out = tmp_path / "scan_1.1"
    assert plan(out) == "start"
    out.mkdir()
    (out / "run.log").write_text("a log only\n")
    assert plan(out) == "start"
    (out / "spots.h5").write_bytes(b"partial")
    assert plan(out) == "redo"  # killed before its record
    for state, expected in [("running", "redo"), ("stopped", "redo"), ("finished", "skip"), ("failed", "skip")]:
        write_record(out, {"state": state})
        assert plan(out) == expected, state


def test_finder_matches_scans_and_skips_our_own_output(tmp_path):
    root = tmp_path / "data"
    scan_file = root / "p" / "s" / "s_0001" / "s_0001.h5"
    scan_file.parent.mkdir(parents=True)
    with h5py.File(scan_file, "w") as f:
        for scan in ("1.1", "3.1"):
            f[f"/{scan}/measurement/marana"] = np.zeros((2, 4, 4), np.uint16)
            f[f"/{scan}/measurement/diffrz"] = np.zeros(2)
        f["/2.1/measurement/marana"] = np.zeros((4, 4), np.uint16)  # not frames: 2-D
    ours = root / "p" / "s" / "out" / "spots.h5"  # output inside the tree: matches the glob, never a scan
    ours.parent.mkdir()
    ours.write_bytes(b"")
    (scan_file.parent / ".hidden.h5").write_bytes(b"")
    cfg = load_config(None, ["watch.dataset=/*.1/measurement/marana", "watch.dark=/2.1/measurement/marana",
                             f"output.dir={root / 'p' / 's' / 'out'}"])
    finder = ScanFinder(root, cfg)
    assert finder.files() == [scan_file]
    scans = finder.scans_in(scan_file)
    assert [(s.dataset, s.angles, s.dark) for s in scans] == [
        ("/1.1/measurement/marana", "/1.1/measurement/diffrz", "/2.1/measurement/marana"),
        ("/3.1/measurement/marana", "/3.1/measurement/diffrz", "/2.1/measurement/marana")]
    assert scans[0].out_dir == (root / "p" / "s" / "out" / "p" / "s" / "s_0001" / "s_0001_1.1").resolve()
    assert finder.scans_in(root / "p" / "missing.h5") == []


def test_watching_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    from dctstream.cli import main

    assert main(["watch", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip() == (f"dctstream: error: {tmp_path / 'nowhere'}: cannot watch it, "
                                               "expected a folder (the acquisition tree) or redis://host:port "
                                               "(a blissdata server)")


# -- the daemon at work ---------------------------------------------------------------------------


def test_two_scans_appearing_one_after_the_other(recorded, tmp_path):
    truth, expected = recorded
    config, out = write_config(tmp_path, truth)
    root = tmp_path / "data"
    root.mkdir()
    daemon = start_daemon(root, config, tmp_path)
    outs, files = [], []
    try:
        for name in ("s_0001", "s_0002"):
            scan_file = root / "id11" / "sample" / name / f"{name}.h5"
            scan_file.parent.mkdir(parents=True)
            acquisition = start_in_process(replay_hdf5, truth.frames_url, str(scan_file), fps=40,
                                           angles_url=truth.angles_url)
            outs.append(out / "id11" / "sample" / name / f"{name}_1.1")
            files.append(scan_file)
            wait_for(f"{name} to be picked up", lambda: (outs[-1] / "run.log").exists(), proc=daemon)
            acquisition.join(TIMEOUT_S)
        for o in outs:
            wait_for(f"{o.name} to finish", lambda: record(o).get("state") == "finished", proc=daemon)
        assert stop(daemon) == 0
    finally:
        daemon.kill()
    for o, scan_file in zip(outs, files):
        assert_same_spots(o, expected)
        rec = record(o)
        # end_time when followed while written; complete when the scan waited for the one before it
        assert rec["end_reason"] in ("end_time", "complete") and rec["frames_processed"] == 60
        assert rec["source"] == f"{scan_file.resolve()}::/1.1/measurement/marana"
    log = (out / "dctstream-watch.log").read_text()
    assert log.count(": new scan") == 2 and log.count(": finished, ") == 2
    # `dctstream status` on the daemon's output folder: one line per scan
    proc = subprocess.run([sys.executable, "-m", "dctstream", "status", str(out), "--line"], capture_output=True,
                          text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    for line, scan_file, o in zip(lines, files, outs):  # each names its run folder under out
        assert line.startswith(f"{scan_file.resolve()}::/1.1/measurement/marana [{o.relative_to(out)}]: finished; "
                               "frames received 60")

    # a restarted daemon leaves finished scans alone
    again = start_daemon(root, config, tmp_path, "again")
    try:
        wait_for("the finished scans to be skipped",
                 lambda: (out / "dctstream-watch.log").read_text().count("already processed (finished)") == 2,
                 proc=again)
        assert stop(again) == 0
    finally:
        again.kill()
    for o in outs:
        assert (o / "run.log").read_text().count("dctstream watch starts this scan") == 1


def test_killed_and_restarted_mid_scan(recorded, tmp_path):
    truth, expected = recorded
    config, out = write_config(tmp_path, truth)
    root, scan_file, scan_out = one_scan(tmp_path, out)
    daemon = start_daemon(root, config, tmp_path)
    acquisition, resume = paused_acquisition(truth, scan_file)
    try:
        wait_for("the scan to be half processed",
                 lambda: status(scan_out).get("stats", {}).get("frames_segmented", 0) >= 5, proc=daemon)
        child = status(scan_out)["pid"]
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        wait_for("the scan's process to die with the daemon", lambda: not alive(child), timeout_s=30)
        assert record(scan_out)["state"] == "running"  # left unfinished

        daemon = start_daemon(root, config, tmp_path, "restarted")
        wait_for("the restarted scan to catch up", lambda: status(scan_out).get("pid") not in (None, child)
                 and status(scan_out).get("stats", {}).get("frames_read", 0) >= 20, proc=daemon)
        resume.set()  # the acquisition goes on
        wait_for("the scan to finish", lambda: record(scan_out).get("state") == "finished", proc=daemon)
        acquisition.join(TIMEOUT_S)
        assert stop(daemon) == 0
    finally:
        resume.set()
        daemon.kill()
    assert record(scan_out)["end_reason"] == "end_time"  # followed while written, to the end
    assert_same_spots(scan_out, expected)
    assert (scan_out / "run.log").read_text().count("dctstream watch starts this scan") == 2
    assert "left unfinished by an earlier run" in (out / "dctstream-watch.log").read_text()
    assert "from its checkpoint at frame" in (scan_out / "run.log").read_text()  # resumed, not started over


def test_a_scan_that_pauses_past_the_idle_timeout_is_resumed_when_it_grows(recorded, tmp_path):
    """An acquisition quiet for longer than source.idle_timeout_s: the scan ends incomplete, is resumed when its file
    grows, and ends as one finished scan with the table of the whole file (counted once: it was counted finished
    and incomplete)."""
    truth, expected = recorded
    config, out = write_config(tmp_path, truth)
    config.write_text(config.read_text().replace("idle_timeout_s: 60", "idle_timeout_s: 1.5"))
    root, scan_file, scan_out = one_scan(tmp_path, out)
    daemon = start_daemon(root, config, tmp_path)
    acquisition, resume = paused_acquisition(truth, scan_file)
    try:
        wait_for("the scan to end incomplete at the pause", lambda: record(scan_out).get("state") == "incomplete",
                 proc=daemon)
        wait_for("the daemon to see it", lambda: "tried again when the file changes" in
                 (out / "dctstream-watch.log").read_text(), proc=daemon)
        resume.set()
        wait_for("the scan to finish", lambda: record(scan_out).get("state") == "finished", proc=daemon)
        acquisition.join(TIMEOUT_S)
        assert stop(daemon) == 0
    finally:
        resume.set()
        daemon.kill()
    assert_same_spots(scan_out, expected)
    watch_log = (out / "dctstream-watch.log").read_text()
    assert "the file of this incomplete scan changed: resuming it" in watch_log
    assert watch_log.splitlines()[-1].endswith("1 finished, 0 incomplete, 0 failed, 0 skipped")


def test_a_complete_new_scan_moved_over_an_incomplete_one_is_processed_and_the_earlier_set_aside(recorded, tmp_path):
    """A scan ended incomplete at a pause; another scan's whole file is then moved to its name: the run resuming it is
    refused before it begins (the earlier record kept, with the refusal), and the daemon sets the earlier results
    aside and processes the new scan (it logged "processed by another run ... left to it" and skipped it)."""
    truth, _ = recorded
    config, out = write_config(tmp_path, truth)
    config.write_text(config.read_text().replace("idle_timeout_s: 60", "idle_timeout_s: 1.5"))
    other, expected = another_scan(tmp_path, config)
    root, scan_file, scan_out = one_scan(tmp_path, out)
    daemon = start_daemon(root, config, tmp_path)
    first, _ = paused_acquisition(truth, scan_file)  # killed below, never resumed (its event's lock dies with it)
    try:
        wait_for("the scan to end incomplete at the pause", lambda: "tried again when the file changes" in
                 logs(out / "dctstream-watch.log"), proc=daemon)
        first._worker.kill()
        first._worker.join(30)
        with h5py.File(tmp_path / "moved.h5", "w") as f:  # another scan's whole file, moved to the name
            with h5py.File(other.path, "r") as src:
                for name in ("/1.1/measurement/marana", "/1.1/measurement/diffrz"):
                    f[name] = src[name][()]
            f["/1.1/end_time"] = "2026-12-07T22:00:00"
        os.replace(tmp_path / "moved.h5", scan_file)
        wait_for("the new scan to finish", lambda: record(scan_out).get("state") == "finished", proc=daemon)
        assert stop(daemon) == 0
    finally:
        first._worker.kill()
        daemon.kill()
    assert_same_spots(scan_out, expected)
    earlier = record(scan_out.with_name("s_0001_1.1.1"))
    assert earlier["state"] == "incomplete" and earlier["superseded"] and "refused" not in earlier
    watch_log = (out / "dctstream-watch.log").read_text()
    assert "a new acquisition under the same name: the results of the earlier one (incomplete) moved to" in watch_log
    assert watch_log.splitlines()[-1].endswith("1 finished, 0 incomplete, 0 failed, 0 skipped")


def test_a_new_acquisition_into_the_same_file_mid_scan(recorded, tmp_path):
    """The scan file written anew by another acquisition while its scan is processed: the scan processed so far
    ends incomplete (``replaced``), its results are set aside in ``OUT.1`` with their record, and the new
    acquisition is processed into ``OUT`` from its first frame (the run resuming the first scan refused it)."""
    truth, expected_first = recorded
    config, out = write_config(tmp_path, truth)
    other, expected = another_scan(tmp_path, config)
    assert len(expected) >= 5 and not np.array_equal(expected["centroid_x"][:5], expected_first["centroid_x"][:5])
    root, scan_file, scan_out = one_scan(tmp_path, out)
    aside = scan_out.with_name("s_0001_1.1.1")
    daemon = start_daemon(root, config, tmp_path)
    first, _ = paused_acquisition(truth, scan_file)
    second, resume = None, None
    try:
        wait_for("the first scan to be read to its pause",
                 lambda: status(scan_out).get("stats", {}).get("frames_read", 0) >= 20, proc=daemon)
        first._worker.kill()  # the acquisition is started again, into the same file
        first._worker.join(30)
        second, resume = paused_acquisition(other, scan_file, frame=5)
        wait_for("the first scan's results to be set aside", lambda: record(aside).get("superseded"), proc=daemon)
        resume.set()
        wait_for("the new scan to finish", lambda: record(scan_out).get("state") == "finished", proc=daemon)
        second.join(TIMEOUT_S)
        assert stop(daemon) == 0
    finally:
        if resume is not None:
            resume.set()
        daemon.kill()
    watch_log = (out / "dctstream-watch.log").read_text()
    assert_same_spots(scan_out, expected)
    assert record(scan_out)["end_reason"] in ("end_time", "complete"), logs(scan_out / "run.log", out / "dctstream-watch.log")
    earlier = record(aside)
    assert earlier["state"] == "incomplete" and earlier["end_reason"] == "replaced" and earlier["frames_read"] >= 20
    assert earlier["superseded"] == "its scan file was written anew by another acquisition"
    table = read_spot_table(aside / "spots.h5")  # the first scan's spots closed before it was cut, as they were
    # closed before the last window, clear of the turn's seam (frame 0's spots join the last frames'): as in the
    # whole scan's table
    done = (table["end_frame"] < 20 - 11) & (table["start_frame"] > 0)
    assert done.sum() >= 3
    for x, y in zip(table["centroid_x"][done], table["centroid_y"][done]):
        assert np.any((expected_first["centroid_x"] == x) & (expected_first["centroid_y"] == y))
    assert "written anew after" in (aside / "run.log").read_text()
    assert "frame 0 is not that of the scan" in (aside / "run.log").read_text()  # the refused resume's, kept
    assert "a new acquisition under the same name: the results of the earlier one (incomplete) moved to" in watch_log
    assert watch_log.splitlines()[-1].endswith("1 finished, 0 incomplete, 0 failed, 0 skipped")


def test_a_scan_a_run_refused_as_a_new_acquisition_is_processed_at_the_next_start(recorded, tmp_path):
    """A scan whose run was refused because its file holds a new acquisition (``error_type: AnotherScanError``,
    e.g. the daemon stopped before it set the earlier results aside, or a run by hand): at the next start the
    folder is set aside in ``OUT.1`` and the scan processed into ``OUT`` (it was skipped as failed)."""
    truth, expected = recorded
    config, out = write_config(tmp_path, truth)
    root, scan_file, scan_out = one_scan(tmp_path, out)
    shutil.copyfile(truth.path, scan_file)
    scan_out.mkdir(parents=True)
    (scan_out / "spots.h5").write_bytes(b"the earlier acquisition's")
    write_record(scan_out, {"state": "failed", "error_type": "AnotherScanError", "error": "frame 0 is not that ..."})
    daemon = start_daemon(root, config, tmp_path)
    try:
        wait_for("the new scan to finish", lambda: record(scan_out).get("state") == "finished", proc=daemon)
        assert stop(daemon) == 0
    finally:
        daemon.kill()
    assert_same_spots(scan_out, expected)
    aside = scan_out.with_name("s_0001_1.1.1")
    assert (aside / "spots.h5").read_bytes() == b"the earlier acquisition's"
    assert record(aside)["error_type"] == "AnotherScanError" and record(aside)["superseded"]
    assert "a new acquisition under the same name: the results of the earlier one (failed) moved to" in \
        (out / "dctstream-watch.log").read_text()


def test_sigterm_stops_the_scan_in_progress(recorded, tmp_path):
    truth, _ = recorded
    config, out = write_config(tmp_path, truth)
    root = tmp_path / "data"
    scan_file = root / "a" / "b" / "c" / "c.h5"
    scan_file.parent.mkdir(parents=True)
    scan_out = out / "a" / "b" / "c" / "c_1.1"
    daemon = start_daemon(root, config, tmp_path)
    acquisition, resume = paused_acquisition(truth, scan_file)
    try:
        # frames corrected, not only read: the reader thread runs ahead of the one that opens the outputs at the
        # first frame (on a loaded machine a stop came between them: no spots.h5 to read below)
        wait_for("the scan to start", lambda: status(scan_out).get("stats", {}).get("frames_corrected", 0) >= 1,
                 proc=daemon)
        assert stop(daemon) == 0
    finally:
        resume.set()
        daemon.kill()
        acquisition.join(TIMEOUT_S)
    rec = record(scan_out)
    assert rec.get("state") == "stopped" and rec["frames_read"] < 60, logs(scan_out / "run.log",
                                                                            tmp_path / "daemon.txt")
    assert "did not stop" not in (scan_out / "run.log").read_text()  # the source waiting for a frame stopped too
    assert plan(scan_out) == "redo"
    read_spot_table(scan_out / "spots.h5")  # consistent files


def test_the_daemon_log_is_rotated(tmp_path):
    import logging

    from dctstream.daemon import Daemon

    (tmp_path / "data").mkdir()
    cfg = load_config(None, [f"output.dir={tmp_path / 'out'}", "watch.log_max_mb=0.001", "watch.log_backups=2"])
    daemon = Daemon(tmp_path / "data", cfg)
    daemon.out_root.mkdir(parents=True)
    handler = daemon._log_file()
    try:
        for i in range(200):
            logging.getLogger("dctstream.daemon").info("line %d of a long night of scans", i)
    finally:
        logging.getLogger("dctstream").removeHandler(handler)
        logging.getLogger("dctstream").setLevel(daemon._log_level)
        handler.close()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["dctstream-watch.log", "dctstream-watch.log.1", "dctstream-watch.log.2"]
    assert all(p.stat().st_size <= 1100 for p in (tmp_path / "out").iterdir())
    assert "line 199 of" in (tmp_path / "out" / "dctstream-watch.log").read_text()


def test_the_signal_handler_takes_no_lock_the_main_thread_may_hold(tmp_path):
    from dctstream.daemon import Daemon

    daemon = Daemon(tmp_path, load_config(None, [f"output.dir={tmp_path / 'out'}"]))
    # the handler runs between two bytecodes of the main thread, which may be inside its wait's lock
    with daemon._stop._cond:
        handler = threading.Thread(target=daemon._on_signal, args=(signal.SIGTERM, None), daemon=True)
        handler.start()
        handler.join(5)
        assert not handler.is_alive(), "the signal handler waits for a lock its own thread holds: deadlock"
    assert daemon.stopping


def test_a_scan_killed_while_the_daemon_stops_is_recorded_stopped_not_running(tmp_path):
    from dctstream.daemon import Daemon, Scan

    (tmp_path / "data").mkdir()
    daemon = Daemon(tmp_path / "data", load_config(None, [f"output.dir={tmp_path / 'out'}"]))
    scan = Scan(tmp_path / "data" / "s.h5", "/1.1/measurement/marana", tmp_path / "out" / "s_1.1")
    scan.out_dir.mkdir(parents=True)
    write_record(scan.out_dir, {"state": "running", "frames_read": 7})
    child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    child.wait(30)
    daemon.running[scan.key] = (scan, child)
    daemon.stop()
    daemon._reap()
    rec = record(scan.out_dir)
    assert rec["state"] == "stopped" and rec["frames_read"] == 7 and rec["exit_code"] == -9
    assert plan(scan.out_dir) == "redo" and daemon.failed == 0


@pytest.mark.parametrize("other", ["writing", "finished"])
def test_a_scan_another_daemon_processes_is_left_to_it_not_failed(tmp_path, other):
    """Two daemons on one folder: the child of one was refused (the folder in use by the other's run, or already
    holding its results) and the scan was logged and counted failed -- and a failed record written into the other
    run's folder. Now it is left to the other run: skipped, its record untouched; and a scan whose folder is held
    is not started at all."""
    from dctstream.daemon import Daemon, Scan
    from dctstream.outdir import OutputLock

    (tmp_path / "data").mkdir()
    daemon = Daemon(tmp_path / "data", load_config(None, [f"output.dir={tmp_path / 'out'}"]))
    scan = Scan(tmp_path / "data" / "s.h5", "/1.1/measurement/marana", tmp_path / "out" / "s_1.1")
    scan.out_dir.mkdir(parents=True)
    theirs = {"state": "running" if other == "writing" else "finished", "pid": os.getpid(), "frames_read": 7}
    write_record(scan.out_dir, theirs)
    lock = OutputLock(scan.out_dir) if other == "writing" else None  # the other run, alive
    try:
        child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])  # refused
        child.wait(30)
        daemon.running[scan.key] = (scan, child)
        daemon._reap()
        assert (daemon.failed, daemon.skipped) == (0, 1)
        assert record(scan.out_dir) == theirs
        if lock is not None:
            daemon.queue.append(scan)
            daemon._launch()
            assert not daemon.running and daemon.skipped == 2
            daemon._discover()
            assert not daemon.queue  # still held: still the other's
            lock.release()  # the other daemon stopped, its run unfinished: this one takes the scan up (it was
            lock = None  # counted skipped and never looked at again)
            daemon._discover()
            assert list(daemon.queue) == [scan] and daemon.skipped == 1 and not daemon.held
    finally:
        if lock is not None:
            lock.release()


def test_a_file_without_a_scan_is_said_once_it_is_still(tmp_path, caplog):
    """Not HDF5, or its frames not at watch.dataset (a typo, another camera): said once, with what it holds,
    once unchanged for EMPTY_FILE_S (a file being written gets its datasets first); it waited unsaid for ever."""
    import logging

    from dctstream.daemon import EMPTY_FILE_S, Daemon

    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c").mkdir()
    (root / "a" / "a.h5").write_text("not HDF5")
    with h5py.File(root / "b" / "b.h5", "w") as f:
        f["/1.1/measurement/frelon"] = np.zeros((3, 4, 4), np.uint16)
    with h5py.File(root / "c" / "c.h5", "w") as f:
        f["/1.1/measurement/frelon"] = np.zeros((3, 4, 4), np.uint16)
    old = time.time() - 2 * EMPTY_FILE_S
    for path in (root / "a" / "a.h5", root / "b" / "b.h5"):
        os.utime(path, (old, old))
    daemon = Daemon(root, load_config(None, [f"output.dir={tmp_path / 'out'}", 'watch.glob="*/*.h5"']))
    with caplog.at_level(logging.WARNING, logger="dctstream"):
        daemon._discover()
        daemon._discover()
    said = [r.getMessage() for r in caplog.records if "no scan to process" in r.getMessage()]
    assert said == [f"{root / 'a' / 'a.h5'}: no scan to process: not an HDF5 file that can be read",
                    f"{root / 'b' / 'b.h5'}: no scan to process: no dataset matches watch.dataset "
                    "/1.1/measurement/marana (stacks of frames in it: /1.1/measurement/frelon)"]
    assert not daemon.queue
    # counted apart from the scans (the summary said "0 skipped" after these warnings, and nothing of them)
    assert daemon.header().endswith("0 finished, 0 incomplete, 0 failed, 0 skipped, 2 files without a scan to "
                                    f"process; log {getattr(daemon, 'log_path', '-')}")
