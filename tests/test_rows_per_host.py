"""Rows once per host: ``POST /host/forward`` and ``/host/backward`` on a real host (answers equal to each expert's alone,
every malformed request a 4xx naming the problem, a failing expert reported per expert), and DecentralizedMoE sending
one request per host per forward and backward, counted at the hosts, with fewer bytes than one request per expert."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from urllib.parse import quote

import pytest
import requests
import torch
from torch import nn

from lightning_moe import DecentralizedMoE, wire
from lightning_moe.client.host_calls import call_hosts, factor_rows, group_by_host
from lightning_moe.client.parallel_call import ExpertCall
from lightning_moe.client.remote_expert import new_keep_id
from lightning_moe.config import DHTConfig, HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert
from lightning_moe.volunteer import start_volunteer

HID = 16
WAIT = 30.0
ROWS = {"ffn.0": [0, 1, 2, 3], "ffn.1": [2, 3, 4], "ffn.2": [5, 0]}  # 6 distinct rows, 9 expert rows


def make_backend(uid: str, seed: int) -> ExpertBackend:
    torch.manual_seed(seed)
    expert = make_expert("ffn", HID)
    return ExpertBackend(uid, expert, torch.optim.SGD(expert.parameters(), lr=0.1), args_schema=[((HID,), torch.float32)],
                         max_batch_size=16)


@pytest.fixture
def host():
    backends = [make_backend(f"ffn.{i}", seed=i) for i in range(3)]
    with ExpertHost(backends, HostConfig(limits=HostLimits(request_timeout=WAIT))) as h:
        yield h


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def host_post(host: ExpertHost, direction: str, experts: object, tensors: list[torch.Tensor], extra: str = "",
              raw_query: str | None = None) -> requests.Response:
    query = raw_query if raw_query is not None else "experts=" + quote(json.dumps(experts))
    return requests.post(f"http://{host.endpoint}/host/{direction}?{query}{extra}", data=wire.serialize(tensors),
                         timeout=WAIT)


def answer_of(response: requests.Response) -> tuple[list, list[torch.Tensor]]:
    assert response.status_code == 200, response.text
    return json.loads(response.headers["X-Experts"]), wire.deserialize(bytearray(response.content))


def plan(keep: bool = True) -> tuple[list, torch.Tensor, dict]:
    keeps = {uid: new_keep_id() if keep else None for uid in ROWS}
    index = torch.tensor([row for rows in ROWS.values() for row in rows])
    return [[uid, len(rows), keeps[uid]] for uid, rows in ROWS.items()], index, keeps


def local_answers(references: dict, x: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's outputs for its rows, expert after expert, and the input gradients summed per row."""
    outputs, grad_x, start = [], torch.zeros_like(x), 0
    for uid, rows in ROWS.items():
        inputs = x[rows].clone().requires_grad_(True)
        out = references[uid](inputs)
        out.backward(grads[start:start + len(rows)])
        outputs.append(out.detach())
        grad_x.index_add_(0, torch.tensor(rows), inputs.grad)
        start += len(rows)
    return torch.cat(outputs), grad_x


def still_serves(host: ExpertHost) -> None:
    experts, index, _ = plan(keep=False)
    statuses, (out,) = answer_of(host_post(host, "forward", experts, [torch.randn(6, HID), index]))
    assert statuses == [[200, ""]] * 3 and out.shape == (9, HID)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int16])  # a trainer sends the narrowest that fits
