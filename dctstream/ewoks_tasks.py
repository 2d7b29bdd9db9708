"""dctstream as ewoks tasks (``pip install 'dctstream[ewoks]'``), and the workflow that runs them.

``ProcessScan`` is one ``dctstream run``: the scan at ``source`` (any source
URL: ``scan.h5::/1.1/measurement/marana``, ``redis://host:port`` with
``overrides: ["source.scan=..."]``, a detector stream ...) processed into
``out_dir`` with ``config`` (a file, or a packaged config's name; the packaged
default when none), then ``dark`` and ``overrides``: ``KEY=VALUE`` texts as
on the command line, or a mapping ``{"background.window": 101}`` as ``dctstream.run`` takes.  Its outputs say where the results are and how the scan
ended.  The packaged workflow (`workflow_path`) is that one task::

    ewoks execute $(python -c "import dctstream.ewoks_tasks as t; print(t.workflow_path())") \\
        -p source=/data/s1.h5::/1.1/measurement/marana -p out_dir=/data/s1_dctstream

``ResegmentRun`` is one ``dctstream resegment``: a finished (or running) run's sparse corrected scan
segmented again with other ``segmentation.*`` settings into ``out_dir`` (default ``RUN_DIR/resegmented``),
seconds where the run took minutes; chain it after ``ProcessScan`` (its ``out_dir`` as ``run_dir``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from ewokscore import Task

from .config import load_config, override_config
from .configs import config_file
from .dct_table import CSV_NAME, H5_NAME
from .resegment import resegment
from .runner import process_scan

WORKFLOW = "process_scan.json"


def workflow_path() -> Path:
    """The packaged workflow file: one ProcessScan node, id ``process_scan``."""
    return Path(str(resources.files("dctstream") / "workflows" / WORKFLOW))


def _set_texts(overrides) -> list[str]:
    """``KEY=VALUE`` texts of overrides given as a mapping ``{"segmentation.seed_sigma": 5}`` or as texts."""
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return list(overrides or [])


class ProcessScan(Task, input_names=["source", "out_dir"],
                  optional_input_names=["config", "dark", "overrides", "overwrite"],
                  output_names=["out_dir", "spots_file", "difspot_table", "spots", "frames", "end_reason"]):
    """One scan into difspots, as ``dctstream run CONFIG --source SOURCE --out OUT_DIR [--dark DARK]
    [--set OVERRIDE ...]``; an error in the config or the input fails the task with dctstream's one-line message."""

    def run(self):
        overrides = [f"source.url={json.dumps(str(self.inputs.source))}",
                     f"output.dir={json.dumps(str(self.inputs.out_dir))}"]
        dark = self.get_input_value("dark", None)
        if dark:
            overrides.append(f"dark.url={json.dumps(str(dark))}")
        cfg = load_config(config_file(self.get_input_value("config", None)), overrides)
        extra = self.get_input_value("overrides", None)
        if extra:  # {"background.window": 101} or ["background.window=101"], as dctstream.run takes them
            cfg = override_config(cfg, extra, label="ProcessScan: overrides")
        stats = process_scan(cfg, overwrite=bool(self.get_input_value("overwrite", False)), display=False)
        out = Path(cfg.output.dir)
        self.outputs.out_dir = str(out)
        self.outputs.spots_file = str(out / "spots.h5")
        self.outputs.difspot_table = [str(out / H5_NAME), str(out / CSV_NAME)]
        self.outputs.spots = stats.difspots_written
        self.outputs.frames = stats.frames_segmented
        self.outputs.end_reason = stats.source_end


class ResegmentRun(Task, input_names=["run_dir"], optional_input_names=["overrides", "out_dir", "overwrite", "difspots"],
                   output_names=["out_dir", "spots_file", "spots", "frames"]):
    """A run segmented again from its sparse scan, as ``dctstream resegment RUN_DIR [--set KEY=VALUE ...]
    [--out OUT_DIR] [--overwrite] [--no-difspots]``; settings below the sparse cut fail the task with
    dctstream's one-line message naming the key."""

    def run(self):
        summary = resegment(self.inputs.run_dir, _set_texts(self.get_input_value("overrides", None)),
                            self.get_input_value("out_dir", None), overwrite=bool(self.get_input_value("overwrite", False)),
                            difspots=bool(self.get_input_value("difspots", True)))
        self.outputs.out_dir = summary["out_dir"]
        self.outputs.spots_file = str(Path(summary["out_dir"]) / "spots.h5")
        self.outputs.spots = summary["difspots"]
        self.outputs.frames = summary["frames"]
