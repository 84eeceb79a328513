"""Daily scoring speed and memory: plain torch loop vs the single-node engine vs the Spark
job vs Spark ALS, on the same synthetic day, in one run.

    flock /tmp/piarec-bench.lock python benchmarks/score.py [--users 200000] [--items 4000]
        [--seen 40] [--k 100] [--als-users 20000] [--memory 1000000,4000000]
        [--workdir DIR] [--skip spark,cluster,als,memory] [--out docs/_bench_score.md]

Synthetic inputs (cached in ``--workdir``): a random Multi-VAE (the default shape: 600
hidden, 200 latent, decoder 200 -> I) saved as a bundle, and a published histories
partition ``dt=D`` (Parquet, 8 files; ~``--seen`` distinct titles seen per user drawn from a
Zipf-like popularity, ~3/4 of them positives; 10 % of users have no positives, so they get
the popularity fallback). Every arm reads those Parquet files and writes Parquet (zstd):

- plain: the reference loop: pyarrow reader, vectorised vocabulary mapping, sparse
  encoder, fp32 decoder in batches of 4,096, mask, ``torch.topk``, pyarrow Parquet zstd
  writer with default settings; torch on all cores. Stage times are reported.
- local: ``piarec score --engine local`` (:func:`piarec.daily.local_engine.run_local`), one worker
  thread per core, and again with one worker thread; on a machine with a CUDA GPU also on the
  GPU (``--device cuda``: the bf16 decoder pass and its exact correction, scoring.precision auto).
- spark: ``piarec score --histories`` (:func:`pipelines.score_users.run`), local[cores],
  timed after a warm-up run on a smaller day in the same session.
- cluster: the same job on the Spark standalone cluster of ``piarec stack up --no-airflow``
  (2 workers x 1 core, executors 1 GB, their Python without piarec: the code is shipped),
  started for this arm and stopped after it; same warm-up.
- als: Spark ALS (rank 200, implicit, 1 iteration) ``recommendForAllUsers(100)`` and a
  Parquet write, on ``--als-users`` users of the same histories.
- memory: the local engine on ``--memory`` users each; peak RSS of its process.
- baseline tree (``--baseline-tree DIR``): the local engine imported from a checkout of an
  earlier revision, on the same day, so a change's cost is a ratio from one run; and this
  tree's local engine with the pre-commit validation replaced by a no-op (the commit alone).

Each arm runs in its own subprocess (``python benchmarks/score.py _arm NAME ...``) so
peak RSS and thread settings do not leak between arms. Results print as a Markdown table
and are written to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DAY, WARM_DAY = date(2026, 3, 10), date(2026, 3, 9)
REPO = Path(__file__).resolve().parents[1]


# -- synthetic inputs ---------------------------------------------------------------------
def make_model(directory: Path, n_items: int) -> Path:
    import torch

    from piarec.models.bundle import save_bundle
    from piarec.config import ModelConfig
    from piarec.models.multivae import MultiVAE

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    model = MultiVAE(n_items, ModelConfig())
    rng = np.random.default_rng(0)
    popularity = np.sort(rng.zipf(1.5, n_items).astype(np.float32))[::-1].copy()
    save_bundle(directory, model, item_ids(n_items), popularity)
    return directory


def item_ids(n_items: int) -> np.ndarray:
    return np.array([f"title-{i:06d}" for i in range(n_items)], dtype=object)


def make_histories(root: Path, day: date, n_users: int, n_items: int, seen: int, files: int = 8) -> str:
    """Write ``root/dt=day`` (published) unless it exists; returns ``root``."""
    part = root / f"dt={day.isoformat()}"
    if (part / "_SUCCESS").is_file():
        return str(root)
    part.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(day.toordinal() + n_users)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    p /= p.sum()
    vocab = pa.array(item_ids(n_items).tolist(), pa.string())
    per_file = -(-n_users // files)
    for f in range(files):
        lo, hi = f * per_file, min(n_users, (f + 1) * per_file)
        n = hi - lo
        draws = np.sort(rng.choice(n_items, size=(n, seen + seen // 5), p=p), axis=1)
        keep = np.ones(draws.shape, bool)
        keep[:, 1:] = draws[:, 1:] != draws[:, :-1]  # distinct titles per user
        seen_len = keep.sum(axis=1)
        positive = keep & (rng.random(draws.shape) < 0.75)
        positive[rng.random(n) < 0.10] = False  # users with no positives: popularity fallback
        seen_list = _lists(draws[keep], seen_len, vocab)
        hist_list = _lists(draws[positive], positive.sum(axis=1), vocab)
        users = pa.array([f"user-{u:09d}" for u in range(lo, hi)], pa.string())
        table = pa.table({"user_id": users, "history": hist_list, "seen": seen_list})
        pq.write_table(table, part / f"part-{f:03d}.parquet", compression="zstd", store_schema=False)
    (part / "_SUCCESS").write_bytes(b"")
    return str(root)


def _lists(codes: np.ndarray, lengths: np.ndarray, vocab: pa.Array) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), vocab)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def write_config(work: Path, threads: int | None = None, cluster: dict | None = None) -> Path:
    """The benchmark's configuration: local[cores], or the stack's cluster (``stack.up``'s state)."""
    import yaml

    spark = {"master": f"local[{os.cpu_count()}]", "shuffle_partitions": os.cpu_count(),
             "driver_memory": "6g", "conf": {"spark.ui.enabled": "false"}}
    if cluster is not None:
        spark = {"master": cluster["master"], "shuffle_partitions": 2, "driver_memory": "2g",
                 "conf": {"spark.ui.enabled": "false", "spark.executor.memory": "1g", "spark.driver.host": "127.0.0.1",
                          "spark.pyspark.python": cluster["executor_python"]}}
    cfg = {
        "storage": {"root": str(work)},
        "scoring": {"k": 100, "model_uri": str(work / "model"), "threads": threads},
        "spark": spark,
    }
    path = work / ("bench-cluster.yaml" if cluster else "bench.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def on_cluster(work: Path, run):
    """``run(config)`` with a configuration for a fresh stack's cluster (no Airflow)."""
    from piarec import stack

    state = stack.up(str(work / "stack"), airflow=False)
    try:
        return run(write_config(work, cluster=state))
    finally:
        stack.down(str(work / "stack"))


def prepare(args: argparse.Namespace) -> tuple[set[str], Path, Path, Path]:
    """The arms to skip, the work folder, the model bundle and the local configuration."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    return {s for s in args.skip.split(",") if s}, work, make_model(work / "model", args.items), write_config(work)


# -- arms (each in its own process) -----------------------------------------------------------
def arm_plain(args: argparse.Namespace) -> dict:
    """The plain reference loop, with per-stage times."""
    import pyarrow.dataset as ds
    import torch

    from piarec.models.bundle import load_bundle
    from piarec.models.contract import SparseBatch
    from piarec.scoring.arrow import OUTPUT_SCHEMA, map_arrow_lists

    bundle = load_bundle(args.model)
    model, vocab = bundle.model.eval(), pa.array(bundle.item_ids.tolist(), pa.string())
    dataset = ds.dataset(f"{args.histories}/dt={DAY.isoformat()}", format="parquet")
    stages = dict.fromkeys(["read+map", "encoder", "decoder", "mask", "topk", "arrow", "parquet"], 0.0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out / "part-0.parquet", OUTPUT_SCHEMA, compression="zstd")
    n = 0
    t_start = time.perf_counter()
    it = iter(dataset.to_batches(batch_size=4096))
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        hist, _ = map_arrow_lists(batch.column("history"), vocab)
        seen, _ = map_arrow_lists(batch.column("seen"), vocab)
        stages["read+map"] += time.perf_counter() - t
        with torch.inference_mode():
            t = time.perf_counter()
            mu, _ = model.encode(SparseBatch.from_csr(hist), keep_prob=1.0)
            t2 = time.perf_counter()
            logits = model.logits(mu)
            t3 = time.perf_counter()
            rows = torch.from_numpy(np.repeat(np.arange(seen.n_rows), seen.row_lengths()))
            logits[rows, torch.from_numpy(seen.indices.astype(np.int64))] = -torch.inf
            t4 = time.perf_counter()
            values, idx = torch.topk(logits, args.k, dim=1)
            t5 = time.perf_counter()
        stages["encoder"] += t2 - t
        stages["decoder"] += t3 - t2
        stages["mask"] += t4 - t3
        stages["topk"] += t5 - t4
        offsets = pa.array(np.arange(0, (batch.num_rows + 1) * args.k, args.k, dtype=np.int32))
        table = pa.RecordBatch.from_arrays([
            batch.column("user_id"),
            pa.ListArray.from_arrays(offsets, vocab.take(pa.array(idx.numpy().ravel()))),
            pa.ListArray.from_arrays(offsets, pa.array(values.numpy().ravel())),
            pa.array(["plain"] * batch.num_rows), pa.array(["model"] * batch.num_rows),
        ], schema=OUTPUT_SCHEMA)
        t6 = time.perf_counter()
        writer.write_batch(table)
        stages["arrow"] += t6 - t5
        stages["parquet"] += time.perf_counter() - t6
        n += batch.num_rows
    writer.close()
    seconds = time.perf_counter() - t_start
    per_batch = {k: round(v / (n / 4096) * 1000, 1) for k, v in stages.items()}
    return {"users": n, "seconds": seconds, "ms_per_4096": per_batch}


def arm_local(args: argparse.Namespace) -> dict:
    from piarec.config import load_config
    from piarec.daily.local_engine import run_local
    try:
        from piarec.daily.arms import plan_models
    except ImportError:  # a --baseline-tree from before arms as configuration
        from piarec.daily.arms import plan_arms

        def plan_models(cfg, model):
            return plan_arms(cfg, model, "champion")

    if args.skip_validation:  # measure the commit alone: the pre-commit checks replaced by a no-op
        from piarec.daily import publish

        publish.validate_arm_files = lambda *a, **kw: {}

    cfg = load_config(args.config, environ={})
    plan = plan_models(cfg, args.model)
    t = time.perf_counter()
    manifests = run_local(cfg, DAY, args.histories, args.out_dir, plan, args.k, device=args.device or "cpu",
                          threads=args.threads)
    seconds = time.perf_counter() - t
    users = manifests["champion"]["counts"]["users"]
    return {"users": users, "seconds": seconds, "engine": manifests["champion"]["engine"]}


def arm_spark(args: argparse.Namespace) -> dict:
    from piarec.config import load_config
    from piarec.daily.arms import plan_models
    from pipelines import score_users
    from pipelines.spark import get_spark

    cfg = load_config(args.config, environ={})
    spark = get_spark(cfg.spark)
    try:
        plan = plan_models(cfg, args.model)
        score_users.run(spark, cfg, "", WARM_DAY, args.out_dir, plan, args.k,
                        histories_uri=args.histories)  # JVM and Python workers warm
        t = time.perf_counter()
        manifest = score_users.run(spark, cfg, "", DAY, args.out_dir, plan, args.k,
                                   histories_uri=args.histories)["champion"]
        seconds = time.perf_counter() - t
    finally:
        spark.stop()
    return {"users": manifest["counts"]["users"], "seconds": seconds}


def arm_als(args: argparse.Namespace) -> dict:
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    from piarec.config import load_config
    from pipelines.spark import get_spark

    cfg = load_config(args.config, environ={})
    spark = get_spark(cfg.spark)
    try:
        hist = (spark.read.parquet(f"{args.histories}/dt={DAY.isoformat()}")
                .orderBy("user_id").limit(args.als_users)
                .select("user_id", F.posexplode("history").alias("pos", "item_id")))
        users = hist.select("user_id").distinct().withColumn("user", F.monotonically_increasing_id().cast("int"))
        items = hist.select("item_id").distinct().withColumn("item", F.monotonically_increasing_id().cast("int"))
        ratings = (hist.join(users, "user_id").join(items, "item_id")
                   .select("user", "item", F.lit(1.0).alias("rating")).cache())
        n_users = ratings.select("user").distinct().count()
        model = ALS(rank=200, maxIter=1, implicitPrefs=True, userCol="user", itemCol="item",
                    ratingCol="rating", coldStartStrategy="drop", seed=0).fit(ratings)
        t = time.perf_counter()
        model.recommendForAllUsers(args.k).write.mode("overwrite").option("compression", "zstd").parquet(
            args.out_dir)
        seconds = time.perf_counter() - t
    finally:
        spark.stop()
    return {"users": n_users, "seconds": seconds}


ARMS = {"plain": arm_plain, "local": arm_local, "spark": arm_spark, "als": arm_als}


def run_arm(name: str, tree: Path = REPO, **kw) -> dict:
    """Run one arm in its own process, importing piarec from ``tree`` (this checkout, or
    the ``--baseline-tree`` of an earlier revision)."""
    cmd = [sys.executable, __file__, "_arm", name] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()
                                                     if v is not None]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"arm {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def arm_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    for opt in ("config", "model", "histories", "out-dir", "device"):
        p.add_argument(f"--{opt}")
    for opt in ("k", "threads", "als-users"):
        p.add_argument(f"--{opt}", type=int)
    p.add_argument("--skip-validation", type=int, default=0)
    args = p.parse_args(argv)
    result = ARMS[args.name](args)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, default=str))


# -- the report ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--seen", type=int, default=40)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--als-users", type=int, default=20_000)
    p.add_argument("--memory", default="1000000,4000000", help="user counts for the memory arm")
    p.add_argument("--workdir", default="/tmp/piarec-bench-score")
    p.add_argument("--skip", default="", help="comma list of arms to skip: spark, cluster, als, memory, gpu")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--baseline-tree", type=Path,
                   help="a checkout of an earlier revision (git worktree add DIR REV): its local engine "
                        "runs too, on the same day, for a ratio measured in the same run")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --baseline-tree: alternate this tree's and the baseline's local engine this many "
                        "times and report the medians (their ratio is the change's cost)")
    args = p.parse_args(argv)
    skip, work, model, config = prepare(args)
    gpu = gpu_name()
    hist = make_histories(work / f"histories-{args.users}", DAY, args.users, args.items, args.seen)
    make_histories(work / f"histories-{args.users}", WARM_DAY, max(args.users // 10, 1000), args.items, args.seen)
    common = {"config": config, "model": model, "histories": hist, "k": args.k}
    results: dict[str, dict] = {}
    results["plain"] = run_arm("plain", out_dir=work / "out-plain", **common)
    results["local"] = run_arm("local", out_dir=work / "out-local", **common)
    results["local, 1 thread"] = run_arm("local", out_dir=work / "out-local-1", threads=1, **common)
    if gpu and "gpu" not in skip:
        results["local, GPU"] = run_arm("local", out_dir=work / "out-local-gpu", device="cuda", **common)
    if args.baseline_tree:
        base, new = [], [results["local"]]
        for r in range(args.repeats):
            base.append(run_arm("local", tree=args.baseline_tree, out_dir=work / "out-local-base", **common))
            if r + 1 < args.repeats:
                new.append(run_arm("local", out_dir=work / "out-local", **common))
        results["local"] = median_run(new)
        results["local, baseline tree"] = median_run(base)
        results["local, no pre-commit validation"] = run_arm("local", out_dir=work / "out-local-noval",
                                                             skip_validation=1, **common)
    if "spark" not in skip:
        results["spark"] = run_arm("spark", out_dir=work / "out-spark", **common)
    if "cluster" not in skip:
        results["cluster"] = on_cluster(work, lambda cfg: run_arm("spark", out_dir=work / "out-cluster",
                                                                  **{**common, "config": cfg}))
    if "als" not in skip:
        results["als"] = run_arm("als", out_dir=work / "out-als", als_users=args.als_users, **common)
    memory = {}
    if "memory" not in skip:
        for n in [int(x) for x in args.memory.split(",") if x]:
            h = make_histories(work / f"histories-{n}", DAY, n, args.items, args.seen)
            memory[n] = run_arm("local", out_dir=work / f"out-mem-{n}", **{**common, "histories": h})
    report = render(args, results, memory, gpu)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def gpu_name() -> str | None:
    """The CUDA GPU's name, or None on a machine without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def median_run(runs: list[dict]) -> dict:
    """The run of median time among ``runs`` (with every time, for the record)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "all_seconds": [round(r["seconds"], 2) for r in runs]}


def render(args: argparse.Namespace, results: dict[str, dict], memory: dict[int, dict], gpu: str | None = None) -> str:
    rate = {name: r["users"] / r["seconds"] for name, r in results.items()}
    plain = rate["plain"]
    lines = [
        "| arm | users | seconds | users/s | vs plain loop | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        rss = "JVM" if name in ("spark", "cluster", "als") else f"{r['peak_rss_mb']:,.0f}"  # the JVM is another process
        lines.append(f"| {name} | {r['users']:,} | {r['seconds']:.1f} | {rate[name]:,.0f} | "
                     f"{rate[name] / plain:.2f}x | {rss} |")
    notes = []
    if "als" in rate:
        for name in ("local", "spark"):
            if name in rate:
                notes.append(f"- {name} / ALS: {rate[name] / rate['als']:.1f}x")
    if "cluster" in rate and "spark" in rate:
        notes.append(f"- cluster (2 workers x 1 core) / local[{os.cpu_count()}]: {rate['cluster'] / rate['spark']:.2f}x; "
                     f"cluster / local engine: {rate['cluster'] / rate['local']:.2f}x")
    if "local, baseline tree" in rate:
        notes.append(f"- local / local from the baseline tree ({args.baseline_tree}), medians of "
                     f"{len(results['local']['all_seconds'])} alternating runs (seconds: this tree "
                     f"{results['local']['all_seconds']}, baseline {results['local, baseline tree']['all_seconds']}): "
                     f"{rate['local'] / rate['local, baseline tree']:.3f}x; without the pre-commit "
                     f"validation (the commit alone): "
                     f"{rate['local, no pre-commit validation'] / rate['local, baseline tree']:.2f}x")
    stages = results["plain"]["ms_per_4096"]
    notes.append("- plain loop, ms per 4,096 users: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    if memory:
        lines_mem = ["", "| local engine, users | seconds | users/s | peak RSS (MB) |", "| ---: | ---: | ---: | ---: |"]
        for n, r in memory.items():
            lines_mem.append(f"| {n:,} | {r['seconds']:.1f} | {r['users'] / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} |")
        rss = [r["peak_rss_mb"] for r in memory.values()]
        lines_mem.append("")
        lines_mem.append(f"Peak RSS spread: {(max(rss) / min(rss) - 1) * 100:.1f} % "
                         f"({min(rss):,.0f} -> {max(rss):,.0f} MB).")
    else:
        lines_mem = []
    head = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu or 'no GPU'}; "
            f"{args.users:,} users x {args.items:,} titles, ~{args.seen} seen per user, top-{args.k}; "
            f"ALS on {args.als_users:,} users.")
    return "\n".join([head, "", *lines, "", *notes, *lines_mem, ""])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_arm":
        arm_main(sys.argv[2:])
    else:
        main()
