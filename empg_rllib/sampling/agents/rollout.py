"""Rollouts of a user's agent: each episode's agent runs against the chat endpoint, and its
calls, recorded token for token, become the episode's turns.

The agents of one sampling call run as asyncio tasks on a thread of their own; the engine answers
their calls in batches on the caller's thread (the env runner's, which owns the engine). Each
episode gets a fresh `openai.AsyncOpenAI` client whose base URL is the episode's own, and an
`AgentTask`: the environment reset to the request's task, stepped with `await task.step(action)`
(in a worker thread: an environment's step may block).

An exception in the agent, an attempt over `timeout_s`, or an `EnvCrashed` from its environment
(even one the agent caught) is a crash: the episode is played again from the start on a fresh
environment, up to `crash_retries` times, then given up (its group is dropped whole, see
`whole_groups`). When every attempt (two or more) failed with the same error, other
than an environment's crash, the error is the agent's own and would repeat: the run stops with
`EnvFailure` naming the agent and the cause. Any
other error of the environment (made, reset or stepped) stops the run too, as in
`rollout.Rollout`, and so does a failure of the engine, raised as it is. Each call is seeded by
`rollout.turn_seed` from the request, its copy in the group, the attempt and the call's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import gymnasium as gym

from empg_envs import EnvCrashed
from empg_rllib.config.agents import instantiate, load
from empg_rllib.core.records import EnvFailure, Episode, EpisodeRequest, RolloutStats
from empg_rllib.sampling.agents.endpoint import ChatEndpoint
from empg_rllib.sampling.engines.base import InferenceEngine, SamplingParams
from empg_rllib.sampling.rollout import group_members, turn_seed

logger = logging.getLogger(__name__)


class AgentTask:
    """One task for an agent: the environment, reset to it. `instruction`, `observation` and
    `info` are reset's (`data`: the task's record, for a `tasks/<dataset>` environment); `done`,
    `won`, `score` and `steps` follow `step()`."""

    def __init__(self, env: gym.Env, observation: str, info: dict[str, Any], executor: ThreadPoolExecutor) -> None:
        self._env, self._executor = env, executor
        self._stepping: Future | None = None
        self.observation, self.info = observation, info
        self.task_id: str = info.get("task_id", "")
        self.task_type: str = info.get("task_type", "")
        self.instruction: str = info.get("instruction", "")
        self.data: dict[str, Any] = info.get("data") or {}
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
        if self.env_error is not None:
            raise RuntimeError(f"the environment failed earlier: {self.env_error}")
        self._stepping = self._executor.submit(self._env.step, action)
        try:
            obs, reward, terminated, truncated, info = await asyncio.wrap_future(self._stepping)
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

    def close_env(self) -> None:
        """Close the environment, once a step under way (an agent cancelled mid-step) has ended."""
        _close_after(self._stepping, self._env)


def _close_after(job: Future | None, env: gym.Env | None) -> None:
    """Close `env` now, or when `job`, a call into it still running in a worker thread, ends."""
    if env is None:
        return
    if job is not None and not job.done():
        job.add_done_callback(lambda _: _close(env))
    else:
        _close(env)


def _close(env: gym.Env) -> None:
    with contextlib.suppress(Exception):  # a crashed engine may fail to close as well
        env.close()


class AgentRollout:
    """One sampling call of agent `agent_id` (with `agent_config`) over `requests`. Runs once.

    The options are `rollout.Rollout`'s where they share a name; `sampling` fixes the endpoint's
    temperature and its cap on `max_tokens`; `max_prompt_tokens` is the longest prompt the
    engine takes; an agent gets `timeout_s` per attempt and `max_calls` calls per episode."""

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
        on_turn: Callable[[RolloutStats], None] | None = None,
        env_workers: int = 4,
        seed: int = 0,
        before_batch: Callable[[], None] | None = None,
        max_prompt_tokens: int = 4096,
        timeout_s: float = 1800.0,
        max_calls: int = 256,
    ) -> None:
        self.agent_id = agent_id
        self.run_agent = instantiate(load(agent_id), dict(agent_config or {}))
        self.make_env, self.requests = make_env, list(requests)
        self.stats = stats if stats is not None else RolloutStats()
        self.keep_envs, self.crash_retries, self.max_concurrent = keep_envs, crash_retries, max_concurrent
        self.seed, self.timeout_s = seed, timeout_s
        self.member = group_members(self.requests)
        self.label = f"env {env_id!r}" if env_id else "the environment"
        self.idle_envs: list[gym.Env] = []
        self.token = secrets.token_urlsafe(24)
        self.endpoint = ChatEndpoint(
            engine, tokenizer, self.token, temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens,
            max_prompt_tokens=max_prompt_tokens, seed=seed, max_calls=max_calls, before_batch=before_batch,
            after_batch=(lambda: on_turn(self.stats)) if on_turn is not None else None,
        )
        self.executor = ThreadPoolExecutor(max(1, env_workers), thread_name_prefix="agent-env")
        self._make_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None

    def run(self) -> list[Episode]:
        """Play every request; returns the finished episodes in request order."""
        started = time.perf_counter()
        results: list[Episode | None] = []
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._agents, args=(results, failure), name="agents", daemon=True)
        self.endpoint.start(engine_thread=False)
        thread.start()
        try:
            self.endpoint.serve_batches()
        except BaseException as err:  # the engine failed (or the runner is stopping): stop the agents
            self.endpoint.refuse_calls(f"sampling stopped: {type(err).__name__}: {err}")
            if self._loop is not None and self._main is not None:
                self._loop.call_soon_threadsafe(self._main.cancel)
            raise
        finally:
            thread.join()
            self.endpoint.close()
            self.executor.shutdown(wait=True)
            self.stats.engine_seconds += self.endpoint.engine_seconds
            self.stats.engine_batches += self.endpoint.engine_batches
            self.stats.wall_seconds += time.perf_counter() - started
            healthy = not failure and self.endpoint.engine_error is None
            if healthy and self.keep_envs is not None:
                self.keep_envs.extend(self.idle_envs)
            else:
                for env in self.idle_envs:
                    _close(env)
        if failure:
            raise failure[0]
        return [episode for episode in results if episode is not None]

    def _agents(self, results: list[Episode | None], failure: list[BaseException]) -> None:
        """The agents' thread: every episode as an asyncio task; the engine's loop ends after."""
        try:
            results.extend(asyncio.run(self._play_all()))
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(err)
        finally:
            self.endpoint.stop_batches()

    async def _play_all(self) -> list[Episode | None]:
        self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
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
            try:
                env, observation, info = await self._start(request)
            except EnvCrashed as err:
                errors.append(err)
                self._count_crash(request, err, attempt)
                continue
            name = f"s{slot}-a{attempt}"
            seed_of = functools.partial(turn_seed, self.seed, request, self.member[slot], attempt)
            client = openai.AsyncOpenAI(
                base_url=self.endpoint.open_episode(name, seed_of), api_key=self.token, max_retries=0,
                # The endpoint is on this machine: a proxy in the environment must not see the token.
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            )
            task = AgentTask(env, observation, info, self.executor)
            error: BaseException | None = None
            try:
                reward = await asyncio.wait_for(self.run_agent(task, client), self.timeout_s)
                if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                    raise TypeError(f"the agent must return the episode's reward (a finite number), got {reward!r}")
            except asyncio.CancelledError:
                self.endpoint.close_episode(name)
                task.close_env()
                raise
            except TimeoutError:
                error = TimeoutError(f"the agent took longer than {self.timeout_s:g} s (agent_timeout_s)")
            except Exception as err:  # noqa: BLE001 - a crash: retried, or the run stops below
                error = err
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            turns = self.endpoint.close_episode(name)
            if task.env_error is not None and not isinstance(task.env_error, EnvCrashed):
                task.close_env()
                raise EnvFailure(f"{self.label} raised {type(task.env_error).__name__} at step {task.steps + 1} of "
                                 f"task {task.task_id} (seed {request.seed}): {task.env_error}") from task.env_error
            if error is None and task.env_error is None:
                if not turns:
                    task.close_env()
                    raise EnvFailure(f"agent {self.agent_id!r} ended task {task.task_id} (seed {request.seed}) "
                                     "without calling the model: an episode needs at least one call to train on")
                self.idle_envs.append(env)
                self.stats.episodes += 1
                self.stats.env_steps += len(turns)
                self.stats.generated_tokens += sum(len(t.response_ids) for t in turns)
                self.stats.prompt_tokens += sum(len(t.prompt_ids) for t in turns)
                won = task.won if task.won is not None else reward >= 1.0
                return Episode(task.task_id, task.task_type, request.seed, request.group, turns, won=won,
                               score=float(reward), truncated=task.truncated)
            # A crash: the agent raised, or its environment crashed (even if the agent went on).
            task.close_env()
            errors.append(task.env_error or error)
            self._count_crash(request, errors[-1], attempt)
        repeated = len(errors) > 1 and len({(type(e), str(e)) for e in errors}) == 1
        if repeated and not isinstance(errors[0], EnvCrashed):
            err = errors[0]
            raise EnvFailure(f"agent {self.agent_id!r} raised {type(err).__name__} on all {len(errors)} attempts of "
                             f"seed {request.seed}: {err}") from err
        self.stats.crashed_episodes += 1
        logger.warning("agent %r crashed on all %d attempts of seed %d; giving the episode up",
                       self.agent_id, len(errors), request.seed)
        return None

    async def _start(self, request: EpisodeRequest) -> tuple[gym.Env, Any, dict[str, Any]]:
        """An environment (an idle one, or made) reset to `request`, in a worker thread. A crash
        is raised as `EnvCrashed`; any other error there stops the run, as in `Rollout`."""
        job = self.executor.submit(self._make_and_reset, request)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # the environment it makes is closed once it is made
            job.add_done_callback(lambda done: done.exception() is None and _close(done.result()[0]))
            raise

    def _make_and_reset(self, request: EpisodeRequest) -> tuple[gym.Env, Any, dict[str, Any]]:
        where, env = "when made", None
        try:
            with self._make_lock:
                env = self.idle_envs.pop() if self.idle_envs else self.make_env()
            where = "at reset"
            options = {"task": request.task} if request.task is not None else None
            observation, info = env.reset(seed=request.seed, options=options)
            return env, observation, info
        except EnvCrashed:
            _close_after(None, env)  # the crash is counted by the caller, with its attempt
            raise
        except Exception as err:
            _close_after(None, env)
            raise EnvFailure(f"{self.label} raised {type(err).__name__} {where} (seed {request.seed}): {err}") from err

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
