"""Frames of ``path.h5::/dataset`` while an acquisition is still appending them.

The acquisition system (Bliss, LIMA, a detector's own writer) grows the first
axis of a chunked dataset one frame (or a few) at a time.  This source follows
it without disturbing it:

* The file is opened read-only without HDF5 file locking.  A writer in SWMR
  mode refuses plain readers, so the open tries plain mode, then SWMR.  In SWMR
  mode the handle is kept and the datasets refreshed on each look; a plain
  handle goes stale (HDF5 refuses addresses past the end of file it read at
  open, and keeps metadata cached), so in plain mode the file is reopened on
  every look (a fraction of a millisecond).  A writer without SWMR that uses
  the latest file format locks every reader out until it closes the file:
  that is retried and reported after ``idle_timeout_s``.  A kept SWMR handle
  does not show what the writer adds after leaving SWMR mode (``end_time``):
  while nothing grows it is renewed every ``poll_interval_s``, so the end of
  a SWMR scan is seen up to ``poll_interval_s`` late.
* Frame k is **complete** when the dataset's first dimension is past k + 1
  (or the scan is over), every chunk holding frame k is stored in the file,
  and reading it succeeds.  Writers resize before they write, so the last
  listed frame may still be empty or half-written: it waits until the dataset
  grows past it, which costs one frame of latency, not correctness.  The
  exceptions are the last frame of ``expected_frames`` and the last frame of
  a scan that is over, taken once stored and readable.  A chunk of several
  frames compressed by a plugin's filter is read once the dataset has grown
  past it (a writer without SWMR writes it again, elsewhere, at every flush),
  a bitshuffle one decoded from its stored bytes, read once and checked
  (see ``_HDF5_FILTERS``).
* The scan is **over** when ``end_time`` exists in the scan's group (the
  dataset path's top-level group: ``/1.1/end_time`` for
  ``/1.1/measurement/marana``, Bliss and NeXus alike; all listed frames are
  then delivered), when ``expected_frames`` frames were delivered, or when
  nothing grew for ``idle_timeout_s`` (a writer that died: every complete
  frame is delivered, a last frame that was listed but never written is not).
* A file **written anew** during the scan -- another file moved to its name, the dataset
  found holding fewer frames than were read, or frame 0 another when the file is found
  smaller or every ``FIRST_FRAME_CHECK_S`` (a new acquisition into the same name) -- ends
  the scan there, ``replaced``. Written anew in place and already as long at the next
  look, up to those seconds of its frames may have been read as the scan's.
* A read error is retried after reopening the file; it is an ``InputError``
  only when the same frame stays unreadable for ``idle_timeout_s``.
* File-system notifications (watchdog) on the file's folder wake the reader
  as soon as the writer flushes; it also polls every ``poll_interval_s``,
  because network file systems send none.

Memory is one frame plus the angles read so far (8 bytes a frame).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import threading
import time

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4 and friends with h5py)
import numpy as np
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from ..errors import InputError
from ..types import Frame
from .base import FrameSource, counts_dtype
from .hdf5 import degrees_per_unit, is_angle_file, parse_url, read_angle_file, virtual_sources

log = logging.getLogger(__name__)

# Longest a frame waits for its angle before it goes out with psi None (at most half the idle timeout).
ANGLE_WAIT_S = 1.0

# What h5py raises while another process rewrites the metadata under it: all of them mean "look again".
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)

# Event types that mean a file changed.  The reader's own opens and closes ("opened",
# "closed_no_write") are left out: they would wake the reader in a loop.
_CHANGES = frozenset({"created", "modified", "moved", "closed", "deleted"})


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class Watcher:
    """Sets ``wake`` when one of ``paths`` changes (or anything in ``folders`` does).

    Notifications only make the reader look sooner; it polls anyway, because
    network file systems (NFS) do not send them.  Until a folder exists, its
    nearest existing ancestor is watched instead, so that its creation wakes
    the reader too; call ``start()`` on every look to move the watches on
    (it does nothing once every folder is watched).
    """

    def __init__(self, wake: threading.Event, *, paths=(), folders=()):
        self._wake = wake
        self._paths = {os.path.abspath(p) for p in paths} or None  # None: any change in the folders
        self._folders = {os.path.dirname(p) for p in self._paths or ()} | {os.path.abspath(f) for f in folders}
        self._watches: dict[str, object] = {}  # folder -> its watch, for the folders and stand-in ancestors
        self._observer = None
        self._failed = False

    def start(self) -> None:
        if self._failed or self._folders <= self._watches.keys():
            return
        try:
            if self._observer is None:
                self._observer = Observer()
                self._observer.start()
            for folder in self._folders - self._watches.keys():
                if os.path.isdir(folder):
                    self._watch(folder, self._paths)
                    continue
                ancestor = os.path.dirname(folder)
                while not os.path.isdir(ancestor) and ancestor != os.path.dirname(ancestor):
                    ancestor = os.path.dirname(ancestor)
                if ancestor not in self._watches:
                    self._watch(ancestor, None)
            for folder in list(self._watches.keys() - self._folders):
                if not any(f not in self._watches and f.startswith(folder + os.sep) for f in self._folders):
                    self._observer.unschedule(self._watches.pop(folder))  # stood in for a folder that is there now
        except FileNotFoundError:
            pass  # a folder went away between the check and the watch: the next look tries again
        except OSError as exc:  # e.g. the inotify watch limit
            log.warning("no file-system notifications (%s): polling only", one_line(exc))
            self._failed = True

    def _watch(self, folder: str, paths: set[str] | None) -> None:
        self._watches[folder] = self._observer.schedule(_Handler(self._wake, paths), folder, recursive=False)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None


class _Handler(FileSystemEventHandler):
    def __init__(self, wake: threading.Event, paths: set[str] | None):
        self._wake = wake
        self._paths = paths

    def on_any_event(self, event) -> None:
        if event.event_type not in _CHANGES:
            return
        touched = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if self._paths is None or touched & self._paths:
            self._wake.set()


def not_found_hint(path: str) -> str:
    """What is there instead of a file not found (a mistyped name): the folder's closest names, or that the
    folder is not there either (an acquisition may still make both)."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return f"; its folder {folder} is not there either"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; in its folder: {', '.join(close)}" if close else ""


