"""Multi-turn rollouts: per-turn records, independent conversations, crashed environments."""

from __future__ import annotations

import gymnasium as gym
import pytest

import envs
from empg_rllib.inference.base import SamplingParams
from empg_rllib.inference.hf import HFEngine
from empg_rllib.prompting import PromptConfig
from empg_rllib.rollout import EpisodeRequest, RolloutStats, run_episodes
from empg_rllib.scoring import score_responses


class CrashOnStep(gym.Wrapper):
    """Fault injection: the wrapped engine dies at the given step, as a killed JVM would."""

    def __init__(self, env, crash_at: int):
        super().__init__(env)
        self.crash_at, self.steps = crash_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.crash_at:
            raise envs.EnvCrashed("injected engine crash")
        return self.env.step(action)


@pytest.fixture(scope="module")
def engine(tiny_model):
    tokenizer, model = tiny_model
    return HFEngine(model, tokenizer, seed=0)


def test_turn_records_hold_sampled_tokens(engine):
    stats = RolloutStats()
    episodes = run_episodes(
        engine,
        engine.tokenizer,
        lambda: envs.make("deepsearch", max_turns=3),
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


def test_crashed_env_is_replaced_and_its_episode_dropped(engine):
    made = []

    def make_env():
        env = envs.make("deepsearch", max_turns=3)
        made.append(env)
        return CrashOnStep(env, crash_at=2) if len(made) == 1 else env

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
    )
    assert stats.crashed_episodes == 1
    assert len(episodes) == 2
    assert len(made) == 2  # one replacement, then reused


def test_constrained_actions_are_always_admissible(engine):
    pytest.importorskip("alfworld")
    stats = RolloutStats()
    episodes = run_episodes(
        engine,
        engine.tokenizer,
        lambda: envs.make("alfworld", split="eval_seen", max_turns=4),
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
        run_episodes(engine, engine.tokenizer, lambda: envs.make("deepsearch"), [EpisodeRequest(seed=0)],
                     SamplingParams(), PromptConfig(think=True), constrain_actions=True)
