"""A trainer's checks of what hosts answer (issue #21): a cheap statistical screen of every forward answer, and spot
checks of a few rows against other replicas of the same expert. A host caught lying is excluded through the health
registry with the reason (``outputs disagree with 2 replicas of ffn.1.3 ...``).

- *Screen.* Each answer's scale (log of its RMS) is compared with the median of the expert's recent answers on this
  trainer (``HISTORY`` answers, those that passed). One off by more than ``SCALE_LIMIT`` x, when at least two other
  hosts' answers back that median, is dropped (the call counts as failed, its rows are re-routed) and is a strike
  against its host; ``STRIKES`` strikes within ``STRIKE_WINDOW`` seconds exclude it. Non-finite answers are always
  dropped. While an expert's own history is not backed by two other hosts (fewer than 3 replicas: a pair cannot
  outvote a liar), the answer is compared with the layer's: the median of its experts' last ``LAYER_HISTORY`` answers,
  when at least two other hosts back it (a layer's experts share an architecture; a host whose every answer is 10x
  is off from all of them).
- *Spot checks.* A random ``rate`` of the answers (one expert's rows in one forward) also send up to ``CHECK_ROWS`` of
  their rows to up to 2 other replicas of the expert, in the background: the step does not wait; a check not answered
  within ``CHECK_TIMEOUT`` is dropped, and at most ``MAX_IN_FLIGHT`` run at once (more are skipped). The answers are
  compared by relative L2 difference. The tolerance is calibrated from honest replicas: ``TOLERANCE_FACTOR`` x the
  ``TOLERANCE_QUANTILE`` of the closest pair's difference in recent three-way checks, at least ``tolerance`` and at
  most ``MAX_TOLERANCE``. With 3 answers the closest pair, if it agrees, is the majority, and the third is outvoted if
  it is farther than the tolerance (and ``TOLERANCE_FACTOR`` x the pair's difference) from both. Nobody is blamed
  before ``MIN_CALIBRATION`` three-way checks; a host outvoted in ``OUTVOTED_TO_EXCLUDE`` of its last ``VERDICTS``
  three-way checks is excluded. With 2 answers a disagreement is counted (``mismatches``) and blames neither replica
  of that cell; gross disagreements (beyond ``MAX_TOLERANCE``, farther than honest replicas were ever seen apart,
  a bound that needs no calibration) go, from the first check on, to the process's
  :class:`~lightning_moe.client.votes.CrossCellVotes`, which outvotes a host across the cells it shares with others.
  A host with a gross disagreement or an outvote remembered is suspected, and its answers are checked at
  ``SUSPECT_RATE`` (at least ``rate``) until a verdict clears or excludes it: checks cost little where nobody is
  suspected and a liar is judged within a few steps.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lightning_moe.client.health import HealthRegistry
from lightning_moe.client.parallel_call import get_executor
from lightning_moe.client.remote_expert import RemoteExpertError, call_expert

logger = logging.getLogger(__name__)

HISTORY = 64
LAYER_HISTORY = 256  # the layer's answers (all its experts) that back the screen while an expert's own replicas cannot
WARMUP = 8
SCALE_LIMIT = 4.0
STRIKES = 3
STRIKE_WINDOW = 60.0
VERDICTS = 16  # a host's last three-way spot checks remembered
OUTVOTED_TO_EXCLUDE = 6  # of those, outvoted ones that exclude it (a liar at byzantine_rate >= 0.5 gets there)
CHECK_TIMEOUT = 10.0
CHECK_ROWS = 8  # rows of an answer a spot check sends again
MAX_IN_FLIGHT = 8
TOLERANCE_FACTOR = 4.0
TOLERANCE_QUANTILE = 0.9
MAX_TOLERANCE = 0.6
SUSPECT_RATE = 0.25  # the share of a suspected host's answers spot-checked
MIN_CALIBRATION = 16  # three-way comparisons seen before a verdict may blame a host
MAX_EXPERTS = 4096  # experts whose history is kept (least recently answered forgotten first)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||a||, ||b||)`` (0 for two zeros)."""
    a, b = a.double(), b.double()
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale > 0 else 0.0


