"""protocol: bliss — scans published frame by frame with blissdata's writer API on a real Redis server.

Each scan is published as Bliss does (``DataStore.create_scan``, a stream per
channel, ``prepare``/``start``, ``send`` per frame, ``seal``, ``stop``,
``info["end_reason"]``, ``close``), in a thread while dctstream reads it, and
the difspots found live must be those of an offline run on the same frames.
A Lima detector stream needs a detector server (Tango) for frames still in the
detector's memory: none can run here.  One Lima scan is published with
``buffer_max_number: 0`` (no frame in memory), so blissdata reads every frame
from the files Lima saved; in another the detector keeps the last frames and a
stand-in answers blissdata's Tango calls (`LimaServerStandIn`), so that
blissdata's own LimaClient decides, frame by frame, between the detector and
the files, as at a beamline.  Not tested: the Tango reads themselves (Lima's
image formats), files other than HDF5, Lima2.
"""

from __future__ import annotations

import re
import threading

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream import checkpoint
from dctstream.errors import InputError, OutputError
from dctstream.pipeline import Pipeline
from dctstream.record import read_record
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table
from dctstream.sources import open_source

from blissdata_server import PUBLISH_TIMEOUT_S, LimaServerStandIn, Publisher

blissdata = pytest.importorskip("blissdata", reason="blissdata is not installed (pip install '.[bliss]')")


def _cfg(url, out, dark_url, tiny_overrides, *more):
    return load_config(None, [f"source.url={url}", f"output.dir={out}", f"dark.url={dark_url}", "source.angles=auto",
                              "source.idle_timeout_s=30", "quicklook.enabled=false", *tiny_overrides, *more])


def _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides):
    path = tmp_path / "offline.h5"
    with h5py.File(path, "w") as f:
        f["frames"], f["angles"] = frames, angles
    out = tmp_path / "offline"
    cfg = load_config(None, [f"source.url={path}::/frames", f"source.angles={path}::/angles", f"output.dir={out}",
                             f"dark.url={tiny_scan.dark_url}", "quicklook.enabled=false", *tiny_overrides])
    process_scan(cfg, display=False)
    return read_spot_table(out / "spots.h5")


def _assert_same_spots(live_out, offline):
    live = read_spot_table(live_out / "spots.h5")
    assert live.keys() == offline.keys() and "centroid_psi_deg" in live
    assert len(offline["id"]) > 0
    for name in offline:
        np.testing.assert_array_equal(live[name], offline[name], err_msg=name)


@pytest.mark.parametrize("kind", ["array", "hdf5", "lima"])
def test_a_scan_processed_live_equals_offline(kind, bliss_url, scan_frames, tiny_scan, tiny_overrides, tmp_path):
    frames, angles = scan_frames
    publisher = Publisher(bliss_url, frames, angles, tmp_path, name=f"dct_{kind}", kind=kind, expire=12)
    publisher.start()
    assert publisher.created.wait(PUBLISH_TIMEOUT_S) and publisher.error is None
    out = tmp_path / "live"
    stats = process_scan(_cfg(bliss_url, out, tiny_scan.dark_url, tiny_overrides, f"source.scan={publisher.key}"),
                         display=False)
    publisher.finish()
    assert stats.source_end == "scan_end" and stats.frames_read == len(frames)
    assert stats.incomplete is None  # Bliss said SUCCESS: the whole scan
    _assert_same_spots(out, _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides))
    record = read_record(out)
    assert record["state"] == "finished" and record["end_reason"] == "scan_end"  # a whole scan, not "incomplete"
    auto = record["auto"]
    assert auto["source.scan"]["url"] == publisher.key
    assert auto["source.stream"]["url"] == "marana:image"
    assert auto["source.angles"] == {"url": "axis:diffrz",
                                     "reason": "the axis the scan's title names ('fscan diffrz 0 9 40 0.1')"}


def test_a_lima_scan_whose_early_frames_are_only_in_the_files(bliss_url, scan_frames, tiny_scan, tiny_overrides,
                                                              tmp_path, monkeypatch):
    """Lima saves 4 frames a file and keeps the last 12 in memory; dctstream starts after 20 frames.  Frames
    0-15 (in files already closed) come from the files, frame 16 from the detector (the scan waits until it is
    asked for), the rest from wherever each still is: each frame once, and the spots of the offline run."""
    frames, angles = scan_frames
    detector = LimaServerStandIn(buffer=12)
    from_file = detector.install(monkeypatch)
    publisher = Publisher(bliss_url, frames, angles, tmp_path, name="dct_lima_memory", kind="lima",
                          frames_per_file=4, detector=detector, early=20, hold=(20, detector.first_served))
    publisher.start()
    assert publisher.created.wait(PUBLISH_TIMEOUT_S) and publisher.error is None
    out = tmp_path / "live"
    stats = process_scan(_cfg(bliss_url, out, tiny_scan.dark_url, tiny_overrides, f"source.scan={publisher.key}"),
                         display=False)
    publisher.finish()
    assert stats.source_end == "scan_end" and stats.frames_read == len(frames)
    files = [4 * int(re.search(r"_(\d{4})\.h5$", name).group(1)) + index for name, index in from_file]
    assert sorted(files + detector.served) == list(range(len(frames)))
    assert set(range(16)) <= set(files) and 16 in detector.served
    _assert_same_spots(out, _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides))


