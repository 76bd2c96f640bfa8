"""The HF engine's shared-prefix KV cache.

Every prompt of a run starts with the same system prompt and format instructions, and the
prompts of a group share their task; recomputing those tokens for every prompt of every turn is
most of a real model's prefill. `PrefixCache` computes the keys and values of the token prefix a
batch's prompts share once, for one row, and gives every row of the batch a copy: only each
prompt's own tail is computed. It keeps the last prefix across batches (the next batch reuses as
much of it as the two share: the system prompt at least) until the weights change (the engine's
`weights_version` is set) or its owner clears it (the env runner, at each sampling call).

The attention each prompt token sees is the same as without the cache (the tail is left-padded
after the prefix, the padding masked, positions counted from the prefix), so results agree with
a full prefill to float rounding (different matmul shapes sum in a different order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Shorter shared prefixes are computed with the rest of the prompt (not worth a second call).
MIN_SHARED_TOKENS = 8


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence of `sequences` has in common: those the
    lexicographically first and last have in common."""
    first, last = min(map(list, sequences)), max(map(list, sequences))
    for i, (a, b) in enumerate(zip(first, last)):
        if a != b:
            return i
    return min(len(first), len(last))


class PrefixCache:
    """Keys and values of the last shared prompt prefix (one row) of the model's current weights:
    whoever changes the weights calls `clear`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.clear()

    def clear(self) -> None:
        self.tokens: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def shared_length(self, prompts: Sequence[Sequence[int]]) -> int:
        """The prefix length to take from the cache for `prompts`: what they all share, less the
        last token of the shortest (its logits start the sampling), or 0 below MIN_SHARED_TOKENS."""
        shared = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        return shared if shared >= MIN_SHARED_TOKENS else 0

    def past(self, prefix: Sequence[int], batch: int) -> Any:
        """A DynamicCache holding `prefix`'s keys and values for `batch` rows (the cache copies
        the one row it is given for each; the kept row is never written)."""
        from transformers import DynamicCache

        reused = common_prefix_length([self.tokens, prefix]) if self.tokens else 0
        layers = [(k[:, :, :reused], v[:, :, :reused]) for k, v in self.layers] if reused else []
        if reused < len(self.tokens):  # copies: a slice would keep the longer prefix's storage alive
            layers = [(k.clone(), v.clone()) for k, v in layers]
        if reused < len(prefix):
            layers = self._extend(layers, list(prefix[reused:]), reused)
        self.tokens, self.layers = list(prefix), layers
        rows = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers]
        return DynamicCache(ddp_cache_data=rows, config=self.model.config)

    def _extend(self, layers: list[tuple[torch.Tensor, torch.Tensor]], tokens: list[int], start: int) -> list:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        past = DynamicCache(ddp_cache_data=layers, config=self.model.config) if layers else DynamicCache(config=self.model.config)
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)
        mask = torch.ones(1, start + len(tokens), dtype=torch.long, device=device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether every layer of `model` keeps a plain growing cache (sliding-window and other
        layers that drop or transform past keys cannot share a sliced prefix)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            layers = DynamicCache(config=model.config).layers
        except Exception:  # a model whose cache this module does not know
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
