"""The catalogue of bad inputs: each one gets a one-line error naming the file, field or frame and what was
expected, or a documented recovery that is logged.

Where each kind of bad input is tested:

* ``CASES``: a ``dctstream run`` command line that must fail with one ``dctstream: error:`` line and an exit
  code (2 for configuration errors, 1 for the rest). Each case runs twice: in a subprocess (as a user or a
  service runs it) and in-process through ``dctstream.cli.main``. A case that fails before the scan is read
  leaves its folder as it was; one that fails mid-scan (``MID_SCAN``) leaves only whole, readable files.
* ``RECOVERIES``: inputs that are processed anyway, with a warning that says what was done.
* Stream messages (wrong size, unknown encoding, not JSON/CBOR, a frame unlike the series): skipped with a
  warning naming the frame; the frame's good copy is used. Files of a folder that change shape or dtype, and
  an HDF5 file truncated or replaced while it is followed: one-line errors naming the file.
* Fuzzing: Hypothesis-made HDF5 inputs through the whole pipeline, and malformed Stream v1 / Stream2 messages
  through a live source, never raise anything but a ``DctStreamError`` (the decoders alone are fuzzed in
  ``test_sources_stream.py``).

Faults of the world (disk full, output not writable, silent source) are in ``test_faults.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cbor2
import fabio.tifimage
import h5py
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_util import assert_one_line_error, cli, snapshot
from dctstream.cli import main
from dctstream.config import SourceConfig, load_config
from dctstream.errors import DctStreamError, InputError
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_spot_table
from dctstream.sources.folder import FolderSource
from dctstream.sources.hdf5_live import Hdf5WatchSource
from dctstream.sources.stream import Stream1Source, Stream2Source

# -- command lines that must fail with one line --------------------------------------------------------


@dataclass
class Ctx:
    """What a case may use: the good scan, the file of bad datasets, and its own empty folder (the cwd)."""

    scan: object  # ScanTruth
    bad: Path
    dir: Path

    @property
    def out(self) -> str:
        return str(self.dir / "out")

    def write(self, name: str, text: str) -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)


def _fake_results(ctx) -> bool:
    (ctx.dir / "out").mkdir()
    ctx.write("out/spots.h5", "spots.h5 of a previous run")
    return True


def _frames(ctx):
    return ["--source", ctx.scan.frames_url, "--out", ctx.out]


def _bad_frames(ctx, name):
    return ["--source", f"{ctx.bad}::/{name}", "--out", ctx.out]


_NO_NOISE = ["have no noise after background correction", "expected detector counts with noise",
             "set a number of counts"]

# name -> ctx -> (argv after "dctstream", exit code, strings the error line must contain)
CASES = {
    # -- the scan
    "missing_scan_file": lambda c: (
        # a scan file that never appears (a live source waits for it that long)
        ["run", "--source", f"{c.dir}/nofile.h5::/1.1/measurement/marana", "--out", c.out,
         "--set", "source.idle_timeout_s=0.5"], 1,
        ["source.url", f"{c.dir}/nofile.h5", "file not found", "expected"]),
    "missing_dataset": lambda c: (
        ["run", "--source", f"{c.scan.path}::/nope", "--out", c.out], 1,
        ["source.url", f"{c.scan.path}::/nope", "no such dataset", "expected a dataset", "its root holds: 1.1, 2.1"]),
    "dataset_mistyped_in_its_group": lambda c: (
        ["run", "--source", f"{c.scan.path}::/1.1/measurement/nothere", "--out", c.out],
        InputError.exit_code,  # the file's root before, not where the name was mistyped
        ["source.url", "no such dataset", "(/1.1/measurement holds: ", "marana"]),
    # a file named alone is a DCT dataset file: it must hold a rotation scan
    "url_without_separator": lambda c: (
        ["run", "--source", str(c.bad), "--out", c.out], 1,
        [str(c.bad), "no rotation scan in this file", "name the frames as"]),
    "url_without_separator_not_a_file": lambda c: (
        ["run", "--source", c.scan.path + ".missing", "--out", c.out], 1,
        [c.scan.path, "expected a URL of the form path/to/file.h5::/path/to/dataset"]),
    "group_not_dataset": lambda c: (
        ["run", "--source", f"{c.scan.path}::/1.1/measurement", "--out", c.out], 1,
        ["source.url", f"{c.scan.path}::/1.1/measurement", "is a group", "expected a dataset", "marana"]),
    "frames_2d": lambda c: (
        ["run", *_bad_frames(c, "two_d")], 1,
        ["source.url", f"{c.bad}::/two_d", "expected a 3-D stack of frames", "got shape (64, 64)"]),
    "frames_4d": lambda c: (
        ["run", *_bad_frames(c, "four_d")], 1,
        ["source.url", f"{c.bad}::/four_d", "expected a 3-D stack of frames", "got shape (2, 3, 64, 64)"]),
    "frames_float": lambda c: (
        ["run", *_bad_frames(c, "float_frames")], 1,
        [f"{c.bad}::/float_frames", "frame 0", "expected detector counts, whole numbers",
         "got 0.5 at pixel (y, x) = (0, 0) of float32 frames"]),
    "frames_bool": lambda c: (
        ["run", *_bad_frames(c, "bool_frames")], 1,
        [f"{c.bad}::/bool_frames", "expected integer detector counts", "bool"]),
    "frames_none": lambda c: (
        ["run", *_bad_frames(c, "no_frames")], 1,
        [f"{c.bad}::/no_frames", "expected at least 1 frame", "(0, 64, 64)"]),
    "frames_all_zero": lambda c: (
        ["run", *_bad_frames(c, "zeros")], 1, ["source.url", f"{c.bad}::/zeros", "frames 0 to 4", *_NO_NOISE]),
    "frames_saturated": lambda c: (
        ["run", *_bad_frames(c, "saturated")], 1, ["source.url", f"{c.bad}::/saturated", *_NO_NOISE]),
    "scan_of_one_frame": lambda c: (
        ["run", *_bad_frames(c, "one_frame")], 1,
        ["source.url", f"{c.bad}::/one_frame", "frames 0 to 0", "fewer than 3 frames", *_NO_NOISE]),
    "frames_corrupted_chunk": lambda c: (
        ["run", *_bad_frames(c, "corrupt_chunk")], 1,
        ["source.url", f"{c.bad}::/corrupt_chunk", "frame 7: cannot read", "expected a readable frame"]),
    # -- the dark
    "dark_wrong_shape": lambda c: (
        ["run", *_frames(c), "--dark", f"{c.bad}::/dark_small"], 1,
        ["dark.url", f"{c.bad}::/dark_small", "(64, 64)", "got shape (3, 32, 32)"]),
    "dark_missing_dataset": lambda c: (
        ["run", *_frames(c), "--dark", f"{c.bad}::/nope"], 1,
        ["dark.url", f"{c.bad}::/nope", "no such dataset"]),
    "dark_text": lambda c: (
        ["run", *_frames(c), "--dark", f"{c.bad}::/dark_text"], 1,
        ["dark.url", f"{c.bad}::/dark_text", "expected numeric"]),
    "dark_scalar_text": lambda c: (  # a scan's title, say: h5py reads it as bytes, not an array
        ["run", *_frames(c), "--dark", f"{c.bad}::/title"], 1,
        ["dark.url", f"{c.bad}::/title", "expected numeric dark counts"]),
    "dark_empty_stack": lambda c: (
        ["run", *_frames(c), "--dark", f"{c.bad}::/dark_empty"], 1,
        ["dark.url", f"{c.bad}::/dark_empty", "expected at least 1 dark frame"]),
    "dark_inf": lambda c: (  # NaN: a pixel without a dark, masked (tests/test_detector.py)
        ["run", *_frames(c), "--dark", f"{c.bad}::/dark_inf"], 1,
        ["dark.url", f"{c.bad}::/dark_inf", "expected finite dark counts (or NaN where a pixel has none), got inf at "
                                            "frame 1, pixel (y, x) = (2, 3)"]),
    # -- the angles
    "angles_wrong_length": lambda c: (
        ["run", *_frames(c), "--set", f"source.angles={c.bad}::/angles_short"], 1,
        ["source.angles", f"{c.bad}::/angles_short", "at least 40 angles", "(10,)"]),
    "angles_text": lambda c: (
        ["run", *_frames(c), "--set", f"source.angles={c.bad}::/angles_text"], 1,
        ["source.angles", f"{c.bad}::/angles_text", "angles in degrees", "dtype |S1"]),
    "angles_scalar_text": lambda c: (
        ["run", *_frames(c), "--set", f"source.angles={c.bad}::/title"], 1,
        ["source.angles", f"{c.bad}::/title", "at least 40 angles", "got shape ()"]),
    "angles_nan": lambda c: (
        ["run", *_frames(c), "--set", f"source.angles={c.bad}::/angles_nan"], 1,
        ["source.angles", f"{c.bad}::/angles_nan", "frame 7: expected a finite angle in degrees, got nan"]),
    "angles_missing": lambda c: (
        ["run", *_frames(c), "--set", f"source.angles={c.bad}::/no_angles"], 1,
        ["source.angles", f"{c.bad}::/no_angles", "no such dataset"]),
    # -- the configuration
    "config_bad_value": lambda c: (
        ["run", c.write("bad_value.yml", "background:\n  window: 4\n"), *_frames(c)], 2,
        [f"{c.dir}/bad_value.yml: background.window: must be odd and >= 3, got 4"]),
    "config_unknown_key": lambda c: (
        ["run", c.write("unknown.yml", "background:\n  windw: 11\n"), *_frames(c)], 2,
        [f"{c.dir}/unknown.yml: background.windw: unknown key", "window"]),
    "config_wrong_type": lambda c: (
        ["run", *_frames(c), "--set", "background.window=abc"], 2,
        ["--set: background.window: must be an integer, got abc"]),
    "config_impossible_sizes": lambda c: (
        ["run", *_frames(c), "--set", "segmentation.min_blob_size=[30,30,30]"], 2,
        ["segmentation.max_blob_size: must be >= segmentation.min_blob_size [30, 30, 30]"]),
    "config_negative_threshold": lambda c: (
        ["run", *_frames(c), "--set", "segmentation.seed_threshold=-3"], 2,
        ["segmentation.seed_threshold: must be > 0 or auto, got -3"]),
    "config_yaml_syntax": lambda c: (
        ["run", c.write("syntax.yml", "background:\n  window: [11\n"), *_frames(c)], 2,
        [f"{c.dir}/syntax.yml: line 3: invalid YAML"]),
    "config_missing_file": lambda c: (
        ["run", f"{c.dir}/missing.yml", *_frames(c)], 2,
        [f"{c.dir}/missing.yml: cannot read config file"]),
    "config_is_the_scan": lambda c: (
        ["run", c.scan.path, *_frames(c)], 2,
        [f"{c.scan.path}: cannot read config file", "UTF-8"]),
    "set_without_equals": lambda c: (
        ["run", *_frames(c), "--set", "background.window11"], 2,
        ["--set", "section.key=value", "background.window11"]),
    "bbox_outside_frame": lambda c: (
        ["run", *_frames(c), "--set", "direct_beam.bbox=[50,0,20,10]"], 2,
        ["direct_beam.bbox", "[50, 0, 20, 10]", "outside the frame of 64 x 64"]),
    "margin_without_beam": lambda c: (
        ["run", *_frames(c), "--set", "direct_beam.bbox=none", "--set", "background.normalise=margin"], 2,
        ["background.normalise", "direct_beam.bbox", "margin"]),
    "no_source": lambda c: (["run"], 2, ["source.url", "--source"]),
    # -- the output
    "output_is_a_file": lambda c: (
        ["run", "--source", c.scan.frames_url, "--out", c.write("a_file", "not a folder")], 1,
        [f"{c.dir}/a_file", "cannot create the output folder"]),
    "output_holds_results": lambda c: (
        ["run", *_frames(c)] if _fake_results(c) else None, 1, [c.out, "already holds results", "--overwrite"]),
    "scan_in_the_output_as_an_output": lambda c: (  # --overwrite would set the scan aside with the results
        ["run", "--source", f"{_copied_into_out(c, 'spots.h5')}::/1.1/measurement/marana", "--out", c.out,
         "--overwrite"], 2,
        ["source.url", "lies in the output folder", "as spots.h5", "--overwrite sets aside"]),
}


def _copied_into_out(ctx, name: str) -> str:
    (ctx.dir / "out").mkdir()
    shutil.copy(ctx.scan.path, ctx.dir / "out" / name)
    return str(ctx.dir / "out" / name)

# Cases found out only once frames are read: the output folder exists by then.
MID_SCAN = {"frames_all_zero", "frames_saturated", "scan_of_one_frame", "frames_corrupted_chunk"}


def _runs(test) -> int:
    """How many cases pytest runs ``test`` with (its parametrize marks multiplied)."""
    n = 1
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            n *= len(mark.args[1])
    return n


def test_the_catalogue_is_long_enough():
    """At least 25 distinct bad inputs, each run by a test (counted from the tests, not by hand)."""
    tables = [set(CASES), set(RECOVERIES), set(STREAM_MESSAGES)]
    assert len(set.union(*tables)) == sum(map(len, tables))  # no case counted twice
    run = (_runs(test_bad_input_main) + _runs(test_recovery_is_logged) + _runs(test_bad_stream_message_is_skipped_and_logged)
           + _runs(test_folder_frame_unlike_the_first) + _runs(test_hdf5_file_written_anew_mid_scan))
    assert run == sum(map(len, tables)) + 7  # + folder shape, dtype, 5 ways a followed file is written anew
    assert run >= 25


def _case(name, scan, bad, folder: Path, tiny_overrides):
    folder.mkdir(parents=True)
    ctx = Ctx(scan, bad, folder)
    args, code, needles = CASES[name](ctx)
    # The tiny-scan settings come last, but do not override what a case sets on purpose.
    set_keys = {a.split("=")[0] for a in args if "=" in a}
    extra = [arg for o in tiny_overrides if o.split("=")[0] not in set_keys for arg in ("--set", o)]
    if name == "no_source":
        extra = []  # `dctstream run` with the defaults, nothing else
    return ctx, [*args, *extra], code, needles, snapshot(folder)


def _check_folder(name, ctx, before):
    if name not in MID_SCAN:
        assert snapshot(ctx.dir) == before, "a failed run changed its folder"
        return
    # the run stopped mid-scan: whatever it left is whole, the table matches the difspot files, and the
    # run is marked unfinished (the same command resumes it once the input is fixed)
    out = Path(ctx.out)
    assert not list(out.rglob(".*.tmp"))
    assert (out / ".dctstream" / "running").exists()
    table = read_spot_table(out / "spots.h5")
    assert sorted(p.name for p in (out / "difspots").iterdir()) == [f"{i:06d}.h5" for i in sorted(table["id"])]


@pytest.fixture(scope="module")
def subprocess_results(tiny_scan, bad_inputs, tiny_overrides, tmp_path_factory):
    """Every case run once as ``python -m dctstream``, a few at a time (each is mostly start-up)."""
    root = tmp_path_factory.mktemp("cli_cases")
    cases = {name: _case(name, tiny_scan, bad_inputs, root / name, tiny_overrides) for name in CASES}

    def run(item):
        name, (ctx, args, code, needles, before) = item
        return name, (ctx, args, code, needles, before, cli(*args, cwd=ctx.dir))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, cases.items()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_subprocess(name, subprocess_results):
    ctx, args, code, needles, before, proc = subprocess_results[name]
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, code, needles)
    _check_folder(name, ctx, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_main(name, tiny_scan, bad_inputs, tiny_overrides, tmp_path, monkeypatch, capsys):
    ctx, args, code, needles, before = _case(name, tiny_scan, bad_inputs, tmp_path / "case", tiny_overrides)
    monkeypatch.chdir(ctx.dir)
    rc = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, code, needles)
    _check_folder(name, ctx, before)


# -- inputs that are processed anyway, with a warning ----------------------------------------------------

# name -> (frames dataset, angles dataset or None, strings the warning must contain)
RECOVERIES = {
    "scan_shorter_than_window": ("short", None, ["the scan has 5 frames, fewer than background.window=11",
                                                 "using a window of 5 frames (a pixel lit in 3 or more of them, a "
                                                 "spot's rocking curve that long, is taken for background)"]),
    "angles_not_monotonic": (None, "angles_back", ["angles_back: the frames are not in psi order",
                                                   "frame 8 goes back from 8 to 7 degrees", "read in psi order"]),
    "angles_repeated": (None, "angles_repeat", ["angles_repeat: frame 8 repeats the angle of frame 7",
                                                "kept as recorded"]),
}


@pytest.mark.parametrize("name", sorted(RECOVERIES))
def test_recovery_is_logged(name, tiny_scan, bad_inputs, tiny_overrides, tmp_path, caplog):
    frames, angles, needles = RECOVERIES[name]
    url = f"{bad_inputs}::/{frames}" if frames else tiny_scan.frames_url
    overrides = [f"source.url={url}", f"output.dir={tmp_path / 'out'}", *tiny_overrides]
    if angles:
        overrides.append(f"source.angles={bad_inputs}::/{angles}")
    with caplog.at_level(logging.WARNING, "dctstream"):
        stats = Pipeline(load_config(None, overrides)).run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(all(n in w for n in needles) for w in warnings), warnings
    table = read_spot_table(tmp_path / "out" / "spots.h5")
    assert table["id"].size == stats.difspots_written
    if angles:  # psi is read from the angles as recorded
        with h5py.File(bad_inputs, "r") as f:
            psi = f[angles][()]
        if name == "angles_not_monotonic":  # read in psi order: the frames count along the sorted angles
            psi = np.sort(psi, kind="stable")
        np.testing.assert_allclose(table["centroid_psi_deg"],
                                   np.interp(table["centroid_frame"], np.arange(psi.size), psi))


def test_uint32_frames_give_the_results_of_uint16(tiny_scan, bad_inputs, tiny_overrides, tmp_path):
    """Wider integers where uint16 was expected are counts all the same: the same difspots come out."""
    tables = []
    for url in (tiny_scan.frames_url, f"{bad_inputs}::/uint32"):
        out = tmp_path / url.rsplit("/", 1)[1]
        Pipeline(load_config(None, [f"source.url={url}", f"output.dir={out}", *tiny_overrides])).run()
        tables.append(read_spot_table(out / "spots.h5"))
    assert tables[0]["id"].size > 0
    for column in tables[0]:
        np.testing.assert_array_equal(tables[0][column], tables[1][column], err_msg=column)


# -- stream messages ------------------------------------------------------------------------------------

FRAME = np.arange(12, dtype=np.uint16).reshape(3, 4)


def _v1(*parts):
    return [json.dumps(p).encode() if isinstance(p, dict) else p for p in parts]


def _v1_image(k, data=FRAME, *, size=None, encoding="<", type_="uint16", shape=None, blob=None):
    ny, nx = data.shape
    return _v1({"htype": "dimage-1.0", "series": 1, "frame": k},
               {"htype": "dimage_d-1.0", "shape": shape or [nx, ny], "type": type_, "encoding": encoding,
                "size": data.nbytes if size is None else size},
               data.tobytes() if blob is None else blob)


def _v2_image(k, payload):
    return cbor2.dumps({"type": "image", "series_id": 1, "series_unique_id": "u", "image_id": k,
                        "data": {"threshold_1": payload}})


def _v2_array(data):
    return cbor2.CBORTag(40, [list(data.shape), cbor2.CBORTag(69, data.tobytes())])


# name -> (protocol, the bad message for frame 1, strings the warning must contain)
STREAM_MESSAGES = {
    "stream1_wrong_size": ("stream1", _v1_image(1, blob=FRAME.tobytes()[:10]),
                           ["(frame 1) skipped", "data part has 10 bytes"]),
    "stream1_unknown_encoding": ("stream1", _v1_image(1, encoding="zip<"),
                                 ["(frame 1) skipped", "unknown encoding 'zip<'"]),
    "stream1_wrong_type": ("stream1", _v1_image(1, type_="float32"), ["(frame 1) skipped", "type must be one of"]),
    "stream1_not_json": ("stream1", [b"\xff{not json", b"x", b"y"], ["skipped", "is not JSON"]),
    "stream1_shape_changes": ("stream1", _v1_image(1, np.zeros((4, 3), np.uint16)),
                              ["(frame 1) skipped", "frame shape (4, 3) (y, x) unlike the series' (3, 4)"]),
    "stream2_not_cbor": ("stream2", b"\xff\x00garbage", ["skipped", "not CBOR"]),
    "stream2_wrong_size": ("stream2", _v2_image(1, cbor2.CBORTag(40, [[3, 4], cbor2.CBORTag(69, b"\0" * 10)])),
                           ["(frame 1) skipped"]),
    "stream2_float_array": ("stream2", _v2_image(1, cbor2.CBORTag(40, [[3, 4], cbor2.CBORTag(85, b"\0" * 48)])),
                            ["(frame 1) skipped", "integer typed array"]),
}


def _series(protocol, bad, n=3):
    """A series of ``n`` frames with ``bad`` sent just before frame 1's good message."""
    if protocol == "stream1":
        start = _v1({"htype": "dheader-1.0", "series": 1, "header_detail": "none"})
        images = [_v1_image(k, FRAME + k) for k in range(n)]
        end = _v1({"htype": "dseries_end-1.0", "series": 1})
    else:
        start = cbor2.dumps({"type": "start", "series_id": 1, "series_unique_id": "u"})
        images = [_v2_image(k, _v2_array(FRAME + k)) for k in range(n)]
        end = cbor2.dumps({"type": "end", "series_id": 1, "series_unique_id": "u"})
    return [start, images[0], *([bad] if bad is not None else []), *images[1:], end]


