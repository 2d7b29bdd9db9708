"""The validation table: dctstream at default settings, and ImageD11's peak search, on hard scans.

    python benchmarks/validate.py [--quick] [--scans topup,grains] [--work DIR] [--markdown FILE]
    dctstream validate ...    (the same)

Each scan of `simulators.hard_scans.SCANS` is generated into ``--work`` (kept:
a file is named by the scan, its size and a hash of the simulator's source, so
it is made again only when those change), then

* **dctstream** runs as a new user would, with only the frames, the angles and
  the dark given: ``python -m dctstream run dctstream/configs/default.yml --source F
  --set source.angles=A --dark D --out OUT --overwrite`` (the code beside this
  module; without the config file when it is not there, i.e. installed);
  fps is frames processed / elapsed seconds from ``OUT/run.json`` of a second run (the first compiles the
  numba kernels for that scan's dtypes and code paths);
* **ImageD11** (``ImageD11.labelimage``, the per-frame labelling merged over
  omega, when ImageD11 is importable) runs on the same frames, background
  subtracted as its users do: the mean dark, then a per-pixel median of (up to)
  100 evenly spaced frames of the scan; a pixel is kept when above 6 x its own
  noise (1.4826 x the median absolute deviation over those frames, at least 1
  count), the true direct-beam box plus 10 px is masked, and peaks of fewer
  than 3 pixels (zingers) are dropped; fps is frames / wall seconds of all that.

Each row's fps is also given as a share of the same tool's on ``clean``; a scan of another size (``polyxsim``:
360 frames of 512 x 512 px) against a clean scan of its own size, run for it and shown as a row of its own.

Scoring (`simulators.evaluate.score`, psi wrapping over the full turn): a
detection matches a true spot within 2 px in x and y and 2 frames (4 px for
grain-shaped spots); recall counts the detectable spots -- peak >= 5 x the
raw noise, outside the true direct beam; precision counts every detection.
Centroid RMS is per axis over x and y; psi RMS in frames; intensity ratio is
detected / true integral (true: the spot's counts as drawn in the raw frames),
median and quartiles.  ``independent`` rows use the spots that
``benchmarks/independent_scan.py`` (pymicro's DCT forward model, in its own
venv) wrote to ``--work``/independent-spots[-quick].h5, with a rocking curve,
`ScanModel`'s background, a top-up and noise added by `simulators.hard_scans`;
skipped, saying why, when that file is not there; ``xrdsim`` rows likewise, with the spots that
``benchmarks/xrdsim_scan.py`` (xrd-simulator, in its own venv) wrote.  The ``polyxsim`` row scores
``--work``/polyxsim-scan.h5, PolyXSim's far-field frames over `ScanModel`'s
background, written by ``benchmarks/polyxsim_scan.py`` (its doc: how to run
PolyXSim, not part of this project); skipped likewise.
Not run by CI: minutes on 2 cores (``--quick``: 256 x 256 px, 360 frames).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from simulators.dct_scan import DARK_PATH, FRAMES_PATH, TRUTH_PATH
from simulators.evaluate import inside, score
from simulators.hard_scans import SCANS, independent_model, read_hard_truth, scan_model, write_hard_scan

ROOT = Path(__file__).resolve().parents[1]  # holds the dctstream and simulators packages

SNR_MIN = 5.0
TOL_FRAMES = 2.0
TOL_PX = {"gauss": 2.0, "grain": 4.0, "streak": 3.0}
BEAM_MASK_MARGIN_PX = 10
IMAGED11_SIGMA = 6.0
IMAGED11_MIN_PIXELS = 3
IMAGED11_BACKGROUND_FRAMES = 100
# Scans whose spots an independent physics model made (`benchmarks/*_scan.py`, each in its own venv): the file of
# its spots in --work (full, quick) and the script that writes it.
EXTERNAL_SPOTS = {
    "independent": ({False: "independent-spots.h5", True: "independent-spots-quick.h5"},
                    "benchmarks/independent_scan.py", "pymicro venv"),
    "xrdsim": ({False: "xrdsim-spots.h5", True: "xrdsim-spots-quick.h5"},
               "benchmarks/xrdsim_scan.py", "xrd-simulator venv"),
}
POLYXSIM_SCAN = "polyxsim-scan.h5"  # the same file for --quick: PolyXSim made its size


def _source_hash(*extra: Path) -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "simulators" / "hard_scans.py", ROOT / "simulators" / "dct_scan.py", *extra):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def scan_path(work: Path, name: str, *, quick: bool, seed: int, shape: tuple[int, int] | None = None) -> Path:
    """The scan's file in ``work``, generated first if it is not there; ``shape``: (frames, size) instead of the
    quick or full ones."""
    spots = [work / EXTERNAL_SPOTS[name][0][quick]] if name in EXTERNAL_SPOTS else []
    label = f"{shape[0]}x{shape[1]}" if shape else ("quick" if quick else "full")
    path = work / f"{name}-{label}-s{seed}-{_source_hash(*spots)}.h5"
    if not path.exists():
        t0 = time.monotonic()
        partial = path.with_suffix(".partial.h5")
        model = independent_model(spots[0], seed=seed) if spots else None
        if shape:
            model = scan_model(name, seed=seed, frames=shape[0], size=shape[1])
        write_hard_scan(name, partial, quick=quick, seed=seed, model=model)
        partial.rename(path)
        print(f"  generated {path.name} in {time.monotonic() - t0:.0f} s", flush=True)
    return path


def run_dctstream(path: Path, out: Path, *, timeout_s: float, code_root: Path = ROOT) -> tuple[dict | None, dict]:
    """dctstream (the package under ``code_root``) at default settings: its spot table (None if it failed)
    and what the run said."""
    url = f"{path}::{FRAMES_PATH}"
    # The packaged default file where the checkout has one (dctstream/configs/, formerly configs/);
    # without it the run gets the same defaults.
    found = [p for p in (code_root / "dctstream" / "configs" / "default.yml", code_root / "configs" / "default.yml")
             if p.exists()]
    config = [str(found[0])] if found else []
    cmd = [sys.executable, "-m", "dctstream", "run", *config, "--source", url,
           "--set", f"source.angles={json.dumps(f'{path}::/1.1/measurement/diffrz')}",
           "--dark", f"{path}::{DARK_PATH}", "--out", str(out), "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(code_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    set_aside(out)
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True, timeout=timeout_s)
        failed = done.returncode != 0 and f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout_s:.0f} s"
    wall = time.monotonic() - t0
    info = {"wall_s": wall, "error": failed or None}
    # The latest of the run record and the status snapshot (a run stopped by the timeout has only the latter).
    snapshots = [json.loads((out / name).read_text()) for name in ("run.json", "status.json") if (out / name).exists()]
    snapshots = [snap for snap in snapshots if (snap.get("stats") or {}).get("elapsed_s")]
    if snapshots:
        snapshot = max(snapshots, key=lambda snap: snap["stats"]["elapsed_s"])
        stats = snapshot["stats"]
        frames = stats.get("frames_segmented") or 0
        info.update(frames=frames, fps=frames / stats["elapsed_s"], rejected=stats.get("rejected"),
                    warnings=snapshot.get("warnings"), direct_beam=stats.get("direct_beam"),
                    seed_threshold=stats.get("seed_threshold"), noise_sigma=stats.get("noise_sigma"))
    if not failed and (out / "spots.h5").exists():
        from dctstream.sinks import read_spot_table

        return read_spot_table(out / "spots.h5"), info
    return None, info


def set_aside(out: Path) -> None:
    """Move a previous run's output into ``OLD_OUTPUTS`` beside it, removed once the table is made
    (`validate`): on ext4 without a journal (this project's test machines) a file made within a minute or more
    of thousands being deleted costs 0.6-0.9 ms where it costs 0.05-0.1 (the allocator passes over the
    recently deleted inodes), which ``--overwrite`` would charge to the fps of a scan with thousands of
    difspots (polyxsim: 3,316) and hardly to the clean scan's (216)."""
    if out.exists():
        old = out.parent / OLD_OUTPUTS
        old.mkdir(exist_ok=True)
        out.rename(old / f"{out.name}-{time.time_ns()}")


OLD_OUTPUTS = ".old-outputs"


def run_imaged11(path: Path, bbox, *, flt: Path) -> tuple[dict | None, dict]:
    """ImageD11's labelimage on the same frames (module doc: how it is background-subtracted).

    Its peaks and timing are kept beside ``flt`` and reused while the scan file is the same one.
    """
    kept = flt.with_suffix(".npz")
    if kept.exists() and kept.stat().st_mtime > path.stat().st_mtime:
        with np.load(kept) as saved:
            spots = {name: saved[name] for name in ("centroid_x", "centroid_y", "centroid_frame", "integral")}
            return spots, {"wall_s": float(saved["wall_s"]), "frames": int(saved["frames"]),
                           "fps": float(saved["frames"]) / float(saved["wall_s"]), "error": None}
    try:
        from ImageD11 import columnfile, labelimage
    except ImportError as exc:
        return None, {"error": f"ImageD11 not importable ({exc}); pip install ImageD11"}
    t0 = time.monotonic()
    with h5py.File(path, "r") as f:
        images = f[FRAMES_PATH]
        n, ny, nx = images.shape
        dark = f[DARK_PATH][()].astype(np.float32).mean(axis=0)
        sample = np.unique(np.linspace(0, n - 1, min(IMAGED11_BACKGROUND_FRAMES, n)).round().astype(int))
        stack = np.stack([images[k] for k in sample]).astype(np.float32) - dark
        background = np.median(stack, axis=0)
        noise = np.maximum(1.4826 * np.median(np.abs(stack - background), axis=0), 1.0)
        del stack
        threshold = IMAGED11_SIGMA * noise
        masked = np.zeros((ny, nx), bool)
        x0, y0, w, h = bbox
        if w and h:
            m = BEAM_MASK_MARGIN_PX
            masked[max(y0 - m, 0):y0 + h + m, max(x0 - m, 0):x0 + w + m] = True
        with open(flt, "w") as out, open(os.devnull, "w") as devnull:
            labeller = labelimage.labelimage((ny, nx), fileout=out, sptfile=devnull)
            for k in range(n):
                image = images[k].astype(np.float32) - dark - background
                image[(image < threshold) | masked] = 0.0
                labeller.peaksearch(image, 0.0, float(k))
                labeller.mergelast()
            labeller.finalise()
    wall = time.monotonic() - t0
    peaks = columnfile.columnfile(str(flt))
    keep = peaks.Number_of_pixels >= IMAGED11_MIN_PIXELS
    spots = {"centroid_x": peaks.fc[keep], "centroid_y": peaks.sc[keep], "centroid_frame": peaks.omega[keep],
             "integral": peaks.sum_intensity[keep]}
    np.savez(kept, wall_s=wall, frames=n, **spots)
    return spots, {"wall_s": wall, "frames": n, "fps": n / wall, "error": None}


def half_window(n_frames: int) -> int:
    """Half the default median window a scan of ``n_frames`` gets (a shorter scan gets one that fits it)."""
    from dctstream.config import BackgroundConfig

    window = BackgroundConfig().window
    if n_frames < window:
        window = n_frames if n_frames % 2 else n_frames - 1
    return window // 2


def by_region(n_frames: int, true_frame: np.ndarray, found: np.ndarray, eligible: np.ndarray,
              false_frame: np.ndarray) -> dict:
    """Recall and false detections per 100 frames in the scan's first and last half-window (whose median
    window is shifted inside the scan) and in its middle."""
    half = half_window(n_frames)
    edges = {"start": (0, half), "middle": (half, n_frames - half), "end": (n_frames - half, n_frames)}
    regions = {}
    for name, (a, b) in edges.items():
        if b <= a:
            continue
        in_true = (true_frame % n_frames >= a) & (true_frame % n_frames < b) & eligible
        n_false = int(((false_frame >= a) & (false_frame < b)).sum())
        regions[name] = {"frames": [int(a), int(b)], "eligible": int(in_true.sum()),
                         "recall": float(found[in_true].mean()) if in_true.any() else None,
                         "false": n_false, "false_per_100_frames": 100.0 * n_false / (b - a)}
    return regions


def score_row(truth, spots: dict, n_frames: int, tol_px: float, beam_moves: bool = False,
              measured_only: np.ndarray | None = None) -> dict:
    """`score` over the full turn, plus where the false detections are (by tenth of the scan, near the beam,
    at the scan's ends against its middle), touching pairs and 0/360 crossings. ``beam_moves``: the beam's
    box follows psi, so a spot is hidden by it when the truth's ``in_direct_beam`` says so. ``found_spots``:
    the true spots found (indices); ``measured_only``: see `score`."""
    t = truth.spots
    result = score(t, spots, direct_beam=truth.direct_beam_bbox, snr_min=SNR_MIN, tol_px=tol_px,
                   tol_frames=TOL_FRAMES, period_frames=n_frames,
                   in_beam=t["in_direct_beam"] if beam_moves else None, measured_only=measured_only)
    matched_detections = np.zeros(len(spots["centroid_x"]), bool)
    to_det = result.pop("truth_to_detection")
    matched_detections[to_det[to_det >= 0]] = True
    matched_detections[result.pop("piece_detections")] = True
    false = ~matched_detections
    tenth = np.clip((spots["centroid_frame"][false] * 10 // n_frames).astype(int), 0, 9)
    result["false_by_tenth"] = np.bincount(tenth, minlength=10).tolist()
    x0, y0, w, h = truth.direct_beam_bbox
    near_beam = (x0 - BEAM_MASK_MARGIN_PX, y0 - BEAM_MASK_MARGIN_PX, w + 2 * BEAM_MASK_MARGIN_PX,
                 h + 2 * BEAM_MASK_MARGIN_PX) if w and h else None
    result["false_near_beam"] = int(inside(near_beam, spots["centroid_x"][false], spots["centroid_y"][false]).sum())
    hidden = t["in_direct_beam"].astype(bool) if beam_moves else inside(truth.direct_beam_bbox, t["x"], t["y"])
    # as `score`: a spot merged into a brighter one is not asked for (it would read as a miss here)
    eligible = (t["snr"] >= SNR_MIN) & ~hidden & (t["merged_into"] < 0 if "merged_into" in t else True)
    found = (to_det >= 0) & eligible
    result["found_spots"] = np.flatnonzero(found).tolist()
    result["regions"] = by_region(n_frames, t["frame"], found, eligible,
                                  np.clip(spots["centroid_frame"][false], 0, n_frames - 1e-9))
    if "partner" in t:
        first = np.flatnonzero((t["partner"] > np.arange(len(t["x"]))) & eligible)
        first = first[eligible[t["partner"][first]]]
        result["pairs"] = int(first.size)
        result["pairs_both_found"] = int((found[first] & found[t["partner"][first]]).sum())
    if "crosses_wrap" in t and t["crosses_wrap"].any():
        crossing = np.flatnonzero((t["crosses_wrap"] == 1) & eligible)
        result["crossing"] = int(crossing.size)
        result["crossing_found"] = int(found[crossing].sum())
        split = 0
        for j in crossing:  # detections around a crossing spot: two mean it was cut at 0/360 deg
            dx, dy = spots["centroid_x"] - t["x"][j], spots["centroid_y"] - t["y"][j]
            df = np.abs(spots["centroid_frame"] - t["frame"][j])
            df = np.minimum(df, n_frames - df)
            split += int(((np.hypot(dx, dy) <= tol_px) & (df <= 4 * t["sigma_frame"][j] + 1)).sum() >= 2)
        result["crossing_split"] = split
    return result


def _fmt(value, spec=".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def table_markdown(rows: list[dict]) -> str:
    head = ("| scan | tool | recall | precision | centroid RMS (px) | ψ RMS (frames) | intensity ratio, median [IQR] "
            "| fps (% of clean) | notes |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    clean_fps = {r["tool"]: r.get("fps") for r in rows if r["scan"] == "clean"}
    for r in rows:
        s = r.get("score")
        if s is None:
            extra = f"; rejected {r['rejected']}" if r.get("rejected") else ""
            lines.append(f"| {r['scan']} | {r['tool']} | — | — | — | — | — | {_fmt(r.get('fps'), '.1f')} | "
                         f"{r.get('error') or 'no result'}{extra} |")
            continue
        rms_xy = float(np.sqrt((s["rms_x_px"] ** 2 + s["rms_y_px"] ** 2) / 2))
        ratio = (f"{_fmt(s.get('intensity_ratio_median'))} [{_fmt(s.get('intensity_ratio_q25'), '.2f')}–"
                 f"{_fmt(s.get('intensity_ratio_q75'), '.2f')}]")
        ref = r.get("fps_clean") or clean_fps.get(r["tool"])
        fps = _fmt(r.get("fps"), ".1f") + (f" ({100 * r['fps'] / ref:.0f} %)" if ref and r.get("fps") else "")
        false = s["detections"] - s["matched_detections"]
        notes = [f"{s['found']}/{s['eligible']} found ({s.get('found_cut', 0)} cut by the beam, not measured), "
                 f"{false} false"]
        if s.get("pieces"):
            notes.append(f"{s['pieces']} more pieces of spots the beam cuts in two")
        if false:
            notes.append("false by tenth of the scan " + " ".join(map(str, s["false_by_tenth"])))
            if s["false_near_beam"]:
                notes.append(f"{s['false_near_beam']} false within 10 px of the beam box")
        regions = s.get("regions") or {}
        if regions:
            notes.append("false per 100 frames / recall: " + ", ".join(
                f"{name} {v['false_per_100_frames']:.1f} / {_fmt(v['recall'], '.2f')}" for name, v in regions.items()))
        if s.get("pairs"):
            notes.append(f"touching pairs both found {s['pairs_both_found']}/{s['pairs']}")
        if "crossing" in s:
            notes.append(f"0/360° spots found {s['crossing_found']}/{s['crossing']}, cut in two {s['crossing_split']}")
        if r.get("clean_scan"):
            notes.append(f"fps against {r['clean_scan']}")
        if r.get("rejected"):
            notes.append("rejected " + ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())))
        if r["tool"] == "dctstream" and "direct_beam" in r:
            notes.append(f"beam box found {r['direct_beam']} (true {list(r.get('true_beam') or [])})")
        if r.get("error"):
            notes.append(r["error"])
        lines.append(f"| {r['scan']} | {r['tool']} | {s['recall']:.3f} | {s['precision']:.3f} | {_fmt(rms_xy)} | "
                     f"{_fmt(s['rms_frame'])} | {ratio} | {fps} | {'; '.join(notes)} |")
    return "\n".join(lines)


def common_markdown(rows: list[dict]) -> str:
    """Centroid, psi and intensity errors over the spots that every tool found on a scan: each tool's
    errors in the main table are over its own spots, and a tool that finds only the bright ones has the
    easier share."""
    lines = ["| scan | tool | spots both found | centroid RMS (px) | ψ RMS (frames) | intensity ratio, median |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("score_common")
        if s is None:
            continue
        rms_xy = float(np.sqrt((s["rms_x_px"] ** 2 + s["rms_y_px"] ** 2) / 2))
        lines.append(f"| {r['scan']} | {r['tool']} | {s['measured']} | {_fmt(rms_xy)} | {_fmt(s['rms_frame'])} | "
                     f"{_fmt(s.get('intensity_ratio_median'))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def regions_markdown(rows: list[dict]) -> str:
    """The scan's ends against its middle: false detections per 100 frames and recall in the first and last
    half-window (their median window is shifted inside the scan) and between them."""
    lines = ["| scan | tool | half-window (frames) | false / 100 frames: start, middle, end "
             "| recall: start, middle, end |", "|---|---|---|---|---|"]
    for r in rows:
        regions = (r.get("score") or {}).get("regions")
        if not regions:
            continue
        names = ("start", "middle", "end")
        half = regions["start"]["frames"][1]
        false = ", ".join(_fmt(regions[n]["false_per_100_frames"], ".1f") if n in regions else "—" for n in names)
        recall = ", ".join(_fmt(regions[n]["recall"], ".3f") if n in regions else "—" for n in names)
        lines.append(f"| {r['scan']} | {r['tool']} | {half} | {false} | {recall} |")
    return "\n".join(lines)


def validate(*, quick: bool, scans: list[str], work: Path, seed: int = 0, imaged11: bool = True,
             timeout_s: float | None = None, code_root: Path = ROOT, shape: tuple[int, int] | None = None
             ) -> list[dict]:
    """Generate (or reuse) each scan, run both tools, score them; one dict per (scan, tool). ``shape``:
    (frames, size) of the simulated scans instead of the quick or full ones (e.g. the detector's 2048)."""
    work.mkdir(parents=True, exist_ok=True)
    timeout_s = timeout_s or (600.0 if quick else 1800.0)
    rows = []
    shape_of = {}  # scan name -> (frames, y, x)
    for name in scans:
        print(f"{name}:", flush=True)
        if name in EXTERNAL_SPOTS:
            files, script, venv = EXTERNAL_SPOTS[name]
            spots_file = work / files[quick]
            if not spots_file.exists():
                rows.append({"scan": name, "tool": "dctstream", "error": (
                    f"skipped: no {spots_file}; make it with {script}"
                    f"{' --quick' if quick else ''} --out {spots_file} ({venv}, see its doc)")})
                continue
            shape_kind = "grain"
        elif name == "polyxsim":
            if not (work / POLYXSIM_SCAN).exists():
                rows.append({"scan": name, "tool": "dctstream", "error": (
                    f"skipped: no {work / POLYXSIM_SCAN}; make it with benchmarks/polyxsim_scan.py --inp INP "
                    f"--out {work / POLYXSIM_SCAN} (INP: PolyXSim's input, run first; see its doc)")})
                continue
            shape_kind = "gauss"
        else:
            shape_kind = SCANS[name].get("spot_shape", "gauss")
        path = (work / POLYXSIM_SCAN if name == "polyxsim"
                else scan_path(work, name, quick=quick, seed=seed, shape=None if name in EXTERNAL_SPOTS else shape))
        truth = read_hard_truth(path)
        with h5py.File(path, "r") as f:
            shape_of[name] = f[FRAMES_PATH].shape
            n_frames = shape_of[name][0]
            beam_moves = "beam_motion" in f[TRUTH_PATH].attrs
        tables = {}
        for tool, run in _tools(path, truth, work, timeout_s, code_root, imaged11):
            spots, info = run()
            row = {"scan": name, "tool": tool, "true_beam": truth.direct_beam_bbox, **info}
            if spots is not None:
                row["score"] = score_row(truth, spots, n_frames, TOL_PX[shape_kind], beam_moves)
                tables[tool] = (row, spots)
            rows.append(row)
            s = row.get("score") or {}
            print(f"  {tool}: recall {_fmt(s.get('recall'))} precision {_fmt(s.get('precision'))} "
                  f"fps {_fmt(row.get('fps'), '.1f')} {row.get('error') or ''}", flush=True)
        if len(tables) > 1:  # the errors again, over the spots every tool found: the same spots for each
            both = np.ones(len(truth.spots["x"]), bool)
            for row, _ in tables.values():
                both &= np.isin(np.arange(both.size), row["score"]["found_spots"])
            for row, spots in tables.values():
                row["score_common"] = score_row(truth, spots, n_frames, TOL_PX[shape_kind], beam_moves,
                                                measured_only=both)
    # fps against a clean scan of the same size, frames and pixels: one shorter than the median window waits for
    # its last frame before its first is corrected, and larger frames cost more
    for shape in sorted({shape for name, shape in shape_of.items() if shape != shape_of.get("clean")}):
        n_frames, ny, nx = shape
        if ny != nx:
            continue
        path = scan_path(work, "clean", quick=quick, seed=seed, shape=(n_frames, ny))
        truth = read_hard_truth(path)
        label = f"clean ({n_frames} × {ny}²)"
        print(f"{label}:", flush=True)
        for tool, run in _tools(path, truth, work, timeout_s, code_root, imaged11):
            spots, info = run()
            reference = {"scan": label, "tool": tool, "true_beam": truth.direct_beam_bbox, **info}
            if spots is not None:
                reference["score"] = score_row(truth, spots, n_frames, TOL_PX["gauss"])
            reference["fps_clean"] = info.get("fps")
            rows.append(reference)
            for row in rows:
                if shape_of.get(row["scan"]) == shape and row["tool"] == tool:
                    row["fps_clean"], row["clean_scan"] = info.get("fps"), label
    shutil.rmtree(work / OLD_OUTPUTS, ignore_errors=True)  # after the runs: see set_aside
    return rows


def _tools(path: Path, truth, work: Path, timeout_s: float, code_root: Path, imaged11: bool) -> list:
    """(tool, run) for each tool on the scan at ``path``; run() gives its spots and what it said."""
    def dctstream():
        # twice, the second timed: the first compiles the numba kernels for the scan's dtypes and code paths
        # (1-30 s the first time a checkout meets them; cached after), which no row's fps counts
        run_dctstream(path, work / f"out-{path.stem}", timeout_s=timeout_s, code_root=code_root)
        return run_dctstream(path, work / f"out-{path.stem}", timeout_s=timeout_s, code_root=code_root)

    tools = [("dctstream", dctstream)]
    if imaged11:
        tools.append(("ImageD11", lambda: run_imaged11(path, truth.direct_beam_bbox, flt=work / f"{path.stem}.flt")))
    return tools


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 x 256 px, 360 frames (else 512 x 512, 720)")
    p.add_argument("--scans", default=",".join([*SCANS, *EXTERNAL_SPOTS, "polyxsim"]),
                   help="comma-separated scan names (default: all, and the independent, xrdsim and polyxsim ones)")
    p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dctstream-validate"),
                   help="folder for the scans (kept and reused) and the runs' outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", help="FRAMES,SIZE: simulated scans of FRAMES frames of SIZE x SIZE px instead "
                                   "(e.g. 600,2048: the detector's size, past the default window of 501)")
    p.add_argument("--no-imaged11", action="store_true", help="skip the ImageD11 peer rows")
    p.add_argument("--timeout", type=float, help="seconds per dctstream run (600 quick, 1800 full)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--dctstream-root", default=str(ROOT),
                   help="run the dctstream package (and dctstream/configs/default.yml) of this checkout (default: this one)")
    p.add_argument("--json", help="also write every row's numbers to this file")


    return p


def run_from_args(args) -> int:
    scans = [s for s in args.scans.split(",") if s]
    unknown = [s for s in scans if s not in SCANS and s not in (*EXTERNAL_SPOTS, "polyxsim")]
    if unknown:
        print(f"validate: --scans: unknown {unknown}, expected names from {[*SCANS, *EXTERNAL_SPOTS, 'polyxsim']}",
              file=sys.stderr)
        return 2
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 2 or min(shape) < 32:
            print(f"validate: --shape: expected FRAMES,SIZE (whole numbers of at least 32), got {args.shape!r}",
                  file=sys.stderr)
            return 2
    rows = validate(quick=args.quick, scans=scans, work=Path(args.work), seed=args.seed,
                    imaged11=not args.no_imaged11, timeout_s=args.timeout, code_root=Path(args.dctstream_root),
                    shape=shape)
    table = "\n\n".join(part for part in (table_markdown(rows), common_markdown(rows), regions_markdown(rows)) if part)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


def main(argv=None, prog: str | None = None) -> int:
    """``python benchmarks/validate.py`` and ``dctstream validate``, with their options ``argv``."""
    return run_from_args(build_parser(prog).parse_args(argv))
