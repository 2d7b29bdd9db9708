"""One recorded scan over several Dask workers, split along psi, with the outputs of one process.

The frames are divided into chunks, one Dask task each. What a frame's result depends on, and how a
chunk gets it exactly rather than approximately:

* **Background.** Frame k's background is the median of the raw frames of its window (shifted inside
  the scan at both ends), each brought to the beam intensity by its scale. A chunk starts its
  background stage at the first raw frame it needs, as a resumed run does, with the scan's first-window
  facts (dark estimate, bad pixels, direct beam, margin reference). With ``normalise: auto`` a frame's
  scale depends on the samples of the frames before it, which depend on their own scales: a chain back
  to frame 0. So one first task (`scan_context`) reads the scan once and measures every scale (only the
  sampled pixels are kept), beside the first-window facts and the first frames' noise.
* **Direct beam** (``bbox: auto``, followed along psi): frame k's box follows from frame k-1's and the beam
  found at k (every 10th frame). Each chunk follows it from the first window's box; where its boxes differ
  from the previous chunk's over the frames both corrected, it runs again from the box and finding that
  chunk reached (`beams_agree`, `beam_before`), one after another: exact, and free for a still beam.
* **Noise.** Frame k's noise is the median of the last 15 frames' tile noise (frames 0-4 share that of
  the five): a chunk corrects the 14 frames before its segmenter starts for that alone.
* **Segmentation** has no bound along psi in principle (a chain of ever brighter overlapping spots), so
  it is not cut: each chunk's segmenter starts empty ``pre`` frames before the chunk, and its state (open
  regions and their labels on the last frame, regions waiting to grow, claimed voxels, the oldest frame
  held) is fingerprinted at every 4th of the chunk's first ``post`` frames; the previous chunk, which runs
  ``post`` frames on, fingerprints the same frames. Where the two first agree, at frame c, both
  segmenters are in one state, so from c on the later one does exactly what one process does: the
  earlier chunk's blobs closed before c and the later's from c on are the scan's. Two chunks whose
  fingerprints never agree are run again as one (their outer edges are unchanged), so the result is
  exact whatever the scan, at worst as slow as one process.
* **Numbering.** One process numbers blobs in the order they close; the merge (`_merge`, in the
  calling process) numbers them on in that order, writes the difspots and the spot table, then joins
  the spots across 0/360 degrees as one process does.
* **Sparse scan.** A frame's part of it depends only on that frame's corrected values and noise: each chunk
  writes its own frames' part (float32), the merge appends the parts in order (`_merge_sparse`), stretched
  with ``export.dtype`` uint8/uint16 by frame 0's percentiles from the first task.

Each chunk's blobs wait in ``OUT/.dctstream/split/`` (a file system the workers share with the caller,
as a campaign's results need) until the merge. So does each task's result once it is done (`kept`): a run
killed and started again takes those from there and runs only the rest, then the merge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
import resource
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, checkpoint, outdir, seam
from .atomic import write_atomic
from .background import BackgroundStage
from .background.stage import frame_runs
from .config import Config, dump_config
from .detector import Detector
from .errors import ConfigError, InputError
from .direct_beam import NeverSegmented, beam_mask, box_at
from .order import classify
from .pipeline import (FLOOD_FRAMES_LISTED, INTEGER_NOISE_FLOOR, NOISE_FRAMES, Stats, frame_maps,
                       identity_config, prepare_output, resolve_segmentation, sparse_cut,
                       sparse_cut_note)
from .segment import Segmenter
from .segment.noise import HISTORY_FRAMES, NoiseTracker, subtract_level
from .sinks import DifspotWriter, SparseScanWriter, SpotTable
from .sinks.corrected import SparseScan, first_stretch
from .sources import open_source
from .sources.scan_file import resolve_auto
from .status import stats_dict

log = logging.getLogger(__name__)

SPLIT_DIR = "split"  # under OUT/.dctstream: each chunk's blobs until the merge
CONTEXT_FILE = "context.done"  # in SPLIT_DIR: the first task's result, kept for a restart
# A chunk's segmenter starts PRE_REACHES x (max_blob_size frames) before it, and its state is compared with
# the previous chunk's over its first POST_REACHES x that: enough for the regions open where it started
# empty to close and leave the frames it holds (about a spot's length and two reaches).
PRE_REACHES = 4
POST_REACHES = 2
MARGIN_FRAMES = 8
# The states are compared every so many frames of those: a fingerprint costs about a frame's segmentation
# (0.2 s at 1024 x 1024 on a loaded machine), an edge a few frames later costs nothing.
FINGERPRINT_EVERY = 4
# A chunk's segmenter starts where the noise of the frames before it is a plain 15-frame median.
FIRST_START = NOISE_FRAMES + HISTORY_FRAMES - 1


@dataclass(frozen=True)
class Chunk:
    """Frames [start, end) of the scan, segmented over [seg_start, seg_end): its blobs are those that close
    from the edge with the previous chunk (found in [start, start + post)) to the edge with the next."""

    start: int
    end: int
    seg_start: int
    seg_end: int
    post: int

    @property
    def lower(self) -> range:
        """Frames where its segmenter's state is compared with the previous chunk's (none for the first)."""
        return range(self.start, self.start + self.post, FINGERPRINT_EVERY) if self.start else range(0)

    @property
    def upper(self) -> range:
        return range(self.end, self.seg_end, FINGERPRINT_EVERY) if self.seg_end > self.end else range(0)


def overlaps(cfg: Config) -> tuple[int, int]:
    """(pre, post): frames a chunk's segmenter runs before it, and frames its start edge may move on."""
    reach = cfg.segmentation.max_blob_size[2]
    return PRE_REACHES * reach + MARGIN_FRAMES, POST_REACHES * reach + MARGIN_FRAMES


