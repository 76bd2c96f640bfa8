"""EMPG on RLlib: one iteration per algorithm and environment, the advantage that reaches the loss,
resume equivalence, env-runner death, crashed environments and non-finite losses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from empg_rllib.core import metrics
from empg_rllib.core.advantages import empg_modulate, group_advantages
from empg_rllib.core.scoring import score_responses
from empg_rllib.workflows import models
from empg_rllib.workflows.runs import latest_checkpoint
from empg_rllib.workflows.training import build_algorithm, flatten, train
from tests.helpers import experiment, k3_by_hand, lm_weights

ENVS = {"alfworld": {}, "webshop": {}, "deepsearch": {}, "twx/coin": {}}
ALGORITHMS = {
    "grpo": {"loss": "grpo", "empg": {"enabled": False}, "kl_coef": 0.01},
    "dapo": {"loss": "dapo", "empg": {"enabled": False}},
    "dapo+empg": {"loss": "dapo", "empg": {"enabled": True}},
}


def decided_by_sampled_tokens(algo) -> list:
    """An outcome double for the untrained tiny model, which wins (almost) nothing, so that DAPO
    would drop every group and no algorithm would have an advantage to learn from: the real
    environment plays every training episode, then in each group the member(s) whose first
    response has the smallest token ids win (score 1) and the others lose (score 0). Only a
    group whose members all sampled the same first response keeps equal outcomes. Returns the
    episodes as the environment played them."""
    played: list = []
    sample = algo.sample_episodes

    def relabelled(requests, **kwargs):
        episodes = sample(requests, **kwargs)
        if kwargs.get("evaluation"):
            return episodes
        played.extend(episodes)
        best: dict[str, tuple[int, ...]] = {}
        for e in episodes:
            first = tuple(e.turns[0].response_ids)
            best[str(e.group)] = min(best.get(str(e.group), first), first)
        return [
            replace(e, won=tuple(e.turns[0].response_ids) == best[str(e.group)],
                    score=float(tuple(e.turns[0].response_ids) == best[str(e.group)]))
            for e in episodes
        ]

    algo.sample_episodes = relabelled
    return played


@pytest.mark.slow
@pytest.mark.parametrize("env", list(ENVS))
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_one_iteration_every_algorithm_and_env(ray_cluster, model_path, tmp_path, env, name):
    """Every algorithm updates the policy on every environment: outcomes that differ within each
    group (decided_by_sampled_tokens) give every algorithm, DAPO's dynamic sampling included,
    a non-zero advantage to learn from."""
    exp = experiment(tmp_path, env=env, **ALGORITHMS[name])
    algo = build_algorithm(exp, model_path)
    try:
        played = decided_by_sampled_tokens(algo)
        before = lm_weights(algo)
        result = algo.train()
        after = lm_weights(algo)
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert runners["num_episodes"] == len(played) == exp.tasks_per_batch * exp.group_size
    # The runners' success rate is the environment's own outcome of the episodes played.
    assert runners["success_rate"] == pytest.approx(np.mean([e.won for e in played]))
    if exp.loss == "dapo":
        assert result["dropped_groups"] == 0  # every group has a winner and a loser
    assert result["train_turns"] == sum(len(e.turns) for e in played)
    assert result["sampler_learner_logp_gap_mean"] < 1e-3  # same fp32 weights on both sides
    assert result["advantage_abs_mean"] > 1e-3
    assert result["learners"]["default_policy"]["optimizer_steps"] == 1
    assert result["learners"]["default_policy"]["skipped_update"] == 0
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert all(torch.isfinite(v).all() for v in after.values())


def test_one_empg_iteration_runs_and_logs(ray_cluster, model_path, tmp_path):
    """The fast-suite version of the matrix above: EMPG with GRPO and KL on deepsearch, two
    epochs over the batch so that the second step's policy is no longer the reference."""
    exp = experiment(tmp_path, env="deepsearch", kl_coef=0.01, num_epochs=2)
    algo = build_algorithm(exp, model_path)
    try:
        kl_parts = k3_by_hand(algo.learner_group._learner)
        result = algo.train()
    finally:
        algo.stop()
    assert result["env_runners"]["num_episodes"] == 4
    assert result["empg_g_mean"] == pytest.approx(1.0, abs=1e-6)
    for key in ("step_entropy_p50", "confident_error_share", "weight_sync_s", "sampler_learner_logp_gap_mean"):
        assert np.isfinite(result[key]), key
    # Every step belongs to a won or a lost episode: one mean or both, the overall mean between them.
    by_outcome = [result[k] for k in ("step_entropy_mean_success", "step_entropy_mean_failure") if k in result]
    assert by_outcome and np.all(np.isfinite(by_outcome))
    assert min(by_outcome) - 1e-9 <= result["step_entropy_mean"] <= max(by_outcome) + 1e-9
    # The logged KL is the k3 estimate from the log-probs each step trained on, per token and
    # averaged over the steps: 0 in the first (the policy is the reference), > 0 in the second.
    stats = result["learners"]["default_policy"]
    assert stats["optimizer_steps"] == 2 and len(kl_parts) % 2 == 0
    half = len(kl_parts) // 2
    per_step = [sum(k for k, _ in part) / sum(n for _, n in part) for part in (kl_parts[:half], kl_parts[half:])]
    assert per_step[0] == pytest.approx(0.0, abs=1e-9)
    assert per_step[1] > 1e-3  # ~5e-2 here: one step at lr 1e-4 from the reference
    assert stats["kl"] == pytest.approx(np.mean(per_step), rel=1e-3, abs=1e-7)  # float32 sums
    # The iteration's wall time by part: every part it ran took time, and they add up to it.
    split = metrics.time_split(flatten(result))
    assert all(split[part] > 0 for part in ("sampling", "scoring", "update", "weight_sync"))
    assert split["evaluation"] == 0 and split["other"] >= 0
    assert sum(v for k, v in split.items() if k != "total") == pytest.approx(split["total"])
    assert split["total"] == pytest.approx(result["time_this_iter_s"])
    # The turns' prompts, all of them computed from their first token or not, per engine second.
    assert result["env_runners"]["prompt_tokens_mean"] > 10 and result["env_runners"]["prompt_tokens_per_s"] > 0


