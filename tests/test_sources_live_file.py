"""Live file sources: a growing HDF5 dataset and a folder of EDF files, read while a replayer writes them.

HDF5 writers run in a separate process: in the reader's own process HDF5
would hand the reader the writer's open file, and nothing of what another
process sees on disk would be tested.  Writers and readers synchronise by
waiting on multiprocessing values and events, never by sleeping a fixed
time; the only waits on the clock are the idle timeouts of the tests about
them.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import time

import fabio.edfimage
import fabio.tifimage
import h5py
import hdf5plugin
import numpy as np
import pytest

from dctstream.config import SourceConfig
from dctstream.errors import InputError
from dctstream.sources import hdf5_live
from dctstream.sources.folder import FolderSource, parse_pattern
from dctstream.sources.hdf5_live import DectrisMasterSource, Hdf5WatchSource
from simulators.dct_scan import ANGLES_PATH, FRAMES_PATH, simulate_scan
from simulators.replay_file import replay_dectris, replay_edf, replay_hdf5, start_in_process, start_in_thread

FRAMES = 30
SYNC_TIMEOUT_S = 30.0  # only reached when something hangs
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """(ScanTruth, frames, psi) of a 30-frame, 32 x 32 px recorded scan."""
    truth = simulate_scan(tmp_path_factory.mktemp("recorded") / "s.h5", frames=FRAMES, size=32, spots=5, seed=0)
    with h5py.File(truth.path, "r") as f:
        return truth, f[FRAMES_PATH][()], f[ANGLES_PATH][()]


def source_config(url: str, **keys) -> SourceConfig:
    keys = {"idle_timeout_s": SYNC_TIMEOUT_S, "poll_interval_s": 0.1, **keys}
    return SourceConfig(url=url, **keys)


def live_url(path) -> str:
    return f"{path}::{FRAMES_PATH}"


def check_frames(frames, recorded, psi=None, *, count=None) -> None:
    """The frames are frames 0..count-1 of the recording, each once, same bytes (and psi, if given)."""
    count = len(recorded) if count is None else count
    assert [f.index for f in frames] == list(range(count))
    for frame in frames:
        assert frame.data.dtype == recorded.dtype and frame.data.shape == recorded.shape[1:]
        assert np.array_equal(frame.data, recorded[frame.index]), frame.index
        assert frame.psi_deg == (None if psi is None else psi[frame.index])


class Lockstep:
    """``on_frame`` for a writer: after frame k, wait until the reader has delivered frames 0..k-1.

    A reader can take frame k-1 once frame k is written (its one-frame lag), so
    every frame is delivered while the writer is still writing, and a reader
    that stalls fails the writer.
    """

    def __init__(self):
        self.delivered = SPAWN.Value("q", 0)

    def __call__(self, k: int) -> None:
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while self.delivered.value < k:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reader did not deliver frame {k - 1}")
            time.sleep(0.001)

    def read(self, source) -> list:
        frames = []
        for frame in source:
            frames.append(frame)
            self.delivered.value = len(frames)
        return frames


class PauseAt:
    """``on_resize`` for a writer: once the dataset is resized for frame ``k``, stop until ``resume`` is set."""

    def __init__(self, k: int):
        self.k = k
        self.resized = SPAWN.Event()
        self.resume = SPAWN.Event()

    def __call__(self, k: int) -> None:
        if k == self.k:
            self.resized.set()
            if not self.resume.wait(SYNC_TIMEOUT_S):
                raise TimeoutError("never resumed")


class Consumer:
    """Iterates a source in a thread, keeping what it delivers."""

    def __init__(self, source):
        self.source = source
        self.frames: list = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self.source:
                self.frames.append(frame)
        except BaseException as exc:  # re-raised by join()
            self.error = exc
        finally:
            self.source.close()

    def join(self) -> list:
        self._thread.join(SYNC_TIMEOUT_S)
        assert not self._thread.is_alive(), "the source did not end"
        if self.error is not None:
            raise self.error
        return self.frames


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


# -- frames arriving live ---------------------------------------------------------------------------


@pytest.mark.parametrize("swmr, compression", [
    (True, None),
    (False, None),  # the writer holds the file open without SWMR
    (True, hdf5plugin.Bitshuffle()),
    (False, "gzip"),
], ids=["swmr", "no-swmr", "bitshuffle", "gzip"])
def test_hdf5_live_delivers_the_recorded_frames(scan, tmp_path, swmr, compression):
    truth, recorded, psi = scan
    path = tmp_path / "live.h5"
    lockstep = Lockstep()
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=swmr, compression=compression,
                              angles_url=truth.angles_url, on_frame=lockstep)
    cfg = source_config(live_url(path), angles=f"{path}::{ANGLES_PATH}")
    with Hdf5WatchSource(cfg) as source:
        frames = lockstep.read(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, psi)
    assert source.end_reason == "end_time"
    assert source.n_frames == FRAMES and source.frame_shape == recorded.shape[1:] and source.dtype == recorded.dtype


@pytest.mark.parametrize("swmr", [True, False], ids=["swmr", "no-swmr"])
def test_hdf5_live_reads_a_delivered_frame_again_while_the_file_grows(scan, tmp_path, swmr):
    """As a scan of passes read in psi order does (dctstream.order): frames read again between two frames leave
    the looks seeing the file grow (the writer waits for each frame before the next), and after the end too."""
    truth, recorded, _ = scan
    path = tmp_path / "live.h5"
    lockstep = Lockstep()
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=swmr, on_frame=lockstep)
    frames, again = [], []
    with Hdf5WatchSource(source_config(live_url(path))) as source:
        for frame in source:
            frames.append(frame)
            again.append(source.read_again(frame.index // 2))
            lockstep.delivered.value = len(frames)
        after = [source.read_again(k) for k in range(FRAMES)]
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded)
    assert source.end_reason == "end_time"
    np.testing.assert_array_equal(again, recorded[np.arange(FRAMES) // 2])
    np.testing.assert_array_equal(after, recorded)
    path.unlink()
    with pytest.raises(InputError, match=r"live.h5::/1.1/measurement/marana: frame 3: cannot read it again "
                                         r"\(file not found\)"):
        source.read_again(3)


def test_folder_reads_a_delivered_frame_again(scan, tmp_path):
    truth, recorded, _ = scan
    replay_edf(truth.frames_url, tmp_path, fps=0, stop_after=6)
    with FolderSource(source_config(f"{tmp_path}/*.edf", expected_frames=6)) as source:
        assert len(list(source)) == 6
        np.testing.assert_array_equal(source.read_again(3), recorded[3])
        (tmp_path / "scan0003.edf").unlink()
        with pytest.raises(InputError, match=r"scan0003.edf: frame 3: cannot read it again"):
            source.read_again(3)


def test_hdf5_live_without_notifications_polls(scan, tmp_path, monkeypatch):
    """On NFS no notification comes: polling alone finds every frame."""
    truth, recorded, _ = scan
    monkeypatch.setattr(hdf5_live.Watcher, "start", lambda self: None)
    path = tmp_path / "live.h5"
    lockstep = Lockstep()
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=False, on_frame=lockstep)
    with Hdf5WatchSource(source_config(live_url(path), poll_interval_s=0.01)) as source:
        frames = lockstep.read(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded)
    assert source.end_reason == "end_time" and source.counters["notifications"] == 0


@pytest.mark.parametrize("angles", ["header", "hdf5"])
def test_folder_live_delivers_the_recorded_frames(scan, tmp_path, angles):
    truth, recorded, psi = scan
    lockstep = Lockstep()
    writer = start_in_thread(replay_edf, truth.frames_url, tmp_path / "edf", fps=0,
                             angles_url=truth.angles_url if angles == "header" else None, on_frame=lockstep)
    cfg = source_config(f"{tmp_path}/edf/*.edf", expected_frames=FRAMES,
                        angles=truth.angles_url if angles == "hdf5" else None)
    with FolderSource(cfg) as source:
        frames = lockstep.read(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, psi)
    assert source.end_reason == "expected_frames"


def test_folder_of_tiff_files_in_number_order(tmp_path):
    """img_1.tif ... img_12.tif: by number, not by name; frame 0 is the lowest number there."""
    for number in range(1, 13):
        fabio.tifimage.TifImage(data=np.full((4, 5), number, np.uint16)).write(str(tmp_path / f"img_{number}.tif"))
    with FolderSource(source_config(f"{tmp_path}/img_*.tif", expected_frames=12)) as source:
        frames = list(source)
    assert [(f.index, int(f.data[0, 0]), f.psi_deg) for f in frames] == [(k, k + 1, None) for k in range(12)]
    assert source.frame_shape == (4, 5) and source.dtype == np.uint16 and source.end_reason == "expected_frames"


def test_folder_ends_when_no_file_comes(scan, tmp_path):
    truth, recorded, _ = scan
    replay_edf(truth.frames_url, tmp_path, fps=0, stop_after=5)
    # files just written: a live folder (older than the idle timeout, it would be a recorded one: no wait)
    with FolderSource(source_config(f"{tmp_path}/*.edf", idle_timeout_s=2.0)) as source:
        frames = list(source)
    check_frames(frames, recorded, count=5)
    assert source.end_reason == "idle_timeout" and source.n_frames == 5


# -- HDF5 failure modes --------------------------------------------------------------------------------


def test_hdf5_file_appearing_later(scan, tmp_path):
    truth, recorded, _ = scan
    path = tmp_path / "later" / "live.h5"  # not even its folder exists yet
    consumer = Consumer(Hdf5WatchSource(source_config(live_url(path))))
    wait_for(lambda: consumer.source.counters["looks"] >= 3, "the source to look for the missing file")
    assert not consumer.frames
    os.mkdir(path.parent)
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=True)
    frames = consumer.join()
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded)
    assert consumer.source.end_reason == "end_time"


def test_hdf5_file_never_appearing(tmp_path):
    path = tmp_path / "never.h5"
    start = time.monotonic()
    with Hdf5WatchSource(source_config(live_url(path), idle_timeout_s=0.5)) as source:
        with pytest.raises(InputError, match=re.escape(f"source.url: {path}::{FRAMES_PATH}: ") + r".*within 0.5 s "
                                             r"\(source.idle_timeout_s\), got file not found$"):
            list(source)
    assert time.monotonic() - start >= 0.5
    assert source.end_reason is None


def test_hdf5_writer_dying_ends_on_idle_timeout(scan, tmp_path):
    """No end_time: every frame written is delivered, the last one included (nothing will grow past it)."""
    truth, recorded, _ = scan
    path = tmp_path / "live.h5"
    replay_hdf5(truth.frames_url, path, fps=0, swmr=False, end_time=False, stop_after=20)
    with Hdf5WatchSource(source_config(live_url(path), idle_timeout_s=0.5)) as source:
        frames = list(source)
    check_frames(frames, recorded, count=20)
    assert source.end_reason == "idle_timeout" and source.n_frames == 20


@pytest.mark.parametrize("swmr", [True, False], ids=["swmr", "no-swmr"])
def test_hdf5_half_written_frame_waits_until_complete(scan, tmp_path, swmr):
    """The writer resizes for frame 5, then stops before writing it: frame 5 waits, then arrives whole."""
    truth, recorded, _ = scan
    path = tmp_path / "live.h5"
    pause = PauseAt(5)
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=swmr, on_resize=pause)
    consumer = Consumer(Hdf5WatchSource(source_config(live_url(path), poll_interval_s=0.01)))
    assert pause.resized.wait(SYNC_TIMEOUT_S)
    # frame 4 comes only once the dataset lists 6 frames, so the source has seen the empty frame 5
    wait_for(lambda: len(consumer.frames) == 5, "frames 0 to 4")
    looks = consumer.source.counters["looks"]
    wait_for(lambda: consumer.source.counters["looks"] >= looks + 3, "more looks at the empty frame 5")
    assert len(consumer.frames) == 5
    pause.resume.set()
    frames = consumer.join()
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded)
    assert consumer.source.end_reason == "end_time"


@pytest.mark.parametrize("compression", ["bitshuffle", "lz4"])
def test_hdf5_chunks_of_several_frames_without_swmr_are_read_once_whole(scan, tmp_path, compression):
    """A writer without SWMR writes a bitshuffle chunk of 10 frames again at every flush, elsewhere in the file: a
    frame read from it meanwhile could decode garbage (the run died of SIGSEGV in 3 of 5 tries). Its frames wait
    until the dataset grows past the chunk, then arrive whole; at the end, the last chunk's too."""
    truth, recorded, psi = scan
    path = tmp_path / "live.h5"
    pause = PauseAt(15)
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=False, chunk_frames=10,
                              compression=hdf5plugin.Bitshuffle(cname="lz4") if compression == "bitshuffle"
                              else hdf5plugin.LZ4(), angles_url=truth.angles_url, on_resize=pause)
    consumer = Consumer(Hdf5WatchSource(source_config(live_url(path), angles=f"{path}::{ANGLES_PATH}",
                                                      poll_interval_s=0.01)))
    assert pause.resized.wait(SYNC_TIMEOUT_S)
    wait_for(lambda: len(consumer.frames) == 10, "frames 0 to 9, the first chunk")
    looks = consumer.source.counters["looks"]
    wait_for(lambda: consumer.source.counters["looks"] >= looks + 3, "more looks at the chunk being written")
    assert len(consumer.frames) == 10  # frames 10 to 14 are written, their chunk is not whole yet
    pause.resume.set()
    frames = consumer.join()
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, psi)
    assert consumer.source.end_reason == "end_time"


