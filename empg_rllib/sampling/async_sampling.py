"""Asynchronous actor-learner sampling: env runners keep playing groups while the learner updates.

The driver keeps two sampling calls in flight on every remote env runner (`groups_per_call`
groups each), so a runner starts its next call the moment one ends, and files what comes back
in a `GroupQueue`. The queue hands groups to the learner in the order they were drawn (a
reorder buffer), so no task is lost or trained twice, across a checkpoint and resume too, and
the sequence of trained tasks does not depend on timing unless a group is dropped as stale
(which groups go stale does). A group is dropped whole, and counted, when a member is missing
(its environment crashed on every retry) or when its oldest turn is more than `max_policy_lag`
weight versions older than the policy about to train on it. New weights are posted on a
`WeightsBoard`, which every runner reads between engine batches: weights reach runners between
turns, without stopping them.

`GroupQueue` is plain Python; the Ray glue is the board and `AsyncSampler`.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from empg_rllib.core.records import Episode, EpisodeRequest
from empg_rllib.sampling.runner_calls import HealthyRunners, errors_as_values, raise_runner_errors
from empg_rllib.util.ray_internals import calls_in_flight

logger = logging.getLogger(__name__)

TAG = "empg_async_sample"


def oldest_version(episodes: list[Episode]) -> int:
    """The weights version of a group's oldest turn."""
    versions = [t.weights_version for e in episodes for t in e.turns]
    return min(versions) if versions else 0


@dataclass
class Taken:
    """What `GroupQueue.take` found: a batch's groups (when `ready`) and the groups dropped."""

    ready: bool = False
    episodes: list[Episode] = field(default_factory=list)
    lags: list[int] = field(default_factory=list)  # per trained group: learner version - oldest turn's
    dropped_stale: int = 0
    dropped_incomplete: int = 0


@dataclass
class GroupQueue:
    """Drawn groups in draw order: requested, then played, then trained or dropped."""

    order: deque = field(default_factory=deque)  # group ids not yet trained or dropped
    requests: dict[str, list[EpisodeRequest]] = field(default_factory=dict)
    played: dict[str, list[Episode]] = field(default_factory=dict)

    def add_group(self, group: str, requests: list[EpisodeRequest]) -> None:
        self.order.append(group)
        self.requests[group] = requests

    def file(self, groups: list[str], episodes: list[Episode]) -> None:
        """A call's episodes; every one of its `groups` is played (a group may come back with
        members missing: their environments crashed on every retry)."""
        for g in groups:
            self.played.setdefault(g, [])
        for e in episodes:
            self.played[str(e.group)].append(e)

    def take(self, n: int, version: int, max_lag: int) -> Taken:
        """The next `n` trainable groups in draw order (`ready`), or not ready while the front
        ones are still being played. Groups met at the front with a member missing, or whose
        oldest turn lags `version` by more than `max_lag`, are dropped for good and counted."""
        out = Taken()
        eligible: list[tuple[str, int]] = []  # (group, its lag)
        for group in list(self.order):
            if group not in self.played or len(eligible) == n:
                break
            episodes = self.played[group]
            lag = version - oldest_version(episodes)
            if len(episodes) != len(self.requests[group]):
                out.dropped_incomplete += 1
                self._forget(group)
            elif lag > max_lag:
                out.dropped_stale += 1
                self._forget(group)
            else:
                eligible.append((group, lag))
        if len(eligible) < n:
            return out
        out.ready = True
        for group, lag in eligible:
            out.episodes.extend(self.played[group])
            out.lags.append(lag)
            self._forget(group)
        return out

    def _forget(self, group: str) -> None:
        self.order.remove(group)
        self.requests.pop(group, None)
        self.played.pop(group, None)

    def front(self, n: int) -> list[Episode]:
        """The episodes back so far of the next `n` groups in draw order (a live view)."""
        return [e for g in itertools.islice(self.order, n) for e in self.played.get(g, [])]

    def untrained(self) -> list[tuple[str, list[EpisodeRequest]]]:
        """Every group drawn and not yet trained or dropped, in draw order (for checkpoints)."""
        return [(g, self.requests[g]) for g in self.order]


@ray.remote(num_cpus=0)
class WeightsBoard:
    """The newest published weights: (version, [ObjectRef]). Runners read it between engine
    batches; the reference sits in a list so that Ray hands it over unresolved."""

    def __init__(self) -> None:
        self.version, self.weights = 0, None

    def post(self, version: int, weights: list) -> None:
        if version > self.version:
            self.version, self.weights = version, weights

    def latest(self, newer_than: int) -> tuple[int, list | None]:
        return (self.version, self.weights) if self.version > newer_than else (self.version, None)


