"""HDF5 sources: URLs, frames in order and in their own dtype, compressed data, darks, and input errors."""

from __future__ import annotations

import os
import re

import h5py
import hdf5plugin
import numpy as np
import pytest

from dctstream.errors import InputError
from dctstream.config import SourceConfig
from dctstream.sources import Hdf5FileSource, load_dark, open_source, parse_url, read_dataset
from dctstream.sources import hdf5 as hdf5_module
from dctstream.sources._kernels import float_counts
from dctstream.sources.base import NO_DATA
from simulators.dct_scan import simulate_scan


def open_files() -> set[str]:
    """Names of the HDF5 files this process holds open."""
    return {os.fsdecode(fid.name) for fid in h5py.h5f.get_obj_ids(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)}


# frames as other software stores them: big-endian (a byte order the kernels do not take) and half floats
STORED = {"uint16be": ">u2", "int32be": ">i4", "float32be": ">f4", "float16": "<f2"}


def stored_values(name: str, frames: np.ndarray) -> np.ndarray:
    """The values dataset ``name`` holds of ``frames``: uint8 and float16 (whole up to 2048) wrap below them."""
    return frames % 250 if name == "uint8" else frames % 2000 if name == "float16" else frames


@pytest.fixture
def stack_file(tmp_path):
    """Frames whose every pixel tells its frame: frame k = k * 1000 + pixel number, several dtypes."""
    path = tmp_path / "stack.h5"
    n = 2 * hdf5_module._READ_FRAMES_MAX + 3  # a partial last read of tiny frames
    frames = (np.arange(n)[:, None, None] * 1000 + np.arange(12).reshape(1, 3, 4))
    with h5py.File(path, "w") as f:
        for dtype in ("uint16", "int32", "uint32", "int64", "uint8", "float32", "float64"):
            f[dtype] = stored_values(dtype, frames).astype(dtype)
        for name, stored in STORED.items():
            f[name] = stored_values(name, frames).astype(stored)
        f["angles"] = np.linspace(-10.0, 30.0, n + 5)  # more angles than frames is fine
    return path, frames


# -- parse_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("scan.h5::/1.1/measurement/marana", ("scan.h5", "/1.1/measurement/marana")),
    ("/data/id11/s 1/s1.h5::/2.1/measurement/marana", ("/data/id11/s 1/s1.h5", "/2.1/measurement/marana")),
    ("scan.h5::data", ("scan.h5", "data")),
    ("scan.h5::/a::b", ("scan.h5", "/a::b")),  # the first :: separates
    ("C:\\data\\scan.h5::/d", ("C:\\data\\scan.h5", "/d")),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["scan.h5", "scan.h5::", "::/data", "::", "", "scan.h5:/data"])
def test_parse_url_rejects(url):
    with pytest.raises(InputError, match="expected a URL of the form path/to/file.h5::/path/to/dataset") as err:
        parse_url(url)
    assert str(err.value).startswith(f"{url}: ")


# -- Hdf5FileSource ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint32", "int64", "uint8", "float32", "float64", *STORED])
def test_every_frame_once_in_order_native_dtype(stack_file, dtype):
    """Integer frames as they are stored, in the machine's byte order; float frames of whole numbers (counts a
    simulator stored as floats, half floats included) as int32."""
    path, frames = stack_file
    stored = np.dtype(STORED.get(dtype, dtype))
    with Hdf5FileSource(f"{path}::/{dtype}", f"{path}::/angles") as source:
        assert source.n_frames == len(frames)
        assert source.frame_shape == (3, 4)
        delivered = np.dtype("int32") if stored.kind == "f" else stored.newbyteorder("=")
        assert source.dtype == delivered and delivered.isnative
        got = list(source)
        last = stored_values(dtype, frames[-1]).astype(stored).astype(delivered)
        np.testing.assert_array_equal(source.read_frame(len(frames) - 1), last)
    angles = np.linspace(-10.0, 30.0, len(frames) + 5)
    assert [f.index for f in got] == list(range(len(frames)))
    assert [f.psi_deg for f in got] == angles[: len(frames)].tolist()
    for k, frame in enumerate(got):
        assert frame.data.dtype == delivered
        assert frame.data.shape == (3, 4)
        np.testing.assert_array_equal(frame.data, stored_values(dtype, frames[k]).astype(stored).astype(delivered))
    assert str(path) not in open_files()


