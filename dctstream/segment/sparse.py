"""The segmenter fed sparse frames: a frame's pixels at or above a cut, 0 elsewhere.

`SparseSegmenter` gives the blobs `Segmenter` gives for the same frames made
dense, but touches only a frame's stored pixels where `Segmenter` passes over
every pixel: writing the frame into its slot (and clearing it when the slot is
given back), finding the rows that hold seeds, taking the zingers out of the
unfiltered values. Each is exact: a pixel that is 0 in both copies is not a
seed while every seed threshold is above 0 (otherwise the frame is searched
whole, as by `Segmenter`), and never a zinger (0 - 0 is not above a limit of
at least 0 x anything; when it is, the zinger's 0 takes a 0). All the rest --
labels, growth, splits, the flood guard -- is `Segmenter`'s own, on the same
frame slots. A stack of sparse frames costs about its stored pixels, where a
dense push costs the frame's every pixel several times (at 2048 x 2048, a
resegmentation's frame holds 3 % of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ._kernels import SPIKE, _set_flag
from .segmenter import SPIKE_LOW, SPIKE_VALUE, Segmenter

# Free slots kept resident: one given back to the system costs the faults and zeroing of its pages when
# taken again (about 2 ms an array at 2048 x 2048, more than writing a frame's stored pixels), and the
# frames after a spot closes free a few slots at once (bench scan at 1024 x 1024: 32 of 601 slots taken
# afresh, the first ones, against 158 with one kept).
HOT_SLOTS = 4


@dataclass(frozen=True)
class SparseFrame:
    """A frame of ``shape`` that is ``values`` at (``rows``, ``cols``), each pixel once, and 0 elsewhere."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def dense(self, out: np.ndarray | None = None) -> np.ndarray:
        out = np.zeros(self.shape, np.float32) if out is None else out
        out[self.rows, self.cols] = self.values
        return out


class SparseSegmenter(Segmenter):
    """`Segmenter` whose ``push`` takes `SparseFrame` s (``measure`` one at the same pixels)."""

    hot_slots = HOT_SLOTS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pixels_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # each frame held in a slot
        self._pushed: tuple[int, SparseFrame, SparseFrame | None] | None = None

    def push(self, k: int, frame: SparseFrame, seed=None, low=None, measure: SparseFrame | None = None):
        self._pushed = (k, frame, measure)
        return super().push(k, frame, seed, low, measure)

    def _put(self, slot: int, frame: SparseFrame, measure: SparseFrame | None) -> None:
        # the measured values go in with the zingers taken out (_despike): nothing reads them before
        k, _, _ = self._pushed
        scatter(self._values, slot, frame.rows, frame.cols, frame.values)
        self._pixels_of[k] = (frame.rows, frame.cols)

    def _give_slot(self, f: int) -> None:
        # a free slot is all 0s (its pages given back read as 0s too): a frame writes only its own pixels
        cap, pos = self._capacity, f % self._capacity
        slot = int(self._slot_of[pos])
        if slot >= 0:
            held = next((g for g in self._pixels_of if g % cap == pos), None)
            if held is None:  # a frame put back whole (load_frame)
                self._values[slot] = 0
                self._measures[slot] = 0
            else:
                rows, cols = self._pixels_of.pop(held)
                clear(self._values, slot, rows, cols)
                if self.measured:
                    clear(self._measures, slot, rows, cols)
        super()._give_slot(f)

    def _link(self, k: int, frame: SparseFrame, seed_tiles=None, low_tiles=None) -> None:
        super()._link(k, self._values[self._slot_of[k % self._capacity]], seed_tiles, low_tiles)

    def _mark_seed_rows(self, frame: np.ndarray, seed_tiles: np.ndarray, seed: np.ndarray) -> None:
        if not seed_tiles.min() > 0:  # the 0s may be seeds: look at them all
            super()._mark_seed_rows(frame, seed_tiles, seed)
            return
        _, pixels, _ = self._pushed
        sparse_seed_rows(pixels.rows, pixels.cols, pixels.values, seed_tiles, self.params.tile_px, self.mask,
                         self._seed_rows, seed)

    def _despike(self, slot: int) -> None:
        _, pixels, measure = self._pushed
        put_despiked(self._measures, slot, pixels.rows, pixels.cols, pixels.values, measure.values,
                     self._low_tiles[slot], self.params.tile_px, SPIKE_LOW, SPIKE_VALUE, self._flags)

    def load_frame(self, k, frame, measure=None):
        raise NotImplementedError("a sparse segmenter is not restored from a checkpoint")


@numba.njit(cache=True, nogil=True)
def scatter(pool, slot, rows, cols, values):
    for i in range(rows.size):
        pool[slot, rows[i], cols[i]] = values[i]


@numba.njit(cache=True, nogil=True)
def clear(pool, slot, rows, cols):
    for i in range(rows.size):
        pool[slot, rows[i], cols[i]] = 0


@numba.njit(cache=True, nogil=True)
def sparse_seed_rows(rows, cols, values, tiles, tile, mask, marks, seed):
    """`seed_rows` of the frame that is ``values`` at (rows, cols) and 0 elsewhere, every tile's threshold
    above 0."""
    ny, nx = seed.shape
    marks[:] = False
    for i in range(rows.size):
        y, x = rows[i], cols[i]
        if values[i] >= tiles[y // tile, x // tile] and not mask[y, x]:
            marks[y] = True
    for y in range(ny):
        if marks[y]:
            row = tiles[y // tile]
            for x0 in range(0, nx, tile):
                v = row[x0 // tile]
                masked, out = mask[y, x0:x0 + tile], seed[y, x0:x0 + tile]  # see _kernels.seed_rows
                for x in range(out.size):
                    out[x] = np.inf if masked[x] else v


@numba.njit(cache=True, nogil=True)
def put_despiked(measures, slot, rows, cols, values, measured, low, tile, low_factor, value_factor, flags):
    """The measured values into slot ``slot`` at (rows, cols), each taken through `despike` against the
    frame's value there, with the same arithmetic (float32 values, the limit in float64), zingers flagged
    in ``flags`` as it flags them."""
    for i in range(rows.size):
        y, x = rows[i], cols[i]
        f = np.float32(values[i])
        m = np.float32(measured[i])
        if m - f > low_factor * low[y // tile, x // tile] + value_factor * abs(f):
            m = f
            _set_flag(flags, slot, SPIKE, y, x)
        measures[slot, y, x] = m
