"""Training speed: sparse-input Multi-VAE + PIA vs the same model fed densified batches.

    python benchmarks/train_speed.py [--users 136677] [--items 20108] [--positives 10000000]
        [--batches 20] [--batch-size 500] [--threads 1]

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
  same result bit for bit).

Each arm runs ``--batches`` timed updates after two warm-up updates, the arms taking turns on
each batch, and reports the median update; the per-epoch time is extrapolated to all users.
On a CUDA machine the sparse arm is also timed on the GPU (samples/s).
"""

from __future__ import annotations

import argparse
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
from piarec.models.ops import alignment_closed_form, gaussian_kl, sparse_first_layer
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
    """The model's first layer and log-sum-exp as ``arm`` has them."""
    if arm == "lazy":
        multivae.sparse_first_layer = first_layer_sparse_grad
    if arm == "unblocked":
        ops._row_logsumexp = _whole_logsumexp
    try:
        yield
    finally:
        multivae.sparse_first_layer, ops._row_logsumexp = sparse_first_layer, _blocked_logsumexp


def _whole_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=1)


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


def time_arms(arms: list[str], train: CSR, batches: list[np.ndarray], device: torch.device) -> dict[str, float]:
    """Seconds per update of each arm: the median over all but the first two (warm-up)
    batches. The arms take turns, one update each on the same batch, and the arm that goes
    first rotates, so a drift in the machine's speed during the run falls on every arm alike."""
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
    return {arm: float(np.median(s)) for arm, s in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=136_677)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--positives", type=int, default=10_000_000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    train = synthetic_ml20m(args.users, args.items, args.positives)
    print(f"synthetic matrix: {train.n_rows} users x {train.n_cols} items, {train.nnz} positives "
          f"({time.perf_counter() - t:.1f}s to build); batch {args.batch_size}; torch threads {args.threads}")
    rng = np.random.default_rng(0)
    order = rng.permutation(train.n_rows)
    batches = [order[j * args.batch_size:(j + 1) * args.batch_size] for j in range(args.batches + 2)]
    steps_per_epoch = -(-train.n_rows // args.batch_size)

    rows = []
    devices = [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]
    for device in devices:
        arms = ["sparse", "unblocked", "lazy", "frozen", "dense"] if device.type == "cpu" else ["sparse", "dense"]
        rows += [(arm, device.type, sec) for arm, sec in time_arms(arms, train, batches, device).items()]
    base = {dev: sec for arm, dev, sec in rows if arm == "dense"}
    print()
    print("| input | device | s / update | samples/s | epoch (extrapolated) | speed-up vs dense |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, dev, sec in rows:
        print(f"| {arm} | {dev} | {sec:.3f} | {args.batch_size / sec:,.0f} | {steps_per_epoch * sec / 60:.1f} min "
              f"| {base[dev] / sec:.2f}x |")
    if not torch.cuda.is_available():
        print("\nNo CUDA GPU on this machine: GPU samples/s not measured.")


if __name__ == "__main__":
    main()
