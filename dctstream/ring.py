"""The preallocated ring of raw frames that the running median slides over."""

from __future__ import annotations

import numpy as np


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
