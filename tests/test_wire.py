import json
import struct

import pytest
import torch

from lightning_moe import wire

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ATOL = {"none": 0.05, "float16": 0.05, "uint8": 0.05, "int8": 0.05, "int4": 0.6}  # N(0, 1) values: int4's step is absmax / 7


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_round_trip_is_exact_without_compression(dtype):
    tensors = [(torch.randn(5, 7) * 10).to(dtype), torch.ones(3, dtype=torch.float16), (torch.randn(2, 3, 1) * 3).to(dtype)]
    decoded = wire.deserialize(wire.serialize(tensors))
    assert len(decoded) == 3
    for a, b in zip(tensors, decoded):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)


@pytest.mark.parametrize("compression,max_rel_error,ratio", [("float16", 1e-3, 0.51), ("uint8", 2e-2, 0.26),
                                                              ("int8", 1e-2, 0.26), ("int4", 0.15, 0.14)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_compression_bounds_error_and_traffic(compression, max_rel_error, ratio, dtype):
    x = torch.randn(128, 1024).to(dtype)
    message = wire.serialize([x], compression)
    (y,) = wire.deserialize(message)
    assert y.dtype == dtype and y.shape == x.shape
    error = (y.double() - x.double()).norm() / x.double().norm()
    assert error < max_rel_error
    assert len(message) < ratio * x.numel() * 4 + 1024


@pytest.mark.parametrize("compression", wire.COMPRESSIONS)
@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (4, 0), (1,), (3, 1), (2, 3, 4), (1, 1, 1, 1, 1)])
def test_every_shape_round_trips(compression, shape):
    x = torch.randn(shape)
    (y,) = wire.deserialize(wire.serialize([x], compression))
    assert y.shape == x.shape
    assert torch.allclose(x, y, atol=ATOL[compression])


def test_uint8_constant_rows_are_exact():
    x = torch.full((4, 16), 3.25)
    (y,) = wire.deserialize(wire.serialize([x], "uint8"))
    assert torch.equal(x, y)


def test_integer_tensors_ignore_compression():
    x = torch.arange(10)
    (y,) = wire.deserialize(wire.serialize([x], "uint8"))
    assert torch.equal(x, y)


def test_noncontiguous_and_grad_tensors():
    x = torch.randn(6, 4, requires_grad=True)
    (y,) = wire.deserialize(wire.serialize([x.t()]))
    assert torch.equal(y, x.detach().t())


