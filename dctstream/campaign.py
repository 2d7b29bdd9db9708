"""``dctstream campaign``: many scans processed on a Dask cluster, one task per scan.

A campaign is a list of scans (``file.h5::/dataset`` URLs, files whose scans
are found as ``dctstream watch`` finds them, globs of files, or a YAML listing
with per-scan settings, see `list_scans`).  Each scan is one Dask task that
does in a worker what ``dctstream run`` does (`process_job`), into its own
folder under ``--out``; a task never raises: a scan that fails is a row of the
summary, not the end of the campaign.

Restarting the same command repeats nothing finished: a scan whose run record
(``run.json``) says ``finished`` is skipped; one left unfinished (its worker, job
or the whole campaign killed) resumes from its checkpoint (`dctstream.checkpoint`);
a failed one is tried again.  If Dask itself loses a worker mid-scan it runs the
task again elsewhere, which also resumes from the checkpoint.

The workers write the usual ``OUT/status.json`` of their scan; the campaign's
view reads those (a shared file system is needed anyway for the results), so
nothing but the final row of each scan travels through Dask.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import replacing
from .config import ClusterConfig, Config, load_config
from .configs import config_file
from .errors import ConfigError, DctStreamError, InputError
from .record import read_record, write_record

log = logging.getLogger(__name__)

SUMMARY_FILE = "campaign.tsv"
RESEGMENT_SUMMARY_FILE = "resegment.tsv"
RESEGMENTED = "resegmented"  # a run's folder of its results segmented again, as `dctstream resegment` names it
SUMMARY_COLUMNS = ("scan", "state", "frames", "spots", "noise_sigma", "time_s", "warnings", "error", "out_dir")
# keys of one scan in a YAML listing
SCAN_KEYS = ("source", "angles", "dark", "name", "set")
# a worker's resource that one scan takes: a batch job's worker has several cores but runs one scan at a time
SCAN_RESOURCE = "scan"


@dataclass(frozen=True)
class ScanJob:
    """One scan of a campaign: its configuration (source, angles, dark and output folder set), or why it has none."""

    name: str  # its output folder relative to the campaign's --out
    source: str
    cfg: Config | None
    error: str | None = None  # known before it ran (a file without frames): reported as failed
    # not None: ``source`` is a run's folder, segmented again from its sparse scan with these overrides
    resegment: tuple[str, ...] | None = None


# -- what the scans are ------------------------------------------------------------------------------


def list_scans(specs: Sequence[str], out_root: str | os.PathLike, *, config_path: str | None = None,
               overrides: Sequence[str] = ()) -> list[ScanJob]:
    """The scans named by ``specs``, each with its configuration: the config file, the ``--set`` overrides, its
    own settings (YAML listing), then its source, angles, dark and output folder ``out_root/<name>``.

    A spec is ``file.h5::/dataset`` (that scan), ``file.h5`` (its scans matching ``watch.dataset``, with the
    angles ``watch.angles`` and dark ``watch.dark`` found in the file), a glob of files (quoted), or a
    ``.yml``/``.yaml`` listing::

        scans:
          - data/s1.h5                                  # as on the command line
          - source: data/s2.h5::/1.1/measurement/marana
            angles: data/s2.h5::/1.1/measurement/diffrz  # else found in the file as above
            dark: data/s2.h5::/2.1/measurement/marana
            name: s2_load3                              # output folder (default <file>_<scan>)
            set: {background.window: 301}                # this scan's overrides

    Paths in a listing are relative to its folder.  Raises ``ConfigError`` or ``InputError`` for a listing or
    pattern that cannot be read; a scan whose own settings are wrong becomes a `ScanJob` with an ``error``.
    """
    # the packaged default without a config file, as `dctstream run` and `watch` take it (angles, dark and flat
    # found in the scan's file: the built-in defaults find none); a bad config or --set fails the whole campaign
    config_path = config_file(config_path)
    base = load_config(config_path, overrides)
    entries: list[tuple[str, dict]] = []  # (label for messages, {source, angles, dark, name, set})
    for spec in specs:
        if spec.endswith((".yml", ".yaml")) and "::" not in spec:
            entries += _listing(Path(spec))
        elif any(c in spec.partition("::")[0] for c in "*?["):
            found = sorted(glob.glob(spec.partition("::")[0], recursive=True))
            if not found:
                raise InputError(f"{spec}: no file matches, expected a pattern of scan files")
            entries += [(path, {"source": path + _tail(spec)}) for path in found]
        else:
            entries.append((spec, {"source": spec}))
    scans = []
    for label, entry in entries:
        scans += _expand(label, entry, base)
    _name_folders(scans)
    out_root = Path(out_root)
    jobs, seen = [], {}
    for label, entry, found in scans:
        name = entry["name"]
        if name in seen:
            raise ConfigError(f"{label}: name: {name} is also the folder of {seen[name]}, expected one folder "
                              "per scan; give the scans names in a YAML listing")
        seen[name] = label
        jobs.append(_job(label, entry, found, base, config_path, overrides, out_root / name))
    return jobs


def _tail(spec: str) -> str:
    path, sep, dataset = spec.partition("::")
    return f"::{dataset}" if sep else ""


def _listing(path: Path) -> list[tuple[str, dict]]:
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the scan listing ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("scans"), list) or set(tree) != {"scans"}:
        got = f"keys {', '.join(map(str, tree))}" if isinstance(tree, dict) else type(tree).__name__
        raise ConfigError(f"{path}: expected a mapping with one key, scans: a list of scans, got {got}")
    out = []
    for i, item in enumerate(tree["scans"]):
        label = f"{path}: scans[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not isinstance(item.get("source"), str):
            raise ConfigError(f"{label}: expected a file, a file.h5::/dataset URL or a mapping with source:, "
                              f"got {item!r}")
        unknown = sorted(set(item) - set(SCAN_KEYS))
        if unknown:
            raise ConfigError(f"{label}.{unknown[0]}: unknown key (known: {', '.join(sorted(SCAN_KEYS))})")
        entry = {key: _relative_to(path.parent, item[key]) if key in ("source", "angles", "dark") and item.get(key)
                 else item.get(key) for key in SCAN_KEYS}
        if entry["set"] is not None and not isinstance(entry["set"], dict):
            raise ConfigError(f"{label}.set: expected a mapping of section.key: value, got {entry['set']!r}")
        out.append((label, entry))
    return out


def _relative_to(folder: Path, url: str) -> str:
    path, sep, dataset = url.partition("::")
    if "://" in path or Path(path).is_absolute():
        return url
    return f"{folder / path}{sep}{dataset}"


def _expand(label: str, entry: dict, base: Config) -> list[tuple[str, dict, dict]]:
    """(label, entry, what the file says) per scan: a file without a dataset stands for each of its scans."""
    from .daemon import ScanFinder

    path, sep, dataset = entry["source"].partition("::")
    finder = ScanFinder(Path(path).parent, base)
    finder_found = finder.scans_in(Path(path)) if Path(path).is_file() else []
    if not sep:
        if not finder_found:
            why = ("no such file" if not Path(path).is_file()
                   else f"not an HDF5 file, or no 3-D dataset in it matches {base.watch.dataset}")
            return [(label, {**entry, "source": path}, {"error": f"{path}: {why}, expected a scan file "
                                                                 "(watch.dataset says where its frames are)"})]
        return [(label, {**entry, "source": s.url}, {"scan": s}) for s in finder_found]
    if not Path(path).exists():  # a campaign reprocesses recorded scans: no waiting for a file to appear
        return [(label, entry, {"error": f"{path}: no such file, expected a recorded scan"})]
    match = [s for s in finder_found if s.dataset == dataset]
    if match:
        return [(label, entry, {"scan": match[0]})]
    return [(label, entry, {})]  # not a scan watch.dataset describes: angles and dark as the config says


def _name_folders(scans: list[tuple[str, dict, dict]]) -> None:
    """``<file stem>_<scan>`` (``s1_1.1``) for every scan not named in its listing; when stems repeat, under
    the file's folder relative to the files' common folder (``load1/s1_1.1``), as ``dctstream watch`` does."""
    unnamed = [(entry, *entry["source"].partition("::")[::2]) for _, entry, _ in scans if not entry.get("name")]
    if not unnamed:
        return
    folders = [Path(os.path.abspath(path)).parent for _, path, _ in unnamed]
    root = Path(os.path.commonpath(folders))
    stems = [Path(path).stem for _, path, _ in unnamed]
    for (entry, path, dataset), folder in zip(unnamed, folders):
        scan = next((p for p in dataset.split("/") if p), None)
        name = f"{Path(path).stem}_{scan}" if scan else Path(path).stem
        entry["name"] = str(folder.relative_to(root) / name) if stems.count(Path(path).stem) > 1 else name


def _job(label: str, entry: dict, found: dict, base: Config, config_path, overrides, out_dir: Path) -> ScanJob:
    name, source = entry["name"], entry["source"]
    if found.get("error"):
        return ScanJob(name, source, None, found["error"])
    scan = found.get("scan")
    angles = entry.get("angles") or (f"{scan.path}::{scan.angles}" if scan is not None and scan.angles else None)
    dark = entry.get("dark") or (f"{scan.path}::{scan.dark}" if scan is not None and scan.dark else None)
    layers = []
    for key, value in (entry.get("set") or {}).items():
        section, dot, field = str(key).partition(".")
        if not dot:
            return ScanJob(name, source, None, f"{label}.set: {key}: expected section.key")
        layers.append((f"{label}.set", {section: {field: value}}))
    own = {"source": {"url": source}, "output": {"dir": str(out_dir)}}
    if angles:
        own["source"]["angles"] = angles
    if dark:
        own["dark"] = {"url": dark}
    layers.append((label, own))
    try:
        cfg = load_config(config_path, overrides, layers)
    except ConfigError as exc:
        return ScanJob(name, source, None, str(exc))
    # the cluster settings are the campaign's, not the scan's: a scan resumed with other --workers is the same run
    return ScanJob(name, source, dataclasses.replace(cfg, cluster=ClusterConfig()))


def list_runs(folders: Sequence[str | os.PathLike], overrides: Sequence[str] = (),
              out_root: str | os.PathLike | None = None) -> list[ScanJob]:
    """A job per run found in ``folders`` (each a run's output folder with its sparse scan, or a folder of them
    such as a campaign's ``--out``), segmenting it again with ``overrides`` into ``RUN_DIR/resegmented`` (or
    ``out_root/<name>``).  A run whose configuration the overrides cannot change becomes a job with an ``error``."""
    from .config import replace_config
    from .resegment import SPARSE_FILE, run_config

    jobs, seen = [], set()
    for folder in map(Path, folders):
        found = [folder] if (folder / SPARSE_FILE).is_file() else sorted(p.parent for p in folder.rglob(SPARSE_FILE))
        if not found:
            raise InputError(f"{folder}: no {SPARSE_FILE} in it or below it, expected the output folder of a run "
                             "with export.format: sparse (the default), or a folder of them")
        for run in found:
            name = run.name if run == folder else str(run.relative_to(folder))
            if name in seen:
                name = str(run)
            seen.add(name)
            out_dir = Path(out_root) / name if out_root is not None else run / RESEGMENTED
            try:
                cfg = replace_config(run_config(run, overrides), output={"dir": str(out_dir)})
            except DctStreamError as exc:
                jobs.append(ScanJob(name, str(run), None, " ".join(str(exc).split()), tuple(overrides)))
                continue
            jobs.append(ScanJob(name, str(run), cfg, resegment=tuple(overrides)))
    return jobs


# -- one scan, in a worker ---------------------------------------------------------------------------


def process_job(job: ScanJob, cores: int = 1) -> dict:
    """Process one scan as ``dctstream run`` does (resuming it if it was left unfinished) and return its
    summary row; a finished scan is skipped.  Never raises for the scan's own failures."""
    out_dir = Path(job.cfg.output.dir) if job.cfg is not None else None
    if job.cfg is None:
        return _row(job, "failed", {}, 0.0, job.error)
    if job.resegment is not None:
        return _resegment_job(job, out_dir, cores)
    record = read_record(out_dir)
    if record is not None and record.get("state") == "finished":
        return _row(job, "skipped", record, None, None)
    import numba

    from . import checkpoint
    from .runner import process_scan

    numba.set_num_threads(max(1, min(cores, numba.config.NUMBA_NUM_THREADS)))
    resumed = checkpoint.marker_path(out_dir).exists()
    handler = _scan_log(out_dir)
    started = time.monotonic()
    error = None
    try:
        log.info("%s: %s into %s", job.source, "resuming" if resumed else "processing", out_dir)
        process_scan(job.cfg, display=False)
    except DctStreamError as exc:
        error = " ".join(str(exc).split())
    except Exception as exc:  # a bug, but one scan's: the others go on
        log.exception("%s: failed", job.source)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        logging.getLogger("dctstream").removeHandler(handler)
        handler.close()
    elapsed = time.monotonic() - started
    record = read_record(out_dir) or {}
    if error is not None and record.get("state") != "failed":  # failed before the run had a record
        record = {**record, "state": "failed", "error": error, "source": job.source, "out_dir": str(out_dir)}
        write_record(out_dir, record)
    return _row(job, "failed" if error else "resumed" if resumed else "finished", record, elapsed, error)


