"""EMPG (Entropy-Modulated Policy Gradients) for long-horizon LLM agents on Ray RLlib.

The public API, for training without the command line::

    from empg_rllib import load_experiment, resolve_model, ray_session, train

    exp = load_experiment("tuned_examples/demo.yaml", ["iterations=2"])
    with ray_session():
        summary = train(exp, str(resolve_model(exp.model)))

Names are imported on first use, so that `import empg_rllib` stays cheap and the pure parts
(`empg_rllib.core`) never pull in Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "EMPG": "empg_rllib.algorithm.empg",
    "EMPGConfig": "empg_rllib.algorithm.empg",
    "Experiment": "empg_rllib.config.schema",
    "ConfigError": "empg_rllib.config.schema",
    "load_experiment": "empg_rllib.config.loading",
    "validate_experiment": "empg_rllib.config.loading",
    "ray_session": "empg_rllib.workflows.session",
    "train": "empg_rllib.workflows.training",
    "evaluate": "empg_rllib.workflows.training",
    "evaluate_model": "empg_rllib.workflows.training",
    "resolve_model": "empg_rllib.workflows.models",
    "run_sft": "empg_rllib.workflows.sft",
    "empg_modulate": "empg_rllib.core.advantages",
    "group_advantages": "empg_rllib.core.advantages",
}
#: public names that differ from the defining module's own
_RENAMED = {"load_experiment": "load", "validate_experiment": "validate"}

__all__ = [
    "EMPG",
    "ConfigError",
    "EMPGConfig",
    "Experiment",
    "empg_modulate",
    "evaluate",
    "evaluate_model",
    "group_advantages",
    "load_experiment",
    "ray_session",
    "resolve_model",
    "run_sft",
    "train",
    "validate_experiment",
]

if TYPE_CHECKING:
    from empg_rllib.algorithm.empg import EMPG, EMPGConfig
    from empg_rllib.config.loading import load as load_experiment
    from empg_rllib.config.loading import validate as validate_experiment
    from empg_rllib.config.schema import ConfigError, Experiment
    from empg_rllib.core.advantages import empg_modulate, group_advantages
    from empg_rllib.workflows.models import resolve_model
    from empg_rllib.workflows.session import ray_session
    from empg_rllib.workflows.sft import run_sft
    from empg_rllib.workflows.training import evaluate, evaluate_model, train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'empg_rllib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
