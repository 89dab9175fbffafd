"""Volunteers that lie (issue #21): each lying mode caught by trainers and its host excluded saying why, honest
replicas never excluded, a poisoning trainer's update bounded by the host's clipping, and the keys checked by name."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from omegaconf import OmegaConf

from lightning_moe import DecentralizedMoE
from lightning_moe.client import spot_checks
from lightning_moe.client.spot_checks import SUSPECT_RATE, AnswerChecks
from lightning_moe.config import ConfigError, DecentralizedMoEConfig, DHTConfig, HostConfig, check_moe
from lightning_moe.client.health import HealthRegistry
from lightning_moe.server import make_expert
from lightning_moe.server.byzantine import Liar
from lightning_moe.server.grad_bounds import GradientBounds
from lightning_moe.volunteer import start_volunteer

HID = 8
GRID = [2, 2]


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
                    in_features=HID, grid_size=GRID, cells=4, replicas=3, update_period=2.0, stats_every=0)
    return HostConfig(**{**defaults, **kwargs})


def shift_weights(volunteers) -> None:
    """Move every replica's weights the same way (as training would): a stale liar's snapshot is then out of date."""
    for volunteer in volunteers:
        for uid, backend in volunteer.host.backends.items():
            generator = torch.Generator().manual_seed(sum(map(ord, uid)))
            with backend.lock, torch.no_grad():
                for p in backend.expert.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.5 * p.std().clamp_min(0.1))


@pytest.fixture
def three_replicas(request):
    """Three volunteers serving every cell; the third lies in the test's mode (``none``: honest)."""
    mode = getattr(request, "param", "none")
    with start_volunteer(host_config(seed=0), DHTConfig()) as first:
        peers = DHTConfig(initial_peers=[first.dht.address])
        with start_volunteer(host_config(seed=1), peers) as second:
            with start_volunteer(host_config(seed=2, byzantine=mode), peers) as third:
                volunteers = (first, second, third)
                shift_weights(volunteers)
                yield volunteers


def train_until(layer: DecentralizedMoE, done, steps: int) -> int:
    for step in range(steps):
        x = torch.randn(32, HID)
        layer(x).sum().backward()
        if done():
            return step + 1
        time.sleep(0.02)
    deadline = time.monotonic() + 15
    while layer.dispatcher.checks.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    return steps


@pytest.mark.parametrize("three_replicas", ["sign_flip", "scale", "noise", "stale"], indirect=True)
def test_each_lying_mode_is_caught_and_its_host_excluded_saying_why(three_replicas):
    first, second, liar = three_replicas
    torch.manual_seed(0)
    layer = DecentralizedMoE(HID, GRID, "ffn", k_best=2, initial_peers=[first.dht.address], cache_ttl=1.0,
                             health=HealthRegistry(), spot_check_rate=0.5)
    health = layer.health
    try:
        steps = train_until(layer, lambda: health.excluded("ffn.0.0", liar.endpoint) is not None, 100)
        exclusion = health.excluded("ffn.0.0", liar.endpoint)
        assert exclusion is not None, (steps, layer.dispatcher.checks.figures())
        reason = exclusion.describe()
        mode = liar.config.byzantine
        if mode == "scale":  # 10x answers: the screen or the spot checks, whichever strikes twice first
            assert "x the scale of" in reason or "disagree with 2 replicas of ffn." in reason, reason
        else:
            assert "outputs disagree with 2 replicas of ffn." in reason, reason
        for honest in (first, second):
            assert all(health.excluded(uid, honest.endpoint) is None for uid in honest.host.backends)
        # the liar is avoided from now on: every answer comes from the honest replicas
        deadline = time.monotonic() + 15
        while layer.dispatcher.checks.in_flight and time.monotonic() < deadline:  # checks sent before the exclusion
            time.sleep(0.05)
        asked_liar = liar.host.load_report()["routes"].get("forward", {}).get("requests", 0)
        layer(torch.randn(32, HID)).sum().backward()
        stats = layer.last_stats
        assert liar.host.load_report()["routes"].get("forward", {}).get("requests", 0) == asked_liar
        assert stats.answered >= 1 and stats.liars_excluded >= 1, stats.errors
        assert not any(liar.endpoint in error for error in stats.errors), stats.errors
    finally:
        layer.close()


