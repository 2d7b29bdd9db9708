"""One simulated scan acquired in four orders, each run at default settings but a short background window.

    python benchmarks/psi_order.py [--work DIR]

The frames of a 360-frame, 256 x 256 px simulated scan (80 spots) are written
in psi order, as two interlaced turns (0, 2, 4 ... then 1, 3, 5 ... degrees),
back-and-forth (the second pass reversed) and shuffled; each file is run with
``source.order: arrival`` (the frames as they come) and ``auto`` (see README,
"Any psi order").  Scored against the truth with `simulators.evaluate.score`,
the detections' centroids placed by their psi.  ``held`` is the most pixels a
scan of passes held for the last pass (12 bytes each: index, filtered and
unfiltered value) against the frames they came from (4 bytes a pixel as float32 frames).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np

from dctstream.config import load_config
from dctstream.pipeline import Pipeline
from dctstream.sinks import read_spot_table
from simulators.dct_scan import simulate_scan
from simulators.evaluate import score

FRAMES, SIZE, SPOTS = 360, 256, 80
FRAMES_PATH, ANGLES_PATH = "/1.1/measurement/marana", "/1.1/measurement/diffrz"


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
    print("| frames acquired | source.order | spots | recall | precision | held for the last pass |")
    print("|---|---|---|---|---|---|")
    for i, (name, order) in enumerate(orders.items()):
        path = work / f"scan{i}.h5"
        with h5py.File(path, "w") as f:
            f[FRAMES_PATH], f[ANGLES_PATH] = frames[order], angles[order]
        for mode in ("arrival", "auto") if i else ("auto",):
            out = work / f"out{i}-{mode}"
            cfg = load_config(None, [f"source.url={path}::{FRAMES_PATH}", f"source.angles={path}::{ANGLES_PATH}",
                                     f"dark.url={truth.dark_url}", f"output.dir={out}", "background.window=31",
                                     f"source.order={mode}"])
            stats = Pipeline(cfg).run()
            table = read_spot_table(out / "spots.h5")
            placed = {**table, "centroid_frame": np.interp(table["centroid_psi_deg"], np.sort(angles),
                                                           np.arange(FRAMES))}
            s = score(truth.spots, placed, direct_beam=truth.direct_beam_bbox)
            facts = stats.frame_order or {}
            held = "–"
            if facts.get("mode") == "passes":
                held = (f"{facts['most_held_pixels'] * 12 / 2**20:.2f} MiB of {facts['most_frames_behind']} frames "
                        f"({facts['most_frames_behind'] * SIZE * SIZE * 4 / 2**20:.0f} MiB)")
            print(f"| {name} | {mode} ({facts.get('mode', 'as they came')}) | {len(table['id'])} | {s['recall']:.3f} "
                  f"| {s['precision']:.3f} | {held} |")


if __name__ == "__main__":
    main()
