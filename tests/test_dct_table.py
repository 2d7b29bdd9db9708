"""The legacy DCT difspot table beside spots.h5: difspot.h5 and difspot.csv."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dctstream.cli import main
from dctstream.config import load_config
from dctstream.dct_table import COLUMNS, read_difspot_csv
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table


@pytest.fixture(scope="module")
def run_out(tiny_scan, tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("dct_table") / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"dark.url={tiny_scan.dark_url}",
                             f"output.dir={out}", *tiny_overrides])
    process_scan(cfg, display=False)
    return out


def _h5_table(path):
    with h5py.File(path, "r") as f:
        assert f["difspot"].attrs["notation_indexing"] == "starts with 1 (MATLAB), absolute"
        return {name: d[()] for name, d in f["difspot"].items()}


def test_a_run_writes_the_table_in_the_legacy_columns(run_out):
    spots = read_spot_table(run_out / "spots.h5")
    table = _h5_table(run_out / "difspot.h5")
    assert tuple(table) == COLUMNS and len(spots["id"]) > 0
    one_based = {"StartImage": "start_frame", "EndImage": "end_frame", "MaxImage": "max_frame",
                 "ExtStartImage": "start_frame", "ExtEndImage": "end_frame", "CentroidX": "centroid_x",
                 "CentroidY": "centroid_y", "CentroidImage": "centroid_frame", "BoundingBoxXorigin": "bbox_x0",
                 "BoundingBoxYorigin": "bbox_y0"}
    same = {"difspotID": "id", "Area": "area", "BoundingBoxXsize": "bbox_x_size",
            "BoundingBoxYsize": "bbox_y_size", "Integral": "integral"}
    assert set(one_based) | set(same) == set(COLUMNS)
    for name, column in one_based.items():
        np.testing.assert_array_equal(table[name], spots[column] + 1, err_msg=name)
    for name, column in same.items():
        np.testing.assert_array_equal(table[name], spots[column], err_msg=name)
    csv = read_difspot_csv(run_out / "difspot.csv")
    for name in COLUMNS:
        np.testing.assert_array_equal(csv[name], table[name], err_msg=name)
        assert csv[name].dtype.kind == table[name].dtype.kind, name


def test_each_row_repeats_its_difspot_file(run_out):
    """The absolute fields of every difspot file (written from the blob itself) are its row's."""
    table = _h5_table(run_out / "difspot.h5")
    for i, spot_id in enumerate(table["difspotID"]):
        with h5py.File(run_out / "difspots" / f"{spot_id:06d}.h5", "r") as f:
            for name in ("difspotID", "StartImage", "EndImage", "Area", "BoundingBoxXorigin", "BoundingBoxYorigin",
                         "BoundingBoxXsize", "BoundingBoxYsize"):
                assert table[name][i] == f[name][()], (spot_id, name)
            origin = f["BoundingBoxOriginSize"][0]  # (z, y, x), 1-based absolute; the centroid is relative there
            centroid = f["CentroidIndex"][()] + origin - 1
            np.testing.assert_allclose([table["CentroidImage"][i], table["CentroidY"][i], table["CentroidX"][i]],
                                       centroid, rtol=1e-12)
            assert table["MaxImage"][i] == f["MaxImage"][()] + origin[0] - 1
            assert table["Integral"][i] == pytest.approx(f["Integral"][()], rel=1e-6)  # float32 in the file


def test_export_dct_on_the_command_line(run_out, tmp_path, capsys):
    target = tmp_path / "t.h5"
    assert main(["export", str(run_out), "--format", "dct", "--output", str(target)]) == 0
    n = len(read_spot_table(run_out / "spots.h5")["id"])
    assert capsys.readouterr().out == f"wrote {n} difspots to {target} and {tmp_path / 't.csv'} (the DCT difspot table)\n"
    expected, got = _h5_table(run_out / "difspot.h5"), _h5_table(target)
    for name in COLUMNS:
        np.testing.assert_array_equal(got[name], expected[name])


def test_export_dct_of_a_folder_without_spots(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "dct"]) == 1
    assert capsys.readouterr().err.startswith(f"dctstream: error: {tmp_path / 'spots.h5'}: cannot read the spot table")


def test_a_partial_runs_table_says_so_in_both_files(run_out, tmp_path, capsys):
    """A run stopped before its end: the difspot table is marked partial (the columnfile was, this was not);
    a finished run's is not (the run's own table, written before its record says finished)."""
    import json
    import shutil

    with h5py.File(run_out / "difspot.h5", "r") as f:
        assert "partial" not in f["difspot"].attrs
    assert not (run_out / "difspot.csv").read_text().startswith("#")
    stopped = tmp_path / "stopped"
    shutil.copytree(run_out, stopped)
    record = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**record, "state": "stopped", "error": "interrupted (SIGINT)"}))
    assert main(["export", str(stopped), "--format", "dct"]) == 0
    why = "the run is stopped: interrupted (SIGINT)"
    assert capsys.readouterr().out.endswith(f"; PARTIAL, marked so in both files: {why}\n")
    with h5py.File(stopped / "difspot.h5", "r") as f:
        assert f["difspot"].attrs["partial"] == why
    assert (stopped / "difspot.csv").read_text().startswith(f"# partial = {why}\n")
    csv, whole = read_difspot_csv(stopped / "difspot.csv"), read_difspot_csv(run_out / "difspot.csv")
    for name in COLUMNS:
        np.testing.assert_array_equal(csv[name], whole[name])


@pytest.mark.parametrize("target", ["spots.h5", "corrected.h5", "run.json"])
def test_output_onto_a_file_that_is_not_a_difspot_table_is_refused_and_left_whole(run_out, tmp_path, capsys,
                                                                                   target):
    """``--format dct --output OUT/spots.h5`` replaced the spot table (or the sparse scan, the scan file) with
    the difspot table: its data lost. Refused now, the file left as it was; an earlier table is replaced."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    before = (out / target).read_bytes()
    assert main(["export", str(out), "--format", "dct", "--output", str(out / target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dctstream: error: export --output: {out / target}: "), err
    # run.json: not an HDF5 table's name, refused as such (test_output_not_named_as_an_hdf5_table_is_refused)
    assert ("exists and is " in err and "choose another --output" in err if target.endswith(".h5")
            else "ending in .h5" in err) and len(err.splitlines()) == 1
    assert (out / target).read_bytes() == before
    assert main(["export", str(out), "--format", "dct", "--output", str(out / "difspot.h5")]) == 0
    assert _h5_table(out / "difspot.h5")["difspotID"].size == len(read_spot_table(out / "spots.h5")["id"])


@pytest.mark.parametrize("name", ["table.csv", "table.flt", "table"])
def test_output_not_named_as_an_hdf5_table_is_refused(run_out, tmp_path, capsys, name):
    """The table is HDF5 and its .csv is written beside it: ``--output table.csv`` wrote the HDF5 table under
    that name and then the csv over it, ``table.flt`` an HDF5 file under ImageD11's columnfile suffix."""
    assert main(["export", str(run_out), "--format", "dct", "--output", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dctstream: error: export --output: {tmp_path / name}: expected the name of the HDF5 "
                          "table, ending in .h5"), err
    assert not list(tmp_path.iterdir())
    assert main(["export", str(run_out), "--format", "dct", "--output", str(tmp_path / "table.hdf5")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.hdf5"]
