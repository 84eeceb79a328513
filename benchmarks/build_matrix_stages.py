"""Where the weekly snapshot job's first stage spends its time, on one cached event log.

    flock /tmp/piarec-bench.lock python benchmarks/build_matrix_stages.py [--millions 20]
        [--repeats 3] [--workdir /tmp/piarec-bench-bm]

Runs, in one Spark session on ``local[2]``, growing prefixes of the job's first stage
(:func:`pipelines.build_matrix.run` step 1) and prints the best wall time of each:

1. scan: the five columns the job reads, to Spark's ``noop`` sink;
2. classify: every event with its drop reason, counted by reason (an ``Observation``);
3. positives: only the clean positive events;
4. sets: one row per user with the sorted array of their items, partitioned by bucket,
   persisted and counted (what the job keeps in memory).

Each line's increase over the previous one is that step's cost. The event log is the one
``benchmarks/build_matrix.py`` generates and caches (generated here when missing).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_matrix import COLUMNS, DAYS, START, events_dir  # noqa: E402  (benchmarks/build_matrix.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--millions", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/piarec-bench-bm")
    args = p.parse_args()

    from pyspark.sql import functions as F

    from piarec.config import SparkConfig, load_config
    from pipelines import build_common as common
    from pipelines.events import positive_condition
    from pipelines.matrix_transforms import bucket_bits, user_item_sets
    from pipelines.spark import get_spark

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, summary = events_dir(workdir, args.millions)
    spark_cfg = SparkConfig(master="local[2]", app_name="bench-build-matrix-stages", shuffle_partitions=4,
                            driver_memory="6g", conf={"spark.ui.showConsoleProgress": "false"})
    cfg = load_config(overrides={"spark": spark_cfg.model_dump()})
    spark = get_spark(cfg.spark)
    spark.sparkContext.setLogLevel("ERROR")
    end = START + timedelta(days=DAYS)
    start = end - timedelta(days=cfg.window_days)
    bits = bucket_bits(int(spark.conf.get("spark.sql.shuffle.partitions")))

    def events():
        return common.observed_events(spark, common.open_window(spark, cfg, str(path), start, end), cfg, start, end)[0]

    def positives():
        return events().filter((F.col("_drop") == 0) & positive_condition(cfg.positive))

    def noop(df) -> None:
        df.write.format("noop").mode("overwrite").save()

    def sets() -> None:
        users = user_item_sets(positives(), bits).persist()
        users.count()
        users.unpersist()

    stages = [
        ("scan", lambda: noop(common.open_window(spark, cfg, str(path), start, end).df.select(*COLUMNS))),
        ("+ classify and count", lambda: noop(events())),
        ("+ keep positives", lambda: noop(positives())),
        ("+ one row per user (persisted)", sets),
    ]
    print(f"{summary['events']:,} events, {DAYS} daily partitions, local[2], best of {args.repeats}\n")
    print("| stage | seconds | events/s |\n| --- | ---: | ---: |")
    for name, fn in stages:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        print(f"| {name} | {best:.2f} | {summary['events'] / best / 1e3:,.0f}k |", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
