"""Multi-turn rollouts: many text environments advanced by one inference engine.

Every live conversation that needs its next turn joins the next engine batch, so conversations
advance independently: one that ends early frees its slot instead of waiting for the slowest.
With `env_workers`, environments are made, reset and stepped on that many threads while the
engine generates for the conversations whose observations are ready: a slow environment step
(a tool call, a remote service, a JVM) never holds up generation for the others (the next batch
waits for half of the conversations under way, so that batches stay full). Each turn then
samples with its own seed, drawn from the request and the turn's number, so that what it samples
does not depend on which other conversations shared its batch (a matter of timing). Without
workers, the environments step one after another between engine batches (lock-step), the
engine's own stream seeds the samples and episodes come back in completion order.
Each turn is recorded with the token ids the engine sampled (never re-encoded text), their
behaviour log-probs, and the weights version that produced them.

With `constrain_actions`, a turn whose environment lists admissible actions samples one of them
(constrained decoding): the allowed token ids of each sampled position go into the record so
that the learner scores the same renormalised distribution.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from envs import EnvCrashed
from empg_rllib.inference.base import InferenceEngine, SamplingParams
from empg_rllib.prompting import HistoryTurn, PromptConfig, action_choices, build_prompt_ids, parse_response

logger = logging.getLogger(__name__)


@dataclass
class Turn:
    """One agent turn: the prompt it saw, what it sampled, and what the environment answered."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    entropies: list[float] | None  # the engine's, for inspection (None from vLLM); EMPG uses the learner's
    finish_reason: str
    weights_version: int
    action: str  # what was sent to the environment
    format_error: str | None  # why the response did not parse, if it did not
    reward: float = 0.0
    invalid_action: bool = False
    allowed_token_ids: list[list[int]] | None = None  # constrained decoding: per sampled token


@dataclass
class Episode:
    """A finished conversation with one task."""

    task_id: str
    task_type: str
    seed: int
    group: Any = None
    turns: list[Turn] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    truncated: bool = False

    @property
    def reward(self) -> float:
        """The outcome reward EMPG learns from: the final score (1.0 for a win)."""
        return self.score


@dataclass(frozen=True)
class EpisodeRequest:
    """A task to play: `task` goes to reset's options (None: drawn from the seed)."""

    seed: int
    task: Any = None
    group: Any = None


class EnvFailure(RuntimeError):
    """An environment raised something other than `EnvCrashed`: its own error, an unknown env
    id, a bad env_config or split. A fresh environment would raise it again, so the run stops
    with this message, which names the environment and the cause."""


@dataclass
class RolloutStats:
    episodes: int = 0
    env_steps: int = 0
    generated_tokens: int = 0
    env_crashes: int = 0  # EnvCrashed raised; every attempt counts
    crash_retries: int = 0  # episodes started again on a fresh environment after a crash
    crashed_episodes: int = 0  # episodes given up: their environment crashed on every attempt
    engine_batches: int = 0
    engine_seconds: float = 0.0
    env_seconds: float = 0.0  # summed over environments, which may step at the same time
    wall_seconds: float = 0.0


def whole_groups(
    requests: Sequence[EpisodeRequest], episodes: Sequence[Episode]
) -> tuple[list[Episode], list[Any]]:
    """The episodes of the groups that came back whole, and the groups that did not.

    A group trains whole or not at all: with a member missing (an episode given up after its
    environment crashed on every retry) its baseline would leave that rollout out, and the
    actions that crash an environment would never be penalised.
    """
    wanted = Counter(r.group for r in requests)
    played = Counter(e.group for e in episodes)
    dropped = [group for group, count in wanted.items() if played[group] != count]
    gone = set(dropped)
    return [e for e in episodes if e.group not in gone], dropped


