"""Hand-off to indexing: the spot table as an ImageD11 columnfile (``OUT/spots.flt``).

The file is what ImageD11's ``columnfile`` reads (and ``peaksearch`` writes):
``# name = value`` parameter lines, then one ``#`` line with the column
titles, then one line per peak, columns separated by spaces, floats as
``%.4f``, integer columns as ``%.0f``.  Conventions (those of ImageD11's 3-D
peak search, ``blobcorrector``/``peaksearch``):

====================  ============================================================
column                from the spot table (0-based pixels and frames)
====================  ============================================================
``sc``, ``fc``        slow (row, y) and fast (column, x) intensity-weighted centroid,
                      corrected for the detector's distortion when the run had
                      ``detector.distortion`` (ImageD11's own correction), else
                      equal to ``s_raw``/``f_raw``
``omega``             rotation angle at the centroid, degrees (``centroid_psi_deg``);
                      the centroid frame when the scan had no angles
``Number_of_pixels``  voxels of the difspot (``area``)
``sum_intensity``     ``integral``; ``avg_intensity`` = integral / voxels
``IMax_int``          corrected value at the maximum; ``IMax_s``/``IMax_f`` its row and
                      column (from the difspot file); ``IMax_o`` its omega
``Min_s``..``Max_f``  bounding box, inclusive, rows (s) and columns (f)
``Min_o``/``Max_o``   lowest and highest omega of the bounding box's frames
``onfirst``/``onlast`` 1 if the difspot touches the first / last frame of the scan
``spot3d_id``         difspot id (file ``difspots/{id:06d}.h5``)
====================  ============================================================

Omegas of frames (``Min_o``, ``Max_o``, ``IMax_o``) come from the straight
line psi = psi0 + step * frame through the difspots' centroids, which is exact
for the continuous rotation of a DCT scan; when the centroids do not lie on
one line (or there is no psi) those columns are left out rather than guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .atomic import replacing
from .errors import InputError, OutputError
from .record import partial_reason, read_record
from .sinks.spot_table import PSI_COLUMN, read_run_spots

FLT_NAME = "spots.flt"
INT_COLUMNS = frozenset({"Number_of_pixels", "IMax_s", "IMax_f", "Min_s", "Max_s", "Min_f", "Max_f", "onfirst",
                         "onlast", "spot3d_id"})
# Largest departure of a centroid's psi from the fitted line, degrees, for frame omegas to be given.
LINE_TOLERANCE_DEG = 1e-6


def _omega_line(table: dict) -> tuple[float, float] | None:
    """(psi0, step): psi = psi0 + step * frame, exact for every centroid, or None."""
    psi = table.get(PSI_COLUMN)
    frames = table["centroid_frame"]
    if psi is None or psi.size < 2 or np.ptp(frames) <= 0:
        return None
    step, psi0 = np.polyfit(frames, psi, 1)
    if np.max(np.abs(psi0 + step * frames - psi)) > LINE_TOLERANCE_DEG * max(1.0, np.max(np.abs(psi))):
        return None
    return float(psi0), float(step)


def _max_pixels(out_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column of each difspot's maximum, from its file (1-based relative there); None without files."""
    folder = out_dir / "difspots"
    if not folder.is_dir():
        return None
    s, f = np.empty(ids.size, np.int64), np.empty(ids.size, np.int64)
    for i, spot_id in enumerate(ids):
        path = folder / f"{int(spot_id):06d}.h5"
        try:
            with h5py.File(path, "r") as h5:
                z, y, x = h5["MaxIntensityIndex"][()]
                s[i] = h5["BoundingBoxYorigin"][()] + y - 2  # both 1-based: back to 0-based absolute
                f[i] = h5["BoundingBoxXorigin"][()] + x - 2
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the difspot's maximum, expected a difspot file "
                             f"({' '.join(str(exc).split())})") from None
    return s, f


