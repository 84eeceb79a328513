"""Latent geometry of Multi-VAE without masking, with masking, and with masking + PIA
(the PIA paper's Figure 2 and Table 3, and Proposition 3.2 measured).

    python benchmarks/latent_geometry.py --data PATH [--format auto] [--heldout-users 100]
        [--seeds 3] [--lambda-a 0.01] [--figure docs/figures/latent_geometry.png] [--json OUT]

Trains three models on one split (piarec.research.datasets, strong generalization): keep_prob 1.0,
keep_prob 0.5, and keep_prob 0.5 + PIA (lambda_A fixed, schedule off), each for ``--seeds``
seeds, epochs picked on validation NDCG@100. Writes a 3-panel t-SNE of the validation + test
users' posterior means coloured by activity cohort (seed 0), with the cohorts' silhouette
above each panel, and prints markdown: silhouettes, per-group test metrics (Table 3), and
mask stability on the test users: over ``--masks`` input masks at keep probability 0.5
(the same for every model), the variance of the posterior mean (trace, unbiased) and its
mean squared distance to the user's item-anchor centroid, with their PIA / no-PIA ratios
(Proposition 3.2 bounds them by tau^2 and tau, tau < 1). Without PIA the anchors are never
trained (they stay at their N(0, 0.01) initialisation), so that distance is essentially
||mu||^2 there. Runs on the CPU with one torch thread by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from piarec.config import DiagnosticsConfig, load_config
from piarec.research.datasets import load_dataset
from piarec.evaluate.diagnostics import collapse_metrics
from piarec.evaluate.protocol import model_topk
from piarec.evaluate.report import group_table, latent_geometry, plot_tsne, pyplot
from piarec.data.csr import CSR
from piarec.train.trainer import train

SETTINGS = (("no masking", 1.0, False), ("masking", 0.5, False), ("masking + PIA", 0.5, True))
MASK_KEEP_PROB = 0.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stack(a: CSR, b: CSR) -> CSR:
    return CSR.from_lists([a.row(u) for u in range(a.n_rows)] + [b.row(u) for u in range(b.n_rows)], a.n_cols)


def run_one(snap, args, keep_prob: float, pia: bool, seed: int) -> dict:
    cfg = load_config(environ={}, overrides={
        "model": {"keep_prob": keep_prob},
        "pia": {"enabled": pia, "lambda_a": args.lambda_a, "lambda_scale": 1.0},
        "training": {"epochs": args.epochs, "early_stop_patience": args.patience, "batch_size": args.batch_size,
                     "seed": seed, "device": "cpu"},
        "diagnostics": {"enabled": False},  # measured once below, on the selected model
    })
    t0 = time.perf_counter()
    result = train(cfg, snap)
    model = result.model
    diag = collapse_metrics(model, snap.test.fold_in, DiagnosticsConfig(
        users=snap.test.n_users, mask_users=snap.test.n_users, mask_repeats=args.masks, mask_keep_prob=MASK_KEEP_PROB),
        seed=seed)
    groups = group_table(model_topk(model, snap.test.fold_in), snap.test)
    rows = stack(snap.val.fold_in, snap.test.fold_in)
    counts = np.concatenate([s.fold_in.row_lengths() + s.held_out.row_lengths() for s in (snap.val, snap.test)])
    geo = latent_geometry(model, rows, counts, seed=seed)
    log(f"  keep_prob={keep_prob} pia={pia} seed={seed}: val ndcg {result.best_metrics['ndcg_at_100']:.4f}, "
        f"silhouette {geo['silhouette']:.3f}, mask variance {diag['mask_variance']:.3f} "
        f"({time.perf_counter() - t0:.0f}s)")
    return {"val": result.best_metrics, "best_epoch": result.best_epoch, "diagnostics": diag, "groups": groups,
            "geometry": geo}


def mean(values) -> float:
    return float(np.nanmean(np.asarray(values, dtype=np.float64)))


def markdown(args, snap, results: dict[str, list[dict]]) -> str:
    names = list(results)
    out = [f"Data {Path(args.data).name}: {snap.manifest['counts']['train_users']} train users, "
           f"{snap.test.n_users} test users; seeds {args.seeds}; PIA lambda_A {args.lambda_a:g} (fixed); "
           f"mask stability over {args.masks} masks at keep probability {MASK_KEEP_PROB}.", "",
           "| model | silhouette (seed 0) | silhouette (mean) | val NDCG@100 | active units | MI (nats) | "
           "mask variance | mask–anchor distance |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        runs = results[n]
        d = lambda k: mean([r["diagnostics"][k] for r in runs])  # noqa: E731
        out.append(f"| {n} | {runs[0]['geometry']['silhouette']:.3f} | {mean([r['geometry']['silhouette'] for r in runs]):.3f} | "
                   f"{mean([r['val']['ndcg_at_100'] for r in runs]):.4f} | {d('active_units'):.0f} | "
                   f"{d('mutual_info'):.3f} | {d('mask_variance'):.3f} | {d('mask_anchor_dist'):.3f} |")
    mask_name, pia_name = names[1], names[2]
    v0 = [r["diagnostics"]["mask_variance"] for r in results[mask_name]]
    v1 = [r["diagnostics"]["mask_variance"] for r in results[pia_name]]
    a0 = [r["diagnostics"]["mask_anchor_dist"] for r in results[mask_name]]
    a1 = [r["diagnostics"]["mask_anchor_dist"] for r in results[pia_name]]
    out += ["", f"Proposition 3.2, {pia_name} / {mask_name} (per seed): mask variance ratio "
            f"{', '.join(f'{b / a:.3f}' for a, b in zip(v0, v1))}; mask–anchor distance ratio "
            f"{', '.join(f'{b / a:.3f}' for a, b in zip(a0, a1))}.", ""]
    groups = [g["group"] for g in results[names[0]][0]["groups"]]
    sizes = [g["users"] for g in results[names[0]][0]["groups"]]
    for metric, label in (("ndcg_at_100", "NDCG@100"), ("recall_at_20", "Recall@20")):
        out += [f"Table 3, test {label} by activity group (mean over seeds):", "",
                "| model | " + " | ".join(f"{g} (n={s})" for g, s in zip(groups, sizes)) + " |",
                "| --- |" + " --- |" * len(groups)]
        for n in names:
            cells = [mean([r["groups"][j][metric] for r in results[n]]) for j in range(len(groups))]
            out.append(f"| {n} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def figure(results: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2))
    for ax, (name, runs) in zip(np.atleast_1d(axes), results.items()):
        g = runs[0]["geometry"]
        plot_tsne(ax, g["embedding"], g["labels"], g["cohorts"], f"{name}\nsilhouette {g['silhouette']:.3f}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--heldout-users", type=int, default=100, help="per split")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--min-rating", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lambda-a", type=float, default=0.01, help="PIA weight (fixed during training)")
    p.add_argument("--masks", type=int, default=16, help="input masks per user for mask stability")
    p.add_argument("--figure", default="docs/figures/latent_geometry.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    snap = load_dataset(args.data, args.format, min_rating=args.min_rating, heldout_users=args.heldout_users,
                        seed=args.split_seed)
    log(f"{args.data}: {snap.manifest['counts']}")
    results: dict[str, list[dict]] = {}
    for name, keep_prob, pia in SETTINGS:
        label = f"Multi-VAE, {name}" if not pia else f"Multi-VAE + PIA (λ_A={args.lambda_a:g})"
        log(f"{label}:")
        results[label] = [run_one(snap, args, keep_prob, pia, s) for s in range(args.seeds)]
    figure(results, Path(args.figure), f"{Path(args.data).parent.name}: validation + test users' posterior means "
                                       "(t-SNE), coloured by interactions")
    table = markdown(args, snap, results)
    print(table)
    if args.json:
        plain = {n: [{k: v for k, v in r.items() if k != "geometry"} | {"silhouette": r["geometry"]["silhouette"]}
                     for r in runs] for n, runs in results.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": plain, "markdown": table}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
