"""Frames pushed live by a DECTRIS detector over ZeroMQ: Stream v1 (multipart JSON) and Stream2 (CBOR).

A source connects a PULL socket to the detector's PUSH socket (``source.url``,
``tcp://host:port``; 9999 for Stream v1, 31001 for Stream2) and yields the
frames of **one series** (one arm ... disarm of the detector) as ``Frame``\\ s.

Messages
--------
Stream v1 (SIMPLON "stream" interface, ``format: legacy``), one multipart message each:

* header: ``{"htype": "dheader-1.0", "series": id, "header_detail": "all"|"basic"|"none"}``,
  then, unless the detail is "none", the detector configuration as a JSON
  object (``nimages`` x ``ntrigger`` gives the number of frames, ``bit_depth_image``
  the invalid value: all bits set), then with "all" the flatfield, pixel mask and
  count-rate table (JSON + data each; the pixel mask, ``dpixelmask-1.0``, is used);
* image: ``{"htype": "dimage-1.0", "series", "frame", "hash"}``,
  ``{"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding", "size"}``,
  the data (``size`` bytes), ``{"htype": "dconfig-1.0", ...}`` (not used);
  encodings ``"<"`` (raw little-endian), ``"lz4<"`` (one LZ4 block, no header)
  and ``"bs8-lz4<"`` / ``"bs16-lz4<"`` / ``"bs32-lz4<"`` (bitshuffle + LZ4 with
  the 12-byte header of the HDF5 bitshuffle filter);
* end: ``{"htype": "dseries_end-1.0", "series": id}``.

Stream2 (``format: cbor``), one CBOR map per message (DECTRIS puts the
self-describe tag 55799 first; it is accepted, not required), told apart by ``type``:

* ``start``: ``series_id``, ``series_unique_id``, ``number_of_images``,
  ``image_size_x`` / ``image_size_y``, ``channels`` (the first one is used),
  ``bit_depth_image``, ``pixel_mask: {channel: tag 40 array}`` (the first one),
  ``goniometer: {AXIS: {start, increment}}`` (psi of frame k = start + k x
  increment, of ``omega`` or else the first axis that moves);
* ``image``: ``series_id``, ``image_id``, ``data: {channel: tag 40 [[rows,
  columns], typed array]}``; the typed array (RFC 8746, integer tags 64-79)
  holds a byte string or a DECTRIS tag 56500 ``["bslz4"|"lz4", elem_size,
  bytes]`` (both with the HDF5 filters' 12-byte framing);
* ``end``: ``series_id``.

Frame numbers (``frame``, ``image_id``) count from 0 and become ``Frame.index``.

Robustness
----------
Frames are yielded in order.  A frame that arrives ahead of its turn is held
(at most ``REORDER_FRAMES`` of them) so that a slightly shuffled stream still
yields every frame; once more are held, or at the end, the frames before the
first held one are declared missing: counted (``counters["missing"]``),
warned, and either an ``InputError`` naming the first of them
(``source.missing: error``) or one ``Frame(k, psi, None)`` each
(``repeat-background``; the pipeline puts a background frame in its place).
A frame number already delivered is a duplicate; one that was declared
missing and arrives after all is late (``out_of_order``); both are counted,
warned and dropped.  A message that cannot be decoded (not JSON/CBOR, unknown
type, missing fields, wrong data size, undecodable compression, a frame shape
or type unlike the series') is counted as ``malformed``, warned and skipped.
None of these stop the scan.

The scan ends (``end_reason``) at the series' end message (``"series_end"``);
when a message of **another series** arrives (a new header/start, or an
image with another series id: the detector was re-armed) the current scan
ends the same way, and that message is not kept: the next series needs a new
source, which then starts without its header (frames still count from 0).
A series that ends or is replaced before any of its images arrived (armed and
disarmed) is skipped.  It also ends once ``source.expected_frames`` frames
were yielded (``"expected_frames"``), or after ``source.idle_timeout_s``
without any message (``"idle_timeout"``; an ``InputError`` if no frame arrived
at all).  Fewer frames than the header announced is only warned about: a
stopped acquisition and lost last frames look the same.

``counters["series"]`` counts the series seen.  ``n_frames`` is the
header's frame count, or ``source.expected_frames`` when smaller or when the
header says nothing.

Resuming
--------
A stream cannot be read again, so a run keeps the frames it receives in a
spool (``dctstream.spool``) with the series' facts (``series_facts()``: id,
frame count, goniometer, channel, shape, type).  To resume, the spooled frames
are yielded first, then ``continue_series(facts, next_frame)`` makes the source
carry on with the same series from ``next_frame``: without its header, psi from
the spooled goniometer.  A detector that sends the series again from its start
(header and frames before ``next_frame``) is not an error: the header and those
frames are counted as duplicates and dropped with one warning.  Frames sent
while dctstream was down are missing, as any other lost frame.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import zmq

from ..errors import InputError
from ..types import Frame
from .base import FrameSource
from .hdf5 import check_angles, read_angles

__all__ = [
    "REORDER_FRAMES", "MalformedMessage", "SeriesStart", "Image", "SeriesEnd", "Stream1Source", "Stream2Source",
    "decode_raw", "decode_lz4_block", "decode_lz4_h5", "decode_bslz4_h5", "decode_stream1", "decode_stream2",
]

log = logging.getLogger(__name__)

# Frames held back while waiting for an earlier one; at 50 fps, 8 frames delay the scan by 0.16 s.
REORDER_FRAMES = 8
# A frame number this far past the next expected frame is not believed (a corrupt or foreign message): without
# it, a number of 1,000,000 in a short series would have the pipeline fill in a million missing frames.
MAX_FRAME_JUMP = 10_000
# The longest a wait for the next message goes without looking whether the run asked the source to stop, s.
_STOP_LOOK_S = 0.2

# Detector pixels are integers; anything else in an image message is a malformed message.
_INTEGER_TYPES = {"uint8", "uint16", "uint32", "int8", "int16", "int32"}

# RFC 8746 typed arrays of integers (tag 76, little-endian int8, is reserved).
_TYPED_ARRAY_DTYPES = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
}
_MULTI_DIM_ARRAY_TAG = 40  # row major
_COMPRESSED_TAG = 56500  # DECTRIS compressed byte string

# LZ4 cannot expand a byte into more than 255, so a larger claim is a corrupt header (and
# checking it first avoids allocating the claimed size).
_LZ4_MAX_RATIO = 255
_H5_HEADER = struct.Struct(">QI")  # HDF5 LZ4/bitshuffle filter framing: total bytes, block bytes
_BLOCK_SIZE = struct.Struct(">I")


class MalformedMessage(ValueError):
    """A message that cannot be decoded; the sources count it and skip it.  ``frame``: its frame number, if known."""

    def __init__(self, what: str, frame: int | None = None):
        super().__init__(what)
        self.frame = frame


@dataclass(frozen=True)
class SeriesStart:
    """A series header: what it says about the series, None where it says nothing."""

    series: object  # the detector's series id (Stream2: (series_id, series_unique_id))
    n_frames: int | None = None
    frame_shape: tuple[int, int] | None = None
    rotation: tuple[float, float] | None = None  # (start, increment) in degrees
    channel: str | None = None  # Stream2: the channel whose data are read
    bit_depth: int | None = None  # bits an image pixel: all of them set = a pixel without data
    pixel_mask: np.ndarray | None = field(default=None, compare=False)  # the detector's own: non-zero = bad


@dataclass(frozen=True, eq=False)
class Image:
    series: object
    number: int
    data: np.ndarray  # (y, x), native byte order


@dataclass(frozen=True)
class SeriesEnd:
    series: object


# -- data encodings: each returns the ``count`` values of ``dtype`` or raises MalformedMessage ---------


def decode_raw(blob: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """Uncompressed values."""
    _check_size("uncompressed data", len(blob), count * dtype.itemsize)
    return np.frombuffer(blob, dtype=dtype, count=count)


def decode_lz4_block(blob: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """One LZ4 block without a header (Stream v1 ``lz4<``)."""
    return np.frombuffer(_lz4(blob, count * dtype.itemsize, "lz4 data"), dtype=dtype)


def decode_lz4_h5(blob: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """LZ4 blocks in the framing of the HDF5 LZ4 filter (Stream2 ``lz4``).

    12-byte header (total bytes, block bytes; big-endian), then per block its
    compressed size (big-endian uint32) and the compressed bytes; a block whose
    size equals its uncompressed size is stored as is.
    """
    nbytes, block = _h5_header(blob, "lz4", count * dtype.itemsize)
    view = memoryview(blob)
    out = bytearray()
    pos = _H5_HEADER.size
    while len(out) < nbytes:
        this = min(block, nbytes - len(out))
        size, pos = _block(view, pos, "lz4")
        chunk = view[pos - size:pos]
        out += chunk if size == this else _lz4(chunk, this, f"lz4 block at byte {pos - size}")
    _check_size("lz4 data", len(blob), pos)
    return np.frombuffer(out, dtype=dtype)


def decode_bslz4_h5(blob: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """Bitshuffle + LZ4 in the framing of the HDF5 bitshuffle filter (Stream v1 ``bsNN-lz4<``, Stream2 ``bslz4``).

    The block structure is walked here first: the bitshuffle library trusts
    the block sizes it reads and would read past the end of a truncated buffer.
    """
    itemsize = dtype.itemsize
    _, block_bytes = _h5_header(blob, "bslz4", count * itemsize)
    block = block_bytes // itemsize
    if block_bytes % itemsize or block == 0 or block % 8:
        raise MalformedMessage(f"bslz4 block size {block_bytes} bytes is not a positive multiple of 8 "
                               f"elements of {itemsize} bytes")
    # bitshuffle's blocks: full blocks, one last block rounded down to 8 elements, the rest stored raw
    last = count % block - count % block % 8
    view = memoryview(blob)
    pos = _H5_HEADER.size
    for _ in range(count // block + (last > 0)):
        _, pos = _block(view, pos, "bslz4")
    _check_size("bslz4 data", len(blob), pos + count % 8 * itemsize)
    payload = np.frombuffer(blob, dtype=np.uint8, offset=_H5_HEADER.size)
    try:
        return bitshuffle.decompress_lz4(payload, (count,), dtype, block)
    except (RuntimeError, ValueError) as exc:
        raise MalformedMessage(f"bslz4 data cannot be decompressed ({exc})") from None


def _check_size(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise MalformedMessage(f"{what} has {got} bytes, expected {expected}")


def _lz4(chunk, nbytes: int, what: str) -> bytes:
    if nbytes > _LZ4_MAX_RATIO * len(chunk):
        raise MalformedMessage(f"{what}: {len(chunk)} bytes cannot hold {nbytes} bytes of LZ4 data")
    try:
        out = lz4.block.decompress(chunk, uncompressed_size=nbytes)
    except lz4.block.LZ4BlockError:
        raise MalformedMessage(f"{what} cannot be decompressed (corrupt or truncated)") from None
    _check_size(f"decompressed {what}", len(out), nbytes)
    return out


def _h5_header(blob: bytes, what: str, nbytes: int) -> tuple[int, int]:
    if len(blob) < _H5_HEADER.size:
        raise MalformedMessage(f"{what} data has {len(blob)} bytes, shorter than its {_H5_HEADER.size}-byte header")
    total, block = _H5_HEADER.unpack_from(blob)
    if total != nbytes:
        raise MalformedMessage(f"{what} header says {total} bytes, expected {nbytes}")
    if block == 0:
        raise MalformedMessage(f"{what} header says blocks of 0 bytes")
    return total, block


def _block(view: memoryview, pos: int, what: str) -> tuple[int, int]:
    """The compressed size of the block at ``pos`` and the position after it."""
    if pos + _BLOCK_SIZE.size > len(view):
        raise MalformedMessage(f"{what} data truncated at byte {len(view)} (a block header at {pos})")
    (size,) = _BLOCK_SIZE.unpack_from(view, pos)
    end = pos + _BLOCK_SIZE.size + size
    if end > len(view):
        raise MalformedMessage(f"{what} data truncated at byte {len(view)} (a block of {size} bytes at {pos})")
    return size, end


# -- Stream v1 -----------------------------------------------------------------------------------

_BITSHUFFLE_V1 = re.compile(r"bs(8|16|32)-lz4<")


def decode_stream1(parts: Sequence[bytes]) -> SeriesStart | Image | SeriesEnd:
    """One Stream v1 multipart message (a list of byte strings) as an event; MalformedMessage otherwise."""
    if not parts:
        raise MalformedMessage("empty message")
    head = _json(parts[0], "first part")
    htype = head.get("htype")
    if not isinstance(htype, str):
        raise MalformedMessage(f"no htype in the first part, got keys {sorted(head)[:8]}")
    series = head.get("series")
    if not isinstance(series, (int, str)) or isinstance(series, bool):
        raise MalformedMessage(f"{htype}: series must be an integer or a string, got {series!r:.40}")
    if htype.startswith("dheader-"):
        n_frames = None
        if head.get("header_detail", "none") != "none":
            if len(parts) < 2:
                raise MalformedMessage(f"{htype}: header_detail {head['header_detail']!r:.20} but no "
                                       "detector configuration part")
            config = _json(parts[1], "detector configuration")
            nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
            if _count(nimages) and _count(ntrigger):
                n_frames = nimages * ntrigger
            bits = config.get("bit_depth_image")
            return SeriesStart(series, n_frames=n_frames, bit_depth=bits if bits in (8, 16, 32) else None,
                               pixel_mask=_pixel_mask_v1(parts[2:]))
        return SeriesStart(series, n_frames=n_frames)
    if htype.startswith("dimage-"):
        return Image(series, *_image_v1(head, parts))
    if htype.startswith("dseries_end-"):
        return SeriesEnd(series)
    raise MalformedMessage(f"unknown message type (htype {htype!r:.40})")


def _pixel_mask_v1(parts: Sequence[bytes]) -> np.ndarray | None:
    """The ``dpixelmask-1.0`` array among a "header_detail: all" header's (JSON, data) pairs, or None."""
    for desc_part, blob in zip(parts[::2], parts[1::2]):
        try:
            desc = json.loads(desc_part)
        except (ValueError, RecursionError):
            continue
        if not isinstance(desc, dict) or not str(desc.get("htype", "")).startswith("dpixelmask-"):
            continue
        shape, type_ = desc.get("shape"), desc.get("type")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_count(n) for n in shape)
                and type_ in _INTEGER_TYPES):
            raise MalformedMessage(f"dpixelmask: shape [x, y] and an integer type expected, got {shape!r:.40}, "
                                   f"{type_!r:.20}")
        nx, ny = shape
        return _frame(decode_raw(blob, np.dtype(type_).newbyteorder("<"), nx * ny), (ny, nx))
    return None


