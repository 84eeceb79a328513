"""Every command's options, declared once.

``piarec <command>`` (:func:`piarec.cli.build_parser`) and the Spark entry points
(``spark-submit pipelines/<job>.py``, through :func:`parse_job_args`) add their options with
the same ``add_<command>_options`` function, so both accept exactly the same names,
defaults and help. Light on purpose: the standard library only (no torch, pyspark or
mlflow, nothing of ``pipelines``), so parsing and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Callable, Sequence

# ``score --histories`` without a value: the configured ``<storage.root>/histories``.
HISTORIES_DEFAULT = "<storage.root>/histories"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (and exit 2), like every other error."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- value types
def iso_date(text: str) -> dt.date:
    """A ``YYYY-MM-DD`` day; the error names the bad value."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def arm_list(text: str) -> list[str]:
    """``champion,challenger`` -> ``["champion", "challenger"]`` (empty entries dropped)."""
    return [a for a in text.split(",") if a]


def optional_int(text: str) -> int | None:
    """An integer, or None for an empty string (a DAG param rendered empty)."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


# --------------------------------------------------------------------------- global options
def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--debug`` and ``--config``. ``suppress=True`` for the copies on sub-parsers: a
    sub-parser's default would overwrite a value given before the command."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs", **kw)
    parser.add_argument("--config", metavar="FILE",
                        help="pipeline YAML (default: $PIAREC_CONFIG or the packaged local default)", **kw)


# --------------------------------------------------------------------------- commands
def add_generate_events_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset (folder or s3:// URI)")
    p.add_argument("--users", type=int, default=50_000, help="number of users (default 50000)")
    p.add_argument("--items", type=int, default=2_000, help="number of titles (default 2000)")
    p.add_argument("--days", type=int, default=120, help="days of events (default 120)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", type=iso_date, default=dt.date(2026, 1, 1), help="first day (default 2026-01-01)")


def add_build_matrix_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", help="events URI (default: storage.events, else <storage.root>/events)")
    p.add_argument("--window-end", type=iso_date,
                   help="weekly: YYYY-MM-DD, exclusive; the window is [window_end - window_days, window_end)")
    p.add_argument("--daily", action="store_true", help="publish day --date's user histories for scoring instead")
    p.add_argument("--date", type=iso_date,
                   help="daily: YYYY-MM-DD; window [date - scoring.history_days, date + 1)")
    p.add_argument("--out", help="snapshots root (default: <storage.root>/snapshots), or with "
                                 "--daily the histories root (default: <storage.root>/histories)")


def check_build_matrix_args(args: argparse.Namespace) -> str | None:
    if args.daily and (args.date is None or args.window_end is not None):
        return "--daily needs --date (and no --window-end)"
    if not args.daily and (args.window_end is None or args.date is not None):
        return "give --window-end (weekly snapshot) or --daily --date"
    return None


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", required=True, help="snapshot URI (…/snapshots/window_end=YYYY-MM-DD)")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train data-parallel on N processes of this machine (torchrun; one per GPU)")
    p.add_argument("--tuned-config", metavar="URI",
                   help="a configuration written by `piarec tune` (local path or s3://): its model, pia and "
                        "training keys override the config file's; PIAREC__* variables still win")


def add_tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", required=True, help="snapshot URI (…/snapshots/window_end=YYYY-MM-DD)")
    p.add_argument("--trials", type=int, help="override tune.trials (trials to finish, earlier ones included)")
    p.add_argument("--timeout-s", type=float, help="override tune.timeout_s (no new trial after this many seconds)")
    p.add_argument("--study-storage", metavar="URL",
                   help="override tune.study_storage: an Optuna database (sqlite:///tune.db) a killed search resumes from")
    p.add_argument("--study-name", help="override tune.study_name (default tune-<snapshot manifest digest>)")
    p.add_argument("--max-cost-ratio", type=float,
                   help="override tune.max_cost_ratio: never choose a trial whose training takes more than this "
                        "many times as long as trial 0's")
    p.add_argument("--output", metavar="URI",
                   help="where the best configuration's YAML goes (default <root>/tuning/<study>/best_config.yaml)")


def add_promote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses")


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="MLflow run id of a `piarec train` run")
    p.add_argument("--out", default=None, help="output folder (default ./report-<run id>); also logged under report/")
    p.add_argument("--seed", type=int, default=0, help="seed of the diagnostics' sampling and t-SNE (default 0)")


def add_score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", required=True, type=iso_date, help="scoring day D, YYYY-MM-DD (UTC)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--events", help="build histories from these events (default: <storage.root>/events)")
    src.add_argument("--histories", nargs="?", const=HISTORIES_DEFAULT, metavar="ROOT",
                     help="score the published histories ROOT/dt=D/ (ROOT default: <storage.root>/histories); "
                          "the local engine always reads histories")
    p.add_argument("--out", help="recommendations root (default: <storage.root>/recommendations)")
    p.add_argument("--arms", metavar="NAME=MODEL:SHARE[,...]",
                   help="the run's arms, each a model URI or bundle folder or a baseline (popularity, ease) with "
                        "its share of users, the first taking what the others leave (default: scoring.arms, else "
                        "--model and --challenger)")
    p.add_argument("--model", help="model URI or bundle directory (default: scoring.model_uri)")
    p.add_argument("--k", type=int, help="recommendations per user (default: scoring.k)")
    p.add_argument("--arm", help="the control arm's name, names its folder (default: scoring.arm)")
    p.add_argument("--challenger", help="A/B: a second model scored in the same pass (default: scoring.challenger_uri)")
    p.add_argument("--challenger-share", type=float,
                   help="share of users in the challenger arm (default: scoring.challenger_share)")
    p.add_argument("--engine", choices=["spark", "local"], help="spark job or one machine (default: scoring.engine)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="local engine device (default: scoring.device)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="decoder precision (default: scoring.precision)")
    p.add_argument("--threads", type=int, help="local engine worker threads (default: scoring.threads or CPU cores)")


def add_ab_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="date_from", required=True, type=iso_date, help="first event day, YYYY-MM-DD (UTC)")
    p.add_argument("--to", dest="date_to", required=True, type=iso_date, help="last event day, inclusive")
    p.add_argument("--arms", type=arm_list, metavar="ARM[,ARM]", help="arms compared (default: every arm served)")
    p.add_argument("--control", help="the arm uplifts are measured against (default: the one baseline arm, popularity or "
                        "ease, when there is one, else the first arm compared)")
    p.add_argument("--surfaces", type=arm_list, metavar="CARD[,CARD]",
                   help="cards whose views and clicks count (default: every event with a surface)")
    p.add_argument("--out", help="report folder (default: <storage.root>/ab-reports/from=D1_to=D2)")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log the report to MLflow")


def add_demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="piarec-demo", help="folder for everything (default ./piarec-demo)")
    p.add_argument("--users", type=int, default=50_000, help="number of users (default 50000)")
    p.add_argument("--items", type=int, default=2_000, help="number of titles (default 2000)")
    p.add_argument("--days", type=int, default=120, help="days of events (default 120)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ab", action="store_true",
                   help="then a closed-loop A/B week: champion against a popularity control on simulated card "
                        "events, and its A/B report")
    p.add_argument("--ab-days", type=int, default=7, help="days of the A/B test with --ab (default 7)")


def add_stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"], help="start, stop or show the local stack")
    p.add_argument("--dir", default="piarec-stack", help="state, logs and data of the stack (default ./piarec-stack)")
    p.add_argument("--workers", type=int, default=2, help="Spark workers, 1 core and 2 GB each (default 2)")
    p.add_argument("--no-airflow", dest="airflow", action="store_false",
                   help="leave Airflow out (default: api-server, scheduler and dag-processor from .venv-airflow)")


def add_package_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="dist", help="folder (or .zip path) of the code zip (default ./dist)")


# --------------------------------------------------------------------------- piarec ops
def add_ops_events_ready_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--day", type=iso_date, help="one day: [day, day + 1)")
    p.add_argument("--window-end", type=iso_date, help="the training window [window_end - window_days, window_end)")
    p.add_argument("--start", type=iso_date, help="first day")
    p.add_argument("--end", type=iso_date, help="last day, exclusive")


def add_ops_snapshot_uri_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window-end", type=iso_date, required=True, help="the snapshot's window end, YYYY-MM-DD")
    p.add_argument("--require-published", action="store_true", help="fail unless the snapshot is published")


def add_ops_files_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", type=iso_date, required=True, help="the recommendations day, YYYY-MM-DD")
    p.add_argument("--arm", default=None, help="only this arm (default: every committed arm)")


def _add_day_and_arms(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", type=iso_date, required=True, help="the scored day, YYYY-MM-DD")
    p.add_argument("--arms", type=arm_list, default=["champion"], metavar="ARM[,ARM]",
                   help="comma-separated arms (default: champion)")


def add_ops_validate_options(p: argparse.ArgumentParser) -> None:
    _add_day_and_arms(p)
    p.add_argument("--k", type=optional_int, default=None,
                   help="expected recommendations per user (default: the manifest's)")
    p.add_argument("--sample", type=int, default=1000, help="users checked against their events (default 1000)")


OPS_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "events-ready": (add_ops_events_ready_options,
                     "exit 0 when every dt partition of [start, end) exists, 1 while some are missing"),
    "snapshot-uri": (add_ops_snapshot_uri_options, "print the snapshot URI of a window end"),
    "validate": (add_ops_validate_options, "check the committed arms of a day (read-only)"),
    "files": (add_ops_files_options, "print the committed files of a recommendations day, one URI a line"),
}


def add_ops_options(p: argparse.ArgumentParser) -> None:
    """``piarec ops <events-ready|snapshot-uri|validate|files>``: the DAGs' checks and lookups.
    Exit codes: 0 = done / ready / valid; 1 = not ready yet (events-ready, a sensor pokes
    again); 2 = an error or a failed validation."""
    sub = p.add_subparsers(dest="ops_command", required=True, metavar="OPS_COMMAND")
    for name, (add, text) in OPS_COMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        add(sp)
        add_global_options(sp, suppress=True)


# --------------------------------------------------------------------------- the table
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "generate-events": (add_generate_events_options, "write a deterministic synthetic event log"),
    "build-matrix": (add_build_matrix_options,
                     "Spark job: build the weekly user-item snapshot (or, with --daily, day D's histories)"),
    "train": (add_train_options, "train Multi-VAE + PIA on a snapshot; register as challenger"),
    "tune": (add_tune_options, "search hyperparameters on a snapshot's validation users (Optuna, MLflow runs); "
                               "write the best configuration"),
    "promote": (add_promote_options, "run the promotion gate: challenger -> champion"),
    "report": (add_report_options, "collapse diagnostics, per-group metrics and latent t-SNE of a training run"),
    "score": (add_score_options, "Spark job (or --engine local): top-K recommendations for every user active at day D"),
    "ab-report": (add_ab_report_options, "Spark job: online metrics per arm with user-level intervals, uplift "
                                         "against the control and the sample-ratio check"),
    "demo": (add_demo_options, "the whole pipeline end to end on generated events"),
    "stack": (add_stack_options, "the production topology on 127.0.0.1: Spark standalone, MLflow, S3, Airflow"),
    "package": (add_package_options, "zip piarec's code for Spark's --py-files (executors without piarec)"),
    "ops": (add_ops_options, "the DAGs' checks and lookups: events-ready, snapshot-uri, validate, files"),
}

# Cross-option rules argparse cannot express; a message means a usage error (exit 2).
CHECKS: dict[str, Callable[[argparse.Namespace], str | None]] = {"build-matrix": check_build_matrix_args}


def check_args(command: str, args: argparse.Namespace) -> str | None:
    """The usage problem of ``args`` for ``command``, or None."""
    check = CHECKS.get(command)
    return check(args) if check else None


def add_command_parser(sub, name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The sub-parser of ``name`` on ``sub`` (``add_subparsers()``), with its options."""
    add, text = COMMANDS[name]
    p = sub.add_parser(name, help=text, description=text, **({"prog": prog} if prog else {}))
    add(p)
    add_global_options(p, suppress=True)
    return p


def parse_job_args(command: str, argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    """Parse a job's own command line (``spark-submit pipelines/<job>.py ...``): the options
    of ``piarec <command>`` plus ``--config`` and ``--debug``."""
    add, text = COMMANDS[command]
    p = Parser(prog=prog, description=text)
    add(p)
    add_global_options(p)
    args = p.parse_args(argv)
    problem = check_args(command, args)
    if problem:
        p.error(problem)
    args.command = command
    return args
