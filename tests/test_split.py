"""One scan split along psi over a LocalCluster of 2 worker processes: outputs identical to one process."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from dctstream import checkpoint, split
from dctstream.cli import main
from dctstream.config import load_config
from dctstream.errors import ConfigError, InputError
from dctstream.runner import process_scan
from simulators.dct_scan import simulate_scan
from test_resume import assert_same_outputs, outputs

distributed = pytest.importorskip("distributed")

FRAMES, SIZE = 160, 64
# max_blob_size 5 frames: a chunk's segmenter starts 28 frames before it, its edge is looked for over 18;
# export.format: sparse, the default
OVERRIDES = ["background.window=11", "segmentation.max_blob_size=[20,20,5]", "quicklook.enabled=false",
             "source.angles=auto", "dark.url=auto"]
EDGE = 80  # a chunk starts where a spot of several frames is brightest
SEAM_SPOT, EDGE_SPOT, TAIL_SPOT = (9, 9), (50, 12), (10, 52)  # (y, x)


def _add_spot(frames, centre_frame, yx, width_frames, peak=3000.0):
    n, ny, nx = frames.shape
    y, x = np.mgrid[0:ny, 0:nx]
    for k in range(n):
        d = min(abs(k - centre_frame), n - abs(k - centre_frame))  # along psi, across the seam too
        r2 = (x - yx[1]) ** 2 + (y - yx[0]) ** 2
        spot = peak * np.exp(-d ** 2 / (2 * width_frames ** 2) - r2 / (2 * 1.5 ** 2))
        frames[k] = np.clip(frames[k] + spot, 0, 65535).astype(frames.dtype)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A full turn of 160 frames with a spot across 0/360 degrees, one whose tail alone crosses it and one across
    frame EDGE."""
    path = tmp_path_factory.mktemp("split") / "scan.h5"
    simulate_scan(path, frames=FRAMES, size=SIZE, spots=40, seed=11)
    with h5py.File(path, "r+") as f:
        frames = f["/1.1/measurement/marana"][()]
        _add_spot(frames, FRAMES - 0.5, SEAM_SPOT, 0.8)
        _add_spot(frames, EDGE, EDGE_SPOT, 1.2)
        _add_spot(frames, 3.0, TAIL_SPOT, 1.6, 10000.0)
        f["/1.1/measurement/marana"][...] = frames
    return f"{path}::/1.1/measurement/marana"


def _cfg(scan, out, *more):
    return load_config(None, [f"source.url={scan}", f"output.dir={out}", *OVERRIDES, *more])


@pytest.fixture(scope="module")
def reference(scan, tmp_path_factory):
    """One process (which also compiles the kernels once, before the workers need them)."""
    out = tmp_path_factory.mktemp("reference")
    stats = process_scan(_cfg(scan, out), display=False)
    assert stats.seam_joined == 2 and stats.difspots_written > 20
    sparse = outputs(out)["sparse"]
    assert len(sparse["1.1/row"]) == len(sparse["1.1/unfiltered"]) > 0  # a sparse scan, with unfiltered values
    return out


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as c:
        yield c


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class InProcess:
    """A client that runs each task at once, in this process."""

    def submit(self, fn, *args, pure=None, key=None):
        return _Done(fn(*[a.result() if isinstance(a, _Done) else a for a in args]))


def _spots_across(out: Path, yx, frame: int) -> list[dict]:
    """The rows near (y, x) whose frames run from before ``frame`` to it or after."""
    with h5py.File(out / "spots.h5", "r") as f:
        spots = {k: v[()] for k, v in f["spots"].items()}
    i = np.flatnonzero((np.abs(spots["centroid_y"] - yx[0]) < 2) & (np.abs(spots["centroid_x"] - yx[1]) < 2)
                       & (spots["start_frame"] < frame) & (spots["end_frame"] >= frame))
    return [{k: v[j] for k, v in spots.items()} for j in i]


