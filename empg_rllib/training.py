"""Running experiments: Ray session, atomic checkpoints, resume, TensorBoard, evaluation."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import yaml

from empg_rllib.experiment import Experiment, validate
from empg_rllib.fileio import atomic_directory

if TYPE_CHECKING:
    from empg_rllib.progress import SamplingHook

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
#: Where a command that started its own Ray copies the session's logs, in the run directory.
RAY_LOGS = "ray_logs"


#: Environment of every Ray worker: no tokenizer thread pools fighting Ray's, no hub access.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def ray_session(
    num_cpus: int | None = None, address: str | None = None, logs_to: str | os.PathLike | None = None
) -> Iterator[None]:
    """Ray for one command: join the running cluster at `address` (default: $RAY_ADDRESS, which
    `ray job submit` sets for its entrypoint) or, with neither, start a local instance whose temp
    files stay under $RAY_TMPDIR (default: a fresh temp dir, deleted at exit).

    Worker logs (stdout and stderr of env runners and learners): on a cluster they stream to
    the driver, i.e. into the job's log under `ray job submit`, and stay in each node's
    /tmp/ray/session_latest/logs. A local instance keeps them out of the terminal (the live
    progress line) and, given `logs_to`, copies its whole logs folder to
    `logs_to/<session name>` when it ends, error or not."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": _worker_env_beside_job()})
        try:
            yield
        finally:
            ray.shutdown()
        return
    own_tmp = None
    if "RAY_TMPDIR" not in os.environ:
        own_tmp = tempfile.mkdtemp(prefix="empg-ray-")
        os.environ["RAY_TMPDIR"] = own_tmp
    # "local": a new instance even when `ray start` left one running on this machine, which
    # ray.init() would join (and then refuse num_cpus).
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    # Ray's own accessor; no public API names the session's logs folder.
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    try:
        yield
    finally:
        ray.shutdown()
        if logs_to is not None and logs.is_dir():
            shutil.copytree(logs, Path(logs_to) / logs.parent.name, dirs_exist_ok=True)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
            os.environ.pop("RAY_TMPDIR", None)


def _worker_env_beside_job() -> dict[str, str]:
    """WORKER_ENV without the variables a submitted job's runtime_env sets itself: Ray refuses
    a driver's runtime_env that repeats one of the job's keys, and the user's value wins."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: v for k, v in WORKER_ENV.items() if k not in taken}


def build_algorithm(
    exp: Experiment,
    model_path: str | os.PathLike,
    on_sampling: SamplingHook | None = None,
    shared_dir: str | os.PathLike | None = None,
):
    """The EMPG algorithm of `exp`, after checking that every node of the cluster sees
    `model_path` and `shared_dir` (a run directory learners write into; cluster.check_nodes_see)."""
    from empg_rllib.algorithm import EMPGConfig
    from empg_rllib.cluster import check_nodes_see

    check_nodes_see(model_path, shared_dir)
    algo = EMPGConfig().experiment_from(exp, str(model_path)).build_algo()
    if on_sampling is not None:
        algo.on_sampling = on_sampling
    return algo


def run_dir_of(exp: Experiment) -> Path:
    # Absolute: RLlib's checkpointing goes through pyarrow, which rejects relative paths.
    return (Path(exp.run_dir) / exp.name).resolve()


def save_checkpoint(algo: Any, run_dir: Path, exp: Experiment, model_path: str) -> Path:
    """Write a checkpoint atomically: into a staging dir, then one rename."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{algo.iteration:06d}"
    with atomic_directory(final) as staging:
        # Every learner writes what learner 0's state lacks (a sharded optimizer) first.
        backend = str(staging / "learner_backend")
        algo.learner_group.foreach_learner(lambda learner: learner.save_backend_state(backend))
        algo.save_to_path(str(staging / "algorithm"))
        (staging / "experiment.yaml").write_text(yaml.safe_dump(exp.model_dump(), sort_keys=False))
        (staging / "model_path.txt").write_text(str(model_path))
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "algorithm").is_dir())
    return found[-1] if found else None


#: What a run writes into its directory, and nothing else: all that starting over deletes.
RUN_OUTPUTS = (f"{CHECKPOINT_PREFIX}*", "history.json", "tensorboard", "sft_model", RAY_LOGS)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse, before any work is spent, a run that would mix with another one: a new run where
    checkpoints exist (it would overwrite some, and `--resume` would later pick up the old
    run's later ones), or a resumed run without a checkpoint."""
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    if not resume and latest is not None:
        raise FileExistsError(
            f"{run_dir} holds an earlier run (latest checkpoint: {latest.name}). Continue it with "
            "--resume, or start over with --overwrite (deletes its checkpoints, history, "
            "TensorBoard logs and SFT model)."
        )


def clear_run_dir(run_dir: Path) -> list[str]:
    """Delete an earlier run's outputs (`RUN_OUTPUTS`) from `run_dir`; returns their names."""
    removed = sorted(p for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern))
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [p.name for p in removed]