@pytest.mark.soak  # 22 s of the default run's budget; the default run's spot-check tests check honest hosts too
def test_honest_replicas_are_never_excluded_over_a_long_run():
    """Three honest replicas trained apart by Adam (lr 3e-3, the host default: they drift a few % between averagings
    every 5 s), 200 steps with half the answers spot-checked: disagreements may be counted, nobody is excluded."""
    adam = functools.partial(torch.optim.Adam, lr=3e-3)
    with start_volunteer(host_config(seed=0, optimizer=adam), DHTConfig()) as first:
        peers = DHTConfig(initial_peers=[first.dht.address])
        with start_volunteer(host_config(seed=1, optimizer=adam), peers), start_volunteer(host_config(seed=2, optimizer=adam), peers):
            torch.manual_seed(1)
            layer = DecentralizedMoE(HID, GRID, "ffn", k_best=2, initial_peers=[first.dht.address], cache_ttl=1.0,
                                     health=HealthRegistry(), spot_check_rate=0.5)
            try:
                for _ in range(200):
                    layer(torch.randn(32, HID)).pow(2).mean().backward()
                    time.sleep(0.05)
                figures = layer.dispatcher.checks.figures()
                seen = layer.dispatcher.checks.calibration()
                print("honest run:", figures, "tolerance", layer.dispatcher.checks.tolerance(), [round(seen[int(q * (len(seen) - 1))], 3) for q in (0.5, 0.9, 0.99, 1)])
                assert figures.get("compared", 0) > 100, figures
                assert figures.get("liars_excluded", 0) == 0 and figures.get("outvoted", 0) <= 0.02 * figures["compared"], figures
                assert not layer.health.exclusions()
            finally:
                layer.close()


def weights(volunteer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for b in volunteer.host.backends.values() for p in b.expert.parameters()])


def step_moves(volunteer, layer: DecentralizedMoE) -> float:
    """How far one training step moves the host's experts (L2 over all their parameters)."""
    before, updates = weights(volunteer), sum(b.update_count for b in volunteer.host.backends.values())
    layer(torch.randn(32, HID)).sum().backward()
    deadline = time.monotonic() + 10
    while sum(b.update_count for b in volunteer.host.backends.values()) <= updates and time.monotonic() < deadline:
        time.sleep(0.01)
    return float((weights(volunteer) - before).norm())


@pytest.mark.parametrize("clip", [4.0, 0.0])
def test_host_clipping_bounds_a_poisoning_trainers_update(clip):
    config = host_config(seed=0, replicas=1, grid_size=[1, 2], cells=2, grad_clip=clip)
    with start_volunteer(config, DHTConfig()) as volunteer:
        torch.manual_seed(0)
        layer = DecentralizedMoE(HID, [1, 2], "ffn", k_best=2, initial_peers=[volunteer.dht.address],
                                 health=HealthRegistry(), spot_check_rate=0.0)
        try:
            honest = max(step_moves(volunteer, layer) for _ in range(10))
            layer.poison = 1000.0
            poisoned = max(step_moves(volunteer, layer) for _ in range(3 if clip else 1))  # unclipped, 1 wrecks it
        finally:
            layer.close()
        bounds = [b.grad_bounds.stats() for b in volunteer.host.backends.values() if b.grad_bounds is not None]
    if clip:
        assert poisoned < 3 * clip * honest, (poisoned, honest, bounds)
        assert all(b["clipped_rows"] > 0 and b["largest_ratio"] > 100 for b in bounds), bounds
    else:
        assert poisoned > 100 * honest and not bounds, (poisoned, honest)


def test_gradient_bounds_one_trainer_cannot_raise_the_median_of_several():
    bounds = GradientBounds(clip=4.0)
    for source in ("a", "b", "c"):
        for _ in range(5):
            bounds.bound([torch.ones(4, 3)], source)
    reference = bounds.reference()
    for _ in range(200):
        (clipped,) = bounds.bound([torch.full((4, 3), 1e4)], "d")
        assert float(clipped.norm(dim=1).max()) <= 4.0 * reference * 1.0001
    assert bounds.reference() == pytest.approx(reference)  # a poisoner among honest trainers moves nothing


def test_a_liar_alters_only_its_rate_of_answers_and_stale_answers_use_the_old_weights():
    expert = make_expert("ffn", HID)
    x = torch.randn(5, HID)
    with torch.no_grad():
        y = expert(x)
    assert torch.equal(Liar("sign_flip").forward(expert, [x], (y,))[0], -y)
    assert torch.equal(Liar("scale").forward(expert, [x], (y,))[0], 10 * y)
    assert not torch.equal(Liar("noise").forward(expert, [x], (y,))[0], y)
    stale = Liar("stale")
    stale.take_snapshot(expert)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(1.0)
        y_new = expert(x)
    assert torch.allclose(stale.forward(expert, [x], (y_new,))[0], y)
    half = Liar("sign_flip", rate=0.5, seed=0)
    lies = sum(torch.equal(half.forward(expert, [x], (y,))[0], -y) for _ in range(400))
    assert 150 < lies < 250 and half.counters()["lies"] == lies


