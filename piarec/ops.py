"""The checks the DAG tasks run in the project environment: ``piarec ops <command>``.

    piarec ops events-ready --window-end 2026-04-06   (or --day D, or --start S --end E)
    piarec ops snapshot-uri --window-end 2026-04-06 [--require-published]
    piarec ops validate --date 2026-04-09 --arms champion,challenger [--k 100] [--sample N]
    piarec ops files --date 2026-04-09 [--arm champion]

Airflow itself never imports piarec (its environment has no torch or pyspark); these
commands read the pipeline configuration exactly as the jobs do (``PIAREC_CONFIG``,
``PIAREC__*``) and use piarec's own storage, scorer schema and event rules. The options
live in :mod:`piarec.cli.options`; here are the functions, which print their result line
and return the exit status.

Exit codes: 0 = done / ready / valid; 1 = not ready yet (``events-ready``, so a sensor
pokes again); 2 = an error or a failed validation (:class:`PiarecError`, raised here and
reported in one line by the CLI).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Sequence

from piarec.config import EventsSchema, PipelineConfig, StorageConfig
from piarec.daily.publish import arm_files, arm_manifests
from piarec.daily.validate import days, seen_on_sample, validate_arm_files
from piarec.data import layout, reader
from piarec.data.commit import read_pointer
from piarec.data.storage import SUCCESS, exists, is_published, resolve
from piarec.errors import PiarecError, ValidationFailed

__all__ = ["NOT_READY", "PiarecError", "ValidationFailed", "days", "events_ready", "files", "missing_partitions",
           "recs_uri", "snapshot_uri", "validate", "validate_day"]

NOT_READY = 1  # events-ready: a sensor pokes again


def missing_partitions(storage: StorageConfig, events: EventsSchema, start: dt.date, end: dt.date) -> list[str]:
    """The ``dt=YYYY-MM-DD`` event partitions of ``[start, end)`` that are not complete yet:
    no ``events.done_marker`` file in them (the folder alone may still be being written)."""
    root = resolve(layout.events_root(storage))
    return [layout.day_dir(d) for d in days(start, end) if not exists(root.child(layout.day_dir(d), events.done_marker))]


def recs_uri(storage: StorageConfig, day: dt.date) -> str:
    """The recommendations partition of ``day`` (every arm)."""
    return layout.day_uri(layout.recommendations_root(storage), day)


# --------------------------------------------------------------------------- validation
def validate_day(cfg: PipelineConfig, day: dt.date, arms: Sequence[str], k: int | None, sample: int) -> dict[str, Any]:
    """Check the committed recommendations of ``day``: exactly ``arms``, each arm's files
    against its manifest (:func:`piarec.daily.validate.validate_arm_files`). Read-only;
    returns the report, raises :class:`ValidationFailed`."""
    uri = recs_uri(cfg.storage, day)
    pointer = read_pointer(uri)
    if pointer is None or pointer.version is None:
        raise ValidationFailed(f"{uri} is not committed (no {SUCCESS} commit pointer)")
    views = arm_manifests(pointer.manifest)
    if sorted(views) != sorted(arms):
        raise ValidationFailed(f"{uri} holds arms {sorted(views)}, expected {sorted(arms)}")
    loc = resolve(uri)
    files = arm_files(pointer, loc)
    results = [validate_arm_files(loc.fs, files.get(arm, []), views[arm], where=uri, day=day, arm=arm, k=k,
                                  sample=sample, seen=lambda users: seen_on_sample(cfg, day, users))
               for arm in arms]
    return {"date": day.isoformat(), "uri": uri, "version": pointer.version, "committed_at": pointer.committed_at,
            "arms": results}


# --------------------------------------------------------------------------- commands
def events_ready(cfg: PipelineConfig, *, day: dt.date | None = None, window_end: dt.date | None = None,
                 start: dt.date | None = None, end: dt.date | None = None) -> int:
    """0 when every event partition of the range is complete (holds ``events.done_marker``),
    else :data:`NOT_READY`.

    The range: ``day`` -> ``[day, day + 1)`` (the daily run of day D needs D's partition);
    ``window_end`` -> the training window ``[window_end - window_days, window_end)``;
    otherwise ``[start, end)``.
    """
    if day:
        start, end = day, day + dt.timedelta(days=1)
    elif window_end:
        start, end = window_end - dt.timedelta(days=cfg.window_days), window_end
    if not (start and end):
        raise PiarecError("events-ready needs --day, --window-end, or --start and --end")
    missing = missing_partitions(cfg.storage, cfg.events, start, end)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"waiting for {len(missing)} event partition(s) under {layout.events_root(cfg.storage)} "
              f"to be complete ({cfg.events.done_marker}): {shown}")
        return NOT_READY
    print(f"all {len(days(start, end))} event partitions of [{start}, {end}) are complete")
    return 0


def snapshot_uri(cfg: PipelineConfig, window_end: dt.date, *, require_published: bool = False) -> int:
    """Print the snapshot URI of ``window_end`` (the last line: Airflow pushes it to XCom)."""
    uri = layout.snapshot_uri(layout.snapshots_root(cfg.storage), window_end)
    if require_published and not is_published(uri):
        raise PiarecError(f"snapshot {uri} is not published")
    print(uri)
    return 0


def validate(cfg: PipelineConfig, day: dt.date, arms: Sequence[str], *, k: int | None = None,
             sample: int = 1000) -> int:
    """Check the committed recommendations of ``day`` (:func:`validate_day`) and print the
    report; writes nothing (the scoring job validated before it committed)."""
    print(json.dumps(validate_day(cfg, day, arms, k, sample)))
    return 0


def files(storage: StorageConfig, day: dt.date, arm: str | None = None) -> int:
    """Print the committed files of the recommendations of ``day`` (one arm's, or every
    arm's), one URI a line: exactly what a downstream loader reads (the reader contract,
    :mod:`piarec.data.reader`)."""
    uri = recs_uri(storage, day)
    try:
        listed = reader.uris(uri, arm)
    except FileNotFoundError:  # no commit pointer
        raise PiarecError(f"{uri} is not committed (no {SUCCESS} commit pointer)") from None
    if arm is not None and not listed:
        raise PiarecError(f"{uri} has no committed files of arm {arm!r}")
    print("\n".join(listed))
    return 0