@pytest.mark.parametrize("parts,starts,chunks", [(2, None, 2), (3, [EDGE - 30, EDGE], 3), (6, None, 5)])
def test_split_scan_equals_one_process(scan, reference, client, tmp_path, parts, starts, chunks):
    out = tmp_path / "out"
    record = split.run_split(_cfg(scan, out), client, parts, starts=starts)
    assert_same_outputs(outputs(out), outputs(reference))
    info = record["split"]
    assert len(info["chunks"]) == chunks and info["rerun"] == 0  # 6: the first would start too early
    want = json.loads((reference / "run.json").read_text())
    for key in ("rejected", "noise_sigma_range", "noise_sigma_by_frame", "normalise", "seam_joined",
                "difspots_written", "seed_threshold", "flood_frames_total", "flooded_spots", "export_reduction",
                "sparse_cut", "sparse_fill_fraction", "sparse_bytes_per_frame"):
        assert record["stats"][key] == want["stats"][key], key
    assert record["state"] == "finished" and not (out / ".dctstream").exists()
    # the spot across 0/360 degrees is one, made of the first chunk's blob and the last one's
    assert len(_spots_across(out, SEAM_SPOT, FRAMES)) == 1
    if starts is not None:  # a spot lies across the edge where the chunks met
        assert info["edges"][1] == EDGE
        assert len(_spots_across(out, EDGE_SPOT, EDGE)) == 1


def test_stretched_sparse_scan_equals_one_process(scan, client, tmp_path):
    """export.dtype uint16: every chunk's values stretched by frame 0's percentiles, as one process does."""
    more = ["export.dtype=uint16"]
    one = tmp_path / "one"
    process_scan(_cfg(scan, one, *more), display=False)
    record = split.run_split(_cfg(scan, tmp_path / "out", *more), client, 2)
    got, want = outputs(tmp_path / "out"), outputs(one)
    assert want["sparse"]["1.1/intensity"].dtype == np.uint16
    assert_same_outputs(got, want)
    with h5py.File(one / "corrected.h5") as a, h5py.File(tmp_path / "out" / "corrected.h5") as b:
        assert dict(b.attrs) == dict(a.attrs) and "stretch_lo" in a.attrs
    assert record["stats"]["export_reduction"] == json.loads((one / "run.json").read_text())["stats"][
        "export_reduction"]


