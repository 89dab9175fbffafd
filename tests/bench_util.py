"""Helpers shared by the benchmarks: a baseline interleaved with the measured run, median and spread.

A shared machine drifts (other processes, frequency, caches), so a baseline measured once, before
or after, can be off by a factor of two. :func:`interleave` runs baseline, measured, baseline,
measured, ..., baseline, and divides each measured figure by the mean of the baselines just
before and after it; :func:`spread` writes ``median X (min A, max B)``.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

Report = Callable[[str], None]
REPORT: Report = functools.partial(print, flush=True)


def spread(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``median X<unit> (min A, max B)`` of ``values``."""
    return (f"median {statistics.median(values):.{digits}f}{unit} "
            f"(min {min(values):.{digits}f}, max {max(values):.{digits}f})")


@dataclass
class Interleaved:
    """Figures of an interleaved run: ``rounds + 1`` baselines, ``rounds`` measured runs and their ratios."""

    baselines: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def interleave(
    baseline: Callable[[], float],
    measure: Callable[[], float],
    rounds: int,
    baseline_label: str,
    measured_label: str,
    show: Callable[[float], str],
    ratio_label: str = "ratio",
    report: Report = REPORT,
) -> Interleaved:
    """Run ``baseline``, then ``rounds`` times ``measure`` and ``baseline``; report every figure as it comes.

    Labels are templates with ``{i}`` (the index of the run); ``show`` formats a figure. Round
    ``i``'s ratio is ``measured[i] / mean(baselines[i], baselines[i + 1])``, reported as
    ``round i: <ratio_label> R``.
    """
    if rounds < 1:
        raise ValueError(f"need at least one round, got {rounds}")
    figures = Interleaved()
    figures.baselines.append(baseline())
    report(f"{baseline_label.format(i=0)}: {show(figures.baselines[-1])}")
    for i in range(rounds):
        figures.measured.append(measure())
        report(f"{measured_label.format(i=i)}: {show(figures.measured[-1])}")
        figures.baselines.append(baseline())
        report(f"{baseline_label.format(i=i + 1)}: {show(figures.baselines[-1])}")
        figures.ratios.append(figures.measured[-1] / statistics.mean(figures.baselines[-2:]))
        report(f"round {i}: {ratio_label} {figures.ratios[-1]:.2f}")
    return figures
