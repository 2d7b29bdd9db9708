"""The ``dctstream`` command line: exit codes, previous results, check, simulate, run and demo.

The table of bad inputs and their one-line errors is in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from dctstream.cli import main
from dctstream.config import load_config
from dctstream.sinks import read_spot_table

from cli_util import assert_one_line_error, cli, snapshot

# -- previous results ------------------------------------------------------------------------------


def _previous_results(out: Path) -> dict:
    (out / "difspots").mkdir(parents=True)
    (out / "spots.h5").write_bytes(b"spots.h5 of a previous run")
    (out / "difspots" / "000000.h5").write_bytes(b"difspot 0 of a previous run")
    (out / "config.yml").write_text("# config of a previous run\n")
    return snapshot(out)


@pytest.mark.parametrize("overwrite", [False, True], ids=["keep", "overwrite"])
@pytest.mark.parametrize("breakage, code, needle", [
    (lambda scan, bad: ["--dark", f"{bad}::/dark_small"], 1, "dark.url"),
    (lambda scan, bad: ["--set", f"source.angles={bad}::/angles_short"], 1, "source.angles"),
    (lambda scan, bad: ["--set", "direct_beam.bbox=[0,60,10,10]"], 2, "direct_beam.bbox"),
    (lambda scan, bad: ["--source", f"{bad}::/two_d"], 1, "source.url"),
], ids=["dark", "angles", "bbox", "frames"])
def test_bad_input_leaves_previous_results_untouched(breakage, code, needle, overwrite, tiny_scan, bad_inputs,
                                                     tiny_set_args, tmp_path, capsys):
    out = tmp_path / "out"
    before = _previous_results(out)
    args = ["run", "--source", tiny_scan.frames_url, "--out", out, *tiny_set_args, *breakage(tiny_scan, bad_inputs)]
    rc = main([str(a) for a in args] + (["--overwrite"] if overwrite else []))
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, code, [needle])
    assert snapshot(out) == before


def _run_args(scan, out: Path, tiny_set_args) -> list[str]:
    return ["run", "--source", scan.frames_url, "--dark", scan.dark_url, "--set", f"source.angles={scan.angles_url}",
            *tiny_set_args, "--out", str(out)]


def _check_results(out: Path) -> dict[str, np.ndarray]:
    """The spot table, after checking that the difspot files are exactly its rows."""
    table = read_spot_table(out / "spots.h5")
    ids = table["id"]
    assert ids.size > 0
    assert len(set(ids.tolist())) == ids.size
    assert sorted(p.name for p in (out / "difspots").iterdir()) == sorted(f"{i:06d}.h5" for i in ids)
    for row, spot_id in enumerate(ids):
        with h5py.File(out / "difspots" / f"{spot_id:06d}.h5", "r") as f:
            assert f["difspotID"][()] == spot_id
            assert f["Area"][()] == table["area"][row]
            assert f["StartImage"][()] == table["start_frame"][row] + 1  # 1-based in the file
    return table


def test_rerun_needs_overwrite(tiny_scan, tiny_set_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_run_args(tiny_scan, out, tiny_set_args)) == 0
    first = _check_results(out)
    capsys.readouterr()
    stale = out / "difspots" / "999999.h5"
    stale.write_bytes(b"not a difspot of this run")
    before = snapshot(out)

    rc = main(_run_args(tiny_scan, out, tiny_set_args))
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, 1, [str(out), "already holds results", "--overwrite"])
    assert snapshot(out) == before

    # what resegment and tune made from the first run's results goes with them (set aside, then removed)
    assert main(["resegment", str(out)]) == 0 and main(["tune", str(out)]) == 0
    assert main([*_run_args(tiny_scan, out, tiny_set_args), "--overwrite"]) == 0
    assert not stale.exists()
    assert not (out / "resegmented").exists() and not (out / "tune.png").exists()
    second = _check_results(out)
    assert first.keys() == second.keys()
    for column in first:
        np.testing.assert_array_equal(first[column], second[column], err_msg=column)


# -- check ----------------------------------------------------------------------------------------


def test_check_prints_the_effective_config(tmp_path, capsys):
    config = tmp_path / "c.yml"
    config.write_text("background:\n  window: 11\n  mode: block\n  stride: 5\nsegmentation:\n  connectivity: 6\n")
    overrides = ["segmentation.connectivity=26", "direct_beam.bbox=[1,2,30,40]"]
    rc = main(["check", str(config), *[a for o in overrides for a in ("--set", o)]])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    printed = tmp_path / "printed.yml"
    printed.write_text(captured.out)
    expected = load_config(config, overrides)
    assert load_config(printed) == expected
    assert expected != load_config(config)  # the overrides did change something
    assert (expected.background.window, expected.background.mode, expected.background.stride) == (11, "block", 5)
    assert expected.segmentation.connectivity == 26
    assert expected.direct_beam.bbox == (1, 2, 30, 40)

    proc = cli("check", config, *[a for o in overrides for a in ("--set", o)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == captured.out


def test_paths_given_as_options_stay_strings(tmp_path, capsys):
    """--source/--dark/--out take paths, not YAML: `--out 2024` is a folder, `#` is no comment."""
    rc = main(["check", "--source", "scan #1.h5::/1.1/measurement/marana", "--dark", "[dark].h5::/d",
               "--out", "2024"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    printed = tmp_path / "printed.yml"
    printed.write_text(captured.out)
    cfg = load_config(printed)
    assert cfg.source.url == "scan #1.h5::/1.1/measurement/marana"
    assert cfg.dark.url == "[dark].h5::/d"
    assert cfg.output.dir == "2024"


def test_options_override_set(capsys, tmp_path):
    printed = tmp_path / "printed.yml"
    assert main(["check", "--set", "output.dir=a", "--out", "b", "--set", "dark.url=x.h5::/a",
                 "--dark", "y.h5::/b"]) == 0
    printed.write_text(capsys.readouterr().out)
    cfg = load_config(printed)
    assert (cfg.output.dir, cfg.dark.url) == ("b", "y.h5::/b")


# -- simulate, then run ------------------------------------------------------------------------------


def test_simulate_then_run(tmp_path, tiny_set_args, tiny_overrides):
    scan = tmp_path / "sim.h5"
    proc = cli("simulate", scan, "--frames", 40, "--size", 64, "--spots", 10, "--seed", 0, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for path in ("/1.1/measurement/marana", "/1.1/measurement/diffrz", "/2.1/measurement/marana",
                 "/1.1/ground_truth"):
        assert f"{scan}::{path}" in proc.stdout
    with h5py.File(scan, "r") as f:
        frames = f["/1.1/measurement/marana"]
        assert frames.shape == (40, 64, 64) and frames.dtype == np.uint16
        np.testing.assert_allclose(f["/1.1/measurement/diffrz"][()], np.arange(40) * 9.0)
        dark = f["/2.1/measurement/marana"]
        assert dark.ndim == 3 and dark.shape[1:] == (64, 64) and dark.dtype == np.uint16
        truth = f["/1.1/ground_truth"]
        for column in ("x", "y", "frame", "sigma_x", "sigma_y", "sigma_frame", "peak", "integral", "noise",
                       "snr", "in_direct_beam"):
            assert truth[column].shape == (10,), column
        assert list(truth.attrs["direct_beam_bbox"]) and truth.attrs["seed"] == 0

    out = tmp_path / "out"
    frames_url, dark_url, angles_url = (f"{scan}::/1.1/measurement/marana", f"{scan}::/2.1/measurement/marana",
                                        f"{scan}::/1.1/measurement/diffrz")
    proc = cli("run", "--source", frames_url, "--dark", dark_url, "--set", f"source.angles={angles_url}",
               *tiny_set_args, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 1, proc.stdout
    summary = re.search(r"^(\d+) frames (?:\(scan ended: \w+\) )?in .*; (\d+) difspots written to (.+); rejected: ", proc.stdout)
    assert summary, proc.stdout
    table = _check_results(out)
    assert int(summary[1]) == 40
    assert int(summary[2]) == table["id"].size
    assert summary[3] == str(out)
    psi = table["centroid_psi_deg"]
    np.testing.assert_allclose(psi, table["centroid_frame"] * 9.0, atol=1e-9)
    expected = load_config(None, [f"source.url={frames_url}", f"source.angles={angles_url}", f"dark.url={dark_url}",
                                  *tiny_overrides, f"output.dir={out}"])
    assert load_config(out / "config.yml") == expected


# -- demo ------------------------------------------------------------------------------------------


def test_demo_prints_recall_and_precision(capsys):
    rc = main(["demo", "--frames", "60", "--size", "96", "--spots", "30", "--window", "11"])
    text = capsys.readouterr().out
    assert rc == 0
    eligible = re.search(r"\((\d+) of (\d+) true spots", text)
    recall = re.search(r"^\s*recall\s+(\S+) \((\d+) found\)$", text, re.M)
    precision = re.search(r"^\s*precision\s+(\S+) \((\d+) of (\d+) difspots are true spots\)$", text, re.M)
    assert eligible and recall and precision, text
    assert int(eligible[2]) == 30 and int(eligible[1]) >= 10  # enough bright spots for the ratios to say something
    r, p = float(recall[1]), float(precision[1])
    # the demo finds what it promises: nearly every bright spot, few false ones (1.000 and 0.952 when written)
    assert r >= 0.9 and p >= 0.9
    # the printed ratios are the printed counts
    assert r == pytest.approx(int(recall[2]) / max(int(eligible[1]), 1), abs=5e-4)
    assert p == pytest.approx(int(precision[2]) / max(int(precision[3]), 1), abs=5e-4)
    written = re.search(r"(\d+) difspots written", text)
    assert written and int(written[1]) == int(precision[3])


def test_an_option_and_a_set_of_the_same_key_say_which_one_is_taken(capsys, caplog):
    """--source with --set source.url (a script's base settings, then this scan's): the option is taken, and
    the value it replaces is said (it was dropped unsaid)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dctstream"):
        assert main(["check", "--source", "a.h5::/x", "--set", "source.url=b.h5::/y"]) == 0
    assert "url: a.h5::/x" in capsys.readouterr().out
    assert "--source a.h5::/x replaces --set source.url=b.h5::/y" in caplog.text


