"""Crash-resume: the state of a run, saved now and then, so that the same command continues it.

The pipeline is deterministic: the same frames and configuration give the same
difspots, ids and files. So a run killed at any instant (SIGKILL included)
continues from its last checkpoint and ends with the outputs of a run never
interrupted:

* ``OUT/.dctstream/running`` holds the configuration of a run under way; it is
  written before any result and removed once the run is complete. A run
  started on a folder that holds it, with the same configuration, resumes;
  with another configuration it is refused (``--overwrite`` starts afresh).
* ``OUT/.dctstream/checkpoint.npz``, at the end of frame c (every
  ``output.checkpoint_every_s`` seconds or ``output.checkpoint_every_frames``
  frames, only between frames, so never while a difspot or the table is half
  written): the segmenter's state without its frames (regions, frontier,
  claimed voxels as a sparse list), the noise map, the direct-beam box, the
  margin reference, the angles read so far, the spot table's rows, the
  counters and the sparse scan's counts with what is not yet in
  ``corrected.h5`` (less than a chunk of pixels; a resumed run copies the
  file up to that point to a new file and continues it). Written to a temporary file, synced, renamed; the difspot files
  it counts are synced first.
* On resume the background stage starts again at the first raw frame the
  segmenter's oldest needed frame depends on (``BackgroundStage.first_raw_frame``),
  so only O(window + segmenter reach) frames are read again: corrected frames
  up to c are put back in the segmenter (not segmented again), and frames
  after c are processed as usual. Difspots found after the checkpoint are
  written again, identical, under the same ids (each file appears by an atomic
  rename, so none is ever half written); ``spots.h5`` is rewritten from the
  rows.

File and folder sources read their frames again from the file. A stream cannot
be read again: its frames are kept in ``OUT/.dctstream/spool/`` as they arrive
(``spool``), and each checkpoint syncs those from its ``first_raw`` on, then
deletes those before; a resumed stream run reads them back, then the live
stream continues the series after the last one. ``DCTSTREAM_CRASH_AT``
(``difspot:N``, ``table:N``, ``checkpoint:N`` or ``frame:N``) makes the
process kill itself inside the N-th such write, for tests only.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import zipfile
from contextlib import suppress
from pathlib import Path

import numpy as np
import yaml

from .atomic import sync_files, write_atomic
from .direct_beam import saturated_arrays
from .errors import AnotherScanError, OutputError

log = logging.getLogger(__name__)

RUN_DIR = ".dctstream"
LOCK = "lock"  # dctstream.outdir's
MARKER = "running"
CHECKPOINT = "checkpoint.npz"
SOURCE_ID = "source"  # frame 0's identity (`frame_identity`), from the first frame on: before any checkpoint
FORMAT = 4  # 3: the stand-ins of lost frames; 4: the levels of the frames read again


def marker_path(out_dir: Path) -> Path:
    return Path(out_dir) / RUN_DIR / MARKER


def unfinished_run(out_dir: Path, config_text: str) -> bool:
    """Whether ``out_dir`` holds an unfinished run of this configuration (to resume): the same effective
    settings, however written, those that cannot change a result (`RUN_ONLY`) left out.

    Raises `OutputError` naming the first setting that differs when it holds one of another configuration.
    """
    marker = marker_path(out_dir)
    try:
        previous = marker.read_text()
    except (FileNotFoundError, NotADirectoryError):  # no run under way, or not even a folder (said later)
        return False
    except OSError as exc:
        raise OutputError(f"{marker}: cannot read ({exc.strerror})") from None
    changed = _first_difference(previous, config_text)
    if changed is not None:
        raise OutputError(f"{out_dir}: holds an unfinished run of another configuration ({changed}), expected "
                          "the same command to resume it; pass --overwrite to start again")
    return True


# Settings of how a run is watched, checkpointed or spread over a cluster: a resumed run may change them.
RUN_ONLY = ("status.", "watch.", "cluster.", "output.checkpoint_every_s", "output.checkpoint_every_frames")


def _settings(text: str) -> dict:
    """``section.key`` -> value of a dumped configuration."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = None
    if not isinstance(tree, dict):
        return {"(the configuration)": text}
    flat = {}
    for section, keys in tree.items():
        for key, value in (keys.items() if isinstance(keys, dict) else [("", keys)]):
            name = f"{section}.{key}"
            if not name.startswith(RUN_ONLY):
                flat[name] = value
    return flat


