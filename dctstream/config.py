"""Run configuration: one frozen dataclass per section, read from YAML and validated.

A config is built in layers: the defaults, then a YAML file, then each
``--set section.key=value`` override.  Every value is checked as its layer is
applied, so an error names the layer it came from and the key path::

    configs/x.yml: background.window: must be odd and >= 3, got 4
    --set: background.windw: unknown key (known: margin_px, mode, normalise, stride, window)

Per-key checks are one table (``_CHECKS``) of small parse functions; rules that
tie two keys together are listed in ``_cross_checks``.  Each pipeline stage
takes only its own section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dctstream.errors import ConfigError

__all__ = [
    "BackgroundConfig",
    "ClusterConfig",
    "Config",
    "DarkConfig",
    "DetectorConfig",
    "DirectBeamConfig",
    "ExportConfig",
    "FilterConfig",
    "OutputConfig",
    "QuicklookConfig",
    "SegmentationConfig",
    "SourceConfig",
    "StatusConfig",
    "WatchConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "override_config",
    "replace_config",
]

_SET = "--set"  # the "file" part of messages about command-line overrides


@dataclass(frozen=True)
class SourceConfig:
    """Where the frames and their rotation angles come from, as ``file.h5::/dataset/path``."""

    url: str | None = None
    angles: str | None = None  # a URL, or auto: the positioner that moves over the scan (sources/scan_file.py)
    protocol: str = "auto"  # auto (from the URL) | hdf5 | hdf5-live | stream1 | stream2 | folder | bliss
    scan: str | None = None  # bliss: a scan key, or a pattern the next scan's name matches (null: the next scan)
    stream: str | None = None  # bliss: the frames' stream, e.g. marana:image (null: the scan's only image stream)
    expected_frames: int | None = None  # the scan is over once this many frames arrived
    idle_timeout_s: float = 60.0  # ... or once the source has been silent this long
    poll_interval_s: float = 0.5  # how often a file or folder is checked when notifications fail
    missing: str = "error"  # a frame missing from a stream: error | repeat-background
    order: str = "auto"  # frames out of psi order: auto | psi (recorded: read sorted) | arrival (see dctstream.order)
    interlaced_turns: int | None = None  # turns after the first (DCT's parameter); a live scan of passes needs it


@dataclass(frozen=True)
class DarkConfig:
    """Dark current subtracted from every frame: an image (``url``) or a constant (``value``), at most one."""

    url: str | None = None  # a URL, or auto: a scan titled dark in the same file (sources/scan_file.py)
    value: float | None = None  # counts
    estimate: bool = False  # no dark given: per-pixel median of the faintest frames of the first window
    estimate_frames: int = 5  # how many of the faintest frames


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's own defects, corrected before the background: bad pixels, uneven gain, binning."""

    mask: str | None = None  # file.h5::/dataset, file.edf or file.npy; non-zero = bad pixel
    auto_mask: bool = False  # also mask pixels stuck or hot over the first window
    flat: str | None = None  # flat-field image, or a flat scan to average, as the mask
    flat_floor: float = 0.1  # flat below this fraction of its median: pixel masked, not divided
    binning: int = 1  # 1, 2 or 4: b x b pixels summed (or averaged) into one
    binning_mode: str = "sum"  # sum | mean
    # spot positions corrected (ImageD11): a Fit2D spline file, or [dx, dy] maps (dctstream/distortion.py)
    distortion: str | tuple[str, str] | None = None


@dataclass(frozen=True)
class ExportConfig:
    """The corrected frames written to OUT/corrected.h5 as the scan runs."""

    format: str = "sparse"  # sparse (pixels at or above a cut: what `dctstream resegment` reads) | stack | none
    threshold: float | str = "auto"  # sparse cut: counts, or auto = cut_sigma x the noise followed along psi
    cut_sigma: float = 2.0  # auto cut, in noise sigmas; never above what the segmentation itself compares
    dtype: str = "float32"  # float32 (exact) | uint16 | uint8 (stretched by percentiles)
    percentiles: tuple[float, float] = (1.0, 99.99)  # of the first exported frame: the stretch's 0 and maximum


