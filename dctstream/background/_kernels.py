"""Numba kernels of the background stage: pure functions on arrays.

Every kernel writes into a caller-provided ``out``; the checked wrappers live
in ``dctstream.background.kernels``.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _select(buf, n, k):
    """k-th smallest of buf[:n] (quickselect, reorders buf in place)."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three as pivot keeps sorted runs (common along psi) O(n)
        a = buf[lo]
        b = buf[mid]
        c = buf[hi]
        if a < b:
            if b < c:
                pivot = b
            elif a < c:
                pivot = c
            else:
                pivot = a
        else:
            if a < c:
                pivot = a
            elif b < c:
                pivot = c
            else:
                pivot = b
        i = lo
        j = hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


_TILE = 64  # pixels of a row gathered over the window at once


@numba.njit(cache=True, nogil=True, parallel=True)
def window_median_normalised(ring, slots, dark, gain, scales, out):
    """out[y, x] = median over s in slots of (float32(ring[s, y, x]) - dark[y, x]) * gain[y, x] * scales[s]."""
    n = slots.size
    ny, nx = out.shape
    for y in numba.prange(ny):
        rows = np.empty((n, _TILE), dtype=np.float32)
        buf = np.empty(n, dtype=np.float32)
        for x0 in range(0, nx, _TILE):
            width = min(_TILE, nx - x0)
            for i in range(n):
                s = slots[i]
                sc = scales[s]
                for t in range(width):
                    rows[i, t] = (np.float32(ring[s, y, x0 + t]) - dark[y, x0 + t]) * gain[y, x0 + t] * sc
            for t in range(width):
                for i in range(n):
                    buf[i] = rows[i, t]
                out[y, x0 + t] = _select(buf, n, n // 2)


@numba.njit(cache=True, nogil=True, parallel=True)
def sorted_window_init(values, out):
    """out[p, :] = sorted(values[:, p]) for every pixel p; values is (window, npix)."""
    w, npix = values.shape
    for p in numba.prange(npix):
        for i in range(w):
            out[p, i] = values[i, p]
        out[p, :] = np.sort(out[p, :])


@numba.njit(cache=True, nogil=True, parallel=True)
def sorted_window_replace(win, old, new):
    """In every row p of the sorted window, replace one value old[p] by new[p], keeping it sorted."""
    npix, w = win.shape
    for p in numba.prange(npix):
        vo = old[p]
        vn = new[p]
        if vo == vn:
            continue
        lo = 0
        hi = w
        while lo < hi:  # leftmost index holding vo
            mid = (lo + hi) // 2
            if win[p, mid] < vo:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        if vn > vo:
            while i + 1 < w and win[p, i + 1] < vn:
                win[p, i] = win[p, i + 1]
                i += 1
        else:
            while i > 0 and win[p, i - 1] > vn:
                win[p, i] = win[p, i - 1]
                i -= 1
        win[p, i] = vn


@numba.njit(cache=True, nogil=True, inline="always")
def _reflect(i, n):
    # scipy.ndimage's "reflect" mode: d c b a | a b c d | d c b a
    while i < 0 or i >= n:
        if i < 0:
            i = -i - 1
        else:
            i = 2 * n - i - 1
    return i


@numba.njit(cache=True, nogil=True, inline="always")
def _sort3(a, b, c):
    if a > b:
        a, b = b, a
    if b > c:
        b, c = c, b
    if a > b:
        a, b = b, a
    return a, b, c


@numba.njit(cache=True, nogil=True, inline="always")
def _median3(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@numba.njit(cache=True, nogil=True, parallel=True)
def median_filter_3x3(img, out):
    """3 x 3 median, edges as scipy.ndimage.median_filter(mode='reflect').

    Each column of three is sorted once and shared by the three pixels that
    use it; the median of nine is then the median of (the largest of the
    three column minima, the median of the column medians, the smallest of
    the column maxima).
    """
    ny, nx = img.shape
    for y in numba.prange(ny):
        above, here, below = img[_reflect(y - 1, ny)], img[y], img[_reflect(y + 1, ny)]
        lo = np.empty(nx + 2, dtype=img.dtype)
        mid = np.empty(nx + 2, dtype=img.dtype)
        hi = np.empty(nx + 2, dtype=img.dtype)
        # places 1 .. nx hold columns 0 .. nx - 1, through slices counted from 0, which LLVM vectorises (a
        # reflected index per column did not: 1.4x over the whole filter); the reflected edges repeat them
        lo_, mid_, hi_ = lo[1:nx + 1], mid[1:nx + 1], hi[1:nx + 1]
        for x in range(nx):
            lo_[x], mid_[x], hi_[x] = _sort3(above[x], here[x], below[x])
        lo[0], mid[0], hi[0] = lo[1], mid[1], hi[1]
        lo[nx + 1], mid[nx + 1], hi[nx + 1] = lo[nx], mid[nx], hi[nx]
        row = out[y]
        for x in range(nx):
            a = max(max(lo[x], lo[x + 1]), lo[x + 2])
            b = _median3(mid[x], mid[x + 1], mid[x + 2])
            c = min(min(hi[x], hi[x + 1]), hi[x + 2])
            row[x] = _median3(a, b, c)


@numba.njit(cache=True, nogil=True, parallel=True)
def median_filter_2d(img, size, out):
    """size x size median of a 2-D image, edges as scipy.ndimage.median_filter(mode='reflect')."""
    ny, nx = img.shape
    r = size // 2
    n = size * size
    for y in numba.prange(ny):
        buf = np.empty(n, dtype=img.dtype)
        for x in range(nx):
            m = 0
            for dy in range(-r, r + 1):
                yy = _reflect(y + dy, ny)
                for dx in range(-r, r + 1):
                    buf[m] = img[yy, _reflect(x + dx, nx)]
                    m += 1
            out[y, x] = _select(buf, n, n // 2)


# ---- windowed histogram running median (integer frames) ---------------------------
#
# Each pixel keeps a histogram of unit-width bins [base, base + nbins) over the
# values in its window, its current median ``med`` and ``lt``, the number of
# window values below ``med`` (values outside the bins included). Replacing one
# value moves the median by at most one rank, so a few bins are touched per
# frame. When the median would leave the bins, the pixel is rebuilt from the
# ring, centred on its new median. Where no median is wanted (block mode), a
# step only moves two counts; the median is walked to once, when it is wanted
# or at the end of the batch (so that ``med`` is always a median between calls).
#
# Counts are stored modulo top + 1 (256 for uint8 counts): a window of fewer than
# 2 (top + 1) frames has at most one bin per pixel holding top + 1 values or more,
# and ``over[p]`` names it (-1: none). Byte counts halve the histogram's memory and
# the cache lines a step touches, against 16-bit counts.


@numba.njit(cache=True, nogil=True, inline="always")
def _count(hist, p, k, ov, top):
    n = np.int64(hist[p, k])
    return n + top + 1 if k == ov else n


@numba.njit(cache=True, nogil=True, inline="always")
def _add(hist, p, k, ov, top):
    """One value more in bin k; returns the pixel's overflowing bin. No branch: a select, always predicted."""
    n = np.int64(hist[p, k]) + 1
    hist[p, k] = n & top
    return k if n > top else ov


@numba.njit(cache=True, nogil=True, inline="always")
def _remove(hist, p, k, ov, top):
    """One value less in bin k; returns the pixel's overflowing bin (only that bin wraps below 0)."""
    n = np.int64(hist[p, k]) - 1
    hist[p, k] = n & top
    return -1 if n < 0 else ov


@numba.njit(cache=True, nogil=True)
def _select_u16(buf, n, k, counts):
    """k-th smallest of buf[:n], all in [0, 65536): two counting passes, high byte then low byte.

    Detector counts repeat a lot, which slows a quickselect down; counting does not care.
    """
    counts[:] = 0
    for i in range(n):
        counts[buf[i] >> 8] += 1
    high = 0
    below = 0
    while below + counts[high] <= k:
        below += counts[high]
        high += 1
    counts[:] = 0
    for i in range(n):
        if buf[i] >> 8 == high:
            counts[buf[i] & 255] += 1
    low = 0
    while below + counts[low] <= k:
        below += counts[low]
        low += 1
    return (high << 8) | low


@numba.njit(cache=True, nogil=True, inline="always")
def _count_into(buf, window, p, b, hist, top):
    """Count buf[:window] into pixel p's bins from b; returns (values below b, overflowing bin)."""
    nbins = hist.shape[1]
    hist[p, :] = 0
    ov = -1
    below = 0
    for i in range(window):
        k = buf[i] - b
        if k < 0:
            below += 1
        elif k < nbins:
            ov = _add(hist, p, k, ov, top)
    return below, ov


@numba.njit(cache=True, nogil=True)
def _hist_place(buf, window, p, h, b, base, hist, over, top, lt, med):
    """Count buf[:window] into pixel p's bins from b and find its median there; False, with the bins
    unusable, if it is not there. One pass over the window and a walk, against a selection."""
    c, ov = _count_into(buf, window, p, b, hist, top)
    where, m, c = _hist_walk(hist, p, b, b, c, ov, top, h)
    if where != 0:
        return False
    base[p] = b
    over[p] = ov
    med[p] = m
    lt[p] = c
    return True


@numba.njit(cache=True, nogil=True)
def _hist_fill(buf, window, p, h, base, hist, over, top, lt, med, counts, drift):
    """Place pixel p's bins around the median of buf[:window], found by a selection, and count the window
    into them: centred, or with three quarters of the bins ahead of the median where it drifts (drift +1
    up, -1 down).

    ``counts`` (256 ints) is scratch space for 16-bit frames; pass an empty array otherwise.
    """
    nbins = hist.shape[1]
    m = _select_u16(buf, window, h, counts) if counts.size else _select(buf, window, h)
    if drift > 0:
        b = m - nbins // 4
    elif drift < 0:
        b = m - nbins + 1 + nbins // 4
    else:
        b = m - nbins // 2
    _hist_place(buf, window, p, h, b, base, hist, over, top, lt, med)  # m is in [b, b + nbins): found


@numba.njit(cache=True, nogil=True, inline="always")
def _hist_shift(buf, window, p, h, base, hist, over, top, lt, med, drift):
    """Move pixel p's bins three quarters of their width along the drift (+1 up, -1 down) and find the
    median of buf[:window] in them: the median of a drifting pixel leaves its bins by a few values,
    so it is found near the trailing edge."""
    nbins = hist.shape[1]
    return _hist_place(buf, window, p, h, base[p] + drift * (nbins - nbins // 4), base, hist, over, top, lt, med)


@numba.njit(cache=True, nogil=True, parallel=True)
def hist_init(ring, first_frame, window, base, hist, over, lt, med, u16, box):
    """Build the histogram of every pixel of ``box`` (y0, y1, x0, x1: rows y0 .. y1 - 1, columns x0 .. x1 - 1)
    from the window of frames first_frame .. first_frame + window - 1."""
    cap = ring.shape[0]
    nx = ring.shape[2]
    top = np.iinfo(hist.dtype).max
    nbins = hist.shape[1]
    h = window // 2
    for y in numba.prange(box[0], box[1]):
        # short row pieces: read the ring in order, and stay small enough for the cache
        rows = np.empty((window, _TILE), dtype=ring.dtype)
        buf = np.empty(window, dtype=np.int64)
        counts = np.empty(256 if u16 else 0, dtype=np.int64)
        for x0 in range(box[2], box[3], _TILE):
            width = min(_TILE, box[3] - x0)
            for i in range(window):
                rows[i, :width] = ring[(first_frame + i) % cap, y, x0:x0 + width]
            for t in range(width):
                for i in range(window):
                    buf[i] = rows[i, t]
                p = y * nx + x0 + t
                # the background is smooth: bins centred on the last pixel's median mostly hold this one's
                # (a pass and a walk, against a selection); recentred when it lies in their outer quarters
                placed = x0 + t > box[2] and _hist_place(buf, window, p, h, med[p - 1] - nbins // 2, base, hist,
                                                         over, top, lt, med)
                if placed and abs(med[p] - base[p] - nbins // 2) > nbins // 4:
                    _hist_place(buf, window, p, h, med[p] - nbins // 2, base, hist, over, top, lt, med)
                elif not placed:
                    _hist_fill(buf, window, p, h, base, hist, over, top, lt, med, counts, 0)


@numba.njit(cache=True, nogil=True, inline="always")
def _hist_update(hist, p, b, m, c, ov, top, o, n):
    """Replace value o by n in pixel p's bins; returns the new count of window values below m, and over."""
    nbins = hist.shape[1]
    k = o - b
    if 0 <= k < nbins:
        ov = _remove(hist, p, k, ov, top)
    k = n - b
    if 0 <= k < nbins:
        ov = _add(hist, p, k, ov, top)
    return c - (o < m) + (n < m), ov


@numba.njit(cache=True, nogil=True, inline="always")
def _hist_walk(hist, p, b, m, c, ov, top, h):
    """Move m (c values below it) to the window's median, rank h; returns (where, median, lt): where is
    0 when the median is in the bins, +1 above them, -1 below them.

    m may be several ranks away (updates since the last walk): each bin crossed moves it by its count.
    """
    nbins = hist.shape[1]
    k = m - b
    while c > h:
        k -= 1
        if k < 0:
            return -1, m, c
        c -= _count(hist, p, k, ov, top)
    while True:
        n = _count(hist, p, k, ov, top)
        if c + n > h:
            break
        c += n
        k += 1
        if k >= nbins:
            return 1, m, c
    return 0, b + k, c


@numba.njit(cache=True, nogil=True, parallel=True)
def hist_slide(ring, new_frames, window, emit, out, base, hist, over, lt, med, rebuilds, u16, skip):
    """Slide every pixel's window over new_frames (in order): add frame f, drop frame f - window.

    After step j, when emit[j], out[j] receives the median of frames
    new_frames[j] - window + 1 .. new_frames[j]. The ring must hold all of
    those frames and the dropped ones. rebuilds[y] counts rebuilds per row.
    The pixels of the box ``skip`` (y0, y1, x0, x1, as hist_init's; empty: none) are left as they are,
    their ``out`` unwritten.

    A pixel whose median leaves its bins is set aside and finished after the
    rest of its row, from the ring's rows read in order once for all such
    pixels: reading a pixel's window alone touches a cache line per frame.
    """
    cap = ring.shape[0]
    ny, nx = ring.shape[1], ring.shape[2]
    h = window // 2
    top = np.iinfo(hist.dtype).max
    n_steps = new_frames.size
    # ring slots of each step's dropped and added frame: a modulo per pixel and step costs more than the step
    old_slots = np.empty(n_steps, np.int64)
    new_slots = np.empty(n_steps, np.int64)
    for j in range(n_steps):
        old_slots[j] = (new_frames[j] - window) % cap
        new_slots[j] = new_frames[j] % cap
    for y in numba.prange(ny):
        buf = np.empty(window, dtype=np.int64)
        counts = np.empty(256 if u16 else 0, dtype=np.int64)
        late_x = np.empty(nx, dtype=np.int64)
        late_j = np.empty(nx, dtype=np.int64)
        late_drift = np.empty(nx, dtype=np.int64)
        n_late = 0
        # The dropped and added values of the next _TILE pixels, gathered a row piece at a time: reading them
        # pixel by pixel walks 2 x n_steps frames at once, more streams than the prefetcher follows
        # (twice the CPU time per pixel-step at 2048 x 2048, window 501).
        olds = np.empty((_TILE, n_steps), ring.dtype)
        news = np.empty((_TILE, n_steps), ring.dtype)
        skip_row = skip[0] <= y < skip[1]
        for x in range(nx):
            t = x % _TILE
            if t == 0:
                for j in range(n_steps):
                    so = old_slots[j]
                    sn = new_slots[j]
                    for i in range(min(_TILE, nx - x)):
                        olds[i, j] = ring[so, y, x + i]
                        news[i, j] = ring[sn, y, x + i]
            if skip_row and skip[2] <= x < skip[3]:
                continue
            p = y * nx + x
            b = base[p]
            m = med[p]
            c = lt[p]
            ov = np.int64(over[p])
            late = False
            for j in range(n_steps):
                c, ov = _hist_update(hist, p, b, m, c, ov, top, np.int64(olds[t, j]), np.int64(news[t, j]))
                if not (emit[j] or j == n_steps - 1):
                    continue  # block mode: the median is looked for only where it is wanted
                where, m, c = _hist_walk(hist, p, b, m, c, ov, top, h)
                if where != 0:
                    late_x[n_late] = x
                    late_j[n_late] = j
                    late_drift[n_late] = where
                    n_late += 1
                    late = True
                    break
                if emit[j]:
                    out[j, y, x] = m
            if not late:
                med[p] = m
                lt[p] = c
                over[p] = ov
        if n_late == 0:
            continue
        first = new_frames[late_j[:n_late].min()] - window + 1
        span = new_frames[n_steps - 1] - first + 1
        values = np.empty((n_late, span), dtype=ring.dtype)
        for g in range(span):
            slot = (first + g) % cap
            for d in range(n_late):
                values[d, g] = ring[slot, y, late_x[d]]
        for d in range(n_late):
            x = late_x[d]
            p = y * nx + x
            j = late_j[d]
            drift = late_drift[d]
            while True:  # rebuild at step j, then slide on until the end or the next rebuild
                start = new_frames[j] - window + 1 - first
                for i in range(window):
                    buf[i] = values[d, start + i]
                if not _hist_shift(buf, window, p, h, base, hist, over, top, lt, med, drift):
                    _hist_fill(buf, window, p, h, base, hist, over, top, lt, med, counts, drift)
                rebuilds[y] += 1
                b = base[p]
                m = med[p]
                c = lt[p]
                ov = np.int64(over[p])
                if emit[j]:
                    out[j, y, x] = m
                j += 1
                drift = 0
                while j < n_steps:
                    f = new_frames[j]
                    c, ov = _hist_update(hist, p, b, m, c, ov, top, np.int64(values[d, f - window - first]),
                                         np.int64(values[d, f - first]))
                    if emit[j] or j == n_steps - 1:
                        drift, m, c = _hist_walk(hist, p, b, m, c, ov, top, h)
                        if drift != 0:
                            break
                        if emit[j]:
                            out[j, y, x] = m
                    j += 1
                if drift == 0:
                    break
            med[p] = m
            lt[p] = c
            over[p] = ov


@numba.njit(cache=True, nogil=True, parallel=True)
def window_median_box(ring, slots, box, u16, out):
    """out[y, x] = the median of ring[slots, y, x] over the pixels of ``box`` (as hist_init's), integer frames,
    exactly."""
    n = slots.size
    for y in numba.prange(box[0], box[1]):
        buf = np.empty(n, dtype=np.int64)
        counts = np.empty(256 if u16 else 0, dtype=np.int64)
        for x in range(box[2], box[3]):
            for i in range(n):
                buf[i] = ring[slots[i], y, x]
            out[y, x] = _select_u16(buf, n, n // 2, counts) if u16 else _select(buf, n, n // 2)


@numba.njit(cache=True, nogil=True, parallel=True)
def normalised_minus_background(raw, dark, gain, scale, background, out):
    """out = (float32(raw) - dark) * gain * scale - background in one pass, in float32 as numpy would."""
    ny, nx = raw.shape
    for y in numba.prange(ny):
        for x in range(nx):
            out[y, x] = (np.float32(raw[y, x]) - dark[y, x]) * gain[y, x] * scale - background[y, x]


@numba.njit(cache=True, nogil=True, parallel=True)
def normalised_minus_raw_median(raw, dark, gain, scale, median, out):
    """out = (float32(raw) - dark) * gain * scale - (float32(median) - dark) * gain, in float32 as numpy would.

    The background of a median of raw frames, computed on the fly: no float32 frame kept per median.
    """
    ny, nx = raw.shape
    for y in numba.prange(ny):
        for x in range(nx):
            d = dark[y, x]
            g = gain[y, x]
            out[y, x] = (np.float32(raw[y, x]) - d) * g * scale - (np.float32(median[y, x]) - d) * g


@numba.njit(cache=True, nogil=True, parallel=True)
def quantise_normalised(raw, dark, scale, lo, hi, out):
    """out = clip(rint((float32(raw) - dark) * scale + dark), lo, hi) in out's integer type: a frame normalised
    to the beam intensity, back in raw counts (the dark added back), so the histogram median can take it."""
    ny, nx = raw.shape
    for y in numba.prange(ny):
        for x in range(nx):
            v = np.float64(np.rint((np.float32(raw[y, x]) - dark[y, x]) * scale + dark[y, x]))
            out[y, x] = min(max(v, lo), hi)


@numba.njit(cache=True, nogil=True, parallel=True)
def normalise_float(raw, dark, scale, out):
    """out = (raw - dark) * scale + dark, float32: the same as quantise_normalised for float frames, unrounded."""
    ny, nx = raw.shape
    for y in numba.prange(ny):
        for x in range(nx):
            out[y, x] = (np.float32(raw[y, x]) - dark[y, x]) * scale + dark[y, x]


@numba.njit(cache=True, nogil=True)
def pixels_at_least(frame, level, out):
    """The number of pixels of ``frame`` at or above ``level``; the flat indices of the first ``out.size`` of them,
    in order, into ``out``. A row is looked at twice only where it holds one: detectors saturate rarely."""
    ny, nx = frame.shape
    n = 0
    for y in range(ny):
        row = frame[y]
        if row.max() < level:
            continue
        for x in range(nx):
            if row[x] >= level:
                if n < out.size:
                    out[n] = y * nx + x
                n += 1
    return n
