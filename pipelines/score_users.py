"""Daily scoring: top-K recommendations for every user active at day D.

    spark-submit pipelines/score_users.py --date 2026-03-10 [--config conf.yaml]
        [--events URI | --histories [ROOT]] [--out URI] [--k N] [--engine spark|local]
        [--arms NAME=MODEL:SHARE,... | --model URI [--arm NAME] [--challenger URI [--challenger-share F]]]

Extract: the histories of day D (``user_id, history, seen``, one row per user active in
``[D - scoring.history_days, D + 1)`` UTC): built here from the events with the shared
daily transform :func:`pipelines.events.daily_histories`, or read from the published
histories dataset ``<ROOT>/dt=D/`` (``--histories``; ROOT defaults to
``<storage.root>/histories``). Transform: ``mapInArrow`` with
:class:`piarec.scoring.scorer.TopKScorer` in every Python worker; with several arms
(``--arms``, ``scoring.arms``, or a challenger: :func:`piarec.daily.arms.arm_specs`) each
user is scored by the model of the arm a salted hash of their id assigns them. Load: each task writes its rows as Parquet
(zstd) under the run's version folder (``<out>/dt=D/_versions/<version>/arm=<arm>/``) itself, with pyarrow through :mod:`piarec.data.storage`
(local or S3, the same writer as the single-node engine), and returns one summary row per
arm. The driver keeps the files of the task attempts whose summaries it collected (Spark
returns exactly one successful attempt per partition), deletes those of failed or
duplicate attempts, validates every arm and commits the day in one step
(:func:`piarec.daily.publish.publish_run`: ``<out>/dt=D/_SUCCESS`` names the files of
every arm under ``_versions/<version>/arm=<arm>/``). So the
output path never goes through Spark's Hadoop filesystem layer: S3 works without the s3a
connector and is tested against a local S3 server.

``--engine local`` runs the same day on one machine without Spark
(:func:`piarec.daily.local_engine.run_local`, from the histories dataset; a GPU when present):
same output, same publishing. This module imports pyspark only on the Spark path.

Each model travels to executors as the bytes of its bundle files in a broadcast; every
Python worker loads it once (weights-only, through :func:`piarec.models.bundle.load_bundle`)
and keeps it for later tasks, keyed by the files' digest.

The ``pipelines`` package must be importable on executors (installed in the image, or
shipped with ``--py-files``): the worker function is pickled by reference to this module.
"""

from __future__ import annotations

import argparse
import functools
import sys
import uuid
from datetime import date
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from piarec.cli.errors import run_command
from piarec.cli.options import HISTORIES_DEFAULT, parse_job_args
from piarec.config import PipelineConfig, load_config
from piarec.errors import ConfigError
from piarec.daily.arms import ArmPlan, Assignment, arm_specs, bundle_from_files, parse_arms, plan_arms
from piarec.daily.availability import withheld_by_arm
from piarec.daily.inputs import check_history_columns, histories_partition, window
from piarec.daily.validate import seen_in_histories
from piarec.daily.publish import ArmCounts, PartWriter, keep_committed_parts, open_day, publish_run
from piarec.scoring.arrow import MODEL, OUTPUT_SCHEMA, POPULARITY, WRITE_SCHEMA
from piarec.data import reader
from piarec.data.storage import resolve
from piarec.data import layout

__all__ = ["main", "run", "run_from_args", "score_partition", "score_to_staging", "write_partition"]

ARM_COL = "arm"
UNKNOWN_COL = "unknown_titles"  # per-user count of history + seen entries outside the vocabulary
WORKER_SCHEMA = OUTPUT_SCHEMA.append(pa.field(ARM_COL, pa.string())).append(pa.field(UNKNOWN_COL, pa.int64()))
# What a task returns to the driver: per arm, the writer tag of its files and its counts.
SUMMARY_SCHEMA = pa.schema([("task", pa.string()), ("arm", pa.string()), ("model", pa.int64()),
                            ("popularity", pa.int64()), ("unknown", pa.int64())])

# Worker-side cache: bundle digest -> (bundle, vocabulary as Arrow). Python workers are
# reused across tasks, so each process loads each model of a run once.
_WORKER_MODELS: dict[str, tuple[Any, pa.Array]] = {}


