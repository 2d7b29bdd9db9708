"""Kernels of the sinks: raw buffers in, caller-provided out."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)  # serial: see segment._kernels.SEGMENT_THREAD_SERIAL
def rows_at_or_above(frame, cut, tile, mask, counts):
    """counts[y] = how many unmasked pixels of row y have frame >= cut, ``cut`` a (tiles_y, tiles_x) map of
    ``tile``-pixel tiles."""
    ny, nx = frame.shape
    for y in range(ny):
        row = cut[y // tile]
        n = 0
        for x0 in range(0, nx, tile):  # a tile's run of pixels at a time: no division per pixel
            c = row[x0 // tile]
            # slices counted from 0: LLVM vectorises this loop, not one over range(x0, x1) (7x)
            values, masked = frame[y, x0:x0 + tile], mask[y, x0:x0 + tile]
            for x in range(values.size):
                n += (values[x] >= c) & (not masked[x])
        counts[y] = n


@numba.njit(cache=True, nogil=True)  # serial: see segment._kernels.SEGMENT_THREAD_SERIAL
def pixels_at_or_above(frame, unfiltered, cut, tile, mask, starts, rows, cols, values, unfiltered_values):
    """The unmasked pixels with frame >= cut (as ``rows_at_or_above``) in (row, col) order into rows, cols,
    values and, where ``unfiltered`` has the frame's shape, their ``unfiltered`` values; row y's pixels
    from index ``starts[y]`` (the counts before it)."""
    ny, nx = frame.shape
    both = unfiltered.shape == frame.shape
    for y in range(ny):
        row = cut[y // tile]
        n = starts[y]
        for x0 in range(0, nx, tile):
            c = row[x0 // tile]
            found, masked = frame[y, x0:x0 + tile], mask[y, x0:x0 + tile]  # see rows_at_or_above
            k = 0
            for i in range(found.size):  # vectorised: most runs have none (15 % faster)
                k += (found[i] >= c) & (not masked[i])
            if k == 0:
                continue
            for i in range(found.size):
                v = found[i]
                if v >= c and not masked[i]:
                    rows[n] = y
                    cols[n] = x0 + i
                    values[n] = v
                    if both:
                        unfiltered_values[n] = unfiltered[y, x0 + i]
                    n += 1
