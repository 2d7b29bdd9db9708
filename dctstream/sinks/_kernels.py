"""Kernels of the sinks: raw buffers in, caller-provided out."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def count_at_or_above(frame, cut, tile, mask):
    """How many unmasked pixels have frame >= cut, ``cut`` a (tiles_y, tiles_x) map of ``tile``-pixel tiles."""
    ny, nx = frame.shape
    n = 0
    for y in range(ny):
        row = cut[y // tile]
        for x in range(nx):
            n += (frame[y, x] >= row[x // tile]) and not mask[y, x]
    return n


@numba.njit(cache=True, nogil=True)
def pixels_at_or_above(frame, cut, tile, mask, rows, cols, values):
    """The unmasked pixels with frame >= cut (a tile map, as ``count_at_or_above``) in (row, col) order into
    rows, cols, values (each at least ``count_at_or_above`` long); returns their count."""
    ny, nx = frame.shape
    n = 0
    for y in range(ny):
        row = cut[y // tile]
        for x in range(nx):
            v = frame[y, x]
            if v >= row[x // tile] and not mask[y, x]:
                rows[n] = y
                cols[n] = x
                values[n] = v
                n += 1
    return n
