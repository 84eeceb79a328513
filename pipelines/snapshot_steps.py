"""The weekly snapshot job's steps (:func:`pipelines.build_matrix.run` calls them in order):
the event counts, the training filters as per-user rules, per-bucket counts, the final
users (filtered, indexed, split), the item index, the writes and the manifest's counts."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from pyspark.sql import Column, DataFrame, Observation, Row, SparkSession
from pyspark.sql import functions as F

from piarec.config import FilterConfig, PositiveRule, QualityConfig, SplitConfig
from piarec.errors import InputDataError
from pipelines.events import EventsInput
from pipelines.matrix_transforms import (
    PARTS,
    SPLITS,
    BUCKET,
    items_within,
    assign_parts,
    assign_split,
    bucket_offsets,
    cap_users,
    index_items,
    index_users,
    item_user_counts,
    keep_items,
    min_positives,
    split_of,
)
from pipelines.spark import spark_path
from pipelines import build_common as common


def weekly_event_counts(
    metrics: Mapping[str, int], quality: QualityConfig, positive: PositiveRule,
    window: common.Window, uri: str, src: EventsInput,
) -> dict[str, Any]:
    """:func:`pipelines.build_common.counted_events` for the training window, which must keep at least one clean
    event and one positive event (else :class:`InputDataError`)."""
    counts = common.counted_events(metrics, quality, window)
    if not counts["events_in_window"]:
        raise common.all_dropped_error(window, uri, src, counts)
    if not counts["positive_events"]:
        raise InputDataError(
            f"no positive events in the window {window} among {counts['events_in_window']} events "
            f"(positive rule: {positive.model_dump()})"
        )
    return counts


def kept_items(users: DataFrame, f: FilterConfig, clock: common.Clock) -> list[str] | None:
    """The item ids (sorted) that at least ``f.min_item_users`` users hold once the bot cap
    has gone; None -- keep every item, nothing is computed -- when ``min_item_users`` is 1.

    ``users``: one row per user with ``items``. One small aggregate, collected.
    """
    if f.min_item_users <= 1:
        return None
    counts = item_user_counts(cap_users(users, f.max_user_positives))
    kept = sorted(r.item_id for r in counts.filter(
        F.col("n_users") >= f.min_item_users).select("item_id").collect())
    clock.lap("item filter")
    return kept


class UserRules(NamedTuple):
    """The filters as columns over the one-row-per-user frame (``items``)."""

    n0: Column  # int: the user's positive items
    capped: Column  # bool: within the bot cap (all true without one)
    n1: Column  # int: the user's items that survive the item filter
    keep: Column  # bool: a final user -- capped, and enough items left


def user_rules(f: FilterConfig, kept_items: Sequence[str] | None) -> UserRules:
    """The columns of :class:`UserRules` for ``f`` and the items :func:`kept_items` kept."""
    n0 = F.size("items")
    capped = n0 <= f.max_user_positives if f.max_user_positives is not None else F.lit(True)
    n1 = F.size(items_within(kept_items))
    return UserRules(n0, capped, n1, capped & (n1 >= f.min_user_positives))


# Users (u) and (user, item) pairs (p) after each step: 0 the positives, 1 the bot cap,
# 2 the item filter (u: users with an item left), 3 the minimum positives per user.
STEPS = ("u0", "p0", "u1", "p1", "u2", "p2", "u3", "p3")


def bucket_stats(users: DataFrame, rules: UserRules) -> list[Row]:
    """One row per user bucket: ``_bucket`` and the counts of :data:`STEPS` in it (the
    ``p`` ones None for a bucket where nothing is left). Both the manifest's user and pair
    counts and the user index offsets (``u3``) come from this one small aggregate."""
    n0, capped, n1, keep = rules
    return users.groupBy(BUCKET).agg(
        F.count(F.lit(1)).alias("u0"), F.sum(n0).alias("p0"),
        F.count_if(capped).alias("u1"), F.sum(F.when(capped, n0)).alias("p1"),
        F.count_if(capped & (n1 > 0)).alias("u2"), F.sum(F.when(capped, n1)).alias("p2"),
        F.count_if(keep).alias("u3"), F.sum(F.when(keep, n1)).alias("p3"),
    ).collect()


def step_totals(stats: Sequence[Row], f: FilterConfig, window: common.Window) -> dict[str, int]:
    """``{step: total}`` over the buckets of :func:`bucket_stats`. Raises
    :class:`InputDataError` when no interaction survives the filters ``f``."""
    tot = {k: sum(int(r[k] or 0) for r in stats) for k in STEPS}
    if not tot["p3"]:
        raise InputDataError(
            f"no interactions left after filters {f.model_dump()} in the window {window} "
            f"({tot['p0']} positive pairs of {tot['u0']} users before)"
        )
    return tot


def final_users(
    users: DataFrame, f: FilterConfig, split: SplitConfig, kept_items: Sequence[str] | None,
    stats: Sequence[Row],
) -> DataFrame:
    """The snapshot's users: ``users`` through the filters, items restricted to the kept
    ones, plus ``user_idx`` (dense, in user order; each bucket's offset from the ``u3``
    of ``stats``) and ``split``. Lazy: the caller persists it for the two writes."""
    survivors = min_positives(keep_items(cap_users(users, f.max_user_positives), kept_items),
                              f.min_user_positives)
    offsets = bucket_offsets({r[BUCKET]: r["u3"] for r in stats if r["u3"]})
    return assign_split(index_users(survivors, offsets), split)


def item_rows(
    users: DataFrame, rules: UserRules, kept_items: Sequence[str] | None, split: SplitConfig
) -> list[Row]:
    """One row per item any user holds, collected (the catalogue is small): ``item_idx``,
    ``item_id``, ``n_users`` (final users holding it), users holding it at each step --
    ``c0`` positives, ``c1`` within the bot cap, ``c2`` also past the item filter -- and
    ``n_train`` / ``n_val`` / ``n_test``, final users of each split. ``item_idx`` as in
    :func:`index_items`, so items no final user keeps sort last. One small aggregate."""
    _, capped, _, keep = rules
    item_in = F.lit(True) if kept_items is None else F.col("item_id").isin(kept_items)
    per_user = users.select(  # per-user flags first: the split hash once per user
        "items", capped.alias("_capped"), keep.alias("_keep"),
        F.when(keep, split_of(split)).alias("_split"))
    pairs = per_user.select("_capped", "_keep", "_split", F.explode("items").alias("item_id"))
    is_final = F.col("_keep") & item_in
    return index_items(pairs.groupBy("item_id").agg(
        F.count_if(is_final).cast("int").alias("n_users"),
        F.count(F.lit(1)).alias("c0"),
        F.count_if("_capped").alias("c1"),
        F.count_if(F.col("_capped") & item_in).alias("c2"),
        *[F.count_if(is_final & (F.col("_split") == s)).alias(f"n_{s}") for s in SPLITS],
    )).collect()


def item_index(spark: SparkSession, item_rows: Sequence[Row]) -> DataFrame:
    """The snapshot's items, ``[item_idx int, item_id string, n_users int]``: those of
    :func:`item_rows` that a final user holds."""
    # Items nobody keeps sort last, so the kept ones hold indices 0..I-1.
    return spark.createDataFrame(
        [(r.item_idx, r.item_id, r.n_users) for r in item_rows if r.n_users],
        "item_idx int, item_id string, n_users int",
    )


def write_snapshot(
    tmp: str, final: DataFrame, items: DataFrame, split: SplitConfig, clock: common.Clock
) -> tuple[Observation, Observation]:
    """Write ``users/`` (user_idx, user_id, split), ``interactions/`` (user_idx, item_idx,
    part) and ``items/`` (one file, by item_idx) as Parquet under ``tmp``.

    Returns what was observed during the writes, to read after them: users per split
    (``{split: n}``) and interactions per split and part (``{"split.part": n}``).
    """
    users_seen = Observation()
    users_out = final.select("user_idx", "user_id", "split").observe(
        users_seen, *[F.count_if(F.col("split") == s).alias(s) for s in SPLITS])
    nnz_seen = Observation()
    interactions = (
        assign_parts(final.select("user_idx", "user_id", "items", "split"), split)
        .join(F.broadcast(items.select("item_id", "item_idx")), "item_id")
        .observe(nnz_seen, *[
            F.count_if((F.col("split") == s) & (F.col("part") == p)).alias(f"{s}.{p}")
            for s in SPLITS for p in PARTS])
        .select("user_idx", "item_idx", "part")
    )
    users_out.write.parquet(spark_path(f"{tmp}/users"))
    clock.lap("write users")
    interactions.write.parquet(spark_path(f"{tmp}/interactions"))
    clock.lap("write interactions")
    (items.coalesce(1).sortWithinPartitions("item_idx")  # small: one file
     .write.parquet(spark_path(f"{tmp}/items")))
    clock.lap("write items")
    return users_seen, nnz_seen


def stage_counts(users: int, pairs: int, items: int) -> dict[str, int]:
    return {"pairs": int(pairs), "users": int(users), "items": int(items)}


def filter_counts(
    positive_events: int, tot: Mapping[str, int], item_rows: Sequence[Row]
) -> dict[str, Any]:
    """The weekly manifest's counts of what each step kept and dropped:
    ``duplicate_positive_events`` (positive events beyond one per user and item), users,
    pairs and items at each stage (``positive``, ``after_user_cap``, ``after_item_filter``,
    ``after_user_filter``), and ``dropped_users`` / ``dropped_items`` / ``dropped_pairs``
    by cause. ``tot`` from :func:`step_totals`, ``item_rows`` from :func:`item_rows`."""
    n_items = {c: sum(1 for r in item_rows if r[c]) for c in ("c0", "c1", "c2", "n_users")}
    return {
        "duplicate_positive_events": positive_events - tot["p0"],
        "positive": stage_counts(tot["u0"], tot["p0"], n_items["c0"]),
        "after_user_cap": stage_counts(tot["u1"], tot["p1"], n_items["c1"]),
        "after_item_filter": stage_counts(tot["u2"], tot["p2"], n_items["c2"]),
        "after_user_filter": stage_counts(tot["u3"], tot["p3"], n_items["n_users"]),
        "dropped_users": {
            "over_max_positives": tot["u0"] - tot["u1"],
            "under_min_positives": tot["u1"] - tot["u3"],
        },
        "dropped_items": {
            "under_min_users": n_items["c1"] - n_items["c2"],
            "no_users_left": n_items["c2"] - n_items["n_users"],
        },
        "dropped_pairs": {
            "over_max_positives": tot["p0"] - tot["p1"],
            "under_min_item_users": tot["p1"] - tot["p2"],
            "under_min_positives": tot["p2"] - tot["p3"],
        },
    }


def split_counts(
    users_seen: Observation, nnz_seen: Observation, item_rows: Sequence[Row]
) -> dict[str, dict[str, int]]:
    """The manifest's ``splits``: per split, ``users``, ``items`` (with a user of the
    split), ``nnz`` and nnz per part (train, fold_in, held_out). The observations are those
    :func:`write_snapshot` returns, read once the writes are done."""
    n_users, nnz = users_seen.get, nnz_seen.get
    splits = {}
    for s in SPLITS:
        parts = {p: int(nnz[f"{s}.{p}"]) for p in PARTS}
        splits[s] = {"users": int(n_users[s]), "items": sum(1 for r in item_rows if r[f"n_{s}"]),
                     "nnz": sum(parts.values()), **parts}
    return splits
