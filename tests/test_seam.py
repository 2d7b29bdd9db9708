"""Full-turn scans: a spot across 0/360 degrees is one spot, one difspot and one row."""

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.pipeline import Pipeline
from dctstream.seam import full_turn, psi_at
from dctstream.sinks.spot_table import read_spot_table


@pytest.mark.parametrize("psi,whole", [
    (list(np.arange(360) * 1.0), True),
    (list(np.arange(720) * 0.5 + 10), True),
    (list(-np.arange(40) * 9.0), True),  # turning the other way
    (list(np.arange(180) * 1.0), False),  # half a turn
    (list(np.arange(361) * 1.0), False),  # the first frame taken again at 360: not the same seam
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


def _scan_with_seam_spot(tiny_scan, path, centre_frame, radians=False):
    with h5py.File(tiny_scan.path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
        angles = f["/1.1/measurement/diffrz"][()]
        dark = f["/2.1/measurement/marana"][()]
    n, ny, nx = frames.shape
    y, x = np.mgrid[0:ny, 0:nx]
    for k in range(n):
        d = min(abs(k - centre_frame), n - abs(k - centre_frame))  # distance along psi, across the seam
        spot = 3000.0 * np.exp(-d ** 2 / (2 * 0.8 ** 2) - ((x - 9) ** 2 + (y - 9) ** 2) / (2 * 1.5 ** 2))
        frames[k] = np.clip(frames[k] + spot, 0, 65535).astype(frames.dtype)
    with h5py.File(path, "w") as f:
        f["/1.1/measurement/marana"] = frames
        f["/1.1/measurement/diffrz"] = np.radians(angles) if radians else angles
        if radians:  # as NeXus says it
            f["/1.1/measurement/diffrz"].attrs["units"] = "rad"
        f["/2.1/measurement/marana"] = dark
        f["/1.1/end_time"] = "2024-01-01T10:00:00"
    return f"{path}::/1.1/measurement/marana", f"{path}::/1.1/measurement/diffrz", f"{path}::/2.1/measurement/marana"


@pytest.mark.parametrize("centre,radians", [(39.5, False), (0.0, False), (0.0, True)])
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
    psi = spots["centroid_psi_deg"][i]
    assert min(abs(psi - 9 * expected), 360 - abs(psi - 9 * expected)) < 3
    assert stats.seam_joined == 1
    files = sorted(p.name for p in (out / "difspots").glob("*.h5"))
    assert files == [f"{int(v):06d}.h5" for v in sorted(spots["id"])]
    assert stats.difspots_written == len(spots["id"])
