"""Weekly snapshot job: viewing events -> binary user-item matrix with a held-out split.

    spark-submit pipelines/build_matrix.py --window-end 2024-06-03 [--events URI] [--out URI]

Extract the window's events, keep positive (user, item) pairs once, apply the training
filters, index items and users densely, split users by a salted hash, split held-out
users' items into fold-in and held-out parts, and publish
``<out>/window_end=YYYY-MM-DD/`` atomically (layout in docs/architecture.md and
:mod:`piarec.snapshot`, which reads it back for the trainer).

Every step between extract and load is a pure DataFrame -> DataFrame function, tested
alone on tiny frames. No Python UDFs: all work stays in the JVM.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a script (spark-submit pipelines/build_matrix.py from a checkout): make the
    # checkout's packages importable without installing them.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import Column, DataFrame, SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from piarec.config import PipelineConfig, SplitConfig, load_config  # noqa: E402
from piarec.errors import InputDataError, PiarecError  # noqa: E402
from piarec.snapshot import SCHEMA_VERSION, snapshot_uri  # noqa: E402
from piarec.storage import publish_dir, remove, resolve, temp_sibling  # noqa: E402
from pipelines.events import in_window, positive_pairs, read_events, window_condition  # noqa: E402
from pipelines.spark import get_spark, spark_path  # noqa: E402

_INT32_MAX = 2**31 - 1
# monotonically_increasing_id() = partition index << 33 | row number inside the partition.
_MID_SHIFT = 33
# Guards ceil(fraction * n) against float noise: 0.7 * 10 = 7.000000000000001 must give 7.
_CEIL_EPS = 1e-9


# --------------------------------------------------------------------------- transforms
def filter_items(pairs: DataFrame, min_item_users: int) -> DataFrame:
    """Pairs of items with at least ``min_item_users`` distinct users.

    ``pairs`` are distinct ``[user_id, item_id]``, so rows per item = users per item. The
    catalogue is small (thousands of titles), so the kept ids are broadcast to a semi-join
    instead of shuffling every pair by item (popular items would make skewed partitions).
    """
    if min_item_users <= 1:
        return pairs  # every item present has at least one user
    keep = pairs.groupBy("item_id").count().filter(F.col("count") >= min_item_users)
    kept = pairs.join(F.broadcast(keep.select("item_id")), "item_id", "left_semi")
    return kept.select(*pairs.columns)  # a join puts the key first; keep the input's order


def filter_users(
    pairs: DataFrame, min_user_positives: int, max_user_positives: int | None = None
) -> DataFrame:
    """Pairs of users with ``min_user_positives <= n <= max_user_positives`` positives.

    The job applies :func:`filter_items` first and this second, one pass each (as in the
    Multi-VAE preprocessing): a user who falls below the minimum because items were dropped
    is removed, but items are not re-checked after users go, so an item may end with fewer
    than ``min_item_users`` users. Users above the maximum are bots / shared accounts.
    """
    if min_user_positives <= 1 and max_user_positives is None:
        return pairs
    n = F.count(F.lit(1)).over(Window.partitionBy("user_id"))
    cond = F.col("_n") >= min_user_positives
    if max_user_positives is not None:
        cond = cond & (F.col("_n") <= max_user_positives)
    return pairs.withColumn("_n", n).filter(cond).drop("_n")


def _dense_index(df: DataFrame, order: list[Column], idx_col: str) -> DataFrame:
    """``df`` plus ``idx_col`` int32 = its rank 0..n-1 in ``order`` (ties must not occur).

    Stays distributed: a global sort (range-partitioned), a per-partition row tag from
    ``monotonically_increasing_id``, the row count of each partition (one small row per
    partition, collected), and each partition's offset added back through a broadcast join.
    The tagged frame is checkpointed first so counts and tags come from one materialisation:
    a re-run sort samples its range bounds afresh and could move rows between partitions.
    """
    spark = df.sparkSession
    tagged = (
        df.orderBy(*order)
        .withColumn("_mid", F.monotonically_increasing_id())
        .localCheckpoint(eager=True)
    )
    tagged = tagged.withColumn("_pid", F.shiftright(F.col("_mid"), _MID_SHIFT))
    sizes = sorted(tuple(r) for r in tagged.groupBy("_pid").count().collect())
    offsets, total = [], 0
    for pid, count in sizes:
        offsets.append((int(pid), total))
        total += int(count)
    if total > _INT32_MAX:
        raise InputDataError(f"{total} rows do not fit an int32 {idx_col}")
    offset_df = spark.createDataFrame(offsets, "_pid long, _offset long")
    local = F.col("_mid").bitwiseAND(F.lit((1 << _MID_SHIFT) - 1))
    return (
        tagged.join(F.broadcast(offset_df), "_pid")
        .withColumn(idx_col, (F.col("_offset") + local).cast("int"))
        .drop("_mid", "_pid", "_offset")
    )


def index_items(pairs: DataFrame) -> DataFrame:
    """``items[item_idx int, item_id string, n_users int]``.

    ``item_idx`` is dense 0..I-1 by ``n_users`` descending then ``item_id`` ascending, so
    index 0 is the most popular title and the order is reproducible.
    """
    counts = pairs.groupBy("item_id").agg(F.count(F.lit(1)).cast("int").alias("n_users"))
    indexed = _dense_index(counts, [F.col("n_users").desc(), F.col("item_id").asc()], "item_idx")
    return indexed.select("item_idx", "item_id", "n_users")


def index_users(pairs: DataFrame) -> DataFrame:
    """``users[user_idx int, user_id string]``: dense 0..U-1 in ``user_id`` order."""
    users = pairs.select("user_id").distinct()
    return _dense_index(users, [F.col("user_id").asc()], "user_idx").select("user_idx", "user_id")


def unit_hash(salt: str, *cols: str) -> Column:
    """A uniform number in [0, 1) from ``salt`` and string columns, stable across runs.

    ``int(sha256("\\x1f".join([salt, *values])).hexdigest()[:13], 16) / 2**52`` -- plain
    SHA-256, so anyone can recompute a user's split outside Spark.
    """
    digest = F.sha2(F.concat_ws("\x1f", F.lit(salt), *[F.col(c) for c in cols]), 256)
    return F.conv(F.substring(digest, 1, 13), 16, 10).cast("long") / float(2**52)


def assign_split(users: DataFrame, split_cfg: SplitConfig) -> DataFrame:
    """``users`` plus ``split`` in train | val | test by ``u = unit_hash(salt, user_id)``.

    val when ``u < val_fraction``, test when ``u < val_fraction + test_fraction``, else
    train. The salt keeps a user in the same split week after week.
    """
    u = unit_hash(split_cfg.salt, "user_id")
    val_end = split_cfg.val_fraction
    test_end = split_cfg.val_fraction + split_cfg.test_fraction
    split = F.when(u < val_end, "val").when(u < test_end, "test").otherwise("train")
    return users.withColumn("split", split)


def assign_parts(interactions: DataFrame, split_cfg: SplitConfig) -> DataFrame:
    """``interactions[user_id, item_id, split, ...]`` plus ``part``.

    Train users: every pair is ``train``. Val/test users with n positives: items ranked by
    ``unit_hash(salt, user_id, item_id)``; the first ``k = ceil(fold_in_fraction * n)``
    are ``fold_in`` (the model's input) and the rest ``held_out`` (to predict), with k
    capped at n - 1 so a user with n >= 2 always has something to predict (n = 1: fold_in).
    """
    held = F.col("split") != "train"
    by_user = Window.partitionBy("user_id")
    # The hash is only computed for held-out users (CASE is lazy); train rows sort as null.
    key = F.when(held, unit_hash(split_cfg.salt, "user_id", "item_id"))
    ranked = interactions.withColumn("_n", F.count(F.lit(1)).over(by_user)).withColumn(
        "_rank", F.row_number().over(by_user.orderBy(key, F.col("item_id")))
    )
    k = F.ceil(F.col("_n") * split_cfg.fold_in_fraction - _CEIL_EPS)
    k = F.greatest(F.lit(1), F.least(k, F.col("_n") - 1))
    part = F.when(~held, "train").when(F.col("_rank") <= k, "fold_in").otherwise("held_out")
    return ranked.withColumn("part", part).drop("_n", "_rank")


# --------------------------------------------------------------------------- the job
def _pair_stats(pairs: DataFrame) -> dict[str, int]:
    row = pairs.agg(
        F.count(F.lit(1)).alias("pairs"),
        F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("items"),
    ).first()
    return {k: int(row[k]) for k in ("pairs", "users", "items")}


def _split_counts(spark: SparkSession, root: str) -> dict[str, dict[str, int]]:
    """Users, items, nnz and nnz per part of each split, counted from the written files."""
    inter = spark.read.parquet(spark_path(f"{root}/interactions"))
    users = spark.read.parquet(spark_path(f"{root}/users")).select("user_idx", "split")
    rows = (
        inter.join(users, "user_idx")
        .groupBy("split")
        .agg(
            F.countDistinct("user_idx").alias("users"),
            F.countDistinct("item_idx").alias("items"),
            F.count(F.lit(1)).alias("nnz"),
            *[F.count_if(F.col("part") == p).alias(p) for p in ("train", "fold_in", "held_out")],
        )
        .collect()
    )
    out = {s: {"users": 0, "items": 0, "nnz": 0, "train": 0, "fold_in": 0, "held_out": 0}
           for s in ("train", "val", "test")}
    for r in rows:
        out[r["split"]] = {k: int(r[k]) for k in out[r["split"]]}
    return out


def run(
    spark: SparkSession, cfg: PipelineConfig, events_uri: str, window_end: date, out_root: str
) -> dict[str, Any]:
    """Build and publish the snapshot for the window ``[window_end - window_days, window_end)``.

    Writes ``<out_root>/window_end=YYYY-MM-DD/`` (interactions/, users/, items/,
    manifest.json, _SUCCESS) through a temporary sibling, replacing an older snapshot of the
    same window atomically. Returns the manifest. Raises :class:`InputDataError` when the
    window holds no events or nothing survives the positive rule and the filters.
    """
    start = window_end - timedelta(days=cfg.window_days)
    window = f"[{start.isoformat()}, {window_end.isoformat()})"

    # Extract.
    raw = read_events(
        spark, events_uri, cfg.events, start, window_end,
        require_watch=cfg.positive.min_watch_seconds > 0,
    )
    n_read, n_window = raw.agg(
        F.count(F.lit(1)), F.count_if(window_condition(start, window_end))
    ).first()
    if not n_window:
        raise InputDataError(
            f"no events in the window {window} under {events_uri!r} "
            f"({n_read} events read from its dt partitions); check --window-end"
        )

    # Positives, deduplicated once and kept: every later output starts from them.
    pairs = positive_pairs(in_window(raw, start, window_end), cfg.positive).persist()
    kept = None
    try:
        positive = _pair_stats(pairs)
        if not positive["pairs"]:
            raise InputDataError(
                f"no positive events in the window {window} among {n_window} events "
                f"(positive rule: {cfg.positive.model_dump()})"
            )
        # Training filters: items first, then users, one pass each (see filter_users).
        f = cfg.filters
        after_items = filter_items(pairs, f.min_item_users)
        after_items_stats = _pair_stats(after_items)
        kept = filter_users(after_items, f.min_user_positives, f.max_user_positives).persist()
        after_users_stats = _pair_stats(kept)
        if not after_users_stats["pairs"]:
            raise InputDataError(
                f"no interactions left after filters {f.model_dump()} in the window {window} "
                f"({positive['pairs']} positive pairs of {positive['users']} users before)"
            )
        pairs.unpersist()

        # Transform.
        items = index_items(kept)
        users = assign_split(index_users(kept), cfg.split)
        joined = kept.join(users, "user_id").join(
            F.broadcast(items.select("item_id", "item_idx")), "item_id"
        )
        interactions = assign_parts(joined, cfg.split)

        # Load: everything under a temporary sibling, then publish (manifest, _SUCCESS).
        final = snapshot_uri(out_root, window_end)
        tmp = temp_sibling(final)
        outputs = {  # sorted inside files: smaller files, reproducible content
            "interactions": interactions.select("user_idx", "item_idx", "part")
            .sortWithinPartitions("user_idx", "item_idx"),
            "users": users.select("user_idx", "user_id", "split").sortWithinPartitions("user_idx"),
            "items": items.select("item_idx", "item_id", "n_users")
            .repartition(1)  # the catalogue is small: one file
            .sortWithinPartitions("item_idx"),
        }
        try:
            for name, df in outputs.items():
                df.write.parquet(spark_path(f"{tmp}/{name}"))
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "window": {"start": start.isoformat(), "end": window_end.isoformat()},
                "events_uri": events_uri,
                "config": {
                    "events": cfg.events.model_dump(),
                    "window_days": cfg.window_days,
                    "positive": cfg.positive.model_dump(),
                    "filters": cfg.filters.model_dump(),
                    "split": cfg.split.model_dump(),
                },
                "counts": {
                    "events_read": int(n_read),
                    "events_in_window": int(n_window),
                    "positive": positive,
                    "after_item_filter": after_items_stats,
                    "after_user_filter": after_users_stats,
                    "splits": _split_counts(spark, tmp),
                },
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            publish_dir(tmp, final, manifest)
        except BaseException:
            remove(resolve(tmp))  # leave no half-written prefix behind
            raise
        manifest["uri"] = final
        return manifest
    finally:
        pairs.unpersist()
        if kept is not None:
            kept.unpersist()


# --------------------------------------------------------------------------- CLI
def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load config, build the session, run; one summary or error line."""
    parser = argparse.ArgumentParser(
        prog="build_matrix", description="Build the weekly user-item snapshot from events."
    )
    parser.add_argument("--events", help="events URI (default: config storage.events_uri)")
    parser.add_argument(
        "--window-end", required=True, type=_iso_date,
        help="YYYY-MM-DD, exclusive; the window is [window_end - window_days, window_end)",
    )
    parser.add_argument("--out", help="snapshots root (default: config storage.snapshots_uri)")
    parser.add_argument("--config", help="YAML config file (default: $PIAREC_CONFIG or built-in)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config)
        spark = get_spark(cfg.spark)
        manifest = run(
            spark, cfg, args.events or cfg.storage.events_uri, args.window_end,
            args.out or cfg.storage.snapshots_uri,
        )
    except PiarecError as exc:
        if args.debug:
            raise
        print(f"build_matrix: error: {exc}", file=sys.stderr)
        return 2
    s = manifest["counts"]["splits"]
    n_items = manifest["counts"]["after_user_filter"]["items"]
    print(
        f"snapshot {manifest['uri']}: window [{manifest['window']['start']}, "
        f"{manifest['window']['end']}), {sum(v['users'] for v in s.values())} users "
        f"(train {s['train']['users']}, val {s['val']['users']}, test {s['test']['users']}), "
        f"{n_items} items, {sum(v['nnz'] for v in s.values())} interactions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
