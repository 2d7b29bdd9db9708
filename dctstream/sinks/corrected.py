"""``OUT/corrected.h5``: the corrected frames, written one by one as the scan runs.

``export.format: sparse`` (the default) writes the sparse corrected scan, in
the layout of ImageD11's sparse segmentation files: group ``/1.1`` holds 1-D
datasets ``row``, ``col`` (uint16) and ``intensity`` (float32), the unmasked
pixels at or above each frame's cut, concatenated over frames in (frame, row,
col) order; ``nnz`` (frames,) uint32 is the count of each frame (frame k's
pixels start at ``sum(nnz[:k])``) and ``measurement/rot`` the rotation angle
psi of each frame, degrees (when the scan has angles). Attributes: ``shape0``,
``shape1`` (the frame shape), ``nframes``, ``npx``, ``itype``. Each frame's
cut is a map of ``tile_px``-pixel tiles: ``cut`` (frames, tiles_y, tiles_x)
float32, a pixel is kept when its value is >= its tile's cut; ``noise_sigma``
(frames, tiles_y, tiles_x) float64 is the noise followed along psi that the
frame's segmentation thresholds come from, ``level`` (frames, tiles_y, tiles_x)
float32 the level its unfiltered values were taken less (``unfiltered``, the values
spots are measured with: `dctstream.segment.noise`), ``mask`` (y, x) the pixels never
segmented, and the group's ``direct_beam`` attribute the beam box, so that
``dctstream resegment`` can segment the scan again with other parameters.
The pixel datasets are bitshuffle + LZ4 compressed (``import hdf5plugin`` to
read them) and written a whole chunk at a time, each chunk once; the file is in
SWMR mode while written (readers open it with ``swmr=True``; it is flushed every
``FLUSH_S`` seconds and at each checkpoint) and ``nnz`` only counts frames whose
pixels and maps are all in. ``nframes`` and ``npx`` are
set when the run ends.

``export.format: stack`` writes dataset ``/corrected`` (frames, y, x), one
frame per chunk, bitshuffle + LZ4.

With ``export.dtype`` uint8 or uint16 the values are stretched:
``q = clip(round((v - lo) / (hi - lo) * qmax), 0, qmax)`` with lo, hi the
``export.percentiles`` of the first exported frame's unmasked pixels; ``lo``
and ``hi`` are attributes, so ``v ~ lo + q * (hi - lo) / qmax``.

Coordinates are in the frames' (binned) pixels, attribute ``binning``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from ..atomic import abandon_h5, output_error
from ..direct_beam import saturated_arrays, saturated_from_arrays
from ..errors import InputError, OutputError
from ._kernels import pixels_at_or_above

log = logging.getLogger(__name__)

SCAN_GROUP = "1.1"
# Pixels per chunk of row, col and intensity (fewer for small frames): each chunk is compressed and
# written once.
CHUNK_PX = 1 << 16
MIN_CHUNK_PX = 1 << 12
# Frames per chunk of nnz and the angles: not compressed, so a chunk filled over several frames is
# rewritten in place.
CHUNK_FRAMES = 4096
# Frames per chunk of the cut and noise maps (not compressed either): 512 KiB at 2048 x 2048.
MAP_CHUNK_FRAMES = 16
# Seconds between flushes of the sparse scan's file, which make what is written visible to SWMR readers: at
# each chunk of pixels, which fills every frame or two at 2048 x 2048, they took 1.3 ms a frame of the
# segmenting thread. A checkpoint's ``state()`` and ``close()`` flush at once.
FLUSH_S = 1.0
_PIXELS = ("row", "col", "intensity")
_COMPRESSED = hdf5plugin.Bitshuffle(cname="lz4")


def _stretch(values: np.ndarray, stretch, dtype) -> np.ndarray:
    if stretch is None:
        return values.astype(np.float32, copy=False)
    lo, hi = stretch
    qmax = np.iinfo(dtype).max
    return np.clip(np.rint((values - lo) / (hi - lo) * qmax), 0, qmax).astype(dtype)


def first_stretch(cfg, frame, keep) -> tuple[float, float]:
    """(lo, hi): the ``export.percentiles`` of the first exported frame's ``keep`` pixels."""
    lo, hi = np.percentile(frame[keep], cfg.percentiles)
    return float(lo), float(max(hi, lo + 1e-6))