def _write_allocated(frames_url, path, written: int, go_on) -> None:
    """A dataset allocated for the whole scan (as LIMA does), SWMR; ``written`` frames, then wait for ``go_on``
    and end the scan (end_time, written once out of SWMR mode)."""
    with h5py.File(frames_url.split("::")[0], "r") as f:
        frames = f[FRAMES_PATH][()]
    with h5py.File(path, "w", libver="latest") as f:
        images = f.create_dataset(FRAMES_PATH, shape=frames.shape, dtype=frames.dtype, chunks=(1, *frames.shape[1:]))
        f.swmr_mode = True
        for k in range(written):
            images[k] = frames[k]
            f.flush()
        if not go_on.wait(SYNC_TIMEOUT_S):
            raise TimeoutError("never told to go on")
    with h5py.File(path, "a") as f:
        f["/1.1/end_time"] = "2024-01-01T10:00:00"


def test_hdf5_allocated_dataset_of_a_scan_ended_early_ends_on_end_time(scan, tmp_path):
    """A scan aborted after 20 of the 30 frames its dataset was allocated for: the source waited the idle timeout
    (a kept SWMR handle never saw end_time while frame 20 was listed), ended 'idle_timeout', and counted the 10
    frames never acquired as a backlog ('falling behind the acquisition'). It ends on end_time at once."""
    truth, recorded, _ = scan
    path = tmp_path / "live.h5"
    go_on = SPAWN.Event()
    writer = start_in_process(_write_allocated, truth.frames_url, path, 20, go_on)
    wait_for(path.exists, "the file")
    consumer = Consumer(Hdf5WatchSource(source_config(live_url(path), idle_timeout_s=SYNC_TIMEOUT_S,
                                                      poll_interval_s=0.05)))
    wait_for(lambda: len(consumer.frames) == 20, "the 20 frames written")
    wait_for(lambda: consumer.source.frames_listed == 20, "the frames listed to stop at the one not written")
    go_on.set()
    started = time.monotonic()
    frames = consumer.join()
    writer.join(SYNC_TIMEOUT_S)
    assert time.monotonic() - started < SYNC_TIMEOUT_S / 3
    check_frames(frames, recorded, count=20)
    assert consumer.source.end_reason == "end_time" and consumer.source.frames_listed == 20


