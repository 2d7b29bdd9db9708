"""Scoring against the truth: matching across 0/360 deg, intensity ratios, and the validation table's extra counts."""

from __future__ import annotations

import numpy as np
import pytest

from simulators.dct_scan import ScanTruth
from simulators.evaluate import score
from simulators.validation import score_row, table_markdown

N = 100


def truth_table(x, y, frame, **extra) -> dict:
    n = len(x)
    columns = {"x": np.asarray(x, float), "y": np.asarray(y, float), "frame": np.asarray(frame, float),
               "snr": np.full(n, 50.0), "integral": np.full(n, 1000.0), "sigma_frame": np.ones(n)}
    columns.update({k: np.asarray(v) for k, v in extra.items()})
    return columns


def detections(x, y, frame, integral) -> dict:
    return {"centroid_x": np.asarray(x, float), "centroid_y": np.asarray(y, float),
            "centroid_frame": np.asarray(frame, float), "integral": np.asarray(integral, float)}


def test_a_spot_near_0_deg_matches_a_detection_near_360_only_over_a_full_turn():
    truth = truth_table([10, 50], [10, 50], [0.3, 50.0])
    found = detections([10.2, 50.0], [10.0, 50.1], [N - 0.2, 50.4], [900.0, 1100.0])
    flat = score(truth, found)
    turn = score(truth, found, period_frames=N)
    assert flat["found"] == 1 and flat["precision"] == 0.5
    assert turn["found"] == 2 and turn["precision"] == 1.0
    assert turn["rms_frame"] == pytest.approx(np.sqrt((0.5**2 + 0.4**2) / 2))
    assert list(turn["truth_to_detection"]) == [0, 1]


def test_intensity_ratio_quartiles_are_over_the_spots_found():
    truth = truth_table([10, 30, 50, 70], [10] * 4, [20] * 4)
    found = detections([10, 30, 50, 90], [10] * 4, [20] * 4, [500.0, 1000.0, 1500.0, 7.0])  # the last is false
    result = score(truth, found)
    assert result["intensity_ratio_median"] == pytest.approx(1.0)
    assert (result["intensity_ratio_q25"], result["intensity_ratio_q75"]) == pytest.approx((0.75, 1.25))


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
