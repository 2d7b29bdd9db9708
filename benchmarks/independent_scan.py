"""Diffraction spots from an independent physics model: pymicro's DCT forward projection.

Run in its own virtual environment (pymicro 0.6.1 pins numpy < 2)::

    python3.11 -m venv /tmp/pymicro-venv && /tmp/pymicro-venv/bin/pip install pymicro==0.6.1 h5py
    /tmp/pymicro-venv/bin/python benchmarks/independent_scan.py --out /tmp/dctstream-validate/independent-spots.h5

An aluminium polycrystal (a Voronoi grain map in a cylinder, random
orientations) turns through 360 deg in front of a near-field detector.  For
every grain and every {111} and {200} reflection pymicro gives the Bragg
angles (`Orientation.dct_omega_angles`), the diffracted beam (scattering
vector in the rotated grain) and where it meets the detector
(`RegArrayDetector2d.project_along_direction`, `lab_to_pixel`); the spot is the
grain's projection along the beam at that angle (`xray_utils.radiograph`), as
`DctForwardSimulation.dct_projection` does -- done here reflection by reflection,
so that each spot has its own truth, and with the pitfalls listed in
/work/shared/VALIDATION-TOOLS.md avoided: the `config` module pymicro imports
is registered first, planes are taken without Friedel pairs and the pair added
once (at omega + 180 deg), and each projection is rescaled so that its sum is
the grain's volume in voxels (scikit-image's radon scale is not used).

The file holds only the spots (footprint, place, omega); pymicro gives no
rocking width, background or noise: `simulators.hard_scans` adds a rocking
curve, `ScanModel`'s background (direct beam, glow, source ripple and decay)
and detector noise when `benchmarks/validate.py` makes the ``independent``
scan from it.  Nothing this writes is committed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import types
import warnings

import numpy as np

FRAMES = 720
SIZE_PX = 512
PIXEL_MM = 0.01  # detector pixel = grain-map voxel, as pymicro's dct_projection assumes
# --quick: the same sample and geometry in mm, on half the pixels (and voxels) and frames.
QUICK_FRAMES, QUICK_SIZE_PX = 360, 256
DISTANCE_MM = 8.0
ENERGY_KEV = 40.0
LATTICE_NM = 0.405  # aluminium, face-centred cubic
FAMILIES = ((1, 1, 1), (2, 0, 0))  # {220} too would crowd a 256 px detector (quick) with ~50 spots a grain
VOLUME_VOXELS = (100, 100, 60)  # X, Y (the beam runs along X), Z (the rotation axis)
SAMPLE_RADIUS_VOXELS = 48
EDGE_PX = 8


def grain_map(n_grains: int, rng: np.random.Generator, scale: int) -> np.ndarray:
    """Voronoi grains (ids 1..n) inside a cylinder along Z, 0 outside; voxels ``scale`` x the full ones."""
    nx, ny, nz = (n // scale for n in VOLUME_VOXELS)
    seeds = rng.uniform([0, 0, 0], [nx, ny, nz], size=(n_grains, 3))
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float32)
    nearest = np.empty(len(points), np.int32)
    for start in range(0, len(points), 100_000):
        d = ((points[start:start + 100_000, None, :] - seeds[None].astype(np.float32)) ** 2).sum(-1)
        nearest[start:start + 100_000] = d.argmin(1) + 1
    ids = nearest.reshape(nx, ny, nz)
    ids[np.hypot(x - (nx - 1) / 2, y - (ny - 1) / 2) > SAMPLE_RADIUS_VOXELS / scale] = 0
    return ids


def simulate(n_grains: int, seed: int, quick: bool = False) -> dict[str, np.ndarray]:
    config = types.ModuleType("config")  # pymicro.xray.xray_utils imports this name from a module "config"
    config.PYMICRO_XRAY_DATA_DIR = "."
    sys.modules.setdefault("config", config)
    warnings.filterwarnings("ignore")
    from pymicro.crystal.lattice import HklPlane, Lattice
    from pymicro.crystal.microstructure import Orientation
    from pymicro.xray.detectors import RegArrayDetector2d
    from pymicro.xray.xray_utils import lambda_keV_to_nm, radiograph
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    random.seed(seed)  # Orientation.random draws from Python's global generator
    lattice = Lattice.face_centered_cubic(LATTICE_NM)
    planes = HklPlane.from_families(FAMILIES, lattice=lattice, friedel_pairs=False)
    scale = 2 if quick else 1
    frames, size_px, pixel_mm = (QUICK_FRAMES, QUICK_SIZE_PX, 2 * PIXEL_MM) if quick else (FRAMES, SIZE_PX, PIXEL_MM)
    detector = RegArrayDetector2d(size=(size_px, size_px))
    detector.pixel_size = pixel_mm
    detector.ref_pos = np.array([DISTANCE_MM, 0.0, 0.0])
    beam = np.array([1.0, 0.0, 0.0]) / lambda_keV_to_nm(ENERGY_KEV)
    ids = grain_map(n_grains, rng, scale)
    step_deg = 360.0 / frames
    out: dict[str, list] = {"patch": [], "origin": [], "frame": [], "grain": [], "hkl": []}
    for gid, box in enumerate(ndimage.find_objects(ids), start=1):
        if box is None:
            continue
        grain = (ids[box] == gid).astype(np.float64)
        volume = grain.sum()
        centre_mm = pixel_mm * (np.array(ndimage.center_of_mass(ids == gid)) - 0.5 * np.array(ids.shape))
        orientation = Orientation.random()
        g_t = orientation.orientation_matrix().T
        for plane in planes:
            try:
                w1, w2 = orientation.dct_omega_angles(plane, ENERGY_KEV, verbose=False)
            except ValueError:
                continue  # no Bragg condition for this plane
            h, k, l = plane.miller_indices()
            friedel = HklPlane(-h, -k, -l, lattice)
            for omega, p in ((w1, plane), (w2, plane), ((w1 + 180) % 360, friedel), ((w2 + 180) % 360, friedel)):
                rad = np.radians(omega)
                rot = np.array([[np.cos(rad), -np.sin(rad), 0], [np.sin(rad), np.cos(rad), 0], [0, 0, 1]])
                k_out = beam + rot @ g_t @ p.scattering_vector()
                if k_out[0] <= 0:
                    continue  # diffracted backwards, away from the detector
                hit = detector.project_along_direction(k_out, rot @ centre_mm)
                u, v = detector.lab_to_pixel(hit)[0]
                proj = radiograph(grain, omega)[:, ::-1]  # (u, v), as dct_projection places it
                proj = np.clip(proj, 0, None)
                if proj.sum() <= 0:
                    continue
                proj *= volume / proj.sum()
                patch = proj.T  # (row = v, column = u)
                oy, ox = int(round(v - patch.shape[0] / 2)), int(round(u - patch.shape[1] / 2))
                rows, cols = np.flatnonzero(patch.any(axis=1)), np.flatnonzero(patch.any(axis=0))
                patch = patch[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the shadow alone, same place
                oy, ox = oy + rows[0], ox + cols[0]
                if oy < EDGE_PX or ox < EDGE_PX or oy + patch.shape[0] > size_px - EDGE_PX \
                        or ox + patch.shape[1] > size_px - EDGE_PX:
                    continue
                out["patch"].append(patch.astype(np.float32))
                out["origin"].append((oy, ox))
                out["frame"].append((omega % 360) / step_deg)
                out["grain"].append(gid)
                out["hkl"].append(p.miller_indices())
    out["frames"], out["size"], out["pixel_mm"] = frames, size_px, pixel_mm
    return out


MADE_BY = "pymicro 0.6.1 via benchmarks/independent_scan.py"


def write(path: str, spots: dict, n_grains: int, seed: int, made_by: str = MADE_BY) -> None:
    """The spots file `simulators.hard_scans` reads (``external_spots``), of this script or another model's."""
    import h5py

    with h5py.File(path, "w") as f:
        shapes = np.array([p.shape for p in spots["patch"]], np.int64).reshape(-1, 2)
        f["patch_shape"] = shapes
        f["patch_values"] = np.concatenate([p.ravel() for p in spots["patch"]]) if spots["patch"] else np.zeros(0)
        f["origin"] = np.array(spots["origin"], np.int64).reshape(-1, 2)
        f["frame"] = np.array(spots["frame"], np.float64)
        f["grain"] = np.array(spots["grain"], np.int64)
        f["hkl"] = np.array(spots["hkl"], np.int64).reshape(-1, 3)
        f.attrs.update(frames=spots["frames"], size=spots["size"], pixel_mm=spots["pixel_mm"], distance_mm=DISTANCE_MM,
                       energy_keV=ENERGY_KEV, grains=n_grains, seed=seed, made_by=made_by)


def main(argv=None, simulate=simulate, made_by: str = MADE_BY, doc: str = __doc__) -> int:
    """The command line of this script, or of another model's (its ``simulate(grains, seed, quick)``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="HDF5 file for the spots")
    p.add_argument("--grains", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="256 x 256 px (20 um), 360 frames, for validate.py --quick")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    spots = simulate(args.grains, args.seed, args.quick)
    write(args.out, spots, args.grains, args.seed, made_by)
    print(f"{len(spots['patch'])} spots of {args.grains} grains in {time.monotonic() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
