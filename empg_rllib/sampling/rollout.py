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

`run_episodes` builds a `Rollout` and runs it. One thread, the loop's, owns all of its state and
alternates: an engine batch for the ready conversations, then taking in the environment jobs
that have ended, then starting queued requests. The jobs themselves (`start_episode`,
`step_env`) touch only their own environment and return an outcome, so the same methods serve
the worker threads and lock-step (where a job runs at once, in the loop's thread).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, NoReturn

import gymnasium as gym
import numpy as np

from empg_envs import EnvCrashed
from empg_rllib.config.prompt import PromptConfig
from empg_rllib.core.records import EnvFailure, Episode, EpisodeRequest, RolloutStats, Turn
from empg_rllib.sampling.engines.base import Completion, InferenceEngine, SamplingParams
from empg_rllib.sampling.prompting import HistoryTurn, action_choices, build_prompt_ids, parse_response

logger = logging.getLogger(__name__)


class _Conversation:
    """One episode under way: its environment, its request, and what its next prompt shows."""

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


def group_members(requests: Sequence[EpisodeRequest]) -> list[int]:
    """Which copy of its (seed, group) each request is: 0 for the first, 1 for the next..."""
    seen: Counter = Counter()
    members = []
    for request in requests:
        key = (request.seed, str(request.group))
        members.append(seen[key])
        seen[key] += 1
    return members


class Rollout:
    """One sampling call: plays `requests` to the end with one engine (the arguments are
    `__init__`'s). Runs once.

    Its state, touched by the loop's thread alone: `pending` (slot, request) pairs not yet
    started, the next to start last; `ready` conversations waiting for the engine; `busy`
    environment jobs under way, a step (its conversation) or a start (its slot, request
    and the idle environment it reuses, if any);
    `finished` (slot, episode) pairs; `idle_envs` environments free for the next start; and per
    slot, `crashes` so far and `member` (which copy of its (seed, group) the request is).
    """

    def __init__(
        self,
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
    ) -> None:
        """`constrain_actions`: sample only admissible actions where the environment lists them.
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
        self.engine = engine
        self.tokenizer = tokenizer
        self.make_env = make_env
        self.sampling = sampling
        self.prompt_config = prompt_config
        self.max_concurrent = max_concurrent
        self.stats = stats if stats is not None else RolloutStats()
        self.keep_envs = keep_envs
        self.constrain_actions = constrain_actions
        self.crash_retries = crash_retries
        self.label = f"env {env_id!r}" if env_id else "the environment"
        self.on_turn = on_turn
        self.env_workers = env_workers
        self.seed = seed
        self.before_batch = before_batch
        self.pending: list[tuple[int, EpisodeRequest]] = list(enumerate(requests))[::-1]
        self.crashes = [0] * len(requests)
        self.member = group_members(requests)
        self.idle_envs: list[gym.Env] = []
        self.ready: list[_Conversation] = []
        self.busy: dict[Future, _Conversation | tuple[int, EpisodeRequest, gym.Env | None]] = {}
        self.finished: list[tuple[int, Episode]] = []
        self.jobs: Executor = ThreadPoolExecutor(env_workers, thread_name_prefix="env") if env_workers else _Inline()
        self._make_lock = threading.Lock()  # `make_env` may hand out pooled environments
        self._encoded: dict[str, list[int]] = {}  # action texts' token ids, reused across turns

    def run(self) -> list[Episode]:
        """Play every request to the end; returns the finished episodes."""
        started = time.perf_counter()
        try:
            self.start_queued()
            self.collect(block=False)
            while self.ready or self.busy or self.pending:
                if self.ready:
                    self.generate()
                self.collect(block=True)  # `ready` was just handed to the engine, or was empty
                self.start_queued()
                self.collect(block=False)
                if self.on_turn is not None:
                    self.on_turn(self.stats)
        except EnvFailure:
            raise  # `fail` has closed everything
        except BaseException:
            self.close_all(None)  # the engine or a callback failed: no environment outlives the call
            raise
        finally:
            self.jobs.shutdown(wait=True)
        self.hand_back()
        self.stats.wall_seconds += time.perf_counter() - started
        if self.env_workers:
            self.finished.sort(key=lambda item: item[0])  # batches formed by timing: restore request order
        return [episode for _, episode in self.finished]

    # Environment jobs: run on a worker (in lock-step, at once in the loop's thread); they touch
    # nothing but their own environment, so they need no lock on the loop's state.

    def start_episode(self, env: gym.Env | None, request: EpisodeRequest, slot: int, attempt: int) -> _Outcome:
        """Make an environment (unless `env`, an idle one, is reused) and reset it to `request`."""
        where = "when made"
        try:
            if env is None:
                with self._make_lock:
                    env = self.make_env()
            where = "at reset"
            return _Outcome(conv=_Conversation(env, request, slot, attempt), env=env)
        except Exception as err:
            return _Outcome(env=env, error=err, where=where)

    def step_env(self, conv: _Conversation, action: str) -> _Outcome:
        """Send `action` to the conversation's environment."""
        t0 = time.perf_counter()
        try:
            return _Outcome(step=conv.env.step(action), seconds=time.perf_counter() - t0)
        except Exception as err:
            where = f"at step {len(conv.episode.turns) + 1} of task {conv.episode.task_id}"
            return _Outcome(error=err, where=where, seconds=time.perf_counter() - t0)

    # The loop's own steps.

    def start_queued(self) -> None:
        """Start queued requests, on idle environments first, while fewer than
        `max_concurrent` conversations are live."""
        while self.pending and len(self.ready) + len(self.busy) < self.max_concurrent:
            slot, request = self.pending.pop()
            env = self.idle_envs.pop() if self.idle_envs else None
            future = self.jobs.submit(self.start_episode, env, request, slot, self.crashes[slot])
            self.busy[future] = (slot, request, env)
            if future.done():  # lock-step: started (or crashed, and queued again) at once
                self.take_in(future)

    def generate(self) -> None:
        """One engine batch: every ready conversation samples its next turn, whose step then
        goes to the environment jobs."""
        if self.before_batch is not None:
            self.before_batch()
        batch = list(self.ready)  # left in `ready` until generated: held if the engine fails
        prompts = [self.prompt_of(conv) for conv in batch]
        seeds = self.turn_seeds(batch)
        t0 = time.perf_counter()
        choices = [self.choices_of(conv) for conv in batch] if self.constrain_actions else None
        completions = self.engine.generate(prompts, self.sampling, choices, seeds=seeds)
        self.stats.engine_seconds += time.perf_counter() - t0
        self.stats.engine_batches += 1
        self.ready.clear()
        for conv, prompt, completion in zip(batch, prompts, completions):
            self.act(conv, prompt, completion)

    def prompt_of(self, conv: _Conversation) -> list[int]:
        """The token ids of the conversation's next prompt."""
        return build_prompt_ids(
            self.tokenizer,
            conv.instruction,
            conv.observation,
            conv.history,
            conv.info.get("admissible_actions"),
            self.prompt_config,
        )

    def turn_seeds(self, batch: Sequence[_Conversation]) -> list[int] | None:
        """Each conversation's seed for its next turn; None in lock-step, where batches do not
        depend on timing and the engine's own stream seeds them."""
        if not self.env_workers:
            return None
        return [
            turn_seed(self.seed, conv.request, self.member[conv.slot], conv.attempt, len(conv.episode.turns))
            for conv in batch
        ]

    def choices_of(self, conv: _Conversation) -> list[list[int]] | None:
        """The completions constrained decoding allows (None where the env lists no actions)."""
        admissible = conv.info.get("admissible_actions")
        return action_choices(self.tokenizer, admissible, self._encoded) if admissible else None

    def act(self, conv: _Conversation, prompt: list[int], completion: Completion) -> None:
        """Hold the sampled turn and hand its action to a step job."""
        parsed = parse_response(completion.text, self.prompt_config)
        # An unparsable response still costs a turn: the env sees the raw text and answers
        # with its own invalid-action convention, so truncation bounds every episode.
        action = parsed.action if parsed.valid else completion.text.strip()[: self.prompt_config.max_action_chars]
        conv.sampled = (prompt, completion, parsed, action)
        self.busy[self.jobs.submit(self.step_env, conv, action)] = conv

    def collect(self, block: bool) -> None:
        """Take in every environment job that has ended (in the order they were handed out),
        with `block` after `wait_for_quorum`."""
        if block:
            self.wait_for_quorum()
        for future in [f for f in self.busy if f.done()]:
            self.take_in(future)

    def wait_for_quorum(self) -> None:
        """Wait until half of the conversations under way (at least one) are ready: the engine
        then generates fuller batches, and a slow environment still holds up no more than the
        other half."""
        quorum = max(1, (len(self.busy) + len(self.ready)) // 2)
        while self.busy:
            waiting = [f for f in self.busy if not f.done()]
            if not waiting or len(self.busy) - len(waiting) + len(self.ready) >= quorum:
                return
            wait(waiting, return_when=FIRST_COMPLETED)

    def take_in(self, future: Future) -> None:
        """One ended environment job: a started conversation joins the engine's queue, a
        stepped one records its turn; a crash is retried, any other error stops the run."""
        job = self.busy.pop(future)
        outcome = future.result()
        if isinstance(job, _Conversation):
            self.stats.env_seconds += outcome.seconds
            slot, request, env = job.slot, job.request, job.env
        else:
            (slot, request, _), env = job, outcome.env
        if isinstance(outcome.error, EnvCrashed):
            self.handle_crash(slot, request, env, f"{outcome.where}: {outcome.error}")
        elif outcome.error is not None:
            self.fail(outcome.error, outcome.where, request, env)
        elif isinstance(job, _Conversation):
            self.finish_turn(job, outcome.step)
        else:
            self.ready.append(outcome.conv)

    def finish_turn(self, conv: _Conversation, step: tuple) -> None:
        """Record the turn `conv.sampled` with what the environment answered (`step`, as
        `env.step` returns it); the conversation then waits for the engine again, or its
        episode is finished and its environment free for the next start."""
        obs, reward, terminated, truncated, info = step
        prompt, completion, parsed, action = conv.sampled
        self.stats.env_steps += 1
        self.stats.generated_tokens += len(completion.token_ids)
        self.stats.prompt_tokens += len(prompt)
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
            self.finished.append((conv.slot, conv.episode))
            self.stats.episodes += 1
            self.idle_envs.append(conv.env)
        else:
            self.ready.append(conv)

    def handle_crash(self, slot: int, request: EpisodeRequest, env: gym.Env | None, where: str) -> None:
        """Close the crashed environment; queue the request to start next, from its first turn,
        or give it up once it has crashed more than `crash_retries` times."""
        self.stats.env_crashes += 1
        if env is not None:
            with contextlib.suppress(Exception):  # its engine is dead; closing may fail as well
                env.close()
        self.crashes[slot] += 1
        if self.crashes[slot] <= self.crash_retries:
            self.stats.crash_retries += 1
            logger.warning(
                "%s crashed %s (seed %d); playing the episode again on a fresh environment (retry %d of %d)",
                self.label, where, request.seed, self.crashes[slot], self.crash_retries,
            )
            self.pending.append((slot, request))
        else:
            self.stats.crashed_episodes += 1
            logger.warning("%s crashed %s (seed %d) on all %d attempts; giving the episode up",
                           self.label, where, request.seed, self.crashes[slot])

    def fail(self, err: Exception, where: str, request: EpisodeRequest, env: gym.Env | None) -> NoReturn:
        """Stop the run: close everything (`env` too, the one that raised `err`) and raise
        `EnvFailure` naming the environment and the cause."""
        self.close_all(env)
        raise EnvFailure(f"{self.label} raised {type(err).__name__} {where} (seed {request.seed}): {err}") from err

    def close_all(self, env: gym.Env | None) -> None:
        """The run stops: let the jobs under way end (those not started are cancelled), then
        close every environment held (and `env`), so that no engine process (JVM, planner,
        server session) outlives the call."""
        self.jobs.shutdown(wait=True, cancel_futures=True)
        held = [env, *(conv.env for conv in self.ready), *self.idle_envs]
        for future, job in self.busy.items():
            if isinstance(job, _Conversation):
                held.append(job.env)
            elif future.cancelled():
                held.append(job[2])  # an idle environment the start would have reused
            else:
                held.append(future.result().env)
        for each in {id(e): e for e in held if e is not None}.values():
            with contextlib.suppress(Exception):
                each.close()

    def hand_back(self) -> None:
        """The run ended well: the idle environments go back in `keep_envs`, or are closed."""
        if self.keep_envs is not None:
            self.keep_envs.extend(self.idle_envs)
        else:
            for env in self.idle_envs:
                env.close()


def run_episodes(
    engine: InferenceEngine,
    tokenizer: Any,
    make_env: Callable[[], gym.Env],
    requests: Sequence[EpisodeRequest],
    sampling: SamplingParams,
    *args: Any,
    **options: Any,
) -> list[Episode]:
    """Play every request to the end; returns the finished episodes. The options are
    `Rollout`'s."""
    return Rollout(engine, tokenizer, make_env, requests, sampling, *args, **options).run()
