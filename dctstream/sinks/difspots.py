"""Difspot files ``OUT/difspots/{id:06d}.h5``, one per difspot, in the DCT layout.

The layout is the one of the difspots that ``pydct`` wrote for the DCT MATLAB
code: all datasets at the root, voxel arrays of 16 KiB or more gzip+shuffle
compressed, scalars as scalars.  Arrays are in (z, y, x) = (frame, y, x) order over the difspot's
bounding box; ``nz``, ``ny``, ``nx`` are the box's frame count, height and
width.  Indices follow MATLAB and start at 1: *absolute* fields count from the
first frame / pixel of the scan, *relative* fields from the first voxel of the
bounding box (which is 1).

=========================  =======  ============  ==========================================
dataset                    dtype    shape         meaning
=========================  =======  ============  ==========================================
``Data``                   float32  (nz, ny, nx)  corrected values over the bounding box
                                                  (0 off the difspot unless the writer was
                                                  given the corrected sub-volume)
``Mask``                   int8     (nz, ny, nx)  1 on the difspot's voxels, 0 elsewhere
``DataMasked``             float32  (nz, ny, nx)  ``Data * Mask``
``Projection``             float32  (ny, nx)      ``DataMasked`` summed over frames
``Area``                   int64    scalar        number of voxels
``Integral``               float32  scalar        sum of the difspot's corrected values
``difspotID``              int64    scalar        difspot id (file name, row of spots.h5)
``StartImage``             int64    scalar        first frame of the box, absolute
``EndImage``               int64    scalar        last frame of the box (inclusive), absolute
``BoundingBoxXorigin``     int64    scalar        first column of the box, absolute
``BoundingBoxYorigin``     int64    scalar        first row of the box, absolute
``BoundingBoxXsize``       int64    scalar        ``nx``
``BoundingBoxYsize``       int64    scalar        ``ny``
``BoundingBox``            int64    (2, 3)        rows: first voxel, last voxel (inclusive);
                                                  columns (z, y, x); absolute
``BoundingBoxOriginSize``  int64    (2, 3)        rows: first voxel, (nz, ny, nx);
                                                  columns (z, y, x); absolute
``CentroidX``              float64  scalar        intensity-weighted centroid, column, relative
``CentroidY``              float64  scalar        intensity-weighted centroid, row, relative
``CentroidImage``          float64  scalar        intensity-weighted centroid, frame, relative
``CentroidIndex``          float64  (3,)          the centroid as (z, y, x), relative
``MaxImage``               int64    scalar        frame of the seed maximum, relative
``MaxIntensityIndex``      int64    (3,)          seed maximum as (z, y, x), relative
=========================  =======  ============  ==========================================

Root attributes: ``interpretation = "difspot"``, ``notation_axes = "zyx"``,
``notation_indexing = "starts with 1 (MATLAB)"``, ``relative_fields`` and
``absolute_fields`` (comma-separated lists of the fields above).

Each file is written under a hidden temporary name (``.000012.h5.tmp``) and
renamed once complete, so a ``*.h5`` that exists is always whole.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..types import Blob
from ..atomic import atomic_h5, output_error, replacing
from .spot_table import ensure_dir, spot_row

ATTRS = {
    "interpretation": "difspot",
    "notation_axes": "zyx",
    "notation_indexing": "starts with 1 (MATLAB)",
    "relative_fields": "CentroidX, CentroidY, CentroidImage, CentroidIndex, "
                       "MaxImage, MaxIntensityIndex",
    "absolute_fields": "StartImage, EndImage, BoundingBoxXorigin, BoundingBoxYorigin, "
                       "BoundingBox, BoundingBoxOriginSize",
}


class DifspotWriter:
    """Writes one DCT difspot file per blob under ``OUT/difspots``."""

    def __init__(self, out_dir: str | os.PathLike):
        self.folder = Path(out_dir) / "difspots"
        ensure_dir(self.folder)
        self._images: dict[tuple[int, int, int], _Image | None] = {}  # by box shape (frames, y, x)

    def write(self, blob: Blob, volume: np.ndarray | None = None) -> Path:
        """Write the difspot file of ``blob`` and return its path.

        ``volume``, if given, is the corrected frames cut to the blob's
        bounding box, (frames, y, x); it becomes ``Data`` so that the file
        also shows the neighbourhood of the difspot.
        """
        row = spot_row(blob)
        f0, y0, x0 = row["start_frame"], row["bbox_y0"], row["bbox_x0"]
        shape = (row["end_frame"] - f0 + 1, row["bbox_y_size"], row["bbox_x_size"])
        origin = np.array([f0, y0, x0])
        # All indices in the file are 1-based (MATLAB); relative ones count
        # from the box's first voxel.
        first = origin + 1
        size = np.array(shape)
        centroid = np.array([row["centroid_frame"], row["centroid_y"], row["centroid_x"]])
        centroid_rel = centroid - origin + 1
        max_rel = np.array(blob.max_index) - origin + 1

        data, mask = box_arrays(blob, row, volume)
        masked = data * mask

        arrays = {
            "Data": data,
            "Mask": mask,
            "DataMasked": masked,
            "Projection": masked.sum(axis=0, dtype=np.float32),
            "BoundingBox": np.array([first, first + size - 1], np.int64),
            "BoundingBoxOriginSize": np.array([first, size], np.int64),
            "CentroidIndex": centroid_rel.astype(np.float64),
            "MaxIntensityIndex": max_rel.astype(np.int64),
        }
        scalars = {
            "Area": np.int64(row["area"]),
            "Integral": np.float32(row["integral"]),
            "difspotID": np.int64(row["id"]),
            "StartImage": np.int64(first[0]),
            "EndImage": np.int64(first[0] + size[0] - 1),
            "BoundingBoxXorigin": np.int64(first[2]),
            "BoundingBoxYorigin": np.int64(first[1]),
            "BoundingBoxXsize": np.int64(size[2]),
            "BoundingBoxYsize": np.int64(size[1]),
            "CentroidX": np.float64(centroid_rel[2]),
            "CentroidY": np.float64(centroid_rel[1]),
            "CentroidImage": np.float64(centroid_rel[0]),
            "MaxImage": np.int64(max_rel[0]),
        }

        path = self.folder / f"{row['id']:06d}.h5"
        values = {**arrays, **scalars}
        # Without a compressed array, a box shape's files differ only in their datasets' values, each at a
        # fixed place in the file: a shape's first file is written through HDF5 (2.4-5 ms), the next ones are
        # its bytes with their values put in (0.1-0.7 ms; the datasets' modification times are that file's).
        # At most IMAGES shapes are kept so: beyond, a new shape's files are all written through HDF5.
        small = all(arrays[name].nbytes < COMPRESS_MIN_BYTES for name in _COMPRESSED)
        image = self._images.get(shape) if small else None
        if image is not None:
            image.write(path, values)
            return path
        imaged = small and shape not in self._images and len(self._images) < IMAGES
        offsets = _write_h5(path, values, imaged)
        if imaged:
            self._images[shape] = _Image.of(path, values, offsets)
        return path


def _write_h5(path: Path, values: dict, offsets: bool = False) -> dict[str, int | None]:
    """The file through HDF5; with ``offsets``, where each dataset's values lie in it (None: not in one
    piece)."""
    # Default format bounds keep the file readable by HDF5 1.8, which
    # older MATLAB releases (the DCT code) still bundle.
    where = {}
    with atomic_h5(path) as f:
        for name, value in values.items():
            if name in _COMPRESSED and value.nbytes >= COMPRESS_MIN_BYTES:
                f.create_dataset(name, data=value, compression="gzip", shuffle=True)
                where[name] = None
            else:
                dset = _small_dataset(f, name, value)
                where[name] = dset.get_offset() if offsets else None
        for name, value in ATTRS.items():
            _string_attr(f, name, value)
    return where


@dataclass(frozen=True)
class _Image:
    """A difspot file's bytes and, for each dataset, where its values lie in them: (name, offset, dtype)."""

    data: bytes
    fields: tuple[tuple[str, int, np.dtype], ...]

    @classmethod
    def of(cls, path: Path, values: dict, offsets: dict[str, int | None]) -> _Image | None:
        """The image of the file just written at ``path`` with ``values``, its datasets at ``offsets``; None
        unless each dataset's values lie there whole, byte for byte."""
        data = path.read_bytes()
        fields = []
        for name, value in values.items():
            array = np.ascontiguousarray(value)
            offset = offsets[name]
            if offset is None or data[offset:offset + array.nbytes] != array.tobytes():
                return None
            fields.append((name, offset, array.dtype))
        return cls(data, tuple(fields))

    def write(self, path: Path, values: dict) -> None:
        data = bytearray(self.data)
        for name, offset, kind in self.fields:
            array = np.asarray(values[name], kind)
            data[offset:offset + array.nbytes] = array.tobytes()
        try:
            with replacing(path, crash="difspot") as tmp:
                tmp.write_bytes(data)
        except OSError as exc:
            raise output_error(path, exc) from exc