def test_bitshuffle_chunk_framing(tmp_path):
    rng = np.random.default_rng(1)
    for shape, dtype in [((10, 33, 17), np.uint16), ((2, 13, 7), np.uint32), ((3, 64, 64), np.uint8)]:
        data = rng.poisson(50, size=shape).astype(dtype)
        with h5py.File(tmp_path / "c.h5", "w") as f:
            f.create_dataset("d", data=data, chunks=shape, **hdf5plugin.Bitshuffle(cname="lz4"))
        with h5py.File(tmp_path / "c.h5", "r") as f:
            raw = f["d"].id.read_direct_chunk((0, 0, 0))[1]
        sound = hdf5_live.bitshuffle_chunk_sound
        assert sound(raw, data.nbytes, data.itemsize)
        assert not sound(raw[:-1], data.nbytes, data.itemsize)  # cut short
        assert not sound(raw + b"\0", data.nbytes, data.itemsize)
        assert not sound(raw, data.nbytes + data.itemsize, data.itemsize)  # another chunk's size
        assert not sound(bytes(len(raw)), data.nbytes, data.itemsize)  # space not written yet


def test_hdf5_last_frame_never_written(scan, tmp_path):
    """The writer resizes for its last frame and dies: the frames before it are delivered, that one is not."""
    truth, recorded, _ = scan
    path = tmp_path / "live.h5"
    pause = PauseAt(FRAMES - 1)
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=True, end_time=False,
                              on_resize=pause)
    assert pause.resized.wait(SYNC_TIMEOUT_S)
    with Hdf5WatchSource(source_config(live_url(path), idle_timeout_s=0.5)) as source:
        frames = list(source)
    pause.resume.set()
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, count=FRAMES - 1)
    assert source.end_reason == "idle_timeout"


