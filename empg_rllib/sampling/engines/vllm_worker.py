"""Code that runs inside vLLM's worker process: constrained decoding and in-place weight loads.

vLLM imports these by name (`logits_processors`, `worker_extension_cls`); only its own processes
import this module, so it may import vLLM at the top.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from empg_rllib.core.choices import ChoiceTrie, ChoiceWalk
from empg_rllib.sampling.engines.vllm import CHOICES_KEY, END_ID_KEY


class ChoiceLogitsProcessor(LogitsProcessor):
    """Per request with `extra_args[CHOICES_KEY]`: every token outside the tokens that continue
    an allowed sequence gets -inf, before the temperature and the log-probs vLLM reports
    (`logprobs_mode="processed_logprobs"`), so they are those of the renormalised distribution
    the learner scores with `allowed_ids`. Once a sequence is complete only the end id is
    allowed: vLLM stops the request there, and the engine cuts the completion where the choice
    ended (a stop string may already have stopped it)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> its request's walk down its trie
        self.rows: dict[int, _Walk] = {}

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
                self.rows[index] = _Walk(ChoiceTrie(extra[CHOICES_KEY]), output_ids, int(extra[END_ID_KEY]))
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, walk in self.rows.items():
            allowed = walk.allowed()
            kept = logits[index, allowed].clone()
            logits[index] = float("-inf")
            logits[index, allowed] = kept
        return logits


class _Walk:
    """A request's walk down its trie, advanced only over the tokens sampled since the last
    step (the request's output list grows in place), so that a step costs O(1) per row. Once the
    choice is complete only the end id is allowed."""

    def __init__(self, trie: ChoiceTrie, output_ids: list[int], end_id: int) -> None:
        self.cursor = ChoiceWalk(trie)
        self.output_ids, self.consumed, self.end_id = output_ids, 0, end_id

    def allowed(self) -> list[int]:
        for token in self.output_ids[self.consumed :]:
            self.cursor.advance(token)
        self.consumed = len(self.output_ids)
        return self.cursor.allowed() or [self.end_id]


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

        if not hasattr(self, "_empg_tied_layers"):
            # The model's structure is fixed: found once per worker.
            model = self.model_runner.get_model()
            self._empg_tied_layers = _tied_layers(model)
            _quiet_expected_warnings(model, self._empg_tied_layers)
        # In checkpoint format: the CPU backend repacks Linear weights after loading, and
        # reload_weights runs that processing again.
        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        for head in self._empg_tied_layers:
            # A head tied to the embeddings loads nothing itself, so reload_weights does not
            # process it again: on CPU it kept the GEMM weights packed from the old embeddings
            # (measured: log-probs 1.9-2.2 nats off after a sync). On GPU this is a no-op.
            head.quant_method.process_weights_after_loading(head)


class _DropMessages(logging.Filter):
    def __init__(self, messages: set[str]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


def _quiet_expected_warnings(model: torch.nn.Module, tied: list[torch.nn.Module]) -> None:
    """vLLM warns "<layer>: Failed to load weights" on every load for each layer that has no
    weights in a checkpoint: a tied head (processed after the load) and a layer of computed
    buffers only (the rotary embedding's cos/sin cache). Expected, so not said: a real miss is
    an error before the load (vllm._checkpoint_tensors)."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    computed = [m for m in model.modules() if not m._parameters and m._buffers]
    logger.addFilter(_DropMessages({f"{type(layer).__name__}: Failed to load weights" for layer in (*tied, *computed)}))


def _tied_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose weight is another layer's Parameter (an LM head tied to the embeddings)."""
    owners: set[int] = set()
    tied = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in owners and hasattr(module, "quant_method"):
            tied.append(module)
        owners.add(id(weight))
    return tied
