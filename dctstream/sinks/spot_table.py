"""The spot table ``OUT/spots.h5``: one row per difspot, rewritten whole on each flush.

Layout: group ``/spots`` holds one 1-D dataset per column, all of the same
length, one row per difspot in the order the difspots were added.  Frames and
pixels are 0-based and absolute (frame 0 is the first frame of the scan).

===================  =======  =====================================================
column               dtype    meaning
===================  =======  =====================================================
``id``               int64    difspot id, its file is ``difspots/{id:06d}.h5``
``start_frame``      int64    first frame of the bounding box
``end_frame``        int64    last frame of the bounding box (inclusive)
``max_frame``        int64    frame of the seed maximum
``area``             int64    number of voxels
``integral``         float64  integrated intensity: the voxels' corrected values and their tails
``max_value``        float64  corrected value at the seed maximum
``centroid_x``       float64  intensity-weighted centroid, detector column: over the spot's voxels down to
                              grow_low, not the difspot's alone (see segment.segmenter)
``centroid_y``       float64  intensity-weighted centroid, detector row (the same)
``centroid_frame``   float64  intensity-weighted centroid, frame (the same)
``bbox_x0``          int64    first column of the bounding box
``bbox_y0``          int64    first row of the bounding box
``bbox_x_size``      int64    bounding-box width in columns
``bbox_y_size``      int64    bounding-box height in rows
``touches_mask``     int64    1 when the bounding box, grown by 1 px, holds pixels never
                              segmented (the direct beam of its frames, bad pixels,
                              detector gaps) or saturated in one of its frames (at the top of
                              the frames' 8- or 16-bit type), or an unusable frame (beam off,
                              glitch) lies among its frames or beside them: the spot may be
                              partly hidden, its intensity a lower bound
``centroid_psi_deg`` float64  rotation angle at ``centroid_frame``, degrees; only
                              present when the angles were given
``centroid_x_corrected``,     the centroid corrected for the detector's distortion
``centroid_y_corrected``      (ImageD11, ``detector.distortion``); only present then
===================  =======  =====================================================

Attributes of ``/spots``: every entry of the ``attrs`` given to `SpotTable`
(configuration text, version, source, ...), ``columns`` (the table above as
``name: meaning`` lines) and ``n_spots``.

Readers always see a complete file: each flush writes a hidden temporary file
next to ``spots.h5`` and renames it over the old one.  The file is written with
HDF5 1.10 format bounds so that readers opening it in SWMR mode accept it.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_h5, output_error
from ..errors import OutputError
from ..types import Blob

_CENTROID = "intensity-weighted centroid over the spot's voxels >= grow_low"
COLUMNS: dict[str, tuple[type, str]] = {
    "id": (np.int64, "difspot id, its file is difspots/{id:06d}.h5"),
    "start_frame": (np.int64, "first frame of the bounding box, 0-based absolute"),
    "end_frame": (np.int64, "last frame of the bounding box (inclusive), 0-based absolute"),
    "max_frame": (np.int64, "frame of the seed maximum, 0-based absolute"),
    "max_frame_acquired": (np.int64, "acquisition index of max_frame (frames count along psi, see source.order)"),
    "area": (np.int64, "number of voxels"),
    "integral": (np.float64, "integrated intensity: the voxels and their tails below the growth threshold"),
    "max_value": (np.float64, "corrected value at the seed maximum"),
    "centroid_x": (np.float64, f"{_CENTROID}, detector column, 0-based absolute"),
    "centroid_y": (np.float64, f"{_CENTROID}, detector row, 0-based absolute"),
    "centroid_frame": (np.float64, f"{_CENTROID}, frame, 0-based absolute"),
    "bbox_x0": (np.int64, "first column of the bounding box, 0-based absolute"),
    "bbox_y0": (np.int64, "first row of the bounding box, 0-based absolute"),
    "bbox_x_size": (np.int64, "bounding-box width in columns"),
    "bbox_y_size": (np.int64, "bounding-box height in rows"),
    "touches_mask": (np.int64, "1 when the bounding box, grown by 1 px, holds pixels never segmented (the direct "
                               "beam of its frames, bad pixels, detector gaps) or saturated in one of its frames, "
                               "or an unusable frame (beam off, glitch) lies among its frames or beside them: the "
                               "spot may be partly hidden, its intensity a lower bound"),
    "centroid_psi_deg": (np.float64, "rotation angle at centroid_frame, degrees; "
                                     "only present when the angles were given"),
    "centroid_x_corrected": (np.float64, "centroid_x corrected for the detector's distortion; "
                                         "only present with detector.distortion"),
    "centroid_y_corrected": (np.float64, "centroid_y corrected for the detector's distortion; "
                                         "only present with detector.distortion"),
}
CORRECTED_COLUMNS = ("centroid_x_corrected", "centroid_y_corrected")
PSI_COLUMN = "centroid_psi_deg"
# What the readers of a table (`dctstream.results`, the exports) take from it: in every table ever written
# (max_frame_acquired, touches_mask and the others came later, or only with angles or a distortion).
READ_COLUMNS = ("id", "start_frame", "end_frame", "max_frame", "area", "integral", "max_value", "centroid_x",
                "centroid_y", "centroid_frame", "bbox_x0", "bbox_y0", "bbox_x_size", "bbox_y_size")

# Attribute values h5py stores as plain scalars or strings; anything else
# (None, dicts) would only fail at the first flush, mid-scan.
_ATTR_TYPES = (str, bytes, int, float, bool, np.generic)


def spot_row(blob: Blob, psi_deg: float | None = None, acquired: int | None = None) -> dict:
    """One table row for ``blob``: bounding box and centroid, 0-based absolute; ``acquired``: the acquisition
    index of its max_frame when frames were not processed in their arrival order."""
    f0, y0, x0, f1, y1, x1 = blob.bbox
    cf, cy, cx = blob.centroid
    row = {
        "id": int(blob.id),
        "start_frame": f0,
        "end_frame": f1,
        "max_frame": int(blob.max_index[0]),
        "max_frame_acquired": int(blob.max_index[0]) if acquired is None else int(acquired),
        "area": blob.area,
        "integral": blob.integral,
        "max_value": float(blob.max_value),
        "centroid_x": cx,
        "centroid_y": cy,
        "centroid_frame": cf,
        "bbox_x0": x0,
        "bbox_y0": y0,
        "bbox_x_size": x1 - x0 + 1,
        "bbox_y_size": y1 - y0 + 1,
        "touches_mask": int(bool(blob.touches_mask)),
    }
    if psi_deg is not None:
        row[PSI_COLUMN] = float(psi_deg)
    return row


def ensure_dir(path: Path) -> None:
    """Create ``path`` if needed; raise `OutputError` unless it is a writable folder.

    Called when a sink is built, so that a bad output folder stops the run
    before the scan is read rather than at the first difspot.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: cannot write output, expected a folder, got a file") from None
    except OSError as exc:
        raise output_error(path, exc) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write output, permission denied")


