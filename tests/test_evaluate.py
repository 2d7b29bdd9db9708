"""Scoring against the truth: matching across 0/360 deg and intensity ratios."""

from __future__ import annotations

import numpy as np
import pytest

from simulators.evaluate import score

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
