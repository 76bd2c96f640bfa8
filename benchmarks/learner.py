"""The learner group: overhead against a plain PyTorch loop, torch vs DeepSpeed ZeRO on 1 and 2
learners, the memory of response-only logits, LoRA vs full fine-tuning.

Writes benchmarks/results/learner.json and .png. Every figure is a median of `--repeats` timed
updates after one warm-up update; the two sides of each ratio run interleaved in one process.

- overhead: `EMPG.update_learners` (the RLlib local learner: plan, micro-batches, metrics)
  against a hand-written loop (HF forward over the response columns, clipped surrogate, AdamW)
  on the same model, batch and micro-batches. Goal: learner tokens/s >= 0.85x the loop's.
- backends: torch (DDP) and DeepSpeed ZeRO 1/2/3 with 1 and 2 remote learners (one CPU each):
  tokens/s of the group and each rank's peak RSS. ZeRO-3 on one learner is refused by the
  experiment's validation (it loses accumulated gradients), and is listed as such.
- memory: peak RSS of one forward + backward, each in a fresh process, of the old scoring (logits
  and entropy over every position, entropy in the graph) and of `scoring.response_scores`, on a
  model with Qwen2.5's vocabulary (151,936) and long prompts.
- lora: update time and the bytes the weight sync carries, full fine-tuning vs LoRA adapters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, random_rows, write  # noqa: E402

PARTS = ("overhead", "backends", "memory", "lora")
QWEN_VOCAB = 151_936


def synthetic_batch(rows: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of agent-turn shape: 96-159 prompt tokens, a 16-47-token response."""
    return random_rows(rows, vocab, prompt=(96, 160), response=(16, 48))


