"""Numba kernels of the sources: pure functions on arrays, each writing into a caller-provided ``out``."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def float_counts(data, tolerance, top, no_data, out):
    """out = rint(data) for the float values of ``data`` (flat), ``no_data`` where a value is not a number;
    returns how many values lie more than ``tolerance`` from a whole number, are not numbers, and exceed
    ``top`` in magnitude. One pass: the same as numpy's several over a 2048 x 2048 frame."""
    fractional = 0
    nonfinite = 0
    beyond = 0
    for i in range(data.size):
        v = data[i]
        if not np.isfinite(v):
            nonfinite += 1
            out[i] = no_data
            continue
        r = np.rint(v)
        if abs(r - v) > tolerance:
            fractional += 1
        if abs(r) > top:
            beyond += 1
            out[i] = no_data
        else:
            out[i] = np.int32(r)
    return fractional, nonfinite, beyond
