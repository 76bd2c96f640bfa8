"""Code that runs inside vLLM's worker process: constrained decoding and in-place weight loads.

vLLM imports these by name (`logits_processors`, `worker_extension_cls`); only its own processes
import this module, so it may import vLLM at the top.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from empg_rllib.inference.choices import ChoiceTrie
from empg_rllib.inference.vllm import CHOICES_KEY, END_ID_KEY


class ChoiceLogitsProcessor(LogitsProcessor):
    """Per request with `extra_args[CHOICES_KEY]`: every token outside the tokens that continue
    an allowed sequence gets -inf, before the temperature and the log-probs vLLM reports
    (`logprobs_mode="processed_logprobs"`), so they are those of the renormalised distribution
    the learner scores with `allowed_ids`. Once a sequence is complete only the end id is
    allowed: vLLM stops the request there, and the engine cuts the completion where the choice
    ended (a stop string may already have stopped it)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (trie, the request's live list of output tokens, end id)
        self.rows: dict[int, tuple[ChoiceTrie, list[int], int]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            extra = params.extra_args or {}
            if extra.get(CHOICES_KEY):
                self.rows[index] = (ChoiceTrie(extra[CHOICES_KEY]), output_ids, int(extra[END_ID_KEY]))
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (trie, output_ids, end_id) in self.rows.items():
            node: dict | None = trie.root
            for token in output_ids:
                node = node.get(token) if node is not None and not ChoiceTrie.ends(node) else None
            if node is None or ChoiceTrie.ends(node):
                allowed = [end_id]
            else:
                allowed = ChoiceTrie.allowed(node)
            kept = logits[index, allowed].clone()
            logits[index] = float("-inf")
            logits[index, allowed] = kept
        return logits


class WeightLoader:
    """vLLM worker extension: `collective_rpc("load_safetensors", args=(path,))` loads a
    safetensors file of checkpoint-named weights in place, one call for the whole model."""

    def load_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        def tensors():
            # One tensor at a time from the (memory-mapped) file, not a second full copy.
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

        # In checkpoint format: the CPU backend repacks Linear weights after loading, and
        # reload_weights runs that processing again.
        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
