"""Multi-turn rollouts: per-turn records, independent conversations, environments stepped on
worker threads while the engine generates, crashed and failing environments, whole groups; and
the steps of the `Rollout` loop one at a time."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import wait

import gymnasium as gym
import pytest

import empg_envs
from empg_rllib.config.prompt import PromptConfig
from empg_rllib.core.records import EnvFailure, Episode, EpisodeRequest, RolloutStats, whole_groups
from empg_rllib.core.scoring import score_responses
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.hf import HFEngine
from empg_rllib.sampling.prompting import HistoryTurn, parse_response
from empg_rllib.sampling.rollout import Rollout, run_episodes, turn_seed


class CrashOnStep(gym.Wrapper):
    """Fault injection: the wrapped engine dies at the given step, as a killed JVM would."""

    def __init__(self, env, crash_at: int):
        super().__init__(env)
        self.crash_at, self.steps = crash_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.crash_at:
            raise empg_envs.EnvCrashed("injected engine crash")
        return self.env.step(action)


class ErrorOnStep(gym.Wrapper):
    """Fault injection: an environment's own bug (not a crash) at every step."""

    def step(self, action):
        raise ValueError("the environment's own bug")


class SlowStep(gym.Wrapper):
    """A step that takes `latency_s`, counting how many steps of all instances overlap."""

    lock = threading.Lock()
    running = 0
    most = 0

    def __init__(self, env, latency_s: float):
        super().__init__(env)
        self.latency_s = latency_s

    def step(self, action):
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            time.sleep(self.latency_s)
            return self.env.step(action)
        finally:
            with cls.lock:
                cls.running -= 1


@pytest.fixture(scope="module")
def engine(tiny_model):
    tokenizer, model = tiny_model
    return HFEngine(model, tokenizer, seed=0)


def test_turn_records_hold_sampled_tokens(engine):
    stats = RolloutStats()
    episodes = run_episodes(
        engine,
        engine.tokenizer,
        lambda: empg_envs.make("deepsearch", max_turns=3),
        [EpisodeRequest(seed=s, group=s % 2) for s in range(4)],
        SamplingParams(max_new_tokens=10, seed=1),
        PromptConfig(think=False),
        max_concurrent=3,
        stats=stats,
    )
    assert len(episodes) == 4 and stats.episodes == 4 and stats.crashed_episodes == 0
    assert stats.env_steps == sum(len(e.turns) for e in episodes)
    for episode in episodes:
        assert 1 <= len(episode.turns) <= 3
        assert episode.truncated or episode.turns[-1].action.startswith("answer[")
        for turn in episode.turns:
            assert len(turn.response_ids) == len(turn.logprobs) == len(turn.entropies)
            assert turn.weights_version == engine.weights_version
        # The logged behaviour log-probs are those of exactly the recorded token ids.
        logp, _ = score_responses(engine.model, [t.prompt_ids for t in episode.turns], [t.response_ids for t in episode.turns], engine.pad_token_id)
        for turn, ref in zip(episode.turns, logp):
            assert max(abs(a - b) for a, b in zip(turn.logprobs, ref)) < 1e-5
        # Later prompts show the earlier actions (history window).
        if len(episode.turns) > 1:
            assert episode.turns[0].action in engine.tokenizer.decode(episode.turns[1].prompt_ids)


