"""A user's agent as the rollout: its calls through the endpoint become the episode's turns (the
learner scores them alike), crashes are retried and groups dropped whole, its own repeated error
stops the run naming it, bad agent settings fail at validation, an agent plays its own package's
task dataset, and the example agent package trains one iteration on the tiny model through Ray."""

from __future__ import annotations

import functools
import re
from collections import defaultdict

import numpy as np
import pytest
import torch

import empg_envs
from empg_rllib.config.agents import register
from empg_rllib.config.loading import load, validate
from empg_rllib.config.schema import ConfigError
from empg_rllib.core.batch import build_turn_batch
from empg_rllib.core.records import EnvFailure, EpisodeRequest, RolloutStats, whole_groups
from empg_rllib.core.scoring import response_scores
from empg_rllib.sampling.agents.rollout import run_agent_episodes
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.hf import HFEngine
from empg_rllib.sampling.prompting import chat_ids
from tests.env_doubles import FaultyEnv
from tests.helpers import SMALL, DeadEngine, train_one_iteration

SAMPLING = SamplingParams(max_new_tokens=8, temperature=0.9)
SENT: dict[str, list[list[dict]]] = defaultdict(list)  # what the planner agent sent, by task id
ATTEMPTS: dict[int, int] = defaultdict(int)  # the flaky agent's attempts, by seed


async def planner(task, client, *, calls: int = 2):
    """Asks `calls` times, keeping its history, then acts with the last answer."""
    messages = [{"role": "system", "content": "Plan, then answer."}, {"role": "user", "content": task.instruction}]
    for _ in range(calls):
        SENT[task.task_id].append(list(messages))
        reply = await client.chat.completions.create(model="policy", messages=messages)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "Go on."}]
    await task.step(reply.choices[0].message.content)
    return task.score


async def flaky(task, client):
    """Seed 7 fails on every attempt, each time differently; seed 8 fails its first attempt."""
    seed = int(task.task_id.split("/")[1])
    ATTEMPTS[seed] += 1
    if seed == 7 or (seed == 8 and ATTEMPTS[seed] == 1):
        raise RuntimeError(f"lost the connection to the tool server (attempt {ATTEMPTS[seed]})")
    return await planner(task, client, calls=1)


async def broken(task, client):
    raise KeyError("observation")


async def stubborn(task, client):
    """Catches its environment's crash and reports a reward all the same."""
    await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": task.instruction}])
    try:
        await task.step("even")
    except Exception:  # noqa: BLE001 - the point of the test
        pass
    return 1.0


async def no_reward(task, client):
    await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])


class Stepper:
    """A class agent: made with its config, once per episode."""

    made = 0

    def __init__(self, action: str = "ok") -> None:
        self.action = action
        Stepper.made += 1

    async def run(self, task, client):
        await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": task.instruction}])
        await task.step(self.action)
        return task.score


for name, agent in [("test-planner", planner), ("test-flaky", flaky), ("test-broken", broken),
                    ("test-no-reward", no_reward), ("test-stepper", Stepper), ("test-stubborn", stubborn)]:
    register(name, agent)


@pytest.fixture(scope="module")
def engine(tiny_model):
    tokenizer, model = tiny_model
    return HFEngine(model, tokenizer, seed=0)