def imaged11_columns(out_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The columns (in file order) and parameters of the columnfile of ``out_dir``."""
    out_dir = Path(out_dir)
    path, t = read_run_spots(out_dir)
    line = _omega_line(t)
    has_psi = PSI_COLUMN in t
    omega_of = (lambda frame: line[0] + line[1] * frame) if line else None
    if has_psi and not len(t["id"]):  # no row to fit the line to: the columns of a table with rows, empty
        omega_of = lambda frame: np.asarray(frame, np.float64)  # noqa: E731
    corrected = "centroid_x_corrected" in t
    cols: dict[str, np.ndarray] = {
        "sc": t["centroid_y_corrected"] if corrected else t["centroid_y"],
        "fc": t["centroid_x_corrected"] if corrected else t["centroid_x"],
        "omega": t[PSI_COLUMN] if has_psi else t["centroid_frame"],
        "Number_of_pixels": t["area"],
        "avg_intensity": t["integral"] / np.maximum(t["area"], 1),
        "s_raw": t["centroid_y"],
        "f_raw": t["centroid_x"],
        "sum_intensity": t["integral"],
        "IMax_int": t["max_value"],
    }
    maxima = _max_pixels(out_dir, t["id"])
    if maxima is not None:
        cols["IMax_s"], cols["IMax_f"] = maxima
    if omega_of is not None:
        cols["IMax_o"] = omega_of(t["max_frame"])
    cols.update({
        "Min_s": t["bbox_y0"], "Max_s": t["bbox_y0"] + t["bbox_y_size"] - 1,
        "Min_f": t["bbox_x0"], "Max_f": t["bbox_x0"] + t["bbox_x_size"] - 1,
    })
    if omega_of is not None:  # the range, whichever way the sample turned (+ 0.0: no -0.0000 in the file)
        first, last = omega_of(t["start_frame"]), omega_of(t["end_frame"])
        cols["Min_o"], cols["Max_o"] = np.minimum(first, last) + 0.0, np.maximum(first, last) + 0.0
    record = read_record(out_dir) or {}
    last = (record.get("stats") or {}).get("frames_segmented")
    cols["onfirst"] = (t["start_frame"] == 0).astype(np.int64)
    if last:
        cols["onlast"] = (t["end_frame"] == last - 1).astype(np.int64)
    cols["spot3d_id"] = t["id"]
    unit = (record.get("stats") or {}).get("psi_unit") or "degrees"  # angles that look like radians: kept as read
    params = {"omega_unit": unit if has_psi else "frames", "source": str(record.get("source", "")),
              "software": f"dctstream {record.get('dctstream_version', '')}".strip()}
    if corrected:  # what ImageD11's own peak search says of its sc/fc
        distortion = ((record.get("config") or {}).get("detector") or {}).get("distortion")
        params["spline"] = " ".join(distortion) if isinstance(distortion, list) else str(distortion)
    partial = partial_reason(record, out_dir)
    if partial:
        params["partial"] = partial
    return cols, params


def write_columnfile(path: str | os.PathLike, cols: dict[str, np.ndarray], params: dict[str, str]) -> None:
    """ImageD11's text columnfile: parameters, the titles line, one row per peak (written whole, then renamed)."""
    path = Path(path)
    titles = list(cols)
    formats = ["%.0f" if name in INT_COLUMNS else "%.4f" for name in titles]
    lines = [f"# {name} = {value}" for name, value in sorted(params.items()) if "\n" not in value]
    lines.append("#  " + "  ".join(titles))
    data = np.column_stack([np.asarray(cols[name], np.float64) for name in titles]) if titles else np.empty((0, 0))
    body = "\n".join("  ".join(fmt % v for fmt, v in zip(formats, row)) for row in data)
    try:
        with replacing(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n" + (body + "\n" if body else ""))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write output, {exc.strerror or exc}") from None


def _refuse_other_file(path: Path) -> None:
    """`OutputError` when ``path`` (``--output``) holds a file other than a columnfile: the run's spot table, its
    sparse scan, the scan itself were replaced by the columnfile, their data lost."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except (FileNotFoundError, IsADirectoryError):
        return
    except OSError as exc:
        raise OutputError(f"export --output: {path}: cannot be read ({exc.strerror or exc}), expected a new "
                          "file or a columnfile to replace") from None
    if not head:
        return
    if head.startswith(b"\x89HDF"):
        what = "an HDF5 file"
    else:
        lines = head.decode("utf-8", "replace").splitlines()
        titles = [line[1:].split() for line in lines if line.startswith("#") and "=" not in line]
        if any({"sc", "fc"} <= set(names) for names in titles):
            return
        what = "a file without the '#  sc  fc ...' titles line of a columnfile"
    raise OutputError(f"export --output: {path}: exists and is {what}, expected a new file or an ImageD11 "
                      "columnfile to replace; it is left as it is, choose another --output")


def export_imaged11(out_dir: str | os.PathLike, output: str | os.PathLike | None = None
                    ) -> tuple[Path, int, str | None]:
    """Write ``out_dir/spots.flt`` (or ``output``); returns its path, the number of peaks, and why the results
    are partial (None for a finished run); a partial table is marked so in the file (``# partial = ...``)."""
    cols, params = imaged11_columns(out_dir)
    path = Path(output) if output else Path(out_dir) / FLT_NAME
    if output:
        _refuse_other_file(path)
    write_columnfile(path, cols, params)
    return path, len(cols["sc"]), params.get("partial")


def read_columnfile(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A small reader of the text columnfile (for tests and for users without ImageD11)."""
    params, titles, rows = {}, None, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            if "=" in line:
                name, value = (part.strip() for part in line[1:].split("=", 1))
                params[name] = value
            else:
                titles = line[1:].split()
        elif line.strip():
            rows.append([float(v) for v in line.split()])
    if titles is None:
        raise InputError(f"{path}: no titles line, expected '#  sc  fc  omega ...'")
    data = np.array(rows, np.float64).reshape(-1, len(titles))
    return {name: data[:, i] for i, name in enumerate(titles)}, params