def test_several_experts_in_one_request_answer_as_each_would_alone(host, index_dtype):
    references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
    torch.manual_seed(0)
    x, grads = torch.randn(6, HID), torch.randn(9, HID)
    expected_out, expected_grad = local_answers(references, x, grads)
    experts, index, _ = plan()
    index = index.to(index_dtype)
    statuses, (out,) = answer_of(host_post(host, "forward", experts, [x, index]))
    assert statuses == [[200, ""]] * 3
    torch.testing.assert_close(out, expected_out)
    statuses, (grad_x,) = answer_of(host_post(host, "backward", experts, [grads, index], "&rows=6"))
    assert statuses == [[200, ""]] * 3
    torch.testing.assert_close(grad_x, expected_grad)  # summed per distinct row at the host
    report = host.load_report()
    assert report["kept_forwards"]["hits"] == 3 and all(b.update_count == 1 for b in host.backends.values())
    assert report["routes"]["host/forward"]["requests"] == report["routes"]["host/backward"]["requests"] == 1
    assert "forward" not in report["routes"] and report["experts"]["ffn.1"]["forward"]["requests"] == 1


def test_a_factored_backward_answers_as_the_output_gradients_it_stands_for(host):
    references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
    torch.manual_seed(2)
    x, by_row, coeffs = torch.randn(6, HID), torch.randn(6, HID), torch.rand(9)
    experts, index, _ = plan()
    _, expected_grad = local_answers(references, x, coeffs[:, None] * by_row[index])
    answer_of(host_post(host, "forward", experts, [x, index]))
    statuses, (grad_x,) = answer_of(host_post(host, "backward", experts, [by_row, coeffs, index], "&rows=6&factored=1"))
    assert statuses == [[200, ""]] * 3
    torch.testing.assert_close(grad_x, expected_grad)


def test_factor_rows_finds_a_mixtures_output_gradients_and_nothing_else():
    torch.manual_seed(3)
    by_sample, weights = torch.randn(8, HID), torch.softmax(torch.randn(8, 4), dim=1)
    weights[0] = 0.0  # a sample whose experts all failed: no gradient at all
    grads = weights[..., None] * by_sample[:, None]  # as autograd computes a softmax-weighted mixture's
    rows, coeffs = factor_rows(grads)
    assert torch.equal(coeffs[0], torch.zeros(4))
    torch.testing.assert_close(coeffs[..., None] * rows[:, None], grads, rtol=1e-6, atol=1e-7)
    other = grads.clone()
    other[3, 1, 0] += 1e-3 * grads[3].abs().max()  # one slot not a multiple of its sample's vector
    assert factor_rows(other) is None and factor_rows(torch.randn(8, 4, HID)) is None


@pytest.mark.parametrize("factored", [False, True])
def test_a_forward_no_longer_kept_gets_409_per_expert_and_the_client_resends_it_with_the_inputs(host, factored):
    references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
    host.kept.budget_bytes = 0  # keeps nothing
    torch.manual_seed(1)
    x, grads = torch.randn(6, HID), torch.randn(9, HID)
    by_sample, coeffs = torch.randn(6, HID), torch.rand(9)
    if factored:  # output gradients of the form a mixture has: a vector per sample times a coefficient per expert
        grads = coeffs[:, None] * by_sample[plan()[1]]
    expected_out, expected_grad = local_answers(references, x, grads)
    experts, index, _ = plan()
    statuses, _ = answer_of(host_post(host, "forward", experts, [x, index]))
    statuses, (grad_x,) = answer_of(host_post(host, "backward", experts, [grads, index], "&rows=6"))
    assert [s for s, _ in statuses] == [409] * 3 and "send the inputs" in statuses[0][1] and not grad_x.any()

    calls = [ExpertCall(uid, host.endpoint, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), new_keep_id())
             for uid, rows in ROWS.items()]
    (request,) = group_by_host(calls, max_rows=100)
    results = call_hosts([request], "forward", x, compression=["none"])
    torch.testing.assert_close(torch.cat([out for (out,) in results]), expected_out)
    sent = (by_sample, coeffs) if factored else grads  # the rows of a sample, the coefficients call after call
    [(summed, errors)] = call_hosts([request], "backward", x, [sent], compression=["none"])
    assert errors == [None] * 3
    grad_of_rows = torch.zeros_like(x).index_add_(0, request.rows, summed)
    torch.testing.assert_close(grad_of_rows, expected_grad)
    assert host.load_report()["routes"]["host/backward"]["requests"] == 3  # one refused above, then kept, then inputs


