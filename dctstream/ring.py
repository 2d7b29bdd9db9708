"""Rings of frames: the raw frames the running median slides over, rings whose slots can be given back, and
pools of frame buffers used again."""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import weakref

import numpy as np

# madvise(MADV_POPULATE_WRITE) (Linux 5.14 and later) faults memory in as a write would, leaving what it holds
_MADV_POPULATE_WRITE = 23
# Rings smaller than this fault in as fast as they are filled: no thread for them
FAULT_IN_MIN_BYTES = 256 * 2**20


class FrameRing:
    """Holds the last ``capacity`` frames of a scan in their native dtype.

    Frame ``k`` lives in slot ``k % capacity``; asking for a frame that has
    been overwritten (or not yet arrived) is a bug in the caller and raises.
    """

    def __init__(self, capacity: int, shape: tuple[int, int], dtype):
        self.data = np.empty((capacity, *shape), dtype=dtype)
        self.frame_of_slot = np.full(capacity, -1, dtype=np.int64)
        self.count = 0  # frames pushed so far

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    def slot(self, frame: int) -> int:
        slot = frame % self.capacity
        if self.frame_of_slot[slot] != frame:
            raise IndexError(f"frame {frame} is not in the ring (slot holds {self.frame_of_slot[slot]})")
        return slot

    def slots(self, start: int, stop: int) -> np.ndarray:
        """Slots of frames ``start..stop-1``, all of which must be in the ring."""
        return np.array([self.slot(k) for k in range(start, stop)], dtype=np.int64)

    def push(self, frame: np.ndarray) -> int:
        """Store the next frame, overwriting the oldest; returns its slot."""
        slot = self.count % self.capacity
        self.data[slot] = frame
        self.frame_of_slot[slot] = self.count
        self.count += 1
        return slot

    def __getitem__(self, frame: int) -> np.ndarray:
        return self.data[self.slot(frame)]

    def fault_in(self) -> threading.Thread | None:
        """Fault the ring's memory in from the slot of the next frame on, in a thread of its own (see
        `fault_in`): the ring fills with the scan's first window, one frame after the other."""
        first = self.count % self.capacity
        return fault_in(self.data, [*range(first, self.capacity), *range(first)])


def fault_in(frames: np.ndarray, slots, *, min_bytes: int = FAULT_IN_MIN_BYTES) -> threading.Thread | None:
    """Fault in the memory of ``frames[slot]`` for each of ``slots`` in turn, in a daemon thread, where the
    system can (Linux 5.14 and later; else nothing is done); the thread, or None.

    Memory never written costs its first write a page fault and the zeroing of the page: on this project's
    virtual machines 19 ms for an 8 MiB frame of 2048 x 2048 uint16 (about a tenth of a core's memory
    bandwidth), paid in the thread that fills a ring frame by frame while the other core has little to do.
    Faulted in ahead by another thread, the same cost falls on that core. The values are left as they are (a
    page already there is not touched): the frames may be written meanwhile.
    """
    if frames.nbytes < min_bytes or not sys.platform.startswith("linux") or not frames.flags.c_contiguous:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    size, page = frames[0].nbytes, mmap.PAGESIZE
    held = weakref.ref(frames)  # a ring dropped meanwhile (a new pass's) is not held, nor faulted in further

    def run() -> None:
        for slot in slots:
            frames = held()
            if frames is None:
                return
            base = frames.ctypes.data  # mapped while ``frames`` is held, for this slot's call
            start = -(-(base + slot * size) // page) * page
            stop = (base + (slot + 1) * size) // page * page
            if stop > start and madvise(start, stop - start, _MADV_POPULATE_WRITE) != 0:
                return  # not supported here (EINVAL), or no memory for it: each write faults its page in
            del frames
        thread.faulted_in = True

    thread = threading.Thread(target=run, name="dctstream-fault-in", daemon=True)
    thread.faulted_in = False  # True once every slot is in
    thread.start()
    return thread


def releasable_frames(capacity: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed (capacity, *shape) array in its own anonymous memory map, for ``release``."""
    dtype = np.dtype(dtype)
    count = capacity * int(np.prod(shape))
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: a plain array, whose slots stay resident
        return np.zeros((capacity, *shape), dtype)
    # private: a page given back is freed (shared anonymous memory would keep it)
    memory = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # a frame's slot faults in a few 2 MiB pages, not thousands of 4 kiB ones
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype, count).reshape(capacity, *shape)


def release(frames: np.ndarray, slot: int) -> None:
    """Give the memory of ``frames[slot]`` back to the system until the slot is written again: a ring sized
    for the worst case then only holds, resident, the frames still needed. Only the whole pages inside the
    slot go (they read as zeros meanwhile); a slot smaller than a page keeps its bytes."""
    memory = frames.base
    while memory is not None and not isinstance(memory, mmap.mmap):  # ndarray -> memoryview -> mmap
        memory = memory.obj if isinstance(memory, memoryview) else getattr(memory, "base", None)
    if not isinstance(memory, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    size = frames[0].nbytes
    start = -(-slot * size // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the slot only
    stop = (slot + 1) * size // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        memory.madvise(mmap.MADV_DONTNEED, start, stop - start)


class ArrayPool:
    """Arrays taken again once nothing but the pool holds them (whatever was read or computed into one has
    been used and dropped), instead of a new one for every frame.

    A new frame-sized array lies in memory that the system zeroes page by page on first write, and the
    allocator gave it back when freed (the arrays are freed by the thread after the one that made them): at
    2048 x 2048 a tenth of the pipeline's CPU time went into zeroing pages (``perf``: ``clear_page_erms``).
    At most ``size`` arrays are kept; when every one is in use a new one is made.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` that nothing else holds, its values left as they were."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        for array in self._arrays:
            # held by the list, this loop and getrefcount's argument alone: no view or user of it is left
            if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) == 3:
                return array
        array = np.empty(shape, dtype)
        if len(self._arrays) >= self.size:
            self._arrays.pop(0)
        self._arrays.append(array)
        return array
