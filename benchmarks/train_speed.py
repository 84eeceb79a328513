"""Training speed: sparse-input Multi-VAE + PIA vs the same model fed densified batches.

    python benchmarks/train_speed.py [--users 136677] [--items 20108] [--positives 10000000]
        [--batches 20] [--batch-size 500] [--threads 1] [--allocator glibc|heap|both]

A synthetic matrix shaped like MovieLens-20M (power-law item popularity, heavy-tailed user
lengths) is generated in memory. Both arms run the same configuration (shallow encoder,
decoder 200 -> I, PIA lambda_A = 0.1, Adam) on the same user batches, in the same run:

- sparse: the trainer's path: CSR rows -> ``SparseBatch`` -> ``embedding_bag`` first layer;
- dense: each batch densified with ``CSR.to_dense()`` and pushed through an equivalent
  dense first layer (``dropout(normalize(x)) @ W + b``), the rest unchanged;
- lazy: the sparse path with a sparse first-layer gradient (``embedding_bag(sparse=True)``:
  only the batch's item rows) and ``torch.optim.SparseAdam`` for that layer (lazy Adam: the
  moments of untouched rows do not decay; not the same optimizer as Adam);
- frozen: the sparse path with the first layer not trained: no first-layer gradient and no
  step, so the ceiling of any cheaper first-layer update;
- unblocked: the sparse path with the likelihood's log-sum-exp in one ``torch.logsumexp``
  call over the whole [B, I] batch (the trainer's before it ran in row blocks on the CPU;
  same result bit for bit);
- fresh: the sparse path with the likelihood's gradient written into a new [B, I] buffer (the
  trainer's before its backward wrote it over the logits, ``multinomial_nll(reuse_logits=True)``;
  same result bit for bit).

Each arm runs ``--batches`` timed updates after two warm-up updates, the arms taking turns on
each batch, and reports the median update; the per-epoch time is extrapolated to all users.
On a CUDA machine the sparse arm is also timed on the GPU (samples/s).

``--allocator``: ``glibc`` (the default, as the trainer runs) leaves glibc's malloc as it is:
buffers over 32 MB (at this shape the [B, I] logits and the [I, H] first-layer gradient, 40
and 48 MB) are mapped afresh for each allocation and unmapped when freed, so the
kernel faults and zeroes their pages every update. ``heap`` serves buffers up to 256 MB from
glibc's heap instead (``mallopt``: :func:`keep_buffers_on_heap`), reused from update to update.
The setting is process-wide, and a heap once grown serves later buffers whatever the threshold,
so ``both`` compares them in four child processes, heap-glibc-glibc-heap, each timing half of
``--batches`` on the same batches; every row then gives the arm's speed-up over dense under the
same allocator and its heap/glibc ratio. (Measured, not adopted: docs/benchmarks.md section 5.)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from piarec.config import ModelConfig
from piarec.models.contract import SparseBatch
from piarec.models import multivae, ops
from piarec.models.multivae import MultiVAE
from piarec.models.ops import _row_logsumexp as _blocked_logsumexp
from piarec.models.ops import alignment_closed_form, gaussian_kl, multinomial_nll, sparse_first_layer
from piarec.data.csr import CSR


def synthetic_ml20m(n_users: int, n_items: int, n_pos: int, seed: int = 0) -> CSR:
    """Binary [n_users, n_items] CSR with ~n_pos positives, Zipf-like items, lognormal lengths."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_p /= item_p.sum()
    draws = n_pos
    for _ in range(2):  # repeated draws collapse; one correction brings nnz close to n_pos
        lengths = np.clip(np.round(raw / raw.sum() * draws), 5, n_items // 2).astype(np.int64)
        rows = np.repeat(np.arange(n_users), lengths)
        csr = CSR.from_pairs(rows, rng.choice(n_items, size=len(rows), p=item_p), n_users, n_items)
        draws = int(draws * n_pos / csr.nnz)
    return csr


def dense_loss(model: MultiVAE, x: torch.Tensor, batch: SparseBatch, beta: float, lam: float) -> torch.Tensor:
    """MultiVAE.loss with the first layer as a dense matmul over the [B, I] input."""
    keep = model.config.keep_prob
    h = torch.tanh(F.dropout(F.normalize(x), 1 - keep, training=True) @ model.item_in + model.bias_in)
    mu, logvar = model.to_stats(h).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    logits = model.logits(z)
    nll = -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
    align = alignment_closed_form(mu, logvar, model.anchors, batch).mean()
    return nll + beta * gaussian_kl(mu, logvar).mean() + lam * align


def first_layer_sparse_grad(batch: SparseBatch, weight: torch.Tensor, bias: torch.Tensor,
                            keep_prob: float) -> torch.Tensor:
    """``ops.sparse_first_layer`` whose weight gradient is a sparse tensor holding only the
    batch's item rows (``embedding_bag(sparse=True)``) instead of a zero-filled dense [I, H]."""
    lengths = batch.lengths.clamp(min=1).to(weight.dtype)
    weights = torch.repeat_interleave(lengths.rsqrt(), batch.lengths)
    keep = torch.rand(weights.shape, device=weights.device) < keep_prob
    weights = weights * keep / keep_prob
    return F.embedding_bag(batch.indices, weight, batch.offsets, mode="sum", per_sample_weights=weights,
                           sparse=True) + bias


def _optimizers(arm: str, model: MultiVAE) -> list[torch.optim.Optimizer]:
    """Adam over every parameter; ``lazy``: SparseAdam (moments and weights of the batch's
    rows only) for the first layer, Adam for the rest; ``frozen``: the first layer untrained
    (the ceiling of any first-layer update: its gradient and step cost nothing)."""
    first = [model.item_in]
    rest = [p for name, p in model.named_parameters() if name != "item_in"]
    if arm == "lazy":
        return [torch.optim.SparseAdam(first, lr=1e-3), torch.optim.Adam(rest, lr=1e-3, fused=True)]
    if arm == "frozen":
        model.item_in.requires_grad_(False)
        return [torch.optim.Adam(rest, lr=1e-3, fused=True)]
    return [torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)]  # as the trainer


