"""What a Bliss/NeXus scan file says about its own scan: the rotation angles and the dark, for ``auto``.

``source.angles: auto`` takes the positioner that moves monotonically over the
scan with one value per frame: a 1-D dataset in the scan's
``instrument/positioners`` (the motors Bliss scanned) or, in files without
that group, in ``measurement`` (time channels left out).  Several such
positioners: the one the scan's title names (``fscan diffrz 0 0.5 720 ...``);
otherwise none is guessed.  ``dark.url: auto`` takes another scan entry of the
same file whose title says dark and which holds frames of the same shape at the
same place (``/2.1/measurement/marana`` for ``/1.1/measurement/marana``): the
last one taken before the scan, else the first after it.

`resolve_auto` replaces both ``auto`` values by what was found (or None) and
says why, for the run record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import h5py
import numpy as np

from .hdf5 import parse_url

log = logging.getLogger(__name__)

AUTO = "auto"
# measurement channels that grow with every frame without being a positioner
_TIME_CHANNEL = re.compile(r"(^|_)(epoch|elapsed_time|time|timer|timestamp|sec|musst_timer)($|_)", re.I)


def resolve_auto(cfg):
    """``cfg`` with ``source.angles: auto`` and ``dark.url: auto`` replaced, and what was found, by key.

    The second value maps ``"source.angles"`` / ``"dark.url"`` to ``{"url": found or None, "reason": ...}``;
    empty when nothing was ``auto``.
    """
    want_angles = cfg.source.angles == AUTO
    want_dark = cfg.dark.url == AUTO
    if not (want_angles or want_dark):
        return cfg, {}
    found: dict[str, dict] = {}
    url = cfg.source.url or ""
    if cfg.source.protocol == "bliss" or re.match(r"^(redis|rediss|unix)://", url):
        # a blissdata scan: its source picks the angle stream itself, once the scan is known
        want_angles = False
        reason = "a blissdata scan: name the dark with dark.url"
        h5 = None
    elif "::" not in url or "*" in url:
        reason = "the source is not an HDF5 scan file"
        h5 = None
    else:
        h5, reason = _open(url)
    try:
        if want_angles:
            found["source.angles"] = (_find_angles(h5, url) if h5 is not None
                                      else {"url": None, "reason": reason})
        if want_dark:
            if cfg.dark.value is not None or cfg.dark.estimate:
                found["dark.url"] = {"url": None, "reason": "dark.value or dark.estimate is set"}
            else:
                found["dark.url"] = (_find_dark(h5, url) if h5 is not None
                                     else {"url": None, "reason": reason})
    finally:
        if h5 is not None:
            h5.close()
    for key, what in found.items():
        log.info("%s: auto: %s (%s)", key, what["url"] or "none", what["reason"])
    source = cfg.source if not want_angles else dataclasses.replace(cfg.source, angles=found["source.angles"]["url"])
    dark = cfg.dark if not want_dark else dataclasses.replace(cfg.dark, url=found["dark.url"]["url"])
    return dataclasses.replace(cfg, source=source, dark=dark), found


def _open(url: str) -> tuple[h5py.File | None, str]:
    path, _ = parse_url(url)
    if not os.path.exists(path):
        return None, f"{path} does not exist yet"
    for swmr in (False, True):  # the acquisition may still hold the file
        try:
            return h5py.File(path, "r", locking=False, swmr=swmr), ""
        except OSError as exc:
            error = " ".join(str(exc).split())
    return None, f"{path} cannot be opened ({error})"


def _entry(dataset: str) -> tuple[str, str]:
    """``/1.1/measurement/marana`` -> (``/1.1``, ``measurement/marana``)."""
    parts = dataset.strip("/").split("/")
    return "/" + parts[0], "/".join(parts[1:])


def _text(h5: h5py.File, path: str) -> str:
    try:
        value = h5[path][()]
    except (KeyError, ValueError, OSError, TypeError):
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _frames(h5: h5py.File, dataset: str) -> h5py.Dataset | None:
    try:
        obj = h5.get(dataset)
    except (KeyError, ValueError, OSError):
        return None
    return obj if isinstance(obj, h5py.Dataset) else None


def _positioners(h5: h5py.File, entry: str, frames_name: str) -> dict[str, str]:
    """1-D numeric datasets that may be positioners: name -> path, ``instrument/positioners`` first."""
    out: dict[str, str] = {}
    groups = [f"{entry}/instrument/positioners"]
    if groups[0] not in h5:  # a file without Bliss's positioners group (NeXus by hand, simulations)
        groups.append(f"{entry}/measurement")
    for group_path in groups:
        group = h5.get(group_path)
        if not isinstance(group, h5py.Group):
            continue
        for name in group:
            try:
                obj = group.get(name)
            except (KeyError, ValueError, OSError):
                continue  # a dangling link
            if (isinstance(obj, h5py.Dataset) and obj.ndim == 1 and obj.dtype.kind in "uif"
                    and name != frames_name and not (group_path.endswith("measurement") and _TIME_CHANNEL.search(name))):
                out.setdefault(name, f"{group_path}/{name}")
    return out


def _find_angles(h5: h5py.File, url: str) -> dict:
    path, dataset = parse_url(url)
    entry, _ = _entry(dataset)
    frames = _frames(h5, dataset)
    if frames is None or frames.ndim != 3:
        return {"url": None, "reason": f"no frames at {dataset} yet"}
    n = frames.shape[0]
    complete = f"{entry}/end_time" in h5
    moving, named = [], []
    title = _text(h5, f"{entry}/title")
    title_words = set(re.split(r"[\s(),]+", title))
    for name, where in _positioners(h5, entry, dataset.rsplit("/", 1)[-1]).items():
        values = h5[where]
        length = values.shape[0]
        # a scan being written may have one more frame than angles, or the other way round
        if length != n and (complete or abs(length - n) > 1):
            continue
        if name in title_words:
            named.append((name, where))
        v = np.asarray(values[:min(length, n)], np.float64)
        if v.size >= 3 and np.all(np.isfinite(v)) and v[-1] != v[0]:
            steps = np.diff(v)
            if np.all(steps >= 0) or np.all(steps <= 0):
                moving.append((name, where, v[0], v[-1]))
    in_title = [m for m in moving if m[0] in title_words]
    pick = in_title if len(in_title) == 1 else moving if len(moving) == 1 else []
    if pick:
        name, where, first, last = pick[0]
        why = (f"{name} moves monotonically from {first:g} to {last:g} over the "
               f"{'first ' if not complete else ''}{min(n, h5[where].shape[0])} frames, one value per frame")
        if len(moving) > 1:
            why += f"; the title names it ({title!r})"
        return {"url": f"{path}::{where}", "reason": why}
    if not moving and len(named) == 1 and n < 3:  # too early to see motion: trust the title
        name, where = named[0]
        return {"url": f"{path}::{where}", "reason": f"the title names {name} ({title!r}); too few frames yet "
                                                      "to see it move"}
    if len(moving) > 1:
        names = ", ".join(m[0] for m in moving)
        return {"url": None, "reason": f"several positioners move over the scan ({names}) and the title "
                                       f"({title!r}) names none of them; name one with source.angles"}
    return {"url": None, "reason": f"no positioner in {entry} moves monotonically with one value per frame"}


def _scan_number(name: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in name.split("."))
    except ValueError:
        return (float("inf"),)


def _find_dark(h5: h5py.File, url: str) -> dict:
    path, dataset = parse_url(url)
    entry, inside = _entry(dataset)
    frames = _frames(h5, dataset)
    shape = frames.shape[-2:] if frames is not None and frames.ndim == 3 else None
    own = _scan_number(entry.strip("/"))
    before, after = [], []
    for name in h5:
        if "/" + name == entry or "dark" not in _text(h5, f"{name}/title").lower():
            continue
        dark = _frames(h5, f"/{name}/{inside}")
        if dark is None or dark.ndim not in (2, 3) or dark.size == 0 or dark.dtype.kind not in "uif":
            continue
        if shape is not None and dark.shape[-2:] != shape:
            continue
        (before if _scan_number(name) < own else after).append(name)
    if not (before or after):
        return {"url": None, "reason": f"no other scan in {path} has a title with 'dark' and frames at "
                                       f"/<scan>/{inside}"}
    name = max(before, key=_scan_number) if before else min(after, key=_scan_number)
    title = _text(h5, f"{name}/title")
    return {"url": f"{path}::/{name}/{inside}",
            "reason": f"scan {name} of the same file is titled {title!r}, the "
                      f"{'last such scan before' if before else 'first such scan after'} {entry.strip('/')}"}
