"""Rollouts of a user's agent: each episode's agent runs against the chat endpoint, and its
calls, recorded token for token, become the episode's turns.

The agents of one sampling call run as asyncio tasks on a thread of their own; the engine answers
their calls in batches on the caller's thread (the env runner's, which owns the engine). Each
episode gets a fresh `openai.AsyncOpenAI` client whose base URL is the episode's own, and an
`AgentTask`: the environment reset to the request's task, stepped with `await task.step(action)`
(in a worker thread: an environment's step may block).

An exception in the agent (or an `EnvCrashed` from its environment) is a crash: the episode is
played again from the start, up to `crash_retries` times, then given up (its group is dropped
whole, see `whole_groups`). When every attempt (two or more) failed with the same error, other
than an environment's crash, the error is the agent's own and would repeat: the run stops with
`EnvFailure` naming the agent and the cause. Any
other error of the environment stops the run too, as in `rollout.Rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gymnasium as gym

from empg_envs import EnvCrashed
from empg_rllib.config.agents import instantiate, load
from empg_rllib.core.records import EnvFailure, Episode, EpisodeRequest, RolloutStats
from empg_rllib.sampling.agents.endpoint import ChatEndpoint
from empg_rllib.sampling.engines.base import InferenceEngine, SamplingParams

logger = logging.getLogger(__name__)


class AgentTask:
    """One task for an agent: the environment, reset to it. `instruction`, `observation` and
    `info` are reset's; `done`, `won`, `score` and `steps` follow `step()`."""

    def __init__(self, env: gym.Env, observation: str, info: dict[str, Any], executor: ThreadPoolExecutor) -> None:
        self._env, self._executor = env, executor
        self.observation, self.info = observation, info
        self.task_id: str = info.get("task_id", "")
        self.task_type: str = info.get("task_type", "")
        self.instruction: str = info.get("instruction", "")
        self.done = self.truncated = False
        self.won: bool | None = None
        self.score = 0.0
        self.steps = 0
        self.env_error: Exception | None = None  # the environment's own failure, if it failed

    @property
    def admissible_actions(self) -> list[str] | None:
        return self.info.get("admissible_actions")

    async def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Send `action` to the environment: (observation, reward, done, info)."""
        if self.done:
            raise RuntimeError("the episode has ended: no more steps")
        try:
            obs, reward, terminated, truncated, info = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._env.step, action
            )
        except Exception as err:
            self.env_error = err
            raise
        self.steps += 1
        self.observation, self.info = obs, info
        self.done, self.truncated = bool(terminated or truncated), bool(truncated)
        if "won" in info:
            self.won = bool(info["won"])
        self.score = float(info.get("score", self.score))
        return obs, float(reward), self.done, info


class AgentRollout:
    """One sampling call of agent `agent_id` (with `agent_config`) over `requests`. Runs once.

    The options are `rollout.Rollout`'s where they share a name; `sampling` fixes the endpoint's
    temperature and its cap on `max_tokens`."""

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Any,
        make_env: Callable[[], gym.Env],
        requests: Sequence[EpisodeRequest],
        sampling: SamplingParams,
        agent_id: str,
        agent_config: dict[str, Any] | None = None,
        *,
        max_concurrent: int = 16,
        stats: RolloutStats | None = None,
        keep_envs: list[gym.Env] | None = None,
        crash_retries: int = 2,
        env_id: str | None = None,
        env_workers: int = 4,
        seed: int = 0,
        before_batch: Callable[[], None] | None = None,
        max_prompt_tokens: int = 4096,
    ) -> None:
        self.agent_id = agent_id
        self.run_agent = instantiate(load(agent_id), dict(agent_config or {}))
        self.make_env, self.requests, self.stats = make_env, list(requests), stats if stats is not None else RolloutStats()
        self.keep_envs, self.crash_retries, self.max_concurrent = keep_envs, crash_retries, max_concurrent
        self.label = f"env {env_id!r}" if env_id else "the environment"
        self.idle_envs: list[gym.Env] = []
        self.token = secrets.token_urlsafe(24)
        self.endpoint = ChatEndpoint(
            engine, tokenizer, self.token, temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens,
            max_prompt_tokens=max_prompt_tokens, seed=seed, before_batch=before_batch,
        )
        self.executor = ThreadPoolExecutor(max(1, env_workers), thread_name_prefix="agent-env")
        self._make_lock = threading.Lock()

    def run(self) -> list[Episode]:
        """Play every request; returns the finished episodes in request order."""
        results: list[Episode | None] = []
        failure: list[BaseException] = []

        def agents() -> None:
            try:
                results.extend(asyncio.run(self._play_all()))
            except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
                failure.append(err)
            finally:
                self.endpoint.stop_batches()

        self.endpoint.start(engine_thread=False)
        thread = threading.Thread(target=agents, name="agents", daemon=True)
        thread.start()
        try:
            self.endpoint.serve_batches()
        finally:
            thread.join()
            self.endpoint.close()
            self.executor.shutdown(wait=True)
        self.stats.engine_seconds += self.endpoint.engine_seconds
        self.stats.engine_batches += self.endpoint.engine_batches
        if failure:
            for env in self.idle_envs:
                with contextlib.suppress(Exception):
                    env.close()
            raise failure[0]
        if self.keep_envs is not None:
            self.keep_envs.extend(self.idle_envs)
        else:
            for env in self.idle_envs:
                env.close()
        return [episode for episode in results if episode is not None]

    async def _play_all(self) -> list[Episode | None]:
        limit = asyncio.Semaphore(self.max_concurrent)

        async def one(slot: int, request: EpisodeRequest) -> Episode | None:
            async with limit:
                return await self._play(slot, request)

        tasks = [asyncio.create_task(one(slot, request)) for slot, request in enumerate(self.requests)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _play(self, slot: int, request: EpisodeRequest) -> Episode | None:
        """The request's episode, retried after crashes; None once given up."""
        import openai

        errors: list[BaseException] = []
        for attempt in range(self.crash_retries + 1):
            name = f"s{slot}-a{attempt}"
            client = openai.AsyncOpenAI(base_url=self.endpoint.open_episode(name), api_key=self.token, max_retries=0)
            env, task = None, None
            try:
                env = await self._run_in_thread(self._make)
                options = {"task": request.task} if request.task is not None else None
                observation, info = await self._run_in_thread(functools.partial(env.reset, seed=request.seed,
                                                                                  options=options))
                task = AgentTask(env, observation, info, self.executor)
                reward = await self.run_agent(task, client)
                if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                    raise TypeError(f"the agent must return the episode's reward (a finite number), got {reward!r}")
            except asyncio.CancelledError:
                self.endpoint.close_episode(name)
                self._discard(env)
                raise
            except Exception as err:  # noqa: BLE001 - a crash: retried, or the run stops below
                self.endpoint.close_episode(name)
                self._discard(env)
                if task is not None and task.env_error is not None and not isinstance(task.env_error, EnvCrashed):
                    raise EnvFailure(f"{self.label} raised {type(task.env_error).__name__} at step {task.steps + 1} "
                                     f"of task {task.task_id} (seed {request.seed}): {task.env_error}") from err
                errors.append(err)
                self._count_crash(request, err, attempt)
                continue
            finally:
                await client.close()
            turns = self.endpoint.close_episode(name)
            if not turns:
                raise EnvFailure(f"agent {self.agent_id!r} ended task {task.task_id} (seed {request.seed}) without "
                                 "calling the model: an episode needs at least one call to train on")
            self.idle_envs.append(env)
            self.stats.episodes += 1
            self.stats.env_steps += len(turns)
            self.stats.generated_tokens += sum(len(t.response_ids) for t in turns)
            won = task.won if task.won is not None else reward >= 1.0
            return Episode(task.task_id, task.task_type, request.seed, request.group, turns, won=won,
                           score=float(reward), truncated=task.truncated)
        repeated = len(errors) > 1 and len({(type(e), str(e)) for e in errors}) == 1
        if repeated and not isinstance(errors[0], EnvCrashed):
            err = errors[0]
            raise EnvFailure(f"agent {self.agent_id!r} raised {type(err).__name__} on all {len(errors)} attempts of "
                             f"seed {request.seed}: {err}") from err
        self.stats.crashed_episodes += 1
        logger.warning("agent %r crashed on all %d attempts of seed %d; giving the episode up",
                       self.agent_id, len(errors), request.seed)
        return None

    async def _run_in_thread(self, call: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def _make(self) -> gym.Env:
        with self._make_lock:
            return self.idle_envs.pop() if self.idle_envs else self.make_env()

    def _discard(self, env: gym.Env | None) -> None:
        if env is not None:
            with contextlib.suppress(Exception):  # a crashed engine may fail to close as well
                env.close()

    def _count_crash(self, request: EpisodeRequest, err: BaseException, attempt: int) -> None:
        self.stats.env_crashes += 1
        if attempt < self.crash_retries:
            self.stats.crash_retries += 1
            logger.warning("agent %r crashed on seed %d (%s: %s); playing the episode again (retry %d of %d)",
                           self.agent_id, request.seed, type(err).__name__, err, attempt + 1, self.crash_retries)


def run_agent_episodes(
    engine: InferenceEngine,
    tokenizer: Any,
    make_env: Callable[[], gym.Env],
    requests: Sequence[EpisodeRequest],
    sampling: SamplingParams,
    agent_id: str,
    agent_config: dict[str, Any] | None = None,
    **options: Any,
) -> list[Episode]:
    """Play every request with the agent; returns the finished episodes. The options are
    `AgentRollout`'s."""
    return AgentRollout(engine, tokenizer, make_env, requests, sampling, agent_id, agent_config, **options).run()