def test_hdf5_expected_frames_stops_there(scan, tmp_path):
    """The last expected frame needs no later one: the writer stops there and the source ends at once."""
    truth, recorded, psi = scan
    path = tmp_path / "live.h5"
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=True, end_time=False,
                              angles_url=truth.angles_url, stop_after=10)
    cfg = source_config(live_url(path), angles=f"{path}::{ANGLES_PATH}", expected_frames=10)
    with Hdf5WatchSource(cfg) as source:
        assert source.n_frames == 10
        frames = list(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, psi, count=10)
    assert source.end_reason == "expected_frames"


def test_hdf5_expected_frames_of_a_longer_scan(scan, tmp_path):
    truth, recorded, _ = scan
    path = tmp_path / "done.h5"
    replay_hdf5(truth.frames_url, path, fps=0, swmr=False)
    with Hdf5WatchSource(source_config(live_url(path), expected_frames=7)) as source:
        frames = list(source)
    check_frames(frames, recorded, count=7)
    assert source.end_reason == "expected_frames"


def test_hdf5_angles_that_never_come_give_none(scan, tmp_path, monkeypatch):
    """Frame 0 waits a moment for its angle, then every frame goes out with psi None."""
    truth, recorded, _ = scan
    monkeypatch.setattr(hdf5_live, "ANGLE_WAIT_S", 0.2)
    path = tmp_path / "live.h5"
    lockstep = Lockstep()
    writer = start_in_process(replay_hdf5, truth.frames_url, path, fps=0, swmr=True, on_frame=lockstep)
    cfg = source_config(live_url(path), angles=f"{path}::/1.1/measurement/nothing")
    with Hdf5WatchSource(cfg) as source:
        frames = lockstep.read(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded)
    assert source.counters["angles_missing"] == FRAMES and source.end_reason == "end_time"


