"""A stop asked for by a signal is seen even where Python drops the KeyboardInterrupt it raised."""

import signal
import threading
import time

import pytest

from dctstream import interrupt
from dctstream.overlap import Prefetch


@pytest.fixture(autouse=True)
def _no_stop_asked(monkeypatch):
    monkeypatch.setattr(interrupt, "_received", [])


class _DroppedOnCollection:
    """Python drops what ``__del__`` raises (as it does in a weakref or GC callback): a signal landing there."""

    def __del__(self):
        interrupt.request(signal.SIGTERM, None)


def test_the_signal_handler_stops_as_ctrl_c_does():
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        interrupt.request(signal.SIGTERM, None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped stop, as meant
def test_a_dropped_stop_is_raised_by_the_wait_for_the_next_frame():
    _DroppedOnCollection()  # "Exception ignored in ...": the KeyboardInterrupt is gone, the run would go on
    more = threading.Event()

    def frames():  # a live source: frame 0, then none until the acquisition goes on
        yield 0
        more.wait(10)
        yield 1

    reader = Prefetch(frames(), 2)
    got = []
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            for frame in reader:
                got.append(frame)
    finally:
        more.set()
        reader.close()
    assert time.monotonic() - start < 5 and got in ([], [0])  # not after the 10 s the source waits


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_only_the_main_thread_is_stopped_the_others_finish_their_work():
    _DroppedOnCollection()
    outcome = []

    def work():
        try:
            interrupt.check()
            outcome.append("went on")
        except KeyboardInterrupt:
            outcome.append("stopped")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(5)
    assert outcome == ["went on"]
    with pytest.raises(KeyboardInterrupt):
        interrupt.check()


def test_a_stop_while_a_run_finishes_is_remembered_and_the_run_finishes(tiny_scan, tiny_overrides, tmp_path,
                                                                       monkeypatch):
    """SIGINT as the checkpoint goes (all frames in): the run's last steps go on, its record says finished and
    nothing is left to resume. Raised there, it made a run whose results were whole exit 130 with a record
    saying stopped, which the same command then refused ('already holds results')."""
    import json
    import os

    from dctstream import checkpoint
    from dctstream.config import load_config
    from dctstream.runner import process_scan

    finish_run = checkpoint.finish_run

    def signalled(out_dir):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this (the main) thread
        finish_run(out_dir)

    monkeypatch.setattr(checkpoint, "finish_run", signalled)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupt.install()
    try:
        cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"dark.url={tiny_scan.dark_url}",
                                 f"output.dir={tmp_path / 'out'}", *tiny_overrides])
        stats = process_scan(cfg, display=False)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert interrupt.received() == "SIGINT" and stats.difspots_written > 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["state"] == "finished"
    assert not (tmp_path / "out" / checkpoint.RUN_DIR).exists()
    with pytest.raises(KeyboardInterrupt):  # outside the last steps, a stop is raised as ever
        interrupt.request(signal.SIGINT, None)
