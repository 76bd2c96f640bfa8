"""What the algorithm logs about each training batch: the sampler-learner log-prob gap, the
distribution of step entropies, confident errors, entropy by outcome, and EMPG's terms."""

from __future__ import annotations

from typing import Any

import numpy as np

from empg_rllib.core import metrics
from empg_rllib.core.advantages import EMPGTerms
from empg_rllib.core.batch import TurnBatch
from empg_rllib.core.calibration import confident_errors


def log_batch_diagnostics(
    logger: Any,
    batch: TurnBatch,
    scores: dict[str, np.ndarray],
    entropy: np.ndarray,
    base: np.ndarray,
    won: np.ndarray,
    step_adv: np.ndarray,
    terms: EMPGTerms | None,
) -> None:
    """Log into RLlib's MetricsLogger `logger`. `entropy` (H_t), `base` (the outcome advantage)
    and `won` (the episode's outcome) have one value per step."""
    mask = batch.resp_mask > 0
    if scores["token_logp"] is not batch.sampler_logp:  # reused sampler scores: their check logged the gap
        gap = np.abs(batch.sampler_logp - scores["token_logp"])[mask]
        logger.log_value(metrics.SAMPLER_LEARNER_LOGP_GAP_MEAN, float(gap.mean()) if gap.size else 0.0, window=1)
        logger.log_value(metrics.SAMPLER_LEARNER_LOGP_GAP_MAX, float(gap.max()) if gap.size else 0.0, window=1)
    logger.log_value(metrics.STEP_ENTROPY_MEAN, float(entropy.mean()), window=1)
    for q in metrics.STEP_ENTROPY_PERCENTILES:
        logger.log_value(metrics.step_entropy_percentile(q), float(np.percentile(entropy, q)), window=1)
    logger.log_value(metrics.STEP_ENTROPY_VALUES, entropy.tolist(), reduce="item_series", window=1)
    logger.log_value(metrics.CONFIDENT_ERROR_SHARE, float(confident_errors(entropy, base).mean()), window=1)
    # Entropy vs outcome: do failed trajectories act as confidently as successful ones?
    # A batch without a won (or lost) episode logs no value rather than a made-up one.
    for outcome, steps in zip(metrics.OUTCOMES, (won, ~won)):
        if steps.any():
            logger.log_value(metrics.step_entropy_mean_of(outcome), float(entropy[steps].mean()), window=1)
    logger.log_value("train_turns", len(batch), window=1)
    logger.log_value("advantage_abs_mean", float(np.abs(step_adv).mean()), window=1)
    if terms is not None:
        for name, values in zip(metrics.EMPG_TERMS, (terms.g, terms.f_next[terms.has_next])):
            if values.size:
                for stat in metrics.EMPG_STATS:
                    logger.log_value(metrics.empg_term(name, stat), float(getattr(values, stat)()), window=1)