def test_hdf5_wrong_dataset_is_reported_at_once(tmp_path):
    path = tmp_path / "complex.h5"
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((3, 4, 4), np.complex64)
    with pytest.raises(InputError, match=re.escape(f"source.url: {path}::/frames: expected integer detector counts "
                                                   "(or floats holding whole numbers), got dtype complex64")):
        Hdf5WatchSource(source_config(f"{path}::/frames"))


def test_hdf5_float_counts_come_as_integers_and_other_floats_are_refused_at_their_frame(tmp_path):
    path = tmp_path / "float.h5"
    frames = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    frames[2, 1, 3] = 7.5  # a flat-fielded value in the last frame
    with h5py.File(path, "w") as f:
        f["frames"] = frames
        f["end_time"] = "now"  # the scan's end, where the source looks for it (not an attribute: 30 s idle)
    with Hdf5WatchSource(source_config(f"{path}::/frames")) as source:
        got = []
        with pytest.raises(InputError, match=re.escape(f"source.url: {path}::/frames: frame 2: expected detector "
                                                       "counts, whole numbers, got 7.5 at pixel (y, x) = (1, 3)")):
            for frame in source:
                got.append(frame.data)
    assert source.dtype == np.int32 and [g.dtype for g in got] == [np.int32] * 2
    np.testing.assert_array_equal(np.stack(got), frames[:2].astype(np.int32))


# -- folder failure modes -------------------------------------------------------------------------------


