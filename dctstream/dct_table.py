"""Hand-off to the legacy DCT code: the difspot table in its own column names (``OUT/difspot.h5``, ``.csv``).

One row per difspot, the columns of the DCT pipeline's ``difspot`` table, from
``spots.h5``.  Indices follow the difspot files (``dctstream.sinks.difspots``):
MATLAB, starting at 1, and absolute (from the scan's first frame and the
detector's first pixel), so that a row repeats its difspot file's
``StartImage``, ``EndImage``, ``BoundingBoxXorigin`` ... exactly.

=======================  =======  ===============================================
column                   dtype    from ``spots.h5`` (0-based)
=======================  =======  ===============================================
``difspotID``            int64    ``id`` (file ``difspots/{id:06d}.h5``)
``StartImage``           int64    ``start_frame + 1``
``EndImage``             int64    ``end_frame + 1`` (inclusive)
``MaxImage``             int64    ``max_frame + 1``, frame of the maximum
``ExtStartImage``        int64    = ``StartImage``: the double threshold already
``ExtEndImage``          int64    grows each spot over its whole extent
``Area``                 int64    ``area``, voxels
``CentroidX``            float64  ``centroid_x + 1``, column
``CentroidY``            float64  ``centroid_y + 1``, row
``CentroidImage``        float64  ``centroid_frame + 1``
``BoundingBoxXorigin``   int64    ``bbox_x0 + 1``
``BoundingBoxYorigin``   int64    ``bbox_y0 + 1``
``BoundingBoxXsize``     int64    ``bbox_x_size``
``BoundingBoxYsize``     int64    ``bbox_y_size``
``Integral``             float64  ``integral``, corrected counts
=======================  =======  ===============================================

``difspot.h5``: group ``/difspot``, one 1-D dataset per column in this order,
attributes ``notation_indexing`` and ``source``.  ``difspot.csv``: a header
line of the names, then one line per difspot (integers as integers, floats
in the shortest text that reads back to the same value).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_h5, replacing
from .errors import OutputError
from .record import partial_reason, read_record
from .sinks.spot_table import read_run_spots

H5_NAME, CSV_NAME = "difspot.h5", "difspot.csv"
INDEXING = "starts with 1 (MATLAB), absolute"

# DCT column -> (spots.h5 column, added to it)
_FROM_SPOTS = {
    "difspotID": ("id", 0),
    "StartImage": ("start_frame", 1),
    "EndImage": ("end_frame", 1),
    "MaxImage": ("max_frame", 1),
    "ExtStartImage": ("start_frame", 1),
    "ExtEndImage": ("end_frame", 1),
    "Area": ("area", 0),
    "CentroidX": ("centroid_x", 1),
    "CentroidY": ("centroid_y", 1),
    "CentroidImage": ("centroid_frame", 1),
    "BoundingBoxXorigin": ("bbox_x0", 1),
    "BoundingBoxYorigin": ("bbox_y0", 1),
    "BoundingBoxXsize": ("bbox_x_size", 0),
    "BoundingBoxYsize": ("bbox_y_size", 0),
    "Integral": ("integral", 0),
}
COLUMNS = tuple(_FROM_SPOTS)


def difspot_columns(spots: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The DCT difspot table's columns from the columns of a ``spots.h5``."""
    return {name: spots[column] + offset for name, (column, offset) in _FROM_SPOTS.items()}


def _refuse_other_files(h5_path: Path, csv_path: Path) -> None:
    """`OutputError` when ``--output`` (or the ``.csv`` beside it) holds a file other than a DCT difspot table:
    the run's spot table, its sparse scan, the scan itself were replaced by the table, their data lost."""
    import h5py

    for path in (h5_path, csv_path):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if path.is_dir():
            raise OutputError(f"export --output: {path}: is a folder, expected a file to write")
        if not size:
            continue
        what = None
        if path is h5_path:
            try:
                with h5py.File(path, "r") as f:
                    if set(f) != {"difspot"}:
                        what = f"an HDF5 file holding {', '.join(sorted(f)) or 'nothing'}"
            except OSError:
                what = "not an HDF5 file"
        else:
            try:
                lines = [line for line in path.read_text(errors="replace").splitlines()[:8]
                         if not line.startswith("#")]
            except OSError as exc:
                raise OutputError(f"export --output: {path}: cannot be read ({exc.strerror or exc}), expected "
                                  "a new file or a difspot table to replace") from None
            if not lines or not lines[0].startswith("difspotID,"):
                what = "a file without the difspotID,... header of a difspot table"
        if what:
            raise OutputError(f"export --output: {path}: exists and is {what}, expected a new file or a DCT "
                              "difspot table to replace; it is left as it is, choose another --output")


def export_dct(out_dir: str | os.PathLike, output: str | os.PathLike | None = None, *, finished: bool = False
               ) -> tuple[list[Path], int, str | None]:
    """Write ``out_dir/difspot.h5`` and ``difspot.csv`` (or ``output`` and its ``.csv``); their paths, the
    number of difspots, and why the results are partial (None for a finished run; ``finished``: the run ending
    so, before its record says it): a partial table says so in both files (the group's ``partial`` attribute,
    a first ``# partial = ...`` line)."""
    out_dir = Path(out_dir)
    path, spots = read_run_spots(out_dir)
    cols = difspot_columns(spots)
    partial = None if finished else partial_reason(read_record(out_dir) or {}, out_dir)
    h5_path = Path(output) if output else out_dir / H5_NAME
    csv_path = h5_path.with_suffix(".csv")
    if output:
        if h5_path.suffix.lower() not in (".h5", ".hdf5", ".hdf"):
            # the table is HDF5, its .csv beside it: 'table.csv' wrote the HDF5 file and then the csv over it
            raise OutputError(f"export --output: {h5_path}: expected the name of the HDF5 table, ending in .h5 "
                              f"(its .csv is written beside it: {csv_path.name})")
        _refuse_other_files(h5_path, csv_path)
    with atomic_h5(h5_path) as f:
        group = f.create_group("difspot", track_order=True)
        for name, values in cols.items():
            group.create_dataset(name, data=values)
        group.attrs["notation_indexing"] = INDEXING
        group.attrs["source"] = str(path)
        if partial:
            group.attrs["partial"] = partial
    lines = ([f"# partial = {partial}"] if partial else []) + [",".join(COLUMNS)]
    for row in zip(*cols.values()):
        lines.append(",".join(str(int(v)) if isinstance(v, np.integer) else repr(float(v)) for v in row))
    try:
        with replacing(csv_path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise OutputError(f"{csv_path}: cannot write output, {exc.strerror or exc}") from None
    return [h5_path, csv_path], len(cols["difspotID"]), partial


def read_difspot_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``difspot.csv`` (for tests and for users without the DCT code)."""
    header, *rows = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    names = header.split(",")
    data = [line.split(",") for line in rows if line]
    out = {}
    for i, name in enumerate(names):
        kind = float if name in ("CentroidX", "CentroidY", "CentroidImage", "Integral") else int
        out[name] = np.array([kind(row[i]) for row in data], np.float64 if kind is float else np.int64)
    return out
