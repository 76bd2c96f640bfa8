"""LLMRLModule: an RLlib TorchRLModule around a transformers causal LM.

Generation happens in the env runner's inference engine, so the module only implements the
training forward pass: per-token log-probs and full-vocabulary entropies of given sequences.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

from empg_rllib.scoring import position_ids, scores_of_tokens


class LLMRLModule(TorchRLModule):
    """model_config: `path` (a model directory), `dtype`, `temperature`, `gradient_checkpointing`."""

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        config = self.model_config or {}
        if "path" not in config:
            raise ValueError("LLMRLModule needs model_config['path'] (a model directory)")
        self.lm = AutoModelForCausalLM.from_pretrained(
            config["path"], local_files_only=True, dtype=getattr(torch, config.get("dtype", "float32"))
        )
        self.temperature = float(config.get("temperature", 1.0))
        if not self.inference_only and config.get("gradient_checkpointing", False):
            self.lm.gradient_checkpointing_enable()

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Rows are left-padded `input_ids`; outputs are aligned with `input_ids[:, 1:]`. An
        `allowed_ids` column (constrained decoding) restricts the last positions' distributions."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
        logp, entropy = scores_of_tokens(logits, ids[:, 1:], self.temperature, batch.get("allowed_ids"))
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
