"""Faults a review found in the pipeline, each shown by the test that failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.errors import InputError
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_spot_table
from dctstream.sources import FrameSource, Hdf5FileSource
from dctstream.types import Frame


def _config(scan, out, overrides, *more):
    return load_config(None, [f"source.url={scan.frames_url}", f"dark.url={scan.dark_url}", f"output.dir={out}",
                              *overrides, *more])


def _frames(scan, lost=(), no_angle_from=None):
    with Hdf5FileSource(scan.frames_url, scan.angles_url) as source:
        return [Frame(f.index, None if no_angle_from is not None and f.index >= no_angle_from else f.psi_deg,
                      None if f.index in lost else f.data.copy()) for f in source]


class ListSource(FrameSource):
    """Frames from a list, their shape known from the first, as a stream's; ``fail_at`` raises there
    (the process dies mid-scan).  Records whether it was closed."""

    end_reason = "series_end"
    rereadable = True

    def __init__(self, frames, fail_at=None):
        self.frames, self.fail_at, self.closed = frames, fail_at, False

    def __iter__(self):
        for frame in self.frames:
            if frame.index == self.fail_at:
                raise RuntimeError("the acquisition died")
            yield frame

    def close(self):
        self.closed = True


def test_angles_that_stop_before_the_frames_are_one_clear_error(tiny_scan, tiny_overrides, tmp_path):
    """Before: a bare ValueError from the spot table, at the first difspot after the angles stopped."""
    source = ListSource(_frames(tiny_scan, no_angle_from=25))
    pipeline = Pipeline(_config(tiny_scan, tmp_path / "out", tiny_overrides), source=source)
    with pytest.raises(InputError, match=r"^source.angles: frame 25: no rotation angle, expected one per frame "
                                         r"as frames 0 to 24 had"):
        pipeline.run()
    assert source.closed


def test_resume_is_exact_when_lost_frames_were_replaced(tiny_scan, tiny_overrides, tmp_path):
    """source.missing: repeat-background puts a background frame in place of a lost one; made from the frames
    before it, it differs when a resumed run has fewer of those.  Before: other difspots after resuming, and
    lost frames counted twice."""
    lost = (6, 17, 18, 23, 31)
    settings = (*tiny_overrides, "source.missing=repeat-background", "output.checkpoint_every_frames=5",
                "segmentation.seed_threshold=40")
    frames = _frames(tiny_scan, lost)
    whole = Pipeline(_config(tiny_scan, tmp_path / "whole", settings), source=ListSource(frames)).run()

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="the acquisition died"):
        Pipeline(_config(tiny_scan, out, settings), source=ListSource(frames, fail_at=33)).run()
    resumed = Pipeline(_config(tiny_scan, out, settings), source=ListSource(frames))
    assert resumed.resuming
    stats = resumed.run()

    assert stats.frames_missing == whole.frames_missing == len(lost)
    expected, got = read_spot_table(tmp_path / "whole" / "spots.h5"), read_spot_table(out / "spots.h5")
    assert len(expected["id"]) == whole.difspots_written > 3
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_the_source_is_closed_when_the_run_fails_before_it_starts(tiny_scan, tiny_overrides, tmp_path,
                                                                  monkeypatch):
    """Between opening the scan and running it, the runner builds the quick-look pictures and the display;
    before: a failure there left the source open (a live file held, a stream's socket bound)."""
    import dctstream.pipeline as pipeline_module
    import dctstream.runner as runner

    source = ListSource(_frames(tiny_scan))
    monkeypatch.setattr(pipeline_module, "open_source", lambda cfg: source)

    def no_pictures(*args, **kwargs):
        raise OSError("no font")

    monkeypatch.setattr(runner, "QuickLook", no_pictures)
    cfg = _config(tiny_scan, tmp_path / "out", tiny_overrides, "quicklook.enabled=true")
    with pytest.raises(OSError, match="no font"):
        runner.process_scan(cfg, display=False)
    assert source.closed


def test_the_source_is_closed_once_on_every_way_a_run_ends(tiny_scan, tiny_overrides, tmp_path):
    closes = []

    class Counted(ListSource):
        def close(self):
            closes.append(1)

    frames = _frames(tiny_scan)
    pipeline = Pipeline(_config(tiny_scan, tmp_path / "ok", tiny_overrides), source=Counted(frames))
    pipeline.run()
    pipeline.end("finished")  # again, as the runner does
    assert len(closes) == 1
    pipeline = Pipeline(_config(tiny_scan, tmp_path / "failed", tiny_overrides), source=Counted(frames, fail_at=20))
    with pytest.raises(RuntimeError):
        pipeline.run()
    assert len(closes) == 2
