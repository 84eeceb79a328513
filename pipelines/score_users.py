"""Daily scoring: top-K recommendations for every user active at day D.

    spark-submit pipelines/score_users.py --date 2026-03-10 [--config conf.yaml]
        [--events URI] [--out URI] [--model URI] [--k N] [--arm NAME]

Extract: :func:`pipelines.events.daily_histories` (one row per user active in
``[D - scoring.history_days, D + 1)`` UTC). Transform: ``mapInArrow`` with
:class:`piarec.scorer.TopKScorer` in every Python worker. Load: Parquet (zstd) under
``<out>/dt=D/arm=<arm>/``, written to a temporary sibling and published atomically with
``manifest.json`` and ``_SUCCESS`` (:func:`piarec.storage.publish_dir`).

The model travels to executors as plain bytes (weights file, config JSON, item ids,
popularity): nothing is unpickled into torch objects, and each Python worker process
builds the model once (a cache keyed by model version and content digest).

The ``pipelines`` package must be importable on executors (installed in the image, or
shipped with ``--py-files``): the worker function is pickled by reference to this module.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import re
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from piarec.bundle import CONFIG_FILE, WEIGHTS_FILE, ModelBundle
from piarec.config import ModelConfig, PipelineConfig, join_uri, load_config
from piarec.errors import ConfigError, PiarecError
from piarec.model import MultiVAE
from piarec.registry import ModelRef, load_model
from piarec.scorer import MODEL, OUTPUT_SCHEMA, POPULARITY, TopKScorer, map_arrow_lists, to_record_batch
from piarec.storage import publish_dir, remove, resolve, temp_sibling
from pipelines.events import daily_histories
from pipelines.spark import get_spark, spark_path

MANIFEST = "_manifest.json"
UNKNOWN_COL = "unknown_titles"  # per-user count of history + seen entries outside the vocabulary
_ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# Worker-side cache: (model version, content digest) -> (bundle, vocabulary as Arrow).
# Python workers are reused across tasks, so each process builds the model once.
_WORKER_MODELS: dict[tuple[str, str], tuple[ModelBundle, pa.Array]] = {}


def bundle_payload(bundle: ModelBundle, ref: ModelRef) -> dict[str, Any]:
    """The bundle as plain bytes and strings for a broadcast, with a sha256 digest."""
    src = Path(ref.local_dir)
    payload = {
        "weights": (src / WEIGHTS_FILE).read_bytes(),
        "config": (src / CONFIG_FILE).read_text(),
        "item_ids": [str(x) for x in bundle.item_ids.tolist()],
        "popularity": np.asarray(bundle.popularity, np.float32).tobytes(),
    }
    h = hashlib.sha256()
    for part in (payload["weights"], payload["config"].encode(), "\0".join(payload["item_ids"]).encode(),
                 payload["popularity"]):
        h.update(hashlib.sha256(part).digest())
    payload["digest"] = h.hexdigest()
    return payload


def bundle_from_payload(payload: dict[str, Any]) -> ModelBundle:
    """Rebuild the bundle from :func:`bundle_payload`; weights load with weights_only=True."""
    config = json.loads(payload["config"])
    model = MultiVAE(int(config["n_items"]), ModelConfig.model_validate(config["model"]))
    model.load_state_dict(torch.load(io.BytesIO(payload["weights"]), map_location="cpu", weights_only=True))
    item_ids = np.asarray(payload["item_ids"], dtype=object)
    popularity = np.frombuffer(payload["popularity"], dtype=np.float32).copy()
    return ModelBundle(model.eval(), item_ids, popularity)


def _worker_bundle(key: tuple[str, str], broadcast: Any) -> tuple[ModelBundle, pa.Array]:
    hit = _WORKER_MODELS.get(key)
    if hit is None:
        _WORKER_MODELS.clear()  # at most one model per worker: memory stays flat across runs
        bundle = bundle_from_payload(broadcast.value)
        hit = _WORKER_MODELS[key] = (bundle, pa.array(bundle.item_ids.tolist(), pa.string()))
    return hit


def score_partition(
    batches: Iterator[pa.RecordBatch], *, key: tuple[str, str], broadcast: Any, k: int, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: ``user_id, history, seen`` batches in, batches in
    :data:`OUTPUT_SCHEMA` plus ``unknown_titles`` int64 out, one row per input row."""
    # Spark runs one task per core; torch threads on top would oversubscribe the executor.
    torch.set_num_threads(1)
    bundle, vocab = _worker_bundle(key, broadcast)
    scorer = TopKScorer(bundle, k, batch_size)
    for batch in batches:
        history, unknown_history = map_arrow_lists(batch.column("history"), vocab)
        seen, unknown_seen = map_arrow_lists(batch.column("seen"), vocab)
        scored = scorer.score(history, seen)
        out = to_record_batch(batch.column("user_id"), scored, vocab, key[0])
        yield out.append_column(UNKNOWN_COL, pa.array(unknown_history + unknown_seen, pa.int64()))


def score_histories(histories: DataFrame, broadcast: Any, key: tuple[str, str], k: int, batch_size: int) -> DataFrame:
    """``user_id, history, seen`` -> the output columns plus ``unknown_titles`` bigint,
    one row per input row; ``key`` = (model version, payload digest) of ``broadcast``."""
    schema = from_arrow_schema(OUTPUT_SCHEMA.append(pa.field(UNKNOWN_COL, pa.int64())))
    # A partial of a module-level function pickles by reference: workers import this
    # module, so _WORKER_MODELS is the same dict for every task of a worker process.
    fn = functools.partial(score_partition, key=key, broadcast=broadcast, k=k, batch_size=batch_size)
    return histories.mapInArrow(fn, schema)