@dataclass(frozen=True)
class BackgroundConfig:
    """Per-pixel median over a window of frames around each frame, subtracted from it."""

    window: int = 501  # frames in the median; odd so that it centres on the frame
    mode: str = "exact"  # "exact": one window per frame; "block": one window per `stride` frames
    stride: int = 50  # frames per block in "block" mode
    # frames slid per kernel call: faster, adds batch_frames - 1 frames of latency; auto: see frames_per_batch
    batch_frames: int | str = "auto"
    normalise: str = "auto"  # beam intensity: "auto" measured from the frames, "margin" beside the sample, "none"
    margin_px: int = 20  # width of that margin


# batch_frames: auto. A detector of this many pixels or more slides its median 8 frames per call: each
# pixel's state then stays in the CPU cache over the batch (about half the CPU per frame at 1024 x 1024 and
# up: `dctstream bench --no-pipeline --batch 1` against `--batch 8`), for 7 frames more of latency. 16 took
# 4-8 % less CPU per pixel-step than 8 but held 0.125 GiB more at 2048 x 2048 (8 more frames in the ring,
# 8 more medians a batch), past 1.6 x a window in all. Smaller frames keep one (their state fits in the
# cache anyway).
AUTO_BATCH_PIXELS = 1024 * 1024
AUTO_BATCH_FRAMES = 8


def frames_per_batch(batch_frames: int | str, frame_shape) -> int:
    """``background.batch_frames`` in frames, for frames of ``frame_shape``."""
    if batch_frames != "auto":
        return int(batch_frames)
    return AUTO_BATCH_FRAMES if math.prod(frame_shape) >= AUTO_BATCH_PIXELS else 1


@dataclass(frozen=True)
class FilterConfig:
    """Spatial median filter applied to each corrected frame."""

    median_size: int = 3  # odd side in pixels; 1 = no filter


@dataclass(frozen=True)
class DirectBeamConfig:
    """The transmitted beam on the detector, kept out of the spot search."""

    bbox: str | tuple[int, int, int, int] = "auto"  # "auto", "none" or (x0, y0, width, height)
    # The beam found already reaches down to a tenth of its height; 2 px more covers the 3x3 filter.
    # Wider margins hid the spots beside the beam (recall 0.94 -> 1.00 on the validation scans at 2).
    margin_px: int = 2


@dataclass(frozen=True)
class SegmentationConfig:
    """Double-threshold 3-D segmentation: seeds above a threshold grow into connected blobs."""

    seed_threshold: float | str = "auto"  # counts (>0) or "auto"
    seed_sigma: float = 6.0  # k in auto = k x robust noise
    grow_ratio: float = 0.3  # tau, in (0, 1]
    grow_low: float | str = "auto"  # lower clamp on tau*M (>0) or "auto" (= half the seed threshold)
    grow_high: float | None = None  # upper clamp on tau*M, None = no clamp
    seed_min_voxels: int = 3
    min_blob_size: tuple[int, int, int] = (2, 2, 1)  # (x, y, frames)
    max_blob_size: tuple[int, int, int] = (80, 80, 25)  # (x, y, frames): the growth box's half-size
    connectivity: int = 26  # 6 or 26
    drop_zingers: bool = True  # one frame deep, a few pixels, far above the noise (see segment.segmenter)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "dctstream_out"
    checkpoint_every_s: float = 10.0  # a killed run resumes from its last checkpoint (see dctstream.checkpoint)
    checkpoint_every_frames: int = 0  # ... or every this many frames as well; 0: by time only


@dataclass(frozen=True)
class StatusConfig:
    """How a running scan reports itself: ``OUT/status.json`` and the log line without a terminal."""

    interval_s: float = 1.0  # seconds between rewrites of OUT/status.json
    log_every_s: float = 5.0  # without a terminal: one log line this often


