"""Frame buffers used again: an array is handed out again only once nothing but its pool holds it."""

import numpy as np
import pytest

from dctstream.ring import ArrayPool


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
