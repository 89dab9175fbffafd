"""The int8 and int4 wire codecs: error bounds per block, unbiased rounding for gradients, malformed bodies, a real host."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import requests
import torch
from omegaconf import OmegaConf

from lightning_moe import codecs, config, wire
from lightning_moe.client import remote_expert
from lightning_moe.client.remote_expert import RemoteExpert
from lightning_moe.config import DecentralizedMoEConfig, HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(), (0,), (0, 5), (1,), (63,), (64,), (65,), (3, 50), (7, 13, 3), (2, 129)]
HID = 32
WAIT = 30.0
BF16_NAN, BF16_INF, BF16_MINUS_ONE = 0x7FC0, 0x7F80, 0xBF80


def scales_of(x: torch.Tensor, codec: str, stochastic: bool = False, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded, each value's block scale as sent) of one encoding of ``x``."""
    buffer = codecs.encode(x, codec, stochastic, generator=generator)
    count = codecs.blocks(x.numel())
    scales = buffer[: 2 * count].view(torch.bfloat16).float()
    decoded = codecs.decode(buffer, codec, x.numel(), x.dtype)
    return decoded.view_as(x), scales.repeat_interleave(codecs.BLOCK)[: x.numel()].view_as(x)


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIZES)
def test_error_is_at_most_half_a_step_per_block(codec, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 3, max(torch.Size(shape).numel(), 1))[: torch.Size(shape).numel()]
         .view(shape)).to(dtype)  # magnitudes change from block to block
    y, scale = scales_of(x, codec)
    assert y.dtype == dtype and y.shape == x.shape
    exact, decoded = x.double(), y.double()
    slack = exact.abs() * torch.finfo(dtype).eps + 1e-30  # the target dtype's own rounding
    assert ((decoded - exact).abs() <= scale.double() / 2 * (1 + 1e-5) + slack).all()
    levels = codecs.LEVELS[codec]
    if x.numel():  # each scale covers its block, and is tight (bfloat16 rounds it up by < 2 ** -7)
        absmax = torch.nn.functional.pad(exact.abs().reshape(-1), (0, -x.numel() % codecs.BLOCK)).view(-1, codecs.BLOCK).amax(1)
        block_scales = scale.reshape(-1)[:: codecs.BLOCK].double()
        assert (block_scales * levels >= absmax * (1 - 1e-6)).all()
        assert (block_scales * levels <= absmax * (1 + 2**-7) + 1e-40).all()
    (z,) = wire.deserialize(wire.serialize([x], codec))  # through the wire: the same values
    assert torch.equal(z, y)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_bytes_per_value(codec):
    x = torch.randn(128, 1000)  # 128000 values in 2000 blocks
    nbytes = 128000 + 4000 if codec == "int8" else 64000 + 4000
    assert codecs.payload_nbytes(codec, x.numel()) == nbytes
    assert len(wire.serialize([x], codec)) < nbytes + 128
    assert codecs.payload_nbytes(codec, 65) == 2 * 2 + (65 if codec == "int8" else 33)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_zeros_are_exact_and_so_are_integers_with_an_exact_scale(codec):
    levels = codecs.LEVELS[codec]
    x = torch.zeros(4, codecs.BLOCK)  # a row per block
    x[1, :40] = torch.randn(40)  # zeros in a block of other values stay zeros
    x[2] = torch.arange(codecs.BLOCK) % (2 * levels + 1) - levels  # absmax L: scale 1
    y, _ = scales_of(x, codec)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2:], x[2:])
    assert torch.equal(y[1, 40:], x[1, 40:]) and (y[1, :40] != 0).any()


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1e300])
def test_non_finite_tensors_go_uncompressed(codec, bad):
    x = torch.randn(4, 70, dtype=torch.float64)
    x[2, 5] = bad  # 1e300: finite in float64, not in the float32 the codec computes in
    message = wire.serialize([x, torch.randn(5)], codec)
    specs, _ = wire.read_header(message)
    assert [spec.compression for spec in specs] == ["none", codec]
    y, _ = wire.deserialize(message)
    assert torch.equal(y.nan_to_num(), x.nan_to_num())


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_stochastic_rounding_is_within_a_step_and_unbiased(codec):
    generator = torch.Generator().manual_seed(0)
    g = torch.distributions.StudentT(2.5).sample((8, 100)) * 1e-6  # gradient-like: heavy tails, tiny
    steps = 400
    total = torch.zeros_like(g, dtype=torch.float64)
    for _ in range(steps):
        y, scale = scales_of(g, codec, stochastic=True, generator=generator)
        assert ((y - g).abs() <= scale * (1 + 1e-5)).all()
        total += y.double() - g.double()
    nearest, scale = scales_of(g, codec)
    # rounding to nearest repeats its error every step; stochastic rounding's errors are independent with mean 0, so
    # their sum grows like sqrt(steps) (standard deviation at most scale / 2 per step): the accumulated error stays small
    bound = 5 * (steps**0.5) * (scale.double() / 2).norm()
    assert total.norm() < bound
    assert total.norm() < steps * (nearest.double() - g.double()).norm() / 8


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_accumulated_gradient_error_stays_a_random_walk(codec):
    """Gradients whose blocks hold one large value and a persistent small signal (under half a step): rounding to
    nearest drops the signal every step, so the running sum of decoded gradients (what momentum or an accumulated
    gradient sees) drifts linearly; with stochastic rounding its error grows like sqrt(steps)."""
    generator, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    signal = 0.3 / codecs.LEVELS[codec]  # 0.3 of a step: the outlier of each block sets the step to 1 / L
    rows, steps = 8, 300
    true_sum = torch.zeros(rows, codecs.BLOCK, dtype=torch.float64)
    sums = {False: torch.zeros_like(true_sum), True: torch.zeros_like(true_sum)}
    variance = 0.0
    for _ in range(steps):
        g = signal + 1e-3 * torch.randn(rows, codecs.BLOCK, generator=data)
        outliers = torch.randint(0, codecs.BLOCK, (rows,), generator=data)
        g[torch.arange(rows), outliers] = torch.randint(0, 2, (rows,), generator=data) * 2.0 - 1.0
        true_sum += g.double()
        for stochastic in (False, True):
            y, scale = scales_of(g, codec, stochastic, generator)
            sums[stochastic] += y.double()
        variance += float((scale.double() / 2).pow(2).sum())  # a bound on the variance of one step's error
    stochastic_error, nearest_error = (sums[True] - true_sum).norm(), (sums[False] - true_sum).norm()
    assert stochastic_error < 5 * variance**0.5
    assert nearest_error > 0.25 * signal * steps * (rows * (codecs.BLOCK - 1)) ** 0.5  # drifts with every step
    assert stochastic_error < nearest_error / 3


