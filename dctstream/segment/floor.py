"""The lowest corrected value a segmentation compares, per frame and tile: what a sparse scan must keep.

With parameters p, the segmenter's result depends on voxel (k, y, x) only
through comparisons ``v >= t``, t a seed threshold of frame k or a growth
threshold ``min(max(tau * M, low_k), grow_high, M)`` (see segmenter.py): low_k
is frame k's own lower clamp, and M, the maximum of a region whose component box
holds the voxel, is at least the seed threshold of a frame at most
``max_blob_size[2]`` frames away at a pixel at most PART_REACH x ``max_blob_size`` away
in x and y (a touching spot's part is grown in that box, see segmenter.PART_REACH).
The flood guard only raises a frame's thresholds. So every such t is at least

    floor_k = min(low_k, grow_high, min of seed_f over |f - k| <= max_blob_size[2], tiles within reach)

and a volume that holds every voxel >= floor_k (anything below it elsewhere,
0 in a sparse scan) gives the same seeds, floods and blobs as the whole
volume. Not the same integral: its tails sum unclaimed voxels, those below the
cut too. Tiles within reach: those holding a pixel at most PART_REACH x max_blob_size from
one of the tile's, so the bound is a little low, never high.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .segmenter import PART_REACH


def reach_tiles(max_size, tile_px: int) -> tuple[int, int]:
    """(tiles_y, tiles_x) a region's component box reaches beyond a pixel's own tile."""
    reach_x, reach_y = PART_REACH * max_size[0], PART_REACH * max_size[1]
    return -(-reach_y // tile_px), -(-reach_x // tile_px)


def floor_tiles(seed: np.ndarray, low: np.ndarray, high: float | None, reach: tuple[int, int],
                reach_frames: int = 0) -> np.ndarray:
    """float64 floor of (frames, tiles_y, tiles_x) seed and low maps; ``reach_frames`` 0 for one frame
    alone (the frames around it unknown: the run's own cut)."""
    seed = np.asarray(seed, np.float64)
    size = (2 * reach_frames + 1, 2 * reach[0] + 1, 2 * reach[1] + 1)[-seed.ndim:]
    near = ndi.minimum_filter(seed, size=size, mode="nearest")
    floor = np.minimum(near, np.asarray(low, np.float64))
    return floor if high is None else np.minimum(floor, float(high))


def round_down_to_float32(values) -> np.ndarray:
    """The greatest float32 <= each value: a float32 v >= the value is then >= this too."""
    values = np.asarray(values, np.float64)
    v32 = values.astype(np.float32)
    return np.where(v32 > values, np.nextafter(v32, np.float32(-np.inf)), v32).astype(np.float32)
