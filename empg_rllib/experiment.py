"""The experiment file schema: what a `tuned_examples/*.yaml` may say, validated before Ray starts.

An unknown key names the nearest valid key; a value of the wrong type names the key and the
type expected. `--set key=value` overrides use dotted paths into the same schema.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import envs
from empg_rllib.prompting import PromptConfig


class ConfigError(ValueError):
    """A problem in an experiment file; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class EMPGSettings(_Strict):
    """EMPG modulation (EMPG.md); `enabled: false` gives the plain base algorithm."""

    enabled: bool = True
    k: float = 1.0
    k_f: float = 1.0
    zeta: float = 0.1
    use_scaling: bool = True
    use_bonus: bool = True
    std_normalize: bool = False
    # Which tokens' entropies make a step's entropy H_t: all generated tokens (the paper's
    # definition), or only those where the policy had more than one allowed token (constrained
    # decoding forces the rest). Default: choice_tokens when constrain_actions is on.
    step_entropy: Literal["all_tokens", "choice_tokens"] | None = None

    def modulation(self) -> dict[str, Any]:
        """The keyword arguments of `advantages.empg_terms`."""
        return self.model_dump(exclude={"enabled", "step_entropy"})


class EvaluationSettings(_Strict):
    interval: int = Field(0, ge=0, description="evaluate every N iterations; 0: only when asked")
    splits: list[str] = ["eval_seen", "eval_unseen"]
    episodes: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)


class SFTSettings(_Strict):
    """Behaviour cloning on expert demonstrations (the warm start of a from-scratch model)."""

    episodes: int = Field(200, ge=1)
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    split: str = "train"
    bf16_autocast: bool = True
    prompt_loss_weight: float = Field(0.0, ge=0)  # >0: also model the prompt text (from-scratch models)
    # >0: after training, the mean probability of the expert's action on this many expert
    # episodes of `heldout_split`, overall and per action verb.
    heldout_episodes: int = Field(0, ge=0)
    heldout_split: Literal["train", "eval_seen", "eval_unseen"] = "eval_seen"


class LoRASettings(_Strict):
    """LoRA adapters (peft) on the learner: only they train, are synced and are checkpointed."""

    r: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0, description="the adapters' scale is alpha / r; default 2 * r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )

    @model_validator(mode="after")
    def _alpha_default(self) -> "LoRASettings":
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        return self


class AsyncSettings(_Strict):
    """Asynchronous actor-learner (`async:` in YAML): env runners keep sampling groups while the
    learner updates, and new weights reach them between turns.

    A group whose oldest turn was sampled more than `max_policy_lag` weight versions before the
    update that would train on it is dropped and counted. The loss is decoupled PPO: the ratio
    is clipped against the learner's pre-update pass, and each token is weighted by the
    importance weight of that pass against the behaviour policy that sampled it, truncated at
    `is_weight_cap`.
    """

    enabled: bool = False
    max_policy_lag: int = Field(1, ge=0)
    is_weight_cap: float = Field(2.0, ge=1.0)
    # Groups per sampling call sent to a runner; each runner holds two calls, so that it starts
    # the next as soon as one ends. Default: a runner's share of a batch, as in synchronous
    # sampling (tasks_per_batch / num_env_runners, rounded up).
    groups_per_call: int | None = Field(None, ge=1)


#: Resource names Ray reserves for itself: `cpus` and `gpus` set the first two, and the
#: others are not requested per actor.
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ActorResources(_Strict):
    """What Ray reserves for one actor: the actor lands on a node that has it all free.
    `custom` pins actors to node types: a node type that declares `vllm_runner: 1` in its
    `resources:` takes the actors asking for `vllm_runner: 1`."""

    cpus: float = Field(1, ge=0)
    gpus: float = Field(0, ge=0)
    custom: dict[str, Annotated[float, Field(gt=0)]] = {}

    @field_validator("custom")
    @classmethod
    def _not_ray_names(cls, custom: dict[str, float]) -> dict[str, float]:
        if reserved := [name for name in custom if name in _RAY_RESOURCES]:
            raise ValueError(f"names other than Ray's own {', '.join(reserved)} (set CPUs and GPUs with cpus / gpus)")
        return custom

    def ray_resources(self) -> dict[str, float]:
        """As Ray names them: {"CPU": ..., "GPU": ..., custom...}, zero amounts left out."""
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus, **self.custom}.items() if v}


