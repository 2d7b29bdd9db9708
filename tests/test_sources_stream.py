"""DECTRIS stream sources: every encoding live over ZeroMQ, network and detector faults, and hostile messages."""

from __future__ import annotations

import json
import logging
import struct
from contextlib import contextmanager

import cbor2
import h5py
import hdf5plugin
import lz4.block
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dctstream.config import SourceConfig
from dctstream.errors import InputError
from dctstream.sources.stream import (
    REORDER_FRAMES, Image, MalformedMessage, SeriesEnd, SeriesStart, Stream1Source, Stream2Source, decode_bslz4_h5,
    decode_lz4_block, decode_lz4_h5, decode_raw, decode_stream1, decode_stream2,
)
from simulators.dct_scan import simulate_scan
from simulators.replay_stream import StreamReplayer, encode_bslz4_h5, encode_lz4_h5

SOURCES = {"stream1": Stream1Source, "stream2": Stream2Source}
LOGGER = "dctstream.sources.stream"
FRAMES = 30


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The 30-frame 32 x 32 scan, its frames and its angles."""
    truth = simulate_scan(tmp_path_factory.mktemp("stream") / "s.h5", frames=FRAMES, size=32, spots=5, seed=0)
    with h5py.File(truth.path, "r") as f:
        return truth, f["/1.1/measurement/marana"][()], f["/1.1/measurement/diffrz"][()]


@contextmanager
def live(url, protocol, *, context=None, cfg=None, **replayer_kw):
    """A replayer of ``url`` running in its thread and a source connected to it."""
    replayer_kw.setdefault("fps", 0)
    replayer = StreamReplayer(url, protocol=protocol, context=context, **replayer_kw)
    try:
        source = SOURCES[protocol](SourceConfig(url=replayer.endpoint, **(cfg or {})), context=context)
        replayer.start()
        try:
            yield replayer, source
        finally:
            source.close()
    finally:
        replayer.close()


def play(url, protocol, **kw):
    """Every frame the source yields, and the source."""
    with live(url, protocol, **kw) as (_, source):
        return list(source), source


def check_frames(frames, expected, skipped=()):
    assert [f.index for f in frames] == list(range(len(expected)))
    for f in frames:
        if f.index in skipped:
            assert f.data is None
        else:
            assert f.data.dtype == expected.dtype and f.data.flags.writeable
            np.testing.assert_array_equal(f.data, expected[f.index])


# -- every protocol and encoding, live ------------------------------------------------------------


@pytest.mark.parametrize("protocol, encoding, header_detail, angles", [
    ("stream1", "<", "none", False),
    ("stream1", "lz4<", "basic", True),
    ("stream1", "bs16-lz4<", "all", True),
    ("stream2", "raw", "basic", False),
    ("stream2", "lz4", "none", True),
    ("stream2", "bslz4", "all", True),
])
def test_every_frame_arrives_once_in_order(scan, protocol, encoding, header_detail, angles):
    truth, frames, psi = scan
    replayer_kw = {"encoding": encoding, "header_detail": header_detail}
    cfg = {}
    if angles and protocol == "stream2":
        replayer_kw["angles_url"] = truth.angles_url  # the goniometer in the start message
    elif angles:
        cfg["angles"] = truth.angles_url
    got, source = play(truth.frames_url, protocol, cfg=cfg, **replayer_kw)
    check_frames(got, frames)
    if angles:
        np.testing.assert_allclose([f.psi_deg for f in got], psi, rtol=0, atol=1e-9)
    else:
        assert all(f.psi_deg is None for f in got)
    assert source.end_reason == "series_end"
    assert source.counters == {"missing": 0, "duplicate": 0, "out_of_order": 0, "malformed": 0, "series": 1}
    assert source.frame_shape == (32, 32) and source.dtype == np.uint16
    # Stream v1 says the frame count in the detector configuration, which header_detail "none" leaves out
    assert source.n_frames == (None if header_detail == "none" and protocol == "stream1" else FRAMES)


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_wide_frames_of_32_bit_counts(tmp_path, protocol):
    """Rows and columns are not swapped, and 32-bit frames use bs32-lz4< / bslz4 with 4-byte elements."""
    truth = simulate_scan(tmp_path / "wide.h5", frames=8, size=(32, 48), spots=1, seed=1, dtype="uint32")
    with h5py.File(truth.path, "r") as f:
        frames = f["/1.1/measurement/marana"][()]
    got, source = play(truth.frames_url, protocol)
    check_frames(got, frames)
    assert source.frame_shape == (32, 48) and source.dtype == np.uint32


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
@pytest.mark.parametrize("header_detail", ["all", "basic"])
def test_the_headers_pixel_mask_and_bit_depth(tmp_path, protocol, header_detail):
    """An Eiger's gaps (all bits set in every frame) come with a pixel mask in a "header_detail: all" header
    (Stream v1) or start message (Stream2), and the bit depth says which value has no data."""
    truth = simulate_scan(tmp_path / "eiger.h5", frames=8, size=(32, 48), spots=1, seed=1, dtype="uint32")
    with h5py.File(truth.path, "a") as f:
        f["/1.1/measurement/marana"][:, 15:17, :] = 0xFFFFFFFF
        frames = f["/1.1/measurement/marana"][()]
    got, source = play(truth.frames_url, protocol, header_detail=header_detail)
    check_frames(got, frames)
    assert source.invalid_value == 0xFFFFFFFF  # bit_depth_image 32 (Stream v1: in the detector configuration)
    if header_detail == "all":
        expected = np.zeros((32, 48), np.uint32)
        expected[15:17] = 1
        np.testing.assert_array_equal(source.pixel_mask, expected)
    else:
        assert source.pixel_mask is None


def test_a_malformed_pixel_mask_is_a_malformed_header():
    head = json.dumps({"htype": "dheader-1.0", "series": 1, "header_detail": "all"}).encode()
    config = json.dumps({"nimages": 2, "bit_depth_image": 16}).encode()
    mask = json.dumps({"htype": "dpixelmask-1.0", "shape": [4], "type": "uint32"}).encode()
    with pytest.raises(MalformedMessage, match=r"dpixelmask: shape \[x, y\] and an integer type expected"):
        decode_stream1([head, config, mask, b"\0" * 16])
    start = decode_stream1([head, config, json.dumps({"htype": "dpixelmask-1.0", "shape": [4, 2],
                                                      "type": "uint32"}).encode(), np.arange(8, dtype="<u4").tobytes()])
    assert start.bit_depth == 16
    np.testing.assert_array_equal(start.pixel_mask, np.arange(8).reshape(2, 4))


def test_stream2_angles_from_the_config_without_a_goniometer(scan):
    truth, frames, psi = scan
    got, _ = play(truth.frames_url, "stream2", cfg={"angles": truth.angles_url})
    assert [f.psi_deg for f in got] == list(psi)


def test_inproc_with_a_shared_context(scan):
    truth, frames, _ = scan
    context = zmq.Context()
    try:
        got, source = play(truth.frames_url, "stream2", bind="inproc://replay", context=context, fps=200)
    finally:
        context.term()
    check_frames(got, frames)
    assert source.end_reason == "series_end"


def test_expected_frames_ends_the_scan(scan):
    truth, frames, _ = scan
    got, source = play(truth.frames_url, "stream1", cfg={"expected_frames": 12})
    check_frames(got, frames[:12])
    assert source.end_reason == "expected_frames" and source.n_frames == 12


# -- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_a_dropped_frame_is_an_error_by_default(scan, protocol):
    truth, frames, _ = scan
    got = []
    with live(truth.frames_url, protocol, faults={"drop": [5]}) as (_, source):
        with pytest.raises(InputError, match=r"frame 5 of series 1.* is missing") as err:
            got.extend(source)
    assert str(err.value).startswith(f"{source.url}: ")
    check_frames(got, frames[:5])
    assert source.counters["missing"] == 1


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_dropped_frames_become_background_frames(scan, protocol, caplog):
    truth, frames, psi = scan
    extra = {"angles_url": truth.angles_url} if protocol == "stream2" else {}
    cfg = {"missing": "repeat-background"} | ({} if extra else {"angles": truth.angles_url})
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, protocol, cfg=cfg, faults={"drop": [5, 9, 10]}, **extra)
    check_frames(got, frames, skipped={5, 9, 10})
    np.testing.assert_allclose([f.psi_deg for f in got], psi, rtol=0, atol=1e-9)  # missing frames keep their psi
    assert source.counters["missing"] == 3
    assert source.end_reason == "series_end"
    assert "frame 5 missing" in caplog.text and "frames 9..10 missing" in caplog.text


def test_a_dropped_last_frame_is_only_warned_about(scan, caplog):
    """The series ended early: stopped, or its last frames were lost; nothing to replace it with in between."""
    truth, frames, _ = scan
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, "stream2", faults={"drop": [FRAMES - 1]})
    check_frames(got, frames[:-1])
    assert source.end_reason == "series_end"
    assert f"ended after {FRAMES - 1} of its {FRAMES} frames" in caplog.text


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_a_duplicated_frame_is_dropped(scan, protocol, caplog):
    truth, frames, _ = scan
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, protocol, faults={"duplicate": [3, 17]})
    check_frames(got, frames)
    assert source.counters["duplicate"] == 2
    assert "frame 3 arrived again, dropped" in caplog.text


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_a_swapped_pair_is_put_back_in_order(scan, protocol):
    truth, frames, _ = scan
    got, source = play(truth.frames_url, protocol, faults={"swap": [(7, 8), (20, 20 + REORDER_FRAMES)]})
    check_frames(got, frames)
    assert source.counters == {"missing": 0, "duplicate": 0, "out_of_order": 0, "malformed": 0, "series": 1}


def test_a_frame_later_than_the_reorder_buffer_is_replaced_then_dropped(scan):
    truth, frames, _ = scan
    got, source = play(truth.frames_url, "stream1", cfg={"missing": "repeat-background"},
                       faults={"swap": [(3, 4 + REORDER_FRAMES)]})
    check_frames(got, frames, skipped={3})
    assert source.counters["missing"] == 1 and source.counters["out_of_order"] == 1


@pytest.mark.parametrize("protocol, encoding, what", [
    ("stream1", "<", "data part has 1024 bytes, dimage_d says size 2048"),
    ("stream1", "bs16-lz4<", "data part has"),
    ("stream2", "raw", "uncompressed data has 1024 bytes, expected 2048"),
    ("stream2", "lz4", "lz4 data truncated"),
    ("stream2", "bslz4", "bslz4 data truncated"),
])
def test_a_malformed_message_is_skipped(scan, protocol, encoding, what, caplog):
    truth, frames, _ = scan
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, protocol, encoding=encoding, faults={"malformed": [4]})
    check_frames(got, frames)  # the right message followed the broken one
    assert source.counters["malformed"] == 1
    assert "message (frame 4) skipped" in caplog.text and what in caplog.text


def test_a_malformed_message_alone_leaves_its_frame_missing(scan):
    truth, frames, _ = scan
    got, source = play(truth.frames_url, "stream2", cfg={"missing": "repeat-background"},
                       faults={"malformed": [4], "drop": [4]})
    check_frames(got, frames, skipped={4})
    assert source.counters["malformed"] == 1 and source.counters["missing"] == 1


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_a_new_series_ends_the_scan(scan, protocol, caplog):
    truth, frames, _ = scan
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, protocol, faults={"new_series_after": 10})
    check_frames(got, frames[:11])
    assert source.end_reason == "series_end"
    assert source.counters["series"] == 2
    assert "series 2" in caplog.text and "started before series 1" in caplog.text


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_silence_ends_the_scan(scan, protocol, caplog):
    truth, frames, _ = scan
    with caplog.at_level(logging.WARNING, LOGGER):
        got, source = play(truth.frames_url, protocol, cfg={"idle_timeout_s": 0.3}, faults={"stop_after": 12})
    check_frames(got, frames[:13])
    assert source.end_reason == "idle_timeout"
    assert "no message in 0.3 s: the scan ends after 13 frames of 30" in caplog.text


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_nothing_arrives(scan, protocol):
    truth, _, _ = scan
    replayer = StreamReplayer(truth.frames_url, protocol=protocol)  # bound, never started
    try:
        with SOURCES[protocol](SourceConfig(url=replayer.endpoint, idle_timeout_s=0.2)) as source:
            with pytest.raises(InputError, match=r"nothing arrived in 0.2 s, expected a DECTRIS") as err:
                list(source)
        assert str(err.value).startswith(f"{replayer.endpoint}: ")
    finally:
        replayer.close()


@pytest.fixture
def push():
    """A bare PUSH socket on a free port, to send handmade messages."""
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind("tcp://127.0.0.1:0")
    yield socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)
    socket.close()


def test_only_garbage_arrives(push):
    socket, url = push
    with Stream2Source(SourceConfig(url=url, idle_timeout_s=0.3)) as source:
        for blob in (b"", b"\xff\x00", cbor2.dumps({"type": "calibration"})):
            socket.send(blob)
        with pytest.raises(InputError, match=r"3 messages arrived in 0.3 s but no frame \(3 malformed\)"):
            list(source)
    assert source.counters["malformed"] == 3


def v1(*parts):
    return [json.dumps(p).encode() if isinstance(p, dict) else p for p in parts]


def v1_image(series, k, data):
    ny, nx = data.shape
    return v1({"htype": "dimage-1.0", "series": series, "frame": k},
              {"htype": "dimage_d-1.0", "shape": [nx, ny], "type": "uint16", "encoding": "<", "size": data.nbytes},
              data.tobytes())


def test_series_rules(push, caplog):
    """An empty series is skipped, a late end of another series ignored, a repeated header counted."""
    socket, url = push
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    messages = [v1({"htype": "dseries_end-1.0", "series": 6}),  # the end of an earlier series
                v1({"htype": "dheader-1.0", "series": 7, "header_detail": "none"}),
                v1({"htype": "dseries_end-1.0", "series": 7}),  # armed and disarmed without images
                v1({"htype": "dheader-1.0", "series": 8, "header_detail": "basic"}, {"nimages": 2, "ntrigger": 2}),
                *(v1_image(8, k, frame + k) for k in range(2)),
                v1({"htype": "dheader-1.0", "series": 8, "header_detail": "none"}),
                *(v1_image(8, k, frame + k) for k in range(2, 4)),
                v1({"htype": "dseries_end-1.0", "series": 8})]
    with caplog.at_level(logging.WARNING, LOGGER), Stream1Source(SourceConfig(url=url, idle_timeout_s=5)) as source:
        for message in messages:
            socket.send_multipart(message)
        got = list(source)
    assert [f.index for f in got] == [0, 1, 2, 3] and all((f.data == frame + f.index).all() for f in got)
    assert source.end_reason == "series_end" and source.n_frames == 4
    assert source.counters == {"missing": 0, "duplicate": 1, "out_of_order": 0, "malformed": 0, "series": 2}
    assert "end of series 6, which is not the series being received, ignored" in caplog.text
    assert "series 7 ended before any of its images arrived" in caplog.text


def test_a_series_without_its_header(push, caplog):
    socket, url = push
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    with caplog.at_level(logging.WARNING, LOGGER), Stream1Source(SourceConfig(url=url, idle_timeout_s=5)) as source:
        for message in [v1_image(9, k, frame) for k in range(3)] + [v1({"htype": "dseries_end-1.0", "series": 9})]:
            socket.send_multipart(message)
        assert [f.index for f in source] == [0, 1, 2]
    assert source.end_reason == "series_end" and source.n_frames is None
    assert "frame 0 of series 9 arrived without the series' header" in caplog.text


def test_frames_unlike_the_series_are_malformed(push, caplog):
    socket, url = push
    frame = np.zeros((3, 4), np.uint16)
    with caplog.at_level(logging.WARNING, LOGGER), Stream1Source(SourceConfig(url=url, idle_timeout_s=5)) as source:
        for message in [v1({"htype": "dheader-1.0", "series": 1}), v1_image(1, 0, frame),
                        v1_image(1, 1, np.zeros((4, 3), np.uint16)), v1_image(1, 1, frame),
                        v1({"htype": "dseries_end-1.0", "series": 1})]:
            socket.send_multipart(message)
        assert [f.index for f in source] == [0, 1]
    assert source.counters["malformed"] == 1
    assert "(frame 1) skipped: frame shape (4, 3) (y, x) unlike the series' (3, 4)" in caplog.text


def test_bad_urls():
    with pytest.raises(InputError, match="source.url: scan.h5::/data: cannot connect"):
        Stream1Source(SourceConfig(url="scan.h5::/data"))
    with pytest.raises(InputError, match="source.url: no stream address given"):
        Stream2Source(SourceConfig())


# -- encodings ---------------------------------------------------------------------------------------

# 37 x 53 values: a partial last bitshuffle block and values left over after the last multiple of 8
ODD = np.random.default_rng(0).poisson(30, size=(37, 53))


@pytest.mark.parametrize("dtype", ["u1", "<u2", "<u4", ">u2", "<i4"])
def test_encodings_round_trip(dtype):
    data = ODD.astype(dtype)
    count = data.size
    np.testing.assert_array_equal(decode_raw(data.tobytes(), data.dtype, count), data.ravel())
    lz4_block = lz4.block.compress(data.tobytes(), store_size=False)
    np.testing.assert_array_equal(decode_lz4_block(lz4_block, data.dtype, count), data.ravel())
    np.testing.assert_array_equal(decode_bslz4_h5(encode_bslz4_h5(data), data.dtype, count), data.ravel())
    # small blocks: several of them, one stored uncompressed (incompressible) and a short last one
    noise = np.frombuffer(np.random.default_rng(1).bytes(2048), dtype=data.dtype)
    mixed = np.concatenate([data.ravel(), noise])
    blob = encode_lz4_h5(mixed.tobytes(), block_bytes=512)
    sizes = []
    pos = 12
    while pos < len(blob):
        sizes.append(struct.unpack_from(">I", blob, pos)[0])
        pos += 4 + sizes[-1]
    assert 512 in sizes and len(sizes) > 3
    np.testing.assert_array_equal(decode_lz4_h5(blob, mixed.dtype, mixed.size), mixed)


@pytest.mark.parametrize("dtype", ["u1", "u2", "u4"])
def test_compressed_framing_is_that_of_the_hdf5_filters(tmp_path, dtype):
    """DECTRIS specifies the HDF5 bitshuffle and LZ4 filters' framing: decode chunks those filters wrote."""
    data = ODD.astype(dtype)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("bslz4", data=data[None], chunks=(1, *data.shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        f.create_dataset("lz4", data=data[None], chunks=(1, *data.shape), **hdf5plugin.LZ4(nbytes=1024))
        bslz4 = f["bslz4"].id.read_direct_chunk((0, 0, 0))[1]
        lz4_h5 = f["lz4"].id.read_direct_chunk((0, 0, 0))[1]
    assert encode_bslz4_h5(data) == bslz4
    np.testing.assert_array_equal(decode_bslz4_h5(bslz4, data.dtype, data.size), data.ravel())
    np.testing.assert_array_equal(decode_lz4_h5(lz4_h5, data.dtype, data.size), data.ravel())


@pytest.mark.parametrize("decode, blob, count, what", [
    (decode_raw, b"\x00" * 7, 4, "uncompressed data has 7 bytes, expected 8"),
    (decode_lz4_block, b"\x00" * 7, 4, "lz4 data cannot be decompressed"),
    (decode_lz4_block, b"\x10" * 2, 256, "2 bytes cannot hold 512 bytes"),
    (decode_bslz4_h5, b"\x00" * 11, 4, "shorter than its 12-byte header"),
    (decode_bslz4_h5, struct.pack(">QI", 9, 8192), 4, "bslz4 header says 9 bytes, expected 8"),
    (decode_bslz4_h5, struct.pack(">QI", 8, 6), 4, "not a positive multiple of 8 elements"),
    (decode_bslz4_h5, struct.pack(">QI", 32, 8192) + struct.pack(">I", 9) + b"\x00", 16, "bslz4 data truncated"),
    (decode_bslz4_h5, struct.pack(">QI", 8, 8192) + b"\x00" * 9, 4, "bslz4 data has 21 bytes, expected 20"),
    (decode_lz4_h5, struct.pack(">QI", 8, 0), 4, "blocks of 0 bytes"),
    (decode_lz4_h5, struct.pack(">QI", 8, 8) + struct.pack(">I", 8) + b"\x00" * 9, 4, "lz4 data has 25 bytes"),
])
def test_encoding_errors(decode, blob, count, what):
    with pytest.raises(MalformedMessage, match=what):
        decode(blob, np.dtype("<u2"), count)


# -- message decoders against anything ------------------------------------------------------------

_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4),
                           max_leaves=12)
