"""Run directories: what a run writes, atomic checkpoints, resume and starting over."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from empg_rllib.config.loading import validate
from empg_rllib.config.schema import Experiment
from empg_rllib.util.fileio import atomic_directory

CHECKPOINT_PREFIX = "checkpoint_"
#: Where a command that started its own Ray copies the session's logs, in the run directory.
RAY_LOGS = "ray_logs"
#: Where a run's SFT warm start is written, in the run directory.
SFT_MODEL = "sft_model"


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
RUN_OUTPUTS = (f"{CHECKPOINT_PREFIX}*", "history.json", "tensorboard", SFT_MODEL, RAY_LOGS)


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
