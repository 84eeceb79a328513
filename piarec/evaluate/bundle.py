"""A model bundle evaluated on a snapshot: its ranking in the snapshot's item space, the
protocol's metrics, and the health figures the gate checks (active units, finite scores,
copies of the popularity list).

A bundle trained on another week's snapshot has its own vocabulary; everything here maps
between the two so models of different weeks are compared on the same users and items.
"""

from __future__ import annotations

import numpy as np
import torch

from piarec.data.csr import CSR
from piarec.data.snapshot import Snapshot, Split
from piarec.evaluate.diagnostics import active_units, posterior_means
from piarec.evaluate.metrics import EVAL_K, summarize
from piarec.evaluate.protocol import model_topk
from piarec.models.bundle import ModelBundle
from piarec.scoring.scorer import TopKScorer

__all__ = ["item_mapping", "bundle_rows", "bundle_topk", "evaluate_bundle", "health"]


def item_mapping(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    """int64 [len(src)]: position of each src item id in dst, -1 when absent."""
    index = {item: i for i, item in enumerate(np.asarray(dst_ids).tolist())}
    return np.array([index.get(item, -1) for item in np.asarray(src_ids).tolist()], dtype=np.int64)


def _remap(rows: CSR, mapping: np.ndarray, n_cols: int) -> CSR:
    """``rows`` with every column moved through ``mapping``; columns mapped to -1 dropped."""
    cols = mapping[rows.indices]
    keep = cols >= 0
    row_of = np.repeat(np.arange(rows.n_rows), rows.row_lengths())
    return CSR.from_pairs(row_of[keep], cols[keep], rows.n_rows, n_cols)


def bundle_rows(bundle: ModelBundle, item_ids: np.ndarray, rows: CSR) -> CSR:
    """``rows`` (columns in the order of ``item_ids``) in the bundle's item space; items the
    bundle does not know are dropped."""
    return _remap(rows, item_mapping(item_ids, bundle.item_ids), bundle.n_items)


def bundle_topk(bundle: ModelBundle, snap: Snapshot, split: Split, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, EVAL_K]: the bundle's top-EVAL_K for ``split``'s users, in the snapshot's item
    space (-1 for titles the snapshot does not hold).

    A bundle trained on another snapshot has its own vocabulary: fold-in items it does
    not know are dropped from its input, and its recommendations of titles that the
    snapshot does not hold count as misses. So models of different weeks are compared on
    exactly the same users and held-out items.
    """
    topk = model_topk(bundle.model, bundle_rows(bundle, snap.item_ids, split.fold_in), EVAL_K, batch_size)
    to_snap = item_mapping(bundle.item_ids, snap.item_ids)
    return np.where(topk >= 0, to_snap[np.clip(topk, 0, None)], -1)


def evaluate_bundle(bundle: ModelBundle, snap: Snapshot, split: Split, batch_size: int = 2000) -> dict[str, float]:
    """The protocol's metrics of a bundle on ``split`` of ``snap`` (see :func:`bundle_topk`)."""
    return summarize(bundle_topk(bundle, snap, split, batch_size), split.held_out)


def health(bundle: ModelBundle, fold_in: CSR, k: int, batch_size: int = 2000) -> dict[str, float]:
    """Collapse and score-health figures of a bundle on ``fold_in`` (bundle item space).

    Returns ``active_units``, ``latent_dim``, ``finite`` (1.0 when every posterior mean and
    every score of every user is finite) and ``popularity_share`` (share of users whose
    top-K, seen items excluded, is exactly the popularity top-K; nan when scores are not
    finite, since the scorer refuses them).
    """
    mu = posterior_means(bundle.model, fold_in, batch_size)
    finite = bool(np.isfinite(mu).all())
    if finite:
        with torch.inference_mode():
            for start in range(0, len(mu), batch_size):
                logits = bundle.model.logits(torch.from_numpy(mu[start : start + batch_size]))
                if not torch.isfinite(logits).all():
                    finite = False
                    break
    out = {"active_units": float(active_units(mu)) if finite else 0.0, "latent_dim": float(mu.shape[1]),
           "finite": float(finite), "popularity_share": float("nan")}
    if finite:
        scorer = TopKScorer(bundle, k, batch_size)
        model = scorer.score(fold_in, fold_in)
        empty = CSR(np.zeros(fold_in.n_rows + 1, np.int64), np.zeros(0, np.int32), fold_in.n_cols)
        popular = scorer.score(empty, fold_in)
        same = [
            set(model.item_idx[u, : model.count[u]].tolist()) == set(popular.item_idx[u, : popular.count[u]].tolist())
            for u in range(fold_in.n_rows)
        ]
        out["popularity_share"] = float(np.mean(same)) if same else 0.0
    return out
