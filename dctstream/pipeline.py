"""The only module that knows the stage order: source -> background -> segmenter -> sinks."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import checkpoint, interrupt, outdir, seam, spool
from ._version import __version__
from .atomic import crash_point
from .background import BackgroundStage
from .background.kernels import kernels_cached
from .config import Config, dump_config
from .detector import Detector
from .direct_beam import NeverSegmented, beam_mask, box_at, saturated_from_arrays
from .errors import ConfigError, DctStreamError, InputError, OutputError
from .order import PassMerge, PassTracker, arrange, frames_text
from .overlap import Prefetch, Worker
from .resources import check_memory
from .segment import SegmentParams, Segmenter
from .segment.floor import floor_tiles, reach_tiles, round_down_to_float32
from .segment.segmenter import COMPONENT_VOXELS, FLOOD_SHARE, pixel_map
from .segment.noise import TILE_PX, NoiseTracker, own_maps, subtract_level
from .sinks import CorrectedFrameWriter, DifspotWriter, SparseScanWriter, SpotTable
from .sources import COMPLETE_ENDS, FINAL_ENDS, check_source, open_source
from .sources.scan_file import resolve_auto

log = logging.getLogger(__name__)

# Seconds between rewrites of spots.h5; every difspot file is written at once regardless.
TABLE_FLUSH_S = 1.0
# Corrected frames the noise of the scan's first frames is estimated on, together (segment.noise).
NOISE_FRAMES = 5
# The noise never counts below half a count of an integer detector: where nearly every pixel reads the
# same (a photon-counting detector, 0 almost everywhere) the spread says nothing. Counting statistics say
# what then: the 3x3 median of Poisson counts at a rate up to 1/px reaches 3 above its temporal median
# in fewer than 1 pixel in 10^6 (5 of 9 pixels that high), so 6 sigma = 3 counts seeds no noise, while a
# floor of 1 count (6 counts) missed the spots of 5-9 counts (validation photon_counting recall 0.87 -> 1.00).
INTEGER_NOISE_FLOOR = 0.5
# Frames listed in a warning about a seed flood.
FLOOD_FRAMES_LISTED = 10
# Frames read ahead of the background stage: enough to ride out a slow read, a few MB each.
FRAME_QUEUE_DEPTH = 4
# Corrected frames waiting for the segmenter: 16 MiB each at 2048 x 2048.
SEGMENT_QUEUE_DEPTH = 1
# Blobs rejected as larger than max_blob_size: said once there are this many, and this share of the blobs kept.
TOO_LARGE_SAID = 5
TOO_LARGE_FRACTION = 0.05
# Missing frames logged one by one as warnings; the rest are counted in the status.
MISSING_WARNINGS = 3
# Closed blobs waiting for the writer; each is a few kB.
BLOB_QUEUE_DEPTH = 256


@dataclass
class Stats:
    """Counters every stage updates; a display reads them, never the other way round."""

    frames_total: int | None = None
    frames_read: int = 0
    frames_corrected: int = 0
    frames_segmented: int = 0
    difspots_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    direct_beam: tuple | None = None
    # direct_beam.bbox: auto: [first frame, box or None] each time the beam box changed along the scan
    direct_beam_track: list | None = None
    seed_threshold: tuple[float, float] | None = None  # (min, max) over the detector, current frame
    noise_sigma: float | None = None  # median over the detector, current frame
    noise_sigma_range: tuple[float, float] | None = None  # (min, max) of noise_sigma over the scan so far
    noise_sigma_by_frame: list | None = None  # [frame, noise_sigma] every so many frames (the run record)
    # (min, max) over the scan so far of the unfiltered corrected frames' level (median over the detector),
    # which each frame's spots are measured above (segment.noise: a median along psi is not the counts' mean)
    background_level_range: tuple[float, float] | None = None
    photon_gain: float | None = None  # counts per photon of the corrected frames (segment.noise.photon_gain)
    normalise: dict | None = None  # how frames were brought to the beam intensity: mode, scale range
    flood_frames: list | None = None  # the last frames whose seeds flooded: [frame, seed regions, threshold factor]
    flood_frames_total: int = 0
    # spots found in a flood of noise (segment.segmenter.FLOOD_SHARE), grown at their own threshold unsplit; those
    # rejected as `flooded` are counted in `rejected`
    flooded_spots: int = 0
    seam_joined: int | None = None  # full-turn scans: spots across 0/360 degrees joined into one (tails included)
    frames_missing: int = 0
    # unmasked pixels at the top of the frames' 8- or 16-bit type, over every frame: saturated, so the spots on
    # them have touches_mask 1 (Detector.saturated)
    saturated_pixels: int = 0
    psi_unit: str | None = None  # of the angles as recorded: degrees, or kept as recorded where they look like radians
    source_end: str | None = None  # why the source stopped: end_time, idle_timeout, complete, ...
    stage_s: Counter = field(default_factory=Counter)  # seconds spent in read, background, segment, write
    # CPU seconds of the writing thread in its "write" seconds: the rest is waiting (on the disk, or for the others)
    write_cpu_s: float = 0.0
    backlog_frames: int = 0  # frames read but not yet taken by the background stage
    write_backlog: int = 0  # difspots closed but not yet written
    dark: str | None = None  # where the dark came from: dark.url, dark.value, none, or how it was estimated
    masked_pixels: dict | None = None  # bad pixels by reason (file, flat, dead, stuck, hot, ...) and in all
    binning: str | None = None  # "b x b sum|mean"
    export_reduction: float | None = None  # bytes of raw frames read / bytes of OUT/corrected.h5
    sparse_cut: str | None = None  # the sparse scan's cut: how it is set and its range in counts so far
    sparse_fill_fraction: float | None = None  # pixels kept in the sparse scan / unmasked pixels of its frames
    sparse_bytes_per_frame: float | None = None  # bytes of OUT/corrected.h5 per frame (sparse)
    frames_expected: int | None = None  # what the scan announced (expected_frames, a stream's header, the file)
    incomplete: str | None = None  # why the scan is not whole (the source went quiet, vanished, ...), or None
    # how frames were placed in psi (dctstream.order): mode psi | passes | arrival, passes, frames held back
    # (the latency in frames), frames that came out of psi order; None: they came in psi order
    frame_order: dict | None = None
    started_s: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        # Each counter has one writer thread, and containers are replaced whole, except stage_s: every thread
        # adds its own stage's time to it, so it changes under that lock.
        self._lock = threading.Lock()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_s

    def add_stage_s(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stage_s[stage] += seconds

    def snapshot(self) -> dict:
        """Every field, containers copied, for a reader on another thread (the status, the display)."""
        with self._lock:
            return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)}


# Saturated pixels kept over a scan at most (4 bytes each): beyond, a detector saturating everywhere, those of
# later frames are not (said).
SATURATED_KEEP_MAX = 2**24


def resolve_segmentation(cfg, sigma: np.ndarray | None, tile_px: int = TILE_PX,
                         photon_gain: float | None = None) -> SegmentParams:
    """Replace the ``auto`` values of the segmentation section by numbers or (tiles_y, tiles_x) maps,
    from a noise map per tile; ``photon_gain``: counts per photon (segment.noise.photon_gain), when known."""
    seed, low = frame_thresholds(cfg, sigma)
    return SegmentParams(seed_threshold=seed, grow_ratio=cfg.grow_ratio, grow_low=low,
                         grow_high=cfg.grow_high, seed_min_voxels=cfg.seed_min_voxels,
                         min_size=tuple(cfg.min_blob_size), max_size=tuple(cfg.max_blob_size),
                         connectivity=cfg.connectivity, tile_px=tile_px, photon_gain=photon_gain,
                         drop_zingers=cfg.drop_zingers)


def frame_thresholds(cfg, sigma: np.ndarray | None):
    """The seed threshold and lower grow clamp of the segmentation section for a noise map ``sigma``."""
    seed = cfg.seed_threshold
    if seed == "auto":
        if sigma is None or not np.all(sigma > 0):
            raise ConfigError("segmentation.seed_threshold: auto needs a noise estimate > 0 everywhere, "
                              "got 0 in places (flat frames?); set a number of counts")
        seed = cfg.seed_sigma * sigma
    low = 0.5 * seed if cfg.grow_low == "auto" else cfg.grow_low
    return seed, low


def frame_maps(cfg, sigma: np.ndarray):
    """Frame k's own (seed, grow_low) tile maps from its noise map ``sigma``, or (None, None) when the
    segmentation section gives both as numbers (the segmenter's parameters then hold them)."""
    if cfg.seed_threshold != "auto" and cfg.grow_low != "auto":
        return None, None
    return tuple(np.broadcast_to(np.asarray(m, np.float64), sigma.shape) for m in frame_thresholds(cfg, sigma))


def threshold_maps(cfg, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seed threshold and lower grow clamp of the segmentation section as float64 tile maps of
    ``sigma``'s shape, for a frame whose noise is ``sigma``."""
    return tuple(np.broadcast_to(np.asarray(m, np.float64), sigma.shape) for m in frame_thresholds(cfg, sigma))


def sparse_cut_note(export_cfg, low: float, high: float) -> str:
    """The run record's ``sparse_cut``: how the cut is set and its range over the frames so far."""
    how = f"{export_cfg.cut_sigma:g} x noise" if export_cfg.threshold == "auto" else f"{export_cfg.threshold:g} counts"
    return f"{how}, at most what the segmentation compares: {low:.4g}..{high:.4g} counts"


def sparse_cut(export_cfg, seg_cfg, sigma: np.ndarray, tile_px: int = TILE_PX) -> np.ndarray:
    """A frame's sparse cut, float32 (tiles_y, tiles_x): ``export.cut_sigma`` x its noise ``sigma`` (or
    ``export.threshold`` counts), lowered to what the run's own segmentation compares there (see
    `dctstream.segment.floor`), so that the run's settings can always be applied again to the sparse scan."""
    seed, low = threshold_maps(seg_cfg, sigma)
    own = floor_tiles(seed, low, seg_cfg.grow_high, reach_tiles(seg_cfg.max_blob_size, tile_px))
    cut = export_cfg.cut_sigma * sigma if export_cfg.threshold == "auto" else np.full(sigma.shape,
                                                                                        float(export_cfg.threshold))
    cut = np.minimum(cut, own)
    return round_down_to_float32(np.where(cut > 0, cut, own))  # a noiseless tile keeps what is compared


def _previous_results(out_dir: Path, overwrite: bool) -> list[Path]:
    """Results of an earlier run in ``out_dir``; refuse to mix them with a new run unless asked to replace them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: cannot create the output folder, expected a folder, got a file")
    previous = [out_dir / name for name in outdir.RESULTS if (out_dir / name).exists()]
    if previous and not overwrite:
        raise OutputError(f"{out_dir}: already holds results ({previous[0].name}), expected an empty or new "
                          "folder; choose another output.dir or pass --overwrite")
    return previous


def _inputs_not_outputs(cfg: Config, out_dir: Path) -> None:
    """Refuse an input file that --overwrite would set aside with the results: one in ``out_dir`` under the
    name of an output (a scan copied there as spots.h5)."""
    top = os.path.realpath(out_dir)
    for key, url in (("source.url", cfg.source.url), ("source.angles", cfg.source.angles), ("dark.url", cfg.dark.url)):
        if not isinstance(url, str) or not url or re.match(r"^[a-z]+://", url):
            continue
        path = os.path.realpath(url.partition("::")[0])
        inside = os.path.relpath(path, top)
        first = inside.split(os.sep)[0]
        if not inside.startswith("..") and first in outdir.OUTPUTS:
            raise ConfigError(f"{key}: {url}: lies in the output folder {out_dir} as {first}, an output's name, "
                              "which --overwrite sets aside with the results: expected an input outside the "
                              "outputs (move it, or choose another output.dir)")


def prepare_output(out_dir: Path, overwrite: bool) -> outdir.OutputLock:
    """Create the output folder and take it for this run; an earlier run's results are set aside when
    ``overwrite`` (see `dctstream.outdir`: they come back if this run fails)."""
    _previous_results(out_dir, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    lock = outdir.OutputLock(out_dir)
    try:
        _previous_results(out_dir, overwrite)  # again, now that no other run can be writing there
        if overwrite:
            outdir.move_aside(out_dir)
    except BaseException:
        lock.release(remove=True)
        raise
    return lock


def _resolved_url(url: str | None) -> str | None:
    """``url`` with its file part an absolute, resolved path (streams as they are)."""
    if not url or re.match(r"^[a-z]+://", url):
        return url
    path, sep, rest = url.partition("::")
    if "*" in path:
        folder, name = os.path.split(path)
        return os.path.join(os.path.realpath(folder or "."), name) + sep + rest
    return os.path.realpath(path) + sep + rest


def identity_config(cfg: Config) -> str:
    """The configuration a resumed run must match: every path resolved, so that the same folder or file named
    another way (absolute after relative, through a link) is the same run."""
    from .config import replace_config

    return dump_config(replace_config(
        cfg, source={"url": _resolved_url(cfg.source.url), "angles": _resolved_url(cfg.source.angles)},
        dark={"url": _resolved_url(cfg.dark.url)},
        detector={"mask": _resolved_url(cfg.detector.mask), "flat": _resolved_url(cfg.detector.flat)},
        output={"dir": os.path.realpath(cfg.output.dir)}))


class Pipeline:
    """One scan, from its source to difspots on disk. ``run()`` drives it to the end."""

    def __init__(self, cfg: Config, *, overwrite: bool = False, source=None):
        if not cfg.source.url:
            raise ConfigError("source.url: no scan given, expected path/to/scan.h5::/dataset "
                              "(in the config or with --source)")
        # source.angles / dark.url "auto": read from the scan file now, so that everything after sees URLs
        cfg, self.auto_found = resolve_auto(cfg)
        self.distortion = None  # the detector's distortion, for the spot positions (ImageD11: imported only then)
        if cfg.detector.distortion:
            from .distortion import Distortion
            self.distortion = Distortion(cfg.detector.distortion)
        self.cfg = cfg
        self.stats = Stats()
        self.out_dir = Path(cfg.output.dir)
        self.overwrite = overwrite
        self.table: SpotTable | None = None
        self.export: CorrectedFrameWriter | SparseScanWriter | None = None
        self.lock: outdir.OutputLock | None = None  # taken when the output appears, held until `end`
        self.keep_lock = False  # True: `run` leaves `end` to its caller (the runner writes the record first)
        self.transient = False  # True: out_dir goes with the caller (dctstream.segment), nothing there to resume
        self._source_id: str | None = None  # identity of frame 0, kept in checkpoints
        self._finishing = False  # the source has ended: the background stage is emitting its last frames
        self._first_checked = False  # the first frame's counts were looked at (Detector.check_first_frame)
        outdir.check_free(self.out_dir)  # another run writing there: say it before reading anything
        if overwrite:
            _inputs_not_outputs(cfg, self.out_dir)
        self._identity = identity_config(cfg)
        # an unfinished run of this configuration in out_dir continues from its last checkpoint
        self.resuming = not overwrite and checkpoint.unfinished_run(self.out_dir, self._identity)
        self._resume = checkpoint.load(self.out_dir) if self.resuming else None
        # the scan that unfinished run read: a resumed run reads the same one or none (with no checkpoint yet, it
        # starts again from frame 0 and would replace that run's results with another scan's)
        self._resume_id = checkpoint.source_id(self.out_dir, self._resume) if self.resuming else None
        self._replay_until = -1  # frames up to this one are put back in the segmenter, not segmented again
        self._sigma: np.ndarray | None = None  # the noise of the first frames, per tile
        self._cut_range: tuple[float, float] | None = None  # of the sparse scan's cut so far, counts
        self.noise: NoiseTracker | None = None
        self._levels: dict[int, np.ndarray] = {}  # frame -> its level (float32 tile map), while a resume needs it
        self._floods_said = 0  # flood events already counted in the stats
        self._flooded_said = False  # the first region found in a flood of noise (see _note_flooded)
        self._too_large_said = False
        self._first_frames: list[tuple[int, np.ndarray, np.ndarray]] = []  # corrected frames held for the noise estimate
        # direct_beam.bbox: auto: (first frame, binned box or None) each time the beam box changed (main thread
        # appends before it hands the frame over); the noise and touches_mask of frame k take its box
        self._beam_track: list[tuple[int, tuple | None]] = []
        self._noise_mask_made: tuple | None = None  # (beam box, the noise mask of its frames): see `_noise_mask`
        self._never: NeverSegmented | None = None  # which spots touch pixels never segmented
        self._unsynced: list[Path] = []  # difspot files written since the last checkpoint
        # frames lost in transit and the stand-ins put in their place (main thread), from the oldest a checkpoint
        # may read again: a resumed run has fewer frames before them to make the same stand-ins from
        self._lost_lock = threading.Lock()
        self._lost: dict[int, np.ndarray] = {}
        self._lost_before = 0  # lost frames already dropped from _lost, all before a checkpoint's first_raw
        self._known_stand_ins: dict[int, np.ndarray] = {}  # resuming: the first run's stand-ins
        self._checkpointer = checkpoint.Checkpointer(self.out_dir, cfg.output.checkpoint_every_s,
                                                     cfg.output.checkpoint_every_frames)
        self.segmenter: Segmenter | None = None
        self._psi: list[float] | None = []  # psi of every frame so far; None once a frame came without
        self._flushed_s = time.monotonic()
        # consumers of each corrected frame, called as tap.on_corrected(k, frame) (quick-look pictures)
        self.frame_taps: list = []
        # consumers of each difspot once written, called as tap(blob, row) with its spot-table row (segment())
        self.blob_taps: list = []
        self._writer: Worker | None = None
        self._source_closed = False
        self._segmenting: Worker | None = None
        # a source object: bench --soak, segment(), tests
        self.source = check_source(open_source(cfg.source) if source is None else source)
        # frames out of psi order: a recorded file read sorted, or passes segmented across (dctstream.order)
        self._passes: int | None = None
        self._tracker: PassTracker | None = None
        self._merge: PassMerge | None = None
        self._pass_offset = 0  # acquisition index of the current pass's first frame (its background's frame 0)
        # frame -> its saturated pixels (Detector.saturated, int32), for touches_mask and the sparse scan (so
        # that resegment flags them too): written here, read by the segmenting thread
        self._saturated: dict[int, np.ndarray] = {}
        self._backward: list[int] = []  # frames of a scan in arrival order that went back in psi
        self._direction = 0.0  # of psi over such a scan, once it has moved
        try:
            self.stats.psi_unit = getattr(self.source, "psi_unit", None)
            self.source, self._passes, self.stats.frame_order = arrange(self.source, cfg.source, self._note_follow)
            # read in psi order: frames go back only where the source says so (PsiOrderFollow)
            self._sorted = (self.stats.frame_order or {}).get("mode") == "psi"
            if self._passes:  # never checkpointed: a killed run starts again from its first frame
                self._tracker = PassTracker()
            recorded = hasattr(self.source, "read_frame")
            if self._resume_id and recorded:  # a recorded file: is it the same scan?
                checkpoint.check_identity(self.source.read_frame(0), self._resume_id, self.source, self.out_dir)
            self.spool = spool.for_source(self.source, self.out_dir, self._resume, self.resuming)  # streams only
            self.stats.frames_total = self.source.n_frames
            self.background: BackgroundStage | None = None
            # a live scan resumed from its first frame is checked on it before any output is touched
            if self.source.frame_shape is not None and not (self._resume_id and not self._resume and not recorded):
                self._start_stages(self.source.frame_shape, self.source.dtype)
            elif not self.resuming:  # say it now, not after waiting for a scan that may take a while
                _previous_results(self.out_dir, overwrite)
        except BaseException:
            self.end("failed")
            raise

    def end(self, outcome: str) -> None:
        """Close the source and let the output folder go, ``outcome`` being finished, incomplete, stopped or
        failed: whatever way a run ends (or never started: its caller failed before `run`), this is called.

        A failed ``--overwrite`` run gives the earlier results back (see `dctstream.outdir`); a finished one
        drops them.  Safe to call again.
        """
        self._close_source()
        lock, self.lock = self.lock, None
        if lock is None:
            return
        try:
            if outcome == "finished":
                outdir.drop_previous(self.out_dir)
            elif outcome == "failed" and outdir.restore_previous(self.out_dir):
                checkpoint.finish_run(self.out_dir)  # nothing of the failed run stays to be resumed
                log.warning("%s: this run failed: the earlier results are back in place", self.out_dir)
        except OSError as exc:
            log.warning("%s: the earlier results could not be put back (%s): they are in %s", self.out_dir,
                        exc.strerror or exc, outdir.previous_dir(self.out_dir))
        finally:
            lock.release(remove=True)

    def _close_source(self) -> None:
        source = getattr(self, "source", None)  # None: opening it failed
        if source is not None and not self._source_closed:
            self._source_closed = True
            source.close()

    def _start_stages(self, shape, dtype) -> None:
        cfg = self.cfg
        self.detector = detector = Detector(cfg.detector, cfg.dark, shape, dtype)
        if self.distortion is not None:
            self.distortion.check_shape(shape)
        bbox = cfg.direct_beam.bbox
        if isinstance(bbox, tuple):
            x0, y0, w, h = bbox
            if x0 + w > shape[1] or y0 + h > shape[0]:
                raise ConfigError(f"direct_beam.bbox: {list(bbox)} reaches outside the frame of "
                                  f"{shape[1]} x {shape[0]} pixels (x, y)")
        bbox = detector.bin_bbox(bbox)
        check_memory(detector.shape, detector.dtype, cfg.background, cfg.segmentation.max_blob_size[2],
                     detector.binning)
        first_window = detector.first_window
        resume = {}
        if self._resume:
            if cfg.export.format == "stack":
                raise OutputError(f"{self.out_dir}: holds an unfinished run with export.format: {cfg.export.format}, "
                                  "whose corrected.h5 cannot be continued, expected a run without the export to "
                                  "resume; pass --overwrite to start again")
            resume = checkpoint.resume_background(self._resume, bbox)
            checkpoint.restore_detector(detector, *self._resume)
            first_window = None  # the first run's dark and mask, not estimated again mid-scan
        self._stage_args = dict(frame_shape=detector.shape, dtype=detector.dtype,
                                beam_margin_px=-(-cfg.direct_beam.margin_px // detector.binning),
                                filter_size=cfg.filter.median_size)
        self.background = BackgroundStage(cfg.background, **self._stage_args,
                                          dark=detector.dark, direct_beam=resume.get("direct_beam", bbox),
                                          gain=detector.gain,
                                          pixel_mask=detector.mask, first_window=first_window,
                                          follow_beam=cfg.direct_beam.bbox == "auto",
                                          **resume.get("stage", {}))
        # only now, with the frames' shape checked against the dark and the beam box, does output appear
        if not self.resuming:
            self.lock = prepare_output(self.out_dir, self.overwrite)
            checkpoint.start_run(self.out_dir, self._identity)
        else:
            self.lock = outdir.OutputLock(self.out_dir)
            checkpoint.forget_unsaved_difspots(self.out_dir, self._resume)
            dropped = outdir.drop_derived(self.out_dir)
            if dropped:
                log.info("%s: removed %s, made from the stopped run's results (export, resegment and tune make them "
                         "again from the whole ones)", self.out_dir, ", ".join(dropped))
        self.difspots = DifspotWriter(self.out_dir)
        (self.out_dir / "config.yml").write_text(dump_config(cfg))
        self.table = SpotTable(self.out_dir, {"config": dump_config(cfg), "version": __version__,
                                              "source": cfg.source.url}, distortion=self.distortion)
        self._writer = Worker(self._write_blob, BLOB_QUEUE_DEPTH, name="dctstream-write")
        self._segmenting = Worker(self._take_corrected, SEGMENT_QUEUE_DEPTH, name="dctstream-segment")
        if self._resume:
            _restore(self, *self._resume)

    def run(self, progress=None) -> Stats:
        """Process every frame of the source; ``progress(stats)`` is called after each frame.

        The source is read in a thread, corrected frames are segmented in
        another and difspots written in a third, each joined to the main
        thread (the background stage) by a bounded queue.
        """
        if not kernels_cached():
            log.info("compiling the numba kernels: the first run after installing dctstream takes 20-60 s more "
                     "before its first frames (cached for the next runs)")
        reader = Prefetch(self._read(), FRAME_QUEUE_DEPTH, name="dctstream-read")
        done = False
        failure = None
        outcome = "failed"
        try:
            try:
                for frame in reader:
                    self.stats.backlog_frames = reader.backlog
                    provisional = getattr(self.source, "provisional_from", None)
                    if provisional is not None and frame.index >= provisional:
                        self._finishing = True  # placed in psi as if the scan had ended: not to be continued
                    if self._tracker is not None:
                        self._place(frame)
                    elif frame.psi_deg is None:
                        if self._psi:  # rows with a psi are written already: the table cannot drop it now
                            raise InputError(f"source.angles: frame {frame.index}: no rotation angle, expected "
                                             f"one per frame as frames 0 to {len(self._psi) - 1} had (the "
                                             "angles stop before the frames)")
                        self._psi = None
                    elif self._psi is not None:
                        self._psi.append(frame.psi_deg)
                        if not self._sorted:
                            self._check_order(frame)
                    self._segment(self._push(frame))
                    if progress is not None:
                        progress(self.stats)
                if self.background is not None:
                    # the last frames' windows are shifted inside the scan: a checkpoint of them could not be
                    # continued if the scan turns out to go on (an incomplete scan resumed once it grew)
                    self._finishing = True
                    self._segment(self.background.finish())
                    self.stats.normalise = self.background.normalise_facts()
                self._close_segmenting()
                if self._first_frames:  # a scan of fewer corrected frames than the noise estimate takes
                    self._start_segmenter()
                if self._merge is not None:
                    for item in self._merge.finish():
                        self._segment_in_order(*item)
                    self._note_order()
                if self.segmenter is not None:
                    with self._timed("segment"):
                        blobs = self.segmenter.finish()
                    self._note_flooded()
                    self._write(blobs)
                if len(self._backward) > 1:
                    log.warning("%s came back in psi (out of psi order): processed in arrival order",
                                frames_text(self._backward))
                done = True
            except KeyboardInterrupt as exc:
                failure, outcome = exc, "stopped"
                raise
            except BaseException as exc:
                failure = exc
                raise
            finally:
                with interrupt.deferred():  # the files closed whole, however the run ends
                    if not done:
                        self.source.stop()  # a live source waiting for its next frame returns now
                    reader.close()
                    if reader.running:
                        self._source_closed = True  # closing it under the reader's feet could crash the process
                        log.warning("the source did not stop within 5 s; leaving it open")
                    else:
                        self._close_source()
                    self._close_outputs(raise_errors=done, failure=failure)
            with interrupt.deferred():  # every frame is in: a stop now would leave whole results called stopped
                self.stats.source_end = self.source.end_reason or "complete"
                self._judge_completeness()
                if self.stats.incomplete is None:
                    checkpoint.finish_run(self.out_dir)
                    outcome = "finished"
                else:
                    outcome = "incomplete"
                    final = self.stats.source_end in FINAL_ENDS
                    if final:  # nothing more can come: the run is over (the same command is refused, not resumed)
                        checkpoint.finish_run(self.out_dir)
                    if not self.transient:
                        log.warning("%s: the scan is incomplete (%s): the results so far are kept%s", self.out_dir,
                                    self.stats.incomplete, "; no more of its frames can come" if final else
                                    ", and the same command resumes it if the source has more frames")
        finally:
            if not self.keep_lock:
                self.end(outcome)
        if progress is not None:
            progress(self.stats)
        return self.stats

    def _judge_completeness(self) -> None:
        """Whether the source delivered the whole scan; if not, ``stats.incomplete`` says why."""
        stats, reason = self.stats, self.stats.source_end
        announced = self.cfg.source.expected_frames or self.source.frames_announced
        stats.frames_expected = announced or (self.source.n_frames if reason == "complete" else None)
        seen = f"{stats.frames_segmented} frames" + (f" of {announced} expected" if announced else "")
        if reason not in COMPLETE_ENDS or (announced and stats.frames_segmented < announced):
            stats.incomplete = f"{reason} after {seen}"

    def _read(self):
        """The source's frames, counted and timed; runs in the reader thread."""
        if self.spool is not None:  # a stream: its frames are spooled, and read back from the spool to resume
            frames = self.spool.frames(self.source)
        elif self._resume:
            frames = checkpoint.frames_from(self.source, self._resume[0]["first_raw"],
                                            self._resume[0].get("source_id"), self.out_dir)
        else:
            frames = iter(self.source)
        for frame in self._timed_items("read", frames):
            self.stats.frames_read += 1
            yield frame

    def lost_since(self, first_raw: int) -> tuple[int, dict[int, np.ndarray]]:
        """For a checkpoint (segmenting thread): how many frames before ``first_raw`` were lost, and the
        stand-ins of those lost from it on; the others are forgotten, never read again."""
        with self._lost_lock:
            for k in [k for k in self._lost if k < first_raw]:
                del self._lost[k]
                self._lost_before += 1
            return self._lost_before, dict(self._lost)

    def _close_segmenting(self) -> None:
        """Segment every corrected frame already handed over."""
        worker, self._segmenting = self._segmenting, None
        if worker is not None:
            worker.close()

    def _close_outputs(self, raise_errors: bool, failure: BaseException | None = None) -> None:
        """Write every difspot already handed over, then the table: nothing closed is lost on an error."""
        try:
            try:
                self._close_segmenting()
            finally:
                if self._writer is not None:
                    self._writer.close()
            if raise_errors:  # the scan is whole: its last frame meets its first if it is a full turn
                self._join_seam()
        except BaseException as exc:
            if raise_errors:
                raise
            if exc is failure:
                pass  # the writer's own error, already on its way to the user
            elif isinstance(exc, DctStreamError):
                log.warning("writing the last difspots failed too: %s", exc)
            else:
                log.exception("writing the last difspots failed")
        finally:
            try:
                if self.export is not None:
                    self._close_export(raise_errors)
            finally:  # the table is written whatever became of the export
                if self.table is not None:
                    if self._psi:
                        self.table.with_angles()
                    self.table.close()

    def _close_export(self, raise_errors: bool) -> None:
        try:
            if hasattr(self.export, "saturated"):  # the sparse scan keeps them, for resegment
                self.export.saturated = self._saturated
            self.export.close()
        except DctStreamError as exc:
            if raise_errors:
                raise
            log.warning("closing %s failed too: %s", self.export.path, exc)
            return
        self.stats.export_reduction = self.export.reduction
        self.table.update_attrs({"export_reduction": self.export.reduction})
        if isinstance(self.export, SparseScanWriter):
            self.stats.sparse_fill_fraction = self.export.fill_fraction
            self.stats.sparse_bytes_per_frame = self.export.bytes_per_frame

    def _join_seam(self) -> None:
        if self.table is not None and self._psi and seam.closes_turn(self._psi):
            log.warning("frame %d (psi %g) is frame 0's angle a whole turn later: the spots there are reported "
                        "twice, at both ends, not joined across 0/360 degrees (a recorded scan's file leaves that "
                        "frame out)", len(self._psi) - 1, self._psi[-1])
        if self.table is None or not seam.full_turn(self._psi):
            return
        n = len(self._psi)
        with self._timed("write"):
            joined = seam.join_across_seam(self.table, self.difspots, n, lambda c: seam.psi_at(self._psi, c),
                                           self.cfg.segmentation.connectivity, self.detector.binning,
                                           grow_ratio=self.cfg.segmentation.grow_ratio,
                                           reach_frames=self.cfg.segmentation.max_blob_size[2])
        self.stats.difspots_written -= joined
        self.stats.seam_joined = joined

    @contextmanager
    def _timed(self, stage: str):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.stats.add_stage_s(stage, time.perf_counter() - start)
            if stage == "write":  # one thread writes at a time: the writer's, then the seam's join at the end
                self.stats.write_cpu_s += time.thread_time() - cpu

    def _timed_items(self, stage: str, items: Iterator) -> Iterator:
        """The items of ``items``, the time spent making each counted to ``stage``."""
        while True:
            with self._timed(stage):
                item = next(items, None)
            if item is None:
                return
            yield item

    def _push(self, frame) -> Iterator[tuple[int, np.ndarray]]:
        data = frame.data
        if data is None:  # lost in transit: the source's missing-frame policy asked for a stand-in
            if self.background is None:
                raise InputError(f"frame {frame.index}: lost before any frame arrived, expected a first frame")
            known = self._known_stand_ins.pop(frame.index, None)
            data = self.background.stand_in() if known is None else known
            with self._lost_lock:
                self._lost[frame.index] = data
            self.stats.frames_missing += 1
            # a few are said; the count is in the status (so that they cannot crowd out the other warnings)
            (log.warning if self.stats.frames_missing <= MISSING_WARNINGS else log.debug)(
                "frame %d: lost in transit, replaced by the current background%s", frame.index,
                " (the next ones are counted, not logged)" if self.stats.frames_missing == MISSING_WARNINGS else "")
        else:
            if frame.index == 0:
                self._source_id = checkpoint.frame_identity(data)
                if self._resume_id:  # before the stages touch any output (see __init__)
                    checkpoint.check_identity(data, self._resume_id, self.source, self.out_dir)
            if self.background is None:
                self._start_stages(data.shape, data.dtype)
            if frame.index == 0:
                checkpoint.keep_source_id(self.out_dir, self._source_id)
            if not self._first_checked:
                self._first_checked = True
                self.detector.check_first_frame(data, self.cfg.source.url,
                                                invalid_value=getattr(self.source, "invalid_value", None),
                                                pixel_mask=getattr(self.source, "pixel_mask", None))
            self._note_saturated(self._pass_offset + self.background.ring.count, data)
            data = self.detector.bin(data)
        with self._timed("background"):
            corrected = self.background.push(data)
        if len(self.background.unusable) != (self.stats.normalise or {}).get("unusable_frames", 0):
            self.stats.normalise = self.background.normalise_facts()  # for the status, while it runs
        return corrected

    def _note_saturated(self, k: int, raw: np.ndarray) -> None:
        """Keep raw frame k's saturated pixels (said at the first); a frame read again (a resumed run) is
        counted once."""
        flat = self.detector.saturated(raw)
        if flat is None or k in self._saturated:
            return
        if self.stats.saturated_pixels + flat.size > SATURATED_KEEP_MAX:
            if self.stats.saturated_pixels <= SATURATED_KEEP_MAX:
                log.warning("frame %d: more than %d saturated pixels over the scan: those of this frame and the "
                            "next are not kept, their spots not flagged", k, SATURATED_KEEP_MAX)
                self.stats.saturated_pixels = SATURATED_KEEP_MAX + 1
            return
        if not self.stats.saturated_pixels:
            log.warning("frame %d: %d pixels at %d, the top of the frames' type (saturated): the spots on them "
                        "have touches_mask 1, their intensity a lower bound", k, flat.size, np.iinfo(raw.dtype).max)
        self.stats.saturated_pixels += int(flat.size)
        self._saturated[k] = flat

    def _segment(self, corrected: Iterator[tuple[int, np.ndarray]]) -> None:
        """Hand the corrected frames to the segmenting thread, one at a time: the background stage makes
        each on demand."""
        for k, *frames in self._timed_items("background", corrected):
            self.stats.frames_corrected += 1
            if self.background.follow_beam:
                self._note_beam(self._pass_offset + k, self.background.beam)
            self._segmenting.submit((self._pass_offset + k, *frames, self._own_noise(self._pass_offset + k, *frames)))

    def _own_noise(self, k: int, frame: np.ndarray, difference: np.ndarray):
        """Frame k's own noise and level (`own_maps`), made here, in the thread that corrects the frames, for the
        segmenting thread: that one bounds the rate, and this one waits for it (at 2048 x 2048 px the noise of
        a frame is 14 ms of CPU, a quarter of the segmenting thread's time). None before the segmenter starts
        (its mask is not known yet) and for frames it takes again on resuming."""
        segmenter, noise = self.segmenter, self.noise
        if segmenter is None or noise is None or k <= self._replay_until:
            return None
        with self._timed("segment"):
            return own_maps(frame, difference if segmenter.measured else None, self._noise_mask(k), noise.floor,
                            noise.tile_px)

    def _note_beam(self, k: int, box) -> None:
        """Frame k's beam box (main thread), for the segmenting thread and the run record."""
        track = self._beam_track
        if track and track[-1][1] == box:
            return
        track.append((k, box))
        unbin = self.detector.unbin_bbox
        self.stats.direct_beam_track = [[f, None if b is None else [int(v) for v in unbin(b)]] for f, b in track]

    def _beam_at(self, k: int):
        """The beam box of frame k, binned, or None."""
        return box_at(self._beam_track, k)

    def _noise_mask_for(self, k: int) -> None:
        """Give the noise tracker frame k's mask (`_noise_mask`)."""
        if self.background.follow_beam:
            self.noise.mask = self._noise_mask(k)

    def _noise_mask(self, k: int) -> np.ndarray:
        """Frame k's noise mask: the segmenter's and, followed along the scan, its beam box; made again only where
        the box changes (the beam moves seldom; a frame or two apart, both threads may make it at a change)."""
        if not self.background.follow_beam:
            return self.segmenter.mask
        beam = self._beam_at(k)
        made = self._noise_mask_made  # one tuple, replaced whole: either thread reads a box and its mask together
        if made is None or made[0] != beam:
            made = self._noise_mask_made = (beam, beam_mask(beam, self.segmenter.frame_shape) | self.segmenter.mask)
        return made[1]

    def _place(self, frame) -> None:
        """A frame of a scan of passes: a new pass gets a background of its own."""
        if frame.psi_deg is None:
            raise InputError(f"frame {frame.index}: no angle, expected one for every frame of a scan of passes "
                             "(source.interlaced_turns, or passes recognised in source.angles)")
        if self._tracker.add(frame.psi_deg) and self.background is not None:
            self._segment(self.background.finish())
            self._pass_offset = self._tracker.starts[-1]
            previous = self.background
            self.background = BackgroundStage(
                self.cfg.background, **self._stage_args, dark=previous.dark, gain=previous.gain,
                pixel_mask=previous.pixel_mask, follow_beam=previous.follow_beam,
                direct_beam="auto" if previous.follow_beam else previous.direct_beam or "none")
            log.info("frame %d: pass %d begins at psi %g", frame.index, len(self._tracker.starts), frame.psi_deg)

    def _check_order(self, frame) -> None:
        """A frame of a scan processed in arrival order that goes back in psi is said."""
        psi = self._psi
        step = np.sign(psi[-1] - psi[-2]) if len(psi) > 1 else 0.0
        if step == 0:
            return
        if self._direction == 0:
            self._direction = step
        elif step != self._direction:
            self._backward.append(frame.index)
            if len(self._backward) == 1:
                log.warning("frame %d: psi goes back from %g to %g degrees (frames out of psi order): processed "
                            "in arrival order, so spots across it may be split; a scan of interlaced turns or "
                            "back-and-forth passes needs source.interlaced_turns", frame.index, psi[-2], psi[-1])
            self.stats.frame_order = {"mode": "arrival", "frames_back": self._backward[:FLOOD_FRAMES_LISTED],
                                      "frames_back_total": len(self._backward)}

    def _note_follow(self, facts: dict) -> None:
        """How far a live scan handed on in psi order is behind its acquisition (the reader thread, its only
        writer then: `dctstream.order.PsiOrderFollow`)."""
        self.stats.frame_order = {**self.stats.frame_order, **facts}

    def _note_order(self) -> None:
        """How far the segmentation is behind the frames corrected, for the status and the run record."""
        merge = self._merge
        facts = dict(self.stats.frame_order or {})
        facts.update({"passes_seen": len(self._tracker.starts), "frames_behind": merge.held,
                      "most_frames_behind": merge.most_held, "held_pixels": merge.held_pixels,
                      "most_held_pixels": merge.most_held_pixels})
        if merge.disorder:
            if "out_of_order" not in facts:
                log.warning("frame %d: came after the frames beside it in psi were segmented (a pass more than "
                            "source.interlaced_turns says, or one out of order): segmented where it came",
                            merge.disorder[0])
            facts["out_of_order"] = merge.disorder[:FLOOD_FRAMES_LISTED]
            facts["out_of_order_total"] = len(merge.disorder)
        self.stats.frame_order = facts

    def _take_corrected(self, item: tuple[int, np.ndarray, np.ndarray, tuple | None]) -> None:
        """Runs in the segmenting thread."""
        if self.segmenter is None:  # the noise estimate waits for the first few usable frames
            self._first_frames.append(item[:3])
            if sum(k not in self.background.unusable for k, _, _ in self._first_frames) == NOISE_FRAMES:
                self._start_segmenter()
            return
        self._segment_frame(*item)

    def _segment_frame(self, k: int, frame: np.ndarray, difference: np.ndarray, own: tuple | None = None) -> None:
        """Frame k filtered (it finds the spots) and its unfiltered difference (it measures them); ``own``: its
        `own_maps`, if made already (`_own_noise`)."""
        measure = difference if self.segmenter.measured else None
        if k <= self._replay_until:  # resuming: corrected again only to rebuild the segmenter's frames
            if measure is not None:  # less the level it was measured above
                self._less_level(k, measure, self._levels[k])
            self.segmenter.load_frame(k, frame, measure)
            return
        with self._timed("segment"):
            if own is None:
                self._noise_mask_for(k)
            sigma = self.noise.push(k, frame, measure, own)
            if measure is not None:
                self._measure_above_level(k, measure)
            seed, low = frame_maps(self.cfg.segmentation, sigma)
        self._note_noise(k, sigma, seed)
        if self._merge is None:
            self._segment_in_order(k, frame, seed, low, measure, sigma)
            return
        # a scan of passes: held as its pixels a spot can hold until the last pass has reached its psi
        low_tiles = np.broadcast_to(np.asarray(frame_thresholds(self.cfg.segmentation, sigma)[1], np.float64),
                                    sigma.shape)
        low_map = pixel_map(low_tiles, TILE_PX, frame.shape)
        low_map[self.segmenter.mask] = np.inf  # never segmented: not kept
        for item in self._merge.put(k, frame, low_map, seed, low, measure, sigma):
            self._segment_in_order(*item)
        self._note_order()

    def _measure_above_level(self, k: int, measure: np.ndarray) -> None:
        """Frame k's unfiltered values less its level, kept for the sparse scan and, while the segmenter may
        need the frame again, for a checkpoint."""
        level = self._levels[k] = self.noise.level
        self._less_level(k, measure, level)
        middle = float(np.median(level))
        low, high = self.stats.background_level_range or (middle, middle)
        self.stats.background_level_range = (min(low, middle), max(high, middle))

    def _less_level(self, k: int, measure: np.ndarray, level: np.ndarray) -> None:
        """In place; a followed beam's box stays at 0 (see BackgroundStage)."""
        subtract_level(measure, level, box=self._beam_at(k) if self.background.follow_beam else None)

    def _segment_in_order(self, k: int, frame: np.ndarray, seed, low, measure, sigma) -> None:
        """Segment frame ``k`` (along psi: of a scan of passes, the k-th in psi order), then write, export and
        checkpoint what it completes."""
        with self._timed("segment"):
            blobs = self.segmenter.push(k, frame, seed, low, measure)
        self._note_flooded()
        self._write(blobs)
        if self.export is not None:
            with self._timed("export"):
                self._export(k, frame, measure, sigma)
        if self._merge is not None:  # never checkpointed
            self._levels.pop(self._merge.acquired[k], None)
        else:
            for f in [f for f in self._levels if f < self.segmenter.first_needed]:
                del self._levels[f]
        if self.frame_taps:
            with self._timed("taps"):
                for tap in self.frame_taps:
                    tap.on_corrected(k, frame)
        self.stats.frames_segmented += 1
        crash_point("frame")
        # saved by the writer, once the difspots before it are written; a scan of passes is never checkpointed
        if not self._finishing and self._merge is None and self._checkpointer.due(k):
            self._writer.submit(checkpoint.capture(self, k))

    def _export(self, k: int, frame: np.ndarray, difference: np.ndarray, sigma: np.ndarray) -> None:
        if not isinstance(self.export, SparseScanWriter):
            self.export.write(k, frame)
            return
        cut = sparse_cut(self.cfg.export, self.cfg.segmentation, sigma, self.segmenter.params.tile_px)
        self.export.write(k, frame, cut, sigma, self._psi[k] if self._psi and k < len(self._psi) else None,
                          difference if self.segmenter.measured else None,
                          self._levels.get(self._merge.acquired[k] if self._merge is not None else k))
        low, high = float(cut.min()), float(cut.max())
        if self._cut_range is not None:
            low, high = min(low, self._cut_range[0]), max(high, self._cut_range[1])
        self._cut_range = (low, high)
        self.stats.sparse_cut = sparse_cut_note(self.cfg.export, low, high)

    def _note_noise(self, k: int, sigma: np.ndarray, seed) -> None:
        """The noise and thresholds of frame k, and any seed flood, for the status and the run record."""
        stats = self.stats
        level = self.noise.series[-1]
        stats.noise_sigma = level
        low, high = stats.noise_sigma_range or (level, level)
        stats.noise_sigma_range = (min(low, level), max(high, level))
        if seed is not None:
            stats.seed_threshold = (float(seed.min()), float(seed.max()))
        # about 200 along a scan of known length; along a live one, 200 in its first 10,000 frames and 100 more
        # each time it doubles
        every = max(1, stats.frames_total // 200) if stats.frames_total else 50 << (k // 10_000).bit_length()
        if k % every == 0:  # a new list: a checkpoint taken before holds the one it took (replaced whole)
            stats.noise_sigma_by_frame = [*(stats.noise_sigma_by_frame or []), [k, round(level, 4)]]
        self._note_too_large()
        floods = self.segmenter.floods
        if len(floods) > self._floods_said:
            if self._floods_said == 0:
                f, n, factor = floods[0]
                log.warning("frame %d: %d seed regions (more than %d): a flood of noise, not spots -- the "
                            "background or the beam intensity changed faster than the median follows; its "
                            "thresholds were raised %gx to keep the speed (later such frames: see flood_frames "
                            "in the run record)", f, n, self.segmenter.flood_limit, factor)
            self._floods_said = len(floods)
            stats.flood_frames = [[int(f), int(n), float(c)] for f, n, c in floods[-FLOOD_FRAMES_LISTED:]]
            stats.flood_frames_total = len(floods)

    def _note_flooded(self) -> None:
        """Said once, at the first region found in a flood of noise (see segment.segmenter.FLOOD_SHARE)."""
        flooded, first_f, first_y, first_x = self.segmenter.flooded
        self.stats.flooded_spots = flooded
        if first_f < 0 or self._flooded_said:
            return
        self._flooded_said = True
        log.warning("frame %d: the maximum at (x %d, y %d) lies in a flood of noise -- more than %d %% of the pixels "
                    "around it above the lower growth threshold, or a connected region of more than %d voxels: the "
                    "background is not followed there (a wrong dark?); such spots are grown at their own threshold, "
                    "unsplit, or rejected as flooded (flooded_spots and rejected in the run record), so as to keep "
                    "the speed", first_f, first_x, first_y, round(100 * FLOOD_SHARE), COMPONENT_VOXELS)

    def _note_too_large(self) -> None:
        """Said once, when blobs cut by their growth box (max_blob_size either side of their maximum) are not a
        rare few: spots with long rocking curves (a fine psi step) or large grains are being lost."""
        segmenter = self.segmenter
        rejected = segmenter.rejected["too_large"]
        if self._too_large_said or rejected < TOO_LARGE_SAID or rejected < TOO_LARGE_FRACTION * segmenter.n_blobs:
            return
        self._too_large_said = True
        log.warning("%d blobs reaching past segmentation.max_blob_size %s (x, y, frames) from their maximum "
                    "rejected so far, up to %s in all: "
                    "spots with long rocking curves (a fine psi step) or large grains? raise max_blob_size "
                    "(`dctstream resegment` tries it on the sparse scan in seconds)", rejected,
                    list(self.cfg.segmentation.max_blob_size), list(segmenter.too_large_size))

    def segment_mask(self) -> np.ndarray:
        """Pixels never segmented: the direct beam and the detector's bad pixels; their facts go to the record."""
        detector, background = self.detector, self.background
        self.stats.direct_beam = detector.unbin_bbox(background.direct_beam)
        facts = detector.attrs()
        self.stats.dark, self.stats.binning = facts["dark"], facts["binning"]
        self.stats.masked_pixels = {**detector.mask_counts, "all": facts["masked_pixels"]}
        self.table.attrs.update(facts)
        if background.follow_beam:  # the beam's pixels of each frame read 0 (see BackgroundStage)
            mask = background.pixel_mask.copy()
        else:
            mask = beam_mask(background.direct_beam, background.frame_shape) | background.pixel_mask
        self._never = NeverSegmented(mask, self._beam_track, self.background.unusable, self._saturated)
        return mask

    def _start_segmenter(self) -> None:
        """Estimate the noise on the first corrected frames, start the segmenter and give it those frames."""
        first_frames = [frame for _, frame, _ in self._first_frames]
        first_measures = [difference for _, _, difference in self._first_frames]
        shape = self.background.frame_shape
        detector = self.detector
        mask = self.segment_mask()
        detector.write_mask(self.out_dir / "mask.h5", self.background.pixel_mask,
                            beam_mask(self.background.direct_beam, shape))
        floor = INTEGER_NOISE_FLOOR if detector.dtype.kind in "ui" else 0.0
        self.noise = NoiseTracker(shape, mask, floor=floor)
        if self.background.follow_beam:
            self.noise.mask = beam_mask(self._beam_at(self._first_frames[0][0]), shape) | mask
        if mask.all():  # nothing to segment: it was said as frames without noise (or found nothing, unsaid)
            bbox = self.cfg.direct_beam.bbox
            box = list(self.stats.direct_beam) if self.stats.direct_beam is not None else None
            bad = {k: v for k, v in detector.mask_counts.items() if v}
            ny, nx = detector.raw_shape
            what = (f"direct_beam.bbox: {list(bbox) if isinstance(bbox, tuple) else bbox}: the beam box {box} covers"
                    if beam_mask(self.background.direct_beam, shape).all() else
                    f"detector: the masked pixels ({bad}) and the direct beam {box} cover")
            raise InputError(f"{what} every pixel of the {ny} x {nx} frames, expected pixels left to segment")
        flat = all(not np.any(frame[~mask]) for frame in first_frames)
        if self.cfg.segmentation.seed_threshold == "auto" and flat:
            raise InputError(f"source.url: {self.cfg.source.url}: frames 0 to {len(first_frames) - 1} have no noise "
                             "after background correction (all-zero, saturated or constant frames, or a scan of "
                             "fewer than 3 frames?), expected detector counts with noise for "
                             "segmentation.seed_threshold: auto; set a number of counts instead")
        measured = self.background.filter_size > 1
        sigma = self._sigma = self.noise.prime(first_frames, first_measures if measured else None)
        if self.cfg.segmentation.seed_threshold == "auto" and not np.all(sigma > 0):
            raise InputError(f"source.url: {self.cfg.source.url}: frames 0 to {len(first_frames) - 1} have no noise "
                             "after background correction (constant float frames?), expected detector counts "
                             "with noise for segmentation.seed_threshold: auto; set a number of counts instead")
        gain = self.stats.photon_gain = self.background.photon_gain
        params = resolve_segmentation(self.cfg.segmentation, sigma, photon_gain=gain)
        seed = params.tile_maps(shape)[0]
        self.stats.noise_sigma = float(np.median(sigma))
        self.stats.seed_threshold = (float(np.min(seed)), float(np.max(seed)))
        self.stats.normalise = self.background.normalise_facts()
        log.info("direct beam %s, noise %.3g counts (median), seed threshold %.4g..%.4g counts, %s counts "
                 "per photon", self.stats.direct_beam, self.stats.noise_sigma, *self.stats.seed_threshold,
                 "unknown" if gain is None else f"{gain:.3g}")
        self.segmenter = Segmenter(params, shape, mask, measured=measured)
        if self._tracker is not None:
            self._merge = PassMerge(self._tracker, self._passes, shape)
            self._psi = self._merge.psi  # psi of the frames as segmented
        self.table.attrs.update({"seed_threshold_min": self.stats.seed_threshold[0],
                                 "seed_threshold_max": self.stats.seed_threshold[1],
                                 "noise_sigma_median": self.stats.noise_sigma,
                                 "photon_gain": -1.0 if gain is None else gain,
                                 "direct_beam_bbox": str(list(self.stats.direct_beam or []))})
        self._open_export(mask)
        held, self._first_frames = self._first_frames, []
        for item in held:
            self._segment_frame(*item)

    def _open_export(self, mask: np.ndarray, resume: dict | None = None) -> None:
        """The corrected-frame export, if any; ``resume``: a sparse writer's state from the checkpoint."""
        cfg, detector = self.cfg.export, self.detector
        if cfg.format == "none":
            return
        raw_frame_bytes = int(np.prod(detector.raw_shape)) * detector.raw_dtype.itemsize
        path = self.out_dir / "corrected.h5"
        if cfg.format == "stack":  # its stretch from the first frame leaves out that frame's beam, followed or not
            beam = beam_mask(self.background.direct_beam, mask.shape)
            self.export = CorrectedFrameWriter(path, cfg, mask.shape, mask | beam, raw_frame_bytes,
                                               binning=detector.binning)
            return
        self.export = SparseScanWriter(path, cfg, mask.shape, mask, self.segmenter.params.tile_px, raw_frame_bytes,
                                       binning=detector.binning, binning_mode=self.cfg.detector.binning_mode,
                                       angles=bool(self._psi) if resume is None else resume["angles"],
                                       direct_beam=self.stats.direct_beam, unfiltered=self.segmenter.measured,
                                       photon_gain=self.stats.photon_gain,
                                       resume=resume, stretch_mask=mask | beam_mask(self.background.direct_beam,
                                                                                    mask.shape))

    def _write(self, blobs) -> None:
        for blob in blobs:
            f0, y0, x0, f1, y1, x1 = blob.bbox
            blob = dataclasses.replace(blob, touches_mask=self._never.touches(f0, f1, y0, y1, x0, x1))
            self._writer.submit((blob, self._psi_at(blob.centroid[0]), self._acquired(blob.max_index[0])))
        self.stats.write_backlog = self._writer.backlog if self._writer is not None else 0
        if self.segmenter is not None:
            self.stats.rejected = Counter(self.segmenter.rejected)

    def _acquired(self, k: int) -> int | None:
        """The acquisition index of frame ``k`` as segmented (None: the same)."""
        if self._merge is not None:
            return self._merge.acquired[k]
        acquired = getattr(self.source, "acquired", None)
        return None if acquired is None else acquired(k)

    def _psi_at(self, frame: float) -> float | None:
        """Runs in the segmenting thread; the main thread appends to ``_psi`` (never shortens it once it holds
        an angle: see `run`), so one reference read here is consistent."""
        psi = self._psi
        if not psi:
            return None
        # between the two frames around it: O(1), not O(frames so far), per blob
        i = max(min(int(frame), len(psi) - 2), 0)
        return float(np.interp(frame, np.arange(i, i + 2)[:len(psi)], psi[i:i + 2]))

    def _write_blob(self, item) -> None:
        """Runs in the writer thread."""
        if isinstance(item, checkpoint.Snapshot):
            with self._timed("write"):
                item.save(self)
            return
        blob, psi, acquired = item
        blob = self.detector.unbin_blob(blob)
        with self._timed("write"):
            self._unsynced.append(self.difspots.write(blob, volume=blob.volume))
            row = self.table.add(blob, psi, acquired)
            self.stats.difspots_written += 1
            for tap in self.blob_taps:
                tap(blob, row)
            if time.monotonic() - self._flushed_s > TABLE_FLUSH_S:
                self.table.flush()
                self._flushed_s = time.monotonic()


def _restore(pipeline, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Put the checkpoint's state back into a pipeline whose stages were just built."""
    bg, stats = pipeline.background, pipeline.stats
    bg.emitted = meta["first_needed"]
    pipeline._sigma = arrays["sigma"]
    pipeline.stats.photon_gain = meta.get("photon_gain")
    pipeline._beam_track = [(int(f), None if b is None else tuple(b)) for f, b in meta.get("beam_track", [])
                            if f < meta["first_needed"]]
    pipeline.stats.direct_beam_track = [[f, None if b is None else [int(v) for v in pipeline.detector.unbin_bbox(b)]]
                                        for f, b in pipeline._beam_track] or None
    params = resolve_segmentation(pipeline.cfg.segmentation, pipeline._sigma, photon_gain=pipeline.stats.photon_gain)
    pipeline.table.attrs.update(meta["table"]["attrs"])
    mask = pipeline.segment_mask()
    pipeline.segmenter = Segmenter(params, bg.frame_shape, mask, measured=bg.filter_size > 1)
    pipeline.noise = NoiseTracker(bg.frame_shape, mask,
                                  floor=INTEGER_NOISE_FLOOR if pipeline.detector.dtype.kind in "ui" else 0.0)
    pipeline.noise.restore({name[len("noise_"):]: v for name, v in arrays.items() if name.startswith("noise_")})
    pipeline._levels = dict(zip(arrays["level_frames"].tolist(), arrays["levels"]))  # of the frames read again
    seg_meta = meta["segmenter"]
    pipeline.segmenter.restore({
        **seg_meta,
        "prev_labels": arrays["seg_prev_labels"], "parent": arrays["seg_parent"],
        "region_ids": arrays["seg_region_ids"], "open": arrays["seg_open"], "claimed": arrays["seg_claimed"],
        "regions": {name: arrays[f"seg_regions_{name}"] for name in ("count", "max_value", "max_index", "first")},
        "pending": {name: arrays[f"seg_pending_{name}"] for name in ("count", "max_value", "max_index", "first")},
        "low_tiles": arrays["seg_low_tiles"], "floods": arrays["seg_floods"],
    })
    pipeline._floods_said = len(pipeline.segmenter.floods)
    if "export" in meta:
        pipeline._open_export(mask, resume={**meta["export"], **{
            key: arrays[f"export_{key}"] for key in SparseScanWriter.STATE_ARRAYS}})
    pipeline._lost_before = meta["stats"]["frames_missing"]
    pipeline._known_stand_ins = dict(zip(arrays["lost_frames"].tolist(), arrays["lost_stand_ins"]))
    pipeline._replay_until = meta["frame"]
    # a source that says its frame shape only with its first frame (a stream, a folder) starts the stages once
    # that frame's psi was taken: it comes after the checkpoint's
    pipeline._psi = arrays["psi"].tolist() + pipeline._psi if meta["has_psi"] and pipeline._psi is not None else None
    if "saturated_frames" in arrays:  # of the frames not read again
        pipeline._saturated.update(saturated_from_arrays(arrays["saturated_frames"], arrays["saturated_flat"]))
        stats.saturated_pixels = int(arrays["saturated_flat"].size)
    pipeline.table.restore({name[len("table_"):]: v for name, v in arrays.items() if name.startswith("table_")})
    s = meta["stats"]
    stats.difspots_written, stats.frames_missing = s["difspots_written"], s["frames_missing"]
    stats.seed_threshold = tuple(s["seed_threshold"]) if s["seed_threshold"] else None
    stats.noise_sigma = s["noise_sigma"]
    stats.noise_sigma_range = tuple(s["noise_sigma_range"]) if s["noise_sigma_range"] else None
    stats.noise_sigma_by_frame = s["noise_sigma_by_frame"]
    stats.background_level_range = tuple(s["background_level_range"]) if s.get("background_level_range") else None
    stats.flood_frames, stats.flood_frames_total = s["flood_frames"], s["flood_frames_total"]
    stats.flooded_spots = pipeline.segmenter.flooded[0]
    pipeline._flooded_said = pipeline.segmenter.flooded[1] >= 0
    stats.sparse_cut = s.get("sparse_cut")
    pipeline._cut_range = tuple(s["cut_range"]) if s.get("cut_range") else None
    stats.normalise = bg.normalise_facts()
    stats.rejected = Counter(seg_meta["rejected"])
    stats.frames_read = meta["first_raw"]
    stats.frames_corrected = meta["first_needed"]
    stats.frames_segmented = meta["frame"] + 1
    log.info("resuming %s from its checkpoint at frame %d: reading again from frame %d, %d difspots so far",
             pipeline.out_dir, meta["frame"], meta["first_raw"], stats.difspots_written)


def run(cfg: Config, *, overwrite: bool = False, progress=None) -> Stats:
    return Pipeline(cfg, overwrite=overwrite).run(progress)
