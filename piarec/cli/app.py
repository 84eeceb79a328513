"""The ``piarec`` command: one argparse parser, parsed once (see :mod:`piarec.cli`).

Every command's options come from :mod:`piarec.cli.options`; each handler imports its heavy
modules (torch, pyspark, mlflow, the Spark jobs in ``pipelines/``) only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import piarec
from piarec.cli.errors import run_command
from piarec.cli.options import COMMANDS, Parser, add_command_parser, add_global_options, check_args

log = logging.getLogger("piarec")

DESCRIPTION = "Batch recommendations with Multi-VAE and Personalized Item Alignment."
EPILOG = ("Global options (--debug, --config) go before or after the command. Errors print one line "
          "and exit with status 2; --debug shows the traceback. Options of a command: piarec COMMAND --help.")


def _config(args: argparse.Namespace, overrides: dict | None = None):
    from piarec.config import load_config

    return load_config(args.config, tuned=_tuned(getattr(args, "tuned_config", None)), overrides=overrides)


def _tuned(uri: str | None):
    """The tuned configuration at ``uri`` (local or s3://), parsed and checked; None without one."""
    if not uri:
        return None
    from piarec.config import parse_tuned
    from piarec.data.storage import exists, read_bytes, resolve
    from piarec.errors import ConfigError

    loc = resolve(uri)
    if not exists(loc):
        raise ConfigError(f"tuned config {uri!r} does not exist")
    return parse_tuned(read_bytes(loc).decode(), uri)


# --------------------------------------------------------------------------- handlers
def cmd_generate_events(args: argparse.Namespace) -> int:
    from piarec.data.synthetic import generate_events

    summary = generate_events(args.out, users=args.users, items=args.items, days=args.days,
                              seed=args.seed, start=args.start, progress=log.info)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_build_matrix(args: argparse.Namespace) -> int:
    from pipelines import build_matrix

    return build_matrix.run_from_args(args)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)  # a bad config fails before torch and mlflow are imported
    if args.nproc_per_node and "WORLD_SIZE" not in os.environ:
        return _torchrun(args)
    from piarec.train.job import run_training

    if args.epochs:
        cfg.training.epochs = args.epochs
    out = run_training(cfg, args.snapshot, tuned_config=args.tuned_config)
    if "run_id" in out:  # rank 0 (the only one with one process)
        print(json.dumps({k: out[k] for k in ("run_id", "version", "best_epoch", "stop_reason", "val", "test")},
                         indent=2))
    return 0


def _torchrun(args: argparse.Namespace) -> int:
    """The same ``piarec train`` on ``--nproc-per-node`` processes of this machine under
    torchrun (each process takes a GPU when there are GPUs). Returns torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           "-m", "piarec", *(["--debug"] if args.debug else []), *(["--config", args.config] if args.config else []),
           "train", "--snapshot", args.snapshot, *(["--epochs", str(args.epochs)] if args.epochs else []),
           *(["--tuned-config", args.tuned_config] if args.tuned_config else [])]
    return subprocess.call(cmd)


def cmd_tune(args: argparse.Namespace) -> int:
    given = {"trials": args.trials, "timeout_s": args.timeout_s, "study_storage": args.study_storage,
             "study_name": args.study_name, "max_cost_ratio": args.max_cost_ratio}
    cfg = _config(args, {"tune": {k: v for k, v in given.items() if v is not None}})
    from piarec.train.tune import run_tuning

    out = run_tuning(cfg, args.snapshot, output=args.output)
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from piarec.registry.gate import promote

    decision = promote(cfg)
    print(decision.summary())
    return 0 if decision.promoted or not args.strict else 1


def cmd_report(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from piarec.registry.runs import report_run

    out = report_run(cfg, args.run, args.out, seed=args.seed)
    print(json.dumps({"out_dir": out["out_dir"], "collapse": out["collapse"],
                      "silhouette": out["tsne"]["silhouette"], "groups": out["groups"]}, indent=2, default=str))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipelines import score_users

    return score_users.run_from_args(args)


def cmd_ab_report(args: argparse.Namespace) -> int:
    from pipelines import ab_report

    return ab_report.run_from_args(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from piarec.demo import run_demo

    run_demo(args.workdir, users=args.users, items=args.items, days=args.days,
             epochs=args.epochs, seed=args.seed, config_path=args.config, ab_days=args.ab_days if args.ab else 0)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from piarec import stack

    if args.action == "up":
        state = stack.up(args.dir, workers=args.workers, airflow=args.airflow)
        for name, url in state["urls"].items():
            print(f"{name:<14} {url}")
        print(f"clients: source {Path(state['dir']) / 'stack.env'}")
    elif args.action == "down":
        state = stack.down(args.dir)
        print(f"stack down: stopped {len(state['processes'])} processes from {state['dir']}")
    else:
        state = stack.status(args.dir)
        print(json.dumps({p["name"]: p["alive"] for p in state["processes"]} | {"running": state["running"]}))
        return 0 if state["running"] else 1
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from piarec.ship import build_zip

    print(build_zip(args.out))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from piarec import ops

    if args.ops_command == "events-ready":
        return ops.events_ready(cfg, day=args.day, window_end=args.window_end, start=args.start, end=args.end)
    if args.ops_command == "snapshot-uri":
        return ops.snapshot_uri(cfg, args.window_end, require_published=args.require_published)
    if args.ops_command == "validate":
        return ops.validate(cfg, args.date, args.arms, k=args.k, sample=args.sample)
    if args.ops_command == "files":
        return ops.files(cfg.storage, args.date, args.arm)
    raise AssertionError(f"unknown ops command {args.ops_command!r}")


def _handlers() -> dict:
    # Looked up when the parser is built, so a test can replace a module-level handler.
    return {"generate-events": cmd_generate_events, "build-matrix": cmd_build_matrix, "train": cmd_train,
            "tune": cmd_tune, "promote": cmd_promote, "report": cmd_report, "score": cmd_score,
            "ab-report": cmd_ab_report, "demo": cmd_demo, "ops": cmd_ops, "stack": cmd_stack, "package": cmd_package}


# --------------------------------------------------------------------------- parser and main
def build_parser() -> argparse.ArgumentParser:
    """``piarec [--version] [--debug] [--config FILE] COMMAND [options]``; each command's
    parser (``prog`` = ``piarec COMMAND``) also accepts ``--debug`` and ``--config``."""
    p = Parser(prog="piarec", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"piarec {piarec.__version__}")
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = _handlers()
    p.commands = {}  # name -> sub-parser, for usage errors found after parsing
    for name in COMMANDS:
        c = add_command_parser(sub, name, prog=f"piarec {name}")
        c.set_defaults(func=handlers[name])
        p.commands[name] = c
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``piarec`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    Usage errors, ``--help`` and ``--version`` exit through SystemExit, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    problem = check_args(args.command, args)
    if problem:
        parser.commands[args.command].error(problem)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_command(lambda: args.func(args), args.debug)
