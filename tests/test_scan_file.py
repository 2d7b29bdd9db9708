"""source.angles, dark.url and detector.flat: auto, and a DCT dataset file's rotation scan, read from Bliss/NeXus scan files."""

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
from dctstream.errors import InputError
from dctstream.sources.scan_file import resolve_auto
from simulators.dct_scan import simulate_scan

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


def test_a_scan_file_not_there_yet_is_warned_the_run_goes_without_angles_and_dark(tmp_path, caplog):
    """A run started before its scan's file appears finds neither angles nor dark there: said as a warning (the
    run record's), not only at INFO (a run finished without psi and dark and nothing said why)."""
    cfg = load_config(None, [f"source.url={tmp_path}/later.h5::/1.1/measurement/marana", "source.angles=auto",
                             "dark.url=auto"])
    with caplog.at_level("WARNING", "dctstream"):
        resolved, _ = resolve_auto(cfg)
    assert resolved.source.angles is None and resolved.dark.url is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "later.h5 does not exist yet" in warned[0]
    assert "without angles (no psi) and a dark" in warned[0]


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
    cfg, found = _auto(_bliss_file(tmp_path / "s.h5", positioners={"diffrz": values}, title="loopscan 12 0.1"))
    assert cfg.source.angles is None  # the epoch clock is never taken for angles
    assert found["source.angles"]["reason"] == "no positioner in /1.1 moves monotonically with one value per frame"


@pytest.mark.parametrize("values, why", [
    (np.r_[np.arange(5), np.nan, np.arange(6, N)] * 1.0, "diffrz, which the title names, reads nan at frame 5"),
    (np.arange(N + 3) * 1.0, "diffrz, which the title names, has 15 values for 12 frames"),
], ids=["a_nan", "not_one_per_frame"])
def test_the_positioner_the_title_names_that_cannot_be_taken_is_warned(tmp_path, caplog, values, why):
    """The rotation the title names, but with a NaN or not one value per frame: the run goes on without psi, said
    as a warning naming why (it was an INFO line saying no positioner moves)."""
    with caplog.at_level("INFO", "dctstream"):
        cfg, found = _auto(_bliss_file(tmp_path / "s.h5", positioners={"diffrz": values}))
    assert cfg.source.angles is None
    reason = f"{why}: no angles taken, psi not reported; name them with source.angles"
    assert found["source.angles"]["reason"] == reason
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"source.angles: auto: none ({reason})"]


def test_frames_stored_along_the_last_axis_are_refused(tmp_path):
    """A recorded stack (y, x, frames) with the rotation's values as many as its last axis: an error, as for angles
    named by hand (read as frames of y x frames px, it ran as noise for minutes)."""
    path = tmp_path / "last.h5"
    with h5py.File(path, "w") as f:
        f["1.1/title"] = "fscan diffrz 0 1 12 0.1"
        f[FRAMES] = np.zeros((8, 9, N), np.uint16)
        f["1.1/measurement/diffrz"] = np.arange(N) * 1.0
    with pytest.raises(InputError) as err:
        _auto(path)
    assert str(err.value) == (f"source.url: {path}::{FRAMES}: shape (8, 9, 12), and diffrz "
                              "(/1.1/measurement/diffrz) moves over 12 values, as many as along its axis 2, not its "
                              "first: expected the frames along the first axis (frames, y, x), as detectors write them")


def test_a_dark_or_flat_scan_of_another_size_is_warned(tmp_path, caplog):
    """A scan titled dark, or as references, whose frames are not the scan's size: passed over, said as a warning
    (it was said at INFO only, and the run went on without a dark or flat)."""
    path = _bliss_file(tmp_path / "s.h5", darks=[("2.1", "dark", (5, 4, 4)), ("3.1", "flat", (5, 8, 4))])
    with caplog.at_level("INFO", "dctstream"):
        cfg, found = _auto(path, "detector.flat=auto")
    assert cfg.dark.url is None and cfg.detector.flat is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"dark.url: auto: none ({found['dark.url']['reason']})",
                      f"detector.flat: auto: none ({found['detector.flat']['reason']})"]
    assert found["dark.url"]["reason"].endswith("scan 2.1 is titled dark but its frames are 4 x 4 px, the scan's 8 x 8")
    assert found["detector.flat"]["reason"].endswith(
        "scan 3.1 is titled as references but its frames are 4 x 8 px, the scan's 8 x 8")


