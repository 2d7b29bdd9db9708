"""The ``dctstream`` command: run | resegment | tune | watch | campaign | status | export | demo | simulate | replay | bench | check | config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from ._version import __version__
from .errors import ConfigError, DctStreamError, InputError, OutputError

log = logging.getLogger("dctstream")

# Smallest frame the simulator draws (its 2 x 2 modules, direct beam and spots need room).
MIN_SIM_SIZE = 32


def _sets(args) -> list[str]:
    """``args.set``, a key set twice said (the last one wins, as YAML's would: a file's twice is refused)."""
    overrides = list(getattr(args, "set", None) or [])
    last: dict[str, str] = {}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in last and last[key] != text:
            log.warning("--set %s replaces --set %s (the key given twice)", text, last[key])
        last[key] = text
    return overrides


def _config(args):
    from .config import load_config
    from .configs import config_file

    overrides = _sets(args)
    for key in ("source", "dark", "out"):
        value = getattr(args, key, None)
        if value is not None:
            name = {"source": "source.url", "dark": "dark.url", "out": "output.dir"}[key]
            both = [text for text in overrides if text.partition("=")[0].strip() == name]
            if both:  # the option wins, as it comes after: said, it was dropped unsaid
                log.warning("--%s %s replaces --set %s", key, value, both[-1])
            # A path, not YAML: quoted so that `--out 2024` or `--dark 'scan #2.h5::/d'` stay strings.
            overrides.append(f"{name}={json.dumps(value, ensure_ascii=False)}")
    return load_config(config_file(args.config), overrides)


def _threshold(seed_threshold) -> str:
    # None when no frame was ever segmented (an empty scan)
    return "none" if seed_threshold is None else f"{seed_threshold[0]:.4g}..{seed_threshold[1]:.4g} counts"


def _summary(stats, out_dir) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(stats.rejected.items())) or "none"
    ended = f" (scan ended: {stats.source_end})" if stats.source_end else ""
    return (f"{stats.frames_corrected} frames{ended} in {stats.elapsed_s:.1f} s "
            f"({stats.frames_corrected / max(stats.elapsed_s, 1e-9):.1f} frames/s); "
            f"direct beam {list(stats.direct_beam) if stats.direct_beam else 'none'}; "
            f"seed threshold {_threshold(stats.seed_threshold)}; "
            f"{stats.difspots_written} difspots written to {out_dir}; rejected: {rejected}")


def cmd_run(args) -> int:
    from .api import run

    cfg = _config(args)  # before the heavy imports: a bad config fails at once
    from .runner import stop_on_sigterm

    stop_on_sigterm()
    if not args.split and (args.cluster is not None or args.workers is not None):
        from .errors import ConfigError

        raise ConfigError("--cluster, --workers: they say where the chunks of --split N run, expected --split too")
    if args.split:
        return _run_split(args, cfg)
    result = run(None, out=None, config=cfg, overwrite=args.overwrite, display=True)
    print(_summary(result.stats, cfg.output.dir))
    return 0


def _cluster_config(cfg, args):
    """The cluster section with ``--cluster`` and ``--workers`` applied (the scan's config stays as it is); an
    error names the option."""
    from .config import override_config

    if args.cluster is not None:
        kind = "address" if "://" in args.cluster else args.cluster
        cfg = override_config(cfg, {"cluster.kind": kind, "cluster.address": args.cluster if kind == "address" else None},
                              label="--cluster")
    if args.workers is not None:
        cfg = override_config(cfg, {"cluster.workers": args.workers}, label="--workers")
    return cfg.cluster


def _run_split(args, cfg) -> int:
    from .campaign import open_client
    from .split import run_split

    cluster = _cluster_config(cfg, args)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    client, resources, close = open_client(cluster)
    try:
        record = run_split(cfg, client, args.split, overwrite=args.overwrite, cores=cluster.cores_per_worker,
                           resources=resources)
    finally:
        close()
    split = record["split"]
    print(f"{record['frames_processed']} frames in {len(split['chunks'])} chunks on "
          f"{cluster.address or f'{cluster.workers} {cluster.kind} worker(s)'} in {split['elapsed_s']:.1f} s "
          f"(chunk edges at frames {split['edges'] or 'none'}; {split['rerun']} run again as one"
          f"{'; %d kept from a killed run' % len(split['kept']) if split['kept'] else ''}); "
          f"{record['spots']} difspots written to {cfg.output.dir}; worker peak memory "
          f"{split['workers_peak_rss_mb']:.0f} MB")
    return 0


def cmd_campaign(args) -> int:
    from .config import load_config

    overrides = _sets(args)
    cluster = []
    if args.cluster is not None:
        kind = "address" if "://" in args.cluster else args.cluster
        address = args.cluster if kind == "address" else None
        cluster += [f"cluster.kind={kind}", f"cluster.address={json.dumps(address)}"]
    if args.workers is not None:
        cluster.append(f"cluster.workers={args.workers}")
    from .configs import config_file

    # a bad config fails at once, before any cluster starts
    cfg = load_config(config_file(args.config), overrides + cluster)
    from rich.console import Console

    from .campaign import (RESEGMENT_SUMMARY_FILE, SUMMARY_FILE, Campaign, CampaignView, list_runs, list_scans,
                           open_client, summary_table)

    if args.resegment:
        jobs = list_runs(args.scans, overrides, args.out)
        summary_root, summary = Path(args.out or args.scans[0]), RESEGMENT_SUMMARY_FILE
    elif args.out is None:
        raise ConfigError("--out: expected the folder for the results (one subfolder per scan)")
    else:
        jobs = list_scans(args.scans, args.out, config_path=args.config, overrides=overrides)
        summary_root, summary = Path(args.out), SUMMARY_FILE
    campaign = Campaign(jobs, summary_root, cores_per_worker=cfg.cluster.cores_per_worker, summary_file=summary)
    where = cfg.cluster.address or f"{cfg.cluster.workers} {cfg.cluster.kind} worker(s)"
    log.info("campaign of %d %s on %s; results in %s", len(jobs), "runs to resegment" if args.resegment else "scans",
             where, args.out or "each run's resegmented/")
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its start-up chatter is not ours to show
    client, resources, close = open_client(cfg.cluster)
    try:
        with CampaignView(campaign, every_s=cfg.status.log_every_s):
            rows = campaign.run(client, resources=resources)
    finally:
        close()
    Console(width=max(Console().width, 120)).print(summary_table(rows))
    print(f"summary written to {summary_root / summary}")
    failed = [row for row in rows if row["state"] == "failed"]
    if failed:
        print(f"dctstream: {len(failed)} of {len(rows)} scans failed; first: {failed[0]['scan']}: "
              f"{failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_resegment(args) -> int:
    from .resegment import resegment

    r = resegment(args.run_dir, _sets(args), args.out, overwrite=args.overwrite,
                  difspots=not args.no_difspots)
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "none"
    partial = "" if r["finished_scan"] else " (scan still being written: the frames so far)"
    print(f"{r['difspots']} difspots from the sparse scan of {r['frames']} frames{partial} in {r['seconds']:.1f} s, "
          f"written to {r['out_dir']}; rejected: {rejected}")
    return 0


def cmd_tune(args) -> int:
    from .resegment import draw_tune, format_tune, tune

    values = None
    if args.values:
        try:
            values = [float(v) for v in args.values.split(",")]
        except ValueError:
            raise ConfigError(f"--values: expected numbers separated by commas, got {args.values!r}") from None
    if not Path(args.run_dir).is_dir():
        raise InputError(f"{args.run_dir}: not a folder, expected the output folder of a dctstream run (OUT)")
    png = Path(args.png) if args.png else Path(args.run_dir) / "tune.png"
    if png.suffix.lower() != ".png" or png.is_dir() or not png.parent.is_dir():  # said before the sweep
        raise OutputError(f"--png: {png}: expected a .png file in an existing folder")
    result = tune(args.run_dir, args.key, values, _sets(args))
    print(format_tune(result, args.run_dir))
    try:
        draw_tune(result).save(png)
    except OSError as exc:
        raise OutputError(f"--png: {png}: cannot write the picture ({exc.strerror or exc})") from None
    print(f"picture: {png}")
    return 0


def cmd_status(args) -> int:
    from rich.console import Console

    from .status import read_statuses, render, status_line

    if args.follow:
        return _follow_status(args.out_dir, args.interval, lines=args.line or not sys.stdout.isatty())
    snaps = read_statuses(args.out_dir)
    if args.line:
        root = args.out_dir if len(snaps) > 1 else None
        print("\n".join(status_line(snap, root) for snap in snaps))
    else:
        Console().print(render(snaps))
    return 0


def _follow_status(out_dir, interval_s: float, lines: bool = False) -> int:
    """Refresh the view of another process's scans until none is running; ``lines``: a line per scan each
    time it changed, flushed (a log, a pipe: the live panel is drawn only on a terminal)."""
    from rich.console import Console
    from rich.live import Live

    from .status import read_statuses, render, status_line

    snaps = read_statuses(out_dir)
    if lines:
        shown: dict[str, str] = {}
        while True:
            for snap in snaps:
                line = status_line(snap, out_dir if len(snaps) > 1 else None)
                key = str(snap.get("out_dir") or snap.get("source"))  # two runs of one source are two lines
                if shown.get(key) != line:
                    shown[key] = line
                    print(line, flush=True)
            if not any(snap.get("state") in ("starting", "running") for snap in snaps):
                return 0
            time.sleep(interval_s)
            try:
                snaps = read_statuses(out_dir)
            except DctStreamError:
                continue  # between two rewrites
    with Live(render(snaps), console=Console(), refresh_per_second=4) as live:
        while any(snap.get("state") in ("starting", "running") for snap in snaps):
            time.sleep(interval_s)
            try:
                snaps = read_statuses(out_dir)
            except DctStreamError:
                continue  # between two rewrites
            live.update(render(snaps))
    return 0


def cmd_export(args) -> int:
    if args.format == "dct":
        from .dct_table import export_dct

        if args.output:
            _file_to_write(args.output, "export --output")
        paths, n, partial = export_dct(args.out_dir, args.output)
        print(f"wrote {n} difspots to {' and '.join(map(str, paths))} (the DCT difspot table)"
              + (f"; PARTIAL, marked so in both files: {partial}" if partial else ""))
        return 0
    from .export import export_imaged11

    if args.output:
        _file_to_write(args.output, "export --output")
    path, n, partial = export_imaged11(args.out_dir, args.output)
    print(f"wrote {n} peaks to {path} (ImageD11 columnfile)"
          + (f"; PARTIAL, marked so in the file: {partial}" if partial else "")
          + ("; ImageD11's columnfile reader cannot open a file without peaks" if n == 0 else ""))
    return 0


def cmd_watch(args) -> int:
    children = _sets(args)
    if args.filter:
        args.set = [*children, f"watch.scan_filter={json.dumps(args.filter, ensure_ascii=False)}"]
    cfg = _config(args)
    from .daemon import Daemon

    _folder_to_write(cfg.output.dir, "output.dir")

    daemon = Daemon(args.root, cfg, config_path=args.config, overrides=children)
    return daemon.run(max_scans=args.max_scans)


def cmd_config(args) -> int:
    from . import configs

    if args.action == "list":
        for name in configs.names():
            print(f"{name:12s} {configs.packaged_path(name)}")
        return 0
    path = configs.packaged_path(args.name or configs.DEFAULT)
    if path is None:
        from .errors import ConfigError
        raise ConfigError(f"config show: {args.name}: no such packaged config, expected one of "
                          f"{', '.join(configs.names())}")
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def cmd_check(args) -> int:
    from .config import dump_config

    print(dump_config(_config(args)), end="")
    return 0


def cmd_simulate(args) -> int:
    from simulators.dct_scan import simulate_scan

    import shutil

    # checks across arguments (each was checked alone): they wrote a scan of zeros, or without beam, unsaid
    if args.module_gap >= args.size // 2:
        raise ConfigError(f"simulate: --module-gap {args.module_gap}: expected a gap narrower than half the frame "
                          f"(--size {args.size}: under {args.size // 2} px), leaving pixels in the 2 x 2 modules")
    if args.shutter_closed >= args.frames:
        raise ConfigError(f"simulate: --shutter-closed {args.shutter_closed}: expected fewer frames without beam "
                          f"than the scan's (--frames {args.frames})")
    _file_to_write(args.output, "simulate")
    _simulate_target(args.output)
    # the frames are written uncompressed, uint16: a scan that cannot fit stopped only once the disk was full
    need = (args.frames + args.flat_frames) * args.size * args.size * 2
    free = shutil.disk_usage(Path(args.output).parent).free
    if need > free:
        raise OutputError(f"simulate: {args.output}: {args.frames} frames of {args.size} x {args.size} px need "
                          f"{need / 1e9:.3g} GB, its folder has {free / 1e9:.3g} GB free, expected fewer or smaller "
                          "frames (--frames, --size)")
    try:
        truth = simulate_scan(args.output, frames=args.frames, size=args.size, spots=args.spots, seed=args.seed,
                              hot_pixel_fraction=args.hot_pixels, dead_pixel_fraction=args.dead_pixels,
                              module_gap_px=args.module_gap,
                              gain_spread=args.gain_spread, flat_frames=args.flat_frames,
                              shutter_closed_frames=args.shutter_closed, layout=args.layout)
    except MemoryError as exc:  # a traceback before (numpy's _ArrayMemoryError)
        raise InputError(f"simulate: --size {args.size}: frames of {args.size} x {args.size} px do not fit in this "
                         f"machine's memory ({' '.join(str(exc).split())}), expected a smaller --size") from None
    print(f"wrote {args.output}: {args.frames} frames of {args.size} x {args.size} px, {args.spots} spots\n"
          f"  frames: {truth.frames_url}\n  angles: {truth.angles_url}\n  dark:   {truth.dark_url}\n"
          + (f"  flat:   {truth.flat_url}\n" if truth.flat_url else "")
          + f"  truth:  {truth.frames_url.rsplit('/measurement/', 1)[0]}/ground_truth")
    return 0


def cmd_demo(args) -> int:
    from simulators.dct_scan import simulate_scan
    from simulators.evaluate import score
    from simulators.replay_file import replay_hdf5, start_in_process

    from .config import load_config
    from .runner import process_scan
    from .sinks import read_spot_table

    if args.keep:
        _folder_to_write(args.keep, "demo --keep")
    with tempfile.TemporaryDirectory(prefix="dctstream-demo-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        scan = work / "scan.h5"
        print(f"simulating a DCT scan: {args.frames} frames of {args.size} x {args.size} px, "
              f"{args.spots} spots -> {scan}")
        t0 = time.monotonic()
        truth = simulate_scan(str(scan), frames=args.frames, size=args.size, spots=args.spots, seed=args.seed)
        print(f"  simulated in {time.monotonic() - t0:.1f} s")
        live = work / "live.h5"
        print(f"acquiring it again at {args.fps:g} frames/s into {live} (SWMR, as the acquisition writes), "
              f"and processing it while it grows: exact running median over {args.window} frames, "
              "margin normalisation ...")
        acquisition = start_in_process(replay_hdf5, truth.frames_url, str(live), fps=args.fps,
                                       angles_url=truth.angles_url)
        cfg = load_config(None, [f"source.url={live}::/1.1/measurement/marana",
                                 f"source.angles={live}::/1.1/measurement/diffrz",
                                 f"dark.url={truth.dark_url}", f"background.window={args.window}",
                                 "background.normalise=margin", "source.idle_timeout_s=30",
                                 f"output.dir={work / 'out'}"])
        stats = process_scan(cfg, overwrite=True)
        acquisition.join(30)
        print("  " + _summary(stats, cfg.output.dir))
        result = score(truth.spots, read_spot_table(work / "out" / "spots.h5"), direct_beam=stats.direct_beam)
        print(f"against the ground truth ({result['eligible']} of {result['true_spots']} true spots have "
              f"peak >= 5x noise and lie outside the direct beam):\n"
              f"  recall    {result['recall']:.3f} ({result['found']} found)\n"
              f"  precision {result['precision']:.3f} ({result['matched_detections']} of "
              f"{result['detections']} difspots are true spots)\n"
              f"  centroid error (RMS): x {result['rms_x_px']:.3f} px, y {result['rms_y_px']:.3f} px, "
              f"psi {result['rms_frame']:.3f} frames")
        if args.keep:
            print(f"scan and results kept in {work}")
    return 0


def cmd_replay(args) -> int:
    """Play a recorded scan back as an acquisition would produce it."""
    target = args.to
    from .sources.hdf5 import _open

    # the scan first, named as the source of a run would be: a missing file is one line, not a traceback
    h5, dset = _open(args.scan, "replay SCAN")
    with h5:  # its shape only (the whole scan was read to find it there)
        shape = dset.shape
        if len(shape) != 3 or dset.dtype.kind not in "buif":  # a 1-D dataset was "replayed" as frames of one value
            raise InputError(f"replay SCAN: {args.scan}: expected frames (frames, y, x) of numbers, got shape "
                             f"{shape} dtype {dset.dtype}")
    if args.angles is not None:
        h5, angles = _open(args.angles, "replay --angles")
        with h5:
            if angles.ndim != 1 or angles.dtype.kind not in "buif" or angles.shape[0] < shape[0]:
                raise InputError(f"replay --angles: {args.angles}: expected one angle per frame, {shape[0]} numbers "
                                 f"(1-D), got shape {angles.shape} dtype {angles.dtype}")
    if "://" in target:
        import zmq

        from simulators.replay_stream import StreamReplayer

        if not target.startswith(("tcp://", "ipc://")):
            raise InputError(f"replay --to: {target}: unknown address, expected tcp://host:port, ipc://path, "
                             "a file.h5 or a folder")
        try:
            replayer = StreamReplayer(args.scan, protocol=args.protocol, bind=target, fps=args.fps,
                                      encoding=args.encoding, angles_url=args.angles)
        except zmq.ZMQError as exc:
            raise OutputError(f"replay --to: {target}: cannot serve there ({exc}), expected an address "
                              "of this machine with a free port, e.g. tcp://127.0.0.1:9999") from None
        except ValueError as exc:  # what the protocol cannot carry (stream1: no angles)
            raise InputError(f"replay --protocol {args.protocol}: {exc}") from None
        print(f"serving {args.scan} as {args.protocol} on {replayer.endpoint} at {args.fps:g} frames/s "
              "(waiting for a receiver)")
        replayer.start()
        replayer.join()
        replayer.close(flush=True)
    elif target.endswith((".h5", ".hdf5", ".nxs")) or "::" in target:
        import hdf5plugin

        from simulators.replay_file import FRAMES_PATH, replay_hdf5

        path, _, dataset = target.partition("::")
        _file_to_write(path, "replay --to")
        _replay_target(path, [args.scan] + ([args.angles] if args.angles else []))
        n = replay_hdf5(args.scan, path, dataset=dataset or FRAMES_PATH, fps=args.fps, swmr=not args.no_swmr,
                        compression=hdf5plugin.Bitshuffle() if args.bitshuffle else None,
                        angles_url=args.angles)
        print(f"wrote {n} frames to {path}::{dataset or FRAMES_PATH}")
    else:
        from simulators.replay_file import replay_edf

        folder = target.split("*")[0].rstrip("/") or "."
        _folder_to_write(folder, "replay --to")
        n = replay_edf(args.scan, folder, fps=args.fps, angles_url=args.angles)
        print(f"wrote {n} EDF frames to {folder}/")
    return 0


# bench: defaults for the stages, and for --soak a long scan the pipeline keeps up with on 2 cores
_BENCH_DEFAULTS = {"size": 2048, "window": 501, "frames": 600, "fps": 25.0}
_SOAK_DEFAULTS = {"size": 128, "window": 101, "frames": 14400, "fps": 12.0}


def cmd_bench(args) -> int:
    if args.campaign:
        return _bench_campaign(args)
    from .bench import BenchOptions, main as bench_main

    sizes = {k: getattr(args, k) for k in ("size", "window", "frames", "fps")}
    sizes = {k: (_SOAK_DEFAULTS if args.soak else _BENCH_DEFAULTS)[k] if v is None else v for k, v in sizes.items()}
    from .config import frames_per_batch

    batch = args.batch or frames_per_batch("auto", (sizes["size"], sizes["size"]))
    opts = BenchOptions(**sizes, mode=args.mode, stride=args.stride, batch=batch, seed=args.seed,
                        pipeline=not args.no_pipeline, baselines=not args.no_baselines, sources=args.sources,
                        soak=args.soak, hard=args.hard)
    print(bench_main(opts, as_json=args.json))
    return 0


def cmd_validate(args) -> int:
    from simulators.validation import main as validate

    return validate(args.options, prog="dctstream validate")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"dctstream: error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _odd_window(text: str) -> int:
    value = _count(3)(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd integer >= 3, got {value}")
    return value


def _number(low: float, high: float = float("inf")):
    """An argparse type: a finite number in [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value <= high) or value != value:
            what = f"in [{low:g}, {high:g}]" if high != float("inf") else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a number {what}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _bench_campaign(args) -> int:
    from .bench import bench_campaign, format_campaign

    workers = args.workers
    with tempfile.TemporaryDirectory(prefix="dctstream-bench-campaign-") as tmp:
        report = bench_campaign(Path(tmp), scans=args.scans, frames=args.frames or 200, size=args.size or 128,
                                window=args.window or 51, workers=workers, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else format_campaign(report))
    return 0


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected worker counts >= 1 separated by commas, e.g. 1,2,4, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dctstream", description=(
        "Live background correction and difspot segmentation for Diffraction Contrast Tomography scans."))
    parser.add_argument("--version", action="version", version=f"dctstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage's decisions")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p):
        p.add_argument("config", nargs="?", help="YAML configuration file, or the name of a packaged one "
                       "(dctstream config list); the packaged default when omitted")
        p.add_argument("--source", help="scan URL, path/to/scan.h5::/dataset (overrides source.url)")
        p.add_argument("--dark", help="dark URL (overrides dark.url)")
        p.add_argument("--out", help="output folder (overrides output.dir)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any key, e.g. --set background.window=101 (repeatable)")

    p = sub.add_parser("run", help="process a scan into difspots")
    with_config(p)
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    p.add_argument("--split", type=_count(2), metavar="N",
                   help="a recorded scan in N chunks along psi on a Dask cluster, results equal to one process")
    p.add_argument("--cluster", metavar="KIND",
                   help="with --split: local, slurm, pbs, sge, lsf or a scheduler tcp://HOST:PORT (cluster.kind)")
    p.add_argument("--workers", type=_count(1), help="with --split: number of workers (cluster.workers)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resegment", help="segment a run again from its sparse corrected scan, with other "
                       "segmentation settings (seconds, not a full run)")
    p.add_argument("run_dir", help="the output folder of a run (holds corrected.h5, export.format: sparse)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a segmentation.* (or quicklook.*) key, e.g. --set segmentation.seed_sigma=8 (repeatable)")
    p.add_argument("--out", help="folder for the new spots.h5, difspots and quick-look (default RUN_DIR/resegmented)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in that folder")
    p.add_argument("--no-difspots", action="store_true",
                   help="spots.h5 and quick-look only, no difspot files (faster: writing them takes longest)")
    p.set_defaults(func=cmd_resegment)

    p = sub.add_parser("tune", help="sweep a segmentation threshold over the sparse scan of a run: spots per "
                       "value, a picture and the suggested value")
    p.add_argument("run_dir", help="the output folder of a run (finished or still running)")
    p.add_argument("--key", help="segmentation key to sweep (default seed_sigma, or seed_threshold when that is "
                   "a number), e.g. grow_ratio, grow_low")
    p.add_argument("--values", help="values to try, comma-separated (default: from the lowest the cut allows "
                   "to twice the run's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="other segmentation.* keys to hold")
    p.add_argument("--png", help="picture to write (default RUN_DIR/tune.png)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("watch", help="process every new scan that appears under a folder, as a daemon")
    p.add_argument("root", help="the acquisition tree to watch (Bliss: the data folder holding proposals), or "
                   "redis://host:port: the scans Bliss publishes through blissdata, one after the other")
    p.add_argument("--config", dest="config", help="YAML configuration file (watch and processing settings)")
    p.add_argument("--out", help="folder for the results, one subfolder per scan (overrides output.dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any key (repeatable)")
    p.add_argument("--filter", action="append", metavar="GLOB|KEY=GLOB",
                   help="redis://: only scans whose name matches GLOB, or whose info or identity KEY does "
                   "(repeatable, all must match; overrides watch.scan_filter)")
    p.add_argument("--max-scans", type=_count(1), default=None,
                   help="stop after this many scans were processed (for tests and trials)")
    p.set_defaults(func=cmd_watch, source=None, dark=None)

    p = sub.add_parser("campaign", help="process many scans on a Dask cluster (local, SLURM, ...), one task each")
    p.add_argument("scans", nargs="+", metavar="SCAN",
                   help="file.h5::/dataset, file.h5 (its scans, found as watch finds them), a quoted glob, or a "
                        "YAML listing of scans with their own settings")
    p.add_argument("--config", help="YAML configuration file: processing settings and the cluster section")
    p.add_argument("--out", help="folder for the results, one subfolder per scan (with --resegment: default "
                   "RUN_DIR/resegmented)")
    p.add_argument("--resegment", action="store_true",
                   help="SCANs are runs' output folders, or folders of them (a campaign's --out): segment each again "
                        "from its sparse scan with the --set segmentation.* keys, as dctstream resegment does")
    p.add_argument("--cluster", metavar="KIND",
                   help="local, slurm, pbs, sge, lsf or a scheduler tcp://HOST:PORT (overrides cluster.kind)")
    p.add_argument("--workers", type=int, help="number of workers, one scan each at a time (cluster.workers)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any key (repeatable)")
    p.set_defaults(func=cmd_campaign)

    p = sub.add_parser("status", help="show the status of a scan being processed (by any process) or processed")
    p.add_argument("out_dir", help="the scan's output folder, or a folder of them (dctstream watch's output.dir)")
    p.add_argument("-f", "--follow", action="store_true", help="keep refreshing until the scan is over")
    p.add_argument("--interval", type=_number(0.01), default=1.0, help="seconds between refreshes with --follow")
    p.add_argument("--line", action="store_true", help="one line of text instead of the panel")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write the spot table for indexing programs")
    p.add_argument("out_dir", help="the output folder of a run (holds spots.h5)")
    p.add_argument("--format", choices=["imaged11", "dct"], default="imaged11",
                   help="imaged11: an ImageD11 columnfile, OUT_DIR/spots.flt; dct: the legacy DCT difspot table, "
                        "OUT_DIR/difspot.h5 and difspot.csv (also written at the end of every run)")
    p.add_argument("--output", help="file to write (default OUT_DIR/spots.flt, OUT_DIR/difspot.h5)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="validate a configuration and print the effective one")
    with_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("config", help="list the packaged configurations, or print one")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="show: the packaged config to print (default: default)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("simulate", help="write a simulated DCT scan with ground truth")
    p.add_argument("output", help="HDF5 file to write")
    p.add_argument("--frames", type=_count(8), default=720)
    p.add_argument("--size", type=_count(MIN_SIM_SIZE), default=512, help="frame width and height, pixels")
    p.add_argument("--spots", type=_count(0), default=400)
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--hot-pixels", type=_number(0, 1), default=1e-4, metavar="FRACTION",
                   help="pixels 1000-4000 counts above the rest, in frames and darks")
    p.add_argument("--dead-pixels", type=_number(0, 1), default=0.0, metavar="FRACTION",
                   help="pixels that always read 0")
    p.add_argument("--module-gap", type=_count(0), default=0, metavar="PX", help="gap between the 2 x 2 modules")
    p.add_argument("--gain-spread", type=_number(0, 0.99), default=0.0, metavar="S",
                   help="gain per module in [1-S, 1+S]")
    p.add_argument("--flat-frames", type=_count(0), default=0, metavar="N", help="add a flat-field scan at /3.1")
    p.add_argument("--shutter-closed", type=_count(0), default=0, metavar="N", help="first N frames without beam")
    p.add_argument("--layout", choices=["scan", "dct"], default="scan",
                   help="scan: the scan at /1.1, its dark at /2.1; dct: a DCT dataset file (references /1.1 and "
                        "/3.1, the rotation scan /2.1, the dark /4.1), run with --source FILE.h5")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", help="play a recorded scan back as a growing file, a detector stream or EDF files")
    p.add_argument("scan", help="the recorded frames, path/to/scan.h5::/dataset")
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="out.h5[::/dataset] (a growing HDF5 file), tcp://host:port (a stream server), "
                        "or a folder (one EDF file per frame)")
    p.add_argument("--fps", type=_number(0), default=10.0, help="frames per second, 0 = as fast as possible")
    p.add_argument("--angles", help="psi of each frame, path/to/scan.h5::/dataset")
    p.add_argument("--protocol", choices=["stream1", "stream2"], default="stream1", help="for tcp:// targets")
    p.add_argument("--encoding", help="stream frame encoding (default: the detector's own)")
    p.add_argument("--no-swmr", action="store_true", help="write the HDF5 file without SWMR, held open")
    p.add_argument("--bitshuffle", action="store_true", help="compress the HDF5 frames with bitshuffle/LZ4")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("bench", help="measure frames/s, latency and memory of each stage on generated frames")
    p.add_argument("--size", type=_count(MIN_SIM_SIZE), help="frame width and height, pixels (2048; 128 with --soak)")
    p.add_argument("--window", type=_odd_window, help="background.window (501; 101 with --soak)")
    p.add_argument("--frames", type=_count(1),
                   help="frames through the pipeline after the first window (600; with --soak, all: 14400)")
    p.add_argument("--mode", choices=["exact", "block"], default="exact")
    p.add_argument("--stride", type=_count(1), default=50)
    p.add_argument("--batch", type=_count(1), default=None,
                   help="background.batch_frames (auto, the default: 8 at 1024 x 1024 px and up, else 1)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--no-pipeline", action="store_true", help="time the kernels only")
    p.add_argument("--no-baselines", action="store_true", help="skip np.partition and bottleneck")
    p.add_argument("--sources", action="store_true",
                   help="instead: latency of each live source, from a frame written to delivered, at 10 and 50 fps")
    p.add_argument("--soak", action="store_true",
                   help="instead: a long scan at acquisition speed (--fps), sampling memory and backlog")
    p.add_argument("--hard", action="store_true",
                   help="instead: the pipeline at default settings on a steady scan and on a hard one (decaying, "
                        "oscillating source, a +3%% top-up step, a brighter glow), frames/s of each and their ratio")
    p.add_argument("--fps", type=_number(0.01), help="acquisition rate of --soak, frames/s (12: what 2 shared cores keep "
                   "up with at 128 x 128 px and about 6 difspots a frame)")
    p.add_argument("--campaign", action="store_true",
                   help="instead: frames/s of `dctstream campaign` on a LocalCluster against its worker count "
                        "(--scans copies of a --frames x --size scan; defaults 6 x 200 x 128 px, window 51)")
    p.add_argument("--scans", type=int, default=6, help="with --campaign: scans in the campaign")
    p.add_argument("--workers", default=(1, 2), type=_counts, help="with --campaign: worker counts to time, e.g. 1,2,4")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="simulate a small scan, process it and score it against the truth")
    p.add_argument("--frames", type=_count(5), default=360)
    p.add_argument("--size", type=_count(MIN_SIM_SIZE), default=256)
    p.add_argument("--spots", type=_count(0), default=150)
    p.add_argument("--window", type=_odd_window, default=101)
    p.add_argument("--fps", type=_number(0.01), default=50.0, help="acquisition rate of the replayed scan")
    p.add_argument("--seed", type=_count(0), default=1)
    p.add_argument("--keep", metavar="DIR", help="keep the scan and results in DIR")
    p.set_defaults(func=cmd_demo)

    # Its options belong to simulators.validation and are passed on untouched (no option starts with "+").
    p = sub.add_parser("validate", add_help=False, prefix_chars="+", help=(
        "score dctstream at default settings and ImageD11 on hard simulated scans (minutes; see validate --help)"))
    p.add_argument("options", nargs="*")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # tune --values -1,0,5: a list that starts negative, not an option
        if arg == "--values" and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            argv[i:i + 2] = [f"--values={argv[i + 1]}"]
            break
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from . import NUMBA_CACHE_NOTE

    if NUMBA_CACHE_NOTE:
        log.info("%s", NUMBA_CACHE_NOTE)
    try:
        return args.func(args)
    except DctStreamError as exc:
        print(f"dctstream: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dctstream: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # a path the command was given (or derived from one) that cannot be read or written, a full disk:
        # the user's to fix, said in one line
        print(f"dctstream: error: {_os_error(exc)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError) -> str:
    if exc.filename is None:
        return " ".join(str(exc).split())
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"


def _file_to_write(path: str, what: str) -> None:
    """Refuse, in one line, a file that cannot be created where asked."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise OutputError(f"{what}: {path}: is a folder, expected a file to write")
    if not folder.is_dir():
        raise OutputError(f"{what}: {path}: no folder {folder}, expected an existing folder to write into")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: {path}: the folder {folder} is not writable")


def _replay_target(path: str, inputs: list[str]) -> None:
    """Refuse a replay's target file (created anew, whatever it held) that is one of its inputs or an HDF5 file
    holding other data than an earlier replay: a scan file named by mistake was emptied, unsaid."""
    from .sources.hdf5 import path_of

    target = Path(path)
    for url in inputs:
        source = Path(path_of(url))
        if target.is_file() and source.is_file() and os.path.samefile(source, target):
            raise OutputError(f"replay --to: {path}: is the file {url} is read from, expected another file to write")

    def replayed(f) -> bool:
        titles = [f[name]["title"][()] for name in f if "title" in f[name]]
        return bool(titles) and all(t in (b"replayed scan", "replayed scan") for t in titles)

    _refuse_other_h5(path, "replay --to", "a replay", "", "replay", replayed)


def _simulate_target(path: str) -> None:
    """Refuse a file to simulate into (created anew) that is HDF5 holding other data than a simulated scan (its
    ``ground_truth``): a recorded scan named by mistake was replaced, unsaid."""
    _refuse_other_h5(path, "simulate", "a simulated scan", ", no ground_truth", "simulation",
                     lambda f: any("ground_truth" in f[name] for name in f))


def _refuse_other_h5(path: str, what: str, other_than: str, note: str, earlier: str, ours) -> None:
    """`OutputError` when ``path``, a file the command makes anew, is an HDF5 file holding data that ``ours`` (of
    its groups) does not take for an earlier one of its own, which it replaces; not HDF5: nothing of it is kept."""
    import h5py

    if not Path(path).is_file():
        return
    try:
        with h5py.File(path, "r", locking=False) as f:
            groups = {name: f[name] for name in f if isinstance(f[name], h5py.Group)}
            if list(f) and not ours(groups):
                raise OutputError(f"{what}: {path}: exists and holds other data than {other_than} ("
                                  f"{', '.join(sorted(f)[:5])}{note}), expected a new file or an earlier {earlier}'s, "
                                  "which it replaces: remove it first if it is to go")
    except OSError:
        return  # not HDF5: nothing of it is read or kept


def _folder_to_write(path: str, what: str) -> None:
    """Refuse, in one line, a folder that cannot be created or written."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what}: {path}: is a file, expected a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what}: {path}: {existing} is a file, expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: {path}: {existing} is not writable")


if __name__ == "__main__":
    sys.exit(main())