def _resegment_job(job: ScanJob, out_dir: Path, cores: int) -> dict:
    """`dctstream resegment` of the run ``job.source``; its run record (``state``, ``resegment``: the overrides)
    makes the same command again skip it."""
    record = read_record(out_dir)
    if record is not None and record.get("state") == "finished" and record.get("resegment") == list(job.resegment):
        return _row(job, "skipped", record, None, None)
    import numba

    from .resegment import resegment

    numba.set_num_threads(max(1, min(cores, numba.config.NUMBA_NUM_THREADS)))
    started = time.monotonic()
    try:
        result = resegment(job.source, list(job.resegment), out_dir, overwrite=True)
    except DctStreamError as exc:
        return _row(job, "failed", {}, time.monotonic() - started, " ".join(str(exc).split()))
    except Exception as exc:  # a bug, but one run's: the others go on
        log.exception("%s: resegmenting failed", job.source)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return _row(job, "failed", {}, time.monotonic() - started, error)
    noise = ((read_record(job.source) or {}).get("stats") or {}).get("noise_sigma")
    record = {"state": "finished", "source": job.source, "out_dir": str(out_dir), "resegment": list(job.resegment),
              "frames_processed": result["frames"], "spots": result["difspots"],
              "stats": {"noise_sigma": noise, "elapsed_s": round(result["seconds"], 3),
                        "rejected": result["rejected"], "seam_joined": result["seam_joined"]},
              "warnings": [] if result["finished_scan"] else ["the run's scan was being written: its frames so far"]}
    write_record(out_dir, record)
    return _row(job, "finished", record, time.monotonic() - started, None)


