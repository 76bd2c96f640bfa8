"""GPU check: the Ray-free parts of empg-rllib on one accelerator, at a real model's shapes.

Each check is one section of one JSON file, rewritten after every section (a timeout keeps what
was done); a section that raises records its error and traceback, and the next one runs:

1. environment: torch, transformers and peft versions, the device, its memory, bf16 support.
2. hf_engine: the HF engine's seeded sampling (same seed, same tokens), constrained decoding
   (the sample is one of the admissible actions, its renormalised log-probs are the learner's
   for the same tokens, and the admissible actions' probabilities sum to 1), and generation
   tokens/s at batch 8, 32 and 64.
3. loss: the learner's forward (response-only scoring under bf16 autocast over fp32 master
   weights), policy loss and backward: loss and gradients finite, time, peak memory.
4. parity: the engine's log-probs of its sampled tokens against the learner's, fp32 with TF32
   off, and bf16 (the runner's bf16 weights against the learner's autocast).
5. scoring_memory: peak memory of the response-only, chunked scoring against full logits.
6. lora_merge: peft LoRA on every projection, perturbed and merged: the merged model's logits
   against the adapted model's.
7. gradient_checkpointing: peak memory of forward + backward with and without it, and the
   gradients of both.

The model is Qwen2.5-1.5B's architecture with random weights: nothing is downloaded, and token
ids go in and out (no tokenizer). `--device cpu` runs the same checks on a tiny model of the
same architecture. Only torch, transformers and peft are needed (no Ray, vLLM or DeepSpeed); on
the GPU machine, from the repository root:

    python benchmarks/gpu_check.py --out gpu_check.json

Over `--max-seconds` (default 420) the remaining repeats and sections are skipped, and recorded so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
# Run as a plain script where the project is not installed (the GPU machine).
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import machine  # noqa: E402

from empg_rllib.core.batch import TurnBatch, build_turn_batch  # noqa: E402
from empg_rllib.core.choices import ChoiceTrie, walk  # noqa: E402
from empg_rllib.core.losses import policy_loss  # noqa: E402
from empg_rllib.core.precision import autocast, bf16_native, resolve_dtype  # noqa: E402
from empg_rllib.core.records import Episode, Turn  # noqa: E402
from empg_rllib.core.scoring import position_ids, response_scores, scores_of_tokens  # noqa: E402
from empg_rllib.core.update_plan import loss_normalizer  # noqa: E402
from empg_rllib.sampling.engines.base import Completion, SamplingParams  # noqa: E402
from empg_rllib.sampling.engines.hf import HFEngine  # noqa: E402

#: Below 1 so that a scorer that forgets to divide by the temperature shows up as a gap.
TEMPERATURE = 0.7
#: The learner's default `chunk_tokens`.
CHUNK_TOKENS = 1024
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: What the project uses elsewhere and a GPU machine with only torch, transformers and peft lacks.
FOREIGN = ("ray", "vllm", "deepspeed", "pydantic", "empg_envs", "rich", "gymnasium", "matplotlib")


@dataclass(frozen=True)
class Shapes:
    model: dict[str, Any]  # Qwen2Config keyword arguments
    prompt_tokens: int  # the longest prompt; others are up to a quarter shorter (left padding)
    new_tokens: int
    batches: tuple[int, ...]  # generation batch sizes timed
    repeats: int
    rows: int  # rows of the learner's batches


SHAPES = {
    "cuda": Shapes(
        model=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
        prompt_tokens=512, new_tokens=32, batches=(8, 32, 64), repeats=3, rows=8,
    ),
    "cpu": Shapes(
        model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
        prompt_tokens=48, new_tokens=8, batches=(2, 4, 8), repeats=2, rows=4,
    ),
}


class TokenIds:
    """The tokenizer the HF engine asks for, over bare token ids: no text, so no stop strings."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self.pad_token_id = 0

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return ""