def test_an_interlaced_rotation_named_by_the_title_is_the_angles(tmp_path):
    """Two interlaced turns (0, 60, ..., 300, 30, 90, ...): not monotonic, but the title's motor, a value of its
    own at each frame; a positioner that goes back to a value it had is not taken."""
    interlaced = np.concatenate([np.arange(0, 360, 60), np.arange(30, 360, 60)]) * 1.0
    cfg, found = _auto(_bliss_file(tmp_path / "i.h5", positioners={"diffrz": interlaced, "samy": np.full(N, 3.0)}))
    assert cfg.source.angles == f"{tmp_path / 'i.h5'}::/1.1/instrument/positioners/diffrz"
    assert "takes a value of its own at each of the 12 frames, from 0 to 330, not in order" in \
        found["source.angles"]["reason"]
    wobble = np.array([0.0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    cfg, _ = _auto(_bliss_file(tmp_path / "w.h5", positioners={"diffrz": wobble}))
    assert cfg.source.angles is None


def test_a_rotation_recorded_in_measurement_only_is_found(tmp_path):
    """Positioners holding each motor's value at the start only (a scalar), the rotation's values per frame in
    measurement: the latter are the angles (the positioners group hid them before)."""
    path = _bliss_file(tmp_path / "m.h5", positioners={"samy": np.full(N, 3.0)})
    with h5py.File(path, "a") as f:
        f["1.1/instrument/positioners/diffrz"] = 0.0
        f["1.1/measurement/diffrz"] = np.arange(N) * 30.0
    cfg, found = _auto(path)
    assert cfg.source.angles == f"{path}::/1.1/measurement/diffrz"
    assert "diffrz moves monotonically from 0 to 330" in found["source.angles"]["reason"]


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
    # the dark of another detector's size is named, and why it was passed over
    assert cfg.dark.url is None and found["dark.url"]["reason"] == (
        f"no other scan in {tmp_path / 'u.h5'} has a title with 'dark' and frames at /<scan>/measurement/marana; "
        "scan 0.2 is titled dark but its frames are 4 x 4 px, the scan's 8 x 8")


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


def _dataset_file(path: Path, scans):
    """A DCT dataset file: ``scans`` is a list of (name, title, frames (n, y, x) or None, {motor: value(s)})."""
    with h5py.File(path, "w") as f:
        for name, title, frames, motors in scans:
            f[f"{name}/title"] = title
            if frames is not None:
                f[f"{name}/measurement/marana"] = frames
            for motor, values in motors.items():
                f[f"{name}/instrument/positioners/{motor}"] = values
                f[f"{name}/instrument/positioners_start/{motor}"] = np.ravel(values)[0]
    return path


def _found(path: Path, *overrides):
    return resolve_auto(load_config(None, [f"source.url={path}", "source.angles=auto", "dark.url=auto",
                                           "detector.flat=auto", *overrides]))


def _flat(n=4, lit=None):
    image = np.full((n, 8, 8), 20000, np.uint16)
    if lit is not None:  # references of the direct beam only: dark outside it
        image[:] = 100
        image[:, lit, lit] = 20000
    return image


def test_a_dataset_file_gives_its_rotation_scan_angles_dark_and_flat(tmp_path):
    rotate = {"diffrz": np.arange(N) * 30.0, "samy": 0.0}
    path = _dataset_file(tmp_path / "d.h5", [
        ("1.1", "ascan samy -1 1 4 0.1", np.zeros((4, 8, 8), np.uint16), {"samy": np.linspace(-1, 1, 4)}),
        ("2.1", "loopscan 4 0.1", _flat(), {"diffrz": 0.0, "samy": 5.0}),  # told by samy standing out
        ("3.1", "fscan diffrz 0 30 12 0.1", np.zeros((N, 8, 8), np.uint16), rotate),
        ("4.1", "ref scan", _flat(), {"diffrz": 360.0, "samy": 5.0}),
        ("5.1", "dark", np.full((3, 8, 8), 100, np.uint16), {}),
        ("6.1", "loopscan 4 0.1", _flat(), {"diffrz": 0.0, "samy": 0.0}),  # sample in: not a reference
    ])
    cfg, found = _found(path)
    assert cfg.source.url == f"{path}::/3.1/measurement/marana"
    assert found["source.url"]["reason"].startswith("scan 3.1 ('fscan diffrz 0 30 12 0.1'): 12 frames of marana "
                                                    "while diffrz 0 to 330")
    assert "also 1.1/marana (4)" in found["source.url"]["reason"]  # the alignment scan has fewer frames
    assert cfg.source.angles == f"{path}::/3.1/instrument/positioners/diffrz"
    assert cfg.dark.url == f"{path}::/5.1/measurement/marana"
    assert cfg.detector.flat == f"{path}::/2.1/measurement/marana"
    assert found["detector.flat"]["reason"] == ("scan 2.1 (nothing moves over it and samy stands at 5, not 0 (sample "
                                                "out)), the last such scan before 3.1")
    # without the one before: the first after; every choice can be named instead
    with h5py.File(path, "a") as f:
        del f["2.1"]
    cfg, found = _found(path)
    assert cfg.detector.flat == f"{path}::/4.1/measurement/marana"
    assert found["detector.flat"]["reason"] == "scan 4.1 (titled 'ref scan'), the first such scan after 3.1"
    cfg, found = _found(path, "detector.flat=null", "dark.url=null", f"source.angles={path}::/x")
    assert (cfg.detector.flat, cfg.dark.url, cfg.source.angles) == (None, None, f"{path}::/x")
    assert set(found) == {"source.url"}
    cfg, found = _found(f"{path}::/1.1/measurement/marana")
    assert cfg.source.url == f"{path}::/1.1/measurement/marana" and "source.url" not in found


@pytest.mark.parametrize("suffix", [".npy", ".edf"])
def test_a_dark_file_of_its_own_with_a_flat_found_in_the_scans_file(tmp_path, suffix):
    """dark.url an image file of its own (not file.h5::/dataset) while detector.flat: auto finds a flat: the flat
    is measured above that dark (it was refused: "expected a URL of the form path/to/file.h5::/path/to/dataset")."""
    import fabio.edfimage

    rotate = {"diffrz": np.arange(N) * 30.0, "samy": 0.0}
    path = _dataset_file(tmp_path / "d.h5", [
        ("1.1", "fscan diffrz 0 30 12 0.1", np.zeros((N, 8, 8), np.uint16), rotate),
        ("2.1", "ref scan", _flat(), {"diffrz": 360.0, "samy": 5.0}),
    ])
    dark = tmp_path / f"dark{suffix}"
    image = np.full((8, 8), 100, np.float32)
    np.save(dark, image) if suffix == ".npy" else fabio.edfimage.EdfImage(data=image).write(str(dark))
    cfg, found = _found(path, f"dark.url={dark}")
    assert cfg.dark.url == str(dark)
    assert cfg.detector.flat == f"{path}::/2.1/measurement/marana"


def test_references_of_the_direct_beam_only_are_no_flat(tmp_path):
    path = _dataset_file(tmp_path / "d.h5", [
        ("1.1", "ref", _flat(lit=slice(3, 5)), {}),
        ("2.1", "fscan diffrz 0 30 12 0.1", np.zeros((N, 8, 8), np.uint16), {"diffrz": np.arange(N) * 30.0}),
    ])
    cfg, found = _found(path)
    assert cfg.source.url.endswith("::/2.1/measurement/marana") and cfg.detector.flat is None
    assert found["detector.flat"]["reason"] == ("scan 1.1 (titled 'ref'), the last such scan before 2.1: 6% of its "
                                                "pixels are over 10 x its median (a direct-beam reference, not a flat "
                                                "field): no flat")
    with h5py.File(path, "a") as f:  # with the dark subtracted, the rest of the detector is 0
        f["0.1/title"] = "dark"
        f["0.1/measurement/marana"] = np.full((2, 8, 8), 100, np.uint16)
    cfg, found = _found(path)
    assert cfg.detector.flat is None and "it is dark on most of the detector (median 0 counts" in found["detector.flat"]["reason"]


def test_a_collection_file_of_linked_scans_named_after_their_sample(tmp_path):
    """A proposal's collection file links each scan of a dataset file as ``sample_0001_N.M``: its scans are
    ordered by the number at the end of their names (a traceback before: "min() arg is an empty sequence")."""
    rotate = {"diffrz": np.arange(N) * 30.0, "samy": 0.0}
    data = _dataset_file(tmp_path / "sample_0001.h5", [
        ("1.1", "dct dark", np.full((3, 8, 8), 100, np.uint16), {}),
        ("2.1", "dct ref", _flat(), {"diffrz": 0.0, "samy": 5.0}),
        ("3.1", "fscan diffrz 0 30 12 0.1", np.zeros((N, 8, 8), np.uint16), rotate),
        ("4.1", "dct ref", _flat(), {"diffrz": 360.0, "samy": 5.0}),
    ])
    path = tmp_path / "collection.h5"
    with h5py.File(path, "w") as f:
        for scan in ("1.1", "2.1", "3.1", "4.1"):
            f[f"sample_0001_{scan}"] = h5py.ExternalLink(str(data), f"/{scan}")
    cfg, found = _found(path)
    assert cfg.source.url == f"{path}::/sample_0001_3.1/measurement/marana"
    assert cfg.dark.url == f"{path}::/sample_0001_1.1/measurement/marana"
    assert cfg.detector.flat == f"{path}::/sample_0001_2.1/measurement/marana"
    assert found["detector.flat"]["reason"].endswith("the last such scan before sample_0001_3.1")


def test_a_dataset_file_without_a_rotation_scan_or_with_two_says_so(tmp_path):
    path = _dataset_file(tmp_path / "d.h5", [("1.1", "ref", _flat(), {}), ("2.1", "dark", _flat(), {})])
    with pytest.raises(InputError, match=r"no rotation scan in this file .*its scans: 1\.1 \('ref': marana\); "
                                         r"2\.1 \('dark': marana\)"):
        _found(path)
    rotate = {"diffrz": np.arange(N) * 30.0}
    path = _dataset_file(tmp_path / "e.h5", [("1.1", "fscan", np.zeros((N, 8, 8), np.uint16), rotate),
                                             ("2.1", "fscan", np.zeros((N, 8, 8), np.uint16), rotate)])
    with pytest.raises(InputError, match=r"several rotation scans or detectors with 12 frames "
                                         r"\(/1\.1/measurement/marana, /2\.1/measurement/marana\)"):
        _found(path)


def test_a_simulated_dct_dataset_file_runs_with_only_its_path(tmp_path, tiny_set_args):
    """`dctstream run --source dataset.h5`: the run equals one naming the rotation scan, angles, dark and flat,
    and its record says which scan gave what."""
    truth = simulate_scan(tmp_path / "dataset.h5", frames=40, size=64, spots=10, seed=0, dark_frames=4,
                          gain_spread=0.2, layout="dct")
    out_auto, out_named = tmp_path / "auto", tmp_path / "named"
    done = subprocess.run([sys.executable, "-m", "dctstream", "run", "--source", truth.path,
                           "--out", str(out_auto), *tiny_set_args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((out_auto / "run.json").read_text())
    assert {key: what["url"] for key, what in record["auto"].items()} == {
        "source.url": truth.frames_url, "source.angles": truth.angles_url, "dark.url": truth.dark_url,
        "detector.flat": truth.flat_url}
    assert record["auto"]["source.url"]["reason"].startswith("scan 2.1 ('fscan diffrz 0 9 40 0.1'): 40 frames")
    named = load_config(None, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                               f"dark.url={truth.dark_url}", f"detector.flat={truth.flat_url}",
                               f"output.dir={out_named}", *[a for a in tiny_set_args if a != "--set"]])
    process_scan(named, display=False)
    auto, expected = read_spot_table(out_auto / "spots.h5"), read_spot_table(out_named / "spots.h5")
    assert auto.keys() == expected.keys() and len(expected["id"]) > 0
    for name in expected:
        np.testing.assert_array_equal(auto[name], expected[name], err_msg=name)
