"""The learner on real-model batches: how much of its micro-batches is padding, what grouping
rows by length saves, and what share of this machine's matmul peak it reaches.

For each family (the SmolLM2 experiment files `tuned_examples/smollm2/{alfworld,webshop}.yaml`,
HF engine), one iteration's episodes are sampled by the real model and built into the learner's
batch as training does. On that batch, in one process and alternating order:
- the share of padded positions in the learner's micro-batches, in plan order at the batch's
  width (as before) and grouped by length and trimmed (`length_bucketing`, the default);
- the learner's scoring pass and update (forward + backward + optimizer) both ways: real tokens/s,
  medians over `--repeats` after a warm-up, and their ratio (goal: >= 1.3x where padding > 25%);
- the matmul peak of this host measured in the same run (2048^3, fp32 and bf16) and the share of
  it the update reaches: FLOPs from the model's shapes over real tokens only (forward 2 per
  weight plus causal attention, the LM head at response positions; backward twice the forward
  for full fine-tuning, once under LoRA, whose frozen weights get no gradient).

    python benchmarks/learner_padding.py [--families alfworld webshop] [--dtypes float32 bfloat16]

Writes benchmarks/results/learner_padding.{json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, flops_per_token, matmul_gflops, paired_bars, write  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "empg_rllib" / "tuned_examples" / "smollm2"


def padded_share(lengths: np.ndarray, width: int, micro: int, bucket: bool) -> float:
    """Padded positions over all positions the learner's micro-batches compute (one learner, the
    whole batch as one minibatch)."""
    from empg_rllib.core.update_plan import micro_batches

    computed = sum(len(rows) * (width if w is None else w) for rows, w in micro_batches(lengths, micro, bucket))
    return 1 - float(lengths.sum()) / computed


def update_flops(config: Any, lengths: np.ndarray, response_tokens: int, lora: bool) -> float:
    """FLOPs of one update over real tokens: each row's forward (mean causal context: half its
    length), the LM head at response positions, backward twice (once under LoRA) the forward."""
    body = sum(flops_per_token(config, n / 2, head=False) * n for n in lengths.tolist())
    forward = body + 2 * config.hidden_size * config.vocab_size * response_tokens
    return forward * (2 if lora else 3)


def set_bucketing(algo: Any, on: bool) -> None:
    """Switch `length_bucketing` on the built algorithm (the benchmark's own lever: a run sets it
    in its experiment file)."""
    learner = algo.learner_group._learner
    for config in {id(c): c for c in (algo.config, learner.config)}.values():
        object.__setattr__(config, "experiment_settings", config.experiment.model_copy(update={"length_bucketing": on}))


def measure(family: str, dtype: str, repeats: int, max_turns: int | None, peaks: dict[str, float]) -> dict[str, Any]:
    from empg_rllib.config.loading import load
    from empg_rllib.core.batch import build_turn_batch
    from empg_rllib.workflows.models import resolve_model
    from empg_rllib.workflows.training import build_algorithm

    run_dir = tempfile.mkdtemp(prefix="learner-padding-")
    exp = load(EXAMPLES / f"{family}.yaml").model_copy(update={
        "engine": "hf", "dtype": dtype, "run_dir": run_dir, "checkpoint_every": 0, "num_env_runners": 0,
        "num_learners": 0, **({"max_turns": max_turns} if max_turns else {}),
    })
    algo = build_algorithm(exp, str(resolve_model(exp.model)))
    try:
        started = time.perf_counter()
        episodes = algo.sample_episodes(algo._draw_groups())
        sampled_s = time.perf_counter() - started
        batch = build_turn_batch(episodes, algo._pad_id)
        columns = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "resp_mask": batch.resp_mask}
        if batch.allowed_ids is not None:
            columns["allowed_ids"] = batch.allowed_ids
        scores = algo.score_batch(columns)
        advantages = np.random.default_rng(0).normal(size=batch.resp_mask.shape).astype(np.float32)
        train = {**columns, "old_logp": scores["token_logp"].astype(np.float32), "token_adv": advantages * batch.resp_mask}
        times: dict[str, dict[str, list[float]]] = {"score": {"padded": [], "bucketed": []},
                                                   "update": {"padded": [], "bucketed": []}}
        for repeat in range(repeats + 1):  # the first is a warm-up, not counted
            for side in (("padded", "bucketed") if repeat % 2 else ("bucketed", "padded")):
                set_bucketing(algo, side == "bucketed")
                for part, run in (("score", lambda: algo.score_batch(columns)), ("update", lambda: algo.update_learners(train))):
                    start = time.perf_counter()
                    run()
                    if repeat:
                        times[part][side].append(time.perf_counter() - start)
        config = algo.learner_group._learner._lm().config
    finally:
        algo.stop()
    lengths = batch.attention_mask.sum(-1)
    tokens, response = int(lengths.sum()), int(batch.resp_mask.sum())
    flops = update_flops(config, lengths, response, exp.lora is not None)
    peak = peaks[dtype]
    row: dict[str, Any] = {
        "family": family, "dtype": dtype, "lora": exp.lora is not None, "rows": len(lengths),
        "micro_batch_size": exp.micro_batch_size, "episodes": len(episodes), "sampling_s": sampled_s,
        "row_tokens": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "real_tokens": tokens, "response_tokens": response,
        "padded_share": {side: padded_share(lengths, batch.input_ids.shape[1], exp.micro_batch_size, side == "bucketed")
                         for side in ("padded", "bucketed")},
        "times_s": times,
    }
    for part in ("score", "update"):
        median = {side: statistics.median(values) for side, values in times[part].items()}
        row[f"{part}_tokens_per_s"] = {side: tokens / s for side, s in median.items()}
        row[f"{part}_speedup"] = statistics.median(p / b for p, b in zip(times[part]["padded"], times[part]["bucketed"]))
    row["update_peak_share"] = {side: flops / statistics.median(v) / (peak * 1e9) for side, v in times["update"].items()}
    print(f"{family} {dtype}: {len(lengths)} rows of {row['row_tokens']}, padding {row['padded_share']['padded']:.0%} -> "
          f"{row['padded_share']['bucketed']:.0%}; update {row['update_speedup']:.2f}x, score {row['score_speedup']:.2f}x; "
          f"update at {row['update_peak_share']['bucketed']:.0%} of the {dtype} peak", flush=True)
    return row


def plot(rows: list[dict[str, Any]]) -> None:
    paired_bars(
        "learner_padding", [f"{r['family']} {r['dtype']}" for r in rows],
        {"micro-batches at the batch's width": [r["update_tokens_per_s"]["padded"] for r in rows],
         "grouped by length, trimmed": [r["update_tokens_per_s"]["bucketed"] for r in rows]},
        [f"{r['update_speedup']:.2f}x (pad {r['padded_share']['padded']:.0%})" for r in rows],
        "learner update, real tokens/s (median)",
        "The learner on SmolLM2 batches: padding computed or trimmed",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["alfworld", "webshop"])
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32, and bfloat16 where native")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-turns", type=int, default=None, help="cap the files' max_turns (a quicker batch)")
    args = parser.parse_args()
    from empg_rllib.core.precision import bf16_native

    dtypes = args.dtypes or ["float32", *(["bfloat16"] if bf16_native() else [])]
    peaks = {dtype: matmul_gflops(dtype) for dtype in dtypes}
    rows = [measure(family, dtype, args.repeats, args.max_turns, peaks) for family in args.families for dtype in dtypes]
    path = write("learner_padding", {"model": "smollm2:", "matmul_gflops": peaks, "rows": rows})
    plot(rows)
    print(f"wrote {path} and {RESULTS / 'learner_padding.png'}")


if __name__ == "__main__":
    main()
