"""The A/B report of a period: online metrics per arm with user-level intervals.

    spark-submit pipelines/ab_report.py --from 2026-04-11 --to 2026-04-17 [--arms A,B]
        [--control A] [--surfaces home_card,movie_card] [--out URI] [--no-mlflow]

What it reads (docs/ab-logging.md): for every event day E of ``[--from, --to]`` the lists
served that day, ``recommendations/dt=E-1/`` by the reader rule (a missing day fails), and
the events of E with their ``surface`` / ``slot`` columns. An event is in the arm its user
had in the served partition and is *on a recommended title* when the title is in that
user's list. Reduced in Spark, in one pass per scope (the whole period, and each day), to
per arm:

- per user, the numerator and denominator of each ratio metric (clicks on recommended
  titles and views; user-days with such a click and with a view; seconds played from the
  card and user-days with a view; plays of recommended titles and 1), summed over the
  scope, then their :class:`~piarec.evaluate.ab.UserSums` (n, sums, squares and products):
  the delta method needs nothing else, so no per-user data reaches the driver;
- counts: assigned users, users with a view, views, clicks, and the catalogue coverage of
  the titles impressed on the cards.

The driver turns them into intervals and uplifts against the control
(:mod:`piarec.evaluate.ab_report`; the control is ``--control``, else the one baseline arm
when there is exactly one, else the first arm), runs the sample-ratio check on the users with a view
against the configured shares, and commits ``<out>/`` in one step (``report.parquet``,
``report.html``, ``report.png``, ``summary.json``). With MLflow (the default) it logs one run
to the experiment ``<mlflow.experiment>-ab`` with the figures, the report and the compared
model versions as tags. A sample-ratio mismatch is committed and logged for inspection and
then fails the command: its figures are not a result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date, timedelta
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from piarec.cli.errors import run_command
from piarec.cli.options import parse_job_args
from piarec.config import PipelineConfig, load_config
from piarec.data import layout, reader
from piarec.data.commit import PartitionCommit
from piarec.data.storage import resolve
from piarec.errors import InputDataError
from piarec.evaluate.ab import UserSums, srm
from piarec.evaluate.ab_report import PERIOD, figures, html_page, plot_png, summary_lines
from pipelines.events import read_events
from pipelines.spark import get_spark, spark_path

log = logging.getLogger("piarec.ab_report")

# ratio metric -> (numerator, denominator, population: "viewers" = users with a view, "assigned" = all)
RATIOS = {
    "click_rate_per_view": ("clicks", "views", "viewers"),
    "click_rate_per_user_view": ("click_days", "view_days", "viewers"),
    "playtime_per_user_view": ("playtime", "view_days", "viewers"),
    "rec_plays_per_user": ("rec_plays", "one", "assigned"),
}
REPORT_FILES = ("report.parquet", "report.html", "report.png", "summary.json")


class SampleRatioMismatch(InputDataError):
    """The users per arm do not match the configured shares: the test is broken."""


def served(spark: SparkSession, recs_root: str, days: list[date]) -> tuple[DataFrame, dict[str, dict]]:
    """``day, user_id, arm, item_ids``: the lists served on each event day (those of
    ``dt=day-1``), and per served partition its manifest (by ISO event day)."""
    frames, manifests = [], {}
    for day in days:
        uri = layout.day_uri(recs_root, day - timedelta(days=1))
        got = reader.open_committed(uri)
        if got is None or got.manifest is None:
            raise InputDataError(f"{uri} is not committed: the lists served on {day} are unknown")
        manifests[day.isoformat()] = got.manifest
        frames.append(spark.read.option("basePath", spark_path(got.base))
                      .parquet(*map(spark_path, reader.uris(uri))).select("user_id", "arm", "item_ids")
                      .withColumn("day", F.lit(day)))
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out, manifests


def card_events(spark: SparkSession, cfg: PipelineConfig, events_uri: str, start: date, end: date,
                surfaces: list[str] | None) -> DataFrame:
    """The events of days ``[start, end)`` with their ``day`` and ``on_card`` (the event
    happened on one of ``surfaces``, or on any surface without them): read once, for
    :func:`user_days` and :func:`coverage` alike."""
    ev = read_events(spark, events_uri, cfg.events, start, end, exposure=True, require_watch=False)
    on_card = F.col("surface").isin(surfaces) if surfaces else F.col("surface").isNotNull()
    return ev.withColumn("day", F.to_date("ts")).withColumn("on_card", F.coalesce(on_card, F.lit(False)))


def user_days(ev: DataFrame, lists: DataFrame) -> DataFrame:
    """One row per assigned user and event day of :func:`card_events` ``ev``: ``arm, day,
    user_id`` and that day's views, clicks and plays of recommended titles, playtime from
    the cards, and ``view_days`` / ``click_days`` (0 or 1: whether the day had a view / such
    a click)."""
    on_card = F.col("on_card")
    assign = lists.select("day", "user_id", "arm")
    rec = lists.select("day", "user_id", F.explode("item_ids").alias("item_id")).withColumn("rec", F.lit(True))
    e = ev.join(assign, ["day", "user_id"]).join(rec, ["day", "user_id", "item_id"], "left")
    is_rec = F.coalesce(F.col("rec"), F.lit(False))
    kind = F.col("event_type")

    def count(cond):
        return F.sum(F.when(cond, 1).otherwise(0))

    per_day = e.groupBy("arm", "day", "user_id").agg(
        F.countDistinct(F.when(on_card & (kind == "impression"), F.struct("surface", "ts"))).alias("views"),
        count(on_card & (kind == "click") & is_rec).alias("clicks"),
        F.sum(F.when(on_card & (kind == "play") & is_rec, F.coalesce(F.col("watch_seconds"), F.lit(0)))
              .otherwise(0)).alias("playtime"),
        count((kind == "play") & is_rec).alias("rec_plays"),
    )
    out = assign.join(per_day, ["arm", "day", "user_id"], "left").na.fill(0, ["views", "clicks", "playtime", "rec_plays"])
    return (out.withColumn("view_days", (F.col("views") > 0).cast("long"))
            .withColumn("click_days", (F.col("clicks") > 0).cast("long")).withColumn("one", F.lit(1)))


def per_user(user_day: DataFrame) -> DataFrame:
    """:func:`user_days` summed over the period: one row per (arm, user)."""
    return user_day.groupBy("arm", "user_id").agg(
        *[F.sum(c).alias(c) for c in ("views", "clicks", "playtime", "rec_plays", "view_days", "click_days")],
        F.lit(1).alias("one"))


def moments(frame: DataFrame, keys: list[str]) -> dict[tuple, dict[str, Any]]:
    """Per ``keys`` group of per-user rows (a user's sums over the scope): every ratio
    metric's UserSums and the user counts, in one aggregation."""
    viewer = F.col("view_days") > 0
    aggs = [F.count(F.lit(1)).alias("assigned_users"), F.sum(viewer.cast("long")).alias("users_with_view"),
            F.sum("views").alias("views_total"), F.sum("clicks").alias("clicks_total")]
    for metric, (y, x, pop) in RATIOS.items():
        inside = viewer if pop == "viewers" else F.lit(True)
        yy, xx = F.col(y).cast("double"), F.col(x).cast("double")
        aggs += [F.sum(F.when(inside, 1).otherwise(0)).alias(f"{metric}__n"),
                 F.sum(F.when(inside, yy)).alias(f"{metric}__y"), F.sum(F.when(inside, xx)).alias(f"{metric}__x"),
                 F.sum(F.when(inside, yy * yy)).alias(f"{metric}__yy"), F.sum(F.when(inside, xx * xx)).alias(f"{metric}__xx"),
                 F.sum(F.when(inside, xx * yy)).alias(f"{metric}__xy")]
    out = {}
    for r in frame.groupBy(*keys).agg(*aggs).collect():
        d = r.asDict()
        key = tuple(d[k] for k in keys)
        out[key] = {"counts": {"assigned_users": d["assigned_users"], "users_with_view": d["users_with_view"] or 0,
                               "views": d["views_total"] or 0, "clicks": d["clicks_total"] or 0},
                    "sums": {m: UserSums(int(d[f"{m}__n"] or 0), *(float(d[f"{m}__{s}"] or 0.0)
                                                                   for s in ("y", "x", "yy", "xx", "xy")))
                             for m in RATIOS}}
    return out


def coverage(ev: DataFrame, lists: DataFrame) -> dict[tuple, int]:
    """Distinct titles impressed on the cards (:func:`card_events` ``ev``), per (arm, day)
    and per arm over the period."""
    imp = (ev.filter(F.col("on_card") & (F.col("event_type") == "impression"))
           .join(lists.select("day", "user_id", "arm"), ["day", "user_id"]).select("arm", "day", "item_id"))
    imp = imp.cache()
    try:
        out = {(r["arm"], r["day"]): r["n"] for r in imp.groupBy("arm", "day").agg(F.countDistinct("item_id").alias("n")).collect()}
        out |= {(r["arm"], None): r["n"] for r in imp.groupBy("arm").agg(F.countDistinct("item_id").alias("n")).collect()}
    finally:
        imp.unpersist()
    return out


def run(spark: SparkSession, cfg: PipelineConfig, start: date, end: date, *, arms: list[str] | None = None,
        control: str | None = None, surfaces: list[str] | None = None, out_uri: str | None = None,
        log_mlflow: bool = True, confidence: float = 0.95) -> dict[str, Any]:
    """The report of event days ``[start, end]`` (inclusive); returns its summary. Raises
    :class:`SampleRatioMismatch` after committing (and logging) a report whose users per arm
    do not match the shares."""
    if end < start:
        raise InputDataError(f"--to {end} is before --from {start}")
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    lists, manifests = served(spark, layout.recommendations_root(cfg.storage), days)
    shares, models = _arms_of(manifests)
    wanted = arms or list(shares)
    unknown = [a for a in wanted if a not in shares]
    if unknown or len(wanted) < 2:
        raise InputDataError(f"arms {unknown or wanted} cannot be compared: the served days hold arms {list(shares)}")
    baselines = [a for a in wanted if models[a]["kind"] != "model"]
    control = control or (baselines[0] if len(baselines) == 1 else wanted[0])
    if control not in wanted:
        raise InputDataError(f"the control arm {control!r} is not among the arms compared {wanted}")
    lists = lists.filter(F.col("arm").isin(wanted))
    events_uri = layout.events_root(cfg.storage)
    ev = card_events(spark, cfg, events_uri, start, end + timedelta(days=1), surfaces)
    ud = user_days(ev, lists).cache()
    try:
        daily = moments(ud, ["arm", "day"])  # a user-day is one user's sums over the day
        period = moments(per_user(ud), ["arm"])
    finally:
        ud.unpersist()
    covered = coverage(ev, lists)
    sums, counts = {}, {}
    for (arm,), v in period.items():
        _add(sums, counts, (PERIOD, None, arm), v, covered.get((arm, None), 0), models[arm]["n_items"])
    for (arm, day), v in daily.items():
        _add(sums, counts, ("day", day.isoformat(), arm), v, covered.get((arm, day), 0), models[arm]["n_items"])
    rows = figures(sums, counts, control, confidence)
    check = srm({a: int(period.get((a,), {"counts": {"users_with_view": 0}})["counts"]["users_with_view"])
                 for a in wanted}, {a: shares[a] for a in wanted})
    lines = summary_lines(rows, check, control)
    title = f"A/B report {start} .. {end}: {', '.join(wanted)}; control arm {control}"
    summary = {"from": start.isoformat(), "to": end.isoformat(), "arms": wanted, "control": control,
               "surfaces": surfaces, "confidence": confidence, "srm": check.to_dict(), "lines": lines,
               "models": {a: models[a] for a in wanted}, "shares": {a: shares[a] for a in wanted}}
    out_uri = out_uri or layout.ab_report_uri(cfg.storage, start, end)
    png = plot_png(rows)
    page = html_page(title, lines, rows, png, {a: {**models[a], "share": shares[a]} for a in wanted})
    _commit(cfg, out_uri, rows, png, page, summary)
    summary["uri"] = out_uri
    if log_mlflow:
        summary["run_id"] = _log_mlflow(cfg, summary, rows, png, page)
    for line in lines:
        log.info("%s", line)
    if check.mismatch:
        raise SampleRatioMismatch(f"sample ratio mismatch over {start} .. {end}: users with a view {check.observed} "
                                  f"against shares {check.expected} (p = {check.p_value:.2g} < {check.alpha}); "
                                  f"report at {out_uri}, not a result")
    return summary


def _add(sums: dict, counts: dict, key: tuple, v: dict[str, Any], covered: int, n_items: int) -> None:
    for metric, s in v["sums"].items():
        sums[(*key, metric)] = s
    counts[key] = {**v["counts"], "coverage": covered / n_items if n_items else 0.0}


def _arms_of(manifests: dict[str, dict]) -> tuple[dict[str, float], dict[str, dict]]:
    """The shares and models of the served days' arms; the shares and salt may not change
    within a period (a user would move between arms)."""
    first_day, first = next(iter(manifests.items()))
    assignment = first.get("assignment", {})
    for day, m in manifests.items():
        if m.get("assignment", {}).get("shares") != assignment.get("shares") or \
                m.get("assignment", {}).get("salt") != assignment.get("salt"):
            raise InputDataError(f"the arms or their shares changed between the lists served on {first_day} and "
                                 f"{day}: compare periods with one assignment")
    shares = {a: float(s) for a, s in assignment.get("shares", {}).items()}
    models = {}
    for a in shares:
        versions = sorted({m["arms"][a]["model"]["version"] for m in manifests.values()})
        model = first["arms"][a]["model"]
        models[a] = {"version": versions[0] if len(versions) == 1 else ",".join(versions),
                     "uri": model.get("uri"), "kind": model.get("kind", "model"), "n_items": model.get("n_items", 0)}
    return shares, models


def _commit(cfg: PipelineConfig, uri: str, rows: list[dict], png: bytes, page: str, summary: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from piarec.data.storage import write_bytes

    with PartitionCommit.of(cfg.storage, uri, "ab report") as run:
        root = resolve(run.data_uri)
        root.fs.create_dir(root.path, recursive=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=REPORT_SCHEMA), root.child("report.parquet").path,
                       filesystem=root.fs)
        write_bytes(root.child("report.png"), png)
        write_bytes(root.child("report.html"), page.encode())
        write_bytes(root.child("summary.json"), json.dumps(summary, indent=2, default=str).encode())
        run.commit({"kind": "ab-report", **{k: summary[k] for k in ("from", "to", "arms", "control", "srm")}})


def _log_mlflow(cfg: PipelineConfig, summary: dict, rows: list[dict], png: bytes, page: str) -> str:
    import tempfile
    from pathlib import Path

    import mlflow

    from piarec.registry import client as registry

    experiment = registry.ensure_experiment(cfg, f"{cfg.mlflow.experiment}-ab")
    with mlflow.start_run(experiment_id=experiment, run_name=f"ab {summary['from']}..{summary['to']}") as run:
        mlflow.log_params({"from": summary["from"], "to": summary["to"], "arms": ",".join(summary["arms"]),
                           "control": summary["control"], "surfaces": ",".join(summary["surfaces"] or ["all"])})
        mlflow.set_tags({f"model_version.{a}": m["version"] for a, m in summary["models"].items()}
                        | {"srm": "mismatch" if summary["srm"]["mismatch"] else "ok", "report_uri": summary.get("uri", ""),
                           "mlflow.note.content": "\n\n".join(summary["lines"])})  # the run's description in the UI
        metrics = {}
        for r in rows:
            if r["scope"] == PERIOD and r["value"] is not None:
                metrics[f"{r['arm']}.{r['metric']}"] = r["value"]
                if r["uplift"] is not None:
                    metrics[f"{r['arm']}.{r['metric']}.uplift"] = r["uplift"]
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "report.html").write_text(page)
            Path(tmp, "report.png").write_bytes(png)
            Path(tmp, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            mlflow.log_artifacts(tmp, "ab_report")
        return run.info.run_id


def _schema():
    import pyarrow as pa

    f64 = pa.float64()
    return pa.schema([("scope", pa.string()), ("day", pa.string()), ("arm", pa.string()), ("metric", pa.string()),
                      ("value", f64), ("low", f64), ("high", f64), ("n_users", pa.int64()), ("control", pa.string()),
                      ("uplift", f64), ("uplift_low", f64), ("uplift_high", f64), ("p_value", f64)])


REPORT_SCHEMA = _schema()


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``spark-submit pipelines/ab_report.py ...``: the options of ``piarec ab-report``."""
    args = parse_job_args("ab-report", argv, prog="ab_report")
    return run_command(lambda: run_from_args(args), args.debug, prog="ab_report")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the report and print its summary lines (also what ``piarec ab-report`` runs)."""
    cfg = load_config(args.config)
    spark = get_spark(cfg.spark)
    try:
        summary = run(spark, cfg, args.date_from, args.date_to, arms=args.arms, control=args.control,
                      surfaces=args.surfaces, out_uri=args.out, log_mlflow=args.mlflow)
    finally:
        spark.stop()
    for line in summary["lines"]:
        print(line)
    print(f"report: {summary['uri']}" + (f" (MLflow run {summary['run_id']})" if summary.get("run_id") else ""))
    return 0


__all__ = ["REPORT_FILES", "SampleRatioMismatch", "main", "run", "run_from_args"]

if __name__ == "__main__":
    from pipelines.ab_report import main as _main

    sys.exit(_main())
