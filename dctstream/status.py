"""What a scan in progress is doing: a snapshot of its counters, shown live, logged, or saved for others.

The pipeline never calls the display.  `ScanMonitor` is the pipeline's
``progress(stats)`` callback: it only keeps a reference to the `Stats` and
appends ``(time, frames read, frames segmented)`` to a bounded deque, a few
hundred nanoseconds a frame.  Everything else happens on other threads, from
a **snapshot** (a plain JSON-able dict built by `ScanMonitor.snapshot`):

* ``OUT/status.json``, rewritten atomically every ``status.interval_s`` by the
  monitor's own thread, so that ``dctstream status OUT`` and ``dctstream watch``
  (other processes) show the same;
* `LiveStatus`: a rich ``Live`` that pulls the snapshots on its own refresh
  thread, a few times a second;
* `LogStatus`: without a terminal (a service, a pipe), one log line per scan
  every ``status.log_every_s``.

`render` turns snapshots into rich renderables; `status_line` into one line.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import outdir
from ._version import __version__
from .atomic import replacing
from .config import Config
from .errors import DctStreamError, InputError
from .sources.base import FINAL_ENDS
from .sources.hdf5 import Hdf5FileSource

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# Rates are measured over the last this many seconds.
RATE_WINDOW_S = 5.0
# The acquisition rate of a live file is measured over the last this many seconds.
LISTED_WINDOW_S = 10.0
# Bins of the spots-per-psi sparkline.
SPARK_BINS = 40
# Marks kept for rates and latency: (time, frames read, frames segmented), one per frame read; enough
# for a latency of several background windows, few enough for a snapshot under a millisecond.
MAX_MARKS = 4096
# Warnings that the log handler keeps per scan (the newest).
MAX_WARNINGS = 20
# Writing difspots is "slow disk" when it waits more than this share of the elapsed time: its seconds less the
# writing thread's CPU in them. Files made fast enough but many (thousands of spots) take CPU, not the disk:
# a 512 x 512 scan of 3,161 difspots, 360 frames, wrote for 43 % of its time, 24 % of it CPU.
SLOW_WRITE_SHARE = 0.3
SPARK_CHARS = "▁▂▃▄▅▆▇█"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _plain(value):
    """``value`` as JSON types: mappings with string keys, lists, numbers, strings, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array of shape {list(value.shape)}"
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return stats_dict(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def stats_dict(stats) -> dict:
    """Every field of a `Stats` (whatever fields it has), plus ``elapsed_s``, as JSON types.

    Safe while the pipeline updates ``stats`` from other threads: it is read through its snapshot.
    """
    values = (stats.snapshot() if hasattr(stats, "snapshot")
              else {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)})
    out = {name: _plain(value) for name, value in values.items()}
    if hasattr(stats, "elapsed_s"):
        out["elapsed_s"] = float(stats.elapsed_s)
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """``path`` holds the old or the new JSON, never a part of it."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")


def memory_mb() -> float:
    """Resident memory of this process, MB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _WarningLog(logging.Handler):
    """Keeps the newest WARNING-or-worse messages of the dctstream loggers."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: collections.deque[str] = collections.deque(maxlen=MAX_WARNINGS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(" ".join(record.getMessage().split()))
        except Exception:  # a bad log call must not stop the scan, nor go unsaid: logging reports it on stderr
            self.handleError(record)


class ScanMonitor:
    """The pipeline's ``progress`` callback; builds snapshots and keeps ``OUT/status.json`` fresh.

    ``attach(pipeline)`` lets the snapshot look at the ring, the segmenter and
    the spot table (read-only, from another thread).  ``start()`` starts the
    thread that rewrites ``status.json`` every ``cfg.status.interval_s``, once
    the pipeline has prepared its output folder (a run that fails before
    leaves the folder untouched); ``close(state)`` writes the last one.
    ``on_write(snapshot)``, if given, is called by that thread after each
    write (the run record uses it).
    """

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.monotonic,
                 on_write: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.out_dir = Path(cfg.output.dir)
        self.state = "starting"
        self.error: str | None = None
        self.started_utc = utc_now()
        self.ended_utc: str | None = None
        self._clock = clock
        self._on_write = on_write
        self._stats = None
        self._pipeline = None
        self._marks: collections.deque = collections.deque(maxlen=MAX_MARKS)
        self._listed: collections.deque = collections.deque()  # (time, frames listed by the source)
        self._listed_lock = threading.Lock()
        self._warnings = _WarningLog()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # -- the pipeline side: cheap ---------------------------------------------------------
    def __call__(self, stats) -> None:
        self._stats = stats
        if self.state == "starting":
            self.state = "running"
        if not self._marks or self._marks[-1][1] != stats.frames_read:
            self._marks.append((self._clock(), stats.frames_read, stats.frames_segmented))

    def attach(self, pipeline) -> None:
        self._pipeline = pipeline
        self._stats = pipeline.stats

    # -- the snapshot --------------------------------------------------------------------
    @property
    def output_ready(self) -> bool:
        """Whether the pipeline has prepared its output folder (only then may files appear in it)."""
        return self._pipeline is not None and getattr(self._pipeline, "table", None) is not None

    def snapshot(self) -> dict:
        """Everything the displays show, as JSON types; may be called from any thread."""
        cfg, stats, now = self.cfg, self._stats, self._clock()
        snap = {
            "source": cfg.source.url,
            "out_dir": str(self.out_dir),
            "state": self.state,
            "error": self.error,
            "version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_utc": self.started_utc,
            "updated_utc": utc_now(),
            "ended_utc": self.ended_utc,
            "background": {"mode": cfg.background.mode, "window": cfg.background.window,
                           "normalise": cfg.background.normalise, "batch_frames": cfg.background.batch_frames},
            "memory_mb": round(memory_mb(), 1),
        }
        if stats is None:
            snap["stats"] = {}
            snap["warnings"] = list(self._warnings.messages)
            return snap
        s = snap["stats"] = stats_dict(stats)
        marks = list(self._marks)
        snap["rates"] = _rates(marks, now)
        snap["latency"] = _latency(marks, s.get("frames_read", 0), s.get("frames_segmented", 0), now)
        snap["backlog_frames"] = self._backlog(s)
        listed = self._listed_rate(now)
        if listed is not None:  # the source says how fast frames arrive: the acquisition, even when we lag
            snap["rates"]["acquisition_fps"] = listed
        snap.update(self._pipeline_state())
        source = getattr(self._pipeline, "source", None)
        # a recorded file is read as fast as it is processed: its "acquisition" rate is a reading rate
        snap["live"] = not isinstance(getattr(source, "source", source), Hdf5FileSource)  # also read in psi order
        waiting = getattr(source, "waiting_for", None)
        if waiting and not s.get("frames_read"):
            snap["waiting_for"] = waiting
        # what the source met on the way (frames dropped, reopens, waits, ...); one C-level copy beside its thread
        snap["source_counters"] = dict(getattr(source, "counters", None) or {})
        snap["spots_per_psi"] = self._sparkline(s)
        snap["warnings"] = self._warning_list(s, snap["rates"])
        return snap

    def _listed_rate(self, now: float) -> float | None:
        """Frames/s the acquisition writes, from the frames the source has listed.

        A source behind the acquisition looks at the file only when it needs a
        frame, so the count it lists jumps now and then: the rate is taken
        between the snapshots that saw it change, over the last LISTED_WINDOW_S.
        """
        source = getattr(self._pipeline, "source", None)
        listed = getattr(source, "frames_listed", None)
        if listed is None:
            return None
        with self._listed_lock:
            if self._listed and listed < self._listed[-1][1]:  # the file shrank (a new acquisition in its place)
                self._listed.clear()  # its rate from its own frames (a rate of -8 frames/s was said)
            if not self._listed or self._listed[-1][1] != listed:
                self._listed.append((now, int(listed)))
            while len(self._listed) > 2 and self._listed[1][0] < now - LISTED_WINDOW_S:
                self._listed.popleft()
            (t0, n0), (t1, n1) = self._listed[0], self._listed[-1]
        read = getattr(getattr(self._pipeline, "stats", None), "frames_read", 0)
        if now - t1 > 2.0 and listed - read <= 1:
            return 0.0  # caught up and nothing new for a while: the acquisition has paused or ended
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= 0.5 else None

    def _backlog(self, s: dict) -> int | None:
        """Frames the acquisition has written that the pipeline has not read yet, when the source says."""
        listed = getattr(getattr(self._pipeline, "source", None), "frames_listed", None)
        if listed is None:
            return None
        return max(int(listed) - s.get("frames_read", 0), 0)

    def _pipeline_state(self) -> dict:
        out = {"ring": None, "blobs_open": None, "blobs_pending": None}
        p = self._pipeline
        background = getattr(p, "background", None)
        if background is not None:
            ring = background.ring
            out["ring"] = {"frames": int(min(ring.count, ring.capacity)), "capacity": int(ring.capacity)}
        segmenter = getattr(p, "segmenter", None)
        if segmenter is not None:
            out["blobs_open"] = int(segmenter.open_regions)
            out["blobs_pending"] = int(segmenter.pending_regions)
        return out

    def _sparkline(self, s: dict) -> dict | None:
        table = getattr(self._pipeline, "table", None)
        if table is None:
            return None
        frames = table.column("centroid_frame")
        total = s.get("frames_total") or max(s.get("frames_segmented", 0), 1)
        counts, _ = np.histogram(frames, bins=SPARK_BINS, range=(0, max(total, 1)))
        psi = table.column("centroid_psi_deg")
        psi_range = None
        if psi.size >= 2 and frames.size == psi.size and np.ptp(frames) > 0:
            # psi at frame 0 and at the last frame, from the straight line through the spots
            slope, offset = np.polyfit(frames, psi, 1)
            psi_range = [float(offset), float(offset + slope * total)]
        return {"counts": counts.tolist(), "frames": int(total), "psi_deg": psi_range}

    def _warning_list(self, s: dict, rates: dict) -> list[str]:
        out = []
        if s.get("incomplete"):
            final = s.get("source_end") in FINAL_ENDS
            out.append(f"scan incomplete: {s['incomplete']} "
                       f"({'no more of its frames can come' if final else 'the same command resumes it if the source grows'})")
        if s.get("frames_missing"):
            out.append(f"{s['frames_missing']} frames lost in transit (dropped frames)")
        unusable = (s.get("normalise") or {}).get("unusable") or []
        if unusable:
            runs = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in unusable[:5])
            runs += ", ..." if len(unusable) > 5 else ""
            out.append(f"{s['normalise']['unusable_frames']} frames unusable (beam off, or pixels stuck at 0 or the "
                       f"top value), read as 0: {runs}")
        elapsed = s.get("elapsed_s") or 0.0
        write_s = (s.get("stage_s") or {}).get("write", 0.0)
        waiting_s = write_s - (s.get("write_cpu_s") or 0.0)
        if elapsed > 10 and waiting_s > SLOW_WRITE_SHARE * elapsed:
            out.append(f"slow disk: writing difspots takes {100 * write_s / elapsed:.0f}% of the time, "
                       f"{100 * waiting_s / elapsed:.0f}% waiting")
        backlog = self._backlog(s)
        if backlog and rates.get("processing_fps") is not None and backlog > 2 * max(rates["processing_fps"], 1):
            out.append(f"falling behind the acquisition: {backlog} frames not read yet")
        return out + list(self._warnings.messages)

    # -- status.json -------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("dctstream").addHandler(self._warnings)
        self._thread = threading.Thread(target=self._loop, name="dctstream-status", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.status.interval_s):
            try:
                self.write()
            except Exception as exc:  # a full disk must not stop the scan; the record says it at the end
                log.debug("status.json not written: %s", exc)

    def write(self) -> dict | None:
        """Rewrite ``status.json`` now (once the output folder exists); returns the snapshot written."""
        if not self.output_ready:
            return None
        with self._write_lock:
            snap = self.snapshot()
            write_json_atomic(self.out_dir / STATUS_FILE, snap)
            if self._on_write is not None:
                self._on_write(snap)
        return snap

    def close(self, state: str, error: str | None = None) -> dict | None:
        """Stop the thread and write the last snapshot with ``state`` (finished, stopped, failed)."""
        self.state, self.error, self.ended_utc = state, error, utc_now()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        logging.getLogger("dctstream").removeHandler(self._warnings)
        try:
            return self.write()
        except OSError as exc:
            log.warning("%s: status not written (%s)", self.out_dir / STATUS_FILE, exc.strerror or exc)
            return None


def _rates(marks: list, now: float) -> dict:
    """frames/s read (the acquisition, for a live source) and segmented over the last RATE_WINDOW_S."""
    if len(marks) < 2:
        return {"acquisition_fps": None, "processing_fps": None}
    times = [m[0] for m in marks]
    first = max(bisect.bisect_left(times, now - RATE_WINDOW_S), 0)
    first = min(first, len(marks) - 2)
    t0, r0, s0 = marks[first]
    t1, r1, s1 = marks[-1]
    # between the marks while frames keep coming; up to now once they stop (the rate then falls)
    span = max(t1 - t0 if now - t1 < 1.0 else now - t0, 1e-9)
    return {"acquisition_fps": (r1 - r0) / span, "processing_fps": (s1 - s0) / span}


def _latency(marks: list, read: int, segmented: int, now: float) -> dict:
    """From a frame read to the same frame segmented: in frames, and the age of the last frame segmented."""
    seconds = None
    if segmented < read and marks:
        reads = [m[1] for m in marks]
        i = bisect.bisect_left(reads, segmented)
        if i < len(marks):
            seconds = max(now - marks[i][0], 0.0)
    return {"frames": max(read - segmented, 0), "seconds": seconds}


# -- reading a snapshot from another process ---------------------------------------------


def read_status(out_dir: str | os.PathLike) -> dict:
    """The snapshot in ``OUT/status.json``, or the run record ``OUT/run.json`` if there is no snapshot; one that
    says running whose process is gone (killed: it wrote nothing more) says ``stopped``, and why."""
    out = Path(out_dir)
    for name in (STATUS_FILE, "run.json"):
        path = out / name
        if path.is_file():
            try:
                snap = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot read the scan status, expected JSON ({exc})") from None
            return stopped_if_gone(out, snap) or snap
    from .checkpoint import marker_path

    if marker_path(out).is_file():  # a run began here (a --split run writes no status before its merge)
        holder = outdir.held(out)
        raise InputError(f"{out}: no {STATUS_FILE} or run.json yet, " + (
            "a run is writing to it (its first status to come; a --split run writes none before its merge)"
            if holder else "a run began here and ended before writing one (killed?): the same command resumes "
            "it") + ", expected a status to read")
    raise InputError(f"{out}: no {STATUS_FILE} or run.json, expected the output folder of a dctstream run")


def stopped_if_gone(out: Path, snap: dict) -> dict | None:
    """``snap`` as stopped when it says running but its process, on this machine, is gone or holds no lock on
    ``out`` (another machine's process cannot be told: None)."""
    if snap.get("state") not in ("starting", "running") or snap.get("host") != socket.gethostname():
        return None
    pid = snap.get("pid")
    try:
        os.kill(int(pid), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except (PermissionError, TypeError, ValueError):  # another user's process, or no pid to ask: the lock tells
        alive = True
    if alive and outdir.held(out) is not False:
        return None
    why = (f"its process (pid {pid}) is gone without finishing (killed, or its machine restarted): the same "
           "command resumes the scan")
    return {**snap, "state": "stopped", "error": why, "warnings": [why, *(snap.get("warnings") or [])]}


def read_statuses(folder: str | os.PathLike) -> list[dict]:
    """The snapshot of the scan in ``folder``, or those of every scan below it (``dctstream watch``'s output)."""
    try:
        return [read_status(folder)]
    except InputError:
        found = sorted(Path(folder).glob(f"**/{STATUS_FILE}"))
        if not found:
            raise
        return [read_status(path.parent) for path in found]


# -- showing snapshots ----------------------------------------------------------------------


def _fmt_rate(value) -> str:
    return "–" if value is None else f"{value:.1f}/s"


def _fmt_mb(value) -> str:
    return "–" if value is None else f"{value:.0f} MB"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def sparkline(counts: Sequence[int]) -> str:
    """``counts`` as block characters, the highest bin a full block, empty bins a space."""
    top = max(counts, default=0)
    if top <= 0:
        return " " * len(counts)
    return "".join(" " if c == 0 else SPARK_CHARS[min(int(c * len(SPARK_CHARS) / top - 1e-9), 7)] for c in counts)


def _eta_s(snap: dict) -> float | None:
    s, rate = snap.get("stats", {}), (snap.get("rates") or {}).get("acquisition_fps")
    total = s.get("frames_total")
    if not total or not rate or snap.get("state") != "running":
        return None
    return max(total - s.get("frames_read", 0), 0) / rate


def _rejected_text(s: dict) -> str:
    rejected = s.get("rejected") or {}
    total = sum(rejected.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) + ")"


def render_scan(snap: dict):
    """One scan's snapshot as a rich Panel."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    s = snap.get("stats") or {}
    rates, lat = snap.get("rates") or {}, snap.get("latency") or {}
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    total = s.get("frames_total")
    read = s.get("frames_read", 0)
    grid.add_row("frames", f"received {read}{f'/{total}' if total else ''}, corrected {s.get('frames_corrected', 0)}, "
                           f"segmented {s.get('frames_segmented', 0)}"
                           + (f"; scan ended: {s['source_end']}" if s.get("source_end") else ""))
    backlog = snap.get("backlog_frames")
    grid.add_row("rate", f"{'acquisition' if snap.get('live', True) else 'reading'} "
                         f"{_fmt_rate(rates.get('acquisition_fps'))}, processing "
                         f"{_fmt_rate(rates.get('processing_fps'))}, backlog "
                         f"{'–' if backlog is None else f'{backlog} frames'}")
    ring = snap.get("ring")
    ring_text = "–" if not ring else (f"{ring['frames']}/{ring['capacity']} frames "
                                      f"({100 * ring['frames'] / max(ring['capacity'], 1):.0f}%)")
    seconds = lat.get("seconds")
    grid.add_row("latency", f"{lat.get('frames', 0)} frames, {'–' if seconds is None else f'{seconds:.1f} s'}; "
                            f"ring {ring_text}")
    bg = snap.get("background") or {}
    beam = s.get("direct_beam")
    grid.add_row("background", f"{bg.get('mode', '?')}, window {bg.get('window', '?')}, normalise "
                               f"{bg.get('normalise', '?')}; direct beam {beam if beam else '–'}")
    opened = snap.get("blobs_open")
    written = s.get("difspots_written", 0)
    closed = written + sum((s.get("rejected") or {}).values())
    grid.add_row("blobs", f"open {'–' if opened is None else opened}, closed {closed}, "
                          f"rejected {_rejected_text(s)}")
    grid.add_row("difspots", f"{written} written")
    spark = snap.get("spots_per_psi")
    if spark:
        psi = spark.get("psi_deg")
        axis = f"ψ {round(psi[0])}°..{round(psi[1])}°" if psi else f"frames 0..{spark['frames']}"
        grid.add_row("spots/ψ", Text(sparkline(spark["counts"])) + Text(f"  {axis}, highest {max(spark['counts'])}"))
    if snap.get("waiting_for"):
        grid.add_row("waiting", snap["waiting_for"])
    if _counters_text(snap):
        grid.add_row("source", _counters_text(snap))
    grid.add_row("memory", _fmt_mb(snap.get("memory_mb")))
    warnings = snap.get("warnings") or []
    grid.add_row("warnings", Text("\n".join(warnings), style="yellow") if warnings else "none")
    parts = [grid]
    if total:  # a recorded scan (or a live one that said how long it is): a progress bar
        eta = _eta_s(snap)
        bar = Table.grid(padding=(0, 1))
        bar.add_column(width=40)
        bar.add_column()
        bar.add_row(ProgressBar(total=total, completed=min(read, total), width=40),
                    f"{100 * min(read, total) / total:.0f}%  {_fmt_rate(rates.get('acquisition_fps'))}  "
                    f"ETA {_fmt_duration(eta)}  elapsed {_fmt_duration(s.get('elapsed_s'))}")
        parts.insert(0, bar)
    if snap.get("error"):
        parts.append(Text(f"error: {snap['error']}", style="red"))
    state = snap.get("state", "?")
    return Panel(Group(*parts), title=f"{state} — {snap.get('source')}", title_align="left",
                 subtitle=str(snap.get("out_dir")), subtitle_align="right", box=box.ROUNDED)


def render(snapshots: Sequence[dict], header: str | None = None):
    """Several scans, with an optional header line above them."""
    from rich.console import Group
    from rich.text import Text

    parts = [Text(header)] if header else []
    parts += [render_scan(s) for s in snapshots]
    return Group(*parts)


def _counters_text(snap: dict) -> str:
    """The source's counters that are not 0: ``missing 3, reopens 1``."""
    return ", ".join(f"{name} {n}" for name, n in (snap.get("source_counters") or {}).items() if n)


def status_line(snap: dict, root: str | os.PathLike | None = None) -> str:
    """One scan's snapshot on one line, for logs; ``root``: the folder several runs were read under, whose run
    folder (relative to it) the line names (two runs of one source, or a daemon's scans, read alike)."""
    s, rates, lat = snap.get("stats") or {}, snap.get("rates") or {}, snap.get("latency") or {}
    total = s.get("frames_total")
    seconds = lat.get("seconds")
    where = ""
    if root is not None and snap.get("out_dir"):
        where = f" [{os.path.relpath(snap['out_dir'], root)}]"
    return (f"{snap.get('source')}{where}: {snap.get('state')}; frames received {s.get('frames_read', 0)}"
            f"{f'/{total}' if total else ''}, corrected {s.get('frames_corrected', 0)}, segmented "
            f"{s.get('frames_segmented', 0)}; acquisition {_fmt_rate(rates.get('acquisition_fps'))}, processing "
            f"{_fmt_rate(rates.get('processing_fps'))}; latency {lat.get('frames', 0)} frames"
            f"{'' if seconds is None else f' {seconds:.1f} s'}; difspots {s.get('difspots_written', 0)}, "
            f"rejected {_rejected_text(s)}; {_fmt_mb(snap.get('memory_mb'))}"
            + (f"; waiting: {snap['waiting_for']}" if snap.get("waiting_for") else "")
            + (f"; source: {_counters_text(snap)}" if _counters_text(snap) else "")
            + (f"; warnings: {'; '.join(snap['warnings'])}" if snap.get("warnings") else ""))


class LiveStatus:
    """A rich Live view refreshed ``refresh_per_second`` times a second from ``get_snapshots()``.

    The Live's own thread calls ``get_snapshots``; nobody else waits for it.
    """

    def __init__(self, get_snapshots: Callable[[], Sequence[dict]], console, *,
                 header: Callable[[], str] | None = None, refresh_per_second: float = 4):
        from rich.live import Live

        self._get, self._header = get_snapshots, header
        self.live = Live(console=console, refresh_per_second=refresh_per_second, get_renderable=self.renderable,
                         transient=False, redirect_stdout=False, redirect_stderr=False)

    def renderable(self):
        try:
            return render(self._get(), self._header() if self._header else None)
        except Exception as exc:  # never take the scan down with the display
            from rich.text import Text
            return Text(f"(status unavailable: {exc})")

    def __enter__(self):
        self.live.__enter__()
        self._streams = _log_to_console(self.live.console)
        return self

    def __exit__(self, *exc):
        self.live.refresh()
        for handler, stream in self._streams:
            handler.setStream(stream)
        return self.live.__exit__(*exc)


class _ConsoleStream:
    """A file-like stream that prints above a rich Live display instead of through it."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> int:
        self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


def _log_to_console(console) -> list:
    """Point the root logger's terminal handlers at ``console``; returns (handler, old stream) to restore."""
    swapped = []
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
            swapped.append((handler, handler.setStream(_ConsoleStream(console))))
    return swapped


class LogStatus:
    """Without a terminal: one log line per scan every ``every_s`` seconds, from its own thread."""

    def __init__(self, get_snapshots: Callable[[], Sequence[dict]], every_s: float, *,
                 header: Callable[[], str] | None = None, logger: logging.Logger | None = None):
        self._get, self._header, self.every_s = get_snapshots, header, every_s
        self._log = logger or log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # a fault in making the lines was reported (once: the next ones would repeat it)

    def emit(self) -> None:
        """Log the lines now."""
        try:
            if self._header is not None:
                self._log.info("%s", self._header())
            for snap in self._get():
                self._log.info("%s", status_line(snap))
        except (DctStreamError, OSError) as exc:  # a scan's status file is not there (yet), or unreadable
            self._log.debug("status unavailable: %s", exc)
        except Exception:  # a bug in the status lines: the scan goes on, but it is said
            (self._log.debug if self._failed else self._log.exception)("status line not made")
            self._failed = True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.emit()

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, name="dctstream-status-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def open_display(get_snapshots, *, console=None, every_s: float = 5.0, header=None):
    """`LiveStatus` on a terminal, else `LogStatus`; ``console`` defaults to stderr (stdout stays for results)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveStatus(get_snapshots, console, header=header)
    return LogStatus(get_snapshots, every_s, header=header)