def test_with_two_replicas_the_layers_answers_screen_a_host_whose_every_answer_is_scaled():
    """Each expert on 2 of 6 hosts: no expert's own replicas can outvote a liar, the layer's other hosts can."""
    health = HealthRegistry()
    checks = AnswerChecks(health, lambda uid: [], lambda e: "none", None, ban_time=60.0)
    generator = torch.Generator().manual_seed(0)
    hosts = [f"h{i}:1" for i in range(6)]
    dropped: dict[str, int] = {}
    for step in range(40):
        for cell in range(16):  # ffn.a.b on hosts cell % 6 and (cell + 3) % 6; h0 answers 10x
            uid = f"ffn.{cell // 4}.{cell % 4}"
            scale = 0.5 + cell / 16  # the experts of a layer differ, within the screen's limit of each other
            for host in (hosts[cell % 6], hosts[(cell + 3) % 6]):
                y = torch.randn(4, HID, generator=generator) * scale * (10.0 if host == "h0:1" else 1.0)
                if checks.screen(uid, host, y) is not None:
                    dropped[host] = dropped.get(host, 0) + 1
    assert set(dropped) == {"h0:1"}, dropped  # never an honest host's answer
    exclusion = health.excluded("ffn.0.0", "h0:1")
    assert exclusion is not None and "x the scale of the layer's last answers here" in exclusion.describe()
    assert not any(health.excluded(f"ffn.{c // 4}.{c % 4}", h) for h in hosts[1:] for c in range(16))


def test_two_disagreeing_replicas_blame_neither_and_a_majority_blames_the_odd_one():
    health = HealthRegistry()
    checks = AnswerChecks(health, lambda uid: [], lambda e: "none", None, ban_time=60.0)
    y = torch.randn(4, HID)
    for _ in range(16):  # calibration: honest replicas agree within about 1%
        assert checks.judge("ffn.0.1", {"a:1": y, "b:1": y * 1.01, "c:1": y * 0.99}) is None
    for _ in range(8):  # a pair cannot outvote a liar in one cell (nor across cells: they have no other partner)
        assert checks.judge("ffn.0.1", {"a:1": y, "b:1": -y}) is None
    assert health.excluded("ffn.0.1", "a:1") is None and health.excluded("ffn.0.1", "b:1") is None
    for _ in range(6):
        assert checks.judge("ffn.0.1", {"a:1": y, "b:1": y * 1.01, "c:1": -y}) == "c:1"
    exclusion = health.excluded("ffn.0.1", "c:1")
    assert exclusion is not None and "outputs disagree with 2 replicas of ffn.0.1" in exclusion.describe()
    assert health.excluded("ffn.0.1", "a:1") is None and health.excluded("ffn.0.1", "b:1") is None


@pytest.mark.parametrize("liars, rate", [(("h0:1",), 1.0), (("h0:1", "h3:1"), 1.0), (("h0:1", "h3:1"), 0.5)])
def test_with_two_replicas_a_host_outvoted_across_its_cells_is_excluded_and_its_partners_never(liars, rate):
    """Each cell on 2 of 6 hosts, one cell per pair of hosts (the liars share none): no cell's pair can outvote a liar,
    but a liar disagrees with every partner, and an honest host only with the liars."""
    health = HealthRegistry()
    checks = AnswerChecks(health, lambda uid: [], lambda e: "none", None, ban_time=60.0, seed=0)
    rng = torch.Generator().manual_seed(0)
    hosts = [f"h{i}:1" for i in range(6)]
    cells = [(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1:] if not (a in liars and b in liars)]
    lies = torch.Generator().manual_seed(1)
    blamed = []
    for check in range(400):
        uid = f"ffn.{check % len(cells)}"
        y = torch.randn(8, HID, generator=rng)
        answers = {}
        for host in cells[check % len(cells)]:
            honest = y * (1 + 0.02 * torch.randn(8, HID, generator=rng))  # replicas drift a little apart
            lying = host in liars and health.excluded(uid, host) is None and torch.rand(1, generator=lies) < rate
            answers[host] = -honest if lying else honest
        if any(health.excluded(uid, host) is not None for host in answers):
            continue  # an excluded host is no longer asked
        who = checks.judge(uid, answers)
        if who is not None:
            blamed.append(who)
    assert sorted(blamed) == sorted(liars), (blamed, checks.figures())
    for liar in liars:
        reason = health.excluded("ffn.0", liar).describe()
        assert "outputs disagree with the replicas on" in reason and "two-way spot checks" in reason, reason
    assert not any(health.excluded("ffn.0", host) for host in hosts if host not in liars)