def play(engine, agent, seeds, env=FaultyEnv, agent_config=None, **options):
    requests = [EpisodeRequest(seed=s, group=s // 2) for s in seeds]
    return run_agent_episodes(engine, engine.tokenizer, env, requests, SAMPLING, agent, agent_config, **options)


def test_each_call_of_the_agent_is_a_turn_recorded_as_sampled(engine, tiny_model):
    tokenizer, model = tiny_model
    stats = RolloutStats()
    episodes = play(engine, "test-planner", [0, 1, 2, 3], stats=stats)
    assert [e.seed for e in episodes] == [0, 1, 2, 3] and [e.group for e in episodes] == [0, 0, 1, 1]
    for episode in episodes:
        assert len(episode.turns) == 2
        for messages, turn in zip(SENT[episode.task_id], episode.turns):
            assert turn.prompt_ids == chat_ids(tokenizer, messages)
        answer = episode.turns[-1].action  # what the agent stepped with: the endpoint's text
        assert episode.won == (len(answer) % 2 == 0) and episode.score == float(episode.won)
    assert stats.episodes == 4 and stats.env_steps == 8 and stats.engine_batches >= 2
    batch = build_turn_batch(episodes, pad_id=tokenizer.pad_token_id)
    ids, mask, resp = (torch.as_tensor(getattr(batch, k)) for k in ("input_ids", "attention_mask", "resp_mask"))
    with torch.no_grad():
        logp, _ = response_scores(model, ids, mask, resp, SAMPLING.temperature)
    on = batch.resp_mask > 0
    assert np.abs(logp.numpy()[on] - batch.sampler_logp[on]).max() < 1e-4


def test_new_weights_are_pulled_before_every_engine_batch(engine):
    """Asynchronous sampling loads the newest weights in `before_batch`, as in the built-in rollout."""
    pulls, stats = [], RolloutStats()
    play(engine, "test-planner", [0, 1], stats=stats, before_batch=lambda: pulls.append(engine.weights_version))
    assert len(pulls) == stats.engine_batches >= 2


def test_a_class_agent_is_made_with_its_config_once_per_episode(engine):
    Stepper.made = 0
    episodes = play(engine, "test-stepper", [0, 1], agent_config={"action": "even"})
    assert all(e.won and e.score == 1.0 for e in episodes)  # "even" has an even length
    assert Stepper.made == 2


def test_copies_of_one_task_sample_with_their_own_seeds(engine):
    episodes = play(engine, "test-planner", [0, 0])  # one group: two copies of seed 0
    first, second = (e.turns[0] for e in episodes)
    assert first.prompt_ids == second.prompt_ids and first.response_ids != second.response_ids


def test_a_crashing_agent_is_retried_and_a_group_given_up_is_dropped_whole(engine):
    ATTEMPTS.clear()
    stats = RolloutStats()
    seeds = [6, 7, 8, 9]
    episodes = play(engine, "test-flaky", seeds, crash_retries=2, stats=stats)
    assert [e.seed for e in episodes] == [6, 8, 9]
    assert ATTEMPTS[7] == 3 and ATTEMPTS[8] == 2
    assert stats.crashed_episodes == 1 and stats.env_crashes == 4 and stats.crash_retries == 3
    kept, dropped = whole_groups([EpisodeRequest(seed=s, group=s // 2) for s in seeds], episodes)
    assert dropped == [3] and [e.seed for e in kept] == [8, 9]


@pytest.mark.parametrize("agent", ["test-stepper", "test-stubborn"])
def test_an_environment_crash_inside_the_agent_is_retried_and_the_crashed_env_never_reused(engine, agent):
    FaultyEnv.made = 0
    stats, pool = RolloutStats(), []
    episodes = play(engine, agent, [0, 1], env=lambda: FaultyEnv(crash_first=1), stats=stats, keep_envs=pool)
    assert len(episodes) == 2 and stats.crash_retries == 1 and stats.crashed_episodes == 0
    assert pool and not any(env.unwrapped.crashes for env in pool)


def test_the_engine_failing_stops_the_sampling_call_with_its_own_error(tiny_model):
    tokenizer, _ = tiny_model
    engine = DeadEngine()
    engine.tokenizer = tokenizer
    with pytest.raises(RuntimeError, match="engine core died"):
        play(engine, "test-planner", [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("agent", "env", "message"),
    [
        ("test-broken", FaultyEnv, r"agent 'test-broken' raised KeyError on all 3 attempts of seed 0: 'observation'"),
        ("test-no-reward", FaultyEnv, r"the agent must return the episode's reward \(a finite number\), got None"),
        ("test-stepper", lambda: FaultyEnv(error_at="step"), r"raised ValueError at step 1 of task faulty/\d"),
        ("test-stepper", lambda: FaultyEnv(error_at="reset"), r"raised ValueError at reset \(seed \d\)"),
    ],
)
def test_an_error_that_would_repeat_stops_the_run_naming_its_cause(engine, agent, env, message):
    with pytest.raises(EnvFailure, match=message):
        play(engine, agent, [0, 1], env=env, crash_retries=2)


def test_an_agent_plays_the_tasks_of_the_dataset_its_package_provides(engine):
    """The example package's `sums` dataset and `answer-sums` agent, through their entry points:
    the agent reads each task's record (its answer) and scores itself; no environment steps."""
    requests = [EpisodeRequest(seed=s, group=s // 2, task=t) for s, t in enumerate([0, 0, 5, 5])]
    make = functools.partial(empg_envs.make, "tasks/sums", split="eval_unseen")
    episodes = run_agent_episodes(engine, engine.tokenizer, make, requests, SAMPLING, "answer-sums", {"max_tokens": 8})
    record = make().unwrapped.tasks[5]
    assert [e.task_id for e in episodes] == ["sum-eval_unseen-40-20"] * 2 + [record["task_id"]] * 2
    assert record["instruction"] == "What is 41 + 21?" and record["answer"] == 62
    for episode in episodes:
        assert len(episode.turns) == 1 and episode.task_type == "sum"
        number = re.search(r"-?\d+", episode.turns[0].action)
        assert episode.won == (number is not None and int(number.group()) == (60 if "40" in episode.task_id else 62))


def test_bad_agent_settings_fail_at_validation():
    base = {**SMALL, "env": "deepsearch"}
    with pytest.raises(ConfigError, match="unknown agent id 'test-planer'; did you mean 'test-planner'"):
        validate({**base, "agent": "test-planer"})
    with pytest.raises(ConfigError, match="agent_config key 'cals': agent 'test-planner' takes \\['calls'\\]"):
        validate({**base, "agent": "test-planner", "agent_config": {"cals": 3}})
    with pytest.raises(ConfigError, match="constrain_actions needs the built-in prompt"):
        validate({**base, "agent": "test-planner", "constrain_actions": True})
    with pytest.raises(ConfigError, match="agent_config is set but no agent is"):
        validate({**base, "agent_config": {"calls": 3}})
    with pytest.raises(ConfigError, match="env 'tasks/sums' is a task dataset, played by an agent"):
        validate({**SMALL, "env": "tasks/sums"})
    with pytest.raises(ConfigError, match="unknown task dataset 'sum'; did you mean 'tasks/sums'"):
        validate({**SMALL, "env": "tasks/sum", "agent": "answer-sums"})
    register("test-sync", lambda task, client: 0.0)
    with pytest.raises(ConfigError, match="must be an async function"):
        validate({**base, "agent": "test-sync"})


@pytest.mark.timeout(600)
def test_the_example_agent_package_trains_one_iteration(ray_cluster, model_path, tmp_path):
    exp = load("tuned_examples/agent-react-alfworld.yaml",
               ["iterations=1", "max_turns=3", "tasks_per_batch=2", "group_size=2", "num_env_runners=1",
                f"run_dir={tmp_path}"])
    assert exp.agent == "react-alfworld"  # installed from examples/react-agent through its entry point
    result = train_one_iteration(exp, model_path)
    runners = result["env_runners"]
    assert runners["num_episodes"] == 4 and runners["num_env_crashes"] == 0
    assert runners["num_env_steps_sampled"] >= 4  # one call at least per episode
    assert result["training_iteration"] == 1
