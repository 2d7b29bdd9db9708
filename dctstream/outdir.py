"""The output folder belongs to one run at a time, and ``--overwrite`` loses nothing before it has a replacement.

* **Ownership**: a run holds an exclusive ``flock`` on ``OUT/.dctstream/lock``
  for its life (the kernel drops it when the process dies, however it dies);
  the file holds the holder's pid and host, for the message that refuses a
  second run.  The lock is taken only when the run's output appears (after its
  input was checked), so a run that fails on its input leaves the folder as it
  was; before that, a run only tests an existing lock, creating nothing.
* **Overwrite**: the earlier run's results are moved aside into
  ``OUT/.dctstream/previous/`` (renames, same file system), not deleted.  They
  are deleted once the new run finished, and moved back if it fails; a run
  killed half-way leaves them there, and the next ``--overwrite`` run keeps
  that copy (the results of the killed run are what it deletes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from contextlib import suppress
from pathlib import Path

from .atomic import output_error
from .errors import OutputError

log = logging.getLogger(__name__)

RUN_DIR = ".dctstream"
LOCK = "lock"
PREVIOUS = "previous"
# What a run writes at the top of its folder: what --overwrite moves aside.  Anything else (a user's notes,
# the daemon's run.log) is left where it is.
OUTPUTS = ("spots.h5", "difspots", "mask.h5", "corrected.h5", "config.yml", "run.json", "status.json",
           "quicklook", "spots.flt", "difspot.h5", "difspot.csv", "resegmented", "tune.png")
# Of those, what makes a folder "hold results" that a new run must not mix with.
RESULTS = ("spots.h5", "difspots", "mask.h5", "corrected.h5", "difspot.h5", "difspot.csv")
# Of those, what other commands make from a run's results (export, resegment, tune): made from a stopped run's,
# they no longer hold once it is resumed.
DERIVED = ("spots.flt", "difspot.h5", "difspot.csv", "resegmented", "tune.png")


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        text = []
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else "another process"


def _busy(out_dir: Path, path: Path) -> OutputError:
    return OutputError(f"{out_dir}: in use by another dctstream run ({_holder(path)}), expected a folder no run "
                       "is writing to; wait for it to end, stop it, or choose another output.dir")


def check_free(out_dir: str | os.PathLike) -> None:
    """Refuse now if a live run holds ``out_dir``; creates nothing (without a lock file, or one that cannot be
    read, nobody is asked: the lock itself decides later)."""
    if held(out_dir):
        raise _busy(Path(out_dir), Path(out_dir) / RUN_DIR / LOCK)


def held(out_dir: str | os.PathLike) -> bool | None:
    """Whether a live run holds ``out_dir`` (this machine's view of its lock); None without a lock file, or
    one that cannot be asked."""
    path = Path(out_dir) / RUN_DIR / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or None
    finally:
        os.close(fd)
    return False


class OutputLock:
    """The exclusive hold of one run on its output folder; ``release()`` (or the process's death) ends it."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RUN_DIR / LOCK
        self._fd: int | None = None
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the output folder's lock "
                                  f"({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _busy(self.out_dir, self.path) from None
                raise OutputError(f"{self.path}: cannot lock ({exc.strerror or exc})") from None
            # the previous holder may have removed the file between our open and our lock: then lock the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:  # who holds it, for the refusal of a second run
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as exc:  # a full disk: said naming the file, as every other write of the run
            self.release()
            raise output_error(self.path, exc) from None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove`` also deletes the lock file and ``OUT/.dctstream`` if nothing else is left in it."""
        if self._fd is None:
            return
        if remove:
            with suppress(OSError):
                self.path.unlink()
            with suppress(OSError):
                self.path.parent.rmdir()
        os.close(self._fd)
        self._fd = None

    def __del__(self):
        with suppress(Exception):
            self.release()


# -- --overwrite without losing anything ----------------------------------------------------------


def previous_dir(out_dir: Path) -> Path:
    return Path(out_dir) / RUN_DIR / PREVIOUS


def move_aside(out_dir: Path) -> list[str]:
    """Move the earlier run's outputs into ``OUT/.dctstream/previous``; returns their names.

    If a copy is already there (an ``--overwrite`` run was killed), it is the last good one: it stays, and the
    killed run's outputs are deleted instead.
    """
    keep = previous_dir(out_dir)
    names = [name for name in OUTPUTS if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if keep.exists():
        log.info("%s: keeping the results set aside by an earlier --overwrite run that did not finish", keep)
        for name in names:
            _remove(out_dir / name)
        return sorted(p.name for p in keep.iterdir())
    if not names:
        return []
    tmp = keep.with_name(f".{PREVIOUS}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in names:
            os.replace(out_dir / name, tmp / name)
        os.replace(tmp, keep)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot set the earlier results aside in {keep} "
                          f"({exc.strerror or exc}), expected a writable folder") from None
    log.info("%s: the earlier results (%s) are kept in %s until this run finishes", out_dir, ", ".join(names), keep)
    return names


def restore_previous(out_dir: Path) -> bool:
    """Put the results set aside back in place of a failed run's; True if there were any."""
    keep = previous_dir(out_dir)
    if not keep.is_dir():
        return False
    for name in OUTPUTS:
        if (out_dir / name).exists():
            _remove(out_dir / name)
    for item in keep.iterdir():
        os.replace(item, out_dir / item.name)
    keep.rmdir()
    return True


def drop_derived(out_dir: Path) -> list[str]:
    """Remove what was made from the results of a stopped run that is resumed now (`DERIVED`); their names."""
    names = [name for name in DERIVED if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    for name in names:
        try:
            _remove(out_dir / name)
        except OSError as exc:
            raise output_error(out_dir / name, exc) from exc
    return names


def drop_previous(out_dir: Path) -> None:
    shutil.rmtree(previous_dir(out_dir), ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