class LiveFile:
    """An HDF5 file that another process may be writing (see the module docstring for the modes)."""

    def __init__(self, path: str):
        self.path = path
        self.h5: h5py.File | None = None
        self.swmr = False
        self.opened_s = 0.0  # time.monotonic() of the last open
        self.error = "file not found"  # why the last open failed

    def look(self) -> h5py.File | None:
        """The file as it is now: the kept handle in SWMR mode, else a fresh open; None if it cannot be opened."""
        if self.h5 is not None and self.swmr:
            return self.h5
        self.close()
        if not os.path.exists(self.path):
            self.error = "file not found"
            return None
        error = self._open(swmr=False, locking=False)
        if error:
            swmr_error = self._open(swmr=True, locking=False)
            if swmr_error and "don't match" in error:
                # This process already has the file open with other settings: HDF5 refuses new ones
                # then, and shares the open file when given the defaults.
                self._open(swmr=False, locking=None)
        if self.h5 is not None:
            return self.h5
        hint = (" (a writer without SWMR that uses the latest file format keeps readers out until it closes "
                "the file)" if "already open for write" in error else "")
        self.error = f"cannot open as HDF5 ({error}){hint}"
        return None

    def _open(self, *, swmr: bool, locking: bool | None) -> str | None:
        """Open the file read-only; None when that worked, else why not."""
        try:
            self.h5 = h5py.File(self.path, "r", locking=locking, swmr=swmr)
        except _H5_ERRORS as exc:  # half-written metadata reads as anything
            return one_line(exc)
        self.swmr, self.opened_s = swmr, time.monotonic()
        return None

    def close(self) -> None:
        if self.h5 is not None:
            try:
                self.h5.close()
            except _H5_ERRORS:  # the writer changed it under us: there is nothing left to release
                pass
            self.h5 = None


TEXT_STILL_S = 2.0  # a text file of angles unchanged this long holds whole lines only


class LiveAngles:
    """psi of each frame, in degrees, from a 1-D dataset (``file.h5::/path``) that may be growing too.

    ``file`` is the frames' ``LiveFile`` when both are in the same file: then
    the frames' look opens it and ``look()`` reads the same handle.
    """

    def __init__(self, url: str, file: LiveFile | None = None):
        self.url = url
        self._values: list[float] = []
        self._factor: float | None = None  # degrees per unit (1 without a units attribute); None: not read yet
        self._own_file = file is None
        if is_angle_file(url):  # a text (or .npy) file of angles, written along
            self._file = None
            return
        path, self._name = parse_url(url)
        self._file = LiveFile(path) if file is None else file

    def look(self) -> None:
        """Read the angles written since the last look."""
        if self._file is None:
            if os.path.exists(self.url):
                # a last line without its newline is cut while the file is written, whole once it is still
                written_s = time.time() - os.path.getmtime(self.url)
                psi = read_angle_file(self.url, whole_lines_only=written_s < TEXT_STILL_S)
                self._values.extend(psi[len(self._values):].tolist())
            return
        h5 = self._file.look() if self._own_file else self._file.h5
        if h5 is None:
            return
        try:
            dset = h5.get(self._name)
            if not isinstance(dset, h5py.Dataset):
                return  # not written yet
            if dset.ndim != 1 or dset.dtype.kind not in "uif":
                raise InputError(f"source.angles: {self.url}: expected a 1-D array of angles in degrees, "
                                 f"got shape {dset.shape}, dtype {dset.dtype}")
            if self._factor is None:
                self._factor = degrees_per_unit(dset.attrs.get("units"), self.url) or 1.0
            if self._file.swmr:
                dset.refresh()
            n = dset.shape[0]
            if n > len(self._values):
                self._values.extend((dset[len(self._values):n].astype(np.float64) * self._factor).tolist())
        except _H5_ERRORS as exc:
            log.debug("%s: cannot read yet (%s)", self.url, one_line(exc))
            if self._own_file:
                self._file.close()

    def get(self, k: int) -> float | None:
        return self._values[k] if k < len(self._values) else None

    def close(self) -> None:
        if self._own_file and self._file is not None:
            self._file.close()


