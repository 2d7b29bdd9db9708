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
