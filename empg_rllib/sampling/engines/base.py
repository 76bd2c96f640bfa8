"""The interface every inference engine (HF, vLLM) implements, and the record it returns.

Switching engines changes nothing else: each returns, per sequence, the token ids it sampled, the
log-prob of each at the sampling temperature, why it stopped and the weights version that sampled
it. The HF engine also reports each token's full-vocabulary entropy; vLLM does not (it sees only
top-k log-probs). Neither feeds EMPG: its step entropy comes from the learner's pre-update pass
over the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """What to sample: temperature, length cap, stop strings, seed (None: the engine's stream)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    stop: tuple[str, ...] = ("</action>",)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Completion:
    """One sampled continuation, exactly as sampled."""

    token_ids: list[int]
    logprobs: list[float]  # log pi(token) at the sampling temperature
    # Full-vocabulary entropy at each sampled position, for inspection: the HF engine's; None
    # from vLLM. EMPG's step entropy comes from the learner's pre-update pass, never from here.
    entropies: list[float] | None
    finish_reason: FinishReason
    text: str = ""
    weights_version: int = 0
    # Constrained decoding: the token ids allowed at each sampled position (None: any token).
    allowed_token_ids: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_request(
    prompts: Sequence[Sequence[int]], choices: Sequence[Any] | None, seeds: Sequence[int] | None = None
) -> None:
    """The checks every engine's `generate` makes before sampling."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if choices is not None and len(choices) != len(prompts):
        raise ValueError(f"got {len(choices)} choice lists for {len(prompts)} prompts")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")


class InferenceEngine(Protocol):
    """Batched sampling from prompt token ids, plus in-place weight updates."""

    weights_version: int

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order. `choices[i]`, when given, lists the token
        sequences completion i must be one of (constrained decoding, see `choices.py`).
        `seeds[i]`, when given, seeds completion i alone: what it samples then does not depend
        on which other prompts share the batch (else the engine's stream or `params.seed`)."""
        ...

    def update_weights(self, state_dict: Mapping[str, Any], version: int | None = None) -> None:
        """Load new policy weights; bumps (or sets) `weights_version`."""
        ...