def _end_time_path(dataset: str) -> str:
    """``end_time`` in the dataset's top-level group: ``/1.1/measurement/marana`` -> ``/1.1/end_time``."""
    parts = [p for p in dataset.split("/") if p]
    return f"/{parts[0]}/end_time" if len(parts) > 1 else "/end_time"


# Filters of HDF5 itself (deflate, shuffle, fletcher32, szip, nbit, scaleoffset): their decoders check what they
# read. A plugin's (bitshuffle, LZ4, Blosc, zstd) may not, and a chunk read while a writer without SWMR rewrites it
# (a chunk of several frames is written again at every flush, elsewhere in the file as it grows) killed the
# process (SIGSEGV in bitshuffle's LZ4 decoder).
_HDF5_FILTERS = frozenset(range(1, 7))
_BITSHUFFLE = 32008


def _plugin_filtered(dset: h5py.Dataset) -> bool:
    """Whether a plugin's filter (not one of HDF5's own) decodes the dataset's chunks."""
    plist = dset.id.get_create_plist()
    return any(plist.get_filter(i)[0] not in _HDF5_FILTERS for i in range(plist.get_nfilters()))


def bitshuffle_chunk_sound(raw: bytes, nbytes: int, itemsize: int) -> bool:
    """Whether ``raw`` is a whole bitshuffle-compressed chunk of ``nbytes`` bytes decoded, of elements of
    ``itemsize`` bytes (its framing: the decoded size and block size in bytes, big-endian; each block's compressed
    size and bytes; the last fewer than 8 elements stored as they are): a chunk caught half rewritten fails it."""
    if len(raw) < 12 or int.from_bytes(raw[:8], "big") != nbytes:
        return False
    block = int.from_bytes(raw[8:12], "big")
    if block <= 0 or block % itemsize:
        return False
    pos, left = 12, nbytes
    while left >= block:
        if pos + 4 > len(raw):
            return False
        pos += 4 + int.from_bytes(raw[pos:pos + 4], "big")
        left -= block
    tail = (left // itemsize) % 8 * itemsize  # stored as it is
    if left - tail:
        if pos + 4 > len(raw):
            return False
        pos += 4 + int.from_bytes(raw[pos:pos + 4], "big")
    return pos + tail == len(raw)


# A file written anew in place (the same inode, as long or longer at the next look) is told only by its frame 0: read
# again and compared every FIRST_FRAME_CHECK_S seconds (a frame's read, 8 MiB at 2048 x 2048, beside the frames read
# meanwhile), and whenever the file is found smaller than at the look before.
FIRST_FRAME_CHECK_S = 5.0


def _file_size(path: str, default: int) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return default


def _digest(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frame).view(np.uint8), digest_size=16).digest()


def _stored(dset: h5py.Dataset, k: int) -> bool:
    """Whether every chunk holding frame ``k`` is in the file -- for a virtual dataset, in the source file that
    maps it (a detector's files appear as the scan goes: read before, frame k is the fill value, zeros);
    other layouts only have their shape to tell."""
    if dset.is_virtual:
        for v0, v1, s0, name, inside in virtual_sources(dset, dset.file.filename):
            if v0 <= k <= v1:
                try:
                    with h5py.File(name, "r", locking=False) as src:
                        held = src[inside]
                        return s0 + k - v0 < held.shape[0] and _stored(held, s0 + k - v0)
                except (OSError, KeyError, ValueError, TypeError):
                    return False  # not there yet, or not readable yet
        return False
    chunks = dset.chunks
    if chunks is None:
        return True
    _, ny, nx = dset.shape
    first = k - k % chunks[0]
    return all(dset.id.get_chunk_info_by_coord((first, y, x)).byte_offset is not None
               for y in range(0, ny, chunks[1]) for x in range(0, nx, chunks[2]))


