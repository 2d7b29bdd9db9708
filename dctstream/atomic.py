"""Files that appear whole: written under a hidden temporary name in the same folder, then renamed over their
path (``os.replace`` is atomic only within one filesystem), so a reader sees the old file or the new one, never
a part.  Also the durability and crash-test points every writer of the run's files shares."""

from __future__ import annotations

import errno
import os
import re
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import h5py

from .errors import OutputError


def output_error(path: Path, exc: OSError | RuntimeError, resumable: bool = True) -> OutputError:
    # h5py puts HDF5's whole diagnostic into str(exc), with the system's errno inside: say what that
    # errno means (disk full, file too large, read-only, permission denied) and keep the message one line.
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found[1]) if found else None
    reason = os.strerror(code) if code else " ".join((getattr(exc, "strerror", None) or str(exc)).split())
    hint = ("; free some space (or raise the file-size limit) and run the same command again to resume"
            if resumable and code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else "")
    return OutputError(f"{path}: cannot write output, {reason}, expected a writable folder with free space{hint}")


def abandon_h5(h5: h5py.File) -> None:
    """Close ``h5``, an HDF5 file whose writes failed (a full disk, a file-size limit), leaving it on disk as the
    failure left it, as after a kill.

    HDF5 cannot close such a file: it flushes first, which fails again and leaves it open, and as the process
    ends it reports the failure for every handle, then crashes (a segmentation fault after the one-line error,
    from the command line and from a script of the Python API alike). Its descriptor is pointed at the null
    device first, where that flush succeeds and writes nothing."""
    try:
        handle = h5.id.get_vfd_handle()
    except Exception:  # noqa: BLE001  (a file driver without a descriptor)
        handle = None
    if isinstance(handle, int) and handle >= 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, handle)
        os.close(null)
    try:
        h5.close()
    except Exception:  # noqa: BLE001  (closing is all that is left to do)
        pass


@contextmanager
def replacing(path: Path, *, sync: bool = False, crash: str | None = None) -> Iterator[Path]:
    """Yield the temporary path to write; once the block ends without an error it replaces ``path``.

    ``sync``: the file and then its folder are synced (a checkpoint must survive a power cut; a difspot is
    synced later, in bulk, by `sync_files`).  ``crash``: the `crash_point` passed between writing and renaming.
    Whatever happens, no temporary file stays behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        if crash:
            crash_point(crash)
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)
    finally:
        with suppress(OSError):  # after the rename there is nothing left to remove
            tmp.unlink()


def write_atomic(path: Path, data: str | bytes, *, sync: bool = False, crash: str | None = None) -> None:
    """Write ``data`` to ``path`` through `replacing`; a failure is an `OutputError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, sync=sync, crash=crash) as tmp:
            (tmp.write_text if isinstance(data, str) else tmp.write_bytes)(data)
    except OSError as exc:
        raise output_error(path, exc) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    _fsync(folder)


def sync_files(paths: Iterable[Path]) -> None:
    """Make written files durable (a checkpoint must not count a difspot a power cut could take back)."""
    folders = set()
    for path in paths:
        with suppress(FileNotFoundError):
            _fsync(path)
            folders.add(Path(path).parent)
    for folder in folders:
        fsync_dir(folder)


@contextmanager
def atomic_h5(path: Path, **file_kwargs) -> Iterator[h5py.File]:
    """Yield a new HDF5 file that appears at ``path`` only once complete.

    The file is written under a hidden temporary name in the same folder
    (``os.replace`` is atomic only within one filesystem) and renamed over
    ``path`` after it is closed, so a reader sees either the old file or the
    new one, never a partial one.  No fsync: the goal is consistency for
    concurrent readers, and a sync per difspot would be slow on network
    filesystems.
    """
    try:
        with replacing(path, crash="table" if path.name == "spots.h5" else "difspot") as tmp:  # tests: die there
            with h5py.File(tmp, "w", **file_kwargs) as f:
                yield f
    except OSError as exc:
        raise output_error(path, exc) from exc
    except RuntimeError as exc:  # h5py reports some failed writes (at close: flushing its metadata) this way
        if "errno = " not in str(exc):
            raise
        raise output_error(path, exc) from exc


# -- for tests: die at a chosen write -------------------------------------------------------------

_CRASH_ENV = "DCTSTREAM_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(kind: str) -> None:
    """SIGKILL this process at the N-th ``kind`` point when ``DCTSTREAM_CRASH_AT=kind:N`` (tests only)."""
    target = os.environ.get(_CRASH_ENV)
    if not target:
        return
    want, _, n = target.partition(":")
    if want != kind:
        return
    _crash_counts[kind] = _crash_counts.get(kind, 0) + 1
    if _crash_counts[kind] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
