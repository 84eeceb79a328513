"""EASE's lambda search: the primal fit per lambda against the dual form for the whole grid.

    python benchmarks/ease_grid.py --data PATH [--format auto] [--heldout-users 190]
        [--grid 25,50,100,200,400] [--threads 1]

On a dataset with fewer training users than items (Last.fm: ~1.5k users, 17.6k artists)
:func:`piarec.evaluate.protocol.fit_ease_on_validation` scores every lambda through
:class:`piarec.models.baselines.EaseDual` and forms B once. This script times, in the same
run and on the same split, (a) the primal search (a Cholesky inverse of X^T X + lambda I
[I, I] per lambda) and (b) the dual search (one eigendecomposition of X X^T, then O(n I) per
lambda) without and with the final B, and prints the ratio, the picked lambda and the largest
difference in validation NDCG@100 between the two (rank swaps of near-tied scores only).
"""

from __future__ import annotations

import argparse
import time

import torch

from piarec.evaluate.metrics import EVAL_K, SELECTION_METRIC, summarize
from piarec.evaluate.protocol import fit_ease_on_validation
from piarec.models.baselines import EASE, ease_weights, gram
from piarec.research.datasets import load_dataset
from piarec.scoring.topk import masked_top_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--min-rating", type=float, default=4.0)
    p.add_argument("--heldout-users", type=int, default=None)
    p.add_argument("--grid", default="25,50,100,200,400")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    grid = [float(v) for v in args.grid.split(",")]
    snap = load_dataset(args.data, args.format, min_rating=args.min_rating, heldout_users=args.heldout_users)
    print(f"training users {snap.train.n_rows}, items {snap.train.n_cols}, validation users {snap.val.fold_in.n_rows}, "
          f"grid {grid}, {args.threads} thread(s)")

    t0 = time.perf_counter()
    g = gram(snap.train).float()
    primal = {}
    for lam in grid:
        model = EASE(ease_weights(g, lam), lam)
        primal[lam] = summarize(masked_top_k(model.scores, snap.val.fold_in, EVAL_K), snap.val.held_out)[SELECTION_METRIC]
    del g, model
    t_primal = time.perf_counter() - t0

    t0 = time.perf_counter()
    lean = fit_ease_on_validation(snap.train, snap.val, grid, weights=False)
    t_dual = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = fit_ease_on_validation(snap.train, snap.val, grid)
    t_full = time.perf_counter() - t0

    best = max(primal, key=primal.__getitem__)
    diff = max(abs(primal[lam] - lean.val_ndcg[lam]) for lam in grid)
    print("| search | seconds | ratio to primal | picked lambda |")
    print("| --- | --- | --- | --- |")
    print(f"| primal, one inverse per lambda | {t_primal:.1f} | 1.00 | {best:g} |")
    print(f"| dual, scores only | {t_dual:.1f} | {t_primal / t_dual:.1f}x | {lean.lam:g} |")
    print(f"| dual, then B at the picked lambda | {t_full:.1f} | {t_primal / t_full:.1f}x | {full.lam:g} |")
    print(f"validation NDCG@100 by lambda (primal): {', '.join(f'{k:g}: {v:.4f}' for k, v in primal.items())}")
    print(f"largest |primal - dual| validation NDCG@100 over the grid: {diff:.2e}")


if __name__ == "__main__":
    main()
