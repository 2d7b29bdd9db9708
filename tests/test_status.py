"""The status snapshot, its live view and log line, OUT/status.json, the run record and `dctstream status`."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from rich.console import Console

from dctstream.cli import main
from dctstream.config import load_config
from dctstream.pipeline import Stats
from dctstream.record import run_record
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table
from dctstream.status import (STATUS_FILE, LiveStatus, LogStatus, ScanMonitor, open_display, read_status, render,
                              sparkline, stats_dict, status_line)
from simulators.replay_file import replay_hdf5, start_in_process


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fed_monitor(tmp_path, **stats_fields):
    """A monitor fed 400 of 600 frames read at 50 frames/s, 349 segmented, with a fixed clock."""
    cfg = load_config(None, ["source.url=scan.h5::/1.1/measurement/marana", f"output.dir={tmp_path / 'out'}",
                             "background.window=101"])
    clock = Clock()
    monitor = ScanMonitor(cfg, clock=clock)
    stats = Stats(frames_total=600, **stats_fields)
    for k in range(400):
        clock.now = 1000.0 + k / 50
        stats.frames_read = k + 1
        stats.frames_corrected = stats.frames_segmented = max(k + 1 - 51, 0)
        monitor(stats)
    clock.now += 0.02
    return monitor, stats


def text_of(renderable, width=100) -> str:
    console = Console(width=width, color_system=None, force_terminal=True, file=io.StringIO(), legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def test_live_panel_text(tmp_path):
    monitor, stats = fed_monitor(tmp_path, difspots_written=140,
                                 rejected=Counter(too_small=12, seed_min_voxels=8), direct_beam=(10, 20, 30, 40))
    snap = monitor.snapshot()
    text = text_of(render([snap], header="watching /data"))
    lines = [line.strip("│ ").rstrip(" │") for line in text.splitlines()]
    assert lines[0] == "watching /data"
    assert "running — scan.h5::/1.1/measurement/marana" in lines[1]
    assert any(line.startswith("━") and "67%  50.0/s  ETA 0:00:04" in line for line in lines), text
    assert "frames     received 400/600, corrected 349, segmented 349" in lines
    assert "rate       acquisition 50.0/s, processing 50.0/s, backlog –" in lines
    assert "latency    51 frames, 1.0 s; ring –" in lines
    assert "background exact, window 101, normalise auto; direct beam [10, 20, 30, 40]" in lines
    assert "blobs      open –, closed 160, rejected 20 (seed_min_voxels 8, too_small 12)" in lines
    assert "difspots   140 written" in lines
    assert "warnings   none" in lines
    assert any(line.startswith("memory") and line.endswith(" MB") for line in lines)


def test_snapshot_numbers(tmp_path):
    monitor, stats = fed_monitor(tmp_path, frames_missing=3)
    snap = monitor.snapshot()
    assert snap["rates"]["acquisition_fps"] == pytest.approx(50.0, rel=0.01)
    # frame 348, the last one segmented, was read 51 frames (1.02 s) before the last frame read, 0.02 s ago
    assert snap["latency"] == {"frames": 51, "seconds": pytest.approx(1.02 + 0.02, abs=1e-6)}
    assert snap["warnings"] == ["3 frames lost in transit (dropped frames)"]
    json.dumps(snap, allow_nan=False)  # a snapshot is plain JSON


def test_unusable_frames_are_a_warning_of_the_status(tmp_path):
    unusable = [[300, 300], [350, 364], [400, 400], [500, 501], [600, 600], [700, 700]]
    monitor, _ = fed_monitor(tmp_path, normalise={"mode": "auto", "unusable_frames": 21, "unusable": unusable})
    assert monitor.snapshot()["warnings"] == [
        "21 frames unusable (beam off, or pixels stuck at 0 or the top value), read as 0: 300, 350-364, 400, "
        "500-501, 600, ..."]
    monitor, _ = fed_monitor(tmp_path, normalise={"mode": "auto", "unusable_frames": 0, "unusable": []})
    assert monitor.snapshot()["warnings"] == []


def test_slow_disk_is_said_where_writing_difspots_waits_not_where_it_computes(tmp_path):
    # 60 s into a run, 30 s of them in writing difspots: 25 s of the writing thread's CPU (many files, a fast
    # disk), then 5 s (the rest waiting on the disk)
    busy = fed_monitor(tmp_path, stage_s=Counter(write=30.0), write_cpu_s=25.0, started_s=time.monotonic() - 60)[0]
    assert busy.snapshot()["warnings"] == []
    slow = fed_monitor(tmp_path, stage_s=Counter(write=30.0), write_cpu_s=5.0, started_s=time.monotonic() - 60)[0]
    assert slow.snapshot()["warnings"] == ["slow disk: writing difspots takes 50% of the time, 42% waiting"]


def test_sparkline():
    assert sparkline([0, 1, 2, 4, 8]) == " ▁▂▄█"
    assert sparkline([0, 0]) == "  "


def test_every_stats_field_is_recorded(tmp_path):
    """Fields other engineers add to Stats appear in the snapshot and the run record without a change here."""
    Extended = dataclasses.make_dataclass("Extended", [("flat_frames", int, 7), ("mask_pixels", tuple, (1, 2))],
                                          bases=(Stats,))
    stats = Extended(frames_read=5, rejected=Counter(too_large=2))
    d = stats_dict(stats)
    assert {f.name for f in dataclasses.fields(Stats)} < set(d)
    assert d["flat_frames"] == 7 and d["mask_pixels"] == [1, 2] and d["rejected"] == {"too_large": 2}
    cfg = load_config(None, [f"output.dir={tmp_path}"])
    monitor = ScanMonitor(cfg)
    monitor(stats)
    record = run_record(cfg, monitor.snapshot())
    assert record["stats"]["flat_frames"] == 7 and record["rejected"] == {"too_large": 2}


def test_log_fallback_line(tmp_path, caplog):
    monitor, _ = fed_monitor(tmp_path, difspots_written=3)
    view = LogStatus(lambda: [monitor.snapshot()], every_s=5.0, header=lambda: "watching /data")
    with caplog.at_level(logging.INFO, logger="dctstream.status"):
        view.emit()
    assert caplog.messages[0] == "watching /data"
    assert caplog.messages[1].startswith(
        "scan.h5::/1.1/measurement/marana: running; frames received 400/600, corrected 349, segmented 349; "
        "acquisition 50.0/s, processing 50.0/s; latency 51 frames 1.0 s; difspots 3, rejected 0; ")


def test_a_fault_in_the_status_line_is_reported_once(caplog):
    """A missing status file is only unavailable (debug); a bug in making the line is said, with its traceback,
    once.  Before: both dropped at debug level."""
    def broken():
        return [{"stats": {"frames_total": 10}, "latency": {"seconds": "soon"}}]  # a bug: not a number

    view = LogStatus(broken, every_s=5.0)
    with caplog.at_level(logging.DEBUG, logger="dctstream.status"):
        view.emit()
        view.emit()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage() == "status line not made"


def test_a_bad_log_call_kept_for_the_status_is_reported(capsys):
    from dctstream.status import _WarningLog

    handler = _WarningLog()
    record = logging.LogRecord("dctstream.x", logging.WARNING, __file__, 1, "frame %d", ("not a number",), None)
    handler.emit(record)
    assert list(handler.messages) == []
    assert "--- Logging error ---" in capsys.readouterr().err


def test_stats_read_whole_while_every_thread_adds_its_stage_time():
    """The status reads the stats on its own thread while the stages add their time, each under its own
    name (new names appear mid-run): every read is whole, and no second is lost."""
    import threading

    from dctstream.pipeline import Stats
    from dctstream.status import stats_dict

    stats = Stats()

    def add(name):
        for i in range(3000):
            stats.add_stage_s(f"{name}{i % 300}", 1.0)

    threads = [threading.Thread(target=add, args=(name,)) for name in "abcd"]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads) or reads == 0:
        read = stats_dict(stats)
        assert set(read) >= {"stage_s", "frames_read", "elapsed_s"}
        reads += 1
    for t in threads:
        t.join(10)
    assert sum(stats.stage_s.values()) == 4 * 3000
    assert stats_dict(stats)["stage_s"]["a0"] == 10.0


def test_source_counters_reach_the_status_and_the_record(tmp_path):
    """What the source met (frames dropped, reopens, waits) is in the snapshot, the log line, the live view
    and the run record; counters at 0 are not shown."""
    from types import SimpleNamespace

    monitor, stats = fed_monitor(tmp_path)
    source = SimpleNamespace(counters={"missing": 3, "reopens": 1, "looks": 0})
    monitor.attach(SimpleNamespace(stats=stats, source=source))
    snap = monitor.snapshot()
    assert snap["source_counters"] == {"missing": 3, "reopens": 1, "looks": 0}
    assert "; source: missing 3, reopens 1;" in status_line(snap) + ";"
    assert "│ source     missing 3, reopens 1 " in text_of(render([snap]))
    record = run_record(monitor.cfg, snap)
    assert record["source_counters"] == {"missing": 3, "reopens": 1, "looks": 0}


def test_display_is_chosen_by_the_terminal(tmp_path):
    piped = Console(file=io.StringIO())
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    assert isinstance(open_display(lambda: [], console=piped), LogStatus)
    assert isinstance(open_display(lambda: [], console=terminal), LiveStatus)


def test_live_view_pulls_snapshots_on_its_own_thread(tmp_path):
    monitor, _ = fed_monitor(tmp_path)
    callers = set()

    def snapshots():
        callers.add(threading.current_thread().name)
        return [monitor.snapshot()]

    console = Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)
    with LiveStatus(snapshots, console, refresh_per_second=20):
        deadline = time.monotonic() + 5
        while len(callers - {threading.main_thread().name}) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert callers - {threading.main_thread().name}, callers
    assert "frames     received 400/600" in console.file.getvalue()


# -- a real run: status.json, run.json, `dctstream status` -----------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("status") / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", "background.window=11",
                             "segmentation.max_blob_size=[20,20,5]", f"output.dir={out}"])
    stats = process_scan(cfg, display=False)
    return cfg, stats, out


def test_run_record(finished):
    cfg, stats, out = finished
    record = json.loads((out / "run.json").read_text())
    assert record["state"] == "finished" and record["end_reason"] == "complete" and record["error"] is None
    assert record["source"] == cfg.source.url and record["dark"] == cfg.dark.url
    assert record["frames_processed"] == 40 == stats.frames_segmented
    assert record["spots"] == stats.difspots_written == len(read_spot_table(out / "spots.h5")["id"])
    assert record["rejected"] == dict(stats.rejected)
    assert record["config"]["background"]["window"] == 11
    assert record["dctstream_version"] and record["started_utc"] <= record["ended_utc"]
    assert record["stats"]["stage_s"]["segment"] > 0
    assert sorted(record["quicklook"]) == sorted(f"quicklook/{n}" for n in os.listdir(out / "quicklook"))
    assert not list(out.glob(".*.tmp"))


def test_status_command_reads_another_process(finished, capsys):
    cfg, stats, out = finished
    snap = read_status(out)
    assert snap["state"] == "finished" and snap["stats"]["difspots_written"] == stats.difspots_written
    proc = subprocess.run([sys.executable, "-m", "dctstream", "status", str(out), "--line"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == status_line(snap)
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"difspots   {stats.difspots_written} written" in text and "finished — " in text
    assert "rate       reading " in text  # a recorded file: no acquisition to keep up with


def test_status_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dctstream: error: {tmp_path}: no status.json or run.json, expected the output folder of a dctstream run"


def pause_at(resume, frame: int, k: int) -> None:
    """The acquisition's on_frame: after writing ``frame`` it holds the file open until ``resume`` is set."""
    if k == frame:
        resume.wait(120)


