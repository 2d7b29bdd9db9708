"""``dctstream watch ROOT``: process every scan that appears under an acquisition tree.

Every ``watch.poll_interval_s`` the daemon lists the files under ROOT that
match ``watch.glob`` and looks inside each new one for ``watch.dataset`` (a
``*`` in it matches any scan number).  A scan is a (file, dataset) pair; its
results go to ``output.dir/<folders of the file under ROOT>/<file stem>_<scan>``,
e.g. ``out/id11/s1/s1_0001/s1_0001_1.1`` for
``ROOT/id11/s1/s1_0001/s1_0001.h5::/1.1/measurement/marana``.

Each scan is processed by a ``dctstream run`` child process (at most
``watch.max_parallel`` at once), which follows the file while the acquisition
writes it and keeps ``OUT/status.json`` and ``OUT/run.json`` up to date; its
own log goes to ``OUT/run.log``.  The daemon shows the children's status
snapshots (live on a terminal, a log line every ``status.log_every_s``
otherwise) and logs to ``watch.log_file``, rotated.

What happens to a scan is decided by `plan` from its run record: a finished
scan is skipped; a scan that failed is skipped (remove its ``run.json`` to try
again); a scan left unfinished (the daemon or the machine stopped) is done
again; an incomplete one (its file went quiet, vanished or was replaced before
the scan ended) is tried again, resuming, whenever its file changes and at the
daemon's next start; one whose file was written anew (``replaced``) at once: the
same scan resumes, a new acquisition there has the earlier results moved to the
first free ``OUT.N`` and is processed into ``OUT``.  SIGTERM or SIGINT stop the daemon cleanly: the
children get SIGTERM, close their files and record ``stopped``.  If the daemon is killed, its
children die with it (Linux: the parent-death signal), so a restarted daemon
never races an orphan for the same folder.
"""

from __future__ import annotations

import fnmatch
import logging
import logging.handlers
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import h5py

from . import outdir
from .config import Config
from .errors import OutputError
from .record import read_record, write_record
from .runner import PARENT_ENV
from .status import open_display, read_status, utc_now

log = logging.getLogger(__name__)

# Seconds a child gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
# How often the main loop looks at its children, seconds.
TICK_S = 0.2


@dataclass(frozen=True)
class Scan:
    """One scan: a dataset of frames in a file, and the folder its results go to."""

    path: Path
    dataset: str
    out_dir: Path
    angles: str | None = None  # dataset path in the same file
    dark: str | None = None

    @property
    def url(self) -> str:
        return f"{self.path}::{self.dataset}"

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.path), self.dataset)

    @property
    def label(self) -> str:
        return self.url

    def run_args(self) -> list[str]:
        """What ``dctstream run`` is given for this scan, after the daemon's config and overrides."""
        args = ["--source", self.url, "--out", str(self.out_dir)]
        if self.angles:
            args += ["--set", f"source.angles={self.path}::{self.angles}"]
        if self.dark:
            args += ["--dark", f"{self.path}::{self.dark}"]
        return args

    def stamp(self) -> tuple | None:
        """Its file's identity and size: an incomplete scan is tried again once this changes."""
        return _file_stat(self.path)

    retry_on_change: ClassVar[bool] = True  # an incomplete scan may grow: tried again when its stamp changes


def plan(out_dir: Path) -> str:
    """What to do with a scan whose results go to ``out_dir``.

    ``"skip"``: finished (or failed: remove its run.json to try again);
    ``"start"``: nothing there yet; ``"redo"``: left unfinished by a run that
    was stopped or killed.  A redo runs the same command again, which
    resumes from the run's last checkpoint (the outputs end up those of an
    uninterrupted run); a scan whose configuration changed since is refused
    by the run and recorded as failed.
    """
    record = read_record(out_dir)
    if record is not None and record.get("state") in ("finished", "failed"):
        return "skip"
    if not out_dir.exists() or not any(p.name not in ("run.log",) for p in out_dir.iterdir()):
        return "start"
    return "redo"


def _open(path: Path) -> h5py.File | None:
    """The file opened for reading without disturbing a writer (plain, then SWMR), or None."""
    for kwargs in ({}, {"swmr": True}):
        try:
            return h5py.File(path, "r", locking=False, **kwargs)
        except OSError:
            continue
    return None


