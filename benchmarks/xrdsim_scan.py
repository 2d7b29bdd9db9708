"""Diffraction spots from an independent physics model: xrd-simulator's ray-traced polycrystal diffraction.

Run in its own virtual environment (xrd-simulator 0.4.1 needs Python < 3.11; its dependency pygalmesh
compiles against CGAL and Eigen: ``apt-get install -y libeigen3-dev libcgal-dev`` first, then the
install takes about 10 minutes)::

    /root/.pyenv/versions/3.10.13/bin/python -m venv /tmp/xrdsim-venv
    /tmp/xrdsim-venv/bin/pip install xrd-simulator==0.4.1 h5py
    /tmp/xrdsim-venv/bin/python benchmarks/xrdsim_scan.py --quick --out /tmp/dctstream-validate/xrdsim-spots-quick.h5
    /tmp/xrdsim-venv/bin/python benchmarks/xrdsim_scan.py --out /tmp/dctstream-validate/xrdsim-spots.h5

The same sample and near-field geometry as ``benchmarks/independent_scan.py`` (pymicro), computed by
another code (Henningsson & Hall, J. Appl. Cryst. 2023): an aluminium polycrystal (fcc, a = 4.05 A) of
Voronoi grains in a cylinder (radius 0.48 mm, height 0.6 mm, a 48-sided prism), random orientations,
turns through 360 deg about the lab z axis in a 40 keV beam (along x) that bathes it whole; the detector
stands 8 mm downstream.  Each grain is its Voronoi cell clipped by the cylinder -- a convex polyhedron --
cut into tetrahedra (Delaunay of its corners, about 60 per grain, slivers dropped), so the grain is
exactly the union of its tetrahedra (``TetraMesh.generate_mesh_from_vertices``; pygalmesh is not used
for meshing).  ``Polycrystal.diffract`` solves the Laue equations for every tetrahedron and {111},
{200} reflection (Friedel pairs are separate Miller indices of xrd-simulator's list) and traces the
scattered rays to the detector; ``Detector.render(method='project')`` then deposits each
tetrahedron's path length along the diffracted ray at every pixel centre, times the pixel area and
xrd-simulator's intensity factor: structure factor |F|^2 (from a one-atom Fm-3m CIF written on the
fly), polarisation (beam polarised along y) and Lorentz 1 / (sin 2theta |sin eta|).  A spot is
therefore the grain's projection along the diffracted beam, in units of um^3 x that factor.

Per-spot truth: the scattering units of one grain, one Miller index and one of its two Bragg angles
all share one rotation angle (a strain-free grain has one orientation); each such group is rendered
alone into a patch (cropped to its nonzero pixels, origin = the patch's top-left pixel), with
``frame = (omega % 360) / step`` like independent_scan.py (frame k spans [k, k + 1) of the rotation).
Only spots whole on the detector with an 8 px margin are kept.

Pitfalls handled (see /work/shared/VALIDATION-TOOLS.md):
  * ``RigidBodyMotion`` turns by less than 180 deg: the 360 deg scan is four turns of 90 deg, the
    polycrystal ``transform``-ed between them; a reflection at a seam (t = 1 of one turn, t = 0 of
    the next) is kept once.
  * The Lorentz factor is infinite within 0.5 deg of the rotation axis: reflections whose diffracted
    beam lies within AXIS_CLEARANCE_DEG (1 deg) of the axis are dropped (and any non-finite render).
  * ``method='project'`` centres pixel i at i * pixel_size from ``det_corner_0`` (the 'centroid'
    renderer differs by half a pixel); the detector corners are placed so that pixel (row, col) is
    centred at lab z = (size/2 - row) * pixel, y = (size/2 - col) * pixel: the direct beam hits the
    centre of pixel (size/2, size/2); rows run down (-z) and columns along -y (the image as seen from
    the source).
  * The detector's point-spread function (a 5 x 5 Gaussian by default) is switched off (1 x 1
    kernel): the footprint is the geometric projection, as in independent_scan.py.
  * Every ``diffract`` call regenerates the phase's Miller index list in a random order (xfab's
    ``genhkl_all`` draws from ``np.random``), so a scattering unit's ``hkl_indx`` from an earlier turn
    points at another reflection (and |F|^2) of the reshuffled list: the first turn's list is pinned
    and each unit's index remapped into it.
  * A group must hold every tetrahedron of its grain (one whose centre ray misses the detector is
    left out by xrd-simulator): incomplete spots are dropped with the off-detector ones.

The file holds only the spots (footprint, place, omega) in independent_scan.py's format; xrd-simulator
gives no rocking width, background or noise: ``simulators.hard_scans`` adds a rocking curve, the
beamline background (``ScanModel``'s glow, source ripple, decay and top-up) and detector noise, and
scales the brightest spot to its peak counts (``independent_model``).  ``simulate(..., details=True)``
also returns each spot's omega, eta, wave vectors, intensity factor, grain volume and centroid, for checks.  Nothing this writes is committed.  This script imports nothing
from dctstream (it runs in its own venv).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections import defaultdict

import numpy as np

# independent_scan.py's geometry (--quick: the same sample and geometry in mm, on half the pixels and frames), its
# spots file and command line (it imports nothing of pymicro until it simulates)
from independent_scan import (DISTANCE_MM, EDGE_PX, ENERGY_KEV, FRAMES, PIXEL_MM, QUICK_FRAMES,  # noqa: E402
                              QUICK_SIZE_PX, SIZE_PX, main as spots_main)

LATTICE_A = 4.05  # aluminium, face-centred cubic
MAX_BRAGG_DEG = 5.3  # between {200} (4.39 deg) and {220} (6.21 deg): {111} and {200} only
SAMPLE_RADIUS_UM, SAMPLE_HEIGHT_UM = 480.0, 600.0  # independent_scan.py's cylinder
CYLINDER_SIDES = 48
AXIS_CLEARANCE_DEG = 1.0
TURNS = 4  # RigidBodyMotion needs a rotation angle < 180 deg
HC_KEV_A = 12.398419843320026

AL_CIF = """data_Al
_symmetry_space_group_name_H-M   'F m -3 m'
_symmetry_Int_Tables_number   225
_cell_length_a   {a}
_cell_length_b   {a}
_cell_length_c   {a}
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
loop_
 _atom_site_label
 _atom_site_type_symbol
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
 _atom_site_U_iso_or_equiv
 Al1 Al 0.0 0.0 0.0 1.0 0.0
