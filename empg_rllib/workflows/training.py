"""Training and evaluating one experiment: the algorithm built on the cluster, the iteration
loop with TensorBoard, checkpoints and history, and evaluation of a checkpoint or a model."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from empg_rllib.config.schema import EVAL_SEED, Experiment
from empg_rllib.core.metrics import STEP_ENTROPY_VALUES, SUMMARY_KEYS, time_split
from empg_rllib.util.fileio import write_json
from empg_rllib.workflows.runs import (
    check_run_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from empg_rllib.sampling.progress import SamplingHook

logger = logging.getLogger(__name__)


def build_algorithm(
    exp: Experiment,
    model_path: str | os.PathLike,
    on_sampling: SamplingHook | None = None,
    shared_dir: str | os.PathLike | None = None,
):
    """The EMPG algorithm of `exp`, after checking that every node of the cluster sees
    `model_path` and `shared_dir` (a run directory learners write into; cluster.check_nodes_see)."""
    from empg_rllib.algorithm.empg import EMPGConfig
    from empg_rllib.workflows.cluster import check_nodes_see

    check_nodes_see(model_path, shared_dir)
    algo = EMPGConfig().experiment_from(exp, str(model_path)).build_algo()
    if on_sampling is not None:
        algo.on_sampling = on_sampling
    return algo


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


def train(
    exp: Experiment,
    model_path: str,
    resume: bool = False,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    on_sampling: SamplingHook | None = None,
) -> dict[str, Any]:
    """Train for `exp.iterations`, checkpointing every `exp.checkpoint_every`; returns a summary
    (the final checkpoint, history.json's entries, `time_s`: the iterations' time by part).
    `on_sampling`: a live view of each batch being sampled (progress.SamplingHook)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = exp.directory
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
            scalars = flatten({k: v for k, v in result.items() if k not in ("config", STEP_ENTROPY_VALUES)})
            for key, value in scalars.items():
                writer.add_scalar(key, value, iteration)
            entropies = result.get(STEP_ENTROPY_VALUES)
            if entropies:
                values = entropies[-1] if isinstance(entropies[0], list) else entropies
                writer.add_histogram("step_entropy", np.asarray(values), iteration)
            writer.flush()
            history.append({
                "iteration": iteration,
                **{k: scalars.get(v) for k, v in SUMMARY_KEYS.items()},
                "time_s": time_split(scalars),
            })
            if exp.checkpoint_every and iteration % exp.checkpoint_every == 0:
                save_checkpoint(algo, run_dir, exp, model_path)
            # After the checkpoint: a caller may end the process here (Tune stopping a trial).
            if on_iteration:
                on_iteration(iteration, scalars)
        final = save_checkpoint(algo, run_dir, exp, model_path)
        writer.close()
        write_json(run_dir / "history.json", history)
        return {"checkpoint": str(final), "iterations": algo.iteration, "history": history, "time_s": total_time(history)}
    finally:
        algo.stop()


def total_time(history: list[dict[str, Any]]) -> dict[str, float]:
    """The iterations' wall time by part (metrics.time_split), summed over `history`."""
    parts = [entry["time_s"] for entry in history if "time_s" in entry]
    return {label: sum(p[label] for p in parts) for label in parts[0]} if parts else {}


def evaluate(
    checkpoint: str | os.PathLike,
    splits: list[str],
    episodes: int,
    seed: int = EVAL_SEED,
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
    seed: int = EVAL_SEED,
    on_sampling: SamplingHook | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a model directory (e.g. right after SFT) with the experiment's settings."""
    algo = build_algorithm(exp, model_path, on_sampling)
    try:
        return algo.evaluate_splits(splits, episodes, seed=seed)
    finally:
        algo.stop()
