"""The weekly snapshot's transforms: pure DataFrame -> DataFrame functions (and the
hash columns they share), each tested on tiny frames with hand-computed output.

The job in :mod:`pipelines.build_matrix` chains them: one row per user with the sorted
array of their items (:func:`user_item_sets`), filtered (:func:`cap_users`,
:func:`keep_items`, :func:`min_positives`), indexed (:func:`index_items`,
:func:`index_users`), split (:func:`assign_split`) and exploded into interactions with
their fold-in / held-out part (:func:`assign_parts`). Nothing here reads or writes.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from piarec.config import SplitConfig
from piarec.errors import InputDataError

_INT32_MAX = 2**31 - 1
# Guards ceil(fraction * n) against float noise: 0.7 * 10 = 7.000000000000001 must give 7.
_CEIL_EPS = 1e-9
SPLITS = ("train", "val", "test")
PARTS = ("train", "fold_in", "held_out")
# Columns of the per-user frame that only organise the work (never written).
BUCKET, ORDER = "_bucket", "_order"


# --------------------------------------------------------------------------- hashing
def _col(c: str | Column) -> Column:
    return F.col(c) if isinstance(c, str) else c


def unit_hash(salt: str, *cols: str | Column) -> Column:
    """A uniform number in [0, 1) from ``salt`` and string columns, stable across runs.

    ``int(sha256("\\x1f".join([salt, *values])).hexdigest()[:13], 16) / 2**52`` -- plain
    SHA-256, so anyone can recompute a user's split outside Spark.
    """
    digest = F.sha2(F.concat_ws("\x1f", F.lit(salt), *[_col(c) for c in cols]), 256)
    return F.conv(F.substring(digest, 1, 13), 16, 10).cast("long") / float(2**52)


def user_order(col: str = "user_id") -> Column:
    """bigint in [0, 2**32): CRC-32 of the UTF-8 ``user_id``, the primary key of ``user_idx``.

    ``zlib.crc32(user_id.encode())`` in Python. Users are indexed in ``(crc32, user_id)``
    order: arbitrary but reproducible, and -- unlike ``user_id`` order -- computable per hash
    range without a global sort.
    """
    return F.crc32(F.col(col).cast("binary"))


def bucket_bits(shuffle_partitions: int) -> int:
    """How many leading bits of :func:`user_order` make a bucket: ~16 buckets per partition.

    Buckets only spread the work; the resulting indices do not depend on this number.
    """
    return min(20, max(4, math.ceil(math.log2(16 * max(1, shuffle_partitions)))))


# --------------------------------------------------------------------------- transforms
def user_item_sets(positives: DataFrame, bits: int) -> DataFrame:
    """``[_bucket int, _order long, user_id, items array<string>]``: one row per user.

    ``positives`` are events that passed the positive rule (``user_id``, ``item_id``, ...).
    ``items`` is the user's distinct item_ids in ascending order (duplicates collapse: a
    binary matrix). ``_order`` is :func:`user_order` and ``_bucket`` its top ``bits`` bits;
    rows end hash-partitioned by ``_bucket``, so each bucket (a contiguous range of the user
    order) lives in one partition.

    Aggregated before the bucket shuffle: partial sets are built map-side (duplicates
    collapse before rows move), and the per-user rows are then shuffled by bucket.
    """
    keyed = positives.select(
        F.shiftright(user_order(), 32 - bits).cast("int").alias(BUCKET), "user_id", "item_id")
    return (
        keyed.groupBy(BUCKET, "user_id")
        # sort_array, not array_sort: the latter runs an interpreted comparator per element.
        .agg(F.sort_array(F.collect_set("item_id")).alias("items"))
        .repartition(BUCKET)
        .select(BUCKET, user_order().alias(ORDER), "user_id", "items")
    )


def cap_users(users: DataFrame, max_user_positives: int | None) -> DataFrame:
    """Users with at most ``max_user_positives`` items (bots / shared accounts go)."""
    if max_user_positives is None:
        return users
    return users.filter(F.size("items") <= max_user_positives)


def item_user_counts(users: DataFrame) -> DataFrame:
    """``[item_id, n_users int]`` over ``users[items]`` (items are distinct per user)."""
    return (
        users.select(F.explode("items").alias("item_id"))
        .groupBy("item_id")
        .agg(F.count(F.lit(1)).cast("int").alias("n_users"))
    )


def items_within(items: Sequence[str] | None) -> Column:
    """``items`` restricted to the given item ids (all when None), order kept."""
    if items is None:
        return F.col("items")
    # isin over a literal list becomes a hash-set lookup (InSet) for more than a few ids.
    return F.filter("items", lambda x: x.isin(list(items)))


def keep_items(users: DataFrame, items: Sequence[str] | None) -> DataFrame:
    """``users`` with ``items`` restricted to ``items`` (None keeps all); rows stay."""
    if items is None:
        return users
    return users.withColumn("items", items_within(items))


def min_positives(users: DataFrame, min_user_positives: int) -> DataFrame:
    """Users with at least ``min_user_positives`` items."""
    return users.filter(F.size("items") >= min_user_positives)


def index_items(counts: DataFrame) -> DataFrame:
    """``[item_idx int, item_id string, n_users int, ...]`` from ``counts[item_id, n_users, ...]``
    (other columns of ``counts`` follow unchanged).

    ``item_idx`` is dense 0..I-1 by ``n_users`` descending then ``item_id`` ascending, so
    index 0 is the most popular title and the order is reproducible. The catalogue is small
    (thousands of titles): one window partition on purpose.
    """
    order = Window.partitionBy(F.lit(0)).orderBy(F.col("n_users").desc(), F.col("item_id").asc())
    rest = [c for c in counts.columns if c not in ("item_id", "n_users")]
    return counts.select(
        (F.row_number().over(order) - 1).cast("int").alias("item_idx"),
        "item_id",
        F.col("n_users").cast("int").alias("n_users"),
        *rest,
    )


def bucket_offsets(sizes: Mapping[int, int]) -> list[tuple[int, int]]:
    """``[(bucket, first user_idx of the bucket)]`` from users per bucket (any order)."""
    out, total = [], 0
    for bucket in sorted(sizes):
        out.append((int(bucket), total))
        total += int(sizes[bucket])
    if total > _INT32_MAX + 1:
        raise InputDataError(f"{total} users do not fit an int32 user_idx")
    return out


def index_users(users: DataFrame, offsets: Sequence[tuple[int, int]]) -> DataFrame:
    """``users`` plus ``user_idx`` int: the rank of ``(_order, user_id)``, dense 0..U-1.

    Stays distributed: each bucket (a range of ``_order``) is ranked inside its partition,
    and ``offsets`` -- ``(bucket, users in earlier buckets)`` from :func:`bucket_offsets`,
    one small row per bucket -- turn local ranks into global ones. No global sort, no
    single-partition window; the result does not depend on how buckets meet partitions.
    """
    spark = users.sparkSession
    rank = F.row_number().over(Window.partitionBy(BUCKET).orderBy(ORDER, "user_id"))
    offset_df = spark.createDataFrame(list(offsets), f"{BUCKET} int, _offset long")
    return (
        users.withColumn("_rank", rank)
        .join(F.broadcast(offset_df), BUCKET)
        .withColumn("user_idx", (F.col("_offset") + F.col("_rank") - 1).cast("int"))
        .drop("_rank", "_offset")
    )


def split_of(split_cfg: SplitConfig) -> Column:
    """train | val | test by ``u = unit_hash(salt, user_id)``: val when ``u < val_fraction``,
    test when ``u < val_fraction + test_fraction``, else train. The salt keeps a user in
    the same split week after week."""
    u = unit_hash(split_cfg.salt, "user_id")
    val_end = split_cfg.val_fraction
    test_end = split_cfg.val_fraction + split_cfg.test_fraction
    return F.when(u < val_end, "val").when(u < test_end, "test").otherwise("train")


def assign_split(users: DataFrame, split_cfg: SplitConfig) -> DataFrame:
    """``users`` plus ``split`` (see :func:`split_of`)."""
    return users.withColumn("split", split_of(split_cfg))


def fold_in_size(n: Column, fraction: float) -> Column:
    """``k = ceil(fraction * n)`` capped to ``[1, n - 1]``, so a held-out user with n >= 2
    always has something to predict (n = 1: the one item is fold-in)."""
    k = F.ceil(n * fraction - _CEIL_EPS)
    return F.greatest(F.lit(1), F.least(k, n - 1)).cast("int")


def assign_parts(users: DataFrame, split_cfg: SplitConfig) -> DataFrame:
    """``users[user_id, items, split, ...]`` -> one row per (user, item) with ``part``.

    Output: the input columns except ``items``, plus ``item_id`` and ``part``. Train users:
    every item is ``train``. Val/test users with n items: items ranked by
    ``unit_hash(salt, user_id, item_id)`` (then item_id); the first
    ``k = fold_in_size(n)`` are ``fold_in`` (the model's input), the rest ``held_out``.
    """
    rest = [c for c in users.columns if c != "items"]
    train = users.filter(F.col("split") == "train").select(
        *rest, F.explode("items").alias("item_id"), F.lit("train").alias("part"))
    # Held-out users (a few percent): rank items by their hash. Higher-order functions run
    # interpreted, so they stay off the train users' rows.
    keyed = F.transform("items", lambda x: F.struct(
        unit_hash(split_cfg.salt, F.col("user_id"), x).alias("k"), x.alias("item_id")))
    k = fold_in_size(F.size("items"), split_cfg.fold_in_fraction)
    held = users.filter(F.col("split") != "train").select(
        *rest, k.alias("_k"), F.posexplode(F.sort_array(keyed)).alias("_pos", "_e"))
    part = F.when(F.col("_pos") < F.col("_k"), "fold_in").otherwise("held_out")
    return train.unionByName(
        held.select(*rest, F.col("_e.item_id").alias("item_id"), part.alias("part")))