def _image_v1(head: dict, parts: Sequence[bytes]) -> tuple[int, np.ndarray]:
    number = head.get("frame")
    if not _count(number, minimum=0):
        raise MalformedMessage(f"dimage: frame must be an integer >= 0, got {number!r:.40}")
    if len(parts) < 3:
        raise MalformedMessage(f"image message has {len(parts)} parts, expected at least 3 "
                               "(dimage, dimage_d, data)", number)
    try:
        desc = _json(parts[1], "dimage_d part")
        shape, type_, encoding, size = (desc.get(key) for key in ("shape", "type", "encoding", "size"))
        if not (isinstance(shape, list) and len(shape) == 2 and all(_count(n) for n in shape)):
            raise MalformedMessage(f"dimage_d: shape must be [x, y] of integers >= 1, got {shape!r:.40}")
        if type_ not in _INTEGER_TYPES:
            raise MalformedMessage(f"dimage_d: type must be one of {', '.join(sorted(_INTEGER_TYPES))}, "
                                   f"got {type_!r:.40}")
        blob = parts[2]
        if size != len(blob):
            raise MalformedMessage(f"data part has {len(blob)} bytes, dimage_d says size {size!r:.40}")
        dtype = np.dtype(type_).newbyteorder("<")
        bitshuffled = _BITSHUFFLE_V1.fullmatch(encoding) if isinstance(encoding, str) else None
        if bitshuffled:
            if int(bitshuffled[1]) != 8 * dtype.itemsize:
                raise MalformedMessage(f"encoding {encoding} does not fit type {type_}")
            decode = decode_bslz4_h5
        elif encoding in ("<", "lz4<"):
            decode = decode_raw if encoding == "<" else decode_lz4_block
        else:
            raise MalformedMessage(f"unknown encoding {encoding!r:.40}")
        nx, ny = shape
        return number, _frame(decode(blob, dtype, nx * ny), (ny, nx))
    except MalformedMessage as exc:
        raise MalformedMessage(str(exc), number) from None


