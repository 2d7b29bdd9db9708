"""Stages that run beside the main thread, joined by bounded queues.

The numba kernels release the GIL, so a thread reading the next frames (h5py,
decompression, sockets), a thread segmenting corrected frames and a thread
writing difspots run while the main thread computes medians. The queues are
bounded: a slow stage stops the one feeding it (back-pressure) instead of
letting memory grow.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from . import interrupt

_END = object()
# How often a blocked put or get looks up whether the other side has gone away.
_POLL_S = 0.1


class Prefetch:
    """Iterate ``iterable`` in a thread, up to ``depth`` items ahead of the consumer.

    An exception in the thread is raised in the consumer, in order, after the
    items that came before it. ``close()`` stops the thread; call it before
    closing what the thread reads from.
    """

    def __init__(self, iterable: Iterable, depth: int, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, iterable: Iterable) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, who decides
            self._put(exc)
            return
        self._put(_END)

    def __iter__(self) -> Iterator:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                interrupt.check()  # waiting for a live source's next frame when a stop came, and was dropped
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; one blocked waiting for a live source's next frame is left behind after ``timeout_s``."""
        self._stop.set()
        self._thread.join(timeout_s)


class Worker:
    """Call ``handle(item)`` in a thread for each submitted item, in order, up to ``depth`` behind.

    The first exception stops the worker; it is raised by the next ``submit``
    or by ``close``. ``close`` handles every item submitted before it, so
    nothing already handed over is dropped.
    """

    def __init__(self, handle: Callable, depth: int, name: str = "worker"):
        self._handle = handle
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self.error is None:
                try:
                    self._handle(item)
                except BaseException as exc:
                    self.error = exc

    def submit(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                interrupt.check()

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """Finish every submitted item; raise the worker's error if it had one."""
        self._queue.put(_END)
        self._thread.join()
        if self.error is not None:
            raise self.error
