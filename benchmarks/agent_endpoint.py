"""The chat endpoint's cost per call: the same prompts sampled by the engine called directly and
through the endpoint with the real `openai` client, on the tiny model (HF engine, CPU).

Two settings: one agent calling in turn (a batch of one each time: the overhead is HTTP, JSON, the
chat template and the batching thread's hand-off), and `--concurrent` agents calling at once
against the engine's batched call of as many prompts. Each call samples `--tokens` tokens
at most (no stop string), with a seed drawn from its number, so both sides generate the same
tokens; the benchmark checks that on the text the agent reads. Medians over `--repeats`, both sides of each ratio in the same repeat, in
alternating order.

Writes benchmarks/results/agent_endpoint.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import paired_bars, write  # noqa: E402

TOKEN = "benchmark-endpoint-token-0123456789"
TEMPERATURE = 1.0


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are an agent in a text household."},
            {"role": "user", "content": f"Task {i}: put a clean mug in the coffee machine. You are in the kitchen."}]


def measure(engine: Any, tokenizer: Any, calls: int, concurrent: int, tokens: int, repeats: int) -> dict[str, Any]:
    import openai

    from empg_rllib.sampling.agents.endpoint import ChatEndpoint
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.prompting import chat_ids

    # `stop=()` and a token cap the tiny model's EOS may still end early: both sides see the same
    # seeds, so they end at the same token.
    params = SamplingParams(max_new_tokens=tokens, temperature=TEMPERATURE, stop=())
    rounds = calls // concurrent
    endpoint = ChatEndpoint(engine, tokenizer, TOKEN, temperature=TEMPERATURE, max_new_tokens=tokens, batch_wait_s=0.05)
    endpoint.start()
    names = [f"bench{k}" for k in range(concurrent)]
    clients = [openai.OpenAI(base_url=endpoint.open_episode(n), api_key=TOKEN, max_retries=0) for n in names]

    def direct() -> list[str]:
        out = []
        for r in range(rounds):
            batch = range(r * concurrent, (r + 1) * concurrent)
            prompts = [chat_ids(tokenizer, messages(i)) for i in batch]
            seeds = [endpoint.call_seed(names[k], r) for k in range(concurrent)]
            out += [endpoint.content(c, ()) for c in engine.generate(prompts, params, seeds=seeds)]
        return out

    def served() -> list[list[int]]:
        answers: dict[int, str] = {}

        def agent(k: int) -> None:
            for r in range(rounds):
                i = r * concurrent + k
                reply = clients[k].chat.completions.create(model="policy", messages=messages(i), max_tokens=tokens)
                answers[i] = reply.choices[0].message.content

        threads = [threading.Thread(target=agent, args=(k,)) for k in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [answers[i] for i in range(rounds * concurrent)]

    times: dict[str, list[float]] = {"direct": [], "endpoint": []}
    same = True
    try:
        for repeat in range(repeats + 1):  # the first is a warm-up, not counted
            for name in (("direct", "endpoint") if repeat % 2 else ("endpoint", "direct")):
                for n in names:  # each repeat starts every episode's call count at 0
                    endpoint.close_episode(n)
                    endpoint.open_episode(n)
                t0 = time.perf_counter()
                result = direct() if name == "direct" else served()
                if repeat:
                    times[name].append(time.perf_counter() - t0)
                if name == "direct":
                    expected = result  # what the agent would read: the endpoint's own rendering
                else:
                    got = result
            same = same and got == expected
    finally:
        endpoint.close()
    per_call = {k: statistics.median(v) / (rounds * concurrent) * 1000 for k, v in times.items()}
    ratios = [e / d for e, d in zip(times["endpoint"], times["direct"])]
    row = {
        "concurrent": concurrent, "calls": rounds * concurrent, "tokens_per_call": tokens, "repeats": repeats,
        "direct_ms_per_call": per_call["direct"], "endpoint_ms_per_call": per_call["endpoint"],
        "endpoint_over_direct": statistics.median(ratios),
        "overhead_share_of_call": 1 - 1 / statistics.median(ratios),
        "same_tokens": same, "runs_s": times,
    }
    print(f"{concurrent} at once: direct {row['direct_ms_per_call']:.1f} ms/call, endpoint "
          f"{row['endpoint_ms_per_call']:.1f} ({row['endpoint_over_direct']:.3f}x, overhead "
          f"{row['overhead_share_of_call']:.1%} of a call); same tokens: {same}", flush=True)
    return row


def plot(rows: list[dict[str, Any]]) -> None:
    paired_bars(
        "agent_endpoint", [f"{r['concurrent']} agent(s) at once" for r in rows],
        {"engine called directly": [r["direct_ms_per_call"] for r in rows],
         "through the endpoint (openai client)": [r["endpoint_ms_per_call"] for r in rows]},
        [f"+{r['overhead_share_of_call']:.1%}" for r in rows],
        f"ms per call ({rows[0]['tokens_per_call']} tokens, tiny model, median)",
        "The chat endpoint against the engine called directly",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--concurrent", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from empg_rllib.sampling.engines.hf import HFEngine
    from empg_rllib.workflows import models

    tokenizer, model = models.load("tiny:")
    engine = HFEngine(model, tokenizer, seed=0)
    rows = [measure(engine, tokenizer, args.calls, c, args.tokens, args.repeats) for c in args.concurrent]
    path = write("agent_endpoint", {"model": "tiny:", "engine": "hf", "rows": rows})
    plot(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