def _json(part: bytes, what: str) -> dict:
    try:
        value = json.loads(part)
    except (ValueError, RecursionError):  # not UTF-8 or not JSON
        raise MalformedMessage(f"{what} is not JSON: {bytes(part[:40])!r}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what} is not a JSON object: {bytes(part[:40])!r}")
    return value


# -- Stream2 -------------------------------------------------------------------------------------


def decode_stream2(message: bytes, channel: str | None = None) -> SeriesStart | Image | SeriesEnd:
    """One Stream2 message as an event; MalformedMessage otherwise.

    ``channel`` is the channel to read from an image (the start message's
    first); None: the first the image has.
    """
    try:
        msg = cbor2.loads(message)
    except Exception as exc:  # noqa: BLE001  (cbor2 raises many types on hostile input; all mean "not CBOR")
        raise MalformedMessage(f"not CBOR ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(msg, Mapping):
        raise MalformedMessage(f"not a CBOR map, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in ("start", "image", "end"):
        raise MalformedMessage(f"unknown message type {kind!r:.40}")
    series_id, unique_id = msg.get("series_id"), msg.get("series_unique_id")
    if not _count(series_id, minimum=0) or not isinstance(unique_id, (str, type(None))):
        raise MalformedMessage(f"{kind!r:.20} message: series_id must be an integer >= 0 and series_unique_id "
                               f"a string, got {series_id!r:.40} and {unique_id!r:.40}")
    series = (series_id, unique_id)
    if kind == "start":
        return _start_v2(msg, series)
    if kind == "image":
        number = msg.get("image_id")
        if not _count(number, minimum=0):
            raise MalformedMessage(f"image: image_id must be an integer >= 0, got {number!r:.40}")
        try:
            return Image(series, number, _image_v2(msg.get("data"), channel))
        except MalformedMessage as exc:
            raise MalformedMessage(str(exc), number) from None
    return SeriesEnd(series)


def _start_v2(msg: Mapping, series: tuple) -> SeriesStart:
    n_frames = msg.get("number_of_images")
    nx, ny = msg.get("image_size_x"), msg.get("image_size_y")
    channels = msg.get("channels")
    channel = channels[0] if isinstance(channels, (list, tuple)) and channels and isinstance(channels[0], str) else None
    bits, masks = msg.get("bit_depth_image"), msg.get("pixel_mask")
    mask = None
    if isinstance(masks, Mapping) and masks:
        try:
            mask = _image_v2(masks, channel if channel in masks else None)
        except MalformedMessage as exc:
            raise MalformedMessage(f"start: pixel_mask: {str(exc).removeprefix('image: ')}") from None
    return SeriesStart(series, n_frames=n_frames if _count(n_frames) else None,
                       frame_shape=(ny, nx) if _count(nx) and _count(ny) else None,
                       rotation=_rotation(msg.get("goniometer")), channel=channel,
                       bit_depth=bits if bits in (8, 16, 32) else None, pixel_mask=mask)


def _rotation(goniometer) -> tuple[float, float] | None:
    """(start, increment) of omega, else of the first axis that moves; None if none moves.

    An increment of 0 is what an unset goniometer says, not a scan at one angle.
    """
    if not isinstance(goniometer, Mapping):
        return None
    names = sorted(goniometer, key=lambda name: name != "omega")
    for axis in (goniometer[name] for name in names):
        if isinstance(axis, Mapping):
            start, step = axis.get("start"), axis.get("increment")
            if _number(start) and _number(step) and step != 0:
                return float(start), float(step)
    return None


def _image_v2(data, channel: str | None) -> np.ndarray:
    if not isinstance(data, Mapping) or not data:
        raise MalformedMessage(f"image: data must be a map of channels, got {type(data).__name__}")
    if channel is None:
        channel = next(iter(data))
    if channel not in data:
        raise MalformedMessage(f"image: no channel {channel!r:.40} in data (has {list(data)[:4]!r:.80})")
    array = data[channel]
    if not (isinstance(array, cbor2.CBORTag) and array.tag == _MULTI_DIM_ARRAY_TAG
            and isinstance(array.value, (list, tuple)) and len(array.value) == 2):
        raise MalformedMessage(f"image: channel {channel!r:.40} is not a row-major multi-dimensional array "
                               "(tag 40 [dimensions, typed array])")
    dims, typed = array.value
    if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and all(_count(n) for n in dims)):
        raise MalformedMessage(f"image: dimensions must be [rows, columns] of integers >= 1, got {dims!r:.40}")
    if not (isinstance(typed, cbor2.CBORTag) and typed.tag in _TYPED_ARRAY_DTYPES):
        what = f"tag {typed.tag}" if isinstance(typed, cbor2.CBORTag) else type(typed).__name__
        raise MalformedMessage(f"image: data must be an integer typed array (RFC 8746 tags 64-79), got {what}")
    dtype = np.dtype(_TYPED_ARRAY_DTYPES[typed.tag])
    count = dims[0] * dims[1]
    content = typed.value
    if isinstance(content, bytes):
        values = decode_raw(content, dtype, count)
    elif isinstance(content, cbor2.CBORTag) and content.tag == _COMPRESSED_TAG:
        values = _decompress_v2(content.value, dtype, count)
    else:
        raise MalformedMessage(f"image: typed array holds {type(content).__name__}, expected a byte string "
                               f"or a compressed one (tag {_COMPRESSED_TAG})")
    return _frame(values, tuple(dims))


def _decompress_v2(value, dtype: np.dtype, count: int) -> np.ndarray:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[2], bytes)):
        raise MalformedMessage(f"compressed data (tag {_COMPRESSED_TAG}) must be [algorithm, element size, bytes]")
    algorithm, elem_size, blob = value
    if algorithm == "bslz4":
        if elem_size != dtype.itemsize:
            raise MalformedMessage(f"bslz4 element size {elem_size!r:.20} does not fit the typed array's "
                                   f"{dtype.itemsize}-byte elements")
        return decode_bslz4_h5(blob, dtype, count)
    if algorithm == "lz4":
        return decode_lz4_h5(blob, dtype, count)
    raise MalformedMessage(f"unknown compression {algorithm!r:.40}")


