"""Learner weights -> env runner engines.

Sharded backends first gather the weights on all learners at once. Learner 0 publishes them,
into Ray's object store when runners are remote, and each remote runner reads them from there:
with remote learners a 7B model never passes through the driver's memory. A synchronous sync
returns once every engine serves the new weights, so that `weight_sync_s` times the whole sync
(RLlib's own sync only enqueues it).
"""

from __future__ import annotations

from typing import Any

from empg_rllib.sampling.runner_calls import errors_as_values


class WeightSyncError(RuntimeError):
    """An env runner did not load the learner's new weights (an error, or the timeout)."""


def publish_weights(learner_group: Any, to_object_store: bool) -> tuple[int, Any]:
    """Gather the learners' weights and have learner 0 publish them: (version, weights or
    their ObjectRef)."""
    learner_group.foreach_learner(lambda learner: learner.gather_weights())
    published = learner_group.foreach_learner(lambda learner: learner.publish_weights(to_object_store))
    return next(v for v in (r.get() for r in published.result_or_errors) if v is not None)


def sync_to_runners(group: Any, weights: Any, version: int, timeout_s: float) -> None:
    """Load `weights` into every remote runner's engine. A runner that fails to load them, or
    has not loaded them within `timeout_s`, stops the run with a `WeightSyncError` naming it. A
    runner whose engine died is raised to RLlib, which restarts it and loads the learner's
    current weights into it; one that died meanwhile is left to RLlib likewise."""

    def load(runner: Any) -> None:
        runner.load_weights(weights, version)

    expected = group.healthy_worker_ids()
    call = errors_as_values(load)
    answers = {a.worker: a for a in group.foreach_env_runner(call, local_env_runner=False, timeout_seconds=timeout_s)}
    for worker, answer in sorted(answers.items()):
        if answer.error is not None:
            raise WeightSyncError(
                f"env runner {worker} could not load weights version {version}: {answer.describe_error()}\n"
                f"{answer.trace}"
            )
    late = [w for w in expected if w not in answers and w in group.healthy_worker_ids()]
    if late:
        raise WeightSyncError(
            f"env runner(s) {', '.join(map(str, late))} did not load weights version {version} within "
            f"weight_sync_timeout_s={timeout_s:g} s"
        )
