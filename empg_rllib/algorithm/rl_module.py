"""LLMRLModule: an RLlib TorchRLModule around a transformers causal LM.

Generation happens in the env runner's inference engine, so the module only implements the
training forward pass: per-token log-probs and full-vocabulary entropies of the response tokens
of given sequences.

`dtype: bfloat16` means bf16 compute where the hardware has it (precision.py): on the learner the
weights stay fp32 (the master copy the optimizer updates) and the forward pass runs under bf16
autocast; an inference-only module (an env runner's) holds bf16 weights.

`lora` ({r, alpha, dropout, target_modules}): the learner's LM is wrapped in peft LoRA adapters
and only they train; its state is the adapter tensors alone. An inference-only module is never
wrapped: it merges received adapters into its own weights, W = W_base + alpha / r * B @ A.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

from empg_rllib.core.precision import autocast, resolve_dtype
from empg_rllib.core.scoring import response_scores

if TYPE_CHECKING:
    from peft import LoraConfig

#: Adapter tensors in a module state are named `lm.<path of the adapted Linear>` plus one of
#: these, the same path on the learner's peft model and on a plain model.
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def is_adapter_state(state: dict[str, Any]) -> bool:
    """Whether a module state holds LoRA adapters only (a LoRA learner's weight sync)."""
    return bool(state) and all(k.endswith(LORA_SUFFIXES) for k in state)


def lora_config(lora: dict[str, Any]) -> LoraConfig:
    """peft's config of an experiment's `lora` section (`LoRASettings.model_dump()`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _check_keys(given: Any, expected: Any) -> None:
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [
        f"{len(keys)} {what} (e.g. {keys[:3]})"
        for what, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise RuntimeError(f"module state does not match the module: {', '.join(problems)}")


class LLMRLModule(TorchRLModule):
    """model_config: `path` (a model directory), `dtype`, `temperature`, `gradient_checkpointing`,
    `chunk_tokens` (response positions per chunk of LM-head logits), `lora` (None: full
    fine-tuning)."""

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        config = self.model_config or {}
        if "path" not in config:
            raise ValueError("LLMRLModule needs model_config['path'] (a model directory)")
        if not (Path(config["path"]) / "config.json").is_file():
            # Said here, on the node: an autoscaled node the driver could not check beforehand.
            raise FileNotFoundError(
                f"node {socket.gethostname()} cannot see the model directory {config['path']} (no config.json "
                "there); on a cluster it must be on storage every node mounts at the same path"
            )
        self.dtype_requested = config.get("dtype", "float32")
        # Modules are built on CPU and moved to their device later, so the compute dtype is
        # resolved for the device the weights are on at the first forward pass.
        self._compute_dtype: torch.dtype | None = None
        weights = resolve_dtype(self.dtype_requested, "cpu", "env runner") if self.inference_only else torch.float32
        self.lora: dict[str, Any] | None = config.get("lora")
        # A LoRA env runner keeps the adapted layers' base weights in fp32, read before the cast.
        load = torch.float32 if self.lora else weights
        self.lm = AutoModelForCausalLM.from_pretrained(config["path"], local_files_only=True, dtype=load)
        self.temperature = float(config.get("temperature", 1.0))
        self.chunk_tokens = int(config.get("chunk_tokens", 1024))
        if not self.inference_only and config.get("gradient_checkpointing", False):
            # Before peft wraps the model, so that peft makes the frozen embeddings' outputs
            # require grad (else checkpointed blocks would pass no gradient to the adapters).
            self.lm.gradient_checkpointing_enable()
        self._lora_base: dict[str, torch.Tensor] | None = None
        if self.lora and not self.inference_only:
            from peft import get_peft_model

            self.lm = get_peft_model(self.lm, lora_config(self.lora))
        elif self.lora:
            from peft.tuners.tuners_utils import check_target_module_exists

            # fp32 base weights of the adapted layers, so that every sync merges into the base
            # rather than into the previous merge. A plain dict, not buffers: they stay on the
            # CPU when the engine moves the model to its device.
            peft_config = lora_config(self.lora)
            self._lora_base = {
                name: m.weight.detach().float().clone()
                for name, m in self.lm.named_modules()
                if isinstance(m, torch.nn.Linear) and check_target_module_exists(peft_config, name)
            }
            self.lm.to(weights)

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Rows are left-padded `input_ids` ending in a response marked by `resp_mask`; outputs
        are aligned with `input_ids[:, 1:]` and 0 outside the response. An `allowed_ids` column
        (constrained decoding) restricts the last positions' distributions."""
        ids = batch["input_ids"]
        device = ids.device
        if self._compute_dtype is None:
            self._compute_dtype = resolve_dtype(self.dtype_requested, device, "learner")
        with autocast(self._compute_dtype, device):
            logp, entropy = response_scores(
                self.lm, ids, batch["attention_mask"], batch["resp_mask"], self.temperature,
                batch.get("allowed_ids"), chunk_tokens=self.chunk_tokens,
            )
        return {"token_logp": logp, "token_entropy": entropy}

    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError("LLMRLModule samples through an inference engine (LLMEnvRunner)")

    _forward_exploration = _forward_inference

    # RLlib's default state converts to numpy, which fails on bf16 and up-casts fp16; keep
    # torch tensors, and load strictly so that a key mismatch is an error, not a silent no-op.
    # A LoRA learner's state is its adapters only: the base weights never change, and the model
    # path in the experiment rebuilds them.
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        if self._is_peft():
            return {k: v.detach().to("cpu") for k, v in self._adapter_parameters().items()}
        return {k: v.detach().to("cpu") for k, v in self.state_dict().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        if self._is_peft():
            self._load_adapters(state)
        elif is_adapter_state(state):
            self._merge_adapters(state)
        else:
            self.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)

    def _is_peft(self) -> bool:
        return bool(self.lora) and not self.inference_only

    def _adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        from peft.tuners.lora import LoraLayer

        params = {}
        for path, layer in self.lm.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                for part in ("lora_A", "lora_B"):
                    params[f"lm.{path}.{part}.weight"] = getattr(layer, part)[layer.active_adapters[0]].weight
        return params

    @torch.no_grad()
    def _load_adapters(self, state: dict[str, Any]) -> None:
        params = self._adapter_parameters()
        _check_keys(state, params)
        for name, param in params.items():
            value = torch.as_tensor(state[name])
            if value.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} in the state, {tuple(param.shape)} in the module")
            param.copy_(value)

    @torch.no_grad()
    def _merge_adapters(self, state: dict[str, Any]) -> None:
        if self._lora_base is None:
            raise ValueError("received LoRA adapters, but this module has no model_config['lora']")
        _check_keys(state, [f"lm.{path}{suffix}" for path in self._lora_base for suffix in LORA_SUFFIXES])
        scaling = float(self.lora["alpha"]) / int(self.lora["r"])
        for path, base in self._lora_base.items():
            a = torch.as_tensor(state[f"lm.{path}.lora_A.weight"]).float()
            b = torch.as_tensor(state[f"lm.{path}.lora_B.weight"]).float()
            merged = torch.addmm(base, b.to(base.device), a.to(base.device), alpha=scaling)
            self.lm.get_submodule(path).weight.copy_(merged)
