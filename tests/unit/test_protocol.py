from __future__ import annotations

import socket
import struct

import msgpack
import pytest
from llm_residentd.wire.protocol import (
    ERROR_CODES,
    ProtocolError,
    check_length,
    decode,
    encode,
    recv_frame,
    send_frame,
)


def test_encode_is_length_prefixed_msgpack():
    frame = encode({"id": 1, "op": "hello"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "op": "hello"}


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb("text"), msgpack.packb([1]), b"",
                                  msgpack.packb({1: 2}), msgpack.packb({}) + b"x"])
def test_decode_rejects_anything_but_one_map(body):
    with pytest.raises(ProtocolError) as err:
        decode(body)
    assert err.value.code == "bad_frame"


def test_check_length():
    check_length(10, 10)
    with pytest.raises(ProtocolError, match="11 bytes exceeds max_frame 10"):
        check_length(11, 10)


def test_frames_over_a_socket_including_split_writes():
    a, b = socket.socketpair()
    send_frame(a, {"k": "v" * 5000})
    frame = encode({"n": 2})
    a.sendall(frame[:3])
    a.sendall(frame[3:])
    assert recv_frame(b) == {"k": "v" * 5000}
    assert recv_frame(b) == {"n": 2}
    a.sendall(frame[:6])
    a.close()
    with pytest.raises(ProtocolError, match="inside a frame"):
        recv_frame(b)


def test_clean_end_of_stream_is_none():
    a, b = socket.socketpair()
    a.close()
    assert recv_frame(b) is None


def test_error_codes_are_stable_strings():
    assert {"bad_frame", "frame_too_large", "bad_request", "unknown_op", "no_such_model",
            "too_long", "queue_full", "worker_died", "cancelled", "forbidden"} <= set(ERROR_CODES)
    assert ProtocolError("queue_full", "m").as_dict() == {"code": "queue_full", "message": "m"}


def test_frame_reader_splits_and_joins_frames():
    from llm_residentd.wire.protocol import FrameReader
    a, b = socket.socketpair()
    reader = FrameReader(b, max_frame=100)
    a.sendall(encode({"n": 1}) + encode({"n": 2}) + encode({"n": 3})[:5])
    assert reader.read() == {"n": 1} and reader.read() == {"n": 2}
    a.sendall(encode({"n": 3})[5:])
    assert reader.read() == {"n": 3}
    a.sendall(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="exceeds max_frame 100"):
        reader.read()
    a2, b2 = socket.socketpair()
    a2.sendall(encode({"n": 4})[:3])
    a2.close()
    with pytest.raises(ProtocolError, match="inside a frame"):
        FrameReader(b2).read()
    a.close()