def test_constrained_actions_are_scored_as_sampled(ray_cluster, model_path, tmp_path):
    """With constrained decoding the learner must score the renormalised distribution the
    sampler drew from: an unmasked learner would be off by several nats per token."""
    exp = experiment(
        tmp_path, env="alfworld", loss="grpo", constrain_actions=True, list_admissible_actions=False,
        max_new_tokens=48, env_config={"task_types": ["look_at_obj_in_light"]},
    )
    algo = build_algorithm(exp, model_path)
    try:
        before = lm_weights(algo)
        result = algo.train()
        after = lm_weights(algo)
    finally:
        algo.stop()
    assert result["env_runners"]["invalid_action_rate"] == 0.0
    assert result["env_runners"]["format_error_rate"] == 0.0
    assert result["sampler_learner_logp_gap_max"] < 1e-3
    assert result["step_entropy_p50"] < 5.0  # a handful of allowed tokens, not the vocabulary
    assert all(torch.isfinite(v).all() for v in after.values())
    assert (result["advantage_abs_mean"] > 1e-9) == any(not torch.equal(before[k], v) for k, v in after.items())


def test_advantage_reaching_the_loss_is_empg_of_the_step(ray_cluster, model_path, tmp_path):
    # Micro-batches in plan order: the loss sees the rows in the batch's order (that grouping
    # rows by length changes no loss or gradient is tested in test_learner.py).
    exp = experiment(tmp_path, env="deepsearch", tasks_per_batch=3, group_size=3, max_turns=4,
                     empg={"zeta": 0.5, "k": 2.0}, length_bucketing=False)
    algo = build_algorithm(exp, model_path)
    seen: dict = {}
    try:
        learner = algo.learner_group._learner
        compute_loss = learner._loss

        def recording_loss(batch, fwd_out, normalizer):
            seen.setdefault("token_adv", []).append(batch["token_adv"].numpy().copy())
            seen.setdefault("resp_mask", []).append(batch["resp_mask"].numpy().copy())
            return compute_loss(batch, fwd_out, normalizer)

        learner._loss = recording_loss
        sample = algo.sample_episodes

        def recording_sample(requests, **kwargs):
            seen["episodes"] = sample(requests, **kwargs)
            return seen["episodes"]

        algo.sample_episodes = recording_sample
        tokenizer, model = models.load(model_path)
        algo.train()
    finally:
        algo.stop()

    # Independently: group advantages from outcomes, step entropies from a teacher-forced pass of
    # the initial weights at the sampling temperature, then empg_modulate over all steps.
    episodes = seen["episodes"]
    turns = [(i, t, turn) for i, ep in enumerate(episodes) for t, turn in enumerate(ep.turns)]
    _, entropies = score_responses(
        model, [x[2].prompt_ids for x in turns], [x[2].response_ids for x in turns], tokenizer.pad_token_id, exp.temperature
    )
    base = group_advantages([e.reward for e in episodes], [e.group for e in episodes])
    expected = empg_modulate(
        [np.mean(h) for h in entropies],
        [x[0] for x in turns],
        [x[1] for x in turns],
        base[[x[0] for x in turns]],
        k=2.0,
        zeta=0.5,
    )
    token_adv = np.concatenate([a for a in seen["token_adv"]])
    resp_mask = np.concatenate([m for m in seen["resp_mask"]])
    assert len(token_adv) == len(turns)
    for row, (_, _, turn) in enumerate(turns):
        values = token_adv[row][resp_mask[row] > 0]
        assert len(values) == len(turn.response_ids)
        # Entropies agree to ~1e-6 between the two passes (different padding widths), but batch
        # min-max normalisation over an untrained model's narrow entropy range amplifies that;
        # a wiring error (wrong step, wrong trajectory, per-shard statistics) is off by ~0.1.
        np.testing.assert_allclose(values, expected[row], rtol=1e-2, atol=1e-3)