def _worker_models(arms: list[dict[str, Any]]) -> list[tuple[Any, pa.Array]]:
    wanted = {a["digest"] for a in arms}
    for stale in set(_WORKER_MODELS) - wanted:  # only this run's models: memory stays flat
        del _WORKER_MODELS[stale]
    out = []
    for a in arms:
        hit = _WORKER_MODELS.get(a["digest"])
        if hit is None:
            bundle = bundle_from_files(a["broadcast"].value["files"])
            hit = _WORKER_MODELS[a["digest"]] = (bundle, pa.array(bundle.item_ids.tolist(), pa.string()))
        out.append(hit)
    return out


def score_partition(
    batches: Iterator[pa.RecordBatch],
    *,
    arms: list[dict[str, Any]],
    assignment: Assignment,
    k: int,
    batch_size: int,
    dictionary: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Score a partition: ``user_id, history, seen`` batches in, batches in
    :data:`WORKER_SCHEMA` out (item ids dictionary-encoded with ``dictionary``), one row
    per input row; every output batch holds one arm.

    ``arms``: ``{"name", "version", "digest", "broadcast", "exclude"}`` per arm, in the order
    of ``assignment``, which says each user's arm (``exclude``: the item indices the arm
    must not serve, :mod:`piarec.daily.availability`).
    """
    import torch

    from piarec.scoring.scorer import TopKScorer
    from piarec.scoring.arrow import map_arrow_lists, to_record_batch

    # Spark runs one task per core; torch threads on top would oversubscribe the executor.
    torch.set_num_threads(1)
    models = _worker_models(arms)
    scorers = [TopKScorer(bundle, k, batch_size, exclude=arm["exclude"]) for (bundle, _), arm in zip(models, arms)]
    for batch in batches:
        arm_of = assignment.assign(batch.column("user_id"))
        for a, arm in enumerate(arms):
            part = batch if len(arms) == 1 else batch.filter(pa.array(arm_of == a))
            if part.num_rows == 0:
                continue
            vocab = models[a][1]
            history, unknown_history = map_arrow_lists(part.column("history"), vocab)
            seen, unknown_seen = map_arrow_lists(part.column("seen"), vocab)
            scored = scorers[a].score(history, seen)
            out = to_record_batch(part.column("user_id"), scored, vocab, arm["version"], dictionary=dictionary)
            yield (out.append_column(ARM_COL, pa.array([arm["name"]] * part.num_rows, pa.string()))
                   .append_column(UNKNOWN_COL, pa.array(unknown_history + unknown_seen, pa.int64())))


def write_partition(
    batches: Iterator[pa.RecordBatch], *, staging: str, rows_per_file: int, **score: Any
) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: score a partition (:func:`score_partition` with
    ``score``), write its rows under ``<staging>/arm=<name>/`` as files tagged with this
    task attempt, and yield one :data:`SUMMARY_SCHEMA` row per arm."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    tag = f"p{ctx.partitionId():05d}-a{ctx.attemptNumber()}" if ctx else f"x{uuid.uuid4().hex[:12]}"
    root = resolve(staging)
    names = [a["name"] for a in score["arms"]]
    writers = {n: PartWriter(root.child(layout.arm_dir(n)), tag, rows_per_file) for n in names}
    counts = {n: ArmCounts() for n in names}
    drop = [WORKER_SCHEMA.get_field_index(ARM_COL), WORKER_SCHEMA.get_field_index(UNKNOWN_COL)]
    try:
        for out in score_partition(batches, dictionary=True, **score):
            name = out.column(ARM_COL)[0].as_py()
            n_pop = int(np.count_nonzero(np.asarray(out.column("source").to_numpy(zero_copy_only=False)) == POPULARITY))
            counts[name].add(out.num_rows - n_pop, n_pop, int(np.sum(out.column(UNKNOWN_COL).to_numpy())))
            writers[name].write(pa.RecordBatch.from_arrays(
                [c for i, c in enumerate(out.columns) if i not in drop], schema=WRITE_SCHEMA))
    finally:
        for w in writers.values():
            w.close()
    yield pa.RecordBatch.from_pylist(
        [{"task": tag, "arm": n, "model": c.users[MODEL], "popularity": c.users[POPULARITY],
          "unknown": c.unknown_titles} for n, c in counts.items()], schema=SUMMARY_SCHEMA)


def score_to_staging(histories, plan: ArmPlan, broadcasts: list[Any], k: int, batch_size: int,
                     staging: str, rows_per_file: int, withheld: dict[str, np.ndarray]) -> dict[str, ArmCounts]:
    """Score every row of ``histories`` (``user_id, history, seen``) into ``staging`` and
    commit: only the files of the task attempts Spark returned stay. Returns the counts."""
    from pyspark.sql.pandas.types import from_arrow_schema

    arms = [{"name": a.name, "version": a.version, "digest": a.digest, "broadcast": b, "exclude": withheld[a.name]}
            for a, b in zip(plan.arms, broadcasts)]
    # A partial of a module-level function pickles by reference: workers import this
    # module, so _WORKER_MODELS is the same dict for every task of a worker process.
    fn = functools.partial(write_partition, staging=staging, rows_per_file=rows_per_file, arms=arms,
                           assignment=plan.assignment, k=k, batch_size=batch_size)
    rows = histories.select("user_id", "history", "seen").mapInArrow(fn, from_arrow_schema(SUMMARY_SCHEMA)).collect()
    keep_committed_parts(staging, [a.name for a in plan.arms], {r["task"] for r in rows})
    counts = {a.name: ArmCounts() for a in plan.arms}
    for r in rows:
        counts[r["arm"]].add(r["model"], r["popularity"], r["unknown"])
    return counts


def run(
    spark,
    cfg: PipelineConfig,
    events_uri: str,
    date: date,
    out_root: str,
    plan: ArmPlan,
    k: int,
    *,
    histories_uri: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every user active at ``date`` with their arm of ``plan``
    (:func:`piarec.daily.arms.plan_arms`) and commit ``<out_root>/dt=D/`` with every arm.
    Histories come from the events at ``events_uri``, or from the published histories
    dataset rooted at ``histories_uri``. Returns the manifests by arm.
    """
    from pipelines.spark import spark_path

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if histories_uri is not None:
        uri, histories_manifest, files = histories_partition(histories_uri, date)
        fs = resolve(uri).fs
        seen = functools.partial(seen_in_histories, fs, files)
        histories = spark.read.parquet(*map(spark_path, reader.uris(uri)))
        check_history_columns(pa.schema([(f.name, _arrow_type(f.dataType)) for f in histories.schema]), uri)
        # A day's histories may be a few large files: spread them over every core (and
        # sort each partition again: a shuffle's row order is not reproducible).
        cores = spark.sparkContext.defaultParallelism
        if histories.rdd.getNumPartitions() < cores:
            histories = histories.repartition(cores).sortWithinPartitions("user_id")
        source = {"kind": "histories", "uri": uri, "manifest": histories_manifest}
        check_events = None
    else:
        histories, check_events = _histories_from_events(spark, cfg, events_uri, date)
        histories = histories.sortWithinPartitions("user_id")  # reruns write the same files
        source = {"kind": "events", "uri": events_uri}
        seen = None  # read from the events
    avail, withheld = withheld_by_arm(cfg.scoring, date, {a.name: a.bundle.item_ids for a in plan.arms})
    broadcasts = [spark.sparkContext.broadcast({"files": a.files}) for a in plan.arms]
    with open_day(cfg.storage, out_root, date) as day_run:
        try:
            counts = score_to_staging(histories, plan, broadcasts, k, cfg.scoring.batch_size, day_run.data_uri,
                                      cfg.scoring.rows_per_file, withheld)
        finally:
            for b in broadcasts:
                b.destroy()
        if check_events is not None:  # before anything is committed: a bad day commits nothing
            source.update(check_events(sum(c.summary()["users"] for c in counts.values())))
        manifests = publish_run(day_run, cfg, date, plan, counts, k=k, window=window(cfg.scoring, date),
                                source=source, engine={"name": "spark", "device": "cpu", "precision": "fp32"},
                                seen=seen, availability=avail, withheld=withheld)
    return manifests


