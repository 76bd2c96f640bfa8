"""What several test modules share: the small experiment every Ray test derives its own from,
building an algorithm of it, the learner tests' synthetic batches, and reading an algorithm's
weights and metrics.

Test modules import from here, never from one another. Nothing here imports Ray at import time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# One generator of synthetic learner rows, shared with the benchmarks.
from benchmarks._common import random_rows

#: The small experiment: two tasks of two rollouts each, a few short turns, one iteration, no
#: checkpoint before the end. Each test derives what it needs with `{**SMALL, ...}`.
SMALL: dict[str, Any] = {
    "tasks_per_batch": 2,
    "group_size": 2,
    "max_turns": 3,
    "max_new_tokens": 12,
    "micro_batch_size": 4,
    "checkpoint_every": 0,
    "iterations": 1,
}

#: The learner tests' experiment (test_learner, test_lora, test_deepspeed): one deepsearch task,
#: shorter turns, DAPO at lr 1e-3 (so that a step visibly moves the weights), and the schema's
#: micro-batch size, which takes every synthetic batch below (<= 8 rows) in one micro-batch.
LEARNER = {
    **SMALL,
    "env": "deepsearch",
    "tasks_per_batch": 1,
    "max_turns": 2,
    "max_new_tokens": 8,
    "micro_batch_size": 8,
    "loss": "dapo",
    "lr": 1e-3,
}


def experiment(tmp_path, **overrides):
    """The validated SMALL experiment with its run directory under `tmp_path`."""
    from empg_rllib.config.loading import validate

    return validate({**SMALL, "run_dir": str(tmp_path), **overrides})


def train_one_iteration(exp, model_path) -> dict:
    """The result of one training iteration of `exp`, its algorithm stopped."""
    from empg_rllib.workflows.training import build_algorithm

    algo = build_algorithm(exp, model_path)
    try:
        return algo.train()
    finally:
        algo.stop()


def build(tmp_path, model_path, **overrides):
    """An algorithm of the LEARNER experiment (with `overrides`), its run directory under
    `tmp_path`."""
    from empg_rllib.config.loading import validate
    from empg_rllib.workflows.training import build_algorithm

    return build_algorithm(validate({**LEARNER, "run_dir": str(tmp_path), **overrides}), model_path)


def lm_weights(algo) -> dict[str, torch.Tensor]:
    """A copy of the local learner's LM weights."""
    module = algo.learner_group._learner.module["default_policy"]
    return {k: v.detach().clone() for k, v in module.lm.state_dict().items()}


def k3_by_hand(learner) -> list[tuple[float, float]]:
    """Record, for every micro-batch the learner's loss sees, the k3 KL to the reference summed
    by hand over its response tokens (from the policy and reference log-probs it is given) and
    its token count."""
    seen: list[tuple[float, float]] = []
    compute_loss = learner._loss

    def recording_loss(batch, fwd_out, normalizer):
        mask = batch["resp_mask"] > 0
        delta = (batch["ref_logp"].double() - fwd_out["token_logp"].detach().double())[mask]
        seen.append(((torch.exp(delta) - delta - 1.0).sum().item(), float(mask.sum())))
        return compute_loss(batch, fwd_out, normalizer)

    learner._loss = recording_loss
    return seen


def synthetic_batch(rows: int = 9, seed: int = 0, vocab: int = 500) -> dict[str, np.ndarray]:
    """Left-padded rows of random prompt + response ids (responses of 1-6 tokens, right-aligned)."""
    return random_rows(rows, vocab, seed)


def train_batch(algo, columns: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """The columns plus the current policy's log-probs as the behaviour log-probs and random
    per-token advantages."""
    scores = algo.score_batch(columns)
    adv = np.random.default_rng(seed).normal(size=columns["resp_mask"].shape).astype(np.float32)
    return {**columns, "old_logp": scores["token_logp"].astype(np.float32), "token_adv": adv * columns["resp_mask"]}


def reduced(results: dict) -> dict[str, float]:
    """A learner's reduced metrics of the default module as plain numbers."""
    return {k: v.peek() if hasattr(v, "peek") else v for k, v in results["default_policy"].items()}


class DeadEngine:
    """An inference engine whose core has died: every batch raises."""

    weights_version = 0

    def generate(self, prompts, params, choices=None, seeds=None):
        raise RuntimeError("engine core died")