def _send_all(protocol, messages, **cfg):
    """Every frame a live source yields from ``messages`` (sent in order), and the source."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind("inproc://bad")
    source_cls = Stream1Source if protocol == "stream1" else Stream2Source
    try:
        with source_cls(SourceConfig(url="inproc://bad", **{"idle_timeout_s": 2, **cfg}), context=context) as source:
            for message in messages:
                (push.send_multipart if isinstance(message, list) else push.send)(message)
            return list(source), source
    finally:
        push.close()
        context.term()


@pytest.mark.parametrize("name", sorted(STREAM_MESSAGES))
def test_bad_stream_message_is_skipped_and_logged(name, caplog):
    protocol, bad, needles = STREAM_MESSAGES[name]
    with caplog.at_level(logging.WARNING, "dctstream.sources.stream"):
        frames, source = _send_all(protocol, _series(protocol, bad))
    assert [f.index for f in frames] == [0, 1, 2]
    for f in frames:
        np.testing.assert_array_equal(f.data, FRAME + f.index)
    assert source.counters["malformed"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(all(n in w for n in needles) for w in warnings), warnings


# -- folders and files that change under the reader ---------------------------------------------------


@pytest.mark.parametrize("third, got", [
    (np.zeros((5, 4), np.uint16), "got (5, 4) of uint16"),
    (np.zeros((4, 5), np.uint32), "got (4, 5) of uint32"),
], ids=["shape_changes_mid_scan", "dtype_changes_mid_scan"])
def test_folder_frame_unlike_the_first(tmp_path, third, got):
    for number in range(4):
        data = third if number == 2 else np.full((4, 5), number, np.uint16)
        fabio.tifimage.TifImage(data=data).write(str(tmp_path / f"img_{number}.tif"))
    with FolderSource(SourceConfig(url=f"{tmp_path}/img_*.tif", expected_frames=4, idle_timeout_s=5)) as source:
        delivered = []
        with pytest.raises(InputError) as err:
            for frame in source:
                delivered.append(frame.index)
    assert delivered == [0, 1]
    message = str(err.value)
    assert "\n" not in message
    for needle in (f"{tmp_path}/img_2.tif", "expected a (4, 5) frame of uint16 like the first one", got):
        assert needle in message, message


def _write_anew(path: Path, frames: np.ndarray, *, moved: bool) -> None:
    """A new acquisition under the name: another file moved there, or the file truncated and written again."""
    with h5py.File(path.with_name("new.h5"), "w") as f:
        f["data"] = frames
    if moved:
        os.replace(path.with_name("new.h5"), path)
    else:  # the same inode, truncated and written again (as by another process: h5py's "w" where this one has it open)
        shutil.copyfile(path.with_name("new.h5"), path)


@pytest.mark.parametrize("how", ["moved_shorter", "moved_longer", "rewritten_shorter", "rewritten_as_long",
                                 "rewritten_longer"])
def test_hdf5_file_written_anew_mid_scan(tmp_path, how, caplog, monkeypatch):
    """A followed file written anew mid-scan ends the scan where it was, incomplete (``replaced``): no frame of the
    new acquisition is mixed in, however many frames it holds (a shorter one was an error, the run failed)."""
    path = tmp_path / "live.h5"
    frames = np.arange(10 * 12, dtype=np.uint16).reshape(10, 3, 4)
    other = frames[::-1] + 1000
    with h5py.File(path, "w") as f:
        f["data"] = frames
    n_new = {"moved_shorter": 3, "moved_longer": 10, "rewritten_shorter": 3, "rewritten_as_long": 9,
             "rewritten_longer": 10}[how]
    if how == "rewritten_longer":  # the same inode, as long at the next look: told by frame 0, looked at again
        monkeypatch.setattr("dctstream.sources.hdf5_live.FIRST_FRAME_CHECK_S", 0.0)
    # the old file lists 10 frames, 9 readable (the last is read once the next is listed or the writer is gone):
    # the new one is written once frame 8, the last readable, is delivered, before the source looks again
    cfg = SourceConfig(url=f"{path}::/data", protocol="hdf5-live", idle_timeout_s=5, poll_interval_s=0.05)
    with caplog.at_level(logging.WARNING), Hdf5WatchSource(cfg) as source:
        delivered = []
        for frame in source:
            np.testing.assert_array_equal(frame.data, frames[frame.index])  # never the new file's
            delivered.append(frame.index)
            if frame.index == 8:
                _write_anew(path, other[:n_new], moved=how.startswith("moved"))
    assert delivered == list(range(9))
    assert source.end_reason == "replaced" and source.n_frames == 9
    why = {"moved_shorter": "another file was moved to its name", "moved_longer": "another file was moved to its name",
           "rewritten_shorter": "the dataset now holds 3 frames, fewer than the 9 already read",
           "rewritten_as_long": "the file shrank, its frame 0 is not the one read",
           "rewritten_longer": "looked at again, its frame 0 is not the one read"}[how]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{path}::/data: written anew after 9 frames ({why}): a new acquisition under the same name? The scan ends "
        "there (the new file's frames are not mixed in)"]


def test_a_followed_file_that_shrinks_with_its_frames_the_same_is_followed_on(tmp_path, caplog):
    """A file a little shorter at a look (a writer trims its end when it closes it) is the same scan when its frame 0
    is: read on to its end."""
    path = tmp_path / "live.h5"
    frames = np.arange(10 * 12, dtype=np.uint16).reshape(10, 3, 4)
    with h5py.File(path, "w") as f:
        f["data"] = frames
    size = path.stat().st_size
    with open(path, "ab") as f:  # bytes past the end of an HDF5 file's data: read as the same file
        f.write(bytes(4096))
    cfg = SourceConfig(url=f"{path}::/data", protocol="hdf5-live", idle_timeout_s=1, poll_interval_s=0.05)
    with caplog.at_level(logging.WARNING), Hdf5WatchSource(cfg) as source:
        delivered = []
        for frame in source:
            delivered.append(frame.index)
            if frame.index == 8:
                os.truncate(path, size)
    assert delivered == list(range(10)) and source.end_reason == "idle_timeout"
    assert not [r for r in caplog.records if "written anew" in r.getMessage()]


# -- fuzzing ---------------------------------------------------------------------------------------------

_DTYPES = ["uint8", "uint16", "int16", "uint32", "int32", "int64", "float32", "float64", "bool", "S2", "complex64"]


@st.composite
def hdf5_inputs(draw):
    """A dataset of any rank, dtype and content, perhaps chunked and compressed and with a broken chunk."""
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    data = np.frombuffer(raw.tobytes(), dtype).reshape(shape)
    chunked = ndim >= 1 and min(shape, default=0) > 0 and draw(st.booleans())
    corrupt = chunked and draw(st.booleans())
    return data, chunked, corrupt, draw(st.sampled_from(["exact", "block"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hdf5_inputs())
def test_hdf5_inputs_never_crash(tmp_path, given_input):
    data, chunked, corrupt, mode = given_input
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by the examples
    path = folder / "scan.h5"
    with h5py.File(path, "w") as f:
        kw = {"chunks": (1, *data.shape[1:]), "compression": "gzip"} if chunked else {}
        f.create_dataset("frames", data=data, **kw)
        info = f["frames"].id.get_chunk_info(0) if corrupt else None
    if info is not None:
        with open(path, "r+b") as raw:
            raw.seek(info.byte_offset)
            raw.write(b"\xff" * min(info.size, 16))
    cfg = load_config(None, [f"source.url={path}::/frames", f"output.dir={folder / 'out'}", "source.protocol=hdf5",
                             "background.window=3", f"background.mode={mode}", "background.stride=2",
                             "segmentation.max_blob_size=[4,4,3]", "segmentation.min_blob_size=[1,1,1]",
                             "direct_beam.bbox=none"])
    try:
        Pipeline(cfg, overwrite=True).run()
    except DctStreamError as exc:
        assert "\n" not in str(exc)


def _fuzz_v1_message(draw):
    k = draw(st.integers(-2, 4))
    head = draw(st.fixed_dictionaries({"htype": st.sampled_from(["dimage-1.0", "dheader-1.0", "dseries_end-1.0",
                                                                  "bogus"]),
                                       "series": st.one_of(st.just(1), st.integers(), st.text(max_size=3)),
                                       "frame": st.one_of(st.just(k), st.none(), st.text(max_size=2))}))
    detail = draw(st.fixed_dictionaries({
        "htype": st.just("dimage_d-1.0"),
        "shape": st.one_of(st.just([4, 3]), st.lists(st.integers(-1, 5), max_size=3)),
        "type": st.sampled_from(["uint16", "uint32", "float32", "x"]),
        "encoding": st.sampled_from(["<", "lz4<", "bs16-lz4<", "bs32-lz4<", "?"]),
        "size": st.one_of(st.just(24), st.integers(-1, 100))}))
    blob = draw(st.one_of(st.just((FRAME + 1).tobytes()), st.binary(max_size=40)))
    parts = [json.dumps(head).encode(), json.dumps(detail).encode(), blob]
    return parts[:draw(st.integers(1, 3))] if draw(st.booleans()) else parts


@st.composite
def v1_series(draw):
    bad = [_fuzz_v1_message(draw) for _ in range(draw(st.integers(1, 4)))]
    return draw(st.permutations(bad + [_v1_image(k, FRAME + k) for k in range(3)]))


@st.composite
def v2_series(draw):
    def payload():
        return st.one_of(st.builds(lambda: _v2_array(FRAME + 1)), st.binary(max_size=30), st.integers(),
                         st.builds(lambda t, b: cbor2.CBORTag(40, [[3, 4], cbor2.CBORTag(t, b)]),
                                   st.integers(60, 90), st.binary(max_size=30)))

    bad = draw(st.lists(st.one_of(
        st.binary(max_size=50),
        st.builds(lambda k, p: _v2_image(k, p), st.integers(-1, 4), payload()),
        st.builds(lambda t: cbor2.dumps({"type": t, "series_id": 1, "series_unique_id": "u"}),
                  st.sampled_from(["start", "end", "image", "calibration", 3]))), min_size=1, max_size=4))
    return draw(st.permutations(bad + [_v2_image(k, _v2_array(FRAME + k)) for k in range(3)]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["stream1", "stream2"]).flatmap(lambda p: st.tuples(st.just(p),
                                                                           v1_series() if p == "stream1"
                                                                           else v2_series())))
def test_malformed_stream_messages_never_crash_a_source(protocol_and_messages):
    protocol, messages = protocol_and_messages
    try:
        frames, source = _send_all(protocol, messages, idle_timeout_s=0.2)
    except DctStreamError as exc:
        assert "\n" not in str(exc)
        return
    for frame in frames:  # whatever came through is a frame of the series' shape, in order
        assert frame.data is None or frame.data.shape == FRAME.shape
    assert [f.index for f in frames] == list(range(len(frames)))