@pytest.mark.parametrize("units,factor", [(None, 1.0), ("deg", 1.0), (b"rad", 180 / np.pi),
                                          (np.array([b"mrad"]), 0.18 / np.pi)])
def test_angles_in_the_unit_their_units_attribute_names_are_read_in_degrees(tmp_path, caplog, units, factor):
    """NeXus writes an angle's unit as the dataset's ``units``: radians become degrees; without one, angles
    spanning about a turn in radians are only said to look like radians."""
    from dctstream.sources.hdf5_live import LiveAngles
    from dctstream.sources.stream import Stream2Source

    path = tmp_path / "scan.h5"
    psi = np.arange(40) * 2 * np.pi / 40  # a turn, if radians
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((40, 4, 4), np.uint16)
        f["angles"] = psi
        if units is not None:
            f["angles"].attrs["units"] = units
    with caplog.at_level("WARNING"), Hdf5FileSource(f"{path}::/frames", f"{path}::/angles") as source:
        np.testing.assert_allclose(source.angles, psi * factor, rtol=1e-12)
    assert ("like radians" in caplog.text) == (units is None)
    live = LiveAngles(f"{path}::/angles")
    live.look()
    np.testing.assert_allclose([live.get(k) for k in range(40)], psi * factor, rtol=1e-12)
    live.close()
    np.testing.assert_allclose(Stream2Source._load_angles(f"{path}::/angles"), psi * factor, rtol=1e-12)


def test_angles_in_an_unknown_unit_are_taken_as_degrees_saying_so(tmp_path, caplog):
    from dctstream.sources.hdf5_live import LiveAngles

    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((3, 4, 4), np.uint16)
        f["angles"] = np.arange(3.0)
        f["angles"].attrs["units"] = "turns"
    with caplog.at_level("WARNING"), Hdf5FileSource(f"{path}::/frames", f"{path}::/angles") as source:
        np.testing.assert_array_equal(source.angles, [0.0, 1.0, 2.0])
    assert re.search(r"source.angles: .*scan.h5::/angles: units 'turns' not known, expected degrees or radians "
                     r"\(deg, .*\): taken as degrees", caplog.text)
    live = LiveAngles(f"{path}::/angles")
    live.look()
    assert [live.get(k) for k in range(3)] == [0.0, 1.0, 2.0]
    live.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_counts_kernel_equals_numpy(dtype):
    """The one-pass kernel against numpy: rint, the mark where no number or beyond the top, and its counts."""
    rng = np.random.default_rng(5)
    data = np.round(rng.normal(0, 300, 5000), 1).astype(dtype)  # whole numbers and tenths
    data[rng.integers(0, data.size, 40)] = np.nan
    data[rng.integers(0, data.size, 10)] = np.inf
    data[rng.integers(0, data.size, 10)] = -3e9
    out = np.empty(data.size, np.int32)
    got = float_counts(data, 1e-3, 2**31 - 2, NO_DATA, out)
    finite = np.isfinite(data)
    rounded = np.rint(np.where(finite, data, 0))
    beyond = np.abs(rounded) > 2**31 - 2
    assert got == (int((finite & (np.abs(rounded - data) > 1e-3)).sum()), int((~finite).sum()), int(beyond.sum()))
    assert got[0] > 1000 and got[1] == 50 and got[2] == 10
    np.testing.assert_array_equal(out, np.where(finite & ~beyond, rounded.astype(np.int64), NO_DATA).astype(np.int32))


