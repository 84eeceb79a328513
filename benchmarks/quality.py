"""Offline quality benchmark on a public dataset: test metrics of several models, same harness.

    python benchmarks/quality.py --data PATH [--format auto] [--seeds 3]
        [--models popularity,ease,multivae,multivae+pia] [--heldout-frac 0.1 | --heldout-users N]
        [--epochs 200] [--patience 25] [--batch-size 500] [--lambda-grid 0.1,1,8] [--folds K] [--json OUT]

Model names: ``popularity``, ``ease``, and ``<backbone>[-<encoder>][+pia][+lr][+nc]`` with
backbone ``multivae`` or ``recvae`` and encoder ``deeper``, ``iaf`` or ``liang`` (Liang's
200 -> 600 -> I decoder), e.g. ``multivae-iaf+pia``, ``recvae+pia``. The Multi-VAE suffixes
``+lr`` (latent reconstruction, weight ``--lr-weight`` warmed up over ``--lr-warmup-epochs``)
and ``+nc`` (noise-contrastive, weight ``--nc-weight``, prior N(0, ``--nc-scale``^2 I), noise
``--nc-noise``) switch on the collapse regularizers of ``model.regularizers``. Each neural
run also reports the collapse diagnostics of ``piarec.evaluate.diagnostics`` on the test users.

A name may end in ``@<config>``: the tuned configuration ``benchmarks/configs/<config>.yaml``
(``benchmarks/tune.py``; a path when it holds a ``/``) applied over these options, with its own
lambda_A instead of the grid, e.g. ``multivae+pia@ml-100k-multivae-pia``.

Protocol (piarec.research.datasets): strong generalization, one fixed split (``--split-seed``),
training seeds 0..S-1. Everything is picked on validation users: the epoch (best validation
NDCG@100, early stopping after ``--patience`` epochs without improvement), EASE's lambda,
and PIA's starting lambda_A (grid ``--lambda-grid``, trained with seed 0; the other seeds
reuse the picked value). Test users are only scored. Prints markdown: test metrics
(mean +- std over seeds), per-user-group NDCG@100, and paired bootstrap comparisons.

``--folds K``: K disjoint folds of the users (``build_snapshot(fold=(f, K))``); for each fold f,
every model is trained (and its lambda_A picked) with fold f + 1 as validation users and
scored on fold f. The per-user results of the K folds are pooled, so every user is a test
user once, and the paired comparison runs over all of them (users nested in folds, seeds
paired; the bootstrap resamples users over the pool).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from piarec.models.baselines import DEFAULT_EASE_LAMBDAS, train_popularity
from piarec.evaluate.compare import paired_bootstrap
from piarec.config import DiagnosticsConfig, deep_merge, load_config, parse_tuned
from piarec.research.datasets import load_dataset
from piarec.evaluate.diagnostics import collapse_metrics
from piarec.evaluate.protocol import fit_ease_on_validation, model_topk, per_user_evaluation, popularity_topk
from piarec.evaluate.metrics import EVAL_K
from piarec.scoring.topk import masked_top_k
from piarec.evaluate.metrics import interaction_groups, summarize, summarize_groups
from piarec.train.trainer import train

METRICS = ("recall_at_20", "recall_at_50", "ndcg_at_100")
ENCODERS = {"shallow": {}, "deeper": {"encoder": "deeper"}, "iaf": {"encoder": "iaf"},
            "liang": {"decoder_hidden": [600]}}


REGULARIZER_SUFFIXES = ("+lr", "+nc")
DIAGNOSTICS = ("active_units", "kl_mean", "mutual_info", "self_consistency", "ima_contrast", "mask_variance",
               "mask_anchor_dist")


def split_regularizers(name: str) -> tuple[str, list[str]]:
    """'multivae+pia+lr+nc' -> ('multivae+pia', ['+lr', '+nc'])."""
    found = []
    while name.endswith(REGULARIZER_SUFFIXES):
        suffix = name[name.rindex("+"):]
        found.insert(0, suffix)
        name = name[: -len(suffix)]
    return name, found


def parse_model(name: str) -> tuple[str, str, bool]:
    """'multivae-iaf+pia' -> ('multivae', 'iaf', True); regularizer suffixes are ignored
    here (see :func:`split_regularizers`)."""
    base, regs = split_regularizers(name)
    pia = base.endswith("+pia")
    base = base[: -len("+pia")] if pia else base
    backbone, _, encoder = base.partition("-")
    encoder = encoder or "shallow"
    if backbone not in ("multivae", "recvae") or encoder not in ENCODERS or (backbone == "recvae" and encoder != "shallow") \
            or (backbone == "recvae" and regs):
        raise SystemExit(f"unknown model {name!r}: use popularity, ease, multivae[-deeper|-iaf|-liang][+pia][+lr][+nc], "
                         "recvae[+pia]")
    return backbone, encoder, pia


def regularizer_overrides(name: str, args, updates_per_epoch: int) -> dict[str, Any]:
    """``model.regularizers`` for the name's suffixes ({} without any, so the settings, and
    the cache keys, of plain models are unchanged)."""
    _, regs = split_regularizers(name)
    out: dict[str, Any] = {}
    if "+lr" in regs:
        out.update(latent_recon=True, latent_recon_weight=args.lr_weight,
                   latent_recon_warmup=args.lr_warmup_epochs * updates_per_epoch)
    if "+nc" in regs:
        out.update(noise_contrastive=True, nc_weight=args.nc_weight, nc_prior_scale=args.nc_scale,
                   nc_noise=args.nc_noise)
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


CONFIGS = Path(__file__).parent / "configs"


def split_config(name: str) -> tuple[str, dict[str, Any] | None]:
    """'multivae+pia@ml-100k-pia' -> ('multivae+pia', the tuned YAML benchmarks/configs/ml-100k-pia.yaml
    as written by benchmarks/tune.py or `piarec tune`); a name with '/' after '@' is a path."""
    base, _, config = name.partition("@")
    if not config:
        return name, None
    path = Path(config) if "/" in config else CONFIGS / f"{config}.yaml"
    if not path.is_file():
        raise SystemExit(f"model {name!r}: no tuned configuration at {path}")
    return base, parse_tuned(path.read_text(), str(path))


def settings(snap, args, name: str, lam: float, seed: int) -> dict[str, Any]:
    """The configuration overrides of one neural run: the options of this script, then the
    model name's tuned configuration (``@config``) over them."""
    name, tuned = split_config(name)
    backbone, encoder, pia = parse_model(name)
    lr = args.recvae_lr if backbone == "recvae" else args.lr
    model_cfg = {"backbone": backbone, **ENCODERS[encoder]}
    regs = regularizer_overrides(name, args, -(-snap.train.n_rows // args.batch_size))
    if regs:
        model_cfg["regularizers"] = regs
    overrides = {
        "model": model_cfg,
        "pia": {"enabled": pia, "lambda_a": lam, "lambda_max": args.lambda_max, "lambda_scale": args.lambda_scale,
                "patience": args.rho},
        "training": {"epochs": args.recvae_epochs if backbone == "recvae" else args.epochs, "early_stop_patience": args.patience, "batch_size": args.batch_size,
                     "lr": lr, "seed": seed, "device": "auto"},
    }
    # Only when asked for, so the settings (and cache keys) of earlier runs are unchanged.
    for arg, key in (("beta_cap", "beta_cap"), ("anneal_steps", "anneal_steps"), ("anneal_epochs", "anneal_epochs")):
        if getattr(args, arg) is not None:
            overrides["training"][key] = getattr(args, arg)
    for arg in ("schedule", "alignment"):
        if getattr(args, arg) is not None:
            overrides["pia"][arg] = getattr(args, arg)
    if args.beta_search:
        overrides["training"]["beta_search"] = True
    return deep_merge(overrides, tuned) if tuned else overrides


def neural_run(snap, args, name: str, lam: float, seed: int, cache: Path | None) -> dict[str, Any]:
    """Train one model with one seed; test metrics per user. Cached by its settings."""
    overrides = settings(snap, args, name, lam, seed)
    key = hashlib.sha256(json.dumps([snap.uri, snap.manifest["protocol"], overrides], sort_keys=True).encode()).hexdigest()[:20]
    if cache is not None and (cache / f"{key}.json").exists():
        return json.loads((cache / f"{key}.json").read_text())
    # Per-epoch collapse diagnostics are off unless asked for: they pick nothing and change no
    # result (they restore the RNG state), so they stay out of the cache key too.
    cfg = load_config(environ={}, overrides={**overrides, "diagnostics": {"enabled": args.epoch_diagnostics}})
    t0 = time.perf_counter()
    result = train(cfg, snap)
    seconds = time.perf_counter() - t0
    per_user = per_user_evaluation(model_topk(result.model, snap.test.fold_in), snap.test)
    diagnostics = collapse_metrics(result.model, snap.test.fold_in, DiagnosticsConfig(), seed=0)
    run = {
        "model": name, "lambda_a": lam, "seed": seed, "best_epoch": result.best_epoch,
        "epochs_run": len(result.history), "train_seconds": seconds, "lambda_a_final": result.lambda_a,
        "val": result.best_metrics, "test": {m: float(np.nanmean(per_user[m])) for m in METRICS},
        "per_user": {k: v.tolist() for k, v in per_user.items()}, "diagnostics": diagnostics,
    }
    if result.beta_search:
        run["beta_search"] = {k: result.beta_search[k] for k in ("beta", "epoch", "search_epochs")}
    log(f"  {name} lambda_a={lam:g} seed={seed}: val ndcg {result.best_metrics['ndcg_at_100']:.4f} "
        f"test ndcg {run['test']['ndcg_at_100']:.4f} (best epoch {result.best_epoch}/{len(result.history)}, {seconds:.0f}s)")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{key}.json").write_text(json.dumps(run))
    return run


def run_model(snap, args, name: str, cache: Path | None) -> dict[str, Any]:
    if name == "popularity":
        pop = train_popularity(snap.train)
        per_user = per_user_evaluation(popularity_topk(pop, snap.test.fold_in), snap.test)
        val = summarize(popularity_topk(pop, snap.val.fold_in), snap.val.held_out)
        return {"model": name, "settings": "-", "runs": [{"seed": 0, "val": val, "per_user": per_user}]}
    if name == "ease":
        t0 = time.perf_counter()
        ease = fit_ease_on_validation(snap.train, snap.val, args.ease_grid, weights=False)
        per_user = per_user_evaluation(masked_top_k(ease.scores, snap.test.fold_in, EVAL_K), snap.test)
        log(f"  ease: validation ndcg by lambda {ease.val_ndcg} -> {ease.lam:g} ({time.perf_counter() - t0:.0f}s)")
        return {"model": name, "settings": f"lambda={ease.lam:g}", "val_grid": ease.val_ndcg,
                "runs": [{"seed": 0, "val": {"ndcg_at_100": ease.val_ndcg[ease.lam]}, "per_user": per_user}]}
    base, tuned = split_config(name)
    _, _, pia = parse_model(base)
    tuned_lambda = (tuned or {}).get("pia", {}).get("lambda_a")
    grid = ([tuned_lambda] if tuned_lambda is not None else args.lambda_grid) if pia else [0.0]
    tuned = {lam: neural_run(snap, args, name, lam, 0, cache) for lam in grid}
    lam = max(tuned, key=lambda v: tuned[v]["val"]["ndcg_at_100"])
    runs = [tuned[lam]] + [neural_run(snap, args, name, lam, s, cache) for s in range(1, args.seeds)]
    for r in runs:
        r["per_user"] = {k: np.asarray(v) for k, v in r["per_user"].items()}
    settings = f"lambda_A={lam:g}" if pia else "-"
    return {"model": name, "settings": settings, "runs": runs,
            "val_grid": {str(v): tuned[v]["val"]["ndcg_at_100"] for v in grid} if pia else {}}


def pool_folds(per_fold: list[tuple[Any, dict[str, dict[str, Any]]]]):
    """One (snapshot, results) over K folds: each seed's per-user arrays concatenated over
    the folds (every user once), validation NDCG averaged, training seconds summed; the
    snapshot's counts name all test users. The settings list each fold's pick."""
    snap0 = per_fold[0][0]
    counts = dict(snap0.manifest["counts"])
    counts["test_users"] = sum(s.test.n_users for s, _ in per_fold)
    counts["train_users"] = f"{counts['train_users']} per fold"
    counts["val_users"] = f"{counts['val_users']} per fold"
    snap = dataclasses.replace(snap0, manifest={**snap0.manifest, "counts": counts})
    pooled: dict[str, dict[str, Any]] = {}
    for name in per_fold[0][1]:
        by_fold = [res[name] for _, res in per_fold]
        runs = []
        for s in range(len(by_fold[0]["runs"])):
            fold_runs = [r["runs"][s] for r in by_fold]
            run: dict[str, Any] = {
                "seed": s, "val": {"ndcg_at_100": float(np.mean([r["val"]["ndcg_at_100"] for r in fold_runs]))},
                "per_user": {k: np.concatenate([np.asarray(r["per_user"][k]) for r in fold_runs])
                             for k in fold_runs[0]["per_user"]}}
            if "best_epoch" in fold_runs[0]:
                run["best_epoch"] = int(np.median([r["best_epoch"] for r in fold_runs]))
                run["train_seconds"] = float(np.mean([r["train_seconds"] for r in fold_runs]))  # per run
                run["train_seconds_folds"] = float(sum(r["train_seconds"] for r in fold_runs))
            if "diagnostics" in fold_runs[0]:
                run["diagnostics"] = {k: float(np.mean([r["diagnostics"][k] for r in fold_runs]))
                                      for k in fold_runs[0]["diagnostics"]}
            runs.append(run)
        settings = {r["settings"] for r in by_fold}
        pooled[name] = {"model": name, "runs": runs, "folds": len(per_fold),
                        "settings": settings.pop() if len(settings) == 1 else "per fold: " + ", ".join(
                            r["settings"] for r in by_fold)}
    return snap, pooled


def stat(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def markdown(snap, args, results: dict[str, dict[str, Any]]) -> str:
    c = snap.manifest["counts"]
    out = [f"### {Path(args.data).name} ({snap.manifest['format']}): {c['users']} users, {c['items']} items, "
           f"{c['train_users']} train / {c['val_users']} val / {c['test_users']} test users",
           "",
           f"Seeds {args.seeds}; epochs ≤ {args.epochs}, early stopping patience {args.patience}; batch "
           f"{args.batch_size}; lr {args.lr:g} (RecVAE {args.recvae_lr:g}, ≤ {args.recvae_epochs} epochs of 3 encoder + 1 "
           f"decoder passes); torch threads {args.threads}; λ_A grid {args.lambda_grid} "
           f"(picked on validation, seed 0), λ_scale {args.lambda_scale:g} every ρ = {args.rho} stalled epochs, "
           f"λ_max {args.lambda_max:g}."
           + (f" β cap {args.beta_cap:g}." if args.beta_cap is not None else "")
           + (f" β annealed over {args.anneal_steps} updates." if args.anneal_steps is not None else "")
           + (f" Regularizers: +lr weight {args.lr_weight:g} warmed up over {args.lr_warmup_epochs} epochs; +nc δ "
              f"{args.nc_weight:g}, K {args.nc_scale:g}, {args.nc_noise} noise."
              if any(split_regularizers(n)[1] for n in results) else ""),
           "",
           "| model | picked on validation | Recall@20 | Recall@50 | NDCG@100 | val NDCG@100 | best epoch | s/run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        runs = res["runs"]
        cells = [stat([float(np.nanmean(r["per_user"][m])) for r in runs]) for m in METRICS]
        val = stat([r["val"]["ndcg_at_100"] for r in runs])
        epochs = ", ".join(str(r["best_epoch"]) for r in runs) if "best_epoch" in runs[0] else "-"
        secs = f"{np.mean([r['train_seconds'] for r in runs]):.0f}" if "train_seconds" in runs[0] else "-"
        out.append(f"| {name} | {res['settings']} | {' | '.join(cells)} | {val} | {epochs} | {secs} |")

    first = next(iter(results.values()))["runs"][0]["per_user"]
    groups = interaction_groups(first["n_interactions"])
    out += ["", "NDCG@100 by test-user group (interactions = fold-in + held-out; mean over seeds):", "",
            "| model | " + " | ".join(f"{g} (n={int(m.sum())})" for g, m in groups) + " |",
            "| --- |" + " --- |" * len(groups)]
    for name, res in results.items():
        per_seed = [summarize_groups({"ndcg_at_100": r["per_user"]["ndcg_at_100"]}, groups) for r in res["runs"]]
        cells = [f"{np.nanmean([s[j]['ndcg_at_100'] for s in per_seed]):.4f}" for j in range(len(groups))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")

    diag_rows = [(n, r["runs"]) for n, r in results.items() if r["runs"] and "diagnostics" in r["runs"][0]]
    if diag_rows:
        out += ["", "Collapse diagnostics of the selected models on the test users (piarec.evaluate.diagnostics, mean over "
                "seeds; KL and MI in nats, MI bound log N):", "",
                "| model | " + " | ".join(DIAGNOSTICS) + " |", "| --- |" + " --- |" * len(DIAGNOSTICS)]
        for name, runs in diag_rows:
            cells = [f"{np.mean([r['diagnostics'].get(k, np.nan) for r in runs]):.4g}" for k in DIAGNOSTICS]
            out.append(f"| {name} | " + " | ".join(cells) + " |")

    base = {n: split_config(n)[0] if n not in ("popularity", "ease") else n for n in results}
    tuned = {n: "@" in n for n in results}
    # ± PIA (both tuned, or both not), each regularizer against its plain model, each tuned
    # configuration against the same model untuned and against each earlier configuration of
    # it (A before B in --models), EASE against every PIA model and every tuned configuration.
    pairs = [(m, n) for n in results if base[n].endswith("+pia") for m in results
             if base[m] == base[n][: -len("+pia")] and tuned[m] == tuned[n]]
    pairs += [(split_regularizers(n)[0], n) for n in results
              if split_regularizers(n)[1] and split_regularizers(n)[0] in results]
    pairs += [(base[n], n) for n in results if tuned[n] and base[n] in results]
    names = list(results)
    pairs += [(m, n) for i, n in enumerate(names) for m in names[:i] if tuned[m] and tuned[n] and base[m] == base[n]]
    if "ease" in results:
        pairs += [("ease", n) for n in results if base[n].endswith("+pia") or tuned[n]]
    if pairs:
        out += ["", "Paired comparison on the same test users, NDCG@100 (B − A; 95 % bootstrap interval over "
                "users and seeds, 2,000 replicates):", "",
                "| A | B | mean A | mean B | B − A [95 % CI] | relative [95 % CI] |", "| --- | --- | --- | --- | --- | --- |"]
        for a, b in pairs:
            ra, rb = results[a]["runs"], results[b]["runs"]
            # A deterministic baseline (one run) is paired with every seed of the model.
            ya = np.stack([ra[min(s, len(ra) - 1)]["per_user"]["ndcg_at_100"] for s in range(max(len(ra), len(rb)))])
            yb = np.stack([rb[min(s, len(rb) - 1)]["per_user"]["ndcg_at_100"] for s in range(max(len(ra), len(rb)))])
            cmp = paired_bootstrap(ya, yb)
            out.append(f"| {a} | {b} | {cmp.mean_a:.4f} | {cmp.mean_b:.4f} | {cmp.diff:+.4f} "
                       f"[{cmp.diff_low:+.4f}, {cmp.diff_high:+.4f}] | {100 * cmp.rel:+.2f} % "
                       f"[{100 * cmp.rel_low:+.2f}, {100 * cmp.rel_high:+.2f}] |")
            results[b].setdefault("comparisons", {})[a] = cmp.to_dict()
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--models", default="popularity,ease,multivae,multivae+pia")
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--heldout-users", type=int, default=None, help="per split; overrides --heldout-frac")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=None,
                   help="K disjoint folds of test users, pooled (every user tested once); replaces --heldout-*")
    p.add_argument("--min-rating", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recvae-lr", type=float, default=5e-4)
    p.add_argument("--lambda-grid", default="0.1,1,8")
    p.add_argument("--lambda-max", type=float, default=8.0)
    p.add_argument("--lambda-scale", type=float, default=2.0, help="1 = a fixed lambda_A (schedule off)")
    p.add_argument("--rho", type=int, default=5, help="epochs without improvement before lambda_A is raised")
    p.add_argument("--ease-grid", default=",".join(f"{v:g}" for v in DEFAULT_EASE_LAMBDAS))
    p.add_argument("--recvae-epochs", type=int, default=50, help="RecVAE's epochs (each = 3 encoder + 1 decoder passes)")
    p.add_argument("--beta-cap", type=float, default=None, help="KL weight cap (default: the config's, 0.2)")
    p.add_argument("--anneal-steps", type=int, default=None,
                   help="updates over which beta grows to its cap (default: the config's, 200000)")
    p.add_argument("--anneal-epochs", type=int, default=None,
                   help="epochs over which beta grows to its cap, whatever the data size (replaces --anneal-steps)")
    p.add_argument("--beta-search", action="store_true",
                   help="Liang et al.'s beta procedure (training.beta_search): anneal beta towards 1 over "
                        "--anneal-epochs (else --epochs), retrain at the beta of the best validation epoch")
    p.add_argument("--schedule", choices=["patience", "paper"], default=None,
                   help="lambda_A schedule (default: the config's, patience); paper = Algorithm 1, no cap")
    p.add_argument("--alignment", choices=["sum", "mean"], default=None,
                   help="Eq. 9 summed or averaged over latent dimensions (default: the config's, sum)")
    p.add_argument("--epoch-diagnostics", action="store_true",
                   help="compute the collapse diagnostics after every epoch while training (slower; off by default)")
    p.add_argument("--lr-weight", type=float, default=1.0, help="+lr: final latent reconstruction weight")
    p.add_argument("--lr-warmup-epochs", type=int, default=20, help="+lr: epochs of linear warm-up of that weight")
    p.add_argument("--nc-weight", type=float, default=0.1, help="+nc: weight delta of the contrastive KL")
    p.add_argument("--nc-scale", type=float, default=5.0, help="+nc: std K of the contrastive prior N(0, K^2 I)")
    p.add_argument("--nc-noise", default="swap", choices=["swap", "decoder"], help="+nc: contrastive inputs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--cache", default=None, help="folder caching finished runs by their settings")
    p.add_argument("--json", default=None)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    args = (parser or build_parser()).parse_args(argv)
    args.lambda_grid = [float(v) for v in args.lambda_grid.split(",")]
    args.ease_grid = [float(v) for v in args.ease_grid.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("popularity", "ease"):
            parse_model(split_config(m)[0])

    cache = Path(args.cache) if args.cache else None
    per_fold = []
    for fold in ([None] if not args.folds else [(f, args.folds) for f in range(args.folds)]):
        snap = load_dataset(args.data, args.format, min_rating=args.min_rating, heldout_users=args.heldout_users,
                            heldout_frac=args.heldout_frac, seed=args.split_seed, fold=fold)
        log(f"{args.data}{f' fold {fold[0]} of {fold[1]}' if fold else ''}: {snap.manifest['counts']} "
            f"(torch threads {torch.get_num_threads()})")
        results = {}
        for m in models:
            log(f"{m}:")
            results[m] = run_model(snap, args, m, cache)
        per_fold.append((snap, results))
    snap, results = per_fold[0] if len(per_fold) == 1 else pool_folds(per_fold)
    table = markdown(snap, args, results)
    print(table)
    if args.json:
        def plain(x):
            if isinstance(x, np.ndarray):
                return [None if not np.isfinite(v) else float(v) for v in x]
            if isinstance(x, dict):
                return {str(k): plain(v) for k, v in x.items()}
            if isinstance(x, list):
                return [plain(v) for v in x]
            return x
        Path(args.json).write_text(json.dumps({"args": vars(args), "manifest": snap.manifest, "results": plain(results),
                                               "markdown": table}, indent=1))


if __name__ == "__main__":
    main()
