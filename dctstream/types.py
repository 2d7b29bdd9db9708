"""Records that travel between stages.

Axis order everywhere is (frame, y, x): a scan is a stack of frames, frame k
was recorded at rotation angle psi[k]; y is the detector row, x the column.
All indices are 0-based and absolute (frame 0 is the first frame of the scan)
unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class Blob:
    """A closed 3-D blob: the voxels of one difspot and their corrected values.

    Voxels are sorted in (frame, y, x) order so that two blobs with the same
    voxels have identical arrays.
    """

    id: int
    frame: np.ndarray  # int64, absolute frame index of each voxel
    y: np.ndarray  # int64
    x: np.ndarray  # int64
    value: np.ndarray  # float32, background-corrected intensity
    max_index: tuple[int, int, int]  # (frame, y, x) of the seed maximum
    max_value: float
    # corrected values over the blob's bounding box (frame, y, x), when the segmenter kept them
    volume: np.ndarray | None = field(default=None, repr=False)
    # the spot's counts with its tails below the growth threshold (see segment.segmenter), when known
    total: float | None = None
    # its box, grown by 1 px, holds pixels never segmented (the beam, bad pixels): its intensity may be partial
    touches_mask: bool | None = None
    # (sum, and its moments along frame, y and x) of the measured values over the spot's voxels down to the
    # growth floor (see segment.segmenter): where the centroid is taken, when the segmenter measured them
    moments: tuple[float, float, float, float] | None = None

    @property
    def area(self) -> int:
        return int(self.frame.size)

    @property
    def integral(self) -> float:
        """The spot's integrated intensity: its voxels and their tails when the segmenter measured them."""
        return float(self.value.sum(dtype=np.float64)) if self.total is None else self.total

    @cached_property  # asked for by each sink: six reductions over the voxels every time
    def bbox(self) -> tuple[int, int, int, int, int, int]:
        """(frame0, y0, x0, frame1, y1, x1), inclusive."""
        return (
            int(self.frame.min()), int(self.y.min()), int(self.x.min()),
            int(self.frame.max()), int(self.y.max()), int(self.x.max()),
        )

    @property
    def size(self) -> tuple[int, int, int]:
        """Bounding-box extent (x, y, frames), the order of the size filters."""
        f0, y0, x0, f1, y1, x1 = self.bbox
        return (x1 - x0 + 1, y1 - y0 + 1, f1 - f0 + 1)

    @property
    def centroid(self) -> tuple[float, float, float]:
        """Intensity-weighted centroid (frame, y, x), absolute: over the spot down to the growth floor when
        the segmenter measured it (``moments``), else over the blob's voxels."""
        if self.moments is not None and self.moments[0] > 0:
            total, *first = self.moments
            return tuple(float(m / total) for m in first)
        w = self.value.astype(np.float64)
        total = w.sum()
        if not total > 0:  # a blob seen on the filtered frames whose measured values are noise about 0: its voxels
            w, total = np.ones_like(w), float(w.size)
        return (
            float((w * self.frame).sum() / total),
            float((w * self.y).sum() / total),
            float((w * self.x).sum() / total),
        )

    def voxel_key(self) -> tuple:
        """Hashable identity of the voxel set, for comparing segmentations."""
        return (self.frame.tobytes(), self.y.tobytes(), self.x.tobytes())


@dataclass(frozen=True, eq=False)
class Frame:
    """One detector frame as a source delivers it."""

    index: int  # 0-based position in the scan
    psi_deg: float | None  # rotation angle, when the source knows it
    data: np.ndarray | None  # (y, x), the detector's native dtype; None: the frame was lost in transit


@dataclass(frozen=True, eq=False)
class Difspot:
    """One difspot: its spot-table row, where it lies and its voxels.

    Attributes
    ----------
    id : int
        Difspot id: its row in ``spots.h5`` and its file ``difspots/{id:06d}.h5``.
    bbox : tuple of int
        Bounding box ``(frame0, y0, x0, frame1, y1, x1)``, inclusive.
    centroid : tuple of float
        Intensity-weighted centroid ``(frame, y, x)``.
    area : int
        Number of voxels.
    integral : float
        Sum of the corrected values of its voxels.
    max_value : float
        Corrected value at the seed maximum.
    max_index : tuple of int
        ``(frame, y, x)`` of the seed maximum.
    psi_deg : float or None
        Rotation angle at the centroid frame, degrees; None without angles.
    psi_range_deg : tuple of float or None
        Rotation angles of the first and last frame of the box; None without angles.
    volume : numpy.ndarray
        float32 ``(frames, y, x)`` over the bounding box: the corrected frames
        cut to the box (0 off the difspot when the segmenter kept no sub-volume).
    mask : numpy.ndarray
        bool, the shape of ``volume``: True on the difspot's voxels.
    """

    id: int
    bbox: tuple[int, int, int, int, int, int]
    centroid: tuple[float, float, float]
    area: int
    integral: float
    max_value: float
    max_index: tuple[int, int, int]
    psi_deg: float | None
    psi_range_deg: tuple[float, float] | None
    volume: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    @property
    def frames(self) -> range:
        """The frames of the bounding box."""
        return range(self.bbox[0], self.bbox[3] + 1)

    @property
    def voxels(self) -> np.ndarray:
        """``volume`` with 0 off the difspot (``DataMasked`` of its file)."""
        return np.where(self.mask, self.volume, np.float32(0))

    @property
    def projection(self) -> np.ndarray:
        """``voxels`` summed over frames: the difspot as a (y, x) image."""
        return self.voxels.sum(axis=0, dtype=np.float32)

    @classmethod
    def from_row(cls, row: dict, volume: np.ndarray, mask: np.ndarray, max_index: tuple[int, ...],
                 angles: np.ndarray | None) -> Difspot:
        """The difspot of a spot-table ``row`` (`spot_row` keys) with its box arrays, the seed maximum
        ``(frame, y, x)`` and ψ of every frame (``angles``, degrees, or None)."""
        f0, y0, x0 = int(row["start_frame"]), int(row["bbox_y0"]), int(row["bbox_x0"])
        f1, y1, x1 = int(row["end_frame"]), y0 + int(row["bbox_y_size"]) - 1, x0 + int(row["bbox_x_size"]) - 1
        psi = row.get("centroid_psi_deg")
        psi_range = None
        if angles is not None and f1 < len(angles):
            psi_range = (float(angles[f0]), float(angles[f1]))
        return cls(id=int(row["id"]), bbox=(f0, y0, x0, f1, y1, x1),
                   centroid=(float(row["centroid_frame"]), float(row["centroid_y"]), float(row["centroid_x"])),
                   area=int(row["area"]), integral=float(row["integral"]), max_value=float(row["max_value"]),
                   max_index=(int(max_index[0]), int(max_index[1]), int(max_index[2])), psi_deg=None if psi is None else float(psi),
                   psi_range_deg=psi_range, volume=volume, mask=np.asarray(mask, bool))