def test_one_failing_expert_is_answered_per_expert_and_the_others_answer(host):
    host.backends["ffn.1"].expert = Broken()
    experts, index, _ = plan()
    statuses, (out,) = answer_of(host_post(host, "forward", experts, [torch.randn(6, HID), index]))
    assert statuses[0] == statuses[2] == [200, ""]
    assert statuses[1][0] == 500 and "RuntimeError: boom" in statuses[1][1]
    assert out.shape == (4 + 2, HID)  # the rows of ffn.0 and ffn.2
    assert host.stats()["ffn.1"]["forward"]["errors"] == 1 and host.stats()["ffn.0"]["forward"]["errors"] == 0


def _index(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


MALFORMED = {
    "no experts": ("forward", None, "", lambda x: [x[:1], _index(0)], 400, "name the experts"),
    "not json": ("forward", "experts=%5B1", "", lambda x: [x[:1], _index(0)], 400, "not JSON"),
    "not a list": ("forward", {"a": 1}, "", lambda x: [x, _index(0)], 400, "non-empty list"),
    "bad entry": ("forward", [["ffn.0", "2", None]], "", lambda x: [x, _index(0, 1)], 400, "each expert must be"),
    "unknown uid": ("forward", [["ffn.9", 1, None]], "", lambda x: [x, _index(0)], 404, "no expert 'ffn.9'"),
    "too many experts": ("forward", [[f"ffn.{i % 3}", 1, None] for i in range(33)], "", lambda x: [x, _index(0)], 400,
                         "at most 32"),
    "same keep twice": ("forward", [["ffn.0", 1, "0" * 32], ["ffn.0", 1, "0" * 32]], "", lambda x: [x[:2], _index(0, 1)],
                        400, "named twice with the same keep"),
    "rows over the limit": ("forward", [["ffn.0", 10**6, None]], "", lambda x: [x, _index(0)], 413, "exceed the limit"),
    "negative rows": ("forward", [["ffn.0", -1, None]], "", lambda x: [x, _index(0)], 400, "must not be negative"),
    "bad keep": ("forward", [["ffn.0", 1, "XYZ"]], "", lambda x: [x, _index(0)], 400, "hex digits"),
    "mismatched counts": ("forward", [["ffn.0", 2, None]], "", lambda x: [x, _index(0, 1, 1)], 400, "add up to 2"),
    "rows out of range": ("forward", [["ffn.0", 2, None]], "", lambda x: [x[:1], _index(0, 1)], 400, "must lie in [0, 1)"),
    "negative index": ("forward", [["ffn.0", 1, None]], "", lambda x: [x[:1], _index(-1)], 400, "must lie in"),
    "float index": ("forward", [["ffn.0", 1, None]], "", lambda x: [x[:1], torch.zeros(1)], 400, "1-D int16, int32 or int64"),
    "2-d index": ("forward", [["ffn.0", 1, None]], "", lambda x: [x[:1], torch.zeros(1, 1, dtype=torch.long)], 400, "1-D int16, int32 or int64"),
    "no index": ("forward", [["ffn.0", 1, None]], "", lambda x: [x[:1]], 400, "holds 1 tensors"),
    "unused rows": ("forward", [["ffn.0", 1, None]], "", lambda x: [x, _index(0)], 400, "send each row once"),
    "wrong width": ("forward", [["ffn.0", 1, None]], "", lambda x: [x[:1, :3], _index(0)], 400, "shape"),
    "grads rows": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=2", lambda x: [x[:3], _index(0, 1)], 400,
                   "grad_output 0 holds [3] rows"),
    "no rows": ("backward", [["ffn.0", 1, "0" * 32]], "", lambda x: [x[:1], _index(0)], 400, "rows=N"),
    "no inputs": ("backward", [["ffn.0", 1, None]], "&rows=1", lambda x: [x[:1], _index(0)], 400, "need the inputs"),
    "rows differ": ("backward", [["ffn.0", 1, None]], "&rows=1", lambda x: [x[:2], x[:1], _index(0)], 400,
                    "the inputs hold 2"),
    "factored, no coefficients": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=2&factored=1",
                                  lambda x: [x[:2], _index(0, 1)], 400, "output gradients by row, their coefficients"),
    "factored, short coefficients": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=2&factored=1",
                                     lambda x: [x[:2], torch.ones(1), _index(0, 1)], 400, "1-D floating tensor of 2"),
    "factored, integer coefficients": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=2&factored=1",
                                       lambda x: [x[:2], torch.ones(2, dtype=torch.long), _index(0, 1)], 400,
                                       "coefficients must be a 1-D floating"),
    "factored, infinite coefficient": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=2&factored=1",
                                       lambda x: [x[:2], torch.tensor([1.0, float("inf")]), _index(0, 1)], 400,
                                       "coefficients hold NaN or Inf"),
    "factored, rows per pair": ("backward", [["ffn.0", 2, "0" * 32]], "&rows=1&factored=1",
                                lambda x: [x[:2], torch.ones(2), _index(0, 0)], 400, "expected 1 floating rows"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_naming_the_problem_and_the_host_keeps_serving(host, case):
    direction, experts, extra, tensors, status, fragment = MALFORMED[case]
    x = torch.randn(4, HID)
    raw = "" if experts is None else experts if isinstance(experts, str) else None
    response = host_post(host, direction, experts, tensors(x), extra, raw_query=raw)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert fragment in response.json()["error"], response.json()
    still_serves(host)


def test_wrong_method_and_path(host):
    response = requests.get(f"http://{host.endpoint}/host/forward", timeout=WAIT)
    assert response.status_code == 405 and "use POST" in response.json()["error"]
    response = requests.post(f"http://{host.endpoint}/host/sideways", data=b"", timeout=WAIT)
    assert response.status_code == 404 and "no such path" in response.json()["error"]
    still_serves(host)


# ---------------------------------------------------------------- DecentralizedMoE against real hosts
def volunteer_config(**kwargs) -> HostConfig:
    return HostConfig(expert=functools.partial(make_expert, "ffn", HID), in_features=HID, grid_size=[2, 2], cells=4,
                      stats_every=0, num_threads=1, **kwargs)


def test_a_step_sends_one_request_per_host_with_the_answers_of_one_request_per_expert():
    config = HostConfig(expert=functools.partial(make_expert, "ffn", HID), in_features=HID, grid_size=[4, 4], cells=8,
                        stats_every=0, num_threads=1, optimizer=None, seed=0)  # no learning between the steps
    with start_volunteer(config, DHTConfig()) as first, \
            start_volunteer(dataclasses.replace(config, seed=1), DHTConfig(initial_peers=[first.dht.address])) as second:
        hosts = [first.host, second.host]
        moe = DecentralizedMoE(HID, [4, 4], "ffn", k_best=4, initial_peers=[first.dht.address], spot_check_rate=0.0,
                               rows_per_host=True)
        torch.manual_seed(0)
        x, grad = torch.randn(32, HID), torch.randn(32, HID)
        runs = {}
        for per_host in (False, True, False, True):  # interleaved; the second of each pair is compared
            moe.rows_per_host = per_host
            before = [host.load_report()["routes"] for host in hosts]
            inputs = x.clone().requires_grad_(True)
            y = moe(inputs)
            y.backward(grad)
            after = [host.load_report()["routes"] for host in hosts]
            routes = [{route: {k: v - b.get(route, {}).get(k, 0) for k, v in counts.items()} for route, counts in a.items()}
                      for b, a in zip(before, after)]
            runs[per_host] = (y.detach(), inputs.grad, routes, moe.last_stats)
        y, grad_x, routes, stats = runs[True]
        assert stats.failed == stats.backward_failed == 0 and stats.answered == stats.asked > 2, stats.errors
        for counts in routes:  # counted at each host: one request per forward and one per backward
            assert counts["host/forward"]["requests"] == counts["host/backward"]["requests"] == 1, counts
            assert counts.get("forward", {}).get("requests", 0) == counts.get("backward", {}).get("requests", 0) == 0
        y_alone, grad_alone, routes_alone, stats_alone = runs[False]
        assert all(counts["forward"]["requests"] > 1 for counts in routes_alone)
        torch.testing.assert_close(y, y_alone)
        torch.testing.assert_close(grad_x, grad_alone, atol=1e-5, rtol=1e-4)
        # bytes: each row once per host; seen by the trainer (stats) and counted at the hosts
        assert stats.bytes_up < stats_alone.bytes_up and stats.bytes_down < stats_alone.bytes_down
        up = sum(counts["host/forward"]["bytes_in"] for counts in routes)
        assert up < 0.75 * sum(counts["forward"]["bytes_in"] for counts in routes_alone)
        # the output gradients too: once per row and host, with a coefficient per expert (a mixture's are factored)
        up = sum(counts["host/backward"]["bytes_in"] for counts in routes)
        assert up < 0.75 * sum(counts["backward"]["bytes_in"] for counts in routes_alone)
        assert moe.stats["bytes_up"] == stats.bytes_up
        moe.close()


def test_a_failing_expert_inside_a_host_request_is_rerouted_and_reported_alone():
    with start_volunteer(volunteer_config(), DHTConfig()) as volunteer:
        volunteer.host.backends["ffn.0.0"].expert = Broken()
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, k_min=2, initial_peers=[volunteer.dht.address],
                               spot_check_rate=0.0, rows_per_host=True)
        with torch.no_grad():
            moe.proj.weight.zero_()
            moe.proj.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))  # every sample's best: ffn.0.0, then ffn.0.1/ffn.1.0
        x = torch.randn(8, HID, requires_grad=True)
        moe(x).sum().backward()
        stats, endpoint = moe.last_stats, volunteer.host.endpoint
        assert stats.failed == 1 and stats.answered >= 2 and stats.backward_failed == 0, stats.errors
        assert any("'ffn.0.0'" in e and endpoint in e and "RuntimeError: boom" in e for e in stats.errors), stats.errors
        routes = volunteer.host.load_report()["routes"]
        assert routes["host/forward"]["requests"] == 2  # the first round, then the re-routed rows
        assert routes["host/backward"]["requests"] == 1 and "forward" not in routes
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for _ in range(2):  # health is per expert: the failing one is excluded after 3 failures, the others never
            moe(x).sum().backward()
        assert moe.health.excluded("ffn.0.0", endpoint) is not None
        assert all(moe.health.excluded(uid, endpoint) is None for uid in ("ffn.0.1", "ffn.1.0", "ffn.1.1"))
        moe.close()