def _put_stretch(h5, stretch) -> None:
    h5.attrs.update({"stretch_lo": stretch[0], "stretch_hi": stretch[1],
                     "stretch": "value ~ stretch_lo + q * (stretch_hi - stretch_lo) / qmax"})


def _first_stretch(h5, cfg, frame, keep):
    stretch = first_stretch(cfg, frame, keep)
    _put_stretch(h5, stretch)
    return stretch


class CorrectedFrameWriter:
    """``export.format: stack``: appends each corrected frame to ``path``; ``reduction`` = raw bytes read /
    bytes written, after ``close``."""

    def __init__(self, path: str | os.PathLike, cfg, frame_shape, mask: np.ndarray, raw_frame_bytes: float, *,
                 binning: int = 1):
        self.path = Path(path)
        self.cfg = cfg
        self.frame_shape = tuple(frame_shape)
        self.keep = ~np.asarray(mask, bool)
        self.raw_frame_bytes = raw_frame_bytes
        self.dtype = np.dtype(cfg.dtype)
        self.stretch: tuple[float, float] | None = None
        self.frames = 0
        self.reduction: float | None = None
        ny, nx = self.frame_shape
        try:
            self.h5 = h5py.File(self.path, "w", libver="latest")
            self.h5.attrs.update({"binning": binning, "format": cfg.format, "dtype": cfg.dtype})
            self.data = self.h5.create_dataset("corrected", shape=(0, ny, nx), maxshape=(None, ny, nx),
                                               dtype=self.dtype, chunks=(1, ny, nx), **_COMPRESSED)
            self.h5.swmr_mode = True
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def write(self, k: int, frame: np.ndarray) -> None:
        if k != self.frames:
            raise ValueError(f"frame {k}: expected frame {self.frames}")
        if self.dtype != np.float32 and self.stretch is None:
            self.stretch = _first_stretch(self.h5, self.cfg, frame, self.keep)
        self.data.resize(k + 1, axis=0)
        self.data[k] = _stretch(frame, self.stretch, self.dtype)
        self.frames += 1
        self.h5.flush()

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()
            self.reduction = float(self.frames * self.raw_frame_bytes / self.path.stat().st_size)


