# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # dctstream quick start: from a scan to difspots, in Python
#
# Simulate a small DCT scan, process it with `dctstream.run`, read the spot
# table and a few difspots, plot them, and find the same difspots again with
# `dctstream.segment` from frames held in memory.  Open it as a notebook with
# `jupytext --to notebook examples/quickstart.py`, or run it as a script:
# `python examples/quickstart.py`.  It writes to `dctstream-quickstart/` in the
# current folder.

# %%
from pathlib import Path

import h5py
import numpy as np

import dctstream
from simulators.dct_scan import simulate_scan

work = Path("dctstream-quickstart")
work.mkdir(exist_ok=True)

# %% [markdown]
# ## A simulated scan
# 160 frames of 128 x 128 pixels with 40 diffraction spots, its dark frames
# and the rotation angle ψ of every frame, in one HDF5 file laid out as Bliss
# writes scans.  `truth` holds the addresses of the datasets and the true spots.

# %%
truth = simulate_scan(work / "scan.h5", frames=160, size=128, spots=40, seed=2)
print(truth.frames_url)

# %% [markdown]
# ## Run it
# Any configuration key can be changed with `overrides` (the `--set` of the
# command line).  This scan is short, so the running median takes 31 frames
# instead of 501.

# %%
settings = {"background.window": 31, "segmentation.max_blob_size": [30, 30, 10]}
run = dctstream.run(truth.frames_url, out=work / "out", dark=truth.dark_url, angles=truth.angles_url,
                    overrides=settings, overwrite=True)
print(run.record["state"], run.record["frames_processed"], "frames,", run.record["spots"], "difspots")

# %% [markdown]
# ## The spot table
# `run.spots` is a NumPy structured array with the columns of `spots.h5`
# (`run.to_pandas()` gives a DataFrame when pandas is installed).

# %%
spots = run.spots
print(spots.dtype.names)
brightest = np.argsort(spots["integral"])[::-1][:3]
for row in spots[brightest]:
    print(f"difspot {row['id']:3d}: integral {row['integral']:9.1f} at x {row['centroid_x']:6.1f}, "
          f"y {row['centroid_y']:6.1f}, psi {row['centroid_psi_deg']:6.1f} deg")

# %% [markdown]
# ## A few difspots
# `run.difspot(id)` reads one difspot file: its bounding box, frames, ψ range
# and the corrected values over its box (`volume`, with `mask` on its voxels).

# %%
difspots = [run.difspot(int(i)) for i in spots["id"][brightest]]
for spot in difspots:
    print(spot.id, "box", spot.bbox, "frames", spot.frames, "psi", spot.psi_range_deg, "voxels", spot.volume.shape)

# %% [markdown]
# ## The same difspots from frames in memory
# `dctstream.segment` takes frames from any iterable (here the scan read into
# memory) and yields each difspot as soon as it is closed, from the same
# pipeline: the same frames give the same difspots.

# %%
with h5py.File(truth.path, "r") as f:
    frames = f["/1.1/measurement/marana"][()]
    darks = f["/2.1/measurement/marana"][()]
    psi = f["/1.1/measurement/diffrz"][()]
in_memory = list(dctstream.segment(frames, psi, dark=darks, overrides=settings))
same = all(a.bbox == b.bbox and a.integral == b.integral for a, b in zip(in_memory, map(run.difspot, spots["id"])))
print(len(in_memory), "difspots from memory, the same as the run's:", same and len(in_memory) == spots.size)

# %% [markdown]
# ## Plots
# `run.plot_quicklook()` returns matplotlib figures of the spot table, by name
# (in a notebook, `figures["detector"]` as the last line of a cell shows one);
# each difspot can be drawn from its projection over its frames.

# %%
try:
    import matplotlib.pyplot as plt
except ImportError:  # plots need matplotlib: pip install matplotlib
    plt = None

if plt is not None:
    figures = run.plot_quicklook()
    for name, figure in figures.items():
        figure.savefig(work / f"{name}.png")
    fig, axes = plt.subplots(1, len(difspots), figsize=(3 * len(difspots), 3))
    for ax, spot in zip(axes, difspots):
        ax.imshow(spot.projection, cmap="magma")
        ax.set_title(f"difspot {spot.id}, psi {spot.psi_deg:.1f} deg")
    plt.show()