def plan(n_frames: int, parts: int, cfg: Config, starts=None) -> list[Chunk]:
    """``parts`` chunks of about equal length (or starting at ``starts``), fewer where the scan is too short
    for them: each chunk is at least ``post`` frames and starts at least ``pre`` + 19 frames into the scan."""
    pre, post = overlaps(cfg)
    if starts is None:
        starts = [round(i * n_frames / parts) for i in range(1, parts)]
    kept = [0]
    for s in sorted(int(s) for s in starts):
        if s - pre >= FIRST_START and s - kept[-1] >= post and s + post <= n_frames:
            kept.append(s)
    ends = kept[1:] + [n_frames]
    return [Chunk(s, e, max(s - pre, 0) if s else 0, min(e + post, n_frames), post) for s, e in zip(kept, ends)]


# -- what every chunk needs of the whole scan ---------------------------------------------------------


def _open_recorded(cfg: Config):
    source = open_source(cfg.source)
    if not (hasattr(source, "first_frame") and getattr(source, "n_frames", None)
            and getattr(source, "rereadable", True)):
        source.close()
        raise ConfigError(f"source.url: {cfg.source.url}: a scan split over workers must be a recorded file "
                          "(its frames read again by each worker), expected a file.h5::/dataset, not a stream or "
                          "a scan being acquired")
    angles = getattr(source, "angles", None)
    if cfg.source.order != "arrival" and isinstance(angles, np.ndarray) and angles.size > 1:
        kind, starts = classify(angles)
        if kind != "monotonic":
            source.close()
            what = (f"{len(starts)} passes, interlaced turns or back-and-forth, starting at frames "
                    f"{starts[:5]}{' ...' if len(starts) > 5 else ''}" if kind == "passes"
                    else f"the angles turn back {len(starts) - 1} time{'s' if len(starts) > 2 else ''}")
            raise ConfigError(f"source.url: {cfg.source.url}: the frames are not in psi order ({what}), expected "
                              "them in psi order to split the scan over workers (its chunks are cut in the order "
                              "the frames were taken); run it in one process, which reads it in psi order")
    missing = getattr(source, "missing", None)
    if missing is not None and np.size(missing):
        source.close()
        raise InputError(f"source.url: {cfg.source.url}: frames never written, expected every frame to split the "
                         "scan over workers; run it in one process (source.missing: repeat-background)")
    return source


def _detector(cfg: Config, source) -> Detector:
    detector = Detector(cfg.detector, cfg.dark, source.frame_shape, source.dtype)
    bbox = cfg.direct_beam.bbox
    if isinstance(bbox, tuple):
        x0, y0, w, h = bbox
        shape = source.frame_shape
        if x0 + w > shape[1] or y0 + h > shape[0]:
            raise ConfigError(f"direct_beam.bbox: {list(bbox)} reaches outside the frame of "
                              f"{shape[1]} x {shape[0]} pixels (x, y)")
    return detector


