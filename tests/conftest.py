"""Shared fixtures: one tiny simulated scan per session, and the settings that make it fast to process."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from simulators.dct_scan import simulate_scan

# A scan small enough to simulate and process in about a second.
TINY_FRAMES, TINY_SIZE, TINY_SPOTS, TINY_SEED = 40, 64, 10, 0
# --set overrides that fit a pipeline to that scan (the defaults want hundreds of frames).
TINY_OVERRIDES = ("background.window=11", "segmentation.max_blob_size=[20,20,5]")


@pytest.fixture(scope="session")
def tiny_scan(tmp_path_factory):
    """``ScanTruth`` of a 40-frame, 64 x 64 px scan with 10 spots, simulated once per session."""
    path = tmp_path_factory.mktemp("tiny_scan") / "scan.h5"
    return simulate_scan(path, frames=TINY_FRAMES, size=TINY_SIZE, spots=TINY_SPOTS, seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_overrides():
    """``("background.window=11", ...)``: the overrides for ``load_config``."""
    return TINY_OVERRIDES


@pytest.fixture(scope="session")
def tiny_set_args():
    """``["--set", "background.window=11", "--set", ...]`` for the command line."""
    return [arg for override in TINY_OVERRIDES for arg in ("--set", override)]


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, tiny_scan):
    """An HDF5 file of datasets that are wrong in one way each, for frames 64 x 64 px and 40 frames.

    Returns the file path; the datasets are:
    ``two_d`` (64, 64) uint16, ``float_frames`` (5, 64, 64) float32 of 0.5, ``no_frames`` (0, 64, 64) uint16,
    ``dark_small`` (3, 32, 32) uint16, ``dark_text`` (64, 64) bytes, ``dark_empty`` (0, 64, 64) uint16,
    ``angles_short`` (10,) float64, ``angles_text`` (40,) bytes, ``title`` a scalar string, and a group ``group`` holding ``inside``;
    and, built from the tiny scan's frames: ``four_d`` (2, 3, 64, 64), ``bool_frames``, ``zeros`` and
    ``saturated`` (40, 64, 64) uint16, ``one_frame`` and ``short`` (its first 1 and 5 frames), ``uint32``
    (its frames as uint32), ``corrupt_chunk`` (its frames, gzip chunks of one frame, chunk 7 overwritten),
    ``dark_inf`` (3, 64, 64) float32 with an inf in frame 1,
    ``angles_nan`` (NaN at frame 7), ``angles_back`` (frames 7 and 8 swapped) and ``angles_repeat``
    (frame 8 repeats frame 7), each (40,) float64.
    """
    with h5py.File(tiny_scan.path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
    path = tmp_path_factory.mktemp("bad_inputs") / "bad.h5"
    with h5py.File(path, "w") as f:
        f["two_d"] = np.zeros((TINY_SIZE, TINY_SIZE), np.uint16)
        f["float_frames"] = np.full((5, TINY_SIZE, TINY_SIZE), 0.5, np.float32)  # not counts: flat-fielded
        f["no_frames"] = np.zeros((0, TINY_SIZE, TINY_SIZE), np.uint16)
        f["dark_small"] = np.zeros((3, 32, 32), np.uint16)
        f["dark_text"] = np.full((TINY_SIZE, TINY_SIZE), b"a")
        f["dark_empty"] = np.zeros((0, TINY_SIZE, TINY_SIZE), np.uint16)
        f["angles_short"] = np.arange(10.0)
        f["angles_text"] = np.full(TINY_FRAMES, b"a")
        f["title"] = "dct scan"  # a scalar string, as a scan's title
        f.create_group("group")["inside"] = np.zeros(3)
        f["four_d"] = np.zeros((2, 3, TINY_SIZE, TINY_SIZE), np.uint16)
        f["bool_frames"] = np.zeros((5, TINY_SIZE, TINY_SIZE), bool)
        f["zeros"] = np.zeros_like(frames)
        f["saturated"] = np.full_like(frames, np.iinfo(frames.dtype).max)
        f["one_frame"] = frames[:1]
        f["short"] = frames[:5]
        f["uint32"] = frames.astype(np.uint32)
        f.create_dataset("corrupt_chunk", data=frames, chunks=(1, TINY_SIZE, TINY_SIZE), compression="gzip")
        chunk = f["corrupt_chunk"].id.get_chunk_info(7)
        darks = np.zeros((3, TINY_SIZE, TINY_SIZE), np.float32)
        darks[1, 2, 3] = np.inf
        f["dark_inf"] = darks
        for name, change in (("angles_nan", {7: np.nan}), ("angles_back", {7: 8.0, 8: 7.0}), ("angles_repeat", {8: 7.0})):
            angles = np.arange(TINY_FRAMES, dtype=np.float64)
            for k, value in change.items():
                angles[k] = value
            f[name] = angles
    with open(path, "r+b") as raw:  # a chunk whose gzip stream is broken in the middle
        raw.seek(chunk.byte_offset + chunk.size // 3)
        raw.write(b"\xff" * 64)
    return path


@pytest.fixture(scope="session")
def bliss_url(tmp_path_factory):
    """``redis://127.0.0.1:PORT`` of a Redis server with blissdata's modules, initialised for blissdata."""
    pytest.importorskip("blissdata", reason="blissdata is not installed (pip install '.[bliss]')")
    from blissdata.redis_engine.store import DataStore

    from blissdata_server import start_server, stop_server

    started = start_server(tmp_path_factory.mktemp("redis"))
    if isinstance(started, str):
        pytest.skip(started)
    proc, url = started
    try:
        DataStore(url, init_db=True)  # the indexes blissdata searches scans with
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def scan_frames(tiny_scan):
    """(frames, angles) of the tiny scan, as arrays."""
    with h5py.File(tiny_scan.path, "r") as f:
        return f["/1.1/measurement/marana"][()], f["/1.1/measurement/diffrz"][()]