def _message(header: object, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<4sI", wire.MAGIC, len(raw)) + raw + payload


def _spec(**overrides):
    spec = {"dtype": "float32", "shape": [2, 2], "compression": "none", "nbytes": 16}
    spec.update(overrides)
    return {"tensors": [spec]}


@pytest.mark.parametrize(
    "message,match",
    [
        (b"", "shorter"),
        (b"XXXX" + bytes(20), "magic"),
        (struct.pack("<4sI", wire.MAGIC, 10**9), "header length"),
        (struct.pack("<4sI", wire.MAGIC, 8) + b"{{{{{{{{", "JSON"),
        (_message([1, 2]), "object"),
        (_message({"tensors": "x"}), "object"),
        (_message(_spec(dtype="object"), bytes(16)), "not allowed"),
        (_message(_spec(dtype=None), bytes(16)), "not allowed"),
        (_message(_spec(shape=[2, -2]), bytes(16)), "non-negative"),
        (_message(_spec(shape=[2, 2.0]), bytes(16)), "non-negative"),
        (_message(_spec(shape="2x2"), bytes(16)), "list"),
        (_message(_spec(shape=[1] * 9), bytes(16)), "list"),
        (_message(_spec(nbytes=15), bytes(16)), "expected 16"),
        (_message(_spec(nbytes="16"), bytes(16)), "expected 16"),
        (_message(_spec(compression="zip"), bytes(16)), "compression"),
        (_message(_spec(dtype="int64", nbytes=32, compression="uint8"), bytes(32)), "floating"),
        (_message(_spec(), bytes(8)), "describes"),
        (_message(_spec(), bytes(24)), "describes"),
        (_message(_spec(shape=[2**30, 2**30], nbytes=2**62), bytes(16)), "describes"),
        (_message({"tensors": [_spec()["tensors"][0]] * 65}), "at most"),
    ],
)
def test_malformed_messages_raise_wire_error(message, match):
    with pytest.raises(wire.WireError, match=match):
        wire.deserialize(message)


def test_size_limit_is_checked_before_decoding():
    message = wire.serialize([torch.zeros(1024)])
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.deserialize(message, max_bytes=1000)


def test_truncated_messages_never_decode():
    message = wire.serialize([torch.randn(3, 5), torch.randn(2)], "uint8")
    for cut in range(len(message)):
        with pytest.raises(wire.WireError):
            wire.deserialize(message[:cut])


def test_random_bytes_never_crash():
    generator = torch.Generator().manual_seed(0)
    valid = wire.serialize([torch.randn(4, 4)])
    for _ in range(300):
        message = bytearray(valid)
        positions = torch.randint(0, len(message), (4,), generator=generator)
        for position in positions.tolist():
            message[position] = int(torch.randint(0, 256, (1,), generator=generator))
        try:
            wire.deserialize(message)
        except wire.WireError:
            pass


def test_serialize_rejects_unknown_compression():
    with pytest.raises(ValueError, match="compression"):
        wire.serialize([torch.zeros(1)], "gzip")


def _tensors():
    return [torch.randn(300, 128), torch.arange(5), torch.randn(3, 4).half(), torch.randn(200, 100)]


@pytest.mark.parametrize("compression", wire.COMPRESSIONS)
def test_parts_join_to_the_message(compression):
    tensors = _tensors()
    parts = wire.serialize_parts(tensors, compression)
    message = wire.serialize(tensors, compression)
    assert isinstance(message, bytearray)
    assert b"".join(parts) == message
    assert all(len(part) > 0 for part in parts)
    assert all(isinstance(part, bytes) or (part.format == "B" and part.ndim == 1) for part in parts)


def test_parts_share_memory_with_uncompressed_tensors():
    x = torch.randn(256, 256)  # 256 KiB: large enough to be sent from its own memory
    parts = wire.serialize_parts([x])
    assert len(parts) == 2 and isinstance(parts[1], memoryview)
    x[0, 0] = 123.0
    assert torch.frombuffer(bytearray(parts[1][:4]), dtype=torch.float32).item() == 123.0
    del x  # the part keeps the memory alive
    assert len(bytes(parts[1])) == 256 * 256 * 4


def _buffers(message: bytearray):
    return {
        "bytes": bytes(message),
        "bytearray": bytearray(message),
        "memoryview of bytearray": memoryview(bytearray(message)),
        "memoryview of bytes": memoryview(bytes(message)),
        "memoryview cast to float32": memoryview(bytearray(message)).cast("f"),
        "memoryview slice": memoryview(bytearray(b"x" * 8 + message))[8:],
    }


@pytest.mark.parametrize("compression", wire.COMPRESSIONS)
@pytest.mark.parametrize("kind", list(_buffers(bytearray(8))))
def test_deserialize_accepts_every_buffer_without_warnings(kind, compression, recwarn):
    tensors = _tensors()
    data = _buffers(wire.serialize(tensors, compression))[kind]
    decoded = wire.deserialize(data)
    assert not [w for w in recwarn if "writable" in str(w.message)]
    for a, b in zip(tensors, decoded):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.allclose(a.float(), b.float(), atol=ATOL[compression])
    for b in decoded:  # every decoded tensor is writable memory of its own or of a writable buffer
        b.add_(1)


def test_writable_buffers_decode_without_a_copy_and_bytes_are_never_aliased():
    x = torch.randn(16, 8)
    message = wire.serialize([x])
    (y,) = wire.deserialize(message)
    message[-4:] = struct.pack("<f", 7.0)
    assert y[-1, -1].item() == 7.0  # a view of the bytearray
    view = memoryview(bytearray(message))
    (z,) = wire.deserialize(view)
    view[-4:] = struct.pack("<f", 9.0)
    assert z[-1, -1].item() == 9.0  # a view of the memoryview's buffer
    frozen = bytes(message)
    (w,) = wire.deserialize(frozen)
    w.zero_()
    assert frozen == bytes(message)  # the immutable bytes were copied, not written


def test_non_contiguous_buffer_is_refused():
    message = wire.serialize([torch.randn(2, 2)])
    doubled = memoryview(bytearray(b"".join(bytes([b, 0]) for b in message)))[::2]
    with pytest.raises(wire.WireError, match="contiguous"):
        wire.deserialize(doubled)


@pytest.mark.parametrize("compression", wire.COMPRESSIONS)
def test_without_numpy_views_the_same_message_comes_out(compression, monkeypatch):
    tensors = _tensors()
    expected = wire.serialize(tensors, compression)
    monkeypatch.setattr(wire, "_shared", lambda buffer: None)  # as when torch runs without numpy
    assert wire.serialize(tensors, compression) == expected
    assert b"".join(wire.serialize_parts(tensors, compression)) == expected
