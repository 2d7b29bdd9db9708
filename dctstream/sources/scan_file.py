"""What a Bliss/NeXus scan file says about its own scan: the rotation angles, dark and flat, for ``auto``.

``source.angles: auto`` takes the positioner that moves monotonically over the
scan with one value per frame: a 1-D dataset in the scan's
``instrument/positioners`` (the motors Bliss scanned) or, in files without
that group, in ``measurement`` (time channels left out).  Several such
positioners: the one the scan's title names (``fscan diffrz 0 0.5 720 ...``);
otherwise none is guessed.  ``dark.url: auto`` takes another scan entry of the
same file whose title says dark and which holds frames of the same shape at the
same place (``/2.1/measurement/marana`` for ``/1.1/measurement/marana``): the
last one taken before the scan, else the first after it.  For a DECTRIS master
file (``x_master.h5::/entry/data``) the angles are its
``/entry/sample/goniometer/omega``.

``detector.flat: auto`` takes the references (sample out) of the same file, with
frames at the same place: scans whose title says ref/flat, or in which nothing
moves and the sample was moved out (a positioner of the rotation scan other
than the rotated one stands elsewhere): the last one before the scan, else the
first after.  References that do not light the whole detector evenly (a
direct-beam reference, as in most DCT set-ups: more than 1 % of the pixels over
1 / flat_floor x the median, or a median <= 0 after the dark) are no flat
field: none is taken, and the record says so.

A ``source.url`` that is a plain HDF5 file (no ``::/dataset``) is a DCT dataset
file in the Bliss layout (``1.1``, ``2.1``, ...: references, the rotation scan,
references, the dark): the rotation scan is the one, not titled dark or ref,
in which a positioner moves monotonically with one value per frame (the most
frames if several), its detector the 3-D integer dataset of its
``measurement`` with as many frames (the only one, or the one with the most
pixels); angles, dark and flat then follow from it as above.  Naming the
dataset, or any of the others, overrides what would be found.

`resolve_auto` replaces the ``auto`` values by what was found (or None) and
says why, for the run record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from contextlib import suppress

import h5py
import numpy as np

from ..errors import InputError
from .hdf5 import parse_url, read_image

log = logging.getLogger(__name__)

AUTO = "auto"
# measurement channels that grow with every frame without being a positioner
# A DECTRIS master file: its frames' group, and where it says the rotation angle of each frame.
MASTER_DATA = "/entry/data"
MASTER_OMEGA = "/entry/sample/goniometer/omega"
_TIME_CHANNEL = re.compile(r"(^|_)(epoch|elapsed_time|time|timer|timestamp|sec|musst_timer)($|_)", re.I)


def resolve_auto(cfg):
    """``cfg`` with a dataset file's scan picked, the ``auto`` values replaced, and what was found, by key.

    The second value maps ``"source.url"`` (a dataset file's rotation scan), ``"source.angles"``,
    ``"dark.url"`` and ``"detector.flat"`` to ``{"url": found or None, "reason": ...}``; empty when nothing was
    ``auto``.
    """
    found: dict[str, dict] = {}
    if is_dataset_file(cfg.source):
        found["source.url"] = pick_rotation_scan(cfg.source.url)
        cfg = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, url=found["source.url"]["url"]))
    want_angles = cfg.source.angles == AUTO
    want_dark = cfg.dark.url == AUTO
    want_flat = cfg.detector.flat == AUTO
    if not (want_angles or want_dark or want_flat):
        return cfg, found
    url = cfg.source.url or ""
    if cfg.source.protocol == "bliss" or re.match(r"^(redis|rediss|unix)://", url):
        # a blissdata scan: its source picks the angle stream itself, once the scan is known
        want_angles = False
        reason = "a blissdata scan: name the dark with dark.url"
        h5 = None
    elif "*" in url and "::" not in url:  # a folder of frame files: see sources/folder.py
        from .folder import find_dark
        if want_angles:
            found["source.angles"] = {"url": None, "reason": "a folder of frame files: psi from their headers or "
                                                             "the folder's .info file, said once read"}
        if want_dark and cfg.dark.value is None and not cfg.dark.estimate:
            found["dark.url"] = find_dark(url)
        reason = "the source is a folder of frame files"
        h5 = None
    elif "::" not in url:
        reason = "the source is not an HDF5 scan file"
        h5 = None
    else:
        h5, reason = _open(url)
    master = h5 is not None and parse_url(url)[1].rstrip("/") == MASTER_DATA
    try:
        if want_angles and "source.angles" not in found:  # a folder's was said above
            found["source.angles"] = (_master_angles(h5, url) if master else _find_angles(h5, url) if h5 is not None
                                      else {"url": None, "reason": reason})
        if want_dark and "dark.url" not in found:
            if cfg.dark.value is not None or cfg.dark.estimate:
                found["dark.url"] = {"url": None, "reason": "dark.value or dark.estimate is set"}
            else:
                found["dark.url"] = (_find_dark(h5, url) if h5 is not None
                                     else {"url": None, "reason": reason})
        if want_flat:
            dark = found["dark.url"]["url"] if want_dark else cfg.dark.url
            found["detector.flat"] = (_find_flat(h5, url, dark, cfg.dark.value, cfg.detector.flat_floor)
                                      if h5 is not None else {"url": None, "reason": reason.replace("dark.url",
                                                                                                   "detector.flat")})
    finally:
        if h5 is not None:
            h5.close()
    for key, what in found.items():  # a warning where something of the kind was there but could not be taken
        log.log(logging.WARNING if what.pop("warn", False) else logging.INFO, "%s: auto: %s (%s)", key,
                what["url"] or "none", what["reason"])
    missed = [key for key in ("source.angles", "dark.url") if key in found and found[key]["url"] is None]
    if missed and reason.endswith("does not exist yet"):  # a run started before its scan's file
        log.warning("%s: auto: %s, so none was looked for: the run goes on without %s (give %s, or start the run "
                    "once the file is there)", ", ".join(missed), reason,
                    " and ".join({"source.angles": "angles (no psi)", "dark.url": "a dark"}[k] for k in missed),
                    " and ".join(missed))
    source = cfg.source if not want_angles else dataclasses.replace(cfg.source, angles=found["source.angles"]["url"])
    dark = cfg.dark if not want_dark else dataclasses.replace(cfg.dark, url=found["dark.url"]["url"])
    detector = (cfg.detector if not want_flat
                else dataclasses.replace(cfg.detector, flat=found["detector.flat"]["url"]))
    return dataclasses.replace(cfg, source=source, dark=dark, detector=detector), found


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
    """1-D numeric datasets that may be positioners: name -> path, ``instrument/positioners`` first, then
    ``measurement`` (a file without Bliss's positioners group, NeXus by hand, simulations; or one whose
    positioners hold each motor's value at the start only)."""
    out: dict[str, str] = {}
    groups = [f"{entry}/instrument/positioners", f"{entry}/measurement"]
    for group_path, name, obj in _numeric_datasets(h5, groups):
        if obj.ndim == 1 and name != frames_name and not (group_path.endswith("measurement")
                                                          and _TIME_CHANNEL.search(name)):
            out.setdefault(name, f"{group_path}/{name}")
    return out


def _numeric_datasets(h5: h5py.File, group_paths):
    """(group path, name, dataset) of the numeric datasets in those groups, the groups that exist, in order;
    dangling links passed over."""
    for group_path in group_paths:
        group = h5.get(group_path)
        if not isinstance(group, h5py.Group):
            continue
        for name in group:
            try:
                obj = group.get(name)
            except (KeyError, ValueError, OSError):
                continue  # a dangling link
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "uif":
                yield group_path, name, obj


def _find_angles(h5: h5py.File, url: str) -> dict:
    path, dataset = parse_url(url)
    entry, _ = _entry(dataset)
    frames = _frames(h5, dataset)
    if frames is None or frames.ndim != 3:
        return {"url": None, "reason": f"no frames at {dataset} yet"}
    n = frames.shape[0]
    complete = f"{entry}/end_time" in h5
    moving, named, turning = [], [], []
    near = []  # what kept the positioner the title names from being taken: said as a warning
    title = _text(h5, f"{entry}/title")
    title_words = set(re.split(r"[\s(),]+", title))
    written = complete or frames.maxshape[0] == n  # not a dataset that may still grow
    for name, where in _positioners(h5, entry, dataset.rsplit("/", 1)[-1]).items():
        values = h5[where]
        length = values.shape[0]
        # a scan being written may have one more frame than angles, or the other way round
        if length != n and (complete or abs(length - n) > 1):
            # more values than frames (or a finished scan's) and as many as along another axis: frames not first
            if (written and (length > n or complete) and length in frames.shape[1:]
                    and _monotonic(np.asarray(values[()], np.float64))):
                raise InputError(f"source.url: {url}: shape {frames.shape}, and {name} ({where}) moves over {length} "
                                 f"values, as many as along its axis {frames.shape.index(length, 1)}, not its first: "
                                 "expected the frames along the first axis (frames, y, x), as detectors write them")
            if name in title_words:
                near.append(f"{name}, which the title names, has {length} values for {n} frames")
            continue
        if name in title_words:
            named.append((name, where))
        v = np.asarray(values[:min(length, n)], np.float64)
        if name in title_words and not np.all(np.isfinite(v)):
            bad = int(np.flatnonzero(~np.isfinite(v))[0])
            near.append(f"{name}, which the title names, reads {v[bad]} at frame {bad}")
        if v.size >= 3 and np.all(np.isfinite(v)) and v[-1] != v[0]:
            steps = np.diff(v)
            if np.all(steps >= 0) or np.all(steps <= 0):
                moving.append((name, where, v[0], v[-1]))
            elif name in title_words and np.unique(v).size == v.size:
                turning.append((name, where, v.min(), v.max()))  # interlaced turns, back and forth
    in_title = [m for m in moving if m[0] in title_words]
    pick = in_title if len(in_title) == 1 else moving if len(moving) == 1 else []
    if pick:
        name, where, first, last = pick[0]
        why = (f"{name} moves monotonically from {first:g} to {last:g} over the "
               f"{'first ' if not complete else ''}{min(n, h5[where].shape[0])} frames, one value per frame")
        if len(moving) > 1:
            why += f"; the title names it ({title!r})"
        return {"url": f"{path}::{where}", "reason": why}
    if not moving and len(turning) == 1:  # frames are then taken in psi order (source.order)
        name, where, low, high = turning[0]
        return {"url": f"{path}::{where}", "reason": f"the title names {name} ({title!r}), which takes a value of "
                                                      f"its own at each of the {'first ' if not complete else ''}"
                                                      f"{min(n, h5[where].shape[0])} frames, from {low:g} to "
                                                      f"{high:g}, not in order (interlaced turns, back and forth, "
                                                      "or one turn recorded modulo 360)"}
    if not moving and len(named) == 1 and n < 3:  # too early to see motion: trust the title
        name, where = named[0]
        return {"url": f"{path}::{where}", "reason": f"the title names {name} ({title!r}); too few frames yet "
                                                      "to see it move"}
    if len(moving) > 1:
        names = ", ".join(m[0] for m in moving)
        return {"url": None, "reason": f"several positioners move over the scan ({names}) and the title "
                                       f"({title!r}) names none of them; name one with source.angles"}
    if near:
        return {"url": None, "warn": True,
                "reason": f"{'; '.join(near)}: no angles taken, psi not reported; name them with source.angles"}
    return {"url": None, "reason": f"no positioner in {entry} moves monotonically with one value per frame"}


def _monotonic(v: np.ndarray) -> bool:
    """At least 3 finite values that move, never back."""
    steps = np.diff(v)
    return (v.size >= 3 and bool(np.all(np.isfinite(v))) and v[-1] != v[0]
            and bool(np.all(steps >= 0) or np.all(steps <= 0)))


def _scan_number(name: str) -> tuple[float, ...]:
    """The scan's number and subscan, ``3.1`` -> (3, 1), at the end of its entry's name (a collection file's
    entries are named ``sample_0001_3.1``); (inf,) when the name ends in none."""
    match = re.search(r"(\d+)\.(\d+)$", name)
    if match:
        return float(match[1]), float(match[2])
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
    passed_over = []  # (scan, why): titled dark, but not a dark of these frames
    for name in h5:
        if "/" + name == entry or "dark" not in _text(h5, f"{name}/title").lower():
            continue
        dark = _frames(h5, f"/{name}/{inside}")
        if dark is None or dark.ndim not in (2, 3) or dark.size == 0 or dark.dtype.kind not in "uif":
            passed_over.append((name, f"no frames at /{name}/{inside}" if dark is None else
                                f"/{name}/{inside} holds {dark.dtype} {list(dark.shape)}, not frames"))
            continue
        if shape is not None and dark.shape[-2:] != shape:
            passed_over.append((name, f"its frames are {dark.shape[-1]} x {dark.shape[-2]} px, the scan's "
                                      f"{shape[1]} x {shape[0]}"))
            continue
        (before if _scan_number(name) < own else after).append(name)
    if not (before or after):
        why = "".join(f"; scan {name} is titled dark but {reason}" for name, reason in passed_over)
        return {"url": None, "warn": bool(passed_over),
                "reason": f"no other scan in {path} has a title with 'dark' and frames at /<scan>/{inside}{why}"}
    name = max(before, key=_scan_number) if before else min(after, key=_scan_number)
    title = _text(h5, f"{name}/title")
    return {"url": f"{path}::/{name}/{inside}",
            "reason": f"scan {name} of the same file is titled {title!r}, the "
                      f"{'last such scan before' if before else 'first such scan after'} {entry.strip('/')}"}


# titles of the scans that are not the rotation scan
_DARK_TITLE = re.compile(r"dark", re.I)
_REF_TITLE = re.compile(r"ref|flat|white|sample.?out", re.I)
# References with more pixels than this over 1 / flat_floor x their median (a beam far brighter than the
# rest of the detector) are no flat field: dividing by them would dim whatever falls in the beam.
_FLAT_BRIGHT_FRACTION = 0.01


def is_dataset_file(source_cfg) -> bool:
    """Whether ``source.url`` names an HDF5 file without a dataset: a DCT dataset file whose scans are looked at."""
    url = source_cfg.url or ""
    if source_cfg.protocol not in ("auto", "hdf5", "hdf5-live") or "::" in url or "*" in url or "://" in url:
        return False
    return os.path.isfile(url) and not _not_hdf5(url)


def _not_hdf5(path: str) -> bool:
    try:
        return not h5py.is_hdf5(path)
    except OSError:
        return True


def _images(h5: h5py.File, entry: str) -> dict[str, h5py.Dataset]:
    """The 3-D integer datasets of ``entry``'s measurement group (detectors' frames), by name."""
    group = h5.get(f"{entry}/measurement")
    out = {}
    if isinstance(group, h5py.Group):
        for name in group:
            obj = _frames(h5, f"{entry}/measurement/{name}")
            if obj is not None and obj.ndim == 3 and obj.dtype.kind in "ui" and obj.shape[0] > 0:
                out[name] = obj
    return out


def _movers(h5: h5py.File, entry: str, n: int, frames_name: str) -> list[tuple[str, str, np.ndarray]]:
    """Positioners of ``entry`` moving monotonically with one value per frame (or one more or fewer)."""
    out = []
    for name, where in _positioners(h5, entry, frames_name).items():
        values = h5[where]
        if abs(values.shape[0] - n) > 1:
            continue
        v = np.asarray(values[:min(values.shape[0], n)], np.float64)
        if _monotonic(v):
            out.append((name, where, v))
    return out


def _motor_values(h5: h5py.File, entry: str) -> dict[str, float]:
    """Where each motor stood as ``entry`` began: Bliss's ``positioners_start``, else the first positioner values."""
    out: dict[str, float] = {}
    for _, name, obj in _numeric_datasets(h5, (f"{entry}/instrument/positioners_start",
                                               f"{entry}/instrument/positioners")):
        if obj.size:
            out.setdefault(name, float(np.ravel(obj[()])[0]))
    return out


def pick_rotation_scan(path: str) -> dict:
    """``{"url": path::/<scan>/measurement/<detector>, "reason": ...}`` for a DCT dataset file; InputError if
    it holds no rotation scan, or several detectors equally likely."""
    h5, reason = _open(f"{path}::/")
    if h5 is None:
        raise InputError(f"source.url: {reason}")
    with h5:
        data = h5.get(MASTER_DATA)
        if isinstance(data, h5py.Group) and any(name.startswith("data_") for name in data):
            return {"url": f"{path}::{MASTER_DATA}", "reason": f"a DECTRIS master file: the frames of its "
                                                              f"{len(data)} data files ({MASTER_DATA}/data_*)"}
        candidates, seen = [], []
        for name in sorted(h5, key=_scan_number):
            title = _text(h5, f"{name}/title")
            images = _images(h5, "/" + name)
            seen.append(f"{name} ({title!r}: {', '.join(images) or 'no frames'})")
            if not images or _DARK_TITLE.search(title) or _REF_TITLE.search(title):
                continue
            for det, dset in images.items():
                movers = _movers(h5, "/" + name, dset.shape[0], det)
                if movers:
                    candidates.append((dset.shape[0], int(np.prod(dset.shape[1:])), name, det, title, movers))
        if not candidates:
            raise InputError(f"source.url: {path}: no rotation scan in this file (a scan, not titled dark or ref, "
                             f"with frames and a positioner moving with one value per frame); its scans: "
                             f"{'; '.join(seen) or 'none'}; expected a DCT dataset file, or name the frames as "
                             f"{path}::/<scan>/measurement/<detector>")
        candidates.sort(key=lambda c: c[:2], reverse=True)
        best = candidates[0]
        tied = [c for c in candidates if c[:2] == best[:2]]
        if len(tied) > 1:
            names = ", ".join(f"/{c[2]}/measurement/{c[3]}" for c in tied)
            raise InputError(f"source.url: {path}: several rotation scans or detectors with {best[0]} frames "
                             f"({names}), expected one; name it as {path}::<one of them>")
        n, _, name, det, title, movers = best
        motors = ", ".join(f"{m[0]} {m[2][0]:g} to {m[2][-1]:g}" for m in movers)
        why = f"scan {name} ({title!r}): {n} frames of {det} while {motors}"
        if len(candidates) > 1:
            others = ", ".join(f"{c[2]}/{c[3]} ({c[0]})" for c in candidates[1:])
            why += f"; the most frames of the scans that rotate (also {others})"
        return {"url": f"{path}::/{name}/measurement/{det}", "reason": why}


def _references(h5: h5py.File, url: str) -> list[tuple[str, str]]:
    """Scans of the file that are references (sample out) for the scan at ``url``: (name, why)."""
    _, dataset = parse_url(url)
    entry, inside = _entry(dataset)
    frames = _frames(h5, dataset)
    shape = frames.shape[-2:] if frames is not None and frames.ndim == 3 else None
    own = _motor_values(h5, entry)
    rotated = {m[0] for m in _movers(h5, entry, frames.shape[0], inside.rsplit("/", 1)[-1])} if shape else set()
    out = []
    for name in h5:
        title = _text(h5, f"{name}/title")
        if "/" + name == entry or _DARK_TITLE.search(title):
            continue
        ref = _frames(h5, f"/{name}/{inside}")
        if ref is None or ref.ndim != 3 or ref.shape[0] == 0 or ref.dtype.kind not in "uif":
            continue
        if shape is not None and ref.shape[-2:] != shape:
            continue
        if _REF_TITLE.search(title):
            out.append((name, f"titled {title!r}"))
            continue
        if _movers(h5, "/" + name, ref.shape[0], inside.rsplit("/", 1)[-1]):
            continue  # something moved over it: another scan, not references
        moved = [(m, v, own[m]) for m, v in _motor_values(h5, "/" + name).items()
                 if m in own and m not in rotated and abs(v - own[m]) > 1e-6 * max(1.0, abs(own[m]))]
        if moved:
            m, v, was = moved[0]
            out.append((name, f"nothing moves over it and {m} stands at {v:g}, not {was:g} (sample out)"))
    return out


def _find_flat(h5: h5py.File, url: str, dark_url: str | None, dark_value: float | None, floor: float) -> dict:
    path, dataset = parse_url(url)
    entry, inside = _entry(dataset)
    refs = _references(h5, url)
    if not refs:
        frames = _frames(h5, dataset)
        shape = frames.shape[-2:] if frames is not None and frames.ndim == 3 else None
        other = [(name, ref.shape[-2:]) for name in h5 if _REF_TITLE.search(_text(h5, f"{name}/title"))
                 and not _DARK_TITLE.search(_text(h5, f"{name}/title"))
                 and isinstance(ref := h5.get(f"/{name}/{inside}"), h5py.Dataset) and ref.ndim == 3
                 and shape is not None and ref.shape[-2:] != shape]
        why = "".join(f"; scan {name} is titled as references but its frames are {s[1]} x {s[0]} px, the scan's "
                      f"{shape[1]} x {shape[0]}" for name, s in other)
        return {"url": None, "warn": bool(other),
                "reason": f"no reference scan (sample out) in {path} with frames at /<scan>/{inside}{why}"}
    own = _scan_number(entry.strip("/"))
    before = [r for r in refs if _scan_number(r[0]) < own]
    after = [r for r in refs if _scan_number(r[0]) > own] or [r for r in refs if r not in before]  # unnumbered
    name, why = max(before, key=lambda r: _scan_number(r[0])) if before else min(after, key=lambda r: _scan_number(r[0]))
    ref = h5[f"/{name}/{inside}"]
    image = np.asarray(ref[:min(ref.shape[0], 3)], np.float64).mean(axis=0)
    if dark_value is not None:
        image -= dark_value
    elif dark_url and "::" in dark_url:
        dark_path, dark_dataset = parse_url(dark_url)
        dark = h5.get(dark_dataset) if os.path.realpath(dark_path) == os.path.realpath(path) else None
        if isinstance(dark, h5py.Dataset) and dark.shape[-2:] == image.shape:
            image -= np.asarray(dark[:1] if dark.ndim == 3 else dark[()], np.float64).reshape(image.shape)
    elif dark_url:  # an EDF, TIFF or .npy file (its errors are the detector's to say, when it reads it)
        with suppress(InputError):
            dark = np.asarray(read_image(dark_url, "dark.url"), np.float64)
            if dark.shape[-2:] == image.shape:
                image -= dark.reshape(-1, *image.shape).mean(axis=0)
    median = float(np.median(image))
    where = f"scan {name} ({why}), the {'last such scan before' if before else 'first such scan after'} " \
            f"{entry.strip('/')}"
    if not median > 0:
        return {"url": None, "reason": f"{where}: it is dark on most of the detector (median {median:.4g} counts after "
                                       "the dark: a direct-beam reference, not a flat field): no flat"}
    bright = float(np.mean(image > median / floor))
    if bright > _FLAT_BRIGHT_FRACTION:
        return {"url": None, "reason": f"{where}: {bright:.0%} of its pixels are over {1 / floor:g} x its median "
                                       "(a direct-beam reference, not a flat field): no flat"}
    return {"url": f"{path}::/{name}/{inside}", "reason": where}


def _master_angles(h5: h5py.File, url: str) -> dict:
    """A DECTRIS master file's omega, one value per frame, when it moves."""
    path, _ = parse_url(url)
    omega = _frames(h5, MASTER_OMEGA)
    if omega is None or omega.ndim != 1 or omega.dtype.kind not in "uif" or omega.shape[0] < 2:
        return {"url": None, "reason": f"the DECTRIS master file has no {MASTER_OMEGA} with one angle per frame"}
    v = np.asarray(omega[()], np.float64)
    if not np.all(np.isfinite(v)) or v[-1] == v[0]:
        return {"url": None, "reason": f"{MASTER_OMEGA} of the DECTRIS master file does not move"}
    return {"url": f"{path}::{MASTER_OMEGA}",
            "reason": f"the DECTRIS master file's goniometer: omega from {v[0]:g} to {v[-1]:g} over {v.size} frames"}
