"""``dctstream bench``: throughput, latency and memory of each stage, measured on generated frames.

Every figure is measured in the same run, on the same data and thread count,
beside baselines (``np.partition`` per block, ``bottleneck.move_median`` when
installed), so that ratios mean something on a shared, noisy machine.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numba
import numpy as np

from .atomic import output_error
from .background.kernels import HistogramWindow, median_filter
from .errors import OutputError
from .sources.base import FrameSource

# The baselines run on the whole frames, a block of this many rows per task (memory: a block of the
# window's frames as float32 at a time per thread).
BASELINE_ROWS = 64


@dataclass(frozen=True)
class BenchOptions:
    size: int = 2048
    window: int = 501
    frames: int = 600  # frames through the whole pipeline, beyond the first window
    mode: str = "exact"
    stride: int = 50
    batch: int = 8
    seed: int = 0
    pipeline: bool = True
    baselines: bool = True
    sources: bool = False  # time each live source instead of the stages
    soak: bool = False  # instead: a long scan at acquisition speed, sampling memory and backlog
    fps: float = 25.0  # acquisition rate of the soak
    hard: bool = False  # instead: the pipeline at default settings on a steady scan and on a hard one


class SyntheticScan:
    """Cheap DCT-like uint16 frames: offsets, glow, a bright beam, a drifting source, spots and noise.

    Far faster to make than the simulator's (no Poisson draw per pixel), so a
    bench at 2048 x 2048 spends its time in dctstream, not in making data.
    """

    # source: "drifting" (oscillates 5% with a 97-frame period and decays 10% over 3600 frames), "steady",
    # or "hard": drifting, with a +3% top-up step at frame TOP_UP_FRAME and a glow twice as bright
    TOP_UP_FRAME = 800

    def __init__(self, size: int, seed: int = 0, source: str = "drifting"):
        rng = np.random.default_rng(seed)
        self.source = source
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        glow = 600 if source == "hard" else 300
        self.model = (glow * np.exp(-np.hypot(yy - size / 2, xx - size / 2) / (size / 6))).astype(np.float32)
        self.beam = (abs(yy - size / 2) < size / 8) & (abs(xx - size / 2) < size / 5)
        self.model[self.beam] = 25000
        self.offset = np.where(yy < size / 2, 100, 104).astype(np.float32) + np.where(xx < size / 2, 0, 3)
        self.noise_scale = np.sqrt(self.model + 6)
        self.size = size
        self.seed = seed
        n_spots = 40
        self.spot_xy = rng.integers(8, size - 8, (4096, 2))
        self.spot_xy = self.spot_xy[~self.beam[self.spot_xy[:, 1], self.spot_xy[:, 0]]][:n_spots * 64]
        g = np.exp(-(np.arange(-3, 4)[:, None] ** 2 + np.arange(-3, 4)[None, :] ** 2) / 3.0)
        self.spot = (400 * g).astype(np.float32)

    def frame(self, k: int) -> np.ndarray:
        intensity = 1.0
        if self.source != "steady":
            intensity = (1 + 0.05 * np.sin(2 * np.pi * k / 97)) * (1 - 0.1 * k / 3600)
        if self.source == "hard" and k >= self.TOP_UP_FRAME:
            intensity *= 1.03
        noise = np.random.default_rng((self.seed, k)).standard_normal(self.model.shape, dtype=np.float32)
        img = self.model * np.float32(intensity) + self.offset + noise * self.noise_scale
        for x, y in self.spot_xy[(k * 7) % len(self.spot_xy):][:20]:
            img[y - 3:y + 4, x - 3:x + 4] += self.spot
        return np.clip(img, 0, 65535).astype(np.uint16)


def _timed(fn, *args, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn(*args)
    return (time.perf_counter() - start) / repeat, result


def bench_running_median(scan: SyntheticScan, opts: BenchOptions, threads: int) -> dict:
    """frames/s of the histogram running median, and of the baselines on the same frames."""
    numba.set_num_threads(threads)
    w, batch = opts.window, opts.batch
    steps = max(4 * batch, 64)
    ring = np.empty((w + batch, opts.size, opts.size), np.uint16)
    for f in range(w):
        ring[f % len(ring)] = scan.frame(f)
    init_s, hist = _timed(HistogramWindow, ring, 0, w)
    out = np.empty((batch, opts.size, opts.size), np.uint16)
    f, spent = w, 0.0
    while f < w + steps:
        for g in range(f, f + batch):
            ring[g % len(ring)] = scan.frame(g)
        emit = np.array([opts.mode == "exact" or (g - w) % opts.stride == 0 for g in range(f, f + batch)])
        dt, _ = _timed(hist.slide, batch, emit, out)
        spent += dt
        f += batch
    result = {"threads": threads, "init_s": init_s, "frames_per_s": steps / spent,
              "rebuilds_per_frame": float(hist.rebuilds.sum()) / steps}
    if not opts.baselines:
        return result
    result.update(bench_baselines(ring, f - len(ring), opts, threads))
    return result


def bench_baselines(ring: np.ndarray, first: int, opts: BenchOptions, threads: int) -> dict:
    """frames/s of ``np.partition`` (one median per block of ``stride`` frames, as the legacy pipeline) and of
    ``bottleneck.move_median`` (when installed) on the ring's frames ``first`` .. ``first + len(ring) - 1``,
    whole frames, a block of rows per task on ``threads`` threads: measured, nothing projected."""
    from concurrent.futures import ThreadPoolExecutor

    w, cap, ny = opts.window, len(ring), ring.shape[1]
    blocks = [slice(y, min(y + BASELINE_ROWS, ny)) for y in range(0, ny, BASELINE_ROWS)]

    def frames(rows: slice, n: int) -> np.ndarray:
        return np.stack([ring[(first + g) % cap, rows] for g in range(n)])

    def timed_blocks(task) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(task, blocks))
        return time.perf_counter() - start

    dt = timed_blocks(lambda rows: np.partition(frames(rows, w), w // 2, axis=0))
    result = {"baseline_threads": threads, "partition_block_frames_per_s": opts.stride / dt,
              "partition_exact_frames_per_s": 1 / dt}
    try:
        import bottleneck
    except ImportError:
        result["bottleneck_frames_per_s"] = None
        return result

    def move_median(rows: slice):
        # its best case: float32, pixel-major, the whole window plus the new frames at once
        stack = frames(rows, cap).astype(np.float32)
        return bottleneck.move_median(np.ascontiguousarray(stack.reshape(cap, -1).T), w, None, 1)

    result["bottleneck_frames_per_s"] = cap / timed_blocks(move_median)
    return result


def bench_filter(scan: SyntheticScan, opts: BenchOptions) -> dict:
    img = scan.frame(0).astype(np.float32)
    out = np.empty_like(img)
    median_filter(img, 3, out)
    dt, _ = _timed(median_filter, img, 3, out, repeat=10)
    return {"median_filter_3x3_frames_per_s": 1 / dt}


def _write_scan(path: Path, scan: SyntheticScan, n: int) -> str:
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset("/1.1/measurement/frames", (n, scan.size, scan.size), np.uint16,
                                 chunks=(1, scan.size, scan.size))
        for k in range(n):
            dset[k] = scan.frame(k)
        h5["/1.1/end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{path}::/1.1/measurement/frames"


def _written_apart(path: Path, size: int, seed: int, source: str, n: int) -> str:
    """`_write_scan` of a `SyntheticScan` made in a child process: the memory it takes (the scan's model
    maps, 64 MiB at 2048 x 2048) and leaves to the allocator is not counted in this process's peak, which is
    then the pipeline's own."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failed = context.SimpleQueue()
    process = context.Process(target=_write_synthetic, args=(path, size, seed, source, n, failed))
    process.start()
    process.join()
    if process.exitcode != 0:
        why = failed.get() if not failed.empty() else None
        if why is not None:  # a full disk: one line naming the file, not the child's traceback
            mb = n * size * size * 2 / 1e6
            raise OutputError(f"{why} for the bench scan ({n} frames of {size} x {size} uint16, {mb:,.1f} MB; "
                              "TMPDIR chooses its folder)")
        raise RuntimeError(f"{path}: writing the bench scan failed (exit code {process.exitcode})")
    return f"{path}::/1.1/measurement/frames"


