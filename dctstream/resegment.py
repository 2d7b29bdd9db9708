"""``dctstream resegment`` and ``dctstream tune``: segment a run again from its sparse corrected scan.

A run writes its corrected frames above a low cut to ``OUT/corrected.h5``
(``export.format: sparse``, see `dctstream.sinks.corrected`), with each
frame's cut and its noise followed along psi. Each frame's stored pixels (0
below the cut) are pushed through the run's segmenter (`SparseSegmenter`: the
same blobs as for the frame made dense, at the cost of its stored pixels) with
the seed and grow maps that this noise gives for the new parameters, as a full
run would: the flood guard and the 0/360-degree seam join run as in a full run. For
parameters whose every threshold is at or above the cut, at every frame and
tile (see `dctstream.segment.floor`), the blobs, so the spot table, are those a
full run with these parameters gives, the ``integral`` column aside: its tails
sum the unclaimed voxels around a spot, and those below the cut are 0 here.
Difspot files hold 0 where their box was below the cut. Parameters that would
need a voxel below the cut are refused, naming the key, the frame and the cut.

``tune`` runs several settings of one key over the sparse scan and reports,
per setting, the difspots found, their sizes and lengths in psi, how many sit
where the noise is high and how many the size filters reject, with the knee
of the spots-per-setting curve as the suggested value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outdir, seam
from ._version import __version__
from .config import Config, config_to_dict, dump_config, load_config, replace_config
from .detector import unbin_blob
from .direct_beam import NeverSegmented, beam_mask
from .errors import ConfigError, InputError, OutputError
from .overlap import Worker
from .pipeline import frame_maps, frame_thresholds, prepare_output, resolve_segmentation
from .record import read_record
from .segment import SegmentParams
from .segment.floor import floor_tiles, reach_tiles
from .segment.sparse import SparseFrame, SparseSegmenter
from .sinks import DifspotWriter, SparseScan, SpotTable, spot_row
from .split import FINGERPRINT_EVERY, fingerprint, overlaps, shifted

log = logging.getLogger(__name__)

SPARSE_FILE = "corrected.h5"
# Sections a resegmentation may change: the rest made the corrected frames, which the sparse scan holds.
CHANGEABLE = ("segmentation", "quicklook")
# The run's own folders: a resegmentation written into one of them mixes its files with the run's.
RUN_PARTS = frozenset({"difspots", "quicklook", ".dctstream"})
# A spot "sits where the noise is high" when its tile's noise is this many times the median.
NOISY_FACTOR = 2.0
# A resegmentation of at least this many pixels (frames x frame pixels) segments its second half in a second
# process, with 2 CPUs or more. That process takes about 2 s of CPU to start and segments 4 x max_blob_size
# frames more than its half: on the 601 frames of 1024 x 1024 px of the bench scan it cost more than it saved,
# on 1803 frames it took 30 % off the wall time (see the README's Tuning section).
SPLIT_MIN_PIXELS = 1_500_000_000
# Closed difspots waiting for the writer thread; each is a few kB.
WRITE_QUEUE_DEPTH = 256
# Frames of resident segmenter pools a tune pass may hold, all settings together (about 2 GiB at 2048 x 2048).
TUNE_POOL_FRAMES = 128
# Frames whose thresholds are checked against the cut at once (a few MB of tile maps).
CHECK_BLOCK_FRAMES = 256


def run_config(run_dir: Path, overrides=()) -> Config:
    """The run's configuration (``RUN_DIR/config.yml``) with ``overrides`` of the changeable sections."""
    path = Path(run_dir) / "config.yml"
    if not path.is_file():
        raise InputError(f"{path}: no run configuration, expected the output folder of a dctstream run")
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key.split(".")[0] not in CHANGEABLE:
            raise ConfigError(f"--set: {key}: cannot change in a resegmentation (the sparse scan holds the "
                              f"corrected frames it made), expected a key of {' or '.join(CHANGEABLE)}")
    return load_config(path, overrides)


def open_scan(run_dir: Path) -> SparseScan:
    scan = SparseScan(Path(run_dir) / SPARSE_FILE)
    dtype = scan.h5.attrs.get("dtype", "float32")
    if dtype != "float32" or not len(scan):
        scan.close()
        raise InputError(f"{scan.path}: " + (f"values stretched to {dtype}, expected export.dtype: float32 (exact "
                                             "values) to segment again" if dtype != "float32" else
                                             ("no frame written yet" if not scan.unwritten else
                                              f"no frame written: the {scan.unwritten} it counts were never "
                                              "(a run whose writes failed: a full disk?)")
                                             + ", expected at least one"))
    return scan