def test_a_private_host_takes_signed_host_requests_only(monkeypatch):
    monkeypatch.delenv("LIGHTNING_MOE_SECRET", raising=False)
    secret = b"rows per host"
    backends = [make_backend(f"ffn.{i}", seed=i) for i in range(3)]
    with ExpertHost(backends, HostConfig(limits=HostLimits(request_timeout=WAIT)), secret=secret) as host:
        references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
        calls = [ExpertCall(uid, host.endpoint, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), new_keep_id())
                 for uid, rows in ROWS.items()]
        (request,) = group_by_host(calls, max_rows=100)
        x, grads = torch.randn(6, HID), torch.randn(9, HID)
        expected_out, expected_grad = local_answers(references, x, grads)
        results = call_hosts([request], "forward", x, compression=["none"], secret=secret)  # the query is signed too
        torch.testing.assert_close(torch.cat([out for (out,) in results]), expected_out)
        [(summed, errors)] = call_hosts([request], "backward", x, [grads], compression=["none"], secret=secret)
        assert errors == [None] * 3
        torch.testing.assert_close(torch.zeros_like(x).index_add_(0, request.rows, summed), expected_grad)
        unsigned = call_hosts([request], "forward", x, compression=["none"])
        assert all(getattr(error, "status", None) == 401 and "'ffn." in str(error) and host.endpoint in str(error)
                   for error in unsigned), unsigned


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_compressed_host_requests_answer_close_to_exact(host, codec):
    references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
    calls = [ExpertCall(uid, host.endpoint, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), new_keep_id())
             for uid, rows in ROWS.items()]
    (request,) = group_by_host(calls, max_rows=100)
    x, grads = torch.randn(6, HID), torch.randn(9, HID)
    expected_out, expected_grad = local_answers(references, x, grads)
    results = call_hosts([request], "forward", x, compression=[codec])
    torch.testing.assert_close(torch.cat([out for (out,) in results]), expected_out, atol=0.05, rtol=0.05)
    [(summed, errors)] = call_hosts([request], "backward", x, [grads], compression=[codec])
    assert errors == [None] * 3
    grad_x = torch.zeros_like(x).index_add_(0, request.rows, summed)
    assert (grad_x - expected_grad).norm() <= 0.05 * expected_grad.norm()


