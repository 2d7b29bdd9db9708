"""The segmenter fed sparse frames gives the blobs of the segmenter fed the same frames made dense."""

import numpy as np
import pytest

from dctstream.segment import Segmenter
from dctstream.segment.sparse import HOT_SLOTS, SparseFrame, SparseSegmenter
from test_segment import params, spot_chain, spotty_volume


def _sparse(frame, kept):
    rows, cols = np.nonzero(kept)
    return SparseFrame(rows.astype(np.uint16), cols.astype(np.uint16), frame[rows, cols], frame.shape)


def _both(found, kept, p, mask=None, measure=None, seed=None, low=None):
    """Blobs and segmenters: the dense segmenter on the frames 0 outside ``kept``, the sparse one on the
    kept pixels."""
    dense_found = np.where(kept, found, 0).astype(np.float32)
    dense_measure = None if measure is None else np.where(kept, measure, 0).astype(np.float32)
    shape, measured = found.shape[1:], measure is not None
    dense, sparse = Segmenter(p, shape, mask, measured), SparseSegmenter(p, shape, mask, measured)
    out = ([], [])
    for k in range(len(found)):
        maps = (None, None) if seed is None else (seed[k], low[k])
        out[0].extend(dense.push(k, dense_found[k], *maps, None if measure is None else dense_measure[k]))
        out[1].extend(sparse.push(k, _sparse(found[k], kept[k]), *maps,
                                  None if measure is None else _sparse(measure[k], kept[k])))
    out[0].extend(dense.finish())
    out[1].extend(sparse.finish())
    return out, (dense, sparse)


def _assert_same(blobs, segmenters):
    want, got = blobs
    assert len(want) == len(got) > 5
    for a, b in zip(want, got):
        for name in ("frame", "y", "x", "value", "volume"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=f"blob {a.id}: {name}")
        assert (b.id, b.max_index, b.max_value, b.total) == (a.id, a.max_index, a.max_value, a.total)
    dense, sparse = segmenters
    assert sparse.rejected == dense.rejected and sparse.floods == dense.floods


@pytest.mark.parametrize("connectivity", [6, 26])
def test_sparse_frames_give_the_blobs_of_the_dense_ones(connectivity):
    """Per-frame threshold maps, a mask, unfiltered values with zingers (single pixels in the unfiltered values,
    3 x 3 blocks one frame deep in the filtered ones too, 2 x 2 ones that the filter left a few sigmas of): the
    cut below every threshold."""
    rng = np.random.default_rng(connectivity)
    found = spotty_volume(rng, (60, 40, 48), 30)
    for k, y, x in ((7, 2, 2), (30, 30, 4), (45, 20, 40)):
        found[k, y:y + 3, x:x + 3] += 300.0
    remnants = ((12, 4, 20), (50, 33, 10))  # 2 x 2 zingers: a few sigmas filtered, spikes unfiltered
    for k, y, x in remnants:
        found[k, y:y + 2, x:x + 2] += 12.0
    measure = (1.2 * found + rng.normal(0, 0.5, found.shape)).astype(np.float32)
    measure[tuple(rng.integers(0, n, 300) for n in found.shape)] += 500.0
    for k, y, x in remnants:
        measure[k, y:y + 2, x:x + 2] += 500.0
    mask = np.zeros((40, 48), bool)
    mask[10:16, 30:40] = True
    p = params(tile_px=16, connectivity=connectivity, drop_zingers=True)
    seed = rng.uniform(3.0, 7.0, (60, *p.tiles((40, 48))))
    low = seed * rng.uniform(0.3, 0.7, seed.shape)
    kept = (found >= 1.0) & ~mask
    assert 0.1 < kept.mean() < 0.5
    blobs, segmenters = _both(found, kept, p, mask, measure, seed, low)
    _assert_same(blobs, segmenters)
    assert segmenters[0].rejected["zinger"] >= 1 + len(remnants)
    held = {(int(f), int(y), int(x)) for b in blobs[0] for f, y, x in zip(b.frame, b.y, b.x)}
    assert not held & {(k, y + dy, x + dx) for k, y, x in remnants for dy in (0, 1) for dx in (0, 1)}
    assert any(not np.array_equal(b.value, found[b.frame, b.y, b.x]) for b in blobs[1])  # measured values


def test_a_seed_threshold_of_0_seeds_the_pixels_not_stored_as_the_dense_frame_does():
    rng = np.random.default_rng(7)
    found = spotty_volume(rng, (40, 32, 32), 20)
    p = params(tile_px=16)
    seed = np.full((40, 2, 2), 4.0)
    low = np.full((40, 2, 2), 2.0)
    seed[10:12, 1, 1] = 0.0  # a tile of 0s that are seeds
    kept = found >= 1.0
    blobs, segmenters = _both(found, kept, p, seed=seed, low=low)
    _assert_same(blobs, segmenters)
    seed[10:12, 1, 1] = 4.0
    other = _both(found, kept, p, seed=seed, low=low)[0][1]
    assert [b.voxel_key() for b in other] != [b.voxel_key() for b in blobs[1]]  # the 0s made a difference


@pytest.mark.parametrize("hot_slots", [0, HOT_SLOTS])
def test_sparse_slots_given_back_and_taken_again_hold_no_pixels_of_their_last_frame(monkeypatch, hot_slots):
    """Every freed slot handed back at once (0) or kept, and a chain of spots that grows the ring (its slots
    copied)."""
    monkeypatch.setattr(SparseSegmenter, "hot_slots", hot_slots)
    rng = np.random.default_rng(3)
    nf = 120
    found = spot_chain(rng, nf)  # the ring must grow
    found[60:] += rng.normal(0, 0.3, (nf - 60, 24, 24)).astype(np.float32)
    p = params(max_size=(12, 12, 5))
    blobs, segmenters = _both(found, found >= 0.5, p)
    _assert_same(blobs, segmenters)
    assert segmenters[1]._values.shape[0] > 4 * p.max_size[2] + 4  # it had to grow


def test_flooded_sparse_frames_are_raised_as_the_dense_ones(monkeypatch):
    monkeypatch.setattr("dctstream.segment.segmenter.FLOOD_REGIONS", 20)
    rng = np.random.default_rng(12)
    found = spotty_volume(rng, (40, 64, 64), 12)
    found[20:23] += rng.normal(3.0, 2.0, (3, 64, 64)).astype(np.float32)
    blobs, segmenters = _both(found, found >= 1.5, params())
    _assert_same(blobs, segmenters)
    assert [f for f, _, _ in segmenters[1].floods] == [20, 21, 22]
