"""A folder of frame files as ESRF tomography acquisitions leave it: recorded (no waiting for files that will not
come), its .info file (projections, range), SPEC's motor headers, a lost or cut file, angles in a text file.

The folders here are written before the source opens them and dated an hour back: a recorded scan.  The live
behaviour (files appearing as the source reads) is in test_sources_live_file.py.
"""

from __future__ import annotations

import logging
import os
import time

import fabio.edfimage
import numpy as np
import pytest

from dctstream.config import SourceConfig
from dctstream.errors import InputError
from dctstream.sources.folder import FolderSource, find_dark, read_scan_info
from dctstream.sources.hdf5 import read_angle_file, read_angles

IDLE_S = 30.0  # a recorded folder ends without waiting this long: the tests fail on time if it does


def write_folder(folder, count: int, *, header=lambda k: {}, age_s: float = 3600.0, extra: dict | None = None,
                 skip=()) -> None:
    """``folder/<name>0000.edf`` ... holding frames of value k (frame k), then ``extra`` files (name -> text),
    all dated ``age_s`` back."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        if k not in skip:
            fabio.edfimage.EdfImage(data=np.full((4, 5), k, np.uint16), header=header(k)).write(
                str(folder / f"{folder.name}{k:04d}.edf"))
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    then = time.time() - age_s
    for path in folder.iterdir():
        os.utime(path, (then, then))


def read_all(folder, **keys) -> tuple[list, FolderSource, float]:
    cfg = SourceConfig(url=f"{folder}/{folder.name}*.edf", **{"idle_timeout_s": IDLE_S, "poll_interval_s": 0.05,
                                                               **keys})
    start = time.monotonic()
    with FolderSource(cfg) as source:
        frames = list(source)
    return frames, source, time.monotonic() - start


def test_a_recorded_folder_ends_with_its_last_file_without_waiting(tmp_path):
    write_folder(tmp_path / "scan", 7)
    frames, source, took_s = read_all(tmp_path / "scan")
    assert [int(f.data[0, 0]) for f in frames] == list(range(7))
    assert source.end_reason == "complete" and source.n_frames == 7
    assert took_s < IDLE_S / 3


def test_a_folder_being_written_is_not_a_recorded_one(tmp_path):
    """Files younger than the idle timeout: the scan may go on, so the source waits for it to go quiet."""
    write_folder(tmp_path / "scan", 3, age_s=0.0)
    frames, source, took_s = read_all(tmp_path / "scan", idle_timeout_s=1.5)
    assert len(frames) == 3 and source.end_reason == "idle_timeout" and took_s >= 1.5


@pytest.mark.parametrize("kind", ["info", "xml"])
def test_the_info_file_gives_the_projections_and_their_angles(tmp_path, kind):
    """TOMO_N = 6 over ScanRange = 180: frames 0..5 at 30 degrees apart; the 2 images after them (the
    macros' extra projections at the end) are not frames of the scan."""
    text = {"info": "Energy= 40\nTOMO_N=      6\nScanRange=   180  # degrees\nDARK_N= 11\n",
            "xml": "<tomo><acquisition><tomo_N>6</tomo_N><scanRange>180</scanRange></acquisition></tomo>"}[kind]
    write_folder(tmp_path / "scan", 8, extra={f"scan.{kind}": text})
    frames, source, _ = read_all(tmp_path / "scan")
    assert [(int(f.data[0, 0]), f.psi_deg) for f in frames] == [(k, 30.0 * k) for k in range(6)]
    assert source.end_reason == "expected_frames"
    assert source.found["source.expected_frames"]["url"].endswith(f"scan.{kind}")
    assert "ScanRange 180 over TOMO_N 6" in source.found["source.angles"]["url"]


def test_an_info_file_that_says_nothing_usable_is_left_out_and_said(tmp_path, caplog):
    write_folder(tmp_path / "scan", 3, extra={"scan.info": "TOMO_N= many\nScanRange= 0\n"})
    with caplog.at_level(logging.WARNING):
        assert read_scan_info(str(tmp_path / "scan")) == {"file": str(tmp_path / "scan" / "scan.info")}
    assert "tomo_n = 'many': expected a whole number of projections" in caplog.text
    assert "scanrange = '0': expected the scan's range in degrees" in caplog.text


def test_psi_from_the_header_then_spec_motors_before_the_info_file(tmp_path):
    """A header key wins over the .info file's uniform angles; SPEC's motor_mne / motor_pos pair is read too."""
    def header(k):
        return {"motor_mne": "samy srot samtz", "motor_pos": f"0.5 {10.0 + 0.25 * k} -1"}
    write_folder(tmp_path / "scan", 4, header=header, extra={"scan.info": "TOMO_N= 4\nScanRange= 360\n"})
    frames, source, _ = read_all(tmp_path / "scan")
    assert [f.psi_deg for f in frames] == [10.0, 10.25, 10.5, 10.75]
    assert source.found["source.angles"]["url"] == "header motor_mne/motor_pos srot"


def test_a_lost_file_is_an_error_naming_it_or_the_background_with_repeat_background(tmp_path):
    write_folder(tmp_path / "scan", 6, header=lambda k: {"omega": str(2.0 * k)}, skip={3})
    with pytest.raises(InputError, match=r"file number 3 \(scan0003.edf\) is missing, expected it \(a recorded "
                                         r"folder.*got files up to number 5.*repeat-background goes on without it "
                                         r"\(in a run of its own: --overwrite"):
        read_all(tmp_path / "scan")
    frames, source, took_s = read_all(tmp_path / "scan", missing="repeat-background")
    assert [(f.index, None if f.data is None else int(f.data[0, 0]), f.psi_deg) for f in frames] == [
        (0, 0, 0.0), (1, 1, 2.0), (2, 2, 4.0), (3, None, 6.0), (4, 4, 8.0), (5, 5, 10.0)]
    assert source.counters["missing"] == 1 and source.end_reason == "complete" and took_s < IDLE_S / 3


def test_an_unreadable_last_file_ends_the_scan_before_it(tmp_path, caplog):
    """A writer that died leaves its last file empty: the frames before it are the scan, and it is said."""
    write_folder(tmp_path / "scan", 5)
    (tmp_path / "scan" / "scan0004.edf").write_bytes(b"")
    os.utime(tmp_path / "scan" / "scan0004.edf", (time.time() - 3600,) * 2)
    with caplog.at_level(logging.WARNING):
        frames, source, took_s = read_all(tmp_path / "scan")
    assert len(frames) == 4 and source.end_reason == "idle_timeout" and took_s < IDLE_S / 3
    assert "scan0004.edf: frame 4: cannot read" in caplog.text and "the scan ends before it" in caplog.text


def test_the_folders_dark_is_found_and_not_taken_from_the_frames(tmp_path):
    write_folder(tmp_path / "scan", 2, extra={"darkend0000.edf": "", "refHST0000.edf": ""})
    assert find_dark(f"{tmp_path}/scan/scan*.edf")["url"] == f"{tmp_path}/scan/darkend0000.edf"
    (tmp_path / "scan" / "dark.edf").write_text("")
    assert find_dark(f"{tmp_path}/scan/scan*.edf")["url"] == f"{tmp_path}/scan/dark.edf"
    assert find_dark(f"{tmp_path}/scan/*.edf")["url"] == f"{tmp_path}/scan/dark.edf"
    assert find_dark(f"{tmp_path}/nothing/*.edf")["url"] is None


def test_angles_in_a_text_file(tmp_path):
    (tmp_path / "psi.txt").write_text("# omega, degrees\n0.0\n0.5\n\n1.0\n1.5")
    assert read_angles(str(tmp_path / "psi.txt"))[0].tolist() == [0.0, 0.5, 1.0, 1.5]
    # written along: the last line may be cut
    assert read_angle_file(str(tmp_path / "psi.txt"), whole_lines_only=True).tolist() == [0.0, 0.5, 1.0]
    np.save(tmp_path / "psi.npy", np.arange(3.0))
    assert read_angles(str(tmp_path / "psi.npy"))[0].tolist() == [0.0, 1.0, 2.0]
    write_folder(tmp_path / "scan", 4, header=lambda k: {"omega": "99"})
    os.utime(tmp_path / "psi.txt", (time.time() - 3600,) * 2)  # written: its last line is whole
    frames, source, _ = read_all(tmp_path / "scan", angles=str(tmp_path / "psi.txt"))
    assert [f.psi_deg for f in frames] == [0.0, 0.5, 1.0, 1.5]
    (tmp_path / "bad.txt").write_text("0.0\n0.5 1.0\n")
    with pytest.raises(InputError, match=r"source.angles: .*bad.txt: line 2: expected one angle in degrees, "
                                         r"got '0.5 1.0'"):
        read_angles(str(tmp_path / "bad.txt"))
