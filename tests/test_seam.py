"""Full-turn scans: a spot across 0/360 degrees is one spot, one difspot and one row."""

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.pipeline import Pipeline
from dctstream.seam import full_turn, psi_at
from dctstream.sources.hdf5 import closes_turn
from dctstream.sinks.spot_table import read_spot_table


@pytest.mark.parametrize("psi,whole", [
    (list(np.arange(360) * 1.0), True),
    (list(np.arange(720) * 0.5 + 10), True),
    (list(-np.arange(40) * 9.0), True),  # turning the other way
    (list(np.arange(180) * 1.0), False),  # half a turn
    (list(np.arange(361) * 1.0), False),  # the first frame taken again at 360: not the same seam
    (list(np.radians(np.arange(720) * 0.5)), True),  # radians, without a unit to say so
    (list(np.radians(np.arange(360) * 0.5)), False),  # half a turn of them
    (None, False),
])
def test_full_turn(psi, whole):
    assert full_turn(psi) is whole


@pytest.mark.parametrize("step", [1.0, -1.0])
def test_psi_at_a_fractional_frame_either_way_round(step):
    """psi between two frames, and between the last frame and the first, for a turn either way round (360 down
    to 1 degree gave 1.0 at every frame)."""
    psi = list(180.0 + step * (np.arange(360) - 180))  # 0 .. 359 or 360 .. 1
    assert psi_at(psi, 100.5) == pytest.approx(psi[100] + step / 2)
    assert psi_at(psi, 359.5) == pytest.approx((psi[-1] + step / 2) % 360.0 if step > 0 else psi[-1] + step / 2)
    assert psi_at(psi, 360.25) == pytest.approx(psi_at(psi, 0.25))