def resolve(cfg: Config, scan: SparseScan, own: bool = False) -> SegmentParams:
    """The segmentation parameters as the run resolved them (on its first frames' noise), refused when any
    frame's thresholds would need a voxel below its cut; ``own``: the run's own settings (see `check_cut`)."""
    params = resolve_segmentation(cfg.segmentation, scan.noise_sigma[0], scan.tile_px, scan.photon_gain)
    check_cut(cfg, params, scan, own)
    return params


def check_cut(cfg: Config, params: SegmentParams, scan: SparseScan, own: bool = False) -> None:
    """`ConfigError` naming the key, frame and tile where ``cfg``'s thresholds would go below the sparse cut.

    A voxel is compared with its frame's thresholds and with the peak of a region up to max_blob_size[2] frames
    away, at least that frame's seed threshold: both count. The run set each frame's cut from that frame's own
    thresholds (its neighbours' noise not known yet), so with ``own`` (the run's own settings) only those count:
    where a tile within reach has a third of the noise or less and that noise dips along psi, the run's own
    settings were refused ("needs 13.02 counts ... below the cut of 13.11", a validation scan); the voxels
    between the two, compared in the run only with a peak of another frame there, are missing from the sparse
    scan as its tails below the cut are."""
    seg, n = cfg.segmentation, len(scan)
    reach, reach_f = reach_tiles(params.max_size, params.tile_px), 0 if own else params.max_size[2]
    ty, tx = scan.cut.shape[1:]
    t = params.tile_px
    # a tile of masked pixels only is never segmented: its cut keeps nothing, its thresholds say nothing
    kept = np.pad(~scan.mask, ((0, ty * t - scan.mask.shape[0]), (0, tx * t - scan.mask.shape[1])))
    kept = kept.reshape(ty, t, tx, t).any(axis=(1, 3))
    for start in range(0, n, CHECK_BLOCK_FRAMES):
        lo, hi = max(start - reach_f, 0), min(start + CHECK_BLOCK_FRAMES + reach_f, n)
        seed, low = frame_thresholds(seg, scan.noise_sigma[lo:hi])
        seed, low = (np.broadcast_to(np.asarray(m, np.float64), (hi - lo, ty, tx)) for m in (seed, low))
        floor = floor_tiles(seed, low, seg.grow_high, reach, reach_f)
        stop = min(start + CHECK_BLOCK_FRAMES, n)
        part = slice(start - lo, stop - lo)
        cut = scan.cut[start:stop].astype(np.float64)
        short = (cut > floor[part]) & kept
        if not short.any():
            continue
        k, y, x = np.unravel_index(np.argmax(np.where(short, cut / floor[part], -np.inf)), short.shape)
        near = floor_tiles(seed, np.full_like(low, np.inf), None, reach, reach_f)[part][k, y, x]
        limits = {"seed_sigma" if seg.seed_threshold == "auto" else "seed_threshold": near,
                  "grow_low": low[part][k, y, x], "grow_high": np.inf if seg.grow_high is None else seg.grow_high}
        key = min(limits, key=limits.get)
        what = {"grow_low": " (auto: half the seed threshold)" if seg.grow_low == "auto" else "",
                "grow_high": ""}.get(key, f" (the seed threshold within {list(params.component_size)} pixels, frames)")
        raise ConfigError(f"segmentation.{key}: needs corrected values down to {floor[part][k, y, x]:.4g} counts"
                          f"{what} at frame {start + k}, pixels y {y * t}..{(y + 1) * t - 1}, x {x * t}.."
                          f"{(x + 1) * t - 1}, below the sparse scan's cut of {cut[k, y, x]:.4g} counts there "
                          f"({scan.path}); expected settings at or above the cut, or a run with a lower "
                          "export.cut_sigma")


@dataclass
class Outcome:
    """One setting's result: its difspots' table rows and the segmenter's rejections and floods."""

    rows: list[dict] = field(default_factory=list)
    blobs: int = 0
    rejected: dict = field(default_factory=dict)
    floods: int = 0


def _frames(scan: SparseScan, start: int = 0, stop: int | None = None):
    """(k, frame, unfiltered or None) as `SparseFrame` s, of frames start..stop-1."""
    for k, rows, cols, values, *unfiltered in scan.frames(start, stop, unfiltered=scan.unfiltered):
        yield (k, SparseFrame(rows, cols, values, scan.frame_shape),
               SparseFrame(rows, cols, unfiltered[0], scan.frame_shape) if unfiltered else None)