class FollowedSource(FrameSource):
    """What the sources that follow a growing file or folder share: how they end and close.

    Subclasses set ``_wake``, ``_watcher``, ``_angles`` and ``_closed``.
    """

    rereadable = True  # a resumed run follows the file (folder) again from its start, dropping the frames before

    def __init__(self, cfg):
        self.url = cfg.url
        self._idle_s = cfg.idle_timeout_s
        self._poll_s = cfg.poll_interval_s
        self._expected = cfg.expected_frames
        self.frame_shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.n_frames: int | None = cfg.expected_frames
        self.end_reason: str | None = None

    def _finish(self, reason: str, delivered: int) -> None:
        self.end_reason = reason
        self.n_frames = delivered
        log.info("%s: scan over (%s) after %d frames", self.url, reason, delivered)
        self.close()

    def stop(self) -> None:
        """End the frames at the next look (from any thread); the files stay open until `close`."""
        self._closed = True
        self._wake.set()

    def close(self) -> None:
        """Stop the watcher and release the files; safe to call again."""
        self.stop()
        self._watcher.stop()
        if self._angles is not None:
            self._angles.close()
        self._release()

    def _release(self) -> None:
        """Release what the subclass holds open."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Hdf5WatchSource(FollowedSource):
    """Frames of a 3-D integer dataset (frames, y, x) that another process is appending to.

    See the module docstring for when a frame is complete and when the scan
    is over.  Iterate once; ``close()`` releases the file and the watcher.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        path, self._name = parse_url(cfg.url)
        # looks: times the file was checked; notifications: looks woken by the file system; retries: failed
        # opens and reads; reopens: reopens forced by a failure; angles_missing: frames sent with psi None
        self.counters = {"looks": 0, "notifications": 0, "retries": 0, "reopens": 0, "angles_missing": 0}
        self._file = LiveFile(path)
        self._end_path = _end_time_path(self._name)
        self._angles = None
        watched = [path]
        if cfg.angles:
            angles_path = cfg.angles if is_angle_file(cfg.angles) else parse_url(cfg.angles)[0]
            same = os.path.realpath(angles_path) == os.path.realpath(path)
            self._angles = LiveAngles(cfg.angles, self._file if same else None)
            watched.append(angles_path)
        # psi waits for its angle only while the angles keep up with the frames (one miss ends that)
        self._angle_wait_s = min(ANGLE_WAIT_S, self._idle_s / 2)
        self._angles_in_step = True
        self._wake = threading.Event()
        self._watcher = Watcher(self._wake, paths=watched)
        self._closed = False
        # what the last look saw
        self._dset: h5py.Dataset | None = None
        self._n = 0
        self._ended = False
        self._writer_gone = False  # nothing grew for the idle timeout: no chunk is being written again
        self._waiting: int | None = None  # a listed frame waited for, not written yet
        self._rewritten: int | None = None  # frames a chunk, where a writer without SWMR writes chunks again
        self._decoded: tuple[int, np.ndarray] | None = None  # (first frame, frames) of the last chunk decoded
        self._why = "file not found"  # why there is no dataset to read yet
        self._error = ""  # the last read error
        self._path = path
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file whose frames are read
        self._size = 0  # of the file at the last look, bytes
        self._shrank = False  # the file was smaller at a look than at the one before: was it written anew?
        self._first: bytes | None = None  # digest of frame 0 as read
        self._checked_s: float | None = None  # time.monotonic() of the last look at frame 0 (see FIRST_FRAME_CHECK_S)
        try:
            self._look()  # a dataset already there gives the frame shape before the first frame
        except BaseException:
            self.close()
            raise

    @property
    def waiting_for(self) -> str | None:
        """What the source waits for before its first frame (for the status), or None."""
        if self._dset is not None and self._n > 0:
            return None
        what = self._why if self._dset is None else "its first frame"
        if what == "file not found":
            what += not_found_hint(self._path)
        return f"{self.url}: {what} (waiting at most {self._idle_s:g} s, source.idle_timeout_s)"

    def _written_anew(self, k: int) -> str | None:
        """Why the file followed is no longer the one whose first ``k`` frames were read, or None. A file that
        shrank (HDF5 may trim a file's end when its writer closes it) is looked at again: its frame 0."""
        replaced = self._replaced()  # (the first look that sees the dataset takes the file's identity)
        if k == 0:
            return None
        if replaced:
            return "another file was moved to its name"
        if self._dset is None:
            return None
        if self._n < k:
            return f"the dataset now holds {self._n} frames, fewer than the {k} already read"
        due = self._checked_s is not None and time.monotonic() - self._checked_s >= FIRST_FRAME_CHECK_S
        if self._shrank or due:
            why = "the file shrank" if self._shrank else "looked at again"
            self._shrank, self._checked_s = False, time.monotonic()
            try:
                same = _stored(self._dset, 0) and _digest(self._dset[0]) == self._first
            except _H5_ERRORS:
                return None  # being written: looked at again later
            if not same:
                return f"{why}, its frame 0 is not the one read"
        return None

    def _replaced(self) -> bool:
        """Whether the file at the path is no longer the one whose frames were read (replaced by another)."""
        try:
            st = os.stat(self._path)
        except OSError:
            return False  # gone: the idle timeout says so, unless it comes back
        now = (st.st_dev, st.st_ino)
        if self._file_id is None:
            if self._dset is not None:
                self._file_id = now
            return False
        return now != self._file_id

    @property
    def frames_listed(self) -> int:
        """Frames the file listed at the last look: what the acquisition has written, for a backlog display --
        up to the frame being waited for when it is not written yet (a dataset allocated for the whole scan lists
        every frame from the start), and the frames delivered once the scan is over."""
        if self.end_reason is not None:
            return self.n_frames
        return min(self._n, self._waiting) if self._waiting is not None else self._n

    # -- looking at the file -----------------------------------------------------

    def _look(self) -> None:
        self.counters["looks"] += 1
        self._watcher.start()
        self._dset = None
        h5 = self._file.look()
        if h5 is None:
            self._why = self._file.error
            if self._why != "file not found":
                self.counters["retries"] += 1
            return
        try:
            dset = h5.get(self._name)
            if not isinstance(dset, h5py.Dataset):
                self._why = "is a group, expected a dataset" if isinstance(dset, h5py.Group) else "no such dataset"
                # a kept SWMR handle does not show objects created after it was opened
                self._file.close()
                return
            self._check(dset)
            if self._file.swmr:
                dset.refresh()
            self._n, self._dset = dset.shape[0], dset
            size = _file_size(self._path, self._size)
            self._shrank, self._size = self._shrank or size < self._size, size
            self._ended = self._ended or self._end_path in h5
            # a writer without SWMR writes a chunk of several frames again at every flush: read whole ones only
            # (whatever mode this handle is in: a plain open that fails once falls back to SWMR)
            c = dset.chunks[0] if dset.chunks is not None else 1
            self._rewritten = c if c > 1 and _plugin_filtered(dset) else None
        except _H5_ERRORS as exc:
            self.counters["retries"] += 1
            self._why = f"cannot read ({one_line(exc)})"
            self._reopen()
            return
        self._why = "no frames"
        if self._angles is not None:
            self._angles.look()

    def _check(self, dset: h5py.Dataset) -> None:
        shape, dtype = dset.shape, dset.dtype
        if len(shape) != 3 or min(shape[1:]) < 1:
            raise InputError(f"source.url: {self.url}: expected a 3-D stack of frames (frames, y, x), "
                             f"got shape {shape}")
        self.frame_shape, self.dtype = tuple(shape[1:]), counts_dtype(dtype, f"source.url: {self.url}")

    def _reopen(self) -> None:
        self.counters["reopens"] += 1
        self._file.close()

    def _readable(self) -> int:
        """How many frames may be read now (see the module docstring)."""
        if self._expected is not None and self._n >= self._expected:
            return self._expected
        if self._ended or self._writer_gone:
            return self._n
        listed = self._n - 1
        c = self._rewritten
        return listed if c is None else listed - listed % c  # chunks the dataset has grown past: written whole

    def _chunk_frames(self, k: int) -> np.ndarray | None:
        """The frames of frame k's chunks (of a plugin's filter and several frames: see _HDF5_FILTERS), decoded
        from their stored bytes read once, through the dataset's own filters on a copy in memory: what a writer
        without SWMR does to the file meanwhile cannot reach the decoder. Bitshuffle's framing is checked first (a
        chunk caught half written fails it: None)."""
        dset, c = self._dset, self._rewritten
        first = k - k % c
        if self._decoded is not None and self._decoded[0] == first:
            return self._decoded[1]
        _, ny, nx = dset.shape
        _, cy, cx = dset.chunks
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
        if [f[0] for f in filters] != [_BITSHUFFLE]:  # another plugin's: whole chunks, as HDF5 decodes them
            self._decoded = (first, dset[first:first + c])
            return self._decoded[1]
        nbytes = c * cy * cx * dset.dtype.itemsize
        frames = np.empty((c, ny, nx), dset.dtype)
        # the filter as it was asked for (its first 3 values are those HDF5 sets for a dataset: set again)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((c, cy, cx))
        dcpl.set_filter(_BITSHUFFLE, filters[0][1], tuple(filters[0][2][3:]))
        with h5py.File(f"dctstream-chunk-{id(self)}", "w", driver="core", backing_store=False) as mem:
            tile = h5py.h5d.create(mem.id, b"chunk", dset.id.get_type(), h5py.h5s.create_simple((c, cy, cx)),
                                   dcpl=dcpl)
            block = np.empty((c, cy, cx), dset.dtype)
            for y in range(0, ny, cy):
                for x in range(0, nx, cx):
                    mask, raw = dset.id.read_direct_chunk((first, y, x))
                    if mask or not bitshuffle_chunk_sound(raw, nbytes, dset.dtype.itemsize):
                        return None
                    tile.write_direct_chunk((0, 0, 0), raw)
                    tile.read(h5py.h5s.ALL, h5py.h5s.ALL, block)
                    frames[:, y:y + cy, x:x + cx] = block[:, :ny - y, :nx - x]
        self._decoded = (first, frames)
        return frames

    def _read(self, k: int) -> np.ndarray | None:
        """Frame ``k`` if it is stored and reads, else None (and why in ``_error``)."""
        if self._dset is None:
            self._error = self._why
            return None
        try:
            if not _stored(self._dset, k):
                self._error = "not written yet"
                self._waiting = k
                return None
            self._waiting = None
            if self._rewritten is not None:
                frames = self._chunk_frames(k)
                if frames is None:
                    self.counters["retries"] += 1
                    self._error = "its chunk is not whole (being written again?)"
                    self._reopen()
                    return None
                data = frames[k % self._rewritten].copy()
            else:
                data = self._dset[k]
        except _H5_ERRORS as exc:
            self.counters["retries"] += 1
            self._error = f"cannot read ({one_line(exc)})"
            self._reopen()
            return None
        if k == 0:
            self._first, self._checked_s = _digest(data), time.monotonic()
        return self._counts(data, f"source.url: {self.url}: frame {k}")

    def _psi(self, k: int) -> float | None:
        psi = None if self._angles is None else self._angles.get(k)
        if self._angles is not None and psi is None:
            self.counters["angles_missing"] += 1
        return psi

    def _angle_late(self, k: int) -> bool:
        """Whether frame ``k`` should wait for its angle (it is not there, but the angles kept up so far)."""
        return (self._angles is not None and self._angles_in_step and not self._ended
                and self._angles.get(k) is None)

    # -- the frames ----------------------------------------------------------------

    def __iter__(self):
        k = 0
        quiet_since = time.monotonic()  # since the last growth, new file state or delivered frame
        stuck_since = None  # since when frame k could be read by the shape but was not
        angle_since = None  # since when frame k waits for its angle
        seen = None
        while not self._closed:
            self._look()
            anew = self._written_anew(k)
            if anew:
                log.warning("%s: written anew after %d frames (%s): a new acquisition under the same name? The scan "
                            "ends there (the new file's frames are not mixed in)", self.url, k, anew)
                self._finish("replaced", k)
                return
            # what counts as progress: the file appearing, the dataset appearing, the dataset growing
            phase = 2 if self._dset is not None else int(self._why != "file not found")
            state = (phase, self._n)
            if state != seen:
                seen, quiet_since = state, time.monotonic()
            while k < self._readable() and not self._closed:
                if self._angle_late(k):
                    angle_since = angle_since or time.monotonic()
                    if time.monotonic() - angle_since < self._angle_wait_s:
                        break
                    log.warning("%s: no angle for frame %d after %g s: frames without one get psi None",
                                self._angles.url, k, self._angle_wait_s)
                    self._angles_in_step = False
                angle_since = None
                data = self._read(k)
                if data is None:
                    break
                yield Frame(k, self._psi(k), data)
                k += 1
                quiet_since, stuck_since = time.monotonic(), None
                if self._expected is not None and k >= self._expected:
                    self._finish("expected_frames", k)
                    return
            if self._closed:
                return
            if self._ended and k >= self._readable():
                if self._expected is not None and k < self._expected:
                    log.warning("%s: the scan ended after %d frames, %d were expected", self.url, k,
                                self._expected)
                self._finish("end_time", k)
                return
            now = time.monotonic()
            if k < self._readable() and angle_since is None:
                if self._ended and self._error == "not written yet" and not self._written_after(k):
                    self._left_out(k)  # a preallocated dataset of a scan that ended early: nothing more comes
                    return
                stuck_since = stuck_since or now
                if now - stuck_since >= self._idle_s:
                    self._give_up(k)
                    return
                if self._file.h5 is not None and self._file.swmr and now - self._file.opened_s >= self._poll_s:
                    self._file.close()  # a kept SWMR handle does not show end_time (see below)
                    continue
                deadline = stuck_since + self._idle_s
            elif angle_since is not None:
                deadline = angle_since + self._angle_wait_s
            elif now - quiet_since >= self._idle_s:
                yield from self._idle_end(k)
                return
            elif self._file.h5 is not None and self._file.swmr and now - self._file.opened_s >= self._poll_s:
                # A kept SWMR handle never shows what the writer adds after leaving SWMR mode (end_time):
                # when nothing grows, look through a fresh one, at most every poll interval.
                self._file.close()
                continue
            else:
                deadline = quiet_since + self._idle_s
            self._wait(deadline)

    def _wait(self, deadline: float) -> None:
        timeout = max(0.0, min(self._poll_s, deadline - time.monotonic()))
        if self._wake.wait(timeout):
            self.counters["notifications"] += 1
        self._wake.clear()

    def _written_after(self, k: int) -> bool:
        """Whether a frame listed after frame k is written (True when that cannot be told)."""
        try:
            return any(_stored(self._dset, j) for j in range(k + 1, self._n))
        except _H5_ERRORS:
            return True  # better an error than frames left out unsaid

    def _left_out(self, k: int) -> None:
        """Frames k on were listed but never written (a writer that resized ahead of its data, or a dataset
        allocated for the whole scan, which ended early): the scan ends before them."""
        log.warning("%s: frames %d to %d were listed but never written: left out", self.url, k, self._n - 1)
        self._finish("end_time" if self._ended else "idle_timeout", k)

    def _give_up(self, k: int) -> None:
        """Frame ``k`` stayed unreadable for the idle timeout: an error, unless it and all after it were
        never written (the writer died having resized ahead of its data)."""
        if self._error == "not written yet" and not self._written_after(k):
            self._left_out(k)
            return
        raise InputError(f"source.url: {self.url}: frame {k}: expected a complete frame within "
                         f"{self._idle_s:g} s (source.idle_timeout_s), got {self._error}")

    def _idle_end(self, k: int):
        """Nothing grew for the idle timeout: the writer is gone.  Its last listed frame counts if it was written."""
        if self._n == 0:
            hint = not_found_hint(self._path) if self._why == "file not found" else ""
            raise InputError(f"source.url: {self.url}: expected frames within {self._idle_s:g} s "
                             f"(source.idle_timeout_s), got {self._why}{hint}")
        if self._why == "file not found" and self._dset is None:
            log.warning("%s: the file vanished during the scan, after %d frames", self.url, k)
            self._finish("vanished", k)
            return
        self._writer_gone = True
        while k < self._n:  # the last listed frame, or the last chunk's (see _readable)
            data = self._read(k)
            if data is None:
                log.warning("%s: frame %d was listed but never completely written (%s): left out",
                            self.url, k, self._error)
                break
            yield Frame(k, self._psi(k), data)
            k += 1
        self._finish("idle_timeout", k)

    def read_again(self, k: int) -> np.ndarray:
        """Frame ``k`` again, once delivered (a scan of passes goes on in psi order: `dctstream.order`).

        Through a handle opened for it and closed at once: HDF5 shares an open file with the next open of it in
        this process, so a handle kept open would keep the looks from seeing the file grow."""
        file = LiveFile(self._path)
        try:
            h5 = file.look()
            dset = None if h5 is None else h5.get(self._name)
            if isinstance(dset, h5py.Dataset):
                if file.swmr:
                    dset.refresh()
                return self._counts(dset[k], f"source.url: {self.url}: frame {k}")
            why = file.error if h5 is None else "no such dataset"
        except _H5_ERRORS as exc:
            why = one_line(exc)
        finally:
            file.close()
        raise InputError(f"source.url: {self.url}: frame {k}: cannot read it again ({why}), expected the frames "
                         "already read to stay in the file")

    def _release(self) -> None:
        self._file.close()