def _matching(h5: h5py.File, pattern: str) -> list[str]:
    """Paths of the datasets in ``h5`` that match ``pattern`` (``*`` within one path component)."""
    parts = [p for p in pattern.split("/") if p]
    found = [""]
    for part in parts:
        nxt = []
        for prefix in found:
            group = h5[prefix or "/"]
            if not isinstance(group, h5py.Group):
                continue
            if any(c in part for c in "*?["):
                names = sorted(n for n in group.keys() if fnmatch.fnmatchcase(n, part))
            else:
                names = [part] if part in group else []
            nxt += [f"{prefix}/{n}" for n in names]
        found = nxt
    return [p for p in found if isinstance(h5.get(p), h5py.Dataset)]


def _scan_name(dataset: str) -> str:
    return next(p for p in dataset.split("/") if p)


# A file matching watch.glob unchanged this long without a scan in it is said (once): not HDF5, or its frames
# not where watch.dataset says (a typo, another camera).
EMPTY_FILE_S = 10.0


class ScanFinder:
    """Lists the scans under ``root``; a file is looked into until its datasets appear."""

    def __init__(self, root: Path, cfg: Config):
        self.root = root
        self.watch = cfg.watch
        self.out_root = Path(cfg.output.dir).resolve()

    def files(self) -> list[Path]:
        out = []
        for path in sorted(self.root.glob(self.watch.glob)):
            if path.name.startswith(".") or not path.is_file():
                continue
            resolved = path.resolve()
            if resolved == self.out_root or self.out_root in resolved.parents:
                continue  # our own results (spots.h5 matches *.h5 too)
            out.append(path)
        return out

    def scans_in(self, path: Path) -> list[Scan]:
        h5 = _open(path)
        if h5 is None:
            return []
        try:
            scans = []
            for dataset in _matching(h5, self.watch.dataset):
                if h5[dataset].ndim != 3:
                    continue
                angles = self._angles(h5, dataset)
                dark = self.watch.dark if self.watch.dark and self.watch.dark in h5 else None
                if self.watch.dark and dark is None:
                    log.warning("%s: no dark %s in the file, using the dark section of the config",
                                path, self.watch.dark)
                rel = path.relative_to(self.root)
                out_dir = self.out_root / rel.parent / f"{rel.stem}_{_scan_name(dataset)}"
                scans.append(Scan(path, dataset, out_dir, angles, dark))
            return scans
        except (OSError, KeyError, RuntimeError, ValueError):  # changing under us: look again later
            return []
        finally:
            h5.close()

    def why_none(self, path: Path) -> str:
        """Why ``path`` holds no scan to run, for the log."""
        h5 = _open(path)
        if h5 is None:
            return "not an HDF5 file that can be read"
        try:
            found = [d for d in _matching(h5, self.watch.dataset) if isinstance(h5.get(d), h5py.Dataset)]
            if found:
                return f"{found[0]} is not a stack of frames (frames, y, x): shape {h5[found[0]].shape}"
            names: list[str] = []
            h5.visititems(lambda name, item: names.append("/" + name)
                          if isinstance(item, h5py.Dataset) and item.ndim == 3 else None)
            return (f"no dataset matches watch.dataset {self.watch.dataset} (stacks of frames in it: "
                    f"{', '.join(names[:4]) or 'none'}{', ...' if len(names) > 4 else ''})")
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            return f"cannot be read ({exc})"
        finally:
            h5.close()

    def _angles(self, h5: h5py.File, dataset: str) -> str | None:
        name = self.watch.angles
        if not name:
            return None
        path = name if name.startswith("/") else posixpath.join(posixpath.dirname(dataset), name)
        return path if path in h5 else None