class _DenseFrame:
    """One frame buffer that takes each sparse frame in turn (only the last one's pixels cleared)."""

    def __init__(self, shape):
        self.frame = np.zeros(shape, np.float32)
        self._last: SparseFrame | None = None

    def of(self, sparse: SparseFrame) -> np.ndarray:
        if self._last is not None:
            self.frame[self._last.rows, self._last.cols] = 0
        self._last = sparse
        return sparse.dense(self.frame)


def _psi_at(psi, frame: float) -> float | None:
    """psi at a fractional frame, as the pipeline gives a blob's (between the two frames around it)."""
    if psi is None or not len(psi):
        return None
    i = max(min(int(frame), len(psi) - 2), 0)
    return float(np.interp(frame, np.arange(i, i + 2)[:len(psi)], psi[i:i + 2]))


def segment_scan(scan: SparseScan, settings: list[tuple[Config, SegmentParams]], on_blobs=None,
                 on_frame=None, rows: bool = True) -> list[Outcome]:
    """Segment the scan with each of ``settings`` in one pass; ``on_blobs(i, blobs)`` gets each setting's blobs
    as they close, ``on_frame(k, frame)`` each rebuilt frame. The rows (unless not ``rows``: ``on_blobs``
    writes them) are before any seam join."""
    segmenters = [SparseSegmenter(p, scan.frame_shape, scan.mask, measured=scan.unfiltered) for _, p in settings]
    dense = _DenseFrame(scan.frame_shape) if on_frame is not None else None
    outcomes = [Outcome() for _ in settings]

    def take(i, blobs):
        outcomes[i].blobs += len(blobs)
        for blob in blobs if rows else ():
            outcomes[i].rows.append(spot_row(unbin_blob(blob, scan.binning, scan.binning_mode),
                                             _psi_at(scan.psi, blob.centroid[0])))
        if on_blobs is not None:
            on_blobs(i, blobs)

    for k, frame, measure in _frames(scan):
        for i, ((cfg, _), seg) in enumerate(zip(settings, segmenters)):
            take(i, seg.push(k, frame, *frame_maps(cfg.segmentation, scan.noise_sigma[k]), measure))
        if on_frame is not None:
            on_frame(k, dense.of(frame))
    for i, seg in enumerate(segmenters):
        take(i, seg.finish())
        outcomes[i].rejected = dict(seg.rejected)
        outcomes[i].floods = len(seg.floods)
    return outcomes


class _RunView:
    """What `QuickLook` reads from a pipeline: the spot table and the direct beam (no raw frames here)."""

    def __init__(self, table, direct_beam, frames):
        self.table = table
        self.background = None
        self.stats = type("Stats", (), {"direct_beam": direct_beam, "frames_total": frames})()


def resegment(run_dir, overrides=(), out_dir=None, *, overwrite: bool = False, difspots: bool = True) -> dict:
    """Segment the run in ``run_dir`` again with ``overrides``; writes spots.h5, difspots/ (unless not
    ``difspots``: a file per difspot costs more than segmenting it) and quicklook/ to ``out_dir`` (default
    ``RUN_DIR/resegmented``). Returns a summary."""
    from .quicklook import QuickLook

    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    with open_scan(run_dir) as scan:
        params = resolve(cfg, scan, own=cfg.segmentation == run_config(run_dir).segmentation)
        out = Path(out_dir) if out_dir is not None else run_dir / "resegmented"
        resolved, run_resolved = out.resolve(), run_dir.resolve()
        if resolved == run_resolved:
            raise ConfigError(f"--out: {out} is the run's own folder, expected another one")
        inside = resolved.relative_to(run_resolved).parts if resolved.is_relative_to(run_resolved) else ()
        if inside and inside[0] in RUN_PARTS:  # its spots.h5, config.yml, ... went in among the run's files
            raise ConfigError(f"--out: {out} is inside the run's own {inside[0]}/, expected another folder "
                              f"(by default {run_dir / 'resegmented'})")
        lock = prepare_output(out, overwrite)
        done = False
        try:
            summary = _resegment(cfg, params, scan, run_dir, out, difspots, start, QuickLook)
            done = True
            return summary
        finally:
            # as a run ends: an earlier result set aside by overwrite is dropped, or put back on a failure
            (outdir.drop_previous if done else outdir.restore_previous)(out)
            lock.release(remove=True)


