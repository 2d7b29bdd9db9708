"""`dctstream.results`: a run's output folder read back (`open_run`, `Run`), when its files are not as written."""

from __future__ import annotations

import json
import logging
import shutil

import h5py
import pytest

import dctstream
from dctstream.config import load_config
from dctstream.errors import InputError
from dctstream.export import export_imaged11
from dctstream.runner import process_scan


@pytest.fixture(scope="module")
def finished(tiny_scan, tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", *tiny_overrides, f"output.dir={out}"])
    process_scan(cfg, display=False)
    assert dctstream.open_run(out).spots.size >= 3
    return out


@pytest.fixture
def copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def test_a_finished_runs_spot_table_gone_is_an_error_not_an_empty_table(copy):
    """spots.h5 deleted (or not copied) from a finished run: ``run.spots`` was an empty table, as before a
    running scan's first flush, passing 0 difspots off as the run's result."""
    n = len(dctstream.open_run(copy).spots)
    (copy / "spots.h5").unlink()
    with pytest.raises(InputError, match=rf"^{copy / 'spots.h5'}: missing, expected the spot table of the run's "
                                         rf"{n} difspots \({copy / 'run.json'} says finished\)$"):
        dctstream.open_run(copy).spots


def test_a_running_scan_before_its_first_table_is_an_empty_table(copy):
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**record, "state": "running"}))
    (copy / "spots.h5").unlink()
    assert dctstream.open_run(copy).spots.size == 0


@pytest.mark.parametrize("edit, needle", [
    ("drop centroid_x", "/spots/centroid_x: missing, expected the columns of a dctstream spot table"),
    ("shorten area", "/spots/area: shape (2,), expected ("),
])
def test_a_spot_table_missing_a_column_or_with_a_short_one_names_it(copy, edit, needle):
    """A column missing: the table read without it, then ``plot_quicklook`` (and the exports) failed with a
    ValueError/KeyError traceback; a column shorter than the others: a ValueError (could not broadcast)."""
    action, name = edit.split()
    with h5py.File(copy / "spots.h5", "a") as f:
        values = f["spots"][name][()]
        del f["spots"][name]
        if action == "shorten":
            f["spots"][name] = values[:2]
    run = dctstream.open_run(copy)
    for read in (lambda: run.spots, run.plot_quicklook):
        with pytest.raises(InputError) as caught:
            read()
        assert str(caught.value).startswith(f"{copy / 'spots.h5'}: {needle}"), caught.value
    with pytest.raises(InputError, match="/spots/"):
        export_imaged11(copy)


def test_a_record_that_is_json_but_not_a_record(copy):
    """run.json holding ``[1, 2]``: ``Run.record`` returned the list and ``Run.angles()`` failed with an
    AttributeError traceback ('list' object has no attribute 'get')."""
    (copy / "run.json").write_text("[1, 2]")
    run = dctstream.open_run(copy)
    with pytest.raises(InputError, match="run.json: missing or unreadable"):
        run.record
    assert run.angles() is None
    assert run.spots.size >= 3


def test_a_quicklook_picture_that_cannot_be_read_leaves_it_out(copy, caplog):
    """quicklook/max_projection.png not a picture (cut short by a full disk, overwritten): plot_quicklook
    failed with PIL's UnidentifiedImageError; now the table's figures, and a warning naming the file."""
    picture = copy / "quicklook" / "max_projection.png"
    assert picture.is_file()
    picture.write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        figures = dctstream.open_run(copy).plot_quicklook()
    assert sorted(figures) == ["detector", "integrals", "spots_per_psi"]
    assert f"{picture}: not read" in caplog.text
