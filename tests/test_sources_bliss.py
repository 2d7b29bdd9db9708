"""protocol: bliss — scans published frame by frame with blissdata's writer API on a real Redis server.

Each scan is published as Bliss does (``DataStore.create_scan``, a stream per
channel, ``prepare``/``start``, ``send`` per frame, ``seal``, ``stop``,
``info["end_reason"]``, ``close``), in a thread while dctstream reads it, and
the difspots found live must be those of an offline run on the same frames.
A Lima detector stream needs a detector server (Tango) for frames still in the
detector's memory: none can run here, so the Lima scan is published with
``buffer_max_number: 0`` (no frame in memory) and blissdata reads every frame
from the files Lima saved.
"""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.errors import InputError
from dctstream.pipeline import Pipeline
from dctstream.record import read_record
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table
from dctstream.sources import open_source

from blissdata_server import start_server, stop_server

blissdata = pytest.importorskip("blissdata", reason="blissdata is not installed (pip install '.[bliss]')")
from blissdata.redis_engine.store import DataStore  # noqa: E402
from blissdata.streams.default import Stream  # noqa: E402
from blissdata.streams.hdf5_fallback import Hdf5BackedStream  # noqa: E402
from blissdata.streams.lima import LimaStream  # noqa: E402

PUBLISH_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def bliss_url(tmp_path_factory):
    started = start_server(tmp_path_factory.mktemp("redis"))
    if isinstance(started, str):
        pytest.skip(started)
    proc, url = started
    try:
        DataStore(url, init_db=True)  # the indexes blissdata searches scans with
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def scan_frames(tiny_scan):
    with h5py.File(tiny_scan.path, "r") as f:
        return f["/1.1/measurement/marana"][()], f["/1.1/measurement/diffrz"][()]


class Publisher(threading.Thread):
    """Bliss's side: one scan, frame by frame.  ``kind``: array (frames in Redis), hdf5 (frames in Redis and
    the scan file, the first ``expire`` gone from Redis as the memory tracker does before ``created`` is set),
    lima (frames only in Lima's files).  ``abort_after``: the user stops the scan after that many frames."""

    def __init__(self, url, frames, angles, folder, *, name="dct", kind="array", abort_after=None, expire=0,
                 go: threading.Event | None = None):
        super().__init__(daemon=True)
        self.url, self.frames, self.angles, self.folder = url, frames, angles, folder
        self.name, self.kind, self.abort_after, self.expire, self.go = name, kind, abort_after, expire, go
        self.error = None
        self.created = threading.Event()
        self.key = None

    def run(self):
        try:
            self._publish()
        except BaseException as exc:  # reported by finish()
            self.error = exc
            self.created.set()

    def finish(self):
        self.join(PUBLISH_TIMEOUT_S)
        assert not self.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise self.error

    def _publish(self):
        frames, angles = self.frames, self.angles
        n, ny, nx = frames.shape
        if self.go is not None:
            assert self.go.wait(PUBLISH_TIMEOUT_S)
        store = DataStore(self.url)
        scan_file = self.folder / f"{self.name}.h5"
        scan = store.create_scan({"name": self.name, "number": 1, "data_policy": "no_policy", "path": str(scan_file)},
                                 info={"title": "fscan diffrz 0 9 40 0.1", "npoints": n, "type": "fscan"})
        self.key = scan.key
        if self.kind != "hdf5":
            self.created.set()
        if self.kind == "array":
            image_def = Stream.make_definition("marana:image", frames.dtype, (ny, nx))
        elif self.kind == "hdf5":
            with h5py.File(scan_file, "w") as f:  # the file writer is ahead of the memory tracker
                f["1.1/measurement/marana"] = frames
            image_def = Hdf5BackedStream.make_definition("marana:image", str(scan_file), "/1.1/measurement/marana",
                                                         frames.dtype, (ny, nx))
        else:
            pattern = str(self.folder / "marana_%04d.h5")
            image_def = LimaStream.make_definition(
                "marana:image", frames.dtype, (ny, nx), server_url="id00/limaccds/marana", buffer_max_number=0,
                frames_per_acquisition=n, acquisition_offset=0,
                saving={"file_path": pattern, "data_path": "/entry_0000/measurement/data", "file_format": "HDF5",
                        "file_offset": 0, "frames_per_file": 1})
        image = scan.create_stream(image_def)
        axis = scan.create_stream(Stream.make_definition("axis:diffrz", "float64"))
        scan.create_stream(Stream.make_definition("axis:samy", "float64"))  # not the rotation: never moves
        scan.create_stream(Stream.make_definition("epoch", "float64"))
        scan.prepare()
        scan.start()
        stop = n if self.abort_after is None else self.abort_after
        for k in range(stop):
            if self.kind == "lima":
                with h5py.File(self.folder / f"marana_{k:04d}.h5", "w") as f:
                    f["entry_0000/measurement/data"] = frames[k:k + 1]
                image.send({"last_index": k, "last_index_saved": k})
            else:
                image.send(frames[k])
            axis.send(angles[k])
            if self.kind == "hdf5" and k == self.expire:
                image.join()
                # what blissdata's memory tracker does to a stream Redis has no room for: its oldest entries go
                store._redis.xtrim(image.key, minid=f"{self.expire}-0")
                self.created.set()  # the reader starts now: frames 0 to expire - 1 can only come from the file
        if self.abort_after is None:
            scan.stop()
            scan.info["end_reason"] = "SUCCESS"
        else:
            scan.info["end_reason"] = "USER_ABORT"
        scan.close()  # seals the streams


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
    _assert_same_spots(out, _offline(tmp_path, frames, angles, tiny_scan, tiny_overrides))
    auto = read_record(out)["auto"]
    assert auto["source.scan"]["url"] == publisher.key
    assert auto["source.stream"]["url"] == "marana:image"
    assert auto["source.angles"] == {"url": "axis:diffrz",
                                     "reason": "the axis the scan's title names ('fscan diffrz 0 9 40 0.1')"}


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


def test_an_aborted_scan_keeps_what_was_received_and_says_so(bliss_url, scan_frames, tiny_scan, tiny_overrides,
                                                             tmp_path, caplog):
    frames, angles = scan_frames
    publisher = Publisher(bliss_url, frames, angles, tmp_path, name="dct_abort", abort_after=25)
    publisher.start()
    assert publisher.created.wait(PUBLISH_TIMEOUT_S)
    out = tmp_path / "live"
    stats = process_scan(_cfg(bliss_url, out, tiny_scan.dark_url, tiny_overrides, f"source.scan={publisher.key}"),
                         display=False)
    publisher.finish()
    assert stats.source_end == "scan_aborted" and stats.frames_read == 25
    record = read_record(out)
    assert record["state"] == "finished" and record["end_reason"] == "scan_aborted"
    assert any("ended with USER_ABORT after 25 frames" in r.getMessage() for r in caplog.records)
    _assert_same_spots(out, _offline(tmp_path, frames[:25], angles[:25], tiny_scan, tiny_overrides))


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
