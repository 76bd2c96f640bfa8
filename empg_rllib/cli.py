"""The `empg` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

DEMO_EXPERIMENT = Path(__file__).resolve().parent / "tuned_examples" / "demo.yaml"


#: Lines libraries log on every run that say nothing about it: (logger, start of the message).
_LIBRARY_NOISE = (
    # The new API stack is the only one this project has.
    ("ray.rllib.algorithms.algorithm_config", "You are running "),
    # RLlib 2.60's RLModule.__init__ builds the deprecated RLModuleConfig itself (kept for old
    # custom modules), so every RLModule warns, however it is constructed (ray-project/ray#51630);
    # ours are built by RLModuleSpec.build with the keyword arguments the warning asks for.
    ("ray._common.deprecation", "DeprecationWarning: `RLModule(config=[RLModuleConfig object])`"),
    # Tune's system monitor asks for GPUtil; the CPU and RAM metrics it logs need only psutil.
    ("ray.tune.utils.util", "Install gputil"),
    # Saving a transformers model imports DeepSpeed (accelerate unwraps the model), which
    # announces that it found no GPU.
    ("DeepSpeed", "Setting accelerator to CPU"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's INFO lines (a dozen per engine start, one per weight reload) would bury the live
    # progress; its engine processes read this when they start.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name, prefix in _LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


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


def _console():
    from rich.console import Console

    return Console()


def _load_experiment(path: str, overrides: list[str]):
    from empg_rllib.experiment import ConfigError, load

    try:
        return load(path, overrides)
    except ConfigError as err:
        raise SystemExit(f"empg: {path}: {err}") from None


def _progress_printer(display, exp):
    from empg_rllib.training import SUMMARY_KEYS

    def show(iteration: int, scalars: dict[str, float]) -> None:
        display.clear()
        parts = [f"[bold]iter {iteration}/{exp.iterations}[/bold]"]
        for label, key in SUMMARY_KEYS.items():
            if key in scalars:
                value = scalars[key]
                parts.append(f"{label} {value:.3g}" if abs(value) < 1000 else f"{label} {value:.0f}")
        for key, value in scalars.items():
            if key.startswith("evaluation/") and key.endswith("/success_rate"):
                parts.append(f"eval {key.split('/')[1]} {value:.3g}")
        display.console.print("  ".join(parts))

    return show


def _start_run(run_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Before any work: refuse to mix with an earlier run, or delete it (`overwrite`); returns
    what was deleted."""
    from empg_rllib.training import check_run_dir, clear_run_dir

    if overwrite:
        return clear_run_dir(run_dir)
    try:
        check_run_dir(run_dir, resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"empg: {err}") from None
    return []


def _run_sft(display, exp, out: str | os.PathLike) -> dict[str, Any]:
    from empg_rllib.sft import run_sft

    with display.phase(f"SFT: collecting {exp.sft.episodes} expert episodes"):
        return run_sft(exp, out, log=display.sft_logger(exp.sft.epochs, exp.sft.heldout_episodes))


def _ray_address(args: argparse.Namespace) -> str | None:
    """The cluster to join: --address, else $RAY_ADDRESS; None starts a local Ray. --address is
    written into $RAY_ADDRESS, which Ray's own clients read before any argument. A dashboard
    address (http://head:8265) only serves --dry-run, which reads the nodes through it."""
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address
    address = os.environ.get("RAY_ADDRESS") or None
    if address and "://" in address and not getattr(args, "dry_run", False):
        raise SystemExit(
            f"empg: {address} is a dashboard or client address; empg {args.command} joins a cluster by its GCS "
            "address (head:6379). From outside the cluster, run it as a job: ray job submit --address "
            f"{address} -- empg {args.command} ..."
        )
    return address


def _ray_logs_line(address: str | None, logs: Path) -> str:
    if address:
        return "worker logs: in the driver's output above, and on each node in /tmp/ray/session_latest/logs"
    return f"worker logs: {logs}"