def test_resume_continues_exactly(ray_cluster, model_path, tmp_path):
    exp = experiment(tmp_path / "a", env="deepsearch", iterations=2, checkpoint_every=1)
    train(exp, model_path)
    first = latest_checkpoint(tmp_path / "a" / exp.name)
    assert first is not None and first.name == "checkpoint_000002"
    uninterrupted = build_algorithm(exp, model_path)
    try:
        uninterrupted.restore_from_path(str(first / "algorithm"))
        final_weights = lm_weights(uninterrupted)
    finally:
        uninterrupted.stop()

    # Remove the final checkpoint: --resume then continues from iteration 1 and must land on
    # the same weights as the run that never stopped.
    import shutil

    shutil.rmtree(first)
    assert latest_checkpoint(tmp_path / "a" / exp.name).name == "checkpoint_000001"
    summary = train(exp, model_path, resume=True)
    assert summary["iterations"] == 2 and len(summary["history"]) == 1
    resumed = build_algorithm(exp, model_path)
    try:
        resumed.restore_from_path(str(latest_checkpoint(tmp_path / "a" / exp.name) / "algorithm"))
        resumed_weights = lm_weights(resumed)
    finally:
        resumed.stop()
    for key, value in final_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=1e-6)


def test_resume_without_checkpoint_is_an_error(ray_cluster, model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(experiment(tmp_path, env="deepsearch"), model_path, resume=True)


def test_killed_env_runner_is_restarted_and_counted(ray_cluster, model_path, tmp_path):
    import ray

    exp = experiment(tmp_path, env="deepsearch", num_env_runners=1, iterations=3)
    algo = build_algorithm(exp, model_path)
    try:
        algo.train()
        actor = algo.env_runner_group._worker_manager.actors()[1]
        ray.kill(actor, no_restart=False)
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
        assert algo.env_runner_group.num_remote_worker_restarts() >= 1
        assert result["env_runners"]["num_env_runner_restarts"] >= 1
    finally:
        algo.stop()


def test_non_finite_loss_skips_the_update(ray_cluster, model_path, tmp_path):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    algo = build_algorithm(experiment(tmp_path, env="deepsearch"), model_path)
    try:
        before = lm_weights(algo)
        ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
        batch = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "resp_mask": np.array([[0, 1, 1]], dtype=np.float32),
            "old_logp": np.zeros((1, 3), dtype=np.float32),
            "token_adv": np.array([[0, np.nan, 1.0]], dtype=np.float32),
        }
        results = algo.learner_group.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=1))
        assert results[0]["default_policy"]["skipped_update"] == 1
        after = lm_weights(algo)
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        algo.stop()