@dataclass(frozen=True)
class QuicklookConfig:
    """PNG pictures of a scan in ``OUT/quicklook/``, every ``every_frames`` frames and at the end."""

    enabled: bool = True
    every_frames: int = 500  # 0 = only at the end
    gallery_spots: int = 16  # brightest difspots in the gallery


@dataclass(frozen=True)
class WatchConfig:
    """``dctstream watch ROOT``: which files under ROOT are scans, and how many are processed at once."""

    glob: str = "*/*/*/*.h5"  # scan files relative to ROOT (Bliss: proposal/sample/sample_dataset/*.h5)
    dataset: str = "/1.1/measurement/marana"  # frames inside a file; * matches a scan number (/*.1/...)
    angles: str | None = "diffrz"  # psi next to the frames (a name) or an absolute path in the file
    dark: str | None = None  # dark frames in the same file, e.g. /2.1/measurement/marana
    max_parallel: int = 1  # scans processed at once
    poll_interval_s: float = 2.0  # how often ROOT is searched for new scans
    log_file: str = "dctstream-watch.log"  # relative to output.dir, or absolute
    log_max_mb: float = 10.0  # the log is rotated at this size
    log_backups: int = 5  # rotated logs kept
    # `watch redis://...`: scans whose name matches GLOB / whose info or identity KEY matches: "KEY=GLOB" (all)
    scan_filter: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterConfig:
    """Where ``dctstream campaign`` runs its scans: Dask workers on this machine, a batch system, or a scheduler."""

    kind: str = "local"  # local | slurm | pbs | sge | lsf | address (a running Dask scheduler)
    address: str | None = None  # tcp://host:8786, with kind: address
    workers: int = 2  # Dask workers, each processing one scan at a time (batch systems: one job each)
    cores_per_worker: int = 1  # cores a worker's scan uses (its numba threads); a job's cores
    memory_per_worker: str | None = None  # e.g. "16GiB"; null: the machine's memory shared (local), required for jobs
    queue: str | None = None  # batch-system queue (SLURM partition)
    walltime: str | None = None  # job time limit, e.g. "04:00:00"
    account: str | None = None  # project charged for the jobs
    job_extra_directives: tuple[str, ...] = ()  # more #SBATCH/#PBS lines, e.g. ["--constraint=gpu"]
    job_script_prologue: tuple[str, ...] = ()  # shell lines run before the worker, e.g. ["module load python"]
    interface: str | None = None  # network interface the workers talk on, e.g. ib0
    local_directory: str | None = None  # worker scratch space (node-local disk)


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    dark: DarkConfig = field(default_factory=DarkConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    direct_beam: DirectBeamConfig = field(default_factory=DirectBeamConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    quicklook: QuicklookConfig = field(default_factory=QuicklookConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                layers: Sequence[tuple[str, dict[str, Any]]] = ()) -> Config:
    """The defaults, updated by the YAML file at ``path`` (if any), then by each ``key.path=value`` override,
    then by each ``(label, {section: {key: value}})`` of ``layers`` (a campaign's settings for one scan).

    Override values are YAML (``direct_beam.bbox=[10,20,100,50]``, ``segmentation.grow_high=null``).
    Raises ``ConfigError`` with a one-line message naming the file (or ``--set``, or the layer's label) and the key.
    """
    built = [] if path is None else [(os.fspath(path), _read_yaml(path))]
    built += [(_SET, _parse_override(text)) for text in overrides]
    return _build([*built, *layers])


def replace_config(cfg: Config, **section_updates: dict[str, Any]) -> Config:
    """``cfg`` with some keys changed and checked like a file.

    ``replace_config(cfg, background={"window": 101})``; errors are labelled ``replace_config``.
    """
    return _build([("replace_config", config_to_dict(cfg)), ("replace_config", section_updates)])


def override_config(cfg: Config, overrides: Mapping[str, Any] | Sequence[str], label: str = _SET) -> Config:
    """``cfg`` with overrides applied and checked as ``--set`` ones are.

    ``overrides`` is a mapping ``{"background.window": 101}`` (values as
    Python objects; errors are labelled ``label``) or ``--set`` texts
    ``["background.window=101"]`` (values read as YAML; errors labelled ``--set``).
    """
    if isinstance(overrides, str):
        raise ConfigError(f"{label}: expected a mapping of section.key to value or a list of "
                          f"section.key=value texts, got the text {_show(overrides)}")
    if isinstance(overrides, Mapping):
        layers = [(label, _nested(key, _python(value))) for key, value in overrides.items()]
    else:
        layers = [(_SET, _parse_override(text)) for text in overrides]
    return _build([("config", config_to_dict(cfg)), *layers])


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of ``cfg`` (tuples as lists), ready for YAML or JSON."""
    return {
        name: {key: _plain(value) for key, value in section.items()}
        for name, section in dataclasses.asdict(cfg).items()
    }


def dump_config(cfg: Config) -> str:
    """YAML text of ``cfg`` that ``load_config`` reads back to an equal config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# -- parsing single values ---------------------------------------------------
#
# A parser takes the raw YAML value and returns the typed value or raises
# _Invalid("must be ..."); the caller adds the file, key path and ", got ...".

_Parser = Callable[[Any], Any]


class _Invalid(ValueError):
    """A value fails its check; the message is the "must be ..." part."""


def _parse_int(value: Any) -> int:
    # bool is a subclass of int, but `window: true` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("must be an integer")
    return value


def _parse_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("must be a number")
    if not math.isfinite(value):
        raise _Invalid("must be a finite number")
    return float(value)


def _parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _parse_percentiles(value: Any) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid("must be a list of 2 numbers [low, high]")
    return tuple(_parse_number(v) for v in value)


def _parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a non-empty string")
    return value


def _parse_dataset(value: Any) -> str:
    text = _parse_text(value)
    if not text.startswith("/"):
        raise _Invalid("must be an absolute dataset path starting with /")
    return text


def _parse_ints(count: int, what: str) -> _Parser:
    def parse(value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) != count:
            raise _Invalid(f"must be {what}")
        try:
            return tuple(_parse_int(item) for item in value)
        except _Invalid:
            raise _Invalid(f"must be {what}") from None

    return parse


def _checked(parse: _Parser, ok: Callable[[Any], bool], what: str) -> _Parser:
    """``parse`` (the type check), then ``ok`` must hold or the value 'must be <what>'."""

    def check(value: Any) -> Any:
        parsed = parse(value)
        if not ok(parsed):
            raise _Invalid(f"must be {what}")
        return parsed

    return check


def _or(literal: str | None, parse: _Parser) -> _Parser:
    """``literal`` itself (``"auto"``, ``None``) or whatever ``parse`` accepts."""

    def check(value: Any) -> Any:
        if value == literal and type(value) is type(literal):
            return value
        try:
            return parse(value)
        except _Invalid as err:
            raise _Invalid(f"{err} or {_show(literal)}") from None

    return check


def _one_of(*choices: Any) -> _Parser:
    def check(value: Any) -> Any:
        # Compare types too: 6.0 == 6 and True == 1, but neither was meant.
        if not any(type(value) is type(c) and value == c for c in choices):
            raise _Invalid(f"must be one of {', '.join(map(str, choices))}")
        return value

    return check


def _int_at_least(minimum: int, *, odd: bool = False) -> _Parser:
    what = f"odd and >= {minimum}" if odd else f">= {minimum}"
    return _checked(_parse_int, lambda n: n >= minimum and (n % 2 == 1 or not odd), what)


def _parse_bbox(value: Any) -> str | tuple[int, ...]:
    if value is None:  # `bbox:` left empty or null reads as "no direct beam"
        return "none"
    if value in ("auto", "none"):
        return value
    box = _parse_ints(4, "auto, none or a list of 4 integers [x0, y0, width, height]")(value)
    if min(box[:2]) < 0 or min(box[2:]) < 1:
        raise _Invalid("must have x0, y0 >= 0 and width, height >= 1")
    return box


def _parse_distortion(value: Any) -> str | tuple[str, str]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise _Invalid("must be a Fit2D spline file or a list of 2 files [dx, dy]")


def _parse_texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid("must be a list of non-empty strings")
    return tuple(value)


# dask's own spellings of sizes ("16GB", "16 GiB", "500MB"); what it means is dask's business
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([kKMGTP]i?B|B)$")
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://\S+$")

_positive = _checked(_parse_number, lambda x: x > 0, "> 0")
_blob_size = _checked(
    _parse_ints(3, "a list of 3 integers [x, y, frames]"), lambda size: min(size) >= 1, ">= 1 in every component"
)

# Every key of every section, and how its value is parsed.  The keys must be
# exactly the dataclass fields: unknown keys are rejected against this table.
_CHECKS: dict[str, dict[str, _Parser]] = {
    "source": {
        "url": _or(None, _parse_text),
        "angles": _or(None, _parse_text),
        "protocol": _one_of("auto", "hdf5", "hdf5-live", "stream1", "stream2", "folder", "bliss"),
        "scan": _or(None, _parse_text),
        "stream": _or(None, _parse_text),
        "expected_frames": _or(None, _int_at_least(1)),
        "idle_timeout_s": _positive,
        "poll_interval_s": _positive,
        "missing": _one_of("error", "repeat-background"),
        "order": _one_of("auto", "psi", "arrival"),
        "interlaced_turns": _or(None, _int_at_least(0)),
    },
    "dark": {"url": _or(None, _parse_text), "value": _or(None, _parse_number),
             "estimate": _parse_bool, "estimate_frames": _int_at_least(1)},
    "background": {
        "window": _int_at_least(3, odd=True),
        "mode": _one_of("exact", "block"),
        "stride": _int_at_least(1),
        "batch_frames": _or("auto", _int_at_least(1)),
        "normalise": _one_of("auto", "none", "margin"),
        "margin_px": _int_at_least(1),
    },
    "filter": {"median_size": _int_at_least(1, odd=True)},
    "direct_beam": {"bbox": _parse_bbox, "margin_px": _int_at_least(1)},
    "segmentation": {
        "seed_threshold": _or("auto", _positive),
        "seed_sigma": _positive,
        "grow_ratio": _checked(_parse_number, lambda x: 0 < x <= 1, "in (0, 1]"),
        "grow_low": _or("auto", _positive),
        "grow_high": _or(None, _positive),
        "seed_min_voxels": _int_at_least(1),
        "min_blob_size": _blob_size,
        "max_blob_size": _blob_size,
        "connectivity": _one_of(6, 26),
        "drop_zingers": _parse_bool,
    },
    "output": {"dir": _parse_text, "checkpoint_every_s": _positive,
               "checkpoint_every_frames": _int_at_least(0)},
    "status": {"interval_s": _positive, "log_every_s": _positive},
    "quicklook": {"enabled": _parse_bool, "every_frames": _int_at_least(0), "gallery_spots": _int_at_least(1)},
    "watch": {
        "glob": _checked(_parse_text, lambda g: not os.path.isabs(g) and ".." not in Path(g).parts,
                         "a pattern relative to the watched folder (no leading /, no ..)"),
        "dataset": _parse_dataset,
        "angles": _or(None, _parse_text),
        "dark": _or(None, _parse_dataset),
        "max_parallel": _int_at_least(1),
        "poll_interval_s": _positive,
        "log_file": _parse_text,
        "log_max_mb": _positive,
        "log_backups": _int_at_least(0),
        "scan_filter": _parse_texts,
    },
    "detector": {
        "mask": _or(None, _parse_text),
        "auto_mask": _parse_bool,
        "flat": _or(None, _parse_text),
        "flat_floor": _checked(_parse_number, lambda x: 0 < x < 1, "in (0, 1)"),
        "binning": _one_of(1, 2, 4),
        "binning_mode": _one_of("sum", "mean"),
        "distortion": _or(None, _parse_distortion),
    },
    "export": {
        "format": _one_of("none", "stack", "sparse"),
        "threshold": _or("auto", _positive),
        "cut_sigma": _positive,
        "dtype": _one_of("float32", "uint16", "uint8"),
        "percentiles": _checked(_parse_percentiles, lambda p: 0 <= p[0] < p[1] <= 100,
                                "[low, high] with 0 <= low < high <= 100"),
    },
    "cluster": {
        "kind": _one_of("local", "slurm", "pbs", "sge", "lsf", "address"),
        "address": _or(None, _checked(_parse_text, _ADDRESS.match, "a scheduler address such as tcp://host:8786")),
        "workers": _int_at_least(1),
        "cores_per_worker": _int_at_least(1),
        "memory_per_worker": _or(None, _checked(_parse_text, _MEMORY.match, "a size such as 16GiB or 500MB")),
        "queue": _or(None, _parse_text),
        "walltime": _or(None, _checked(_parse_text, re.compile(r"^(\d+-)?\d+(:\d\d){0,2}$").match,
                                       "a time limit such as 04:00:00 or 1-00:00:00")),
        "account": _or(None, _parse_text),
        "job_extra_directives": _parse_texts,
        "job_script_prologue": _parse_texts,
        "interface": _or(None, _parse_text),
        "local_directory": _or(None, _parse_text),
    },
}


def _cross_checks(cfg: Config) -> Iterator[tuple[str, tuple[str, ...], bool, str]]:
    """Rules between keys: (key to report, other keys involved, rule holds, what the key must be)."""
    bg, seg = cfg.background, cfg.segmentation
    # stride means nothing in exact mode, so a short window there needs no stride change.
    yield ("background.stride", ("background.window", "background.mode"),
           bg.mode != "block" or bg.stride <= bg.window,
           f"<= background.window ({bg.window}) in block mode")
    yield ("background.normalise", ("direct_beam.bbox",),
           bg.normalise != "margin" or cfg.direct_beam.bbox != "none",
           "none when direct_beam.bbox is none")
    yield ("dark.value", ("dark.url",),
           cfg.dark.url in (None, "auto") or cfg.dark.value is None,
           "null when dark.url is set")
    yield ("dark.estimate", ("dark.url", "dark.value"),
           not cfg.dark.estimate or (cfg.dark.url in (None, "auto") and cfg.dark.value is None),
           "false when dark.url or dark.value is set")
    yield ("segmentation.grow_high", ("segmentation.grow_low",),
           seg.grow_high is None or seg.grow_low == "auto" or seg.grow_high >= seg.grow_low,
           f">= segmentation.grow_low ({seg.grow_low})")
    yield ("segmentation.max_blob_size", ("segmentation.min_blob_size",),
           all(map(operator.ge, seg.max_blob_size, seg.min_blob_size)),
           f">= segmentation.min_blob_size {_show(seg.min_blob_size)} in every component")
    cl = cfg.cluster
    yield ("cluster.address", ("cluster.kind",), (cl.address is not None) == (cl.kind == "address"),
           "set (tcp://host:port) when cluster.kind is address, and only then")
    yield ("cluster.memory_per_worker", ("cluster.kind",),
           cl.memory_per_worker is not None or cl.kind in ("local", "address"),
           f"set for the jobs of cluster.kind: {cl.kind} (a batch system needs it)")


# -- building a config from layers --------------------------------------------


def _build(layers: Sequence[tuple[str, Any]]) -> Config:
    """Apply each (label, {section: {key: raw value}}) layer over the defaults, then the cross checks."""
    changes: dict[str, dict[str, Any]] = {section: {} for section in _CHECKS}
    set_by: dict[str, int] = {}  # "section.key" -> index of the last layer that set it
    for index, (label, tree) in enumerate(layers):
        for section, key, raw in _entries(label, tree):
            path = f"{section}.{key}"
            try:
                changes[section][key] = _CHECKS[section][key](raw)
            except _Invalid as err:
                raise ConfigError(f"{label}: {path}: {err}, got {_show(raw)}") from None
            set_by[path] = index

    defaults = Config()
    cfg = Config(**{
        section: dataclasses.replace(getattr(defaults, section), **updates)
        for section, updates in changes.items()
    })
    for path, others, ok, what in _cross_checks(cfg):
        if not ok:
            # Blame the last layer that touched the rule: its change broke it.  The
            # defaults satisfy every rule, so at least one of the keys was set.
            label = layers[max(set_by.get(p, 0) for p in (path, *others))][0]
            section, key = path.split(".")
            value = getattr(getattr(cfg, section), key)
            raise ConfigError(f"{label}: {path}: must be {what}, got {_show(value)}")
    return cfg


def _entries(label: str, tree: Any) -> Iterator[tuple[str, str, Any]]:
    """(section, key, raw value) of one layer, rejecting anything not shaped like a config."""
    if tree is None:  # an empty file
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"{label}: must be a mapping of sections, got {_show(tree)}")
    for section, body in tree.items():
        if section not in _CHECKS:
            raise ConfigError(f"{label}: {section}: unknown section (known: {', '.join(sorted(_CHECKS))})")
        if body is None:  # `dark:` with nothing under it keeps the defaults
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{label}: {section}: must be a mapping, got {_show(body)}")
        for key, raw in body.items():
            if key not in _CHECKS[section]:
                known = ", ".join(sorted(_CHECKS[section]))
                raise ConfigError(f"{label}: {section}.{key}: unknown key (known: {known})")
            yield section, key, raw


# -- YAML ----------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e3`` and ``1.5e-3`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent,
    so ``seed_threshold: 1e3`` would otherwise be the string "1e3".
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Dumper(yaml.SafeDumper):
    """Sections in block style with each list on one line, as in configs/default.yml."""


_Dumper.add_representer(
    list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=True)
)