def test_a_factored_backward_under_a_lossy_codec_quantizes_the_rows_and_never_the_coefficients(host, monkeypatch):
    references = {uid: copy.deepcopy(backend.expert) for uid, backend in host.backends.items()}
    calls = [ExpertCall(uid, host.endpoint, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), new_keep_id())
             for uid, rows in ROWS.items()]
    (request,) = group_by_host(calls, max_rows=100)
    x, by_sample, coeffs = torch.randn(6, HID), torch.randn(6, HID), torch.rand(9) * 1e-3  # small weights
    _, expected_grad = local_answers(references, x, coeffs[:, None] * by_sample[request.index])
    call_hosts([request], "forward", x, compression=["int4"])
    sent = []
    serialize = wire.serialize
    monkeypatch.setattr(wire, "serialize", lambda tensors, codecs, *a: sent.append(codecs) or serialize(tensors, codecs, *a))
    [(summed, errors)] = call_hosts([request], "backward", x, [(by_sample, coeffs)], compression=["int4"])
    assert errors == [None] * 3 and sent == [["int4", "float16", "none"]]  # rows, coefficients, index
    grad_x = torch.zeros_like(x).index_add_(0, request.rows, summed)
    assert (grad_x - expected_grad).norm() <= 0.6 * expected_grad.norm()  # int4 rows, rounded at random, both ways


