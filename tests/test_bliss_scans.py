"""``dctstream watch redis://...``: the scans Bliss publishes, followed one after the other by the daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from dctstream.bliss_scans import matches, out_folder, parse_filter
from dctstream.cli import main
from dctstream.config import load_config
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table

from blissdata_server import Publisher

TIMEOUT_S = 120
SETTINGS = """
background: {{window: 11}}
segmentation: {{max_blob_size: [20, 20, 5]}}
dark: {{url: "{dark}"}}
source: {{angles: auto, idle_timeout_s: 60}}
status: {{interval_s: 0.2, log_every_s: 1.0}}
quicklook: {{enabled: false}}
watch: {{poll_interval_s: 0.2}}
output: {{checkpoint_every_frames: 2}}
"""


def _scan(name="dct_a", number=3, info=None, **identity):
    return SimpleNamespace(name=name, number=number, info=info or {}, **identity)


def test_filters_take_the_name_or_a_key_of_the_info_or_identity():
    scan = _scan(info={"title": "fscan diffrz 0 0.25 1440 0.05", "npoints": 1440}, dataset="s1_0001")
    assert parse_filter("dct*") == (None, "dct*") and parse_filter("title=fscan *") == ("title", "fscan *")
    assert matches(scan, []) and matches(scan, [parse_filter("dct_*")]) and not matches(scan, [parse_filter("ct*")])
    assert matches(scan, [parse_filter("dct*"), parse_filter("title=fscan diffrz*"), parse_filter("npoints=1440")])
    assert not matches(scan, [parse_filter("dct*"), parse_filter("title=ascan*")])  # every filter must pass
    assert matches(scan, [parse_filter("dataset=s1_*")])  # identity, not info
    assert not matches(scan, [parse_filter("sample=*")])  # a key the scan lacks


def test_a_scans_folder_is_named_from_its_identity_number_and_name(tmp_path):
    esrf = _scan(proposal="ma1234", collection="s1", dataset="s1_0001")
    assert out_folder(tmp_path, esrf) == tmp_path / "ma1234" / "s1" / "s1_0001" / "3_dct_a"
    plain = _scan(name="dct scan/2", path="/data/id11/s1_0002.h5")
    assert out_folder(tmp_path, plain) == tmp_path / "s1_0002" / "3_dct_scan_2"


def test_a_server_that_is_not_there_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("blissdata", reason="blissdata is not installed (pip install '.[bliss]')")
    assert main(["watch", "redis://127.0.0.1:1", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dctstream: error: redis://127.0.0.1:1: cannot reach the blissdata server (")
    assert err.endswith("expected Redis with blissdata's modules") and "\n" not in err


def test_a_restarted_watch_takes_up_only_the_stopped_runs_of_its_server_still_in_redis(bliss_url, scan_frames,
                                                                                       tmp_path):
    from dctstream.bliss_scans import BlissScanFinder
    from dctstream.record import write_record

    frames, angles = scan_frames
    scan = Publisher(bliss_url, frames[:3], angles[:3], tmp_path, name="dct_old")
    scan.start()
    scan.finish()
    out = (tmp_path / "out").resolve()

    def run(folder, state, url=bliss_url, key=scan.key):
        folder.mkdir(parents=True)
        write_record(folder, {"state": state, "config": {"source": {"url": url, "scan": key}}})

    run(out / "a" / "1_stopped", "stopped")
    run(out / "a" / "2_killed", "running")
    for name, state in (("finished", "finished"), ("failed", "failed"), ("aborted", "incomplete")):
        run(out / "a" / name, state)
    run(out / "a" / "other_server", "stopped", url="redis://elsewhere:25002")
    run(out / "a" / "gone", "stopped", key="esrf:scan:01GONE")
    run(out / "a" / "1_stopped" / ".dctstream" / "previous", "stopped")
    finder = BlissScanFinder(bliss_url, load_config(None, [f"output.dir={out}"]))
    taken = finder.left_unfinished()
    assert [s.out_dir for s in taken] == [out / "a" / "1_stopped", out / "a" / "2_killed"]
    assert {(s.scan_key, s.name, s.number) for s in taken} == {(scan.key, "dct_old", 1)}
    assert finder.new_scans() == []  # the scan was there before the finder


def test_a_server_gone_for_a_while_is_said_once_and_asked_again(bliss_url, monkeypatch, tmp_path, caplog):
    import redis

    from dctstream.bliss_scans import BlissScanFinder

    caplog.set_level("INFO", logger="dctstream.bliss_scans")
    finder = BlissScanFinder(bliss_url, load_config(None, [f"output.dir={tmp_path}"]))

    def gone(**kwargs):
        raise redis.ConnectionError("Connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(finder._store, "get_next_scan", gone)
        assert finder.new_scans() == [] and finder.new_scans() == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{bliss_url}: cannot reach the blissdata server (Connection refused): trying again"]
    assert finder.new_scans() == []
    assert caplog.records[-1].getMessage() == f"{bliss_url}: the blissdata server answers again"


# -- the daemon on a real server -----------------------------------------------------------------------------


def _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides, name):
    path = tmp_path / f"{name}.h5"
    with h5py.File(path, "w") as f:
        f["frames"], f["angles"] = frames, angles
    out = tmp_path / name
    cfg = load_config(None, [f"source.url={path}::/frames", f"source.angles={path}::/angles", f"output.dir={out}",
                             f"dark.url={tiny_scan.dark_url}", "quicklook.enabled=false", *tiny_overrides])
    process_scan(cfg, display=False)
    return read_spot_table(out / "spots.h5")


def _assert_same_spots(out_dir: Path, expected: dict) -> None:
    got = read_spot_table(out_dir / "spots.h5")
    assert got.keys() == expected.keys() and len(expected["id"]) > 0
    for column in expected:
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)


def _record(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _status(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for(what, predicate, proc, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _log(out: Path) -> str:
    try:
        return (out / "dctstream-watch.log").read_text()
    except OSError:
        return ""


def _start_daemon(url, config, out, tmp_path, name="daemon") -> subprocess.Popen:
    with open(tmp_path / f"{name}.txt", "ab") as console:
        proc = subprocess.Popen([sys.executable, "-m", "dctstream", "watch", url, "--config", str(config),
                                 "--out", str(out), "--filter", "dct_*", "--filter", "type=fscan"],
                                stdout=console, stderr=subprocess.STDOUT)
    started = _log(out).count("; results in ") + 1
    _wait_for("the daemon to watch", lambda: _log(out).count("; results in ") == started, proc, timeout_s=60)
    return proc


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


@pytest.fixture
def config(tmp_path, tiny_scan):
    path = tmp_path / "watch.yml"
    path.write_text(SETTINGS.format(dark=tiny_scan.dark_url))
    return path


def test_watch_follows_one_scan_after_the_other(bliss_url, scan_frames, tiny_scan, tiny_overrides, config, tmp_path):
    """Three DCT scans published one after the other (the second aborted) and an alignment scan among them:
    each DCT scan in its own folder, its spots those of an offline run on the frames it had."""
    frames, angles = scan_frames
    out = tmp_path / "out"
    daemon = _start_daemon(bliss_url, config, out, tmp_path)
    scans = [Publisher(bliss_url, frames, angles, tmp_path, name="dct_a", number=1),
             Publisher(bliss_url, frames[:4], angles[:4], tmp_path, name="align", number=2),
             Publisher(bliss_url, frames, angles, tmp_path, name="dct_b", number=3, abort_after=25),
             Publisher(bliss_url, frames, angles, tmp_path, name="dct_c", number=4)]
    folders = [out / s.name / f"{s.number}_{s.name}" for s in scans]
    try:
        for scan in scans:  # as Bliss runs them: one after the other
            scan.start()
            scan.finish()
        for folder in folders[:1] + folders[2:]:
            _wait_for(f"{folder.name} to end", lambda: _record(folder).get("state") in ("finished", "incomplete"),
                      daemon)
        assert _stop(daemon) == 0
    finally:
        daemon.kill()
    complete = _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides, "offline")
    _assert_same_spots(folders[0], complete)
    _assert_same_spots(folders[3], complete)
    _assert_same_spots(folders[2], _offline(tmp_path, frames[:25], angles[:25], tiny_scan, tiny_overrides, "offline25"))
    for scan, folder in zip(scans, folders):
        if scan.name != "align":
            assert _record(folder)["config"]["source"]["scan"] == scan.key
    assert [_record(f)["state"] for f in folders[2:]] == ["incomplete", "finished"]
    assert "scan_aborted after 25 frames" in _record(folders[2])["incomplete"]
    assert not folders[1].exists()
    log = _log(out)
    assert f"{scans[1].key} (align 2) does not match the filters, skipped" in log
    assert log.count(": new scan") == 3 and log.count(": finished, ") == 2
    assert f"{scans[2].key} (dct_b 3): incomplete (" in log and "the scan is over" in log


def test_sigterm_stops_the_scan_and_a_restarted_watch_resumes_it(bliss_url, scan_frames, tiny_scan, tiny_overrides,
                                                                 config, tmp_path):
    frames, angles = scan_frames
    out = tmp_path / "out"
    resume = threading.Event()
    scan = Publisher(bliss_url, frames, angles, tmp_path, name="dct_held", number=7, hold=(20, resume))
    folder = out / "dct_held" / "7_dct_held"
    daemon = _start_daemon(bliss_url, config, out, tmp_path)
    try:
        scan.start()
        _wait_for("the scan to be half processed", lambda: _status(folder).get("stats", {}).get("frames_read", 0) >= 20,
                  daemon)
        assert _stop(daemon) == 0  # Bliss is still acquiring
        assert _record(folder)["state"] == "stopped"

        daemon = _start_daemon(bliss_url, config, out, tmp_path, "restarted")
        _wait_for("the stopped scan to be taken up again",
                  lambda: f"{scan.key} (dct_held 7): left unfinished by an earlier run: resuming it" in _log(out),
                  daemon)
        resume.set()
        scan.finish()
        _wait_for("the scan to finish", lambda: _record(folder).get("state") == "finished", daemon)
        assert _stop(daemon) == 0
    finally:
        resume.set()
        daemon.kill()
    _assert_same_spots(folder, _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides, "offline"))
    run_log = (folder / "run.log").read_text()
    assert run_log.count("dctstream watch starts this scan") == 2 and "from its checkpoint at frame" in run_log