def _read_yaml(path: str | os.PathLike) -> Any:
    label = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{label}: cannot read config file: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label}: cannot read config file: not UTF-8 text ({err.reason})") from err
    loader = _Loader(text)
    try:
        node = loader.get_single_node()  # parsed once: checked for duplicates, then built
        if node is None:
            return None
        _refuse_duplicates(label, node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{label}: {where}invalid YAML: {_yaml_problem(err)}") from err
    finally:
        loader.dispose()


def _refuse_duplicates(label: str, node, path: str = "") -> None:
    """A key given twice in one mapping is an error naming both lines: YAML would keep the last silently."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(label, item, path)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        where = f"{path}.{key}" if path else key
        if key in seen and key != "<<":
            what = "section" if not path else "key"
            raise ConfigError(f"{label}: {where}: duplicate {what}, at lines {seen[key]} and {line}, expected each "
                              f"{what} once (YAML would silently keep the last)")
        seen[key] = line
        _refuse_duplicates(label, value_node, where)


def _parse_override(text: str) -> dict[str, Any]:
    """``"a.b=value"`` -> ``{"a": {"b": value}}``, the value read as YAML."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(f"{_SET}: expected section.key=value, got {_show(text)}")
    try:
        tree = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{_SET}: {key}: invalid YAML value {_show(raw)}: {_yaml_problem(err)}") from err
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def _nested(key: Any, value: Any) -> dict[str, Any]:
    """``"a.b", value`` -> ``{"a": {"b": value}}``; a whole section, ``"a", {"b": value}``, stays as it is.

    Tuples become lists, as a Python caller may write ``(2, 2, 1)`` where YAML has ``[2, 2, 1]``.
    """
    tree = {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else _plain(value)
    for part in reversed(str(key).split(".")):
        tree = {part: tree}
    return tree


def _yaml_problem(err: yaml.YAMLError) -> str:
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    # Errors without a mark (bad characters) only have a multi-line str().
    return ", ".join(p for p in parts if p) or " ".join(str(err).split())


def _python(value: Any) -> Any:
    """``value`` with NumPy's scalars and arrays as the Python numbers and lists YAML would give (an override
    computed with NumPy: np.int64(101), np.array([2, 2, 1]))."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    """``value`` as the user would write it in YAML, on one line, for messages."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
    # YAML folds strings with line breaks over several lines; JSON is also YAML and never does.
    return text if "\n" not in text else json.dumps(value, ensure_ascii=False, default=str)
