"""Beyond-accuracy metrics of a set of top-K lists: what a person promoting a model asks
after NDCG.

Every function takes ``topk`` (int [U, K], best first; ``-1`` pads a short list) and the
catalogue's training popularity (``popularity[i]``: users with a positive on title ``i``):

- :func:`coverage`: the share of the catalogue that appears in at least one list;
- :func:`novelty`: the mean self-information ``-log2(p_i)`` of the recommended titles, with
  ``p_i = popularity[i] / n_users`` (a title seen by everyone carries 0 bits);
- :func:`popularity_bias`: the share of recommended slots taken by the *head*, the most
  popular ``head_share`` of titles (default the top 10 %);
- :func:`intra_list_similarity`: the mean cosine similarity of the pairs of titles inside a
  list, averaged over lists, for any item vectors (rows of ``item_vectors``; e.g. the
  decoder's item weights). With unit vectors ``v``, a list's pairwise sum is
  ``|sum v|^2 - K``, so each list costs ``K * d``, not ``K^2 * d``.

:func:`beyond_accuracy` gives all four as one dict (the ``beyond`` block of a training run's
``evaluation.json`` and the gate's report), :func:`item_vectors` the vectors of a model that
the intra-list similarity uses, :func:`as_metrics` and :func:`describe` the dict's MLflow
names and its one-line rendering.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_metrics", "beyond_accuracy", "coverage", "describe", "intra_list_similarity", "item_vectors",
           "novelty", "popularity_bias"]


def _valid(topk) -> tuple[np.ndarray, np.ndarray]:
    topk = np.asarray(topk, dtype=np.int64)
    if topk.ndim != 2:
        raise ValueError(f"topk must be [users, K], got shape {topk.shape}")
    return topk, topk >= 0


def coverage(topk, n_items: int) -> float:
    """Distinct titles recommended to anyone, over the catalogue size."""
    topk, ok = _valid(topk)
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    return float(len(np.unique(topk[ok])) / n_items)


def novelty(topk, popularity, n_users: int) -> float:
    """Mean self-information (bits) of the recommended titles; titles nobody had in
    training count as seen by one user (the largest finite surprise)."""
    topk, ok = _valid(topk)
    if n_users <= 0:
        raise ValueError(f"n_users must be positive, got {n_users}")
    p = np.clip(np.asarray(popularity, dtype=np.float64), 1.0, None) / n_users
    items = topk[ok]
    return float(-np.log2(p[items]).mean()) if len(items) else float("nan")


def popularity_bias(topk, popularity, head_share: float = 0.1) -> float:
    """Share of the recommended slots that hold a head title (the ``ceil(head_share * n)``
    most popular titles; ties broken by the lower index, as the ranking kernel does)."""
    topk, ok = _valid(topk)
    if not 0 < head_share <= 1:
        raise ValueError(f"head_share must lie in (0, 1], got {head_share}")
    popularity = np.asarray(popularity, dtype=np.float64)
    n_head = int(np.ceil(head_share * len(popularity)))
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    head = np.zeros(len(popularity), bool)
    head[order[:n_head]] = True
    items = topk[ok]
    return float(head[items].mean()) if len(items) else float("nan")


def intra_list_similarity(topk, item_vectors, batch_size: int = 1024) -> float:
    """Mean over lists of the mean pairwise cosine similarity of the list's titles (lists
    with fewer than two titles are left out). Zero vectors count as similar to nothing.
    Lists are taken ``batch_size`` at a time: memory is ``batch_size * K * d`` floats."""
    topk, ok = _valid(topk)
    vectors = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    total, lists = 0.0, 0
    for lo in range(0, len(topk), batch_size):
        rows, valid = topk[lo:lo + batch_size], ok[lo:lo + batch_size]
        # Padding slots add a zero vector: they change neither the sum nor the squared norms.
        padded = np.where(valid[..., None], unit[np.where(valid, rows, 0)], 0.0)  # [B, K, d]
        sizes = valid.sum(axis=1)
        pairs = sizes * (sizes - 1)
        keep = pairs > 0
        summed = padded.sum(axis=1)
        pairwise = (summed ** 2).sum(axis=1) - (padded ** 2).sum(axis=(1, 2))  # minus 1 per non-zero title
        total += float((pairwise[keep] / pairs[keep]).sum())
        lists += int(keep.sum())
    return total / lists if lists else float("nan")


def beyond_accuracy(topk, popularity, n_users: int, item_vectors=None,
                    head_share: float = 0.1) -> dict[str, float | None]:
    """All four, as a dict for ``evaluation.json`` and the gate's report: ``coverage``,
    ``novelty_bits``, ``popularity_bias`` and ``intra_list_similarity`` (None without
    ``item_vectors``)."""
    return {
        "coverage": coverage(topk, len(popularity)),
        "novelty_bits": novelty(topk, popularity, n_users),
        "popularity_bias": popularity_bias(topk, popularity, head_share),
        "intra_list_similarity": None if item_vectors is None else intra_list_similarity(topk, item_vectors),
    }


def item_vectors(model, anchors_trained: bool = True) -> tuple[np.ndarray | None, str | None]:
    """float32 [I, d] item vectors of a model (see :class:`~piarec.models.contract.RecommenderModel`)
    and what they are: its PIA anchors (``"pia_anchors"``) when it has them and
    ``anchors_trained``, else the item rows of its affine decoder (``"decoder"``), else
    ``(None, None)``. A model trained without PIA still holds anchors, at their random
    initialisation: pass ``anchors_trained=False`` for it."""
    anchors = model.item_anchors() if anchors_trained else None
    if anchors is not None:
        return anchors.detach().float().cpu().numpy(), "pia_anchors"
    decoder = model.affine_decoder()
    if decoder is not None:
        return decoder.weight.detach().float().cpu().numpy(), "decoder"  # nn.Linear(d, I).weight: [I, d]
    return None, None


# beyond_accuracy's keys -> MLflow metric stems (<prefix><stem>_at_<k>)
_METRIC_STEMS = {"coverage": "coverage", "novelty_bits": "novelty", "popularity_bias": "popularity_bias",
                 "intra_list_similarity": "ils"}


def as_metrics(figures: dict[str, float | None], k: int, prefix: str = "") -> dict[str, float]:
    """``figures`` (from :func:`beyond_accuracy`) as MLflow metrics, e.g. ``val_coverage_at_100``;
    figures that are None are left out."""
    return {f"{prefix}{_METRIC_STEMS[key]}_at_{k}": float(v) for key, v in figures.items() if v is not None}


def describe(figures: dict[str, float | None]) -> str:
    """One line: ``coverage 0.412, novelty 9.31 bits, head share 0.38, ILS 0.12`` (``ILS n/a``
    without item vectors)."""
    ils = figures.get("intra_list_similarity")
    return (f"coverage {figures['coverage']:.3f}, novelty {figures['novelty_bits']:.2f} bits, "
            f"head share {figures['popularity_bias']:.2f}, ILS {'n/a' if ils is None else f'{ils:.2f}'}")