@contextmanager
def _arm_ops(arm: str) -> Iterator[None]:
    """The model's first layer, log-sum-exp and likelihood as ``arm`` has them."""
    if arm == "lazy":
        multivae.sparse_first_layer = first_layer_sparse_grad
    if arm == "unblocked":
        ops._row_logsumexp = _whole_logsumexp
    if arm == "fresh":
        multivae.multinomial_nll = _nll_into_new_buffer
    try:
        yield
    finally:
        multivae.sparse_first_layer, ops._row_logsumexp = sparse_first_layer, _blocked_logsumexp
        multivae.multinomial_nll = multinomial_nll


def _whole_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=1)


def _nll_into_new_buffer(logits: torch.Tensor, batch: SparseBatch, *, reuse_logits: bool = False) -> torch.Tensor:
    return multinomial_nll(logits, batch)


def _update(arm: str, model: MultiVAE, opts: list[torch.optim.Optimizer], train: CSR, rows: np.ndarray,
            device: torch.device) -> None:
    part = train.take_rows(rows)
    batch = SparseBatch.from_csr(part, device)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with _arm_ops(arm):
        if arm == "dense":
            x = torch.from_numpy(part.to_dense()).to(device)
            loss = dense_loss(model, x, batch, 0.1, 0.1)
        else:
            loss = model.loss(batch, 0.1, 0.1).total
        loss.backward()
    for opt in opts:
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def keep_buffers_on_heap(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """glibc serves allocations up to ``mmap_threshold`` bytes from its heap and keeps up to
    ``trim_threshold`` bytes free at the heap's top (process-wide); False off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                     trim_threshold))


def time_arms(arms: list[str], train: CSR, batches: list[np.ndarray], device: torch.device) -> dict[str, list[float]]:
    """Seconds of each update of each arm, all but the first two (warm-up) batches. The arms
    take turns, one update each on the same batch, and the arm that goes first rotates, so a
    drift in the machine's speed during the run falls on every arm alike."""
    state = {}
    for arm in arms:
        torch.manual_seed(0)
        model = MultiVAE(train.n_cols, ModelConfig()).to(device)
        state[arm] = model, _optimizers(arm, model)
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for j, rows in enumerate(batches):
        for arm in arms[j % len(arms):] + arms[:j % len(arms)]:
            t = time.perf_counter()
            _update(arm, *state[arm], train, rows, device)
            if j >= 2:
                seconds[arm].append(time.perf_counter() - t)
    return seconds


def _one_allocator(args: argparse.Namespace, batches: int, skip: int) -> dict[str, dict[str, list[float]]]:
    """{device: {arm: seconds per update}} in this process, under ``args.allocator``
    (``heap`` or ``glibc``), over ``batches`` batches after ``skip`` of the order."""
    if args.allocator == "heap" and not keep_buffers_on_heap():
        raise SystemExit("--allocator heap and both need glibc's malloc")
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    train = synthetic_ml20m(args.users, args.items, args.positives)
    print(f"synthetic matrix ({args.allocator}): {train.n_rows} users x {train.n_cols} items, {train.nnz} positives "
          f"({time.perf_counter() - t:.1f}s to build)", file=sys.stderr, flush=True)  # stdout: a child's JSON
    order = np.random.default_rng(0).permutation(train.n_rows)
    rows = [order[(skip + j) * args.batch_size:(skip + j + 1) * args.batch_size] for j in range(batches + 2)]
    out = {}
    for device in [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]:
        arms = ["sparse", "fresh", "unblocked", "lazy", "frozen", "dense"] if device.type == "cpu" else ["sparse", "dense"]
        out[device.type] = time_arms(arms, train, rows, device)
    return out


def _children(args: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{allocator: {device: {arm: seconds}}} from four child processes, heap-glibc-glibc-heap,
    each on half of the batches (the first pair on the first half, the second on the rest)."""
    half = max(1, args.batches // 2)
    merged: dict = {"heap": {}, "glibc": {}}
    for allocator, skip in [("heap", 0), ("glibc", 0), ("glibc", half + 2), ("heap", half + 2)]:
        cmd = [sys.executable, __file__, "--allocator", allocator, "--child-skip", str(skip), "--batches", str(half),
               "--users", str(args.users), "--items", str(args.items), "--positives", str(args.positives),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        # stdout only: the child's matrix line and any traceback reach the terminal
        got = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        for dev, arms in got.items():
            for arm, sec in arms.items():
                merged[allocator].setdefault(dev, {}).setdefault(arm, []).extend(sec)
        print(f"  {allocator} child done", flush=True)
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=136_677)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--positives", type=int, default=10_000_000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--allocator", choices=["glibc", "heap", "both"], default="glibc")
    p.add_argument("--child-skip", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_skip is not None:  # a child of --allocator both: its seconds, as JSON
        print(json.dumps(_one_allocator(args, args.batches, args.child_skip)))
        return

    print(f"batch {args.batch_size}; torch threads {args.threads}; allocator {args.allocator}", flush=True)
    runs = _children(args) if args.allocator == "both" else {args.allocator: _one_allocator(args, args.batches, 0)}
    steps_per_epoch = -(-args.users // args.batch_size)
    median = {(alloc, dev, arm): float(np.median(sec)) for alloc, devs in runs.items()
              for dev, arms in devs.items() for arm, sec in arms.items()}
    print()
    print("| input | device | allocator | s / update | samples/s | epoch (extrapolated) | speed-up vs dense "
          "| heap / glibc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (alloc, dev, arm), sec in median.items():
        glibc = median.get(("glibc", dev, arm)) if alloc == "heap" else None
        print(f"| {arm} | {dev} | {alloc} | {sec:.3f} | {args.batch_size / sec:,.0f} | "
              f"{steps_per_epoch * sec / 60:.1f} min | {median[(alloc, dev, 'dense')] / sec:.2f}x | "
              f"{f'{glibc / sec:.2f}x' if glibc else '-'} |")
    if not torch.cuda.is_available():
        print("\nNo CUDA GPU on this machine: GPU samples/s not measured.")


if __name__ == "__main__":
    main()
