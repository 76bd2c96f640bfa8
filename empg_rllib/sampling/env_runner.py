"""LLMEnvRunner: many text environments per runner, one inference engine, per-turn records.

RLlib's SingleAgentEnvRunner steps a vector env in lock-step with fixed-shape actions; LLM turns
are variable-length token sequences generated in batches, so this runner drives
`rollout.run_episodes` instead and returns its `Episode` records (one `Turn` per LLM turn).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import torch
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

import empg_envs
from empg_rllib.core import metrics
from empg_rllib.core.records import Episode, EpisodeRequest, RolloutStats
from empg_rllib.sampling.agents.rollout import run_agent_episodes
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.env_processes import EnvProcesses
from empg_rllib.sampling.rollout import run_episodes


def token_spaces(vocab_size: int, max_context: int, max_new_tokens: int) -> tuple[gym.Space, gym.Space]:
    """Observation = prompt token ids, action = generated token ids (padded boxes for RLlib)."""
    return (
        gym.spaces.Box(0, vocab_size - 1, (max_context,), np.int64),
        gym.spaces.Box(0, vocab_size - 1, (max_new_tokens,), np.int64),
    )


class LLMEnvRunner(EnvRunner, Checkpointable):
    """Plays groups of episodes with the current policy (`experiment.engine` samples: HF or
    vLLM). New weights arrive through `load_weights` (the driver's sync after each update) or
    `set_state` (RLlib's restore of a restarted runner, a resumed run)."""

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        from transformers import AutoTokenizer

        exp = self.config.experiment
        self.experiment = exp
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_path, local_files_only=True)
        self.device = runner_device(self.config.num_gpus_per_env_runner, self.worker_index)
        # The HF engine samples from the module's own LM. A vLLM engine holds its own copy of
        # the weights, so the runner keeps a module only to merge LoRA adapters into the base
        # weights it pushes.
        self.module = None
        if exp.engine == "hf" or exp.lora is not None:
            spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
            self.module = spec.build()
        self.engine = self._build_engine()
        self._weights_seq_no = 0
        self.prompt_config = exp.prompt_config
        self._idle_envs: dict[str, list[gym.Env]] = defaultdict(list)
        self._env_processes: EnvProcesses | None = None
        self.crashed_episodes_lifetime = 0
        self._weights_board: Any = None

    def _build_engine(self) -> Any:
        exp = self.experiment
        seed = exp.seed * 1000 + self.worker_index
        if exp.engine == "hf":
            from empg_rllib.sampling.engines.hf import HFEngine

            return HFEngine(self.module.lm, self.tokenizer, seed=seed, device=self.device, prefix_cache=exp.prefix_cache)
        from empg_rllib.core.precision import resolve_dtype
        from empg_rllib.sampling.engines.vllm import LOG_FILE, VLLMEngine, cpu_cores_for

        settings = exp.vllm
        dtype = settings.dtype or exp.dtype
        return VLLMEngine(
            self.config.model_path,
            self.tokenizer,
            dtype=getattr(torch, dtype) if dtype == "float16" else resolve_dtype(dtype, self.device, "vLLM engine"),
            seed=seed,
            kv_cache_gib=settings.kv_cache_gib,
            # Runners sharing one GPU (a fraction each) share its memory too.
            gpu_memory_utilization=settings.gpu_memory_utilization * min(1.0, self.config.num_gpus_per_env_runner or 1.0),
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            max_num_seqs=settings.max_num_seqs,
            cpu_cores=cpu_cores_for(self.worker_index, self.config.num_cpus_per_env_runner)
            if self.device == "cpu"
            else None,
            log_file=exp.directory / LOG_FILE,
            prefix_cache=exp.prefix_cache,
        )

    # ---- RLlib contract ------------------------------------------------------------------
    def get_spaces(self) -> dict[str, Any]:
        spaces = self.config.token_spaces()
        return {INPUT_ENV_SPACES: spaces, INPUT_ENV_SINGLE_SPACES: spaces, DEFAULT_MODULE_ID: spaces}

    def assert_healthy(self) -> None:
        assert self.engine is not None and self.tokenizer is not None

    def make_env(self, split: str = "train") -> gym.Env:
        """A new environment of the experiment on `split`: in this process, or with
        `env_worker_mode: process` in one of the runner's env worker processes."""
        exp = self.experiment
        config = {**exp.env_config, "split": split, "max_turns": exp.max_turns}
        if exp.env_worker_mode == "thread":
            return empg_envs.make(exp.env, **config)
        if self._env_processes is None:
            self._env_processes = EnvProcesses(exp.env_workers, exp.env, exp.env_config)
        return self._env_processes.make(**config)

    def env_worker_pids(self) -> list[int]:
        """The live env worker processes (`env_worker_mode: process`)."""
        return self._env_processes.pids() if self._env_processes is not None else []

    def sample(
        self,
        *,
        requests: Sequence[EpisodeRequest] | None = None,
        num_episodes: int | None = None,
        split: str = "train",
        temperature: float | None = None,
        evaluation: bool = False,
        on_turn: Callable[[RolloutStats], None] | None = None,
        weights_board: Any = None,
        explore: bool = True,
        **kwargs: Any,
    ) -> list[Episode]:
        """Play `requests` (or `num_episodes` seeded tasks) on `split`; returns finished episodes.

        `evaluation`: the episodes stay out of this runner's metrics and lifetime env steps,
        which describe training alone (the driver reports evaluation under `evaluation/`).
        `on_turn`: see `run_episodes` (a runner in the driver's process reports live progress).
        `weights_board`: asynchronous sampling's `WeightsBoard`; from then on the runner loads
        the newest weights posted there before every engine batch.
        """
        if weights_board is not None:
            self._weights_board = weights_board
        if requests is None:
            rng = np.random.default_rng([self.experiment.seed, self.worker_index, self.num_env_steps_sampled_lifetime])
            requests = [EpisodeRequest(seed=int(s)) for s in rng.integers(0, 2**31, num_episodes or 1)]
        if not requests:
            return []  # a runner with no groups this round logs nothing (no zero throughput)
        if getattr(self.engine, "prefix_cache", None) is not None:
            # Prefixes are computed afresh in each call, so that what a call samples never
            # depends on an earlier one (a resumed run samples what the uninterrupted one did).
            self.engine.prefix_cache.clear()
        pool = self._idle_envs[split]
        stats = RolloutStats()
        exp = self.experiment
        sampling = SamplingParams(max_new_tokens=exp.max_new_tokens, temperature=temperature or exp.temperature)
        options = dict(
            max_concurrent=exp.max_concurrent_episodes,
            stats=stats,
            keep_envs=pool,
            crash_retries=exp.env_crash_retries,
            env_id=exp.env,
            env_workers=exp.env_workers,
            seed=exp.seed,
            before_batch=self._pull_weights if self._weights_board is not None else None,
        )
        args = (self.engine, self.tokenizer, lambda: pool.pop() if pool else self.make_env(split), requests, sampling)
        if exp.agent is not None:
            context = self.config.model_json().get("max_position_embeddings", 4096)
            if exp.engine == "vllm" and exp.vllm.max_model_len:
                context = min(context, exp.vllm.max_model_len)
            episodes = run_agent_episodes(
                *args, exp.agent, exp.agent_config, on_turn=on_turn, max_prompt_tokens=context - exp.max_new_tokens,
                timeout_s=exp.agent_timeout_s, max_calls=exp.agent_max_calls, **options,
            )
        else:
            episodes = run_episodes(
                *args, self.prompt_config, constrain_actions=exp.constrain_actions, on_turn=on_turn, **options
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
        m.log_value(metrics.NUM_ENV_CRASHES, stats.env_crashes, reduce="sum")
        m.log_value(metrics.NUM_ENV_CRASH_RETRIES, stats.crash_retries, reduce="sum")
        m.log_value(metrics.NUM_CRASHED_EPISODES, stats.crashed_episodes, reduce="sum")
        m.log_value(metrics.NUM_CRASHED_EPISODES_LIFETIME, stats.crashed_episodes, reduce="lifetime_sum")
        if stats.wall_seconds > 0:
            m.log_value(metrics.ENV_STEPS_PER_S, steps / stats.wall_seconds, window=1)
        if stats.engine_seconds > 0:
            m.log_value(metrics.GENERATED_TOKENS_PER_S, stats.generated_tokens / stats.engine_seconds, window=1)
            m.log_value(metrics.PROMPT_TOKENS_PER_S, stats.prompt_tokens / stats.engine_seconds, window=1)
        if steps:
            m.log_value(metrics.PROMPT_TOKENS_MEAN, stats.prompt_tokens / steps, window=1)
        if not episodes:
            return
        turns = [t for e in episodes for t in e.turns]
        m.log_value(EPISODE_RETURN_MEAN, float(np.mean([e.reward for e in episodes])), window=1)
        m.log_value(metrics.SUCCESS_RATE, float(np.mean([e.won for e in episodes])), window=1)
        m.log_value(metrics.EPISODE_LEN_MEAN, float(np.mean([len(e.turns) for e in episodes])), window=1)
        m.log_value(metrics.INVALID_ACTION_RATE, float(np.mean([t.invalid_action for t in turns])), window=1)
        m.log_value(metrics.FORMAT_ERROR_RATE, float(np.mean([t.format_error is not None for t in turns])), window=1)
        by_type: dict[str, list[bool]] = defaultdict(list)
        for e in episodes:
            by_type[e.task_type].append(e.won)
        for task_type, wins in by_type.items():
            m.log_value((metrics.SUCCESS_RATE_BY_TYPE, task_type), float(np.mean(wins)), window=1)

    def get_metrics(self) -> dict[str, Any]:
        return self.metrics.reduce()

    # ---- weights --------------------------------------------------------------------------
    def load_weights(self, weights: Any, version: int) -> None:
        """Load the learner's weights (its module state, or an ObjectRef to it) as `version`;
        returns once the engine samples with them. Version 0 (a restored runner) always loads;
        otherwise only a newer version does."""
        if version and version <= self._weights_seq_no:
            return
        weights = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
        weights = weights.get(DEFAULT_MODULE_ID, weights)
        if self.module is not None:
            self.module.set_state(weights)
        if self.experiment.engine == "vllm":
            # HF checkpoint names: the module's LM (LoRA merged into it), or the state minus
            # the module's `lm.` prefix.
            named = (
                self.module.lm.state_dict()
                if self.module is not None
                else {k.removeprefix("lm."): v for k, v in weights.items()}
            )
            self.engine.update_weights(named, version, timeout_s=self.experiment.weight_sync_timeout_s)
        self.engine.weights_version = version
        self._weights_seq_no = max(self._weights_seq_no, version)

    def _pull_weights(self) -> None:
        """Load the board's weights if they are newer than the engine's (between turns)."""
        version, weights = ray.get(self._weights_board.latest.remote(self._weights_seq_no))
        if weights is not None:
            self.load_weights(weights[0], version)

    def engine_is_dead(self, err: BaseException) -> bool:
        """Whether `err` means this runner's vLLM engine process is gone (the runner must be
        replaced; a new one starts a new engine)."""
        if self.experiment.engine != "vllm":
            return False
        from empg_rllib.sampling.engines.vllm import is_engine_dead

        return is_engine_dead(err)

    # ---- state: weights + sampling RNG -----------------------------------------------------
    def get_state(self, components=None, *, not_components=None, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime,
            WEIGHTS_SEQ_NO: self._weights_seq_no,
            "engine_rng": self.engine.get_rng_state(),
            "crashed_episodes_lifetime": self.crashed_episodes_lifetime,
        }
        if self.module is not None and self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if COMPONENT_RL_MODULE in state:
            self.load_weights(state[COMPONENT_RL_MODULE], state.get(WEIGHTS_SEQ_NO, 0))
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]
        if "engine_rng" in state:
            self.engine.set_rng_state(state["engine_rng"])
        if "crashed_episodes_lifetime" in state:
            self.crashed_episodes_lifetime = state["crashed_episodes_lifetime"]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"config": self.config}

    def stop(self) -> None:
        try:
            for pool in self._idle_envs.values():
                for env in pool:
                    with contextlib.suppress(Exception):  # one failing close must not skip the rest
                        env.close()
            self._idle_envs.clear()
        finally:
            if self._env_processes is not None:
                self._env_processes.close()
            if hasattr(self.engine, "close"):
                self.engine.close()


def runner_device(gpus: float, worker_index: int) -> str:
    """"cuda" for a runner given GPUs (resources.env_runner.gpus), else "cpu"; a runner given
    GPUs that it cannot see stops here, saying so."""
    if not gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"env runner {worker_index} asks for {gpus:g} GPU(s) (resources.env_runner.gpus) but sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}); "
            "set resources.env_runner.gpus: 0 on a CPU host"
        )
    return "cuda"