@pytest.mark.parametrize("case", ["agree", "over_tolerance", "stale_weights"])
def test_the_samplers_scores_stand_in_for_the_scoring_pass_when_they_agree(ray_cluster, model_path, tmp_path, monkeypatch, case):
    """`reuse_sampler_scores` (HF engine, fp32): the sampler's log-probs and entropies agree with
    the learner's pass over every row to 1e-4, and are taken after a check of a few rows; when the
    check fails (a tolerance no gap meets), or a turn was sampled by other weights than the
    learner's, the whole batch is scored as before."""
    from empg_rllib.algorithm import empg

    if case == "over_tolerance":
        monkeypatch.setattr(empg, "REUSE_TOLERANCE", -1.0)
    exp = experiment(tmp_path, env="deepsearch", tasks_per_batch=2, group_size=2, max_turns=3,
                     reuse_sampler_scores=True, reuse_check_rows=2)
    algo = build_algorithm(exp, model_path)
    if case == "stale_weights":
        algo._policy_version = 7  # as if the runners had not loaded the learner's weights
    seen: dict = {"scored_rows": []}
    try:
        score_batch, score_steps = algo.score_batch, algo.score_steps

        def counting(columns):
            seen["scored_rows"].append(len(columns["input_ids"]))
            return score_batch(columns)

        def comparing(episodes):
            batch, scores, entropy = score_steps(episodes)
            seen["full"] = score_batch({k: getattr(batch, k) for k in ("input_ids", "attention_mask", "resp_mask")})
            seen["batch"], seen["scores"] = batch, scores
            return batch, scores, entropy

        algo.score_batch, algo.score_steps = counting, comparing
        result = algo.train()
    finally:
        algo.stop()
    batch, scores, full = seen["batch"], seen["scores"], seen["full"]
    mask = batch.resp_mask > 0
    for key in ("token_logp", "token_entropy"):
        assert np.abs(scores[key] - full[key])[mask].max() < 1e-4
    if case == "agree":
        assert seen["scored_rows"] == [2] and result["sampler_scores_reused"] == 1
        np.testing.assert_array_equal(scores["token_entropy"], batch.sampler_entropy)
        assert 0 < result["sampler_score_gap"] < 1e-4
        assert 0 < result["sampler_learner_logp_gap_max"] <= result["sampler_score_gap"]  # the checked rows'
    else:
        checked = [2] if case == "over_tolerance" else []
        assert seen["scored_rows"] == [*checked, len(batch)] and result["sampler_scores_reused"] == 0


def test_reusing_the_samplers_scores_needs_the_hf_engine_fp32_synchronous_and_no_kl(tmp_path):
    from empg_rllib.config.schema import ConfigError

    for bad in ({"engine": "vllm"}, {"kl_coef": 0.1}, {"dtype": "bfloat16"}, {"async": {"enabled": True}, "num_env_runners": 1}):
        with pytest.raises(ConfigError, match="reuse_sampler_scores takes the sampler's scores"):
            experiment(tmp_path, env="deepsearch", reuse_sampler_scores=True, **bad)
