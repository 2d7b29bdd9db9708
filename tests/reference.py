"""Slow, obviously-correct whole-volume references the streamed stages must equal exactly."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def reference_corrected(raw, *, window, mode="exact", stride=1, dark=None, scales=None, filter_size=3, gain=None):
    """Corrected frames of a whole scan: np.median over each frame's window, then scipy's median filter.

    Normalised frame j is (raw_j - dark) * gain * scales[j] (gain = 1 / flat, per pixel)."""
    n = raw.shape[0]
    if n < window:
        window = n if n % 2 else n - 1
    h = window // 2
    dark = np.zeros(raw.shape[1:], np.float32) if dark is None else dark.astype(np.float32)
    scales = np.ones(n, np.float32) if scales is None else np.asarray(scales, np.float32)
    gain = np.ones(raw.shape[1:], np.float32) if gain is None else gain.astype(np.float32)
    normalised = (raw.astype(np.float32) - dark) * gain * scales[:, None, None]
    out = np.empty(raw.shape, np.float32)
    for k in range(n):
        centre = (k // stride) * stride + stride // 2 if mode == "block" else k
        start = min(max(centre - h, 0), n - window)
        background = np.median(normalised[start:start + window], axis=0)
        corrected = normalised[k] - background
        out[k] = ndi.median_filter(corrected, size=filter_size, mode="reflect") if filter_size > 1 else corrected
    return out


def reference_blobs(volume, params, mask=None):
    """Whole-volume double threshold: scipy.ndimage.label on the seeds, then greedy growth brightest first.

    Returns (blobs, rejected) where blobs is a list of (frame, y, x) voxel
    arrays in growth order and rejected counts the rejections by reason.
    """
    nf, ny, nx = volume.shape
    mask = np.zeros((ny, nx), bool) if mask is None else mask
    allowed = np.broadcast_to(~mask, volume.shape)
    structure = ndi.generate_binary_structure(3, 1 if params.connectivity == 6 else 3)
    seed_map, low_map = params.maps((ny, nx))
    labels, n = ndi.label((volume >= seed_map) & allowed, structure=structure)
    rejected = {"seed_min_voxels": 0, "maximum_claimed": 0, "too_small": 0, "too_large": 0}
    regions = []
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        members = np.argwhere(labels[box] == i) + [s.start for s in box]  # (frame, y, x), C order
        if len(members) < params.seed_min_voxels:
            rejected["seed_min_voxels"] += 1
            continue
        values = volume[tuple(members.T)]
        peak = members[np.flatnonzero(values == values.max())[0]]
        regions.append((-float(values.max()), *map(int, peak)))
    regions.sort()
    claimed = np.zeros(volume.shape, bool)
    reach_x, reach_y, reach_f = params.max_size
    blobs = []
    for neg_peak, f, y, x in regions:
        box = (slice(max(f - reach_f, 0), f + reach_f + 1), slice(max(y - reach_y, 0), y + reach_y + 1),
               slice(max(x - reach_x, 0), x + reach_x + 1))
        peak = -neg_peak
        high = np.inf if params.grow_high is None else params.grow_high
        threshold = np.minimum(np.minimum(np.maximum(params.grow_ratio * peak, low_map), high), peak)
        eligible = (volume[box] >= threshold[box[1:]]) & ~claimed[box] & allowed[box]
        local = (f - box[0].start, y - box[1].start, x - box[2].start)
        if not eligible[local]:
            rejected["maximum_claimed"] += 1
            continue
        component, _ = ndi.label(eligible, structure=structure)
        voxels = np.argwhere(component == component[local]) + [s.start for s in box]
        extent = voxels.max(axis=0) - voxels.min(axis=0) + 1  # (frames, y, x)
        size = (extent[2], extent[1], extent[0])
        if any(s < m for s, m in zip(size, params.min_size)):
            rejected["too_small"] += 1
            continue
        if any(s > m for s, m in zip(size, params.max_size)):
            rejected["too_large"] += 1
            continue
        claimed[tuple(voxels.T)] = True
        blobs.append(voxels)
    return blobs, rejected
