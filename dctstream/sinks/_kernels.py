"""Kernels of the sinks: raw buffers in, caller-provided out."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)  # serial: see segment._kernels.SEGMENT_THREAD_SERIAL
def pixels_at_or_above(frame, unfiltered, cut, tile, mask, rows, cols, values, unfiltered_values):
    """The unmasked pixels with frame >= cut (``cut`` a (tiles_y, tiles_x) map of ``tile``-pixel tiles) in (row, col)
    order into rows, cols, values and, where ``unfiltered`` has the frame's shape, their ``unfiltered`` values;
    returns how many, or -1 (the outputs partly written) where more than the outputs hold. One pass over the
    frame: counting them first took a second one (a fifth of the time at 2048 x 2048)."""
    ny, nx = frame.shape
    both = unfiltered.shape == frame.shape
    room = rows.size
    n = 0
    for y in range(ny):
        row = cut[y // tile]
        for x0 in range(0, nx, tile):  # a tile's run of pixels at a time: no division per pixel
            c = row[x0 // tile]
            # slices counted from 0: LLVM vectorises this loop, not one over range(x0, x1) (7x)
            found, masked = frame[y, x0:x0 + tile], mask[y, x0:x0 + tile]
            k = 0
            for i in range(found.size):  # vectorised: most runs have none (15 % faster)
                k += (found[i] >= c) & (not masked[i])
            if k == 0:
                continue
            if n + k > room:
                return -1
            for i in range(found.size):
                v = found[i]
                if v >= c and not masked[i]:
                    rows[n] = y
                    cols[n] = x0 + i
                    values[n] = v
                    if both:
                        unfiltered_values[n] = unfiltered[y, x0 + i]
                    n += 1
    return n
