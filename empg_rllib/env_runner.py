"""LLMEnvRunner: many text environments per runner, one inference engine, per-turn records.

RLlib's SingleAgentEnvRunner steps a vector env in lock-step with fixed-shape actions; LLM turns
are variable-length token sequences generated in batches, so this runner drives
`rollout.run_episodes` instead and returns its `Episode` records (one `Turn` per LLM turn).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env import INPUT_ENV_SINGLE_SPACES, INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import (
    EPISODE_RETURN_MEAN,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    WEIGHTS_SEQ_NO,
)

import envs
from empg_rllib.inference.base import SamplingParams
from empg_rllib.rollout import Episode, EpisodeRequest, RolloutStats, run_episodes


def token_spaces(vocab_size: int, max_context: int, max_new_tokens: int) -> tuple[gym.Space, gym.Space]:
    """Observation = prompt token ids, action = generated token ids (padded boxes for RLlib)."""
    return (
        gym.spaces.Box(0, vocab_size - 1, (max_context,), np.int64),
        gym.spaces.Box(0, vocab_size - 1, (max_new_tokens,), np.int64),
    )


class LLMEnvRunner(EnvRunner, Checkpointable):
    """Plays groups of episodes with the current policy; weights arrive through `set_state`."""

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        from empg_rllib.inference.hf import HFEngine

        exp = self.config.experiment
        self.experiment = exp
        spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        self.module = spec.build()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_path, local_files_only=True)
        if exp.engine != "hf":
            raise NotImplementedError(f"engine {exp.engine!r} is not available yet; use engine: hf")
        self.engine = HFEngine(self.module.lm, self.tokenizer, seed=exp.seed * 1000 + self.worker_index)
        self._weights_seq_no = 0
        self.prompt_config = exp.prompt_config
        self._idle_envs: dict[str, list[gym.Env]] = defaultdict(list)
        self.crashed_episodes_lifetime = 0

    # ---- RLlib contract ------------------------------------------------------------------
    def get_spaces(self) -> dict[str, Any]:
        spaces = self.config.token_spaces()
        return {INPUT_ENV_SPACES: spaces, INPUT_ENV_SINGLE_SPACES: spaces, DEFAULT_MODULE_ID: spaces}

    def assert_healthy(self) -> None:
        assert self.engine is not None and self.tokenizer is not None

    def make_env(self, split: str = "train") -> gym.Env:
        exp = self.experiment
        return envs.make(exp.env, **{**exp.env_config, "split": split, "max_turns": exp.max_turns})

    def sample(
        self,
        *,
        requests: Sequence[EpisodeRequest] | None = None,
        num_episodes: int | None = None,
        split: str = "train",
        temperature: float | None = None,
        evaluation: bool = False,
        on_turn: Callable[[RolloutStats], None] | None = None,
        explore: bool = True,
        **kwargs: Any,
    ) -> list[Episode]:
        """Play `requests` (or `num_episodes` seeded tasks) on `split`; returns finished episodes.

        `evaluation`: the episodes stay out of this runner's metrics and lifetime env steps,
        which describe training alone (the driver reports evaluation under `evaluation/`).
        `on_turn`: see `run_episodes` (a runner in the driver's process reports live progress).
        """
        if requests is None:
            rng = np.random.default_rng([self.experiment.seed, self.worker_index, self.num_env_steps_sampled_lifetime])
            requests = [EpisodeRequest(seed=int(s)) for s in rng.integers(0, 2**31, num_episodes or 1)]
        if not requests:
            return []  # a runner with no groups this round logs nothing (no zero throughput)
        pool = self._idle_envs[split]
        stats = RolloutStats()
        episodes = run_episodes(
            self.engine,
            self.tokenizer,
            lambda: pool.pop() if pool else self.make_env(split),
            requests,
            SamplingParams(
                max_new_tokens=self.experiment.max_new_tokens,
                temperature=temperature or self.experiment.temperature,
            ),
            self.prompt_config,
            max_concurrent=self.experiment.max_concurrent_episodes,
            stats=stats,
            keep_envs=pool,
            constrain_actions=self.experiment.constrain_actions,
            crash_retries=self.experiment.env_crash_retries,
            env_id=self.experiment.env,
            on_turn=on_turn,
        )
        if not evaluation:
            self._log_sample_metrics(episodes, stats)
        return episodes

    def _log_sample_metrics(self, episodes: list[Episode], stats: RolloutStats) -> None:
        steps = stats.env_steps
        self.num_env_steps_sampled_lifetime += steps
        self.crashed_episodes_lifetime += stats.crashed_episodes
        m = self.metrics
        m.log_value(NUM_ENV_STEPS_SAMPLED, steps, reduce="sum")
        m.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, steps, reduce="lifetime_sum")
        m.log_value(NUM_EPISODES, len(episodes), reduce="sum")
        m.log_value("num_env_crashes", stats.env_crashes, reduce="sum")
        m.log_value("num_env_crash_retries", stats.crash_retries, reduce="sum")
        m.log_value("num_crashed_episodes", stats.crashed_episodes, reduce="sum")
        m.log_value("num_crashed_episodes_lifetime", stats.crashed_episodes, reduce="lifetime_sum")
        if stats.wall_seconds > 0:
            m.log_value("env_steps_per_s", steps / stats.wall_seconds, window=1)
        if stats.engine_seconds > 0:
            m.log_value("generated_tokens_per_s", stats.generated_tokens / stats.engine_seconds, window=1)
        if not episodes:
            return
        turns = [t for e in episodes for t in e.turns]
        m.log_value(EPISODE_RETURN_MEAN, float(np.mean([e.reward for e in episodes])), window=1)
        m.log_value("success_rate", float(np.mean([e.won for e in episodes])), window=1)
        m.log_value("episode_len_mean", float(np.mean([len(e.turns) for e in episodes])), window=1)
        m.log_value("invalid_action_rate", float(np.mean([t.invalid_action for t in turns])), window=1)
        m.log_value("format_error_rate", float(np.mean([t.format_error is not None for t in turns])), window=1)
        by_type: dict[str, list[bool]] = defaultdict(list)
        for e in episodes:
            by_type[e.task_type].append(e.won)
        for task_type, wins in by_type.items():
            m.log_value(("success_rate_by_type", task_type), float(np.mean(wins)), window=1)

    def get_metrics(self) -> dict[str, Any]:
        return self.metrics.reduce()

    # ---- state: weights + sampling RNG -----------------------------------------------------
    def get_state(self, components=None, *, not_components=None, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime,
            WEIGHTS_SEQ_NO: self._weights_seq_no,
            "engine_rng": self.engine.get_rng_state(),
            "crashed_episodes_lifetime": self.crashed_episodes_lifetime,
        }
        if self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        import ray

        if COMPONENT_RL_MODULE in state:
            seq_no = state.get(WEIGHTS_SEQ_NO, 0)
            if seq_no == 0 or seq_no > self._weights_seq_no:
                weights = state[COMPONENT_RL_MODULE]
                weights = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
                weights = weights.get(DEFAULT_MODULE_ID, weights)
                self.module.set_state(weights)
                self.engine.weights_version = seq_no
            self._weights_seq_no = max(self._weights_seq_no, seq_no)
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]
        if "engine_rng" in state:
            self.engine.set_rng_state(state["engine_rng"])
        if "crashed_episodes_lifetime" in state:
            self.crashed_episodes_lifetime = state["crashed_episodes_lifetime"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"config": self.config}

    def stop(self) -> None:
        for pool in self._idle_envs.values():
            for env in pool:
                env.close()
        self._idle_envs.clear()
