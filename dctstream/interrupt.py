"""A stop asked for by a signal, noticed even where Python drops the KeyboardInterrupt it raised.

Python raises a signal handler's exception at whatever bytecode the main
thread runs, a garbage-collector or weakref callback included, and there the
exception is printed ("Exception ignored in ...") and dropped: the run went
on as if never asked to stop, until the daemon killed it 30 s later with its
record still saying ``running``. So `request` also remembers the signal, and
the main thread's waits for the next frame call `check`.
"""

from __future__ import annotations

import signal
import threading

# The names of the signals received; a list, not an Event: a handler must take no lock its thread may hold.
_received: list[str] = []


def request(signum, frame) -> None:
    """A signal handler: stop as Ctrl-C does (KeyboardInterrupt), and remember it (`check`)."""
    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_received[-1])


def check() -> None:
    """Raise KeyboardInterrupt in the main thread if a stop was requested; for its normal path only, never
    its cleanup. Other threads go on: they finish what was handed to them (nothing closed is lost)."""
    if _received and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt(_received[0])


def install() -> None:
    """SIGTERM and SIGINT stop the process as Ctrl-C does, and a dropped stop is caught up (main thread only)."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request)
