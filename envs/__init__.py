"""Text agent environments behind one gymnasium protocol (no Ray, no empg_rllib)."""

from envs.core import (
    SPLITS,
    EnvConfigError,
    EnvCrashed,
    EnvError,
    StepLatency,
    TextEnv,
    UnknownEnvError,
)
from envs.registry import check_config, expert_action, list, make, register

register("alfworld", "envs.alfworld.env:AlfWorldEnv")
register("webshop", "envs.webshop.env:WebShopEnv")
register("webshop-server", "envs.webshop.client:WebShopServerEnv")
register("deepsearch", "envs.deepsearch.env:DeepSearchEnv")
register("twx/", "envs.twx:TextWorldExpressEnv", prefix=True)

__all__ = [
    "SPLITS",
    "EnvConfigError",
    "EnvCrashed",
    "EnvError",
    "StepLatency",
    "TextEnv",
    "UnknownEnvError",
    "check_config",
    "expert_action",
    "list",
    "make",
    "register",
]
