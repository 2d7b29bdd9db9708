"""Every live source, fed while dctstream runs, gives the spot table of the complete recorded file."""

import logging
import os
import shutil
import time

import fabio.edfimage
import h5py
import hdf5plugin
import numpy as np
import pytest

from dctstream import configs
from dctstream.config import load_config
from dctstream.pipeline import Pipeline
from dctstream.record import read_record
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table
from dctstream.sources import source_kind
from simulators.dct_scan import ANGLES_PATH, FRAMES_PATH, simulate_scan
from simulators.replay_file import replay_edf, replay_hdf5, start_in_process
from simulators.replay_stream import StreamReplayer

SETTINGS = ["background.window=21", "segmentation.max_blob_size=[12,12,6]", "source.idle_timeout_s=20"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A simulated scan and the spot table of its complete file."""
    tmp = tmp_path_factory.mktemp("recorded")
    truth = simulate_scan(str(tmp / "scan.h5"), frames=80, size=64, spots=12, seed=4)
    cfg = load_config(None, [f"source.url={truth.frames_url}", f"source.angles={truth.angles_url}",
                             f"dark.url={truth.dark_url}", f"output.dir={tmp / 'out'}", *SETTINGS])
    assert source_kind(cfg.source) == "hdf5"
    stats = Pipeline(cfg).run()
    assert stats.difspots_written >= 5
    return truth, read_spot_table(tmp / "out" / "spots.h5")


def run_live(truth, tmp_path, url, *extra):
    cfg = load_config(None, [f"source.url={url}", f"dark.url={truth.dark_url}", f"output.dir={tmp_path / 'out'}",
                             *SETTINGS, *extra])
    stats = Pipeline(cfg).run()
    return stats, read_spot_table(tmp_path / "out" / "spots.h5")


def assert_same_table(got, expected, with_psi=True):
    columns = [c for c in expected if with_psi or c != "centroid_psi_deg"]
    for column in columns:
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)


@pytest.mark.parametrize("writer", [dict(swmr=True), dict(swmr=False), dict(swmr=True, bitshuffle=True)],
                         ids=["swmr", "no-swmr", "swmr-bitshuffle"])
def test_growing_hdf5_file(recorded, tmp_path, writer):
    truth, expected = recorded
    live = tmp_path / "live.h5"
    compression = hdf5plugin.Bitshuffle() if writer.get("bitshuffle") else None
    acquisition = start_in_process(replay_hdf5, truth.frames_url, str(live), fps=200, swmr=writer["swmr"],
                                   compression=compression, angles_url=truth.angles_url)
    stats, got = run_live(truth, tmp_path, f"{live}::/1.1/measurement/marana",
                          f"source.angles={live}::/1.1/measurement/diffrz")
    acquisition.join(30)
    assert stats.source_end == "end_time"
    assert stats.frames_read == 80
    assert_same_table(got, expected)


def test_folder_of_edf_frames(recorded, tmp_path):
    truth, expected = recorded
    folder = tmp_path / "edf"
    acquisition = start_in_process(replay_edf, truth.frames_url, str(folder), fps=200)
    stats, got = run_live(truth, tmp_path, f"{folder}/*.edf", "source.expected_frames=80",
                          f"source.angles={truth.angles_url}")
    acquisition.join(30)
    assert stats.source_end == "expected_frames" and stats.frames_read == 80
    assert_same_table(got, expected)


def test_a_recorded_esrf_folder_at_default_settings(recorded, tmp_path):
    """An ESRF tomography folder, given by its frames' pattern only: psi from SPEC's motor headers, the dark from
    darkend0000.edf, the projections from the .info file (not the two extra images after them); the scan is
    recorded (its files an hour old), so it ends with its files, finished, without waiting for more."""
    truth, expected = recorded
    folder = tmp_path / "ff_scan"
    folder.mkdir()
    with h5py.File(truth.path, "r") as f:
        frames, psi = f[FRAMES_PATH][()], f[ANGLES_PATH][()]
        dark = f[truth.dark_url.partition("::")[2]][()].mean(axis=0, dtype=np.float64).astype(np.float32)
    for k, frame in enumerate([*frames, frames[0], frames[0]]):
        header = {"motor_mne": "samy diffrz", "motor_pos": f"0.0 {float(psi[k % len(psi)])!r}"}
        fabio.edfimage.EdfImage(data=frame, header=header).write(str(folder / f"ff_scan{k:04d}.edf"))
    fabio.edfimage.EdfImage(data=dark).write(str(folder / "darkend0000.edf"))
    (folder / "ff_scan.info").write_text(f"TOMO_N= {len(frames)}\nScanRange= 360\nDARK_N= 20\n")
    for path in folder.iterdir():
        os.utime(path, (time.time() - 3600,) * 2)
    cfg = load_config(configs.packaged_path(configs.DEFAULT),  # dark.url, source.angles: auto
                      [f"source.url={folder}/ff_scan*.edf", f"output.dir={tmp_path / 'out'}", *SETTINGS])
    stats = process_scan(cfg, display=False)
    assert stats.source_end == "expected_frames" and stats.frames_read == len(frames)
    assert_same_table(read_spot_table(tmp_path / "out" / "spots.h5"), expected)
    auto = read_record(tmp_path / "out")["auto"]
    assert auto["dark.url"]["url"] == f"{folder}/darkend0000.edf"
    assert auto["source.angles"]["url"] == "header motor_mne/motor_pos diffrz"
    assert auto["source.expected_frames"]["url"] == f"{folder}/ff_scan.info"


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_detector_stream(recorded, tmp_path, protocol):
    truth, expected = recorded
    # the detector is another program: its own copy, so HDF5 does not share one open file between us
    detector_copy = shutil.copy(truth.path, tmp_path / "detector.h5")
    replayer = StreamReplayer(f"{detector_copy}::/1.1/measurement/marana", protocol=protocol, fps=200,
                              angles_url=f"{detector_copy}::/1.1/measurement/diffrz" if protocol == "stream2" else None)
    replayer.start()
    try:
        extra = [f"source.protocol={protocol}"]
        if protocol == "stream1":  # Stream v1 carries no angles
            extra.append(f"source.angles={truth.angles_url}")
        stats, got = run_live(truth, tmp_path, replayer.endpoint, *extra)
    finally:
        replayer.join(30)
        replayer.close()
    assert stats.source_end == "series_end" and stats.frames_read == 80
    # Stream2 computes psi as start + k * increment, equal to the file's angles within rounding
    assert_same_table(got, expected, with_psi=protocol == "stream1")
    np.testing.assert_allclose(got["centroid_psi_deg"], expected["centroid_psi_deg"], atol=1e-9)


def test_a_stream_url_needs_its_protocol(tmp_path):
    from dctstream.errors import ConfigError

    cfg = load_config(None, ["source.url=tcp://127.0.0.1:5555"])
    with pytest.raises(ConfigError, match="source.protocol: tcp://127.0.0.1:5555 is a stream"):
        source_kind(cfg.source)
    assert source_kind(load_config(None, ["source.url=tcp://det:9999"]).source) == "stream1"
    assert source_kind(load_config(None, ["source.url=tcp://det:31001"]).source) == "stream2"
    recorded = tmp_path / "recorded.h5"  # no end_time, but no writer holds it either: complete
    with h5py.File(recorded, "w") as h5:
        h5["/1.1/measurement/marana"] = np.zeros((2, 4, 4), np.uint16)
    url = f"{recorded}::/1.1/measurement/marana"
    assert source_kind(load_config(None, [f"source.url={url}"]).source) == "hdf5"
    assert source_kind(load_config(None, [f"source.url={url}", "source.protocol=hdf5-live"]).source) == "hdf5-live"
    not_yet = f"{tmp_path / 'not_yet.h5'}::/1.1/measurement/marana"  # the acquisition has not started
    assert source_kind(load_config(None, [f"source.url={not_yet}"]).source) == "hdf5-live"


def test_a_bliss_scan_started_and_never_ended_is_followed_and_ends_incomplete(recorded, tmp_path, caplog):
    """A scan file whose scan has a start_time and no end_time, held by no writer (its writer died mid-scan, or
    lets the file go between frames) and changed within the idle timeout: followed, not read as a whole scan (it
    was processed as recorded, the run finished, scan ended: complete, unsaid); unchanged for longer, read as
    recorded with a warning."""
    truth, _ = recorded
    path = tmp_path / "cut.h5"
    with h5py.File(truth.path, "r") as src, h5py.File(path, "w") as h5:
        h5["/1.1/measurement/marana"] = src[FRAMES_PATH][:50]
        h5["/1.1/start_time"] = "2026-12-07T20:00:00"
    url = f"{path}::/1.1/measurement/marana"
    with caplog.at_level(logging.WARNING):
        assert source_kind(load_config(None, [f"source.url={url}"]).source) == "hdf5-live"
    assert f"{path}: scan /1.1 has a start_time and no end_time, and no writer holds the file" in caplog.text
    stats, _ = run_live(truth, tmp_path, url, "source.idle_timeout_s=1")
    assert stats.incomplete == "idle_timeout after 50 frames" and stats.frames_segmented == 50
    old = time.time() - 3600  # untouched for an hour: not being written, read as recorded, with a warning
    os.utime(path, (old, old))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert source_kind(load_config(None, [f"source.url={url}"]).source) == "hdf5"
    assert "has not changed for 3600 s: read as recorded" in caplog.text
    with h5py.File(path, "a") as h5:  # its end said: a whole scan
        h5["/1.1/end_time"] = "2026-12-07T20:01:00"
    assert source_kind(load_config(None, [f"source.url={url}"]).source) == "hdf5"
