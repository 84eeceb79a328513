"""`piarec report`: the latent-geometry and collapse report of one training run.

:func:`build_report` computes it for a bundle and a snapshot and writes to an output
folder (:func:`piarec.registry.runs.report_run` finds both for an MLflow run of
`piarec train` and logs the folder under ``report/`` of the run):

- ``collapse.json``: :func:`piarec.evaluate.diagnostics.collapse_metrics` on the validation users,
  and the KL of every latent dimension;
- the per-activity-group metrics of the test users (the PIA paper's Table 3 groups, or
  quantile groups when the data lacks them; :func:`piarec.evaluate.metrics.interaction_groups`);
- ``tsne.png``: t-SNE of the validation + test users' posterior means coloured by activity
  cohort (the paper's Figure 2), with the cohorts' silhouette score in the 2-D embedding;
- ``report.json`` (everything) and ``report.md`` (the same as a readable page).

The plotting and cohort helpers are shared with ``benchmarks/latent_geometry.py``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from piarec.config import PipelineConfig
from piarec.errors import InputDataError
from piarec.data.csr import CSR

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- geometry
def activity_cohorts(counts: np.ndarray, min_users: int = 10) -> tuple[np.ndarray, list[str]]:
    """Cohort of each user by interaction count: int64 [U] labels (-1 for none) and the
    cohort names, from :func:`piarec.evaluate.metrics.interaction_groups` (the paper's Table 3
    groups when each holds ``min_users`` users, else quartiles)."""
    from piarec.evaluate.metrics import interaction_groups

    groups = interaction_groups(np.asarray(counts), min_users=min_users)
    labels = np.full(len(counts), -1, dtype=np.int64)
    for j, (_, mask) in enumerate(groups):
        labels[mask & (labels < 0)] = j
    return labels, [name for name, _ in groups]


def tsne_embedding(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """float64 [N, 2]: sklearn's t-SNE of ``points`` [N, d] (PCA initialisation, perplexity
    30 or less for small N), deterministic for ``seed``."""
    from sklearn.manifold import TSNE

    points = np.asarray(points, dtype=np.float64)
    if len(points) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(points)}")
    perplexity = float(min(30.0, (len(points) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def cohort_silhouette(embedding: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette score in [-1, 1] of the cohorts in ``embedding`` [N, 2] (users without a
    cohort left out); nan when fewer than two cohorts are populated."""
    from sklearn.metrics import silhouette_score

    keep = labels >= 0
    present = np.unique(labels[keep])
    if len(present) < 2 or keep.sum() <= len(present):
        return float("nan")
    return float(silhouette_score(embedding[keep], labels[keep]))


def plot_tsne(ax, embedding: np.ndarray, labels: np.ndarray, names: list[str], title: str) -> None:
    """One t-SNE panel: users as dots coloured by cohort, the legend naming the cohorts."""
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    for j, name in enumerate(names):
        mask = labels == j
        if mask.any():
            ax.scatter(embedding[mask, 0], embedding[mask, 1], s=6, alpha=0.7, color=colours[j % len(colours)],
                       label=f"{name} (n={int(mask.sum())})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best", title="interactions", title_fontsize=7)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- one model
def _stack(a: CSR, b: CSR) -> CSR:
    rows = [a.row(u) for u in range(a.n_rows)] + [b.row(u) for u in range(b.n_rows)]
    return CSR.from_lists(rows, a.n_cols)


