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


@numba.njit(cache=True, nogil=True, parallel=True)
def window_median_normalised(ring, slots, dark, scales, out):
    """out[y, x] = median over s in slots of (float32(ring[s, y, x]) - dark[y, x]) * scales[s]."""
    n = slots.size
    ny, nx = out.shape
    for y in numba.prange(ny):
        rows = np.empty((n, nx), dtype=np.float32)
        for i in range(n):
            s = slots[i]
            sc = scales[s]
            for x in range(nx):
                rows[i, x] = (np.float32(ring[s, y, x]) - dark[y, x]) * sc
        buf = np.empty(n, dtype=np.float32)
        for x in range(nx):
            for i in range(n):
                buf[i] = rows[i, x]
            out[y, x] = _select(buf, n, n // 2)


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
