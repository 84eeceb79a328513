"""The one error wrapper of every command: ``piarec <command>`` and the Spark entry points.

Standard library and :mod:`piarec.errors` only, and nothing of ``pipelines``: the jobs
import it, and the CLI imports the jobs (lazily), so it must not lead back to them.
"""

from __future__ import annotations

import sys
from typing import Callable

from piarec.errors import PiarecError


def run_command(fn: Callable[[], int], debug: bool, prog: str | None = None) -> int:
    """Run ``fn`` and return its exit status; errors become one line on stderr.

    PiarecError -> ``error: <message>``, status 2; KeyboardInterrupt -> status 130; any
    other exception -> one line (its message's first) naming it and pointing at ``--debug``, status 2 (never 1,
    which the DAG sensors read as "not ready yet"). With ``debug`` the exception is
    re-raised with its traceback. ``prog`` prefixes the line (``score_users: error: ...``)
    when a job runs on its own.
    """
    prefix = f"{prog}: error:" if prog else "error:"
    try:
        return fn()
    except PiarecError as exc:
        if debug:
            raise
        print(f"{prefix} {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for operators, traceback with --debug
        if debug:
            raise
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        print(f"{prefix} {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