def box_arrays(blob: Blob, row: dict, volume: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(Data, Mask)`` of the difspot file of ``blob``, whose `spot_row` is ``row``: float32 and int8
    arrays over the bounding box, (frame, y, x).

    ``volume`` (the corrected frames cut to the box) becomes ``Data``; without it, ``Data`` holds
    the blob's values on its voxels and 0 elsewhere.
    """
    f0, y0, x0 = row["start_frame"], row["bbox_y0"], row["bbox_x0"]
    shape = (row["end_frame"] - f0 + 1, row["bbox_y_size"], row["bbox_x_size"])
    voxels = (blob.frame - f0, blob.y - y0, blob.x - x0)
    mask = np.zeros(shape, np.int8)
    mask[voxels] = 1
    if volume is None:
        data = np.zeros(shape, np.float32)
        data[voxels] = blob.value
    else:
        data = np.asarray(volume, np.float32)
        if data.shape != shape:
            raise ValueError(f"difspot {blob.id} volume: expected the bounding-box shape "
                             f"{shape}, got {data.shape}")
    return data, mask


# Only the voxel arrays are worth compressing; the rest are a few numbers each. Not ``Data``: the corrected
# values of the whole box are noise, which gzip shrank by a tenth for 40 % of a large difspot's write time
# (4.7 of 12 ms for a box of 12 x 50 x 50 voxels); ``DataMasked`` is mostly the zeros off the difspot.
_COMPRESSED = ("Mask", "DataMasked", "Projection")
# Box shapes whose file image a writer keeps (the first ones met: the common shapes come early): an image is
# the bytes of a file of small arrays, under ~60 KiB (most 10-20), so at most ~15 MiB beside the frames.
IMAGES = 256
# Below this, a gzip chunk saves a few hundred bytes and costs more than the rest of the file to
# write (~0.5 ms per array): most difspots are boxes of a few hundred voxels.
COMPRESS_MIN_BYTES = 16384


@functools.cache
def _h5_type(dtype: np.dtype) -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(dtype, logical=True)


@functools.cache
def _h5_space(shape: tuple[int, ...]) -> h5py.h5s.SpaceID:
    return h5py.h5s.create_simple(shape) if shape else h5py.h5s.create(h5py.h5s.SCALAR)


def _small_dataset(f: h5py.File, name: str, value) -> h5py.h5d.DatasetID:
    """A contiguous dataset through h5py's low-level calls, with types and dataspaces made once:
    a quarter of the high-level cost, which adds up over ~20 small datasets per difspot and ~10
    difspots per frame."""
    array = np.asarray(value, order="C")  # not ascontiguousarray: it makes a scalar 1-D
    kind = _h5_type(array.dtype)
    dset = h5py.h5d.create(f.id, name.encode(), kind, _h5_space(array.shape))
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, array, mtype=kind)  # the memory type given: not made again per write
    return dset


_STRING = h5py.string_dtype("utf-8")


def _string_attr(f: h5py.File, name: str, value: str) -> None:
    """The attribute ``f.attrs[name] = value`` writes (a scalar variable-length UTF-8 string), in a third
    of the time."""
    attr = h5py.h5a.create(f.id, name.encode(), _h5_type(_STRING), _h5_space(()))
    attr.write(np.array(value, dtype=_STRING))
