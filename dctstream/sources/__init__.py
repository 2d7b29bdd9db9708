"""Sources of frames: iterators of ``Frame`` with ``close()``, chosen by ``source.url``; what each must say
is `base.FrameSource`."""

from __future__ import annotations

import logging
import os
import re
import time

import h5py

from ..errors import ConfigError, InputError
from .base import COMPLETE_ENDS, FINAL_ENDS, FrameSource, check_source
from .hdf5 import Hdf5FileSource, load_dark, parse_url, read_dataset, read_image

log = logging.getLogger(__name__)

__all__ = ["COMPLETE_ENDS", "FINAL_ENDS", "FrameSource", "check_source", "Hdf5FileSource", "load_dark", "parse_url", "read_dataset", "read_image", "open_source", "source_kind"]

# The ports DECTRIS detectors serve their streams on, by default.
_STREAM_PORTS = {9999: "stream1", 31001: "stream2"}


def is_bliss_url(url: str) -> bool:
    """A blissdata (Redis) server's URL: redis://, rediss:// or unix://."""
    return re.match(r"^(redis|rediss|unix)://", url) is not None


def source_kind(cfg) -> str:
    """hdf5 (a recorded file), hdf5-live (a file being written), dectris-master (a DECTRIS master file's
    ``/entry/data``, its data files followed as they appear), stream1, stream2, folder or bliss.

    With ``protocol: auto`` an HDF5 file is followed as it grows unless it is
    complete; ``hdf5`` or ``hdf5-live`` decides it.
    """
    url, protocol = cfg.url, cfg.protocol
    if is_bliss_url(url):
        if protocol in ("auto", "bliss"):
            return "bliss"
        raise ConfigError(f"source.protocol: {url} is a blissdata (Redis) server, expected auto or bliss, "
                          f"got {protocol}")
    if protocol == "bliss":
        raise ConfigError(f"source.url: {url}: expected redis://host:port (the blissdata server) for "
                          "protocol bliss")
    if re.match(r"^(tcp|ipc|inproc)://", url):
        if protocol in ("stream1", "stream2"):
            return protocol
        port = re.search(r":(\d+)$", url)
        if protocol == "auto" and port and int(port.group(1)) in _STREAM_PORTS:
            return _STREAM_PORTS[int(port.group(1))]
        raise ConfigError(f"source.protocol: {url} is a stream, expected stream1 or stream2 "
                          f"(the detector's stream interface), got {protocol}")
    if protocol == "folder" or (protocol == "auto" and "*" in url):
        return "folder"
    if "::" not in url:
        raise InputError(f"source.url: {url}: expected a URL of the form path/to/file.h5::/path/to/dataset, "
                         "an existing DCT dataset file path/to/dataset.h5, tcp://host:port (a detector stream) "
                         "or path/to/dir/*.edf (a folder of frames)")
    if url.partition("::")[2].rstrip("/") == "/entry/data" and protocol in ("auto", "hdf5-live"):
        return "dectris-master"  # a DECTRIS master file: its frames are in data files, followed as they appear
    if protocol in ("hdf5", "hdf5-live"):
        return protocol
    if protocol != "auto":
        raise ConfigError(f"source.protocol: {url} is an HDF5 dataset, expected auto, hdf5 or hdf5-live, "
                          f"got {protocol}")
    return "hdf5" if _finished(url, cfg.idle_timeout_s) else "hdf5-live"


def _not_hdf5(path: str) -> str | None:
    """What is wrong with ``path`` as an HDF5 file judged by its first bytes, or None."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "is empty (0 bytes)"
        if not h5py.is_hdf5(path):
            with open(path, "rb") as f:
                head = f.read(8)
            return f"is not an HDF5 file (no HDF5 signature; it starts with {head!r})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _finished(url: str, idle_timeout_s: float = 60.0) -> bool:
    """Whether the scan file exists and is complete: it says so (Bliss writes the scan's
    end_time), or no writer holds it (HDF5 refuses a plain read-only open while one does) and it
    does not say the scan started without saying it ended (a ``start_time`` and no ``end_time``).

    A file that is not readable HDF5 and that nobody changed for ``idle_timeout_s`` is no scan being
    written: an `InputError` says at once what is wrong with it (a live one is waited for at most that long).
    """
    path, dataset = parse_url(url)
    if not os.path.exists(path):
        return False
    if os.path.isdir(path):
        raise InputError(f"source.url: {path}: is a folder, expected an HDF5 file (from {url})")
    try:
        age_s = time.time() - os.path.getmtime(path)
    except OSError:
        age_s = 0.0
    stale = age_s > idle_timeout_s

    def broken(what: str) -> InputError:
        return InputError(f"source.url: {path}: {what}, expected an HDF5 file of frames (it has not changed for "
                          f"{age_s:.0f} s, so it is not being written; source.protocol: hdf5-live waits for it)")

    problem = _not_hdf5(path)
    if problem:
        if stale:
            raise broken(problem)
        return False
    scan = "/" + dataset.strip("/").split("/")[0]
    try:
        with h5py.File(path, "r") as h5:
            # a Bliss scan says when it ended: one started and not ended had its writer stop mid-scan (or has one
            # that lets the file go between frames): followed, it ends incomplete after the idle timeout
            if f"{scan}/start_time" in h5 and f"{scan}/end_time" not in h5:
                if stale:  # nothing changed it for the idle timeout: not being written, whatever its writer was
                    log.warning("%s: scan %s has a start_time and no end_time, and the file has not changed for %.0f "
                                "s: read as recorded (if its acquisition stopped before the scan ended, these are "
                                "the frames it took)", path, scan, age_s)
                    return True
                log.warning("%s: scan %s has a start_time and no end_time, and no writer holds the file: its "
                            "acquisition goes on in a writer that lets the file go between frames, or stopped before "
                            "the scan ended: followed, it ends after %g s without a new frame "
                            "(source.idle_timeout_s), incomplete unless end_time comes", path, scan, idle_timeout_s)
                return False
            return True
    except OSError:
        pass
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return f"{scan}/end_time" in h5
    except OSError as exc:  # mid-write, or a file system without locks: follow it
        if stale:
            try:
                with h5py.File(path, "r", locking=False, swmr=True) as h5:
                    return f"{scan}/end_time" in h5
            except OSError:
                raise broken(f"cannot be opened as HDF5 ({' '.join(str(exc).split())})") from None
        return False


def open_source(cfg):
    """The source that the ``source`` config section names."""
    kind = source_kind(cfg)
    if kind == "hdf5":
        return Hdf5FileSource(cfg.url, cfg.angles, missing=cfg.missing)
    if kind == "hdf5-live":
        from .hdf5_live import Hdf5WatchSource
        return Hdf5WatchSource(cfg)
    if kind == "dectris-master":
        from .hdf5_live import DectrisMasterSource
        return DectrisMasterSource(cfg)
    if kind == "bliss":
        from .bliss import BlissdataSource
        return BlissdataSource(cfg)
    if kind == "folder":
        from .folder import FolderSource
        return FolderSource(cfg)
    from .stream import Stream1Source, Stream2Source
    return (Stream1Source if kind == "stream1" else Stream2Source)(cfg)