def _histories_from_events(spark, cfg: PipelineConfig, events_uri: str, day: date):
    """Day ``day``'s histories built from the raw events, under the input checks of
    ``build_matrix --daily`` (the same rules and messages, :mod:`pipelines.build_common`):
    no dt partition in the window, or a missing column, fails here; the dirt is counted as
    the rows stream through scoring.

    Returns the histories frame (``user_id, history, seen``) and ``check(users)``, to call
    once the frame has been scored: it returns the manifest's ``counts`` and ``input``, and
    raises :class:`InputDataError` when more than ``quality.max_dirty_fraction`` of the
    events read is dirt or no user is left (an empty window)."""
    from pipelines import build_common as common
    from pipelines.events import histories

    daily = common.open_daily(spark, cfg, events_uri, day)
    frame = histories(daily.clean(), cfg.positive, cfg.scoring.seen_types)

    def check(users: int) -> dict[str, Any]:
        counts = daily.counts(daily.metrics(), cfg.quality, users)
        return {"counts": counts, "input": common.input_summary(events_uri, daily.src, daily.window.start,
                                                                 daily.window.end)}

    return frame, check


def _arrow_type(spark_type) -> pa.DataType:
    from pyspark.sql.pandas.types import to_arrow_type

    try:
        return to_arrow_type(spark_type)
    except Exception:  # noqa: BLE001 - an unsupported type is reported as missing
        return pa.null()


