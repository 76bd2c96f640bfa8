"""Does a model's step entropy say whether a step is right? The statistics behind `empg calibrate`
and the confident-error share training logs. Pure numpy; one value per step (an LLM turn) and
the outcome of the trajectory the step belongs to.

EMPG amplifies confident steps and damps uncertain ones, which helps where failed trajectories
are the uncertain ones. The AUROC of the step entropy for "this step belongs to a failed
trajectory" measures that: 0.5 is no signal, 1 a perfect one, below 0.5 the reverse (failures
act confidently, and EMPG would amplify them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Verdict thresholds on the step-level AUROC and its bootstrap interval.
SIGNAL_AUROC = 0.60
#: Bootstrap resamples (of trajectories) for each interval.
BOOTSTRAP_RESAMPLES = 1000
#: The interval's coverage.
INTERVAL = 0.95


def confident_errors(entropy: np.ndarray, base_advantage: np.ndarray) -> np.ndarray:
    """Which steps are confident errors: below the batch's median step entropy, in a trajectory
    with a negative (outcome) advantage."""
    return (entropy < np.median(entropy)) & (base_advantage < 0)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a random positive has a higher `score` than a random negative, ties
    counting half (the Mann-Whitney U over both counts); NaN when either class is empty."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class Estimate:
    """A statistic and its percentile bootstrap interval (NaN where undefined)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in
                (("value", self.value), ("low", self.low), ("high", self.high))}


def auroc_estimate(
    score: np.ndarray, positive: np.ndarray, cluster: np.ndarray, seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Estimate:
    """`auroc` with an interval from resampling whole clusters (e.g. a task's group of
    rollouts) with replacement: the steps of one cluster are not independent, so resampling steps
    would understate the width. Resamples with a single class are left out of the interval."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    value = auroc(score, positive)
    if np.isnan(value):
        return Estimate(value, value, value)
    ids, members = np.unique(cluster, return_inverse=True)
    rows_of = [np.flatnonzero(members == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(ids), len(ids))])
        draw = auroc(score[rows], positive[rows])
        if not np.isnan(draw):
            draws.append(draw)
    if not draws:
        return Estimate(value, float("nan"), float("nan"))
    tail = 100 * (1 - INTERVAL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def success_by_decile(entropy: np.ndarray, won: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Steps sorted by entropy into `bins` equal-count bins (fewer when there are fewer steps):
    each bin's entropy range, its step count and the share of its steps in won trajectories."""
    order = np.argsort(entropy, kind="stable")
    out = []
    for rows in np.array_split(order, min(bins, len(order))):
        out.append({
            "entropy_low": float(entropy[rows].min()),
            "entropy_high": float(entropy[rows].max()),
            "steps": int(len(rows)),
            "success_rate": float(np.asarray(won)[rows].mean()),
        })
    return out


def failed_weight_share(weight: np.ndarray, failed: np.ndarray) -> float:
    """The share of the total |weight| (an advantage per step) that lands on failed trajectories'
    steps; NaN when all weights are 0 (every group had one outcome)."""
    magnitude = np.abs(np.asarray(weight, dtype=np.float64))
    total = magnitude.sum()
    return float(magnitude[np.asarray(failed, dtype=bool)].sum() / total) if total > 0 else float("nan")


def verdict(step: Estimate) -> tuple[str, str]:
    """A label ("signal", "weak signal", "none", "reversed", "undefined") and a sentence, from
    the step-level AUROC of entropy for failure and its interval."""
    if np.isnan(step.value):
        return "undefined", ("Every trajectory had the same outcome, so there is nothing to tell apart: "
                             "choose settings where both success and failure occur.")
    if np.isnan(step.low):
        return "undefined", "The bootstrap found no resample with both outcomes: play more episodes."
    if step.low > 0.5 and step.value >= SIGNAL_AUROC:
        return "signal", (f"Failed trajectories' steps are the uncertain ones (AUROC {step.value:.2f}, interval "
                          f"above 0.5 and the value at least {SIGNAL_AUROC}): EMPG's entropy modulation has "
                          "a signal to work with; sweeping k, k_f and zeta is worth it.")
    if step.low > 0.5:
        return "weak signal", (f"Failed trajectories' steps are somewhat more uncertain (AUROC {step.value:.2f}, "
                               f"interval above 0.5 but the value below {SIGNAL_AUROC}): expect a small effect "
                               "from EMPG; check with a short sweep before a long one.")
    if step.high < 0.5:
        return "reversed", (f"Failed trajectories' steps are the confident ones (AUROC {step.value:.2f}, interval "
                            "below 0.5): EMPG would amplify the steps of failures; do not expect it to help "
                            "here, and lower k.")
    return "none", (f"Step entropy does not separate failed from successful trajectories (AUROC {step.value:.2f}, "
                    "interval includes 0.5): EMPG's modulation would act on noise; sweeping k, k_f and zeta "
                    "is likely wasted compute at this stage (a warm start or easier settings may change it).")