@dataclass
class Context:
    """What every section shares: the device, the shapes, the seed, the deadline, the models."""

    device: torch.device
    shapes: Shapes
    seed: int
    deadline: float  # time.monotonic() past which repeats and sections are skipped
    skipped_repeats: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @cached_property
    def model(self) -> Qwen2ForCausalLM:
        """fp32 random weights: the learner's master copy, built on the device itself."""
        torch.manual_seed(self.seed)
        with self.device:
            return Qwen2ForCausalLM(Qwen2Config(**self.shapes.model)).eval()

    @cached_property
    def bf16_model(self) -> Qwen2ForCausalLM:
        """The same weights in bf16: what an env runner's engine holds under `dtype: bfloat16`."""
        return copy.deepcopy(self.model).to(torch.bfloat16)

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the product computes in when configured bf16 here (fp32 on a CPU without bf16)."""
        return resolve_dtype("bfloat16", self.device, "gpu check")

    def tokens(self) -> TokenIds:
        return TokenIds(self.shapes.model["vocab_size"])

    def prompts(self, n: int, salt: int) -> list[list[int]]:
        """`n` random prompts of different lengths, never the pad or EOS id."""
        rng = np.random.default_rng([self.seed, salt])
        top = self.shapes.prompt_tokens
        lengths = top - rng.integers(0, top // 4 + 1, n)
        return [rng.integers(1, self.shapes.model["vocab_size"] - 1, k).tolist() for k in lengths]

    def learner_batch(self, salt: int) -> TurnBatch:
        """The learner's rows: random prompts, each with a random response of `new_tokens`."""
        rng = np.random.default_rng([self.seed, salt, 1])
        responses = rng.integers(1, self.shapes.model["vocab_size"] - 1, (self.shapes.rows, self.shapes.new_tokens))
        return as_batch(self.prompts(self.shapes.rows, salt), [completion(r.tolist()) for r in responses])

    def release(self) -> None:
        """Free what a section left behind, so that the next section's peak memory starts clean."""
        if "model" in self.__dict__:
            self.model.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def completion(tokens: list[int], allowed: list[list[int]] | None = None) -> Completion:
    """A response as the engine would return it, for rows the engine did not sample."""
    return Completion(tokens, [0.0] * len(tokens), None, "stop", allowed_token_ids=allowed)


