"""The run record ``OUT/run.json``: what a scientist needs to know about a run months later.

Written atomically when the output folder is created (``state: running``) and
again when the run ends (``finished``, ``stopped`` or ``failed``).  A record
that still says ``running`` after its process is gone is a run that was
killed: `scan_state` reads it that way.

Keys: ``dctstream_version``, ``state``, ``end_reason`` (why the source ended,
or why the run stopped), ``incomplete`` (why an incomplete scan is not whole,
with the frames seen of those expected), ``error``, ``source``, ``angles``, ``dark``,
``auto`` (what ``source.angles``, ``dark.url`` and ``detector.flat: auto``
found in the scan file, and why; ``source.url``: the rotation scan of a DCT
dataset file), ``out_dir``, ``host``, ``pid``, ``started_utc``, ``ended_utc``,
``frames_processed`` (frames segmented), ``frames_read``, ``frames_expected``, ``spots``
(difspots written), ``rejected`` (by reason), ``warnings``, ``stats`` (every
field of the pipeline's `Stats`, whatever fields it has), ``config`` (the
effective configuration) and ``quicklook`` (the pictures written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import Config, config_to_dict
from .status import write_json_atomic

RUN_FILE = "run.json"
# States of a record; only "finished" means the results are complete.  "incomplete": the source ended
# before the scan did (it went quiet, vanished, was replaced, or sent fewer frames than it announced).
STATES = ("running", "finished", "incomplete", "stopped", "failed")


def run_record(cfg: Config, snap: dict, quicklook: list[str] | None = None, auto: dict | None = None,
               error_type: str | None = None) -> dict:
    """The record of a run from its last status snapshot; ``error_type``: the class of what stopped a failed run
    (a `dctstream.errors` name, e.g. ``AnotherScanError``, for programs that act on it)."""
    s = snap.get("stats") or {}
    state = snap.get("state", "running")
    if state not in STATES:
        state = "running"
    end_reason = (s.get("source_end") if state in ("finished", "incomplete")
                  else (None if state == "running" else state))
    return {
        "dctstream_version": snap.get("version"),
        "state": state,
        "end_reason": end_reason,
        "error": snap.get("error"),
        "error_type": error_type,
        "source": cfg.source.url,
        "angles": cfg.source.angles,
        "dark": cfg.dark.url if cfg.dark.url is not None else cfg.dark.value,
        "auto": auto or {},
        "out_dir": str(cfg.output.dir),
        "host": snap.get("host"),
        "pid": snap.get("pid"),
        "started_utc": snap.get("started_utc"),
        "ended_utc": snap.get("ended_utc"),
        "frames_processed": s.get("frames_segmented", 0),
        "frames_read": s.get("frames_read", 0),
        "frames_expected": s.get("frames_expected"),
        "incomplete": s.get("incomplete") if state == "incomplete" else None,
        "spots": s.get("difspots_written", 0),
        "rejected": s.get("rejected", {}),
        "source_counters": snap.get("source_counters", {}),
        "warnings": snap.get("warnings", []),
        "stats": s,
        "config": config_to_dict(cfg),
        "quicklook": quicklook or [],
    }


def write_record(out_dir: str | os.PathLike, record: dict) -> Path:
    path = Path(out_dir) / RUN_FILE
    write_json_atomic(path, record)
    return path


def read_record(out_dir: str | os.PathLike) -> dict | None:
    """The run record of ``out_dir``, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads((Path(out_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None  # JSON, but not a record: '[1, 2]' failed its readers


def partial_reason(record: dict, out_dir: str | os.PathLike | None = None) -> str | None:
    """Why the run's results are not those of a whole scan, or None when they are.  With ``out_dir``, a record
    that says running whose process is gone (killed) is said stopped, as ``dctstream status`` says it."""
    if out_dir is not None and record.get("state") in ("starting", "running"):
        from .status import stopped_if_gone  # as the status reads it (imported here: status imports more)

        record = stopped_if_gone(Path(out_dir), record) or record
    state = record.get("state")
    if state == "finished":
        return None
    if state is None:
        return "no run record (run.json), so not known to be a whole scan"
    why = record.get("incomplete") or record.get("error") or record.get("end_reason")
    return f"the run is {state}" + (f": {why}" if why else "")
