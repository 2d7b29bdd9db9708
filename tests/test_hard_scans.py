"""The hard validation scans: every truth column agrees with what is drawn in the frames."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from simulators.dct_scan import simulate_scan
from simulators.hard_scans import (RESOLVE_SIGMAS, SCANS, HardScanModel, _resolved_parts, independent_model,
                                   read_hard_truth)

FRAMES, SIZE, SEED = 48, 128, 1


def small(name: str, **changes) -> HardScanModel:
    options = {**SCANS[name], **changes}
    options["spots"] = 8
    if "pairs" in options:
        options["pairs"] = 3
    return HardScanModel(frames=FRAMES, size=SIZE, seed=SEED, **options)


@pytest.fixture(scope="module", params=list(SCANS))
def model(request):
    return request.param, small(request.param)


def spot_volume(model: HardScanModel, i: int) -> np.ndarray:
    """Spot ``i`` alone, rendered frame by frame over the whole detector."""
    volume = np.zeros((model.frames, *model.shape))
    for k in range(model.frames):
        counts, (oy, ox) = model.spot_counts(i, k)
        volume[k, oy:oy + counts.shape[0], ox:ox + counts.shape[1]] = counts
    return volume


def test_noiseless_frames_hold_exactly_the_truth_integrals(model):
    name, m = model
    assert len(m.spots["x"]) >= 8, name
    drawn = sum((m.signal(k) - m.background(k)).sum() for k in range(m.frames))
    np.testing.assert_allclose(drawn, m.spots["integral"].sum(), rtol=1e-9)


def drawn(m: HardScanModel, i: int):
    """Spot ``i``'s voxels in every frame of the scan (not only those the truth names: a spot drawn elsewhere
    would show): frames, rows, columns and counts."""
    k, y, x, w = [], [], [], []
    for frame in range(m.frames):
        counts, (oy, ox) = m.spot_counts(i, frame)
        yy, xx = np.nonzero(counts)
        k.append(np.full(yy.size, frame)), y.append(yy + oy), x.append(xx + ox), w.append(counts[yy, xx])
    return map(np.concatenate, (k, y, x, w))


def test_each_spot_alone_has_the_truth_centroid_integral_and_peak(model):
    name, m = model
    s = m.spots
    # the same spots with the beam on all along: what the beam_lost scan's spots' rocking curves are
    whole = small(name, beam_lost=None) if SCANS[name].get("beam_lost") else m
    for i in range(len(s["x"])):
        k, y, x, w = drawn(m, i)
        assert w.sum() == pytest.approx(s["integral"][i], rel=1e-9)
        assert w.max() == pytest.approx(s["peak"][i], rel=1e-9)
        assert np.average(x, weights=w) == pytest.approx(s["x"][i], abs=1e-9)
        assert np.average(y, weights=w) == pytest.approx(s["y"][i], abs=1e-9)
        if s["crosses_wrap"][i]:
            k = np.where(k > m.frames / 2, k - m.frames, k)  # frames just before 0 deg are negative
        assert np.average(k, weights=w) % m.frames == pytest.approx(s["frame"][i], abs=1e-9)
        assert s["snr"][i] == pytest.approx(s["peak"][i] / s["noise"][i])
        rocking = w / m.source_intensity(k % m.frames)  # the counts over the source intensity of their frame
        wk, _, _, ww = drawn(whole, i)
        if s["crosses_wrap"][i]:
            wk = np.where(wk > m.frames / 2, wk - m.frames, wk)
        curve = ww / whole.source_intensity(wk % m.frames)  # all of it, the frames without the beam too
        assert np.average(wk, weights=curve) % m.frames == pytest.approx(s["frame_normalised"][i], abs=1e-9)
        assert (wk.min() % m.frames, wk.max() % m.frames) == (s["first_frame"][i], s["last_frame"][i])  # its curve's
        w = rocking
        # the part outside the direct beam (a pixel is in it when its centre is; the box of each frame)
        boxes = np.array([m.beam_box(f) if m.beam_motion is not None else m.direct_beam_bbox for f in k], float)
        bx, by, bw, bh = boxes.T if m.beam else np.zeros((4, k.size))
        seen = ~((x >= bx - 0.5) & (x < bx + bw - 0.5) & (y >= by - 0.5) & (y < by + bh - 0.5))
        # of all its curve (the amplitudes of m and whole differ where a peak is in the frames without the beam)
        lit = m.source_intensity(wk % m.frames) > 0
        fraction = w[seen].sum() / w.sum() * curve[lit].sum() / curve.sum() if w.size else 0.0
        assert s["visible_fraction"][i] == pytest.approx(fraction, abs=1e-9)
        if seen.any():
            assert np.average(x[seen], weights=w[seen]) == pytest.approx(s["visible_x"][i], abs=1e-9)
            assert np.average(y[seen], weights=w[seen]) == pytest.approx(s["visible_y"][i], abs=1e-9)
            assert np.average(k[seen], weights=w[seen]) % m.frames == pytest.approx(s["visible_frame"][i], abs=1e-9)


def test_spots_cross_0_360_only_in_the_wrap_scans(model):
    name, m = model
    s = m.spots
    crossing = np.flatnonzero(s["crosses_wrap"])
    if not SCANS[name].get("wrap"):
        assert crossing.size == 0
        return
    assert crossing.size >= 5
    for i in crossing:
        assert s["first_frame"][i] > s["last_frame"][i]
        assert min(s["frame"][i], m.frames - s["frame"][i]) < 4 * s["sigma_frame"][i] + 1
        assert m.spot_counts(i, 0)[0].sum() > 0 and m.spot_counts(i, m.frames - 1)[0].sum() > 0


def test_touching_pairs_are_mutual_and_have_two_maxima():
    m = small("overlaps")
    partner = m.spots["partner"]
    pairs = [(i, j) for i, j in enumerate(partner) if j > i]
    assert len(pairs) == 3 and all(partner[j] == i for i, j in pairs)
    for i, j in pairs:
        k = int(round((m.spots["frame"][i] + m.spots["frame"][j]) / 2))
        image = sum(np.pad(c, [(oy, SIZE - oy - c.shape[0]), (ox, SIZE - ox - c.shape[1])])
                    for c, (oy, ox) in (m.spot_counts(n, k) for n in (i, j)))
        ends = [(round(m.spots["y"][n]), round(m.spots["x"][n])) for n in (i, j)]
        # Along the line joining them the counts dip between the two centres.
        line = [image[round(y), round(x)] for y, x in np.linspace(ends[0], ends[1], 25)]
        assert min(line[5:20]) < min(line[:3] + line[-3:])
        footprints = [c > 0 for c, _ in (m.spot_counts(n, k) for n in (i, j))]
        assert all(f.any() for f in footprints)


def test_beam_lost_reads_the_dark_alone_and_glitches_read_0_or_the_top():
    m = small("beam_lost")
    first, last = int(0.4 * FRAMES), int(0.4 * FRAMES) + 11
    assert not m.signal(first).any() and not m.signal(last).any()
    assert m.signal(first - 1).min() > 0 and m.signal(last + 1).min() > 0
    assert abs(np.median(m.frame(first).astype(float) - m.fixed_pattern)) < 1  # the offsets and read noise alone
    assert not m.frame(int(0.7 * FRAMES)).any() and (m.frame(int(0.75 * FRAMES)) == 65535).all()
    assert m.frame(int(0.7 * FRAMES) + 1).astype(float).mean() > 100


def test_zinger_blocks_are_one_frame_and_some_hit_a_spot():
    """The zingers scan's frames less those of the same model without them (same seed: the same noise) are its
    zinger blocks alone: of ZINGER_BLOCK_COUNTS, every frame its own; one on about a third of the spots, within
    ZINGER_BLOCK_NEAR_SPOT_PX of its centre in one of its lit frames."""
    m, plain = HardScanModel(frames=FRAMES, size=SIZE, seed=SEED, zinger_blocks=20.0, spots=30), \
        HardScanModel(frames=FRAMES, size=SIZE, seed=SEED, spots=30)
    assert len(m.spots["x"]) == len(plain.spots["x"])
    hit_frames, spots_hit = 0, set()
    for k in range(FRAMES):
        extra = m.frame(k).astype(float) - plain.frame(k).astype(float)
        assert extra.min() >= 0
        hit = extra > 0
        hit_frames += hit.any()
        ys, xs = np.nonzero(hit)
        for i, g in m._by_frame[k]:
            x, y = m._boxes[i][:2]
            if g > 0.3 and np.any((np.abs(ys - y) <= 6) & (np.abs(xs - x) <= 6)):
                spots_hit.add(i)
        top = extra[hit & (plain.frame(k) < 55000)]
        assert np.all((top >= 1999) & (top <= 10001))
    assert hit_frames >= FRAMES // 2  # about 1.25 a frame at 128 x 128 px
    assert 5 <= len(spots_hit) <= 20 and len(spots_hit) >= sum(map(len, m._zingers_on_spots.values()))


def test_source_and_beam_options():
    topup = small("topup")
    step_frame = 0.55 * FRAMES
    before, after = topup.source_intensity(step_frame - 1e-9), topup.source_intensity(step_frame)
    assert after / before == pytest.approx(1.03)
    no_beam, clean = small("no_beam"), small("clean")
    assert no_beam.direct_beam_bbox == (0, 0, 0, 0)
    x0, y0, w, h = clean.direct_beam_bbox
    centre = (y0 + h // 2, x0 + w // 2)
    assert clean.background(3)[centre] > 1000 > no_beam.background(3)[centre]
    assert clean.source_intensity(10) == clean.source_intensity(40) == 1.0


def test_photon_counting_frames_are_sparse_uint32_counts():
    m = small("photon_counting")
    frame = m.frame(10)
    assert frame.dtype == np.uint32
    assert np.median(frame) == 0 and frame.max() > 0
    dark = m.dark_frame(0)
    assert dark.dtype == np.uint32
    assert set(np.flatnonzero(np.where(m.dead, 0, dark))) <= set(np.ravel_multi_index(m.hot_pixels.T, m.shape))
    # an Eiger's module gaps hold all bits set, in every frame; no spot lies on them
    assert m.dead.any() and (frame[m.dead] == 0xFFFFFFFF).all() and (dark[m.dead] == 0xFFFFFFFF).all()
    assert (frame[~m.dead] < 0xFFFFFFFF).all()
    assert 0.4 < max(m.background(k).max() for k in (0, 10)) <= 0.5 * 1.06  # 0-0.5 counts, with the ripple
    for i in range(len(m.spots["x"])):
        counts, (oy, ox) = m.spot_counts(i, int(round(m.spots["frame"][i])))
        assert not m.dead[oy:oy + counts.shape[0], ox:ox + counts.shape[1]].any()


def test_written_scan_has_the_models_frames_and_every_truth_column(tmp_path):
    m = small("grains_topup_wrap")
    path = tmp_path / "hard.h5"
    truth = simulate_scan(path, model=m, dark_frames=2, workers=1)
    back = read_hard_truth(path)
    assert set(back.spots) == set(m.spots)
    for name, column in m.spots.items():
        np.testing.assert_array_equal(back.spots[name], column)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/1.1/measurement/marana"][7], m.frame(7))
    assert truth.direct_beam_bbox == back.direct_beam_bbox == m.direct_beam_bbox


def test_external_spots_keep_their_footprint_place_and_frame(tmp_path):
    path = tmp_path / "spots.h5"
    rng = np.random.default_rng(0)
    patches = [rng.uniform(0, 30, size=shape) for shape in ((12, 20), (30, 9), (5, 5))]
    origins = np.array([[20, 30], [70, 80], [100, 10]])
    frames = np.array([10.3, 0.2, 47.6])  # the last two cross 0/360 deg
    with h5py.File(path, "w") as f:
        f["patch_shape"] = np.array([p.shape for p in patches])
        f["patch_values"] = np.concatenate([p.ravel() for p in patches])
        f["origin"], f["frame"] = origins, frames
        f.attrs.update(frames=FRAMES, size=SIZE)
    m = independent_model(path)
    s = m.spots
    assert len(s["x"]) == 3 and list(s["crosses_wrap"]) == [0, 1, 1]
    for i, patch in enumerate(patches):
        volume = spot_volume(m, i)
        assert volume.sum() == pytest.approx(s["integral"][i], rel=1e-9)
        footprint = volume.sum(axis=0)[origins[i][0]:origins[i][0] + patch.shape[0],
                                       origins[i][1]:origins[i][1] + patch.shape[1]]
        np.testing.assert_allclose(footprint / footprint.max(), patch / patch.max(), atol=1e-3)
    assert s["frame"][0] == pytest.approx(10.3, abs=0.1)
    assert s["peak"].max() == pytest.approx(3000.0)  # the thickest spot


@pytest.mark.parametrize("gap", [4.0, 6.0, 8.0, 12.0])
def test_two_maxima_are_resolved_when_the_dimmer_stands_out_above_the_saddle(gap):
    x = np.arange(40.0)
    line = 1000 * np.exp(-0.5 * ((x - 10) / 2.5) ** 2) + 600 * np.exp(-0.5 * ((x - 10 - gap) / 2.5) ** 2)
    part = _resolved_parts(line.reshape(1, 1, -1), 10.0, RESOLVE_SIGMAS)[0, 0]
    dim = 10 + int(gap) - 1 + int(np.argmax(line[10 + int(gap) - 1:10 + int(gap) + 2]))  # the dimmer maximum
    saddle = line[10:dim + 1].min()
    apart = line[dim] - saddle >= RESOLVE_SIGMAS * np.sqrt(10.0 ** 2 + saddle)
    assert (part[dim] != part[10]) == apart
    assert (part >= 0).sum() == (line >= 10.0).sum()  # every voxel above the noise is in a part
    if gap == 4.0:
        assert not apart
    if gap == 12.0:
        assert apart


def test_spots_of_the_independent_model_that_share_a_maximum_are_merged(tmp_path):
    path = tmp_path / "spots.h5"
    patch = np.ones((6, 6), np.float32)
    with h5py.File(path, "w") as f:  # three equal square spots: two overlap almost wholly, one far off
        f["patch_shape"] = np.array([[6, 6]] * 3)
        f["patch_values"] = np.concatenate([patch.ravel()] * 3)
        f["origin"] = np.array([[40, 40], [41, 40], [80, 80]])
        f["frame"] = np.array([20.0, 20.2, 20.0])
        f.attrs.update(frames=FRAMES, size=SIZE)
    m = independent_model(path, seed=SEED)
    merged = m.spots["merged_into"]
    assert merged[2] == -1 and sorted(merged[:2].tolist()) in ([-1, 0], [-1, 1])


def test_streaks_run_tangential_about_the_detector_centre():
    m = small("streaks")
    s = m.spots
    for i in range(len(s["x"])):
        counts, (oy, ox) = m.spot_counts(i, int(round(s["frame"][i])) % m.frames)
        yy, xx = np.nonzero(counts)
        w = counts[yy, xx]
        d = np.stack([xx + ox - s["x"][i], yy + oy - s["y"][i]])
        values, vectors = np.linalg.eigh((d * w) @ d.T / w.sum())
        along = vectors[:, 1]  # the long axis
        radial = np.array([s["x"][i] - (m.shape[1] - 1) / 2, s["y"][i] - (m.shape[0] - 1) / 2])
        assert values[1] / values[0] >= (3.0 / 1.5) ** 2 * 0.8  # at least about 2:1 in sigma
        assert abs(along @ radial) / np.linalg.norm(radial) < 0.15  # across the radius: along the ring
