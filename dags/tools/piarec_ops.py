"""Small checks the DAGs run in the *project* environment (``.venv/bin/python``).

    python dags/tools/piarec_ops.py events-ready --window-end 2026-04-06   (or --day D, --start/--end)
    python dags/tools/piarec_ops.py snapshot-uri --window-end 2026-04-06
    python dags/tools/piarec_ops.py validate --date 2026-04-09 --arms champion,challenger [--k 100]
    python dags/tools/piarec_ops.py mark-done --date 2026-04-09 --arms champion

Airflow itself never imports piarec (its environment has no torch or pyspark); these
commands read the pipeline configuration exactly as the jobs do (``PIAREC_CONFIG``,
``PIAREC__*``) and use piarec's own storage, scorer schema and event rules.

Exit codes: 0 = done / ready / valid; 1 = not ready yet (``events-ready``, so a sensor
pokes again); 2 = an error or a failed validation (the task fails, with the reasons).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from piarec.config import PipelineConfig, load_config
from piarec.errors import PiarecError
from piarec.scoring.arrow import OUTPUT_SCHEMA
from piarec.data.storage import SUCCESS, exists, is_published, read_json, resolve, write_bytes, write_json
from piarec.data import layout
from piarec.data.layout import MANIFEST, VALIDATION

NOT_READY = 1  # events-ready: a sensor pokes again


class ValidationFailed(PiarecError):
    """The published recommendations break a contract; the message lists every problem."""


def _day(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


def days(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every day in ``[start, end)``."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def missing_partitions(cfg: PipelineConfig, start: dt.date, end: dt.date) -> list[str]:
    """The ``dt=YYYY-MM-DD`` event partitions of ``[start, end)`` that do not exist yet."""
    root = resolve(layout.events_root(cfg.storage))
    return [f"dt={d}" for d in days(start, end) if not exists(root.child(f"dt={d}"))]


def recs_uri(cfg: PipelineConfig, day: dt.date, arm: str | None = None) -> str:
    root = layout.recommendations_root(cfg.storage)
    return layout.arm_uri(root, day, arm) if arm else layout.day_uri(root, day)


# --------------------------------------------------------------------------- validation
def _seen_on_sample(cfg: PipelineConfig, day: dt.date, users: list[str]) -> dict[str, set[str]]:
    """Seen titles of ``users`` at ``day``: every event of a seen type in
    ``[day - history_days, day + 1)`` (the scoring window), read from the event partitions."""
    start, end = day - dt.timedelta(days=cfg.scoring.history_days), day + dt.timedelta(days=1)
    ec = cfg.events
    loc = resolve(layout.events_root(cfg.storage))
    paths = [loc.child(f"dt={d}").path for d in days(start, end) if exists(loc.child(f"dt={d}"))]
    if not paths or not users:
        return {}
    data = ds.dataset([ds.dataset(p, filesystem=loc.fs, format="parquet") for p in paths])
    lo = pa.scalar(dt.datetime.combine(start, dt.time(), dt.timezone.utc))
    hi = pa.scalar(dt.datetime.combine(end, dt.time(), dt.timezone.utc))
    ts = ds.field(ec.ts_col)
    ts_type = data.schema.field(ec.ts_col).type
    if pa.types.is_timestamp(ts_type):
        lo, hi = lo.cast(ts_type), hi.cast(ts_type)
    table = data.to_table(
        columns=[ec.user_col, ec.item_col],
        filter=ds.field(ec.user_col).isin(users) & ds.field(ec.type_col).isin(cfg.scoring.seen_types)
        & (ts >= lo) & (ts < hi),
    )
    seen: dict[str, set[str]] = {}
    for user, item in zip(table.column(ec.user_col).to_pylist(), table.column(ec.item_col).to_pylist()):
        seen.setdefault(str(user), set()).add(str(item))
    return seen


def validate_arm(cfg: PipelineConfig, day: dt.date, arm: str, k: int | None, sample: int) -> dict[str, Any]:
    """Check one published arm partition; returns a summary, raises ValidationFailed."""
    uri = recs_uri(cfg, day, arm)
    if not is_published(uri):
        raise ValidationFailed(f"{uri} is not published (no {SUCCESS})")
    loc = resolve(uri)
    if not exists(loc.child(MANIFEST)):
        raise ValidationFailed(f"{uri} has no {MANIFEST}")
    manifest = read_json(loc.child(MANIFEST))
    problems: list[str] = []
    table = ds.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table()

    # Schema: exactly the scorer's output contract.
    if not table.schema.remove_metadata().equals(OUTPUT_SCHEMA, check_metadata=False):
        problems.append(f"schema {table.schema.remove_metadata()} differs from {OUTPUT_SCHEMA}")
        raise ValidationFailed(f"{uri}: " + "; ".join(problems))

    # Counts against the manifest.
    counts = manifest.get("counts", {})
    n = table.num_rows
    if counts.get("users") != n:
        problems.append(f"{n} rows but the manifest counts {counts.get('users')} users")
    by_source = {s: int(pc.sum(pc.equal(table.column("source"), s)).as_py() or 0) for s in ("model", "popularity")}
    if counts.get("by_source") != by_source:
        problems.append(f"rows by source {by_source} differ from the manifest's {counts.get('by_source')}")
    if pc.count_distinct(table.column("user_id")).as_py() != n:
        problems.append("user_id is not unique")
    if manifest.get("date") != day.isoformat() or manifest.get("arm") != arm:
        problems.append(f"manifest names date {manifest.get('date')} arm {manifest.get('arm')}")

    # K per user: at most K everywhere, exactly K unless the user has seen nearly everything.
    want_k = int(k if k is not None else manifest.get("k", cfg.scoring.k))
    if manifest.get("k") != want_k:
        problems.append(f"the manifest's k {manifest.get('k')} is not the requested {want_k}")
    n_items = int(manifest.get("model", {}).get("n_items", 0))
    lens = pc.list_value_length(table.column("item_ids")).to_numpy(zero_copy_only=False)
    score_lens = pc.list_value_length(table.column("scores")).to_numpy(zero_copy_only=False)
    if (lens != score_lens).any():
        problems.append("item_ids and scores differ in length for some users")
    if len(lens) and lens.max() > want_k:
        problems.append(f"some users get {int(lens.max())} > k={want_k} titles")
    short = int((lens < min(want_k, n_items)).sum()) if n_items else 0
    if short > 0.01 * max(n, 1):
        problems.append(f"{short} users get fewer than k={want_k} titles")
    versions = pc.unique(table.column("model_version")).to_pylist()
    if versions != [str(manifest.get("model", {}).get("version"))]:
        problems.append(f"model_version {versions} differs from the manifest's")

    # Seen titles never recommended, and scores finite and in rank order, on a sample.
    rng = np.random.default_rng(int(day.strftime("%Y%m%d")))
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
    part = table.take(pa.array(rows)).to_pydict()
    seen = _seen_on_sample(cfg, day, part["user_id"])
    overlap = [u for u, items in zip(part["user_id"], part["item_ids"]) if seen.get(u, set()) & set(items)]
    if overlap:
        problems.append(f"{len(overlap)} of {len(rows)} sampled users get titles they have seen, e.g. {overlap[:3]}")
    bad_scores = sum(1 for s in part["scores"] if s and (not np.isfinite(s).all() or (np.diff(s) > 0).any()))
    if bad_scores:
        problems.append(f"{bad_scores} sampled users have non-finite or unordered scores")
    if problems:
        raise ValidationFailed(f"{uri}: " + "; ".join(problems))
    return {"arm": arm, "uri": uri, "users": n, "by_source": by_source, "k": want_k,
            "model_version": versions[0] if versions else None, "sampled": int(len(rows))}


# --------------------------------------------------------------------------- commands
def cmd_events_ready(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    if args.day:  # the daily run of day D needs D's partition
        args.start, args.end = args.day, args.day + dt.timedelta(days=1)
    elif args.window_end:  # the weekly snapshot needs every day of its training window
        args.start, args.end = args.window_end - dt.timedelta(days=cfg.window_days), args.window_end
    if not (args.start and args.end):
        raise PiarecError("events-ready needs --day, --window-end, or --start and --end")
    missing = missing_partitions(cfg, args.start, args.end)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"waiting for {len(missing)} event partition(s) under {layout.events_root(cfg.storage)}: {shown}")
        return NOT_READY
    print(f"all {len(days(args.start, args.end))} event partitions of [{args.start}, {args.end}) are present")
    return 0


def cmd_snapshot_uri(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    uri = layout.snapshot_uri(layout.snapshots_root(cfg.storage), args.window_end)
    if args.require_published and not is_published(uri):
        raise PiarecError(f"snapshot {uri} is not published")
    print(uri)  # the last line of output: Airflow pushes it to XCom
    return 0


def cmd_validate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    results = [validate_arm(cfg, args.date, arm, args.k, args.sample) for arm in args.arms]
    report = {"date": args.date.isoformat(), "arms": results,
              "validated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(resolve(recs_uri(cfg, args.date)).child(VALIDATION), report)
    print(json.dumps(report))
    return 0


def cmd_mark_done(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    day = resolve(recs_uri(cfg, args.date))
    validation = day.child(VALIDATION)
    if not exists(validation):
        raise PiarecError(f"{day.uri} has no {VALIDATION}; run validate first")
    validated = {a["arm"] for a in read_json(validation).get("arms", [])}
    if not set(args.arms) <= validated:
        raise PiarecError(f"arms {sorted(set(args.arms) - validated)} of {day.uri} were not validated")
    write_bytes(day.child(SUCCESS), b"")
    print(f"{day.uri}/{SUCCESS}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piarec_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="pipeline YAML (default: $PIAREC_CONFIG or the packaged default)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("events-ready", help="exit 0 when every dt partition of [start, end) exists, else 1")
    e.add_argument("--day", type=_day, help="one day: [day, day + 1)")
    e.add_argument("--window-end", type=_day, help="the training window [window_end - window_days, window_end)")
    e.add_argument("--start", type=_day)
    e.add_argument("--end", type=_day, help="exclusive")
    e.set_defaults(func=cmd_events_ready)
    s = sub.add_parser("snapshot-uri", help="print the snapshot URI of a window end")
    s.add_argument("--window-end", type=_day, required=True)
    s.add_argument("--require-published", action="store_true")
    s.set_defaults(func=cmd_snapshot_uri)
    for name, fn, text in (("validate", cmd_validate, "validate the published arms of a day"),
                           ("mark-done", cmd_mark_done, "write the day's _SUCCESS after validation")):
        v = sub.add_parser(name, help=text)
        v.add_argument("--date", type=_day, required=True)
        v.add_argument("--arms", type=lambda t: [a for a in t.split(",") if a], default=["champion"])
        if name == "validate":
            v.add_argument("--k", type=lambda t: int(t) if t else None, default=None,
                           help="expected recommendations per user (default: the manifest's)")
            v.add_argument("--sample", type=int, default=1000, help="users checked against their events")
        v.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(load_config(args.config), args)
    except PiarecError as exc:
        print(f"piarec_ops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - never exit 1 by accident: a sensor reads 1 as "not ready"
        import traceback

        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