v1_heads = st.fixed_dictionaries(
    {"htype": st.sampled_from(["dheader-1.0", "dimage-1.0", "dimage_d-1.0", "dseries_end-1.0", "dconfig-1.0", "x"])},
    optional={"series": st.integers(-1, 3) | st.text(max_size=3), "frame": st.integers(-2, 40) | json_values,
              "header_detail": st.sampled_from(["all", "basic", "none"]) | json_values})
v1_descriptions = st.fixed_dictionaries({}, optional={
    "shape": st.lists(st.integers(-1, 9), max_size=3) | json_values,
    "type": st.sampled_from(["uint8", "uint16", "uint32", "float32", "int32"]) | json_values,
    "encoding": st.sampled_from(["<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<", ">"]) | json_values,
    "size": st.integers(0, 300) | json_values, "nimages": json_values, "ntrigger": json_values})
json_part = (v1_heads | v1_descriptions | json_values).map(lambda v: json.dumps(v).encode())


@_FAST
@given(st.lists(json_part | st.binary(max_size=300), max_size=5))
def test_stream1_decoder_never_crashes(parts):
    try:
        event = decode_stream1(parts)
    except MalformedMessage:
        return
    assert isinstance(event, (SeriesStart, Image, SeriesEnd))


def _tag(tag, value):
    return cbor2.CBORTag(tag, value)


