"""Scoring a spot table against a simulated scan's ground truth."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def inside(bbox, x, y) -> np.ndarray:
    if bbox is None:
        return np.zeros(np.shape(x), bool)
    x0, y0, w, h = bbox
    return (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)


def scored_at(truth: dict) -> dict:
    """Where each true spot is scored: its centroid, or, for a spot the direct beam partly hides, the
    centroid of its counts outside the beam -- all of it that any spot finder can see (a detection of
    that part is the spot, not a false one; its centroid error is against what is there to measure).
    Along psi, when the truth has ``frame_normalised``: the centroid of the counts over the source
    intensity of their frame (the spot's rocking curve, which a beam-normalised spot finder reports;
    a rippling source moves the raw counts' centroid by up to half a frame, not the spot)."""
    at = {axis: np.asarray(truth[axis], float) for axis in ("x", "y", "frame")}
    if "frame_normalised" in truth:
        at["frame"] = np.asarray(truth["frame_normalised"], float)
    if "visible_fraction" in truth:
        fraction = np.asarray(truth["visible_fraction"], float)
        cut = (fraction > 0) & (fraction < 1 - 1e-6)
        for axis in at:
            at[axis] = np.where(cut, truth["visible_" + axis], at[axis])
    return at


def merged_points(truth: dict, at: dict, period_frames: float | None = None,
                  apart: frozenset = frozenset()) -> tuple[dict, np.ndarray]:
    """The points a detection may match: each true spot's (``at``) and, after them, each group of spots
    merged into one (``merged_into``) at their combined centroid (their integral-weighted mean, psi taken
    next to the brightest's over a full turn) with their summed integral, less the spots ``apart`` (found
    on their own); and whose each point is."""
    n = len(truth["x"])
    integral = np.asarray(truth["integral"], float) if "integral" in truth else np.ones(n)
    points = {**at, "integral": integral}
    owner = np.arange(n)
    into = np.asarray(truth.get("merged_into", np.full(n, -1)))
    groups = np.unique(into[into >= 0])
    if not groups.size:
        return points, owner
    extra = {key: [] for key in points}
    for r in groups:
        members = np.array([r, *(m for m in np.flatnonzero(into == r) if m not in apart)], np.int64)
        w = integral[members]
        frame = at["frame"][members]
        if period_frames is not None:
            frame = frame - np.round((frame - at["frame"][r]) / period_frames) * period_frames
        extra["x"].append(w @ at["x"][members] / w.sum())
        extra["y"].append(w @ at["y"][members] / w.sum())
        combined = w @ frame / w.sum()
        extra["frame"].append(combined % period_frames if period_frames is not None else combined)
        extra["integral"].append(w.sum())
    points = {key: np.concatenate([points[key], extra[key]]) for key in points}
    return points, np.concatenate([owner, groups])


def _pieces(truth: dict, spots: dict, matched: set, period_frames: float | None) -> list[int]:
    """The unmatched detections that are a piece of a true spot which the direct beam partly hides: the
    detection says it touches the mask (``touches_mask``) and its centroid is on that spot's footprint
    (within half its extent in x and y, 3 sigma along psi). A spot whose visible part the mask cuts in
    two is seen, and reported as partial, twice; no tool can tell that both pieces are one spot."""
    if "touches_mask" not in spots or "visible_fraction" not in truth:
        return []
    fraction = np.asarray(truth["visible_fraction"], float)
    cut = np.flatnonzero((fraction > 0) & (fraction < 1 - 1e-6))
    out = []
    for i in np.flatnonzero(np.asarray(spots["touches_mask"], bool)):
        if i in matched or not cut.size:
            continue
        df = np.abs(spots["centroid_frame"][i] - truth["frame"][cut])
        if period_frames is not None:
            df = np.minimum(df, period_frames - df)
        on = ((np.abs(spots["centroid_x"][i] - truth["x"][cut]) <= truth["size_x"][cut] / 2)
              & (np.abs(spots["centroid_y"][i] - truth["y"][cut]) <= truth["size_y"][cut] / 2)
              & (df <= 3 * truth["sigma_frame"][cut]))
        if on.any():
            out.append(int(i))
    return out


def _match(points: dict, owner: np.ndarray, d: np.ndarray, tol_px: float, tol_frames: float,
           period_frames: float | None) -> tuple[set, dict, dict]:
    """Detections (``d``, scaled by the tolerances) to the spots owning ``points``, one-to-one, closest first:
    the detections used, each matched spot's detection and the point it matched."""
    t = np.stack([points["x"] / tol_px, points["y"] / tol_px, points["frame"] / tol_frames], axis=1)
    pairs = []
    if len(t) and len(d):
        tree = cKDTree(t)
        for shift in (0.0,) if period_frames is None else (0.0, period_frames, -period_frames):
            shifted = d + np.array([0.0, 0.0, shift / tol_frames])
            for i, js in enumerate(tree.query_ball_point(shifted, r=1.0)):
                pairs += [(float(np.linalg.norm(shifted[i] - t[j])), i, j) for j in js]
    pairs.sort()
    det_used, truth_of, point_of = set(), {}, {}
    for _, i, p in pairs:
        j = int(owner[p])
        if i not in det_used and j not in truth_of:
            det_used.add(i)
            truth_of[j], point_of[j] = i, p
    return det_used, truth_of, point_of


def score(truth: dict, spots: dict, *, direct_beam=None, snr_min: float = 5.0,
          tol_px: float = 2.0, tol_frames: float = 2.0, period_frames: float | None = None,
          in_beam: np.ndarray | None = None, measured_only: np.ndarray | None = None) -> dict:
    """Recall, precision and centroid errors of detected ``spots`` against ``truth``.

    A detection matches a true spot when its centroid is within ``tol_px`` in x
    and y and ``tol_frames`` along psi (an ellipsoid); pairs are made one-to-one,
    closest first. Recall counts the true spots with snr >= ``snr_min`` outside
    the masked direct beam; precision counts every detection against every true
    spot (a detection of a faint true spot is not a false one). ``in_beam``: which true spots
    the beam hides, when that is not one box for the whole scan (a beam that moves with psi).
    ``measured_only``: which true spots the errors and ratios are taken over, if found (two tools
    compared on the spots both found).

    A true spot that the direct beam partly hides is matched and measured at the centroid of its
    visible part (``visible_x``, ``_y``, ``_frame``, ``_fraction`` when the truth has them, see
    `scored_at`); whether it counts for recall still goes by its whole centroid, and its centroid and
    integral are not in the errors and ratios (``found_cut`` counts such spots found): they depend on
    how far around the beam each tool masks, and no tool can see the rest. A detection that is
    a second piece of such a spot, cut in two by the mask, is not false either (``pieces``, see `_pieces`).

    Spots that are one in the noiseless frames (``merged_into``: the brighter spot whose maximum a
    dimmer one shares, see `simulators.hard_scans.RESOLVE_SIGMAS`) are one spot to find: the dimmer
    ones are not asked for (``merged`` counts them), and a detection of the group -- at its spots'
    combined centroid and with their summed integral -- is the brighter one's. A detection of any of
    them on its own is not false, and takes that one out of the group: the group is then the rest
    (its detection measured against their combined centroid and summed integral).

    ``period_frames``: the scan is a full turn of that many frames, so frame
    n - 0.5 is 1 frame from frame 0.5 (matching and the psi error wrap).
    When both tables have an ``integral`` column, ``intensity_ratio_q25``,
    ``_median`` and ``_q75`` are the quartiles of detected / true integral over
    the true spots found.  ``truth_to_detection`` gives the detection matched
    to each true spot (-1 if none), ``piece_detections`` the pieces (see `_pieces`).
    """
    at = scored_at(truth)
    d = np.stack([spots["centroid_x"] / tol_px, spots["centroid_y"] / tol_px,
                  spots["centroid_frame"] / tol_frames], axis=1)
    merged = np.asarray(truth["merged_into"]) >= 0 if "merged_into" in truth else np.zeros(len(truth["x"]), bool)
    apart = frozenset()
    for _ in range(2):  # matched again, once, against the groups without the members found on their own
        points, owner = merged_points(truth, at, period_frames, apart)  # each spot's point, then each group's
        det_used, truth_of, point_of = _match(points, owner, d, tol_px, tol_frames, period_frames)
        apart = frozenset(j for j in truth_of if merged[j] and point_of[j] == j)
        if not apart:
            break
    pieces = _pieces(truth, spots, det_used, period_frames)
    hidden = inside(direct_beam, truth["x"], truth["y"]) if in_beam is None else np.asarray(in_beam, bool)
    eligible = (truth["snr"] >= snr_min) & ~hidden & ~merged
    found = [j for j in np.flatnonzero(eligible) if j in truth_of]
    # a spot the beam cuts is found, but what any tool measures of it depends on how much it masks
    cut = (np.asarray(truth["visible_fraction"]) < 1 - 1e-6) if "visible_fraction" in truth else np.zeros(len(hidden), bool)
    measured = [j for j in found if not cut[j] and (measured_only is None or measured_only[j])]
    errors = {}
    for axis, col in (("x", "centroid_x"), ("y", "centroid_y"), ("frame", "centroid_frame")):
        diff = np.array([spots[col][truth_of[j]] - points[axis][point_of[j]] for j in measured])
        if axis == "frame" and period_frames is not None and diff.size:
            diff = (diff + period_frames / 2) % period_frames - period_frames / 2
        errors[axis] = float(np.sqrt(np.mean(diff ** 2))) if diff.size else float("nan")
    intensity = {}
    if "integral" in truth and "integral" in spots:
        ratio = np.array([spots["integral"][truth_of[j]] / points["integral"][point_of[j]] for j in measured])
        q25, median, q75 = np.percentile(ratio, [25, 50, 75]) if ratio.size else (float("nan"),) * 3
        intensity = {"intensity_ratio_q25": float(q25), "intensity_ratio_median": float(median),
                     "intensity_ratio_q75": float(q75)}
    truth_to_detection = np.full(len(truth["x"]), -1, np.int64)
    for j, i in truth_of.items():
        truth_to_detection[j] = i
    return {
        "true_spots": int(len(truth["x"])),
        "eligible": int(eligible.sum()),
        "merged": int(merged.sum()),
        "found": len(found),
        "found_cut": int(sum(cut[j] for j in found)),
        "measured": len(measured),
        "recall": len(found) / max(int(eligible.sum()), 1),
        "detections": int(len(d)),
        "matched_detections": len(det_used) + len(pieces),
        "pieces": len(pieces),
        "precision": (len(det_used) + len(pieces)) / max(len(d), 1),
        "rms_x_px": errors["x"],
        "rms_y_px": errors["y"],
        "rms_frame": errors["frame"],
        **intensity,
        "truth_to_detection": truth_to_detection,
        "piece_detections": np.array(pieces, np.int64),
    }