def test_killed_split_run_restarts_without_redoing_finished_chunks(scan, reference, client, tmp_path,
                                                                   monkeypatch):
    """The last chunk dies half-way (its blob file cut short): the run stops, unfinished; the same command
    again, on the cluster, takes the first task's result and the finished chunks from OUT/.dctstream/split
    and runs only that chunk, with outputs identical to one process's."""
    out = tmp_path / "out"
    cfg = _cfg(scan, out)
    starts = [EDGE - 30, EDGE]
    chunks = split.plan(FRAMES, 3, cfg, starts)
    last = chunks[-1]
    run_chunk = split.run_chunk

    def killed(cfg, ctx, chunk, spill, cores=1, beam=None):
        if chunk == last:
            Path(spill).write_bytes(b"\x80\x05 a blob file cut short")
            raise KeyboardInterrupt("killed")
        return run_chunk(cfg, ctx, chunk, spill, cores, beam)

    monkeypatch.setattr(split, "run_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        split.run_split(cfg, InProcess(), 3, starts=starts)
    monkeypatch.undo()
    done = sorted(p.name for p in (out / ".dctstream" / split.SPLIT_DIR).glob("*.done"))
    assert len(done) == 3 and split.CONTEXT_FILE in done  # the first task and the two chunks that finished
    assert checkpoint.marker_path(out).exists()  # an unfinished run
    (out / "difspots").mkdir(exist_ok=True)  # and what a merge killed half-way leaves
    (out / "difspots" / "000999.h5").write_bytes(b"cut short")
    (out / "corrected.h5").write_bytes(b"cut short")
    record = split.run_split(cfg, client, 3, starts=starts)
    info = record["split"]
    assert info["kept"] == [[c.start, c.end] for c in chunks[:2]] and info["kept_context"]
    assert_same_outputs(outputs(out), outputs(reference))
    assert record["state"] == "finished" and not (out / ".dctstream").exists()


def test_chunks_that_never_agree_are_run_as_one(scan, reference, tmp_path, monkeypatch):
    """A segmenter started 2 frames before its chunk cannot agree with the previous one at the chunk's first
    frame (regions across its start are cut): the edge moves on, or the two chunks run as one: exact anyway."""
    monkeypatch.setattr(split, "PRE_REACHES", 0)
    monkeypatch.setattr(split, "MARGIN_FRAMES", 2)
    monkeypatch.setattr(split, "POST_REACHES", 0)
    out = tmp_path / "out"
    record = split.run_split(_cfg(scan, out), InProcess(), 6)  # the constants above hold in this process
    assert_same_outputs(outputs(out), outputs(reference))
    assert record["split"]["rerun"] >= 1


def test_chunk_plan():
    cfg = load_config(None, OVERRIDES)
    pre, post = split.overlaps(cfg)
    assert (pre, post) == (28, 18)
    chunks = split.plan(160, 4, cfg)
    # 40 - 28 < 19: a segmenter started there would not have the noise of 15 frames before it
    assert [(c.start, c.end) for c in chunks] == [(0, 80), (80, 120), (120, 160)]
    for c, d in zip(chunks, chunks[1:]):
        assert c.seg_end == d.start + post and d.seg_start == d.start - pre
        assert list(d.lower) == list(range(d.start, d.start + post, split.FINGERPRINT_EVERY)) == list(c.upper)
    assert chunks[-1].seg_end == 160 and chunks[0].seg_start == 0
    assert [c.start for c in split.plan(160, 20, cfg)] == [0, 48, 72, 96, 120]  # chunks of at least 18 frames


def test_run_split_from_the_command_line(scan, reference, client, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--source", scan, "--out", str(out), "--split", "2", "--cluster", client.scheduler.address,
                 *[a for o in OVERRIDES for a in ("--set", o)]])
    assert code == 0, capsys.readouterr().err
    assert f"{FRAMES} frames in 2 chunks on {client.scheduler.address}" in capsys.readouterr().out
    assert_same_outputs(outputs(out), outputs(reference))


def test_cluster_options_need_split(tmp_path, capsys):
    assert main(["run", "--source", f"{tmp_path}/x.h5::/d", "--workers", "2"]) != 0
    assert "--split" in capsys.readouterr().err


def test_a_wrong_cluster_is_said_under_its_option(tmp_path, capsys):
    assert main(["run", "--source", f"{tmp_path}/x.h5::/d", "--split", "2", "--cluster", "foo"]) != 0
    err = capsys.readouterr().err
    assert "--cluster: cluster.kind: must be one of local" in err and "replace_config" not in err


def test_stack_export_refused_before_any_output(scan, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"export.format: stack: .* expected sparse .* or none"):
        split.run_split(_cfg(scan, out, "export.format=stack"), None, 2)
    assert not out.exists()


