"""Peak memory of the daily output's validation (`piarec ops validate`) on a large day.

    python benchmarks/validate_memory.py [--users 2000000] [--k 100] [--items 4000]
        [--workdir /tmp/piarec-bench-validate]

Writes (once, cached in ``--workdir``) a committed recommendations day ``dt=D`` with one
arm of ``--users`` users x ``--k`` titles in 8 Parquet files (row groups of 65,536 users),
then measures, each arm in its own subprocess, the peak RSS of:

- stream: :func:`piarec.ops.validate_day` (every row checked, batches of 65,536 rows,
  a 64-bit hash per user for the uniqueness check; the check the scoring job runs before
  its commit);
- whole-day: reading the day into one Arrow table and counting distinct users, the core
  of the validation as it was before it streamed (the baseline);
- idle: the same process importing the same modules and doing nothing (the floor).

Prints peak RSS per arm and the ratio whole-day / stream; two runs at different
``--users`` give the growth per user of each arm.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

DAY = date(2026, 3, 10)


def write_day(root: Path, users: int, k: int, items: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from piarec.scoring.arrow import OUTPUT_SCHEMA

    from piarec.data.commit import PartitionCommit

    day = root / "recommendations" / f"dt={DAY}"
    if (day / "_SUCCESS").exists():
        return day
    with PartitionCommit(str(day)) as run:
        part = Path(run.data_uri) / "arm=champion"
        part.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        vocab = pa.array([f"t{i:05d}" for i in range(items)])
        per_file = -(-users // 8)
        for f in range(8):
            lo, hi = f * per_file, min(users, (f + 1) * per_file)
            n = hi - lo
            idx = np.argsort(rng.random((n, items), dtype=np.float32), axis=1)[:, :k] if items <= 64 else \
                (rng.integers(0, items, (n, 1)) + np.arange(k)[None, :]) % items  # distinct per row
            offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
            scores = np.sort(rng.random((n, k), dtype=np.float32), axis=1)[:, ::-1].ravel()
            table = pa.table({
                "user_id": pa.array([f"u{u:09d}" for u in range(lo, hi)]),
                "item_ids": pa.ListArray.from_arrays(offsets, vocab.take(pa.array(idx.ravel()))),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
                "model_version": pa.array(["1"] * n), "source": pa.array(["model"] * n),
            }, schema=OUTPUT_SCHEMA)
            pq.write_table(table, part / f"part-{f:05d}.zstd.parquet", compression="zstd", row_group_size=65_536)
            print(f"  wrote file {f + 1}/8 ({hi:,} users)", flush=True)
        run.commit({"date": DAY.isoformat(), "k": k, "arms": {"champion": {
            "model": {"version": "1", "n_items": items},
            "counts": {"users": users, "by_source": {"model": users, "popularity": 0}}}}})
    return day


def arm(name: str, root: str) -> None:
    import pyarrow.compute as pc

    from piarec import ops
    from piarec.data import reader
    from piarec.config import load_config

    cfg = load_config(environ={}, overrides={"storage": {"root": root}})
    t0 = time.perf_counter()
    if name == "stream":
        users = ops.validate_day(cfg, DAY, ["champion"], None, 1000)["arms"][0]["users"]
    elif name == "whole-day":
        table = reader.read_table(str(Path(root) / "recommendations" / f"dt={DAY}"))
        users = pc.count_distinct(table.column("user_id")).as_py()
    else:
        users = 0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"arm": name, "users": users, "seconds": round(time.perf_counter() - t0, 1), "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=2_000_000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--workdir", default="/tmp/piarec-bench-validate")
    args = p.parse_args()
    root = Path(args.workdir) / f"{args.users}x{args.k}-rg65536-v2"
    print(f"day: {args.users:,} users x {args.k} titles under {root}", flush=True)
    # Every step in its own process, from a parent that imports nothing heavy: Linux keeps
    # the RSS high-water mark across fork and exec, so a big parent would inflate them all.
    subprocess.run([sys.executable, __file__, "_write", str(root), str(args.users), str(args.k), str(args.items)],
                   check=True)
    results = {}
    for name in ("idle", "stream", "whole-day"):
        out = subprocess.run([sys.executable, __file__, "_arm", name, str(root)], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(results[name], flush=True)
    floor = results["idle"]["peak_mb"]
    print(f"\n| arm | peak RSS (MB) | seconds |\n| --- | ---: | ---: |")
    for name in ("idle", "stream", "whole-day"):
        print(f"| {name} | {results[name]['peak_mb']:,.0f} | {results[name]['seconds']} |")
    print(f"\nwhole-day / stream peak RSS: {results['whole-day']['peak_mb'] / results['stream']['peak_mb']:.1f}x "
          f"(idle floor {floor:,.0f} MB); run two --users sizes for the growth per user")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_arm":
        arm(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_write":
        write_day(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    else:
        main()
