"""Numba kernels of the segmenter: pure functions on arrays."""

import numba
import numpy as np

from ..background._kernels import _select

# The flags ring holds one bit per voxel in each of FLAG_PLANES planes, (slot, plane, y, x // 8), bit x % 8:
# an eighth of a byte per voxel, for a ring of frames that is the segmenter's biggest array after its values.
# SEGMENT_THREAD_SERIAL: the segmenting thread's per-frame kernels (seed_rows, subtract_tiles, despike here, and
# the sparse scan's pixels_at_or_above in sinks._kernels) run on that thread alone, not in
# parallel: it shares the 2 cores with the correcting thread's parallel kernels, and a parallel region of its own
# waited for a core each time (a few ms a frame against 0.03-0.06 ms of work at 512 x 512 px). Serial, quick
# grain-shaped and spot-dense 512^2 scans ran 6-8 % faster; the 2048^2 bench the same (19.2 against 18.9 frames/s).
CLAIMED = 0  # plane of the voxels that belong to a blob
_SEEN = 1  # plane of the voxels reached by the search under way, cleared before it returns
SPIKE = 2  # plane of the voxels whose unfiltered value was a zinger's (`despike`)
FLAG_PLANES = 3


@numba.njit(cache=True, nogil=True, inline="always")
def _flag(flags, slot, plane, y, x):
    return (flags[slot, plane, y, x >> 3] >> (x & 7)) & 1


@numba.njit(cache=True, nogil=True, inline="always")
def _set_flag(flags, slot, plane, y, x):
    flags[slot, plane, y, x >> 3] |= np.uint8(1 << (x & 7))


@numba.njit(cache=True, nogil=True, inline="always")
def _clear_flag(flags, slot, plane, y, x):
    flags[slot, plane, y, x >> 3] &= np.uint8(255 - (1 << (x & 7)))


@numba.njit(cache=True, nogil=True, inline="always")
def _threshold(low, scaled_peak, high, peak):
    return min(max(scaled_peak, low), high, peak)


