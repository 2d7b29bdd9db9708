"""The results of a run read back as Python objects: `Run` (an output folder) and its `Difspot` records.

Frames and pixels are 0-based and absolute, axes (frame, y, x), as in
``spots.h5``; the difspot files' 1-based MATLAB indices are converted on reading.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DctStreamError, InputError, OptionalDependencyError
from .types import Difspot

if TYPE_CHECKING:
    from .pipeline import Stats

__all__ = ["Run", "open_run"]

log = logging.getLogger(__name__)


class Run:
    """The output folder of a run, finished or still running; read from disk at each access.

    Made by `dctstream.run` or `dctstream.open_run`.

    Attributes
    ----------
    out : pathlib.Path
        The output folder.
    stats : Stats or None
        The pipeline's counters when this object was made by `dctstream.run`, else None.
    """

    def __init__(self, out: str | os.PathLike, *, stats: Stats | None = None):
        self.out = Path(out)
        self.stats = stats
        self._angles: tuple[str | None, np.ndarray | None] | None = None
        self._table: tuple[tuple[int, int], np.ndarray] | None = None  # (spots.h5 mtime and size, its table)

    def __repr__(self) -> str:
        return f"Run({str(self.out)!r})"

    @property
    def record(self) -> dict[str, Any]:
        """The run record ``OUT/run.json`` (see `dctstream.record`): state, source, counts, config, ..."""
        from .record import RUN_FILE, read_record

        record = read_record(self.out)
        if record is None:
            raise InputError(f"{self.out / RUN_FILE}: missing or unreadable, expected the record of a dctstream run")
        return record

    @property
    def spots(self) -> np.ndarray:
        """The spot table ``OUT/spots.h5`` as a structured array, one field per column (empty before the first
        flush of a running scan).

        ``centroid_psi_deg`` is a field only when the run had angles.
        """
        return self._read_table().copy()

    def _read_table(self) -> np.ndarray:
        """The spot table, read again only when spots.h5 changed (a running scan rewrites it whole)."""
        from .sinks.spot_table import COLUMNS, PSI_COLUMN, check_spot_table, read_spot_table

        path = self.out / "spots.h5"
        try:
            info = path.stat()
        except FileNotFoundError:
            from .record import read_record

            record = read_record(self.out) or {}
            if record.get("spots") and record.get("state") not in ("running", None):  # not before its first flush
                raise InputError(f"{path}: missing, expected the spot table of the run's {record['spots']} "
                                 f"difspots ({self.out / 'run.json'} says {record['state']})") from None
            return np.zeros(0, [(name, dtype) for name, (dtype, _) in COLUMNS.items() if name != PSI_COLUMN])
        version = (info.st_mtime_ns, info.st_size)
        if self._table is not None and self._table[0] == version:
            return self._table[1]
        try:
            columns = read_spot_table(path)
        except (OSError, KeyError) as exc:
            raise InputError(f"{path}: cannot read the spot table ({' '.join(str(exc).split())}), "
                             "expected the spots.h5 of a dctstream run") from None
        check_spot_table(path, columns)
        n = len(next(iter(columns.values()), ()))
        table = np.zeros(n, [(name, values.dtype) for name, values in columns.items()])
        for name, values in columns.items():
            table[name] = values
        self._table = (version, table)
        return table

    def to_pandas(self):
        """The spot table as a `pandas.DataFrame` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise OptionalDependencyError("Run.to_pandas: needs pandas, expected it installed "
                                          "(pip install pandas)") from None
        return pd.DataFrame(self.spots)

    def status(self) -> dict[str, Any]:
        """The current status snapshot, ``OUT/status.json`` (or the run record when there is none)."""
        from .status import read_status

        return read_status(self.out)

    def angles(self) -> np.ndarray | None:
        """ψ of every frame of the scan, degrees, read from the run's ``source.angles``; None without angles."""
        from .record import read_record

        # without a record (lost, or a folder copied without it), the difspots are still there, without psi
        url = ((read_record(self.out) or {}).get("config") or {}).get("source", {}).get("angles")
        if self._angles is None or self._angles[0] != url:
            psi = None
            if url:
                from .sources.hdf5 import read_angles

                try:
                    psi = np.asarray(read_angles(url)[0], np.float64)  # a dataset, or a file of angles
                except DctStreamError as exc:  # the scan moved since: the difspots are still there
                    log.warning("no psi range for the difspots of %s: %s", self.out, exc)
            self._angles = (url, psi)
        return self._angles[1]

    def difspot(self, id: int) -> Difspot:
        """Difspot ``id`` with its row of the spot table and its voxels from ``OUT/difspots/{id:06d}.h5``."""
        import h5py

        if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
            raise InputError(f"difspot({id!r}): expected a whole-number difspot id, got {type(id).__name__}")
        table = self._read_table()
        rows = np.flatnonzero(table["id"] == id)
        if not rows.size:
            raise InputError(f"{self.out / 'spots.h5'}: difspot {id}: not in the spot table, expected one of "
                             f"its {table.size} ids" + (f" ({table['id'].min()}..{table['id'].max()})"
                                                       if table.size else ""))
        row = {name: table[name][rows[0]].item() for name in table.dtype.names or ()}
        path = self.out / "difspots" / f"{int(id):06d}.h5"
        try:
            with h5py.File(path, "r") as h5:
                volume, mask = h5["Data"][()], h5["Mask"][()]
                max_index = h5["MaxIntensityIndex"][()] + h5["BoundingBoxOriginSize"][0] - 2  # both 1-based
        except (OSError, KeyError) as exc:
            raise InputError(f"{path}: cannot read difspot {id} ({' '.join(str(exc).split())}), expected a "
                             "difspot file written by dctstream") from None
        return Difspot.from_row(row, volume, mask, tuple(max_index), self.angles())

    def plot_quicklook(self) -> dict[str, Any]:
        """Matplotlib figures of the spot table (needs matplotlib).

        Returns
        -------
        dict of str to matplotlib.figure.Figure
            ``detector``: centroids on the detector, sized by integral and coloured by frame, with the
            direct-beam box;
            ``spots_per_psi``: difspots per rotation angle (per frame without angles);
            ``integrals``: histogram of the integrals; and ``max_projection``, the run's
            quick-look picture, when it wrote one.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise OptionalDependencyError("Run.plot_quicklook: needs matplotlib, expected it installed "
                                          "(pip install matplotlib)") from None
        spots = self.spots
        figures: dict[str, Any] = {}

        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
        size = 4 + 60 * np.sqrt(np.clip(spots["integral"], 0, None) / max(spots["integral"].max(initial=0), 1e-12))
        dots = ax.scatter(spots["centroid_x"], spots["centroid_y"], s=size, c=spots["centroid_frame"], cmap="viridis")
        ax.set(xlabel="x (px)", ylabel="y (px)", title=f"{spots.size} difspots, centroids", aspect="equal")
        shape = _mask_shape(self.out / "mask.h5")
        if shape is not None:
            ax.set(xlim=(-0.5, shape[1] - 0.5), ylim=(shape[0] - 0.5, -0.5))
        else:
            ax.invert_yaxis()
        from .record import read_record

        beam = ((read_record(self.out) or {}).get("stats") or {}).get("direct_beam")
        if beam:
            from matplotlib.patches import Rectangle

            x0, y0, width, height = beam
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), width, height, fill=False, edgecolor="red",
                                   label="direct beam"))
            ax.legend(loc="upper right", fontsize="small")
        fig.colorbar(dots, ax=ax, label="frame")
        figures["detector"] = fig

        fig = Figure(figsize=(6, 3))
        ax = fig.add_subplot()
        with_psi = "centroid_psi_deg" in (spots.dtype.names or ())
        ax.hist(spots["centroid_psi_deg" if with_psi else "centroid_frame"], bins=72)
        ax.set(xlabel="ψ (degrees)" if with_psi else "frame", ylabel="difspots", title="difspots per rotation angle")
        figures["spots_per_psi"] = fig

        fig = Figure(figsize=(6, 3))
        ax = fig.add_subplot()
        positive = spots["integral"][spots["integral"] > 0]
        if positive.size:
            ax.hist(positive, bins=list(np.geomspace(positive.min(), positive.max() * 1.0001, 40)))
            ax.set_xscale("log")
        ax.set(xlabel="integral (counts)", ylabel="difspots", title="integrated intensities")
        figures["integrals"] = fig

        picture = self.out / "quicklook" / "max_projection.png"
        if picture.is_file():
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(picture) as image:
                    pixels = np.asarray(image)
            except (OSError, UnidentifiedImageError, ValueError) as exc:  # the table's figures are still there
                log.warning("%s: not read (%s), expected a PNG picture: no max_projection figure", picture,
                            " ".join(str(exc).split()))
            else:
                fig = Figure(figsize=(7, 7))
                ax = fig.add_subplot()
                ax.imshow(pixels)
                ax.set_axis_off()
                figures["max_projection"] = fig
        for fig in figures.values():
            fig.tight_layout()
        return figures


def _mask_shape(path: Path) -> tuple[int, int] | None:
    """(y, x) pixels of the detector, from ``OUT/mask.h5`` (binned there); None before it is written."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            binning = int(str(h5.attrs.get("binning", "1")).split()[0])
            ny, nx = h5["mask"].shape
            return int(ny) * binning, int(nx) * binning
    except (OSError, KeyError, ValueError):
        return None


def open_run(out: str | os.PathLike) -> Run:
    """The run whose output folder is ``out``, finished or still running.

    Parameters
    ----------
    out : str or os.PathLike
        The output folder (``output.dir``, ``--out``) of ``dctstream run`` or `dctstream.run`.

    Returns
    -------
    Run

    Raises
    ------
    InputError
        ``out`` is not the output folder of a run (no ``run.json`` and no ``spots.h5``).

    Examples
    --------
    >>> run = dctstream.open_run("scan512_out")  # doctest: +SKIP
    >>> run.spots["integral"].sum()  # doctest: +SKIP
    """
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"open_run(): out: expected the path of a run's output folder, got {type(out).__name__}")
    path = Path(out)
    if not (path / "run.json").is_file() and not (path / "spots.h5").is_file():
        what = "no such folder" if not path.exists() else "no run.json or spots.h5"
        raise InputError(f"{path}: {what}, expected the output folder of a dctstream run")
    return Run(path)