_DEFAULT_ROOT = HISTORIES_DEFAULT  # ``--histories`` without a ROOT


def main(argv: list[str] | None = None) -> int:
    """``spark-submit pipelines/score_users.py ...``: the options of ``piarec score``
    (:mod:`piarec.cli.options`), then :func:`run_from_args`; one summary or error line."""
    args = parse_job_args("score", argv, prog="score_users")
    return run_command(lambda: run_from_args(args), args.debug, prog="score_users")


def run_from_args(args: argparse.Namespace) -> int:
    """Score day ``args.date`` with the Spark job or the local engine and print one summary
    line per arm (also what ``piarec score`` runs)."""
    cfg = load_config(args.config)
    out = args.out or layout.recommendations_root(cfg.storage)
    k = cfg.scoring.k if args.k is None else args.k
    specs = arm_specs(cfg, arms=parse_arms(args.arms) if args.arms else None, model_uri=args.model, arm=args.arm, challenger_uri=args.challenger,
                      challenger_share=args.challenger_share)
    histories = layout.histories_root(cfg.storage) if args.histories == _DEFAULT_ROOT else args.histories
    if (args.engine or cfg.scoring.engine) == "local":
        from piarec.daily.local_engine import run_local

        if args.events:
            raise ConfigError("the local engine reads the published histories (--histories), not events")
        manifests = run_local(cfg, args.date, histories or layout.histories_root(cfg.storage), out,
                              plan_arms(cfg, specs), k, device=args.device, precision=args.precision,
                              threads=args.threads)
    else:
        if args.device or args.precision or args.threads:
            raise ConfigError("--device, --precision and --threads apply to --engine local only")
        manifests = _run_spark(cfg, args, out, k, specs, histories)
    for name, m in manifests.items():
        counts = m["counts"]
        print(
            f"score_users {m['date']} arm={name}: {counts['users']} users "
            f"({counts['by_source'][MODEL]} model, {counts['by_source'][POPULARITY]} popularity), "
            f"k={m['k']}, {m['unknown_titles']} unknown titles, model {m['model']['version']} -> "
            f"{layout.day_uri(out, args.date)} (committed version {m['version']})"
        )
    return 0


def _run_spark(cfg, args, out, k, specs, histories) -> dict[str, dict[str, Any]]:
    from pyspark.sql import SparkSession

    from pipelines.spark import get_spark

    plan = plan_arms(cfg, specs)  # before the session: a bad model or arm costs no cluster time
    owns_session = SparkSession.getActiveSession() is None
    spark = get_spark(cfg.spark)
    try:
        return run(spark, cfg, args.events or layout.events_root(cfg.storage), args.date, out, plan, k,
                   histories_uri=histories)
    finally:
        if owns_session:
            spark.stop()


if __name__ == "__main__":
    # piarec and pipelines come from the installed project or the code zip on --py-files
    # (piarec package; see piarec/ship.py). Go through the importable module rather than
    # __main__ so the worker function is pickled by reference and its model cache lives in
    # pipelines.score_users on workers.
    from pipelines.score_users import main as _main

    sys.exit(_main())