def test_float_frames_with_fractions_are_rounded_where_their_noise_allows(tmp_path, caplog):
    """A simulator's Poisson counts plus Gaussian read noise, stored as floats: fractions that a rounding
    to whole counts loses nothing of (a noise of 10 counts against the rounding's 0.29) come rounded, said
    once and counted, and so do those of a simulation without noise whose values are hundreds of counts;
    normalised frames (about 1, a noise of 0.1) are refused at their first fraction, naming their noise; a NaN
    is the mark of a pixel without data (the source's ``invalid_value``); counts beyond int32 are refused."""
    rng = np.random.default_rng(1)
    noisy = (rng.poisson(100.0, (6, 32, 48)) + rng.normal(0, 2.0, (6, 32, 48))).astype(np.float32)
    normalised = (noisy / 100.0).astype(np.float32)
    broken = noisy.copy()
    broken[4, 7, 9] = np.nan
    path = tmp_path / "float.h5"
    with h5py.File(path, "w") as f:
        f["noisy"], f["normalised"], f["broken"] = noisy, normalised, broken
    with Hdf5FileSource(f"{path}::/noisy") as source, caplog.at_level("WARNING"):
        got = np.stack([frame.data for frame in source])
        assert source.dtype == np.int32 and got.dtype == np.int32
        np.testing.assert_array_equal(got, np.rint(noisy).astype(np.int32))
        assert dict(source.counters)["frames_rounded"] >= len(noisy)
    rounded = [r.getMessage() for r in caplog.records if "rounded to whole counts" in r.getMessage()]
    assert len(rounded) == 1 and "noise of 10" in rounded[0], rounded
    with pytest.raises(InputError, match=r"/normalised: frame 0: expected detector counts, whole numbers, got "
                                         r"[0-9.]+ at pixel \(y, x\) = \(0, 0\) of float32 frames, their noise 0\.1\d* "
                                         r"counts and values under 100, where fractions are rounded from a noise "
                                         r"of 1\.5"):
        Hdf5FileSource(f"{path}::/normalised")
    y, x = np.mgrid[0:32, 0:48]
    smooth = (300.0 + 2000.0 * np.exp(-((y - 15.3) ** 2 + (x - 20.6) ** 2) / 8.0)).astype(np.float32)
    with h5py.File(path, "a") as f:
        f["noiseless"] = np.stack([smooth] * 3)  # a simulation without noise: fractions, values of hundreds
    with Hdf5FileSource(f"{path}::/noiseless") as source:
        np.testing.assert_array_equal(np.stack([frame.data for frame in source])[1], np.rint(smooth))
    counting = np.where(rng.random((3, 32, 48)) < 0.1, 1.0, 0.0) * np.float32(0.1) * 10  # 1.0000000149 or 0
    assert (counting != np.rint(counting)).any()
    with h5py.File(path, "a") as f:
        f["counting"] = counting.astype(np.float64)
    with Hdf5FileSource(f"{path}::/counting") as source:  # whole up to the float's error, without a noise
        np.testing.assert_array_equal(np.stack([frame.data for frame in source]), np.rint(counting))
        assert "frames_rounded" not in source.counters
    with Hdf5FileSource(f"{path}::/broken") as source:  # a pixel without a number: the mark of no data
        got = np.stack([frame.data for frame in source])
        assert source.invalid_value == NO_DATA and got[4, 7, 9] == NO_DATA
        np.testing.assert_array_equal(np.delete(got.ravel(), np.ravel_multi_index((4, 7, 9), got.shape)),
                                      np.delete(np.rint(noisy).astype(np.int32).ravel(),
                                                np.ravel_multi_index((4, 7, 9), got.shape)))
    with h5py.File(path, "a") as f:
        f["huge"] = np.full((2, 4, 4), 3e9, np.float32)
    with pytest.raises(InputError, match=re.escape(f"{path}::/huge: frame 0: expected detector counts, whole numbers, "
                                                   "got 3000000000.0 at pixel (y, x) = (0, 0)")):
        Hdf5FileSource(f"{path}::/huge")


def test_frames_of_the_simulated_scan(tiny_scan):
    with h5py.File(tiny_scan.path, "r") as f:
        stored = f["/1.1/measurement/marana"][()]
        psi = f["/1.1/measurement/diffrz"][()]
    source = open_source(SourceConfig(url=tiny_scan.frames_url, angles=tiny_scan.angles_url))
    try:
        frames = list(source)
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(stored.shape[0]))
    assert [f.psi_deg for f in frames] == psi.tolist()
    np.testing.assert_array_equal(np.stack([f.data for f in frames]), stored)
    assert frames[0].data.dtype == np.uint16
    np.testing.assert_array_equal(source.angles, psi)


def test_without_angles_psi_is_none(tiny_scan):
    with Hdf5FileSource(tiny_scan.frames_url) as source:
        assert source.angles is None
        assert {f.psi_deg for f in source} == {None}


