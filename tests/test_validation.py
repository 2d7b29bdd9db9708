"""The validation table: its extra counts, and `dctstream validate` passing its options on."""

from __future__ import annotations

import numpy as np
import pytest

from dctstream.cli import main
from simulators.dct_scan import ScanTruth
from simulators.hard_scans import scan_model
from simulators.validation import common_markdown, score_row, table_markdown
from test_evaluate import N, detections, truth_table


def test_score_row_counts_pairs_found_apart_and_spots_cut_at_0_360():
    # Spots 0 and 1 touch (a pair); spot 2 crosses 0/360 deg and is found twice, once on each side.
    truth = ScanTruth(path="", frames_url="", angles_url="", dark_url="", direct_beam_bbox=(0, 0, 0, 0),
                      spots=truth_table([20, 24, 60], [20, 20, 60], [30, 30, 0.2], partner=[1, 0, -1],
                                        crosses_wrap=np.array([0, 0, 1], np.uint8)))
    found = detections([22, 60, 60.3], [20, 60, 60], [30, 1.1, N - 1.2], [2000.0, 600.0, 400.0])
    row = score_row(truth, found, N, tol_px=2.0)
    assert (row["pairs"], row["pairs_both_found"]) == (1, 0)
    assert (row["crossing"], row["crossing_found"], row["crossing_split"]) == (1, 1, 1)
    assert row["false_by_tenth"][0] + row["false_by_tenth"][9] == 1
    text = table_markdown([{"scan": "toy", "tool": "dctstream", "fps": 10.0, "score": row}])
    assert "touching pairs both found 0/1" in text and "cut in two 1" in text


def test_tools_are_also_compared_on_the_spots_both_found():
    truth = ScanTruth(path="", frames_url="", angles_url="", dark_url="", direct_beam_bbox=(0, 0, 0, 0),
                      spots=truth_table([20, 60, 100], [20] * 3, [30] * 3))
    ours = detections([20.0, 60.0, 101.0], [20] * 3, [30.0, 30.0, 31.0], [1000.0] * 3)
    peer = detections([20.2, 60.2], [20] * 2, [30.5, 30.5], [500.0] * 2)  # misses the third, the hardest
    both = np.ones(3, bool)
    for table in (ours, peer):
        both &= np.isin(np.arange(3), score_row(truth, table, N, tol_px=2.0)["found_spots"])
    assert both.tolist() == [True, True, False]
    rows = [{"scan": "toy", "tool": tool, "score_common": score_row(truth, table, N, tol_px=2.0, measured_only=both)}
            for tool, table in (("dctstream", ours), ("ImageD11", peer))]
    assert "| toy | dctstream | 2 | 0.000 | 0.000 | 1.000 |" in common_markdown(rows)
    assert "| toy | ImageD11 | 2 | 0.141 | 0.500 | 0.500 |" in common_markdown(rows)


def test_dctstream_validate_passes_its_options_to_the_validation(capsys, monkeypatch):
    assert main(["validate", "--scans", "clean,bogus"]) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err
    assert main(["validate", "--scans", "clean", "--shape", "600x2048"]) == 2
    assert "--shape: expected FRAMES,SIZE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dctstream validate")
    asked = {}
    monkeypatch.setattr("simulators.validation.validate", lambda **kw: asked.update(kw) or [])
    assert main(["validate", "--scans", "clean", "--shape", "600,2048", "--no-imaged11"]) == 0
    assert asked["shape"] == (600, 2048) and asked["scans"] == ["clean"] and not asked["imaged11"]


def test_fps_is_against_a_clean_scan_of_the_same_size_where_one_was_run():
    score = {"recall": 1.0, "precision": 1.0, "rms_x_px": 0.0, "rms_y_px": 0.0, "rms_frame": 0.0, "detections": 1,
             "matched_detections": 1, "found": 1, "eligible": 1}
    rows = [{"scan": "clean", "tool": "dctstream", "fps": 100.0, "score": score},
            {"scan": "polyxsim", "tool": "dctstream", "fps": 30.0, "score": score, "fps_clean": 40.0,
             "clean_scan": "clean (360 × 512²)"},
            {"scan": "topup", "tool": "dctstream", "fps": 80.0, "score": score}]
    lines = table_markdown(rows).splitlines()
    assert "| 30.0 (75 %) |" in lines[3] and "fps against clean (360 × 512²)" in lines[3]
    assert "| 80.0 (80 %) |" in lines[4]


def test_a_hard_scan_model_takes_another_size():
    model = scan_model("clean", frames=360, size=512)
    assert (model.frames, model.shape) == (360, (512, 512))
    assert scan_model("clean", quick=True).frames == 360 and scan_model("clean").shape == (512, 512)


def test_a_previous_output_is_set_aside_and_removed_once_the_table_is_made(tmp_path):
    from simulators.validation import OLD_OUTPUTS, set_aside, validate

    out = tmp_path / "out-scan"
    (out / "difspots").mkdir(parents=True)
    (out / "difspots" / "000000.h5").write_bytes(b"old")
    set_aside(out)
    assert not out.exists()
    (kept,) = (tmp_path / OLD_OUTPUTS).iterdir()
    assert (kept / "difspots" / "000000.h5").read_bytes() == b"old"
    set_aside(out)  # nothing there: nothing to do
    validate(quick=True, scans=["polyxsim"], work=tmp_path, imaged11=False)  # skipped: no scan, but it ends
    assert not (tmp_path / OLD_OUTPUTS).exists()


@pytest.mark.parametrize("name, script", [("independent", "benchmarks/independent_scan.py"),
                                          ("xrdsim", "benchmarks/xrdsim_scan.py")])
def test_a_row_of_spots_from_an_independent_model_says_how_to_make_them_when_they_are_absent(tmp_path, name, script):
    from simulators.validation import validate

    rows = validate(quick=True, scans=[name], work=tmp_path, imaged11=False)
    assert len(rows) == 1 and rows[0]["error"].startswith(f"skipped: no {tmp_path / f'{name}-spots-quick.h5'}")
    assert f"{script} --quick --out {tmp_path / f'{name}-spots-quick.h5'}" in table_markdown(rows)