class VLLMSettings(_Strict):
    """The vLLM engine's own settings (`engine: vllm`). The defaults suit both a 2-core CPU box
    and a one-GPU env runner."""

    # KV-cache size per engine. None: 0.5 GiB on a CPU host; on a GPU, what
    # gpu_memory_utilization leaves after the weights.
    kv_cache_gib: float | None = Field(None, gt=0)
    # Of a whole GPU; a runner given a fraction of one (resources.env_runner.gpus < 1) uses that
    # fraction of it.
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)  # None: the model's context length
    # GPUs one engine shards the model over: resources.env_runner.gpus must equal it.
    tensor_parallel_size: int = Field(1, ge=1)
    # None: eager on CPU (compiling takes a minute at start there, for about 20%); CUDA graphs on GPU.
    enforce_eager: bool | None = None
    # None: the experiment's `dtype`, with its fallback to float32 where bf16 is not native.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_num_seqs: int | None = Field(None, ge=1)  # None: vLLM's default


class ResourceSettings(_Strict):
    """Resources of each remote env runner and each remote learner (`num_env_runners` and
    `num_learners` say how many). With a count of 0 that part runs in the driver process,
    which Ray reserves nothing for."""

    env_runner: ActorResources = ActorResources()
    learner: ActorResources = ActorResources()


