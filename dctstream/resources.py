"""Memory a scan needs, checked against what this process may use before any of it is allocated.

What a run holds is mostly the background's ring of raw frames (``background.window`` +
``background.batch_frames`` frames in their binned type); beside it the running median's state (at most
two bytes a bin, 112 bins, and four counters per pixel), the segmenter's corrected frames (about
``max_blob_size`` frames + 4, float32 with a flag byte), and a few frame-sized float32 buffers.  The
estimate adds a quarter for what it does not count (``dctstream bench --frames 600`` measured 1.61x a
window of raw frames at 2048 x 2048 with a window of 501, 1.59x in another run).

What the process may use is the least of the physical memory, the cgroup's limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``) and the address-space limit (``ulimit -v``) less what is already mapped.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import numpy as np

from .config import frames_per_batch
from .errors import ResourceError

GiB = 2**30
_HIST_BINS = 112
_FLOAT_BUFFERS = 8
_SLACK = 1.25


def needed_bytes(frame_shape, dtype, window: int, batch_frames: int, blob_frames: int) -> int:
    """Estimated peak memory of a pipeline on frames of ``frame_shape`` (binned) and ``dtype``."""
    px = int(np.prod(frame_shape, dtype=object))
    itemsize = np.dtype(dtype).itemsize
    ring = (window + batch_frames) * px * itemsize
    median_state = px * (_HIST_BINS * (1 if window < 512 else 2) + 4 * 8)
    segmenter = (blob_frames + 4) * px * 9  # float32 filtered and unfiltered values, packed flags
    buffers = _FLOAT_BUFFERS * px * 4
    return int(_SLACK * (ring + median_state + segmenter + buffers))


def _cgroup_limit() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            candidates = [Path("/sys/fs/cgroup") / rel / "memory.max", Path("/sys/fs/cgroup/memory.max")]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / rel / "memory.limit_in_bytes",
                          Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
        else:
            continue
        for path in candidates:
            try:
                text = path.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:
                limits.append(int(text))
            break
    return min(limits) if limits else None


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> tuple[int | None, str]:
    """(bytes this process may still use, what limits it), the least of the limits that can be read."""
    limits = []
    try:
        limits.append((os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"))
    except (ValueError, OSError, AttributeError):
        pass
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((max(soft - _mapped_bytes(), 0), f"ulimit -v ({soft // 1024} kB, less what is mapped)"))
    if not limits:
        return None, "unknown"
    return min(limits)


def check_memory(frame_shape, dtype, background_cfg, blob_frames: int, binning: int = 1) -> None:
    """Raise `ResourceError` when the pipeline cannot fit in the memory this process may use."""
    need = needed_bytes(frame_shape, dtype, background_cfg.window,
                        frames_per_batch(background_cfg.batch_frames, frame_shape), blob_frames)
    have, limit = available_bytes()
    if have is None or need <= have:
        return
    ny, nx = frame_shape
    lower = "lower background.window" + ("" if binning >= 4 else " or bin the frames (detector.binning)")
    raise ResourceError(f"background.window: {background_cfg.window} frames of {nx} x {ny} px "
                        f"({np.dtype(dtype).name}) need about {need / GiB:.1f} GiB, expected at most the "
                        f"{have / GiB:.1f} GiB this process may use ({limit}); {lower}")