def test_replay_refuses_what_is_no_scan_no_angles_or_a_file_it_would_empty(tiny_scan, tmp_path, capsys):
    """A 1-D dataset was replayed as 'frames' of one value; angles of another shape were a traceback; a target
    that was the scan's own file or another scan file was emptied (created anew) without a word."""
    scan = Path(tiny_scan.frames_url.split("::")[0])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["1.1/measurement/marana"] = np.zeros((3, 4, 4), np.uint16)
    before = other.read_bytes()
    cases = [
        (["replay", tiny_scan.angles_url, "--to", str(tmp_path / "a.h5")],
         ["replay SCAN", "expected frames (frames, y, x) of numbers, got shape (40,)"]),
        (["replay", tiny_scan.frames_url, "--to", str(tmp_path / "b.h5"), "--angles", tiny_scan.dark_url],
         ["replay --angles", "expected one angle per frame, 40 numbers (1-D), got shape ("]),
        (["replay", tiny_scan.frames_url, "--to", str(scan), "--fps", "0"],
         ["replay --to", "is the file", "is read from"]),
        (["replay", tiny_scan.frames_url, "--to", str(other), "--fps", "0"],
         ["replay --to", "other.h5: exists and holds other data than a replay (1.1)"]),
        # a protocol that cannot carry angles given some: a ValueError traceback before
        (["replay", tiny_scan.frames_url, "--to", "tcp://127.0.0.1:0", "--protocol", "stream1",
          "--angles", tiny_scan.angles_url], ["replay --protocol stream1", "carry no angles"]),
    ]
    for args, needles in cases:
        code = main(args)
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, 1, needles)
    assert other.read_bytes() == before
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()
    # an earlier replay is replaced, as before
    again = tmp_path / "again.h5"
    for _ in range(2):
        assert main(["replay", tiny_scan.frames_url, "--to", str(again), "--fps", "0"]) == 0
    with h5py.File(again, "r") as f:
        assert f["1.1/measurement/marana"].shape == (40, 64, 64)