def test_the_next_scan_whose_name_matches(bliss_url, scan_frames, tiny_scan, tiny_overrides, tmp_path):
    """Scans started after the source was opened, the first one not matching: the second one is processed."""
    frames, angles = scan_frames
    cfg = _cfg(bliss_url, tmp_path / "live", tiny_scan.dark_url, tiny_overrides, "source.scan=dct_*")
    source = open_source(cfg.source)  # from now on, scans are new
    go = threading.Event()
    other = Publisher(bliss_url, frames[:5], angles[:5], tmp_path, name="align", go=go)
    wanted = Publisher(bliss_url, frames, angles, tmp_path, name="dct_next")
    other.start()
    go.set()
    other.finish()
    wanted.start()
    stats = Pipeline(cfg, source=source).run()
    wanted.finish()
    assert stats.source_end == "scan_end"
    assert source.found["source.scan"]["url"] == wanted.key
    assert source.found["source.scan"]["reason"].startswith("the next scan whose name matches 'dct_*'")
    _assert_same_spots(tmp_path / "live", _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides))


@pytest.mark.parametrize("when", ["live", "after"])
def test_an_aborted_scan_keeps_what_was_received_and_says_so(when, bliss_url, scan_frames, tiny_scan, tiny_overrides,
                                                             tmp_path, caplog):
    """Read while Bliss publishes it, or once it is over (still in Redis)."""
    frames, angles = scan_frames
    publisher = Publisher(bliss_url, frames, angles, tmp_path, name="dct_abort", abort_after=25)
    publisher.start()
    assert publisher.created.wait(PUBLISH_TIMEOUT_S)
    if when == "after":
        publisher.finish()
    out = tmp_path / "live"
    stats = process_scan(_cfg(bliss_url, out, tiny_scan.dark_url, tiny_overrides, f"source.scan={publisher.key}"),
                         display=False)
    publisher.finish()
    assert stats.source_end == "scan_aborted" and stats.frames_read == 25
    record = read_record(out)
    assert record["state"] == "incomplete" and "scan_aborted after 25 frames" in record["incomplete"]  # partial
    assert any("ended with USER_ABORT after 25 frames" in r.getMessage() for r in caplog.records)
    _assert_same_spots(out, _offline(tmp_path, frames[:25], angles[:25], tiny_scan, tiny_overrides))
    # over, not to be resumed: the same command took the next scan that matched into the folder, unsaid
    assert not checkpoint.marker_path(out).exists()
    assert not any("resumes it" in r.getMessage() for r in caplog.records)
    with pytest.raises(OutputError, match="already holds results"):
        process_scan(_cfg(bliss_url, out, tiny_scan.dark_url, tiny_overrides, "source.scan=dct_*"), display=False)


def test_no_scan_comes(bliss_url, tmp_path):
    cfg = load_config(None, [f"source.url={bliss_url}", "source.scan=never_*", "source.idle_timeout_s=1"])
    source = open_source(cfg.source)
    with pytest.raises(InputError, match=r"no new scan matching 'never_\*' within source.idle_timeout_s \(1 s\)"):
        next(iter(source))


def test_an_unknown_scan_key(bliss_url):
    cfg = load_config(None, [f"source.url={bliss_url}", "source.scan=esrf:scan:nope"])
    with pytest.raises(InputError, match="source.scan: esrf:scan:nope: no such scan"):
        next(iter(open_source(cfg.source)))


def test_a_server_that_is_not_there():
    cfg = load_config(None, ["source.url=redis://127.0.0.1:1"])
    with pytest.raises(InputError, match=r"source.url: redis://127.0.0.1:1: cannot reach the blissdata server"):
        open_source(cfg.source)


# the publisher's own blissdata threads fail as the server goes: expected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_server_that_goes_away_during_the_scan_is_a_one_line_error(scan_frames, tiny_scan, tiny_overrides,
                                                                     tmp_path):
    """Redis stopping under a scan ended the run with a traceback of redis' 'Connection closed by server.'."""
    import json
    import time

    pytest.importorskip("blissdata", reason="blissdata is not installed (pip install '.[bliss]')")
    from blissdata.redis_engine.store import DataStore

    from blissdata_server import start_server, stop_server

    (tmp_path / "redis").mkdir()
    started = start_server(tmp_path / "redis")  # a server of its own: the other tests' stays up
    if isinstance(started, str):
        pytest.skip(started)
    proc, url = started
    go = threading.Event()
    try:
        DataStore(url, init_db=True)
        frames, angles = scan_frames
        publisher = Publisher(url, frames, angles, tmp_path, name="dct_gone", hold=(20, go))
        publisher.start()
        assert publisher.created.wait(PUBLISH_TIMEOUT_S)
        out = tmp_path / "live"
        cfg = _cfg(url, out, tiny_scan.dark_url, tiny_overrides, f"source.scan={publisher.key}")
        failed = []

        def run():
            try:
                process_scan(cfg, display=False)
            except InputError as exc:
                failed.append(str(exc))

        reader = threading.Thread(target=run, daemon=True)
        reader.start()
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while time.monotonic() < deadline:  # the run has read the 20 frames published so far
            try:
                if json.loads((out / "status.json").read_text()).get("stats", {}).get("frames_read", 0) >= 20:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        stop_server(proc)
        reader.join(PUBLISH_TIMEOUT_S)
        assert not reader.is_alive()
    finally:
        go.set()
        stop_server(proc)
    assert len(failed) == 1 and "\n" not in failed[0]
    assert failed[0].startswith(f"source.url: {url}: the blissdata server stopped answering during scan ")
    assert read_record(out)["state"] == "failed"