"""


def grain_cells(n_grains: int, rng: np.random.Generator):
    """Voronoi cells of ``n_grains`` seeds clipped by the cylinder (a prism), each cut into tetrahedra.

    Returns (coord (m, 3) um, enod (n, 4), grain id of each tetrahedron (1..n), grain volumes um^3)."""
    from scipy.spatial import ConvexHull, Delaunay, HalfspaceIntersection

    r = np.sqrt(rng.uniform(0, (0.9 * SAMPLE_RADIUS_UM) ** 2, n_grains))
    phi = rng.uniform(0, 2 * np.pi, n_grains)
    seeds = np.stack([r * np.cos(phi), r * np.sin(phi),
                      rng.uniform(-0.45 * SAMPLE_HEIGHT_UM, 0.45 * SAMPLE_HEIGHT_UM, n_grains)], axis=1)
    sides = 2 * np.pi * np.arange(CYLINDER_SIDES) / CYLINDER_SIDES
    # halfspaces A x + b <= 0: the prism's sides (circumradius = the cylinder's), top and bottom
    box = [np.array([np.cos(s), np.sin(s), 0.0, -SAMPLE_RADIUS_UM * np.cos(np.pi / CYLINDER_SIDES)])
           for s in sides]
    box += [np.array([0, 0, 1.0, -SAMPLE_HEIGHT_UM / 2]), np.array([0, 0, -1.0, -SAMPLE_HEIGHT_UM / 2])]
    coord, enod, grain, volumes = [], [], [], []
    for i, s in enumerate(seeds):
        bisectors = [np.append(t - s, -(t @ t - s @ s) / 2) for j, t in enumerate(seeds) if j != i]
        corners = HalfspaceIntersection(np.array(box + bisectors), s).intersections
        corners = corners[ConvexHull(corners).vertices]
        cell_volume = ConvexHull(corners).volume
        tets = Delaunay(corners).simplices
        e = corners[tets]
        vol = np.abs(np.einsum("ij,ij->i", np.cross(e[:, 1] - e[:, 0], e[:, 2] - e[:, 0]), e[:, 3] - e[:, 0])) / 6
        tets = tets[vol > 1e-4 * cell_volume]  # slivers (Qhull would choke on them)
        enod.append(tets + sum(len(c) for c in coord))
        coord.append(corners)
        grain.append(np.full(len(tets), i + 1))
        volumes.append(vol[vol > 1e-4 * cell_volume].sum())
    return np.concatenate(coord), np.concatenate(enod), np.concatenate(grain), np.array(volumes)


def simulate(n_grains: int, seed: int, quick: bool = False, details: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    from scipy.spatial.transform import Rotation
    from xrd_simulator.beam import Beam
    from xrd_simulator.detector import Detector
    from xrd_simulator.mesh import TetraMesh
    from xrd_simulator.motion import RigidBodyMotion
    from xrd_simulator.phase import Phase
    from xrd_simulator.polycrystal import Polycrystal

    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # xfab's genhkl_all draws from numpy's global generator
    frames, size_px, pixel_mm = (QUICK_FRAMES, QUICK_SIZE_PX, 2 * PIXEL_MM) if quick else (FRAMES, SIZE_PX, PIXEL_MM)
    pixel_um, step_deg = 1000.0 * pixel_mm, 360.0 / frames
    coord, enod, grain_of, grain_volume = grain_cells(n_grains, rng)
    mesh = TetraMesh.generate_mesh_from_vertices(coord, enod)
    u_grain = Rotation.random(n_grains, random_state=seed).as_matrix()  # crystal -> sample
    with tempfile.TemporaryDirectory() as tmp:
        cif = os.path.join(tmp, "al.cif")
        with open(cif, "w") as f:
            f.write(AL_CIF.format(a=LATTICE_A))
        phase = Phase([LATTICE_A] * 3 + [90.0] * 3, "Fm-3m", cif)
        polycrystal = Polycrystal(mesh, u_grain[grain_of - 1], strain=np.zeros((3, 3)), phases=phase)
        wavelength = HC_KEV_A / ENERGY_KEV
        w = 1000.0  # the beam bathes the whole sample
        beam_vertices = np.array([[x, y, z] for x in (-2000.0, 2000.0) for y in (-w, w) for z in (-w, w)])
        beam = Beam(beam_vertices, np.array([1.0, 0, 0]), wavelength, np.array([0, 1.0, 0]))
        half = size_px * pixel_um / 2  # corner 0 = the centre of pixel (0, 0); rows along -z, columns along -y
        d_um = 1000.0 * DISTANCE_MM
        detector = Detector(pixel_um, pixel_um, np.array([d_um, half, half]), np.array([d_um, -half, half]),
                            np.array([d_um, half, -half]))
        detector.point_spread_kernel_shape = (1, 1)  # no blur: the geometric footprint
        assert detector.pixel_coordinates.shape[:2] == (size_px, size_px)
        turn = RigidBodyMotion(np.array([0, 0, 1.0]), 2 * np.pi / TURNS, np.zeros(3))
        groups: dict[tuple, list] = defaultdict(list)
        miller = structure_factors = None
        for t in range(TURNS):
            if t:
                polycrystal.transform(turn, time=1.0)
            detector.frames = []
            polycrystal.diffract(beam, detector, turn, min_bragg_angle=0.0,
                                 max_bragg_angle=np.radians(MAX_BRAGG_DEG), verbose=False)
            # Each diffract() regenerates phase.miller_indices (and the structure factors) in a random
            # order (xfab's genhkl_all draws from np.random): pin the first turn's list and point every
            # scattering unit's hkl_indx into it, so that su.hkl and the rendered |F|^2 stay right.
            if miller is None:
                miller, structure_factors = phase.miller_indices.copy(), phase.structure_factors.copy()
            lookup = {tuple(np.rint(h).astype(int)): i for i, h in enumerate(miller)}
            now = [lookup[tuple(np.rint(h).astype(int))] for h in phase.miller_indices]
            for su in detector.frames[0]:  # one grain's reflection: one Miller index, one time
                su.hkl_indx = now[su.hkl_indx]
                groups[(int(grain_of[su.element_index]), su.hkl_indx, t, round(su.time, 9))].append(su)
        phase.miller_indices, phase.structure_factors = miller, structure_factors
        tets_in = np.bincount(grain_of, minlength=n_grains + 1)
        z_axis = np.array([0, 0, 1.0])
        out: dict[str, list] = defaultdict(list)
        seen = set()
        for (gid, hkl_indx, t, _), units in sorted(groups.items(), key=lambda kv: kv[0][2:]):
            omega = (360.0 / TURNS) * (t + units[0].time)
            key = (gid, hkl_indx, round(omega % 360.0, 3) % 360.0)
            if key in seen:  # the same reflection at a seam between two turns
                continue
            seen.add(key)
            if len(units) != tets_in[gid]:
                continue  # some of the grain's rays miss the detector
            k_out = units[0].scattered_wave_vector
            k_perp = k_out - beam.wave_vector * (k_out @ beam.wave_vector) / (beam.wave_vector @ beam.wave_vector)
            eta = np.degrees(np.arccos(np.clip(k_perp @ z_axis / np.linalg.norm(k_perp), -1, 1)))
            if min(eta, 180.0 - eta) < AXIS_CLEARANCE_DEG:
                continue  # Lorentz factor singular near the rotation axis
            detector.frames = [units]
            image = detector.render(0, lorentz=True, polarization=True, structure_factor=True,
                                    method="project", verbose=False)
            if not np.all(np.isfinite(image)) or image.max() <= 0:
                continue
            rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
            oy, ox = int(rows[0]), int(cols[0])
            patch = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            if oy < EDGE_PX or ox < EDGE_PX or oy + patch.shape[0] > size_px - EDGE_PX \
                    or ox + patch.shape[1] > size_px - EDGE_PX:
                continue
            out["patch"].append(patch.astype(np.float32))
            out["origin"].append((oy, ox))
            out["frame"].append((omega % 360.0) / step_deg)
            out["grain"].append(gid)
            out["hkl"].append(np.rint(units[0].hkl).astype(np.int64))
            if details:  # for checks: what the spot should be
                factor = detector._get_intensity_factor(units[0], True, True, True)
                out["omega_deg"].append(omega)
                out["eta_deg"].append(eta)
                out["k_out"].append(k_out)
                out["k_in"].append(beam.wave_vector)
                out["factor"].append(factor)
                out["grain_volume"].append(grain_volume[gid - 1])
                rot = turn.rotator.get_rotation_matrix(np.radians(omega))
                tets = coord[enod[grain_of == gid]]
                vols = np.abs(np.einsum("ij,ij->i", np.cross(tets[:, 1] - tets[:, 0], tets[:, 2] - tets[:, 0]),
                                        tets[:, 3] - tets[:, 0])) / 6
                out["centroid_lab"].append(rot @ (vols @ tets.mean(axis=1) / vols.sum()))
    spots = dict(out)
    for name in ("patch", "origin", "frame", "grain", "hkl"):
        spots.setdefault(name, [])
    spots["frames"], spots["size"], spots["pixel_mm"] = frames, size_px, pixel_mm
    return spots


def main(argv=None) -> int:
    return spots_main(argv, simulate, "xrd-simulator 0.4.1 via benchmarks/xrdsim_scan.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
