"""Frame buffers used again: an array is handed out again only once nothing but its pool holds it."""

import sys
import threading
import weakref

import numpy as np
import pytest

from dctstream.ring import ArrayPool, FrameRing, fault_in
from page_faults import faults_writing


# and a frame's size: a frame-sized array must own its memory, as a view of it then holds it (one in a memory
# map of its own, whose views hold the map, not the array, was handed out again under the segmenter's feet)
@pytest.mark.parametrize("shape", [(4, 5), (2048, 2048)])
def test_an_array_is_taken_again_only_once_every_user_has_dropped_it(shape):
    pool = ArrayPool(3)
    first = pool.take(shape, np.float32)
    first[...] = 7
    view = first[1:3]
    address = first.__array_interface__["data"][0]
    del first
    second = pool.take(shape, np.float32)  # the view still reads the first array: a new one
    assert second.__array_interface__["data"][0] != address
    del view
    third = pool.take(shape, np.float32)  # nothing holds the first any more: it is used again
    assert third.__array_interface__["data"][0] == address and np.all(third == 7)
    assert pool.take((4, 5), np.uint16).dtype == np.uint16  # another dtype: its own array
    assert pool.take((2, 5), np.float32).shape == (2, 5)


def test_a_full_pool_of_arrays_in_use_makes_new_ones_and_keeps_at_most_its_size():
    pool = ArrayPool(2)
    held = [pool.take((3,), np.int64) for _ in range(4)]
    assert len({a.__array_interface__["data"][0] for a in held}) == 4
    assert len(pool._arrays) == 2
    kept = {a.__array_interface__["data"][0] for a in pool._arrays}
    del held
    again = [pool.take((3,), np.int64) for _ in range(2)]
    assert {a.__array_interface__["data"][0] for a in again} == kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_a_ring_faulted_in_by_its_thread_keeps_the_frames_written_meanwhile_and_costs_their_writes_no_faults():
    ring = FrameRing(24, (512, 1024), np.uint16)  # 24 MiB
    thread = fault_in(ring.data, range(ring.capacity), min_bytes=0)
    frames = [np.full((512, 1024), k + 1, np.uint16) for k in range(ring.capacity)]
    for frame in frames:  # while the thread faults the same memory in
        ring.push(frame)
    thread.join(timeout=60)
    if not thread.faulted_in:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14 and later)")
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(ring[k], frame)
    fresh = np.empty_like(ring.data)  # the same size, never written: its writes fault every page in
    faulted = FrameRing(24, (512, 1024), np.uint16)
    faulted.fault_in()  # under FAULT_IN_MIN_BYTES: nothing
    later = fault_in(faulted.data, range(faulted.capacity), min_bytes=0)
    later.join(timeout=60)
    control = faults_writing(fresh)
    assert control >= 12  # at least one fault a 2 MiB huge page
    assert faults_writing(faulted.data) <= control // 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_a_ring_dropped_while_it_is_faulted_in_is_freed_and_no_longer_faulted_in():
    ring = FrameRing(64, (512, 1024), np.uint16)  # 64 MiB
    first_done, dropped = threading.Event(), threading.Event()

    def slots():  # the ring is dropped after the first slot, whatever the machine's load (it raced the thread)
        yield 0
        first_done.set()
        dropped.wait(timeout=60)
        yield from range(1, ring_slots)

    ring_slots = ring.capacity
    thread = fault_in(ring.data, slots(), min_bytes=0)
    while not first_done.wait(timeout=0.05):
        if not thread.is_alive():  # it stopped at its first slot: madvise refused the advice
            pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14 and later)")
    freed = weakref.ref(ring.data)
    del ring
    dropped.set()
    thread.join(timeout=60)
    assert freed() is None  # the thread held it no longer than a slot
    assert not thread.faulted_in  # and stopped there, its last slots left