class _Conversation:
    def __init__(self, env: gym.Env, request: EpisodeRequest, slot: int, attempt: int) -> None:
        self.env = env
        self.request = request
        self.slot = slot  # which of the requests: equal requests (one group's copies) differ here
        self.attempt = attempt  # 0, or the how-manieth retry after a crash
        obs, info = env.reset(seed=request.seed, options={"task": request.task} if request.task is not None else None)
        self.observation = obs
        self.info = info
        self.instruction = info["instruction"]
        self.history: list[HistoryTurn] = []
        self.episode = Episode(task_id=info["task_id"], task_type=info["task_type"], seed=request.seed, group=request.group)
        self.sampled: tuple[list[int], Any, Any, str] | None = None  # the turn whose step is under way


@dataclass
class _Outcome:
    """What an environment job (make + reset, or step) gave back to the sampling loop."""

    conv: _Conversation | None = None
    env: gym.Env | None = None
    step: tuple | None = None
    error: Exception | None = None
    where: str = ""
    seconds: float = 0.0


class _Inline(Executor):
    """Runs each job at once in the calling thread: lock-step sampling."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def turn_seed(seed: int, request: EpisodeRequest, member: int, attempt: int, turn: int) -> int:
    """The sampling seed of one turn: a function of the run's seed, the request (its task
    seed, its group and which member of the group it is), the attempt and the turn number."""
    group = zlib.crc32(str(request.group).encode())
    entropy = [seed, request.seed, group, member, attempt, turn]
    return int(np.random.SeedSequence([abs(int(x)) for x in entropy]).generate_state(1)[0] >> 1)


def run_episodes(
    engine: InferenceEngine,
    tokenizer: Any,
    make_env: Callable[[], gym.Env],
    requests: Sequence[EpisodeRequest],
    sampling: SamplingParams,
    prompt_config: PromptConfig | None = None,
    max_concurrent: int = 16,
    stats: RolloutStats | None = None,
    keep_envs: list[gym.Env] | None = None,
    constrain_actions: bool = False,
    crash_retries: int = 2,
    env_id: str | None = None,
    on_turn: Callable[[RolloutStats], None] | None = None,
    env_workers: int = 0,
    seed: int = 0,
    before_batch: Callable[[], None] | None = None,
) -> list[Episode]:
    """Play every request to the end; returns the finished episodes.

    `constrain_actions`: sample only admissible actions where the environment lists them.
    `on_turn`: called with the running `stats` after every engine batch (a live progress view).
    `env_workers`: threads that make, reset and step environments while the engine generates
    (episodes come back in request order, each turn seeded by `turn_seed` from `seed`); 0 steps
    them in lock-step between engine batches (episodes in completion order, the engine's stream).
    `before_batch`: called before every engine batch (asynchronous sampling loads new weights).

    An environment that raises `EnvCrashed` (its engine died) is closed and the episode is
    played again from its first turn on a fresh environment, up to `crash_retries` times; after
    that the episode is given up and counted in `stats.crashed_episodes` (its group is then
    incomplete: see `whole_groups`). Any other exception from making, resetting or stepping an
    environment raises `EnvFailure` naming `env_id` and the cause, after closing every
    environment this call holds. Healthy environments are closed at the end, or handed back in
    `keep_envs` for reuse.
    """
    prompt_config = prompt_config or PromptConfig()
    if constrain_actions and prompt_config.think:
        raise ValueError("constrain_actions samples the action alone; it needs think=False")
    if env_workers < 0:
        raise ValueError(f"env_workers must be >= 0, got {env_workers}")
    encoded: dict[str, list[int]] = {}

    def choices_of(conv: _Conversation) -> list[list[int]] | None:
        admissible = conv.info.get("admissible_actions")
        return action_choices(tokenizer, admissible, encoded) if admissible else None

    stats = stats if stats is not None else RolloutStats()
    started = time.perf_counter()
    pending = list(enumerate(requests))[::-1]
    crashes = [0] * len(pending)  # per request slot
    seen: Counter = Counter()
    member = [0] * len(pending)  # which copy of its (seed, group) each request is
    for slot, request in enumerate(requests):
        member[slot] = seen[(request.seed, str(request.group))]
        seen[(request.seed, str(request.group))] += 1
    idle_envs: list[gym.Env] = []
    ready: list[_Conversation] = []  # waiting for the engine
    # Environment jobs under way: a step (its conversation) or a start (its slot and request).
    busy: dict[Future, _Conversation | tuple[int, EpisodeRequest]] = {}
    finished: list[tuple[int, Episode]] = []
    label = f"env {env_id!r}" if env_id else "the environment"
    jobs: Executor = ThreadPoolExecutor(env_workers, thread_name_prefix="env") if env_workers else _Inline()
    make_lock = threading.Lock()  # `make_env` may hand out pooled environments

    def start(env: gym.Env | None, request: EpisodeRequest, slot: int, attempt: int) -> _Outcome:
        where = "when made"
        try:
            if env is None:
                with make_lock:
                    env = make_env()
            where = "at reset"
            return _Outcome(conv=_Conversation(env, request, slot, attempt), env=env)
        except Exception as err:
            return _Outcome(env=env, error=err, where=where)

    def step(conv: _Conversation, action: str) -> _Outcome:
        t0 = time.perf_counter()
        try:
            return _Outcome(step=conv.env.step(action), seconds=time.perf_counter() - t0)
        except Exception as err:
            where = f"at step {len(conv.episode.turns) + 1} of task {conv.episode.task_id}"
            return _Outcome(error=err, where=where, seconds=time.perf_counter() - t0)

    def crashed(slot: int, request: EpisodeRequest, env: gym.Env | None, where: str) -> None:
        stats.env_crashes += 1
        if env is not None:
            with contextlib.suppress(Exception):  # its engine is dead; closing may fail as well
                env.close()
        crashes[slot] += 1
        if crashes[slot] <= crash_retries:
            stats.crash_retries += 1
            logger.warning(
                "%s crashed %s (seed %d); playing the episode again on a fresh environment (retry %d of %d)",
                label, where, request.seed, crashes[slot], crash_retries,
            )
            pending.append((slot, request))  # started next, from its first turn
        else:
            stats.crashed_episodes += 1
            logger.warning("%s crashed %s (seed %d) on all %d attempts; giving the episode up",
                           label, where, request.seed, crashes[slot])

    def close_all(env: gym.Env | None) -> None:
        # The run stops: let the jobs under way end (those not started are cancelled), then
        # close every environment this call holds, so that no engine process (JVM, planner,
        # server session) outlives it.
        jobs.shutdown(wait=True, cancel_futures=True)
        held = [env, *(conv.env for conv in ready), *idle_envs]
        for future, job in busy.items():
            if isinstance(job, _Conversation):
                held.append(job.env)
            elif not future.cancelled():
                held.append(future.result().env)
        for each in {id(e): e for e in held if e is not None}.values():
            with contextlib.suppress(Exception):
                each.close()

    def abort(err: Exception, where: str, request: EpisodeRequest, env: gym.Env | None) -> EnvFailure:
        close_all(env)
        return EnvFailure(f"{label} raised {type(err).__name__} {where} (seed {request.seed}): {err}")

    def start_next() -> None:
        while pending and len(ready) + len(busy) < max_concurrent:
            slot, request = pending.pop()
            env = idle_envs.pop() if idle_envs else None
            future = jobs.submit(start, env, request, slot, crashes[slot])
            busy[future] = (slot, request)
            if future.done():  # lock-step: started (or crashed, and queued again) at once
                take_in(future)

    def finish_turn(conv: _Conversation, outcome: _Outcome) -> None:
        obs, reward, terminated, truncated, info = outcome.step
        prompt, completion, parsed, action = conv.sampled
        stats.env_steps += 1
        stats.generated_tokens += len(completion.token_ids)
        conv.episode.turns.append(
            Turn(
                prompt_ids=prompt,
                response_ids=completion.token_ids,
                logprobs=completion.logprobs,
                entropies=completion.entropies,
                finish_reason=completion.finish_reason,
                weights_version=completion.weights_version,
                action=action,
                format_error=parsed.error,
                reward=float(reward),
                invalid_action=bool(info.get("invalid_action")) or not parsed.valid,
                allowed_token_ids=completion.allowed_token_ids,
            )
        )
        conv.history.append(HistoryTurn(conv.observation, action))
        conv.observation, conv.info = obs, info
        if terminated or truncated:
            conv.episode.won = bool(info.get("won"))
            conv.episode.score = float(info.get("score", 0.0))
            conv.episode.truncated = bool(truncated)
            finished.append((conv.slot, conv.episode))
            stats.episodes += 1
            idle_envs.append(conv.env)
        else:
            ready.append(conv)

    def collect(block: bool) -> None:
        """Take in every environment job that has ended (in the order they were handed out).
        With `block`, first wait until half of the conversations under way (at least one) are
        ready: the engine then generates fuller batches, and a slow environment still holds up
        no more than the other half."""
        quorum = max(1, (len(busy) + len(ready)) // 2)
        while block and busy:
            waiting = [f for f in busy if not f.done()]
            if not waiting or len(busy) - len(waiting) + len(ready) >= quorum:
                break
            wait(waiting, return_when=FIRST_COMPLETED)
        for future in [f for f in busy if f.done()]:
            take_in(future)

    def take_in(future: Future) -> None:
        """One ended environment job: a started conversation joins the engine's queue, a
        stepped one records its turn; a crash is retried, any other error stops the run."""
        job = busy.pop(future)
        outcome = future.result()
        if not isinstance(job, _Conversation):  # a start
            slot, request = job
            if outcome.error is None:
                ready.append(outcome.conv)
            elif isinstance(outcome.error, EnvCrashed):
                crashed(slot, request, outcome.env, outcome.where)
            else:
                raise abort(outcome.error, outcome.where, request, outcome.env) from outcome.error
            return
        stats.env_seconds += outcome.seconds
        if outcome.error is None:
            finish_turn(job, outcome)
        elif isinstance(outcome.error, EnvCrashed):
            crashed(job.slot, job.request, job.env, outcome.where)
        else:
            raise abort(outcome.error, outcome.where, job.request, job.env) from outcome.error

    try:
        start_next()
        collect(block=False)
        while ready or busy or pending:
            if ready:
                if before_batch is not None:
                    before_batch()
                batch = list(ready)  # left in `ready` until generated: held if the engine fails
                prompts = [
                    build_prompt_ids(
                        tokenizer,
                        conv.instruction,
                        conv.observation,
                        conv.history,
                        conv.info.get("admissible_actions"),
                        prompt_config,
                    )
                    for conv in batch
                ]
                seeds = (
                    [turn_seed(seed, c.request, member[c.slot], c.attempt, len(c.episode.turns)) for c in batch]
                    if env_workers
                    else None
                )
                t0 = time.perf_counter()
                choices = [choices_of(conv) for conv in batch] if constrain_actions else None
                completions = engine.generate(prompts, sampling, choices, seeds=seeds)
                stats.engine_seconds += time.perf_counter() - t0
                stats.engine_batches += 1
                ready.clear()
                for conv, prompt, completion in zip(batch, prompts, completions):
                    parsed = parse_response(completion.text, prompt_config)
                    # An unparsable response still costs a turn: the env sees the raw text and
                    # answers with its own invalid-action convention, so truncation bounds
                    # every episode.
                    action = (
                        parsed.action if parsed.valid else completion.text.strip()[: prompt_config.max_action_chars]
                    )
                    conv.sampled = (prompt, completion, parsed, action)
                    busy[jobs.submit(step, conv, action)] = conv
            collect(block=True)  # `ready` was just handed to the engine, or was empty
            start_next()
            collect(block=False)
            if on_turn is not None:
                on_turn(stats)
    except EnvFailure:
        raise
    except BaseException:
        close_all(None)  # the engine or a callback failed: no environment outlives the call
        raise
    finally:
        jobs.shutdown(wait=True)
    if keep_envs is not None:
        keep_envs.extend(idle_envs)
    else:
        for env in idle_envs:
            env.close()
    stats.wall_seconds += time.perf_counter() - started
    if env_workers:
        finished.sort(key=lambda item: item[0])
    return [episode for _, episode in finished]
