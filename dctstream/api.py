"""The Python API: `run` a scan into an output folder, or `segment` frames held in memory.

Both drive the same pipeline as ``dctstream run`` (`dctstream.pipeline.Pipeline`):
the same frames and configuration give the same difspots.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import tempfile
import threading
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .config import Config, load_config, override_config
from .errors import ConfigError, InputError
from .results import Run
from .types import Blob, Difspot

__all__ = ["run", "segment"]

ConfigLike = Union[str, os.PathLike, Config, None]
Overrides = Union[Mapping[str, Any], Sequence[str], None]

# source.url of frames handed to segment(): error messages about the frames name it
MEMORY_URL = "segment(frames)"


def resolve_config(config: ConfigLike, overrides: Overrides, settings: Mapping[str, Any], label: str) -> Config:
    """``config`` (a YAML path, the name of a packaged config (``dctstream config list``), a `Config`, or None
    for the built-in defaults), then ``overrides``, then ``settings``.

    ``overrides`` is a mapping ``{"background.window": 101}`` or ``--set`` texts;
    ``settings`` (the call's own arguments, None ones left out) are checked under ``label``.
    """
    if isinstance(config, Config):
        cfg = config
    elif config is None:
        cfg = load_config(None)
    elif isinstance(config, (str, os.PathLike)):
        from .configs import config_file

        cfg = load_config(config_file(os.fspath(config)))
    else:
        raise ConfigError(f"{label}: config: expected a YAML file path or a Config, got {type(config).__name__}")
    if overrides:
        cfg = override_config(cfg, overrides, label=f"{label}: overrides")
    settings = {key: value for key, value in settings.items() if value is not None}
    return override_config(cfg, settings, label=label) if settings else cfg


def _dark_settings(dark: Any, label: str) -> dict[str, Any]:
    if dark is None:
        return {}
    if isinstance(dark, (str, os.PathLike)):
        return {"dark.url": os.fspath(dark)}
    if isinstance(dark, (int, float, np.number)) and not isinstance(dark, bool):
        return {"dark.value": float(dark)}
    raise ConfigError(f"{label}: dark: expected a URL file.h5::/dataset or a number of counts, "
                      f"got {type(dark).__name__}")


def run(source: str | os.PathLike | None, *, out: str | os.PathLike | None, dark: str | float | None = None,
        angles: str | None = None, config: ConfigLike = None, overrides: Overrides = None,
        overwrite: bool = False, display: bool = False) -> Run:
    """Process a scan into difspots in the folder ``out``: what ``dctstream run`` does.

    Parameters
    ----------
    source : str, os.PathLike or None
        The scan: ``path/to/scan.h5::/1.1/measurement/marana``, ``tcp://host:port``
        (a detector stream) or ``dir/*.edf``; None takes ``source.url`` of ``config``.
    out : str, os.PathLike or None
        The output folder; None takes ``output.dir`` of ``config``.
    dark : str, float or None
        Dark frames ``file.h5::/dataset`` (``dark.url``) or a constant (``dark.value``).
    angles : str or None
        ψ of each frame, ``file.h5::/dataset`` (``source.angles``).
    config : str, os.PathLike, Config or None
        A YAML configuration file, a `dctstream.config.Config`, or None for the packaged default, as the
        command takes it (``source.angles``, ``dark.url`` and ``detector.flat`` found in the scan's file).
    overrides : mapping or sequence of str, optional
        Keys to change, as ``--set`` does: ``{"background.window": 101}``
        or ``["background.window=101"]`` (values read as YAML).
    overwrite : bool
        Replace results already in ``out``; without it an unfinished run of the
        same configuration is resumed and any other results are refused.
    display : bool
        Show the live status panel on stderr, as the command does.

    Returns
    -------
    Run
        The output folder, with the pipeline's counters in ``Run.stats``.

    Raises
    ------
    ConfigError
        A key of the configuration is invalid (one line naming the file or
        ``overrides`` and the key).
    InputError
        The scan, dark or angles are missing or have the wrong shape or type.
    OutputError
        ``out`` cannot be written, or holds other results and ``overwrite`` is False.

    Examples
    --------
    >>> run = dctstream.run("scan.h5::/1.1/measurement/marana", out="scan_out",
    ...                     dark="scan.h5::/2.1/measurement/marana",
    ...                     angles="scan.h5::/1.1/measurement/diffrz",
    ...                     overrides={"background.window": 101})  # doctest: +SKIP
    >>> run.spots["integral"][:3]  # doctest: +SKIP
    """
    for name, value in (("source", source), ("out", out), ("angles", angles)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            hint = " (dctstream.segment takes frames and angles as arrays)" if name != "out" else ""
            raise ConfigError(f"run(): {name}: expected a path or URL (str), got {type(value).__name__}{hint}")
    settings = {"source.url": None if source is None else os.fspath(source),
                "source.angles": None if angles is None else os.fspath(angles),
                "output.dir": None if out is None else os.fspath(out), **_dark_settings(dark, "run()")}
    if config is None:  # the packaged default, as the command takes it: angles, dark and flat found in the file
        from .configs import config_file

        config = config_file(None)
    cfg = resolve_config(config, overrides, settings, "run()")
    from .runner import process_scan

    stats = process_scan(cfg, overwrite=overwrite, display=display)
    return Run(cfg.output.dir, stats=stats)


def segment(frames: Iterable[Any], angles: Any = None, *, config: ConfigLike = None, overrides: Overrides = None,
            dark: Any = None) -> Iterator[Difspot]:
    """The difspots of frames held in memory, each as soon as no later frame can change it.

    The frames go through the same pipeline as `run` (background, filter,
    3-D segmentation), so the same frames, angles, dark and configuration give
    the same difspots.  The pipeline runs on threads of its own, writing to a
    temporary folder that is removed when the iterator ends or is closed.

    Parameters
    ----------
    frames : iterable of 2-D arrays
        Frames in scan order: a 3-D array ``(frames, y, x)``, a list, or a
        generator (read once, on a thread of the pipeline) of detector counts:
        integers, or floats as the file sources take them (whole numbers, or
        rounded where their noise or values allow; NaN marks a pixel without
        data).
    angles : 1-D array-like or None
        ψ of each frame in degrees; the difspots then have ``psi_deg`` and
        ``psi_range_deg``.
    config : str, os.PathLike, Config or None
        A YAML configuration file, a `dctstream.config.Config`, or None for
        the defaults (its ``source`` and ``output`` sections are not used).
    overrides : mapping or sequence of str, optional
        Keys to change, as for `run`.
    dark : array-like, str, float or None
        Dark current: a ``(y, x)`` image or a ``(n, y, x)`` stack of dark
        frames (averaged), a URL ``file.h5::/dataset``, or a constant.

    Yields
    ------
    Difspot
        In the order they close, ids counting from 0.

    Raises
    ------
    ConfigError
        At the call: a key of the configuration is invalid.
    InputError
        At the call (``angles``, a stack of frames) or while iterating (a frame
        of the wrong shape or type, a dark that does not fit the frames).

    Examples
    --------
    >>> for spot in dctstream.segment(stack, psi, dark=darks,
    ...                               overrides={"background.window": 31}):  # doctest: +SKIP
    ...     print(spot.id, spot.bbox, spot.integral)
    """
    dark_image = None
    if dark is not None and not isinstance(dark, (str, os.PathLike, int, float, np.number)):
        dark_image = np.asarray(dark)
        if dark_image.ndim not in (2, 3) or dark_image.dtype.kind not in "uif" or dark_image.size == 0:
            raise InputError(f"dark: expected a (y, x) image or an (n, y, x) stack of dark frames, "
                             f"got shape {dark_image.shape}, dtype {dark_image.dtype}")
        if dark_image.dtype.kind == "f" and np.isinf(dark_image).any():  # said of the array given, not
            bad = np.argwhere(np.isinf(dark_image))[0]  # of the file it is handed on in (a temporary one)
            raise InputError(f"dark: expected finite dark counts (or NaN where a pixel has none), got "
                             f"{dark_image[tuple(bad)]} at "
                             f"{'frame %d, ' % bad[0] if dark_image.ndim == 3 else ''}pixel (y, x) = "
                             f"({bad[-2]}, {bad[-1]})")
        if isinstance(frames, np.ndarray) and frames.ndim == 3 and dark_image.shape[-2:] != frames.shape[1:]:
            raise InputError(f"dark: expected images of {frames.shape[1]} x {frames.shape[2]} pixels (y, x) like "
                             f"the frames, got shape {dark_image.shape}")
        dark = None
    settings = {"source.url": MEMORY_URL, **_dark_settings(dark, "segment()")}
    cfg = resolve_config(config, overrides, settings, "segment()")
    from .sources.memory import MemorySource

    source = MemorySource(frames, angles, name="frames")
    return _segmenting(cfg, source, dark_image)


_DONE = object()


def _difspot(blob: Blob, row: dict, angles: np.ndarray | None) -> Difspot:
    """The difspot of a closed ``blob`` whose spot-table row is ``row``, as `Run.difspot` reads it from its file."""
    from .sinks.difspots import box_arrays

    volume, mask = box_arrays(blob, row, blob.volume)
    return Difspot.from_row(row, volume, mask, blob.max_index, angles)


def _segmenting(cfg: Config, source, dark_image: np.ndarray | None) -> Iterator[Difspot]:
    """Run the pipeline over ``source`` on a thread; yield each difspot it writes."""
    import h5py

    from .pipeline import Pipeline

    found: queue.SimpleQueue = queue.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dctstream-segment-") as tmp:
        settings: dict[str, Any] = {"output.dir": str(Path(tmp) / "out"),
                                    # a checkpoint is for resuming, and this folder is gone when the iterator is
                                    "output.checkpoint_every_s": 1e12, "output.checkpoint_every_frames": 0}
        dark_url = f"{Path(tmp) / 'dark.h5'}::/dark"
        if dark_image is not None:
            with h5py.File(Path(tmp) / "dark.h5", "w") as h5:
                h5["dark"] = dark_image
            settings.update({"dark.url": dark_url, "dark.value": None})
        cfg = override_config(cfg, settings, label="segment()")

        def work() -> None:
            try:
                pipeline = Pipeline(cfg, source=source)
                pipeline.transient = True
                pipeline.blob_taps.append(lambda blob, row: found.put(_difspot(blob, row, source.angles)))
                pipeline.run()
                found.put(_DONE)
            except InputError as exc:  # said of the array given, not of the file it is handed on in
                found.put(type(exc)(str(exc).replace(f"dark.url: {dark_url}", "dark")) if dark_image is not None
                          else exc)
            except BaseException as exc:  # raised again by the consumer, on its own thread
                found.put(exc)

        worker = threading.Thread(target=work, name="dctstream-segment-api", daemon=True)
        worker.start()
        try:
            while (item := found.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            source.stop()
            worker.join()


class _CallableModule(types.ModuleType):
    """``dctstream.segment`` names both this function and the segmenter's subpackage (whichever was bound
    last): the subpackage is made callable, so ``dctstream.segment(...)`` works either way."""

    def __call__(self, *args, **kwargs):
        return segment(*args, **kwargs)


importlib.import_module(".segment", __package__)
sys.modules[f"{__package__}.segment"].__class__ = _CallableModule
