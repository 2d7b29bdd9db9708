"""A validation scan from PolyXSim's far-field frames: its spots, `ScanModel`'s beamline background.

PolyXSim (FABLE-3DXRD, GPL; not on PyPI) is not part of this project: bring it
from its repository (github.com/FABLE-3DXRD/PolyXSim), ``pip install`` it into
a scratch venv of its own (``python3.11 -m venv V && V/bin/pip install
PATH/TO/PolyXSim xfab fabio ImageD11``) and run it on an input file such as
this one (aluminium, 30 grains in a 0.3 mm cube, 45 keV, a 512 x 512 detector
of 0.2 mm pixels at 220 mm, 360 frames of 1 deg; Gaussian spots of
``peakshape 1 3 1.0``: sigma 1.5 px, rocking sigma 0.5 deg; no noise, no
background; about 3,650 peaks in 10 s)::

    direc 'Al30'            stem 'Al30_'         make_image 1
    output '.edf' '.flt' '.gve' '.par' '.ubi' '.ref'
    structure_phase_0 'Al.cif'                  (PolyXSim's test/Al.cif)
    no_grains 30   gen_U 1   gen_pos 1 1   gen_eps 1 0 0 0 0
    gen_size 1 0.04 0.02 0.08   sample_xyz 0.3 0.3 0.3
    y_size 0.2  z_size 0.2  dety_size 512  detz_size 512  distance 220
    tilt_x 0.  tilt_y 0.  tilt_z 0.  o11 1  o12 0  o21 0  o22 -1
    noise 0  bg 0  psf 0  intensity_const 0  lorentz_apply 1  beampol_apply 1
    peakshape 1 3 1.0  wavelength 0.2755  beamflux 2e12  beampol_factor 1  beampol_direct 0
    dety_center 255.5  detz_center 255.5
    omega_start -180  omega_end 180  omega_step 1.0  omega_sign 1  wedge 0

(one keyword per line).  PolyXSim draws its grains from numpy's global
generator unseeded; seed it for a repeatable sample::

    V/bin/python -c "import numpy, sys; numpy.random.seed(1); from polyxsim import gopolyxsim; \\
        from optparse import OptionParser; gopolyxsim.run(gopolyxsim.get_options(OptionParser()))" -i Al30.inp

then, with this project's Python::

    python benchmarks/polyxsim_scan.py --inp Al30.inp --out /tmp/dctstream-validate/polyxsim-scan.h5

This reads the input file, the EDF frames and the per-grain ``.ref`` peak
lists of PolyXSim's output folder (its ``direc``).  Each peak is rendered
again as PolyXSim renders it (a 2 x 2 bilinear spike of ``round(Int)``
counts times its rocking fraction -- the difference of the normal CDF over
the frame's omega interval, sigma = ``peakshape[2] / 2`` -- blurred by a
Gaussian of sigma ``peakshape[1] / 2`` px, the detector orientation applied by
xfab's ``trans_orientation``), which gives each its own truth: the centroid
(x = column, y = row, frame = index along omega, 0-based at pixel and frame
centres), its peak, and its integral as drawn in the frames (each voxel's
counts shared between the peaks there in proportion to their rendered
counts: PolyXSim truncates every pixel to an integer).  The sum of the
re-rendered peaks, truncated, is checked against PolyXSim's frames voxel by
voxel, and the centroid of the frames' counts around each isolated peak
against its truth; both go to the output's ``/1.1/ground_truth`` attributes
and are printed.

The scan is `simulators.hard_scans.HardScanModel`'s: PolyXSim's frames, scaled
by the source intensity (a 10 % decay over the scan, no ripple, a +3 %
top-up at 55 % of it), over `ScanModel`'s direct beam, glow and quadrant
offsets, with Poisson and read noise, hot pixels and zingers, and its truth
columns (``merged_into``: peaks no spot finder could tell apart in the
noiseless frames).  ``python benchmarks/validate.py --scans polyxsim`` scores
dctstream and ImageD11 on it when ``--work``/polyxsim-scan.h5 is there.
Nothing of PolyXSim is part of this project, and nothing this writes is committed.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's simulators

from simulators.hard_scans import HardScanModel, write_hard_scan  # noqa: E402

TOPUP_AT, TOPUP_STEP = 0.55, 0.03
# .ref columns (PolyXSim's file_io.write_ref)
REF_COLUMNS = ("grain_id", "ref_id", "spot_id", "h", "k", "l", "tth", "omega", "eta", "dety", "detz", "detyd",
               "detzd", "gv1", "gv2", "gv3", "L", "P", "F2", "Int", "overlaps")
GAUSS_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, as PolyXSim calls it


def read_input(inp: Path) -> dict:
    """PolyXSim's input file as {keyword: [values]} (numbers as float, quoted strings as str)."""
    param = {}
    for line in inp.read_text().splitlines():
        words = shlex.split(line.split("#")[0])
        if not words:
            continue
        values = []
        for w in words[1:]:
            try:
                values.append(float(w))
            except ValueError:
                values.append(w)
        param[words[0]] = values
    for key in ("direc", "stem", "peakshape", "dety_size", "detz_size", "omega_start", "omega_end", "omega_step",
                "o11", "o12", "o21", "o22"):
        if key not in param:
            raise ValueError(f"{inp}: keyword {key} missing, expected PolyXSim's input with it")
    if param["peakshape"][0] != 1:
        raise ValueError(f"{inp}: peakshape: expected 1 (Gaussian spots), got {param['peakshape'][0]:g}")
    if param.get("omega_sign", [1])[0] != 1:
        raise ValueError(f"{inp}: omega_sign: expected 1, got {param['omega_sign'][0]:g}")
    if param.get("spatial") or param.get("noise", [0])[0] or param.get("bg", [0])[0] or param.get("psf", [0])[0]:
        raise ValueError(f"{inp}: spatial, noise, bg and psf must be off (the background and noise are added here)")
    return param