@numba.njit(cache=True, nogil=True)
def grow_region(values, slot_of, flags, mask, low, tile, f0, f1, y0, y1, x0, x1, pf, py, px, scaled_peak, high, peak,
                conn26, max_voxels):
    """Connected component around (pf, py, px) of {values >= t, not claimed, not masked}.

    ``values`` and ``flags`` (bits, see CLAIMED) are pools of frames: frame f is in their
    slot slot_of[f % len(slot_of)];
    the search stays inside the inclusive box [f0..f1, y0..y1, x0..x1]. The
    threshold of voxel (f, y, x) is t = min(max(scaled_peak, low[s, y // tile, x // tile]), high, peak),
    in float64, with s frame f's slot: each frame has its own (tiles_y, tiles_x) map of lower clamps. Returns (voxels, complete): the component's voxels as sorted
    indices (f * ny + y) * nx + x, empty when the start voxel is not
    eligible; complete is False when the search stopped at ``max_voxels``.
    """
    cap = slot_of.size
    ny, nx = values.shape[1], values.shape[2]
    s = slot_of[pf % cap]
    start = np.full(1, (pf * ny + py) * nx + px, np.int64)
    if values[s, py, px] < _threshold(low[s, py // tile, px // tile], scaled_peak, high, peak) or _flag(flags, s, CLAIMED, py, px) \
            or mask[py, px]:
        return start[:0], True
    return _flood(values, slot_of, flags, mask, low, tile, f0, f1, y0, y1, x0, x1, scaled_peak, high, peak, conn26,
                  max_voxels, start, pf)


@numba.njit(cache=True, nogil=True)
def grow_region_on(values, slot_of, flags, mask, low, tile, f0, f1, y0, y1, x0, x1, scaled_peak, high, peak, conn26,
                   max_voxels, grown, grown_f1):
    """`grow_region` in a box that has gained frames after ``grown_f1``: ``grown`` (sorted, complete) is the
    component that it returned in the same box up to frame ``grown_f1``, with the same thresholds, the frames
    unchanged since. Only its voxels of frame ``grown_f1`` have neighbours not looked at yet, so the search
    starts from them. Returns (voxels, complete, valid): not valid (and nothing grown) when a voxel of
    ``grown`` has been claimed since, which may have cut it."""
    cap = slot_of.size
    ny, nx = values.shape[1], values.shape[2]
    for i in grown:
        if _flag(flags, slot_of[(i // (ny * nx)) % cap], CLAIMED, (i // nx) % ny, i % nx):
            return grown[:0], True, False
    voxels, complete = _flood(values, slot_of, flags, mask, low, tile, f0, f1, y0, y1, x0, x1, scaled_peak, high,
                              peak, conn26, max_voxels, grown, grown_f1)
    return voxels, complete, True


@numba.njit(cache=True, nogil=True)
def _flood(values, slot_of, flags, mask, low, tile, f0, f1, y0, y1, x0, x1, scaled_peak, high, peak, conn26,
           max_voxels, start, from_f):
    """The component of `grow_region` that holds the voxels ``start`` (eligible, sorted), searched from those
    of frame ``from_f`` on."""
    cap = slot_of.size
    ny, nx = values.shape[1], values.shape[2]
    plane = ny * nx
    n_start = start.size
    frontier = 0
    for i in start:
        frontier += i // plane >= from_f
    if frontier == 0:  # nothing to search from: the component is ``start`` (a valley that has stopped along psi)
        return start.copy(), True
    # each row's and column's tile looked up: two divisions for each neighbour tested cost more than the test
    tile_y = np.empty(y1 - y0 + 1, np.int64)
    for y in range(y0, y1 + 1):
        tile_y[y - y0] = y // tile
    tile_x = np.empty(x1 - x0 + 1, np.int64)
    for x in range(x0, x1 + 1):
        tile_x[x - x0] = x // tile
    out = np.empty(max(64, 2 * n_start), dtype=np.int64)
    stack = np.empty(max(64, frontier), dtype=np.int64)
    n_out = 0
    n_stack = 0
    for i in start:
        f = i // plane
        _set_flag(flags, slot_of[f % cap], _SEEN, (i - f * plane) // nx, i % nx)
        out[n_out] = i
        n_out += 1
        if f >= from_f:
            stack[n_stack] = i
            n_stack += 1
    complete = True
    while n_stack > 0:
        n_stack -= 1
        i = stack[n_stack]
        f = i // plane
        y = (i - f * plane) // nx
        x = i - f * plane - y * nx
        for df in range(-1, 2):
            g = f + df
            if g < f0 or g > f1:
                continue
            slot = slot_of[g % cap]
            frame = values[slot]
            for dy in range(-1, 2):
                gy = y + dy
                if gy < y0 or gy > y1:
                    continue
                ty = tile_y[gy - y0]
                for dx in range(-1, 2):
                    gx = x + dx
                    if gx < x0 or gx > x1:
                        continue
                    steps = abs(df) + abs(dy) + abs(dx)
                    if steps == 0 or (not conn26 and steps > 1):
                        continue
                    if _flag(flags, slot, CLAIMED, gy, gx) or _flag(flags, slot, _SEEN, gy, gx) or mask[gy, gx]:
                        continue
                    if frame[gy, gx] < _threshold(low[slot, ty, tile_x[gx - x0]], scaled_peak, high, peak):
                        continue
                    _set_flag(flags, slot, _SEEN, gy, gx)
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
        f = i // plane
        _clear_flag(flags, slot_of[f % cap], _SEEN, (i - f * plane) // nx, i % nx)
    # ``start`` is sorted: the voxels found are sorted alone and merged in (a valley grown on by a frame is most
    # of what it was: sorting it whole again, each frame, took most of a noise flood's time)
    found = np.sort(out[n_start:n_out])
    merged = np.empty(n_out, dtype=np.int64)
    a = 0
    b = 0
    for j in range(n_out):
        if b == found.size or (a < n_start and start[a] < found[b]):
            merged[j] = start[a]
            a += 1
        else:
            merged[j] = found[b]
            b += 1
    return merged, complete


@numba.njit(cache=True, nogil=True, inline="always")
def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)  # serial: see SEGMENT_THREAD_SERIAL
def seed_rows(frame, tiles, tile, mask, rows, seed):
    """rows[y] = whether row y holds a seed: an unmasked pixel with frame >= its tile's threshold in
    ``tiles`` (a (tiles_y, tiles_x) map of ``tile``-pixel tiles). The rows that do get their per-pixel
    thresholds in ``seed`` (+inf where masked), all that the labelling reads of it."""
    ny, nx = frame.shape
    for y in range(ny):
        row = tiles[y // tile]
        found = False
        for x0 in range(0, nx, tile):  # a tile's run of pixels at a time: no division per pixel
            v = row[x0 // tile]
            # slices counted from 0: LLVM vectorises these loops, not those over range(x0, x1) (7x)
            values, masked = frame[y, x0:x0 + tile], mask[y, x0:x0 + tile]
            for x in range(values.size):
                found |= (values[x] >= v) & (not masked[x])  # no early exit: the loop vectorises
        rows[y] = found
        if found:
            for x0 in range(0, nx, tile):
                v = row[x0 // tile]
                masked, out = mask[y, x0:x0 + tile], seed[y, x0:x0 + tile]
                for x in range(out.size):
                    out[x] = np.inf if masked[x] else v


@numba.njit(cache=True, nogil=True)
def label_seeds(frame, seed, rows, prev_labels, conn8, labels, dirty, parent):
    """Seeds of one frame (``frame >= seed``), labelled in 2-D, and linked to the previous frame.

    ``rows[y]`` tells whether row y holds a seed (``seed_rows``), and only those rows of ``seed`` are read;
    a masked pixel has an infinite seed.
    Labels go into ``labels`` (0 = no seed), numbered 1..n in raster order of
    first appearance, as ``scipy.ndimage.label`` numbers them; ``dirty[y]`` tells
    whether row y of ``labels`` may hold labels from before, and says on return
    whether it holds labels now. ``parent`` is scratch space of at least
    ``labels.size + 1`` entries. Returns n, then per component its voxel count
    and its brightest voxel (value, y, x; the first in raster order on ties),
    then the pairs (label in ``prev_labels``, label here) of seeds that touch
    across the two frames (``conn8``: the 3 x 3 neighbourhood, else the same
    pixel), each pair once per run of pixels.
    """
    ny, nx = frame.shape
    n_prov = 0
    n_seeds = 0
    for y in range(ny):
        if not rows[y]:
            if dirty[y]:
                labels[y, :] = 0
            continue
        for x in range(nx):
            if not frame[y, x] >= seed[y, x]:
                labels[y, x] = 0
                continue
            n_seeds += 1
            best = 0
            for dy, dx in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):
                if not conn8 and dx != 0 and dy != 0:
                    continue
                py, px = y + dy, x + dx
                if py < 0 or px < 0 or px >= nx:
                    continue
                other = labels[py, px]
                if other == 0:
                    continue
                other = _root(parent, other)
                if best == 0:
                    best = other
                elif other != best:
                    if other < best:
                        parent[best] = other
                        best = other
                    else:
                        parent[other] = best
            if best == 0:
                n_prov += 1
                parent[n_prov] = n_prov
                best = n_prov
            labels[y, x] = best
    final = np.zeros(n_prov + 1, np.int32)
    counts = np.zeros(n_prov, np.int64)
    max_value = np.empty(n_prov, frame.dtype)
    max_y = np.empty(n_prov, np.int64)
    max_x = np.empty(n_prov, np.int64)
    links_prev = np.empty(9 * n_seeds, np.int64)
    links_here = np.empty(9 * n_seeds, np.int64)
    n = 0
    n_links = 0
    for y in range(ny):
        dirty[y] = rows[y]
        if not rows[y]:
            continue
        last_prev = -1
        last_here = -1
        for x in range(nx):
            prov = labels[y, x]
            if prov == 0:
                continue
            root = _root(parent, prov)
            if final[root] == 0:
                n += 1
                final[root] = n
            c = final[root]
            labels[y, x] = c
            v = frame[y, x]
            if counts[c - 1] == 0 or v > max_value[c - 1]:
                max_value[c - 1] = v
                max_y[c - 1] = y
                max_x[c - 1] = x
            counts[c - 1] += 1
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if not conn8 and (dy != 0 or dx != 0):
                        continue
                    py, px = y + dy, x + dx
                    if py < 0 or py >= ny or px < 0 or px >= nx:
                        continue
                    p = prev_labels[py, px]
                    if p == 0 or (p == last_prev and c == last_here):
                        continue
                    links_prev[n_links] = p
                    links_here[n_links] = c
                    n_links += 1
                    last_prev = p
                    last_here = c
    return (n, counts[:n], max_value[:n], max_y[:n], max_x[:n], links_prev[:n_links], links_here[:n_links])


# `_median`'s buckets: a tile's 256 values are counted into BUCKETS buckets between their least and greatest
# (the greatest in one more of its own), those of the median's bucket kept, and so on until at most
# BUCKET_VALUES are left to select among. Counting has no comparison to mispredict: 2.7x faster than a
# quickselect over the 256 (13.1 -> 4.9 ms for the 4,096 tiles of a 2048 x 2048 frame, one thread), the same
# value.
BUCKETS = 64
BUCKET_VALUES = 32
BUCKET_ROUNDS = 12


@numba.njit(cache=True, nogil=True, inline="always")
def _median(values, work, counts, ids):
    """np.median of ``values``, exactly (the same value as a sort's), in ``work`` and ``ids`` (scratch of the
    same size, ``ids`` of uint8) and ``counts`` (scratch of (4, BUCKETS + 1)): see BUCKETS; a quickselect
    where a value is NaN. Four rows of counts, taken in turn: a run of values in one bucket waits on no
    increment before its own (15 % faster)."""
    n = values.size
    h = n // 2
    lo = values[0]
    hi = values[0]
    finite = True
    for i in range(n):
        v = values[i]
        work[i] = v
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        if v != v:
            finite = False
    m = n
    k = h  # the rank sought among work[:m]
    below = -np.inf  # the greatest value ranked below work[:m]
    for _ in range(BUCKET_ROUNDS):
        span = hi - lo
        if not finite or m <= BUCKET_VALUES or not 0 < span < np.inf:
            break
        base = lo
        scale = BUCKETS / span  # the greatest value lands in bucket BUCKETS: rounding stays under BUCKETS + 1
        counts[:] = 0
        i = 0
        while i + 4 <= m:
            for q in range(4):
                b = int((work[i + q] - base) * scale)
                ids[i + q] = b
                counts[q, b] += 1
            i += 4
        while i < m:
            b = int((work[i] - base) * scale)
            ids[i] = b
            counts[0, b] += 1
            i += 1
        ranked = 0
        top = 0
        while True:
            c = counts[0, top] + counts[1, top] + counts[2, top] + counts[3, top]
            if ranked + c > k:
                break
            ranked += c
            top += 1
        j = 0
        lo = np.inf
        hi = -np.inf
        for i in range(m):  # j <= i: the bucket's values move down in place
            v = work[i]
            b = ids[i]
            if b == top:
                work[j] = v
                j += 1
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            elif b < top and v > below:
                below = v
        m = j
        k -= ranked
    high = _select(work, m, k)
    if n % 2:
        return high
    low = below  # the value ranked h - 1: the greatest of those below work[k]
    for i in range(k):
        low = max(low, work[i])
    return (low + high) / 2


@numba.njit(cache=True, nogil=True, inline="always")
def _clipped_spread(deviation, sigma, clip, passes):
    """``passes`` times: the root mean square of the ``deviation``s (absolute) under ``clip`` x ``sigma``,
    the next ``sigma`` (0 if none is)."""
    for _ in range(passes):
        if sigma <= 0:
            break
        # four sums in turn: none waits on the one before (16 % faster over tile_sigma; the sum's last bits
        # differ from one running sum's)
        lim = clip * sigma
        t0 = t1 = t2 = t3 = 0.0
        n0 = n1 = n2 = n3 = 0
        m = deviation.size
        i = 0
        while i + 4 <= m:
            d0, d1, d2, d3 = deviation[i], deviation[i + 1], deviation[i + 2], deviation[i + 3]
            k0, k1, k2, k3 = d0 < lim, d1 < lim, d2 < lim, d3 < lim
            t0 += d0 * d0 if k0 else 0.0
            t1 += d1 * d1 if k1 else 0.0
            t2 += d2 * d2 if k2 else 0.0
            t3 += d3 * d3 if k3 else 0.0
            n0 += k0
            n1 += k1
            n2 += k2
            n3 += k3
            i += 4
        while i < m:
            if deviation[i] < lim:
                t0 += deviation[i] * deviation[i]
                n0 += 1
            i += 1
        total = (t0 + t1) + (t2 + t3)
        n = n0 + n1 + n2 + n3
        sigma = np.sqrt(total / n) if n > 0 else 0.0
    return sigma


@numba.njit(cache=True, nogil=True, inline="always")
def robust_sigma(values, clip, passes, covered, min_below, shifted, work, deviation, counts, ids):
    """Noise of ``values`` that spots do not move: 1.4826 x the median absolute deviation from the median
    (1.2533 x the mean absolute deviation where most values sit on the median), then ``passes`` times the
    standard deviation of the values within ``clip`` of those sigmas of the median. The clipped standard
    deviation does not step with the counts' integer steps as the median absolute deviation does (on
    integer counts with a noise of 2.5, that is 1.48 or 2.97 from tile to tile).

    A spot that covers most of the values puts the median in it, and that spread is the spot's. The values
    are residuals (the background subtracted): noise centred on 0, to which spots only add, so the values
    below 0 (at least ``min_below`` of them) are noise alone. When the spread about 0 -- their root mean
    square, then ``passes`` times that of the values within ``clip`` of it about 0 -- is under the spread
    about the median by ``covered`` times, a spot covers the values and the former is the noise. Values
    all shifted up (a background not followed) only widen the spread about 0: it is never taken for them.
    Values whose median lies more than ``shifted`` of those sigmas below 0 (the beam off, the shutter
    closed: the background is not there) say nothing of the noise of the frames with it: NaN.
    ``work``, ``deviation`` and ``ids``: scratch of ``values``' size; ``counts``: see `_median`."""
    centre = _median(values, work, counts, ids)
    for i in range(values.size):
        deviation[i] = abs(values[i] - centre)
    sigma = 1.4826 * _median(deviation, work, counts, ids)
    if sigma <= 0:
        sigma = 1.2533 * deviation.mean()
    sigma = _clipped_spread(deviation, sigma, clip, passes)
    if centre < -shifted * sigma:
        return np.nan
    if centre > 0:
        below = 0
        total = 0.0
        for i in range(values.size):
            v = values[i]
            deviation[i] = abs(v)
            if v < 0:
                below += 1
                total += v * v
        if below >= min_below:
            about_zero = _clipped_spread(deviation, np.sqrt(total / below), clip, passes)
            if about_zero > 0 and covered * about_zero < sigma:
                sigma = about_zero
    return sigma


@numba.njit(cache=True, nogil=True, parallel=True)
def tile_sigma(frame, mask, tile, step, min_samples, clip, passes, covered, min_below, shifted, out):
    """``robust_sigma`` of each tile of ``frame`` over its unmasked pixels on a grid of ``step``;
    NaN where fewer than ``min_samples`` pixels are unmasked, or the tile is shifted below 0."""
    ny, nx = frame.shape
    nty, ntx = out.shape
    size = ((tile + step - 1) // step) ** 2
    for ty in numba.prange(nty):  # a row of tiles at a time: scratch made once for the row
        buf = np.empty(size, np.float64)
        work = np.empty(size, np.float64)
        deviation = np.empty(size, np.float64)
        counts = np.empty((4, BUCKETS + 1), np.int64)
        ids = np.empty(size, np.uint8)
        for tx in range(ntx):
            n = 0
            x0 = tx * tile
            for y in range(ty * tile, min((ty + 1) * tile, ny), step):
                values, masked = frame[y, x0:x0 + tile:step], mask[y, x0:x0 + tile:step]  # see tile_level
                for i in range(values.size):
                    if not masked[i]:
                        buf[n] = values[i]
                        n += 1
            if n < min_samples:
                out[ty, tx] = np.nan
            else:
                out[ty, tx] = robust_sigma(buf[:n], clip, passes, covered, min_below, shifted, work[:n],
                                           deviation[:n], counts, ids[:n])


@numba.njit(cache=True, nogil=True, parallel=True)
def tile_level(found, measure, mask, sigma, tile, step, min_samples, exclude, clip, out):
    """Mean of ``measure`` over each tile's unmasked pixels on a grid of ``step`` where ``found`` is below
    ``exclude`` x the tile's ``sigma`` and ``measure`` within ``clip`` x ``sigma`` of 0; NaN where fewer than
    ``min_samples`` such pixels, or ``sigma`` is NaN."""
    ny, nx = found.shape
    nty, ntx = out.shape
    for ty in numba.prange(nty):
        for tx in range(ntx):
            s = sigma[ty, tx]
            if not s >= 0:
                out[ty, tx] = np.nan
                continue
            top = exclude * s
            lim = clip * s
            n = 0
            total = 0.0
            x0 = tx * tile
            for y in range(ty * tile, min((ty + 1) * tile, ny), step):
                # slices counted from 0 (see seed_rows): 1.7x faster than indexing the frames over range(x0, x1)
                filtered, values = found[y, x0:x0 + tile:step], measure[y, x0:x0 + tile:step]
                masked = mask[y, x0:x0 + tile:step]
                for i in range(values.size):
                    if not masked[i] and filtered[i] < top:
                        v = values[i]
                        if -lim <= v <= lim:
                            total += v
                            n += 1
            out[ty, tx] = total / n if n >= min_samples else np.nan


@numba.njit(cache=True, nogil=True, inline="always")
def _insert_sorted(buf, m, v):
    """Put v into the sorted buf[:m] (insertion: the runs these medians take are a few values long)."""
    j = m
    while j > 0 and buf[j - 1] > v:
        buf[j] = buf[j - 1]
        j -= 1
    buf[j] = v


@numba.njit(cache=True, nogil=True, inline="always")
def _median_of_sorted(buf, m):
    """Median of the sorted buf[:m], NaN if m is 0."""
    if m == 0:
        return np.nan
    if m % 2:
        return buf[m // 2]
    return (buf[m // 2 - 1] + buf[m // 2]) / 2.0


@numba.njit(cache=True, nogil=True)
def neighbourhood_median(tiles, out):
    """out[y, x] = median of the finite values among tiles[y-1:y+2, x-1:x+2] (NaN where none)."""
    ty, tx = tiles.shape
    near = np.empty(9, np.float64)
    for y in range(ty):
        for x in range(tx):
            m = 0
            for yy in range(max(y - 1, 0), min(y + 2, ty)):
                for xx in range(max(x - 1, 0), min(x + 2, tx)):
                    v = tiles[yy, xx]
                    if not np.isnan(v):
                        _insert_sorted(near, m, v)
                        m += 1
            out[y, x] = _median_of_sorted(near, m)
    return out


@numba.njit(cache=True, nogil=True)  # serial: see SEGMENT_THREAD_SERIAL
def subtract_tiles(frame, tiles, tile):
    """In place: frame[y, x] -= tiles[y // tile, x // tile] (both float32: the sum in float32, as numpy's)."""
    ny, nx = frame.shape
    for y in range(ny):
        ty = y // tile
        for x0 in range(0, nx, tile):
            v = tiles[ty, x0 // tile]
            values = frame[y, x0:x0 + tile]  # counted from 0: vectorised (see seed_rows)
            for x in range(values.size):
                values[x] -= v


@numba.njit(cache=True, nogil=True)
def nan_median_along_first(held, out):
    """``out`` = np.nanmedian(held, axis=0) for a 3-D ``held`` of a few planes (NaN where a column is all
    NaN): numpy's takes the masked-array path on such short columns (3.6 against 0.8 ms for 15 x 64 x 64)."""
    n, ny, nx = held.shape
    column = np.empty(n, np.float64)
    for y in range(ny):
        for x in range(nx):
            m = 0
            for i in range(n):
                v = held[i, y, x]
                if not np.isnan(v):
                    _insert_sorted(column, m, v)
                    m += 1
            out[y, x] = _median_of_sorted(column, m)
    return out


@numba.njit(cache=True, nogil=True)
def unclaimed_sum(values, slot_of, flags, mask, f0, f1, y0, y1, x0, x1):
    """Sum of the values in the inclusive box [f0..f1, y0..y1, x0..x1] that no blob has claimed and
    that are not masked: the tails of a spot around its claimed voxels."""
    cap = slot_of.size
    total = 0.0
    for f in range(f0, f1 + 1):
        s = slot_of[f % cap]
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if not mask[y, x] and not _flag(flags, s, CLAIMED, y, x):
                    total += values[s, y, x]
    return total


@numba.njit(cache=True, nogil=True)
def unclaimed_sum_of(values, slot_of, flags, fs, ys, xs, f0, f1, y0, y1, x0, x1):
    """Sum of the values at voxels (fs, ys, xs) in the inclusive box [f0..f1, y0..y1, x0..x1] that no blob has
    claimed."""
    cap = slot_of.size
    total = 0.0
    for i in range(fs.size):
        f, y, x = fs[i], ys[i], xs[i]
        if f0 <= f <= f1 and y0 <= y <= y1 and x0 <= x <= x1 and not _flag(flags, slot_of[f % cap], CLAIMED, y, x):
            total += values[slot_of[f % cap], y, x]
    return total


@numba.njit(cache=True, nogil=True)
def moments(values, slot_of, fs, ys, xs):
    """(sum, sum of frame x value, of y x value, of x x value) of the values at voxels (fs, ys, xs)."""
    cap = slot_of.size
    s = sf = sy = sx = 0.0
    for i in range(fs.size):
        v = np.float64(values[slot_of[fs[i] % cap], ys[i], xs[i]])
        s += v
        sf += fs[i] * v
        sy += ys[i] * v
        sx += xs[i] * v
    return s, sf, sy, sx


@numba.njit(cache=True, nogil=True)
def shared_light(fs, ys, xs, values, part, n_parts, rounds, settled, shaped_rounds, spread, alpha, tol, share):
    """share[p, i]: part p's share of the value of voxel i (fs, ys, xs, ``values``), each voxel first all its own
    part's (``part``: 0 .. n_parts - 1), then shared among the parts in proportion to their models: a part's
    model at a voxel is its image at that voxel's pixel, normalised over the voxels' pixels, times its share's
    sum in that voxel's frame (its rocking curve). The image: for up to ``rounds`` rounds (fewer once no part's
    centroid in y, x moved by ``settled`` or more in one after the first) the 2-D Gaussian g of the mean and
    covariance in y, x of its share (``spread`` added to each variance); then, for up to ``shaped_rounds`` more,
    its share summed over frames at each pixel, s, as s^alpha g^(1 - alpha) (each normalised), until no part's
    centroid moved by ``tol`` or more in the last one. A part whose share sums to 0 or less has no model (it
    keeps what it has); a voxel no model reaches keeps its shares. Returns the rounds made."""
    n = fs.size
    f0, y0, x0 = fs.min(), ys.min(), xs.min()
    n_frames = fs.max() - f0 + 1
    width = xs.max() - x0 + 1
    pixel_at = np.full((ys.max() - y0 + 1) * width, -1, np.int64)
    pixel = np.empty(n, np.int64)
    pixel_y = np.empty(n, np.float64)
    pixel_x = np.empty(n, np.float64)
    n_pixels = 0
    for i in range(n):
        at = (ys[i] - y0) * width + xs[i] - x0
        if pixel_at[at] < 0:
            pixel_at[at] = n_pixels
            pixel_y[n_pixels] = ys[i] - y0
            pixel_x[n_pixels] = xs[i] - x0
            n_pixels += 1
        pixel[i] = pixel_at[at]
    # about the box's corner: one pass over a few pixels' spread loses no digits that matter
    vy = (ys - y0).astype(np.float64)
    vx = (xs - x0).astype(np.float64)
    frame = fs - f0
    share[:] = 0.0
    for i in range(n):
        share[part[i], i] = values[i]
    model = np.zeros((n_parts, n))
    rock = np.empty(n_frames)
    image = np.empty(n_pixels)
    light = np.empty(n_pixels)
    centre = np.full((n_parts, 2), np.nan)
    made = 0
    r = 0
    while r < rounds + shaped_rounds:
        shaped = r >= rounds
        moved = 0.0
        for p in range(n_parts):
            total = sy = sx = syy = sxx = sxy = 0.0
            rock[:] = 0.0
            if shaped:
                light[:] = 0.0
            for i in range(n):
                w = max(share[p, i], 0.0)
                dy, dx = vy[i], vx[i]
                total += w
                sy += w * dy
                sx += w * dx
                syy += w * dy * dy
                sxx += w * dx * dx
                sxy += w * dy * dx
                rock[frame[i]] += w
                if shaped:  # the share's image: only the shaped rounds take it
                    light[pixel[i]] += w
            if not total > 0:
                model[p, :] = 0.0
                continue
            my, mx = sy / total, sx / total
            moved = max(moved, abs(my - centre[p, 0]), abs(mx - centre[p, 1]))
            centre[p, 0], centre[p, 1] = my, mx
            cyy = syy / total - my * my + spread
            cxx = sxx / total - mx * mx + spread
            cxy = sxy / total - my * mx
            # the Gaussian's exponent (times 1 - alpha in a shaped round: s^alpha g^(1 - alpha) as one exp,
            # whose normalising constants, the same at every pixel, the image's norm takes)
            g = (1.0 - alpha if shaped else 1.0) / (cyy * cxx - cxy * cxy)
            a, b, c = -0.5 * g * cxx, g * cxy, -0.5 * g * cyy
            norm = 0.0
            for q in range(n_pixels):
                dy, dx = pixel_y[q] - my, pixel_x[q] - mx
                e = a * dy * dy + b * dy * dx + c * dx * dx
                if not shaped:
                    image[q] = np.exp(e)
                elif light[q] > 0:
                    image[q] = np.exp(alpha * np.log(light[q]) + e)
                else:
                    image[q] = 0.0
                norm += image[q]
            for i in range(n):
                model[p, i] = image[pixel[i]] * rock[frame[i]] / norm
        if r > rounds and moved < tol:
            break
        if 0 < r < rounds - 1 and moved < settled:
            rounds = r + 1  # the Gaussians have settled: the shaped rounds next
        made += 1
        for i in range(n):
            total = 0.0
            for p in range(n_parts):
                total += model[p, i]
            if total > 0:
                for p in range(n_parts):
                    share[p, i] = values[i] * (model[p, i] / total)
        r += 1
    return made


@numba.njit(cache=True, nogil=True)  # serial: see SEGMENT_THREAD_SERIAL
def despike(measure, found, low, tile, low_factor, value_factor, flags, slot):
    """In place: a pixel of ``measure`` (unfiltered) more than ``low_factor`` x its tile's ``low`` plus
    ``value_factor`` x ``|found|`` (its 3x3 median) above ``found`` is a zinger: it takes ``found``'s value,
    and its SPIKE bit is set in slot ``slot`` of ``flags``."""
    ny, nx = measure.shape
    for y in range(ny):
        ty = y // tile
        spiked = False
        for x0 in range(0, nx, tile):  # looked for first without writing: the loop vectorises (see seed_rows)
            limit = low_factor * low[ty, x0 // tile]
            values, filtered = measure[y, x0:x0 + tile], found[y, x0:x0 + tile]
            for x in range(values.size):
                f = filtered[x]
                spiked |= values[x] - f > limit + value_factor * abs(f)
        if spiked:  # a row in hundreds at most
            for x in range(nx):
                f = found[y, x]
                if measure[y, x] - f > low_factor * low[ty, x // tile] + value_factor * abs(f):
                    measure[y, x] = f
                    _set_flag(flags, slot, SPIKE, y, x)


@numba.njit(cache=True, nogil=True, inline="always")
def _top(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _voxel_box(fs, ys, xs, keep):
    """The index of each kept voxel at its place in their bounding box (-1 elsewhere), and the box's origin."""
    f0, y0, x0 = fs.min(), ys.min(), xs.min()
    box = np.full((fs.max() - f0 + 1, ys.max() - y0 + 1, xs.max() - x0 + 1), -1, np.int64)
    for i in range(fs.size):
        if keep[i]:
            box[fs[i] - f0, ys[i] - y0, xs[i] - x0] = i
    return box, f0, y0, x0


@numba.njit(cache=True, nogil=True, inline="always")
def _neighbours(box, f, y, x, conn26, out):
    """The kept 6- or 26-neighbours of box place (f, y, x) into ``out``; returns how many."""
    nf, ny, nx = box.shape
    m = 0
    for df in range(-1, 2):
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                d = abs(df) + abs(dy) + abs(dx)
                if d == 0 or (not conn26 and d > 1):
                    continue
                g, h, w = f + df, y + dy, x + dx
                if 0 <= g < nf and 0 <= h < ny and 0 <= w < nx and box[g, h, w] >= 0:
                    out[m] = box[g, h, w]
                    m += 1
    return m


@numba.njit(cache=True, nogil=True)
def stands_out(peak, saddle, prominence_abs, ratio, photon):
    """Whether a maximum ``peak`` stands out above ``saddle``, where it meets a brighter one: by
    max(sqrt(prominence_abs^2 + photon x max(saddle, 0)), ratio x peak)."""
    return peak - saddle >= max(np.sqrt(prominence_abs ** 2 + photon * max(saddle, 0.0)), ratio * peak)


@numba.njit(cache=True, nogil=True)
def split_maxima(fs, ys, xs, values, prominence_abs, ratio, photon, conn26):
    """The parts of one blob: for each voxel, the index of the maximum of the part it belongs to.

    Voxels are flooded from the brightest down; where two parts meet at a voxel of value s, the dimmer
    one (peak p) stays a part of its own only if it stands out: p - s >= max(sqrt(a^2 + photon x max(s, 0)),
    ratio x p), a = prominence_abs at its peak; otherwise it joins the brightest part met there. A voxel
    joins the part of its brightest flooded neighbour (ties: the lower index). Ties in value are flooded in
    index order."""
    n = values.size
    box, f0, y0, x0 = _voxel_box(fs, ys, xs, np.ones(n, np.bool_))
    near = np.empty(26, np.int64)
    parent = np.full(n, -1, np.int64)  # -1: not flooded yet
    roots = np.empty(26, np.int64)
    for i in np.argsort(-values, kind="mergesort"):
        v = values[i]
        n_roots = 0
        best = -1
        for j in near[:_neighbours(box, fs[i] - f0, ys[i] - y0, xs[i] - x0, conn26, near)]:
            if parent[j] < 0:
                continue
            if best < 0 or values[j] > values[best] or (values[j] == values[best] and j < best):
                best = j
            r = _top(parent, j)
            if r not in roots[:n_roots]:
                roots[n_roots] = r
                n_roots += 1
        if n_roots == 0:
            parent[i] = i
            continue
        top = roots[0]
        for r in roots[1:n_roots]:
            if values[r] > values[top] or (values[r] == values[top] and r < top):
                top = r
        for r in roots[:n_roots]:
            if r != top and not stands_out(values[r], v, prominence_abs[r], ratio, photon):
                parent[r] = top
        parent[i] = _top(parent, best)
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = _top(parent, i)
    return out


@numba.njit(cache=True, nogil=True)
def flood_from(fs, ys, xs, allowed, start, conn26):
    """The voxels (of these, where ``allowed``) connected to voxel ``start`` through allowed voxels."""
    n = fs.size
    reached = np.zeros(n, np.bool_)
    if not allowed[start]:
        return reached
    box, f0, y0, x0 = _voxel_box(fs, ys, xs, allowed)
    near = np.empty(26, np.int64)
    stack = np.empty(n, np.int64)
    stack[0] = start
    reached[start] = True
    top = 1
    while top > 0:
        top -= 1
        i = stack[top]
        for j in near[:_neighbours(box, fs[i] - f0, ys[i] - y0, xs[i] - x0, conn26, near)]:
            if not reached[j]:
                reached[j] = True
                stack[top] = j
                top += 1
    return reached


@numba.njit(cache=True, nogil=True, inline="always")
def _claimed_neighbour_max(values, slot_of, flags, f, y, x, f0, f1, y0, y1, x0, x1, conn26):
    """The greatest value of the claimed 6- or 26-neighbours of voxel (f, y, x) in the inclusive box
    [f0..f1, y0..y1, x0..x1] (those through which it could grow); -inf when none is claimed."""
    cap = slot_of.size
    best = -np.inf
    for df in range(-1, 2):
        g = f + df
        if g < f0 or g > f1:
            continue
        slot = slot_of[g % cap]
        for dy in range(-1, 2):
            v = y + dy
            if v < y0 or v > y1:
                continue
            for dx in range(-1, 2):
                u = x + dx
                d = abs(df) + abs(dy) + abs(dx)
                if d == 0 or (not conn26 and d > 1) or u < x0 or u > x1:
                    continue
                if _flag(flags, slot, CLAIMED, v, u) and values[slot, v, u] > best:
                    best = values[slot, v, u]
    return best


@numba.njit(cache=True, nogil=True)
def claimed_beside_max(values, slot_of, flags, fs, ys, xs, f0, f1, y0, y1, x0, x1, conn26):
    """The greatest value of the claimed voxels next to these (6- or 26-neighbours, through which they could
    grow) in the inclusive box [f0..f1, y0..y1, x0..x1]; -inf when there is none."""
    best = -np.inf
    for i in range(fs.size):
        best = max(best, _claimed_neighbour_max(values, slot_of, flags, fs[i], ys[i], xs[i], f0, f1, y0, y1, x0, x1,
                                                conn26))
    return best


@numba.njit(cache=True, nogil=True)
def saddle_beside_brighter(values, slot_of, flags, fs, ys, xs, own, above, f0, f1, y0, y1, x0, x1, conn26):
    """The greatest ``own`` value of these voxels that are next to a claimed voxel brighter than ``above`` (as
    `claimed_beside_max` looks); -inf when none is."""
    best = -np.inf
    for i in range(fs.size):
        if own[i] > best and _claimed_neighbour_max(values, slot_of, flags, fs[i], ys[i], xs[i], f0, f1, y0, y1,
                                                    x0, x1, conn26) > above:
            best = own[i]
    return best


@numba.njit(cache=True, nogil=True)
def claim(flags, slot_of, fs, ys, xs):
    """Mark these voxels claimed."""
    cap = slot_of.size
    for i in range(fs.size):
        _set_flag(flags, slot_of[fs[i] % cap], CLAIMED, ys[i], xs[i])