@pytest.mark.parametrize("order", ["interlaced", "back_and_forth"])
def test_a_scan_not_in_psi_order_is_refused_before_any_output(scan, tmp_path, order):
    """One process reads a recorded scan of passes in psi order; the chunks of a split run were cut in the order
    the frames were taken, and found every spot of two interlaced turns twice (63 spots for 32), unsaid."""
    path = Path(scan.split("::")[0])
    with h5py.File(path, "r") as f:
        frames, angles = f["/1.1/measurement/marana"][()], f["/1.1/measurement/diffrz"][()]
        dark = f["/2.1/measurement/marana"][()]
    n = len(angles)
    take = (np.r_[np.arange(0, n, 2), np.arange(1, n, 2)] if order == "interlaced"
            else np.r_[np.arange(0, n // 2), np.arange(n - 1, n // 2 - 1, -1)])
    other = tmp_path / "passes.h5"
    with h5py.File(other, "w") as f:
        f["/1.1/measurement/marana"] = frames[take]
        f["/1.1/measurement/diffrz"] = angles[take]
        f["/1.1/end_time"] = "2024-01-01T10:00:00"
        f["/2.1/measurement/marana"] = dark
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"passes.h5::/1.1/measurement/marana: the frames are not in psi order "
                                          r"\((2 passes|the angles turn back 1 time\)).*expected them in psi order to split .* run it in one process"):
        split.run_split(_cfg(f"{other}::/1.1/measurement/marana", out,
                             f"source.angles={other}::/1.1/measurement/diffrz"), None, 2)
    assert not out.exists()


@pytest.fixture(scope="module")
def moving_beam_scan(tmp_path_factory):
    """A beam that moves right by a fifth of the detector and grows over the scan (the validation's
    moving_beam scan, 3 times faster): its followed box changes several times in every chunk."""
    from simulators.hard_scans import HardScanModel, write_hard_scan

    path = tmp_path_factory.mktemp("moving") / "scan.h5"
    model = HardScanModel(frames=FRAMES, size=SIZE, spots=30, seed=5, beam_motion=(0.2, 0.0, 0.3, 0.1))
    write_hard_scan("moving_beam", path, model=model)
    return f"{path}::/1.1/measurement/marana"


def test_split_with_a_moving_beam_equals_one_process(moving_beam_scan, tmp_path):
    """The chunks after the first start from the first window's box; where the beam has moved by then, each
    is run again from the box the chunk before it reached, and the outputs are one process's."""
    one = tmp_path / "one"
    process_scan(_cfg(moving_beam_scan, one), display=False)
    want = json.loads((one / "run.json").read_text())["stats"]
    assert len(want["direct_beam_track"]) > 4  # it moved, in every chunk
    record = split.run_split(_cfg(moving_beam_scan, tmp_path / "out"), InProcess(), 3)
    assert_same_outputs(outputs(tmp_path / "out"), outputs(one))
    assert record["stats"]["direct_beam_track"] == want["direct_beam_track"]
    assert record["split"]["beam_rerun"] == 2


def test_split_flags_a_saturated_spot_as_one_process_does(scan, tmp_path):
    """The spot across the chunk edge EDGE saturated (its core at 65535 in 3 frames): flagged touches_mask by
    one process and by a split whose chunk starts there, the outputs otherwise one process's."""
    path = tmp_path / "saturated.h5"
    with h5py.File(scan.partition("::")[0], "r") as f, h5py.File(path, "w") as g:
        for name in f:
            f.copy(name, g)
        frames = g["/1.1/measurement/marana"]
        y, x = EDGE_SPOT
        for k in (EDGE - 1, EDGE, EDGE + 1):
            frame = frames[k]
            frame[y - 1:y + 2, x - 1:x + 2] = 65535
            frames[k] = frame
    url = f"{path}::/1.1/measurement/marana"
    one = tmp_path / "one"
    process_scan(_cfg(url, one), display=False)
    want = json.loads((one / "run.json").read_text())["stats"]
    assert want["saturated_pixels"] == 27
    assert [row["touches_mask"] for row in _spots_across(one, EDGE_SPOT, EDGE)] == [1]
    record = split.run_split(_cfg(url, tmp_path / "out"), InProcess(), 3, starts=[EDGE - 30, EDGE])
    assert_same_outputs(outputs(tmp_path / "out"), outputs(one))
    assert record["stats"]["saturated_pixels"] == 27
    # the sparse scan keeps them: a resegmentation flags the spot as its run did
    from dctstream.resegment import resegment
    from dctstream.sinks import read_spot_table

    resegment(one, (), tmp_path / "re")
    got, want = read_spot_table(tmp_path / "re" / "spots.h5"), read_spot_table(one / "spots.h5")
    np.testing.assert_array_equal(got["touches_mask"], want["touches_mask"])
    np.testing.assert_array_equal(got["centroid_x"], want["centroid_x"])


def test_scan_shorter_than_the_window_is_refused_with_the_window_named(scan, tmp_path):
    """One process fits the window to a scan shorter than it; a split says so rather than 'too few'."""
    with pytest.raises(InputError, match=r"160 frames, too few to split: expected more than background.window=201"):
        split.run_split(_cfg(scan, tmp_path / "out", "background.window=201"), InProcess(), 2)