def restore_checkpoint(algo: Any, checkpoint: str | os.PathLike) -> None:
    """`algo` as saved in `checkpoint`: RLlib's state, every learner's backend state, and the
    env runners given the restored weights."""
    checkpoint = Path(checkpoint)
    algo.restore_from_path(str(checkpoint / "algorithm"))
    backend = str(checkpoint / "learner_backend")
    algo.learner_group.foreach_learner(lambda learner: learner.load_backend_state(backend))
    algo.sync_runner_weights()


def load_checkpoint(path: str | os.PathLike) -> tuple[Experiment, str]:
    path = Path(path)
    if not (path / "algorithm").is_dir() or not (path / "experiment.yaml").exists():
        raise FileNotFoundError(f"{path} is not an empg checkpoint (no algorithm/ and experiment.yaml)")
    exp = validate(yaml.safe_load((path / "experiment.yaml").read_text()))
    return exp, (path / "model_path.txt").read_text().strip()


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar leaves of a nested result dict as 'a/b/c' keys."""
    out: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
        elif hasattr(value, "item") and getattr(value, "size", 2) == 1:
            scalar = float(value.item())
            if math.isfinite(scalar):
                out[name] = scalar
    return out


SUMMARY_KEYS = {
    "success": "env_runners/success_rate",
    "return": "env_runners/episode_return_mean",
    "len": "env_runners/episode_len_mean",
    "invalid": "env_runners/invalid_action_rate",
    "steps/s": "env_runners/env_steps_per_s",
    "tokens/s": "env_runners/generated_tokens_per_s",
    "H_step": "step_entropy_mean",
    "loss": "learners/default_policy/policy_loss",
}


def train(
    exp: Experiment,
    model_path: str,
    resume: bool = False,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    on_sampling: SamplingHook | None = None,
) -> dict[str, Any]:
    """Train for `exp.iterations`, checkpointing every `exp.checkpoint_every`; returns a summary.
    `on_sampling`: a live view of each batch being sampled (progress.SamplingHook)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = run_dir_of(exp)
    check_run_dir(run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    algo = build_algorithm(exp, model_path, on_sampling, shared_dir=run_dir)
    try:
        if resume:
            checkpoint = latest_checkpoint(run_dir)
            restore_checkpoint(algo, checkpoint)
            logger.info("resumed from %s at iteration %d", checkpoint, algo.iteration)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=algo.iteration + 1)
        history = []
        while algo.iteration < exp.iterations:
            result = algo.train()
            iteration = algo.iteration
            scalars = flatten({k: v for k, v in result.items() if k not in ("config", "step_entropy_values")})
            for key, value in scalars.items():
                writer.add_scalar(key, value, iteration)
            entropies = result.get("step_entropy_values")
            if entropies:
                values = entropies[-1] if isinstance(entropies[0], list) else entropies
                writer.add_histogram("step_entropy", np.asarray(values), iteration)
            writer.flush()
            history.append({"iteration": iteration, **{k: scalars.get(v) for k, v in SUMMARY_KEYS.items()}})
            if exp.checkpoint_every and iteration % exp.checkpoint_every == 0:
                save_checkpoint(algo, run_dir, exp, model_path)
            # After the checkpoint: a caller may end the process here (Tune stopping a trial).
            if on_iteration:
                on_iteration(iteration, scalars)
        final = save_checkpoint(algo, run_dir, exp, model_path)
        writer.close()
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
        return {"checkpoint": str(final), "iterations": algo.iteration, "history": history}
    finally:
        algo.stop()


def evaluate(
    checkpoint: str | os.PathLike,
    splits: list[str],
    episodes: int,
    seed: int = 12345,
    on_sampling: SamplingHook | None = None,
) -> dict[str, dict[str, float]]:
    exp, model_path = load_checkpoint(checkpoint)
    algo = build_algorithm(exp, model_path, on_sampling, shared_dir=Path(checkpoint).parent)
    try:
        restore_checkpoint(algo, checkpoint)
        return algo.evaluate_splits(splits, episodes, seed=seed)
    finally:
        algo.stop()


def evaluate_model(
    exp: Experiment,
    model_path: str,
    splits: list[str],
    episodes: int,
    seed: int = 12345,
    on_sampling: SamplingHook | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a model directory (e.g. right after SFT) with the experiment's settings."""
    algo = build_algorithm(exp, model_path, on_sampling)
    try:
        return algo.evaluate_splits(splits, episodes, seed=seed)
    finally:
        algo.stop()
