"""The ``piarec`` command.

    piarec [--debug] [--config FILE] <command> [options]

Commands: generate-events, build-matrix, train, promote, report, score, demo. The Spark
commands (build-matrix, score) are the jobs in ``pipelines/`` run in local mode; the
same files run on a cluster with ``spark-submit pipelines/<job>.py``.

Errors print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from typing import Callable, Sequence

from piarec.errors import PiarecError

log = logging.getLogger("piarec")

# Spark jobs own their argument parsing; the CLI forwards to their main().
SPARK_JOBS = {"build-matrix": "pipelines.build_matrix", "score": "pipelines.score_users"}


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date in YYYY-MM-DD form") from None


def _config(args: argparse.Namespace):
    from piarec.config import load_config

    return load_config(args.config)


def cmd_generate_events(args: argparse.Namespace) -> int:
    from piarec.data.synthetic import generate_events

    summary = generate_events(args.out, users=args.users, items=args.items, days=args.days,
                              seed=args.seed, start=args.start, progress=log.info)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from piarec.train.job import run_training

    cfg = _config(args)
    if args.epochs:
        cfg.training.epochs = args.epochs
    out = run_training(cfg, args.snapshot)
    print(json.dumps({k: out[k] for k in ("run_id", "version", "best_epoch", "val", "test")}, indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from piarec.registry.gate import promote

    decision = promote(_config(args))
    print(decision.summary())
    return 0 if decision.promoted or not args.strict else 1


def cmd_report(args: argparse.Namespace) -> int:
    from piarec.evaluate.report import report_run

    out = report_run(_config(args), args.run, args.out, seed=args.seed)
    print(json.dumps({"out_dir": out["out_dir"], "collapse": out["collapse"],
                      "silhouette": out["tsne"]["silhouette"], "groups": out["groups"]}, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from piarec.demo import run_demo

    run_demo(args.workdir, users=args.users, items=args.items, days=args.days,
             epochs=args.epochs, seed=args.seed, config_path=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piarec", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("--config", help="pipeline YAML (default: $PIAREC_CONFIG or the packaged local default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate-events", help="write a deterministic synthetic event log")
    g.add_argument("--out", required=True, help="output dataset (folder or s3:// URI)")
    g.add_argument("--users", type=int, default=50_000, help="number of users (default 50000)")
    g.add_argument("--items", type=int, default=2_000, help="number of titles (default 2000)")
    g.add_argument("--days", type=int, default=120, help="days of events (default 120)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--start", type=_date, default=dt.date(2026, 1, 1), help="first day (default 2026-01-01)")
    g.set_defaults(func=cmd_generate_events)

    for name, module in SPARK_JOBS.items():
        sub.add_parser(name, help=f"Spark job {module} (options: piarec {name} --help)", add_help=False)

    t = sub.add_parser("train", help="train Multi-VAE + PIA on a snapshot; register as challenger")
    t.add_argument("--snapshot", required=True, help="snapshot URI (…/snapshots/window_end=YYYY-MM-DD)")
    t.add_argument("--epochs", type=int, help="override training.epochs")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("promote", help="run the promotion gate: challenger -> champion")
    pr.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses")
    pr.set_defaults(func=cmd_promote)

    r = sub.add_parser("report", help="collapse diagnostics, per-group metrics and latent t-SNE of a training run")
    r.add_argument("--run", required=True, help="MLflow run id of a `piarec train` run")
    r.add_argument("--out", default=None, help="output folder (default ./report-<run id>); also logged under report/")
    r.add_argument("--seed", type=int, default=0, help="seed of the diagnostics' sampling and t-SNE (default 0)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the whole pipeline end to end on generated events")
    d.add_argument("--workdir", default="piarec-demo", help="folder for everything (default ./piarec-demo)")
    d.add_argument("--users", type=int, default=50_000)
    d.add_argument("--items", type=int, default=2_000)
    d.add_argument("--days", type=int, default=120)
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def _run(fn: Callable[[], int], debug: bool) -> int:
    try:
        return fn()
    except PiarecError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for operators, traceback with --debug
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Global options come before the command; everything after a Spark job's name is its own.
    split = next((i for i, a in enumerate(argv) if a in SPARK_JOBS), None)
    head = argv if split is None else argv[: split + 1]
    args = parser.parse_args(head)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if split is not None:
        import importlib

        job = importlib.import_module(SPARK_JOBS[argv[split]])
        rest = argv[split + 1 :]
        if args.config and "--config" not in rest:
            rest = ["--config", args.config, *rest]
        if args.debug and "--debug" not in rest:
            rest = [*rest, "--debug"]
        return _run(lambda: job.main(rest), args.debug)
    return _run(lambda: args.func(args), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
