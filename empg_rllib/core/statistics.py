"""Summary statistics of results: mean and spread over seeds, and the standard error of a
change in success rate. Pure Python."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def success_gain(before: dict[str, float], after: dict[str, float]) -> tuple[float, float | None]:
    """The change in success rate from `before` to `after` (evaluation results with
    `success_rate` and `episodes`) and its binomial standard error, the two rates counted as
    independent samples: sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2); None without episodes."""
    p1, n1 = before["success_rate"], before["episodes"]
    p2, n2 = after["success_rate"], after["episodes"]
    if not n1 or not n2:
        return p2 - p1, None
    return p2 - p1, math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def success_gains(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float | None]]:
    """Per split evaluated both times: the gain in success rate and its standard error."""
    return {split: dict(zip(("gain", "se"), success_gain(before[split], after[split]))) for split in before if split in after}
