"""The Python API: dctstream.run against the command, dctstream.segment against both, reading results back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

import dctstream
from cli_util import cli
from dctstream.api import resolve_config
from dctstream.config import load_config
from dctstream.errors import ConfigError, InputError, OptionalDependencyError, OutputError
from dctstream.sinks import read_spot_table
from simulators.dct_scan import simulate_scan

# A scan long enough for several windows of the running median, small enough to process in about a second.
FRAMES, SIZE, SPOTS, SEED = 120, 128, 40, 2
SETTINGS = {"background.window": 31, "segmentation.max_blob_size": [30, 30, 10]}
SET_ARGS = ["--set", "background.window=31", "--set", "segmentation.max_blob_size=[30,30,10]"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The simulated scan and its frames, darks and angles in memory."""
    truth = simulate_scan(tmp_path_factory.mktemp("api_scan") / "scan.h5", frames=FRAMES, size=SIZE, spots=SPOTS,
                          seed=SEED)
    with h5py.File(truth.path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
        darks = f["/2.1/measurement/marana"][()]
        psi = f["/1.1/measurement/diffrz"][()]
    return truth, frames, darks, psi


@pytest.fixture(scope="module")
def runs(scan, tmp_path_factory):
    """The same scan processed by ``dctstream.run`` and by ``dctstream run``: (api Run, command's output folder)."""
    truth = scan[0]
    tmp = tmp_path_factory.mktemp("api_runs")
    run = dctstream.run(truth.frames_url, out=tmp / "api", dark=truth.dark_url, angles=truth.angles_url,
                        overrides=SETTINGS)
    proc = cli("run", "--source", truth.frames_url, "--dark", truth.dark_url, "--out", tmp / "cli",
               "--set", f"source.angles={truth.angles_url}", *SET_ARGS, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return run, tmp / "cli"


@pytest.fixture(scope="module")
def in_memory(scan):
    """``dctstream.segment`` over the scan's frames as one array, with the darks as an array."""
    truth, frames, darks, psi = scan
    return list(dctstream.segment(frames, psi, dark=darks, overrides=SETTINGS))


def test_run_gives_the_commands_spot_table(runs):
    run, cli_out = runs
    ours, theirs = read_spot_table(run.out / "spots.h5"), read_spot_table(cli_out / "spots.h5")
    assert list(ours) == list(theirs)
    assert len(ours["id"]) >= 20
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_open_run_reads_both_outputs(runs):
    run, cli_out = runs
    for out in (run.out, cli_out):
        opened = dctstream.open_run(out)
        table = read_spot_table(out / "spots.h5")
        assert opened.spots.dtype.names == tuple(table)
        for name, column in table.items():
            np.testing.assert_array_equal(opened.spots[name], column, err_msg=name)
        assert opened.record["state"] == "finished"
        assert opened.record["frames_processed"] == FRAMES
        assert opened.status()["state"] == "finished"
        assert opened.stats is None
    assert run.stats.difspots_written == len(run.spots)


def test_difspot_matches_its_file_and_row(runs):
    run = dctstream.open_run(runs[1])
    row = run.spots[len(run.spots) // 2]
    spot = run.difspot(int(row["id"]))
    with h5py.File(run.out / "difspots" / f"{row['id']:06d}.h5", "r") as h5:
        first = h5["BoundingBoxOriginSize"][0] - 1  # (frame, y, x), 1-based in the file
        np.testing.assert_array_equal(spot.volume, h5["Data"][()])
        np.testing.assert_array_equal(spot.voxels, h5["DataMasked"][()])
        assert h5["Area"][()] == spot.area == spot.mask.sum()
    assert spot.bbox[:3] == tuple(first)
    assert spot.bbox == (row["start_frame"], row["bbox_y0"], row["bbox_x0"], row["end_frame"],
                         row["bbox_y0"] + row["bbox_y_size"] - 1, row["bbox_x0"] + row["bbox_x_size"] - 1)
    assert spot.frames == range(row["start_frame"], row["end_frame"] + 1)
    assert spot.volume.shape == (len(spot.frames), row["bbox_y_size"], row["bbox_x_size"])
    assert spot.integral == row["integral"] and spot.psi_deg == row["centroid_psi_deg"]
    assert spot.max_index[0] == row["max_frame"]
    assert spot.max_value == spot.volume[tuple(np.subtract(spot.max_index, spot.bbox[:3]))]
    psi = 360.0 * np.arange(FRAMES) / FRAMES  # the simulator's angles
    assert spot.psi_range_deg == (psi[spot.bbox[0]], psi[spot.bbox[3]])
    np.testing.assert_allclose(spot.projection.sum(), spot.voxels.sum(), rtol=1e-5)
    assert spot.integral > 0  # the voxels and their tails (segment.segmenter)


def same_difspot(a: dctstream.Difspot, b: dctstream.Difspot) -> None:
    assert (a.id, a.bbox, a.area, a.integral, a.max_value, a.max_index, a.centroid, a.psi_deg, a.psi_range_deg) == \
           (b.id, b.bbox, b.area, b.integral, b.max_value, b.max_index, b.centroid, b.psi_deg, b.psi_range_deg)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_segment_in_memory_gives_the_runs_difspots(runs, in_memory):
    run = runs[0]
    assert [spot.id for spot in in_memory] == sorted(run.spots["id"])
    for spot in in_memory:
        same_difspot(spot, run.difspot(spot.id))


def test_segment_takes_float_frames_as_the_file_sources_do(scan, in_memory):
    """Float frames with fractions (a quarter count added to each) as a stack and as an iterable: rounded to
    whole counts (`sources.base.FloatCounts`), the spots those of the integer frames."""
    _, frames, darks, psi = scan
    floats = frames.astype(np.float32) + np.float32(0.25)
    for given in (floats, iter(floats)):
        spots = list(dctstream.segment(given, psi, dark=darks, overrides=SETTINGS))
        assert [s.id for s in spots] == [s.id for s in in_memory] and len(spots) >= 20
        for ours, theirs in zip(spots, in_memory):
            same_difspot(ours, theirs)


def test_segment_takes_any_iterable_and_a_dark_url(scan, in_memory):
    truth, frames, _, psi = scan
    handed_over = (frame.copy() for frame in frames)  # one at a time, length unknown
    again = list(dctstream.segment(handed_over, list(psi), dark=truth.dark_url,
                                   config=load_config(None, ["background.window=31"]),
                                   overrides=["segmentation.max_blob_size=[30,30,10]"]))
    assert len(again) == len(in_memory)
    for a, b in zip(again, in_memory):
        same_difspot(a, b)


def test_segment_takes_frames_that_are_views_of_another_array(scan, in_memory):
    """Frames that are not C-contiguous (a stack stored (x, y, frames) and transposed, every other column of a
    wider stack): a ValueError from the background kernel (``frame: expected a C-contiguous array``), with
    its traceback; now the spots of the same frames stored in order."""
    _, frames, darks, psi = scan
    transposed = np.ascontiguousarray(frames.transpose(2, 1, 0)).transpose(2, 1, 0)
    wider = np.zeros(frames.shape[:2] + (2 * frames.shape[2],), frames.dtype)
    wider[:, :, ::2] = frames
    for given in (transposed, wider[:, :, ::2], iter(transposed)):
        assert not given.flags.c_contiguous if isinstance(given, np.ndarray) else True
        spots = list(dctstream.segment(given, psi, dark=darks, overrides=SETTINGS))
        assert len(spots) == len(in_memory) >= 20
        for ours, theirs in zip(spots, in_memory):
            same_difspot(ours, theirs)


def test_segment_without_angles_has_no_psi(scan, in_memory):
    _, frames, darks, _ = scan
    spots = list(dctstream.segment(frames, dark=darks.mean(axis=0), overrides=SETTINGS))
    assert [s.bbox for s in spots] == [s.bbox for s in in_memory]
    assert all(s.psi_deg is None and s.psi_range_deg is None for s in spots)


def test_closing_segment_early_stops_the_pipeline(scan, caplog):
    """... and says nothing of results kept to be resumed: they were in a temporary folder, gone with it."""
    _, frames, darks, psi = scan
    spots = dctstream.segment(frames, psi, dark=darks, overrides=SETTINGS)
    first = next(spots)
    assert first.id == 0
    closer = threading.Thread(target=spots.close)
    closer.start()
    closer.join(60)
    assert not closer.is_alive()
    pipeline = {"dctstream-segment-api", "dctstream-read", "dctstream-segment", "dctstream-write"}
    assert not [t.name for t in threading.enumerate() if t.name in pipeline]
    assert not [r.message for r in caplog.records if "resumes it" in r.getMessage()]


def test_config_forms_give_the_same_config(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("background:\n  window: 31\n")
    expected = load_config(path, ["segmentation.max_blob_size=[30,30,10]", "output.dir=o"])
    forms = [(path, {"segmentation.max_blob_size": [30, 30, 10]}),
             (load_config(path), ["segmentation.max_blob_size=[30,30,10]"]),
             (None, {"background": {"window": 31}, "segmentation.max_blob_size": (30, 30, 10)})]
    for config, overrides in forms:
        assert resolve_config(config, overrides, {"output.dir": "o"}, "run()") == expected


@pytest.mark.parametrize("call, error, needles", [
    (lambda t, out: dctstream.run(t.frames_url, out=out, overrides={"background.windw": 3}), ConfigError,
     ["run(): overrides: background.windw: unknown key"]),
    (lambda t, out: dctstream.run(t.frames_url, out=out, overrides={"background.window": 4}), ConfigError,
     ["run(): overrides: background.window: must be odd and >= 3, got 4"]),
    (lambda t, out: dctstream.run(t.frames_url, out=out, config=42), ConfigError,
     ["run(): config: expected a YAML file path or a Config, got int"]),
    (lambda t, out: dctstream.run(t.frames_url, out=out, overrides="background.window=31"), ConfigError,
     ["expected a mapping"]),
    (lambda t, out: dctstream.run(t.path + "::/nothing", out=out), InputError, ["/nothing: no such dataset"]),
    (lambda t, out: dctstream.run(t.frames_url, out=out, dark=[1, 2]), ConfigError, ["run(): dark: expected"]),
    (lambda t, out: dctstream.open_run(out), InputError, ["no such folder, expected the output folder"]),
])
def test_errors_are_the_projects(scan, tmp_path, call, error, needles):
    with pytest.raises(error) as caught:
        call(scan[0], tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert not (tmp_path / "out").exists()  # nothing written before the input was checked


def test_run_refuses_a_folder_with_results(scan, runs):
    truth = scan[0]
    with pytest.raises(OutputError, match="already holds results"):
        dctstream.run(truth.frames_url, out=runs[1], dark=truth.dark_url, overrides=SETTINGS)


def test_open_run_of_a_scan_that_has_just_started(runs, tmp_path):
    (tmp_path / "run.json").write_text((runs[0].out / "run.json").read_text().replace('"finished"', '"running"'))
    run = dctstream.open_run(tmp_path)
    assert run.spots.size == 0 and "integral" in run.spots.dtype.names
    assert run.status()["state"] == "running"
    with pytest.raises(InputError, match="difspot 0: not in the spot table"):
        run.difspot(0)


def test_unknown_difspot_is_an_input_error(runs):
    with pytest.raises(InputError, match=r"difspot 99999: not in the spot table"):
        runs[0].difspot(99999)
    with pytest.raises(InputError, match=r"^difspot\('3'\): expected a whole-number difspot id, got str$"):
        runs[0].difspot("3")  # 'not in the spot table, expected one of its ids (0..47)' before


@pytest.mark.parametrize("frames, angles, dark, needle", [
    (np.zeros((4, 8), np.uint16), None, None, "frames: expected a 3-D stack (frames, y, x) of detector"),
    (np.zeros((4, 8, 8), np.complex64), None, None, "frames: expected a 3-D stack (frames, y, x) of detector"),
    (np.full((4, 8, 8), 0.5, np.float32), None, None, "frames: frame 0: expected detector counts, whole numbers, "
                                                      "got 0.5 at pixel (y, x) = (0, 0) of float32 frames, their noise"),
    ("scan.h5", None, None, "frames: expected an iterable of 2-D arrays"),
    (np.zeros((4, 8, 8), np.uint16), np.zeros(3), None, "angles: expected a 1-D array of at least 4 angles"),
    (np.zeros((4, 8, 8), np.uint16), [0, 1, np.nan, 3], None,
     "source.angles: segment(angles): frame 2: expected a finite angle"),
    (np.zeros((4, 8, 8), np.uint16), None, np.zeros((8, 9)), "dark: expected images of 8 x 8 pixels"),
    (np.zeros((4, 8, 8), np.uint16), None, np.zeros(8), "dark: expected a (y, x) image or an (n, y, x) stack"),
    # named the temporary file it was handed on in: dark.url: /tmp/dctstream-segment-.../dark.h5::/dark: ...
    (np.zeros((4, 8, 8), np.uint16), None, np.where(np.eye(8) > 0, np.inf, 0.0)[None].repeat(2, 0),
     "dark: expected finite dark counts (or NaN where a pixel has none), got inf at frame 0, pixel (y, x) = (0, 0)"),
])
def test_segment_checks_its_input_at_the_call(frames, angles, dark, needle):
    with pytest.raises(InputError) as caught:
        dctstream.segment(frames, angles, dark=dark)
    assert needle in str(caught.value)


def test_segment_names_the_frame_that_does_not_fit(scan):
    _, frames, darks, psi = scan
    bad = [*frames[:40], frames[40, :64], *frames[41:]]
    with pytest.raises(InputError, match=r"^frames: frame 40: expected \(128, 128\) of uint16 like the first"):
        list(dctstream.segment(bad, psi, dark=darks, overrides=SETTINGS))
    with pytest.raises(InputError, match=r"^angles: frame 50: no angle, expected one angle per frame, got 50"):
        list(dctstream.segment(iter(frames), psi[:50], dark=darks, overrides=SETTINGS))
    # a dark that does not fit frames handed over one by one is said when the first comes, of the array given
    # (it named the temporary file it is handed on in: dark.url: /tmp/dctstream-segment-.../dark.h5::/dark)
    with pytest.raises(InputError, match=r"^dark: expected a dark image of shape \(128, 128\) or a stack "
                                         r"\(n, 128, 128\) of dark frames, got shape \(2, 128, 120\)$"):
        list(dctstream.segment(list(frames), psi, dark=darks[:2, :, :120], overrides=SETTINGS))


def test_to_pandas(runs, monkeypatch):
    pd = pytest.importorskip("pandas")
    frame = runs[0].to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(runs[0].spots.dtype.names)
    np.testing.assert_array_equal(frame["integral"].to_numpy(), runs[0].spots["integral"])


def test_optional_packages_missing_say_so(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(OptionalDependencyError, match="Run.to_pandas: needs pandas"):
        runs[0].to_pandas()
    with pytest.raises(OptionalDependencyError, match="Run.plot_quicklook: needs matplotlib"):
        runs[0].plot_quicklook()


def test_plot_quicklook(runs):
    pytest.importorskip("matplotlib")
    run = runs[0]
    figures = run.plot_quicklook()
    assert set(figures) == {"detector", "spots_per_psi", "integrals", "max_projection"}
    dots = figures["detector"].axes[0].collections[0]
    np.testing.assert_array_equal(dots.get_offsets(), np.c_[run.spots["centroid_x"], run.spots["centroid_y"]])
    bars = figures["spots_per_psi"].axes[0].patches
    assert sum(bar.get_height() for bar in bars) == len(run.spots)


def test_segment_is_callable_after_the_segmenter_is_imported():
    import dctstream.segment  # noqa: F401  (the subpackage of the same name)

    assert callable(dctstream.segment)
    with pytest.raises(InputError, match="frames: expected an iterable"):
        dctstream.segment(3, None)


def test_a_packaged_config_is_named_by_its_name():
    from dctstream.api import resolve_config
    from dctstream.configs import names

    assert "default" in names()
    cfg = resolve_config("default", {"background.window": 101}, {}, "run()")
    assert cfg.source.angles == "auto" and cfg.background.window == 101  # the packaged default's own keys
    assert resolve_config(None, None, {}, "run()").source.angles is None  # the built-in defaults


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_between_kernels_unless_told_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", "import os, dctstream; print(os.environ['OMP_WAIT_POLICY'])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == expected, done.stderr


def test_arguments_of_the_wrong_type_are_one_line_errors(tmp_path):
    """What a notebook naturally passes: psi as an array, a number, None; raw TypeErrors and numpy's 'truth
    value of an array is ambiguous' before."""
    with pytest.raises(ConfigError, match=r"^run\(\): angles: expected a path or URL \(str\), got ndarray "
                                          r"\(dctstream.segment takes frames and angles as arrays\)$"):
        dctstream.run("scan.h5::/frames", out=tmp_path / "o", angles=np.arange(3.0))
    with pytest.raises(ConfigError, match=r"^run\(\): source: expected a path or URL \(str\), got int"):
        dctstream.run(123, out=tmp_path / "o")
    with pytest.raises(InputError, match=r"^open_run\(\): out: expected the path of a run's output folder, "
                                         r"got NoneType$"):
        dctstream.open_run(None)
    assert not (tmp_path / "o").exists()


def test_a_run_folder_without_its_record_still_gives_its_difspots(runs, tmp_path):
    """run.json lost (a folder copied without it): the spot table and the difspot files are read, without psi
    (difspot() stopped at the missing record before)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs[0].out, copy)
    (copy / "run.json").unlink()
    run = dctstream.open_run(copy)
    spot_id = int(run.spots["id"][0])
    got, want = run.difspot(spot_id), runs[0].difspot(spot_id)
    assert got.bbox == want.bbox and np.array_equal(got.volume, want.volume) and got.psi_range_deg is None


def test_run_without_a_config_finds_the_angles_and_dark_as_the_command_does(tiny_scan, tiny_overrides, tmp_path):
    """config=None took the built-in defaults, which find nothing in the scan's file: no dark, unsaid."""
    result = dctstream.run(tiny_scan.frames_url, out=tmp_path / "out", overrides=list(tiny_overrides))
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["dark"] == tiny_scan.dark_url and record["angles"] == tiny_scan.angles_url
    assert result.stats.difspots_written > 0