def test_stochastic_rounding_leaves_the_global_generator_alone():
    x = torch.randn(10, 100)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    messages = {bytes(wire.serialize([x], "int4", stochastic=True)) for _ in range(3)}
    assert torch.equal(torch.rand(3), expected)
    assert len(messages) > 1  # random: the encodings differ
    assert len({bytes(wire.serialize([x], "int4")) for _ in range(3)}) == 1  # nearest: deterministic


def test_stochastic_flags_apply_per_tensor():
    x = torch.randn(10, 100)
    one = [bytes(wire.serialize([x, x], "int8", stochastic=[False, True])) for _ in range(3)]
    first = {m[: len(m) // 2] for m in one}  # header + the first tensor (same size each time)
    assert len(first) == 1 and len(set(one)) > 1
    with pytest.raises(ValueError, match="stochastic"):
        wire.serialize([x, x], "int8", stochastic=[True])


# ---- malformed messages ------------------------------------------------------------------------------------------
def message(codec: str = "int8", shape: tuple = (3, 50), dtype: str = "float32", nbytes: int | None = None,
            payload: bytes | None = None) -> bytearray:
    """A message whose header is written here (so it can lie); the payload defaults to a valid encoding."""
    if payload is None:
        payload = bytes(codecs.encode(torch.randn(shape), codec).numpy())
    spec = {"dtype": dtype, "shape": list(shape), "compression": codec, "nbytes": len(payload) if nbytes is None else nbytes}
    raw = json.dumps({"tensors": [spec]}).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return bytearray(struct.pack("<4sI", wire.MAGIC, len(raw)) + raw + payload + bytes(-len(payload) % 8))


def with_scale(body: bytearray, block: int, bits: int) -> bytearray:
    """``body`` (from :func:`message`) with one block's bfloat16 scale replaced."""
    header_len = struct.unpack_from("<I", body, 4)[0]
    struct.pack_into("<H", body, 8 + header_len + 2 * block, bits)
    return body


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("bits,block", [(BF16_NAN, 0), (BF16_INF, 2), (BF16_MINUS_ONE, 1), (0xFFC0, 2), (0xFF80, 0), (0x7F00, 1)])
def test_bad_scales_raise_wire_error(codec, bits, block):
    body = with_scale(message(codec), block, bits)
    with pytest.raises(wire.WireError, match=rf"{codec} block {block} of 3 has scale .*at most"):
        wire.deserialize(body)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_header_lies_raise_wire_error(codec):
    good = message(codec)
    nbytes = codecs.payload_nbytes(codec, 150)
    payload = bytes(good[-((nbytes + 7) // 8 * 8):])[:nbytes]
    cases = {
        "expected": [message(codec, nbytes=nbytes - 2, payload=payload),  # one block fewer
                     message(codec, nbytes=nbytes + 2, payload=payload + b"\0\0"),  # one block more
                     message(codec, shape=(3, 51), payload=payload, nbytes=nbytes)],  # shape and size disagree
        "describes": [message(codec, shape=(3, 60), payload=payload, nbytes=codecs.payload_nbytes(codec, 180)),
                      message(codec, shape=(2**30, 2**30), payload=payload, nbytes=codecs.payload_nbytes(codec, 2**60))],
        "floating": [message(codec, dtype="int64", payload=payload)],
    }
    for match, bodies in cases.items():
        for body in bodies:
            with pytest.raises(wire.WireError, match=match):
                wire.deserialize(body)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_truncated_compressed_messages_never_decode(codec):
    body = wire.serialize([torch.randn(3, 50), torch.randn(7)], codec)
    for cut in range(len(body)):
        with pytest.raises(wire.WireError):
            wire.deserialize(body[:cut])


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_random_corruption_raises_wire_error_or_decodes_finite_values(codec):
    generator = torch.Generator().manual_seed(0)
    valid = wire.serialize([torch.randn(4, 70)], codec)
    decoded = 0
    for _ in range(300):
        body = bytearray(valid)
        for position in torch.randint(0, len(body), (3,), generator=generator).tolist():
            body[position] = int(torch.randint(0, 256, (1,), generator=generator))
        try:
            tensors = wire.deserialize(body)
        except wire.WireError:
            continue
        decoded += 1
        assert all(torch.isfinite(t).all() for t in tensors)
    assert decoded > 0


def test_config_host_and_client_take_the_new_names():
    assert config.WIRE_COMPRESSIONS == wire.COMPRESSIONS
    for codec in codecs.CODECS:
        config.check_moe(OmegaConf.structured(DecentralizedMoEConfig(compression=codec)))
        HostConfig(compression=codec).check(volunteer=False)
        assert RemoteExpert("ffn.0", "127.0.0.1:1", compression=codec).compression == codec


# ---- a real host ----------------------------------------------------------------------------------------------------
def make_backend(uid: str = "ffn.0") -> ExpertBackend:
    torch.manual_seed(0)
    expert = make_expert("ffn", HID)
    return ExpertBackend(uid, expert, torch.optim.SGD(expert.parameters(), lr=0.1), args_schema=[((HID,), torch.float32)],
                         max_batch_size=16)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kept_forwards_mb", [512.0, 0.0])  # 0: the backward sends the inputs too (nearest rounding)
@pytest.mark.parametrize("codec,tolerance,cosine", [("int8", 0.05, 0.99), ("int4", 0.6, 0.85)])  # measured: 0.017, 0.34
def test_forward_and_backward_through_a_real_host(codec, tolerance, cosine, kept_forwards_mb, monkeypatch):
    sent, original = [], wire.serialize  # the stochastic flags of each request the trainer sends

    def serialize(tensors, compression="none", stochastic=False):
        sent.append(stochastic)
        return original(tensors, compression, stochastic)

    monkeypatch.setattr(remote_expert.wire, "serialize", serialize)  # the host's answers go through serialize_parts
    backend = make_backend()
    local = copy.deepcopy(backend.expert)
    with ExpertHost([backend], HostConfig(limits=HostLimits(request_timeout=WAIT), kept_forwards_mb=kept_forwards_mb)) as host:
        expert = RemoteExpert("ffn.0", host.endpoint, compression=codec)
        x = torch.randn(12, HID, requires_grad=True)
        x_local = x.detach().clone().requires_grad_(True)
        grad = torch.randn(12, HID)
        y, y_local = expert(x), local(x_local)
        y.backward(grad)
        y_local.backward(grad)
        assert host.backends["ffn.0"].update_count == 1
    # forward: rounded to nearest; backward: the gradients stochastically (and the inputs, resent, to nearest)
    assert sent == [False, True] if kept_forwards_mb else sent == [False, True, [False, True]]
    assert relative(y.detach(), y_local.detach()) < tolerance / 2
    assert relative(x.grad, x_local.grad) < tolerance
    assert torch.nn.functional.cosine_similarity(x.grad.flatten(), x_local.grad.flatten(), dim=0) > cosine


def test_host_refuses_malformed_compressed_bodies_and_keeps_serving():
    with ExpertHost([make_backend()], HostConfig(limits=HostLimits(request_timeout=WAIT))) as host, requests.Session() as s:
        url = f"http://{host.endpoint}/forward/ffn.0"
        valid = message("int4", shape=(3, HID))
        nbytes = codecs.payload_nbytes("int4", 3 * HID)
        bodies = {
            "scale": with_scale(bytearray(valid), 1, BF16_NAN),
            "expected": message("int4", shape=(3, HID), nbytes=nbytes - 2, payload=bytes(valid[-((nbytes + 7) // 8 * 8):])[:nbytes - 2]),
            "describes": bytearray(valid[:-8]),
        }
        for fragment, body in bodies.items():
            response = s.post(url, data=bytes(body), headers={"X-Compression": "int4"}, timeout=WAIT)
            assert 400 <= response.status_code < 500, response.text
            assert response.headers["Content-Type"] == "application/json"
            error = response.json()["error"]
            assert fragment in error and error.startswith(("forward:", "header")), error
        for codec in codecs.CODECS:  # still serving, and answering in the request's compression
            x = torch.randn(5, HID)
            response = s.post(url, data=bytes(wire.serialize([x], codec)), headers={"X-Compression": codec}, timeout=WAIT)
            assert response.status_code == 200, response.text
            specs, _ = wire.read_header(response.content)
            assert [spec.compression for spec in specs] == [codec]
            (out,) = wire.deserialize(response.content)
            assert out.shape == (5, HID) and torch.isfinite(out).all()


def test_host_refuses_a_small_body_that_would_decode_past_its_body_limit():
    limits = HostLimits(request_timeout=WAIT, max_body_mb=1.0)
    with ExpertHost([make_backend()], HostConfig(limits=limits)) as host, requests.Session() as s:
        rows = 2**20 // HID  # float64 int4: 16x its compressed size, so a 0.5 MiB body decodes to 8 MiB
        body = message("int4", shape=(rows, HID), dtype="float64", payload=bytes(codecs.payload_nbytes("int4", rows * HID)))
        assert len(body) < limits.max_body_bytes
        response = s.post(f"http://{host.endpoint}/forward/ffn.0", data=bytes(body), headers={"X-Compression": "int4"},
                          timeout=WAIT)
        assert response.status_code == 413 and "decodes to" in response.json()["error"], response.text
        x = torch.randn(5, HID)
        assert s.post(f"http://{host.endpoint}/forward/ffn.0", data=bytes(wire.serialize([x])), timeout=WAIT).status_code == 200
