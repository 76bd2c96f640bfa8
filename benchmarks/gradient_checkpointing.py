"""Peak memory and time of one learner forward + backward, with and without `gradient_checkpointing`.

Writes benchmarks/results/gradient_checkpointing.json. The module is the learner's
(`LLMRLModule` with the experiment key's model_config, fp32, train mode) and the loss the
learner's policy loss over the response tokens of random rows of `--sizes` (rows x tokens, a
32-token response each).

Each measurement is one forward + backward in a fresh process, the two variants interleaved for
`--repeats` rounds; figures are medians. Memory is resident memory (RSS) above what the process
held before the forward pass: `peak` is the high-water mark over forward and backward (Linux's
VmHWM, reset just before the forward pass; elsewhere ru_maxrss), `held_after_forward` what the
autograd graph keeps until the backward pass. The children run with glibc's mmap threshold
fixed at 128 KiB, so that every tensor above it is mapped and unmapped on its own and RSS
follows the live tensors instead of the allocator's cached heap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu, write  # noqa: E402

RESPONSE = 32
VARIANTS = {"plain": False, "checkpointed": True}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(model: str, checkpointing: bool, rows: int, tokens: int) -> dict[str, Any]:
    """One forward + backward in this fresh process."""
    import gc

    import torch

    from empg_rllib.algorithm.rl_module import LLMRLModule
    from empg_rllib.core.losses import policy_loss
    from empg_rllib.workflows import models

    path = str(models.resolve_model(model))
    module = LLMRLModule(
        observation_space=None,
        action_space=None,
        inference_only=False,
        model_config={"path": path, "dtype": "float32", "gradient_checkpointing": checkpointing},
    )
    module.train()
    assert module.lm.is_gradient_checkpointing == checkpointing
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, module.lm.config.vocab_size, (rows, tokens), generator=g)
    resp = torch.zeros(rows, tokens - 1)
    resp[:, -RESPONSE:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "resp_mask": resp}
    advantages = torch.randn(resp.shape, generator=g) * resp
    gc.collect()

    before_kb = _status_kb("VmRSS")
    hwm = _reset_peak() and before_kb is not None
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    logp = module._forward_train(batch)["token_logp"]
    loss, _ = policy_loss(logp, logp.detach(), advantages, resp, aggregation="token_mean")
    forward_s = time.perf_counter() - started
    after_forward_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    loss.backward()
    backward_s = time.perf_counter() - started
    if hwm:
        peak_mb = (_status_kb("VmHWM") - before_kb) / 1024
    else:  # a high-water mark since the process started: only rises above it count
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss) / 1024
    return {
        "peak_above_start_mb": peak_mb,
        "held_after_forward_mb": (after_forward_kb - before_kb) / 1024 if after_forward_kb and before_kb else None,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "peak_measure": "VmHWM" if hwm else "ru_maxrss",
    }


def measure(model: str, variant: str, rows: int, tokens: int) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", model, variant, str(rows), str(tokens)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"child {variant} {rows}x{tokens} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:", help="tiny:, small: or a model directory")
    parser.add_argument("--sizes", nargs="+", default=["4x512", "8x1024"], help="ROWSxTOKENS per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "VARIANT", "ROWS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, variant, rows, tokens = args.child
        print(json.dumps(child(model, VARIANTS[variant], int(rows), int(tokens))))
        return

    from empg_rllib.workflows import models

    models.resolve_model(args.model)  # build it once, outside the measurements
    results: dict[str, Any] = {
        "model": args.model,
        "cpu_model": cpu()["model"],
        "dtype": "float32",
        "response_tokens_per_row": RESPONSE,
        "repeats": args.repeats,
        "sizes": [],
    }
    for size in args.sizes:
        rows, tokens = map(int, size.lower().split("x"))
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                runs[variant].append(measure(args.model, variant, rows, tokens))
        entry: dict[str, Any] = {"rows": rows, "tokens_per_row": tokens}
        for variant, measured in runs.items():
            entry[variant] = {
                key: statistics.median(m[key] for m in measured)
                for key in ("peak_above_start_mb", "held_after_forward_mb", "forward_s", "backward_s")
            }
            entry[variant]["peak_above_start_mb_runs"] = [round(m["peak_above_start_mb"], 1) for m in measured]
            entry[variant]["peak_measure"] = measured[0]["peak_measure"]
        plain, ckpt = entry["plain"], entry["checkpointed"]
        entry["peak_ratio_checkpointed_to_plain"] = ckpt["peak_above_start_mb"] / plain["peak_above_start_mb"]
        entry["time_ratio_checkpointed_to_plain"] = (ckpt["forward_s"] + ckpt["backward_s"]) / (
            plain["forward_s"] + plain["backward_s"]
        )
        results["sizes"].append(entry)
        print(
            f"{rows}x{tokens}: peak {plain['peak_above_start_mb']:.0f} MB plain, {ckpt['peak_above_start_mb']:.0f} MB "
            f"checkpointed ({entry['peak_ratio_checkpointed_to_plain']:.2f}x); held after forward "
            f"{plain['held_after_forward_mb']:.0f} vs {ckpt['held_after_forward_mb']:.0f} MB; forward + backward "
            f"{plain['forward_s'] + plain['backward_s']:.1f} s vs {ckpt['forward_s'] + ckpt['backward_s']:.1f} s"
        )
    path = write("gradient_checkpointing", results)
    print(f"wrote {path} ({results['cpu_model']})")


if __name__ == "__main__":
    main()