class AnswerChecks:
    """One layer's screen and spot checks (thread-safe: spot checks finish in the call threads).

    Args:
        health: where liars are excluded.
        replicas: the endpoints serving an expert uid (the layer's DHT cache).
        codec: the compression of calls to an endpoint.
        secret: a private swarm's secret, for the checks' requests.
        rate: the share of answers (one expert's rows in one forward) spot-checked, up to ``CHECK_ROWS`` rows each
            (0: none; the screen still runs).
        tolerance: the least relative difference between two replicas' answers that counts as disagreement.
        ban_time: seconds a liar stays excluded.
    """

    def __init__(self, health: HealthRegistry, replicas: Callable[[str], Sequence[str]], codec: Callable[[str], str],
                 secret: bytes | None, rate: float = 0.02, tolerance: float = 0.1, ban_time: float = 600.0,
                 seed: int | None = None):
        self.health, self.replicas, self.codec, self.secret = health, replicas, codec, secret
        self.rate, self.tolerance_floor, self.ban_time = float(rate), float(tolerance), float(ban_time)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._history: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()  # uid -> (endpoint, scale)
        self._layer: collections.deque = collections.deque(maxlen=LAYER_HISTORY)  # every expert's (endpoint, scale)
        self._strikes: dict[tuple[str, str], collections.deque] = {}  # (kind, endpoint) -> strike times
        self._verdicts: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()  # endpoint -> outvoted?
        self._agreeing: collections.deque[float] = collections.deque(maxlen=256)  # differences of agreeing replicas
        self._in_flight = 0
        self.counts = collections.Counter()  # screened, odd_answers, spot_checks, compared, mismatches, ...
        self.excluded: dict[str, str] = {}  # endpoint -> why (the last exclusion)

    # ---- the screen ------------------------------------------------------------------------------------
    def screen(self, uid: str, endpoint: str, output: torch.Tensor) -> str | None:
        """None if ``output`` (an answer of ``uid`` at ``endpoint``) looks like the expert's answers; else why not."""
        if not output.numel():
            return None
        finite = bool(torch.isfinite(output).all())
        scale = math.log(max(float(output.double().pow(2).mean().sqrt()), 1e-30)) if finite else math.inf
        with self._lock:
            self.counts["screened"] += 1
            history = self._history.pop(uid, None)
            if history is None:
                history = collections.deque(maxlen=HISTORY)
            self._history[uid] = history
            while len(self._history) > MAX_EXPERTS:
                self._history.popitem(last=False)
            judge = self._judge(history, endpoint) or self._judge(self._layer, endpoint)
            if finite and (judge is None or abs(scale - judge[0]) <= math.log(SCALE_LIMIT)):
                history.append((endpoint, scale))
                self._layer.append((endpoint, scale))
                return None
            self.counts["odd_answers"] += 1
        if not finite:
            reason = f"answer of {uid} holds non-finite values"
        else:
            typical, what = judge
            reason = f"answer of {uid} is {math.exp(scale - typical):.3g}x the scale of {what}"
        self._strike("screen", endpoint, STRIKES, f"{reason} ({STRIKES} such answers within {STRIKE_WINDOW:g} s)")
        return reason

    def _judge(self, history: collections.deque, endpoint: str) -> tuple[float, str] | None:
        """The typical scale of ``history`` and what it holds, if at least two other hosts back it; else None."""
        if len(history) < WARMUP:
            return None
        typical = statistics.median(s for _, s in history)
        if self._backers(history, endpoint, typical) < 2:
            return None
        what = "the layer's last answers here, from other hosts" if history is self._layer else \
            f"its last {len(history)} answers here, from other replicas"
        return typical, what

    @staticmethod
    def _backers(history: collections.deque, endpoint: str, typical: float) -> int:
        """Other hosts whose answers in ``history`` (2 or more) are typically of the scale ``typical``."""
        scales: dict[str, list[float]] = {}
        for e, scale in history:
            if e != endpoint:
                scales.setdefault(e, []).append(scale)
        return sum(len(v) >= 2 and abs(statistics.median(v) - typical) <= math.log(SCALE_LIMIT) for v in scales.values())

    def _strike(self, kind: str, endpoint: str, needed: int, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._strikes.setdefault((kind, endpoint), collections.deque(maxlen=needed))
            times.append(now)
            if len(self._strikes) > MAX_EXPERTS:  # bounded: forget the oldest keys
                self._strikes.pop(next(iter(self._strikes)))
            if len(times) < needed or now - times[0] > STRIKE_WINDOW:
                return
            times.clear()
            for uid, history in self._history.items():  # its answers no longer speak for the experts' scale
                self._history[uid] = collections.deque(((e, v) for e, v in history if e != endpoint), maxlen=HISTORY)
            self.counts["liars_excluded"] += 1
            self.excluded[endpoint] = reason
            while len(self.excluded) > MAX_EXPERTS:
                self.excluded.pop(next(iter(self.excluded)))
        logger.warning("excluding host %s for %g s: %s", endpoint, self.ban_time, reason)
        self.health.exclude_host(endpoint, self.ban_time, reason)

    # ---- spot checks -----------------------------------------------------------------------------------
    def tolerance(self) -> float:
        """The relative difference beyond which two replicas' answers disagree now."""
        with self._lock:
            seen = sorted(self._agreeing)
        typical = seen[int(TOLERANCE_QUANTILE * (len(seen) - 1))] if seen else 0.0
        return min(max(TOLERANCE_FACTOR * typical, self.tolerance_floor), MAX_TOLERANCE)

    def maybe_check(self, uid: str, endpoint: str, inputs: torch.Tensor, output: torch.Tensor) -> bool:
        """With probability ``rate``, send up to ``CHECK_ROWS`` random rows of this answer (``inputs`` answered with
        ``output`` by ``uid`` at ``endpoint``) to other replicas, in the background; True if a check went out."""
        if self.rate <= 0 or not len(inputs) or self.rng.random() >= self.rate_for(endpoint):
            return False
        chosen = sorted(self.rng.sample(range(len(inputs)), min(CHECK_ROWS, len(inputs))))
        others = [e for e in self.replicas(uid) if e != endpoint and self.health.excluded(uid, e) is None]
        if not others:
            with self._lock:
                self.counts["no_replica"] += 1
            return False
        with self._lock:
            if self._in_flight >= MAX_IN_FLIGHT:
                self.counts["spot_checks_skipped"] += 1
                return False
            self._in_flight += 1
            self.counts["spot_checks"] += 1
        rows = torch.tensor(chosen)
        others = self.rng.sample(others, min(2, len(others)))
        get_executor().submit(self._run, uid, endpoint, inputs[rows].clone(), output[rows].clone(), others)
        return True

    def rate_for(self, endpoint: str) -> float:
        """The share of ``endpoint``'s answers spot-checked now: ``SUSPECT_RATE`` while it is suspected (a gross
        disagreement across cells, or an outvote in this layer, remembered), else ``rate``."""
        with self._lock:
            outvoted = any(self._verdicts.get(endpoint, ()))
        if self.rate > 0 and (outvoted or self.health.votes.suspected(endpoint)):
            return max(self.rate, SUSPECT_RATE)
        return self.rate

    def _run(self, uid: str, endpoint: str, inputs: torch.Tensor, output: torch.Tensor, others: list[str]) -> None:
        try:
            answers = {endpoint: output}
            for other in others:
                try:
                    answer = call_expert(uid, other, "forward", [inputs], self.codec(other), CHECK_TIMEOUT, self.secret)
                except RemoteExpertError as e:
                    logger.debug("spot check of %s at %s dropped: %s", uid, other, e)
                    continue
                if len(answer) == 1 and answer[0].shape == output.shape:
                    answers[other] = answer[0].to(output.dtype)
            self.judge(uid, answers, asked=endpoint)
        except Exception:  # noqa: BLE001 - a check is best effort; it must never break the caller's threads
            logger.exception("spot check of %s failed", uid)
        finally:
            with self._lock:
                self._in_flight -= 1

    def judge(self, uid: str, answers: dict[str, torch.Tensor], asked: str | None = None) -> str | None:
        """Compare replicas' answers to the same rows (endpoint -> answer); returns the endpoint found lying, if any."""
        if len(answers) < 2:
            with self._lock:
                self.counts["spot_checks_dropped"] += 1
            return None
        tolerance = self.tolerance()
        endpoints = list(answers)
        pairs = {(a, b): relative_difference(answers[a], answers[b])
                 for i, a in enumerate(endpoints) for b in endpoints[i + 1:]}
        (a, b), closest = min(pairs.items(), key=lambda item: item[1])
        with self._lock:
            self.counts["compared"] += 1
            if closest > tolerance:
                self.counts["mismatches"] += 1
            if len(answers) > 2 or closest <= tolerance:  # of 3 answers, the closest two are the honest ones
                self._agreeing.append(closest)
            calibrated = len(self._agreeing) >= MIN_CALIBRATION
        if len(answers) == 2:  # gross is beyond MAX_TOLERANCE whatever the calibration: counted from the first check
            blamed = self._across_cells(uid, a, b, closest)
            if blamed is not None or closest <= tolerance:
                return blamed
        if closest > tolerance:
            logger.info("spot check of %s: the answers of %s disagree (relative differences %s, tolerance %.3f)%s", uid,
                        endpoints, [round(d, 3) for d in pairs.values()], tolerance,
                        "; two replicas cannot outvote a liar" if len(answers) == 2 else "; no two agree")
            return None
        odd = next((e for e in endpoints if e not in (a, b)), None)
        if odd is None or not calibrated:
            return None
        away = min(pairs.get((odd, e), pairs.get((e, odd), 0.0)) for e in (a, b))
        outvoted = away > max(tolerance, TOLERANCE_FACTOR * closest)
        with self._lock:
            self.counts["mismatches"] += outvoted
            self.counts["outvoted"] += outvoted
            for endpoint in endpoints:
                verdicts = self._verdicts.pop(endpoint, None) or collections.deque(maxlen=VERDICTS)
                verdicts.append(outvoted and endpoint == odd)
                self._verdicts[endpoint] = verdicts
            while len(self._verdicts) > MAX_EXPERTS:
                self._verdicts.popitem(last=False)
            against = sum(self._verdicts[odd])
            if against >= OUTVOTED_TO_EXCLUDE:
                self._verdicts[odd].clear()
        if not outvoted:
            return None
        if against >= OUTVOTED_TO_EXCLUDE:
            self._strike("spot", odd, 1, f"outputs disagree with 2 replicas of {uid} (relative difference {away:.3g}, "
                                         f"replicas agree within {closest:.3g}, tolerance {tolerance:.3g}; outvoted in "
                                         f"{against} of its last {VERDICTS} spot checks)")
        return odd

    def _across_cells(self, uid: str, a: str, b: str, difference: float) -> str | None:
        """Record a two-way check of ``a`` against ``b`` with the process's other layers' (a gross disagreement:
        beyond ``MAX_TOLERANCE``); the host that other hosts outvote across cells, excluded; else None."""
        verdict = self.health.votes.record(a, b, difference <= MAX_TOLERANCE)
        if verdict is None:
            return None
        suspect, peers, against, checks = verdict
        with self._lock:
            self.counts["outvoted_across_cells"] += 1
        self._strike("spot", suspect, 1, f"outputs disagree with the replicas on {len(peers)} other hosts (in {against} "
                                         f"of its last {checks} two-way spot checks, each of those hosts less often; "
                                         f"the latest: {uid}, relative difference {difference:.3g}, beyond "
                                         f"{MAX_TOLERANCE:.3g})")
        return suspect

    def figures(self) -> dict[str, int]:
        """Counts so far: ``screened``, ``odd_answers``, ``spot_checks``, ``compared``, ``mismatches``, ``outvoted``,
        ``liars_excluded``, ``spot_checks_skipped`` (too many in flight), ``spot_checks_dropped`` (no second answer),
        ``no_replica``."""
        with self._lock:
            return dict(self.counts)

    def calibration(self) -> list[float]:
        """The closest pairs' relative differences the tolerance is calibrated from, sorted."""
        with self._lock:
            return sorted(self._agreeing)

    @property
    def in_flight(self) -> int:
        """Spot checks out now."""
        with self._lock:
            return self._in_flight
