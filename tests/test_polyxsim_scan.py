"""The PolyXSim validation scan's converter: its input read as PolyXSim reads it, misuse named, and the
validation row skipped, saying how to make the scan, when the scan is absent (PolyXSim itself is not here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from simulators.validation import table_markdown, validate

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("polyxsim_scan", ROOT / "benchmarks" / "polyxsim_scan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INP = """direc 'Al30'   # the output folder
stem 'Al30_'
peakshape 1 3 1.0
dety_size 512
detz_size 512
omega_start -180
omega_end 180
omega_step 1.0
o11 1
o12 0
o21 0
o22 -1
noise 0
bg 0
psf 0
"""


def test_the_input_is_read_keyword_by_keyword(tmp_path):
    inp = tmp_path / "Al30.inp"
    inp.write_text(INP)
    param = _module().read_input(inp)
    assert param["direc"] == ["Al30"] and param["peakshape"] == [1.0, 3.0, 1.0]
    assert (param["omega_end"][0] - param["omega_start"][0]) / param["omega_step"][0] == 360
    assert param["o22"] == [-1.0]


@pytest.mark.parametrize("change,message", [
    (lambda text: text.replace("omega_step 1.0\n", ""), "keyword omega_step missing"),
    (lambda text: text.replace("peakshape 1 3 1.0", "peakshape 0 3 1.0"), "peakshape: expected 1"),
    (lambda text: text.replace("noise 0", "noise 1"), "must be off"),
])
def test_an_input_it_cannot_use_is_named(tmp_path, change, message):
    inp = tmp_path / "Al30.inp"
    inp.write_text(change(INP))
    with pytest.raises(ValueError, match=message) as info:
        _module().read_input(inp)
    assert str(inp) in str(info.value)


def test_the_polyxsim_row_says_how_to_make_its_scan_when_it_is_absent(tmp_path):
    rows = validate(quick=True, scans=["polyxsim"], work=tmp_path, imaged11=False)
    assert len(rows) == 1 and rows[0]["error"].startswith(f"skipped: no {tmp_path / 'polyxsim-scan.h5'}")
    assert "benchmarks/polyxsim_scan.py --inp INP" in table_markdown(rows)