def as_batch(prompts: Sequence[list[int]], completions: Sequence[Completion]) -> TurnBatch:
    """The learner's batch of one-turn episodes, through the project's own batch builder."""
    episodes = [
        Episode(str(i), "gpu-check", i, turns=[Turn(p, c.token_ids, c.logprobs, c.entropies, c.finish_reason,
                                                    c.weights_version, "", None, allowed_token_ids=c.allowed_token_ids)])
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    return build_turn_batch(episodes, pad_id=0)


def columns(batch: TurnBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(getattr(batch, k), device=device) for k in ("input_ids", "attention_mask", "resp_mask"))


def learner_scores(lm: Any, batch: TurnBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies [N, L-1], as the learner's module computes them
    (LLMRLModule._forward_train, whose module imports Ray): response-only scoring under autocast."""
    ids, mask, resp = columns(batch, lm.device)
    allowed = None if batch.allowed_ids is None else torch.as_tensor(batch.allowed_ids, device=lm.device)
    with autocast(dtype, lm.device):
        return response_scores(lm, ids, mask, resp, TEMPERATURE, allowed, chunk_tokens=CHUNK_TOKENS)


def gap(batch: TurnBatch, learner_logp: torch.Tensor) -> dict[str, float]:
    """Max and mean |engine - learner| log-prob over the sampled tokens."""
    on = batch.resp_mask > 0
    diff = np.abs(learner_logp.detach().float().cpu().numpy()[on] - batch.sampler_logp[on])
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "tokens": int(on.sum())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """Seconds, and on CUDA the peak memory allocated above what was allocated on entry (MiB)."""
    out: dict[str, Any] = {}
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out["start"] = time.perf_counter()
    yield out
    sync(device)
    out["seconds"] = time.perf_counter() - out.pop("start")
    out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None


def check_environment(ctx: Context) -> dict[str, Any]:
    try:
        peft_version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        peft_version = None
    info = {
        **machine(),
        "transformers": transformers.__version__,
        "peft": peft_version,
        "device": str(ctx.device),
        "bf16_native": bf16_native(ctx.device),
        "compute_dtype": str(ctx.compute_dtype),
        "cuda_matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "model_config": ctx.shapes.model,
    }
    with measured(ctx.device) as build:
        info["model_parameters"] = sum(p.numel() for p in ctx.model.parameters())
    info["model_build_s"] = build["seconds"]
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            name=props.name,
            capability=list(torch.cuda.get_device_capability(ctx.device)),
            total_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    return info


def check_engine(ctx: Context) -> dict[str, Any]:
    engine = HFEngine(ctx.model, ctx.tokens(), device=str(ctx.device), seed=ctx.seed)
    prompts = ctx.prompts(4, salt=1)
    seeds = list(range(len(prompts)))
    params = SamplingParams(max_new_tokens=ctx.shapes.new_tokens, temperature=TEMPERATURE, stop=(), seed=ctx.seed)
    other = SamplingParams(max_new_tokens=ctx.shapes.new_tokens, temperature=TEMPERATURE, stop=(), seed=ctx.seed + 1)

    def sample(*args: Any, **kwargs: Any) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(*args, **kwargs)]

    first, by_row = sample(prompts, params), sample(prompts, params, seeds=seeds)
    result: dict[str, Any] = {
        "seeded_repeat_equal": sample(prompts, params) == first,
        "other_seed_differs": sample(prompts, other) != first,
        "row_seeds_repeat_equal": sample(prompts, params, seeds=seeds) == by_row,
        # Not required: a batch of another size may take other kernels and round differently.
        "row_seed_alone_equals_batched": sample(prompts[:1], params, seeds=seeds[:1]) == by_row[:1],
    }

    # Per prompt, four actions of 2-4 tokens sharing prefixes, none a prefix of another (like
    # "go to desk 1", "go to desk 2", "go to shelf", "look around").
    rng = np.random.default_rng([ctx.seed, 2])
    choices = []
    for _ in prompts:
        a, b, c, d, e, f, g = rng.choice(np.arange(1, ctx.shapes.model["vocab_size"] - 1), 7, replace=False).tolist()
        choices.append([[a, b, c], [a, b, d, e], [a, f], [g, c, d]])
    outs = engine.generate(prompts, params, choices=choices, seeds=seeds)
    sampled = as_batch(prompts, outs)
    every = [(p, completion(a, walk(ChoiceTrie(cs), a)[1])) for p, cs in zip(prompts, choices) for a in cs]
    with torch.no_grad():
        learner_logp, _ = learner_scores(ctx.model, sampled, torch.float32)
        # Each admissible action scored as the learner would score it, had it been sampled.
        every_logp, _ = learner_scores(ctx.model, as_batch(*zip(*every)), torch.float32)
    mass = every_logp.double().sum(-1).exp().reshape(len(prompts), -1).sum(-1)
    result["constrained"] = {
        "admissible": all(c.token_ids in cs for c, cs in zip(outs, choices)),
        "finished_on_choice": all(c.finish_reason == "stop" for c in outs),
        "logp_gap_fp32": gap(sampled, learner_logp),
        "choice_mass_max_error": float((mass - 1).abs().max()),
    }
    result["throughput"] = _throughput(ctx)
    return result


def _throughput(ctx: Context) -> dict[str, Any]:
    """Generated tokens per second (prefill included) at each batch size, per-row seeds as the
    rollout samples, weights in the dtype an env runner holds under `dtype: bfloat16`."""
    dtype = ctx.compute_dtype
    model = ctx.bf16_model if dtype == torch.bfloat16 else ctx.model
    engine = HFEngine(model, ctx.tokens(), device=str(ctx.device), seed=ctx.seed, max_batch_size=max(ctx.shapes.batches))
    params = SamplingParams(max_new_tokens=ctx.shapes.new_tokens, temperature=1.0, stop=())
    small = ctx.shapes.batches[0]
    engine.generate(ctx.prompts(small, salt=3), params, seeds=list(range(small)))  # warm-up: kernels, allocator
    out: dict[str, Any] = {"dtype": str(dtype), "prompt_tokens": ctx.shapes.prompt_tokens}
    for batch in ctx.shapes.batches:
        prompts = ctx.prompts(batch, salt=4)
        rates, peaks = [], []
        for repeat in range(ctx.shapes.repeats):
            if rates and ctx.left() <= 0:
                ctx.skipped_repeats.append(f"throughput batch {batch}")
                break
            with measured(ctx.device) as m:
                outs = engine.generate(prompts, params, seeds=[repeat * batch + i for i in range(batch)])
            rates.append(sum(len(c.token_ids) for c in outs) / m["seconds"])
            peaks.append(m["peak_mib"])
        out[f"batch_{batch}"] = {"tokens_per_s": statistics.median(rates), "repeats": len(rates), "peak_mib": peaks[-1]}
    return out


def check_loss(ctx: Context) -> dict[str, Any]:
    lm, dtype, device = ctx.model, ctx.compute_dtype, ctx.device
    batch = ctx.learner_batch(salt=5)
    resp = torch.as_tensor(batch.resp_mask, device=device)
    g = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        old_logp, _ = learner_scores(lm, batch, dtype)  # the pre-update pass
    # Move the proximal log-probs off the current ones, so that ratios differ from 1 and some clip.
    old_logp = old_logp + 0.1 * torch.randn(old_logp.shape, generator=g).to(device) * resp
    advantages = torch.randn(len(batch), 1, generator=g).to(device) * resp
    normalizer = loss_normalizer(batch.resp_mask, np.arange(len(batch)), token_mean=True)
    with measured(device) as step:
        logp, _ = learner_scores(lm, batch, dtype)
        loss, stats = policy_loss(logp, old_logp, advantages, resp, clip_high=0.28, normalizer=normalizer)
        sync(device)
        forward_s = time.perf_counter() - step["start"]
        loss.backward()
    norms = torch.stack([p.grad.norm() for p in lm.parameters() if p.grad is not None])
    return {
        "compute_dtype": str(dtype),
        "master_dtype": str(next(lm.parameters()).dtype),
        "rows": len(batch),
        "sequence_tokens": batch.input_ids.shape[1],
        "loss": float(loss.detach()),
        "loss_finite": bool(torch.isfinite(loss)),
        "grads_finite": bool(torch.isfinite(norms).all()),
        "grad_norm": float(norms.norm()),
        "clip_fraction": float(stats["clipped"] / stats["tokens"]),
        "forward_s": forward_s,
        "forward_backward_s": step["seconds"],
        "peak_mib": step["peak_mib"],
    }


def check_parity(ctx: Context) -> dict[str, Any]:
    prompts = ctx.prompts(ctx.shapes.rows, salt=6)
    params = SamplingParams(max_new_tokens=ctx.shapes.new_tokens, temperature=TEMPERATURE, stop=())
    result: dict[str, Any] = {
        # Set in main(): fp32 matmuls in full precision, else TF32 rounding alone exceeds 1e-4.
        "cuda_matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "fp32_means": "fp32 engine weights against the learner's fp32 forward",
        "bf16_means": "bf16 engine weights against the learner's fp32 weights under bf16 autocast",
    }
    for name, engine_model, dtype in (("fp32", ctx.model, torch.float32), ("bf16", ctx.bf16_model, torch.bfloat16)):
        engine = HFEngine(engine_model, ctx.tokens(), device=str(ctx.device), seed=ctx.seed)
        batch = as_batch(prompts, engine.generate(prompts, params, seeds=list(range(len(prompts)))))
        with torch.no_grad():
            logp, _ = learner_scores(ctx.model, batch, dtype)
        result[name] = gap(batch, logp)
    return result


def check_scoring_memory(ctx: Context) -> dict[str, Any]:
    lm, device = ctx.model, ctx.device
    batch = ctx.learner_batch(salt=7)
    ids, mask, resp = columns(batch, device)
    rows, width = resp.shape
    result: dict[str, Any] = {
        "dtype": "float32",
        "rows": rows,
        "sequence_tokens": width + 1,
        "response_tokens": int(resp.sum()),
        "full_logits_mib": rows * width * ctx.shapes.model["vocab_size"] * 4 / 2**20,
    }
    for mode, grad in (("no_grad", False), ("forward_backward", True)):
        with torch.set_grad_enabled(grad):
            with measured(device) as chunked:
                logp, _ = response_scores(lm, ids, mask, resp, TEMPERATURE, chunk_tokens=CHUNK_TOKENS)
                if grad:
                    (logp * resp).sum().backward()
            lm.zero_grad(set_to_none=True)
            with measured(device) as full:
                logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
                full_logp, _ = scores_of_tokens(logits, ids[:, 1:], TEMPERATURE)
                if grad:
                    (full_logp * resp).sum().backward()
            lm.zero_grad(set_to_none=True)
        on = resp > 0
        result[mode] = {
            "response_only_peak_mib": chunked["peak_mib"],
            "full_logits_peak_mib": full["peak_mib"],
            "response_only_s": chunked["seconds"],
            "full_logits_s": full["seconds"],
            "logp_max_abs_diff": float((logp[on] - full_logp[on]).abs().max()),
        }
        del logits, full_logp, logp
    return result


def check_lora_merge(ctx: Context) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none",
                        task_type="CAUSAL_LM")
    adapted = get_peft_model(copy.deepcopy(ctx.model), config).eval()
    g = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: an adapter that changes nothing
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    ids, mask, _ = columns(ctx.learner_batch(salt=8), ctx.device)

    def logits(model: Any) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float()

    with torch.no_grad():
        with_adapter = logits(adapted)
        with adapted.disable_adapter():
            without = logits(adapted)
        layers = sum(isinstance(m, LoraLayer) for m in adapted.modules())
        merged = logits(adapted.merge_and_unload())
    return {
        "adapted_layers": layers,
        "expected_layers": len(PROJECTIONS) * ctx.shapes.model["num_hidden_layers"],
        "adapter_effect_max_abs": float((with_adapter - without).abs().max()),
        "merge_max_abs_diff": float((merged - with_adapter).abs().max()),
    }


def check_gradient_checkpointing(ctx: Context) -> dict[str, Any]:
    lm, device = ctx.model, ctx.device
    batch = ctx.learner_batch(salt=9)
    resp = torch.as_tensor(batch.resp_mask, device=device)
    advantages = torch.randn(len(batch), 1, generator=torch.Generator().manual_seed(ctx.seed)).to(device) * resp

    def step() -> dict[str, Any]:
        lm.zero_grad(set_to_none=True)
        with measured(device) as m:
            logp, _ = learner_scores(lm, batch, ctx.compute_dtype)
            policy_loss(logp, logp.detach(), advantages, resp)[0].backward()
        return m

    lm.train()  # transformers checkpoints only in training mode
    try:
        plain = step()
        plain_grads = {name: p.grad for name, p in lm.named_parameters()}
        lm.gradient_checkpointing_enable()  # the learner's switch (LLMRLModule, `gradient_checkpointing`)
        enabled = lm.is_gradient_checkpointing
        checkpointed = step()
    finally:
        lm.gradient_checkpointing_disable()
        lm.eval()
    diff = max(float((p.grad - plain_grads[name]).abs().max()) for name, p in lm.named_parameters())
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    return {
        "compute_dtype": str(ctx.compute_dtype),
        "enabled": enabled,
        "plain": plain,
        "checkpointed": checkpointed,
        "grads_max_abs_diff": diff,
        "grads_max_rel_diff": diff / scale,
        "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in lm.parameters()),
    }


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": check_environment,
    "hf_engine": check_engine,
    "loss": check_loss,
    "parity": check_parity,
    "scoring_memory": check_scoring_memory,
    "lora_merge": check_lora_merge,
    "gradient_checkpointing": check_gradient_checkpointing,
}


def write(path: Path, report: Mapping[str, Any]) -> None:
    """Replace `path` whole, so that a kill mid-write leaves the previous report."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str))
    os.replace(partial, path)


def run_sections(
    sections: Mapping[str, Callable[[Context], dict[str, Any]]], ctx: Context, report: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Run each section in turn into `report["sections"]`, writing `out` after each."""
    for name, check in sections.items():
        started = time.perf_counter()
        if ctx.left() <= 0:
            result: dict[str, Any] = {"skipped": "over --max-seconds"}
        else:
            try:
                result = check(ctx)
            except Exception as exc:  # recorded; the next section still runs
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            ctx.release()
        result["seconds"] = time.perf_counter() - started
        report["sections"][name] = result
        report["skipped_repeats"] = ctx.skipped_repeats
        write(out, report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=420.0, help="skip repeats and sections past this")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu for the small CPU run")
    started = time.monotonic()
    # Explicit, not left to the default: the fp32 parity (< 1e-4) does not hold under TF32.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    ctx = Context(torch.device(args.device), SHAPES[args.device], args.seed, started + args.max_seconds)
    report: dict[str, Any] = {"device": args.device, "seed": args.seed, "max_seconds": args.max_seconds, "sections": {}}
    run_sections(SECTIONS, ctx, report, args.out)
    report["imports"] = {
        "project": sorted(m for m in sys.modules if m.startswith("empg_rllib")),
        "foreign_loaded": sorted(m for m in FOREIGN if sys.modules.get(m) is not None),
    }
    report["total_seconds"] = time.monotonic() - started
    write(args.out, report)
    failed = [name for name, s in report["sections"].items() if "error" in s]
    print(f"wrote {args.out} in {report['total_seconds']:.0f} s; sections with errors: {failed or 'none'}")


if __name__ == "__main__":
    main()
