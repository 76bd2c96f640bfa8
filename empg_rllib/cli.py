"""The `empg` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from empg_rllib.workflows.library_logs import quiet_libraries

DEMO_EXPERIMENT = Path(__file__).resolve().parent / "tuned_examples" / "demo.yaml"


def cmd_make_model(args: argparse.Namespace) -> int:
    from empg_rllib.workflows.models import make_model

    quiet_libraries()
    started = time.perf_counter()
    path = make_model(args.size, args.out, seed=args.seed, corpus_envs=args.corpus_envs)
    print(f"built {args.size} model (seed {args.seed}) in {time.perf_counter() - started:.1f}s -> {path}")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:  # noqa: ARG001 - uniform handler signature
    import empg_envs

    for env_id in empg_envs.list():
        print(env_id)
    return 0


def _console():
    from rich.console import Console

    return Console()


def _load_experiment(path: str, overrides: list[str]):
    from empg_rllib.config.loading import load
    from empg_rllib.config.schema import ConfigError

    try:
        return load(path, overrides)
    except ConfigError as err:
        raise SystemExit(f"empg: {path}: {err}") from None


def _start_run(run_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Before any work: refuse to mix with an earlier run, or delete it (`overwrite`); returns
    what was deleted."""
    from empg_rllib.workflows.runs import check_run_dir, clear_run_dir

    if overwrite:
        return clear_run_dir(run_dir)
    try:
        check_run_dir(run_dir, resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"empg: {err}") from None
    return []


def _run_sft(display, exp, out: str | os.PathLike) -> dict[str, Any]:
    from empg_rllib.workflows.sft import run_sft

    with display.phase(f"SFT: collecting {exp.sft.episodes} expert episodes"):
        return run_sft(exp, out, log=display.sft_logger(exp.sft.epochs, exp.sft.heldout_episodes))