@dataclass
class AsyncSampler:
    """The driver's side: keeps `calls_per_runner` sampling calls in flight on every healthy
    remote runner and files what returns in the queue."""

    groups_per_call: int
    calls_per_runner: int = 2
    queue: GroupQueue = field(default_factory=GroupQueue)
    unsent: deque = field(default_factory=deque)  # group ids queued, not yet sent (in draw order)
    inflight: dict[int, deque] = field(default_factory=dict)  # runner -> its calls' group ids
    board: Any = None
    runner_busy_s: float = 0.0  # runners' sampling time since the last batch was taken
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.board is None:
            self.board = WeightsBoard.remote()

    def post_weights(self, version: int, weights_ref: Any) -> None:
        """Publish new weights; runners pick them up before their next engine batch."""
        ray.get(self.board.post.remote(version, [weights_ref]))

    def requeue(self, groups: list[tuple[str, list[EpisodeRequest]]]) -> None:
        """Groups drawn before a checkpoint and not trained: sampled again first, in order."""
        for group, requests in groups:
            self.queue.add_group(group, requests)
            self.unsent.append(group)

    def next_batch(
        self, runners: Any, draw: Any, n: int, version: int, max_lag: int, restore: Any,
        on_filed: Any = lambda front: None, restore_timeout_s: float = 1800.0,
    ) -> Taken:
        """Wait until the next `n` groups in draw order are played and trainable; returns them
        with everything dropped meanwhile. `draw()` -> (group id, requests) draws a new task;
        `on_filed(episodes)` sees the episodes back so far of the next `n` groups; `restore()`
        asks RLlib to restart failed runners, tried again every round while any is down, and
        with none healthy for `restore_timeout_s` the run stops."""
        total = Taken()
        on_filed(self.queue.front(n))
        healthy = HealthyRunners(runners, restore, restore_timeout_s)
        # Groups beyond the next max_lag + 1 batches would be stale when trained: not drawn yet.
        ahead = (max_lag + 1) * n
        while True:
            self._fill(runners, draw, ahead)
            found = self.queue.take(n, version, max_lag)
            total.dropped_stale += found.dropped_stale
            total.dropped_incomplete += found.dropped_incomplete
            if found.ready:
                total.ready, total.episodes, total.lags = True, found.episodes, found.lags
                return total
            for worker, answer in runners.fetch_ready_async_reqs(tags=TAG, timeout_seconds=0.5):
                raise_runner_errors([answer])
                groups, episodes, metrics = answer.value
                if self.inflight.get(worker):
                    self.inflight[worker].popleft()
                self.queue.file(groups, episodes)
                self.metrics.append(metrics)
                self.runner_busy_s += answer.seconds
                on_filed(self.queue.front(n))
            self._recover_lost_calls(runners)
            healthy.ids()

    def _fill(self, runners: Any, draw: Any, ahead: int) -> None:
        """Send calls to runners with room for one, drawing new groups while fewer than `ahead`
        are drawn and untrained."""
        for worker in runners.healthy_worker_ids():
            calls = self.inflight.setdefault(worker, deque())
            while len(calls) < self.calls_per_runner:
                while len(self.unsent) < self.groups_per_call and len(self.queue.order) < ahead:
                    group, requests = draw()
                    self.queue.add_group(group, requests)
                    self.unsent.append(group)
                if not self.unsent:
                    return
                groups = [self.unsent.popleft() for _ in range(min(self.groups_per_call, len(self.unsent)))]
                requests = [r for g in groups for r in self.queue.requests[g]]
                sent = runners.foreach_env_runner_async(
                    _sample_call(groups, requests, self.board), tag=TAG, remote_worker_ids=[worker]
                )
                if not sent:  # the runner's in-flight cap: try again later
                    self.unsent.extendleft(reversed(groups))
                    break
                calls.append(groups)

    def _recover_lost_calls(self, runners: Any) -> None:
        """Calls RLlib no longer holds go back to the front of the line, in draw order: those of
        a runner that is down, and those it dropped when the runner failed in another call (an
        evaluation) and was restarted since."""
        healthy = set(runners.healthy_worker_ids())
        lost: list[str] = []
        for worker, calls in self.inflight.items():
            held = calls_in_flight(runners, worker, TAG) if worker in healthy else 0
            while len(calls) > held:
                lost.extend(calls.popleft())
        if not lost:
            return
        position = {g: i for i, g in enumerate(self.queue.order)}
        self.unsent = deque(sorted([*lost, *self.unsent], key=position.__getitem__))
        logger.warning("%d groups lost with a failed env runner; playing them again", len(lost))


def _sample_call(groups: list[str], requests: list[EpisodeRequest], board: Any) -> Any:
    def call(runner: Any) -> tuple[list[str], list[Episode], dict[str, Any]]:
        return groups, runner.sample(requests=requests, weights_board=board), runner.get_metrics()

    return errors_as_values(call)
