"""Numba kernels of the segmenter: pure functions on arrays."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _threshold(low, scaled_peak, high, peak):
    return min(max(scaled_peak, low), high, peak)


@numba.njit(cache=True, nogil=True)
def grow_region(values, claimed, mask, low, f0, f1, y0, y1, x0, x1, pf, py, px, scaled_peak, high, peak, conn26):
    """Connected component around (pf, py, px) of {values >= t, not claimed, not masked}.

    The threshold of pixel (y, x) is t = min(max(scaled_peak, low[y, x]), high, peak), in float64.

    ``values`` and ``claimed`` are rings of frames (frame f in slot f % len);
    the search stays inside the inclusive box [f0..f1, y0..y1, x0..x1]. Returns
    the component's voxels as sorted linear indices into the box, empty when
    the start voxel itself is not eligible.
    """
    cap = values.shape[0]
    nf = f1 - f0 + 1
    nyb = y1 - y0 + 1
    nxb = x1 - x0 + 1
    plane = nyb * nxb
    visited = np.zeros(nf * plane, dtype=np.uint8)
    out = np.empty(64, dtype=np.int64)
    n_out = 0
    s = pf % cap
    if values[s, py, px] < _threshold(low[py, px], scaled_peak, high, peak) or claimed[s, py, px] or mask[py, px]:
        return out[:0]
    start = (pf - f0) * plane + (py - y0) * nxb + (px - x0)
    stack = np.empty(64, dtype=np.int64)
    stack[0] = start
    n_stack = 1
    visited[start] = 1
    while n_stack > 0:
        n_stack -= 1
        i = stack[n_stack]
        if n_out == out.size:
            out = np.concatenate((out, np.empty(out.size, dtype=np.int64)))
        out[n_out] = i
        n_out += 1
        bf = i // plane
        by = (i - bf * plane) // nxb
        bx = i - bf * plane - by * nxb
        for df in range(-1, 2):
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    steps = abs(df) + abs(dy) + abs(dx)
                    if steps == 0 or (not conn26 and steps > 1):
                        continue
                    nf_ = bf + df
                    ny_ = by + dy
                    nx_ = bx + dx
                    if nf_ < 0 or nf_ >= nf or ny_ < 0 or ny_ >= nyb or nx_ < 0 or nx_ >= nxb:
                        continue
                    j = nf_ * plane + ny_ * nxb + nx_
                    if visited[j]:
                        continue
                    visited[j] = 1
                    slot = (f0 + nf_) % cap
                    gy = y0 + ny_
                    gx = x0 + nx_
                    t = _threshold(low[gy, gx], scaled_peak, high, peak)
                    if values[slot, gy, gx] >= t and not claimed[slot, gy, gx] and not mask[gy, gx]:
                        if n_stack == stack.size:
                            stack = np.concatenate((stack, np.empty(stack.size, dtype=np.int64)))
                        stack[n_stack] = j
                        n_stack += 1
    return np.sort(out[:n_out])