def output_uri(out_root: str, day: date, arm: str) -> str:
    return join_uri(out_root, f"dt={day.isoformat()}", f"arm={arm}")


def run(
    spark: SparkSession,
    cfg: PipelineConfig,
    events_uri: str,
    date: date,
    out_root: str,
    model_uri: str,
    k: int,
    arm: str,
) -> dict[str, Any]:
    """Score every user active at ``date`` and publish ``<out_root>/dt=D/arm=<arm>/``.

    Returns the manifest written next to the Parquet files.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not _ARM_NAME.match(arm):
        raise ConfigError(f"arm {arm!r} must be letters, digits, '_' or '-' (it names a folder)")
    bundle, ref = load_model(cfg, model_uri)
    payload = bundle_payload(bundle, ref)
    version = ref.version or f"local-{payload['digest'][:12]}"
    histories = daily_histories(spark, events_uri, cfg, date)
    broadcast = spark.sparkContext.broadcast(payload)
    scored = score_histories(histories, broadcast, (version, payload["digest"]), k, cfg.scoring.batch_size)
    # Counts come from an Observation on the write itself: one pass over the data, and
    # the metrics are taken from the result stage's successful tasks only (no double
    # counting on retries), so nothing has to be cached or recomputed.
    obs = Observation("score_users")
    scored = scored.observe(
        obs,
        F.count(F.lit(1)).alias("users"),
        F.sum(F.when(F.col("source") == MODEL, 1).otherwise(0)).alias(MODEL),
        F.sum(F.when(F.col("source") == POPULARITY, 1).otherwise(0)).alias(POPULARITY),
        F.sum(UNKNOWN_COL).alias(UNKNOWN_COL),
    )
    final = output_uri(out_root, date, arm)
    tmp = temp_sibling(final)
    try:
        (
            scored.drop(UNKNOWN_COL)
            .write.option("compression", "zstd")
            # Scores are near-unique floats: a dictionary page only costs write time and bytes.
            .option("parquet.enable.dictionary#scores.list.element", "false")
            .parquet(spark_path(tmp))
        )
    except BaseException:
        with contextlib.suppress(OSError):  # keep the original error if cleanup fails too
            remove(resolve(tmp))  # leave no half-written sibling behind; the old partition stays
        raise
    finally:
        broadcast.destroy()
    metrics = {name: int(value or 0) for name, value in obs.get.items()}

    manifest = {
        "date": date.isoformat(),
        "arm": arm,
        "window": {  # [start, end) in UTC
            "start": (date - timedelta(days=cfg.scoring.history_days)).isoformat(),
            "end": (date + timedelta(days=1)).isoformat(),
        },
        "model": {**ref.info(), "version": version, "digest": payload["digest"], "n_items": bundle.n_items},
        "k": k,
        "counts": {"users": metrics["users"], "by_source": {MODEL: metrics[MODEL], POPULARITY: metrics[POPULARITY]}},
        "unknown_titles": metrics[UNKNOWN_COL],
        "schema": OUTPUT_SCHEMA.to_string(show_schema_metadata=False),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # "_manifest.json": Parquet readers of the partition (Spark, pyarrow) skip "_" files.
    publish_dir(tmp, final, manifest, manifest_name=MANIFEST)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="score_users", description=__doc__.split("\n\n")[0])
    p.add_argument("--date", required=True, type=date.fromisoformat, help="scoring day D, YYYY-MM-DD (UTC)")
    p.add_argument("--events", help="events URI (default: storage.events_uri)")
    p.add_argument("--out", help="recommendations root (default: storage.recommendations_uri)")
    p.add_argument("--model", help="model URI or bundle directory (default: scoring.model_uri)")
    p.add_argument("--k", type=int, help="recommendations per user (default: scoring.k)")
    p.add_argument("--arm", help="experiment arm, names the output folder (default: scoring.arm)")
    p.add_argument("--config", help="pipeline config YAML (default: $PIAREC_CONFIG or the packaged local one)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        owns_session = SparkSession.getActiveSession() is None
        spark = get_spark(cfg.spark)
        try:
            manifest = run(
                spark,
                cfg,
                args.events or cfg.storage.events_uri,
                args.date,
                args.out or cfg.storage.recommendations_uri,
                args.model or cfg.scoring.model_uri,
                cfg.scoring.k if args.k is None else args.k,
                args.arm or cfg.scoring.arm,
            )
        finally:
            if owns_session:
                spark.stop()
    except PiarecError as exc:
        if args.debug:
            raise
        print(f"score_users: error: {exc}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(
        f"score_users {manifest['date']} arm={manifest['arm']}: {counts['users']} users "
        f"({counts['by_source'][MODEL]} model, {counts['by_source'][POPULARITY]} popularity), "
        f"k={manifest['k']}, {manifest['unknown_titles']} unknown titles, "
        f"model {manifest['model']['version']} -> "
        f"{output_uri(args.out or cfg.storage.recommendations_uri, args.date, manifest['arm'])}"
    )
    return 0


if __name__ == "__main__":
    if not __package__:
        # spark-submit from a checkout: make the checkout's packages importable.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # Go through the importable module rather than __main__ so the worker function is
    # pickled by reference and its model cache lives in pipelines.score_users on workers.
    from pipelines.score_users import main as _main

    sys.exit(_main())
