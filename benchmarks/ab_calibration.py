"""A/A calibration of the A/B report's intervals on a simulated week.

    flock /tmp/piarec-bench.lock python benchmarks/ab_calibration.py [--users 20000]
        [--items 1000] [--days 100] [--ab-days 7] [--repeats 500] [--workdir DIR]

Runs ``piarec demo``'s closed loop with one arm only (every user served the champion's
list), then computes each user's period sums once with the report's own Spark code
(``pipelines.ab_report.card_events`` / ``user_days`` / ``per_user``). Both halves of any split would serve
identical lists, so re-assigning the users at random is a valid A/A test: ``--repeats``
times, the users are split 50/50 by the salted hash with a new salt, and each ratio metric
is compared between the halves with the report's statistics (delta method, two-sided
p-value of the difference). A calibrated test finds a difference at the 5 % level in about
5 % of the splits; the acceptance band is [3 %, 7 %]. The baseline measured in the same run
is that nominal 5 %: the script prints each metric's share and its ratio to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
import time

import numpy as np
import pyarrow as pa

BAND = (0.03, 0.07)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=1_000)
    p.add_argument("--days", type=int, default=100)
    p.add_argument("--ab-days", type=int, default=7)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from piarec.config import load_config
    from piarec.daily.arms import Assignment
    from piarec.data import layout
    from piarec.demo import START, run_demo
    from piarec.evaluate.ab import ratio, uplift
    from piarec.evaluate.ab_report import RATIO_METRICS
    from pipelines import ab_report
    from pipelines.spark import get_spark

    work = args.workdir or tempfile.mkdtemp(prefix="piarec-aa-")
    t = time.perf_counter()
    run_demo(work, users=args.users, items=args.items, days=args.days, epochs=args.epochs, ab_days=args.ab_days,
             ab_arms="champion=models:/piarec@champion:1")
    loop_s = time.perf_counter() - t
    cfg = load_config(overrides={"storage": {"root": work, "events": None}})
    first = START + dt.timedelta(days=args.days)
    last = first + dt.timedelta(days=args.ab_days - 1)
    spark = get_spark(cfg.spark)
    try:
        days = [first + dt.timedelta(days=i) for i in range(args.ab_days)]
        lists, _ = ab_report.served(spark, layout.recommendations_root(cfg.storage), days)
        ud = ab_report.user_days(ab_report.card_events(spark, cfg, layout.events_root(cfg.storage), first,
                                                       last + dt.timedelta(days=1), None), lists)
        users = ab_report.per_user(ud).toPandas()
    finally:
        spark.stop()
    ids = pa.array(users.user_id.tolist())
    viewer = users.view_days.to_numpy() > 0
    t = time.perf_counter()
    significant = {m: 0 for m in RATIO_METRICS}
    for r in range(args.repeats):
        half = Assignment(f"aa-{r}", (0.5, 0.5)).assign(ids) == 1
        for metric, (y, x, population) in ab_report.RATIOS.items():
            inside = viewer if population == "viewers" else np.ones(len(users), bool)
            yv, xv = users[y].to_numpy(float), users[x].to_numpy(float)
            a, b = inside & ~half, inside & half
            if uplift(ratio(yv[a], xv[a]), ratio(yv[b], xv[b])).p_value < 0.05:
                significant[metric] += 1
    split_s = time.perf_counter() - t
    print(f"A/A calibration: {args.users} users x {args.items} titles, {args.ab_days} simulated days "
          f"({first} .. {last}), {int(viewer.sum())} users with a view, {args.repeats} re-assignments "
          f"(loop {loop_s:.0f} s, splits {split_s:.0f} s)")
    ok = True
    for metric, n in significant.items():
        share = n / args.repeats
        inside = BAND[0] <= share <= BAND[1]
        ok &= inside
        print(f"  {metric:<26} significant at 5 %: {share:6.1%}  ratio to nominal 5 %: {share / 0.05:.2f}  "
              f"{'in' if inside else 'OUTSIDE'} [{BAND[0]:.0%}, {BAND[1]:.0%}]")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
