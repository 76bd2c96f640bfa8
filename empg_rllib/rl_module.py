"""LLMRLModule: an RLlib TorchRLModule around a transformers causal LM.

Generation happens in the env runner's inference engine, so the module only implements the
training forward pass: per-token log-probs and full-vocabulary entropies of the response tokens
of given sequences.

`dtype: bfloat16` means bf16 compute where the hardware has it (precision.py): on the learner the
weights stay fp32 (the master copy the optimizer updates) and the forward pass runs under bf16
autocast; an inference-only module (an env runner's) holds bf16 weights.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

from empg_rllib.precision import autocast, resolve_dtype
from empg_rllib.scoring import response_scores


class LLMRLModule(TorchRLModule):
    """model_config: `path` (a model directory), `dtype`, `temperature`, `gradient_checkpointing`,
    `chunk_tokens` (response positions per chunk of LM-head logits)."""

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        config = self.model_config or {}
        if "path" not in config:
            raise ValueError("LLMRLModule needs model_config['path'] (a model directory)")
        self.dtype_requested = config.get("dtype", "float32")
        # Modules are built on CPU and moved to their device later, so the compute dtype is
        # resolved for the device the weights are on at the first forward pass.
        self._compute_dtype: torch.dtype | None = None
        weights = resolve_dtype(self.dtype_requested, "cpu", "env runner") if self.inference_only else torch.float32
        self.lm = AutoModelForCausalLM.from_pretrained(config["path"], local_files_only=True, dtype=weights)
        self.temperature = float(config.get("temperature", 1.0))
        self.chunk_tokens = int(config.get("chunk_tokens", 1024))
        if not self.inference_only and config.get("gradient_checkpointing", False):
            self.lm.gradient_checkpointing_enable()

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
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        return {k: v.detach().to("cpu") for k, v in self.state_dict().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