class Daemon:
    """Watches ``root`` and runs one ``dctstream run`` child per new scan."""

    def __init__(self, root: str | os.PathLike, cfg: Config, *, config_path: str | None = None,
                 overrides: list[str] | None = None, console=None):
        from .errors import InputError
        from .sources import is_bliss_url

        self.cfg = cfg
        self.config_path = config_path
        self.overrides = list(overrides or [])
        self.console = console
        if is_bliss_url(str(root)):  # the scans Bliss publishes, not files
            from .bliss_scans import BlissScanFinder

            self.root = str(root)
            self.finder = BlissScanFinder(self.root, cfg)
            self.watching = self.finder.describe()
        else:
            self.root = Path(root).resolve()
            if not self.root.is_dir():
                raise InputError(f"{root}: cannot watch it, expected a folder (the acquisition tree) "
                                 "or redis://host:port (a blissdata server)")
            self.finder = ScanFinder(self.root, cfg)
            self.watching = f"{self.root} for {cfg.watch.glob}::{cfg.watch.dataset}"
        self.out_root = self.finder.out_root
        self.known: set[tuple[str, str]] = set()  # scans queued, running or done
        self.files_done: set[str] = set()  # files whose scans are all known, with a fixed dataset
        self.said_empty: set[str] = set()  # files without a scan, said
        self.queue: deque[Scan] = deque()
        self.running: dict[tuple[str, str], tuple[Scan, subprocess.Popen]] = {}
        self.finished = 0
        self.failed = 0
        self.incomplete = 0
        self.retry: dict[tuple[str, str], tuple[Scan, tuple | None]] = {}  # incomplete scans: their file's stat
        self.held: dict[tuple[str, str], Scan] = {}  # scans another run was processing: taken up if it stops
        self.records: dict[tuple[str, str], dict | None] = {}  # each running scan's record as its child found it
        self.skipped = 0
        self._stop = threading.Event()
        self._signals: list[str] = []  # set by the signal handler, which must take no lock (an Event's would do)
        self._last_look = 0.0

    # -- the loop -------------------------------------------------------------------------
    def run(self, max_scans: int | None = None) -> int:
        self.out_root.mkdir(parents=True, exist_ok=True)
        handler = self._log_file()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("watching %s; results in %s; %d scan(s) at once", self.watching, self.out_root,
                 self.cfg.watch.max_parallel)
        if not isinstance(self.finder, ScanFinder):
            for scan in self.finder.left_unfinished():
                self.known.add(scan.key)
                log.info("%s: left unfinished by an earlier run: resuming it", scan.label)
                self.queue.append(scan)
        try:
            with open_display(self.snapshots, console=self.console, every_s=self.cfg.status.log_every_s,
                              header=self.header):
                while not self.stopping:
                    self._reap()
                    if (max_scans is not None and self.finished + self.failed + self.incomplete >= max_scans
                            and not self.running):
                        break
                    if time.monotonic() - self._last_look >= self.cfg.watch.poll_interval_s:
                        self._discover()
                        self._last_look = time.monotonic()
                    self._launch()
                    self._stop.wait(TICK_S)
                self._stop_children()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            log.info("stopped watching %s: %s", self.root, self._counts())
            logging.getLogger("dctstream").removeHandler(handler)
            logging.getLogger("dctstream").setLevel(self._log_level)
            handler.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or bool(self._signals)

    def _on_signal(self, signum, frame) -> None:
        if not self._signals:  # (logging's lock is reentrant)
            log.info("%s: stopping (the scans in progress are stopped and recorded as such)",
                     signal.Signals(signum).name)
        self._signals.append(signal.Signals(signum).name)

    def _log_file(self) -> logging.Handler:
        watch = self.cfg.watch
        path = Path(watch.log_file)
        if not path.is_absolute():
            path = self.out_root / path
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=int(watch.log_max_mb * 2**20),
                                                       backupCount=watch.log_backups)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logger = logging.getLogger("dctstream")
        logger.addHandler(handler)
        self._log_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        self.log_path = path
        return handler

    # -- finding scans ------------------------------------------------------------------------
    def _discover(self) -> None:
        for key, scan in list(self.held.items()):
            if outdir.held(scan.out_dir):
                continue
            del self.held[key]
            state = (read_record(scan.out_dir) or {}).get("state")
            if state != "finished":  # the other daemon stopped, or its run died: this scan is nobody's now
                self.skipped -= 1
                log.info("%s: the run that processed it into %s is gone (%s): taking it up", scan.label,
                         scan.out_dir, state or "no record")
                self.queue.append(scan)
        for key, (scan, seen) in list(self.retry.items()):
            if scan.stamp() not in (seen, None):
                del self.retry[key]
                self.incomplete -= 1  # counted again by how this try ends
                log.info("%s: the file of this incomplete scan changed: resuming it", scan.url)
                self.queue.append(scan)
        if not isinstance(self.finder, ScanFinder):
            for scan in self.finder.new_scans():
                if scan.key not in self.known:
                    self.known.add(scan.key)
                    log.info("%s: new scan", scan.label)
                    self.queue.append(scan)
            return
        fixed = not any(c in self.cfg.watch.dataset for c in "*?[")
        for path in self.finder.files():
            if str(path) in self.files_done:
                continue
            scans = self.finder.scans_in(path)
            if not scans and str(path) not in self.said_empty:
                try:
                    still_s = time.time() - path.stat().st_mtime
                except OSError:
                    still_s = 0.0
                if still_s > EMPTY_FILE_S:  # not one being written: said once, looked at again all the same
                    self.said_empty.add(str(path))
                    log.warning("%s: no scan to process: %s", path, self.finder.why_none(path))
            for scan in scans:
                if scan.key in self.known:
                    continue
                self.known.add(scan.key)
                what = plan(scan.out_dir)
                record = read_record(scan.out_dir) or {}
                if refused_as_another(record) and not outdir.held(scan.out_dir):  # a run by hand, or before a stop
                    if self._supersede(scan, record, queue=False):
                        what = "start"
                if what == "skip":
                    self.skipped += 1
                    log.info("%s: already processed (%s), skipped", scan.url, record.get("state"))
                    continue
                if what == "redo":
                    log.info("%s: left unfinished by an earlier run: resuming it", scan.url)
                else:
                    log.info("%s: new scan", scan.url)
                self.queue.append(scan)
            if scans and fixed:
                self.files_done.add(str(path))

    def _supersede(self, scan: Scan, earlier: dict, queue: bool = True) -> bool:
        """A run refused the scan as another than the one whose results are in its folder (a new acquisition under
        the same name): set those results aside (`_set_aside`) and queue the scan to be processed anew."""
        try:
            aside = _set_aside(scan.out_dir, earlier)
        except (OSError, OutputError) as exc:
            self.failed += 1
            log.error("%s: a new acquisition under the same name, but the earlier results in %s cannot be set "
                      "aside (%s): not processed", scan.label, scan.out_dir, exc)
            return False
        log.warning("%s: a new acquisition under the same name: the results of the earlier one (%s) moved to %s, "
                    "the new one processed into %s", scan.label, earlier.get("state"), aside, scan.out_dir)
        if queue:
            self.queue.append(scan)
        return True

    # -- children -------------------------------------------------------------------------------
    def _command(self, scan: Scan) -> list[str]:
        cmd = [sys.executable, "-m", "dctstream", "run"]
        if self.config_path:
            cmd.append(str(self.config_path))
        for override in self.overrides:
            cmd += ["--set", override]
        return cmd + scan.run_args()

    def _launch(self) -> None:
        while self.queue and len(self.running) < self.cfg.watch.max_parallel and not self.stopping:
            scan = self.queue.popleft()
            if outdir.held(scan.out_dir):  # another daemon (or a run by hand) is processing it: left to it
                self.skipped += 1
                self.held[scan.key] = scan
                log.info("%s: being processed by another run into %s, left to it (taken up if that run stops "
                         "unfinished)", scan.label, scan.out_dir)
                continue
            self.records[scan.key] = read_record(scan.out_dir)
            scan.out_dir.mkdir(parents=True, exist_ok=True)
            with open(scan.out_dir / "run.log", "ab") as out:
                out.write(f"\n--- {utc_now()} dctstream watch starts this scan\n".encode())
                out.flush()
                # the child dies with the daemon (runner.die_with_parent), and Ctrl-C reaches only the daemon
                proc = subprocess.Popen(self._command(scan), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, PARENT_ENV: str(os.getpid())})
            self.running[scan.key] = (scan, proc)
            log.info("%s: processing into %s (pid %d)", scan.label, scan.out_dir, proc.pid)

    def _reap(self) -> None:
        for key, (scan, proc) in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[key]
            before = self.records.pop(key, None)
            record = read_record(scan.out_dir) or {}
            state = record.get("state")
            if code != 0 and refused_as_another(record) and not outdir.held(scan.out_dir):
                self._supersede(scan, before if before is not None else record)
                continue
            # refused: the folder another run is writing (this one is gone: a live lock is another's), or has
            # written since this scan was queued
            held = code != 0 and outdir.held(scan.out_dir)
            if code != 0 and (held or (record.get("pid") not in (None, proc.pid)
                                       and state in ("finished", "incomplete"))):
                self.skipped += 1
                if held:
                    self.held[key] = scan
                log.info("%s: processed by another run (pid %s, %s) into %s, left to it", scan.label,
                         record.get("pid"), state, scan.out_dir)
                continue
            if state == "finished":  # (a SIGTERM just after it finished may have changed its exit code)
                self.finished += 1
                log.info("%s: finished, %s difspots from %s frames (scan ended: %s)", scan.label,
                         record.get("spots"), record.get("frames_processed"), record.get("end_reason"))
                continue
            if state == "incomplete" and record.get("end_reason") == "replaced" and scan.retry_on_change:
                log.warning("%s: its file was written anew after %s frames (a new acquisition under the same "
                            "name?): looking at the new file now", scan.label, record.get("frames_read"))
                self.queue.append(scan)  # the same scan resumes; another is processed anew (below)
                continue
            if state == "incomplete":
                self.incomplete += 1
                if scan.retry_on_change:
                    self.retry[key] = (scan, scan.stamp())
                log.warning("%s: incomplete (%s): %s", scan.label, record.get("incomplete") or record.get("end_reason"),
                            "tried again when the file changes" if scan.retry_on_change else "the scan is over")
                continue
            if self.stopping:
                log.info("%s: stopped (exit code %s); processed again at the next start", scan.label, code)
                if state in (None, "running"):  # killed before it could say so: the record must not say running
                    write_record(scan.out_dir, {**record, "state": "stopped", "source": scan.label,
                                                "error": f"stopped by the daemon (exit code {code})",
                                                "ended_utc": utc_now(), "exit_code": code})
                continue
            self.failed += 1
            why = record.get("error") or _last_line(scan.out_dir / "run.log") or f"exit code {code}"
            log.error("%s: failed: %s (see %s)", scan.label, why, scan.out_dir / "run.log")
            if state != "failed":  # died before it could say so: record it, so that it is not retried forever
                write_record(scan.out_dir, {**record, "state": "failed", "error": why, "source": scan.label,
                                            "ended_utc": utc_now(), "exit_code": code})

    def _stop_children(self) -> None:
        for scan, proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for scan, proc in self.running.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s: did not stop within %.0f s, killed", scan.label, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        self._reap()

    # -- display ------------------------------------------------------------------------------------
    def header(self) -> str:
        return (f"dctstream watch {self.watching}: {len(self.running)} running, {len(self.queue)} queued, "
                f"{self._counts()}; log {getattr(self, 'log_path', '-')}")

    def _counts(self) -> str:
        """The scans done so far, and the files said to hold none (they are no skipped scan)."""
        without = len(self.said_empty)
        return (f"{self.finished} finished, {self.incomplete} incomplete, {self.failed} failed, {self.skipped} skipped"
                + (f", {without} file{'s' if without > 1 else ''} without a scan to process" if without else ""))

    def snapshots(self) -> list[dict]:
        out = []
        for scan, proc in list(self.running.values()):
            try:
                snap = read_status(scan.out_dir)
                if not isinstance(scan, Scan):  # a Bliss scan: its run's source is only the server
                    snap = {**snap, "source": scan.label}
                out.append(snap)
            except Exception:  # not written yet (the child is starting) or being replaced
                out.append({"source": scan.label, "out_dir": str(scan.out_dir), "state": "starting"})
        return out


def refused_as_another(record: dict) -> bool:
    """Whether the record says a run was refused its folder as another scan than the one whose results it holds: a
    run that failed so at its first frame, or one refused before it began (the earlier run's record kept)."""
    return "AnotherScanError" in (record.get("error_type"), record.get("refused_type"))


def _set_aside(out_dir: Path, record: dict) -> Path:
    """Move the results of an earlier acquisition out of ``out_dir``, to the first free ``out_dir.N``, their
    own record (``record``) put back and the run that found the new acquisition's log kept with them."""
    earlier = {key: value for key, value in record.items() if not key.startswith("refused")}
    write_record(out_dir, {**earlier, "superseded_utc": utc_now(),
                           "superseded": "its scan file was written anew by another acquisition"})
    n = 1
    while (aside := out_dir.with_name(f"{out_dir.name}.{n}")).exists():
        n += 1
    os.rename(out_dir, aside)
    return aside


def _file_stat(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _last_line(path: Path) -> str | None:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1].strip() if lines else None
