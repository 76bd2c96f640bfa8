"""Inference with a transformers causal LM: batched sampling with a KV cache.

Hand-rolled rather than `model.generate` because every sampled token needs its log-prob and its
full-vocabulary entropy at the sampling temperature (the EMPG step entropy), and the batch must
stop per sequence on a stop string, EOS or the length cap. With `choices`, a sequence samples
only tokens that continue one of its allowed completions and stops when one is complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from empg_rllib.core.choices import ChoiceTrie, ChoiceWalk
from empg_rllib.core.losses import log_softmax_and_entropy
from empg_rllib.core.precision import resolve_dtype
from empg_rllib.core.scoring import left_pad, position_ids
from empg_rllib.sampling.engines.base import Completion, FinishReason, SamplingParams, check_request
from empg_rllib.sampling.engines.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


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
        prefix_cache: bool = True,
    ) -> None:
        """`prefix_cache`: compute the prompt prefix a batch shares once (prefix_cache.py)."""
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.prefix_cache = PrefixCache(self.model) if prefix_cache and PrefixCache.supports(self.model) else None
        if prefix_cache and self.prefix_cache is None:
            logger.info("prefix_cache: %s keeps no plain growing KV cache; every prompt is computed whole",
                        type(self.model).__name__)
        self.weights_version = 0
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._stop_cache: dict[tuple[tuple[str, ...], int], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32", **kwargs: Any) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        weights = resolve_dtype(dtype, kwargs.get("device", "cpu"), "HF engine")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=weights)
        return cls(model, tokenizer, **kwargs)

    def get_rng_state(self) -> torch.Tensor:
        """State of the sampling stream used when SamplingParams.seed is None (for resuming)."""
        return self._generator.get_state()

    def set_rng_state(self, state: Any) -> None:
        self._generator.set_state(torch.as_tensor(state, dtype=torch.uint8))

    @property
    def weights_version(self) -> int:
        """The version of the weights the engine samples with; setting it says they changed."""
        return self._weights_version

    @weights_version.setter
    def weights_version(self, version: int) -> None:
        self._weights_version = version
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def update_weights(self, state_dict: Mapping[str, Any], version: int | None = None) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)
        self.weights_version = self.weights_version + 1 if version is None else version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        if not prompts:
            return []
        check_request(prompts, choices, seeds)
        tries = [ChoiceTrie(c) if c else None for c in (choices or [None] * len(prompts))]
        generator = (
            torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else self._generator
        )
        completions: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch_size):
            end = start + self.max_batch_size
            sampler = generator if seeds is None else self._row_uniforms(seeds[start:end], params.max_new_tokens)
            completions.extend(self._generate_batch(prompts[start:end], params, sampler, tries[start:end]))
        return completions

    def _row_uniforms(self, seeds: Sequence[int], steps: int) -> torch.Tensor:
        """[rows, steps] uniforms in [0, 1), each row from its own seed, drawn once per batch."""
        rows = [torch.rand(steps, generator=torch.Generator(device="cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(self.device)

    def _stop_candidates(self, stops: tuple[str, ...], vocab_size: int) -> torch.Tensor:
        """Bool per vocabulary id: the token's text holds the last character of a stop string.
        Ids past the tokenizer (padded embedding rows) never complete one."""
        key = (tuple(stops), vocab_size)
        if key not in self._stop_cache:
            last_chars = {s[-1] for s in stops if s}
            known = min(len(self.tokenizer), vocab_size)
            texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(known)]
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[:known] = torch.tensor([any(c in t for c in last_chars) for t in texts], dtype=torch.bool)
            self._stop_cache[key] = mask
        return self._stop_cache[key]

    def _stopped_on_string(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        # Every token decodes to at least one byte, so the last len(stop) tokens hold any stop
        # string that the newest token completed.
        tail = self.tokenizer.decode(ids[-max(len(s) for s in stops) :], skip_special_tokens=False)
        return any(s in tail for s in stops)

    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sampler: torch.Generator | torch.Tensor,
        tries: Sequence[ChoiceTrie | None],
    ) -> list[Completion]:
        """`sampler`: one stream for the batch, or each row's own uniforms ([rows, steps], see
        `_row_uniforms`: a row's samples then depend on its own seed alone)."""
        batch = len(prompts)
        shared = self.prefix_cache.shared_length(prompts) if self.prefix_cache is not None else 0
        # With a shared prefix from the cache, each row's tail is left-padded after it.
        input_ids, attention_mask = left_pad([p[shared:] for p in prompts], self.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        past = None
        if shared:
            past = self.prefix_cache.past(prompts[0][:shared], batch)
            attention_mask = torch.cat([attention_mask.new_ones(batch, shared), attention_mask], dim=-1)
        positions = position_ids(attention_mask)[:, shared:]
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=past,
            use_cache=True, logits_to_keep=1,
        )
        past, logits = out.past_key_values, out.logits[:, -1, :]
        next_position = positions[:, -1:] + 1

        # Per-step results stay tensors; rows are cut to their length once at the end.
        step_tokens, step_logp, step_entropy = [], [], []
        lengths = torch.zeros(batch, dtype=torch.long)
        finish: list[FinishReason | None] = [None] * batch
        live = torch.ones(batch, dtype=torch.bool)
        can_end_stop = self._stop_candidates(params.stop, logits.shape[-1])
        walks = [ChoiceWalk(t) if t is not None else None for t in tries]
        # Constrained rows end when their choice is complete, so they skip the stop-string check.
        free = torch.tensor([t is None for t in tries], dtype=torch.bool)
        allowed_lists: list[list[list[int]]] = [[] for _ in range(batch)]
        for step in range(params.max_new_tokens):
            allowed = None
            if any(w is not None for w in walks):
                allowed = torch.ones_like(logits, dtype=torch.bool)
                for row, walk in enumerate(walks):
                    if walk is not None and live[row]:
                        ids = walk.allowed()
                        allowed_lists[row].append(ids)
                        allowed[row] = False
                        allowed[row, ids] = True
            log_p, entropy = log_softmax_and_entropy(logits, params.temperature, allowed)
            if isinstance(sampler, torch.Generator):
                tokens = torch.multinomial(log_p.exp().cpu(), 1, generator=sampler).to(self.device)
            else:
                tokens = _inverse_cdf(log_p.exp(), sampler[:, step : step + 1])
            step_tokens.append(tokens.squeeze(-1).cpu())
            step_logp.append(log_p.gather(-1, tokens).squeeze(-1).cpu())
            step_entropy.append(entropy.cpu())
            lengths += live.long()
            new = step_tokens[-1]
            for row, walk in enumerate(walks):
                if walk is not None and live[row]:
                    walk.advance(int(new[row]))
                    if walk.complete:
                        finish[row], live[row] = "stop", False
            for row in torch.nonzero(live & (new == self.eos_token_id)).flatten().tolist():
                finish[row], live[row] = "eos", False
            # Only a token holding the stop string's last character can complete it.
            candidates = torch.nonzero(live & free & can_end_stop[new]).flatten().tolist()
            if candidates:
                so_far = torch.stack(step_tokens, dim=1)
                for row in candidates:
                    if self._stopped_on_string(so_far[row].tolist(), params.stop):
                        finish[row], live[row] = "stop", False
            if not live.any() or step == params.max_new_tokens - 1:
                break
            # Finished rows keep receiving pad tokens: the batch shape stays fixed and their
            # outputs are ignored.
            feed = torch.where(live.to(self.device).unsqueeze(-1), tokens, torch.full_like(tokens, self.pad_token_id))
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

        all_tokens = torch.stack(step_tokens, dim=1).tolist()
        all_logp = torch.stack(step_logp, dim=1).tolist()
        all_entropy = torch.stack(step_entropy, dim=1).tolist()
        sampled = [all_tokens[row][: lengths[row]] for row in range(batch)]
        logprobs = [all_logp[row][: lengths[row]] for row in range(batch)]
        entropies = [all_entropy[row][: lengths[row]] for row in range(batch)]
        return [
            Completion(
                token_ids=sampled[row],
                logprobs=logprobs[row],
                entropies=entropies[row],
                finish_reason=finish[row] or "length",
                text=self.tokenizer.decode(sampled[row], skip_special_tokens=False),
                weights_version=self.weights_version,
                allowed_token_ids=allowed_lists[row] if tries[row] is not None else None,
            )
            for row in range(batch)
        ]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[rows, 1] token ids drawn from each row of `probs` with its uniform in [0, 1), on the
    probabilities' device. A zero-probability token (masked by constrained decoding) spans an
    empty interval of the cumulative sum, so it is never drawn."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # Below the total even when u * total rounds up to it.
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)