class Experiment(_Strict):
    """Everything an EMPG experiment sets."""

    # `async` is a Python keyword: the field is `async_`, the YAML key `async`.
    model_config = ConfigDict(
        extra="forbid", strict=False, validate_assignment=True, validate_by_name=True, serialize_by_alias=True
    )

    name: str = "empg"
    seed: int = 0
    # model and engine
    model: str = "tiny:"
    warm_start: Literal["none", "sft"] = "none"  # sft: behaviour-clone the expert before RL
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMSettings = VLLMSettings()
    # A weight sync that has not reached every env runner's engine by then stops the run,
    # naming the runner.
    weight_sync_timeout_s: float = Field(600.0, gt=0)
    # bfloat16: bf16 compute with fp32 master weights, where the hardware has native bf16
    # (CUDA, AVX-512 BF16, AMX); float32 with one logged line elsewhere.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # environment and rollouts
    env: str = "alfworld"
    env_config: dict[str, Any] = {}
    # An episode whose environment crashes (EnvCrashed: a dead JVM, planner or server) is
    # played again on a fresh environment up to this many times; after that its whole group
    # is dropped from the batch (never trained with a member missing) and counted.
    env_crash_retries: int = Field(2, ge=0)
    tasks_per_batch: int = Field(4, ge=1)
    group_size: int = Field(4, ge=1)
    max_turns: int = Field(10, ge=1)
    history_turns: int = Field(2, ge=0)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    think: bool = False
    # Sample only admissible actions (constrained decoding; needs think: false). A from-scratch
    # model cannot yet copy an action from the list; a pretrained LLM does not need this.
    constrain_actions: bool = False
    list_admissible_actions: bool = True  # show the admissible actions in the prompt
    max_concurrent_episodes: int = Field(32, ge=1)
    # Threads per env runner that make, reset and step environments while the engine generates
    # for the conversations that are ready (each turn then has its own sampling seed, so that
    # timing never changes what is sampled). 0: lock-step, environments step one after another
    # between engine batches.
    env_workers: int = Field(4, ge=0)
    async_: AsyncSettings = Field(AsyncSettings(), alias="async")
    # algorithm
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    loss: Literal["grpo", "dapo"] = "grpo"
    empg: EMPGSettings = EMPGSettings()
    clip_low: float | None = Field(None, gt=0)
    clip_high: float | None = Field(None, gt=0)
    kl_coef: float = Field(0.0, ge=0)
    # optimisation
    lr: float = Field(1e-4, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    num_epochs: int = Field(1, ge=1)
    minibatch_size: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    # Response positions whose LM-head logits are held at once in the learner (memory bound:
    # positions x vocabulary x 4 bytes).
    logits_chunk_tokens: int = Field(1024, ge=1)
    # system
    num_env_runners: int = Field(0, ge=0)
    num_learners: int = Field(0, ge=0)
    # torch: plain PyTorch, DDP across learners. deepspeed: ZeRO via the `deepspeed:` block,
    # written in DeepSpeed's own config keys (zero_optimization.stage, offload_optimizer, ...).
    learner_backend: Literal["torch", "deepspeed"] = "torch"
    deepspeed: dict[str, Any] = {}
    resources: ResourceSettings = ResourceSettings()
    iterations: int = Field(10, ge=1)
    checkpoint_every: int = Field(5, ge=0)
    run_dir: str = "runs"
    evaluation: EvaluationSettings = EvaluationSettings()
    sft: SFTSettings = SFTSettings()
    lora: LoRASettings | None = None  # None: full fine-tuning

    @model_validator(mode="after")
    def _loss_defaults(self) -> "Experiment":
        if self.constrain_actions and self.think:
            raise ValueError("constrain_actions: true samples the action alone; set think: false")
        # DAPO's clip-higher (0.2 / 0.28) unless the file sets the bounds itself.
        if self.clip_low is None:
            self.clip_low = 0.2
        if self.clip_high is None:
            self.clip_high = 0.28 if self.loss == "dapo" else 0.2
        _check_deepspeed_block(self.learner_backend, self.deepspeed, self.num_learners)
        if self.engine == "vllm":
            _check_vllm_block(self.vllm, self.resources.env_runner.gpus)
        if self.async_.enabled and self.num_env_runners == 0:
            raise ValueError(
                "async.enabled samples on remote env runners while the learner updates; set num_env_runners >= 1"
            )
        if self.empg.step_entropy is None:
            self.empg.step_entropy = "choice_tokens" if self.constrain_actions else "all_tokens"
        return self

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(
            history_turns=self.history_turns, think=self.think, list_admissible_actions=self.list_admissible_actions
        )

    @property
    def aggregation(self) -> str:
        return "token_mean" if self.loss == "dapo" else "seq_mean_token_mean"


#: DeepSpeed keys the experiment sets itself, and the experiment key that does.
_DEEPSPEED_OWNED = {
    "train_batch_size": "tasks_per_batch / group_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "minibatch_size / micro_batch_size",
    "optimizer": "lr (the learner's AdamW)",
    "scheduler": "lr",
}


def _check_deepspeed_block(backend: str, block: dict[str, Any], num_learners: int) -> None:
    if block and backend != "deepspeed":
        raise ValueError("a 'deepspeed' block needs learner_backend: deepspeed")
    for key, instead in _DEEPSPEED_OWNED.items():
        if key in block:
            raise ValueError(f"'deepspeed.{key}' is set by the experiment; use {instead} instead")
    zero = block.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"'deepspeed.zero_optimization' must be a mapping, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"bad value for 'deepspeed.zero_optimization.stage': {stage!r}; expected 0, 1, 2 or 3")
    if stage == 3 and num_learners <= 1:
        # Measured with DeepSpeed 0.19.8 on CPU: a single ZeRO-3 rank keeps only part of the
        # gradients accumulated over several micro-batches (grad norm 2.97 vs 9.32 for the same
        # minibatch), with or without an explicit accumulation boundary.
        raise ValueError(
            "deepspeed.zero_optimization.stage 3 with one learner loses gradients accumulated over "
            "micro-batches; use stage 2 (offload_optimizer for memory) or num_learners >= 2"
        )


def _check_vllm_block(vllm: VLLMSettings, runner_gpus: float) -> None:
    tp = vllm.tensor_parallel_size
    if tp > 1 and not runner_gpus:
        raise ValueError(f"'vllm.tensor_parallel_size' {tp} needs GPUs: set 'resources.env_runner.gpus' to {tp}")
    # A fraction of one GPU (runners sharing it) serves an engine with tp 1.
    if (tp > 1 or runner_gpus > 1) and runner_gpus != tp:
        raise ValueError(
            f"'resources.env_runner.gpus' is {runner_gpus:g} but 'vllm.tensor_parallel_size' is {tp}: "
            "a vLLM env runner uses exactly its tensor-parallel GPUs"
        )


def check_engine(exp: Experiment) -> None:
    """`engine: vllm` needs vLLM installed here (the driver validates on a node like the others)."""
    import importlib.util

    if exp.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "engine: vllm, but vLLM is not installed: pip install -e '.[vllm]' on an x86-64 CPU host "
            "(`make install` does), or '.[vllm-gpu]' on a GPU host"
        )