def test_source_can_be_iterated_twice(stack_file):
    path, frames = stack_file
    with Hdf5FileSource(f"{path}::/uint16") as source:
        first = [f.data.copy() for f in source]
        second = [f.data for f in source]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_bitshuffle_lz4_gives_identical_frames(tiny_scan, tmp_path):
    truth = simulate_scan(tmp_path / "bslz4.h5", frames=40, size=64, spots=10, seed=0,
                          compression=hdf5plugin.Bitshuffle())
    with h5py.File(truth.path, "r") as f:
        plist = f["/1.1/measurement/marana"].id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    assert hdf5plugin.BSHUF_ID in filters  # the data really are compressed
    assert os.path.getsize(truth.path) < os.path.getsize(tiny_scan.path)
    with Hdf5FileSource(truth.frames_url, truth.angles_url) as compressed, \
            Hdf5FileSource(tiny_scan.frames_url, tiny_scan.angles_url) as plain:
        pairs = list(zip(compressed, plain, strict=True))
    assert len(pairs) == 40
    for a, b in pairs:
        assert (a.index, a.psi_deg) == (b.index, b.psi_deg)
        assert a.data.dtype == b.data.dtype == np.uint16
        np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(load_dark(truth.dark_url, None, (64, 64)),
                                  load_dark(tiny_scan.dark_url, None, (64, 64)))


@pytest.mark.parametrize("dataset, needles", [
    ("two_d", ["source.url", "expected a 3-D stack of frames", "got shape (64, 64)"]),
    ("float_frames", ["source.url", "frame 0: expected detector counts, whole numbers",
                      "got 0.5 at pixel (y, x) = (0, 0) of float32 frames"]),
    ("no_frames", ["source.url", "expected at least 1 frame", "got shape (0, 64, 64)"]),
    ("group", ["source.url", "is a group, expected a dataset", "inside"]),
    ("nope", ["source.url", "no such dataset", "angles_short, angles_text"]),
])
def test_source_input_errors_close_the_file(bad_inputs, dataset, needles):
    with pytest.raises(InputError) as err:
        Hdf5FileSource(f"{bad_inputs}::/{dataset}")
    message = str(err.value)
    assert f"{bad_inputs}::/{dataset}" in message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert str(bad_inputs) not in open_files()


@pytest.mark.parametrize("dataset, needles", [
    ("angles_short", ["at least 40 angles", "got shape (10,)"]),
    ("angles_text", ["angles in degrees", "dtype |S1"]),
    ("nope", ["no such dataset"]),
])
def test_angle_errors_close_both_files(tiny_scan, bad_inputs, dataset, needles):
    with pytest.raises(InputError) as err:
        Hdf5FileSource(tiny_scan.frames_url, f"{bad_inputs}::/{dataset}")
    message = str(err.value)
    assert message.startswith(f"source.angles: {bad_inputs}::/{dataset}: "), message
    for needle in needles:
        assert needle in message, message
    # The error's traceback still references the half-built source: it must have closed its file itself.
    assert not {tiny_scan.path, str(bad_inputs)} & open_files()


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        read_dataset(f"{tmp_path}/nothing.h5::/data", "dark.url")
    assert str(err.value).startswith(f"dark.url: {tmp_path}/nothing.h5: ")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not HDF5\n")
    with pytest.raises(InputError, match="cannot open as HDF5") as err:
        Hdf5FileSource(f"{path}::/data")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- load_dark -------------------------------------------------------------------------------------


@pytest.fixture
def darks(tmp_path):
    rng = np.random.default_rng(5)
    stack = rng.integers(90, 110, size=(7, 6, 5)).astype(np.uint16)
    image = rng.normal(100.0, 3.0, size=(6, 5))
    path = tmp_path / "darks.h5"
    with h5py.File(path, "w") as f:
        f["stack"] = stack
        f["image"] = image
        f["one_frame"] = stack[:1]
        f["wrong"] = stack.transpose(0, 2, 1)  # transposed frames
    return path, stack, image


