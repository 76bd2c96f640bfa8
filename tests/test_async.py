"""Asynchronous actor-learner: the reorder queue, the policy-lag bound, decoupled PPO's weight,
async off = the synchronous algorithm, and resume without losing or repeating a task."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from empg_rllib.algorithm.empg import EMPG
from empg_rllib.config.schema import ConfigError
from empg_rllib.core.losses import policy_loss, truncated_importance_weight
from empg_rllib.core.records import Episode, EpisodeRequest, Turn
from empg_rllib.sampling.async_sampling import GroupQueue
from empg_rllib.workflows.training import build_algorithm
from tests.helpers import experiment, lm_weights

ASYNC = {"env": "deepsearch", "num_env_runners": 2, "env_workers": 2}


def played(group: str, versions: list[int]) -> list[Episode]:
    turn = dict(prompt_ids=[1], response_ids=[2], logprobs=[-1.0], entropies=None, finish_reason="stop",
                action="a", format_error=None)
    return [Episode("t", "x", 0, group, [Turn(weights_version=v, **turn)]) for v in versions]


def test_queue_hands_out_groups_in_draw_order_and_drops_stale_and_incomplete_ones():
    queue = GroupQueue()
    for g in "abcd":
        queue.add_group(g, [EpisodeRequest(seed=0, group=g)] * 2)
    queue.file(["b"], played("b", [3, 3]))
    assert not queue.take(1, version=3, max_lag=1).ready  # "a" is still being played
    queue.file(["a", "c"], played("a", [1, 2]) + played("c", [3]))  # a: lag 2; c: a member short
    queue.file(["d"], played("d", [2, 3]))
    found = queue.take(2, version=3, max_lag=1)
    assert found.ready and (found.dropped_stale, found.dropped_incomplete) == (1, 1)
    assert [e.group for e in found.episodes] == ["b", "b", "d", "d"] and found.lags == [0, 1]
    assert queue.untrained() == []


def test_truncated_importance_weight_scales_each_tokens_surrogate():
    proximal = np.log(np.array([[0.5, 0.9, 0.2]], dtype=np.float32))
    behaviour = np.log(np.array([[0.5, 0.3, 0.4]], dtype=np.float32))
    mask = np.array([[1, 1, 0]], dtype=np.float32)
    weight = truncated_importance_weight(proximal, behaviour, mask, cap=2.0)
    np.testing.assert_allclose(weight, [[1.0, 2.0, 1.0]], rtol=1e-6)  # 0.9 / 0.3 = 3, capped at 2
    logp = torch.log(torch.tensor([[0.6, 0.8, 0.1]]))
    adv, m = torch.ones(1, 3), torch.tensor(mask)
    plain, _ = policy_loss(logp, torch.tensor(proximal), adv, m, aggregation="seq_mean_token_sum")
    weighted, _ = policy_loss(logp, torch.tensor(proximal), adv, m, aggregation="seq_mean_token_sum",
                              behaviour_weight=torch.tensor(weight))
    ratio = torch.exp(logp - torch.tensor(proximal))[0, :2].clamp(0.8, 1.2)
    torch.testing.assert_close(plain, -ratio.sum())
    torch.testing.assert_close(weighted, -(ratio * torch.tensor([1.0, 2.0])).sum())


def test_async_needs_remote_runners(tmp_path):
    with pytest.raises(ConfigError, match="num_env_runners >= 1"):
        experiment(tmp_path, **{"async": {"enabled": True}})


def test_async_off_is_the_synchronous_algorithm(ray_cluster, model_path, tmp_path):
    runs = []
    for block in ({}, {"async": {"enabled": False, "max_policy_lag": 0, "is_weight_cap": 1.5}}):
        algo = build_algorithm(experiment(tmp_path / str(len(runs)), env="deepsearch", **block), model_path)
        try:
            algo.train()
            algo.train()
            runs.append(lm_weights(algo))
        finally:
            algo.stop()
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def train(exp, model_path, iterations: int) -> list[dict]:
    algo = build_algorithm(exp, model_path)
    try:
        return [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()


def trained_groups(monkeypatch, spans: list | None = None) -> list[list[tuple[str, int]]]:
    """Record the (group, task seed) pairs of every batch an async run trains on, and in `spans`
    when each wait for a batch started and ended (time.perf_counter)."""
    batches: list[list[tuple[str, int]]] = []
    original = EMPG._sample_async

    def recording(self):
        started = time.perf_counter()
        episodes = original(self)
        if spans is not None:
            spans.append((started, time.perf_counter()))
        batches.append(list(dict.fromkeys((str(e.group), e.seed) for e in episodes)))
        return episodes

    monkeypatch.setattr(EMPG, "_sample_async", recording)
    return batches


@pytest.mark.timeout(600)
def test_async_run_records_policy_lag_and_resumes_without_loss_or_repetition(
    ray_cluster, model_path, tmp_path, monkeypatch
):
    spans: list[tuple[float, float]] = []
    batches = trained_groups(monkeypatch, spans)
    exp = experiment(tmp_path, **ASYNC, **{"async": {"enabled": True, "max_policy_lag": 10}})
    results = train(exp, model_path, 3)
    uninterrupted = [g for batch in batches for g in batch]
    assert len(uninterrupted) == 3 * exp.tasks_per_batch
    for updates_before, result in enumerate(results):
        # No turn comes from a policy newer than the learner's, nor older than its first.
        assert 0 <= result["policy_lag_mean"] <= result["policy_lag_max"] <= updates_before
        # Decoupled PPO's weight is truncated at the cap.
        assert 0.0 < result["is_weight_mean"] <= exp.async_.is_weight_cap
    # The learner's idle fraction: the wait for this batch over the time since the last one.
    assert len(spans) == 3
    for (_, last), (started, got), result in zip(spans, spans[1:], results[1:]):
        assert result["learner_idle_fraction"] == pytest.approx((got - started) / (got - last), abs=0.02)
    assert results[-1]["env_runners"]["num_stale_groups_dropped_lifetime"] == 0

    batches.clear()
    algo = build_algorithm(exp, model_path)
    try:
        algo.train()
        saved = str(tmp_path / "ckpt")
        algo.save_to_path(saved)
    finally:
        algo.stop()
    resumed = build_algorithm(exp, model_path)
    try:
        resumed.restore_from_path(saved)
        resumed.train()
        resumed.train()
    finally:
        resumed.stop()
    assert [g for batch in batches for g in batch] == uninterrupted


@pytest.mark.timeout(600)
def test_with_max_policy_lag_0_every_trained_turn_comes_from_the_current_policy(ray_cluster, model_path, tmp_path):
    exp = experiment(tmp_path, **ASYNC, **{"async": {"enabled": True, "max_policy_lag": 0}})
    results = train(exp, model_path, 3)
    assert all(r["policy_lag_max"] == 0 for r in results)
    # The sampler draws no group that would be stale when trained: nothing is thrown away.
    assert results[-1]["env_runners"]["num_stale_groups_dropped_lifetime"] == 0