def test_an_expert_asked_twice_in_a_forward_gets_both_gradients_in_one_backward(host):
    host.backends["ffn.0"].optimizer.param_groups[0]["lr"] = 0.0  # the second backward would see the first's step
    reference = copy.deepcopy(host.backends["ffn.0"].expert)
    x, grads = torch.randn(4, HID), torch.randn(5, HID)
    first, second = [0, 1, 2], [2, 3]  # a re-routed round asks the same expert again for other slots of its rows
    calls = [ExpertCall("ffn.0", host.endpoint, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long),
                        new_keep_id()) for rows in (first, second)]
    for call in calls:  # two forwards (two rounds), then one backward naming the expert twice
        call_hosts(group_by_host([call], max_rows=100), "forward", x, compression=["none"])
    (request,) = group_by_host(calls, max_rows=100, split=False)
    [(summed, errors)] = call_hosts([request], "backward", x, [grads], compression=["none"])
    assert errors == [None, None]
    inputs = x[first + second].clone().requires_grad_(True)
    reference(inputs).backward(grads)
    expected = torch.zeros_like(x).index_add_(0, torch.tensor(first + second), inputs.grad)
    torch.testing.assert_close(torch.zeros_like(x).index_add_(0, request.rows, summed), expected)
    assert host.load_report()["kept_forwards"]["hits"] == 2