def read_output(inp: Path, param: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PolyXSim's frames (n, rows, cols) and every grain's peaks (.ref columns) from its output folder."""
    import fabio

    folder = (inp.parent / param["direc"][0]).resolve()
    names = sorted(glob.glob(str(folder / f"{param['stem'][0]}[0-9][0-9][0-9][0-9].edf")))
    n = round((param["omega_end"][0] - param["omega_start"][0]) / param["omega_step"][0])
    if len(names) != n:
        raise ValueError(f"{folder}: {len(names)} EDF frames, expected {n} (omega_start..omega_end by omega_step)")
    frames = np.stack([fabio.open(name).data for name in names])
    refs = sorted(glob.glob(str(folder / "*.ref")))
    if not refs:
        raise ValueError(f"{folder}: no .ref peak lists, expected output '.ref' in {inp}")
    table = np.vstack([np.loadtxt(name, ndmin=2).reshape(-1, len(REF_COLUMNS)) for name in refs])
    return frames, {name: table[:, i] for i, name in enumerate(REF_COLUMNS)}


def render_peaks(param: dict, peaks: dict, n_frames: int, shape: tuple[int, int]) -> list[dict]:
    """Each peak as PolyXSim's make_image draws it: its footprint in image pixels (counts per unit of
    rounded intensity, cut to the detector), the footprint's origin (row, col), and its frames with the
    fraction of its intensity in each."""
    from xfab.detector import trans_orientation

    ny_det, nz_det = int(param["dety_size"][0]), int(param["detz_size"][0])
    o = [int(param[k][0]) for k in ("o11", "o12", "o21", "o22")]
    # image pixel (row, col) of internal pixel (dety, detz): xfab's transform applied to index grids
    grid_y, grid_z = np.meshgrid(np.arange(ny_det), np.arange(nz_det), indexing="ij")
    map_y, map_z = trans_orientation(grid_y, *o, "inverse"), trans_orientation(grid_z, *o, "inverse")
    if map_y.shape != shape:
        raise ValueError(f"PolyXSim frames of {shape}, its detector rendered as {map_y.shape}")
    row_of, col_of = np.empty((ny_det, nz_det), np.int64), np.empty((ny_det, nz_det), np.int64)
    rows, cols = np.indices(shape)
    row_of[map_y, map_z], col_of[map_y, map_z] = rows, cols

    _, width_px, rocking_deg = param["peakshape"][:3]
    add = max(1, int(round(width_px)))  # PolyXSim's peak_add = frame_add
    sigma_px, sigma_deg = 0.5 * width_px, 0.5 * rocking_deg
    half = add + int(GAUSS_TRUNCATE * sigma_px + 0.5) + 1
    start, step = param["omega_start"][0], param["omega_step"][0]
    omega_frames = start + step * np.arange(n_frames)
    out = []
    for dety, detz, omega, intensity in zip(peaks["detyd"], peaks["detzd"], peaks["omega"], peaks["Int"]):
        cy, cz = int(round(dety)), int(round(detz))
        spike = np.zeros((2 * half + 1, 2 * half + 1))
        for y in range(cy - add, cy + add + 1):
            for z in range(cz - add, cz + add + 1):
                if -add < y < ny_det + add and -add < z < nz_det + add and abs(dety - y) < 1 and abs(detz - z) < 1:
                    spike[y - cy + half, z - cz + half] += (1 - abs(dety - y)) * (1 - abs(detz - z))
        local = gaussian_filter(spike, sigma_px, mode="constant", truncate=GAUSS_TRUNCATE)
        y0, z0 = cy - half, cz - half
        ys, zs = np.nonzero(local)
        ys, zs = ys + y0, zs + z0
        on = (ys >= 0) & (ys < ny_det) & (zs >= 0) & (zs < nz_det)
        if not on.any():
            continue
        ys, zs = ys[on], zs[on]
        r, c = row_of[ys, zs], col_of[ys, zs]
        patch = np.zeros((r.max() - r.min() + 1, c.max() - c.min() + 1))
        patch[r - r.min(), c - c.min()] = local[ys - y0, zs - z0]
        # the frames PolyXSim draws it in (its make_image loop's bounds) and the fraction in each
        near = (omega <= omega_frames + step + 2 * rocking_deg) & (omega >= omega_frames - 2 * rocking_deg)
        ks = np.flatnonzero(near)
        lower = (omega_frames[ks] - omega) / sigma_deg
        fraction = norm.cdf(lower + step / sigma_deg) - norm.cdf(lower)
        keep = fraction > 0
        if not keep.any():
            continue
        out.append({"patch": patch, "origin": (int(r.min()), int(c.min())), "frames": ks[keep],
                    "fraction": fraction[keep], "intensity": float(int(round(intensity))), "omega": omega})
    return out


class PolyXSimModel(HardScanModel):
    """PolyXSim's frames as the spots of a `HardScanModel` (see the module doc); ``rendered``: its peaks
    from `render_peaks`."""

    def __init__(self, frames: np.ndarray, rendered: list[dict], *, rocking_sigma_frames: float, seed: int = 0):
        n, ny, nx = frames.shape
        if ny != nx:
            raise ValueError(f"PolyXSim frames of {ny} x {nx} px, expected square ones (ScanModel's detector)")
        super().__init__(frames=n, size=ny, spots=0, seed=seed, ripple=0.0, topup_at=TOPUP_AT,
                         topup_step=TOPUP_STEP)
        self._polyxsim = frames
        self._fraction = []
        for peak in rendered:
            patch = peak["patch"]
            top = patch.max()
            ks = peak["frames"].astype(np.int64)
            self._patches.append(patch / top)
            self._origin.append(peak["origin"])
            self._rock.append((ks, ks))
            self._fraction.append((int(ks[0]), peak["fraction"]))
            self._sigma_frames.append(rocking_sigma_frames)
            self._frame0.append(float(peak["fraction"] @ ks / peak["fraction"].sum()))
            self._amp.append(peak["intensity"] * top)
            self._partner.append(-1)
            oy, ox = peak["origin"]
            self._boxes.append((ox + patch.shape[1] / 2, oy + patch.shape[0] / 2, self._frame0[-1],
                                patch.shape[1] / 2, patch.shape[0] / 2, 0.5 * len(ks)))
        self._by_frame = [[] for _ in range(n)]
        for i, (ks, _) in enumerate(self._rock):
            for k in ks:
                self._by_frame[k].append(i)
        self.spots = self._truth_columns()

    def _rocking(self, i: int, ku: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_fraction"):  # HardScanModel's constructor, before the peaks are loaded
            return super()._rocking(i, ku)
        first, fraction = self._fraction[i]
        return fraction[np.asarray(ku, np.int64) - first]

    def add_spots(self, image: np.ndarray, k: int) -> np.ndarray:
        image += float(self.source_intensity(k)) * self._polyxsim[k]
        return image

    def rendered_frame(self, k: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray, tuple[slice, slice]]]]:
        """The sum of the re-rendered peaks in frame ``k`` (PolyXSim's counts, before it truncates them) and
        each peak's counts there with their place."""
        total = np.zeros(self.shape)
        parts = []
        for i in self._by_frame[k]:
            counts = self._amp[i] * float(self._rocking(i, np.array([k]))[0]) * self._patches[i]
            oy, ox = self._origin[i]
            place = (slice(oy, oy + counts.shape[0]), slice(ox, ox + counts.shape[1]))
            total[place] += counts
            parts.append((i, counts, place))
        return total, parts


def drawn_integrals_and_check(model: PolyXSimModel) -> tuple[np.ndarray, dict]:
    """Each peak's counts as drawn in the frames (source intensity included) and the check of the
    re-rendered peaks against PolyXSim's frames."""
    integral = np.zeros(len(model._patches))
    mismatched = 0
    worst = 0.0
    drawn_total = rendered_total = 0.0
    for k in range(model.frames):
        total, parts = model.rendered_frame(k)
        frame = model._polyxsim[k].astype(np.float64)
        expected = np.floor(np.minimum(total, 65535) + 1e-9)
        diff = np.abs(frame - expected)
        mismatched += int((diff > 1).sum())
        worst = max(worst, float(diff.max()))
        drawn_total += frame.sum()
        rendered_total += total.sum()
        share = np.divide(frame, total, out=np.zeros_like(frame), where=total > 0)
        scale = float(model.source_intensity(k))
        for i, counts, place in parts:
            integral[i] += scale * float((counts * share[place]).sum())
    check = {"voxels_off_by_more_than_1": mismatched, "max_abs_difference_counts": worst,
             "frames_sum_over_rendered_sum": drawn_total / rendered_total}
    return integral, check


def centroid_check(model: PolyXSimModel, truth: dict) -> dict:
    """Centroid of PolyXSim's counts in each isolated peak's box (no other peak's box meets it) against
    its truth: how far apart, in px and frames."""
    n = len(model._patches)
    boxes = np.array([(oy, oy + p.shape[0], ox, ox + p.shape[1], ks[0], ks[-1])
                      for (oy, ox), p, (ks, _) in zip(model._origin, model._patches, model._rock)])
    dx, dy, df = [], [], []
    for i in range(n):
        b = boxes[i]
        meets = ((boxes[:, 0] < b[1]) & (boxes[:, 1] > b[0]) & (boxes[:, 2] < b[3]) & (boxes[:, 3] > b[2])
                 & (boxes[:, 4] <= b[5]) & (boxes[:, 5] >= b[4]))
        if meets.sum() > 1:
            continue
        block = model._polyxsim[b[4]:b[5] + 1, b[0]:b[1], b[2]:b[3]].astype(np.float64)
        block *= model.source_intensity(np.arange(b[4], b[5] + 1))[:, None, None]
        total = block.sum()
        if total <= 0:
            continue
        kk, rr, cc = np.indices(block.shape)
        dx.append((block * cc).sum() / total + b[2] - truth["x"][i])
        dy.append((block * rr).sum() / total + b[0] - truth["y"][i])
        df.append((block * kk).sum() / total + b[4] - truth["frame"][i])
    dx, dy, df = map(np.asarray, (dx, dy, df))
    return {"isolated_peaks": int(dx.size), "centroid_rms_x_px": float(np.sqrt(np.mean(dx ** 2))),
            "centroid_rms_y_px": float(np.sqrt(np.mean(dy ** 2))),
            "centroid_rms_frame": float(np.sqrt(np.mean(df ** 2))),
            "centroid_max_px": float(max(np.abs(dx).max(), np.abs(dy).max())),
            "centroid_max_frame": float(np.abs(df).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inp", required=True, help="PolyXSim's input file (its output folder is its direc)")
    p.add_argument("--out", required=True, help="the scan to write (HDF5, the validation's layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the background's noise, hot pixels and zingers")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    inp = Path(args.inp)
    param = read_input(inp)
    frames, peaks = read_output(inp, param)
    rendered = render_peaks(param, peaks, frames.shape[0], frames.shape[1:])
    model = PolyXSimModel(frames, rendered, seed=args.seed,
                          rocking_sigma_frames=0.5 * param["peakshape"][2] / param["omega_step"][0])
    integral, check = drawn_integrals_and_check(model)
    model.spots["integral"] = integral
    check.update(centroid_check(model, model.spots))
    check.update(peaks_in_ref=int(len(peaks["Int"])), peaks_rendered=len(rendered),
                 merged=int((model.spots["merged_into"] >= 0).sum()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.h5")
    write_hard_scan("polyxsim", partial, model=model)
    import h5py

    from simulators.dct_scan import TRUTH_PATH

    with h5py.File(partial, "a") as f:
        group = f[TRUTH_PATH]
        group.attrs["made_by"] = f"PolyXSim ({inp.resolve()}) via benchmarks/polyxsim_scan.py"
        for key, value in check.items():
            group.attrs["check_" + key] = value
    partial.rename(out)
    print(f"{len(rendered)} peaks, {frames.shape[0]} frames of {frames.shape[1]} x {frames.shape[2]} px "
          f"in {time.monotonic() - t0:.0f} s -> {out}")
    for key, value in check.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