def _dry_run(args: argparse.Namespace, exp: Any) -> int:
    """Print the plan; check it against --cluster-yaml's node types or the cluster joined."""
    import yaml

    from empg_rllib.plan import fit_plan, nodes_of_cluster_config, plan_of

    plan = plan_of(exp)
    print("\n".join(plan.lines()))
    address = _ray_address(args)
    if args.cluster_yaml:
        config = yaml.safe_load(Path(args.cluster_yaml).read_text())
        try:
            nodes, names = nodes_of_cluster_config(config)
        except ValueError as err:
            raise SystemExit(f"empg: {args.cluster_yaml}: {err}") from None
        where = f"the node types of {args.cluster_yaml} (each up to its max_workers)"
    elif address:
        from empg_rllib.cluster import live_nodes

        nodes, names = live_nodes(address)
        where = f"the {len(nodes)} alive node(s) of the cluster at {address}"
    else:
        print("not checked against a cluster: give --address (or set RAY_ADDRESS) or --cluster-yaml")
        return 0
    problems = fit_plan(plan, nodes, names)
    if problems:
        print(f"does NOT fit {where}:")
        print("\n".join(f"  - {problem}" for problem in problems))
        return 1
    print(f"fits {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from empg_rllib import models
    from empg_rllib.cluster import NodePathError
    from empg_rllib.progress import TerminalProgress
    from empg_rllib.training import RAY_LOGS, ray_session, run_dir_of, train

    exp = _load_experiment(args.experiment, args.set)
    if args.dry_run:
        return _dry_run(args, exp)
    address = _ray_address(args)
    removed = _start_run(run_dir_of(exp), args.resume, args.overwrite)
    _quiet_libraries()
    console = _console()
    if removed:
        console.print(f"starting over: deleted {', '.join(removed)} from {run_dir_of(exp)}")
    with TerminalProgress(console) as display:
        with display.phase(f"loading the model {exp.model!r}"):
            model_path = str(models.resolve_model(exp.model))
        if exp.warm_start == "sft":
            sft_dir = run_dir_of(exp) / "sft_model"
            if not (sft_dir / "config.json").exists():
                console.print(_sft_line(exp, _run_sft(display, exp, sft_dir)))
            model_path = str(sft_dir)
            console.print(f"warm start: {model_path}")
        logs = run_dir_of(exp) / RAY_LOGS
        with display.phase("starting Ray, env runners and learners"), ray_session(address=address, logs_to=logs):
            try:
                summary = train(
                    exp,
                    model_path,
                    resume=args.resume,
                    on_iteration=_progress_printer(display, exp),
                    on_sampling=display.sampling,
                )
            except NodePathError as err:
                raise SystemExit(f"empg: {err}") from None
    console.print(f"checkpoint: {summary['checkpoint']}  (TensorBoard: {exp.run_dir}/{exp.name}/tensorboard)")
    console.print(_ray_logs_line(address, logs))
    return 0


def _results_table(title: str, rows: dict[str, dict[str, dict[str, float]]]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("policy", "split", "success", "score", "mean turns", "episodes"):
        table.add_column(column)
    for policy, splits in rows.items():
        for split, r in splits.items():
            table.add_row(
                policy,
                split,
                f"{r['success_rate']:.1%}",
                f"{r['score_mean']:.3f}",
                f"{r['episode_len_mean']:.1f}",
                f"{int(r['episodes'])}",
            )
    return table


def _gains(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per split: the success-rate gain from `before` to `after` and its binomial standard error."""
    from empg_rllib.report import success_gain

    return {split: dict(zip(("gain", "se"), success_gain(before[split], after[split]))) for split in before if split in after}


def cmd_eval(args: argparse.Namespace) -> int:
    from empg_rllib.cluster import NodePathError
    from empg_rllib.progress import TerminalProgress
    from empg_rllib.training import RAY_LOGS, evaluate, ray_session

    address = _ray_address(args)
    _quiet_libraries()
    console = _console()
    logs = Path(args.checkpoint).resolve().parent / RAY_LOGS
    with TerminalProgress(console) as display, display.phase("loading the checkpoint"):
        with ray_session(address=address, logs_to=logs):
            try:
                results = evaluate(args.checkpoint, args.split, args.episodes, seed=args.seed, on_sampling=display.sampling)
            except NodePathError as err:
                raise SystemExit(f"empg: {err}") from None
    console.print(_results_table(f"{args.checkpoint}", {"checkpoint": results}))
    console.print(_ray_logs_line(address, logs))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from empg_rllib.progress import TerminalProgress
    from empg_rllib.training import run_dir_of

    exp = _load_experiment(args.experiment, args.set)
    _quiet_libraries()
    console = _console()
    out = args.out or run_dir_of(exp) / "sft_model"
    with TerminalProgress(console) as display:
        console.print(_sft_line(exp, _run_sft(display, exp, out)))
    return 0


def _sft_line(exp: Any, summary: dict[str, Any]) -> str:
    """What an SFT run did, and the held-out probability of the expert's action per verb."""
    line = (
        f"SFT: {summary['demonstrations']} demonstration turns (expert success {summary['expert_success']:.0%}), "
        f"epoch losses {[round(x, 3) for x in summary['epoch_losses']]}, "
        f"{summary['collect_s']:.0f}s collecting + {summary['train_s']:.0f}s training -> {summary['model']}"
    )
    if probabilities := summary["heldout_action_probability"]:
        shown = ", ".join(f"{verb} {p:.2f}" for verb, p in probabilities.items())
        line += f"\n   P(expert action) on {exp.sft.heldout_episodes} {exp.sft.heldout_split} expert episodes: {shown}"
    return line


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: tiny model -> SFT warm start -> EMPG RL -> evaluation, one table."""
    import json

    from empg_rllib import models
    from empg_rllib.progress import TerminalProgress
    from empg_rllib.training import RAY_LOGS, evaluate, evaluate_model, ray_session, run_dir_of, train

    exp = _load_experiment(args.experiment, args.set)
    address = _ray_address(args)
    run_dir = run_dir_of(exp)
    # The demo is re-run as it is (`make demo`): it starts its own run over, and says so.
    removed = _start_run(run_dir, resume=False, overwrite=True)
    _quiet_libraries()
    console = _console()
    started = time.perf_counter()
    console.rule(f"empg demo: {exp.name} ({exp.env}, seed {exp.seed})")
    if removed:
        console.print(f"starting over: deleted the previous demo run's {', '.join(removed)} from {run_dir}")
    with TerminalProgress(console) as display:
        with display.phase(f"building the offline model {exp.model!r}"):
            base_model = str(models.resolve_model(exp.model))
        console.print(f"1. model {base_model} ({time.perf_counter() - started:.0f}s)")
        sft = _run_sft(display, exp, run_dir / "sft_model")
        console.print(f"2. {_sft_line(exp, sft)}")
        rl_exp = exp.model_copy(update={"model": sft["model"]})
        splits, episodes = exp.evaluation.splits, exp.evaluation.episodes
        with ray_session(address=address, logs_to=run_dir / RAY_LOGS):
            with display.phase("evaluating the SFT model"):
                sft_results = evaluate_model(rl_exp, sft["model"], splits, episodes, on_sampling=display.sampling)
            console.print(f"3. SFT-only evaluation done ({time.perf_counter() - started:.0f}s)")
            console.print(f"4. RL: {exp.iterations} iterations of {exp.loss.upper()}{' + EMPG' if exp.empg.enabled else ''}")
            with display.phase("building the algorithm"):
                summary = train(
                    rl_exp,
                    sft["model"],
                    on_iteration=_progress_printer(display, exp),
                    on_sampling=display.sampling,
                )
            with display.phase("evaluating the RL policy"):
                rl_results = evaluate(summary["checkpoint"], splits, episodes, on_sampling=display.sampling)
    elapsed = time.perf_counter() - started
    console.print(_results_table(f"{exp.env}: success after SFT vs after RL (seed {exp.seed})", {"SFT only": sft_results, "SFT + RL": rl_results}))
    gains = _gains(sft_results, rl_results)
    for split, g in gains.items():
        console.print(
            f"RL's gain over SFT on {split}: {g['gain']:+.1%} ± {g['se']:.1%} (binomial standard error; "
            f"{g['gain'] / g['se']:+.1f} SE)" if g["se"] else f"RL's gain over SFT on {split}: {g['gain']:+.1%}"
        )
    report = {
        "experiment": exp.model_dump(), "sft": sft, "sft_only": sft_results, "after_rl": rl_results, "gain": gains,
        "wall_s": elapsed, "checkpoint": summary["checkpoint"],
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(report, indent=2))
    console.print(f"demo finished in {elapsed:.0f}s; TensorBoard logs: {run_dir / 'tensorboard'}; summary: {run_dir / 'demo_summary.json'}")
    console.print(_ray_logs_line(address, run_dir / RAY_LOGS))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A Ray Tune sweep of a sweep file: every trial validated first, then a results table, a
    CSV and the best trial as an experiment file for `empg train`."""
    from empg_rllib import sweep as sweeps
    from empg_rllib.experiment import ConfigError
    from empg_rllib.training import RAY_LOGS, ray_session

    try:
        spec = sweeps.load(args.sweep)
        if args.overwrite:
            sweeps.clear_dir(spec)
        sweeps.check_dir(spec, args.resume)
        if not args.resume:
            sweeps.model_paths(spec)  # a missing model stops the sweep here, before Ray starts
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"empg: {args.sweep}: {err}") from None
    address = _ray_address(args)
    _quiet_libraries()
    console = _console()
    verb = "continuing" if args.resume else "running"
    console.print(f"sweep {spec.name}: {verb} {len(spec.trials)} trials in {spec.dir}")
    with ray_session(address=address, logs_to=spec.dir / RAY_LOGS):
        outcome = sweeps.run(spec, resume=args.resume)
    console.print(sweeps.results_table(spec, outcome.rows))
    console.print(f"results: {outcome.csv}  (TensorBoard: --logdir {spec.dir})")
    console.print(_ray_logs_line(address, spec.dir / RAY_LOGS))
    if outcome.unfinished:
        console.print(f"interrupted: {outcome.unfinished} trial(s) unfinished; continue with: empg sweep {args.sweep} --resume")
        return 1
    if outcome.best is None:
        console.print(f"no trial reported {spec.settings.metric}; no best trial")
        return 1
    trial, value = outcome.best
    console.print(f"best: {trial.name} ({spec.settings.metric} {value:.4g}) -> {outcome.best_yaml}")
    console.print(f"train it: empg train {outcome.best_yaml}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The paper's comparison on one environment (compare.py): arms x seeds one after another,
    finished runs kept, then a table of held-out success and the report's figures."""
    from empg_rllib import compare
    from empg_rllib.experiment import ConfigError
    from empg_rllib.progress import TerminalProgress
    from empg_rllib.training import RAY_LOGS, ray_session

    try:
        comparison = compare.load(args.compare)
    except ConfigError as err:
        raise SystemExit(f"empg: {args.compare}: {err}") from None
    address = _ray_address(args)
    _quiet_libraries()
    console = _console()
    arms, seeds = comparison.settings.arms, comparison.settings.seeds
    console.print(f"compare {comparison.name}: {len(arms)} arms x {len(seeds)} seeds on {comparison.base.env} in {comparison.dir}")
    started = time.perf_counter()
    sft = comparison.base.sft
    with TerminalProgress(console) as display, ray_session(address=address, logs_to=comparison.dir / RAY_LOGS):
        results = compare.run(
            comparison,
            log=console.print,
            on_sampling=display.sampling,
            sft_log=display.sft_logger(sft.epochs, sft.heldout_episodes),
        )
    table, report = compare.write_results(comparison, results)
    console.print(table.read_text())
    console.print(f"comparison finished in {time.perf_counter() - started:.0f}s; table: {table}; figures: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Figures and a markdown table comparing runs, from the logs they wrote (report.py)."""
    from empg_rllib.report import ReportError, write_report

    try:
        report = write_report(args.runs, args.out)
    except ReportError as err:
        raise SystemExit(f"empg report: {err}") from None
    print(f"report: {report} (figures beside it)")
    return 0


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="join the running Ray cluster at this GCS address (head:6379) instead of starting a local "
        "Ray; default: $RAY_ADDRESS, which `ray job submit` sets",
    )


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

    p = sub.add_parser("train", help="train with an experiment YAML")
    p.add_argument("experiment", help="a tuned_examples/*.yaml file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (dotted for sections)")
    _address_argument(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resource plan and check it against the cluster (--address / RAY_ADDRESS) or "
        "--cluster-yaml; starts nothing",
    )
    p.add_argument(
        "--cluster-yaml", metavar="FILE", help="with --dry-run: check against this `ray up` config's node types"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete the run directory's earlier checkpoints, history, TensorBoard logs and SFT model",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--split", nargs="+", default=["eval_unseen"])
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--seed", type=int, default=12345)
    _address_argument(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sft", help="behaviour cloning on expert demonstrations (warm start)")
    p.add_argument("experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output model directory (default: <run_dir>/<name>/sft_model)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("demo", help="the embedded default: tiny model, SFT, EMPG RL, evaluation")
    p.add_argument("experiment", nargs="?", default=str(DEMO_EXPERIMENT))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _address_argument(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="a Ray Tune sweep over experiment keys (tuned_examples/sweeps/*.yaml)")
    p.add_argument("sweep", help="a sweep file: base experiment, search space, metric (README: Sweeps)")
    _address_argument(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    start.add_argument("--overwrite", action="store_true", help="start over: delete the sweep's earlier directory")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="GRPO vs DAPO, with and without EMPG, x seeds (tuned_examples/compare/*.yaml)")
    p.add_argument("compare", help="a compare file: base experiment, arms, seeds (README: Results on a CPU)")
    _address_argument(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="figures and a markdown table comparing runs, from their TensorBoard logs")
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR",
        help="a run directory (run_dir/<name>), or a directory with runs below it (a sweep, runs/)",
    )
    p.add_argument("--out", default="report", help="output folder (default: report/ in the current directory)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
