"""Tune one model on a public dataset with `piarec tune`'s search; write benchmarks/configs/<name>.yaml.

    python benchmarks/tune.py --data ../shared/data/ml-100k/u.data --model multivae+pia --trials 20 \\
        [--timeout-s 900] [--study-storage sqlite:///ml-100k.db] [--name ml-100k-multivae-pia] [--max-cost-ratio 2] \\
        [any option of benchmarks/quality.py]

The search is :func:`piarec.train.tune.tune` on the validation users of quality.py's split of
the data (``--split-seed``, ``--heldout-*``; test users are never used to choose), starting
from quality.py's settings for ``--model`` (its trial 0). The space is ``tune.space``'s
default, without the ``pia.*`` keys for a model without PIA. Every trial and the study are
tracked in MLflow under ``--workdir``. The written YAML names the command, the budget and
its CPU time; evaluate it with ``quality.py --models <model>@<name> [--folds K]``.

Tuned on one split's validation users, then tested over folds that cover every user, a
configuration has seen the labels of ~10 % of the test users once, through the choice
among ``--trials`` configurations (docs/benchmarks.md says where that matters).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

from piarec.config import load_config
from piarec.research.datasets import load_dataset
from piarec.train.tune import tune
from quality import CONFIGS, build_parser, parse_args, parse_model, settings


def _value(trial: dict | None) -> str:
    value = (trial or {}).get("val_ndcg_at_100")
    return f"{value:.4f}" if value is not None else f"none ({(trial or {}).get('state', 'not run')})"


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    p.description = __doc__
    p.add_argument("--model", default="multivae+pia", help="a quality.py model name (no @config)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=None)
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--study-storage", default=None, metavar="URL",
                   help="an Optuna storage (sqlite:///beauty.db): a killed search rerun with the same "
                        "command resumes with its finished trials; --trials counts them")
    p.add_argument("--max-cost-ratio", type=float, default=None,
                   help="tune.max_cost_ratio: never choose a trial whose training takes more than this many "
                        "times as long as trial 0's (quality.py's settings); default no limit")
    p.add_argument("--name", default=None, help="the config's name (default <data folder>-<model>)")
    p.add_argument("--workdir", default="piarec-tune-bench", help="MLflow store and scratch output")
    args = parse_args(argv, p)
    torch.set_num_threads(args.threads)
    _, _, pia = parse_model(args.model)
    data = Path(args.data)
    dataset = data.parent.name if data.is_file() else data.name
    name = args.name or f"{dataset}-{args.model.replace('+', '-')}"

    snap = load_dataset(args.data, args.format, min_rating=args.min_rating, heldout_users=args.heldout_users,
                        heldout_frac=args.heldout_frac, seed=args.split_seed)
    base = settings(snap, args, args.model, args.lambda_grid[0], 0)
    space = {k: v for k, v in load_config(environ={}).tune.space.items() if pia or not k.startswith("pia.")}
    work = Path(args.workdir).resolve()
    cfg = load_config(environ={}, overrides={
        **base, "diagnostics": {"enabled": args.epoch_diagnostics}, "storage": {"root": str(work)},
        "tune": {"trials": args.trials, "timeout_s": args.timeout_s, "seed": args.tune_seed, "study_name": name,
                 "study_storage": args.study_storage, "max_cost_ratio": args.max_cost_ratio,
                 "space": {k: v.model_dump(exclude_none=True) for k, v in space.items()}}})
    t0 = time.perf_counter()
    out = tune(cfg, snap, source=str(args.data), output=str(work / f"{name}.yaml"),
               progress=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0

    command = " ".join(["python benchmarks/tune.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    cpu = out["cpu_seconds"]["study"]
    header = (f"# {name}: {args.model} tuned on {dataset}'s validation users "
              f"({snap.val.fold_in.n_rows} users; split seed {args.split_seed})\n"
              f"# reproduce: {command}\n"
              f"# budget: {sum(out['trials'].values())} trials ({out['trials']}), {cpu / 3600:.2f} CPU-h, "
              f"{wall / 60:.1f} min wall on {torch.get_num_threads()} torch thread(s)\n"
              f"# validation NDCG@100: best {out['best']['val_ndcg_at_100']:.4f} (trial {out['best']['trial']}), "
              f"quality.py's settings {_value(out['given'])} (trial 0)\n")
    CONFIGS.mkdir(exist_ok=True)
    target = CONFIGS / f"{name}.yaml"
    target.write_text(header + Path(out["output"]).read_text())
    print(json.dumps({**out, "config": str(target), "wall_seconds": wall}, indent=1, default=str))


if __name__ == "__main__":
    main()