def play_deepsearch(engine, env_workers: int, latency=lambda made: 0.0, **kwargs):
    made = []

    def make_env():
        made.append(None)
        return SlowStep(empg_envs.make("deepsearch", max_turns=3), latency(len(made)))

    requests = [EpisodeRequest(seed=s // 2, group=f"g{s // 2}") for s in range(8)]
    return run_episodes(
        engine, engine.tokenizer, make_env, requests, SamplingParams(max_new_tokens=10),
        PromptConfig(think=False), max_concurrent=8, env_workers=env_workers, seed=5, **kwargs,
    )


def test_env_steps_overlap_on_workers_and_not_in_lock_step(engine):
    SlowStep.most = 0
    play_deepsearch(engine, env_workers=0, latency=lambda made: 0.02)
    assert SlowStep.most == 1
    SlowStep.most = 0
    stats = RolloutStats()
    episodes = play_deepsearch(engine, env_workers=4, latency=lambda made: 0.05, stats=stats)
    assert SlowStep.most > 1
    assert len(episodes) == stats.episodes == 8 and stats.env_steps == sum(len(e.turns) for e in episodes)


def test_worker_sampling_does_not_depend_on_timing(engine):
    """With workers, batches form as environments answer; each turn's own seed keeps what it
    samples the same whatever shared its batch: uneven latencies give the same episodes."""
    even = play_deepsearch(engine, env_workers=1)
    uneven = play_deepsearch(engine, env_workers=3, latency=lambda made: 0.03 * (made % 3))
    assert [(e.group, e.seed) for e in even] == [(e.group, e.seed) for e in uneven]  # request order
    for a, b in zip(even, uneven):
        assert [t.response_ids for t in a.turns] == [t.response_ids for t in b.turns]
        assert [t.action for t in a.turns] == [t.action for t in b.turns]
    # The two copies of a task (one group) sample differently.
    assert [t.response_ids for t in even[0].turns] != [t.response_ids for t in even[1].turns]


def test_a_row_seed_makes_a_completion_independent_of_its_batch(engine):
    ids = engine.tokenizer("search[ the river ]")["input_ids"]
    other = engine.tokenizer("answer[ paris ] and more words here")["input_ids"]
    params = SamplingParams(max_new_tokens=12)
    alone = engine.generate([ids], params, seeds=[11])[0]
    batched = engine.generate([other, ids, other], params, seeds=[3, 11, 4])
    assert batched[1].token_ids == alone.token_ids
    assert batched[1].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert batched[0].token_ids != batched[2].token_ids or batched[0].logprobs != batched[2].logprobs
    with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
        engine.generate([ids, ids], params, seeds=[1])


def play_with_crashes(engine, crashing: int, crash_retries: int, env_workers: int = 0):
    """Three requests, one at a time; the first `crashing` environments made crash at step 2."""
    made = []

    def make_env():
        env = empg_envs.make("deepsearch", max_turns=3)
        made.append(env)
        return CrashOnStep(env, crash_at=2) if len(made) <= crashing else env

    stats = RolloutStats()
    episodes = run_episodes(
        engine,
        engine.tokenizer,
        make_env,
        [EpisodeRequest(seed=s) for s in range(3)],
        SamplingParams(max_new_tokens=8, seed=2),
        PromptConfig(think=False),
        max_concurrent=1,
        stats=stats,
        crash_retries=crash_retries,
        env_workers=env_workers,
    )
    return episodes, stats, made


@pytest.mark.parametrize("env_workers", [0, 2])
def test_crashed_env_is_replaced_and_its_episode_played_again(engine, env_workers):
    episodes, stats, made = play_with_crashes(engine, crashing=1, crash_retries=2, env_workers=env_workers)
    assert (stats.env_crashes, stats.crash_retries, stats.crashed_episodes) == (1, 1, 0)
    assert sorted(e.seed for e in episodes) == [0, 1, 2]
    assert len(made) == 2  # one replacement, then reused


@pytest.mark.parametrize("env_workers", [0, 2])
def test_episode_is_given_up_when_its_retries_run_out(engine, env_workers):
    episodes, stats, made = play_with_crashes(engine, crashing=3, crash_retries=2, env_workers=env_workers)
    assert (stats.env_crashes, stats.crash_retries, stats.crashed_episodes) == (3, 2, 1)
    assert sorted(e.seed for e in episodes) == [1, 2]
    assert len(made) == 4


class CrashOnReset(gym.Wrapper):
    """Fault injection: the engine dies at reset."""

    def reset(self, **kwargs):
        raise empg_envs.EnvCrashed("injected engine crash at reset")


@pytest.mark.parametrize("env_workers", [0, 2])
def test_a_reset_crash_is_retried_even_with_nothing_else_running(engine, env_workers):
    made = []

    def make_env():
        env = empg_envs.make("deepsearch", max_turns=2)
        made.append(env)
        return CrashOnReset(env) if len(made) == 1 else env

    stats = RolloutStats()
    episodes = run_episodes(engine, engine.tokenizer, make_env, [EpisodeRequest(seed=4)], SamplingParams(max_new_tokens=8),
                            PromptConfig(think=False), stats=stats, env_workers=env_workers)
    assert [e.seed for e in episodes] == [4] and len(made) == 2
    assert (stats.env_crashes, stats.crash_retries, stats.crashed_episodes) == (1, 1, 0)


class Closing(gym.Wrapper):
    closed = 0

    def close(self):
        Closing.closed += 1
        return self.env.close()


class BrokenEngine:
    weights_version = 0

    def generate(self, *args, **kwargs):
        raise RuntimeError("the engine broke")


@pytest.mark.parametrize("env_workers", [0, 2])
def test_an_engine_error_closes_every_environment(engine, env_workers):
    Closing.closed = 0
    with pytest.raises(RuntimeError, match="the engine broke"):
        run_episodes(BrokenEngine(), engine.tokenizer, lambda: Closing(empg_envs.make("deepsearch")),
                     [EpisodeRequest(seed=s) for s in range(3)], SamplingParams(max_new_tokens=8),
                     PromptConfig(think=False), env_workers=env_workers)
    assert Closing.closed == 3


@pytest.mark.parametrize(
    ("env_id", "make_env", "message"),
    [
        ("no-such-env", lambda: empg_envs.make("no-such-env"), r"raised UnknownEnvError when made .*unknown env id"),
        ("deepsearch", lambda: empg_envs.make("deepsearch", split="validation"), r"raised EnvConfigError when made .*split"),
        ("deepsearch", lambda: ErrorOnStep(empg_envs.make("deepsearch")), r"raised ValueError at step 1 of task .*own bug"),
    ],
    ids=["unknown-id", "bad-split", "env-bug"],
)
@pytest.mark.parametrize("env_workers", [0, 2])
def test_a_non_crash_env_error_raises_env_failure_naming_env_and_cause(engine, env_id, make_env, message, env_workers):
    with pytest.raises(EnvFailure, match=f"^env '{env_id}' {message}"):
        run_episodes(engine, engine.tokenizer, make_env, [EpisodeRequest(seed=0)] * 2,
                     SamplingParams(max_new_tokens=8), PromptConfig(think=False), env_id=env_id,
                     env_workers=env_workers)


def test_whole_groups_drops_a_group_with_a_member_missing():
    requests = [EpisodeRequest(seed=g, group=g) for g in ("a", "b", "c") for _ in range(2)]
    episodes = [Episode(task_id="t", task_type="x", seed=0, group=g) for g in ("a", "a", "b", "c", "c")]
    kept, dropped = whole_groups(requests, episodes)
    assert dropped == ["b"]
    assert [e.group for e in kept] == ["a", "a", "c", "c"]


def test_constrained_actions_are_always_admissible(engine):
    pytest.importorskip("alfworld")
    stats = RolloutStats()
    episodes = run_episodes(
        engine,
        engine.tokenizer,
        lambda: empg_envs.make("alfworld", split="eval_seen", max_turns=4),
        [EpisodeRequest(seed=s) for s in range(2)],
        SamplingParams(max_new_tokens=40, seed=3),
        PromptConfig(think=False, history_turns=1),
        stats=stats,
        constrain_actions=True,
    )
    turns = [t for e in episodes for t in e.turns]
    assert len(turns) == stats.env_steps > 0
    for turn in turns:
        assert not turn.invalid_action and turn.format_error is None and turn.finish_reason == "stop"
        assert turn.action in engine.tokenizer.decode(turn.prompt_ids).split("Admissible actions: ")[1]
        assert len(turn.allowed_token_ids) == len(turn.response_ids)
    with pytest.raises(ValueError, match="think=False"):
        run_episodes(engine, engine.tokenizer, lambda: empg_envs.make("deepsearch"), [EpisodeRequest(seed=0)],
                     SamplingParams(), PromptConfig(think=True), constrain_actions=True)


# The steps of the `Rollout` loop, one at a time.


class Held(gym.Wrapper):
    """A slow environment: waits for the gate `gates[(task seed, "reset" or "step")]`, where
    there is one, before that call; counts its own closes. Its episodes never end."""

    def __init__(self, env, gates):
        super().__init__(env)
        self.gates, self.closes, self.task_seed = gates, 0, None

    def reset(self, *, seed=None, options=None):
        self.task_seed = seed
        self._wait("reset")
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self._wait("step")
        obs, reward, _, _, info = self.env.step(action)
        return obs, reward, False, False, info

    def _wait(self, where):
        gate = self.gates.get((self.task_seed, where))
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError(f"the test never opened the gate of seed {self.task_seed} at {where}")

    def close(self):
        self.closes += 1
        return self.env.close()


class BrokenClose(gym.Wrapper):
    def close(self):
        raise RuntimeError("its engine is gone")


def rollout_of(engine, make_env, requests, **kwargs):
    return Rollout(engine, engine.tokenizer, make_env, requests, SamplingParams(max_new_tokens=8),
                   PromptConfig(think=False), **kwargs)


def held_envs(gates):
    """`make_env` of `Held` deepsearch environments, and the list of those made."""
    made = []

    def make_env():
        made.append(Held(empg_envs.make("deepsearch", max_turns=5), gates))
        return made[-1]

    return make_env, made


def start_all(rollout):
    rollout.start_queued()
    wait(list(rollout.busy))
    rollout.collect(block=False)


def test_a_crash_queues_its_request_to_start_next_until_its_retries_run_out(engine, caplog):
    requests = [EpisodeRequest(seed=7), EpisodeRequest(seed=8)]
    rollout = rollout_of(engine, lambda: empg_envs.make("deepsearch"), requests, crash_retries=1, env_id="deepsearch")
    slot, request = rollout.pending.pop()  # the first request, now being played
    env = Held(empg_envs.make("deepsearch"), {})
    with caplog.at_level(logging.WARNING, logger="empg_rllib.sampling.rollout"):
        rollout.handle_crash(slot, request, env, "at step 2 of task t")
        assert env.closes == 1
        assert rollout.pending == [(1, requests[1]), (0, requests[0])] and rollout.crashes == [1, 0]
        s = rollout.stats
        assert (s.env_crashes, s.crash_retries, s.crashed_episodes) == (1, 1, 0)
        rollout.pending.pop()
        rollout.handle_crash(0, request, BrokenClose(empg_envs.make("deepsearch")), "at reset")
    assert rollout.pending == [(1, requests[1])] and rollout.crashes == [2, 0]
    assert (s.env_crashes, s.crash_retries, s.crashed_episodes) == (2, 1, 1)
    assert [r.getMessage() for r in caplog.records if r.name == "empg_rllib.sampling.rollout"] == [
        "env 'deepsearch' crashed at step 2 of task t (seed 7); playing the episode again on a fresh environment "
        "(retry 1 of 1)",
        "env 'deepsearch' crashed at reset (seed 7) on all 2 attempts; giving the episode up",
    ]


def test_a_start_that_crashes_is_started_again_at_once_as_the_next_attempt(engine):
    made = []

    def make_env():
        made.append(empg_envs.make("deepsearch", max_turns=2))
        return CrashOnReset(made[-1]) if len(made) == 1 else made[-1]

    rollout = rollout_of(engine, make_env, [EpisodeRequest(seed=s) for s in range(3)], max_concurrent=1)
    rollout.start_queued()
    assert [(conv.slot, conv.attempt, conv.env) for conv in rollout.ready] == [(0, 1, made[1])]
    assert [slot for slot, _ in rollout.pending] == [2, 1] and not rollout.busy
    assert (rollout.stats.env_crashes, rollout.stats.crash_retries) == (1, 1)
    rollout.close_all(None)


def test_collect_waits_for_half_the_conversations_under_way(engine):
    soon, held = threading.Event(), threading.Event()
    make_env, made = held_envs({(0, "step"): soon, (1, "step"): soon, (2, "step"): held, (3, "step"): held})
    rollout = rollout_of(engine, make_env, [EpisodeRequest(seed=s) for s in range(4)], max_concurrent=4, env_workers=4)
    try:
        start_all(rollout)
        assert len(rollout.ready) == 4
        rollout.generate()
        assert len(rollout.busy) == 4 and not rollout.ready
        threading.Timer(0.3, soon.set).start()
        rollout.collect(block=True)  # returns once the two `soon` steps have ended
        assert sorted(conv.request.seed for conv in rollout.ready) == [0, 1] and len(rollout.busy) == 2
        rollout.collect(block=True)  # the two ready conversations make the quorum of four
        assert len(rollout.ready) == 2 and len(rollout.busy) == 2
        held.set()
        wait(list(rollout.busy))
        rollout.collect(block=False)
        assert len(rollout.ready) == 4 and not rollout.busy
        assert rollout.stats.env_steps == 4 and all(len(conv.episode.turns) == 1 for conv in rollout.ready)
    finally:
        soon.set()
        held.set()
        rollout.close_all(None)
    assert [env.closes for env in made] == [1, 1, 1, 1]


def test_a_failure_closes_every_environment_held_and_names_env_and_cause(engine):
    gate = threading.Event()
    make_env, made = held_envs({(1, "step"): gate, (2, "reset"): gate})
    rollout = rollout_of(engine, make_env, [EpisodeRequest(seed=s) for s in range(3)], max_concurrent=3, env_workers=2)
    try:
        rollout.start_queued()
        wait([future for future, (slot, _, _) in rollout.busy.items() if slot < 2])
        rollout.collect(block=False)
        rollout.generate()
        rollout.collect(block=True)  # the step of seed 0 ends; that of seed 1 and the reset of seed 2 wait
        assert [conv.request.seed for conv in rollout.ready] == [0] and len(rollout.busy) == 2
        idle, failing = Held(empg_envs.make("deepsearch"), {}), Held(empg_envs.make("deepsearch"), {})
        rollout.idle_envs.append(idle)
        threading.Timer(0.2, gate.set).start()  # the jobs under way end while `fail` waits for them
        message = r"^the environment raised ValueError at step 2 of task t \(seed 9\): bug$"
        with pytest.raises(EnvFailure, match=message) as info:
            rollout.fail(ValueError("bug"), "at step 2 of task t", EpisodeRequest(seed=9), failing)
    finally:
        gate.set()
    assert isinstance(info.value.__cause__, ValueError)
    assert len(made) == 3 and [env.closes for env in [*made, idle, failing]] == [1] * 5


def test_with_workers_each_turn_samples_with_its_own_seed(engine):
    requests = [EpisodeRequest(seed=3, group="g")] * 2 + [EpisodeRequest(seed=4, group="g")]
    rollout = rollout_of(engine, lambda: empg_envs.make("deepsearch"), requests, env_workers=2, seed=5)
    assert rollout.member == [0, 1, 0]
    try:
        start_all(rollout)
        batch = sorted(rollout.ready, key=lambda conv: conv.slot)
        seeds = [turn_seed(5, conv.request, rollout.member[conv.slot], 0, 0) for conv in batch]
        assert rollout.turn_seeds(batch) == seeds and len(set(seeds)) == 3
        rollout.generate()
        for conv, seed in zip(batch, seeds):
            prompt, completion, _, action = conv.sampled
            alone = engine.generate([prompt], rollout.sampling, seeds=[seed])[0]
            assert completion.token_ids == alone.token_ids
    finally:
        rollout.close_all(None)
    assert rollout_of(engine, lambda: empg_envs.make("deepsearch"), requests).turn_seeds(batch) is None


def test_finish_turn_records_the_turn_and_ends_the_episode_on_its_last(engine):
    keep = []
    rollout = rollout_of(engine, lambda: empg_envs.make("deepsearch"), [EpisodeRequest(seed=0)], keep_envs=keep)
    rollout.start_queued()
    (conv,) = rollout.ready
    rollout.ready.clear()  # handed to the engine
    first = conv.observation
    prompt, config = rollout.prompt_of(conv), rollout.prompt_config
    completion = engine.generate([prompt], rollout.sampling)[0]
    conv.sampled = (prompt, completion, parse_response("no tags", config), "no tags")
    rollout.finish_turn(conv, ("second", 0.5, False, False, {"invalid_action": False}))
    assert rollout.ready == [conv] and conv.observation == "second" and conv.history == [HistoryTurn(first, "no tags")]
    (turn,) = conv.episode.turns
    assert turn.prompt_ids == prompt and turn.response_ids == completion.token_ids and turn.reward == 0.5
    assert turn.invalid_action and turn.format_error  # the response did not parse
    rollout.ready.clear()
    conv.sampled = (prompt, completion, parse_response("<action>answer[x]</action>", config), "answer[x]")
    rollout.finish_turn(conv, ("done", 1.0, True, False, {"won": True, "score": 1.0}))
    assert not rollout.ready and rollout.finished == [(0, conv.episode)] and rollout.idle_envs == [conv.env]
    assert conv.episode.won and conv.episode.score == 1.0 and not conv.episode.turns[-1].invalid_action
    s = rollout.stats
    assert (s.episodes, s.env_steps, s.generated_tokens) == (1, 2, 2 * len(completion.token_ids))
    rollout.hand_back()
    assert keep == [conv.env]
