"""Spots across 0/360 degrees: in a scan of a full turn the last frame is the first frame's neighbour.

A spot in the beam as the turn closes shows up twice: as a blob that ends on the
scan's last frame and one that starts on its first. Once the scan has ended and
every difspot is written, each such pair that touches across the seam (a voxel
of one on the last frame next to a voxel of the other on the first, in the
segmentation's connectivity) becomes one spot: one difspot file (the earlier
blob's id, the later one's frames counted on from the scan's length, so that
its frames run on: ``end_frame`` >= frames) and one row of the spot table,
whose ``centroid_frame`` is taken modulo the scan's length.

A spot whose rocking curve peaks a few frames from the seam can leave only its
skirt on the far side: below ``grow_ratio`` x its peak, where a scan that went on
would not grow it, yet on the far side, cut from its maximum, it is a blob with a
maximum of its own on the seam's frame. Such a tail is the spot's: its integral
goes to the spot's row, and its own row and difspot go, as a run segmenting
across the seam would have left it (`tail_across_seam`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import h5py
import numpy as np
import scipy.ndimage as ndi

from .sinks.spot_table import PSI_COLUMN, spot_row
from .sources.hdf5 import closes_turn, radians_like
from .types import Blob

log = logging.getLogger(__name__)


def turn(psi: list[float]) -> float:
    """A whole turn in the unit of ``psi``: 360 degrees, or 2 pi where the angles look like radians (no unit
    said so, and they are kept as recorded: `dctstream.sources.hdf5.radians_like`, which warns)."""
    return 2 * np.pi if radians_like(np.asarray(psi, np.float64)) else 360.0


def full_turn(psi: list[float] | None) -> bool:
    """Whether the angles of a scan cover one whole turn: the frame after the last is the first again."""
    if psi is None or len(psi) < 3:
        return False
    step = float(np.median(np.diff(psi)))
    return bool(step != 0 and abs(abs(psi[-1] - psi[0] + step) - turn(psi)) <= 0.5 * abs(step))


def psi_at(psi: list[float], frame: float) -> float:
    """psi at a (fractional) frame of a full turn, between the last frame and the first too."""
    n = len(psi)
    step = float(np.median(np.diff(psi)))
    frame = frame % n
    if frame <= n - 1:  # frames increase whichever way psi turns (np.interp needs its x increasing)
        return float(np.interp(frame, np.arange(n), psi))
    value = psi[-1] + (frame - (n - 1)) * step
    sign = 1.0 if step > 0 else -1.0
    return float(psi[0] + sign * ((sign * (value - psi[0])) % turn(psi)))


def read_difspot(path: Path, blob_id: int, total: float | None = None,
                 centroid: tuple[float, float, float] | None = None) -> Blob:
    """The blob of a difspot file (``sinks.difspots`` layout: 1-based box, Mask and Data); ``total`` and
    ``centroid``: its integral and centroid (frame, y, x) from the spot table."""
    with h5py.File(path, "r") as f:
        data = f["Data"][()]
        mask = f["Mask"][()].astype(bool)
        origin = f["BoundingBox"][()][0] - 1
        max_rel = f["MaxIntensityIndex"][()] - 1
    fs, ys, xs = np.nonzero(mask)
    max_index = tuple(int(v) for v in max_rel + origin)
    return Blob(id=blob_id, frame=fs + origin[0], y=ys + origin[1], x=xs + origin[2], value=data[fs, ys, xs],
                max_index=max_index, max_value=float(data[tuple(max_rel)]), volume=data, total=total,
                moments=None if centroid is None else (1.0, *centroid))


def _within_reach(ay, ax, by, bx, reach: int) -> bool:
    """A pixel (by, bx) within ``reach`` pixels (x and y) of one of (ay, ax)."""
    y0, x0 = min(ay.min(), by.min()) - reach, min(ax.min(), bx.min()) - reach
    plane = np.zeros((max(ay.max(), by.max()) - y0 + reach + 1, max(ax.max(), bx.max()) - x0 + reach + 1), bool)
    plane[ay - y0, ax - x0] = True
    if reach:
        plane = ndi.binary_dilation(plane, np.ones((2 * reach + 1, 2 * reach + 1), bool))
    return bool(plane[by - y0, bx - x0].any())


def _touch(last: Blob, first: Blob, n: int, reach: int) -> bool:
    """A voxel of ``last`` on frame n - 1 within ``reach`` pixels (x and y) of one of ``first`` on frame 0."""
    a = last.frame == n - 1
    b = first.frame == 0
    return bool(a.any() and b.any()) and _within_reach(last.y[a], last.x[a], first.y[b], first.x[b], reach)


def _tail_across_seam(bright: Blob, tail: Blob, frame: int, reach: int) -> bool:
    """A pixel of ``tail`` on ``frame`` (its maximum's, on the seam) within ``reach`` pixels (x and y) of one
    of ``bright``'s, on any of its frames: the tail lies on the spot."""
    at = tail.frame == frame
    return _within_reach(bright.y, bright.x, tail.y[at], tail.x[at], reach)


def _joined(last: Blob, first: Blob, n: int) -> Blob:
    """One blob of the two, ``first``'s frames counted on after ``last``'s."""
    frame = np.concatenate([last.frame, first.frame + n])
    y, x = np.concatenate([last.y, first.y]), np.concatenate([last.x, first.x])
    value = np.concatenate([last.value, first.value])
    order = np.lexsort((x, y, frame))
    f0, y0, x0 = frame.min(), y.min(), x.min()
    volume = np.zeros((frame.max() - f0 + 1, y.max() - y0 + 1, x.max() - x0 + 1), np.float32)
    for blob, shift in ((last, 0), (first, n)):
        b = blob.bbox
        volume[b[0] + shift - f0:b[3] + shift - f0 + 1, b[1] - y0:b[4] - y0 + 1, b[2] - x0:b[5] - x0 + 1] = blob.volume
    bright, shift = (last, 0) if last.max_value >= first.max_value else (first, n)
    f, my, mx = bright.max_index
    # the parts' centroids (the spot table's) weighted by their voxels' sums (the difspot files'): the same
    # from the files as from the blobs, and from a sparse scan as from the frames
    weights = [float(blob.value.sum(dtype=np.float64)) for blob in (last, first)]
    moments = weights[0] * np.array(last.centroid) + weights[1] * (np.array(first.centroid) + (n, 0, 0))
    return Blob(id=last.id, frame=frame[order], y=y[order], x=x[order], value=value[order],
                max_index=(f + shift, my, mx), max_value=bright.max_value, volume=volume,
                total=last.integral + first.integral, moments=(sum(weights), *(float(m) for m in moments)))


def join_across_seam(table, difspots, n: int, psi_at, connectivity: int = 26, binning: int = 1,
                     blobs: dict[int, Blob] | None = None, *, grow_ratio: float = 0.0, reach_frames: int = 0) -> int:
    """Join the spots across the seam of a full-turn scan of ``n`` frames, in the table and the difspot
    files; ``psi_at(frame)`` gives psi. ``blobs``: the blobs by id, read instead of their files (``difspots``
    None: there are none). ``grow_ratio`` and ``reach_frames`` (the growth box's half-length in frames): the
    segmentation's, which say what a spot's tail across the seam is (0: none is looked for). Returns how many
    spots became part of another."""
    columns = {name: values.copy() for name, values in table.columns().items()}
    if not len(columns.get("id", ())):
        return 0
    reach = binning if connectivity == 26 else 0
    folder = difspots.folder if difspots is not None else None

    def load(i):
        blob_id = int(columns["id"][i])
        if blobs is not None:  # the integral the table holds: a tail's may have been added
            return dataclasses.replace(blobs[blob_id], total=float(columns["integral"][i]))
        return read_difspot(folder / f"{blob_id:06d}.h5", blob_id, float(columns["integral"][i]),
                            tuple(float(columns[f"centroid_{a}"][i]) for a in ("frame", "y", "x")))

    def near(i, j):  # their boxes within reach in x and y
        x0, y0, w, h = (columns[k][i] for k in ("bbox_x0", "bbox_y0", "bbox_x_size", "bbox_y_size"))
        u0, v0, u, v = (columns[k][j] for k in ("bbox_x0", "bbox_y0", "bbox_x_size", "bbox_y_size"))
        return not (u0 > x0 + w + reach or x0 > u0 + u + reach or v0 > y0 + h + reach or y0 > v0 + v + reach)

    def read(*rows):
        try:
            return [load(i) for i in rows]
        except OSError as exc:
            log.warning("difspots %s across 0/360 degrees: cannot read them (%s), left apart",
                        " and ".join(str(columns["id"][i]) for i in rows), exc)
            return None

    dropped: list[int] = []
    tails = 0
    if grow_ratio > 0:
        peak_frame, peak = columns["max_frame"], columns["max_value"]
        for j in np.argsort(peak, kind="stable"):  # dimmest first: a tail's spot is brighter than it
            if columns["start_frame"][j] == 0 and peak_frame[j] == 0:
                reach_to = n - peak_frame  # frames from each spot's maximum to the tail's, across the seam
                skirt = n - 1 - columns["end_frame"]  # frames between each spot's end and the seam
                seam_frame = 0
            elif columns["end_frame"][j] == n - 1 and peak_frame[j] == n - 1:
                reach_to = peak_frame + 1
                skirt = columns["start_frame"]
                seam_frame = n - 1
            else:
                continue
            # a spot whose maximum is nearer across the seam than along the scan, within the growth box, and
            # whose skirt to the seam is no longer than the spot itself (a rocking curve's below tau x its peak
            # is shorter than its part above): a dim spot further on is a spot of its own
            length = columns["end_frame"] - columns["start_frame"] + 1
            spots = np.flatnonzero((peak * grow_ratio > peak[j]) & (reach_to <= reach_frames) & (2 * reach_to <= n)
                                   & (skirt <= length))
            for i in spots[np.argsort(-peak[spots], kind="stable")]:
                if i in dropped or not near(i, j):
                    continue
                pair = read(i, j)
                if pair is None or not _tail_across_seam(*pair, seam_frame, reach):
                    continue
                columns["integral"][i] += columns["integral"][j]
                if "touches_mask" in columns:
                    columns["touches_mask"][i] = int(columns["touches_mask"][i] or columns["touches_mask"][j])
                dropped.append(j)
                tails += 1
                break
    ends = [i for i in np.flatnonzero(columns["end_frame"] == n - 1) if i not in dropped]
    starts = [j for j in np.flatnonzero(columns["start_frame"] == 0) if j not in dropped]
    joined = 0
    for i in ends:
        for j in starts:
            if j in dropped or j == i or not near(i, j):
                continue
            pair = read(i, j)
            if pair is None or not _touch(*pair, n, reach):
                continue
            blob = _joined(*pair, n)
            last, first = pair
            if difspots is not None:
                difspots.write(blob, volume=blob.volume)
            psi = psi_at(blob.centroid[0] % n) if PSI_COLUMN in columns else None
            row = spot_row(blob, psi)
            if "max_frame_acquired" in columns:  # the brighter part's
                row["max_frame_acquired"] = columns["max_frame_acquired"][i if last.max_value >= first.max_value else j]
            row["centroid_frame"] = row["centroid_frame"] % n
            if "touches_mask" in columns:
                row["touches_mask"] = int(columns["touches_mask"][i] or columns["touches_mask"][j])
            for name in columns:
                columns[name][i] = row[name]
            dropped.append(j)
            joined += 1
            break
    if not dropped:
        return 0
    keep = np.setdiff1d(np.arange(len(columns["id"])), dropped)
    table.restore({name: values[keep] for name, values in columns.items()})
    table.flush()
    for j in dropped if folder is not None else ():  # only once the table no longer counts them
        (folder / f"{int(columns['id'][j]):06d}.h5").unlink(missing_ok=True)
    log.info("across 0/360 degrees: %d pairs of spots joined into one each, %d tails taken into their spots",
             joined, tails)
    return joined + tails
