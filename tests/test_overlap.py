"""The threads that join the stages: order, back-pressure, errors, nothing dropped."""

import signal
import threading
import time

import pytest

from dctstream.overlap import Prefetch, Worker

# Every test here joins threads: one that never ends fails the test after this long instead of hanging the suite
# (pytest-timeout is not a dependency).
TEST_TIMEOUT_S = 30


@pytest.fixture(autouse=True)
def _timeout():
    def expired(signum, frame):
        raise TimeoutError(f"test still running after {TEST_TIMEOUT_S} s: a thread that never ends?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_prefetch_yields_every_item_in_order_and_never_runs_more_than_depth_ahead():
    produced = []
    ahead = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    reader = Prefetch(items(), depth=3)
    got = []
    for item in reader:
        time.sleep(0.002)  # a slow consumer: the producer must wait for it
        ahead.append(len(produced) - len(got))
        got.append(item)
    reader.close()
    assert got == list(range(50))
    # queued (3) + the one in the consumer's hands + the one the thread holds while blocked
    assert max(ahead) <= 3 + 2


def test_prefetch_raises_the_source_error_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("frame 2: broken")

    reader = Prefetch(items(), depth=8)
    got = []
    with pytest.raises(ValueError, match="frame 2: broken"):
        for item in reader:
            got.append(item)
    reader.close()
    assert got == [1, 2]


def test_prefetch_close_stops_a_producer_blocked_on_a_full_queue():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    reader = Prefetch(endless(), depth=2)
    next(iter(reader))
    reader.close(timeout_s=2.0)
    assert not reader.running


def test_worker_handles_every_item_in_order_and_bounds_its_queue():
    handled = []
    gate = threading.Event()

    def handle(item):
        gate.wait()
        handled.append(item)

    worker = Worker(handle, depth=4)
    worker.submit(0)  # taken by the thread, which then waits at the gate
    time.sleep(0.05)
    for i in range(1, 5):
        worker.submit(i)
    blocked = threading.Thread(target=worker.submit, args=(5,), daemon=True)
    blocked.start()
    time.sleep(0.2)
    try:
        assert blocked.is_alive(), "a full queue must hold the submitter back"
    finally:
        gate.set()  # whatever happened, the worker's thread goes on and ends
    blocked.join(2.0)
    assert not blocked.is_alive()
    worker.close()
    assert handled == list(range(6))


def test_worker_error_reaches_the_submitter_and_close():
    def handle(item):
        if item == 3:
            raise OSError(28, "No space left on device")

    worker = Worker(handle, depth=1)
    with pytest.raises(OSError, match="No space"):
        for i in range(100):
            worker.submit(i)
            time.sleep(0.001)
    with pytest.raises(OSError, match="No space"):
        worker.close()
