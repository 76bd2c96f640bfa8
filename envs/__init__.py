"""Text agent environments behind one gymnasium protocol (no Ray, no empg_rllib)."""

from empg_envs.core import (
    SPLITS,
    EnvConfigError,
    EnvCrashed,
    EnvError,
    StepLatency,
    TextEnv,
    UnknownEnvError,
    env_lock,
    is_thread_safe,
)
from empg_envs.registry import check_config, expert_action, factory_of, list, make, register, spec_of

register("alfworld", "empg_envs.alfworld.env:AlfWorldEnv")
register("webshop", "empg_envs.webshop.env:WebShopEnv")
register("webshop-server", "empg_envs.webshop.client:WebShopServerEnv")
register("deepsearch", "empg_envs.deepsearch.env:DeepSearchEnv")
register("twx/", "empg_envs.twx:TextWorldExpressEnv", prefix=True, variant="game")
register("http", "empg_envs.remote.client:RemoteEnv")
register("tasks/", "empg_envs.tasks:TaskDatasetEnv", prefix=True, variant="dataset")

__all__ = [
    "SPLITS",
    "EnvConfigError",
    "EnvCrashed",
    "EnvError",
    "StepLatency",
    "TextEnv",
    "UnknownEnvError",
    "env_lock",
    "is_thread_safe",
    "check_config",
    "expert_action",
    "factory_of",
    "list",
    "make",
    "register",
    "spec_of",
]