def test_folder_gap_names_the_missing_file(scan, tmp_path):
    truth, recorded, _ = scan
    replay_edf(truth.frames_url, tmp_path, fps=0, stop_after=6)
    os.remove(tmp_path / "scan0003.edf")
    with FolderSource(source_config(f"{tmp_path}/*.edf", idle_timeout_s=0.5)) as source:
        frames = []
        with pytest.raises(InputError, match=r"file number 3 \(scan0003.edf\) is missing.*got files up to number 5"):
            for frame in source:
                frames.append(frame)
    check_frames(frames, recorded, count=3)


def truncate(path, keep: float = 0.5) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return data


def test_folder_truncated_file_is_reported(scan, tmp_path):
    truth, recorded, _ = scan
    replay_edf(truth.frames_url, tmp_path, fps=0, stop_after=6)
    truncate(tmp_path / "scan0003.edf")
    with FolderSource(source_config(f"{tmp_path}/*.edf", idle_timeout_s=2.0, poll_interval_s=0.05)) as source:
        frames = []
        with pytest.raises(InputError, match=re.escape(f"{tmp_path}/scan0003.edf: frame 3: expected a complete file "
                                                       "within 2 s")):
            for frame in source:
                frames.append(frame)
    check_frames(frames, recorded, count=3)
    assert source.counters["retries"] >= 2


def test_folder_truncated_file_is_retried_until_complete(scan, tmp_path):
    truth, recorded, _ = scan
    replay_edf(truth.frames_url, tmp_path, fps=0, stop_after=6)
    whole = truncate(tmp_path / "scan0003.edf")
    cfg = source_config(f"{tmp_path}/*.edf", expected_frames=6, poll_interval_s=0.05)
    consumer = Consumer(FolderSource(cfg))
    wait_for(lambda: consumer.source.counters["retries"] >= 1, "a failed read")
    (tmp_path / "scan0003.edf").write_bytes(whole)
    check_frames(consumer.join(), recorded, count=6)
    assert consumer.source.end_reason == "expected_frames"


def test_folder_never_appearing(tmp_path):
    with FolderSource(source_config(f"{tmp_path}/nothing/*.edf", idle_timeout_s=0.5)) as source:
        with pytest.raises(InputError, match=r"expected files matching \*.edf in .*/nothing within 0.5 s"):
            list(source)


@pytest.mark.parametrize("url", ["dir/scan0001.edf", "dir/*.h5", "dir/"])
def test_folder_pattern_rejects(url):
    with pytest.raises(InputError, match=f"source.url: {re.escape(url)}: expected a folder and a file pattern"):
        parse_pattern(url)


# -- a DECTRIS master file and its data files ------------------------------------------------------------


class FileLockstep(Lockstep):
    """``on_file`` for `replay_dectris`: after data file i, wait until the reader has delivered every frame
    of it but its last (which waits for the next file), so that each file is read before the next appears."""

    def __init__(self, frames_per_file: int):
        super().__init__()
        self.per = frames_per_file

    def __call__(self, i: int) -> None:
        super().__call__(min(i * self.per, FRAMES) - 1)


def test_dectris_master_followed_as_its_data_files_appear(scan, tmp_path):
    truth, recorded, psi = scan
    master = tmp_path / "s1_master.h5"
    gaps = np.zeros(recorded.shape[1:], np.uint32)
    gaps[16] = 1
    lockstep = FileLockstep(8)
    writer = start_in_process(replay_dectris, truth.frames_url, str(master), frames_per_file=8, fps=0,
                              angles_url=truth.angles_url, pixel_mask=gaps, on_file=lockstep)
    wait_for(lambda: os.path.exists(tmp_path / "s1_data_000001.h5"), "the first data file")
    cfg = source_config(f"{master}::/entry/data", angles=f"{master}::/entry/sample/goniometer/omega")
    with DectrisMasterSource(cfg) as source:
        assert source.n_frames == FRAMES and source.frame_shape == recorded.shape[1:]
        assert source.invalid_value == 0xFFFF  # 16 bits an image: all bits set is a pixel without data
        np.testing.assert_array_equal(source.pixel_mask, gaps)
        frames = lockstep.read(source)
    writer.join(SYNC_TIMEOUT_S)
    check_frames(frames, recorded, psi)
    assert source.end_reason == "complete" and source.counters["files"] == 3


