"""The raw frames of a stream, kept on disk until no checkpoint needs them: a stream cannot be read again.

A file or folder source is read again to resume a run (see ``checkpoint``).
A detector stream is gone once received, so for a stream source the reader
thread keeps every frame it yields in ``OUT/.dctstream/spool/``, and no more:

* ``series.json``: once per run, what the series' header said and its first
  frames showed (series id, announced frame count, goniometer, channel, frame
  shape and type; ``continue_series`` of the stream source), so that psi keeps
  coming after a restart that never sees the header;
* ``end.json``, once the stream said the scan is over (series end, frame
  count reached, silence): a run killed while finishing does not wait for
  frames that will never come;
* ``NNNNNNNNN.frame``, one per frame: its index, psi (or none), shape, type
  and pixels, bitshuffle + LZ4 compressed (about 3 ms and 2-3x smaller for a
  2048 x 2048 uint16 frame of Poisson background; plain LZ4 takes 10-20 ms for
  1.0-1.8x), and a CRC32 of the whole record. A frame lost in transit is kept
  as such (no pixels), so that a resumed run replaces it again. Each record is
  written to a temporary file and renamed: a kill mid-write leaves a temporary
  file, never a record read back as valid.

When a checkpoint is saved (writer thread) the spooled frames from its
``first_raw`` on are synced first, then the frames before it are deleted. The
spool holds the frames from the last saved checkpoint's ``first_raw`` to the
newest frame read: background.window (half before the checkpoint's oldest
needed frame, half read ahead of the segmenter) + the segmenter's reach + the
checkpoint interval (more while the writer thread is behind) + the frames
queued for the background stage. It goes with the run's folder once the run
is complete.

To resume, the frames from the checkpoint's ``first_raw`` to the last one
spooled are yielded again, then the live stream continues the same series
from the frame after it (``continue_series``). Every frame the checkpoint
counted on (``first_raw`` to ``spool_until``, synced before it was saved)
must be there: one missing is an error. Frames spooled after it end at the
first one missing or damaged (the rest are dropped: taken from the stream if
it sends them again, else missing).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import zlib
from contextlib import suppress
from pathlib import Path

import bitshuffle
import numpy as np

from .atomic import output_error, replacing, sync_files, write_atomic
from .checkpoint import RUN_DIR
from .errors import OutputError
from .types import Frame

log = logging.getLogger(__name__)

SPOOL = "spool"
FACTS = "series.json"
END = "end.json"
_NAME = re.compile(r"^(\d{9})\.frame$")
_MAGIC = b"DCTSPL1\n"
# magic, frame index, psi (NaN: none), has psi, has pixels, rows, columns, dtype (numpy str), payload bytes
_HEAD = struct.Struct("<8sqd??II8sQ")
_CRC = struct.Struct("<I")


def for_source(source, out_dir: Path, resume: tuple | None, resuming: bool) -> Spool | None:
    """The spool of a stream source (None for a source that can be read again); checked now when resuming."""
    if source.rereadable:
        return None
    meta = resume[0] if resume else {}
    return Spool(Path(out_dir) / RUN_DIR / SPOOL, resuming, meta.get("first_raw", 0), meta.get("spool_until", -1))


def frame_path(folder: Path, k: int) -> Path:
    return folder / f"{k:09d}.frame"


def encode(frame: Frame) -> bytes:
    """One frame as a spool record."""
    data = frame.data
    psi = frame.psi_deg
    if data is None:
        shape, dtype, payload = (0, 0), b"", b""
    else:
        data = np.ascontiguousarray(data)
        shape, dtype = data.shape, data.dtype.str.encode()
        payload = bitshuffle.compress_lz4(data.reshape(-1), 0).tobytes()
    head = _HEAD.pack(_MAGIC, frame.index, math.nan if psi is None else psi, psi is not None, data is not None,
                      *shape, dtype, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def decode(record: bytes) -> Frame | None:
    """The frame of a spool record; None when it is not a whole record (damaged or cut short)."""
    if len(record) < _HEAD.size + _CRC.size:
        return None
    magic, index, psi, has_psi, has_data, ny, nx, dtype, size = _HEAD.unpack_from(record)
    if magic != _MAGIC or len(record) != _HEAD.size + size + _CRC.size:
        return None
    (crc,) = _CRC.unpack_from(record, _HEAD.size + size)
    if crc != zlib.crc32(memoryview(record)[_HEAD.size:_HEAD.size + size], zlib.crc32(record[:_HEAD.size])):
        return None
    data = None
    if has_data:
        dtype = np.dtype(dtype.rstrip(b"\0").decode())
        payload = np.frombuffer(record, np.uint8, size, _HEAD.size)
        data = bitshuffle.decompress_lz4(payload, (ny * nx,), dtype, 0).reshape(ny, nx)
    return Frame(index, psi if has_psi else None, data)


class Spool:
    """The frames of a stream run in ``folder``: written by the reader thread, synced and pruned by the
    writer thread at each checkpoint, read back when resuming."""

    def __init__(self, folder: Path, resuming: bool, first: int = 0, needed_until: int = -1):
        self.folder = folder
        self.resuming = resuming
        self.first = first  # resuming: the first frame to yield again (the checkpoint's first_raw)
        self.last = -1  # the last frame spooled (or read back)
        self.oldest = first  # frames before it are deleted
        self._synced = first - 1  # frames up to it are synced
        self._facts: dict | None = None
        self._ready = False
        self._stored: set[int] = set()
        self._needed_until = needed_until
        self._end: dict | None = None
        if resuming:
            self._check(needed_until)

    # -- resuming --

    def _check(self, needed_until: int) -> None:
        """Every frame the checkpoint counted on is in the spool, and its series facts; leftovers go."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot read the spool ({exc.strerror})") from None
        for name in names:
            match = _NAME.match(name)
            if match:
                self._stored.add(int(match[1]))
            elif name.endswith(".tmp"):  # a record whose writer was killed
                (self.folder / name).unlink()
        for k in range(self.first, needed_until + 1):
            if k not in self._stored:
                raise OutputError(f"{frame_path(self.folder, k)}: frame {k} is missing from the spool, expected "
                                  f"every frame from {self.first} to {needed_until} (the stream's frames the "
                                  "checkpoint needs to continue the unfinished run); pass --overwrite to start again")
        for k in sorted(k for k in self._stored if k < self.first):  # the last prune was cut short
            frame_path(self.folder, k).unlink()
        if any(k >= self.first for k in self._stored):
            facts = self.folder / FACTS
            try:
                self._facts = json.loads(facts.read_text())
            except (OSError, ValueError) as exc:
                raise OutputError(f"{facts}: cannot read the series facts of the spool ({exc}), expected the file "
                                  "dctstream wrote with the first frame; pass --overwrite to start again") from None
        with suppress(FileNotFoundError, ValueError):
            self._end = json.loads((self.folder / END).read_text())
        self._ready = self.folder.is_dir()

    def _read_back(self):
        """The spooled frames from ``first`` on, in order, up to the first missing or damaged after the
        frames the checkpoint needs."""
        k = self.first
        while k in self._stored:
            path = frame_path(self.folder, k)
            try:
                frame = decode(path.read_bytes())
            except OSError as exc:
                raise OutputError(f"{path}: cannot read frame {k} from the spool ({exc.strerror})") from None
            if frame is None or frame.index != k:
                if k <= self._needed_until:
                    raise OutputError(f"{path}: frame {k} in the spool is damaged, expected a whole record "
                                      "written by dctstream; pass --overwrite to start again")
                break
            yield frame
            self.last = k
            k += 1
        dropped = sorted(j for j in self._stored if j >= k)
        if dropped:
            log.warning("%s: frames %d..%d of the spool not used (frame %d is missing or damaged: written after "
                        "the last checkpoint, then cut short); they are taken from the stream if it sends them "
                        "again", self.folder, dropped[0], dropped[-1], k)
            for j in dropped:
                frame_path(self.folder, j).unlink()
        self._stored.clear()

    # -- the frames of a run --

    def frames(self, source):
        """The frames to process: when resuming, the spooled ones, then the live stream continued after
        them; each live frame is spooled before it is yielded. Runs in the reader thread."""
        if self.resuming:
            yield from self._read_back()
            if self._end is not None and self._end["last"] == self.last:  # the stream was over already
                source.end_reason = self._end["end_reason"]
                log.info("%s: %d frames read back from the spool, the stream had ended (%s)",
                         self.folder, self.last + 1 - self.first, source.end_reason)
                return
            if self._facts is not None and self.last >= 0:
                source.continue_series(self._facts, self.last + 1)
                log.info("%s: %d frames read back from the spool, the stream continues at frame %d",
                         self.folder, self.last + 1 - self.first, self.last + 1)
        for frame in source:
            self.add(frame, source)
            yield frame
        if self.last >= 0 and source.end_reason is not None:
            self._write(self.folder / END, json.dumps({"end_reason": source.end_reason, "last": self.last}), sync=True)

    def add(self, frame: Frame, source) -> None:
        """Keep ``frame`` (renamed into place whole; synced at the next checkpoint)."""
        path = frame_path(self.folder, frame.index)
        try:
            if not self._ready:  # a new run: what an earlier run spooled is not this one's
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder.mkdir(parents=True, exist_ok=True)
                self._ready = True
            if self._facts is None:
                self._facts = source.series_facts()
                self._write(self.folder / FACTS, json.dumps(self._facts))
            record = encode(frame)
            with replacing(path) as tmp:
                tmp.write_bytes(record)
        except OSError as exc:
            raise output_error(path, exc) from None
        self.last = frame.index

    @staticmethod
    def _write(path: Path, text: str, sync: bool = False) -> None:
        write_atomic(path, text, sync=sync)

    # -- at each checkpoint (writer thread) --

    def sync(self, first_raw: int) -> int:
        """Make the spooled frames from ``first_raw`` on durable; returns the last one, which the
        checkpoint counts on."""
        until = self.last
        start = max(first_raw, self._synced + 1)
        paths = [frame_path(self.folder, k) for k in range(start, until + 1)]
        if self._synced < self.first:
            paths.append(self.folder / FACTS)
        sync_files(paths)
        self._synced = max(self._synced, until)
        return until

    def prune(self, first_raw: int) -> None:
        """Delete the frames before ``first_raw``: the checkpoint just saved never reads them again."""
        for k in range(self.oldest, first_raw):
            with suppress(FileNotFoundError):
                frame_path(self.folder, k).unlink()
        self.oldest = max(self.oldest, first_raw)

    def __len__(self) -> int:
        """Frames in the spool now."""
        try:
            return sum(1 for name in os.listdir(self.folder) if _NAME.match(name))
        except FileNotFoundError:
            return 0
