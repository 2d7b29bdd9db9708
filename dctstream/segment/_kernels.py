"""Numba kernels of the segmenter: pure functions on arrays."""

import numba
import numpy as np

CLAIMED = 1  # bit of the flags ring: the voxel belongs to a blob
_SEEN = 2  # bit of the flags ring: reached by the search under way, cleared before it returns


@numba.njit(cache=True, nogil=True, inline="always")
def _threshold(low, scaled_peak, high, peak):
    return min(max(scaled_peak, low), high, peak)


@numba.njit(cache=True, nogil=True)
def grow_region(values, flags, mask, low, f0, f1, y0, y1, x0, x1, pf, py, px, scaled_peak, high, peak,
                conn26, max_voxels):
    """Connected component around (pf, py, px) of {values >= t, not claimed, not masked}.

    ``values`` and ``flags`` are rings of frames (frame f in slot f % len);
    the search stays inside the inclusive box [f0..f1, y0..y1, x0..x1]. The
    threshold of pixel (y, x) is t = min(max(scaled_peak, low[y, x]), high, peak),
    in float64. Returns (voxels, complete): the component's voxels as sorted
    indices (f * ny + y) * nx + x, empty when the start voxel is not
    eligible; complete is False when the search stopped at ``max_voxels``.
    """
    cap, ny, nx = values.shape
    s = pf % cap
    out = np.empty(64, dtype=np.int64)
    if values[s, py, px] < _threshold(low[py, px], scaled_peak, high, peak) or flags[s, py, px] & CLAIMED \
            or mask[py, px]:
        return out[:0], True
    stack = np.empty(64, dtype=np.int64)
    out[0] = (pf * ny + py) * nx + px
    flags[s, py, px] |= _SEEN
    stack[0] = out[0]
    n_out = 1
    n_stack = 1
    complete = True
    while n_stack > 0:
        n_stack -= 1
        i = stack[n_stack]
        f = i // (ny * nx)
        y = (i // nx) % ny
        x = i % nx
        for df in range(-1, 2):
            g = f + df
            if g < f0 or g > f1:
                continue
            slot = g % cap
            for dy in range(-1, 2):
                gy = y + dy
                if gy < y0 or gy > y1:
                    continue
                for dx in range(-1, 2):
                    gx = x + dx
                    if gx < x0 or gx > x1:
                        continue
                    steps = abs(df) + abs(dy) + abs(dx)
                    if steps == 0 or (not conn26 and steps > 1):
                        continue
                    if flags[slot, gy, gx] & (CLAIMED | _SEEN) or mask[gy, gx]:
                        continue
                    if values[slot, gy, gx] < _threshold(low[gy, gx], scaled_peak, high, peak):
                        continue
                    flags[slot, gy, gx] |= _SEEN
                    if n_out == out.size:
                        out = np.concatenate((out, np.empty(out.size, dtype=np.int64)))
                    out[n_out] = (g * ny + gy) * nx + gx
                    n_out += 1
                    if n_stack == stack.size:
                        stack = np.concatenate((stack, np.empty(stack.size, dtype=np.int64)))
                    stack[n_stack] = out[n_out - 1]
                    n_stack += 1
            if n_out > max_voxels:
                complete = False
                n_stack = 0
                break
    for j in range(n_out):
        i = out[j]
        flags[(i // (ny * nx)) % cap, (i // nx) % ny, i % nx] &= ~_SEEN
    return np.sort(out[:n_out]), complete