def test_dectris_master_whose_writer_stops_ends_on_idle_timeout(scan, tmp_path):
    truth, recorded, _ = scan
    master = tmp_path / "s2_master.h5"
    replay_dectris(truth.frames_url, str(master), frames_per_file=8, fps=0)
    for i in (2, 3, 4):  # only the first data file came
        os.remove(tmp_path / f"s2_data_{i:06d}.h5")
    with DectrisMasterSource(source_config(f"{master}::/entry/data", idle_timeout_s=0.5)) as source:
        frames = list(source)
    check_frames(frames, recorded, count=8)
    assert source.end_reason == "idle_timeout"


def test_dectris_master_that_is_not_one_is_reported(tmp_path):
    path = tmp_path / "x_master.h5"
    with h5py.File(path, "w") as f:
        f["/entry/data/other"] = np.zeros(3)
    with pytest.raises(InputError, match=r"x_master.h5::/entry/data: no data_NNNNNN entries, expected links to "
                                         r"the data files of a DECTRIS master file$"):
        DectrisMasterSource(source_config(f"{path}::/entry/data"))
    # a NeXus file's NXdata group at that path: said so, with the dataset to name (it said only the above)
    nexus = tmp_path / "nx.h5"
    with h5py.File(nexus, "w") as f:
        f["/entry/data/frames"] = np.zeros((3, 4, 4), np.uint16)
        f["/entry/data"].attrs.update({"NX_class": "NXdata", "signal": "frames"})
    with pytest.raises(InputError) as err:
        DectrisMasterSource(source_config(f"{nexus}::/entry/data"))
    assert str(err.value) == (f"source.url: {nexus}::/entry/data: a NeXus NXdata group whose signal is 'frames', "
                              "taken for a DECTRIS master file's /entry/data (no data_NNNNNN entries): expected the "
                              f"frames dataset, {nexus}::/entry/data/frames")


def test_folder_of_float_counts_comes_as_integers_and_a_fractional_frame_is_refused(tmp_path):
    frames = (np.arange(4 * 5 * 6) % 50).astype(np.float32).reshape(4, 5, 6)  # no noise, values under 100
    frames[3, 2, 4] = 0.5  # a flat-fielded value
    for k, frame in enumerate(frames):
        fabio.edfimage.EdfImage(data=frame).write(str(tmp_path / f"scan{k:04d}.edf"))
    got = []
    with FolderSource(source_config(f"{tmp_path}/*.edf", expected_frames=4)) as source:
        with pytest.raises(InputError, match=re.escape("scan0003.edf: expected detector counts, whole numbers, got "
                                                       "0.5 at pixel (y, x) = (2, 4) of float32 frames")):
            for frame in source:
                got.append(frame.data)
        assert source.dtype == np.int32
        np.testing.assert_array_equal(source.read_again(1), frames[1].astype(np.int32))
    assert [g.dtype for g in got] == [np.int32] * 3
    np.testing.assert_array_equal(np.stack(got), frames[:3].astype(np.int32))


def test_a_frame_of_a_virtual_dataset_is_stored_once_its_source_file_holds_it(tmp_path):
    """A Bliss master maps the detector's files, which appear as the scan goes: a frame whose file is not there
    yet, or holds fewer frames, is not stored (read, it was the fill value: zeros taken for frames)."""
    from dctstream.sources.hdf5_live import _stored
    layout = h5py.VirtualLayout(shape=(6, 4, 4), dtype=np.uint16)
    for part in (0, 1):
        layout[3 * part:3 * (part + 1)] = h5py.VirtualSource(f"part{part}.h5", "frames", shape=(3, 4, 4))
    with h5py.File(tmp_path / "part0.h5", "w") as f:
        f["frames"] = np.ones((3, 4, 4), np.uint16)
    with h5py.File(tmp_path / "master.h5", "w") as f:
        f.create_virtual_dataset("frames", layout, fillvalue=0)
    with h5py.File(tmp_path / "master.h5", "r") as f:
        assert [_stored(f["frames"], k) for k in range(6)] == [True] * 3 + [False] * 3
    with h5py.File(tmp_path / "part1.h5", "w") as f:  # written up to its second frame so far
        dset = f.create_dataset("frames", shape=(3, 4, 4), dtype=np.uint16, chunks=(1, 4, 4))
        dset[:2] = 2
    with h5py.File(tmp_path / "master.h5", "r") as f:
        assert [_stored(f["frames"], k) for k in range(6)] == [True] * 5 + [False]