def _write_synthetic(path: Path, size: int, seed: int, source: str, n: int, failed) -> None:
    try:
        _write_scan(path, SyntheticScan(size, seed, source), n)
    except (OSError, RuntimeError) as exc:  # h5py reports a failed write as either
        failed.put(str(output_error(path, exc, resumable=False)))
        os._exit(1)  # a forked child: no cleanup of the parent's state


def bench_pipeline(opts: BenchOptions, workdir: Path, source: str = "drifting", resegment: bool = True) -> dict:
    from .config import load_config
    from .pipeline import Pipeline

    n = opts.window + opts.frames
    t0 = time.perf_counter()
    url = _written_apart(workdir / "bench.h5", opts.size, opts.seed, source, n)
    written_s = time.perf_counter() - t0
    cfg = load_config(None, [f"source.url={url}", f"background.window={opts.window}",
                             f"background.mode={opts.mode}", f"background.stride={opts.stride}",
                             f"background.batch_frames={opts.batch}", f"output.dir={workdir / 'out'}"])
    pipeline = Pipeline(cfg, overwrite=True)
    ticks = []  # seconds from the start to the end of each frame's push, and to the run's end
    behind = []  # frames handed to the background stage whose segmentation is not done: the latency in frames

    def tick(stats):
        ticks.append(time.perf_counter() - t0)
        behind.append(stats.frames_read - stats.backlog_frames - stats.frames_segmented)

    t0, cpu0 = time.perf_counter(), time.process_time()
    stats = pipeline.run(progress=tick)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    push_s = np.diff(ticks, prepend=0.0)  # each frame's push, the time since the one before
    steady = np.array(push_s[opts.window + 1:-1]) if len(push_s) > opts.window + 2 else np.array(push_s)
    ring_bytes = pipeline.background.ring.data.nbytes
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    resegmented = bench_resegment(workdir / "out", workdir / "resegmented", wall, opts.size,
                                  stats.sparse_fill_fraction) if resegment else None
    return {
        "frames": n,
        "write_input_s": written_s,
        "wall_s": wall,
        "frames_per_s": n / wall,
        "steady_frames_per_s": 1 / float(np.mean(steady)) if steady.size else None,
        "phases": _phases(ticks, n, opts.window),
        "per_frame_s_p50": float(np.median(steady)) if steady.size else None,
        "per_frame_s_p99": float(np.percentile(steady, 99)) if steady.size else None,
        # the stages' threads share the cores: where all of them are busy, the CPU a frame bounds the rate
        "cpu_ms_per_frame": 1000 * cpu / n,
        "cpu_busy": cpu / wall / (os.cpu_count() or 1),
        "stage_frames_per_s": {k: n / v for k, v in stats.stage_s.items() if v > 0},
        "stage_ms_per_frame": {k: 1000 * v / n for k, v in stats.stage_s.items()},
        # the stages run on their own threads, joined by bounded queues: the slowest one sets the rate
        "bound_by": max(stats.stage_s, key=stats.stage_s.get) if stats.stage_s else None,
        "difspots": stats.difspots_written,
        "rejected": dict(stats.rejected),
        "flood_frames": stats.flood_frames_total,
        "noise_sigma_range": stats.noise_sigma_range,
        # measured, after the first window: frames pushed but not yet segmented, median
        "latency_frames": int(np.median(behind[opts.window + 1:-1])) if len(behind) > opts.window + 2 else None,
        # what the background stage alone holds back (the first frame of a block waits for its centre too)
        "latency_frames_background": opts.window // 2 + opts.batch - 1 + (opts.stride // 2 if opts.mode == "block"
                                                                          else 0),
        "peak_rss_gib": peak_rss_gib,
        "ring_gib": ring_bytes / 2**30,
        "resegment": resegmented,
    }


