"""A stop asked for by a signal, noticed even where Python drops the KeyboardInterrupt it raised.

Python raises a signal handler's exception at whatever bytecode the main
thread runs, a garbage-collector or weakref callback included, and there the
exception is printed ("Exception ignored in ...") and dropped: the run went
on as if never asked to stop, until the daemon killed it 30 s later with its
record still saying ``running``. So `request` also remembers the signal, and
the main thread's waits for the next frame call `check`.
"""

from __future__ import annotations

import contextlib
import signal
import threading

# The names of the signals received; a list, not an Event: a handler must take no lock its thread may hold.
_received: list[str] = []
# How many `deferred` sections the main thread is in: a stop there is remembered, not raised.
_deferring = [0]


def request(signum, frame) -> None:
    """A signal handler: stop as Ctrl-C does (KeyboardInterrupt), and remember it (`check`)."""
    _received.append(signal.Signals(signum).name)
    if not _deferring[0]:
        raise KeyboardInterrupt(_received[-1])


@contextlib.contextmanager
def deferred():
    """A stop asked for inside is remembered (`received`), not raised: the last steps of a run (closing its
    files, removing its checkpoint, writing its record) are not cut in the middle. A SIGINT there made a run
    whose results were whole exit 130 with a record saying stopped, which the same command then refused."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1


def received() -> str | None:
    """The first stop asked for, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise KeyboardInterrupt in the main thread if a stop was requested; for its normal path only, never
    its cleanup. Other threads go on: they finish what was handed to them (nothing closed is lost)."""
    if _received and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt(_received[0])


def install() -> None:
    """SIGTERM and SIGINT stop the process as Ctrl-C does, and a dropped stop is caught up (main thread only)."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request)