def _stage(cfg: Config, detector: Detector, direct_beam, **kw) -> BackgroundStage:
    return BackgroundStage(cfg.background, frame_shape=detector.shape, dtype=detector.dtype, dark=detector.dark,
                           direct_beam=direct_beam, beam_margin_px=-(-cfg.direct_beam.margin_px // detector.binning),
                           filter_size=cfg.filter.median_size, gain=detector.gain, pixel_mask=detector.mask, **kw)


def _follows(cfg: Config) -> bool:
    """Whether the direct beam is followed along psi (`BackgroundStage`'s ``follow_beam``), as one process."""
    return cfg.direct_beam.bbox == "auto"


def _noise_floor(detector: Detector) -> float:
    return INTEGER_NOISE_FLOOR if detector.dtype.kind in "ui" else 0.0


def scan_context(cfg: Config) -> dict:
    """What a process learns from the scan's first window and keeps: the dark, the bad pixels, the direct
    beam, the margin reference, the first frames' noise; and every frame's beam-intensity scale
    (``normalise: auto``), which depends on all the frames before it."""
    started = time.monotonic()
    source = _open_recorded(cfg)
    try:
        detector = _detector(cfg, source)
        follow = _follows(cfg)
        stage = _stage(cfg, detector, detector.bin_bbox(cfg.direct_beam.bbox), first_window=detector.first_window,
                       follow_beam=follow)
        frames = iter(source)
        first = []
        for frame in frames:
            if frame.index == 0:
                detector.check_first_frame(frame.data, cfg.source.url)
            for k, corrected, _ in stage.push(detector.bin(frame.data)):
                first.append((k, corrected))
            if sum(k not in stage.unusable for k, _ in first) >= NOISE_FRAMES:  # as one process
                break
        else:
            raise InputError(f"source.url: {cfg.source.url}: {source.n_frames} frames, too few to split: expected more "
                             f"than background.window={cfg.background.window} (one process fits the window to a "
                             "shorter scan; run it without --split)")
        usable = [i for i, (k, _) in enumerate(first) if k not in stage.unusable]
        first = [corrected for _, corrected in first[:usable[NOISE_FRAMES - 1] + 1]]
        mask = beam_mask(stage.direct_beam, stage.frame_shape) | stage.pixel_mask
        # as one process: the first frames' noise leaves out frame 0's box, followed or not
        noise_mask = beam_mask(box_at(stage.beam_track, 0), stage.frame_shape) | stage.pixel_mask if follow else mask
        sigma = NoiseTracker(stage.frame_shape, noise_mask, floor=_noise_floor(detector)).prime(first)
        photon = stage.photon_gain
        stretch = None
        if cfg.export.format == "sparse" and cfg.export.dtype != "float32":  # from frame 0, as one process
            stretch = first_stretch(cfg.export, first[0], ~mask)
        scales = None
        intensity = stage.intensity
        if intensity is not None and intensity.enabled:
            scales = list(stage.frame_scales)
            for frame in frames:  # the chain of scales, on the sampled pixels only
                raw = detector.bin(frame.data)
                scale = intensity.scale(frame.index, raw)
                intensity.add(frame.index, raw, scale)
                scales.append(scale)
            scales = np.asarray(scales, np.float64)
        return {
            "n_frames": int(source.n_frames), "psi": None if source.angles is None else source.angles.tolist(),
            "dark": stage.dark, "pixel_mask": stage.pixel_mask, "mask_counts": dict(detector.mask_counts),
            "dark_source": detector.dark_source, "direct_beam": stage.direct_beam, "margin_ref": stage.margin_ref,
            "auto_enabled": None if intensity is None else bool(intensity.enabled), "scales": scales,
            "beam_off_frames": None if intensity is None else len(intensity.beam_off),
            "sigma": sigma, "photon_gain": photon, "stretch": stretch, "elapsed_s": time.monotonic() - started,
            "peak_rss_mb": _peak_rss_mb(),
        }
    finally:
        source.close()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _restored_detector(cfg: Config, source, ctx: dict) -> Detector:
    detector = _detector(cfg, source)
    detector.dark, detector.mask = ctx["dark"], ctx["pixel_mask"]
    detector.mask_counts, detector.dark_source = dict(ctx["mask_counts"]), ctx["dark_source"]
    return detector


def first_raw_frame(cfg, k: int) -> int:
    """The first raw frame the background of frame ``k`` and the frames after it needs, at the start of a
    scan shifted as in `BackgroundStage` (block mode: the window of k's block)."""
    centre = k
    if cfg.mode == "block":
        centre = (k // cfg.stride) * cfg.stride + cfg.stride // 2
    return max(centre - cfg.window // 2, 0)


# -- one chunk, in a worker ----------------------------------------------------------------------------


def fingerprint(seg: Segmenter, offset: int) -> str | None:
    """A digest of everything of a segmenter's state that its future depends on besides the frames it will
    be given (regions by their maximum, frames counted from ``offset``); None while it holds frames from
    before its first (its start is still in its reach)."""
    if seg._low < 0:
        return None
    state = seg.state()
    ny, nx = seg.frame_shape
    digest = hashlib.sha256()

    def put(*arrays):
        for a in arrays:
            digest.update(np.ascontiguousarray(a).tobytes())
            digest.update(b"|")

    def rows(r):
        key = ((r["max_index"][:, 0] + offset) * ny + r["max_index"][:, 1]) * nx + r["max_index"][:, 2]
        order = np.argsort(key)
        return key, [key[order], r["count"][order], r["max_value"][order], r["first"][order] + offset]

    put(np.array([state["low"] + offset, state["last"] + offset], np.int64))
    key, columns = rows(state["regions"])
    put(*columns)
    key_of = dict(zip(state["region_ids"].tolist(), key.tolist()))
    root = dict(state["parent"].tolist())
    labels = state["prev_labels"].ravel()
    where = np.flatnonzero(labels)
    if where.size:
        lut = np.zeros(int(labels.max()) + 1, np.int64)
        for label in np.unique(labels[where]).tolist():
            lut[label] = key_of[root[label + state["prev_offset"]]]
        put(where, lut[labels[where]])
    put(*rows(state["pending"])[1])
    claimed = state["claimed"].copy()
    claimed[0] += offset
    put(claimed, state["low_tiles"])
    return digest.hexdigest()


def shifted(blob, offset: int):
    """``blob`` of a segmenter that started ``offset`` frames into the scan, in the scan's frames."""
    f, y, x = blob.max_index
    moments = blob.moments
    if moments is not None:
        moments = (moments[0], moments[1] + offset * moments[0], moments[2], moments[3])
    return dataclasses.replace(blob, frame=blob.frame + offset, max_index=(f + offset, y, x), moments=moments)


def sparse_part(spill: str | Path) -> Path:
    """The file of a chunk's part of the sparse scan, beside its blobs' ``spill``."""
    return Path(spill).with_suffix(".sparse.h5")


def run_chunk(cfg: Config, ctx: dict, chunk: Chunk, spill: str, cores: int = 1, beam: dict | None = None) -> dict:
    """Correct and segment ``chunk`` as one process does those frames; its blobs (each with the frame after
    which it closed, ``n_frames`` for the scan's end) go to the file ``spill``, and with ``export.format:
    sparse`` its frames' part of the sparse scan to `sparse_part` (float32: the merge stretches); returns the
    segmenter's fingerprints at its edges and the frames' facts. With the beam followed, the chunk starts
    from the first window's box, or from ``beam`` (``track`` and ``found`` before its first frame, as
    `beam_before` gives them), and its facts hold the box of every frame it corrected (``beam_track``)."""
    import numba

    numba.set_num_threads(max(1, min(cores, numba.config.NUMBA_NUM_THREADS)))
    started = time.monotonic()
    n = ctx["n_frames"]
    a, b = chunk.seg_start, chunk.seg_end
    noise_from = a - (HISTORY_FRAMES - 1) if a else 0
    part = None
    source = _open_recorded(cfg)
    try:
        detector = _restored_detector(cfg, source, ctx)
        first = max(min(first_raw_frame(cfg.background, noise_from), n - cfg.background.window), 0)
        # the scales measured by the first task, or placeholders for the frames before ``first``, so that the
        # stage's list of scales stays indexed by frame
        known = ctx["scales"] if ctx["scales"] is not None else np.full(first, np.nan)
        follow = _follows(cfg)
        stage = _stage(cfg, detector, ctx["direct_beam"] or "none", first_frame=first,
                       margin_ref=ctx["margin_ref"], known_scales=known, auto_enabled=ctx["auto_enabled"],
                       follow_beam=follow, beam_track=(beam or {}).get("track"), beam_found=(beam or {}).get("found"))
        stage.emitted = noise_from
        shape = stage.frame_shape
        # as one process: a followed beam's pixels read 0 in the frames, only the bad pixels are masked
        mask = stage.pixel_mask if follow else beam_mask(stage.direct_beam, shape) | stage.pixel_mask
        noise = NoiseTracker(shape, mask, floor=_noise_floor(detector))
        track: list[tuple[int, tuple | None]] = []  # the box of each frame corrected, where it changed

        noise_box: list = [None]  # the box noise.mask was made for

        def noise_mask(k: int) -> np.ndarray:
            """Frame k's noise mask (`Pipeline._noise_mask_for`), made again only when the box changed."""
            box = box_at(track, k) if follow else None
            if follow and box != noise_box[0]:
                noise_box[0] = box
                noise.mask = beam_mask(box, shape) | mask
            return noise.mask

        def corrected(frames):
            for item in frames:
                if follow and (not track or track[-1][1] != stage.beam):
                    track.append((item[0], stage.beam))
                yield item
        segmenter = Segmenter(resolve_segmentation(cfg.segmentation, ctx["sigma"], photon_gain=ctx["photon_gain"]),
                              shape, mask, measured=stage.filter_size > 1)
        psi = ctx["psi"]
        if cfg.export.format == "sparse":
            part = SparseScanWriter(sparse_part(spill), dataclasses.replace(cfg.export, dtype="float32"), shape,
                                    mask, segmenter.params.tile_px, 1, angles=bool(psi),
                                    unfiltered=segmenter.measured)
        held: list[tuple[int, np.ndarray, np.ndarray]] = []
        edges = set(chunk.lower) | set(chunk.upper)
        facts = {"fingerprints": {}, "rejected": {}, "noise": [], "level": [], "floods": [], "seed_threshold": None,
                 "scales": [], "blobs": 0, "fingerprint_s": 0.0, "beam_track": track, "saturated": {}}
        with open(spill, "wb") as out:

            def segment(k: int, frame: np.ndarray, difference: np.ndarray) -> None:
                if k in edges:
                    t = time.perf_counter()
                    facts["fingerprints"][k] = fingerprint(segmenter, a)
                    facts["rejected"][k] = _counts(segmenter)
                    facts["fingerprint_s"] += time.perf_counter() - t
                noise_mask(k)
                measure = difference if segmenter.measured else None
                sigma = noise.push(k, frame, measure)
                level = None if measure is None else noise.level
                if measure is not None:
                    subtract_level(measure, level, box=box_at(track, k) if follow else None)
                seed, low = frame_maps(cfg.segmentation, sigma)
                floods = len(segmenter.floods)
                keep(k, segmenter.push(k - a, frame, seed, low, measure))
                if chunk.start <= k < chunk.end:
                    if part is not None:
                        part.write(k - chunk.start, frame, sparse_cut(cfg.export, cfg.segmentation, sigma,
                                                                      segmenter.params.tile_px),
                                   sigma, psi[k] if psi else None, measure, level)
                    facts["noise"].append(float(np.median(sigma)))
                    if level is not None:
                        facts["level"].append(float(np.median(level)))
                    if len(segmenter.floods) > floods:
                        f, found, factor = segmenter.floods[-1]
                        facts["floods"].append([int(f) + a, int(found), float(factor)])
                    if seed is not None:
                        facts["seed_threshold"] = (float(seed.min()), float(seed.max()))

            def keep(k: int, blobs) -> None:
                if k < chunk.start:
                    return
                for blob in blobs:
                    pickle.dump((k, shifted(blob, a)), out, protocol=pickle.HIGHEST_PROTOCOL)
                    facts["blobs"] += 1

            def take(k: int, frame: np.ndarray, difference: np.ndarray) -> bool:
                """False once the chunk's last frame is segmented."""
                if k < a:  # only the noise and level of the frames before it
                    noise_mask(k)
                    noise.add(frame, difference if segmenter.measured else None)
                    return True
                if not a and k < NOISE_FRAMES:  # as one process: the first frames' noise, together
                    held.append((k, frame, difference))
                    if len(held) == NOISE_FRAMES:
                        noise_mask(0)
                        noise.prime([f for _, f, _ in held], [d for _, _, d in held] if segmenter.measured else None)
                        for item in held:
                            segment(*item)
                    return True
                segment(k, frame, difference)
                return k < b - 1

            going = True
            source.first_frame = first
            for frame in source:
                flat = detector.saturated(frame.data)
                if flat is not None:
                    facts["saturated"][frame.index] = flat
                for k, frame_k, difference in corrected(stage.push(detector.bin(frame.data))):
                    going = take(k, frame_k, difference)
                    if not going:
                        break
                if not going:
                    break
            if b == n:  # the scan's end: the last frames, then every region still open
                for k, frame_k, difference in corrected(stage.finish()):
                    take(k, frame_k, difference)
                for blob in segmenter.finish():
                    pickle.dump((n, shifted(blob, a)), out, protocol=pickle.HIGHEST_PROTOCOL)
                    facts["blobs"] += 1
                facts["rejected"][n] = _counts(segmenter)
            else:
                facts["rejected"][b] = _counts(segmenter)
        if part is not None:
            part.close()
        scales = stage.frame_scales[chunk.start:chunk.end]
        scales = [s for s in scales if s > 0]  # 0: an unusable frame (see background.stage)
        facts["scales"] = [min(scales), max(scales)] if scales else []
        facts["beam_off"] = [] if stage.intensity is None else [int(j) for j in stage.intensity.beam_off
                                                                 if chunk.start <= j < chunk.end]
        facts["beam_found"] = list(stage.beam_found)
        facts.update(elapsed_s=time.monotonic() - started, peak_rss_mb=_peak_rss_mb(),
                     frames_read=stage.ring.count - first, frames_segmented=b - a)
        return facts
    finally:
        source.close()
        if part is not None and part.h5.id.valid:  # failed: its file left as it is
            part.h5.close()


def kept(path: str, fn, *args):
    """``fn(*args)``, a dict, kept in the file ``path`` (written whole once it is done): a split run started
    again after a kill takes it from there (with ``kept: True``) rather than doing it again."""
    try:
        with open(path, "rb") as f:
            return {**pickle.load(f), "kept": True}
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        pass
    result = fn(*args)
    write_atomic(Path(path), pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return result


# -- the chunks' edges, and the merge -----------------------------------------------------------------


def edge(before: dict, after: dict, chunk: Chunk) -> int | None:
    """The first frame of ``chunk.lower`` where the two chunks' segmenters agree, or None."""
    for c in chunk.lower:
        mine = after["fingerprints"].get(c)
        if mine is not None and mine == before["fingerprints"].get(c):
            return c
    return None


def beams_agree(before: dict, after: dict, previous: Chunk) -> bool:
    """Whether two chunks gave every frame that both corrected the same beam box (nothing to check when the
    beam is not followed): the box of a frame follows from the one before and the frame's findings, so from
    the first frame the later chunk corrected on, it is then the box one process gives."""
    a, b = before.get("beam_track") or [], after.get("beam_track") or []
    if not a or not b:
        return True
    frames = sorted({f for f, _ in a} | {f for f, _ in b})
    first, last = b[0][0], previous.seg_end
    return all(box_at(a, f) == box_at(b, f) for f in [first, *frames] if first <= f < last)


def beam_before(facts: dict, frame: int) -> dict:
    """What a chunk starting at ``frame`` needs of the beam followed so far (a chunk's ``facts``): the box
    track and the findings before it."""
    return {"track": [(f, b) for f, b in facts["beam_track"] if f < frame][-1:],
            "found": [(f, b) for f, b in facts["beam_found"] if f < frame][-1:]}


def merged_track(chunks, facts) -> list[tuple[int, tuple | None]]:
    """The box of every frame, each chunk's over its own frames, where it changed."""
    track: list[tuple[int, tuple | None]] = []
    for chunk in chunks:
        mine = facts[chunk].get("beam_track") or []
        for f, box in [(chunk.start, box_at(mine, chunk.start)), *[(f, b) for f, b in mine
                                                                   if chunk.start < f < chunk.end]]:
            if not track or track[-1][1] != box:
                track.append((f, box))
    return track


def _read_blobs(path: Path):
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def _counts(segmenter: Segmenter) -> dict:
    """The rejections so far, and the spots grown in a flood of noise (`flooded_spots`, see segmenter.FLOOD_SHARE)."""
    return {**segmenter.rejected, "flooded_spots": segmenter.flooded[0]}


def _counter_between(facts: dict, c0: int, c1: int) -> dict:
    start, end = facts["rejected"].get(c0, {}), facts["rejected"][c1]
    return {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0)}


def run_split(cfg: Config, client, parts: int, *, overwrite: bool = False, starts=None, cores: int = 1,
              resources: dict | None = None) -> dict:
    """Process the recorded scan of ``cfg`` in ``parts`` chunks on the Dask ``client``, into ``cfg.output.dir``
    exactly as one process does; returns the run record (``split`` says how the chunks went).

    ``cores``: numba threads a chunk uses; ``resources``: what a chunk takes of a worker (`campaign.open_client`'s:
    a batch job's worker runs one chunk at a time on its cores)."""
    from .dct_table import export_dct
    from .record import run_record, write_record

    started_wall = time.time()
    started = time.monotonic()
    cfg, auto_found = resolve_auto(cfg)
    if cfg.export.format == "stack":
        raise ConfigError("export.format: stack: a scan split over workers writes no stack of corrected frames, "
                          "expected sparse (the default) or none; run it in one process for the stack")
    source = _open_recorded(cfg)
    n = source.n_frames
    source.close()
    chunks = plan(n, parts, cfg, starts)
    if len(chunks) < parts:
        pre, post = overlaps(cfg)
        log.warning("--split %d: %d chunks of %d frames: a chunk starts at least %d frames into the scan and is at "
                    "least %d frames long", parts, len(chunks), n, pre + FIRST_START, post)
    out_dir = Path(cfg.output.dir)
    outdir.check_free(out_dir)
    identity = identity_config(cfg)
    spill_dir = out_dir / checkpoint.RUN_DIR / SPLIT_DIR
    resuming = not overwrite and checkpoint.unfinished_run(out_dir, identity)
    if resuming:  # a split run killed: what its tasks finished is kept in spill_dir, the rest runs again
        lock = outdir.OutputLock(out_dir)
        checkpoint.forget_unsaved_difspots(out_dir, None)
    else:
        lock = prepare_output(out_dir, overwrite)
    outcome = "failed"
    try:
        if not resuming:
            shutil.rmtree(spill_dir, ignore_errors=True)
        checkpoint.start_run(out_dir, identity)
        spill_dir.mkdir(parents=True, exist_ok=True)
        extra = {"resources": resources} if resources else {}
        # a key of its own for each attempt: the scheduler may still hold a killed attempt's tasks (failed)
        tag = f"dctstream-split-{out_dir.name}-{uuid.uuid4().hex[:8]}"
        ctx_future = client.submit(kept, str(spill_dir / CONTEXT_FILE), scan_context, cfg, pure=False,
                                   key=f"{tag}-context", **extra)

        beam_given: dict[Chunk, dict] = {}  # chunks run again from the previous one's beam

        def submit(chunk: Chunk):
            name = f"{chunk.seg_start:09d}-{chunk.seg_end:09d}" + ("-beam" if chunk in beam_given else "")
            path = spill_dir / f"{name}.pkl"
            future = client.submit(kept, str(path.with_suffix(".done")), run_chunk, cfg, ctx_future, chunk,
                                   str(path), cores, beam_given.get(chunk), pure=False, key=f"{tag}-{name}",
                                   **extra)
            return future, path

        runs = {chunk: submit(chunk) for chunk in chunks}
        log.info("%s: %d frames in %d chunks, starting at frames %s", cfg.source.url, n, len(chunks),
                 [c.start for c in chunks])
        ctx = ctx_future.result()
        log.info("first window and beam-intensity scales: %.1f s", ctx["elapsed_s"])
        facts = {}
        for i, chunk in enumerate(chunks):
            facts[chunk] = runs[chunk][0].result()
            log.info("chunk %d of %d (frames %d-%d): %d blobs, %.1f s, peak memory %.0f MB", i + 1, len(chunks),
                     chunk.start, chunk.end - 1, facts[chunk]["blobs"], facts[chunk]["elapsed_s"],
                     facts[chunk]["peak_rss_mb"])
        rerun = beam_rerun = 0
        for i in range(1, len(chunks)):  # a beam that moved: a chunk from the box one process has there
            p, q = chunks[i - 1], chunks[i]
            if not beams_agree(facts[p], facts[q], p):
                log.warning("frames %d-%d: the direct beam followed from the first window's box is not where the "
                            "frames before took it: run again from there", q.start, q.end - 1)
                beam_given[q] = beam_before(facts[p], q.seg_start - (HISTORY_FRAMES - 1))
                runs[q] = submit(q)
                facts[q] = runs[q][0].result()
                beam_rerun += 1
        while True:  # edges where two chunks' segmenters never agreed: those two as one chunk
            edges = [edge(facts[p], facts[q], q) for p, q in zip(chunks, chunks[1:])]
            if all(e is not None for e in edges):
                break
            i = edges.index(None)
            p, q = chunks[i], chunks[i + 1]
            joined = Chunk(p.start, q.end, p.seg_start, q.seg_end, p.post)
            if p in beam_given:
                beam_given[joined] = beam_given[p]
            log.warning("frames %d-%d: the segmenters of two chunks did not agree within %d frames of their edge: "
                        "run again as one chunk", q.start, q.start + q.post - 1, q.post)
            runs[joined] = submit(joined)
            facts[joined] = runs[joined][0].result()
            chunks[i:i + 2] = [joined]
            rerun += 1
        bounds = [0] + edges + [n + 1]
        stats, split = _merge(cfg, ctx, chunks, facts, bounds, [runs[c][1] for c in chunks], out_dir)
        split.update(chunks=[[c.start, c.end] for c in chunks], edges=edges, rerun=rerun, beam_rerun=beam_rerun,
                     parts=parts,
                     kept=[[c.start, c.end] for c in chunks if facts[c].get("kept")],
                     kept_context=bool(ctx.get("kept")),
                     elapsed_s=round(time.monotonic() - started, 3))
        checkpoint.finish_run(out_dir)  # the chunks' files too
        outcome = "finished"
        try:
            export_dct(out_dir, finished=True)
        except Exception as exc:
            log.warning("difspot table (difspot.h5, difspot.csv) not written: %s", exc)
        snap = {"state": "finished", "version": __version__, "stats": stats_dict(stats),
                "started_utc": _utc(started_wall), "ended_utc": _utc(time.time()), "warnings": []}
        snap["stats"]["elapsed_s"] = round(time.monotonic() - started, 3)
        record = run_record(cfg, snap, auto=auto_found)
        record["split"] = split
        write_record(out_dir, record)
        return record
    finally:
        if outcome == "finished":
            outdir.drop_previous(out_dir)
        elif outdir.restore_previous(out_dir):
            checkpoint.finish_run(out_dir)
        lock.release(remove=True)


def _utc(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _merge(cfg: Config, ctx: dict, chunks, facts, bounds, spills, out_dir: Path):
    """Write the difspots and the spot table from the chunks' blobs, each chunk's from its lower edge to its
    upper one, numbered in the order they closed; then the seam across 0/360 degrees."""
    source = _open_recorded(cfg)
    try:
        detector = _restored_detector(cfg, source, ctx)
    finally:
        source.close()
    n = ctx["n_frames"]
    shape = detector.shape
    beam = ctx["direct_beam"]
    detector.write_mask(out_dir / "mask.h5", ctx["pixel_mask"], beam_mask(beam, shape))
    # frames whose scale is 0 (see background.stage), in order
    unusable = [] if ctx["scales"] is None else np.flatnonzero(np.asarray(ctx["scales"]) == 0).tolist()
    saturated = {k: flat for chunk in chunks for k, flat in facts[chunk].get("saturated", {}).items()}
    if _follows(cfg):
        track = merged_track(chunks, facts)
        never = NeverSegmented(ctx["pixel_mask"], track, set(unusable), saturated)
    else:
        track = None
        never = NeverSegmented(beam_mask(beam, shape) | ctx["pixel_mask"], unusable=set(unusable),
                               saturated=saturated)
    stats = Stats(frames_total=n, frames_read=n, frames_corrected=n, frames_segmented=n, source_end="complete",
                  frames_expected=n)
    stats.direct_beam = detector.unbin_bbox(beam)
    if track:
        stats.direct_beam_track = [[f, None if b is None else [int(v) for v in detector.unbin_bbox(b)]]
                                   for f, b in track]
    facts_d = detector.attrs()
    stats.dark, stats.binning = facts_d["dark"], facts_d["binning"]
    stats.masked_pixels = {**detector.mask_counts, "all": facts_d["masked_pixels"]}
    params = resolve_segmentation(cfg.segmentation, ctx["sigma"], photon_gain=ctx["photon_gain"])
    seed = params.tile_maps(shape)[0]
    attrs = {"config": dump_config(cfg), "version": __version__, "source": cfg.source.url, **facts_d,
             "seed_threshold_min": float(np.min(seed)), "seed_threshold_max": float(np.max(seed)),
             "noise_sigma_median": float(np.median(ctx["sigma"])),
             "photon_gain": -1.0 if ctx["photon_gain"] is None else ctx["photon_gain"],
             "direct_beam_bbox": str(list(stats.direct_beam or []))}
    stats.photon_gain = ctx["photon_gain"]
    stats.saturated_pixels = sum(int(flat.size) for flat in saturated.values())
    (out_dir / "config.yml").write_text(dump_config(cfg))
    table = SpotTable(out_dir, attrs)
    difspots = DifspotWriter(out_dir)
    psi = ctx["psi"]
    rejected: dict[str, int] = {}
    next_id = 0
    for i, (chunk, path) in enumerate(zip(chunks, spills)):
        c0, c1 = bounds[i], bounds[i + 1]
        for k, blob in _read_blobs(path):
            if not c0 <= k < c1:
                continue
            at = None if psi is None else _psi_at(psi, blob.centroid[0])
            f0, y0, x0, f1, y1, x1 = blob.bbox
            blob = detector.unbin_blob(dataclasses.replace(blob, id=next_id,
                                                           touches_mask=never.touches(f0, f1, y0, y1, x0, x1)))
            difspots.write(blob, volume=blob.volume)
            table.add(blob, at)
            next_id += 1
        f = facts[chunk]
        last = max(f["rejected"]) if c1 > n else c1
        for key, v in _counter_between(f, c0, last).items():
            rejected[key] = rejected.get(key, 0) + v
    stats.difspots_written = next_id
    stats.flooded_spots = rejected.pop("flooded_spots", 0)
    stats.rejected.update(rejected)
    if psi is not None and seam.full_turn(psi):
        joined = seam.join_across_seam(table, difspots, n, lambda c: seam.psi_at(psi, c),
                                       cfg.segmentation.connectivity, detector.binning,
                                       grow_ratio=params.grow_ratio, reach_frames=params.max_size[2])
        stats.difspots_written -= joined
        stats.seam_joined = joined
    if cfg.export.format == "sparse":
        _merge_sparse(cfg, ctx, chunks, [sparse_part(p) for p in spills], out_dir, detector, params.tile_px,
                      stats, table, saturated)
    if psi:
        table.with_angles()
    table.close()
    noise = [v for c in chunks for v in facts[c]["noise"]]
    if noise:
        stats.noise_sigma = noise[-1]
        stats.noise_sigma_range = (min(noise), max(noise))
        every = max(1, n // 200)
        stats.noise_sigma_by_frame = [[k, round(v, 4)] for k, v in enumerate(noise) if k % every == 0]
    level = [v for c in chunks for v in facts[c].get("level", ())]  # (chunks kept from a version before it: none)
    if level:
        stats.background_level_range = (min(level), max(level))
    floods = [fl for c in chunks for fl in facts[c]["floods"]]
    if floods:
        stats.flood_frames, stats.flood_frames_total = floods[-FLOOD_FRAMES_LISTED:], len(floods)
    stats.seed_threshold = facts[chunks[-1]]["seed_threshold"] or (float(np.min(seed)), float(np.max(seed)))
    scales = [s for c in chunks for s in facts[c]["scales"]]
    stats.normalise = {"mode": cfg.background.normalise}
    if ctx["auto_enabled"] is not None:
        stats.normalise.update(measured=ctx["auto_enabled"], beam_off_frames=ctx["beam_off_frames"]
                               if ctx["auto_enabled"] else 0)
    if cfg.background.normalise == "auto":
        stats.normalise.update(unusable_frames=len(unusable), unusable=frame_runs(unusable))
    if scales:
        stats.normalise.update(scale_min=round(min(scales), 5), scale_max=round(max(scales), 5))
    split = {"workers_peak_rss_mb": round(max([facts[c]["peak_rss_mb"] for c in chunks]
                                              + [ctx["peak_rss_mb"]]), 1),
             "context_s": round(ctx["elapsed_s"], 3),
             "chunk_s": [round(facts[c]["elapsed_s"], 3) for c in chunks],
             "fingerprint_s": [round(facts[c]["fingerprint_s"], 3) for c in chunks],
             "frames_read": int(sum(facts[c]["frames_read"] for c in chunks))}
    return stats, split


def _merge_sparse(cfg: Config, ctx: dict, chunks, parts, out_dir: Path, detector: Detector, tile_px: int,
                  stats: Stats, table: SpotTable, saturated: dict) -> None:
    """``OUT/corrected.h5`` from the chunks' parts, frame by frame as one process writes it, with the scan's
    ``saturated`` pixels."""
    shape = detector.shape
    # as one process: with the beam followed (bbox auto) the sparse scan's mask is the bad pixels only, the
    # beam's pixels reading 0 (the chunks' parts hold none of them either)
    mask = ctx["pixel_mask"] if cfg.direct_beam.bbox == "auto" else beam_mask(ctx["direct_beam"], shape) | ctx["pixel_mask"]
    psi = ctx["psi"]
    measured = None
    writer = None
    low = high = None
    try:
        for chunk, path in zip(chunks, parts):
            with SparseScan(path) as part:
                if len(part) != chunk.end - chunk.start:
                    raise InputError(f"{path}: {len(part)} frames, expected {chunk.end - chunk.start} (frames "
                                     f"{chunk.start} to {chunk.end - 1}): a chunk's part of the sparse scan")
                if writer is None:
                    measured = part.unfiltered
                    writer = SparseScanWriter(out_dir / "corrected.h5", cfg.export, shape, mask, tile_px,
                                              int(np.prod(detector.raw_shape)) * detector.raw_dtype.itemsize,
                                              binning=detector.binning, binning_mode=cfg.detector.binning_mode,
                                              angles=bool(psi), direct_beam=stats.direct_beam, unfiltered=measured,
                                              photon_gain=ctx["photon_gain"])
                    if ctx["stretch"] is not None:
                        writer.set_stretch(ctx["stretch"])
                for f, *pixels in part.frames(unfiltered=measured):
                    k = chunk.start + f
                    writer.write_pixels(k, *pixels[:3], part.cut[f], part.noise_sigma[f], psi[k] if psi else None,
                                        pixels[3] if measured else None, part.level[f])
                cuts = (float(part.cut.min()), float(part.cut.max()))
                low, high = (cuts if low is None else (min(low, cuts[0]), max(high, cuts[1])))
        writer.saturated = saturated
        writer.close()
    finally:
        if writer is not None and writer.h5.id.valid:
            writer.h5.close()
    stats.export_reduction = writer.reduction
    table.update_attrs({"export_reduction": writer.reduction})
    stats.sparse_fill_fraction, stats.sparse_bytes_per_frame = writer.fill_fraction, writer.bytes_per_frame
    stats.sparse_cut = sparse_cut_note(cfg.export, low, high)


def _psi_at(psi: list[float], frame: float) -> float:
    """As `Pipeline._psi_at`: between the two frames around it."""
    i = max(min(int(frame), len(psi) - 2), 0)
    return float(np.interp(frame, np.arange(i, i + 2)[:len(psi)], psi[i:i + 2]))