# -- helpers for both ----------------------------------------------------------------------------


def _count(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _frame(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # astype copies: the frame owns writable memory in native byte order, like the HDF5 source's frames
    return values.reshape(shape).astype(values.dtype.newbyteorder("="))


# -- the sources ---------------------------------------------------------------------------------


class _StreamSource(FrameSource):
    """Receiving, series and frame-order logic of both protocols; subclasses receive and decode one message."""

    protocol = ""  # the protocol's name in messages
    rereadable = False  # frames are gone once received: a run keeps them in its spool to resume

    def __init__(self, cfg, *, context: zmq.Context | None = None):
        if not cfg.url:
            raise InputError("source.url: no stream address given, expected tcp://host:port")
        self.url = cfg.url
        self._idle_timeout_s = cfg.idle_timeout_s
        self._limit = cfg.expected_frames
        self._missing_policy = cfg.missing
        self._angles = self._load_angles(cfg.angles) if cfg.angles else None
        self.frame_shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.end_reason: str | None = None
        self.counters = dict.fromkeys(("missing", "duplicate", "out_of_order", "malformed", "series"), 0)
        self._messages = 0  # every message received, decodable or not
        self._delivered = 0  # frames yielded, missing ones included
        self._stopped = False
        self._angles_warned = False
        self._resumed_at = 0  # frames before it came from the spool of an interrupted run
        self._resent_warned = False
        self._series_seen: set = set()
        self._reset_series(None)
        self._socket = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.connect(self.url)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise InputError(f"source.url: {self.url}: cannot connect ({exc}), expected tcp://host:port") from None
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    @staticmethod
    def _load_angles(url: str) -> np.ndarray:
        psi, factor = read_angles(url)
        if psi.dtype.kind not in "uif" or psi.ndim != 1:
            raise InputError(f"source.angles: {url}: expected a 1-D array of angles in degrees (one per frame), "
                             f"got shape {psi.shape}, dtype {psi.dtype}")
        return check_angles(psi, url, factor)

    def _reset_series(self, start: SeriesStart | None, series=None) -> None:
        """Wait for (``series`` None) or begin a series, from its header ``start`` if there was one."""
        self._series = start.series if start else series
        self._header = start
        self._images = 0  # accepted image messages of this series
        self._next = 0  # the next frame to yield
        self._held: dict[int, np.ndarray] = {}  # frames that came before their turn
        self._replaced: set[int] = set()  # frames declared missing
        known = [n for n in (start.n_frames if start else None, self._limit) if n is not None]
        self.n_frames: int | None = min(known) if known else None
        # what the header says of the detector, for the pipeline's mask (Detector.check_first_frame)
        self.invalid_value = 2**start.bit_depth - 1 if start and start.bit_depth else None
        self.pixel_mask = start.pixel_mask if start else None
        if start and start.frame_shape:
            self.frame_shape = start.frame_shape

    def series_facts(self) -> dict:
        """What the series' header said and its frames showed (JSON), for the spool: a restarted
        run may never see the header again."""
        header = self._header
        return {"protocol": self.protocol, "series": self._series, "header": header is not None,
                "n_frames": header.n_frames if header else None,
                "rotation": header.rotation if header else None, "channel": header.channel if header else None,
                "frame_shape": self.frame_shape, "dtype": None if self.dtype is None else self.dtype.str}

    def continue_series(self, facts: dict, next_frame: int) -> None:
        """Carry on with the series of ``facts`` (``series_facts()`` of an interrupted run) from
        frame ``next_frame``: frames before it were yielded from the spool."""
        series = facts["series"]
        series = tuple(series) if isinstance(series, list) else series
        start = None
        if facts["header"]:
            rotation = facts["rotation"]
            start = SeriesStart(series, n_frames=facts["n_frames"], rotation=tuple(rotation) if rotation else None,
                                channel=facts["channel"])
        self._reset_series(start, series)
        self._seen(series)
        if facts["frame_shape"] is not None:
            self.frame_shape, self.dtype = tuple(facts["frame_shape"]), np.dtype(facts["dtype"])
        self._next = self._images = self._delivered = self._resumed_at = next_frame

    def _seen(self, series) -> None:
        self._series_seen.add(series)
        self.counters["series"] = len(self._series_seen)

    # -- receiving --

    def _receive_message(self):
        raise NotImplementedError

    def _decode(self, message) -> SeriesStart | Image | SeriesEnd:
        raise NotImplementedError

    def _receive(self):
        """The next message, or None after ``idle_timeout_s`` without one."""
        deadline = time.monotonic() + self._idle_timeout_s
        while (remaining := deadline - time.monotonic()) > 0 and not self._stopped:
            if self._poller.poll(math.ceil(min(remaining, _STOP_LOOK_S) * 1000)):
                self._messages += 1
                return self._receive_message()
        return None

    def __iter__(self) -> Iterator[Frame]:
        for frame in self._frames():
            yield frame
            self._delivered += 1
            if self._limit is not None and self._delivered >= self._limit:
                self.end_reason = "expected_frames"
                return

    def _frames(self) -> Iterator[Frame]:
        while self.end_reason is None and not self._socket.closed:
            message = self._receive()
            if message is None and self._stopped:  # (a message received is handled: it may be spooled)
                self.end_reason = "stopped"
                return
            if message is None:
                yield from self._flush()
                self._timed_out()
                return
            try:
                event = self._decode(message)
            except MalformedMessage as exc:
                self._malformed(exc)
                continue
            if isinstance(event, SeriesStart):
                yield from self._on_start(event)
            elif isinstance(event, Image):
                yield from self._on_image(event)
            else:
                yield from self._on_end(event)

    # -- series --

    def _on_start(self, start: SeriesStart) -> Iterator[Frame]:
        self._seen(start.series)
        if not self._images:
            if self._series not in (None, start.series):
                self._warn(f"series {self._show(self._series)} was replaced by series {self._show(start.series)} "
                           "before any of its images arrived")
            self._reset_series(start)
        elif start.series == self._series:
            self.counters["duplicate"] += 1
            if self._resumed_at:
                self._resent()
            else:
                self._warn(f"a second header for series {self._show(start.series)}, ignored")
        else:
            yield from self._end_series(f"series {self._show(start.series)} started")

    def _on_image(self, image: Image) -> Iterator[Frame]:
        self._seen(image.series)
        if self._series is None or (image.series != self._series and not self._images):
            self._warn(f"frame {image.number} of series {self._show(image.series)} arrived without the series' "
                       "header: starting there, without its frame count and goniometer")
            self._reset_series(None, image.series)
        elif image.series != self._series:
            yield from self._end_series(f"frame {image.number} of series {self._show(image.series)} arrived")
            return
        problem = self._unlike_series(image.data)
        if problem:
            self._malformed(MalformedMessage(problem, image.number))
            return
        self._images += 1
        if self.frame_shape is None:
            self.frame_shape = image.data.shape
        if self.dtype is None:
            self.dtype = image.data.dtype
        yield from self._accept(image.number, image.data)

    def _on_end(self, end: SeriesEnd) -> Iterator[Frame]:
        if end.series != self._series:
            self._warn(f"end of series {self._show(end.series)}, which is not the series being received, ignored")
        elif not self._images:
            self._warn(f"series {self._show(end.series)} ended before any of its images arrived; "
                       "waiting for the next series")
            self._reset_series(None)
        else:
            yield from self._end_series(None)

    def _end_series(self, interrupted_by: str | None) -> Iterator[Frame]:
        yield from self._flush()
        announced = self._header.n_frames if self._header else None
        if interrupted_by:
            self._warn(f"{interrupted_by} before series {self._show(self._series)} ended: "
                       f"the scan ends after {self._next} frames")
        elif announced is not None and self._next < announced:
            self._warn(f"series {self._show(self._series)} ended after {self._next} of its {announced} frames "
                       "(the acquisition was stopped or its last frames were lost)")
        self.end_reason = "series_end"

    def _timed_out(self) -> None:
        waited = f"{self._idle_timeout_s:g} s"
        if self._next == 0:
            if self._series is not None:
                got = f"series {self._show(self._series)} started but no frame of it arrived in {waited}"
            elif self._messages:
                got = (f"{self._messages} messages arrived in {waited} but no frame "
                       f"({self.counters['malformed']} malformed)")
            else:
                got = f"nothing arrived in {waited}"
            raise InputError(f"{self.url}: {got}, expected a DECTRIS {self.protocol} stream (is the detector "
                             f"armed, and its stream interface enabled in the {self.protocol} format?)")
        self._warn(f"no message in {waited}: the scan ends after {self._next} frames"
                   + (f" of {self.n_frames}" if self.n_frames else ""))
        self.end_reason = "idle_timeout"

    def _unlike_series(self, data: np.ndarray) -> str | None:
        if self.frame_shape is not None and data.shape != self.frame_shape:
            return f"frame shape {data.shape} (y, x) unlike the series' {self.frame_shape}"
        if self.dtype is not None and data.dtype != self.dtype:
            return f"frame type {data.dtype} unlike the series' {self.dtype}"
        return None

    # -- frame order --

    @property
    def frames_announced(self) -> int | None:
        """The frame count the series' header announced, if any."""
        return self._header.n_frames if getattr(self, "_header", None) else None

    def _implausible(self, number: int) -> str | None:
        """Why frame ``number`` cannot belong to the series being received, or None."""
        announced = self.frames_announced
        if announced is not None and number >= announced:
            return f"frame number {number} is past the series' {announced} announced frames"
        if number - self._next > MAX_FRAME_JUMP:
            return (f"frame number {number} jumps more than {MAX_FRAME_JUMP} frames past the next expected "
                    f"({self._next})")
        return None

    def _accept(self, number: int, data: np.ndarray) -> Iterator[Frame]:
        problem = self._implausible(number)
        if problem:
            self._malformed(MalformedMessage(problem, number))
            return
        if number < self._resumed_at:  # sent again from the series' start after a restart: already spooled
            self.counters["duplicate"] += 1
            self._resent()
            return
        if number < self._next or number in self._held:
            late = number in self._replaced
            self.counters["out_of_order" if late else "duplicate"] += 1
            self._warn(f"frame {number} arrived again, dropped" if not late else
                       f"frame {number} arrived after it was declared missing, dropped")
            return
        self._held[number] = data
        yield from self._release()
        if len(self._held) > REORDER_FRAMES:
            yield from self._skip_to(min(self._held))

    def _resent(self) -> None:
        if not self._resent_warned:
            self._resent_warned = True
            self._warn(f"series {self._show(self._series)} is sent again from its start: frames before "
                       f"{self._resumed_at}, received before the restart, are dropped as they arrive again")

    def _release(self) -> Iterator[Frame]:
        while self._next in self._held:
            yield Frame(self._next, self._psi(self._next), self._held.pop(self._next))
            self._next += 1

    def _flush(self) -> Iterator[Frame]:
        """Yield the held frames, declaring the gaps before them missing."""
        while self._held:
            yield from self._skip_to(min(self._held))

    def _skip_to(self, stop: int) -> Iterator[Frame]:
        """Frames ``self._next`` .. ``stop - 1`` never came: apply ``source.missing``, then release what follows."""
        first, last = self._next, stop - 1
        span = f"frame {first}" if first == last else f"frames {first}..{last}"
        self.counters["missing"] += stop - first
        downtime = " (sent while dctstream was not running)" if first == self._resumed_at > 0 else ""
        if self._missing_policy == "error":
            raise InputError(f"{self.url}: frame {first} of series {self._show(self._series)} is missing{downtime} "
                             f"({span} lost, frame {stop} arrived), expected every frame; set "
                             "source.missing: repeat-background to go on without them")
        self._warn(f"{span} missing{downtime} (frame {stop} arrived): replaced by the background")
        for k in range(first, stop):
            self._replaced.add(k)
            yield Frame(k, self._psi(k), None)
        self._next = stop
        yield from self._release()

    def _psi(self, k: int) -> float | None:
        rotation = self._header.rotation if self._header else None
        if rotation is not None:
            return rotation[0] + k * rotation[1]
        if self._angles is None:
            return None
        if k < self._angles.size:
            return float(self._angles[k])
        if not self._angles_warned:
            self._angles_warned = True
            self._warn(f"source.angles has {self._angles.size} angles, no psi from frame {k} on")
        return None

    # -- reporting --

    def _malformed(self, exc: MalformedMessage) -> None:
        self.counters["malformed"] += 1
        frame = f" (frame {exc.frame})" if exc.frame is not None else ""
        self._warn(f"malformed {self.protocol} message{frame} skipped: {exc}")

    def _warn(self, text: str) -> None:
        log.warning("%s: %s", self.url, text)

    @staticmethod
    def _show(series) -> str:
        return str(series)

    def stop(self) -> None:
        """End the frames within `_STOP_LOOK_S` (from any thread); the socket stays open until `close`."""
        self._stopped = True

    def close(self) -> None:
        """Disconnect; the scan is over (idempotent)."""
        if not self._socket.closed:
            self._socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stream1Source(_StreamSource):
    """Frames of one series from a DECTRIS Stream v1 (SIMPLON ``legacy`` format) PUSH socket."""

    protocol = "Stream v1"

    def _receive_message(self) -> list[bytes]:
        return self._socket.recv_multipart(zmq.NOBLOCK)

    def _decode(self, message: list[bytes]) -> SeriesStart | Image | SeriesEnd:
        return decode_stream1(message)


class Stream2Source(_StreamSource):
    """Frames of one series from a DECTRIS Stream2 (CBOR) PUSH socket."""

    protocol = "Stream2"

    def _receive_message(self) -> bytes:
        return self._socket.recv(zmq.NOBLOCK)

    def _decode(self, message: bytes) -> SeriesStart | Image | SeriesEnd:
        return decode_stream2(message, self._header.channel if self._header else None)

    @staticmethod
    def _show(series) -> str:
        series_id, unique_id = series
        return f"{series_id}" + (f" ({unique_id})" if unique_id else "")
