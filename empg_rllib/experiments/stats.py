"""Statistics over a group's runs: a metric's curve over training (mean over seeds, band from
the lowest to the highest), and a late-training mean."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from empg_rllib.experiments.run_logs import Run


@dataclass
class Curve:
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def curve(
    runs: Sequence[Run], tag: str, x_tag: str | None = None, low_tag: str | None = None, high_tag: str | None = None
) -> Curve | None:
    """Per training iteration: the mean of `tag` over the runs that logged it (and `x_tag`), and
    a band from the lowest `low_tag` to the highest `high_tag` over them (default: `tag`); x is
    the iteration, or the mean of `x_tag`. None when no run has a point."""
    points = []
    for iteration in sorted({i for r in runs for i in r.scalars.get(tag, {})}):
        having = [r for r in runs if r.at(tag, iteration) is not None
                  and (x_tag is None or r.at(x_tag, iteration) is not None)]
        if not having:
            continue
        xs = [iteration] if x_tag is None else [r.at(x_tag, iteration) for r in having]
        ys = [r.at(tag, iteration) for r in having]
        lows = [v for r in having if (v := r.at(low_tag or tag, iteration)) is not None] or ys
        highs = [v for r in having if (v := r.at(high_tag or tag, iteration)) is not None] or ys
        points.append((np.mean(xs), np.mean(ys), min(lows), max(highs)))
    if not points:
        return None
    x, mean, low, high = (np.asarray(column, dtype=float) for column in zip(*points))
    return Curve(x, mean, low, high)


def late_mean(run: Run, tag: str) -> float | None:
    """Mean of `tag` over the run's last quarter of iterations (at least one): a per-type rate
    from a handful of episodes per batch is too noisy to read at a single iteration."""
    series = run.scalars.get(tag)
    if not series:
        return None
    iterations = sorted(series)
    late = iterations[-max(1, math.ceil(len(iterations) / 4)):]
    return statistics.fmean(series[i] for i in late)


