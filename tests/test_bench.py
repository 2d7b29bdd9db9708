"""`dctstream bench` on tiny frames: the report holds what it promises (speed itself is not tested)."""

import json
import math
import os
import resource
import subprocess
import sys

import pytest

from cli_util import assert_one_line_error
from dctstream.bench import BenchOptions, SyntheticScan, bench_sources, format_report, run_bench
from dctstream.cli import main
from dctstream.pipeline import FRAME_QUEUE_DEPTH, SEGMENT_QUEUE_DEPTH


def test_report_of_stages_and_pipeline():
    opts = BenchOptions(size=64, window=11, frames=40, batch=4)
    report = run_bench(opts)
    threads = [r["threads"] for r in report["running_median"]]
    assert threads[0] == 1 and threads[-1] == report["cores"]
    for r in report["running_median"]:
        assert r["frames_per_s"] > 0 and r["partition_exact_frames_per_s"] > 0
        assert r["bottleneck_frames_per_s"] is None or r["bottleneck_frames_per_s"] > 0
    p = report["pipeline"]
    assert p["frames"] == 51
    assert set(p["stage_frames_per_s"]) == {"read", "background", "segment", "write", "export"}
    # measured, not a formula: never less than the background stage holds back (a frame is corrected once half
    # a window after it is in), never more than that plus what the bounded queues between the threads hold
    assert p["latency_frames_background"] == 11 // 2 + 4 - 1
    assert (p["latency_frames_background"] <= p["latency_frames"]
            <= p["latency_frames_background"] + SEGMENT_QUEUE_DEPTH + FRAME_QUEUE_DEPTH + 2)
    assert p["difspots"] > 0 and p["peak_rss_gib"] > p["ring_gib"] > 0
    # the process's CPU over the run, all threads: at most what its cores had in that wall time
    assert 0 < p["cpu_ms_per_frame"] * p["frames"] / 1000 <= 1.05 * p["wall_s"] * report["cores"]
    assert p["cpu_busy"] == pytest.approx(p["cpu_ms_per_frame"] * p["frames"] / 1000 / p["wall_s"] / report["cores"])
    ms = p["stage_ms_per_frame"]
    assert set(ms) == set(p["stage_frames_per_s"]) and p["bound_by"] == max(ms, key=ms.get)
    r = p["resegment"]  # the same settings from the sparse scan: the same difspots
    assert r["frames"] == 51 and r["difspots"] == r["table_only_difspots"] == p["difspots"] and r["wall_s"] > 0
    assert r["cpu_s"] > 0 and r["table_only_cpu_s"] > 0
    assert 0 < r["sparse_bytes_per_frame"] < r["raw_frame_bytes"] and 0 < r["sparse_fill_fraction"] < 1
    text = format_report(report)
    assert "whole pipeline" in text and "running median" in text and "resegment from the sparse scan" in text
    assert f"CPU: {p['cpu_ms_per_frame']:.0f} ms a frame, all threads: " in text
    bound = next(line for line in text.splitlines() if "<- the slowest" in line)
    assert bound.split()[:2] == [p["bound_by"], f"{ms[p['bound_by']]:.2f}"]


