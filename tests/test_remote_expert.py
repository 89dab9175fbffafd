"""RemoteExpert against a real ExpertHost on 127.0.0.1: gradcheck, equality with a local copy, dtypes, errors."""

from __future__ import annotations

import copy
import socket
import time

import pytest
import torch
from torch import nn

from lightning_moe.client.remote_expert import RemoteExpert, RemoteExpertError
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

HID = 8


class Failing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x > 100).any():
            raise ValueError("inputs over 100 are not allowed here")
        return x * 2


class Slow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(1.0)
        return x


def backend(uid: str, expert: nn.Module, dtype: torch.dtype = torch.float32, lr: float | None = None) -> ExpertBackend:
    optimizer = torch.optim.SGD(expert.parameters(), lr=lr) if lr is not None else None
    return ExpertBackend(uid, expert.to(dtype), optimizer, args_schema=[((HID,), dtype)])


def test_gradcheck_in_float64_through_a_real_host():
    torch.manual_seed(0)
    with ExpertHost([backend("ffn.0", make_expert("ffn", HID), torch.float64)]) as host:
        expert = RemoteExpert("ffn.0", host.endpoint)
        x = torch.randn(4, HID, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(expert, (x,), eps=1e-6, atol=1e-5)


def test_outputs_and_input_gradients_equal_a_local_copy_and_the_host_learns():
    torch.manual_seed(0)
    module = make_expert("ffn", HID)
    local = copy.deepcopy(module)
    with ExpertHost([backend("ffn.0", module, lr=0.1)]) as host:
        expert = RemoteExpert("ffn.0", host.endpoint)
        x = torch.randn(5, HID, requires_grad=True)
        x_local = x.detach().clone().requires_grad_(True)
        grad = torch.randn(5, HID)
        y, y_local = expert(x), local(x_local)
        torch.testing.assert_close(y, y_local)
        y.backward(grad)
        y_local.backward(grad)
        torch.testing.assert_close(x.grad, x_local.grad)
        assert host.backends["ffn.0"].update_count == 1
        assert not torch.equal(next(module.parameters()), next(local.parameters()))  # the host stepped SGD


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_input_dtype_comes_back_in_that_dtype(dtype):
    torch.manual_seed(0)
    with ExpertHost([backend("ffn.0", make_expert("ffn", HID))]) as host:  # a float32 expert
        expert = RemoteExpert("ffn.0", host.endpoint)
        x = torch.randn(3, HID, dtype=dtype, requires_grad=True)
        y = expert(x)
        assert y.dtype == dtype and y.device == x.device
        y.float().sum().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_errors_name_the_uid_the_endpoint_and_the_hosts_message():
    with ExpertHost([backend("bad.0", Failing()), backend("slow.0", Slow())]) as host:
        with pytest.raises(RemoteExpertError, match=rf"'bad\.0' at {host.endpoint} failed \(HTTP 500\).*inputs over 100"):
            RemoteExpert("bad.0", host.endpoint)(torch.full((2, HID), 1000.0))
        with pytest.raises(RemoteExpertError, match=rf"'nope\.0' at {host.endpoint} failed \(HTTP 404\)"):
            RemoteExpert("nope.0", host.endpoint)(torch.zeros(2, HID))
        with pytest.raises(RemoteExpertError, match=r"'slow\.0'.*no answer.*Timeout"):
            RemoteExpert("slow.0", host.endpoint, forward_timeout=0.2)(torch.zeros(2, HID))
        torch.testing.assert_close(RemoteExpert("bad.0", host.endpoint)(torch.ones(2, HID)), torch.full((2, HID), 2.0))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: connections are refused
        with pytest.raises(RemoteExpertError, match=rf"'ffn\.0' at {closed} failed \(no answer\)"):
            RemoteExpert("ffn.0", closed, forward_timeout=5.0)(torch.zeros(2, HID))