def test_sigterm_stops_a_live_run_and_records_it(tiny_scan, tiny_set_args, tmp_path):
    live, out = tmp_path / "live.h5", tmp_path / "out"
    resume = multiprocessing.get_context("spawn").Event()  # the acquisition stops after frame 20 until set
    acquisition = start_in_process(replay_hdf5, tiny_scan.frames_url, str(live), fps=50,
                                   on_frame=functools.partial(pause_at, resume, 20))
    proc = subprocess.Popen([sys.executable, "-m", "dctstream", "run", "--source", f"{live}::/1.1/measurement/marana",
                             "--out", str(out), *tiny_set_args, "--set", "status.interval_s=0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / "status.json").exists() and read_status(out)["stats"].get("frames_segmented", 0) > 0:
                break
            time.sleep(0.1)
        record = json.loads((out / "run.json").read_text())
        assert record["state"] == "running" and record["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        resume.set()
        proc.kill()
        acquisition.join(60)
    assert proc.returncode == 130, err
    record = json.loads((out / "run.json").read_text())
    assert record["state"] == "stopped" and record["end_reason"] == "stopped"
    assert 0 < record["frames_read"] <= 20
    table = read_spot_table(out / "spots.h5")  # whole and readable
    assert sorted(p.name for p in (out / "difspots").iterdir()) == sorted(f"{i:06d}.h5" for i in table["id"])


def _monitored_source(tmp_path):
    """A monitor attached to a pipeline stand-in whose source lists ``frames_listed``, and the monitor's clock."""
    class Source:
        frames_listed = 0

    class FakePipeline:
        source, background, segmenter, table = Source(), None, None, None
        stats = Stats()

    monitor = ScanMonitor(load_config(None, [f"output.dir={tmp_path}"]), clock=(clock := Clock()))
    pipeline = FakePipeline()
    monitor.attach(pipeline)
    return monitor, pipeline, clock


def test_acquisition_rate_comes_from_the_source_when_processing_lags(tmp_path):
    """Processing at 20 frames/s a scan written at 50: the panel says so, and warns."""
    monitor, pipeline, clock = _monitored_source(tmp_path)
    for k in range(201):  # 4 s
        clock.now = 1000.0 + k / 50
        pipeline.source.frames_listed = k + 1
        if k % 5 == 0:  # 2 of every 5 frames written are read
            pipeline.stats.frames_read += 2
            pipeline.stats.frames_segmented = pipeline.stats.frames_read
            monitor(pipeline.stats)
        if k % 25 == 0:
            snap = monitor.snapshot()  # the display and status.json take a snapshot a few times a second
    assert snap["rates"]["acquisition_fps"] == pytest.approx(50.0)
    assert snap["rates"]["processing_fps"] == pytest.approx(20.0, rel=0.05)
    assert snap["backlog_frames"] == 201 - 82
    assert snap["warnings"] == ["falling behind the acquisition: 119 frames not read yet"]


def test_acquisition_rate_when_the_source_looks_now_and_then(tmp_path):
    """A lagging source lists new frames only when it looks (here every 2 s): still 50 frames/s."""
    monitor, pipeline, clock = _monitored_source(tmp_path)
    for tick in range(41):  # snapshots 4 times a second for 10 s
        clock.now = 1000.0 + tick / 4
        if tick % 8 == 0:
            pipeline.source.frames_listed = 1 + 50 * tick // 4  # a look every 2 s
        pipeline.stats.frames_read = 10 * tick  # 40 frames/s read: behind
        monitor(pipeline.stats)
        snap = monitor.snapshot()
    assert snap["rates"]["acquisition_fps"] == pytest.approx(50.0)


def test_acquisition_rate_after_the_file_shrank_is_not_negative(tmp_path):
    """A file replaced by a new acquisition lists fewer frames: no rate (it said -8.1/s), then the new one's."""
    monitor, pipeline, clock = _monitored_source(tmp_path)
    rates = []
    for tick in range(41):  # 4 snapshots a second; 20 frames/s, the file replaced at 5 s
        clock.now = 1000.0 + tick / 4
        pipeline.source.frames_listed = 1 + 5 * tick if tick < 20 else 1 + 5 * (tick - 20)
        pipeline.stats.frames_read = min(pipeline.stats.frames_read + 3, pipeline.source.frames_listed)
        monitor(pipeline.stats)
        rates.append(monitor.snapshot()["rates"]["acquisition_fps"])
    assert all(r is None or r >= 0 for r in rates), rates
    assert rates[-1] == pytest.approx(20.0), rates


def test_a_running_snapshot_whose_process_is_gone_reads_as_stopped(tmp_path):
    """A run killed (SIGKILL, out of memory) left status.json saying running, with an ETA, and status --follow
    waited for ever; its process gone, or holding no lock on the folder, it reads as stopped, and why."""
    from dctstream import outdir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    snap = {"state": "running", "host": socket.gethostname(), "pid": dead.pid, "stats": {}, "warnings": ["w"]}
    (tmp_path / STATUS_FILE).write_text(json.dumps(snap))
    got = read_status(tmp_path)
    assert got["state"] == "stopped" and got["warnings"][1:] == ["w"]
    assert f"its process (pid {dead.pid}) is gone without finishing" in got["warnings"][0]
    lock = outdir.OutputLock(tmp_path)  # this process, holding the folder: running
    (tmp_path / STATUS_FILE).write_text(json.dumps({**snap, "pid": os.getpid()}))
    assert read_status(tmp_path)["state"] == "running"
    lock.release()  # alive, but holding nothing: its pid taken by another process since
    assert read_status(tmp_path)["state"] == "stopped"
    (tmp_path / STATUS_FILE).write_text(json.dumps({**snap, "host": "another-machine"}))
    assert read_status(tmp_path)["state"] == "running"  # cannot be told from here


def test_status_follow_prints_lines_where_it_draws_no_panel(tmp_path, capsys, monkeypatch):
    """--follow --line, or --follow into a pipe or a log: a line per scan each time its snapshot changes, until
    none is running (the panel's last frame only, at the end, before; and --line was not taken)."""
    snaps = iter([{"state": "running", "source": "s.h5", "stats": {"frames_read": 10}},
                  {"state": "running", "source": "s.h5", "stats": {"frames_read": 10}},
                  {"state": "running", "source": "s.h5", "stats": {"frames_read": 20}},
                  {"state": "finished", "source": "s.h5", "stats": {"frames_read": 30}}])
    monkeypatch.setattr("dctstream.status.read_statuses", lambda out: [next(snaps)])
    assert main(["status", str(tmp_path), "--follow", "--interval", "0.01"]) == 0  # capsys: not a terminal
    out = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in out] == [
        "s.h5: running; frames received 10", "s.h5: running; frames received 20", "s.h5: finished; frames received 30"]


def test_status_lines_of_runs_under_one_folder_name_their_run_folders(tmp_path):
    """Two runs of one source (a campaign's two settings, a daemon's scans) printed lines alike: the run folder
    under the folder read tells them apart."""
    from dctstream.status import status_line

    snaps = [{"source": "s.h5::/1.1/measurement/marana", "state": "finished", "out_dir": str(tmp_path / name),
              "stats": {"frames_read": 100}} for name in ("w31", "w51")]
    lines = [status_line(snap, tmp_path) for snap in snaps]
    assert lines[0].startswith("s.h5::/1.1/measurement/marana [w31]: finished")
    assert lines[1].startswith("s.h5::/1.1/measurement/marana [w51]: finished")
    assert status_line(snaps[0]).startswith("s.h5::/1.1/measurement/marana: finished")  # one run: as before


def test_a_folder_a_run_began_in_before_its_first_status(tmp_path):
    """A ``--split`` run writes no status before its merge; killed before then, its folder holds only
    ``.dctstream/running`` (and the chunks kept): 'no status.json or run.json, expected the output folder of a
    dctstream run' said it was not a run's folder. Now: a run writing to it, or one that ended (killed?)."""
    from dctstream import outdir
    from dctstream.checkpoint import marker_path
    from dctstream.errors import InputError
    from dctstream.status import read_status

    out = tmp_path / "out"
    lock = outdir.OutputLock(out)
    marker_path(out).write_text("config")
    with pytest.raises(InputError, match=r"no status.json or run.json yet, a run is writing to it"):
        read_status(out)
    lock.release()
    with pytest.raises(InputError, match=r"no status.json or run.json yet, a run began here and ended before "
                                         r"writing one \(killed\?\): the same command resumes it"):
        read_status(out)
    with pytest.raises(InputError, match="expected the output folder of a dctstream run"):
        read_status(tmp_path)
