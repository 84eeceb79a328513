"""The ``piarec`` command.

    piarec [--version] [--debug] [--config FILE] <command> [options]

Commands: generate-events, build-matrix, train, promote, report, score, demo, and
``ops <events-ready|snapshot-uri|validate>`` (the DAGs' checks). The Spark
commands (build-matrix, score) are the jobs in ``pipelines/`` run in local mode; the same
files run on a cluster with ``spark-submit pipelines/<job>.py`` and parse the same options
(:func:`piarec.cli.options.parse_job_args`). ``--debug`` and ``--config`` are accepted
before or after the command.

Errors print one line and exit with status 2; ``--debug`` shows the traceback.

Modules: :mod:`piarec.cli.options` (every command's options), :mod:`piarec.cli.errors`
(:func:`run_command`, the one error wrapper), :mod:`piarec.cli.app` (parser, handlers,
:func:`main`). Nothing here imports ``pipelines`` except inside a handler.
"""

from piarec.cli.app import build_parser, main
from piarec.cli.errors import run_command
from piarec.cli.options import parse_job_args

__all__ = ["build_parser", "main", "parse_job_args", "run_command"]
