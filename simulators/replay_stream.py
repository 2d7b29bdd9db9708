"""Play a recorded scan over ZeroMQ the way a DECTRIS detector streams it (Stream v1 or Stream2).

``StreamReplayer`` binds a PUSH socket, and once started sends from a thread:
the series header (Stream v1 ``dheader-1.0`` / Stream2 ``start``), one image
message per frame at ``fps``, and the series end.  Frames are read from the
HDF5 file one at a time, as they are sent.  The message formats are the ones
``dctstream.sources.stream`` reads (its docstring lists them).

``faults`` injects what networks and detectors do, by frame number:

* ``"drop": [5, 9]``: the frames' image messages are never sent;
* ``"duplicate": [3]``: sent twice in a row;
* ``"swap": [(7, 8)]``: the two frames are sent in each other's place;
* ``"malformed": [4]``: a broken image message (its data cut to half, the
  sizes it announces unchanged) is sent just before the right one; add the
  frame to ``"drop"`` to send only the broken one;
* ``"new_series_after": 10``: after frame 10, without an end message, the
  detector is re-armed: a new series (id + 1) plays the whole scan again;
* ``"stop_after": 12``: nothing is sent after frame 12, no end message either
  (the detector or the network died).

``start_at=k`` sends frames k.. of the series without its header: a detector
still acquiring when a client connects again (after dctstream was restarted).

``sent_s[k]`` is the ``time.perf_counter()`` at which frame k's message was
about to be handed to ZeroMQ (for latency measurements).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import threading
import time

import bitshuffle
import cbor2
import h5py
import lz4.block
import numpy as np
import zmq

from dctstream.sources import parse_url, read_dataset

ENCODINGS = {
    "stream1": ("<", "lz4<", "bs8-lz4<", "bs16-lz4<", "bs32-lz4<"),
    "stream2": ("raw", "lz4", "bslz4"),
}
HEADER_DETAILS = ("all", "basic", "none")
FAULTS = ("drop", "duplicate", "swap", "malformed", "new_series_after", "stop_after")

CHANNEL = "threshold_1"  # Stream2 channel name, as DECTRIS names the first threshold
# Bitshuffle blocks of 8 KiB, as the bitshuffle library picks by default and DECTRIS detectors send.
BSLZ4_BLOCK_BYTES = 8192
# LZ4 (HDF5 framing) blocks; the HDF5 filter's default is 1 GiB, smaller here so frames have several.
LZ4_BLOCK_BYTES = 1 << 16
_SEND_TIMEOUT_MS = 100  # how often a blocked send looks whether close() was called
FLUSH_MS = 10_000  # how long close(flush=True) lets the messages still queued reach the receiver
_CBOR_MAGIC = b"\xd9\xd9\xf7"
_TYPED_ARRAY_TAGS = {np.dtype("u1"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70,
                     np.dtype("i1"): 72, np.dtype("<i2"): 77, np.dtype("<i4"): 78, np.dtype("<f4"): 85}


def encode_bslz4_h5(data: np.ndarray) -> bytes:
    """Bitshuffle + LZ4 with the HDF5 filter's 12-byte header (total bytes, block bytes; big-endian)."""
    itemsize = data.dtype.itemsize
    block = BSLZ4_BLOCK_BYTES // itemsize
    body = bitshuffle.compress_lz4(np.ascontiguousarray(data).reshape(-1), block)
    return struct.pack(">QI", data.nbytes, block * itemsize) + body.tobytes()


def encode_lz4_h5(raw: bytes, block_bytes: int = LZ4_BLOCK_BYTES) -> bytes:
    """LZ4 blocks in the HDF5 LZ4 filter's framing; a block that does not shrink is stored as is."""
    out = [struct.pack(">QI", len(raw), block_bytes)]
    for start in range(0, len(raw), block_bytes):
        block = raw[start:start + block_bytes]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = block
        out += [struct.pack(">I", len(packed)), packed]
    return b"".join(out)


