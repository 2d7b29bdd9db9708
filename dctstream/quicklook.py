"""Quick-look pictures of a scan, ``OUT/quicklook/*.png``, readable at a glance.

=========================  =============================================================
file                       what it shows
=========================  =============================================================
``max_projection.png``     maximum over the corrected frames so far, each difspot's
                           bounding box in green, the direct-beam box in red
``raw_background.png``     a raw frame (dark subtracted, normalised) beside its
                           background, on the same grey scale
``spots_per_psi.png``      difspots per rotation angle ψ (per frame without angles)
``gallery.png``            the brightest difspots (by integral), each cut out of the
                           max-projection with its box, labelled with id and integral
``direct_beam.png``        the background with the direct-beam box found, in red
=========================  =============================================================

`QuickLook` is fed each corrected frame by the pipeline (``on_corrected``):
it keeps the running maximum (one ``np.maximum`` per frame) and, every
``quicklook.every_frames`` frames, copies what it needs and draws the pictures
on a thread of its own, so the pipeline never waits for a PNG.  ``finish()``
draws them once more at the end of the scan, from the complete spot table.
Pictures are written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import replacing
from .direct_beam import beam_mask

log = logging.getLogger(__name__)

FOLDER = "quicklook"
SPOT_COLOUR = (0, 255, 0)
BEAM_COLOUR = (255, 40, 40)
BAR_COLOUR = (70, 130, 220)
TEXT_COLOUR = (255, 255, 255)
BACKGROUND_COLOUR = (24, 24, 24)
TITLE_PX = 22
# Frames are shown between MIN_SIDE_PX and MAX_SIDE_PX on their longer side
# (integer zoom up, block maximum down).
MIN_SIDE_PX, MAX_SIDE_PX = 512, 1024
TILE_PX = 128
NAMES = ("max_projection.png", "raw_background.png", "spots_per_psi.png", "gallery.png", "direct_beam.png")


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _zoom(shape) -> tuple[int, int]:
    """(up, down): integer factors that bring a frame's longer side into [MIN_SIDE_PX, MAX_SIDE_PX]."""
    side = max(shape)
    if side > MAX_SIDE_PX:
        return 1, -(-side // MAX_SIDE_PX)
    return max(MIN_SIDE_PX // side, 1), 1


def _resample(image: np.ndarray, up: int, down: int) -> np.ndarray:
    if down > 1:  # block maximum: a one-pixel spot stays visible
        ny, nx = image.shape
        pad = np.pad(image, ((0, -ny % down), (0, -nx % down)), mode="edge")
        return pad.reshape(pad.shape[0] // down, down, pad.shape[1] // down, down).max(axis=(1, 3))
    if up > 1:
        return np.repeat(np.repeat(image, up, axis=0), up, axis=1)
    return image


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float image -> uint8 with [lo, hi] spread over 0..255 on a square-root scale."""
    scaled = np.clip((np.asarray(image, np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    return (np.sqrt(scaled) * 255).astype(np.uint8)


def _limits(image: np.ndarray, mask: np.ndarray | None = None, hi_pct: float = 99.9) -> tuple[float, float]:
    values = image[~mask] if mask is not None and (~mask).any() else image.ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1.0, hi_pct])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _with_title(image: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (max(image.width, 400), image.height + TITLE_PX), BACKGROUND_COLOUR)
    out.paste(image, (0, TITLE_PX))
    ImageDraw.Draw(out).text((4, 3), title, fill=TEXT_COLOUR, font=_font())
    return out


def _box(draw: ImageDraw.ImageDraw, bbox, up: int, down: int, colour, offset=(0, 0), width: int = 1) -> None:
    """Outline of ``bbox`` = (x0, y0, width, height) in frame pixels, drawn on the zoomed image."""
    x0, y0, w, h = bbox
    dx, dy = offset

    def px(v):
        return v * up // down

    draw.rectangle([dx + px(x0), dy + px(y0), dx + px(x0 + w) - 1, dy + px(y0 + h) - 1], outline=colour,
                   width=width)


def _save(image: Image.Image, path: Path) -> None:
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")


# A difspot's box holds its voxels above tau * max; the spot's glow reaches further, and an
# outline drawn on the box itself vanishes in a bright spot's glow.
BOX_MARGIN_PX = 2


def draw_max_projection(maximum: np.ndarray, spots: dict, beam, frames: int) -> Image.Image:
    mask = beam_mask(beam, maximum.shape)
    up, down = _zoom(maximum.shape)
    lo, hi = _limits(maximum, mask)
    image = Image.fromarray(_grey(_resample(maximum, up, down), lo, hi)).convert("RGB")
    draw = ImageDraw.Draw(image)
    m = BOX_MARGIN_PX
    for x0, y0, w, h in zip(spots["bbox_x0"], spots["bbox_y0"], spots["bbox_x_size"], spots["bbox_y_size"]):
        _box(draw, (int(x0) - m, int(y0) - m, int(w) + 2 * m, int(h) + 2 * m), up, down, SPOT_COLOUR)
    if beam:
        _box(draw, beam, up, down, BEAM_COLOUR, width=2)
    return _with_title(image, f"max projection of {frames} corrected frames: {len(spots['bbox_x0'])} difspots "
                              "(green), direct beam (red)")


def draw_raw_background(raw: np.ndarray, background: np.ndarray, k: int) -> Image.Image:
    up, down = _zoom(raw.shape)
    lo, hi = _limits(np.concatenate([raw.ravel(), background.ravel()]), hi_pct=99.5)
    left = Image.fromarray(_grey(_resample(raw, up, down), lo, hi))
    right = Image.fromarray(_grey(_resample(background, up, down), lo, hi))
    gap = 8
    both = Image.new("RGB", (left.width * 2 + gap, left.height), BACKGROUND_COLOUR)
    both.paste(left.convert("RGB"), (0, 0))
    both.paste(right.convert("RGB"), (left.width + gap, 0))
    out = _with_title(both, f"frame {k}: raw (left) and its background (right), same scale")
    return out


def psi_line(spots: dict) -> tuple[float, float] | None:
    """(psi at frame 0, degrees per frame) from the straight line through the spots, when they have angles."""
    psi, frames = spots.get("centroid_psi_deg"), spots["centroid_frame"]
    if psi is None or len(psi) < 2 or len(psi) != len(frames) or np.ptp(frames) <= 0:
        return None
    slope, offset = np.polyfit(np.asarray(frames, np.float64), np.asarray(psi, np.float64), 1)
    return float(offset), float(slope)


def draw_spots_per_psi(spots: dict, frames: int, bins: int = 72) -> Image.Image:
    """Histogram of the difspots' centroid frames over the whole scan, the axis labelled in psi when known."""
    frames = max(int(frames), 1)
    counts, _ = np.histogram(np.asarray(spots["centroid_frame"], np.float64), bins=bins, range=(0, frames))
    line = psi_line(spots)
    width, height, left, bottom, top = 760, 300, 50, 30, 10
    image = Image.new("RGB", (width, height), BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / bins
    for i, c in enumerate(counts):
        if c:
            x0 = left + i * bar_w
            draw.rectangle([x0 + 1, top + plot_h * (1 - c / peak), x0 + bar_w - 1, top + plot_h], fill=BAR_COLOUR)
    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill=TEXT_COLOUR)
    for value, y in ((peak, top), (0, top + plot_h)):
        draw.text((4, y - 6), str(value), fill=TEXT_COLOUR, font=font)
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        x, frame = left + frac * plot_w, frac * frames
        label = f"{line[0] + line[1] * frame:.0f} deg" if line else f"{frame:.0f}"
        draw.text((x - 14 if frac else x, top + plot_h + 6), label, fill=TEXT_COLOUR, font=font)
    axis = "psi" if line else "frame"
    return _with_title(image, f"difspots per {axis}: {int(counts.sum())} over {frames} frames in {bins} bins, "
                              f"highest {peak}")


def draw_gallery(maximum: np.ndarray, spots: dict, n: int) -> Image.Image | None:
    count = len(spots["integral"])
    if not count:
        return None
    order = np.argsort(-np.asarray(spots["integral"]), kind="stable")[:n]
    columns = min(len(order), 8)
    rows = -(-len(order) // columns)
    label = 16
    sheet = Image.new("RGB", (columns * TILE_PX, rows * (TILE_PX + label)), BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    ny, nx = maximum.shape
    for slot, i in enumerate(order):
        x0, y0 = int(spots["bbox_x0"][i]), int(spots["bbox_y0"][i])
        w, h = int(spots["bbox_x_size"][i]), int(spots["bbox_y_size"][i])
        pad = max(w, h) // 2 + 2
        cx0, cy0 = max(x0 - pad, 0), max(y0 - pad, 0)
        cut = maximum[cy0:min(y0 + h + pad, ny), cx0:min(x0 + w + pad, nx)]
        up = max(TILE_PX // max(cut.shape), 1)
        lo, hi = float(np.percentile(cut, 5)), float(cut.max())
        tile = Image.fromarray(_grey(_resample(cut, up, 1), lo, hi if hi > lo else lo + 1)).convert("RGB")
        tile = tile.crop((0, 0, TILE_PX, TILE_PX))
        _box(ImageDraw.Draw(tile), (x0 - cx0, y0 - cy0, w, h), up, 1, SPOT_COLOUR)
        ox, oy = (slot % columns) * TILE_PX, (slot // columns) * (TILE_PX + label)
        sheet.paste(tile, (ox, oy + label))
        draw.text((ox + 2, oy + 1), f"#{int(spots['id'][i])} I={spots['integral'][i]:.3g}", fill=TEXT_COLOUR,
                  font=font)
    return _with_title(sheet, f"the {len(order)} brightest of {count} difspots (by integral)")


def draw_direct_beam(background: np.ndarray, beam) -> Image.Image:
    up, down = _zoom(background.shape)
    lo, hi = _limits(background)
    image = Image.fromarray(_grey(_resample(background, up, down), lo, hi)).convert("RGB")
    if beam:
        _box(ImageDraw.Draw(image), beam, up, down, BEAM_COLOUR, width=2)
    found = f"direct beam found at [x0, y0, width, height] = {list(beam)}" if beam else "no direct beam found"
    return _with_title(image, found)


def _unbinned(image: np.ndarray, b: int) -> np.ndarray:
    """A binned image in detector pixels: each pixel b x b times."""
    return np.repeat(np.repeat(image, b, axis=0), b, axis=1)


class QuickLook:
    """Keeps the max-projection of the corrected frames and draws the pictures.

    ``pipeline`` gives the ring of raw frames (for the raw/background
    picture), the spot table and the direct-beam box; it is read, never
    changed.
    """

    def __init__(self, cfg, out_dir: str | os.PathLike, pipeline):
        self.cfg = cfg
        self.folder = Path(out_dir) / FOLDER
        self._pipeline = pipeline
        self._max: np.ndarray | None = None
        self._frames = 0
        self._sample: tuple[int, np.ndarray, np.ndarray] | None = None  # (k, raw, background)
        self._thread: threading.Thread | None = None
        self.written: list[str] = []

    def on_corrected(self, k: int, frame: np.ndarray) -> None:
        if self._max is None:
            self._max = np.array(frame, np.float32, copy=True)
        else:
            np.maximum(self._max, frame, out=self._max)
        self._frames += 1
        every = self.cfg.every_frames
        if self._sample is None or (every and self._frames % every == 0):
            self._take_sample(k, frame)
        if every and self._frames % every == 0 and (self._thread is None or not self._thread.is_alive()):
            job = self._job()
            self._thread = threading.Thread(target=self._draw_logged, args=(job,), name="dctstream-quicklook",
                                            daemon=True)
            self._thread.start()

    def _take_sample(self, k: int, corrected: np.ndarray) -> None:
        """Raw frame k (dark subtracted, normalised) and its background = that minus the corrected frame."""
        bg = getattr(self._pipeline, "background", None)
        if bg is None:
            return
        try:
            slot = bg.ring.slot(k)
        except IndexError:
            return
        raw = (bg.ring.data[slot].astype(np.float32) - bg.dark) * bg.gain  # the ring holds normalised frames
        self._sample = (k, raw, raw - corrected)

    def _job(self) -> dict:
        table = getattr(self._pipeline, "table", None)
        columns = ("id", "integral", "centroid_frame", "centroid_psi_deg", "bbox_x0", "bbox_y0", "bbox_x_size",
                   "bbox_y_size")
        spots = {c: (table.column(c) if table is not None else np.empty(0)) for c in columns}
        if not spots["centroid_psi_deg"].size:
            spots["centroid_psi_deg"] = None
        stats = self._pipeline.stats
        # the frames are binned ones with detector.binning, the spots and the beam box in detector pixels: the
        # pictures are drawn in detector pixels (the gallery cut empty tiles and failed, the boxes were misplaced)
        detector = getattr(self._pipeline, "detector", None)
        b = getattr(detector, "binning", 1) or 1
        sample = self._sample
        if b > 1 and sample is not None:
            sample = (sample[0], _unbinned(sample[1], b), _unbinned(sample[2], b))
        return {"max": _unbinned(self._max, b) if b > 1 else self._max.copy(), "frames": self._frames,
                "spots": spots, "sample": sample, "beam": stats.direct_beam,
                "total": stats.frames_total or self._frames}

    def _draw_logged(self, job: dict) -> None:
        try:
            self.draw(job)
        except Exception as exc:  # a picture must never stop a scan
            log.warning("quick-look pictures not written: %s", exc)

    def draw(self, job: dict) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        pictures = {"max_projection.png": draw_max_projection(job["max"], job["spots"], job["beam"], job["frames"]),
                    "spots_per_psi.png": draw_spots_per_psi(job["spots"], job["total"]),
                    "gallery.png": draw_gallery(job["max"], job["spots"], self.cfg.gallery_spots)}
        if job["sample"] is not None:
            k, raw, background = job["sample"]
            pictures["raw_background.png"] = draw_raw_background(raw, background, k)
            pictures["direct_beam.png"] = draw_direct_beam(background, job["beam"])
        written = []
        for name, image in pictures.items():
            if image is not None:
                _save(image, self.folder / name)
                written.append(name)
        self.written = sorted(set(self.written) | set(written))
        return written

    def finish(self) -> list[str]:
        """Wait for a drawing in progress, then draw every picture from the whole scan."""
        if self._thread is not None:
            self._thread.join()
        if self._max is None:
            return []
        self.draw(self._job())
        return [f"{FOLDER}/{name}" for name in self.written]