def with_targets(algo: Any, columns: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """The columns, the current policy's log-probs as behaviour log-probs, random advantages."""
    scores = algo.score_batch(columns)
    adv = np.random.default_rng(seed).normal(size=columns["resp_mask"].shape).astype(np.float32)
    return {**columns, "old_logp": scores["token_logp"].astype(np.float32), "token_adv": adv * columns["resp_mask"]}


def timed(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def build(model_path: str, run_dir: str, **overrides: Any) -> Any:
    from empg_rllib.config.loading import validate
    from empg_rllib.workflows.training import build_algorithm

    base = {
        "env": "deepsearch",
        "tasks_per_batch": 1,
        "group_size": 2,
        "max_new_tokens": 8,
        "checkpoint_every": 0,
        "loss": "dapo",
        "lr": 1e-5,
        "micro_batch_size": 8,
        "run_dir": run_dir,
    }
    return build_algorithm(validate({**base, **overrides}), model_path)


# ---- overhead -------------------------------------------------------------------------------
def plain_loop(model_path: str, lr: float, micro: int, clip: tuple[float, float] = (0.2, 0.28)) -> Callable[[dict[str, np.ndarray]], None]:
    """The loop a user would write: one AdamW step over the batch, gradients accumulated over
    micro-batches, logits of the response columns only, DAPO's token-mean clipped surrogate."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def update(batch: dict[str, np.ndarray]) -> None:
        t = {k: torch.as_tensor(v) for k, v in batch.items()}
        width = int((t["resp_mask"].sum(0) > 0).sum())
        tokens = t["resp_mask"].sum()
        optim.zero_grad(set_to_none=True)
        for start in range(0, len(t["input_ids"]), micro):
            m = {k: v[start : start + micro] for k, v in t.items()}
            positions = (m["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=m["input_ids"], attention_mask=m["attention_mask"], position_ids=positions,
                logits_to_keep=width + 1,
            ).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, m["input_ids"][:, -width:, None]).squeeze(-1)
            ratio = torch.exp(logp - m["old_logp"][:, -width:])
            adv = m["token_adv"][:, -width:]
            surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip[0], 1 + clip[1]) * adv)
            loss = -(surrogate * m["resp_mask"][:, -width:]).sum() / tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()

    return update


def overhead(model_path: str, repeats: int, rows: int) -> dict[str, Any]:
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as run_dir:
        algo = build(model_path, run_dir, num_learners=0)
        try:
            batch = with_targets(algo, synthetic_batch(rows, vocab))
            loop = plain_loop(model_path, lr=1e-5, micro=8)
            tokens = int(batch["attention_mask"].sum())
            algo.update_learners(batch)
            loop(batch)
            learner_s, loop_s = [], []
            for _ in range(repeats):  # interleaved: the machine's drift hits both alike
                learner_s.append(timed(lambda: algo.update_learners(batch)))
                loop_s.append(timed(lambda: loop(batch)))
        finally:
            algo.stop()
    learner_rate, loop_rate = tokens / statistics.median(learner_s), tokens / statistics.median(loop_s)
    result = {
        "rows": rows,
        "tokens_per_update": tokens,
        "response_tokens_per_update": int(batch["resp_mask"].sum()),
        "micro_batch_size": 8,
        "learner_tokens_per_s": learner_rate,
        "plain_loop_tokens_per_s": loop_rate,
        "ratio": learner_rate / loop_rate,
        "goal_ratio": 0.85,
        "learner_s_runs": learner_s,
        "plain_loop_s_runs": loop_s,
    }
    print(f"overhead: learner {learner_rate:.0f} tokens/s, plain loop {loop_rate:.0f} tokens/s, ratio {result['ratio']:.3f} (goal >= 0.85)")
    return result


# ---- backends -------------------------------------------------------------------------------
def rank_memory(algo: Any) -> list[dict[str, float]]:
    """Each learner's current and peak RSS in MB, rank order."""

    def probe(learner: Any) -> tuple[int, float, float]:
        import psutil

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return learner.rank, psutil.Process().memory_info().rss / 2**20, peak_kb / 1024

    results = algo.learner_group.foreach_learner(probe)
    return [{"rank": r, "rss_mb": rss, "peak_rss_mb": peak} for r, rss, peak in sorted(x.get() for x in results.result_or_errors)]


BACKENDS = [
    ("torch", None, 1), ("torch", None, 2),
    ("deepspeed", 1, 1), ("deepspeed", 1, 2),
    ("deepspeed", 2, 1), ("deepspeed", 2, 2),
    ("deepspeed", 3, 1), ("deepspeed", 3, 2),
]


def backends(model_path: str, repeats: int, rows: int) -> list[dict[str, Any]]:
    from empg_rllib.config.schema import ConfigError

    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    out = []
    for backend, stage, learners in BACKENDS:
        label = "torch" if backend == "torch" else f"ZeRO-{stage}"
        overrides: dict[str, Any] = {"num_learners": learners, "learner_backend": backend}
        if stage is not None:
            overrides["deepspeed"] = {"zero_optimization": {"stage": stage}}
        row: dict[str, Any] = {"backend": label, "learners": learners}
        with tempfile.TemporaryDirectory() as run_dir:
            try:
                algo = build(model_path, run_dir, **overrides)
            except ConfigError as err:
                row["refused"] = str(err)
                print(f"{label:7s} x{learners}: refused ({err})")
                out.append(row)
                continue
            try:
                batch = with_targets(algo, synthetic_batch(rows, vocab))
                tokens = int(batch["attention_mask"].sum())
                before = rank_memory(algo)
                algo.update_learners(batch)
                seconds = [timed(lambda: algo.update_learners(batch)) for _ in range(repeats)]
                after = rank_memory(algo)
            finally:
                algo.stop()
        row.update(
            tokens_per_s=tokens / statistics.median(seconds),
            update_s_runs=seconds,
            rss_before_update_mb=[m["rss_mb"] for m in before],
            peak_rss_mb=[m["peak_rss_mb"] for m in after],
        )
        out.append(row)
        print(f"{label:7s} x{learners}: {row['tokens_per_s']:7.0f} tokens/s, peak RSS per rank {[round(m) for m in row['peak_rss_mb']]} MB")
    return out


# ---- memory of the scoring pass ---------------------------------------------------------------
def memory_child(variant: str, rows: int, length: int, response: int) -> dict[str, float]:
    """One forward + backward in this (fresh) process; peak RSS above the RSS before it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from empg_rllib.core.losses import token_logprobs_and_entropy
    from empg_rllib.core.scoring import position_ids, response_scores

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
    )
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(5, QWEN_VOCAB, (rows, length))
    mask = torch.ones_like(ids)
    resp = torch.zeros(rows, length - 1)
    resp[:, -response:] = 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "full":
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1].float()
        logp, entropy = token_logprobs_and_entropy(logits, ids[:, 1:])
    else:
        logp, entropy = response_scores(model, ids, mask, resp)
    (logp * resp).sum().backward()
    del entropy
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_above_start_mb": (peak - base) / 1024, "peak_rss_mb": peak / 1024}


def memory(rows: int = 4, length: int = 512, response: int = 64) -> dict[str, Any]:
    result: dict[str, Any] = {"vocab": QWEN_VOCAB, "rows": rows, "tokens_per_row": length, "response_tokens_per_row": response}
    for variant in ("full", "response_only"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, str(rows), str(length), str(response)],
            capture_output=True, text=True, check=True,
        )
        result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["arithmetic_fp32_logits_mb"] = {
        "full": rows * (length - 1) * QWEN_VOCAB * 4 / 2**20,
        "response_only": rows * response * QWEN_VOCAB * 4 / 2**20,
    }
    result["ratio"] = result["full"]["peak_above_start_mb"] / result["response_only"]["peak_above_start_mb"]
    print(
        f"memory: full {result['full']['peak_above_start_mb']:.0f} MB, response-only "
        f"{result['response_only']['peak_above_start_mb']:.0f} MB above the start ({result['ratio']:.1f}x less)"
    )
    return result


# ---- LoRA -------------------------------------------------------------------------------------
def sync_bytes(algo: Any) -> int:
    """Bytes of the state the weight sync sends to the env runners."""
    state = algo.learner_group.foreach_learner(lambda learner: learner._rl_module().get_state(inference_only=True))
    return sum(v.numel() * v.element_size() for v in state.result_or_errors[0].get().values())


def lora(model_path: str, repeats: int, rows: int) -> dict[str, Any]:
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    settings = {"full": {}, "lora": {"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        algos = {name: build(model_path, f"{run_dir}/{name}", num_learners=0, **extra) for name, extra in settings.items()}
        try:
            batches = {name: with_targets(algo, synthetic_batch(rows, vocab)) for name, algo in algos.items()}
            seconds: dict[str, list[float]] = {name: [] for name in algos}
            for name, algo in algos.items():
                algo.update_learners(batches[name])
            for _ in range(repeats):
                for name, algo in algos.items():
                    seconds[name].append(timed(lambda: algo.update_learners(batches[name])))
            for name, algo in algos.items():
                trainable = algo.learner_group.foreach_learner(
                    lambda learner: sum(p.numel() for p in learner._rl_module().parameters() if p.requires_grad)
                )
                out[name] = {
                    "update_s_median": statistics.median(seconds[name]),
                    "update_s_runs": seconds[name],
                    "trainable_parameters": trainable.result_or_errors[0].get(),
                    "bytes_synced": sync_bytes(algo),
                }
        finally:
            for algo in algos.values():
                algo.stop()
    out["update_time_ratio"] = out["lora"]["update_s_median"] / out["full"]["update_s_median"]
    out["bytes_ratio"] = out["lora"]["bytes_synced"] / out["full"]["bytes_synced"]
    print(
        f"lora: update {out['lora']['update_s_median']:.2f}s vs full {out['full']['update_s_median']:.2f}s; "
        f"sync {out['lora']['bytes_synced'] / 2**10:.0f} KiB vs {out['full']['bytes_synced'] / 2**20:.1f} MiB"
    )
    return out


# ---- the figure -------------------------------------------------------------------------------
def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(17, 9))
    axes = grid.flatten()
    axes[5].axis("off")
    ax = axes[0]
    if o := results.get("overhead"):
        ax.bar(["plain PyTorch loop", "EMPG learner"], [o["plain_loop_tokens_per_s"], o["learner_tokens_per_s"]], color=["grey", "C0"])
        ax.axhline(0.85 * o["plain_loop_tokens_per_s"], color="C3", ls="--", label="goal: 0.85x the loop")
        ax.set_title(f"Learner vs plain loop: {o['ratio']:.2f}x")
        ax.set_ylabel("tokens/s (median)")
        ax.legend()
    ax = axes[1]
    if b := [r for r in results.get("backends", []) if "tokens_per_s" in r]:
        labels = [f"{r['backend']}\n{r['learners']} learner{'s' * (r['learners'] > 1)}" for r in b]
        ax.bar(labels, [r["tokens_per_s"] for r in b], color=["C0" if r["learners"] == 1 else "C1" for r in b])
        ax.set_title("Learner group throughput (1 CPU per learner)")
        ax.set_ylabel("tokens/s of the group (median)")
        ax.tick_params(axis="x", labelsize=8)
        ax = axes[2]
        ax.bar(labels, [max(r["peak_rss_mb"]) for r in b], color=["C0" if r["learners"] == 1 else "C1" for r in b])
        ax.set_title("Peak RSS per rank (largest rank)")
        ax.set_ylabel("MB")
        ax.tick_params(axis="x", labelsize=8)
    ax = axes[3]
    if m := results.get("memory"):
        ax.bar(["logits everywhere\n(before)", "response-only, chunked\n(after)"],
               [m["full"]["peak_above_start_mb"], m["response_only"]["peak_above_start_mb"]], color=["grey", "C0"])
        ax.set_title(f"Scoring memory, vocab {m['vocab']:,}, {m['rows']}x{m['tokens_per_row']} tokens")
        ax.set_ylabel("peak RSS above start, MB")
    ax = axes[4]
    if lo := results.get("lora"):
        names = ["full fine-tuning", "LoRA"]
        ax.bar(names, [lo["full"]["update_s_median"], lo["lora"]["update_s_median"]], color=["grey", "C0"])
        ax.set_ylabel("update time, s (median)")
        for i, name in enumerate(("full", "lora")):
            ax.annotate(f"syncs {lo[name]['bytes_synced'] / 2**20:.2f} MiB", (i, lo[name]["update_s_median"]), ha="center", va="bottom")
        ax.set_title("LoRA (r 8, attention) vs full")
    fig.suptitle("Learner benchmarks, CPU fp32 (median of timed updates)")
    fig.tight_layout()
    fig.savefig(RESULTS / "learner.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--model", default="tiny:", help="tiny:, small: or a model directory")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "ROWS", "LENGTH", "RESPONSE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, *sizes = args.memory_child
        print(json.dumps(memory_child(variant, *map(int, sizes))))
        return

    from empg_rllib.core import precision
    from empg_rllib.workflows import models
    from empg_rllib.workflows.library_logs import quiet_libraries
    from empg_rllib.workflows.session import ray_session

    quiet_libraries()

    model_path = str(models.resolve_model(args.model))
    results: dict[str, Any] = {"model": args.model, "cpu_bf16": precision.cpu_bf16_flags(), "dtype": "float32"}
    if "memory" in args.parts:
        results["memory"] = memory()
    with ray_session():
        if "overhead" in args.parts:
            results["overhead"] = overhead(model_path, args.repeats, args.rows)
        if "lora" in args.parts:
            results["lora"] = lora(model_path, args.repeats, args.rows)
        if "backends" in args.parts:
            results["backends"] = backends(model_path, args.repeats, args.rows)
    path = write("learner", results)
    plot(results)
    print(f"wrote {path} and {RESULTS / 'learner.png'}")


if __name__ == "__main__":
    main()
