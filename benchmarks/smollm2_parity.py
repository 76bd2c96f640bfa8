"""Sampler-learner log-prob gap on SmolLM2-135M-Instruct, fp32 and bf16: the HF engine samples
from the first prompt of an ALFWorld, a WebShop and a DeepSearch task, the learner's pass
(`core.scoring`, bf16 autocast over fp32 weights, as the learner trains) scores the same tokens. On a CPU without native bf16 the bf16 rows are
computed in emulated bf16 (slow) and labelled so.

    python benchmarks/smollm2_parity.py

Writes benchmarks/results/smollm2_parity.{json,png}.
"""

from __future__ import annotations

import time
from typing import Any

from _common import RESULTS, write


def gap(engine_dtype: str, learner_autocast: bool, prompts: list[list[int]], path: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from empg_rllib.core.precision import autocast
    from empg_rllib.core.scoring import score_responses
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.engines.hf import HFEngine

    dtype = getattr(torch, engine_dtype)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), _tokenizer(path), seed=0)
    started = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, stop=()))
    sampled = time.perf_counter()
    learner = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with autocast(torch.bfloat16 if learner_autocast else torch.float32):
        reference, _ = score_responses(learner, prompts, [o.token_ids for o in outs], engine.pad_token_id)
    diffs = [abs(a - b) for out, ref in zip(outs, reference) for a, b in zip(out.logprobs, ref)]
    return {
        "engine_dtype": engine_dtype,
        "learner": "bf16 autocast over fp32 weights" if learner_autocast else "fp32",
        "tokens": len(diffs),
        "gap_max": max(diffs),
        "gap_mean": sum(diffs) / len(diffs),
        "sampling_s": sampled - started,
    }


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def main() -> None:
    import empg_envs
    from empg_rllib.core.precision import cpu_bf16_flags
    from empg_rllib.sampling.prompting import build_prompt_ids
    from empg_rllib.workflows.models import resolve_model

    path = str(resolve_model("smollm2:"))
    tokenizer = _tokenizer(path)
    prompts = []
    for env_id in ("alfworld", "webshop", "deepsearch"):  # each family's first prompt of a real task
        env = empg_envs.make(env_id, split="train")
        observation, info = env.reset(seed=0)
        prompts.append(build_prompt_ids(tokenizer, info["instruction"], observation))
        env.close()
    rows = [gap("float32", False, prompts, path), gap("bfloat16", True, prompts, path)]
    native = bool(cpu_bf16_flags())
    for row in rows[1:]:
        row["bf16_native"] = native
    for row in rows:
        print(row, flush=True)
    write("smollm2_parity", {"prompt_tokens": [len(p) for p in prompts], "rows": rows})
    _plot(rows)


def _plot(rows: list[dict[str, Any]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"engine {r['engine_dtype']}\nlearner {r['learner'].split()[0]}" for r in rows]
    ax.bar(labels, [r["gap_max"] for r in rows], label="max")
    ax.bar(labels, [r["gap_mean"] for r in rows], label="mean")
    ax.set_yscale("log")
    ax.set_ylabel("|sampler - learner| log-prob (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "smollm2_parity.png", dpi=100)


if __name__ == "__main__":
    main()