def test_dark_stack_is_averaged(darks):
    path, stack, _ = darks
    dark = load_dark(f"{path}::/stack", None, (6, 5))
    assert dark.dtype == np.float32 and dark.shape == (6, 5)
    np.testing.assert_array_equal(dark, stack.mean(axis=0, dtype=np.float64).astype(np.float32))
    # not an integer mean: the average keeps its fractions
    assert not np.array_equal(dark, np.round(dark))
    np.testing.assert_array_equal(load_dark(f"{path}::/one_frame", None, (6, 5)), stack[0].astype(np.float32))


def test_dark_image(darks):
    path, _, image = darks
    dark = load_dark(f"{path}::/image", None, (6, 5))
    assert dark.dtype == np.float32
    np.testing.assert_array_equal(dark, image.astype(np.float32))


def test_dark_constant_and_none():
    dark = load_dark(None, 101.5, (6, 5))
    assert dark.dtype == np.float32 and dark.shape == (6, 5)
    assert np.all(dark == 101.5)
    assert load_dark(None, None, (6, 5)) is None


@pytest.mark.parametrize("dataset, got", [("wrong", "(7, 5, 6)"), ("image", "(6, 5)")])
def test_dark_of_the_wrong_shape(darks, dataset, got):
    path, _, _ = darks
    frame_shape = (5, 6) if dataset == "image" else (6, 5)
    with pytest.raises(InputError) as err:
        load_dark(f"{path}::/{dataset}", None, frame_shape)
    message = str(err.value)
    assert message.startswith(f"dark.url: {path}::/{dataset}: "), message
    assert str(frame_shape) in message and f"got shape {got}" in message
    assert str(path) not in open_files()


@pytest.mark.parametrize("dataset, needle", [
    ("dark_text", "expected numeric dark counts"),
    ("dark_empty", "expected at least 1 dark frame"),
    ("angles_short", "got shape (10,)"),
])
def test_dark_errors(bad_inputs, dataset, needle):
    with pytest.raises(InputError, match="^dark.url: ") as err:
        load_dark(f"{bad_inputs}::/{dataset}", None, (64, 64))
    assert needle in str(err.value)


def test_a_link_to_frames_that_are_not_there_is_named_as_such(tmp_path):
    """An external link whose file is gone, and a soft link to nothing: the error says which link, and where
    it points, not that the dataset does not exist."""
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["entry/frames"] = h5py.ExternalLink("gone.h5", "/data")
        f["entry/soft"] = h5py.SoftLink("/entry/nothing")
    with pytest.raises(InputError, match=r"frames: an external link to gone\.h5::/data, which cannot be read"):
        Hdf5FileSource(f"{path}::/entry/frames")
    with pytest.raises(InputError, match=r"soft: a link to /entry/nothing, which does not exist in"):
        Hdf5FileSource(f"{path}::/entry/soft")


def test_virtual_sources_are_looked_for_beside_the_file_that_holds_the_virtual_dataset(tmp_path):
    """A collection file in another folder links a dataset file whose virtual dataset names its sources relative
    to itself: every frame is there (all were "never written" before), and a missing source is still missed."""
    from dctstream.sources.hdf5 import unwritten_frames
    data = tmp_path / "data"
    data.mkdir()
    layout = h5py.VirtualLayout(shape=(6, 4, 4), dtype=np.uint16)
    for part in (0, 1):
        with h5py.File(data / f"part{part}.h5", "w") as f:
            f["frames"] = np.full((3, 4, 4), part + 1, np.uint16)
        layout[3 * part:3 * (part + 1)] = h5py.VirtualSource(f"part{part}.h5", "frames", shape=(3, 4, 4))
    with h5py.File(data / "scan.h5", "w") as f:
        f.create_virtual_dataset("frames", layout, fillvalue=0)
    (tmp_path / "elsewhere").mkdir()
    collection = tmp_path / "elsewhere" / "collection.h5"
    with h5py.File(collection, "w") as f:
        f["scan"] = h5py.ExternalLink(str(data / "scan.h5"), "/frames")
    with h5py.File(collection, "r") as f:
        assert unwritten_frames(f["scan"], str(collection)).size == 0
    (data / "part1.h5").unlink()
    with h5py.File(collection, "r") as f:
        assert unwritten_frames(f["scan"], str(collection)).tolist() == [3, 4, 5]


