"""Evaluation apart from training: evaluation episodes are reported under `evaluation/<split>/`
alone, never in `env_runners/` nor in lifetime env steps; and the live progress the driver
reports of every batch it samples."""

from __future__ import annotations

import pytest

from empg_rllib.config.loading import validate
from empg_rllib.workflows.training import build_algorithm
from tests.helpers import SMALL

EVAL_EPISODES = 3


@pytest.fixture(scope="module", params=[0, 1], ids=["local-runner", "remote-runner"])
def two_iterations(request, ray_cluster, model_path, tmp_path_factory):
    """Two iterations that each evaluate, with a direct `evaluate_splits` call between them;
    results of all three, every progress record the driver reported, and the episodes of each
    evaluation as the driver got them."""
    exp = validate(
        {
            **SMALL,
            "env": "deepsearch",
            "iterations": 2,
            "num_env_runners": request.param,
            "run_dir": str(tmp_path_factory.mktemp("run")),
            "evaluation": {"interval": 1, "splits": ["eval_unseen"], "episodes": EVAL_EPISODES},
        }
    )
    seen = []
    algo = build_algorithm(exp, model_path, on_sampling=seen.append)
    evaluated = []
    sample = algo.sample_episodes

    def recording(requests, **kwargs):
        episodes = sample(requests, **kwargs)
        if kwargs.get("evaluation"):
            evaluated.append(episodes)
        return episodes

    algo.sample_episodes = recording
    try:
        first = algo.train()
        between = algo.evaluate_splits(episodes=2)
        second = algo.train()
    finally:
        algo.stop()
    return exp, first, between, second, seen, request.param, evaluated


def test_evaluation_episodes_stay_out_of_training_metrics(two_iterations):
    exp, first, between, second, _, _, evaluated = two_iterations
    batch = exp.tasks_per_batch * exp.group_size
    assert [len(episodes) for episodes in evaluated] == [EVAL_EPISODES, 2, EVAL_EPISODES]
    for result, episodes in ((first, evaluated[0]), (second, evaluated[2])):
        runners = result["env_runners"]
        assert runners["num_episodes"] == batch
        # GRPO trains every turn it sampled: the env steps are the training turns alone.
        assert runners["num_env_steps_sampled"] == result["train_turns"]
        assert runners["episode_len_mean"] == pytest.approx(result["train_turns"] / batch)
        evaluation = result["evaluation"]["eval_unseen"]
        assert evaluation["episodes"] == EVAL_EPISODES
        # The evaluation's own episodes, not the training batch's.
        assert evaluation["success_rate"] == pytest.approx(sum(e.won for e in episodes) / EVAL_EPISODES)
        assert evaluation["score_mean"] == pytest.approx(sum(e.score for e in episodes) / EVAL_EPISODES)
        assert evaluation["episode_len_mean"] == pytest.approx(sum(len(e.turns) for e in episodes) / EVAL_EPISODES)
    # Neither the evaluation inside the iterations nor the one between them counts.
    assert second["env_runners"]["num_env_steps_sampled_lifetime"] == first["train_turns"] + second["train_turns"]
    assert between["eval_unseen"]["episodes"] == 2
    assert between["eval_unseen"]["success_rate"] == pytest.approx(sum(e.won for e in evaluated[1]) / 2)


def test_progress_of_every_batch_is_reported(two_iterations):
    exp, first, _, _, seen, remote, _ = two_iterations
    batch = exp.tasks_per_batch * exp.group_size
    first_iteration = [p for p in seen if p.label == "iteration 1/2"]
    start, done = first_iteration[0], first_iteration[-1]
    assert (start.finished, start.done, start.runners) == (0, False, remote)
    assert done.done and done.finished == batch and done.env_steps == first["train_turns"]
    assert done.generated_tokens >= done.env_steps
    live = first_iteration[1:-1]
    if remote:
        assert not live  # remote episodes reach the driver only when their runner is done
    else:
        # the driver's own runner reports after every engine batch, counts only growing
        assert len(live) >= 1
        steps = [p.env_steps for p in first_iteration[:-1]]
        assert steps == sorted(steps) and steps[-1] == first["train_turns"]
    evaluations = [p for p in seen if p.evaluation]
    assert {p.label for p in evaluations} == {"evaluating eval_unseen"}
    assert [p.episodes for p in evaluations if p.done] == [EVAL_EPISODES, 2, EVAL_EPISODES]
