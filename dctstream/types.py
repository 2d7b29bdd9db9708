"""Records that travel between stages.

Axis order everywhere is (frame, y, x): a scan is a stack of frames, frame k
was recorded at rotation angle psi[k]; y is the detector row, x the column.
All indices are 0-based and absolute (frame 0 is the first frame of the scan)
unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def area(self) -> int:
        return int(self.frame.size)

    @property
    def integral(self) -> float:
        """The spot's integrated intensity: its voxels and their tails when the segmenter measured them."""
        return float(self.value.sum(dtype=np.float64)) if self.total is None else self.total

    @property
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
        """Intensity-weighted centroid (frame, y, x), absolute."""
        w = self.value.astype(np.float64)
        total = w.sum()
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