def being_written(path: str | os.PathLike) -> bool:
    """Whether the HDF5 file at ``path`` is open for writing, or was when its writer died (the file-consistency
    flags of its superblock, version 2 and later, are set), so that a reader must open it with ``swmr=True``.

    Only then: a SWMR reader takes a checksum that fails for a write under way and reads again, for minutes,
    and does not compare the file's end with the one recorded, so a closed file cut short (a copy that
    stopped, a full disk) hung ``resegment`` and ``tune``; opened plainly it is an error at once."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return True  # let h5py say what is wrong
    return len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or (head[8] >= 2 and head[11] != 0)


def _selection_arrays(size: int) -> tuple[np.ndarray, ...]:
    """Rows, cols, values and unfiltered values of ``size`` selected pixels (`SparseScanWriter._select`)."""
    return np.empty(size, np.uint16), np.empty(size, np.uint16), np.empty(size, np.float32), np.empty(size, np.float32)


class SparseScanWriter:
    """``export.format: sparse``: the unmasked pixels of each corrected frame at or above its cut, appended to
    ``path`` with the frame's cut and noise maps.

    With ``unfiltered``, each kept pixel's value before the 3x3 median filter too (dataset ``unfiltered``):
    the values a run measures its spots with (`dctstream.segment.Segmenter` ``measured``).

    ``state()`` is what a checkpoint keeps (the counts in the file and what is not written yet, less than
    a chunk of pixels); a writer made with ``resume=`` that state copies the file's first chunks to a new
    file and continues as the first one would have, so that a resumed run ends with the same datasets.
    After ``close``: ``reduction`` (raw bytes read / bytes of the datasets), ``fill_fraction`` (pixels kept /
    unmasked pixels) and ``bytes_per_frame`` (of the datasets; the file adds a few kB of metadata).
    """

    _MAPS = (("cut", np.float32), ("noise_sigma", np.float64), ("level", np.float32))

    def __init__(self, path: str | os.PathLike, cfg, frame_shape, mask: np.ndarray, tile_px: int,
                 raw_frame_bytes: float, *, binning: int = 1, binning_mode: str = "sum", angles: bool = False,
                 direct_beam=None, unfiltered: bool = False, resume: dict | None = None,
                 stretch_mask: np.ndarray | None = None, photon_gain: float | None = None):
        self.path = Path(path)
        self.pixel_names = _PIXELS + (("unfiltered",) if unfiltered else ())
        self.cfg = cfg
        self.frame_shape = tuple(frame_shape)
        self.mask = np.ascontiguousarray(mask, bool)
        # pixels the stretch's percentiles leave out: the mask, and a followed beam's box (its pixels read 0)
        self._stretch_mask = self.mask if stretch_mask is None else np.asarray(stretch_mask, bool)
        self.tile_px = int(tile_px)
        ny, nx = self.frame_shape
        self.tiles = (-(-ny // self.tile_px), -(-nx // self.tile_px))
        self.raw_frame_bytes = raw_frame_bytes
        self.dtype = np.dtype(cfg.dtype)
        self.angles = angles
        self.stretch: tuple[float, float] | None = None
        self.frames = 0  # frames given to write()
        self.file_px = 0  # pixels in the file: whole chunks until close
        self.file_frames = 0  # frames in nnz: those whose pixels are all in the file
        self.pixels = 0  # pixels of every frame given
        self._pending: list[tuple[np.ndarray, ...]] = []  # pixels not in the file yet: rows, cols, values...
        self._selected = _selection_arrays(max(ny * nx // 16, 1024))  # see _select
        self._pending_px = 0
        # of the frames not in nnz yet: their counts, angles, cut and noise maps
        self._nnz: list[int] = []
        self._psi: list[float] = []
        self._maps: dict[str, list[np.ndarray]] = {name: [] for name, _ in self._MAPS}
        self.reduction = self.fill_fraction = self.bytes_per_frame = None
        self.failed = False
        # frame -> flat indices of its saturated pixels (`Detector.saturated`), written at close for resegment
        self.saturated: dict[int, np.ndarray] = {}
        self._flushed_s = time.monotonic()
        self.chunk_px = int(np.clip(ny * nx // 4, MIN_CHUNK_PX, CHUNK_PX))
        if max(ny, nx) > 65536:
            raise OutputError(f"{self.path}: frames of {ny} x {nx} pixels, expected at most 65536 a side "
                              "for uint16 row and col (ImageD11 sparse layout)")
        target = self.path if resume is None else self.path.with_name(f".{self.path.name}.resumed")
        try:
            self.h5 = h5py.File(target, "w", libver="latest")
            self.h5.attrs.update({"binning": binning, "binning_mode": binning_mode, "format": cfg.format,
                                  "dtype": cfg.dtype})
            group = self.group = self.h5.create_group(SCAN_GROUP)
            group.attrs.update({"shape0": ny, "shape1": nx, "nframes": 0, "npx": 0, "itype": "uint16",
                                "tile_px": self.tile_px,
                                "direct_beam": [] if direct_beam is None else [int(v) for v in direct_beam],
                                **({} if photon_gain is None else {"photon_gain": float(photon_gain)}),
                                "cut": "pixels with corrected value >= cut[frame, y // tile_px, x // tile_px] "
                                       "outside mask, counts"})
            group.create_dataset("mask", data=self.mask.astype(np.uint8), chunks=True, **_COMPRESSED)
            self.data = {name: group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                    chunks=(self.chunk_px,), **_COMPRESSED)
                         for name, dtype in zip(self.pixel_names, (np.uint16, np.uint16, self.dtype, self.dtype))}
            self.map_data = {name: group.create_dataset(name, shape=(0, *self.tiles), maxshape=(None, *self.tiles),
                                                        dtype=dtype, chunks=(MAP_CHUNK_FRAMES, *self.tiles))
                             for name, dtype in self._MAPS}
            self.nnz = group.create_dataset("nnz", shape=(0,), maxshape=(None,), dtype=np.uint32,
                                            chunks=(CHUNK_FRAMES,))
            self.rot = group.create_dataset("measurement/rot", shape=(0,), maxshape=(None,), dtype=np.float64,
                                            chunks=(CHUNK_FRAMES,)) if angles else None
            if resume is not None:
                self._take_back(resume)
            self.h5.swmr_mode = True
        except OSError as exc:
            raise output_error(target, exc) from exc
        if resume is not None:
            os.replace(target, self.path)

    # ---- checkpoint ----------------------------------------------------------------
    def state(self) -> dict:
        """The counts and what is not in the file yet, as a checkpoint keeps them (plain values and arrays);
        what is in the file is flushed first, so that a run resumed from this state finds it there."""
        self._flush(0, sync=True)
        pending = self._pending_arrays()
        maps = {name: np.array(self._maps[name], dtype).reshape(-1, *self.tiles) for name, dtype in self._MAPS}
        return {"frames": self.frames, "file_px": self.file_px, "file_frames": self.file_frames, "angles": self.angles,
                "pixels": self.pixels, "stretch": self.stretch, "rows": pending[0], "cols": pending[1],
                "values": pending[2], "unfiltered_values": pending[3] if len(pending) > 3 else np.empty(0, self.dtype),
                "nnz": np.array(self._nnz, np.int64), "psi": np.array(self._psi, np.float64), **maps}

    STATE_ARRAYS = ("rows", "cols", "values", "unfiltered_values", "nnz", "psi", "cut", "noise_sigma", "level")
    STATE_VALUES = ("frames", "file_px", "file_frames", "pixels", "stretch", "angles")

    def _take_back(self, state: dict) -> None:
        """Copy the file's first ``file_px`` pixels and ``file_frames`` frames from the killed run's file."""
        file_px, file_frames = int(state["file_px"]), int(state["file_frames"])
        try:
            with h5py.File(self.path, "r", swmr=True) as old:
                group = old[SCAN_GROUP]
                for name in self.pixel_names:
                    self.data[name].resize(file_px, axis=0)
                    for start in range(0, file_px, self.chunk_px):  # a chunk at a time: each written once, whole
                        self.data[name][start:start + self.chunk_px] = group[name][start:start + self.chunk_px]
                for name in ("nnz", "cut", "noise_sigma", "level", *(("measurement/rot",) if self.angles else ())):
                    self.group[name].resize(file_frames, axis=0)
                    self.group[name][:] = group[name][:file_frames]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise OutputError(f"{self.path}: cannot continue the sparse scan of the unfinished run ({exc}), "
                              "expected the file it was writing; pass --overwrite to start again") from None
        self.frames, self.file_px, self.file_frames = int(state["frames"]), file_px, file_frames
        self.pixels = int(state["pixels"])
        self.stretch = None if state["stretch"] is None else tuple(state["stretch"])
        if self.stretch is not None:
            _put_stretch(self.h5, self.stretch)
        if len(state["rows"]):
            self._pending = [(np.asarray(state["rows"], np.uint16), np.asarray(state["cols"], np.uint16),
                              np.asarray(state["values"], self.dtype),
                              *((np.asarray(state["unfiltered_values"], self.dtype),) if len(self.pixel_names) > 3
                                else ()))]
        self._pending_px = len(state["rows"])
        self._nnz = [int(n) for n in state["nnz"]]
        self._psi = [float(p) for p in state["psi"]]
        self._maps = {name: list(np.asarray(state[name], dtype)) for name, dtype in self._MAPS}

    # ---- writing -------------------------------------------------------------------
    def write(self, k: int, frame: np.ndarray, cut: np.ndarray, noise_sigma: np.ndarray,
              psi_deg: float | None = None, unfiltered: np.ndarray | None = None,
              level: np.ndarray | None = None) -> None:
        """Frame k's pixels at or above ``cut`` (float32 tile map), with ``noise_sigma`` (tile map); with the
        writer's ``unfiltered``, the same pixels of ``unfiltered`` (the frame before its median filter, less
        its ``level``, a tile map: 0 if None)."""
        cut = np.ascontiguousarray(cut, np.float32)
        self._check(k, cut, noise_sigma, unfiltered, level)
        if self.dtype != np.float32 and self.stretch is None:
            self.stretch = _first_stretch(self.h5, self.cfg, frame, ~self._stretch_mask)
        rows, cols, values, below = self._select(frame, cut, unfiltered)
        self._add(rows, cols, values, cut, noise_sigma, psi_deg, below, level)

    def write_pixels(self, k: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, cut: np.ndarray,
                     noise_sigma: np.ndarray, psi_deg: float | None = None,
                     unfiltered: np.ndarray | None = None, level: np.ndarray | None = None) -> None:
        """Frame k's pixels already selected (float32 values, as `write` selects them, and their unfiltered
        values): the frames of a scan split over workers. A stretched export's ``stretch`` is set before."""
        cut = np.ascontiguousarray(cut, np.float32)
        self._check(k, cut, noise_sigma, unfiltered, level)
        if self.dtype != np.float32 and self.stretch is None:
            raise ValueError(f"frame {k}: export.dtype {self.dtype}: expected the stretch set before")
        self._add(np.asarray(rows, np.uint16), np.asarray(cols, np.uint16), np.asarray(values, np.float32), cut,
                  noise_sigma, psi_deg, unfiltered, level)

    def set_stretch(self, stretch: tuple[float, float]) -> None:
        self.stretch = (float(stretch[0]), float(stretch[1]))
        _put_stretch(self.h5, self.stretch)

    def _check(self, k: int, cut: np.ndarray, noise_sigma: np.ndarray, unfiltered, level) -> None:
        if (unfiltered is not None) != (len(self.pixel_names) > 3):
            raise ValueError(f"frame {k}: unfiltered: expected {'a frame' if len(self.pixel_names) > 3 else None}")
        if k != self.frames:
            raise ValueError(f"frame {k}: expected frame {self.frames}")
        if cut.shape != self.tiles or np.shape(noise_sigma) != self.tiles:
            raise ValueError(f"frame {k}: cut, noise_sigma: expected {self.tiles} tile maps, got {cut.shape}, "
                             f"{np.shape(noise_sigma)}")
        if level is not None and np.shape(level) != self.tiles:
            raise ValueError(f"frame {k}: level: expected a {self.tiles} tile map, got {np.shape(level)}")

    def _add(self, rows, cols, values, cut, noise_sigma, psi_deg, unfiltered, level) -> None:
        more = () if unfiltered is None else (_stretch(np.asarray(unfiltered, np.float32), self.stretch, self.dtype),)
        self._pending.append((rows, cols, _stretch(values, self.stretch, self.dtype), *more))
        self._pending_px += rows.size
        self._nnz.append(rows.size)
        self._psi.append(np.nan if psi_deg is None else psi_deg)
        self._maps["cut"].append(cut)
        self._maps["noise_sigma"].append(np.asarray(noise_sigma, np.float64))
        self._maps["level"].append(np.zeros(self.tiles, np.float32) if level is None else np.asarray(level, np.float32))
        self.frames += 1
        self.pixels += rows.size
        if self._pending_px >= self.chunk_px:
            self._flush(self._pending_px // self.chunk_px * self.chunk_px)

    def _select(self, frame: np.ndarray, cut: np.ndarray, unfiltered: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """rows, cols (uint16) and values of the pixels at or above the cut, outside the mask, and those
        pixels' values in ``unfiltered`` (None without it)."""
        frame = np.ascontiguousarray(frame)
        if unfiltered is not None:
            unfiltered = np.ascontiguousarray(unfiltered, np.float32)
        for name, f in (("frame", frame), ("unfiltered", unfiltered)):
            if f is not None and (f.dtype != np.float32 or f.shape != self.frame_shape):
                raise ValueError(f"{name}: expected float32 {self.frame_shape}, got {f.dtype} {f.shape}")
        while True:  # into the writer's own arrays, made twice as large whenever a frame holds more
            rows, cols, values, below = self._selected
            n = pixels_at_or_above(frame, unfiltered if unfiltered is not None else frame[:0], cut, self.tile_px,
                                   self.mask, rows, cols, values, below)
            if n >= 0:
                break
            self._selected = _selection_arrays(2 * rows.size)
        return rows[:n].copy(), cols[:n].copy(), values[:n].copy(), None if unfiltered is None else below[:n].copy()

    def _pending_arrays(self) -> tuple[np.ndarray, ...]:
        if len(self._pending) != 1:
            empty = (np.empty(0, np.uint16), np.empty(0, np.uint16), np.empty(0, self.dtype), np.empty(0, self.dtype))
            self._pending = [tuple(np.concatenate([p[i] for p in self._pending] or [empty[i]])
                                   for i in range(len(self.pixel_names)))]
        return self._pending[0]

    def _flush(self, n: int, sync: bool = False) -> None:
        """Write the first ``n`` pending pixels, and the counts and maps of the frames now whole in the file;
        flush the file every FLUSH_S seconds, or now with ``sync``."""
        try:
            self._write_pending(n)
            if sync or time.monotonic() - self._flushed_s >= FLUSH_S:
                self.h5.flush()
                self._flushed_s = time.monotonic()
        except (OSError, RuntimeError) as exc:  # h5py reports a failed write (full disk) as RuntimeError
            if isinstance(exc, RuntimeError) and "errno = " not in str(exc):
                raise
            raise output_error(self.path, exc) from None

    def _write_pending(self, n: int) -> None:
        pending = self._pending_arrays()
        start = self.file_px
        for name, values in zip(self.pixel_names, pending):
            self.data[name].resize(start + n, axis=0)
            self.data[name][start:] = values[:n]
        self._pending = [tuple(v[n:] for v in pending)]
        self._pending_px -= n
        self.file_px += n
        # the frames whose pixels are now all in the file: their counts add up to at most file_px
        counted = self.pixels - sum(self._nnz)
        done = int(np.searchsorted(np.cumsum(self._nnz), self.file_px - counted, side="right"))
        if done:
            end = self.file_frames + done
            # the maps and angles first: a reader sees a frame once nnz counts it
            for name, _ in self._MAPS:
                self.map_data[name].resize(end, axis=0)
                self.map_data[name][self.file_frames:] = np.stack(self._maps[name][:done])
                del self._maps[name][:done]
            if self.rot is not None:
                self.rot.resize(end, axis=0)
                self.rot[self.file_frames:] = self._psi[:done]
            self.nnz.resize(end, axis=0)
            self.nnz[self.file_frames:] = self._nnz[:done]
            self.file_frames = end
            del self._nnz[:done], self._psi[:done]

    def close(self) -> None:
        if not self.h5.id.valid or self.failed:
            return
        failed = None
        try:
            self._flush(self._pending_px, sync=True)
        except OutputError as exc:
            failed = exc
        if failed is not None:
            # a file whose writes fail is left as the failure left it (HDF5 cannot close it: `abandon_h5`); what
            # is in it up to the last checkpoint is copied by the resumed run
            self.failed = True
            abandon_h5(self.h5)
            raise failed
        try:
            self.h5.close()
        except (OSError, RuntimeError) as exc:  # writing the last metadata failed
            if isinstance(exc, RuntimeError) and "errno = " not in str(exc):
                raise
            self.failed = True
            abandon_h5(self.h5)
            raise output_error(self.path, exc) from None
        try:
            # attributes cannot change in SWMR mode; without file locking: a reader following the scan (tune,
            # resegment, a viewer) holds the file, and its lock would fail the run at its last step
            with h5py.File(self.path, "r+", locking=False) as h5:
                h5[SCAN_GROUP].attrs.update({"nframes": self.frames, "npx": self.file_px})
                frames, flat = saturated_arrays(self.saturated)
                h5[SCAN_GROUP].create_dataset("saturated_frame", data=frames)
                h5[SCAN_GROUP].create_dataset("saturated_pixel", data=flat)
                # the datasets' bytes, not the file's: the same for a resumed run, whose file was copied
                size = sum(item.id.get_storage_size() for item in _datasets(h5))
        except OSError as exc:
            raise output_error(self.path, exc) from exc
        self.reduction = float(self.frames * self.raw_frame_bytes / size)
        self.bytes_per_frame = size / max(self.frames, 1)
        self.fill_fraction = self.pixels / max(self.frames * int((~self.mask).sum()), 1)


def _datasets(h5: h5py.File) -> list[h5py.Dataset]:
    found = []
    h5.visititems(lambda _, item: found.append(item) if isinstance(item, h5py.Dataset) else None)
    return found


class SparseScan:
    """A sparse corrected scan (``export.format: sparse``) open for reading, finished or still being written.

    ``nnz``, ``psi`` (None without angles), ``cut``, ``noise_sigma`` and ``level`` (frames, tiles_y, tiles_x),
    ``tile_px``, ``mask``, ``direct_beam``, ``photon_gain`` (None if the run had none) and ``frame_shape`` are
    read at once (the frames whole in the
    file when it is opened); ``frames()`` yields (k, rows, cols, values) a block at a time, and the
    unfiltered values after them with ``unfiltered=True`` (when the file has them: ``self.unfiltered``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.h5 = h5py.File(self.path, "r", swmr=being_written(self.path))
        except FileNotFoundError:
            raise InputError(f"{self.path}: no sparse corrected scan, expected the corrected.h5 of a run with "
                             "export.format: sparse (the default)") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read the sparse corrected scan ({exc})") from None
        try:
            self._read_index()
        except (OSError, RuntimeError, KeyError, ValueError) as exc:  # HDF5's metadata cut short or damaged
            self.h5.close()
            raise InputError(f"{self.path}: cannot read the sparse corrected scan ({' '.join(str(exc).split())}), "
                             "expected the whole corrected.h5 of a run (cut short or damaged? the run that wrote "
                             "it makes it again with --overwrite)") from None

    def _read_index(self) -> None:
        group = self.h5.get(SCAN_GROUP)
        if group is None or "nnz" not in group or "noise_sigma" not in group:
            got = self.h5.attrs.get("format", "another file")
            if got == "sparse":  # said 'expected a sparse corrected scan ..., got sparse'
                got = (f"a sparse scan without /{SCAN_GROUP}" if group is None else
                       f"a sparse scan without /{SCAN_GROUP}/{'nnz' if 'nnz' not in group else 'noise_sigma'}") \
                    + " (damaged?)"
            self.h5.close()
            raise InputError(f"{self.path}: no group /{SCAN_GROUP} with nnz and noise_sigma, expected a sparse "
                             f"corrected scan (export.format: sparse), got {got}")
        self.group = group
        self.frame_shape = (int(group.attrs["shape0"]), int(group.attrs["shape1"]))
        self.tile_px = int(group.attrs["tile_px"])
        self.nnz = group["nnz"][()].astype(np.int64)
        n = len(self.nnz)
        self.starts = np.concatenate([[0], np.cumsum(self.nnz)])
        self.psi = group["measurement/rot"][:n] if "measurement/rot" in group else None
        self.cut = group["cut"][:n]
        self.noise_sigma = group["noise_sigma"][:n]
        # the level the unfiltered values were taken less (none before this map was written)
        self.level = group["level"][:n] if "level" in group else np.zeros(self.cut.shape, np.float32)
        self.mask = group["mask"][()].astype(bool)
        self.direct_beam = tuple(int(v) for v in group.attrs["direct_beam"]) or None
        self.photon_gain = float(group.attrs["photon_gain"]) if "photon_gain" in group.attrs else None
        # frame -> flat indices of its saturated pixels, once the run has finished (written at its end)
        self.saturated = (saturated_from_arrays(group["saturated_frame"][()], group["saturated_pixel"][()])
                          if "saturated_frame" in group else {})
        self.binning = int(self.h5.attrs.get("binning", 1))
        self.binning_mode = str(self.h5.attrs.get("binning_mode", "sum"))
        self.finished = int(group.attrs["nframes"]) == n > 0
        # a file its writer never closed: the last frames nnz counts may have maps of HDF5's fill value only (0:
        # the writes of their data failed, a full disk, after the datasets had grown), not frames; left out
        # (they read as frames without noise: 'auto needs a noise estimate > 0', or no spots at all)
        self.unwritten = 0
        if not self.finished and n:
            blank = ~self.noise_sigma.reshape(n, -1).any(axis=1)
            self.unwritten = int(np.argmin(blank[::-1])) if not blank.all() else n
        if self.unwritten:
            n -= self.unwritten
            log.warning("%s: frames %d to %d counted but never written (their maps hold only the fill value: a "
                        "run whose writes failed, a full disk?), left out", self.path, n, n + self.unwritten - 1)
            self.nnz, self.starts = self.nnz[:n], self.starts[:n + 1]
            self.psi = None if self.psi is None else self.psi[:n]
            self.cut, self.noise_sigma, self.level = self.cut[:n], self.noise_sigma[:n], self.level[:n]
        self.unfiltered = "unfiltered" in group

    def __len__(self) -> int:
        return len(self.nnz)

    def frames(self, start: int = 0, stop: int | None = None, block_px: int = 4 * CHUNK_PX, unfiltered: bool = False):
        """(k, rows, cols, values[, unfiltered]) of frames start..stop-1, read about ``block_px`` pixels at a
        time."""
        names = _PIXELS + (("unfiltered",) if unfiltered else ())
        stop = len(self.nnz) if stop is None else min(stop, len(self.nnz))
        k = start
        while k < stop:
            end = int(np.searchsorted(self.starts, self.starts[k] + block_px, side="right"))
            end = min(max(end - 1, k + 1), stop)
            a, b = int(self.starts[k]), int(self.starts[end])
            try:
                columns = [self.group[name][a:b] for name in names]
            except (OSError, RuntimeError) as exc:  # chunks cut short or damaged
                raise InputError(f"{self.path}: frames {k} to {end - 1}: cannot be read "
                                 f"({' '.join(str(exc).split())}), expected the whole sparse corrected scan of "
                                 "a run (cut short or damaged?)") from None
            for f in range(k, end):
                i, j = int(self.starts[f]) - a, int(self.starts[f + 1]) - a
                yield (f, *(c[i:j] for c in columns))
            k = end

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_corrected(path: str | os.PathLike) -> list[np.ndarray] | list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The frames of a ``corrected.h5``: (y, x) arrays for a stack, (row, col, intensity) per frame for sparse."""
    with h5py.File(path, "r", swmr=being_written(path)) as h5:
        if "corrected" in h5:
            return list(h5["corrected"][()])
    with SparseScan(path) as scan:
        return [(rows, cols, values) for _, rows, cols, values in scan.frames()]
