"""compression="auto": link rates measured from real calls (a real host, behind an emulated 20 Mbit/s link), and the
codec each link gets."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_moe.client import links, parallel_call
from lightning_moe.client.dispatch import Dispatcher
from lightning_moe.client.links import LinkRates
from lightning_moe.client.parallel_call import ExpertCall
from lightning_moe.config import HostConfig
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netem import DelayProxy, Link  # noqa: E402

HID = 256


def test_rates_need_the_hosts_time_and_enough_bytes_and_choose_the_codec():
    rates = LinkRates(max_links=2)
    rates.measured("10.0.0.1:80", 1 << 20, 1.0, None)  # the host did not say how long it took: not measured
    rates.measured("10.0.0.1:80", 1000, 1.0, 0.0)  # too few bytes: all round trip
    assert rates.rate("10.0.0.1:80") is None and rates.codec("10.0.0.1:80") == "none"  # unmeasured: exact
    rates.measured("10.0.0.1:80", 1 << 20, 0.9, 0.5)  # 1 MiB in 0.4 s of network time: 2.6 MB/s, a home uplink
    assert rates.rate("10.0.0.1:80") == pytest.approx((1 << 20) / 0.4)
    assert rates.codec("10.0.0.1:80") == links.COMPACT
    rates.measured("10.0.0.2:80", 1 << 20, 0.6, 0.59)  # 100 MB/s: a LAN stays exact
    assert rates.codec("10.0.0.2:80") == "none"
    rates.measured("127.0.0.5:80", 1 << 20, 10.0, 0.0)  # slow-looking loopback (a loaded machine): still exact
    assert rates.codec("127.0.0.5:80") == "none"
    assert rates.rate("10.0.0.1:80") is None  # bounded: the least recently measured link was forgotten
    with pytest.raises(ValueError, match="compression must be one of"):
        Dispatcher("ffn", (2,), k_best=1, k_min=1, forward_timeout=1.0, timeout_after_k_min=None, backward_k_min=1,
                   backward_timeout=1.0, backward_timeout_after_k_min=None, dht=None, initial_peers=(), compression="zip",
                   cache_ttl=1.0, expert_info_timeout=1.0, secret=None, max_retries=0, allow_zero_outputs=False,
                   health=None, max_call_bytes=1 << 20)


@contextlib.contextmanager
def host_behind_slow_link() -> Iterator[tuple[torch.nn.Module, ExpertHost, DelayProxy]]:
    """A real host of one expert (``ffn.0``, frozen) and a 20 Mbit/s, 5 ms link to it: the expert, host and proxy."""
    expert = make_expert("ffn", HID)
    backend = ExpertBackend("ffn.0", expert, torch.optim.SGD(expert.parameters(), lr=0.0),
                            args_schema=[((HID,), torch.float32)], max_batch_size=512)
    with ExpertHost([backend], HostConfig()) as host, \
            DelayProxy(host.endpoint, Link(delay=0.005, bandwidth_bps=20e6)).start() as proxy:
        yield expert, host, proxy


def test_auto_compresses_calls_over_a_slow_link_and_keeps_a_fast_one_exact(monkeypatch):
    """Calls to one real host, direct and through a 20 Mbit/s link: the slow link is measured slow (the host's own
    time left out), gets int8, and its answers still decode to what the expert computes, within int8's error."""
    monkeypatch.setattr(links, "LOOPBACK_IS_EXACT", False)  # the emulated link's proxy listens on 127.0.0.1
    torch.manual_seed(0)
    with host_behind_slow_link() as (expert, host, proxy):
        slow_endpoint, rates = f"127.0.0.1:{proxy.port}", LinkRates()
        x = torch.randn(128, HID)  # 128 KiB up, 128 KiB down
        for endpoint in (host.endpoint, slow_endpoint, slow_endpoint):
            call = ExpertCall("ffn.0", endpoint, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long))
            (result,) = parallel_call.call_in_parallel([call], "forward", [[x]], timeout=30.0,
                                                      compression=rates.codec(endpoint), links=rates)
            assert not isinstance(result, BaseException), result
        fast, slow = rates.rate(host.endpoint), rates.rate(slow_endpoint)
        assert slow is not None and slow < links.EXACT_ABOVE, slow  # 20 Mbit/s is 2.5 MB/s
        assert fast is not None and fast > slow
        assert rates.codec(slow_endpoint) == links.COMPACT
        sent_up_compressed = proxy.bytes_up
        call = ExpertCall("ffn.0", slow_endpoint, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long))
        (answer,) = parallel_call.call_in_parallel([call], "forward", [[x]], timeout=30.0, compression=links.COMPACT)
        assert proxy.bytes_up - sent_up_compressed < x.numel() * 4 // 3  # int8: about a quarter of float32's bytes
        with torch.no_grad():
            expected = expert(x)
        error = (answer[0] - expected).norm() / expected.norm()
        assert error < 0.05, error


def test_requests_to_a_host_at_once_are_measured_together_not_each_at_a_share_of_the_link(monkeypatch):
    """8 requests at once over one 20 Mbit/s link (2.5 MB/s each way): each one's bytes over its own time see a share
    of the link; measured together, the link's rate comes out (up and down overlap: at most twice 2.5 MB/s)."""
    monkeypatch.setattr(links, "LOOPBACK_IS_EXACT", False)
    with host_behind_slow_link() as (expert, host, proxy):
        endpoint, rates = f"127.0.0.1:{proxy.port}", LinkRates()
        x = torch.randn(64, HID)  # 64 KiB up and down per request
        calls = [ExpertCall("ffn.0", endpoint, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long))
                 for _ in range(8)]
        results = parallel_call.call_in_parallel(calls, "forward", [[x]] * len(calls), timeout=60.0, links=rates)
        assert not any(isinstance(r, BaseException) for r in results), results
        assert 1.2e6 < rates.rate(endpoint) < 5.2e6, rates.rate(endpoint)  # here 4.0; measured per request, 0.9
