"""One simulated scan acquired in four orders, each run at default settings but a short background window.

    python benchmarks/psi_order.py [--work DIR]

The frames of a 360-frame, 256 x 256 px simulated scan (80 spots) are written
in psi order, as two interlaced turns (0, 2, 4 ... then 1, 3, 5 ... degrees),
back-and-forth (the second pass reversed) and shuffled.  Each is read from the
recorded file with ``source.order: arrival`` (the frames as they come) and
``auto`` (see README, "Any psi order"); a scan of passes also live, with
``source.interlaced_turns: 1``: from an HDF5 file growing at 200 frames/s
(read again in psi order) and from frames handed over one at a time that
cannot be read again, as a stream's (a background per pass).  Scored against
the truth with `simulators.evaluate.score`, the detections' centroids placed by
their psi; ``= sorted``: the spot table equals that of the psi-sorted file,
column for column (``max_frame_acquired`` aside).  ``behind``: the most frames
acquired and not yet handed on in psi order (read again: only their angles are
kept) or corrected and held for the last pass (a stream's: the pixels a spot can
hold, 12 bytes each, against 4 bytes a pixel as float32 frames).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from dctstream.config import load_config
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_spot_table
from dctstream.sources.memory import MemorySource
from simulators.dct_scan import simulate_scan
from simulators.evaluate import score
from simulators.replay_file import replay_hdf5, start_in_process

FRAMES, SIZE, SPOTS = 360, 256, 80
FRAMES_PATH, ANGLES_PATH = "/1.1/measurement/marana", "/1.1/measurement/diffrz"
LIVE_FPS = 200


class Handed(MemorySource):
    """Frames handed over one at a time, each with its angle as it comes, none to be read again (a stream)."""

    def __init__(self, frames, angles):
        super().__init__(iter(list(frames)), None, name="frames")
        self._psi = [float(a) for a in angles]

    def __iter__(self):
        for frame in super().__iter__():
            yield type(frame)(frame.index, self._psi[frame.index], frame.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/dctstream-psi-order")
    work = Path(parser.parse_args().work)
    logging.basicConfig(level=logging.ERROR)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    truth = simulate_scan(str(work / "scan.h5"), frames=FRAMES, size=SIZE, spots=SPOTS, seed=7)
    with h5py.File(truth.path, "r") as f:
        frames, angles = f[FRAMES_PATH][()], f[ANGLES_PATH][()]
    orders = {"psi order": np.arange(FRAMES), "interlaced, 2 turns": np.r_[0:FRAMES:2, 1:FRAMES:2],
              "back-and-forth, 2 passes": np.r_[0:FRAMES:2, np.arange(1, FRAMES, 2)[::-1]],
              "shuffled": np.random.default_rng(0).permutation(FRAMES)}
    common = [f"dark.url={truth.dark_url}", "background.window=31"]
    sorted_table = None
    print("| frames acquired | read from | source.order (placed) | spots | recall | precision | = sorted "
          "| most behind |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, order) in enumerate(orders.items()):
        path = work / f"scan{i}.h5"
        with h5py.File(path, "w") as f:
            f[FRAMES_PATH], f[ANGLES_PATH] = frames[order], angles[order]
        runs = [("recorded file", "auto")] if not i else [("recorded file", "arrival"), ("recorded file", "auto")]
        if "turns" in name or "passes" in name:
            runs += [("growing file", "auto"), ("handed over", "auto")]
        for read_from, mode in runs:
            out = work / f"out{i}-{read_from.split()[0]}-{mode}"
            url = [f"source.url={path}::{FRAMES_PATH}", f"source.angles={path}::{ANGLES_PATH}"]
            source, acquisition = None, None
            if read_from == "growing file":
                live = work / f"live{i}.h5"
                acquisition = start_in_process(replay_hdf5, f"{path}::{FRAMES_PATH}", str(live), fps=LIVE_FPS,
                                               angles_url=f"{path}::{ANGLES_PATH}")
                url = [f"source.url={live}::{FRAMES_PATH}", f"source.angles={live}::{ANGLES_PATH}",
                       "source.idle_timeout_s=30"]
            elif read_from == "handed over":
                source, url = Handed(frames[order], angles[order]), ["source.url=stream::/frames"]
            if read_from != "recorded file":
                url.append("source.interlaced_turns=1")
            cfg = load_config(None, [*url, *common, f"output.dir={out}", f"source.order={mode}"])
            stats = Pipeline(cfg, source=source).run()
            if acquisition is not None:
                acquisition.join(60)
            table = read_spot_table(out / "spots.h5")
            sorted_table = sorted_table or table
            same = table.keys() == sorted_table.keys() and all(
                np.array_equal(table[c], sorted_table[c]) for c in table if c != "max_frame_acquired")
            by_psi = {**table, "centroid_frame": np.interp(table["centroid_psi_deg"], np.sort(angles),
                                                           np.arange(FRAMES))}
            s = score(truth.spots, by_psi, direct_beam=truth.direct_beam_bbox)
            facts = stats.frame_order or {}
            behind = "–"
            if "held_pixels" in facts:
                behind = (f"{facts['most_frames_behind']} frames as {facts['most_held_pixels'] * 12 / 2**20:.2f}"
                          f" MiB ({facts['most_frames_behind'] * SIZE * SIZE * 4 / 2**20:.0f} MiB as frames)")
            elif "most_frames_behind" in facts:
                behind = f"{facts['most_frames_behind']} frames (their angles)"
            how = mode if facts.get("mode", mode) == mode else f"{mode} ({facts['mode']})"
            print(f"| {name} | {read_from} | {how} | {len(table['id'])} "
                  f"| {s['recall']:.3f} | {s['precision']:.3f} | {'yes' if same else 'no'} | {behind} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