cbor_scalars = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=8) | \
    st.binary(max_size=200)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                   | st.builds(_tag, st.sampled_from([40, 64, 65, 69, 70, 76, 85, 1040, 56500, 0, 1, 2, 30]), inner)),
    max_leaves=16)
typed_arrays = st.builds(
    _tag, st.sampled_from([64, 65, 69, 70, 77, 85]),
    st.binary(max_size=200) | st.builds(lambda alg, size, blob: _tag(56500, [alg, size, blob]),
                                        st.sampled_from(["bslz4", "lz4", "zstd"]) | cbor_values,
                                        st.integers(0, 4) | cbor_values, st.binary(max_size=200)))
images = st.fixed_dictionaries({
    "type": st.just("image"), "series_id": st.integers(0, 3) | cbor_values,
    "image_id": st.integers(-1, 9) | cbor_values,
    "data": st.dictionaries(st.sampled_from(["threshold_1", "t2"]),
                            st.builds(lambda dims, typed: _tag(40, [dims, typed]),
                                      st.lists(st.integers(0, 12), min_size=2, max_size=2) | cbor_values,
                                      typed_arrays | cbor_values) | cbor_values, max_size=2)})
starts = st.fixed_dictionaries({"type": st.sampled_from(["start", "end"]), "series_id": st.integers(0, 3)}, optional={
    "series_unique_id": st.text(max_size=4) | cbor_values, "number_of_images": cbor_values,
    "image_size_x": cbor_values, "channels": cbor_values,
    "goniometer": st.dictionaries(st.sampled_from(["omega", "phi"]), st.dictionaries(
        st.sampled_from(["start", "increment"]), cbor_values | st.floats(), max_size=2) | cbor_values, max_size=2)})