def _scan_with_seam_spot(tiny_scan, path, centre_frame, radians=False, spots=None):
    """The tiny scan with a spot at (9, 9) px centred on ``centre_frame``; ``spots``: (centre frame, rocking
    sigma in frames, peak) of each spot there instead."""
    with h5py.File(tiny_scan.path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
        angles = f["/1.1/measurement/diffrz"][()]
        dark = f["/2.1/measurement/marana"][()]
    n, ny, nx = frames.shape
    y, x = np.mgrid[0:ny, 0:nx]
    for k in range(n):
        spot = 0.0
        for centre, sigma, peak in spots or [(centre_frame, 0.8, 3000.0)]:
            d = min(abs(k - centre), n - abs(k - centre))  # distance along psi, across the seam
            spot = spot + peak * np.exp(-d ** 2 / (2 * sigma ** 2) - ((x - 9) ** 2 + (y - 9) ** 2) / (2 * 1.5 ** 2))
        frames[k] = np.clip(frames[k] + spot, 0, 65535).astype(frames.dtype)
    with h5py.File(path, "w") as f:
        f["/1.1/measurement/marana"] = frames
        f["/1.1/measurement/diffrz"] = np.radians(angles) if radians else angles
        if radians and radians != "unitless":  # as NeXus says it
            f["/1.1/measurement/diffrz"].attrs["units"] = "rad"
        f["/2.1/measurement/marana"] = dark
        f["/1.1/end_time"] = "2024-01-01T10:00:00"
    return f"{path}::/1.1/measurement/marana", f"{path}::/1.1/measurement/diffrz", f"{path}::/2.1/measurement/marana"


# "unitless": radians without a unit, kept as recorded (the run warns): a whole turn is 2 pi there
@pytest.mark.parametrize("centre,radians", [(39.5, False), (0.0, False), (0.0, True), (0.0, "unitless"),
                                            (39.5, "unitless")])
def test_spot_across_the_seam_is_one_spot(tmp_path, tiny_scan, tiny_overrides, centre, radians):
    src, angles, dark = _scan_with_seam_spot(tiny_scan, tmp_path / "seam.h5", centre, radians)
    out = tmp_path / "out"
    cfg = load_config(None, [f"source.url={src}", f"source.angles={angles}", f"dark.url={dark}",
                             f"output.dir={out}", "quicklook.enabled=false", *tiny_overrides])
    stats = Pipeline(cfg).run()
    spots = read_spot_table(out / "spots.h5")
    near = np.flatnonzero((np.abs(spots["centroid_x"] - 9) < 3) & (np.abs(spots["centroid_y"] - 9) < 3))
    assert near.size == 1  # one row, not one at each end of the scan
    i = near[0]
    assert spots["start_frame"][i] >= 36 and spots["end_frame"][i] >= 40  # frames run on past the last
    expected = centre % 40
    gap = abs(spots["centroid_frame"][i] - expected)
    assert min(gap, 40 - gap) < 0.3
    assert 0 <= spots["centroid_frame"][i] < 40
    psi, turn = spots["centroid_psi_deg"][i], 360.0
    if radians == "unitless":  # psi as recorded
        psi, turn = np.degrees(psi), np.degrees(2 * np.pi)
    assert min(abs(psi - 9 * expected), turn - abs(psi - 9 * expected)) < 3
    assert stats.seam_joined == 1
    files = sorted(p.name for p in (out / "difspots").glob("*.h5"))
    assert files == [f"{int(v):06d}.h5" for v in sorted(spots["id"])]
    assert stats.difspots_written == len(spots["id"])


@pytest.mark.parametrize("psi,closed", [
    (np.arange(361) * 1.0, True),  # 0 to 360, both ends
    (360.0 - np.arange(721) * 0.5, True),  # the other way round
    (np.radians(np.arange(721) * 0.5), True),  # radians, without a unit to say so
    (np.arange(360) * 1.0, False),  # a turn: the frame after the last is the first
    (np.arange(721) * 1.0, False),  # two turns
    (np.arange(181) * 1.0, False),
    (np.array([0.0, 120.0, 240.0]), False),  # too few to tell a step
])
def test_closes_turn(psi, closed):
    assert closes_turn(psi) is closed
    assert not closed or full_turn(list(psi[:-1]))


def test_a_turn_recorded_with_both_ends_leaves_its_last_frame_out(tmp_path, tiny_scan, tiny_overrides, caplog):
    """A full turn recorded from 0 to 360 degrees, both included: its last frame is frame 0's angle again, left
    out, and the spot there is one, as in the scan without it (it was reported at both ends, not joined)."""
    src, angles, dark = _scan_with_seam_spot(tiny_scan, tmp_path / "seam.h5", 0.0)
    with h5py.File(tmp_path / "seam.h5", "r") as f:
        frames, psi, dark_frames = (f[p][()] for p in ("/1.1/measurement/marana", "/1.1/measurement/diffrz",
                                                        "/2.1/measurement/marana"))
    with h5py.File(tmp_path / "both.h5", "w") as f:
        f["/1.1/measurement/marana"] = np.concatenate([frames, frames[:1]])
        f["/1.1/measurement/diffrz"] = np.append(psi, psi[0] + 360.0)
        f["/2.1/measurement/marana"] = dark_frames
        f["/1.1/end_time"] = "2024-01-01T10:00:00"
    tables = {}
    for name in ("seam", "both"):
        path = tmp_path / f"{name}.h5"
        cfg = load_config(None, [f"source.url={path}::/1.1/measurement/marana",
                                 f"source.angles={path}::/1.1/measurement/diffrz",
                                 f"dark.url={path}::/2.1/measurement/marana", f"output.dir={tmp_path / name}-out",
                                 "quicklook.enabled=false", *tiny_overrides])
        stats = Pipeline(cfg).run()
        assert stats.frames_total == 40 and stats.seam_joined == 1
        tables[name] = read_spot_table(tmp_path / f"{name}-out" / "spots.h5")
    assert "frame 40 (psi 360) is frame 0's angle a whole turn later: left out" in caplog.text
    assert tables["both"].keys() == tables["seam"].keys()
    for key, values in tables["seam"].items():
        np.testing.assert_array_equal(tables["both"][key], values, err_msg=key)


def _spots_at_9_9(tmp_path, tiny_scan, tiny_overrides, spots, name, *settings):
    src, angles, dark = _scan_with_seam_spot(tiny_scan, tmp_path / f"{name}.h5", None, spots=spots)
    out = tmp_path / name
    cfg = load_config(None, [f"source.url={src}", f"source.angles={angles}", f"dark.url={dark}",
                             f"output.dir={out}", "quicklook.enabled=false", *tiny_overrides, *settings])
    stats = Pipeline(cfg).run()
    table = read_spot_table(out / "spots.h5")
    near = np.flatnonzero((np.abs(table["centroid_x"] - 9) < 4) & (np.abs(table["centroid_y"] - 9) < 4))
    files = sorted(p.name for p in (out / "difspots").glob("*.h5"))
    assert files == [f"{int(v):06d}.h5" for v in sorted(table["id"])]
    return {k: v[near] for k, v in table.items()}, stats


@pytest.mark.parametrize("centre", [36.0, 3.0])
def test_a_spots_skirt_across_the_seam_is_its_tail_not_a_spot(tmp_path, tiny_scan, tiny_overrides, centre):
    """A rocking curve that peaks 3-4 frames from the seam leaves only its skirt, below grow_ratio x its peak, on
    the far side: cut from its maximum there, the skirt was a blob of its own (a false spot at each such
    seam crossing of a 2048^2 scan). It is the spot's tail: one row, the spot's, with the skirt's integral."""
    seam, stats = _spots_at_9_9(tmp_path, tiny_scan, tiny_overrides, [(centre, 1.6, 10000.0)], "seam")
    assert seam["id"].size == 1
    assert stats.seam_joined == 1
    assert abs(seam["centroid_frame"][0] - centre) < 0.2  # the spot's, not pulled by its tail
    # the same spot in the middle of the scan: its integral holds its skirt too
    middle, _ = _spots_at_9_9(tmp_path, tiny_scan, tiny_overrides, [(20.0, 1.6, 10000.0)], "middle")
    assert middle["id"].size == 1
    assert seam["integral"][0] == pytest.approx(middle["integral"][0], rel=0.1)


@pytest.mark.parametrize("reach", [5, 12])
def test_a_dim_spot_on_the_seam_far_from_a_bright_one_stays_a_spot(tmp_path, tiny_scan, tiny_overrides, reach):
    """A dim spot on the first frame where a bright one peaks 9 frames before the seam: further than the growth
    box (max_blob_size 5 frames), or within it (12) but with more frames between its end and the seam than it
    has: not its tail, two spots."""
    spots, stats = _spots_at_9_9(tmp_path, tiny_scan, tiny_overrides, [(31.0, 1.0, 10000.0), (0.0, 0.6, 1500.0)],
                                 "apart", f"segmentation.max_blob_size=[20,20,{reach}]")
    assert sorted(np.round(spots["centroid_frame"]).astype(int) % 40) == [0, 31]
    assert stats.seam_joined == 0