def test_the_layers_of_a_process_pool_their_votes_across_cells():
    """A liar lies in every layer: 3 disagreements seen by each of two layers exclude it, as 6 in one layer would."""
    health = HealthRegistry()
    layers = [AnswerChecks(health, lambda uid: [], lambda e: "none", None, ban_time=60.0) for _ in range(2)]
    y = torch.randn(4, HID)
    for checks in layers:
        for _ in range(16):  # calibration, per layer: honest pairs agree within about 1%
            assert checks.judge("ffn.0.0", {"h1:1": y, "h2:1": y * 1.01}) is None
    blamed = []
    for i in range(3):
        for checks, partner in zip(layers, ("h1:1", "h2:1")):
            blamed.append(checks.judge(f"ffn.{i}.1", {"liar:1": -y, partner: y}))
    assert blamed == [None] * 5 + ["liar:1"]
    assert "outputs disagree with the replicas on 2 other hosts" in health.excluded("ffn.0.0", "liar:1").describe()


def test_gross_disagreements_count_across_cells_before_any_calibration():
    """Beyond MAX_TOLERANCE is gross whatever the calibration: a liar at r=2 is outvoted from the first checks on."""
    health = HealthRegistry()
    checks = AnswerChecks(health, lambda uid: [], lambda e: "none", None, ban_time=60.0)
    y = torch.randn(4, HID)
    assert checks.judge("ffn.0.0", {"h1:1": y, "h2:1": y * 1.01}) is None  # h1 and h2 agree once: vouched
    blamed = [checks.judge(f"ffn.{i}.1", {"liar:1": -y, f"h{1 + i % 2}:1": y}) for i in range(6)]
    assert blamed == [None] * 5 + ["liar:1"] and len(checks.calibration()) < 16
    assert "outputs disagree with the replicas on 2 other hosts" in health.excluded("ffn.0.0", "liar:1").describe()
    assert health.excluded("ffn.0.0", "h1:1") is None and health.excluded("ffn.0.0", "h2:1") is None


class _NowExecutor:
    """Runs a spot check at once, in the caller's thread."""

    def submit(self, fn, *args):
        fn(*args)


def test_a_suspected_host_and_its_partners_are_spot_checked_at_the_higher_rate_until_checks_clear_them(monkeypatch):
    """A gross disagreement makes both hosts of the check suspects: their answers are checked at SUSPECT_RATE, the
    others' still at the base rate, until agreeing checks push the disagreement out of their records."""
    monkeypatch.setattr(spot_checks, "get_executor", _NowExecutor)
    monkeypatch.setattr(spot_checks, "call_expert", lambda uid, endpoint, *args: [torch.ones(8, HID)])
    health = HealthRegistry()
    checks = AnswerChecks(health, lambda uid: ["a:1", "b:1"], lambda e: "none", None, rate=0.02, seed=0)
    y = torch.ones(8, HID)
    for _ in range(16):  # calibration: from here on two-way checks count across cells
        checks.judge("ffn.1.1", {"c:1": y, "d:1": y, "e:1": y})
    x, y = torch.randn(16, HID), torch.ones(16, HID)

    def checked(endpoint: str, answers: int) -> int:
        return sum(checks.maybe_check("ffn.0.0", endpoint, x, y) for _ in range(answers))

    assert checks.rate_for("a:1") == 0.02 and checked("a:1", 200) < 12  # about 4
    health.votes.record("a:1", "b:1", False)
    assert [checks.rate_for(h) for h in ("a:1", "b:1", "c:1")] == [SUSPECT_RATE, SUSPECT_RATE, 0.02]
    assert checked("c:1", 40) < 4
    assert checked("a:1", 40) >= 5  # about 10; at the base rate about 1
    assert checked("a:1", 2000) < 80  # once 16 checks agreed, back to the base rate
    assert checks.rate_for("a:1") == 0.02 and health.excluded("ffn.0.0", "a:1") is None
    checks.rate = 0.0  # spot checks off: off for suspects too
    health.votes.record("a:1", "b:1", False)
    assert checks.rate_for("a:1") == 0.0 and checked("a:1", 100) == 0


def test_byzantine_and_spot_check_keys_fail_by_name():
    with pytest.raises(ConfigError, match="host.byzantine must be one of"):
        host_config(byzantine="lie")
    with pytest.raises(ConfigError, match=r"host.byzantine_rate must be in \[0, 1\]"):
        host_config(byzantine_rate=1.5)
    with pytest.raises(ConfigError, match="host.grad_clip"):
        host_config(grad_clip=0.5)
    for key, value in (("spot_check_rate", 0.9), ("spot_check_tolerance", 0.0), ("liar_ban_time", 0.0), ("poison", -1.0)):
        with pytest.raises(ConfigError, match=f"moe.{key}"):
            check_moe(OmegaConf.structured(DecentralizedMoEConfig(**{key: value})))
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        config = compose("config", overrides=["moe=decentralized", "host.byzantine=stale", "moe.poison=1000"])
        with pytest.raises(ConfigCompositionException, match="byzantin"):
            compose("config", overrides=["host.byzantin=stale"])
    assert config.host.byzantine == "stale" and config.moe.poison == 1000 and config.moe.spot_check_rate == 0.02
