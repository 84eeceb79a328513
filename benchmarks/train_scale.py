"""Weekly training at production scale: throughput of the trainer, its levers, and the
projected wall time of a weekly run.

    python benchmarks/train_scale.py [--users 200000] [--items 4000] [--mean-length 40]
        [--updates 30] [--batch-size 500] [--epochs 200] [--project-users 25000000]
        [--warmup 2] [--arms fp32,bf16,batch2000,bf16+batch2000,tf32,pinned,compiled,ranks2,
                ranks2+batch2000,ranks2+batch2000+coalesced,pair2+batch2000]
        [--threads 1] [--load-users 0 [--load-baseline DIR] [--load-shards N]] [--json OUT]

The matrix is synthetic and shaped like the production window (paper section 4.1: ~25M users,
~4,000 titles, ~40 positives per user): heavy-tailed user lengths (lognormal, clipped to
[5, items / 2]) and Zipf-like title popularity, generated ``--chunk`` users at a time straight
into CSR arrays; nothing dense is ever built. The full shape is ~1B positives (4 GB of int32
indices): a GPU host with 128 GB holds it; this 24 GB machine runs the user count scaled down
and projects to ``--project-users``, saying so.

Every arm trains the production model (Multi-VAE 4,000 -> 600 -> 200 -> 4,000 + PIA, Adam) with
the trainer's own :func:`~piarec.train.trainer.train_step` on the same global batches, after
``--warmup`` untimed updates, in the same run:

- ``fp32``: today's trainer (the baseline every ratio is against);
- ``bf16``: ``training.precision: bf16`` (layers under bf16 autocast, likelihood in fp32);
- ``batch2000``: 2,000 users per update (the learning rate is scaled by sqrt(4); its validation
  NDCG is a separate measurement: see docs/training-scale.md);
- ``bf16+batch2000``: both;
- ``tf32`` (CUDA only): fp32 with TF32 matrix products (``torch.backends.cuda.matmul.allow_tf32``),
  which the trainer leaves off;
- ``pinned`` (CUDA only): batches built in pinned host memory and copied ``non_blocking`` on a
  side stream one batch ahead, so the copy of the next batch overlaps this one's update;
- ``compiled``: the decoder under ``torch.compile`` (compiled during the warm-up updates);
- ``ranks2``: two processes with ``--threads`` torch threads each, data-parallel over gloo
  (NCCL on a GPU host with two GPUs), against one process with the same threads;
  ``ranks2+batch2000``: the same at 2,000 users per global batch;
- ``ranks2+batch2000+coalesced``: the same, with the gradients summed as the trainer did before
  it overlapped them with backward (one all-reduce of all of them, flattened, after backward):
  the baseline of that overlap;
- ``pair2+batch2000``: the two processes of ``ranks2+batch2000`` each stepping on its own half of
  every global batch, with no all-reduce: what two processes sharing this machine can reach at
  all, the ceiling of the ``ranks2`` arms (samples/s of both together, timed by the slower).

Reported per arm: samples (users) per second, seconds per epoch of the measured matrix and of
``--project-users``, peak host RSS and peak device memory. Evaluation is timed on
``--eval-users`` validation users (fold-in 80 %) with the trainer's ``evaluate_model`` on the
same device. The projection of a weekly run is ``epochs x (epoch + evaluation)`` with
``--epochs`` epochs: by default 200, ``training.epochs``, the worst case (early stopping ends
most runs sooner; the table in docs/training-scale.md gives the samples/s each budget needs).

``--load-users N`` also writes an N-user snapshot in the published layout and reports the peak
memory (VmHWM) of ``load_snapshot`` in a fresh process, bytes per user and per positive; with
``--load-baseline DIR`` the loader of another checkout (``git worktree add DIR REV``) is
measured on the same snapshot in the same run; with ``--load-shards N``, also each checkout's
``load_snapshot(shard=(0, N))``: what one of N data-parallel ranks holds. Each load runs in
``--load-repeats`` fresh processes (default 3) and the median peak is reported.

An arm that fails is reported as failed and the others still run; ``--json`` is rewritten after
every arm, so a run cut short by its time limit keeps the arms it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from piarec.config import load_config
from piarec.data.csr import CSR
from piarec.models.contract import SparseBatch
from piarec.models.factory import build_model
from piarec.train.distributed import Ranks
from piarec.train.trainer import TrainRows, train_step


ARMS = ("fp32", "bf16", "batch2000", "bf16+batch2000", "tf32", "pinned", "compiled", "ranks2", "ranks2+batch2000",
        "ranks2+batch2000+coalesced", "pair2+batch2000")
CUDA_ONLY = ("tf32", "pinned")  # skipped on a machine without CUDA


def synthetic_window(n_users: int, n_items: int, mean_length: float, seed: int = 0, chunk: int = 1_000_000) -> CSR:
    """Binary [n_users, n_items] CSR, built ``chunk`` users at a time: lognormal lengths
    (sigma 1, mean ``mean_length`` before clipping to [5, n_items // 2]; repeated draws
    collapse, so rows end slightly shorter) over Zipf(0.9) title popularity."""
    rng = np.random.default_rng(seed)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_cdf = np.cumsum(item_p / item_p.sum())
    sigma = 1.0
    mu = math.log(mean_length) - sigma**2 / 2
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    parts = []
    for start in range(0, n_users, chunk):
        n = min(chunk, n_users - start)
        lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 5, n_items // 2).astype(np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = np.minimum(np.searchsorted(item_cdf, rng.random(len(rows))), n_items - 1)
        part = CSR.from_pairs(rows, cols, n, n_items)
        indptr[start + 1 : start + n + 1] = indptr[start] + part.indptr[1:]
        parts.append(part.indices)
    return CSR(indptr, np.concatenate(parts), n_items)


def _cfg(batch_size: int, lr: float, precision: str):
    return load_config(environ={}, overrides={
        "model": {"hidden_dim": 600, "latent_dim": 200},
        "training": {"batch_size": batch_size, "lr": lr, "precision": precision, "device": "cpu"},
    })


def _peak_device_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _host_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prefetched(train: CSR, batches, device: torch.device):
    """Batches built in pinned memory and copied ``non_blocking`` on a side stream one batch
    ahead: the copy of batch j + 1 runs while the compute stream works on batch j."""
    copies = torch.cuda.Stream(device)

    def staged(rows):
        host = SparseBatch.from_csr(train.take_rows(rows))
        with torch.cuda.stream(copies):
            return SparseBatch(*(t.pin_memory().to(device, non_blocking=True) for t in
                                 (host.indices, host.offsets, host.lengths)))

    nxt = staged(batches[0])
    for j in range(len(batches)):
        cur = nxt
        torch.cuda.current_stream(device).wait_stream(copies)  # this batch's copy is done before it is used
        for t in (cur.indices, cur.offsets, cur.lengths):
            t.record_stream(torch.cuda.current_stream(device))  # and its memory is not reused while in use
        if j + 1 < len(batches):
            nxt = staged(batches[j + 1])
        yield cur


def coalesced_step(model, opt, batch: SparseBatch, weight: float) -> None:
    """One data-parallel update summing the gradients after backward in one flattened
    all-reduce (the trainer's step before :func:`~piarec.train.distributed.summed_gradients`)."""
    opt.zero_grad(set_to_none=True)
    parts = model.loss(batch, 0.2, 0.1, None, step=0)
    (parts.total * weight).backward()
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    flat = torch.cat([*(g.reshape(-1) for g in grads), parts.total.detach().reshape(1) * weight])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    opt.step()


def time_arm(arm: str, train: CSR, order: np.ndarray, args, device: torch.device,
             ranks: Ranks = Ranks()) -> dict:
    """Samples/s of ``arm`` over ``args.updates`` global batches of ``order`` (after
    ``args.warmup`` untimed updates); with several ``ranks``, this rank's part of each global
    batch (``pair2`` arms: stepped on alone, without the all-reduce)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # each arm reports its own peak
        torch.backends.cuda.matmul.allow_tf32 = arm == "tf32"
    alone = arm.startswith("pair2")
    bf16 = "bf16" in arm
    batch_size = 2000 if "batch2000" in arm else args.batch_size
    lr = 1e-3 * math.sqrt(batch_size / 500)
    cfg = _cfg(batch_size, lr, "bf16" if bf16 else "fp32")
    torch.manual_seed(0)
    model = build_model(train.n_cols, cfg.model).to(device)
    if arm == "compiled":  # the decoder, the dense part of an update (the likelihood is already one fused op)
        model.logits = torch.compile(model.logits)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    total = args.updates + args.warmup
    seq = np.resize(order, total * batch_size)  # wraps round when the matrix is smaller
    if arm == "pinned":
        globals_ = [seq[j * batch_size : (j + 1) * batch_size] for j in range(total)]
        source = ((1.0, b) for b in _prefetched(train, globals_, device))
    else:  # the trainer's own batches: with several ranks, this rank's shard of each global batch
        source = TrainRows.sliced(train, ranks, keyed=ranks.parallel).batches(seq, batch_size, device, stream=0)
    t0 = 0.0
    for j, (weight, batch) in enumerate(source):
        if j == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if ranks.parallel:
                torch.distributed.barrier()
            t0 = time.perf_counter()
        if arm.endswith("+coalesced"):
            coalesced_step(model, opt, batch, weight)
        else:
            train_step(model, opt, batch, 0.2, 0.1, weight=1.0 if alone else weight,
                       ranks=Ranks() if alone else ranks, precision=cfg.training.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.backends.cuda.matmul.allow_tf32 = False
    seconds = time.perf_counter() - t0
    row = {"arm": arm, "device": device.type, "batch_size": batch_size,
           "samples_per_s": args.updates * batch_size / seconds, "host_peak_mb": _host_peak_mb(),
           "device_peak_mb": _peak_device_mb(device)}
    if ranks.parallel and not alone:  # what one update's all-reduce alone costs: the whole gradient, 5 times
        flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
        t = time.perf_counter()
        for _ in range(5):
            torch.distributed.all_reduce(flat)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row.update(allreduce_ms=(time.perf_counter() - t) / 5 * 1000, parameters=flat.numel())
    return row


def _rank_main(rank: int, world: int, port: int, arm: str, train: CSR, order: np.ndarray, args, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        out[rank] = time_arm(arm, train, order, args, device, Ranks(rank, world, rank))
    finally:
        torch.distributed.destroy_process_group()


def time_ranks(arm: str, train: CSR, order: np.ndarray, args, world: int = 2) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, port, arm, train, order, args, out), nprocs=world, join=True)
        row = dict(out[0])  # every rank times the same global batches; the slowest sets the pace
        row["samples_per_s"] = min(out[r]["samples_per_s"] for r in range(world))
        row["host_peak_mb"] = max(out[r]["host_peak_mb"] for r in range(world))
        return row


def time_evaluation(train: CSR, args, device: torch.device) -> float:
    """Seconds to evaluate ``args.eval_users`` held-out users (NDCG@100, Recall@20/50) on ``device``."""
    from piarec.data.snapshot import Split
    from piarec.evaluate.protocol import evaluate_model

    n = min(args.eval_users, train.n_rows)
    rows = [train.row(u) for u in range(n)]
    cut = [max(1, int(0.8 * len(r))) for r in rows]
    split = Split(np.arange(n).astype(object), CSR.from_lists([r[:c] for r, c in zip(rows, cut)], train.n_cols),
                  CSR.from_lists([r[c:] for r, c in zip(rows, cut)], train.n_cols))
    model = build_model(train.n_cols, _cfg(args.batch_size, 1e-3, "fp32").model).to(device)
    batch = 2000 if device.type == "cpu" else 20_000
    warm = min(n, 2000)  # untimed: the device's first kernels and allocations
    evaluate_model(model, Split(split.user_ids[:warm], split.fold_in.take_rows(np.arange(warm)),
                                split.held_out.take_rows(np.arange(warm))), batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    evaluate_model(model, split, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def load_rss(n_users: int, args) -> list[dict]:
    """Peak memory of ``load_snapshot`` on an ``n_users`` snapshot, each in a fresh process: this
    checkout's loader, then that of ``args.load_baseline`` (another checkout) when given."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_gate import write_snapshot  # the published layout, as the tests write it

    from piarec.data.snapshot import Snapshot, Split

    csr = synthetic_window(n_users, args.items, args.mean_length, seed=1)
    empty = CSR(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), args.items)
    no_users = np.array([], dtype=object)
    snap = Snapshot("memory://scale", {"window": {"start": "2026-01-01", "end": "2026-04-01"}},
                    np.array([f"t{i}" for i in range(args.items)], dtype=object),
                    np.bincount(csr.indices, minlength=args.items).astype(np.int64), csr,
                    np.array([f"user-{u:09d}" for u in range(n_users)], dtype=object),
                    Split(no_users, empty, empty), Split(no_users, empty, empty))
    del csr
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork.
    hwm = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = write_snapshot(snap, Path(tmp, "window_end=2026-04-01"))
        here = str(Path(__file__).parents[1])
        loads = [None, *([(0, args.load_shards)] if args.load_shards > 1 else [])]
        runs = [(code, shard) for code in (here, *([args.load_baseline] if args.load_baseline else []))
                for shard in loads]
        for code_dir, shard in runs:
            # import piarec from code_dir, ahead of an editable install's finder
            pre = (f"import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
                   f"sys.path.insert(0, {code_dir!r}); import piarec.data.snapshot as m; ")
            base = subprocess.run([sys.executable, "-c", pre + f"print({hwm})"], capture_output=True, text=True,
                                  check=True)
            load = "m.load_snapshot(sys.argv[1])" if shard is None else f"m.load_snapshot(sys.argv[1], shard={shard!r})"
            peaks = []
            for _ in range(args.load_repeats):  # the peak moves by up to ~20 % between fresh processes
                got = subprocess.run([sys.executable, "-c", pre + f"s = {load}; "
                                      f"print(m.__file__, s.train.nnz, {hwm})", uri],
                                     capture_output=True, text=True, check=True)
                where, nnz, peak_kb = got.stdout.split()
                peaks.append(int(peak_kb))
            peak_kb = int(np.median(peaks))
            extra = (peak_kb - int(base.stdout)) * 1024
            out.append({"code": where, "shard": list(shard) if shard else None, "users": n_users,
                        "positives": int(nnz), "peak_rss_mb": peak_kb / 1024,
                        "peak_rss_mb_range": [min(peaks) / 1024, max(peaks) / 1024],
                        "above_imports_mb": extra / 2**20, "bytes_per_user": extra / n_users,
                        "bytes_per_positive": extra / int(nnz)})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=4_000)
    p.add_argument("--mean-length", type=float, default=40.0)
    p.add_argument("--chunk", type=int, default=1_000_000)
    p.add_argument("--updates", type=int, default=30, help="timed updates per arm")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates before them (a GPU needs more)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=200, help="epochs of the projected weekly run (default: the cap)")
    p.add_argument("--project-users", type=int, default=25_000_000)
    p.add_argument("--eval-users", type=int, default=20_000)
    p.add_argument("--arms", default="fp32,bf16,batch2000,bf16+batch2000,pinned,compiled,ranks2,ranks2+batch2000")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--load-users", type=int, default=0, help="also measure load_snapshot's peak RSS")
    p.add_argument("--load-shards", type=int, default=0,
                   help="with --load-users: also the peak of loading rank 0's shard of N (load_snapshot(shard=(0, N)))")
    p.add_argument("--load-repeats", type=int, default=3, help="fresh processes per load; the median peak is reported")
    p.add_argument("--load-baseline", metavar="DIR", help="another checkout whose loader is measured beside this one")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {args.threads} torch thread(s)"

    t = time.perf_counter()
    train = synthetic_window(args.users, args.items, args.mean_length, chunk=args.chunk)
    print(f"synthetic window: {train.n_rows:,} users x {train.n_cols:,} titles, {train.nnz:,} positives "
          f"({train.nnz / train.n_rows:.1f} per user; built in {time.perf_counter() - t:.1f}s, "
          f"host peak {_host_peak_mb():,.0f} MB); device: {name}")
    order = np.random.default_rng(0).permutation(train.n_rows)

    eval_s = time_evaluation(train, args, device)
    eval_users = min(args.eval_users, train.n_rows)
    eval_per_user = eval_s / eval_users
    print(f"evaluation: {eval_s:.2f}s for {eval_users:,} users ({eval_per_user * 1e6:.1f} µs/user); "
          f"a weekly run evaluates 5 % of users per epoch")
    out = {"device": name, "users": train.n_rows, "items": train.n_cols, "nnz": train.nnz, "arms": [],
           "failed": {}, "eval_seconds_per_user": eval_per_user, "project_users": args.project_users,
           "epochs": args.epochs}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    rows = out["arms"]
    train_users = 0.9 * args.project_users  # 5 % validation and 5 % test users held out
    eval_epoch = 0.05 * args.project_users * eval_per_user
    for arm in args.arms.split(","):
        if arm in CUDA_ONLY and device.type != "cuda":
            print(f"{arm}: CUDA only, skipped on this machine")
            continue
        try:
            ranked = arm.startswith(("ranks2", "pair2"))
            row = time_ranks(arm, train, order, args) if ranked else time_arm(arm, train, order, args, device)
        except Exception as e:  # noqa: BLE001 - one failed arm must not lose the others' figures
            out["failed"][arm] = f"{type(e).__name__}: {e}"
            print(f"{arm}: FAILED ({out['failed'][arm]})")
            save()
            continue
        epoch_s = train_users / row["samples_per_s"]
        row.update(epoch_measured_s=train.n_rows / row["samples_per_s"], epoch_projected_s=epoch_s,
                   weekly_projected_h=args.epochs * (epoch_s + eval_epoch) / 3600)
        rows.append(row)
        comm = f" (all-reduce of {row['parameters']:,} floats: {row['allreduce_ms']:.0f} ms)" if "allreduce_ms" in row else ""
        print(f"{arm}: {row['samples_per_s']:,.0f} samples/s, {row['batch_size'] / row['samples_per_s'] * 1000:.0f} ms "
              f"per update{comm}")
        save()

    base = next((r["samples_per_s"] for r in rows if r["arm"] == "fp32"), None)
    for r in rows:
        r["ratio"] = r["samples_per_s"] / base if base else None
    scaled = device.type == "cpu" or args.project_users != train.n_rows
    print(f"\nProjection to {args.project_users:,} users, {args.epochs} epochs"
          f"{' (projected from this machine: ' + name + ')' if scaled else ''}:\n")
    print("| arm | batch | samples/s | vs fp32 | epoch, measured matrix | epoch, projected | weekly run, projected "
          "| host peak MB | device peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        dev = f"{r['device_peak_mb']:,.0f}" if r["device_peak_mb"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"| {r['arm']} | {r['batch_size']} | {r['samples_per_s']:,.0f} | {ratio} "
              f"| {r['epoch_measured_s']:.0f} s | {r['epoch_projected_s'] / 3600:.1f} h | {r['weekly_projected_h']:,.0f} h "
              f"| {r['host_peak_mb']:,.0f} | {dev} |")
    save()
    if args.load_users:
        out["load"] = load_rss(args.load_users, args)
        print()
        for ld in out["load"]:
            ratio = ld["above_imports_mb"] / out["load"][0]["above_imports_mb"]
            shard = f", shard {ld['shard'][0]} of {ld['shard'][1]}" if ld["shard"] else ""
            same = next(b for b in out["load"] if b["shard"] == ld["shard"])  # this checkout's load of it
            against = (f"; this checkout's load of it is {same['above_imports_mb'] / ld['above_imports_mb']:.2f}x"
                       if same is not ld else "")
            lo, hi = ld["peak_rss_mb_range"]
            print(f"load_snapshot ({ld['code']}{shard}), {ld['users']:,} users / {ld['positives']:,} positives: peak RSS "
                  f"{ld['peak_rss_mb']:,.0f} MB ({lo:,.0f}-{hi:,.0f}), {ld['above_imports_mb']:,.0f} MB above the "
                  f"imports = {ld['bytes_per_positive']:.0f} B per positive, {ld['bytes_per_user'] * 1e6 / 2**30:.2f} GB "
                  f"per million users ({ratio:.2f}x this checkout's whole load{against})")
        save()
    if out["failed"]:
        sys.exit(f"failed arms: {', '.join(out['failed'])}")


if __name__ == "__main__":
    main()
