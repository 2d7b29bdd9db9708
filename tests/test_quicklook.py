"""Quick-look pictures: written during and after a scan, and showing what they say they show."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dctstream.config import load_config
from dctstream.quicklook import (BAR_COLOUR, BEAM_COLOUR, BOX_MARGIN_PX, NAMES, SPOT_COLOUR, TITLE_PX, QuickLook, _zoom,
                                 draw_gallery, draw_max_projection)
from dctstream.runner import process_scan
from dctstream.sinks import read_spot_table


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def spot_table(*boxes):
    """Spot-table columns for boxes (x0, y0, width, height), integrals 100, 200, ..."""
    n = len(boxes)
    return {"id": np.arange(n), "integral": 100.0 * (1 + np.arange(n)), "centroid_frame": np.arange(n, dtype=float),
            "centroid_psi_deg": None, "bbox_x0": np.array([b[0] for b in boxes]),
            "bbox_y0": np.array([b[1] for b in boxes]), "bbox_x_size": np.array([b[2] for b in boxes]),
            "bbox_y_size": np.array([b[3] for b in boxes])}


def test_max_projection_draws_each_box_around_its_spot():
    image = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    image[30:34, 10:13] = 50.0  # a spot: rows 30-33, columns 10-12
    drawn = np.asarray(draw_max_projection(image, spot_table((10, 30, 3, 4)), (40, 5, 20, 10), 9))
    up, down = _zoom(image.shape)
    assert (up, down) == (8, 1)
    body = drawn[TITLE_PX:]
    green = np.all(body == SPOT_COLOUR, axis=-1)
    ys, xs = np.nonzero(green)
    m = BOX_MARGIN_PX  # drawn just outside the box, so that a bright spot's glow does not hide it
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == ((30 - m) * up, (34 + m) * up - 1, (10 - m) * up,
                                                        (13 + m) * up - 1)
    red = np.all(body == BEAM_COLOUR, axis=-1)
    ys, xs = np.nonzero(red)
    assert (ys.min(), xs.min()) == (5 * up, 40 * up)
    # the spot is bright inside its box, the background dark around it
    assert body[31 * up, 11 * up, 0] == 255 and np.median(body[:200, 200:, 0]) < 180


def test_large_frames_are_shrunk_keeping_one_pixel_spots():
    image = np.zeros((2048, 2048), np.float32)
    image[1001, 501] = 10.0
    drawn = np.asarray(draw_max_projection(image, spot_table(), None, 1))[TITLE_PX:]
    assert drawn.shape[:2] == (1024, 1024)
    assert drawn[500, 250, 0] == 255  # block maximum, not a mean that would hide it


def test_gallery_holds_the_brightest_spots_first():
    image = np.zeros((64, 64), np.float32)
    image[5:8, 5:8], image[30:42, 30:42] = 3.0, 9.0
    # spot 1 (12 x 12 px, cut out with 8 px around: 28 px zoomed 4x) has the larger integral
    sheet = np.asarray(draw_gallery(image, spot_table((5, 5, 3, 3), (30, 30, 12, 12)), 1))
    tiles = sheet[TITLE_PX + 16:]
    green = np.all(tiles == SPOT_COLOUR, axis=-1)
    ys, xs = np.nonzero(green)
    assert (xs.min(), xs.max() + 1 - xs.min()) == (8 * 4, 12 * 4)
    assert not green[:, 128:].any()  # one tile only


@pytest.fixture(scope="module")
def processed(tiny_scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("quicklook") / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", "background.window=11",
                             "segmentation.max_blob_size=[20,20,5]", f"output.dir={out}",
                             "quicklook.every_frames=10", "quicklook.gallery_spots=6"])
    stats = process_scan(cfg, display=False)
    return out, stats, read_spot_table(out / "spots.h5")


def test_every_picture_is_written_and_not_blank(processed):
    out, stats, table = processed
    assert sorted(p.name for p in (out / "quicklook").iterdir()) == sorted(NAMES)
    for name in NAMES:
        body = pixels(out / "quicklook" / name)[TITLE_PX:].astype(float)
        assert body.std() > 10, name
        assert len(np.unique(body[..., 0])) > 8, name


def test_max_projection_of_the_scan_boxes_its_difspots(processed):
    out, stats, table = processed
    body = pixels(out / "quicklook" / "max_projection.png")[TITLE_PX:]
    up, _ = _zoom((64, 64))
    brightest = int(np.argmax(table["integral"]))
    m = BOX_MARGIN_PX
    x0, y0 = table["bbox_x0"][brightest] - m, table["bbox_y0"][brightest] - m
    assert tuple(body[y0 * up, x0 * up]) == SPOT_COLOUR
    # where no difspot is, nothing green is drawn
    covered = np.zeros((64, 64), bool)
    for x, y, w, h in zip(table["bbox_x0"], table["bbox_y0"], table["bbox_x_size"], table["bbox_y_size"]):
        covered[max(y - m, 0):y + h + m, max(x - m, 0):x + w + m] = True
    green = np.all(body == SPOT_COLOUR, axis=-1)[::up, ::up]
    assert not (green & ~covered).any()
    bx, by, bw, bh = stats.direct_beam
    assert tuple(body[by * up, bx * up]) == BEAM_COLOUR
    assert tuple(pixels(out / "quicklook" / "direct_beam.png")[TITLE_PX + by * up, bx * up]) == BEAM_COLOUR


def test_spots_per_psi_bars_count_the_difspots(processed):
    out, stats, table = processed
    body = pixels(out / "quicklook" / "spots_per_psi.png")[TITLE_PX:]
    bars = np.all(body == BAR_COLOUR, axis=-1)
    bins = np.histogram(table["centroid_frame"], bins=72, range=(0, 40))[0]
    assert bins.sum() == len(table["id"]) > 0
    left, top, plot_w, plot_h = 50, 10, 700, 260  # the plot inside the 760 x 300 picture
    heights = [np.count_nonzero(bars[:, int(left + (i + 0.5) * plot_w / 72)]) for i in range(72)]
    # each bin's bar is as tall as its count, the highest one the whole plot
    np.testing.assert_allclose(heights, plot_h * bins / bins.max(), atol=1.5)


def test_pictures_are_drawn_while_the_scan_runs(tiny_scan, tmp_path):
    """every_frames: the pipeline thread only hands a copy to a drawing thread."""
    class FakePipeline:
        background = None
        table = None

        class stats:
            direct_beam = None
            frames_total = 30

    cfg = load_config(None, ["quicklook.every_frames=10"]).quicklook
    quick = QuickLook(cfg, tmp_path, FakePipeline())
    frame = np.zeros((32, 32), np.float32)
    for k in range(25):
        frame[k, k] = 1.0 + k
        quick.on_corrected(k, frame)
        if k < 20 and quick._thread is not None:
            quick._thread.join()  # (a test may wait; the pipeline never does)
    assert (tmp_path / "quicklook" / "max_projection.png").exists()
    body = pixels(tmp_path / "quicklook" / "max_projection.png")[TITLE_PX:]
    up, _ = _zoom((32, 32))
    # last drawn after the 20th frame: the diagonal is bright up to frame 19 only
    assert body[19 * up, 19 * up, 0] > 200
    assert body[22 * up, 22 * up, 0] < 50


def test_pictures_of_a_binned_run_are_in_detector_pixels(tiny_scan, tmp_path):
    """With detector.binning the pictures were drawn from the binned frames while the spots are in detector
    pixels: the gallery failed (`integral division or modulo by zero`, `index -1 is out of bounds`), no picture
    was written, and the boxes would have been at twice their place."""
    out = tmp_path / "out"
    cfg = load_config(None, [f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
                             f"dark.url={tiny_scan.dark_url}", "background.window=11", "detector.binning=2",
                             "segmentation.max_blob_size=[20,20,5]", f"output.dir={out}"])
    process_scan(cfg, display=False)
    table = read_spot_table(out / "spots.h5")
    assert len(table["id"]) > 0
    assert sorted(p.name for p in (out / "quicklook").iterdir()) == sorted(NAMES)
    body = pixels(out / "quicklook" / "max_projection.png")[TITLE_PX:]
    up, _ = _zoom((64, 64))
    assert body.shape[:2] == (64 * up, 64 * up)
    brightest = int(np.argmax(table["integral"]))
    x0, y0 = table["bbox_x0"][brightest] - BOX_MARGIN_PX, table["bbox_y0"][brightest] - BOX_MARGIN_PX
    assert tuple(body[max(y0, 0) * up, max(x0, 0) * up]) == SPOT_COLOUR
