"""Play a recorded or simulated scan back the way an acquisition system writes it.

``replay_hdf5`` grows one HDF5 dataset frame by frame (with or without SWMR,
compressed or not), ``replay_edf`` writes one EDF file per frame,
``replay_dectris`` a DECTRIS master file and its data files one after another; all at a
given frame rate, so that live sources can be tested against real writers.

``start_in_thread`` and ``start_in_process`` run a replayer in the background
while a source reads.  Use a process for HDF5: HDF5 opens a file only once
per process, so a reader in the writer's process reads the writer's memory,
not the file, and tests nothing of what another process sees.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import posixpath
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import fabio.edfimage
import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4 with h5py)
import numpy as np

from dctstream.sources.hdf5 import parse_url, read_dataset
from simulators.dct_scan import FRAMES_PATH

ANGLES_NAME = "diffrz"  # the angles go next to the frames, as in Bliss files


def _source(src_url: str, angles_url: str | None, stop_after: int | None) -> Iterator[tuple[np.ndarray, float | None]]:
    """(frame, psi) of the recorded scan, one frame in memory at a time."""
    path, name = parse_url(src_url)
    psi = None if angles_url is None else read_dataset(angles_url).astype(np.float64)
    with h5py.File(path, "r", locking=False) as f:
        frames = f[name]
        n = frames.shape[0] if stop_after is None else min(stop_after, frames.shape[0])
        for k in range(n):
            yield frames[k], None if psi is None else float(psi[k])


def _paced(items, fps: float | None):
    """``items``, item k not before k / fps seconds from the start (no waiting for fps 0 or None)."""
    start = time.monotonic()
    for k, item in enumerate(items):
        if fps:
            time.sleep(max(0.0, start + k / fps - time.monotonic()))
        yield k, item


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def replay_hdf5(
    src_url: str,
    dst_path: str | os.PathLike,
    *,
    dataset: str = FRAMES_PATH,
    fps: float | None = 10.0,
    swmr: bool = True,
    compression=None,
    angles_url: str | None = None,
    end_time: bool = True,
    stop_after: int | None = None,
    on_frame: Callable[[int], None] | None = None,
    on_resize: Callable[[int], None] | None = None,
    chunk_frames: int = 1,
) -> int:
    """Write the frames of ``src_url`` to ``dst_path::dataset`` one by one, as an acquisition does.

    Creates the file (overwriting it) and a dataset (0, y, x) that grows along
    its first axis, ``chunk_frames`` frames per chunk (a chunk of several is written again at each flush),
    compressed with ``compression`` (as for h5py: "gzip", ``hdf5plugin.Bitshuffle()``, ...).  Each frame is
    appended by resizing the dataset, then writing the frame, then flushing.
    ``swmr=True`` writes in SWMR mode (latest file format); ``swmr=False``
    holds the file open for writing without SWMR, in the default file format
    (with the latest one, HDF5 keeps readers out while the file is open).
    The angles of ``angles_url``, if given, are appended alongside to a 1-D
    dataset ``diffrz`` next to the frames.  At the end ``end_time`` is written
    to the dataset's top-level group (``/1.1/end_time``) unless
    ``end_time=False`` (a writer that died).  ``stop_after`` frames at most.

    ``on_resize(k)``, if given, is called once the dataset was resized for
    frame k and flushed, before frame k is written (a half-written last
    frame); ``on_frame(k)`` once frame k is written and flushed.  ``fps`` 0 or
    None writes as fast as possible.  Returns the number of frames written.
    """
    top = next(p for p in dataset.split("/") if p)
    count = 0
    with h5py.File(dst_path, "w", libver="latest" if swmr else None) as f:
        scan = f.require_group(top)
        scan["title"] = "replayed scan"
        scan["start_time"] = _now()
        images = angles = None
        for k, (frame, psi) in _paced(_source(src_url, angles_url, stop_after), fps):
            if images is None:  # SWMR allows no new objects once on: create them all first
                images = f.create_dataset(dataset, shape=(0, *frame.shape), maxshape=(None, *frame.shape),
                                          chunks=(chunk_frames, *frame.shape), dtype=frame.dtype,
                                          compression=compression)
                if angles_url is not None:
                    angles = f.create_dataset(posixpath.join(posixpath.dirname(dataset), ANGLES_NAME),
                                              shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64)
                if swmr:
                    f.swmr_mode = True
            if angles is not None:
                angles.resize(k + 1, axis=0)
                angles[k] = psi
            images.resize(k + 1, axis=0)
            if on_resize is not None:
                f.flush()
                on_resize(k)
            images[k] = frame
            f.flush()
            count = k + 1
            if on_frame is not None:
                on_frame(k)
        if end_time and not swmr:
            scan["end_time"] = _now()
    if end_time and swmr:
        with h5py.File(dst_path, "a") as f:  # objects can only be added outside SWMR mode
            f[top]["end_time"] = _now()
    return count


def replay_edf(
    src_url: str,
    dst_dir: str | os.PathLike,
    *,
    prefix: str = "scan",
    fps: float | None = 10.0,
    angles_url: str | None = None,
    stop_after: int | None = None,
    on_frame: Callable[[int], None] | None = None,
) -> int:
    """Write the frames of ``src_url`` as ``dst_dir/prefix0000.edf``, ``prefix0001.edf``, ... one by one.

    Each file is written under a temporary name (``.part`` appended) and
    renamed, as detector servers do, so a complete name is a complete file.
    The angle of the frame, when ``angles_url`` gives them, is in the header
    as ``omega`` (degrees).  ``fps``, ``stop_after`` and ``on_frame`` as for
    ``replay_hdf5``.  Returns the number of frames written.
    """
    os.makedirs(dst_dir, exist_ok=True)
    count = 0
    for k, (frame, psi) in _paced(_source(src_url, angles_url, stop_after), fps):
        header = {} if psi is None else {"omega": repr(psi)}
        path = os.path.join(dst_dir, f"{prefix}{k:04d}.edf")
        fabio.edfimage.EdfImage(data=frame, header=header).write(path + ".part")
        os.replace(path + ".part", path)
        count = k + 1
        if on_frame is not None:
            on_frame(k)
    return count


def replay_dectris(
    src_url: str,
    master_path: str | os.PathLike,
    *,
    frames_per_file: int = 100,
    fps: float | None = 10.0,
    angles_url: str | None = None,
    bit_depth: int | None = None,
    pixel_mask: np.ndarray | None = None,
    on_file: Callable[[int], None] | None = None,
) -> int:
    """Write the frames of ``src_url`` as a DECTRIS detector's file writer does: the master file
    ``x_master.h5`` first (``/entry/data/data_NNNNNN`` external links to every data file of the series,
    ``detectorSpecific/nimages``, ``ntrigger`` 1, pixel counts, ``bit_depth_image`` (default: the frames'
    type), ``pixel_mask`` (default: 1 where frame 0 holds all bits set, the module gaps), and the
    frames' angles at ``/entry/sample/goniometer/omega`` when ``angles_url`` is given), then the data files
    ``x_data_NNNNNN.h5::/entry/data/data`` of ``frames_per_file`` frames each, one after another: each is
    written under another name and renamed when whole, once its frames are due at ``fps``.  ``on_file(i)``
    is called once data file i (from 1) is in place.  Returns the number of frames written.
    """
    master_path = os.fspath(master_path)
    if not master_path.endswith("_master.h5"):
        raise ValueError(f"replay_dectris: {master_path}: expected a name ending in _master.h5")
    path, name = parse_url(src_url)
    prefix = master_path[:-len("_master.h5")]
    with h5py.File(path, "r", locking=False) as src:
        frames = src[name]
        n, shape, dtype = frames.shape[0], frames.shape[1:], frames.dtype
        first = frames[0]
    bits = bit_depth or dtype.itemsize * 8
    if pixel_mask is None:
        pixel_mask = (first == 2**bits - 1).astype(np.uint32)
    n_files = -(-n // frames_per_file)
    with h5py.File(master_path, "w") as f:
        for i in range(1, n_files + 1):
            f[f"/entry/data/data_{i:06d}"] = h5py.ExternalLink(
                f"{os.path.basename(prefix)}_data_{i:06d}.h5", "/entry/data/data")
        det = f.create_group("/entry/instrument/detector")
        det["bit_depth_image"] = np.uint32(bits)
        specific = det.create_group("detectorSpecific")
        specific["nimages"], specific["ntrigger"] = np.uint32(n), np.uint32(1)
        specific["x_pixels_in_detector"], specific["y_pixels_in_detector"] = np.uint32(shape[1]), np.uint32(shape[0])
        specific["pixel_mask"] = pixel_mask
        if angles_url is not None:
            f["/entry/sample/goniometer/omega"] = read_dataset(angles_url).astype(np.float64)[:n]
    count = 0
    start = time.monotonic()
    for i in range(1, n_files + 1):
        lo, hi = (i - 1) * frames_per_file, min(i * frames_per_file, n)
        if fps:
            time.sleep(max(0.0, start + hi / fps - time.monotonic()))
        final = f"{prefix}_data_{i:06d}.h5"
        with h5py.File(path, "r", locking=False) as src, h5py.File(final + ".part", "w") as f:
            data = f.create_dataset("/entry/data/data", data=src[name][lo:hi], chunks=(1, *shape))
            data.attrs["image_nr_low"], data.attrs["image_nr_high"] = np.uint64(lo + 1), np.uint64(hi)
        os.replace(final + ".part", final)
        count = hi
        if on_file is not None:
            on_file(i)
    return count


class Replay:
    """A replayer running in the background; ``join()`` waits for it and raises what it raised."""

    def __init__(self, worker, error: Callable[[], BaseException | None]):
        self._worker = worker
        self._error = error

    def is_alive(self) -> bool:
        return self._worker.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._worker.join(timeout)
        if self._worker.is_alive():
            raise TimeoutError(f"the replayer is still running after {timeout} s")
        error = self._error()
        if error is not None:
            raise error


def start_in_thread(fn: Callable, *args, **kwargs) -> Replay:
    """Run ``fn(*args, **kwargs)`` in a daemon thread."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # handed to join()
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"replay:{getattr(fn, '__name__', fn)}", daemon=True)
    thread.start()
    return Replay(thread, lambda: errors[0] if errors else None)


def start_in_process(fn: Callable, *args, **kwargs) -> Replay:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) process; ``fn`` and its arguments must pickle.

    Callbacks that talk back to this process need multiprocessing objects
    (``Event``, ``Value``, ``Queue``) made with ``multiprocessing.get_context("spawn")``.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_run_and_report, args=(sender, fn, args, kwargs), daemon=True)
    process.start()
    sender.close()

    def error() -> BaseException | None:
        report = receiver.recv() if receiver.poll() else f"exit code {process.exitcode}, no report"
        return None if report is None else RuntimeError(f"the replayer process failed: {report}")

    return Replay(process, error)


def _run_and_report(sender, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException:
        sender.send(traceback.format_exc())
        raise
    sender.send(None)