def test_json_report(capsys):
    assert main(["bench", "--size", "64", "--window", "11", "--frames", "20", "--batch", "2",
                 "--no-pipeline", "--no-baselines", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["window"] == 11 and "pipeline" not in report
    assert all(math.isfinite(r["frames_per_s"]) for r in report["running_median"])


@pytest.mark.parametrize("rates", [(100.0,)])
def test_source_latency_for_every_live_source(tmp_path, rates):
    report = bench_sources(SyntheticScan(64), tmp_path, rates=rates, n=8)
    assert set(report) == {f"{name} @ 100 fps" for name in
                           ("hdf5-swmr", "hdf5-no-swmr", "edf-folder", "stream1", "stream2")}
    for name, r in report.items():
        assert r["frames"] == 8, name
        # delivered after written (the two clocks agree), and soon: the file sources look every 0.1 s and take a
        # frame once the next is written (10 ms at 100 fps); 3 s is 30 looks, a loaded 2-core box included
        assert 0 <= r["median_ms"] <= r["p99_ms"] < 3000, name


def test_soak_report(capsys):
    """A short soak: the pipeline keeps up with a slow acquisition, memory and backlog are sampled."""
    assert main(["bench", "--soak", "--size", "64", "--window", "11", "--frames", "60", "--fps", "30",
                 "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["soak"]
    assert s["frames"] == 60 and s["fps"] == 30
    assert s["duration_s"] >= s["acquisition_s"] - 1 / 30  # paced: no faster than the acquisition
    assert s["samples"] >= 1
    for point in ("start", "middle", "end"):
        assert s[point]["rss_mib"] > 10 and s[point]["backlog_frames"] >= 0
    assert 0 <= s["max_backlog_frames"] <= 60 and s["rss_max_mib"] >= s["end"]["rss_mib"]
    text = format_report(report)
    assert "dctstream bench --soak: 60 frames of 64 x 64" in text and "max backlog" in text


def test_baselines_take_every_pixel_of_the_ring_frames_they_name(monkeypatch):
    """Measured on the whole frames, the window's frames in order (a partition per block of rows), never
    on a few rows projected to the frame."""
    import numpy as np

    from dctstream import bench

    opts = BenchOptions(size=150, window=5, stride=2)  # 150 rows: blocks of 64, 64 and 22
    ring = np.arange(7 * 150 * 3, dtype=np.uint16).reshape(7, 150, 3)
    seen = []
    real = np.partition

    def partition(a, kth, axis):
        seen.append(a.copy())
        return real(a, kth, axis=axis)

    monkeypatch.setattr(bench.np, "partition", partition)
    result = bench.bench_baselines(ring, first=9, opts=opts, threads=2)  # frames 9..15: slots 2..6, 0, 1
    blocks = sorted(seen, key=lambda a: a[0, 0, 0])
    assert [b.shape for b in blocks] == [(5, 64, 3), (5, 64, 3), (5, 22, 3)]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), ring[[2, 3, 4, 5, 6]])
    assert result["partition_block_frames_per_s"] == pytest.approx(2 * result["partition_exact_frames_per_s"])
    assert result["baseline_threads"] == 2


def test_a_full_disk_while_writing_the_bench_scan_is_one_line(tmp_path):
    """The bench writes its scan in a child process; a full disk (here a file-size limit) there ended in the
    child's traceback and a RuntimeError's: now one line naming the file, why, and the scan's size."""
    limit = 200 * 1024  # the scan: 41 frames of 64 x 64 uint16, 336 kB
    done = subprocess.run([sys.executable, "-m", "dctstream", "bench", "--size", "64", "--window", "21", "--frames",
                           "20", "--no-baselines"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line_error(done.returncode, done.stdout, done.stderr, 1,
                          ["bench.h5: cannot write output, File too large", "the bench scan (41 frames of 64 x 64"])


def test_a_runs_phases_are_told_apart_by_when_each_push_returned():
    from dctstream.bench import _phases, format_phases

    # 12 frames, window 5: pushes 0-3 fill the ring but one, push 4 completes the window and segments its first
    # half (frames 0-2) before it returns, pushes 5-11 slide it (frames 3-9), the run's end segments the last
    # half-window (frames 10 and 11)
    ticks = [0.1, 0.2, 0.3, 0.4, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.9]
    ph = _phases(ticks, 12, 5)
    assert ph["first_window_s"] == 0.4 and ph["first_window_frames"] == 4
    assert ph["first_half_s"] == pytest.approx(1.0) and ph["first_half_frames"] == 3
    assert ph["sliding_s"] == pytest.approx(0.7) and ph["sliding_frames"] == 7
    assert ph["last_half_s"] == pytest.approx(0.8) and ph["last_half_frames"] == 2
    assert ph["first_half_frames"] + ph["sliding_frames"] + ph["last_half_frames"] == 12
    assert "first half-window, 3 in 1.0 s (3.0/s)" in format_phases(ph)[0]
    assert _phases(ticks[:5], 4, 5) is None  # a scan shorter than its window never slides
