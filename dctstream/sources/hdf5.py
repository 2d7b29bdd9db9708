"""Recorded scans in HDF5 files, addressed as ``path/to/file.h5::/path/to/dataset``."""

from __future__ import annotations

import logging
import os

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4 and friends with h5py)
import numpy as np

from ..errors import InputError
from ..ring import ArrayPool
from ..types import Frame
from .base import FrameSource, counts_dtype

log = logging.getLogger(__name__)

# Small frames are read a few at a time (one HDF5 call per frame costs more than their copy), up to
# this many bytes per read: a frame yielded keeps its whole read alive, and the reader runs ahead.
_READ_BYTES = 8 * 2**20
_READ_FRAMES_MAX = 64


def parse_url(url: str, key: str | None = None) -> tuple[str, str]:
    """Split ``file.h5::/dataset`` into its file path and dataset path; ``key`` (``dark.url``) prefixes the
    error."""
    path, sep, dataset = url.partition("::")
    if not sep or not path or not dataset:
        raise InputError(f"{key + ': ' if key else ''}{url}: expected a URL of the form "
                         "path/to/file.h5::/path/to/dataset")
    return path, dataset


def _members(group: h5py.Group, limit: int = 8) -> str:
    names = sorted(group)
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "nothing"


def _deepest_group(h5: h5py.File, name: str) -> h5py.Group:
    """The deepest group along ``name`` that is there: where a mistyped dataset's neighbours are."""
    group = h5
    for part in [p for p in name.split("/") if p]:
        try:
            item = group.get(part)
        except (KeyError, ValueError, OSError):
            break
        if not isinstance(item, h5py.Group):
            break
        group = item
    return group


def unexpanded(path: str) -> str:
    """What to add to "file not found" for a path written with ``~`` or ``$NAME`` (not expanded: a path is taken as
    written) when the expanded one is there, else nothing."""
    expanded = os.path.expandvars(os.path.expanduser(path))
    if expanded != path and os.path.exists(expanded):
        return f" (~ and $NAME are not expanded: {expanded} is there, write the path out)"
    return ""


def _open(url: str, key: str | None = None) -> tuple[h5py.File, h5py.Dataset]:
    """The open file and its dataset at ``url``; ``key`` (``dark.url``) prefixes error messages."""
    where = f"{key}: " if key else ""
    path, name = parse_url(url, key)
    if not os.path.exists(path):
        raise InputError(f"{where}{path}: file not found{unexpanded(path)}, expected an HDF5 file (from {url})")
    # Without file locking: the acquisition may still hold the file (a dark in
    # the scan file being written), and every opener in one process must agree.
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError:
        try:
            h5 = h5py.File(path, "r", locking=False, swmr=True)
        except OSError as exc:
            raise InputError(f"{where}{path}: cannot open as HDF5 ({' '.join(str(exc).split())})") from None
    try:
        obj = h5.get(name)
    except (KeyError, ValueError, OSError):  # e.g. a broken external or soft link
        obj = None
    if not isinstance(obj, h5py.Dataset):
        try:
            link = h5.get(name, getlink=True)
        except (KeyError, ValueError, OSError):
            link = None
        if isinstance(obj, h5py.Group):
            what = f"is a group, expected a dataset (the group holds: {_members(obj)})"
        elif isinstance(link, h5py.ExternalLink):
            what = (f"an external link to {link.filename}::{link.path}, which cannot be read (a file moved, "
                    "renamed or not there yet?), expected a dataset there")
        elif isinstance(link, h5py.SoftLink):
            what = f"a link to {link.path}, which does not exist in {path}, expected a dataset there"
        else:
            parent = _deepest_group(h5, name)
            what = (f"no such dataset, expected a dataset in {path} "
                    f"({'its root' if parent.name == '/' else parent.name} holds: {_members(parent)})")
        h5.close()
        raise InputError(f"{where}{url}: {what}")
    return h5, obj


def read_dataset(url: str, key: str | None = None) -> np.ndarray:
    """The whole dataset at ``url`` (for small things: angles, darks)."""
    h5, dset = _open(url, key)
    with h5:
        return dset[()]