def never_segmented(scan, record: dict | None) -> NeverSegmented:
    """What the run's touches_mask took: its fixed mask and its saturated pixels (in the sparse scan of a
    finished run), and from its record the beam box of every frame (a beam it followed) and its unusable
    frames; without a record, the beam box of its first frames."""
    stats = (record or {}).get("stats") or {}
    unusable = {f for first, last in (stats.get("normalise") or {}).get("unusable", []) for f in range(first, last + 1)}
    track = stats.get("direct_beam_track")
    if track:
        track = [(int(f), None if box is None else tuple(int(v) // scan.binning for v in box)) for f, box in track]
        return NeverSegmented(scan.mask, track, unusable, scan.saturated)
    beam = None if scan.direct_beam is None else tuple(v // scan.binning for v in scan.direct_beam)
    return NeverSegmented(scan.mask | beam_mask(beam, scan.mask.shape), unusable=unusable, saturated=scan.saturated)


def _resegment(cfg, params, scan, run_dir, out, difspots, start, QuickLook) -> dict:
    cfg = replace_config(cfg, output={"dir": str(out)})
    (out / "config.yml").write_text(dump_config(cfg))
    table = SpotTable(out, {"config": dump_config(cfg), "version": __version__, "source": cfg.source.url,
                            "resegmented_from": str(run_dir / SPARSE_FILE), "sparse_frames": len(scan)})
    files = DifspotWriter(out) if difspots else None
    quick = QuickLook(cfg.quicklook, out, _RunView(table, scan.direct_beam, len(scan))) \
        if cfg.quicklook.enabled else None
    n = len(scan)
    psi = None if scan.psi is None else [float(v) for v in scan.psi]
    turn = scan.finished and seam.full_turn(psi)
    at_seam: dict[int, object] = {}  # without difspot files: the blobs a seam join may read (seam.join_across_seam)

    never = never_segmented(scan, read_record(run_dir))

    def write_one(item):  # in the writer thread, as a run writes them
        blob, psi_deg = item
        f0, y0, x0, f1, y1, x1 = blob.bbox
        blob = dataclasses.replace(blob, touches_mask=never.touches(f0, f1, y0, y1, x0, x1))
        blob = unbin_blob(blob, scan.binning, scan.binning_mode)
        if files is not None:
            files.write(blob, volume=blob.volume)
        elif turn and (blob.frame.min() == 0 or blob.frame.max() == n - 1
                       or min(blob.max_index[0] + 1, n - blob.max_index[0]) <= params.max_size[2]):
            at_seam[blob.id] = blob  # across the seam, or a spot whose tail may be
        table.add(blob, psi_deg)

    writer = Worker(write_one, WRITE_QUEUE_DEPTH, name="dctstream-resegment-write")

    def write(_, blobs):
        for blob in blobs:
            writer.submit((blob, _psi_at(psi, blob.centroid[0])))

    joined = 0
    try:
        try:
            on_frame = quick.on_corrected if quick is not None else None
            half = _second_half(scan, cfg)
            outcome = segment_in_halves(scan, cfg, params, half, write, on_frame) if half is not None else \
                segment_scan(scan, [(cfg, params)], write, on_frame, rows=False)[0]
        finally:
            writer.close()
        if turn:  # as a run of the whole scan joins them
            joined = seam.join_across_seam(table, files, n, lambda c: seam.psi_at(psi, c), params.connectivity,
                                           scan.binning, blobs=at_seam if files is None else None,
                                           grow_ratio=params.grow_ratio, reach_frames=params.max_size[2])
    finally:
        if psi:
            table.with_angles()
        table.close()
    pictures = quick.finish() if quick is not None else []
    _write_record(run_dir, out, cfg, scan, outcome.blobs - joined, outcome.rejected, pictures)
    return {"out_dir": str(out), "frames": n, "finished_scan": scan.finished,
            "difspots": outcome.blobs - joined, "seam_joined": joined, "rejected": outcome.rejected,
            "flood_frames": outcome.floods, "quicklook": pictures, "seconds": time.perf_counter() - start}


def _write_record(run_dir: Path, out: Path, cfg: Config, scan: SparseScan, spots: int, rejected, pictures) -> None:
    """``OUT/run.json`` of a resegmentation, once its results are whole: the run's record with this one's
    settings and counts; finished when its sparse scan is whole and the run finished (or has no record), else
    incomplete, saying why.
    Without it (a resegmentation interrupted, or before this record) its results are not known to be whole,
    as its exports say; with none at all, a whole resegmentation's were said to be partial too."""
    from .record import partial_reason, write_record

    record = dict(read_record(run_dir) or {})
    why = partial_reason(record) if record else None  # without one (a folder copied without it): the scan says
    if why is None and not scan.finished:
        why = f"its sparse scan holds {len(scan)} frames, written before the run ended"
    stats = dict(record.get("stats") or {})
    stats.update({"difspots_written": spots, "rejected": dict(rejected)})
    record.update({"dctstream_version": __version__, "state": "incomplete" if why else "finished",
                   "incomplete": f"resegmented from an unfinished run: {why}" if why else None,
                   "out_dir": str(out), "resegmented_from": str(run_dir), "spots": spots,
                   "rejected": dict(rejected), "stats": stats, "config": config_to_dict(cfg),
                   "quicklook": list(pictures), "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())})
    write_record(out, record)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _second_half(scan: SparseScan, cfg: Config) -> int | None:
    """The first frame of the scan's second half, for a scan worth a second process; else None."""
    n, (ny, nx) = len(scan), scan.frame_shape
    pre, post = overlaps(cfg)
    start = (n + pre - post) // 2  # the two processes segment about as many frames
    if _cpus() < 2 or not sys.executable or n * ny * nx < SPLIT_MIN_PIXELS or start - pre < 1 or start + post > n:
        return None
    return start


def segment_in_halves(scan: SparseScan, cfg: Config, params: SegmentParams, start: int, on_blobs,
                      on_frame=None) -> Outcome:
    """`segment_scan` of one setting with the frames from ``start`` on segmented in a second process, exactly:
    that process's segmenter starts ``pre`` frames before ``start`` (see `dctstream.split`, which splits a
    run the same way) and fingerprints its state at every 4th of its first ``post`` frames from ``start``.
    Where this one's first agrees, at frame c, both are in one state: the blobs closed from c on are the
    second process's (numbered on), and this one stops. Where none agrees, this one segments the whole scan."""
    n = len(scan)
    pre, post = overlaps(cfg)
    edges = list(range(start, start + post, FINGERPRINT_EVERY))
    second = _HalfProcess((str(scan.path), cfg.segmentation, params, start - pre, start, n, edges))
    seg = SparseSegmenter(params, scan.frame_shape, scan.mask, measured=scan.unfiltered)
    dense = _DenseFrame(scan.frame_shape) if on_frame is not None else None
    outcome = Outcome()

    def take(blobs):
        outcome.blobs += len(blobs)
        on_blobs(0, blobs)

    try:
        theirs = None  # the second process's fingerprints and rejection counts at the edges
        stitched = False
        for k, frame, measure in _frames(scan):
            if not stitched and second is not None and k in edges:
                theirs = theirs or second.edges()
                mine = fingerprint(seg, 0)
                if mine is not None and mine == theirs[0].get(k):
                    next_id = seg.n_blobs
                    for closed, blobs in second.blobs():
                        if closed >= k:
                            take([dataclasses.replace(blob, id=next_id + i) for i, blob in enumerate(blobs)])
                            next_id += len(blobs)
                    rejected, floods = second.end
                    counts = {key: seg.rejected.get(key, 0) + rejected.get(key, 0) - theirs[1][k].get(key, 0)
                              for key in {*seg.rejected, *rejected}}
                    outcome.rejected = {key: v for key, v in counts.items() if v}
                    outcome.floods = len(seg.floods) + sum(f >= k for f, _, _ in floods)
                    stitched = True
                    log.info("resegment: frames %d to %d segmented in a second process", k, n - 1)
                    if on_frame is None:
                        break
                elif k == edges[-1]:  # no state in common: this process segments the rest too
                    second.close()
                    second = None
            if not stitched:
                take(seg.push(k, frame, *frame_maps(cfg.segmentation, scan.noise_sigma[k]), measure))
            if on_frame is not None:
                on_frame(k, dense.of(frame))
        if not stitched:
            take(seg.finish())
            outcome.rejected, outcome.floods = dict(seg.rejected), len(seg.floods)
    finally:
        if second is not None:
            second.close()
    return outcome


class _HalfProcess:
    """A Python process that segments frames ``first``..n-1 of the sparse scan (`_serve_half`), its answers
    read in a thread as they come (so it never waits on a full pipe): not a multiprocessing child, which
    would run the caller's main script again where it has no main guard."""

    def __init__(self, args: tuple):
        import dctstream

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(dctstream.__file__).parents[1])]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
        self._first = args[3]
        self._answers: queue.Queue = queue.Queue()
        self.end: tuple[dict, list] | None = None  # its rejection counts and floods, once it has ended
        self._process = subprocess.Popen([sys.executable, "-c", "from dctstream.resegment import _serve_half; "
                                          "_serve_half()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            pickle.dump(args, self._process.stdin, pickle.HIGHEST_PROTOCOL)
            self._process.stdin.close()
        except OSError:
            pass  # it ended: its answers say why
        threading.Thread(target=self._read, name="dctstream-resegment-half", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                answer = pickle.load(self._process.stdout)
            except Exception:  # it ended (or was ended)
                self._answers.put(None)
                return
            self._answers.put(answer)

    def _answer(self, kind: str):
        answer = self._answers.get()
        if answer is None:
            self._process.wait()
            raise OutputError(f"resegment: the process segmenting frames {self._first} on ended with exit status "
                              f"{self._process.returncode}, expected its {kind}")
        if answer[0] == "error":
            raise answer[1]
        return answer

    def edges(self) -> tuple[dict, dict]:
        """Its fingerprints and rejection counts at each edge frame."""
        return self._answer("fingerprints")[1:]

    def blobs(self):
        """(frame pushed, the blobs that closed then) from ``start`` on, as it goes; then ``end`` is set."""
        while (answer := self._answer("blobs"))[0] == "blobs":
            yield answer[1:]
        self.end = answer[1:]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()


def _serve_half() -> None:
    """In a second process: the frames from ``first`` on, segmented as `segment_in_halves` says, answered as
    pickles on standard output (the fingerprints at the edges first, then the blobs), an error as one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it ends this process
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to standard error, not into the answers
    try:
        path, seg_cfg, params, first, start, n, edges = pickle.load(sys.stdin.buffer)
        with SparseScan(path) as scan:
            seg = SparseSegmenter(params, scan.frame_shape, scan.mask, measured=scan.unfiltered)
            fingerprints, rejected, held = {}, {}, []  # held: the blobs closed before the edges are sent

            def send(k, closed):
                if k >= start and closed:
                    held.append(("blobs", k, [shifted(blob, first) for blob in closed]))
                if k >= edges[-1]:
                    for answer in held:
                        pickle.dump(answer, out, pickle.HIGHEST_PROTOCOL)
                    held.clear()

            for k, frame, measure in _frames(scan, first, n):
                if k in edges:
                    fingerprints[k], rejected[k] = fingerprint(seg, first), dict(seg.rejected)
                    if k == edges[-1]:
                        pickle.dump(("edges", fingerprints, rejected), out, pickle.HIGHEST_PROTOCOL)
                        out.flush()
                send(k, seg.push(k - first, frame, *frame_maps(seg_cfg, scan.noise_sigma[k]), measure))
            send(n, seg.finish())
        floods = [(f + first, found, factor) for f, found, factor in seg.floods]
        pickle.dump(("end", dict(seg.rejected), floods), out, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        pickle.dump(("error", exc), out, pickle.HIGHEST_PROTOCOL)
    out.close()


# ---- tune ------------------------------------------------------------------------------------------


def default_sweep(cfg: Config, scan: SparseScan) -> tuple[str, list[float]]:
    """The key swept by default (seed_sigma, or seed_threshold when that is a number) and its values: from
    the lowest the cut allows up to twice the run's value."""
    seg = cfg.segmentation
    if seg.seed_threshold == "auto":
        key, value = "seed_sigma", seg.seed_sigma
        low = float(np.median(scan.cut / scan.noise_sigma))
        low *= 1.0 if seg.grow_low != "auto" else 2.0  # auto grow_low is half the seed threshold
    else:
        key, value = "seed_threshold", float(seg.seed_threshold)
        low = float(np.max(scan.cut)) * (1.0 if seg.grow_low != "auto" else 2.0)
    # rounded up: a lowest value rounded down could fall below the cut
    values = np.unique(np.ceil(np.geomspace(max(low, value / 3), 2 * value, 13) * 100) / 100)
    return key, [float(v) for v in values]


_BELOW_CUT = "below the sparse scan's cut"  # in the refusal of a setting that needs voxels the sparse scan has not


def tune(run_dir, key: str | None = None, values=None, overrides=()) -> dict:
    """Sweep ``segmentation.<key>`` over ``values`` on the run's sparse scan; rows of figures per value,
    the values that need voxels below the cut listed apart, and the knee of spots per value."""
    start = time.perf_counter()
    cfg = run_config(Path(run_dir), overrides)
    with open_scan(Path(run_dir)) as scan:
        if key is None or values is None:
            default_key, default_values = default_sweep(cfg, scan)
            key = key or default_key
            values = values if values is not None else default_values
        current = config_to_dict(cfg)["segmentation"]
        own = run_config(Path(run_dir)).segmentation
        if key not in current:
            raise ConfigError(f"--key: segmentation.{key}: no such setting, expected one of "
                              f"{', '.join(sorted(current))}")
        if isinstance(current[key], int) and not isinstance(current[key], bool):  # connectivity, seed_min_voxels
            values = [int(v) if float(v).is_integer() else v for v in values]
        settings, refused = [], []
        for value in values:
            try:
                setting = replace_config(cfg, segmentation={key: value})
                settings.append((value, setting, resolve(setting, scan, own=setting.segmentation == own)))
            except ConfigError as exc:
                refused.append((value, str(exc)))
        if not settings:
            why = ("needs voxels below the sparse scan's cut" if all(_BELOW_CUT in why for _, why in refused)
                   else "was refused")
            raise ConfigError(f"segmentation.{key}: every value swept {why} "
                              f"({refused[0][1] if refused else 'no values'})")
        reach = max(p.max_size[2] for _, _, p in settings)
        per_pass = max(1, TUNE_POOL_FRAMES // (2 * reach + 4))
        outcomes = []
        for i in range(0, len(settings), per_pass):
            outcomes += segment_scan(scan, [(c, p) for _, c, p in settings[i:i + per_pass]])
        sigma = scan.noise_sigma
        noisy = sigma > NOISY_FACTOR * np.median(sigma)
        rows = [_figures(value, outcome, noisy, scan.binning * scan.tile_px)
                for (value, _, _), outcome in zip(settings, outcomes)]
        knee = knee_index([r["value"] for r in rows], [r["spots"] for r in rows])
        return {"key": key, "rows": rows, "refused": refused, "knee": knee, "frames": len(scan),
                "finished_scan": scan.finished, "outcomes": outcomes, "seconds": time.perf_counter() - start,
                "config": config_to_dict(cfg)}


def _figures(value, outcome: Outcome, noisy, tile_px: int) -> dict:
    """``noisy``: (frames, tiles_y, tiles_x) whether a tile of a frame is noisy; tiles of ``tile_px`` detector
    pixels."""
    rows = outcome.rows
    area = np.array([r["area"] for r in rows])
    frames = np.array([r["end_frame"] - r["start_frame"] + 1 for r in rows])
    where = np.array([(r["max_frame"], int(r["centroid_y"]) // tile_px, int(r["centroid_x"]) // tile_px)
                      for r in rows], np.int64).reshape(-1, 3)
    return {"value": value, "spots": len(rows),
            "median_area": float(np.median(area)) if len(rows) else 0.0,
            "median_frames": float(np.median(frames)) if len(rows) else 0.0,
            "noisy": int(noisy[where[:, 0], where[:, 1], where[:, 2]].sum()) if len(rows) else 0,
            "floods": outcome.floods,
            "too_small": outcome.rejected.get("too_small", 0), "too_large": outcome.rejected.get("too_large", 0),
            "seed_min_voxels": outcome.rejected.get("seed_min_voxels", 0)}


# The knee: the lowest value whose spot count is within this fraction of the real spots' trend (see
# knee_index). 3 %: false spots a few % at most; on 5 simulated scans (`dctstream simulate --frames 150
# --size 128 --spots 150 --seed 1..5`, scored against their truth) it fell inside the band of recall and
# precision >= 0.97 on 5 of 5 at the default cut and 4 of 5 at export.cut_sigma 1.5, the "kneedle" rule
# (the point farthest below the chord) on 2 and 3.
KNEE_EXCESS = 0.03


def knee_index(x, y) -> int | None:
    """The knee of spots against threshold: the lowest value from which every count lies within
    `KNEE_EXCESS` of the straight line fitted through the upper half of the values. Up there only real
    spots are lost, ever fainter ones, a few a step; noise seeds add an excess that grows steeply towards
    the low values. None for a curve that does not fall."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    upper = x >= np.median(x)
    slope, intercept = np.polyfit(x[upper], y[upper], 1)
    if slope >= 0 and y[0] <= y[-1]:
        return None
    within = y <= (1 + KNEE_EXCESS) * (slope * x + intercept)
    for i in range(len(x)):
        if within[i:].all():
            return i
    return None


def format_tune(result: dict, run_dir) -> str:
    key, rows, knee = result["key"], result["rows"], result["knee"]
    state = "" if result["finished_scan"] else " (scan still being written: the frames so far)"
    lines = [f"segmentation.{key} swept over {len(rows)} values on the sparse scan of {result['frames']} "
             f"frames{state}, in {result['seconds']:.1f} s", "",
             f"{key:>14s} {'spots':>7s} {'median px':>9s} {'median ψ':>9s} {'noisy':>6s} {'too small':>9s} "
             f"{'too large':>9s} {'few seeds':>9s} {'floods':>6s}"]
    for i, r in enumerate(rows):
        lines.append(f"{r['value']:14.4g} {r['spots']:7d} {r['median_area']:9.0f} {r['median_frames']:9.1f} "
                     f"{r['noisy']:6d} {r['too_small']:9d} {r['too_large']:9d} {r['seed_min_voxels']:9d} {r['floods']:6d}"
                     + ("  <- knee" if i == knee else ""))
    for value, why in result["refused"]:
        lines.append(f"{value:14.4g} refused: {why}")
    if any(value < rows[0]["value"] and _BELOW_CUT in why for value, why in result["refused"]):
        # without the values where noise seeds start, the curve's bend is among the real spots, too high
        lines += ["", f"below {rows[0]['value']:g}: a run with a lower export.cut_sigma (the knee is the lowest value "
                  "without an excess of spots over the trend of the higher ones: values below the cut are not seen)"]
    if knee is not None:
        value = rows[knee]["value"]
        lines += ["", f"suggested: segmentation.{key}={value:g}; apply it with",
                  f"  dctstream resegment {run_dir} --set segmentation.{key}={value:g}"]
    else:
        lines += ["", "no knee in the curve: widen the range (--values)"]
    return "\n".join(lines)


def draw_tune(result: dict):
    """A PNG picture of spots per setting, the knee marked: PIL only, as the quick-look pictures."""
    from PIL import Image, ImageDraw

    from .quicklook import BACKGROUND_COLOUR, BAR_COLOUR, BEAM_COLOUR, SPOT_COLOUR, TEXT_COLOUR, _font

    rows, knee, key = result["rows"], result["knee"], result["key"]
    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    image = Image.new("RGB", (w, h), BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(image)
    font = _font(14)
    x = np.array([r["value"] for r in rows], np.float64)
    series = {"spots": (np.array([r["spots"] for r in rows], np.float64), BAR_COLOUR),
              "rejected by size": (np.array([r["too_small"] + r["too_large"] for r in rows], np.float64),
                                   BEAM_COLOUR)}
    y_max = max(max(v.max() for v, _ in series.values()), 1.0)

    def px(xv, yv):
        span = max(x[-1] - x[0], 1e-12)
        return left + (xv - x[0]) / span * (w - left - right), h - bottom - yv / y_max * (h - top - bottom)

    draw.line([px(x[0], 0), px(x[-1], 0)], fill=TEXT_COLOUR)
    draw.line([px(x[0], 0), px(x[0], y_max)], fill=TEXT_COLOUR)
    for name, (y, colour) in series.items():
        points = [px(a, b) for a, b in zip(x, y)]
        draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    if knee is not None:
        kx = px(x[knee], 0)[0]
        draw.line([(kx, top), (kx, h - bottom)], fill=SPOT_COLOUR, width=2)
        draw.text((kx + 4, top), f"knee: {key} = {x[knee]:g} ({rows[knee]['spots']} spots)", fill=SPOT_COLOUR,
                  font=font)
    for v in (x[0], x[len(x) // 2], x[-1]):
        draw.text((px(v, 0)[0] - 10, h - bottom + 6), f"{v:g}", fill=TEXT_COLOUR, font=font)
    draw.text((6, top - 4), f"{y_max:.0f}", fill=TEXT_COLOUR, font=font)
    draw.text((6, h - bottom - 10), "0", fill=TEXT_COLOUR, font=font)
    draw.text((w // 2 - 60, h - 22), f"segmentation.{key}", fill=TEXT_COLOUR, font=font)
    draw.text((left, 10), "difspots found (blue) and rejected by the size filters (red)", fill=TEXT_COLOUR,
              font=font)
    return image