def test_simulate_refuses_a_scan_too_large_for_the_disk_or_the_memory(tmp_path, capsys, monkeypatch):
    """`simulate --frames 10000000` wrote until the disk was full; `--size 100000` was a MemoryError traceback."""
    import collections
    import shutil

    import simulators.dct_scan

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 10**6))
    code = main(["simulate", str(tmp_path / "s.h5"), "--frames", "100", "--size", "128"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, 1, ["simulate:", "s.h5: 100 frames of 128 x 128 px need 0.00328 GB, "
                                              "its folder has 0.001 GB free"])
    assert not (tmp_path / "s.h5").exists()
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000)")

    monkeypatch.setattr(simulators.dct_scan, "simulate_scan", no_memory)
    code = main(["simulate", str(tmp_path / "s.h5"), "--frames", "8", "--size", "128"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, 1, ["simulate: --size 128: frames of 128 x 128 px do not fit in this "
                                              "machine's memory (Unable to allocate 74.5 GiB"])


@pytest.mark.parametrize("args, needle", [
    (["--module-gap", "64"], "--module-gap 64: expected a gap narrower than half the frame (--size 128: under 64 px)"),
    (["--shutter-closed", "40"], "--shutter-closed 40: expected fewer frames without beam than the scan's (--frames 40)"),
])
def test_simulate_refuses_a_gap_or_closed_shutter_that_leaves_no_scan(args, needle, tmp_path, capsys):
    """A module gap as wide as the frame wrote frames of zeros only, a shutter closed for every frame frames
    without beam or spots, both said to hold the spots."""
    code = main(["simulate", str(tmp_path / "s.h5"), "--frames", "40", "--size", "128", *args])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, 2, [needle])
    assert not (tmp_path / "s.h5").exists()