def _first_difference(old: str, new: str) -> str | None:
    """The first setting whose value differs between two dumped configurations, said as
    ``section.key: was A, now B``; None when they are the same."""
    if old == new:
        return None
    before, after = _settings(old), _settings(new)
    for name in [*after, *(k for k in before if k not in after)]:
        if before.get(name, "(not set)") != after.get(name, "(not set)"):
            return f"{name}: was {before.get(name, '(not set)')!r}, now {after.get(name, '(not set)')!r}"
    return None


def start_run(out_dir: Path, config_text: str) -> None:
    """Mark ``out_dir`` as holding a run under way, before any result appears; a checkpoint of an
    earlier run (replaced by ``--overwrite``) goes first, so that it can never be taken for this one's."""
    with suppress(FileNotFoundError):
        (Path(out_dir) / RUN_DIR / CHECKPOINT).unlink()
    write_atomic(marker_path(out_dir), config_text.encode(), sync=True, crash="marker")


def finish_run(out_dir: Path) -> None:
    """The run is complete: forget its checkpoint, then the marker, then the rest (a stream's spool)."""
    folder = Path(out_dir) / RUN_DIR
    with suppress(FileNotFoundError):
        (folder / CHECKPOINT).unlink()
    with suppress(FileNotFoundError):
        marker_path(out_dir).unlink()
    with suppress(FileNotFoundError):
        for item in folder.iterdir():
            if item.name == LOCK:  # held by this run until it lets the folder go
                continue
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    with suppress(OSError):
        folder.rmdir()


class Checkpointer:
    """Decides when a checkpoint is due, and writes it."""

    def __init__(self, out_dir: Path, every_s: float, every_frames: int):
        self.path = Path(out_dir) / RUN_DIR / CHECKPOINT
        self.every_s = every_s
        self.every_frames = every_frames
        self._last_s = time.monotonic()
        self._last_frame = -1

    def due(self, k: int) -> bool:
        if self.every_frames and k - self._last_frame >= self.every_frames:
            return True
        return time.monotonic() - self._last_s >= self.every_s

    def taken(self, k: int) -> None:
        """A snapshot of frame ``k`` was taken (it is saved later, by the writer)."""
        self._last_s, self._last_frame = time.monotonic(), k

    def save(self, meta: dict, arrays: dict[str, np.ndarray], k: int) -> None:
        buffer = io.BytesIO()
        meta = {**meta, "format": FORMAT}
        # an .npz (np.load reads it) deflated at level 1, not np.savez_compressed's 6: at 2048 x 2048, 0.24 s
        # and 4.0 MB a checkpoint against 0.66 s and 3.5 MB, every checkpoint_every_s
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as npz:
            for name, value in {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays}.items():
                with npz.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        write_atomic(self.path, buffer.getvalue(), sync=True, crash="checkpoint")
        log.debug("checkpoint at frame %d", k)