class _Stopped(Exception):
    """close() was called while the replay was running."""


class StreamReplayer:
    """A PUSH server that plays the scan at ``src_url`` (``file.h5::/dataset``) like a detector; see the module."""

    def __init__(self, src_url: str, *, protocol: str = "stream1", bind: str = "tcp://127.0.0.1:0",
                 fps: float = 10.0, encoding: str | None = None, angles_url: str | None = None,
                 header_detail: str = "basic", faults: dict | None = None, context: zmq.Context | None = None,
                 start_at: int = 0):
        if protocol not in ENCODINGS:
            raise ValueError(f"protocol must be one of {', '.join(ENCODINGS)}, got {protocol!r}")
        if header_detail not in HEADER_DETAILS:
            raise ValueError(f"header_detail must be one of {', '.join(HEADER_DETAILS)}, got {header_detail!r}")
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}, expected some of {', '.join(FAULTS)}")
        if fps < 0:
            raise ValueError(f"fps must be >= 0 (0 = as fast as possible), got {fps}")
        path, dataset = parse_url(src_url)
        self._h5 = h5py.File(path, "r", locking=False)
        try:
            self._setup(dataset, protocol, fps, encoding, angles_url, header_detail, faults, bind, context)
            self.start_at = start_at
        except BaseException:
            self._h5.close()
            raise

    def _setup(self, dataset, protocol, fps, encoding, angles_url, header_detail, faults, bind, context) -> None:
        self._frames = self._h5[dataset]
        n, ny, nx = self._frames.shape
        dtype = self._frames.dtype.newbyteorder("<")
        if dtype not in _TYPED_ARRAY_TAGS or dtype.kind not in "ui":
            raise ValueError(f"frames must be 8, 16 or 32-bit integers, got {self._frames.dtype}")
        if encoding is None:  # what the detector sends by default
            encoding = f"bs{8 * dtype.itemsize}-lz4<" if protocol == "stream1" else "bslz4"
        if encoding not in ENCODINGS[protocol]:
            raise ValueError(f"{protocol} encoding must be one of {', '.join(ENCODINGS[protocol])}, got {encoding!r}")
        if protocol == "stream1" and encoding.startswith("bs") and encoding != f"bs{8 * dtype.itemsize}-lz4<":
            raise ValueError(f"encoding {encoding} does not fit {self._frames.dtype} frames")
        if angles_url is not None and protocol != "stream2":
            raise ValueError("stream1 messages carry no angles; give them to the source as source.angles")
        self.protocol, self.encoding, self.header_detail, self.fps = protocol, encoding, header_detail, fps
        self.n_frames, self.frame_shape, self.dtype = n, (ny, nx), dtype
        self.rotation = None if angles_url is None else _rotation(angles_url, n)
        self.faults = faults
        self.sent_s: dict[int, float] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        # a PUSH socket blocks while no PULL socket is connected: the replay waits for its client
        self._socket.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- running --

    def start(self) -> StreamReplayer:
        self._thread = threading.Thread(target=self._run, name="StreamReplayer", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the replay to finish; re-raises what failed in it."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error

    def close(self, flush: bool = False) -> None:
        """Stop sending and unbind (idempotent); messages not yet delivered are dropped, or with ``flush`` given
        FLUSH_MS to reach the receiver (a whole replay: its last frames and end message were lost now and then)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._socket.closed:
            self._socket.close(linger=FLUSH_MS if flush else 0)
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self) -> None:
        try:
            self._play()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001  (handed to join())
            self.error = exc

    def _schedule(self) -> list[tuple[str, int, int]]:
        """("header" | "frame" | "end", series, frame) in sending order."""
        order = list(range(self.n_frames))
        for a, b in self.faults.get("swap", ()):
            ia, ib = order.index(a), order.index(b)
            order[ia], order[ib] = b, a
        restart = self.faults.get("new_series_after")
        first = order if restart is None else order[: order.index(restart) + 1]
        plan = [("header", 1, -1)] + [("frame", 1, k) for k in first]
        if restart is not None:
            plan += [("header", 2, -1)] + [("frame", 2, k) for k in order]
        plan.append(("end", plan[-1][1], -1))
        if self.start_at:  # joined mid-series: no header, the frames before start_at went to an earlier client
            plan = [(kind, series, k) for kind, series, k in plan
                    if series != 1 or kind == "end" or kind == "frame" and k >= self.start_at]
        stop = self.faults.get("stop_after")
        if stop is not None:
            plan = plan[: plan.index(("frame", 1, stop)) + 1]
        return plan

    def _play(self) -> None:
        drop, duplicate, malformed = (set(self.faults.get(key, ())) for key in ("drop", "duplicate", "malformed"))
        t0 = None  # the first frame's time: sending the header waited for a client, the clock starts after it
        slot = 0
        for kind, series, k in self._schedule():
            if kind != "frame":
                self._send(self._header(series) if kind == "header" else self._end(series))
                continue
            t0 = time.perf_counter() if t0 is None else t0
            if self.fps:
                self._wait_until(t0 + slot / self.fps)
            slot += 1
            data = self._frames[k]
            if k in malformed:
                self._send(self._image(series, k, data, broken=True))
            if k in drop:
                continue
            message = self._image(series, k, data)
            self.sent_s[k] = time.perf_counter()  # before: the receiver may stamp its arrival before send returns
            for _ in range(2 if k in duplicate else 1):
                self._send(message)

    def _wait_until(self, t: float) -> None:
        if self._stop.wait(max(0.0, t - time.perf_counter())):
            raise _Stopped

    def _send(self, message: list[bytes] | bytes) -> None:
        while True:
            try:
                if isinstance(message, list):
                    self._socket.send_multipart(message)
                else:
                    self._socket.send(message)
                return
            except zmq.Again:  # no client yet, or it does not keep up
                if self._stop.is_set():
                    raise _Stopped from None

    # -- messages --

    def _header(self, series: int):
        ny, nx = self.frame_shape
        if self.protocol == "stream1":
            parts = [_json({"htype": "dheader-1.0", "series": series, "header_detail": self.header_detail})]
            if self.header_detail != "none":
                parts.append(_json({"nimages": self.n_frames, "ntrigger": 1, "x_pixels_in_detector": nx,
                                    "y_pixels_in_detector": ny, "bit_depth_image": 8 * self.dtype.itemsize,
                                    "frame_time": 1 / self.fps if self.fps else 0.0}))
            if self.header_detail == "all":
                for htype, array in self._calibration():
                    parts += [_json({"htype": htype, "shape": list(array.shape[::-1]), "type": str(array.dtype)}),
                              array.astype(array.dtype.newbyteorder("<")).tobytes()]
            return parts
        start = {"type": "start", "series_id": series, "series_unique_id": f"replay-{series}",
                 "arm_date": dt.datetime.now(dt.timezone.utc), "channels": [CHANNEL],
                 "number_of_images": self.n_frames, "image_size_x": nx, "image_size_y": ny,
                 "frame_time": 1 / self.fps if self.fps else 0.0, "saturation_value": int(np.iinfo(self.dtype).max),
                 "bit_depth_image": 8 * self.dtype.itemsize}
        if self.rotation is not None:
            start["goniometer"] = {"omega": {"start": self.rotation[0], "increment": self.rotation[1]}}
        if self.header_detail == "all":
            arrays = dict(self._calibration())
            start["flatfield"] = {CHANNEL: _multi_dim(arrays["dflatfield-1.0"])}
            start["pixel_mask"] = {CHANNEL: _multi_dim(arrays["dpixelmask-1.0"])}
            start["countrate_correction_lookup_table"] = cbor2.CBORTag(70, arrays["dcountrate_table-1.0"].tobytes())
        return _CBOR_MAGIC + cbor2.dumps(start)

    def _calibration(self) -> list[tuple[str, np.ndarray]]:
        """What header_detail "all" adds: a flat flatfield, the pixel mask (1 where frame 0 holds all bits set:
        the module gaps), an identity count-rate table."""
        mask = (self._frames[0] == np.iinfo(self.dtype).max).astype(np.uint32)
        return [("dflatfield-1.0", np.ones(self.frame_shape, np.float32)),
                ("dpixelmask-1.0", mask),
                ("dcountrate_table-1.0", np.arange(1000, dtype=np.uint32))]

    def _end(self, series: int):
        if self.protocol == "stream1":
            return [_json({"htype": "dseries_end-1.0", "series": series})]
        return _CBOR_MAGIC + cbor2.dumps({"type": "end", "series_id": series, "series_unique_id": f"replay-{series}"})

    def _image(self, series: int, k: int, data: np.ndarray, broken: bool = False):
        data = np.ascontiguousarray(data, dtype=self.dtype)
        whole = self._encode(data)
        blob = whole[: len(whole) // 2] if broken else whole
        ny, nx = data.shape
        # exposure times in ns, as a detector counting at fps would report them
        period = int(1e9 / self.fps) if self.fps else 0
        if self.protocol == "stream1":
            return [_json({"htype": "dimage-1.0", "series": series, "frame": k, "hash": hashlib.md5(blob).hexdigest()}),
                    _json({"htype": "dimage_d-1.0", "shape": [nx, ny], "type": str(self.dtype.newbyteorder("=")),
                           "encoding": self.encoding, "size": len(whole)}),
                    blob,
                    _json({"htype": "dconfig-1.0", "start_time": k * period, "stop_time": (k + 1) * period,
                           "real_time": period})]
        content = blob
        if self.encoding != "raw":
            elem_size = self.dtype.itemsize if self.encoding == "bslz4" else 0
            content = cbor2.CBORTag(56500, [self.encoding, elem_size, blob])
        typed_array = cbor2.CBORTag(_TYPED_ARRAY_TAGS[self.dtype], content)
        image = {"type": "image", "series_id": series, "series_unique_id": f"replay-{series}", "image_id": k,
                 "real_time": [period, 10**9], "start_time": [k * period, 10**9],
                 "stop_time": [(k + 1) * period, 10**9], "data": {CHANNEL: cbor2.CBORTag(40, [[ny, nx], typed_array])}}
        return _CBOR_MAGIC + cbor2.dumps(image)

    def _encode(self, data: np.ndarray) -> bytes:
        if self.encoding in ("<", "raw"):
            return data.tobytes()
        if self.encoding == "lz4<":
            return lz4.block.compress(data.tobytes(), store_size=False)
        if self.encoding == "lz4":
            return encode_lz4_h5(data.tobytes())
        return encode_bslz4_h5(data)


def _rotation(angles_url: str, n_frames: int) -> tuple[float, float]:
    """(start, increment) of the scan's angles: Stream2's goniometer can only say that, so they must be even."""
    psi = read_dataset(angles_url)[:n_frames].astype(np.float64)
    step = float(psi[1] - psi[0]) if psi.size > 1 else 0.0
    if not np.allclose(psi, psi[0] + step * np.arange(psi.size), rtol=0, atol=1e-9 * max(1.0, abs(step))):
        raise ValueError(f"{angles_url}: angles are not evenly spaced, a goniometer cannot describe them")
    return float(psi[0]), step


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()


def _multi_dim(array: np.ndarray) -> cbor2.CBORTag:
    array = array.astype(array.dtype.newbyteorder("<"))
    return cbor2.CBORTag(40, [list(array.shape), cbor2.CBORTag(_TYPED_ARRAY_TAGS[array.dtype], array.tobytes())])