class SpotTable:
    """Collects one row per difspot and rewrites ``OUT/spots.h5`` on `flush`."""

    def __init__(self, out_dir: str | os.PathLike, attrs: dict, distortion=None):
        """``distortion``: a `dctstream.distortion.Distortion` whose ``correct(x, y)`` fills the corrected
        centroid columns, or None (no such columns)."""
        self.path = Path(out_dir) / "spots.h5"
        self.distortion = distortion
        for key, value in attrs.items():
            if not isinstance(value, _ATTR_TYPES):
                raise TypeError(f"spot table attribute {key!r}: expected a string or number, "
                                f"got {type(value).__name__}")
        self.attrs = dict(attrs)
        # Columns live in numpy arrays grown by doubling: a flush then writes
        # slices without converting 100k Python rows, and memory stays at
        # 8 bytes per cell.
        self._data = {name: np.empty(1024, dtype) for name, (dtype, _) in COLUMNS.items()
                      if name != PSI_COLUMN and (distortion is not None or name not in CORRECTED_COLUMNS)}
        self._n = 0
        self._with_psi: bool | None = None  # decided by the first row
        self._dirty = True  # an empty table is still written on the first flush
        ensure_dir(self.path.parent)

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> list[dict]:
        """The rows added so far, as `spot_row` dicts (built on demand, for inspection)."""
        return [{name: values[i].item() for name, values in self._data.items()}
                for i in range(self._n)]

    def column(self, name: str) -> np.ndarray:
        """A copy of one column over the rows added so far; safe to call from another thread."""
        n = self._n  # rows below n are complete: add() fills a row before counting it
        values = self._data.get(name)
        return np.empty(0) if values is None else values[:n].copy()

    def add(self, blob: Blob, psi_deg: float | None = None, acquired: int | None = None) -> dict:
        """Append the row of ``blob`` and return it; every row must have a psi, or none."""
        with_psi = psi_deg is not None
        if self._with_psi is not None and with_psi != self._with_psi:
            raise ValueError(
                f"spot table row {self._n} (difspot {blob.id}): expected "
                f"{'a' if self._with_psi else 'no'} psi like the previous rows, "
                f"got {'one' if with_psi else 'none'}"
            )
        row = spot_row(blob, psi_deg, acquired)
        if self.distortion is not None:
            xc, yc = self.distortion.correct(row["centroid_x"], row["centroid_y"])
            row["centroid_x_corrected"], row["centroid_y_corrected"] = float(xc[0]), float(yc[0])
        if self._with_psi is None:
            self._with_psi = with_psi
            if with_psi:
                self._data[PSI_COLUMN] = np.empty(self._data["id"].size, np.float64)
        if self._n == self._data["id"].size:
            for name, values in self._data.items():
                self._data[name] = np.concatenate([values, np.empty_like(values)])
        for name, values in self._data.items():
            values[self._n] = row[name]
        self._n += 1
        self._dirty = True
        return row

    def with_angles(self) -> None:
        """The scan had angles: the psi column is written even without a row (a scan without spots has the
        columns of one with spots, as its exports do)."""
        if self._with_psi is None:
            self._with_psi = True
            self._data[PSI_COLUMN] = np.empty(self._data["id"].size, np.float64)
            self._dirty = True

    def columns(self) -> dict[str, np.ndarray]:
        """The rows so far, column by column (a view: copy before changing)."""
        return {name: values[:self._n] for name, values in self._data.items()}

    def restore(self, columns: dict[str, np.ndarray]) -> None:
        """Start again from the rows of ``columns()`` (a resumed run); the file is rewritten at the next flush."""
        n = len(columns["id"]) if columns else 0
        size = max(1024, 1 << max(n - 1, 0).bit_length())
        self._data = {}
        for name, (dtype, _) in COLUMNS.items():
            if name in columns:
                self._data[name] = np.empty(size, dtype)
                self._data[name][:n] = columns[name]
        self._n = n
        self._with_psi = (PSI_COLUMN in columns) if n else None
        self._dirty = True

    def update_attrs(self, values: dict) -> None:
        """Set attributes of ``/spots``; the next flush writes them, rows changed or not."""
        self.attrs.update(values)
        self._dirty = True

    def flush(self) -> None:
        """Rewrite ``spots.h5`` with every row so far, unless nothing changed."""
        if not self._dirty:
            return
        # v110 bounds give the superblock version SWMR readers require, and
        # keep the file readable by any HDF5 from 1.10 on.
        with atomic_h5(self.path, libver=("v110", "v110")) as f:
            group = f.create_group("spots", track_order=True)
            for name, values in self._data.items():
                group.create_dataset(name, data=values[:self._n])
            group.attrs.update(self.attrs)
            group.attrs["columns"] = "\n".join(f"{name}: {COLUMNS[name][1]}"
                                               for name in self._data)
            group.attrs["n_spots"] = np.int64(self._n)
        self._dirty = False

    def close(self) -> None:
        self.flush()