def load(out_dir: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The last checkpoint of an unfinished run, or None when it was killed before its first."""
    path = Path(out_dir) / RUN_DIR / CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except (OSError, ValueError, KeyError) as exc:  # a checkpoint is renamed into place whole: this is not ours
        raise OutputError(f"{path}: cannot read the checkpoint ({exc}), expected one written by dctstream; "
                          "pass --overwrite to start again") from None
    if meta.get("format") != FORMAT:
        raise OutputError(f"{path}: checkpoint format {meta.get('format')}, expected {FORMAT}; "
                          "pass --overwrite to start again")
    return meta, arrays


# -- what a pipeline saves and takes back ----------------------------------------------------------


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


class Snapshot:
    """The state at the end of frame ``frame``, taken by the segmenting thread; the writer thread saves it
    after the difspots closed before it, adding the spot table's rows (see ``capture``)."""

    def __init__(self, frame: int, meta: dict, arrays: dict[str, np.ndarray]):
        self.frame, self.meta, self.arrays = frame, meta, arrays

    def save(self, pipeline) -> None:
        """Runs where the difspots are written, after every one closed up to ``frame``."""
        table = pipeline.table
        self.meta["stats"]["difspots_written"] = len(table)
        self.meta["table"] = {"attrs": {key: _plain(v) for key, v in table.attrs.items()}}
        arrays = {**self.arrays, **{f"table_{name}": v for name, v in table.columns().items()}}
        if "export" in self.meta:  # and the sparse scan's chunks it counts
            pipeline._unsynced.append(pipeline.export.path)
        sync_files(pipeline._unsynced)  # every difspot this checkpoint counts is on disk first
        pipeline._unsynced.clear()
        spool = getattr(pipeline, "spool", None)
        if spool is not None:  # and a stream's frames from first_raw on, which it cannot send again
            self.meta["spool_until"] = spool.sync(self.meta["first_raw"])
        pipeline._checkpointer.save(self.meta, arrays, self.frame)
        if spool is not None:  # and no more: frames before first_raw are never read again
            spool.prune(self.meta["first_raw"])


def capture(pipeline, k: int) -> Snapshot:
    """The state of ``pipeline`` at the end of frame ``k`` (segmented, its difspots handed to the writer)."""
    seg, bg, stats = pipeline.segmenter, pipeline.background, pipeline.stats
    pipeline._checkpointer.taken(k)
    state = seg.state()
    first_needed = seg.first_needed
    first_raw = bg.first_raw_frame(first_needed)
    psi = pipeline._psi
    lost_before, stand_ins = pipeline.lost_since(first_raw)
    meta = {
        "frame": k,
        "first_needed": first_needed,
        "first_raw": first_raw,
        "direct_beam": None if bg.direct_beam is None else [int(v) for v in bg.direct_beam],
        "beam_track": [[f, None if b is None else [int(v) for v in b]] for f, b in list(pipeline._beam_track)],
        "beam_found": [[f, None if b is None else [int(v) for v in b]] for f, b in list(bg.beam_found)],
        "margin_ref": None if bg.margin_ref is None else float(bg.margin_ref),
        "auto_normalise": None if bg.intensity is None else bool(bg.intensity.enabled),
        "has_psi": psi is not None,
        "source_id": pipeline._source_id,
        "photon_gain": stats.photon_gain,
        # what the first window taught the detector (an estimated dark, automatic bad pixels)
        "detector": {"dark_source": pipeline.detector.dark_source, "mask_counts": pipeline.detector.mask_counts,
                     "dark_estimated": pipeline.cfg.dark.estimate},
        # frames read again from first_raw on are counted again
        "stats": {"frames_missing": lost_before, "seed_threshold": stats.seed_threshold,
                  "noise_sigma": stats.noise_sigma, "noise_sigma_range": stats.noise_sigma_range,
                  "noise_sigma_by_frame": stats.noise_sigma_by_frame, "flood_frames": stats.flood_frames,
                  "background_level_range": stats.background_level_range,
                  "flood_frames_total": stats.flood_frames_total, "sparse_cut": stats.sparse_cut,
                  "cut_range": pipeline._cut_range},
        "segmenter": {key: state[key] for key in ("low", "last", "prev_offset", "next_id", "n_blobs",
                                                  "rejected", "capacity", "too_large_size", "flooded")},
    }
    noise = pipeline.noise.state()
    replayed = sorted(f for f in pipeline._levels if f >= first_needed)  # frames a resume reads again
    arrays = {
        "sigma": pipeline._sigma,
        # every frame's beam-intensity scale so far: frames read again on resume are not measured again
        "frame_scales": np.asarray(bg.frame_scales[:], np.float64),
        **_intensity_samples(bg),
        **{f"noise_{name}": np.asarray(v) for name, v in noise.items()},
        "seg_low_tiles": state["low_tiles"], "seg_floods": state["floods"],
        # the level each frame the segmenter may still need was measured above: its values are made again
        "level_frames": np.array(replayed, np.int64),
        "levels": np.array([pipeline._levels[f] for f in replayed], np.float32).reshape(-1, *noise["levels"].shape[1:]),
        "pixel_mask": bg.pixel_mask,
        "lost_frames": np.array(sorted(stand_ins), np.int64),
        "lost_stand_ins": (np.stack([stand_ins[k] for k in sorted(stand_ins)]) if stand_ins
                           else np.zeros((0, *bg.frame_shape), bg.dtype)),
        **({"dark": bg.dark} if pipeline.cfg.dark.estimate else {}),
        "psi": np.asarray(psi[:first_raw] if psi is not None else [], np.float64),
        # the saturated pixels of the frames a resumed run does not read again
        **dict(zip(("saturated_frames", "saturated_flat"), saturated_arrays(pipeline._saturated, first_raw))),
        "seg_prev_labels": state["prev_labels"], "seg_parent": state["parent"],
        "seg_region_ids": state["region_ids"], "seg_open": state["open"], "seg_claimed": state["claimed"],
        **{f"seg_regions_{name}": v for name, v in state["regions"].items()},
        **{f"seg_pending_{name}": v for name, v in state["pending"].items()},
    }
    export = pipeline.export
    if export is not None and hasattr(export, "state"):  # the sparse scan: its counts and what is not in the file
        state = export.state()
        meta["export"] = {key: state[key] for key in export.STATE_VALUES}
        arrays.update({f"export_{key}": state[key] for key in export.STATE_ARRAYS})
    return Snapshot(k, meta, arrays)


def _intensity_samples(bg) -> dict[str, np.ndarray]:
    """normalise: auto: the frames' samples the next references take, as two arrays."""
    samples = bg.intensity.samples() if bg.intensity is not None else {}
    frames = np.array(sorted(samples), np.int64)
    values = np.stack([samples[f] for f in frames]) if frames.size else np.zeros((0, 0), np.float32)
    return {"intensity_frames": frames, "intensity_samples": values}


def resume_background(resume, bbox) -> dict:
    """The background stage's arguments for a resumed run: start at the first raw frame needed,
    with the direct beam and margin reference of the first run (not found again)."""
    meta, _ = resume
    beam = meta["direct_beam"]
    return {"direct_beam": "none" if beam is None else tuple(beam),
            "stage": {"first_frame": meta["first_raw"], "margin_ref": meta["margin_ref"],
                      "known_scales": resume[1]["frame_scales"], "auto_enabled": meta["auto_normalise"],
                      "known_samples": dict(zip(resume[1]["intensity_frames"].tolist(),
                                                resume[1]["intensity_samples"])),
                      # the beam followed up to the first frame emitted again (found again from there)
                      "beam_track": [(f, b) for f, b in meta.get("beam_track", []) if f < meta["first_needed"]],
                      "beam_found": [(f, b) for f, b in meta.get("beam_found", []) if f < meta["first_needed"]]}}


def restore_detector(detector, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Give the detector the dark and bad pixels the first run found in the scan's first window."""
    facts = meta["detector"]
    detector.mask = arrays["pixel_mask"].astype(bool)
    detector.mask_counts = dict(facts["mask_counts"])
    detector.dark_source = facts["dark_source"]
    if facts["dark_estimated"]:
        detector.dark = arrays["dark"]


def frame_identity(data: np.ndarray) -> str:
    """What tells one scan from another: a hash of its first frame, with the frame's shape and type."""
    import hashlib

    data = np.ascontiguousarray(data)
    digest = hashlib.sha256(f"{data.shape} {data.dtype.str}".encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def keep_source_id(out_dir: Path, identity: str) -> None:
    """Remember which scan the run under way in ``out_dir`` reads (its frame 0's identity): a run stopped
    before its first checkpoint is resumed from its first frame, and only from the same scan."""
    path = Path(out_dir) / RUN_DIR / SOURCE_ID
    with suppress(FileNotFoundError):
        if path.read_text() == identity:
            return
    write_atomic(path, identity.encode())


def source_id(out_dir: Path, resume) -> str | None:
    """The identity of the scan an unfinished run in ``out_dir`` read: its checkpoint's (``resume``, as
    `load` gives it; None without one), else the one kept from its frame 0."""
    if resume and resume[0].get("source_id"):
        return resume[0]["source_id"]
    try:
        return (Path(out_dir) / RUN_DIR / SOURCE_ID).read_text() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_identity(data, identity: str | None, source, out_dir) -> None:
    if identity and data is not None and frame_identity(data) != identity:
        raise AnotherScanError(f"source.url: {source.url}: frame 0 is not that of the scan the unfinished run in "
                               f"{out_dir} was made from (was the file replaced?), expected the same scan to resume "
                               "it; pass --overwrite to start again, or choose another output.dir")


def frames_from(source, first: int, identity: str | None = None, out_dir=None):
    """The source's frames from ``first`` on: a recorded file seeks there, others are read and dropped.
    A stream cannot be read again: it is resumed from its spool (``spool.Spool.frames``).

    ``identity`` (`frame_identity` of the first run's frame 0) is checked against this source's frame 0."""
    if not source.rereadable:
        raise ValueError("a stream is resumed from its spool, not read again")
    if hasattr(source, "first_frame"):  # a recorded file: its frame 0 was checked when the run started
        source.first_frame = first
    for frame in source:
        if frame.index == 0:
            check_identity(frame.data, identity, source, out_dir)
        if frame.index >= first:
            yield frame


def forget_unsaved_difspots(out_dir: Path, resume) -> None:
    """Before a resumed run: delete the difspot files its checkpoint does not count (written after it, or at
    the end of a scan that ended early and has since grown): the resumed run writes what belongs there."""
    folder = Path(out_dir) / "difspots"
    if not folder.is_dir():
        return
    kept = set() if resume is None else {int(i) for i in resume[1].get("table_id", [])}
    for path in folder.glob("*.h5"):
        if path.stem.isdigit() and int(path.stem) not in kept:
            path.unlink(missing_ok=True)
