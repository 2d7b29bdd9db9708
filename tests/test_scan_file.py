"""source.angles: auto and dark.url: auto, read from Bliss/NeXus scan files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table
from dctstream.sources.scan_file import resolve_auto

FRAMES = "/1.1/measurement/marana"
N = 12


def _bliss_file(path: Path, *, title="fscan diffrz 0 1 12 0.1", positioners=None, darks=(), complete=True):
    """A Bliss-layout file: /1.1 with frames, instrument/positioners (name -> values) and an epoch channel;
    ``darks``: (scan name, title, frame shape) of other scans."""
    positioners = {"diffrz": np.arange(N) * 1.0, "samy": np.full(N, 3.0)} if positioners is None else positioners
    with h5py.File(path, "w") as f:
        f["1.1/title"] = title
        if complete:
            f["1.1/end_time"] = "2024-01-01T10:00:00"
        f[FRAMES] = np.zeros((N, 8, 8), np.uint16)
        f["1.1/measurement/epoch"] = 1.7e9 + np.arange(N)  # monotonic, one per frame, but a clock
        for name, values in positioners.items():
            f[f"1.1/instrument/positioners/{name}"] = values
            f[f"1.1/measurement/{name}"] = h5py.SoftLink(f"/1.1/instrument/positioners/{name}")
        for name, dark_title, shape in darks:
            f[f"{name}/title"] = dark_title
            f[f"{name}/measurement/marana"] = np.zeros(shape, np.uint16)
    return path


def _auto(path: Path, *overrides):
    cfg = load_config(None, [f"source.url={path}::{FRAMES}", "source.angles=auto", "dark.url=auto", *overrides])
    return resolve_auto(cfg)


def test_the_positioner_that_moves_with_one_value_per_frame(tmp_path):
    cfg, found = _auto(_bliss_file(tmp_path / "s.h5"))
    assert cfg.source.angles == f"{tmp_path / 's.h5'}::/1.1/instrument/positioners/diffrz"
    assert "diffrz moves monotonically from 0 to 11 over the 12 frames" in found["source.angles"]["reason"]


def test_several_moving_positioners_the_title_decides_or_none_is_guessed(tmp_path):
    both = {"diffrz": np.arange(N) * 1.0, "samy": np.linspace(0, 1, N)}
    cfg, _ = _auto(_bliss_file(tmp_path / "a.h5", positioners=both))
    assert cfg.source.angles.endswith("::/1.1/instrument/positioners/diffrz")
    cfg, found = _auto(_bliss_file(tmp_path / "b.h5", positioners=both, title="loopscan 12 0.1"))
    assert cfg.source.angles is None
    assert "several positioners move over the scan (diffrz, samy)" in found["source.angles"]["reason"]


@pytest.mark.parametrize("values", [np.r_[np.arange(6), np.arange(6)] * 1.0,  # turns back
                                    np.arange(N + 3) * 1.0,  # not one per frame
                                    np.zeros(N)])  # does not move
def test_no_positioner_that_fits(tmp_path, values):
    cfg, found = _auto(_bliss_file(tmp_path / "s.h5", positioners={"diffrz": values}))
    assert cfg.source.angles is None  # the epoch clock is never taken for angles
    assert found["source.angles"]["reason"] == "no positioner in /1.1 moves monotonically with one value per frame"


def test_a_file_being_written_may_be_one_angle_behind(tmp_path):
    path = _bliss_file(tmp_path / "s.h5", positioners={"diffrz": np.arange(N - 1) * 0.5}, complete=False)
    cfg, found = _auto(path)
    assert cfg.source.angles.endswith("::/1.1/instrument/positioners/diffrz")
    assert "over the first 11 frames" in found["source.angles"]["reason"]


def test_the_dark_is_the_last_dark_scan_before_else_the_first_after(tmp_path):
    darks = [("2.1", "dark", (5, 8, 8)), ("0.1", "ct dark", (3, 8, 8)), ("4.1", "dark", (5, 8, 8)),
             ("3.1", "flat", (5, 8, 8)), ("0.2", "dark", (5, 4, 4))]  # 0.2: another detector's size
    cfg, found = _auto(_bliss_file(tmp_path / "s.h5", darks=darks))
    assert cfg.dark.url == f"{tmp_path / 's.h5'}::/0.1/measurement/marana"
    assert found["dark.url"]["reason"] == "scan 0.1 of the same file is titled 'ct dark', the last such scan before 1.1"
    cfg, _ = _auto(_bliss_file(tmp_path / "t.h5", darks=darks[2:]))
    assert cfg.dark.url.endswith("::/4.1/measurement/marana")
    cfg, found = _auto(_bliss_file(tmp_path / "u.h5", darks=darks[3:]))
    assert cfg.dark.url is None and "no other scan" in found["dark.url"]["reason"]


def test_what_the_user_names_wins(tmp_path):
    path = _bliss_file(tmp_path / "s.h5", darks=[("2.1", "dark", (5, 8, 8))])
    cfg, found = resolve_auto(load_config(None, [f"source.url={path}::{FRAMES}", f"source.angles={path}::/x",
                                                 "dark.url=auto", "dark.value=100"]))
    assert cfg.source.angles == f"{path}::/x" and cfg.dark.url is None and cfg.dark.value == 100
    assert set(found) == {"dark.url"}


def test_not_a_scan_file(tmp_path):
    cfg, found = resolve_auto(load_config(None, ["source.url=tcp://det:9999", "source.angles=auto"]))
    assert cfg.source.angles is None and found["source.angles"]["reason"] == "the source is not an HDF5 scan file"


def test_run_with_the_packaged_default_finds_angles_and_dark(tiny_scan, tiny_set_args, tmp_path):
    """`dctstream run --source URL` (no config file) equals a run naming the simulator's angles and dark,
    and its record says what was found."""
    out_auto, out_named = tmp_path / "auto", tmp_path / "named"
    done = subprocess.run([sys.executable, "-m", "dctstream", "run", "--source", tiny_scan.frames_url,
                           "--out", str(out_auto), *tiny_set_args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((out_auto / "run.json").read_text())
    assert record["angles"] == tiny_scan.angles_url and record["dark"] == tiny_scan.dark_url
    assert record["auto"]["dark.url"]["reason"] == "scan 2.1 of the same file is titled 'dark', the first such scan after 1.1"
    named = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                               f"dark.url={tiny_scan.dark_url}", f"output.dir={out_named}",
                               *[a for a in tiny_set_args if a != "--set"]])
    process_scan(named, display=False)
    auto, expected = read_spot_table(out_auto / "spots.h5"), read_spot_table(out_named / "spots.h5")
    assert "centroid_psi_deg" in auto and auto.keys() == expected.keys() and len(expected["id"]) > 0
    for name in expected:
        np.testing.assert_array_equal(auto[name], expected[name], err_msg=name)


def test_a_wheel_holds_the_packaged_configs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in ("dctstream", "simulators"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (root / "dctstream" / "configs").glob("*.yml"):
        assert f"dctstream/configs/{config.name}" in names