# Where a DECTRIS master file says what it knows about its detector.
MASTER_DATA = "/entry/data"
_DETECTOR = "/entry/instrument/detector"
_SPECIFIC = f"{_DETECTOR}/detectorSpecific"
_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


def _scalar(h5: h5py.File, path: str) -> int | None:
    obj = h5.get(path)
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "ui" and obj.size == 1:
        return int(np.ravel(obj[()])[0])
    return None


class DectrisMasterSource(FollowedSource):
    """Frames of a DECTRIS master file (``x_master.h5::/entry/data``) whose ``data_NNNNNN`` entries are external
    links to data files (``x_data_NNNNNN.h5::/entry/data/data``) that appear one after another as the detector
    writes them.

    The master says how many frames the series has (``detectorSpecific/nimages`` x ``ntrigger``), the bit depth
    (``bit_depth_image``: a pixel at all bits set has no data, ``invalid_value``) and the detector's own
    ``pixel_mask`` (non-zero = bad, ``pixel_mask``); both are masked by the pipeline.  A data file is read as it
    appears; its last listed frame waits until the file grows, the next data file appears or the series is
    complete (as `Hdf5WatchSource` does).  The scan is over once every frame of the series is delivered
    (``complete``), or nothing new came for ``source.idle_timeout_s`` (``idle_timeout``).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self._path, _ = parse_url(cfg.url)
        self.counters = {"looks": 0, "notifications": 0, "retries": 0, "files": 0, "angles_missing": 0}
        self._angles = None
        self._wake = threading.Event()
        self._watcher = Watcher(self._wake, folders=[os.path.dirname(os.path.abspath(self._path))])
        self._closed = False
        self._data: h5py.File | None = None
        self.invalid_value: int | None = None
        self.pixel_mask: np.ndarray | None = None
        try:
            self._read_master()
            if cfg.angles:
                from .hdf5 import read_dataset
                self._psi = np.asarray(read_dataset(cfg.angles, "source.angles"), np.float64).ravel()
            else:
                self._psi = None
        except BaseException:
            self.close()
            raise

    def _read_master(self) -> None:
        if not os.path.exists(self._path):
            raise InputError(f"source.url: {self._path}: file not found, expected a DECTRIS master file")
        folder = os.path.dirname(os.path.abspath(self._path))
        try:
            h5 = h5py.File(self._path, "r", locking=False)
        except OSError as exc:
            raise InputError(f"source.url: {self._path}: cannot open as HDF5 ({one_line(exc)}), expected a "
                             "DECTRIS master file") from None
        with h5:
            group = h5.get(MASTER_DATA)
            if not isinstance(group, h5py.Group):
                raise InputError(f"source.url: {self.url}: no group {MASTER_DATA}, expected a DECTRIS master file")
            self._files = []
            for name in sorted(n for n in group if n.startswith("data_")):
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    self._files.append((os.path.join(folder, link.filename), link.path))
                else:  # data inside the master itself
                    self._files.append((os.path.abspath(self._path), f"{MASTER_DATA}/{name}"))
            if not self._files:
                signal = group.attrs.get("signal")
                signal = signal.decode() if isinstance(signal, bytes) else signal
                if isinstance(signal, str) and isinstance(group.get(signal), h5py.Dataset):  # NeXus, not DECTRIS
                    raise InputError(f"source.url: {self.url}: a NeXus NXdata group whose signal is {signal!r}, "
                                     f"taken for a DECTRIS master file's {MASTER_DATA} (no data_NNNNNN entries): "
                                     f"expected the frames dataset, {self._path}::{MASTER_DATA}/{signal}")
                raise InputError(f"source.url: {self.url}: no data_NNNNNN entries, expected links to the data files "
                                 "of a DECTRIS master file")
            nimages, ntrigger = _scalar(h5, f"{_SPECIFIC}/nimages"), _scalar(h5, f"{_SPECIFIC}/ntrigger") or 1
            if nimages:
                self.n_frames = nimages * ntrigger if self._expected is None else min(self._expected,
                                                                                     nimages * ntrigger)
            bits = _scalar(h5, f"{_DETECTOR}/bit_depth_image")
            ny, nx = _scalar(h5, f"{_SPECIFIC}/y_pixels_in_detector"), _scalar(h5, f"{_SPECIFIC}/x_pixels_in_detector")
            if bits in _DTYPES:
                self.invalid_value = 2**bits - 1
                if ny and nx:
                    self.frame_shape, self.dtype = (ny, nx), np.dtype(_DTYPES[bits])
            mask = h5.get(f"{_SPECIFIC}/pixel_mask")
            if isinstance(mask, h5py.Dataset) and mask.ndim == 2:
                self.pixel_mask = mask[()]

    @property
    def waiting_for(self) -> str | None:
        return None if self._data is not None else f"{self.url}: its first data file {self._files[0][0]}"

    def __iter__(self):
        k, quiet_since = 0, time.monotonic()
        total = self.n_frames
        for i, (path, name) in enumerate(self._files):
            taken = 0  # frames of this file delivered
            while not self._closed:
                self.counters["looks"] += 1
                self._watcher.start()
                dset = self._open(path, name)
                n = 0 if dset is None else dset.shape[0]
                later = i + 1 < len(self._files) and os.path.exists(self._files[i + 1][0])
                done = later or (total is not None and k + n - taken >= total)
                readable = n if done else n - 1
                while taken < readable and (total is None or k < total):
                    try:
                        if not _stored(dset, taken):
                            break
                        data = dset[taken]
                    except _H5_ERRORS as exc:
                        log.debug("%s: frame %d: cannot read yet (%s)", path, taken, one_line(exc))
                        self.counters["retries"] += 1
                        self._close_data()
                        break
                    yield Frame(k, self._angle(k), data)
                    k, taken, quiet_since = k + 1, taken + 1, time.monotonic()
                if total is not None and k >= total:
                    self._finish("complete", k)
                    return
                if done and taken >= n and dset is not None:
                    self.counters["files"] += 1
                    self._close_data()
                    break
                if time.monotonic() - quiet_since >= self._idle_s:
                    # the writer is gone: its last listed frame counts if it is there whole
                    if dset is not None and taken < n and _stored(dset, taken):
                        yield Frame(k, self._angle(k), dset[taken])
                        k += 1
                    log.warning("%s: nothing new for %g s (source.idle_timeout_s) after %d frames%s", self.url,
                                self._idle_s, k, f" of {total}" if total else "")
                    self._finish("idle_timeout", k)
                    return
                self._close_data()  # a plain handle goes stale: look again through a fresh one
                if self._wake.wait(self._poll_s):
                    self.counters["notifications"] += 1
                self._wake.clear()
            if self._closed:
                return
        self._finish("complete" if total is None or k >= total else "end_time", k)

    def _open(self, path: str, name: str) -> h5py.Dataset | None:
        if not os.path.exists(path):
            return None
        try:
            self._data = h5py.File(path, "r", locking=False)
            dset = self._data.get(name)
        except _H5_ERRORS:
            self.counters["retries"] += 1
            self._close_data()
            return None
        if not isinstance(dset, h5py.Dataset):
            return None
        if dset.ndim != 3 or dset.dtype.kind not in "ui":
            raise InputError(f"source.url: {path}::{name}: expected a 3-D stack of integer frames (frames, y, x), "
                             f"got shape {dset.shape}, dtype {dset.dtype}")
        if self.frame_shape is not None and tuple(dset.shape[1:]) != self.frame_shape:
            raise InputError(f"source.url: {path}::{name}: frames of {tuple(dset.shape[1:])} pixels, expected "
                             f"{self.frame_shape} as the master file {self._path} says")
        self.frame_shape = tuple(dset.shape[1:])
        if self.dtype is None or self.dtype.itemsize < dset.dtype.itemsize:
            self.dtype = dset.dtype
        return dset

    def _angle(self, k: int) -> float | None:
        if self._psi is None:
            return None
        if k < self._psi.size:
            return float(self._psi[k])
        self.counters["angles_missing"] += 1
        return None

    def _close_data(self) -> None:
        if self._data is not None:
            try:
                self._data.close()
            except _H5_ERRORS:
                pass
            self._data = None

    def _release(self) -> None:
        self._close_data()
