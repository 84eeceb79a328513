"""Daily scoring at "tens of millions" on this machine: >= 10M active users x 4,000 titles,
inputs and outputs on the local disk, with the single-node engine and with the Spark job on
the stack's standalone cluster (2 workers x 1 core, executors without piarec installed).

    flock /tmp/piarec-bench.lock python benchmarks/score_scale.py [--users 10000000]
        [--items 4000] [--seen 40] [--k 100] [--workdir DIR] [--skip local,cluster]
        [--keep] [--out docs/_bench_scale.md]

The inputs are benchmarks/score.py's (the same random Multi-VAE and Zipf-like histories,
``users // 250,000`` files). Each engine scores the day once into its own output and is
timed from the start of the job to its commit (validation included). Peak memory per
process: the local engine's ``ru_maxrss``; for the cluster run, every process of the run is
sampled once a second from ``/proc`` (VmRSS) and the highest value is reported per role:
the driver (Python), the driver's JVM, each executor JVM, each Python worker. The reference
point in the same run is the 1M-user day of the local engine (``--reference``): its rate and
memory against the 10M day's show how both grow, and the 25M line divides 25M users by the
measured rate -- an extrapolation, stated as such, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import threading
import time
from pathlib import Path

from score import DAY, WARM_DAY, make_histories, on_cluster, prepare, run_arm

ROLES = (("executor JVM", "CoarseGrainedExecutorBackend"), ("driver JVM", "org.apache.spark.deploy.SparkSubmit"),
         ("Python worker", "pyspark.daemon"), ("Python worker", "pyspark.worker"), ("driver (Python)", "_arm spark"))


class RssSampler(threading.Thread):
    """Peak VmRSS per process whose command line names a Spark role, sampled every second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    status = Path(f"/proc/{pid}/status").read_text()
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                role = next((name for name, marker in ROLES if marker in cmd), None)
                if role is None or ("JVM" in role) != (comm == "java"):  # not the launcher scripts
                    continue
                rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0.0)
                self.peaks[pid] = (role, max(rss, self.peaks.get(pid, (role, 0.0))[1]))

    def by_role(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for role, mb in self.peaks.values():
            out.setdefault(role, []).append(mb)
        return {k: sorted(v, reverse=True) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000_000)
    p.add_argument("--reference", type=int, default=1_000_000, help="users of the local engine's reference day")
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--seen", type=int, default=40)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--workdir", default="/tmp/piarec-bench-scale")
    p.add_argument("--skip", default="", help="comma list: local, cluster")
    p.add_argument("--keep", action="store_true", help="keep the outputs (several GB)")
    p.add_argument("--out", help="write the Markdown report here")
    args = p.parse_args(argv)
    skip, work, model, config = prepare(args)
    t = time.perf_counter()
    files = max(8, args.users // 250_000)
    hist = make_histories(work / f"histories-{args.users}", DAY, args.users, args.items, args.seen, files=files)
    make_histories(work / f"histories-{args.users}", WARM_DAY, 50_000, args.items, args.seen)
    ref = make_histories(work / f"histories-{args.reference}", DAY, args.reference, args.items, args.seen)
    print(f"inputs ready in {time.perf_counter() - t:.0f} s: {_size(Path(hist)) / 1e9:.2f} GB of histories")
    common = {"model": model, "k": args.k}
    results: dict[str, dict] = {}
    if "local" not in skip:
        results[f"local engine, {args.reference:,}"] = run_arm(
            "local", config=config, histories=ref, out_dir=work / "out-local-ref", **common)
        results[f"local engine, {args.users:,}"] = run_arm(
            "local", config=config, histories=hist, out_dir=work / "out-local", **common)
        results[f"local engine, {args.users:,}"]["output_gb"] = _size(work / "out-local") / 1e9
        _clean(work / "out-local", args.keep)
    if "cluster" not in skip:
        sampler = RssSampler()
        sampler.start()
        results[f"Spark job on the cluster, {args.users:,}"] = on_cluster(
            work, lambda cfg: run_arm("spark", config=cfg, histories=hist, out_dir=work / "out-cluster", **common))
        sampler.stop.set()
        results[f"Spark job on the cluster, {args.users:,}"]["processes"] = sampler.by_role()
        _clean(work / "out-cluster", args.keep)
    report = render(args, results)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _clean(path: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


def render(args: argparse.Namespace, results: dict[str, dict]) -> str:
    lines = ["| run | users | wall (s) | users/s | peak memory per process (MB) |", "| --- | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        if "processes" in r:
            memory = "; ".join(f"{role} " + ", ".join(f"{mb:,.0f}" for mb in mbs[:4])
                               for role, mbs in r["processes"].items())
        else:
            memory = f"one process {r['peak_rss_mb']:,.0f}"
        lines.append(f"| {name} | {r['users']:,} | {r['seconds']:.0f} | {r['users'] / r['seconds']:,.0f} | {memory} |")
    notes = []
    for name, r in results.items():
        if r["users"] >= args.users:
            rate = r["users"] / r["seconds"]
            notes.append(f"- {name}: 25M users would take {25e6 / rate / 3600:.2f} h at the measured rate "
                         f"(extrapolated linearly, not measured)")
    ref, big = (results.get(f"local engine, {n:,}") for n in (args.reference, args.users))
    if ref and big:
        notes.append(f"- local engine, {args.users:,} vs {args.reference:,} users: rate "
                     f"{(big['users'] / big['seconds']) / (ref['users'] / ref['seconds']):.2f}x, peak RSS "
                     f"{big['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x; output {big.get('output_gb', 0):.1f} GB")
    head = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; "
            f"{args.items:,} titles, ~{args.seen} seen per user, top-{args.k}; local disk.")
    return "\n".join([head, "", *lines, "", *notes, ""])


if __name__ == "__main__":
    main()
