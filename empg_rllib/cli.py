"""The `empg` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_make_model(args: argparse.Namespace) -> int:
    from empg_rllib.models import make_model

    _quiet_libraries()
    started = time.perf_counter()
    path = make_model(args.size, args.out, seed=args.seed, corpus_envs=args.corpus_envs)
    print(f"built {args.size} model (seed {args.seed}) in {time.perf_counter() - started:.1f}s -> {path}")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:  # noqa: ARG001 - uniform handler signature
    import envs

    for env_id in envs.list():
        print(env_id)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny model and play episodes with it and with the expert; print a summary."""
    from rich.console import Console
    from rich.table import Table

    import envs
    from empg_rllib import models
    from empg_rllib.inference.base import SamplingParams
    from empg_rllib.inference.hf import HFEngine
    from empg_rllib.prompting import PromptConfig
    from empg_rllib.rollout import EpisodeRequest, RolloutStats, run_episodes

    _quiet_libraries()
    console = Console()
    started = time.perf_counter()
    with console.status(f"building the offline model {args.model!r}"):
        path = models.resolve_model(args.model)
    console.print(f"model: {path} ({time.perf_counter() - started:.1f}s)")
    tokenizer, model = models.load(str(path))
    engine = HFEngine(model, tokenizer, seed=args.seed)
    table = Table(title=f"{args.episodes} episodes per env, seed {args.seed}")
    for column in ("env", "policy", "success", "mean turns", "invalid actions", "tokens/s", "env steps/s"):
        table.add_column(column)
    for env_id in args.env:
        env_config = {"split": args.split, "max_turns": args.max_turns}
        requests = [EpisodeRequest(seed=args.seed + i) for i in range(args.episodes)]
        stats = RolloutStats()
        with console.status(f"{env_id}: sampling {args.episodes} episodes with the tiny model"):
            episodes = run_episodes(
                engine,
                tokenizer,
                lambda: envs.make(env_id, **env_config),
                requests,
                SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed),
                PromptConfig(history_turns=2),
                stats=stats,
            )
        turns = [t for e in episodes for t in e.turns]
        table.add_row(
            env_id,
            "tiny model (untrained)",
            f"{sum(e.won for e in episodes)}/{len(episodes)}",
            f"{len(turns) / max(len(episodes), 1):.1f}",
            f"{sum(t.invalid_action for t in turns) / max(len(turns), 1):.0%}",
            f"{stats.generated_tokens / max(stats.engine_seconds, 1e-9):.0f}",
            f"{stats.env_steps / max(stats.wall_seconds, 1e-9):.1f}",
        )
        expert_wins, expert_turns = 0, 0
        env = envs.make(env_id, **env_config)
        for request in requests:
            _, info = env.reset(seed=request.seed)
            done = False
            while not done:
                _, _, terminated, truncated, info = env.step(envs.expert_action(env))
                expert_turns += 1
                done = terminated or truncated
            expert_wins += bool(info["won"])
        env.close()
        table.add_row(
            env_id, "expert", f"{expert_wins}/{len(requests)}", f"{expert_turns / len(requests):.1f}", "0%", "-", "-"
        )
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - started:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="empg", description="EMPG for long-horizon LLM agents on Ray RLlib")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="build an offline tokenizer + Qwen2 model")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--corpus-envs",
        nargs="*",
        default=["alfworld", "webshop", "deepsearch"],
        help="environments whose expert episodes train the tokenizer",
    )
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("envs", help="list the registered environment ids")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("demo", help="the embedded default: tiny model on the text environments")
    p.add_argument("--model", default="tiny:")
    p.add_argument("--env", nargs="+", default=["alfworld"])
    p.add_argument("--split", default="train")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