def _phases(ticks: list[float], n: int, window: int) -> dict | None:
    """Where a run of ``n`` frames spent its time, from the seconds at which each frame's push returned (and the
    run ended): the first window read into the ring, nothing segmented yet; the push that completes it, which
    corrects and segments the first half-window's frames (one median); the frames that slide it; the last
    half-window's, corrected and segmented once the scan has ended. Each to within a few frames: a push returns
    once its frames are handed to the segmenting thread, which holds one or two more."""
    if n <= window or len(ticks) < n + 1:
        return None
    filled, first_half, slid = ticks[window - 2], ticks[window - 1], ticks[n - 1]
    return {"first_window_s": filled, "first_window_frames": window - 1,
            "first_half_s": first_half - filled, "first_half_frames": window // 2 + 1,
            "sliding_s": slid - first_half, "sliding_frames": n - window,
            "last_half_s": ticks[n] - slid, "last_half_frames": window // 2}


def bench_resegment(run_dir: Path, out: Path, run_s: float, size: int, fill_fraction: float | None) -> dict:
    """``dctstream resegment`` of the run just benched, same settings (no quick-look pictures, which the
    benched run does not draw either): its time against the run's, and the sparse scan's size against the
    raw frames'."""
    from .resegment import SPARSE_FILE, resegment

    settings = ("quicklook.enabled=false",)
    t0, cpu0 = time.perf_counter(), _cpu_s()
    summary = resegment(run_dir, settings, out)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    t0, cpu0 = time.perf_counter(), _cpu_s()
    table_only = resegment(run_dir, settings, out.with_name(out.name + "_table"), difspots=False)
    table_s, table_cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    with h5py.File(run_dir / SPARSE_FILE, "r") as h5:
        group = h5["1.1"]
        frames = max(int(group.attrs["nframes"]), 1)
        # the unfiltered values (spots are measured with them) and the level map where the run has them
        pixels = sum(group[n].id.get_storage_size() for n in ("row", "col", "intensity", "unfiltered", "nnz")
                     if n in group) / frames
        maps = sum(group[n].id.get_storage_size() for n in ("cut", "noise_sigma", "level") if n in group) / frames
    return {"frames": summary["frames"], "wall_s": wall, "frames_per_s": summary["frames"] / wall,
            "speedup": run_s / wall, "difspots": summary["difspots"], "cpu_s": cpu,
            "table_only_s": table_s, "table_only_speedup": run_s / table_s, "table_only_difspots": table_only["difspots"],
            "table_only_cpu_s": table_cpu,
            "sparse_bytes_per_frame": pixels + maps, "sparse_map_bytes_per_frame": maps,
            "raw_frame_bytes": size * size * 2, "sparse_fill_fraction": fill_fraction}


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (resegment's second process): on a
    machine shared with other jobs, what a wall time cannot say."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def bench_hard(opts: BenchOptions, workdir: Path) -> dict:
    """The whole pipeline at default settings on a steady scan and on a hard one (decaying, oscillating
    source, a top-up step, a brighter glow) of the same size, frames and spots: the hard scan must not
    cost the run its speed (noise seeds flooding the segmenter)."""
    out = {}
    for source in ("steady", "hard"):
        with tempfile.TemporaryDirectory(prefix=f"dctstream-bench-{source}-", dir=workdir) as tmp:
            out[source] = bench_pipeline(opts, Path(tmp), source, resegment=False)
    out["hard_over_steady_fps"] = out["hard"]["frames_per_s"] / out["steady"]["frames_per_s"]
    return out


def run_bench(opts: BenchOptions) -> dict:
    cores = os.cpu_count() or 1
    if opts.hard:
        with tempfile.TemporaryDirectory(prefix="dctstream-hard-") as tmp:
            return {"options": opts.__dict__, "cores": cores, "hard": bench_hard(opts, Path(tmp))}
    if opts.soak:
        with tempfile.TemporaryDirectory(prefix="dctstream-soak-") as tmp:
            return {"options": opts.__dict__, "cores": cores,
                    "soak": bench_soak(SyntheticScan(opts.size, opts.seed), opts, Path(tmp))}
    if opts.sources:
        with tempfile.TemporaryDirectory(prefix="dctstream-bench-") as tmp:
            return {"options": opts.__dict__, "cores": cores,
                    "sources": bench_sources(SyntheticScan(opts.size, opts.seed), Path(tmp))}
    report = {"options": opts.__dict__, "cores": cores, "running_median": []}
    if opts.pipeline:  # first, before this process makes frames, so that its peak memory is the pipeline's own
        with tempfile.TemporaryDirectory(prefix="dctstream-bench-") as tmp:
            report["pipeline"] = bench_pipeline(opts, Path(tmp))
    scan = SyntheticScan(opts.size, opts.seed)
    for threads in sorted({1, cores}):
        report["running_median"].append(bench_running_median(scan, opts, threads))
    numba.set_num_threads(cores)
    report.update(bench_filter(scan, opts))
    return report


def format_report(report: dict) -> str:
    o = report["options"]
    if "soak" in report:
        return format_soak(report)
    if "hard" in report:
        h = report["hard"]
        lines = [f"dctstream bench --hard: the whole pipeline at default settings, {o['size']} x {o['size']} uint16, "
                 f"window {o['window']}, {h['steady']['frames']} frames, {report['cores']} cores", "",
                 f"{'scan':8s} {'frames/s':>9s} {'after 1st window':>17s} {'difspots':>9s} {'flooded frames':>15s}  "
                 "noise (min..max)  rejected"]
        for name in ("steady", "hard"):
            r = h[name]
            noise = r["noise_sigma_range"] or (float("nan"), float("nan"))
            lines.append(f"{name:8s} {r['frames_per_s']:9.1f} {r['steady_frames_per_s']:17.1f} {r['difspots']:9d} "
                         f"{r['flood_frames']:15d}  {noise[0]:.2f}..{noise[1]:.2f}  {r['rejected']}")
        lines.append(f"hard / steady frames/s: {h['hard_over_steady_fps']:.2f}")
        return "\n".join(lines)
    if "sources" in report:
        lines = [f"dctstream bench --sources: {o['size']} x {o['size']} uint16 frames, written by another "
                 "program; latency from written to delivered", "",
                 f"{'source':28s} {'median ms':>10s} {'p99 ms':>8s} {'frames':>7s}"]
        lines += [f"{name:28s} {r['median_ms']:10.1f} {r['p99_ms']:8.1f} {r['frames']:7d}"
                  for name, r in report["sources"].items()]
        return "\n".join(lines)
    lines = [f"dctstream bench: {o['size']} x {o['size']} uint16, window {o['window']}, mode {o['mode']}"
             + (f" (stride {o['stride']})" if o["mode"] == "block" else "")
             + f", batch {o['batch']}, {report['cores']} cores", "",
             "running median (frames/s)    dctstream  np.partition/block  bottleneck  ratio to bottleneck"]
    for r in report["running_median"]:
        bn = r.get("bottleneck_frames_per_s")
        part = r.get("partition_block_frames_per_s" if o["mode"] == "block" else "partition_exact_frames_per_s")
        lines.append(f"  {r['threads']} thread(s)               {r['frames_per_s']:9.1f}  "
                     f"{part if part is not None else float('nan'):18.2f}  "
                     f"{bn if bn is not None else float('nan'):10.2f}  "
                     + (f"{r['frames_per_s'] / bn:.1f}x" if bn else "n/a (--no-baselines)" if not o["baselines"]
                        else "n/a (pip install bottleneck)"))
    r = report["running_median"][-1]
    lines.append(f"  first window: {r['init_s']:.1f} s; out-of-bins rebuilds: {r['rebuilds_per_frame']:.0f} px/frame")
    lines.append(f"3x3 median filter: {report['median_filter_3x3_frames_per_s']:.0f} frames/s")
    p = report.get("pipeline")
    window_gib = o["window"] * o["size"] ** 2 * 2 / 2**30  # uint16 frames
    if p:
        lines += ["", f"whole pipeline, HDF5 file -> difspots, {p['frames']} frames: "
                      f"{p['frames_per_s']:.1f} frames/s overall, {p['steady_frames_per_s']:.1f} frames/s "
                      f"after the first window",
                  *format_phases(p.get("phases")),
                  *format_stages(p),
                  f"  CPU: {p['cpu_ms_per_frame']:.0f} ms a frame, all threads: "
                  f"{p['cpu_ms_per_frame'] / report['cores']:.0f} ms on each of the {report['cores']} cores against "
                  f"{1000 * p['wall_s'] / p['frames']:.0f} ms a frame, the cores {100 * p['cpu_busy']:.0f} % busy",
                  f"  per frame: p50 {p['per_frame_s_p50'] * 1000:.0f} ms, p99 {p['per_frame_s_p99'] * 1000:.0f} ms; "
                  f"latency {p['latency_frames']} frames measured "
                  f"({p['latency_frames'] / p['steady_frames_per_s']:.1f} s at that rate; the background stage "
                  f"holds back {p['latency_frames_background']})",
                  f"  memory: peak {p['peak_rss_gib']:.2f} GiB resident, {p['peak_rss_gib'] / window_gib:.2f}x the "
                  f"{window_gib:.2f} GiB of a window of raw frames (the ring holds {p['ring_gib']:.2f}); "
                  f"{p['difspots']} difspots"]
        r = p.get("resegment")
        if r:
            lines += [f"resegment from the sparse scan, same settings: {r['wall_s']:.1f} s for {r['frames']} frames "
                      f"({r['frames_per_s']:.1f} frames/s), {r['speedup']:.1f}x faster than the run; "
                      f"{r['difspots']} difspots; {r['cpu_s']:.1f} s of CPU (a second process, if any, included)",
                      f"  spots.h5 only (--no-difspots): {r['table_only_s']:.1f} s, "
                      f"{r['table_only_speedup']:.1f}x faster than the run; {r['table_only_cpu_s']:.1f} s of CPU",
                      f"  sparse scan: {r['sparse_bytes_per_frame'] / 2**10:.0f} KiB/frame (cut, noise and level maps "
                      f"{r['sparse_map_bytes_per_frame'] / 2**10:.0f}), "
                      f"{r['sparse_bytes_per_frame'] / r['raw_frame_bytes']:.1%} of a raw frame, "
                      f"{(r['sparse_fill_fraction'] or 0):.1%} of the unmasked pixels kept"]
    return "\n".join(lines)


def format_phases(ph: dict | None) -> list[str]:
    """The phases of a pipeline report (see `_phases`), one line."""
    if not ph:
        return []

    def part(what: str, key: str) -> str:
        s, frames = ph[f"{key}_s"], ph[f"{key}_frames"]
        return f"{what} {frames} in {s:.1f} s ({frames / s if s > 0 else float('inf'):.1f}/s)"

    return [f"  phases: {part('first window read,', 'first_window')}; {part('first half-window,', 'first_half')}; "
            f"{part('sliding,', 'sliding')}; {part('last half-window,', 'last_half')}"]


def format_stages(p: dict) -> list[str]:
    """The per-stage table of a pipeline report: time per frame in each stage's thread, and the slowest."""
    ms = p["stage_ms_per_frame"]
    lines = [f"  {'stage':12s} {'ms/frame':>9s} {'frames/s':>9s}"]
    for stage in sorted(ms, key=ms.get, reverse=True):
        rate = 1000 / ms[stage] if ms[stage] > 0 else float("inf")
        lines.append(f"  {stage:12s} {ms[stage]:9.2f} {rate:9.1f}"
                     + ("  <- the slowest (the stages overlap on their threads, which share the cores: see CPU)"
                        if stage == p["bound_by"] else ""))
    return lines


def main(opts: BenchOptions, as_json: bool = False) -> str:
    report = run_bench(opts)
    return json.dumps(report, indent=2) if as_json else format_report(report)


# ---- sources: from a frame being written to it being delivered ----------------------

class _StampFile:
    """on_frame callback for a replayer in another process: appends "k wall-clock" lines to a file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, k: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{k} {time.time()!r}\n")


def _stamps(path: Path) -> dict[int, float]:
    lines = path.read_text().split("\n") if path.exists() else []
    return {int(k): float(t) for k, t in (line.split() for line in lines if line)}


def _delivered(cfg_overrides: list[str], n: int) -> dict[int, float]:
    from .config import load_config
    from .sources import open_source

    cfg = load_config(None, cfg_overrides)
    times = {}
    source = open_source(cfg.source)
    try:
        for frame in source:
            times[frame.index] = time.time()
            if len(times) == n:
                break
    finally:
        source.close()
    return times


def _latency(written: dict[int, float], delivered: dict[int, float]) -> dict:
    lat = np.array([delivered[k] - written[k] for k in delivered if k in written]) * 1000
    return {"frames": int(lat.size), "median_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99))}


def bench_sources(scan: SyntheticScan, workdir: Path, rates=(10.0, 50.0), n: int = 60) -> dict:
    """Latency of each live source at each acquisition rate, writer and reader as separate programs would be."""
    from simulators.replay_file import replay_edf, replay_hdf5, start_in_process
    from simulators.replay_stream import StreamReplayer

    url = _write_scan(workdir / "frames.h5", scan, n)
    report = {}
    for fps in rates:
        for name in ("hdf5-swmr", "hdf5-no-swmr", "edf-folder"):
            stamp = workdir / f"{name}-{fps}.txt"
            if name == "edf-folder":
                target = workdir / f"edf-{fps}"
                writer = start_in_process(replay_edf, url, str(target), fps=fps, on_frame=_StampFile(str(stamp)))
                overrides = [f"source.url={target}/*.edf", f"source.expected_frames={n}"]
            else:
                target = workdir / f"{name}-{fps}.h5"
                writer = start_in_process(replay_hdf5, url, str(target), fps=fps, swmr=name == "hdf5-swmr",
                                          on_frame=_StampFile(str(stamp)))
                overrides = [f"source.url={target}::/1.1/measurement/marana", "source.protocol=hdf5-live",
                             f"source.expected_frames={n}"]
            delivered = _delivered(overrides + ["source.poll_interval_s=0.1", "source.idle_timeout_s=30"], n)
            writer.join(60)
            report[f"{name} @ {fps:g} fps"] = _latency(_stamps(stamp), delivered)
        for protocol in ("stream1", "stream2"):
            replayer = StreamReplayer(url, protocol=protocol, fps=fps)
            offset = time.time() - time.perf_counter()  # sent_s is perf_counter time
            replayer.start()
            try:
                delivered = _delivered([f"source.url={replayer.endpoint}", f"source.protocol={protocol}",
                                        "source.idle_timeout_s=30"], n)
            finally:
                replayer.join(60)
                replayer.close()
            written = {k: t + offset for k, t in replayer.sent_s.items()}
            report[f"{protocol} @ {fps:g} fps"] = _latency(written, delivered)
    return report


# ---- soak: a long scan at acquisition speed ---------------------------------------------

# Seconds between samples of memory and backlog.
SOAK_SAMPLE_S = 1.0


class PacedSource(FrameSource):
    """``n`` synthetic frames delivered at ``fps``, as a detector acquires them: frame k is not
    available before ``start + k / fps``, and frames the pipeline is late for are delivered at once
    (a detector's buffer). ``acquired()`` is how many frames exist at a given instant."""

    rereadable = True  # made again from the seed
    url = "bench://paced"

    def __init__(self, scan: SyntheticScan, n: int, fps: float):
        self.scan, self.n_frames, self.fps = scan, n, fps
        self.frame_shape, self.dtype = (scan.size, scan.size), np.dtype(np.uint16)
        self.end_reason = None
        self.start_s: float | None = None

    def acquired(self, now: float | None = None) -> int:
        if self.start_s is None:
            return 0
        now = time.perf_counter() if now is None else now
        return min(self.n_frames, int((now - self.start_s) * self.fps) + 1)

    def __iter__(self):
        from .types import Frame

        self.start_s = time.perf_counter()
        for k in range(self.n_frames):
            wait = self.start_s + k / self.fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            yield Frame(k, None, self.scan.frame(k))
        self.end_reason = "complete"

    def close(self) -> None:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_soak(scan: SyntheticScan, opts: BenchOptions, workdir: Path) -> dict:
    """Run ``opts.frames`` frames at ``opts.fps`` through the whole pipeline, sampling its resident
    memory and its backlog (frames acquired but not yet segmented) every ``SOAK_SAMPLE_S``."""
    import threading

    from .config import load_config
    from .pipeline import Pipeline

    cfg = load_config(None, ["source.url=soak", f"background.window={opts.window}", f"background.mode={opts.mode}",
                             f"background.stride={opts.stride}", f"background.batch_frames={opts.batch}",
                             f"output.dir={workdir / 'out'}"])
    source = PacedSource(scan, opts.frames, opts.fps)
    pipeline = Pipeline(cfg, overwrite=True, source=source)
    samples: list[tuple[float, int, int, int]] = []  # (s since start, frames segmented, backlog, rss bytes)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SOAK_SAMPLE_S):
            now = time.perf_counter()
            segmented = pipeline.stats.frames_segmented
            samples.append((now - (source.start_s or now), segmented, source.acquired(now) - segmented,
                            _rss_bytes()))

    sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    sampler.start()
    try:
        stats = pipeline.run()
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    rss_end = _rss_bytes()
    latency = opts.window // 2 + opts.batch - 1 + (opts.stride // 2 if opts.mode == "block" else 0)
    warm = [s for s in samples if s[1] >= opts.window] or samples  # after the first window: steady state

    def at(fraction: float) -> dict:
        s = warm[min(int(fraction * len(warm)), len(warm) - 1)] if warm else (0.0, 0, 0, rss_end)
        return {"t_s": s[0], "frames_segmented": s[1], "backlog_frames": s[2], "rss_mib": s[3] / 2**20}

    backlogs = [s[2] for s in warm]
    return {
        "frames": stats.frames_segmented,
        "fps": opts.fps,
        "duration_s": wall,
        "acquisition_s": opts.frames / opts.fps,
        "difspots": stats.difspots_written,
        "rejected": dict(stats.rejected),
        "flood_frames": stats.flood_frames_total,
        "noise_sigma_range": stats.noise_sigma_range,
        "latency_frames": latency,
        "rss_before_mib": rss_before / 2**20,
        "start": at(0.0),
        "middle": at(0.5),
        "end": at(1.0),
        "rss_end_of_run_mib": rss_end / 2**20,
        "rss_max_mib": max([s[3] for s in samples] + [rss_end]) / 2**20,
        "max_backlog_frames": max(backlogs, default=0),
        "backlog_last_tenth_max": max(backlogs[-max(len(backlogs) // 10, 1):], default=0),
        "samples": len(samples),
    }


def format_soak(report: dict) -> str:
    o, s = report["options"], report["soak"]
    lines = [f"dctstream bench --soak: {s['frames']} frames of {o['size']} x {o['size']} uint16 at {s['fps']:g} "
             f"frames/s (an acquisition of {s['acquisition_s']:.0f} s), window {o['window']}, mode {o['mode']}, "
             f"batch {o['batch']}, {report['cores']} cores",
             f"  duration {s['duration_s']:.1f} s; {s['difspots']} difspots; {s['samples']} samples",
             "  after the first window:       start      middle       end"]
    lines.append("    resident memory (MiB) " + "".join(f"{s[k]['rss_mib']:11.1f}" for k in ("start", "middle", "end")))
    lines.append("    backlog (frames)      " + "".join(f"{s[k]['backlog_frames']:11d}" for k in ("start", "middle", "end")))
    lines.append(f"  max backlog {s['max_backlog_frames']} frames (the background's own latency is "
                 f"{s['latency_frames']} frames), max in the last tenth {s['backlog_last_tenth_max']}; "
                 f"max resident memory {s['rss_max_mib']:.1f} MiB")
    return "\n".join(lines)


# ---- campaign: scans/s and frames/s against the number of Dask workers ---------------------------------

def bench_campaign(workdir: Path, *, scans: int = 6, frames: int = 200, size: int = 128, window: int = 51,
                   workers: tuple[int, ...] = (1, 2), seed: int = 0) -> dict:
    """``scans`` copies of one simulated scan processed by ``dctstream campaign`` on a LocalCluster of each
    worker count; timed from the first task submitted to the last scan done (the cluster's start and each
    worker's imports left out: every worker has loaded dctstream first)."""
    import shutil

    from distributed import Client, LocalCluster

    from simulators.dct_scan import simulate_scan

    from .campaign import Campaign, list_scans

    first = workdir / "scan_00.h5"
    simulate_scan(first, frames=frames, size=size, spots=max(10, size * size // 400), seed=seed)
    for i in range(1, scans):
        shutil.copyfile(first, workdir / f"scan_{i:02d}.h5")
    overrides = [f"background.window={window}", "quicklook.enabled=false"]
    warm = workdir / "warm_up.h5"
    simulate_scan(warm, frames=window + 10, size=32, spots=5, seed=seed)
    runs = []
    for n in workers:
        out = workdir / f"out_{n}"
        jobs = list_scans([str(workdir / "scan_*.h5")], out, overrides=overrides)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(_warm_up, f"{warm}::/1.1/measurement/marana", str(workdir / "warm_up"), overrides)
            started = time.perf_counter()
            rows = Campaign(jobs, out).run(client)
            wall_s = time.perf_counter() - started
        failed = [row for row in rows if row["state"] == "failed"]
        if failed:
            raise RuntimeError(f"bench campaign: {failed[0]['scan']} failed: {failed[0]['error']}")
        total = sum(row["frames"] for row in rows)
        runs.append({"workers": n, "wall_s": wall_s, "frames": total, "frames_per_s": total / wall_s,
                     "scans_per_min": 60 * len(rows) / wall_s,
                     "scan_s_median": float(np.median([row["time_s"] for row in rows]))})
    return {"scans": scans, "frames": frames, "size": size, "window": window, "cores": os.cpu_count(),
            "runs": runs}


def _warm_up(url: str, out_root: str, overrides: list[str]) -> None:
    """Process a tiny scan in a worker before the clock starts: imports done, compiled kernels loaded."""
    from .config import load_config
    from .runner import process_scan

    out = Path(out_root) / str(os.getpid())
    process_scan(load_config(None, [*overrides, f"source.url={url}", f"output.dir={out}"]), display=False)


def format_campaign(report: dict) -> str:
    base = report["runs"][0]
    lines = [f"campaign of {report['scans']} scans, {report['frames']} frames of {report['size']} x "
             f"{report['size']} px each (background.window {report['window']}), on {report['cores']} cores:",
             f"  {'workers':>7}  {'wall s':>7}  {'frames/s':>8}  {'scans/min':>9}  {'speed-up':>8}  "
             f"{'median scan s':>13}"]
    for run in report["runs"]:
        lines.append(f"  {run['workers']:>7}  {run['wall_s']:>7.1f}  {run['frames_per_s']:>8.1f}  "
                     f"{run['scans_per_min']:>9.1f}  {run['frames_per_s'] / base['frames_per_s']:>7.2f}x  "
                     f"{run['scan_s_median']:>13.1f}")
    return "\n".join(lines)
