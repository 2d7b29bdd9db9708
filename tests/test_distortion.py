"""Spot positions corrected for the detector's distortion (detector.distortion) by ImageD11's own code:
a Fit2D spline file and dx/dy maps, against the distortion they were made from and ImageD11's correction."""

from __future__ import annotations

import warnings

import fabio.edfimage
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.errors import ConfigError, InputError
from dctstream.export import export_imaged11, read_columnfile
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table

blobcorrector = pytest.importorskip("ImageD11.blobcorrector")
from dctstream.distortion import Distortion  # noqa: E402  (after the skip: it needs ImageD11)

SIZE = 64


def shift_fast(f, s):
    return -0.5 + 0.002 * s + 0.001 * f


def shift_slow(f, s):
    return 0.8 + 0.001 * f


def _floats(values) -> list[str]:
    text = ["%14.7E" % v for v in values]
    return ["".join(text[i:i + 5]) for i in range(0, len(text), 5)]


def write_spline(path, size=SIZE):
    """A Fit2D spline file of the shifts above: X-DISTORTION (fast) and Y-DISTORTION (slow), cubic B-splines in
    (f, s) whose coefficients are the shifts at the knots' Greville abscissae (exact for a linear shift)."""
    knots = np.r_[[0.0] * 4, 16.0, 32.0, 48.0, [float(size)] * 4]
    greville = np.array([knots[i + 1:i + 4].mean() for i in range(len(knots) - 4)])
    f, s = np.meshgrid(greville, greville, indexing="ij")  # FITPACK's order: the first knots' index outermost
    lines = ["SPATIAL DISTORTION SPLINE INTERPOLATION COEFFICIENTS", "", "  VALID REGION",
             *_floats([0, 0, size, size]), "", "  GRID SPACING, X-PIXEL SIZE, Y-PIXEL SIZE",
             *_floats([8, 50, 50]), ""]
    for name, shift in (("X-DISTORTION", shift_fast), ("Y-DISTORTION", shift_slow)):
        lines += [f"  {name}", f"{len(knots):6d}{len(knots):6d}", *_floats(knots), *_floats(knots),
                  *_floats(shift(f, s).ravel()), ""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def imaged11_corrector(spline):
    """ImageD11's own spline corrector (without its advice to prefer dx/dy maps for new ID11 data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return blobcorrector.correctorclass(spline)


def write_maps(folder, size=SIZE):
    s, f = np.mgrid[0:size, 0:size].astype(np.float32)
    paths = []
    for name, shift in (("dx", shift_fast(f, s)), ("dy", shift_slow(f, s))):
        path = folder / f"{name}.edf"
        fabio.edfimage.EdfImage(data=shift.astype(np.float32)).write(str(path))
        paths.append(str(path))
    return paths


def test_a_spline_file_moves_positions_by_its_distortion_as_imaged11_does(tmp_path):
    spline = write_spline(tmp_path / "d.spline")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(2, SIZE - 2, 50), rng.uniform(2, SIZE - 2, 50)
    xc, yc = Distortion(spline).correct(x, y)
    np.testing.assert_allclose(xc, x + shift_fast(x, y), atol=1e-4)  # the distortion the file was made from
    np.testing.assert_allclose(yc, y + shift_slow(x, y), atol=1e-4)
    own = imaged11_corrector(spline)
    for i in range(x.size):  # ImageD11's peak search: sc, fc = correct(s_raw, f_raw)
        sc, fc = own.correct(y[i], x[i])
        assert (xc[i], yc[i]) == (fc, sc)


def test_dx_dy_maps_shift_each_position_by_the_nearest_pixels_values(tmp_path):
    dx, dy = write_maps(tmp_path)
    x, y = np.array([3.4, 40.6, 62.2]), np.array([10.5, 7.49, 60.0])
    xc, yc = Distortion((dx, dy), frame_shape=(SIZE, SIZE)).correct(x, y)
    fi, si = np.round(x), np.round(y)
    np.testing.assert_allclose(xc, x + shift_fast(fi, si), atol=1e-6)
    np.testing.assert_allclose(yc, y + shift_slow(fi, si), atol=1e-6)
    with pytest.raises(InputError, match=r"detector.distortion: .*dx.edf: maps of 64 x 64 pixels, expected "
                                         r"32 x 48 like the frames"):
        Distortion((dx, dy), frame_shape=(32, 48))


def test_bad_distortion_files_say_so(tmp_path):
    with pytest.raises(InputError, match=r"detector.distortion: .*none.spline: file not found"):
        Distortion(str(tmp_path / "none.spline"))
    (tmp_path / "bad.spline").write_text("not a spline\n")
    with pytest.raises(InputError, match=r"bad.spline: expected a Fit2D spline file"):
        Distortion(str(tmp_path / "bad.spline"))
    with pytest.raises(ConfigError, match=r"detector.distortion: must be a Fit2D spline file or a list of 2 files"):
        load_config(None, ["detector.distortion=[a.edf]"])


def test_a_run_writes_corrected_centroids_beside_the_raw_ones(tiny_scan, tiny_overrides, tmp_path):
    """spots.h5 holds ImageD11's correction of its own raw centroids; the columnfile's sc/fc are those,
    s_raw/f_raw the raw ones."""
    spline = write_spline(tmp_path / "d.spline")
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", f"output.dir={tmp_path / 'out'}",
                             f"detector.distortion={spline}", *tiny_overrides])
    process_scan(cfg, display=False)
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    assert len(table["id"]) > 3
    own = imaged11_corrector(spline)
    expected = np.array([own.correct(s, f) for s, f in zip(table["centroid_y"], table["centroid_x"])])
    np.testing.assert_array_equal(table["centroid_y_corrected"], expected[:, 0])
    np.testing.assert_array_equal(table["centroid_x_corrected"], expected[:, 1])
    path, _, _ = export_imaged11(tmp_path / "out")
    cols, params = read_columnfile(path)
    np.testing.assert_allclose(cols["sc"], expected[:, 0], atol=1e-4)  # %.4f in the file
    np.testing.assert_allclose(cols["fc"], expected[:, 1], atol=1e-4)
    np.testing.assert_allclose(cols["s_raw"], table["centroid_y"], atol=1e-4)
    assert params["spline"] == spline


def test_a_spline_smaller_than_the_frames_is_refused(tmp_path):
    """A spline of a 64 x 64 detector on 128 x 128 frames was taken: beyond its valid region ImageD11 gives the
    shift at its edge, so the spots there got a wrong correction, unsaid."""
    spline = write_spline(tmp_path / "d.spline")
    Distortion(spline, frame_shape=(SIZE, SIZE))
    Distortion(spline, frame_shape=(SIZE // 2, SIZE))  # a region of the detector it covers
    with pytest.raises(InputError, match=r"detector.distortion: .*d.spline: a spline valid over x 0..64, y 0..64 "
                                         r"pixels \(its VALID REGION\), expected one covering the frames of 128 x 64"):
        Distortion(spline, frame_shape=(2 * SIZE, SIZE))
