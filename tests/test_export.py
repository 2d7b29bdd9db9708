"""``dctstream export OUT --format imaged11``: the spot table as an ImageD11 columnfile."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dctstream.cli import main
from dctstream.config import load_config
from dctstream.export import read_columnfile
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table


@pytest.fixture(scope="module")
def exported(tiny_scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", "background.window=11",
                             "segmentation.max_blob_size=[20,20,5]", f"output.dir={out}", "quicklook.enabled=false"])
    process_scan(cfg, display=False)
    assert main(["export", str(out), "--format", "imaged11"]) == 0
    return out, read_spot_table(out / "spots.h5")


def test_columns_are_the_spot_table_in_imaged11_conventions(exported):
    out, table = exported
    cols, params = read_columnfile(out / "spots.flt")
    assert list(cols)[:9] == ["sc", "fc", "omega", "Number_of_pixels", "avg_intensity", "s_raw", "f_raw",
                              "sum_intensity", "IMax_int"]
    n = table["id"].size
    assert all(c.size == n for c in cols.values())
    # sc: slow = row = y; fc: fast = column = x (4 decimals in the file)
    np.testing.assert_allclose(cols["sc"], table["centroid_y"], atol=5e-5)
    np.testing.assert_allclose(cols["fc"], table["centroid_x"], atol=5e-5)
    np.testing.assert_allclose(cols["omega"], table["centroid_psi_deg"], atol=5e-5)
    np.testing.assert_array_equal(cols["Number_of_pixels"], table["area"])
    np.testing.assert_allclose(cols["sum_intensity"], table["integral"], atol=5e-5)
    np.testing.assert_allclose(cols["avg_intensity"], table["integral"] / table["area"], atol=5e-5)
    np.testing.assert_array_equal(cols["spot3d_id"], table["id"])
    np.testing.assert_array_equal(cols["Min_s"], table["bbox_y0"])
    np.testing.assert_array_equal(cols["Max_f"], table["bbox_x0"] + table["bbox_x_size"] - 1)
    # the simulated scan turns 9 degrees a frame from 0: Min_o/Max_o are its first and last frame's psi
    np.testing.assert_allclose(cols["Min_o"], 9.0 * table["start_frame"], atol=5e-4)
    np.testing.assert_allclose(cols["Max_o"], 9.0 * table["end_frame"], atol=5e-4)
    np.testing.assert_array_equal(cols["onfirst"], table["start_frame"] == 0)
    np.testing.assert_array_equal(cols["onlast"], table["end_frame"] == 39)
    assert params["omega_unit"] == "degrees"


def test_the_maximum_is_where_the_difspot_file_has_it(exported):
    out, table = exported
    cols, _ = read_columnfile(out / "spots.flt")
    for row, spot_id in enumerate(table["id"]):
        with h5py.File(out / "difspots" / f"{spot_id:06d}.h5", "r") as f:
            data = f["Data"][()]
            z0, y0, x0 = f["BoundingBox"][0] - 1
        s, fast = int(cols["IMax_s"][row]), int(cols["IMax_f"][row])
        frame = table["max_frame"][row]
        # written with 4 decimals: within half a unit of the last (a value that ends in 5 there, such as
        # 65.09375, is written 65.0938), and float32's own rounding
        assert data[frame - z0, s - y0, fast - x0] == pytest.approx(cols["IMax_int"][row], abs=5e-5 + 1e-6)
        assert cols["Min_s"][row] <= cols["sc"][row] <= cols["Max_s"][row]


def test_imaged11_reads_it(exported):
    columnfile = pytest.importorskip("ImageD11.columnfile")
    out, table = exported
    c = columnfile.columnfile(str(out / "spots.flt"))
    assert c.nrows == table["id"].size
    np.testing.assert_allclose(c.sc, table["centroid_y"], atol=5e-5)
    np.testing.assert_allclose(c.fc, table["centroid_x"], atol=5e-5)
    np.testing.assert_allclose(c.omega, table["centroid_psi_deg"], atol=5e-5)
    np.testing.assert_array_equal(c.Number_of_pixels, table["area"])


def test_export_without_a_spot_table(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dctstream: error: {tmp_path / 'spots.h5'}: cannot read the spot table")


def test_export_of_a_run_stopped_before_its_first_table_says_so(tmp_path, capsys):
    """A run stopped before its first spot table was written (TABLE_FLUSH_S): not an h5py message about a file
    that is not there."""
    (tmp_path / ".dctstream").mkdir()
    assert main(["export", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written yet" in err[0] and "the same command resumes it" in err[0], err


def test_a_scan_without_spots_has_the_columns_of_one_with_spots(exported, tmp_path, capsys):
    """Frames of noise, angles given: spots.h5 has its psi column and the columnfile the same titles and units
    as a scan with spots ('omega_unit = frames' without IMax_o, Min_o, Max_o before)."""
    path = tmp_path / "noise.h5"
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        f["frames"] = rng.poisson(100, (40, 32, 32)).astype(np.uint16)
        f["angles"] = np.linspace(0.0, 20.0, 40)
    out = tmp_path / "out"
    process_scan(load_config(None, [f"source.url={path}::/frames", f"source.angles={path}::/angles",
                                    "dark.value=0", "background.window=11", f"output.dir={out}",
                                    "quicklook.enabled=false"]), display=False)
    table = read_spot_table(out / "spots.h5")
    assert len(table["id"]) == 0 and "centroid_psi_deg" in table
    assert main(["export", str(out), "--format", "imaged11"]) == 0
    assert "cannot open a file without peaks" in capsys.readouterr().out
    empty, empty_params = read_columnfile(out / "spots.flt")
    full, full_params = read_columnfile(exported[0] / "spots.flt")
    assert list(empty) == list(full) and empty_params["omega_unit"] == full_params["omega_unit"] == "degrees"


@pytest.mark.parametrize("angles", ["decreasing", "radians"])
def test_omega_range_and_unit_whichever_way_and_unit_the_angles_were_written(tiny_scan, tmp_path, angles):
    """A rotation towards negative angles gave Min_o > Max_o on every row (the first and last frame's omega);
    angles in radians without a units attribute, kept as read, were labelled degrees."""
    with h5py.File(tiny_scan.path, "r") as f:
        psi = f["/1.1/measurement/diffrz"][()]
    path = tmp_path / "angles.h5"
    with h5py.File(path, "w") as f:
        f["psi"] = -psi if angles == "decreasing" else np.radians(psi)
    out = tmp_path / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={path}::/psi",
                             f"dark.url={tiny_scan.dark_url}", "background.window=11",
                             "segmentation.max_blob_size=[20,20,5]", f"output.dir={out}", "quicklook.enabled=false"])
    process_scan(cfg, display=False)
    assert main(["export", str(out), "--format", "imaged11"]) == 0
    cols, params = read_columnfile(out / "spots.flt")
    assert cols["Min_o"].size > 5
    assert np.all(cols["Min_o"] <= cols["omega"] + 1e-3) and np.all(cols["omega"] <= cols["Max_o"] + 1e-3)
    assert np.all(cols["Min_o"] <= cols["Max_o"])
    assert params["omega_unit"] == ("degrees" if angles == "decreasing" else "as recorded (like radians)")


@pytest.mark.parametrize("target", ["spots.h5", "corrected.h5", "config.yml", "run.json"])
def test_output_onto_a_file_that_is_not_a_columnfile_is_refused_and_left_whole(exported, tmp_path, capsys, target):
    """``--output OUT/spots.h5`` (or the sparse scan, the scan file, any other file) replaced it with the
    columnfile: the spot table was lost. Such a file is now refused and left as it was; a columnfile is
    replaced."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    before = (out / target).read_bytes()
    assert main(["export", str(out), "--output", str(out / target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dctstream: error: export --output: {out / target}: exists and is "), err
    assert "choose another --output" in err and len(err.splitlines()) == 1
    assert (out / target).read_bytes() == before
    assert main(["export", str(out), "--output", str(out / "spots.flt")]) == 0  # an earlier export: replaced
    assert main(["export", str(out), "--output", str(out / "spots.flt")]) == 0
    assert len(read_columnfile(out / "spots.flt")[0]["sc"]) == len(exported[1]["id"])


def test_a_killed_runs_exports_say_stopped_not_running(exported, tmp_path, capsys):
    """A run killed (SIGKILL) leaves a record saying running: its exports said PARTIAL "the run is running",
    as if it were still going, where `dctstream status` says it stopped and the same command resumes it."""
    import json
    import shutil
    import socket
    import subprocess
    import sys

    out, _ = exported
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = json.loads((killed / "run.json").read_text())
    (killed / "run.json").write_text(json.dumps({**record, "state": "running", "pid": gone.pid,
                                                 "host": socket.gethostname()}))
    why = f"the run is stopped: its process (pid {gone.pid}) is gone without finishing"
    assert main(["export", str(killed)]) == 0
    assert f"PARTIAL, marked so in the file: {why}" in capsys.readouterr().out
    assert f"# partial = {why}" in (killed / "spots.flt").read_text()
    assert main(["export", str(killed), "--format", "dct"]) == 0
    assert f"PARTIAL, marked so in both files: {why}" in capsys.readouterr().out
    with h5py.File(killed / "difspot.h5", "r") as f:
        assert f["difspot"].attrs["partial"].startswith(why)