def test_simulate_refuses_to_replace_a_file_that_is_no_simulation(tmp_path, capsys):
    """`simulate` onto a recorded scan file (a mistyped name) replaced it with a simulation, unsaid; an earlier
    simulation is replaced as before."""
    scan = tmp_path / "recorded.h5"
    with h5py.File(scan, "w") as f:
        f["1.1/measurement/marana"] = np.ones((3, 4, 4), np.uint16)
    before = scan.read_bytes()
    code = main(["simulate", str(scan), "--frames", "8", "--size", "32"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, 1, ["simulate:", "recorded.h5: exists and holds other data than a "
                                              "simulated scan (1.1, no ground_truth)"])
    assert scan.read_bytes() == before
    sim = tmp_path / "sim.h5"
    for seed in ("0", "1"):
        assert main(["simulate", str(sim), "--frames", "8", "--size", "32", "--spots", "3", "--seed", seed]) == 0


def test_a_key_set_twice_says_which_value_is_taken(capsys, caplog):
    """--set background.window=101 ... --set background.window=51: the last was taken, the first dropped unsaid
    (a YAML file's key given twice is refused)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dctstream"):
        assert main(["check", "--set", "background.window=101", "--set", "background.window=51",
                     "--set", "filter.median_size=3", "--set", "filter.median_size=3"]) == 0
    assert "window: 51" in capsys.readouterr().out
    assert "--set background.window=51 replaces --set background.window=101 (the key given twice)" in caplog.text
    assert "median_size" not in caplog.text  # the same value twice is nothing to say
