"""Inference with a transformers causal LM: batched sampling with a KV cache.

Hand-rolled rather than `model.generate` because every sampled token needs its log-prob and its
full-vocabulary entropy at the sampling temperature (the EMPG step entropy), and the batch must
stop per sequence on a stop string, EOS or the length cap.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from empg_rllib.inference.base import Completion, FinishReason, SamplingParams
from empg_rllib.scoring import left_pad


class HFEngine:
    """Samples from a `transformers` causal LM on CPU or one GPU."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str = "cpu",
        seed: int = 0,
        max_batch_size: int = 64,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.weights_version = 0
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32", **kwargs: Any) -> "HFEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
        return cls(model, tokenizer, **kwargs)

    def get_rng_state(self) -> torch.Tensor:
        """State of the sampling stream used when SamplingParams.seed is None (for resuming)."""
        return self._generator.get_state()

    def set_rng_state(self, state: Any) -> None:
        self._generator.set_state(torch.as_tensor(state, dtype=torch.uint8))

    def update_weights(self, state_dict: Mapping[str, Any], version: int | None = None) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)
        self.weights_version = self.weights_version + 1 if version is None else version

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        generator = (
            torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else self._generator
        )
        completions: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch_size):
            completions.extend(self._generate_batch(prompts[start : start + self.max_batch_size], params, generator))
        return completions

    def _stopped_on_string(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        # Every token decodes to at least one byte, so the last len(stop) tokens hold any stop
        # string that the newest token completed.
        tail = self.tokenizer.decode(ids[-max(len(s) for s in stops) :], skip_special_tokens=False)
        return any(s in tail for s in stops)

    @torch.no_grad()
    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        batch = len(prompts)
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        past, logits = out.past_key_values, out.logits[:, -1, :]
        next_position = position_ids[:, -1:] + 1

        sampled: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        entropies: list[list[float]] = [[] for _ in range(batch)]
        finish: list[FinishReason | None] = [None] * batch
        for _ in range(params.max_new_tokens):
            log_p = torch.log_softmax(logits.float() / params.temperature, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            tokens = torch.multinomial(log_p.exp().cpu(), 1, generator=generator).to(self.device)
            token_logp = log_p.gather(-1, tokens).squeeze(-1)
            for row in range(batch):
                if finish[row] is not None:
                    continue
                token = int(tokens[row])
                sampled[row].append(token)
                logprobs[row].append(float(token_logp[row]))
                entropies[row].append(float(entropy[row]))
                if token == self.eos_token_id:
                    finish[row] = "eos"
                elif self._stopped_on_string(sampled[row], params.stop):
                    finish[row] = "stop"
            if all(f is not None for f in finish):
                break
            # Finished rows keep receiving pad tokens: the batch shape stays fixed and their
            # outputs are ignored.
            feed = tokens.clone()
            for row, reason in enumerate(finish):
                if reason is not None:
                    feed[row] = self.pad_token_id
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            out = self.model(
                input_ids=feed,
                attention_mask=attention_mask,
                position_ids=next_position,
                past_key_values=past,
                use_cache=True,
            )
            past, logits = out.past_key_values, out.logits[:, -1, :]
            next_position = next_position + 1

        return [
            Completion(
                token_ids=sampled[row],
                logprobs=logprobs[row],
                entropies=entropies[row],
                finish_reason=finish[row] or "length",
                text=self.tokenizer.decode(sampled[row], skip_special_tokens=False),
                weights_version=self.weights_version,
            )
            for row in range(batch)
        ]
