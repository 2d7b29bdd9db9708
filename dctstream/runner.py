"""One scan with everything around the pipeline: status snapshot, display, quick-look pictures, run record.

`process_scan` is what ``dctstream run`` (and each scan of ``dctstream
watch``) does.  Nothing appears in the output folder before the pipeline has
prepared it, so a run that fails on its input leaves the folder as it was.
A run interrupted (Ctrl-C, SIGTERM) or failing after that point leaves
consistent files (every file is written whole and renamed) and a run record
saying ``stopped`` or ``failed``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading

from . import interrupt
from .config import Config
from .dct_table import export_dct
from .errors import AnotherScanError
from .pipeline import Pipeline, Stats
from .quicklook import QuickLook
from .record import read_record, run_record, write_record
from .status import ScanMonitor, open_display, utc_now

log = logging.getLogger(__name__)

# Set by `dctstream watch` for its children: the daemon's pid.
PARENT_ENV = "DCTSTREAM_WATCH_PID"
_PR_SET_PDEATHSIG = 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def process_scan(cfg: Config, *, overwrite: bool = False, console=None, display: bool = True) -> Stats:
    """Process one scan into ``cfg.output.dir``; shows its status on ``console`` (stderr by default).

    ``display=False`` shows nothing (the status snapshot and record are still written).
    """
    pipeline = None

    def auto() -> dict:  # what was found in the scan file, and what a live source found once its scan began
        if pipeline is None:
            return {}
        return {**pipeline.auto_found, **pipeline.source.found}

    recorded = threading.Event()

    def record_start(snap: dict) -> None:  # on the monitor's thread, once the output folder exists
        if not recorded.is_set():
            write_record(cfg.output.dir, run_record(cfg, snap, auto=auto()))
            recorded.set()

    monitor = ScanMonitor(cfg, on_write=record_start)
    monitor.start()  # from now on warnings are kept for the status and the record, those of opening the scan too
    try:
        pipeline = Pipeline(cfg, overwrite=overwrite)  # a bad input fails here, before any output
    except AnotherScanError as exc:  # the unfinished run there read another scan: said in its record, kept as it was
        monitor.close("failed")
        refused = read_record(cfg.output.dir)
        if refused is not None:
            write_record(cfg.output.dir, {**refused, "refused": _one_line(exc), "refused_type": type(exc).__name__,
                                          "refused_utc": utc_now()})
        raise
    except BaseException:
        monitor.close("failed")  # writes nothing: there is no output folder yet
        raise
    pipeline.keep_lock = True  # the record is written before another run may take the folder
    cfg = pipeline.cfg  # with what source.angles / dark.url: auto found in place
    try:
        quick = QuickLook(cfg.quicklook, cfg.output.dir, pipeline) if cfg.quicklook.enabled else None
        if quick is not None:
            pipeline.frame_taps.append(quick)
        monitor.attach(pipeline)
        view = open_display(lambda: [monitor.snapshot()], console=console,
                            every_s=cfg.status.log_every_s) if display else None
    except BaseException:
        monitor.close("failed")
        pipeline.end("failed")  # the source closed, the output folder let go
        raise
    state, error, error_type = "failed", None, None
    try:
        try:
            with view if view is not None else contextlib.nullcontext():
                try:
                    stats = pipeline.run(progress=monitor)
                    state = "finished" if stats.incomplete is None else "incomplete"
                except KeyboardInterrupt:
                    state, error = "stopped", "interrupted (SIGINT or SIGTERM)"
                    raise
                except BaseException as exc:
                    error, error_type = _one_line(exc), type(exc).__name__
                    raise
                finally:
                    monitor.state = state  # the display's last refresh shows how the run ended
            return stats
        finally:
            with interrupt.deferred():  # a stop now would cut the record of how the run ended
                pictures = []
                if quick is not None and monitor.output_ready:
                    try:
                        pictures = quick.finish() if state in ("finished", "incomplete") else []
                    except Exception as exc:
                        log.warning("quick-look pictures not written: %s", _one_line(exc))
                if state == "finished":
                    try:
                        export_dct(cfg.output.dir, finished=True)  # the legacy DCT difspot table, beside spots.h5
                    except Exception as exc:
                        log.warning("difspot table (difspot.h5, difspot.csv) not written: %s", _one_line(exc))
                monitor.state = state
                snap = monitor.close(state, error)
                if snap is not None:
                    write_record(cfg.output.dir, run_record(cfg, snap, pictures, auto=auto(), error_type=error_type))
                if state == "finished" and interrupt.received():
                    log.info("%s received while the run was finishing: it finished", interrupt.received())
    finally:
        with interrupt.deferred():
            pipeline.end(state)


def stop_on_sigterm() -> None:
    """SIGTERM stops a run as Ctrl-C does: the pipeline closes its files and the record says ``stopped``."""
    if threading.current_thread() is threading.main_thread():
        interrupt.install()
    die_with_parent()


def die_with_parent() -> None:
    """A child of ``dctstream watch`` is killed when the daemon dies (Linux), so that a restarted
    daemon never races an orphan for the same output folder; if the daemon is already gone, exit now."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:
        os._exit(1)