stream2_messages = (images | starts | cbor_values).map(lambda v: b"\xd9\xd9\xf7" + cbor2.dumps(v))


@_FAST
@given(stream2_messages | st.binary(max_size=300), st.sampled_from([None, "threshold_1"]))
def test_stream2_decoder_never_crashes(message, channel):
    try:
        event = decode_stream2(message, channel)
    except MalformedMessage:
        return
    assert isinstance(event, (SeriesStart, Image, SeriesEnd))


valid_bslz4 = encode_bslz4_h5(ODD.astype("<u2"))


@_FAST
@given(st.sampled_from([decode_raw, decode_lz4_block, decode_lz4_h5, decode_bslz4_h5]),
       st.binary(max_size=400) | st.builds(lambda cut, flips: _damage(valid_bslz4, cut, flips),
                                           st.integers(0, len(valid_bslz4)),
                                           st.lists(st.tuples(st.integers(0, len(valid_bslz4) - 1),
                                                              st.integers(1, 255)), max_size=4)),
       st.sampled_from(["u1", "<u2", "<u4", ">u2"]), st.integers(1, ODD.size))
def test_encoding_decoders_never_crash(decode, blob, dtype, count):
    """Truncated and corrupted compressed data, the bitshuffle library's weak spot, included."""
    try:
        values = decode(blob, np.dtype(dtype), count)
    except MalformedMessage:
        return
    assert values.shape == (count,)


def _damage(blob: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    damaged = bytearray(blob)
    for position, mask in flips:
        damaged[position] ^= mask
    return bytes(damaged[:cut])
