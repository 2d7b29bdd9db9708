"""Every source keeps the contract of `dctstream.sources.FrameSource`: one test class, run by each of them."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import fabio.tifimage
import h5py
import numpy as np
import pytest

from dctstream.bench import PacedSource, SyntheticScan
from dctstream.config import SourceConfig
from dctstream.errors import InputError
from dctstream.pipeline import Pipeline
from dctstream.sources import COMPLETE_ENDS, FrameSource, Hdf5FileSource, check_source
from dctstream.sources.folder import FolderSource
from dctstream.sources.hdf5_live import Hdf5WatchSource
from dctstream.sources.memory import MemorySource
from dctstream.sources.stream import Stream1Source, Stream2Source
from dctstream.types import Frame
from simulators.replay_stream import StreamReplayer

# a source that waits for more frames gives up after this long without any (a complete file, a stream's end)
IDLE_S = 1.0


@contextmanager
def _stream(scan, protocol):
    replayer = StreamReplayer(scan.frames_url, protocol=protocol, fps=0)
    try:
        cls = Stream1Source if protocol == "stream1" else Stream2Source
        source = cls(SourceConfig(url=replayer.endpoint, idle_timeout_s=10))
        replayer.start()
        yield source
    finally:
        replayer.close()


@contextmanager
def _plain(make):
    yield make()


def _tif_folder(tmp_path, frames):
    for k, frame in enumerate(frames):
        fabio.tifimage.TifImage(data=frame).write(str(tmp_path / f"img_{k:04d}.tif"))
    return f"{tmp_path}/img_*.tif"


SOURCES = {
    "hdf5": lambda scan, frames, tmp: _plain(lambda: Hdf5FileSource(scan.frames_url, scan.angles_url)),
    "hdf5-live": lambda scan, frames, tmp: _plain(lambda: Hdf5WatchSource(SourceConfig(
        url=scan.frames_url, idle_timeout_s=IDLE_S, poll_interval_s=0.05))),
    "folder": lambda scan, frames, tmp: _plain(lambda: FolderSource(SourceConfig(
        url=_tif_folder(tmp, frames), expected_frames=len(frames), idle_timeout_s=10, poll_interval_s=0.05))),
    "stream1": lambda scan, frames, tmp: _stream(scan, "stream1"),
    "stream2": lambda scan, frames, tmp: _stream(scan, "stream2"),
    "memory": lambda scan, frames, tmp: _plain(lambda: MemorySource(frames)),
    "bench-paced": lambda scan, frames, tmp: _plain(lambda: PacedSource(SyntheticScan(32, seed=0), 12, fps=1e6)),
}


@pytest.fixture(scope="module")
def recorded(tiny_scan):
    with h5py.File(tiny_scan.path, "r") as f:
        return f["/1.1/measurement/marana"][()]


@pytest.mark.parametrize("kind", SOURCES)
class TestFrameSource:
    """What every source says, before, while and after giving its frames."""

    def test_contract(self, kind, tiny_scan, recorded, tmp_path):
        with SOURCES[kind](tiny_scan, recorded, tmp_path) as source:
            assert isinstance(source, FrameSource)
            assert check_source(source) is source
            assert isinstance(source.rereadable, bool)
            assert source.end_reason is None  # nothing ended yet
            assert all(isinstance(k, str) and isinstance(n, int) for k, n in source.counters.items())
            frames = []
            for frame in source:
                assert isinstance(frame, Frame)
                frames.append(frame)
                assert source.frame_shape == frame.data.shape and source.dtype == frame.data.dtype
            assert [f.index for f in frames] == list(range(len(frames))) and frames
            assert source.n_frames in (None, len(frames))
            assert isinstance(source.end_reason, str) and source.end_reason  # why it stopped
            if kind != "hdf5-live":  # a followed file that went quiet ends incomplete (idle_timeout): it may grow
                assert source.end_reason in COMPLETE_ENDS
            if kind not in ("memory", "bench-paced"):
                np.testing.assert_array_equal(np.stack([f.data for f in frames]), recorded)
            if not source.rereadable:  # a stream: what the spool keeps to resume it
                assert isinstance(source.series_facts(), dict)
            source.close()
            source.close()  # twice: every way a run ends closes it, some twice


def test_a_source_that_does_not_say_whether_it_can_be_read_again_is_refused():
    """Before: read with getattr(source, "rereadable", True), such a source was taken as re-readable."""
    with pytest.raises(TypeError, match=r"^Vague.rereadable: expected True or False"):
        class Vague(FrameSource):
            def __iter__(self):
                return iter(())

            def close(self):
                pass


def test_the_pipeline_takes_only_frame_sources(tiny_scan, tmp_path):
    from dctstream.config import load_config

    class Duck:
        frame_shape = dtype = n_frames = end_reason = None

        def __iter__(self):
            return iter(())

        def close(self):
            pass

    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"output.dir={tmp_path}"])
    with pytest.raises(InputError, match=r"^source: Duck is not a dctstream.sources.FrameSource"):
        Pipeline(cfg, source=Duck())


def _unended(tmp):
    """A file of 2 frames whose scan has not ended (no end_time): more may come."""
    with h5py.File(tmp / "growing.h5", "w") as f:
        f["/1.1/measurement/marana"] = np.zeros((2, 8, 8), np.uint16)
    return f"{tmp / 'growing.h5'}::/1.1/measurement/marana"


WAITING = {  # each waits for a frame that never comes, for a minute unless stopped
    "hdf5-live": lambda tmp: Hdf5WatchSource(SourceConfig(url=_unended(tmp), idle_timeout_s=60,
                                                          poll_interval_s=0.05)),
    "folder": lambda tmp: FolderSource(SourceConfig(
        url=_tif_folder(tmp, np.zeros((2, 8, 8), np.uint16)), expected_frames=3, idle_timeout_s=60,
        poll_interval_s=0.05)),
    "stream2": lambda tmp: Stream2Source(SourceConfig(url="tcp://127.0.0.1:1", idle_timeout_s=60)),
}


@pytest.mark.parametrize("kind", WAITING)
def test_stop_from_another_thread_ends_a_wait_for_the_next_frame(kind, tmp_path):
    """Before: a run stopped while its live source waited left the reader thread behind (the source open),
    and the process could hang at its exit."""
    source = WAITING[kind](tmp_path)
    got, ended = [], threading.Event()

    def read():
        for frame in source:
            got.append(frame.index)
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # every frame there is read; now it waits
        assert not ended.is_set()
        start = time.monotonic()
        source.stop()
        assert ended.wait(10) and time.monotonic() - start < 3.0  # not the minute of its idle timeout
        assert got == list(range(len(got))) and (kind == "stream2" or got)
    finally:
        source.stop()
        reader.join(5)
        source.close()