def _scan_log(out_dir: Path) -> logging.Handler:
    """The scan's log lines (this worker thread's) also go to ``OUT/run.log``, as ``dctstream watch`` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    # this task's thread and the pipeline's own; other tasks of a worker with several threads log elsewhere
    here = threading.get_ident()
    handler.addFilter(lambda record: record.thread == here or record.threadName.startswith("dctstream-")
                      or record.levelno >= logging.WARNING)
    logger = logging.getLogger("dctstream")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def _row(job: ScanJob, state: str, record: dict, elapsed_s: float | None, error: str | None) -> dict:
    stats = record.get("stats") or {}
    if elapsed_s is None:  # skipped: the time of the run that made it
        elapsed_s = stats.get("elapsed_s")
    return {"scan": job.name, "source": job.source, "state": state,
            "frames": record.get("frames_processed"), "spots": record.get("spots"),
            "noise_sigma": stats.get("noise_sigma"), "time_s": elapsed_s,
            "warnings": list(record.get("warnings") or []), "error": error,
            "out_dir": None if job.cfg is None else job.cfg.output.dir}


# -- the cluster --------------------------------------------------------------------------------------


def jobqueue_cluster(cfg: ClusterConfig, **kw):
    """The dask-jobqueue cluster of ``cfg`` (slurm, pbs, sge, lsf), not yet scaled: one worker per job, running
    one scan at a time on ``cores_per_worker`` cores.  ``cluster.job_script()`` shows what it submits."""
    import dask_jobqueue

    classes = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
               "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster}
    options = {"cores": cfg.cores_per_worker, "memory": cfg.memory_per_worker, "processes": 1,
               "queue": cfg.queue, "walltime": cfg.walltime,
               # SGE and LSF call the account a project
               ("account" if cfg.kind in ("slurm", "pbs") else "project"): cfg.account,
               "job_extra_directives": list(cfg.job_extra_directives),
               "job_script_prologue": list(cfg.job_script_prologue),
               "worker_extra_args": ["--resources", f"{SCAN_RESOURCE}=1"],
               "interface": cfg.interface, "local_directory": cfg.local_directory, "job_name": "dctstream"}
    return classes[cfg.kind](**{k: v for k, v in options.items() if v is not None}, **kw)


def open_client(cfg: ClusterConfig):
    """(a Dask client for ``cfg``, the resources a scan asks for, a function closing what was opened)."""
    from distributed import Client, LocalCluster

    if cfg.kind == "address":
        client = Client(cfg.address, timeout="30s")
        return client, None, client.close
    if cfg.kind == "local":
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               memory_limit=cfg.memory_per_worker or "auto", dashboard_address=None,
                               local_directory=cfg.local_directory, interface=cfg.interface)
        resources = None
    else:
        cluster = jobqueue_cluster(cfg)
        cluster.scale(jobs=cfg.workers)
        resources = {SCAN_RESOURCE: 1}
    client = Client(cluster)

    def close():
        client.close()
        cluster.close()

    return client, resources, close


# -- the campaign -------------------------------------------------------------------------------------


class Campaign:
    """Runs `ScanJob` s on a Dask client and keeps what the view shows."""

    def __init__(self, jobs: Sequence[ScanJob], out_root: str | os.PathLike, *, cores_per_worker: int = 1,
                 summary_file: str = SUMMARY_FILE):
        self.jobs = list(jobs)
        self.out_root = Path(out_root)
        self.summary_file = summary_file
        self.cores = cores_per_worker
        self.rows: dict[str, dict] = {}
        self.started = time.monotonic()
        self.frames_done = 0  # frames processed by the scans finished in this campaign

    def run(self, client, *, resources: dict | None = None) -> list[dict]:
        """Submit every scan, wait for all, write the summary; the rows in the order of the jobs."""
        from distributed import as_completed

        self.started = time.monotonic()
        futures = {client.submit(process_job, job, self.cores, key=f"dctstream-scan-{i}-{job.name}", pure=False,
                                 resources=resources): job for i, job in enumerate(self.jobs)}
        for future in as_completed(futures):
            job = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # the worker died again and again (KilledWorker), or Dask failed
                row = _row(job, "failed", {}, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            self.rows[job.name] = row
            if row["state"] in ("finished", "resumed"):
                self.frames_done += row["frames"] or 0
            log.info("%s: %s%s", job.name, row["state"], f": {row['error']}" if row["error"] else "")
        rows = [self.rows[job.name] for job in self.jobs]
        write_summary(self.out_root / self.summary_file, rows)
        return rows

    def counts(self) -> dict[str, int]:
        states = [row["state"] for row in self.rows.values()]
        done = sum(s in ("finished", "resumed") for s in states)
        return {"done": done, "skipped": states.count("skipped"), "failed": states.count("failed"),
                "waiting": len(self.jobs) - len(states)}

    def running(self) -> list[dict]:
        """Status snapshots of the scans being processed now (their ``status.json``, written by the workers)."""
        from .status import read_status

        out = []
        for job in self.jobs:
            if job.name in self.rows or job.cfg is None:
                continue
            try:
                snap = read_status(job.cfg.output.dir)
            except DctStreamError:
                continue
            if snap.get("state") in ("starting", "running") and _utc_s(snap.get("updated_utc")) >= self._wall_start:
                out.append({**snap, "name": job.name})
        return out

    @property
    def _wall_start(self) -> float:
        return time.time() - (time.monotonic() - self.started)

    def header(self) -> str:
        c, running = self.counts(), self.running()
        live_fps = sum((snap.get("rates") or {}).get("processing_fps") or 0.0 for snap in running)
        elapsed = time.monotonic() - self.started
        frames = self.frames_done + sum((snap.get("stats") or {}).get("frames_segmented", 0) for snap in running)
        return (f"campaign of {len(self.jobs)} scans: {c['done']} done, {len(running)} running, {c['failed']} failed, "
                f"{c['skipped']} skipped (finished before), {c['waiting'] - len(running)} queued; "
                f"{live_fps:.1f} frames/s now, {frames / max(elapsed, 1e-9):.1f} frames/s on average")


def _utc_s(text: str | None) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def write_summary(path: Path, rows: Sequence[dict]) -> Path:
    """The summary as tab-separated text, one row per scan (warnings joined by ``; ``). The rows an earlier
    campaign into the same folder wrote for other scans are kept, first (a second campaign replaced them all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "\t".join(SUMMARY_COLUMNS)
    names = {_cell(row, "scan") for row in rows}
    try:
        before = path.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        before = []
    lines = [header]
    if before and before[0] == header:
        lines += [line for line in before[1:] if line and line.split("\t", 1)[0] not in names]
    for row in rows:
        lines.append("\t".join(_cell(row, key) for key in SUMMARY_COLUMNS))
    with replacing(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if key == "warnings":
        return "; ".join(" ".join(w.split()) for w in value)
    if isinstance(value, float):
        return f"{value:.3g}" if key == "noise_sigma" else f"{value:.1f}"
    return " ".join(str(value).split())


def summary_table(rows: Sequence[dict]):
    """The summary as a rich table."""
    from rich.table import Table

    table = Table(title="campaign summary")
    for name, justify in (("scan", "left"), ("state", "left"), ("frames", "right"), ("spots", "right"),
                          ("noise", "right"), ("time", "right"), ("warnings / error", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        note = row["error"] or _cell(row, "warnings")
        table.add_row(row["scan"], row["state"], _cell(row, "frames"), _cell(row, "spots"),
                      _cell(row, "noise_sigma"), _cell(row, "time_s") + (" s" if row["time_s"] is not None else ""),
                      note)
    return table


def render_running(campaign: Campaign):
    """The view: the campaign's counts and rates, and a line per scan being processed."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for name in ("scan", "frames", "frames/s", "difspots", "memory"):
        table.add_column(name, justify="left" if name == "scan" else "right")
    for snap in campaign.running():
        s, rates = snap.get("stats") or {}, snap.get("rates") or {}
        total = s.get("frames_total")
        fps = rates.get("processing_fps")
        table.add_row(snap["name"], f"{s.get('frames_segmented', 0)}{f'/{total}' if total else ''}",
                      "–" if fps is None else f"{fps:.1f}", str(s.get("difspots_written", 0)),
                      "–" if snap.get("memory_mb") is None else f"{snap['memory_mb']:.0f} MB")
    return Group(Text(campaign.header()), table)


class CampaignView:
    """A rich Live view of the campaign on a terminal, else a log line every ``every_s``; pulls from its own
    thread, the campaign never calls it."""

    def __init__(self, campaign: Campaign, *, console=None, every_s: float = 5.0,
                 render: Callable[[Campaign], Any] = render_running):
        from rich.console import Console

        self.campaign, self.every_s, self.render = campaign, every_s, render
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._live = None
        self._thread = None

    def __enter__(self):
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=lambda: self.render(self.campaign))
            self._live.__enter__()
        else:
            self._thread = threading.Thread(target=self._loop, name="dctstream-campaign-log", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info("%s", self.campaign.header())

    def __exit__(self, *exc):
        self._stop.set()
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
        if self._thread is not None:
            self._thread.join()
        return False