def _ray_address(args: argparse.Namespace) -> str | None:
    """The cluster to join: --address, else $RAY_ADDRESS; None starts a local Ray. --address is
    written into $RAY_ADDRESS, which Ray's own clients read before any argument. A dashboard
    address (http://127.0.0.1:8265 through `ray dashboard`) only serves --dry-run, which reads
    the nodes through it."""
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
    from empg_rllib.config.resources import fit_plan, plan_of
    from empg_rllib.workflows.cluster import nodes_to_check

    plan = plan_of(exp)
    print("\n".join(plan.lines()))
    try:
        target = nodes_to_check(_ray_address(args), args.cluster_yaml)
    except ValueError as err:
        raise SystemExit(f"empg: {args.cluster_yaml}: {err}") from None
    if target is None:
        print("not checked against a cluster: give --address (or set RAY_ADDRESS) or --cluster-yaml")
        return 0
    nodes, names, where = target
    problems = fit_plan(plan, nodes, names)
    if problems:
        print(f"does NOT fit {where}:")
        print("\n".join(f"  - {problem}" for problem in problems))
        return 1
    print(f"fits {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from empg_rllib.sampling.progress import TerminalProgress
    from empg_rllib.workflows import models
    from empg_rllib.workflows.cluster import NodePathError
    from empg_rllib.workflows.runs import RAY_LOGS, SFT_MODEL
    from empg_rllib.workflows.session import ray_session
    from empg_rllib.workflows.sft import describe, warm_start
    from empg_rllib.workflows.training import train

    exp = _load_experiment(args.experiment, args.set)
    if args.dry_run:
        return _dry_run(args, exp)
    address = _ray_address(args)
    run_dir = exp.directory
    removed = _start_run(run_dir, args.resume, args.overwrite)
    quiet_libraries()
    console = _console()
    if removed:
        console.print(f"starting over: deleted {', '.join(removed)} from {run_dir}")
    with TerminalProgress(console) as display:
        with display.phase(f"loading the model {exp.model!r}"):
            base_model = str(models.resolve_model(exp.model))
        model_path = warm_start(exp, base_model, run_dir / SFT_MODEL,
                                lambda e, out: console.print(describe(e, _run_sft(display, e, out))))
        if model_path != base_model:
            console.print(f"warm start: {model_path}")
        logs = run_dir / RAY_LOGS
        with display.phase("starting Ray, env runners and learners"), ray_session(address=address, logs_to=logs):
            try:
                summary = train(
                    exp,
                    model_path,
                    resume=args.resume,
                    on_iteration=display.iteration_printer(exp.iterations),
                    on_sampling=display.sampling,
                )
            except NodePathError as err:
                raise SystemExit(f"empg: {err}") from None
    console.print(f"checkpoint: {summary['checkpoint']}  (TensorBoard: {exp.run_dir}/{exp.name}/tensorboard)")
    console.print(_ray_logs_line(address, logs))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from empg_rllib.sampling.progress import TerminalProgress, evaluation_table
    from empg_rllib.workflows.cluster import NodePathError
    from empg_rllib.workflows.runs import RAY_LOGS
    from empg_rllib.workflows.session import ray_session
    from empg_rllib.workflows.training import evaluate

    address = _ray_address(args)
    quiet_libraries()
    console = _console()
    logs = Path(args.checkpoint).resolve().parent / RAY_LOGS
    with TerminalProgress(console) as display, display.phase("loading the checkpoint"):
        with ray_session(address=address, logs_to=logs):
            try:
                results = evaluate(args.checkpoint, args.split, args.episodes, seed=args.seed, on_sampling=display.sampling)
            except NodePathError as err:
                raise SystemExit(f"empg: {err}") from None
    console.print(evaluation_table(f"{args.checkpoint}", {"checkpoint": results}))
    console.print(_ray_logs_line(address, logs))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from empg_rllib.sampling.progress import TerminalProgress
    from empg_rllib.workflows.runs import SFT_MODEL
    from empg_rllib.workflows.sft import describe

    exp = _load_experiment(args.experiment, args.set)
    quiet_libraries()
    console = _console()
    out = args.out or exp.directory / SFT_MODEL
    with TerminalProgress(console) as display:
        console.print(describe(exp, _run_sft(display, exp, out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: tiny model -> SFT warm start -> EMPG RL -> evaluation, one table
    (any experiment file: a pretrained model without `warm_start: sft` starts zero-shot)."""
    from empg_rllib.sampling.progress import TerminalProgress, evaluation_table
    from empg_rllib.workflows.demo import SUMMARY_FILE, run_demo, start_label
    from empg_rllib.workflows.runs import RAY_LOGS

    exp = _load_experiment(args.experiment, args.set)
    address = _ray_address(args)
    quiet_libraries()
    console = _console()
    console.rule(f"empg demo: {exp.name} ({exp.env}, seed {exp.seed})")
    with TerminalProgress(console) as display:
        report = run_demo(exp, display, console.print, display.iteration_printer(exp.iterations), address)
    run_dir = exp.directory
    start = start_label(exp)
    results = {start: report["before_rl"], f"{start} + RL": report["after_rl"]}
    console.print(evaluation_table(f"{exp.env}: success {start} vs after RL (seed {exp.seed})", results))
    for split, g in report["gain"].items():
        console.print(
            f"RL's gain over {start} on {split}: {g['gain']:+.1%} ± {g['se']:.1%} (binomial standard error; "
            f"{g['gain'] / g['se']:+.1f} SE)" if g["se"] else f"RL's gain over {start} on {split}: {g['gain']:+.1%}"
        )
    console.print(f"demo finished in {report['wall_s']:.0f}s ({_time_line(report['time_s'])}); TensorBoard logs: "
                  f"{run_dir / 'tensorboard'}; summary: {run_dir / SUMMARY_FILE}")
    console.print(_ray_logs_line(address, run_dir / RAY_LOGS))
    return 0


def _time_line(split: dict[str, float]) -> str:
    """The demo's time by phase, RL by part, in a few words."""
    def phase(prefix: str) -> float:
        return sum(v for k, v in split.items() if k.startswith(prefix))

    rl = ", ".join(f"{part} {split[f'rl/{part}']:.0f}s" for part in ("sampling", "scoring", "update"))
    sft = f"SFT {phase('sft_'):.0f}s, " if "sft_train" in split else ""
    return f"{sft}evaluations before and after RL {phase('evaluation_'):.0f}s, RL {phase('rl/'):.0f}s: {rl}"


def cmd_sweep(args: argparse.Namespace) -> int:
    """A Ray Tune sweep of a sweep file: every trial validated first, then a results table, a
    CSV and the best trial as an experiment file for `empg train`."""
    from empg_rllib.config.schema import ConfigError
    from empg_rllib.experiments import sweep as sweeps
    from empg_rllib.workflows.runs import RAY_LOGS
    from empg_rllib.workflows.session import ray_session

    try:
        spec = sweeps.prepare(args.sweep, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"empg: {args.sweep}: {err}") from None
    address = _ray_address(args)
    quiet_libraries()
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
    from empg_rllib.config.schema import ConfigError
    from empg_rllib.experiments import compare
    from empg_rllib.sampling.progress import TerminalProgress
    from empg_rllib.workflows.runs import RAY_LOGS
    from empg_rllib.workflows.session import ray_session

    try:
        comparison = compare.load(args.compare)
    except ConfigError as err:
        raise SystemExit(f"empg: {args.compare}: {err}") from None
    address = _ray_address(args)
    quiet_libraries()
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
    from empg_rllib.experiments.report import ReportError, write_report

    try:
        report = write_report(args.runs, args.out)
    except ReportError as err:
        raise SystemExit(f"empg report: {err}") from None
    print(f"report: {report} (figures beside it)")
    return 0


def _calibration_setup(args: argparse.Namespace):
    """What calibrate plays: a checkpoint's experiment and weights, or the file's (default: the
    demo's) with --model, --env and --set and its model; every split, key, path and
    --episodes checked before any episode."""
    from empg_rllib.config.loading import apply_overrides, experiment_path, read_yaml, validate, with_values
    from empg_rllib.config.schema import ConfigError
    from empg_rllib.experiments.calibrate import CalibrationError, Source, check_episodes, checkpoint_sources
    from empg_rllib.workflows import models

    if args.checkpoint and (args.experiment or args.model or args.env):
        raise SystemExit("empg calibrate: --checkpoint plays the checkpoint's own experiment; give no experiment "
                         "file, --model or --env with it (--set still applies)")
    try:
        sources = None
        if args.checkpoint:
            exp, sources = checkpoint_sources(args.checkpoint)
            data = exp.model_dump()
        else:
            data = read_yaml(experiment_path(args.experiment or str(DEMO_EXPERIMENT)))
        # Strings as given (not parsed as YAML values: "tiny:" would be a mapping).
        data = with_values(data, {key: value for key, value in (("model", args.model), ("env", args.env)) if value})
        # The run's own files (vllm.log) go to the output folder, not the experiment's run directory.
        data = with_values(data, {"run_dir": str(Path(args.out).resolve())})
        # As an evaluation split, the schema checks the split against the environment.
        exp = validate(apply_overrides(data, [*args.set, f"evaluation.splits=[{args.split}]"]))
        check_episodes(exp, args.episodes)
        if sources is None:
            quiet_libraries()
            sources = [Source(exp.model, str(models.resolve_model(exp.model)))]
    except (ConfigError, CalibrationError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"empg calibrate: {err}") from None
    return exp, sources


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Play episodes without training and say whether step entropy flags failure (calibrate.py)."""
    from empg_rllib.experiments import calibrate
    from empg_rllib.sampling.progress import TerminalProgress
    from empg_rllib.workflows.session import ray_session

    exp, sources = _calibration_setup(args)
    address = _ray_address(args)
    quiet_libraries()
    console = _console()
    out = Path(args.out)
    with TerminalProgress(console) as display:
        with display.phase(f"calibrating {len(sources)} set(s) on {args.episodes} episodes of {exp.env} ({args.split})"), \
                ray_session(address=address, logs_to=out / "ray_logs"):
            sets = calibrate.collect(exp, sources, args.split, args.episodes, args.seed, on_sampling=display.sampling)
    from rich.table import Table

    markdown, results = calibrate.write(exp, args.split, sets, out)
    table = Table(title=f"Does step entropy flag failure? {exp.env} ({args.split}), AUROC [{calibrate.INTERVAL:.0%} interval]")
    for column in ("set", "episodes", "success", "step AUROC", "trajectory AUROC", "verdict"):
        table.add_column(column)
    for r in results:
        table.add_row(r["label"], str(r["episodes"]), f"{r['success_rate']:.0%}", calibrate.interval(r["step_auroc"]),
                      calibrate.interval(r["trajectory_auroc"]), r["verdict"]["label"])
    console.print(table)
    console.print(results[-1]["verdict"]["text"])
    console.print(f"calibration: {markdown} (calibration.json and calibration.png beside it)")
    return 0


def cmd_serve_env(args: argparse.Namespace) -> int:
    """Serve a registered environment over HTTP (envs/remote) until Ctrl-C or SIGTERM."""
    import secrets
    import signal

    from empg_envs import EnvError
    from empg_envs.remote import PREFIX, TOKEN_ENV
    from empg_envs.remote.server import EnvServer, Episodes
    from empg_rllib.config.loading import apply_overrides
    from empg_rllib.config.schema import ConfigError

    given = os.environ.get(TOKEN_ENV)
    token = given or secrets.token_urlsafe(32)
    try:
        episodes = Episodes(args.env_id, apply_overrides({}, args.set), token, max_turns=args.max_turns,
                            idle_timeout_s=args.idle_timeout, max_episodes=args.max_episodes)
        server = EnvServer(episodes, args.host, args.port)
    except (ConfigError, EnvError, ValueError, OSError) as err:
        raise SystemExit(f"empg serve-env: {err}") from None
    print(f"serving {args.env_id} at {server.url}{PREFIX}/ (protocol: docs/agents.md); Ctrl-C stops it")
    if given:
        print(f"bearer token: ${TOKEN_ENV}")
    else:
        # Printed once, for the runners' environment; never written into a file of the project.
        print(f"bearer token (set it as {TOKEN_ENV} where the runners run): {token}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: plain HTTP beyond this machine: the token crosses the network in clear; keep the "
              "server on a private network or behind TLS")
    url = server.url if args.host not in ("0.0.0.0", "::") else f"http://<this host>:{args.port}"
    print(f"experiment: env: http, env_config: {{url: {url}}}", flush=True)
    # SIGTERM (docker stop, systemd) ends it as Ctrl-C does: every open episode closed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.episodes.close_all()
    return 0


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="join the running Ray cluster at this GCS address (head:6379) instead of starting a local "
        "Ray; default: $RAY_ADDRESS, which `ray job submit` sets",
    )


def build_parser() -> argparse.ArgumentParser:
    from empg_rllib.config.schema import CALIBRATION_SEED, EVAL_SEED

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
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="task seed of the first episode")
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
    p.add_argument("sweep", help="a sweep file: base experiment, search space, metric (docs/architecture.md: Sweeps)")
    _address_argument(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    start.add_argument("--overwrite", action="store_true", help="start over: delete the sweep's earlier directory")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="GRPO vs DAPO, with and without EMPG, x seeds (tuned_examples/compare/*.yaml)")
    p.add_argument("compare", help="a compare file: base experiment, arms, seeds (docs/results.md)")
    _address_argument(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "calibrate", help="before training: does the model's step entropy flag failed steps (EMPG's premise)?"
    )
    p.add_argument("experiment", nargs="?", help="an experiment file (default: the demo's); its model, env, "
                   "prompt, decoding and EMPG settings")
    p.add_argument("--model", help="a model spec (tiny:, smollm2:, a model directory, a .gguf file)")
    p.add_argument("--env", help="a registered environment id (`empg envs`); its settings: --set env_config.KEY=VALUE")
    p.add_argument("--checkpoint", nargs="+", metavar="PATH",
                   help="checkpoints, or a run directory (all its checkpoints): how calibration moves in training")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (dotted for sections)")
    p.add_argument("--split", default="train", help="the environment split to play (default: train)")
    p.add_argument("--episodes", type=int, default=64, help="a multiple of group_size (default: 64)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed of the tasks drawn")
    p.add_argument("--out", default="calibration", help="output folder (default: calibration/)")
    _address_argument(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve-env", help="serve a registered environment over HTTP (env id `http` plays it)")
    p.add_argument("env_id", help="a registered environment id (`empg envs`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an env_config key")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--max-turns", type=int, default=200, help="the longest episode a client may ask for")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="close an episode, or an environment kept for the next one, idle this many seconds")
    p.add_argument("--max-episodes", type=int, default=256, help="environments at once, open episodes and kept ones")
    p.set_defaults(func=cmd_serve_env)

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