class Hdf5FileSource(FrameSource):
    """Frames of a complete (recorded) scan: a 3-D dataset (frames, y, x) of integers."""

    rereadable = True

    def __init__(self, url: str, angles: str | None = None, missing: str = "error"):
        self.url = url
        self._h5, self._dset = _open(url, "source.url")
        self._identity = _file_identity(path_of(url))  # a recorded file stays whole: see _unchanged
        shape, dtype = self._dset.shape, self._dset.dtype
        if len(shape) != 3:
            self.close()
            raise InputError(f"source.url: {url}: expected a 3-D stack of frames (frames, y, x), got shape {shape}")
        if min(shape) < 1:
            self.close()
            raise InputError(f"source.url: {url}: expected at least 1 frame of at least 1 x 1 pixels, "
                             f"got shape {shape}")
        try:
            counts = counts_dtype(dtype, f"source.url: {url}")
        except InputError:
            self.close()
            raise
        self.n_frames = shape[0]
        try:
            self.missing = unwritten_frames(self._dset, path_of(url))
        except BaseException:
            self.close()
            raise
        if self.missing.size:
            span = _spans(self.missing)
            if missing == "error":
                absent = absent_sources(self._dset, path_of(url)) if self._dset.is_virtual else []
                where = (f"{len(absent)} of its virtual-dataset sources are not there: {', '.join(absent[:3])}"
                         f"{', ...' if len(absent) > 3 else ''}" if absent else "their chunks or virtual-dataset "
                         "sources are not there: the file holds only its fill value")
                self.close()
                raise InputError(f"source.url: {url}: {span} never written ({where}), expected every frame; "
                                 "set source.missing: repeat-background to go on without them")
            log.warning("%s: %s never written (chunks or virtual-dataset sources not there): replaced by the "
                        "background (source.missing: repeat-background)", url, span)
        self._missing = set(self.missing.tolist())
        self.first_frame = 0  # where iterating starts (a resumed run skips what it no longer needs)
        self.frame_shape = tuple(shape[1:])
        self.dtype, self._stored = counts, dtype
        if dtype.kind == "f":  # flat-fielded or normalised frames are refused before anything is written
            try:
                self._read_one(0)
            except BaseException:
                self.close()
                raise
        self.angles = None
        self.psi_unit = "degrees"  # of the angles as read: a run's psi, and ImageD11's omega
        if angles:
            try:
                psi, factor = read_angles(angles)
            except BaseException:
                self.close()
                raise
            if psi.ndim == 1 and psi.size != self.n_frames and psi.size in shape[1:]:
                self.close()
                raise InputError(f"source.url: {url}: shape {shape}, and {psi.size} angles ({angles}) as many as "
                                 f"along its axis {shape.index(psi.size, 1)}, not its first: expected the frames "
                                 "along the first axis (frames, y, x), as detectors write them")
            if psi.dtype.kind not in "uif" or psi.ndim != 1 or psi.size < self.n_frames:
                self.close()
                raise InputError(f"source.angles: {angles}: expected a 1-D array of at least {self.n_frames} "
                                 f"angles in degrees (one per frame), got shape {psi.shape}, dtype {psi.dtype}")
            if psi.size > self.n_frames:
                log.warning("source.angles: %s: %d angles for %d frames: the first %d are used (are they the "
                            "angles of this scan?)", angles, psi.size, self.n_frames, self.n_frames)
            try:
                self.angles = check_angles(psi[: self.n_frames], angles, factor)
            except BaseException:
                self.close()
                raise
            if factor is None and radians_like(self.angles):
                self.psi_unit = "as recorded (like radians)"
            if closes_turn(self.angles):  # two measures of one angle would give the spots there twice
                log.warning("source.angles: %s: frame %d (psi %g) is frame 0's angle a whole turn later: left out, "
                            "the scan taken as one turn of %d frames", angles, self.n_frames - 1,
                            self.angles[-1], self.n_frames - 1)
                self.n_frames -= 1
                self.angles = self.angles[:-1]
                self.missing = self.missing[self.missing < self.n_frames]
                self._missing.discard(self.n_frames)

    def __iter__(self):
        batch = max(1, min(_READ_FRAMES_MAX, _READ_BYTES // (int(np.prod(self.frame_shape)) * self.dtype.itemsize or 1)))
        blocks = ArrayPool(6)  # the frames read ahead and the one being used: see ArrayPool
        for start in range(self.first_frame, self.n_frames, batch):
            try:
                block = blocks.take((min(batch, self.n_frames - start), *self.frame_shape), self._stored)
                self._dset.read_direct(block, np.s_[start:start + len(block)])
            except OSError:
                block = [self._read_one(k) for k in range(start, min(start + batch, self.n_frames))]
            self._unchanged(start)
            for i, data in enumerate(block):
                k = start + i
                yield Frame(k, None if self.angles is None else float(self.angles[k]),
                            None if k in self._missing else self._counts(data, f"source.url: {self.url}: frame {k}"))
        self.end_reason = "complete"

    def read_frame(self, k: int) -> np.ndarray:
        return self._read_one(k)

    def _read_one(self, k: int) -> np.ndarray:
        """Frame ``k`` alone: a batch that failed to read names the frame that broke it."""
        try:
            data = self._counts(self._dset[k], f"source.url: {self.url}: frame {k}")
        except OSError as exc:
            self._unchanged(k)
            raise InputError(f"source.url: {self.url}: frame {k}: cannot read ({' '.join(str(exc).split())}), "
                             "expected a readable frame (a corrupted chunk, or a truncated file?)") from None
        self._unchanged(k)
        return data

    def _unchanged(self, k: int) -> None:
        """The file is the one opened, no shorter: one truncated or replaced under the run reads its lost frames
        as zeros (HDF5 says nothing), which would pass for frames without the beam. (One that grew keeps the
        frames it had.)"""
        now = _file_identity(path_of(self.url))
        if now is None or now[1] != self._identity[1] or now[0] < self._identity[0]:
            size = (f"{self._identity[0]} bytes then, {now[0]} now" if now is not None
                    else "it is gone")
            raise InputError(f"source.url: {self.url}: the file changed while frame {k} was read ({size}), "
                             "expected a recorded scan to stay whole while it is read (a scan still being "
                             "written: source.protocol: hdf5-live); the same command resumes once it is whole")

    def close(self) -> None:
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _file_identity(path: str) -> tuple[int, int] | None:
    """(size, inode) of ``path``, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_ino


def path_of(url: str) -> str:
    return url.partition("::")[0]


def _spans(frames: np.ndarray, limit: int = 4) -> str:
    """``frames 3..5, 9`` for sorted frame numbers (the first ``limit`` runs)."""
    runs, start = [], frames[0]
    for a, b in zip(frames[:-1], frames[1:]):
        if b != a + 1:
            runs.append((start, a))
            start = b
    runs.append((start, frames[-1]))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:limit])
    more = f" and {len(runs) - limit} more runs" if len(runs) > limit else ""
    return f"{'frame' if frames.size == 1 else f'{frames.size} frames'} {text}{more}"


def _first_axis_bounds(space) -> tuple[int, int]:
    """First and last index along the first axis of a dataspace's selection."""
    if space.get_select_type() == h5py.h5s.SEL_ALL:  # the whole source (its shape may not be stored here)
        return 0, space.shape[0] - 1 if space.shape else None
    (first, *_), (last, *_) = space.get_select_bounds()
    return first, last


def virtual_sources(dset: h5py.Dataset, file_path: str):
    """(first, last frame of ``dset`` mapped, first source frame, source file, source dataset) of each source of
    a virtual dataset; relative source names are the file's that holds the virtual dataset, which an external
    link may put elsewhere than file_path's."""
    holder = dset.file.filename or file_path
    folder = os.path.dirname(os.path.abspath(holder))
    for vs in dset.virtual_sources():
        v0, v1 = _first_axis_bounds(vs.vspace)
        s0, _ = _first_axis_bounds(vs.src_space)
        name = holder if vs.file_name == "." else os.path.join(folder, vs.file_name)
        yield v0, dset.shape[0] - 1 if v1 is None else v1, s0, name, vs.dset_name


def _source_frames(name: str, inside: str) -> int | None:
    """Frames of a virtual source's dataset; None when its file or dataset is not there."""
    try:
        with h5py.File(name, "r", locking=False) as src:
            return src[inside].shape[0]
    except (OSError, KeyError, ValueError, TypeError):
        return None


def absent_sources(dset: h5py.Dataset, file_path: str) -> list[str]:
    """The source files of a virtual dataset that are not there, or hold no such dataset (a detector's file
    lost or moved), each once, in the dataset's order."""
    absent = [name for _, _, _, name, inside in virtual_sources(dset, file_path)
              if _source_frames(name, inside) is None]
    return list(dict.fromkeys(absent))


def unwritten_frames(dset: h5py.Dataset, file_path: str) -> np.ndarray:
    """Frames of ``dset`` (frames, y, x) whose data is not in the file: chunks never written (a pre-allocated
    dataset), or virtual-dataset sources that are missing or shorter than mapped.  Reading them gives the
    fill value (zeros), which must not pass for frames."""
    n = dset.shape[0]
    if dset.is_virtual:
        covered = np.zeros(n, bool)
        for v0, v1, s0, name, inside in virtual_sources(dset, file_path):
            held = _source_frames(name, inside)
            if held is not None:  # a missing source file or dataset covers nothing
                covered[v0:v0 + max(min(v1 - v0, held - 1 - s0) + 1, 0)] = True
        return np.flatnonzero(~covered)
    chunks = dset.chunks
    if chunks is None:
        return np.arange(n) if n and dset.id.get_storage_size() == 0 else np.zeros(0, np.int64)
    per_frame_chunk = -(-dset.shape[1] // chunks[1]) * -(-dset.shape[2] // chunks[2])
    groups = -(-n // chunks[0])
    stored = dset.id.get_num_chunks()
    if stored >= groups * per_frame_chunk:
        return np.zeros(0, np.int64)
    counts = np.zeros(groups, np.int64)
    for i in range(stored):
        offset = dset.id.get_chunk_info(i).chunk_offset
        counts[offset[0] // chunks[0]] += 1
    lost = np.zeros(n, bool)
    for g in np.flatnonzero(counts < per_frame_chunk):
        lost[g * chunks[0]:(g + 1) * chunks[0]] = True
    return np.flatnonzero(lost)


# The NeXus ``units`` of an angles dataset that dctstream reads, as degrees per unit.
_DEGREES_PER = {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "\u00b0": 1.0, "rad": 180.0 / np.pi,
                "radian": 180.0 / np.pi, "radians": 180.0 / np.pi, "mrad": 0.18 / np.pi, "urad": 1.8e-4 / np.pi}


def degrees_per_unit(units, url: str) -> float | None:
    """Degrees per unit of an angles dataset's ``units`` attribute (NeXus: deg, rad, mrad, urad); None
    without one, or with one not known (said): the angles are taken for degrees, as before units were read.
    A conversion is said in the log."""
    if units is None or np.size(units) == 0:
        return None
    value = np.asarray(units).reshape(-1)[0] if np.ndim(units) else units  # a 1-element array, as some write
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    key = str(value).strip().lower()
    factor = _DEGREES_PER.get(key)
    if factor is None and key:
        log.warning("source.angles: %s: units %r not known, expected degrees or radians (%s): taken as degrees",
                    url, str(value), ", ".join(_DEGREES_PER))
    elif factor not in (None, 1.0):
        log.info("source.angles: %s: units %s, converted to degrees", url, value)
    return factor


ANGLE_FILES = (".txt", ".dat", ".csv", ".npy")  # source.angles as a file of its own: one angle per line, or NumPy


def is_angle_file(url: str) -> bool:
    return "::" not in url and url.lower().endswith(ANGLE_FILES)


def read_angle_file(path: str, *, whole_lines_only: bool = False) -> np.ndarray:
    """The angles (degrees) of a text file, one per line (``#`` comments and blank lines skipped), or of a 1-D
    ``.npy`` array.  ``whole_lines_only``: a file still being written, whose last line may be cut."""
    if not os.path.exists(path):
        raise InputError(f"source.angles: {path}: file not found, expected a text file of one angle per line, a "
                         "1-D .npy array, or path/to/file.h5::/path/to/dataset")
    if path.lower().endswith(".npy"):
        try:
            psi = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"source.angles: {path}: cannot read as NumPy ({' '.join(str(exc).split())})") from None
        if psi.ndim != 1 or psi.dtype.kind not in "uif":
            raise InputError(f"source.angles: {path}: expected a 1-D array of angles in degrees, got shape "
                             f"{psi.shape}, dtype {psi.dtype}")
        return psi.astype(np.float64)
    with open(path, errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    if whole_lines_only and lines and not text.endswith("\n"):
        lines = lines[:-1]
    psi = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#")[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            if len(fields) > 1:
                raise ValueError
            psi.append(float(fields[0]))
        except ValueError:
            raise InputError(f"source.angles: {path}: line {number}: expected one angle in degrees, got "
                             f"{line.strip()[:60]!r}") from None
    return np.asarray(psi, np.float64)


def read_angles(url: str) -> tuple[np.ndarray, float | None]:
    """The angles at ``url`` as stored and their degrees per unit (`degrees_per_unit`: None without a
    ``units`` attribute): a dataset, or a file of angles in degrees (`read_angle_file`)."""
    if is_angle_file(url):
        return read_angle_file(url), 1.0
    h5, dset = _open(url, "source.angles")
    with h5:
        psi, units = np.asarray(dset[()]), dset.attrs.get("units")
    return psi, degrees_per_unit(units, url)


def closes_turn(psi: np.ndarray) -> bool:
    """Whether the last angle is the first's a whole turn later (a scan recorded from 0 to 360 degrees, both
    ends included): its last frame measures the first frame's angle again."""
    psi = np.asarray(psi, np.float64)
    if psi.size < 4:
        return False
    step = float(np.median(np.diff(psi)))
    turn = 2 * np.pi if radians_like(psi) else 360.0
    return bool(step != 0 and abs(abs(psi[-1] - psi[0]) - turn) <= 0.5 * abs(step)
                and np.sign(psi[-1] - psi[0]) == np.sign(step))


def radians_like(psi: np.ndarray) -> bool:
    """Whether angles read without a unit look like radians: at least 20 spanning 0.9 to 2.05 pi."""
    span = float(np.ptp(psi)) if psi.size else 0.0
    return bool(psi.size >= 20 and 0.9 * np.pi <= span <= 2.05 * np.pi and np.max(np.abs(psi)) <= 2.05 * np.pi)


def check_angles(psi: np.ndarray, url: str, factor: float | None = None) -> np.ndarray:
    """``psi`` in degrees (float64, one per frame), ``factor`` degrees per unit (`degrees_per_unit`; None: the
    file said no unit, and angles that look like radians are said to), if every angle is finite.

    Angles out of order are the pipeline's to place (`dctstream.order`).
    """
    psi = np.asarray(psi, np.float64) * (factor or 1.0)
    bad = np.flatnonzero(~np.isfinite(psi))
    if bad.size:
        raise InputError(f"source.angles: {url}: frame {bad[0]}: expected a finite angle in degrees, "
                         f"got {psi[bad[0]]}")
    if factor is None and radians_like(psi):
        span = float(np.ptp(psi))
        log.warning("source.angles: %s: the angles span %.4g over %d frames, like radians (a turn is 6.283), "
                    "expected degrees: kept as recorded, so psi in the results is in the same unit (a units "
                    "attribute 'rad' on the dataset, as NeXus writes it, converts them)", url, span, psi.size)
    repeats = np.flatnonzero(np.diff(psi) == 0)
    if psi.size >= 2 and repeats.size == psi.size - 1:
        log.warning("source.angles: %s: all %d angles are %g degrees, expected one per frame along the rotation "
                    "(a motor that did not move, or another dataset?): kept, so psi in the results is that angle",
                    url, psi.size, psi[0])
    elif repeats.size:
        log.warning("source.angles: %s: frame %d repeats the angle of frame %d (%g degrees): kept as recorded",
                    url, repeats[0] + 1, repeats[0], psi[repeats[0]])
    return psi


def read_image(url: str, key: str) -> np.ndarray:
    """A 2-D image or 3-D stack from ``file.h5::/dataset``, an EDF file (fabio) or a ``.npy`` file."""
    path = url.split("::")[0]
    if "::" in url:
        return read_dataset(url, key)
    if not os.path.exists(path):
        raise InputError(f"{key}: {path}: file not found{unexpanded(path)}, expected file.h5::/dataset, file.edf, "
                         "file.tif or file.npy")
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        import fabio  # only for EDF and TIFF files
        with fabio.open(path) as image:  # a multi-frame EDF (a stack of darks): every frame
            frames = [image] if image.nframes == 1 else [image.getframe(i) for i in range(image.nframes)]
            data = [f.data for f in frames]
            if getattr(image, "incomplete_file", False) or any(d is None for d in data):
                # fabio pads a short data block with zeros: a dark or flat with zero rows, unsaid
                raise InputError(f"{key}: {path}: the file is cut short (its data holds fewer bytes than its header "
                                 "says: a copy not finished?), expected a whole image")
            return data[0] if len(data) == 1 else np.stack(data)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{key}: {path}: cannot read as EDF, TIFF or NumPy ({' '.join(str(exc).split())})") from None


def load_dark(url: str | None, value: float | None, frame_shape: tuple[int, int],
              image: np.ndarray | None = None) -> np.ndarray | None:
    """The dark/offset image to subtract: the mean of a stack of dark frames, a 2-D image, or a constant.
    ``image``: the dark already read from ``url`` (an EDF, TIFF or .npy file: `read_image`)."""
    if value is not None:
        return np.full(frame_shape, value, dtype=np.float32)
    if url is None:
        return None
    if image is not None:
        data = np.asarray(image)
    else:
        h5, dset = _open(url, "dark.url")
        with h5:
            lost = unwritten_frames(dset, path_of(url)) if dset.ndim == 3 and dset.shape[0] else np.zeros(0)
            if lost.size:  # read, they would pass the file's fill value (zeros) off as a dark
                raise InputError(f"dark.url: {url}: {lost.size} of its {dset.shape[0]} frames never written (their "
                                 "chunks or virtual-dataset sources are not there: the file holds only its fill "
                                 "value), expected written dark frames")
            data = np.asarray(dset[()])
    if data.dtype.kind not in "uif":
        raise InputError(f"dark.url: {url}: expected numeric dark counts, got dtype {data.dtype}")
    if data.ndim == 3 and data.shape[0] == 0:
        raise InputError(f"dark.url: {url}: expected at least 1 dark frame, got shape {data.shape}")
    if data.shape[-2:] != tuple(frame_shape) or data.ndim not in (2, 3):
        raise InputError(f"dark.url: {url}: expected a dark image of shape {tuple(frame_shape)} or a stack "
                         f"(n, {', '.join(map(str, frame_shape))}) of dark frames, got shape {data.shape}")
    if data.dtype.kind == "f" and np.isinf(data).any():  # NaN: a pixel without a dark, masked (Detector)
        bad = np.argwhere(np.isinf(data))[0]
        raise InputError(f"dark.url: {url}: expected finite dark counts (or NaN where a pixel has none), got "
                         f"{data[tuple(bad)]} at {'frame %d, ' % bad[0] if data.ndim == 3 else ''}pixel (y, x) = "
                         f"({bad[-2]}, {bad[-1]})")
    if data.ndim == 3:
        data = data.mean(axis=0, dtype=np.float64)
    return data.astype(np.float32)