#: env_config keys the experiment sets itself, and the experiment key that does.
_ENV_OWNED = {"split": "evaluation.splits and sft.split (training plays 'train')", "max_turns": "max_turns"}


def check_environment(exp: Experiment) -> None:
    """`env`, `env_config` and every split the experiment plays, checked by the env registry
    without making an environment (no engine, JVM or catalogue starts), so that a typo stops
    the run here, before Ray starts, and not inside an env runner."""
    for key, instead in _ENV_OWNED.items():
        if key in exp.env_config:
            raise ConfigError(f"'env_config.{key}' is set by the experiment; use {instead} instead")
    checks = [
        ("env", exp.env, {}),
        ("env_config", exp.env_config, {**exp.env_config, "split": "train", "max_turns": exp.max_turns}),
        *(("evaluation.splits", split, {**exp.env_config, "split": split}) for split in exp.evaluation.splits),
        ("sft.split", exp.sft.split, {**exp.env_config, "split": exp.sft.split}),
        ("sft.heldout_split", exp.sft.heldout_split, {**exp.env_config, "split": exp.sft.heldout_split}),
    ]
    for key, value, env_config in checks:
        try:
            envs.check_config(exp.env, **env_config)
        except envs.EnvError as err:
            raise ConfigError(f"bad value for {key!r}: {value!r}; {err}") from None


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings class of a section field, optional (`X | None`) or not."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    model: Any = Experiment
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})"
    expected = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    if not loc:  # a rule across keys; its message names them
        return expected
    return f"bad value for {key!r}: {error.get('input')!r}; expected {expected}"


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` / `a.b=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def validate(data: dict[str, Any]) -> Experiment:
    """An `Experiment` from a raw dict, or a ConfigError naming every bad key; the environment
    settings are checked after the schema (`check_environment`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment file must be a mapping of keys, got {type(data).__name__}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e) for e in err.errors())) from None
    check_environment(exp)
    check_engine(exp)
    return exp


#: The experiment files shipped inside the package (the repository's `tuned_examples/`).
TUNED_EXAMPLES = Path(__file__).resolve().parent / "tuned_examples"


def experiment_path(path: str | Path) -> Path:
    """`path` itself, or else the shipped file it names (`tuned_examples/demo.yaml`,
    `demo.yaml`), so that an installed wheel runs its examples from any directory."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("tuned_examples",) else path.parts
    shipped = TUNED_EXAMPLES.joinpath(*parts) if parts and not path.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    raise ConfigError(
        f"experiment file {str(path)!r} does not exist here, nor among the shipped examples in {TUNED_EXAMPLES}"
    )


def load(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment YAML file (`experiment_path` finds it)."""
    path = experiment_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate(apply_overrides(data, list(overrides or [])))