def latent_geometry(model, fold_in: CSR, counts: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """t-SNE of the users' posterior means and the cohorts' silhouette.

    ``fold_in``: CSR [U, I] in the model's item space; ``counts``: int [U] interactions per
    user (the cohort key). Returns ``embedding`` [U, 2], ``labels``, ``cohorts`` (names) and
    ``silhouette``.
    """
    from piarec.evaluate.diagnostics import posterior_means

    mu = posterior_means(model, fold_in)
    labels, names = activity_cohorts(counts)
    emb = tsne_embedding(mu, seed)
    return {"embedding": emb, "labels": labels, "cohorts": names, "silhouette": cohort_silhouette(emb, labels)}


def group_table(topk: np.ndarray, split) -> list[dict[str, Any]]:
    """Per-activity-group means of Recall@20/50 and NDCG@100 of a ranking of ``split``'s
    users (snapshot item space), with each group's user count."""
    from piarec.evaluate.protocol import per_user_evaluation
    from piarec.evaluate.metrics import interaction_groups, summarize_groups

    per_user = per_user_evaluation(topk, split)
    groups = interaction_groups(per_user.pop("n_interactions"))
    return summarize_groups(per_user, groups)


def build_report(bundle, snap, cfg: PipelineConfig, out_dir: str | Path, *, title: str = "", seed: int = 0
                 ) -> dict[str, Any]:
    """Compute the report of ``bundle`` on ``snap`` and write it to ``out_dir``.

    Returns the JSON-ready dict that ``report.json`` holds. Needs validation users.
    """
    from piarec.evaluate.diagnostics import collapse_metrics, kl_per_dimension
    from piarec.evaluate.bundle import bundle_rows, bundle_topk
    from piarec.evaluate.metrics import summarize

    if snap.val.n_users < 2:
        raise InputDataError(f"snapshot {snap.uri!r} has fewer than two validation users; no report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = bundle_rows(bundle, snap.item_ids, snap.val.fold_in)
    collapse = collapse_metrics(bundle.model, val_rows, cfg.diagnostics, seed=seed)
    kl_dims = kl_per_dimension(bundle.model, val_rows)

    test = snap.test if snap.test.n_users > 0 else snap.val
    topk = bundle_topk(bundle, snap, test, cfg.training.eval_batch_size)
    table = group_table(topk, test)
    overall = summarize(topk, test.held_out)

    # Figure 2: validation and test users together, by their total interactions.
    splits = [s for s in (snap.val, snap.test) if s.n_users > 0]
    fold_in = splits[0].fold_in if len(splits) == 1 else _stack(snap.val.fold_in, snap.test.fold_in)
    counts = np.concatenate([s.fold_in.row_lengths() + s.held_out.row_lengths() for s in splits])
    geo = latent_geometry(bundle.model, bundle_rows(bundle, snap.item_ids, fold_in), counts, seed=seed)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plot_tsne(ax, geo["embedding"], geo["labels"], geo["cohorts"],
              f"{title or 'model'}: silhouette {geo['silhouette']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "tsne.png", dpi=110)
    plt.close(fig)

    report = {
        "title": title, "snapshot": snap.uri, "seed": seed,
        "collapse": collapse, "kl_per_dim": kl_dims.tolist(),
        "test_split": "test" if test is snap.test else "val", "test_metrics": overall, "groups": table,
        "tsne": {"users": int(len(counts)), "cohorts": geo["cohorts"],
                 "cohort_sizes": [int((geo["labels"] == j).sum()) for j in range(len(geo["cohorts"]))],
                 "silhouette": geo["silhouette"]},
    }
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def _finite(x: Any) -> Any:
    """JSON has no nan/inf: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    c = report["collapse"]
    kl = np.asarray(report["kl_per_dim"], dtype=np.float64)
    lines = [f"# Latent report{': ' + report['title'] if report['title'] else ''}", "",
             f"Snapshot `{report['snapshot']}`.", "",
             "## Collapse diagnostics (validation users)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in c.items()]
    top = np.sort(kl)[::-1][:5]
    lines += ["", f"KL per dimension: {np.count_nonzero(kl > 0.01)} of {len(kl)} dimensions above 0.01 nats; "
              f"largest {', '.join(f'{v:.3g}' for v in top)}.", "",
              f"## Metrics by activity group ({report['test_split']} users)", "",
              "| group | users | Recall@20 | Recall@50 | NDCG@100 |", "| --- | --- | --- | --- | --- |"]
    for row in report["groups"]:
        lines.append(f"| {row['group']} | {row['users']} | {row['recall_at_20']:.4f} | {row['recall_at_50']:.4f} | "
                     f"{row['ndcg_at_100']:.4f} |")
    m = report["test_metrics"]
    lines.append(f"| all | {sum(r['users'] for r in report['groups'])} | {m['recall_at_20']:.4f} | "
                 f"{m['recall_at_50']:.4f} | {m['ndcg_at_100']:.4f} |")
    t = report["tsne"]
    lines += ["", "## Latent geometry", "",
              f"t-SNE of {t['users']} validation + test users' posterior means, coloured by cohort "
              f"({', '.join(f'{n}: {s}' for n, s in zip(t['cohorts'], t['cohort_sizes']))}); "
              f"silhouette of the cohorts in 2-D: {t['silhouette']:.3f}.", "", "![t-SNE](tsne.png)", ""]
    return "\n".join(lines)
