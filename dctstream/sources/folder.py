"""Frames as one file per frame in a folder (the legacy EDF/TIFF layout): ``path/to/dir/*.edf``.

Files are taken in the order of the last run of digits in their names
(``scan0000.edf``, ``scan0001.edf``, ...); frame 0 is the lowest number
present when the first file shows up, and frame k is file number first + k.
Hidden files (``.name``) and names without digits are ignored, and so are
the temporary names writers use before renaming (they do not match the
pattern).  Files are read with fabio.

File n is **complete** when fabio reads it in full (for EDF: a data block
as long as its header says) and either a later-numbered file exists (the
writer has moved on) or the file's size and modification time have not
changed for ``poll_interval_s`` (the newest file, or the last one).  A
writer that renames complete files gets its frames one file late, at worst
``poll_interval_s`` late at the end of the scan.

The scan is over after ``expected_frames`` frames (``source.expected_frames``, else
``TOMO_N`` of the folder's ESRF ``.info`` file, see `read_scan_info`), or when no new
file appeared for ``idle_timeout_s``.  A folder whose newest file was already older
than ``idle_timeout_s`` when the run began is a recorded scan: it ends with its last
file, without waiting (``end_reason`` ``complete``, or ``idle_timeout`` when fewer
files than expected are there), as a finished HDF5 file does.  A missing number
while later files exist, or a file that stays unreadable, is an ``InputError`` after
``idle_timeout_s`` (at once in a recorded folder); with ``source.missing:
repeat-background`` it is a frame without data (the pipeline puts the background in
its place), said and counted (``missing``).  An unreadable last file (a writer
that died: 0 bytes) ends the scan before it, said.

psi comes from ``source.angles`` (``file.h5::/dataset``, read as it grows) when
given, else from the header key ``omega``, ``srot`` or ``diffrz``, or the same
name among SPEC's ``motor_mne`` / ``motor_pos`` header pair, else from the
``.info`` file's ``ScanRange`` over ``TOMO_N`` projections (from 0 degrees), else it
is None.  Which one is said in the run record (``auto``, ``source.angles``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import time
import xml.etree.ElementTree as ElementTree

import fabio
import numpy as np

from ..errors import InputError
from ..types import Frame
from .base import counts_dtype
from .hdf5_live import ANGLE_WAIT_S, FollowedSource, LiveAngles, Watcher, one_line

log = logging.getLogger(__name__)
# fabio logs an ERROR, naming no file, for every read of an EDF file whose data block is not all written yet:
# here that is a file still being written, read again once whole (one that stays short is reported, named)
logging.getLogger("fabio.edfimage").addFilter(lambda record: not record.getMessage().startswith(
    "Data stream is incomplete"))

EXTENSIONS = (".edf", ".tif", ".tiff")
PSI_KEYS = ("omega", "srot", "diffrz")  # header keys (or SPEC motor names) of the rotation angle, in degrees
_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")  # prefix, the last run of digits, suffix


def parse_pattern(url: str) -> tuple[str, str]:
    """Split ``path/to/dir/*.edf`` into the folder and the file-name pattern."""
    folder, pattern = os.path.split(url)
    if not any(c in pattern for c in "*?[") or not pattern.lower().endswith(EXTENSIONS):
        raise InputError(f"source.url: {url}: expected a folder and a file pattern such as path/to/dir/*.edf "
                         f"(or *.tif, *.tiff)")
    return folder or ".", pattern


def read_scan_info(folder: str) -> dict:
    """What an ESRF tomography folder says of its scan: ``{"frames": TOMO_N, "range_deg": ScanRange, "file":
    path}`` (either may be absent), from ``<folder>/<folder name>.info`` (``KEY= value`` lines, as SPEC's
    tomography macros write it) or else ``<folder name>.xml`` (``acquisition/tomo_N``, ``acquisition/scanRange``);
    {} when neither is there.  A value that is not a number is left out and said."""
    name = os.path.basename(os.path.abspath(folder))
    info, xml_path = os.path.join(folder, name + ".info"), os.path.join(folder, name + ".xml")
    values: dict[str, str] = {}
    if os.path.isfile(info):
        path = info
        try:
            with open(info, errors="replace") as f:
                for line in f:
                    key, sep, value = line.partition("=")
                    if sep:
                        values.setdefault(key.strip().lower(), value.split("#")[0].strip())
        except OSError as exc:
            log.warning("%s: cannot be read (%s): the scan's frame count and angles are not taken from it",
                        info, exc.strerror or exc)
            return {}
    elif os.path.isfile(xml_path):
        path = xml_path
        try:
            root = ElementTree.parse(xml_path).getroot()
        except (OSError, ElementTree.ParseError) as exc:
            log.warning("%s: cannot be read (%s): the scan's frame count and angles are not taken from it",
                        xml_path, one_line(exc))
            return {}
        for element in root.iter():
            if element.text and element.text.strip():
                values.setdefault(element.tag.lower(), element.text.strip())
    else:
        return {}
    found: dict = {"file": path}
    for key, field, kind in (("tomo_n", "frames", int), ("scanrange", "range_deg", float)):
        if key not in values:
            continue
        try:
            value = kind(float(values[key])) if kind is int else kind(values[key])
        except (ValueError, OverflowError):  # not a number, or int(inf)
            value = None
        if value is None or not np.isfinite(value) or (kind is int and value < 1) or value == 0:
            log.warning("%s: %s = %r: expected %s, left out", path, key, values[key],
                        "a whole number of projections >= 1" if kind is int else "the scan's range in degrees")
            continue
        found[field] = value
    return found


def is_frame(name: str, pattern: str) -> bool:
    """Whether file ``name`` is one of the frames ``pattern`` names: not hidden, with a number."""
    return not name.startswith(".") and _NUMBER.match(name) is not None and fnmatch.fnmatch(name, pattern)


DARK_NAMES = ("dark.edf", "darkend*.edf")  # an ESRF tomography folder's dark (a mean), in this order


def find_dark(url: str) -> dict:
    """``dark.url: auto`` for a folder source: ``{"url": its dark file or None, "reason": ...}``, the first of
    `DARK_NAMES` in the frames' folder that is not one of the frames."""
    folder, pattern = parse_pattern(url)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for wanted in DARK_NAMES:
        for name in names:
            if fnmatch.fnmatch(name.lower(), wanted) and not is_frame(name, pattern):
                return {"url": os.path.join(folder, name), "reason": f"the folder's {wanted} file"}
    return {"url": None, "reason": f"no {' or '.join(DARK_NAMES)} in {folder} beside the frames"}


def header_psi(header: dict) -> tuple[float, str] | None:
    """(psi in degrees, where it was read) from a frame's header: a `PSI_KEYS` key, or that motor's position in
    SPEC's ``motor_mne`` (names) / ``motor_pos`` (positions) pair; None when neither holds a number."""
    names, positions = str(header.get("motor_mne", "")).split(), str(header.get("motor_pos", "")).split()
    motors = dict(zip(names, positions))
    for values, where in ((header, "header key"), (motors, "header motor_mne/motor_pos")):
        for key in PSI_KEYS:
            try:
                psi = float(values[key])
            except (KeyError, ValueError, TypeError):
                continue
            if np.isfinite(psi):
                return psi, f"{where} {key}"
    return None


class FolderSource(FollowedSource):
    """Frames from numbered EDF or TIFF files in a folder, one file per frame, picked up as they are written.

    See the module docstring for the order, when a file is complete and when
    the scan is over.  Iterate once; ``close()`` stops the watcher.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self._folder, self._pattern = parse_pattern(cfg.url)
        # looks: times the folder was checked; notifications: looks woken by the file system;
        # listings: full folder listings; retries: failed reads; angles_missing: frames sent with psi None;
        # missing: frames sent without data (source.missing: repeat-background)
        self.counters = {"looks": 0, "notifications": 0, "listings": 0, "retries": 0, "angles_missing": 0,
                         "missing": 0}
        self.found: dict[str, dict] = {}
        self._missing_policy = cfg.missing
        self._angles = LiveAngles(cfg.angles) if cfg.angles else None
        self._angle_wait_s = min(ANGLE_WAIT_S, self._idle_s / 2)
        self._angles_in_step = True
        self._wake = threading.Event()
        self._watcher = Watcher(self._wake, folders=[self._folder])
        self._closed = False
        self._first: int | None = None  # the number of frame 0
        self._template: tuple[str, int, str] | None = None  # (prefix, digits, suffix) of the first file's name
        self._listed: dict[int, str] = {}  # number -> name, from the last listing
        self._listed_s = -float("inf")  # time.monotonic() of the last listing
        self._last_number = -1  # highest number seen so far
        self._seen: tuple[int, int, int] | None = None  # (size, mtime_ns, number) of the next file at the last look
        self._seen_since = 0.0  # since when the next file looks like that
        self._failed: tuple[tuple[int, int, int], float] | None = None  # (stat key, time) of its last failed read
        self._error = ""  # why the next file was not delivered
        self._recorded = False  # the folder was still when the run began: it ends with its last file
        self._info: dict = {}  # what its .info file says (`read_scan_info`)
        self._psi_from: str | None = None  # where psi comes from, once a frame was read
        self._psis: list[float] = []  # psi of the last two frames delivered

    # -- the folder ------------------------------------------------------------------

    def _list(self) -> None:
        """Read the folder: every file that matches the pattern, by number."""
        self.counters["listings"] += 1
        self._listed_s = time.monotonic()
        listed: dict[int, str] = {}
        try:
            entries = list(os.scandir(self._folder))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not is_frame(entry.name, self._pattern) or not entry.is_file():
                continue
            number = int(_NUMBER.match(entry.name).group(2))
            if number in listed:  # e.g. dark0000.edf beside scan0000.edf, as legacy DCT folders have
                raise InputError(f"source.url: {self.url}: expected one file per number (narrow the pattern, "
                                 f"e.g. scan*.edf), got {listed[number]} and {entry.name} for number {number}")
            listed[number] = entry.name
        self._listed = listed
        if listed and self._first is None:
            self._first = min(listed)
            prefix, digits, suffix = _NUMBER.match(listed[self._first]).groups()
            self._template = (prefix, len(digits), suffix)
            self._begin(entries)
        self._last_number = max(self._last_number, *listed, -1)

    def _begin(self, entries) -> None:
        """At the first files: what the folder's .info file says, and whether the scan was recorded already."""
        self._info = read_scan_info(self._folder)
        if self._info.get("frames") and self._expected is None:
            self._expected = self.n_frames = self._info["frames"]
            self.found["source.expected_frames"] = {"url": self._info["file"],
                                                    "reason": f"TOMO_N = {self._expected} projections"}
            log.info("source.expected_frames: %d (TOMO_N of %s)", self._expected, self._info["file"])
        names, newest = set(self._listed.values()), 0.0
        for entry in entries:
            if entry.name in names:
                try:
                    newest = max(newest, entry.stat().st_mtime)
                except OSError:  # gone since the listing: the folder is changing
                    newest = time.time()
        age_s = time.time() - newest
        self._recorded = age_s > self._idle_s
        if self._recorded:
            log.info("%s: a recorded scan (its newest file is %.0f s old, source.idle_timeout_s is %g s): it ends "
                     "with its last file", self.url, age_s, self._idle_s)

    def _name(self, number: int) -> str:
        """The file name of ``number``: as listed, else as the first file's name would have it."""
        if number in self._listed:
            return self._listed[number]
        prefix, digits, suffix = self._template
        return f"{prefix}{number:0{digits}d}{suffix}"

    def _stat(self, number: int) -> os.stat_result | None:
        try:
            return os.stat(os.path.join(self._folder, self._name(number)))
        except FileNotFoundError:
            return None

    def _look(self, k: int) -> tuple[int | None, os.stat_result | None, bool]:
        """(number of frame ``k``'s file, its stat or None, whether a later-numbered file exists).

        Files are found by name from the first file's pattern (two stat calls);
        the folder is listed (thousands of names) only to find the first file,
        or when a file is not where the name says, at most every poll interval.
        """
        self.counters["looks"] += 1
        self._watcher.start()
        if self._template is None:
            self._list()
            if self._template is None:
                return None, None, False
        number = self._first + k
        stat = self._stat(number)
        if stat is None and time.monotonic() - self._listed_s >= self._poll_s:
            self._list()
            stat = self._stat(number)
        if self._stat(number + 1) is not None:
            self._last_number = max(self._last_number, number + 1)
        return number, stat, self._last_number > number

    # -- reading a file -----------------------------------------------------------------

    def _read(self, path: str) -> tuple[np.ndarray, dict] | None:
        """(data, header) of a completely written file, or None (and why in ``_error``)."""
        try:
            with fabio.open(path) as image:
                data, header = image.data, dict(image.header)
                incomplete = getattr(image, "incomplete_file", False)
        # fabio raises whatever its parsers meet on a half-written or corrupt file
        # (OSError, ValueError, struct.error, IndexError, ...): all mean "not readable now".
        except Exception as exc:
            self.counters["retries"] += 1
            self._error = f"cannot read ({one_line(exc) or type(exc).__name__})"
            return None
        if incomplete or data is None:  # fabio pads a short EDF data block, and gives no data for a short TIFF
            self.counters["retries"] += 1
            self._error = "a truncated file"
            return None
        if data.ndim != 2:
            raise InputError(f"source.url: {self.url}: {path}: expected a 2-D frame, got shape {data.shape}")
        where = f"source.url: {self.url}: {path}"
        counts = counts_dtype(data.dtype, where)
        if self.frame_shape is None:
            self.frame_shape, self.dtype, self._stored = data.shape, counts, data.dtype
        elif data.shape != self.frame_shape or data.dtype != self._stored:
            raise InputError(f"{where}: expected a {self.frame_shape} frame of {self._stored} like the first one, "
                             f"got {data.shape} of {data.dtype}")
        return self._counts(data, where), header

    def _psi(self, k: int, header: dict | None) -> float | None:
        """psi of frame ``k`` (see the module docstring); ``header`` None: a frame without its file."""
        if self._angles is not None:
            psi, where = self._angles.get(k), f"{self._angles.url} (source.angles)"
            if psi is None:
                self.counters["angles_missing"] += 1
        elif header is not None and (read := header_psi(header)) is not None:
            psi, where = read[0], read[1]
        elif header is None and self._psi_from and self._psi_from.startswith("header") and self._psis:
            # a lost file's angle: one step on from the frame before, as its header would have said
            psi, where = self._psis[-1] + (self._psis[-1] - self._psis[0] if len(self._psis) == 2 else 0.0), None
        elif self._info.get("range_deg") and self._info.get("frames"):
            psi = k * self._info["range_deg"] / self._info["frames"]
            where = f"{self._info['file']}: ScanRange {self._info['range_deg']:g} over TOMO_N {self._info['frames']}"
        else:
            psi, where = None, "none: no angle in the files' headers, no .info file, source.angles not set"
        if self._psi_from is None and where is not None:
            self._psi_from = where
            self.found["source.angles"] = {"url": None if where.startswith("none") else where,
                                           "reason": "a folder of frame files" + ("" if where.startswith("none")
                                                                                   else f": psi from its {where}")}
            log.info("source.angles: %s", where)
        if psi is not None:
            self._psis = [*self._psis[-1:], psi]
        return psi

    def _angle_late(self, k: int) -> bool:
        if self._angles is None or not self._angles_in_step:
            return False
        if self._angles.get(k) is None:
            self._angles.look()
        return self._angles.get(k) is None

    # -- the frames ------------------------------------------------------------------

    def __iter__(self):
        k = 0
        quiet_since = time.monotonic()  # since the last new file, change to the next file or delivered frame
        stuck_since = None  # since when file k is missing while later ones exist, or unreadable
        angle_since = None  # since when frame k waits for its angle
        while not self._closed:
            before = (self._last_number, self._seen)
            number, stat, later = self._look(k)
            now = time.monotonic()
            ready = self._complete(number, stat, later, now)
            if (self._last_number, self._seen) != before:
                quiet_since = now
            if ready and self._angle_late(k):
                angle_since = angle_since or now
                if now - angle_since < self._angle_wait_s:
                    ready = False
                else:
                    log.warning("%s: no angle for frame %d after %g s: frames without one get psi None",
                                self._angles.url, k, self._angle_wait_s)
                    self._angles_in_step = False
            frame = None  # frame k, read or given up on
            if ready:
                angle_since = None
                read = self._read(os.path.join(self._folder, self._name(number)))
                if read is None:
                    self._failed = (_key(stat, number), time.monotonic())
                else:
                    frame = Frame(k, self._psi(k, read[1]), read[0])
            now = time.monotonic()
            if frame is None:
                if angle_since is not None:
                    deadline = angle_since + self._angle_wait_s
                elif number is not None and (later or self._failed is not None):
                    # a number missing before later ones, or a file that does not read: it must come right
                    stuck_since = stuck_since or now
                    limit = 2 * self._poll_s if self._recorded else self._idle_s  # a recorded folder does not change
                    if now - stuck_since >= limit:
                        if not later:  # the last file, unreadable: its writer died
                            log.warning("%s: %s: frame %d: %s for %g s: the scan ends before it", self.url,
                                        os.path.join(self._folder, self._name(number)), k, self._error, limit)
                            self._finish("idle_timeout", k)
                            return
                        if self._missing_policy != "repeat-background":
                            self._give_up(k, number, stat, limit)
                        log.warning("%s: frame %d: %s: replaced by the background (source.missing: "
                                    "repeat-background)", self.url, k, self._why_lost(number, stat))
                        self.counters["missing"] += 1
                        frame = Frame(k, self._psi(k, None), None)
                    deadline = stuck_since + limit
                elif self._recorded and stat is None:  # every file of a recorded folder read
                    self._finish("complete" if self._expected is None else "idle_timeout", k)
                    return
                elif now - quiet_since >= self._idle_s:
                    if self._first is None:
                        raise InputError(f"source.url: {self.url}: expected files matching {self._pattern} in "
                                         f"{self._folder} within {self._idle_s:g} s (source.idle_timeout_s), "
                                         f"got none")
                    self._finish("idle_timeout", k)
                    return
                else:
                    deadline = quiet_since + self._idle_s
                    if stat is not None:  # the newest file: look again once it has been still long enough
                        deadline = min(deadline, self._seen_since + self._poll_s)
                if frame is None:
                    self._wait(deadline)
                    continue
            yield frame
            k += 1
            quiet_since, stuck_since, self._failed = time.monotonic(), None, None
            if self._expected is not None and k >= self._expected:
                self._finish("expected_frames", k)
                return

    def _complete(self, number: int | None, stat: os.stat_result | None, later: bool, now: float) -> bool:
        """Whether file ``number`` should be read now (see the module docstring)."""
        if number is None or stat is None:
            return False
        key = _key(stat, number)
        if key != self._seen:
            self._seen, self._seen_since = key, now
        if self._failed is not None:  # read it again once it changed, or after a poll interval
            failed_key, failed_s = self._failed
            if key == failed_key and now - failed_s < self._poll_s:
                return False
        if later or self._recorded:
            return True
        self._error = "still being written"
        return now - self._seen_since >= self._poll_s

    def _wait(self, deadline: float) -> None:
        timeout = max(0.0, min(self._poll_s, deadline - time.monotonic()))
        if self._wake.wait(timeout):
            self.counters["notifications"] += 1
        self._wake.clear()

    def read_again(self, k: int) -> np.ndarray:
        """Frame ``k`` again, once delivered (a scan of passes goes on in psi order: `dctstream.order`)."""
        path = os.path.join(self._folder, self._name(self._first + k))
        read = self._read(path)
        if read is None:
            raise InputError(f"source.url: {self.url}: {path}: frame {k}: cannot read it again ({self._error}), "
                             "expected the files already read to stay in the folder")
        return read[0]

    def _why_lost(self, number: int, stat: os.stat_result | None) -> str:
        name = self._name(number)
        if stat is None:
            return f"file number {number} ({name}) is missing, got files up to number {self._last_number}"
        return f"{os.path.join(self._folder, name)}: {self._error}"

    def _give_up(self, k: int, number: int, stat: os.stat_result | None, limit: float) -> None:
        within = (f"within {limit:g} s (source.idle_timeout_s)" if not self._recorded
                  else "(a recorded folder: its files no longer change)")
        policy = ("; source.missing: repeat-background goes on without it (in a run of its own: --overwrite, or "
                  "another output folder)")
        if stat is None:
            raise InputError(f"source.url: {self.url}: file number {number} ({self._name(number)}) is missing, "
                             f"expected it {within} for frame {k}, got files up to number {self._last_number}"
                             f"{policy}")
        raise InputError(f"source.url: {self.url}: {os.path.join(self._folder, self._name(number))}: frame {k}: "
                         f"expected a complete file {within}, got {self._error}{policy}")


def _key(stat: os.stat_result, number: int) -> tuple[int, int, int]:
    """What tells whether a file changed between two looks."""
    return stat.st_size, stat.st_mtime_ns, number
