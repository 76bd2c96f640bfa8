"""Where the time went: one iteration's parts, the sum over a run, the demo's phases."""

from __future__ import annotations

import pytest

from empg_rllib.core import metrics
from empg_rllib.workflows.demo import time_split as demo_time_split
from empg_rllib.workflows.training import total_time


def test_an_iterations_time_is_split_into_its_parts_and_the_rest():
    scalars = {metrics.SAMPLING_S: 5.0, metrics.LEARNER_SCORE_S: 1.0, metrics.LEARNER_UPDATE_S: 3.0,
               metrics.WEIGHT_SYNC_S: 0.5, metrics.ITERATION_S: 10.0}
    split = metrics.time_split(scalars)
    assert split == {"sampling": 5.0, "scoring": 1.0, "update": 3.0, "weight_sync": 0.5, "evaluation": 0.0,
                     "other": pytest.approx(0.5), "total": 10.0}
    # Without RLlib's iteration time the parts are all there is; timers never make `other` negative.
    assert metrics.time_split({metrics.SAMPLING_S: 2.0})["total"] == 2.0
    assert metrics.time_split({metrics.SAMPLING_S: 2.0, metrics.ITERATION_S: 1.999})["other"] == 0.0


def test_a_runs_time_is_the_sum_of_its_iterations():
    history = [{"iteration": i, "time_s": {"sampling": 1.0 * i, "update": 2.0, "other": 0.5, "total": 3.5}}
               for i in (1, 2)]
    assert total_time(history) == {"sampling": 3.0, "update": 4.0, "other": 1.0, "total": 7.0}
    assert total_time([{"iteration": 1}]) == {}


def test_the_demos_time_adds_up_to_its_wall_time():
    phases = {"model": 1.0, "sft": 30.0, "evaluation_before_rl": 22.0, "rl": 100.0, "evaluation_after_rl": 21.0}
    sft = {"collect_s": 10.0, "train_s": 18.0, "heldout_s": 1.5}
    before = {"eval_seen": {metrics.WALL_S: 10.0}, "eval_unseen": {metrics.WALL_S: 11.0}}
    after = {"eval_seen": {metrics.WALL_S: 9.0}, "eval_unseen": {metrics.WALL_S: 11.5}}
    rl = {"sampling": 50.0, "scoring": 10.0, "update": 30.0, "weight_sync": 1.0, "evaluation": 0.0,
          "other": 2.0, "total": 93.0}
    split = demo_time_split(phases, sft, before, after, rl, wall=180.0)
    assert split["sft_other"] == pytest.approx(0.5)
    assert split["evaluation_before_rl/eval_unseen"] == 11.0 and split["evaluation_before_rl/start"] == 1.0
    assert split["evaluation_after_rl/start"] == pytest.approx(0.5)
    assert split["rl/sampling"] == 50.0 and "rl/total" not in split
    assert split["rl/outside_iterations"] == 7.0
    assert split["other"] == pytest.approx(180.0 - 174.0)
    assert sum(split.values()) == pytest.approx(180.0)
    # A model that starts without SFT has no SFT parts.
    no_sft = demo_time_split({**phases, "sft": 0.0}, None, before, after, rl, wall=150.0)
    assert not any(k.startswith("sft") for k in no_sft) and sum(no_sft.values()) == pytest.approx(150.0)