def read_run_spots(out_dir: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    """``out_dir/spots.h5`` and its columns; `InputError` (one line) when it is not a run's spot table."""
    from ..errors import InputError

    path = Path(out_dir) / "spots.h5"
    if not path.exists() and (Path(out_dir) / ".dctstream").is_dir():
        raise InputError(f"{path}: not written yet, expected the spot table of a run: this one has written none "
                         "(stopped before its first, or just started); a stopped run: the same command resumes it")
    try:
        columns = read_spot_table(path)
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: cannot read the spot table, expected the spots.h5 of a dctstream run "
                         f"({' '.join(str(exc).split())})") from None
    check_spot_table(path, columns)
    return path, columns


def check_spot_table(path: Path, columns: dict[str, np.ndarray]) -> None:
    """`InputError` naming the column of ``path`` that is missing or not as long as ``id`` (a table edited, or
    written by something else): read as it is, a column was missing from the records (and the export failed
    with a KeyError), or the table could not be put together (a ValueError)."""
    from ..errors import InputError

    missing = [name for name in READ_COLUMNS if name not in columns]
    if missing:
        raise InputError(f"{path}: /spots/{missing[0]}: missing" + (f" (and {', '.join(missing[1:])})"
                                                                    if len(missing) > 1 else "")
                         + ", expected the columns of a dctstream spot table")
    n = len(columns["id"])
    for name, values in columns.items():
        if np.ndim(values) != 1 or len(values) != n:
            raise InputError(f"{path}: /spots/{name}: shape {np.shape(values)}, expected ({n},) as /spots/id: "
                             "one row per difspot")


def read_spot_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``spots.h5``, in the order they were written."""
    with h5py.File(path, "r") as f:
        return {name: dataset[()] for name, dataset in f["spots"].items()}
