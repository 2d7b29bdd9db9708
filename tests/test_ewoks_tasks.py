"""dctstream as an ewoks workflow: the packaged workflow run by `ewoks execute`, and by a blissoda-style
processor on a scan Bliss publishes."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dctstream.config import load_config
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table

pytest.importorskip("ewokscore", reason="ewoks is not installed (pip install '.[ewoks]')")

from dctstream.ewoks_tasks import workflow_path  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _same_spots(got: Path, expected: Path) -> int:
    a, b = read_spot_table(got), read_spot_table(expected)
    assert a.keys() == b.keys() and len(b["id"]) > 0
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    return len(b["id"])


def test_ewoks_execute_runs_a_scan(tiny_scan, tmp_path):
    config = tmp_path / "tiny.yml"
    config.write_text("background: {window: 11}\nsegmentation: {max_blob_size: [20, 20, 5]}\n"
                      "quicklook: {enabled: false}\n")
    pytest.importorskip("ewoks", reason="the ewoks command is not installed (pip install '.[ewoks]')")
    done = subprocess.run([sys.executable, "-m", "ewoks", "execute", str(workflow_path()), "-p", f"source={tiny_scan.frames_url}",
                           "-p", f"out_dir={tmp_path / 'wf'}", "-p", f"config={config}",
                           "-p", f"dark={tiny_scan.dark_url}", "--outputs", "end"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = ast.literal_eval(done.stdout.split("RESULTS:")[1].split("FINISHED")[0].strip())
    outputs = results["process_scan"]
    direct = load_config(config, [f"source.url={tiny_scan.frames_url}", f"dark.url={tiny_scan.dark_url}",
                                  f"output.dir={tmp_path / 'direct'}"])
    process_scan(direct, display=False)
    n = _same_spots(Path(outputs["spots_file"]), tmp_path / "direct" / "spots.h5")
    assert outputs["spots"] == n and outputs["frames"] == 40 and outputs["end_reason"] == "complete"
    assert outputs["difspot_table"] == [str(tmp_path / "wf" / "difspot.h5"), str(tmp_path / "wf" / "difspot.csv")]
    assert all(Path(p).is_file() for p in outputs["difspot_table"])


@pytest.mark.parametrize("form", ["texts", "mapping"])
def test_resegment_task_equals_the_command(tiny_scan, tmp_path, form):
    """ProcessScan then ResegmentRun (as a workflow chains them): the resegmented spots equal those of
    `dctstream resegment` with the same settings; overrides as --set texts or as a mapping, as dctstream.run
    takes them (a mapping failed with "--set: expected section.key=value, got background.window")."""
    from dctstream.ewoks_tasks import ProcessScan, ResegmentRun
    from dctstream.resegment import resegment

    settings = {"background.window": 11, "segmentation.max_blob_size": [20, 20, 5], "quicklook.enabled": False}
    again = {"segmentation.seed_sigma": 8}
    if form == "texts":
        settings = ["background.window=11", "segmentation.max_blob_size=[20,20,5]", "quicklook.enabled=false"]
        again = ["segmentation.seed_sigma=8"]
    run = ProcessScan(inputs={"source": tiny_scan.frames_url, "out_dir": str(tmp_path / "run"),
                              "dark": tiny_scan.dark_url, "overrides": settings})
    run.execute()
    assert run.outputs.frames == 40
    task = ResegmentRun(inputs={"run_dir": run.outputs.out_dir, "overrides": again,
                                "out_dir": str(tmp_path / "task")})
    task.execute()
    resegment(tmp_path / "run", ["segmentation.seed_sigma=8"], tmp_path / "command")
    n = _same_spots(Path(task.outputs.spots_file), tmp_path / "command" / "spots.h5")
    assert task.outputs.spots == n and task.outputs.frames == 40
    assert n < run.outputs.spots  # a higher seed threshold: fewer spots than the run's 6 sigma


def test_a_processor_runs_the_workflow_on_each_dct_scan_bliss_publishes(bliss_url, scan_frames, tiny_scan,
                                                                       tiny_overrides, tmp_path, monkeypatch):
    from blissdata.redis_engine.store import DataStore

    from blissdata_server import PUBLISH_TIMEOUT_S, Publisher

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from blissoda_processor import DctstreamProcessor

    frames, angles = scan_frames
    processor = DctstreamProcessor(bliss_url, tmp_path / "processed", scan_pattern="dct_*", local=True,
                                   overrides=(f"dark.url={tiny_scan.dark_url}", "quicklook.enabled=false",
                                              *tiny_overrides))
    since = DataStore(bliss_url).get_last_scan_timetag()
    handed = []
    follower = threading.Thread(target=lambda: handed.extend(processor.run(max_scans=1, since=since)), daemon=True)
    follower.start()  # follows the scans Bliss starts from now on
    align = Publisher(bliss_url, frames[:3], angles[:3], tmp_path, name="align")
    align.start()
    align.finish()  # not a DCT scan: left alone
    dct = Publisher(bliss_url, frames, angles, tmp_path, name="dct_wf")
    dct.start()
    dct.finish()
    follower.join(PUBLISH_TIMEOUT_S)
    assert not follower.is_alive() and len(handed) == 1
    outputs = handed[0]
    assert not (tmp_path / "processed" / "align_1_dctstream").exists()
    assert outputs["end_reason"] == "scan_end" and outputs["out_dir"] == str(tmp_path / "processed" / "dct_wf_1_dctstream")
    offline = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                                 f"dark.url={tiny_scan.dark_url}", f"output.dir={tmp_path / 'offline'}",
                                 "quicklook.enabled=false", *tiny_overrides])
    process_scan(offline, display=False)
    assert outputs["spots"] == _same_spots(Path(outputs["spots_file"]), tmp_path / "offline" / "spots.h5")