def test_a_recorded_file_cut_short_while_it_is_read_is_an_error_naming_it(tmp_path):
    """Truncated under the run (re-copied, overwritten), HDF5 read the lost frames as zeros, which passed for
    frames without the beam and the run 'finished'; now the frame being read and the sizes are said."""
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["frames"] = np.arange(200 * 64 * 64, dtype=np.uint16).reshape(200, 64, 64)
    source = Hdf5FileSource(f"{path}::/frames")
    frames = iter(source)
    first = next(frames)
    np.testing.assert_array_equal(first.data, np.arange(64 * 64).reshape(64, 64))
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(InputError, match=rf"scan.h5::/frames: the file changed while frame \d+ was read "
                                         rf"\({size} bytes then, {size // 2} now\)"):
        list(frames)
    source.close()


def test_a_path_written_with_home_or_a_variable_says_it_is_not_expanded(tmp_path, monkeypatch):
    """`detector.mask: ~/mask.npy` or `dark.url: $HOME/s.h5::/d` said "file not found" of a file that is there:
    a path is taken as written, and the error now says so and where the file is."""
    from dctstream.sources.hdf5 import read_image

    np.save(tmp_path / "mask.npy", np.zeros((4, 4), np.uint8))
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["d"] = np.zeros((4, 4), np.uint16)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError, match=r"detector.mask: ~/mask.npy: file not found \(~ and \$NAME are not "
                                         rf"expanded: {tmp_path}/mask.npy is there, write the path out\)"):
        read_image("~/mask.npy", "detector.mask")
    with pytest.raises(InputError, match=rf"dark.url: \$HOME/s.h5: file not found \(.* {tmp_path}/s.h5 is there"):
        read_dataset("$HOME/s.h5::/d", "dark.url")
    with pytest.raises(InputError, match=r"detector.mask: ~/none.npy: file not found, expected"):
        read_image("~/none.npy", "detector.mask")


@pytest.mark.parametrize("frames", [1, 3], ids=["image", "stack"])
def test_an_edf_dark_cut_short_is_an_error_not_zero_rows(tmp_path, frames):
    """fabio pads an EDF data block cut short with zeros: a dark copied in part read as a dark with its last rows 0,
    unsaid."""
    import fabio.edfimage

    from dctstream.sources.hdf5 import read_image

    data = np.arange(frames * 32 * 32, dtype=np.uint16).reshape(frames, 32, 32) % 1000 + 100
    image = fabio.edfimage.EdfImage(data=data[0])
    for frame in data[1:]:
        image.append_frame(data=frame)
    image.write(str(tmp_path / "dark.edf"))
    whole = (tmp_path / "dark.edf").read_bytes()
    np.testing.assert_array_equal(read_image(str(tmp_path / "dark.edf"), "dark.url"), data[0] if frames == 1 else data)
    (tmp_path / "cut.edf").write_bytes(whole[:-700])
    with pytest.raises(InputError) as err:
        read_image(str(tmp_path / "cut.edf"), "dark.url")
    assert str(err.value) == (f"dark.url: {tmp_path}/cut.edf: the file is cut short (its data holds fewer bytes than "
                              "its header says: a copy not finished?), expected a whole image")


def test_an_edf_file_read_while_written_logs_no_error_of_fabio(tmp_path, caplog):
    """A frame file of a followed folder read before it is whole is read again; fabio's ERROR line for it ("Data
    stream is incomplete", naming no file) is not passed on."""
    import logging

    import fabio.edfimage

    from dctstream.sources.folder import FolderSource

    for number in range(3):
        fabio.edfimage.EdfImage(data=np.full((16, 16), number, np.uint16)).write(str(tmp_path / f"img_{number}.edf"))
    whole = (tmp_path / "img_2.edf").read_bytes()
    (tmp_path / "img_2.edf").write_bytes(whole[:-200])
    cfg = SourceConfig(url=f"{tmp_path}/img_*.edf", expected_frames=3, idle_timeout_s=0.5, poll_interval_s=0.05)
    with caplog.at_level(logging.INFO), FolderSource(cfg) as source:
        assert [frame.index for frame in source] == [0, 1]
    assert f"{tmp_path}/img_2.edf: frame 2: a truncated file for 0.5 s: the scan ends before it" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("fabio")], caplog.text
