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


def test_errors_can_be_taken_over_the_spots_another_tool_also_found():
    truth = truth_table([10, 30, 50], [10] * 3, [20] * 3)
    found = detections([10.1, 30.0, 51.0], [10] * 3, [20.2, 20.0, 21.0], [1000.0, 1000.0, 500.0])
    both = np.array([True, True, False])  # the third, 1 px off, only this tool found
    alone, common = score(truth, found), score(truth, found, measured_only=both)
    assert alone["found"] == common["found"] == 3 and (alone["measured"], common["measured"]) == (3, 2)
    assert common["rms_x_px"] == pytest.approx(np.sqrt(0.1**2 / 2)) and alone["rms_x_px"] > 0.5
    assert common["rms_frame"] == pytest.approx(np.sqrt(0.2**2 / 2))
    assert common["intensity_ratio_q25"] == pytest.approx(1.0) and alone["intensity_ratio_q25"] < 1.0


def test_a_spot_the_beam_partly_hides_is_scored_where_its_visible_part_is():
    # spot 0: its centre in the beam, a third of it seen 12 px away; spot 1: half hidden, centre outside
    truth = truth_table([50, 80], [50, 20], [10, 30], visible_x=[62.0, 83.0], visible_y=[50.0, 20.0],
                        visible_frame=[10.0, 30.0], visible_fraction=[0.3, 0.5])
    found = detections([62.5, 83.2, 120.0], [50.0, 20.0, 20.0], [10.0, 30.1, 30.0], [300.0, 500.0, 9.0])
    result = score(truth, found, direct_beam=(40, 40, 20, 20))
    assert result["eligible"] == 1 and result["found"] == 1  # the hidden one is still not asked for
    assert result["matched_detections"] == 2 and result["precision"] == pytest.approx(2 / 3)  # 120 px: false
    assert result["found_cut"] == 1 and np.isnan(result["rms_x_px"])  # a cut spot is found, not measured
    assert list(result["truth_to_detection"]) == [0, 1]
    whole = score({k: v for k, v in truth.items() if not k.startswith("visible")}, found, direct_beam=(40, 40, 20, 20))
    assert whole["matched_detections"] == 0  # scored at the whole centroids, both detections were false


def test_a_second_piece_of_a_spot_the_beam_cuts_in_two_is_not_false():
    # the beam hides the middle of spot 0 (20 x 20 px): its visible part is seen as two pieces
    truth = truth_table([50], [50], [10], visible_x=[45.0], visible_y=[50.0], visible_frame=[10.0],
                        visible_fraction=[0.4], size_x=[20], size_y=[20])
    found = detections([44.5, 58.0, 58.0], [50.0, 52.0, 52.0], [10.0, 10.0, 10.0], [1.0, 1.0, 1.0])
    found["touches_mask"] = np.array([1, 1, 0])  # the last says it is whole: it is no piece of a cut spot
    result = score(truth, found, direct_beam=(48, 40, 4, 20))
    assert result["pieces"] == 1 and result["matched_detections"] == 2
    assert list(result["truth_to_detection"]) == [0]


def test_spots_merged_in_the_frames_are_one_spot_to_find():
    # spot 1 shares spot 0's maximum (merged_into 0): one group, found at the combined centroid
    truth = truth_table([10, 14, 60], [10, 10, 60], [20, 20, 40], merged_into=[-1, 0, -1])
    truth["integral"] = np.array([3000.0, 1000.0, 500.0])
    found = detections([11.1, 60.0], [10.0, 60.0], [20.0, 40.0], [4000.0, 500.0])
    result = score(truth, found, tol_px=1.0)
    assert (result["eligible"], result["found"], result["merged"]) == (2, 2, 1)
    assert result["precision"] == 1.0 and result["intensity_ratio_median"] == pytest.approx(1.0)
    assert result["rms_x_px"] == pytest.approx(np.sqrt(0.1 ** 2 / 2))  # against (3000 * 10 + 1000 * 14) / 4000
    alone = score(truth, detections([10.0, 14.0], [10.0, 10.0], [20.0, 20.0], [3000.0, 1000.0]), tol_px=1.0)
    assert alone["precision"] == 1.0 and alone["found"] == 1  # each found apart: neither is false


def test_a_spot_of_a_group_found_on_its_own_leaves_the_group():
    # spots 1 and 2 share spot 0's maximum; spot 2 is found on its own, 0 and 1 as one detection: that one is
    # measured against the combined centroid and summed integral of 0 and 1, not of all three
    truth = truth_table([10, 14, 22, 60], [10, 10, 10, 60], [20, 20, 20, 40], merged_into=[-1, 0, 0, -1])
    truth["integral"] = np.array([3000.0, 1000.0, 2000.0, 500.0])
    found = detections([11.0, 22.0, 60.0], [10.0, 10.0, 60.0], [20.0, 20.0, 40.0], [4000.0, 2000.0, 500.0])
    result = score(truth, found, tol_px=6.0)
    assert (result["found"], result["precision"]) == (2, 1.0)
    assert result["rms_x_px"] == pytest.approx(0.0, abs=1e-12)  # (3000 * 10 + 1000 * 14) / 4000 = 11
    assert result["intensity_ratio_median"] == pytest.approx(1.0)
    assert list(result["truth_to_detection"]) == [0, -1, 1, 2]
