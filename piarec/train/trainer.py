"""Training loop for Multi-VAE / RecVAE + PIA. Reads top to bottom:

config -> data -> model -> helpers (beta schedule, lambda_A schedule, checkpoint) -> loop.

How one epoch updates the model is the model's business (:meth:`phases`): Multi-VAE has
one phase (a joint Adam step per batch); RecVAE alternates encoder and decoder phases,
each with its own optimizer. The loop below only walks the phases.

MLflow and storage wiring live in :mod:`piarec.train.job`; this module only needs a
snapshot and a config, and reports each epoch through a callback. Under torchrun it trains
data-parallel (:mod:`piarec.train.distributed`): each rank works on its shard of every global
batch and the ranks sum their gradients.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from piarec.config import PipelineConfig
from piarec.device import pick_device
from piarec.evaluate.diagnostics import collapse_metrics, diagnosable
from piarec.errors import TrainingError
from piarec.evaluate.metrics import SELECTION_METRIC
from piarec.evaluate.protocol import evaluate_model
from piarec.models.contract import Phase, SparseBatch
from piarec.models.factory import build_model
from piarec.data.snapshot import Snapshot
from piarec.data.csr import CSR
from piarec.models.noise import stream_key
from piarec.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from piarec.train.distributed import (Ranks, all_reduce_sum, broadcast_object, join, local_device, ranks_from_env,
                                      summed_gradients)


@dataclass
class TrainResult:
    model: torch.nn.Module  # the best validation epoch's weights, on CPU, eval mode
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    lambda_a: float = 0.0  # final value of the schedule
    # Why the loop ended: "early_stop" (no validation improvement for early_stop_patience
    # epochs) or "epochs" (training.epochs reached).
    stop_reason: str = "epochs"
    # With training.beta_search: the picked beta, the search run's best epoch and its history.
    beta_search: dict[str, Any] | None = None


def beta_at(step: int, cap: float, anneal_steps: float) -> float:
    """KL weight: grows by 1/anneal_steps per update until it reaches the cap
    (Liang et al.'s reference code: beta = min(cap, step / total_anneal_steps))."""
    return min(cap, step / anneal_steps)


def anneal_steps(tc, updates_per_epoch: int) -> float:
    """The ``anneal_steps`` of :func:`beta_at` (beta = step / anneal_steps, capped): with
    ``training.anneal_epochs`` set, the value that makes beta reach ``beta_cap`` after that
    many epochs of ``updates_per_epoch``; else ``training.anneal_steps``."""
    if not tc.anneal_epochs or tc.beta_cap <= 0:
        return tc.anneal_steps
    return tc.anneal_epochs * updates_per_epoch / tc.beta_cap


@dataclass
class LambdaSchedule:
    """lambda_A of the PIA paper's appendix C.

    Algorithm 1 as printed raises lambda_A when ``best_val_epoch < epoch + rho``, which
    is always true. Two readings of its stated intent (``mode``, ``pia.schedule``):

    - ``patience``: multiply lambda_A by ``scale`` when validation NDCG@100 has not
      improved for ``patience`` (rho) consecutive epochs, at most once per rho epochs (the
      stall counter restarts after each raise), never above ``cap``;
    - ``paper``: Algorithm 1 with ``best_val_epoch`` never reset: on every epoch whose best
      validation epoch is rho or more epochs behind, multiply by ``scale``; no cap. Once
      stalled, lambda_A doubles (scale 2) every epoch until validation improves.

    ``stall`` counts the epochs since the best one (patience: since the last raise).
    """

    value: float
    scale: float
    patience: int
    cap: float
    stall: int = 0
    mode: str = "patience"

    def update(self, improved: bool) -> bool:
        """Record one epoch; returns True when lambda_A was raised."""
        self.stall = 0 if improved else self.stall + 1
        if self.stall < self.patience or self.value <= 0:
            return False
        if self.mode == "paper":
            self.value *= self.scale
            return True
        if self.value >= self.cap:
            return False
        self.value = min(self.value * self.scale, self.cap)
        self.stall = 0
        return True


_PARTS = ("loss", "nll", "kl", "align")


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: SparseBatch, beta: float, lambda_a: float,
    phase: Phase | None = None, step: int = 0, weight: float = 1.0, ranks: Ranks = Ranks(),
    precision: str = "fp32",
):
    """One update; ``step`` counts the updates made before it (for step-dependent loss
    weights). Returns the loss parts as floats; raises TrainingError on a non-finite loss.

    Data-parallel (``ranks.parallel``): ``batch`` is this rank's part of a global batch and
    ``weight`` its share of the global batch's users; the weighted gradients are summed over
    the ranks while backward runs (:func:`summed_gradients`) and the loss parts after it, so
    every rank steps with the global batch's gradient and every rank sees the same loss (and
    raises together)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(batch.indices.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        parts = model.loss(batch, beta, lambda_a, phase, step=step)
    values = torch.stack([parts.total, parts.nll, parts.kl, parts.align]).detach() * weight
    if ranks.parallel:
        # Backward even on a non-finite loss: every rank must send the same buffer, and the
        # non-finite sum then stops every rank below.
        with summed_gradients((p for g in opt.param_groups for p in g["params"]), ranks):
            (parts.total * weight).backward()
        all_reduce_sum(values, ranks)
    total, nll, kl, align = values.tolist()
    if not math.isfinite(total):
        raise TrainingError(f"loss became {total} (nll={nll}, kl={kl}, align={align}); "
                            "lower training.lr or pia.lambda_a")
    if not ranks.parallel:
        (parts.total if weight == 1.0 else parts.total * weight).backward()
    opt.step()
    return dict(zip(_PARTS, (total, nll, kl, align)))


def _only_trainable(groups: dict[str, list[torch.nn.Parameter]], active: str) -> None:
    """Freeze every group but ``active`` so no gradient is computed for frozen weights."""
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name == active)


@dataclass(frozen=True)
class TrainRows:
    """The training rows this process holds and how its batches are cut: all of them in one
    process; with N ranks, rank r holds global users r, r + N, r + 2N, ... (row u // N)."""

    csr: CSR
    n_users: int  # training users over all ranks
    ranks: Ranks
    keyed: bool  # masks and noise keyed by (seed, pass, user)

    @classmethod
    def of(cls, snap: Snapshot, ranks: Ranks, keyed: bool) -> "TrainRows":
        """This rank's rows: the snapshot's own when it was loaded as this rank's shard
        (``load_snapshot(shard=(rank, world))``), else sliced from the whole matrix."""
        if snap.shard is not None:
            if (snap.shard.rank, snap.shard.world) != (ranks.rank, ranks.world):
                raise TrainingError(f"the snapshot holds shard {snap.shard.rank} of {snap.shard.world}, "
                                    f"but this process is rank {ranks.rank} of {ranks.world}")
            return cls(snap.train, snap.n_train_users, ranks, keyed)
        return cls.sliced(snap.train, ranks, keyed)

    @classmethod
    def sliced(cls, train: CSR, ranks: Ranks, keyed: bool) -> "TrainRows":
        """This rank's rows sliced from the whole training matrix ``train``."""
        held = train.take_rows(np.arange(ranks.rank, train.n_rows, ranks.world)) if ranks.parallel else train
        return cls(held, train.n_rows, ranks, keyed)

    def batches(self, order: np.ndarray, batch_size: int, device: torch.device, stream: int):
        """(weight, batch) per global batch of ``order`` (global user ids): this rank's users
        of it, weighted by their share of it. A rank with none of a batch's users still
        takes part in the all-reduce, with one of its rows at weight 0."""
        world, rank = self.ranks.world, self.ranks.rank
        for start in range(0, len(order), batch_size):
            users = order[start : start + batch_size]
            if not self.keyed:
                yield 1.0, SparseBatch.from_csr(self.csr.take_rows(users), device)
                continue
            mine = users[users % world == rank] if self.ranks.parallel else users
            weight = len(mine) / len(users)
            if not len(mine):
                mine = np.array([rank], dtype=np.int64)
            yield weight, SparseBatch.from_csr(self.csr.take_rows(mine // world), device, users=mine, stream=stream)


def _check_finite(model: torch.nn.Module, epoch: int) -> None:
    """Refuse to checkpoint non-finite weights: the last good checkpoint must survive."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"weights became non-finite in epoch {epoch} ({', '.join(bad[:3])}); "
                            "lower training.lr or pia.lambda_a")


@dataclass
class _Loop:
    """What the loop carries from epoch to epoch besides the model and optimizers."""

    rng: np.random.Generator
    lam: LambdaSchedule
    step: int = 0
    epoch: int = 0  # the last completed epoch
    best_ndcg: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _snapshot_state(model, opts, loop: _Loop, device: torch.device) -> TrainState:
    return TrainState(
        model=model.state_dict(), optimizers={n: o.state_dict() for n, o in opts.items()},
        step=loop.step, epoch=loop.epoch, best_ndcg=loop.best_ndcg, best_epoch=loop.best_epoch,
        since_best=loop.since_best, best_state=loop.best_state, best_metrics=loop.best_metrics,
        history=loop.history, lambda_a=loop.lam.value, lambda_stall=loop.lam.stall,
        torch_rng=torch.get_rng_state(), numpy_rng=loop.rng.bit_generator.state,
        cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None,
    )


def _restore(ck: TrainState, model, opts, loop: _Loop, device: torch.device) -> None:
    model.load_state_dict(ck.model)
    for name, opt in opts.items():
        opt.load_state_dict(ck.optimizers[name])
    loop.step, loop.epoch = int(ck.step), int(ck.epoch)
    loop.best_ndcg, loop.best_epoch, loop.since_best = float(ck.best_ndcg), int(ck.best_epoch), int(ck.since_best)
    loop.best_state, loop.best_metrics, loop.history = ck.best_state, ck.best_metrics, ck.history
    loop.lam.value, loop.lam.stall = float(ck.lambda_a), int(ck.lambda_stall)
    torch.set_rng_state(ck.torch_rng)
    if device.type == "cuda" and ck.cuda_rng is not None:
        torch.cuda.set_rng_state(ck.cuda_rng.cpu())
    loop.rng.bit_generator.state = ck.numpy_rng


def _train_epoch(model, groups, opts, rows: TrainRows, loop: _Loop, tc, device: torch.device,
                 align_weight: float, anneal: float) -> dict[str, float]:
    """One epoch: each phase steps its optimizer for its number of passes (one phase for
    Multi-VAE). ``align_weight``: lambda_A's multiplier in the loss (1/d for the mean
    alignment); ``anneal``: updates until beta reaches its cap. Returns the mean loss parts
    per batch."""
    model.train()
    sums = dict.fromkeys(_PARTS, 0.0)
    n_batches = 0
    phases = model.phases()
    pass_index = loop.epoch * sum(p.passes for p in phases)  # passes made before this epoch
    for phase in phases:
        _only_trainable(groups, phase.group)
        for _ in range(phase.passes):
            order = loop.rng.permutation(rows.n_users)
            stream = stream_key(tc.seed, pass_index)
            pass_index += 1
            for weight, batch in rows.batches(order, tc.batch_size, device, stream):
                beta = beta_at(loop.step, tc.beta_cap, anneal)
                parts = train_step(model, opts[phase.group], batch, beta, loop.lam.value * align_weight, phase,
                                   step=loop.step, weight=weight, ranks=rows.ranks, precision=tc.precision)
                for key, v in parts.items():
                    sums[key] += v
                loop.step += 1
                n_batches += 1
        model.end_phase(phase)
    return {k: v / max(n_batches, 1) for k, v in sums.items()}


def epoch_updates(model: torch.nn.Module, n_users: int, batch_size: int) -> int:
    """Optimizer updates an epoch of ``n_users`` training users makes: every phase's passes
    over every batch."""
    return sum(p.passes for p in model.phases()) * -(-n_users // batch_size)


def beta_search_config(cfg: PipelineConfig, updates_per_epoch: int) -> PipelineConfig:
    """The search run of Liang et al.'s beta procedure: beta annealed towards 1, reaching it
    after ``training.anneal_epochs`` epochs (``training.epochs`` when unset)."""
    tc = cfg.training
    steps = max(1, round((tc.anneal_epochs or tc.epochs) * updates_per_epoch))
    return cfg.model_copy(update={"training": tc.model_copy(update={
        "beta_cap": 1.0, "anneal_steps": steps, "anneal_epochs": None, "beta_search": False})})


def picked_beta(history: list[dict[str, float]]) -> tuple[float, int]:
    """``(beta, epoch)`` of the first epoch with the best validation NDCG@100 of a history."""
    best = max(history, key=lambda row: row[f"val_{SELECTION_METRIC}"])  # max keeps the first of ties
    return float(best["beta"]), int(best["epoch"])


def train(
    cfg: PipelineConfig,
    snap: Snapshot,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    checkpoint_path: str | None = None,
    ranks: Ranks | None = None,
    on_search_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fit the configured model (+ PIA when ``cfg.pia.enabled``) on ``snap.train``; select
    the epoch with the best validation NDCG@100.

    With ``training.beta_search`` this is Liang et al.'s procedure (section 2.2.2): a search
    run anneals beta towards 1 (:func:`beta_search_config`; its epochs reach
    ``on_search_epoch``, its checkpoint sits beside ``checkpoint_path`` with the suffix
    ``.beta-search``), the beta of its best validation epoch becomes ``beta_cap``
    (:func:`picked_beta`), and the returned run trains anew at that cap, annealed at the
    search's rate. ``result.beta_search`` records the pick.

    With ``checkpoint_path`` (a local path or ``s3://`` URI) the state is saved after every
    epoch and a run resumes from it when it exists: weights, optimizers, step, schedules and
    RNG states, so a resumed run reaches the same weights as an uninterrupted one. Epochs
    restored from a checkpoint are replayed through ``on_epoch`` first. A non-finite loss
    or weight raises :class:`TrainingError` and leaves the last good checkpoint in place.

    ``ranks`` (default: what torchrun set in the environment, else one process): with several,
    this process joins the group and trains its shard of every global batch
    (:mod:`piarec.train.distributed`); rank 0 alone evaluates, reports and checkpoints, and
    returns the model every rank holds.
    """
    if cfg.training.beta_search:
        return _train_beta_searched(cfg, snap, on_epoch=on_epoch, on_search_epoch=on_search_epoch,
                                    checkpoint_path=checkpoint_path, ranks=ranks)
    tc = cfg.training
    if snap.n_train_users == 0:
        raise TrainingError("the snapshot has no training users")
    if snap.val.fold_in.n_rows == 0:
        raise TrainingError("the snapshot has no validation users; raise split.val_fraction")

    # -- setup: ranks, seeds, device, model, optimizers (one per parameter group), schedules
    ranks = ranks or ranks_from_env()
    keyed = tc.noise == "keyed" or (tc.noise == "auto" and ranks.parallel)
    if ranks.parallel and not keyed:
        raise TrainingError("training.noise 'generator' cannot train on several processes; use 'auto' or 'keyed'")
    if keyed and cfg.model.regularizers.noise_contrastive:
        raise TrainingError("the noise-contrastive regularizer draws from torch's generator; it trains with "
                            "training.noise 'generator' in one process only")
    if snap.n_train_users < ranks.world:
        raise TrainingError(f"{ranks.world} processes for {snap.n_train_users} training users")
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    device = local_device(pick_device(tc.device), ranks)
    join(ranks, device)
    rows = TrainRows.of(snap, ranks, keyed)
    model = build_model(snap.train.n_cols, cfg.model).to(device)
    groups = model.param_groups()
    # Fused Adam: one kernel over all tensors (~15 % faster per step on CPU), same update rule.
    opts = {name: torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
            for name, params in groups.items()}
    pia = cfg.pia
    loop = _Loop(np.random.default_rng(tc.seed),
                 LambdaSchedule(pia.lambda_a if pia.enabled else 0.0, pia.lambda_scale, pia.patience, pia.lambda_max,
                                mode=pia.schedule))
    align_weight = 1.0 / cfg.model.latent_dim if pia.alignment == "mean" else 1.0
    anneal = anneal_steps(tc, epoch_updates(model, snap.n_train_users, tc.batch_size))
    diagnose = cfg.diagnostics.enabled and diagnosable(snap.val.fold_in)

    # -- resume: a checkpoint of the same run continues it exactly -------------------------
    ck = load_checkpoint(checkpoint_path, device) if checkpoint_path else None
    if ck is not None:
        _restore(ck, model, opts, loop, device)
        for row in loop.history if on_epoch and ranks.main else ():
            on_epoch(row)

    # -- the loop ---------------------------------------------------------------------
    while loop.epoch < tc.epochs and not (tc.early_stop_patience and loop.since_best >= tc.early_stop_patience):
        epoch = loop.epoch + 1
        t0 = time.perf_counter()
        losses = _train_epoch(model, groups, opts, rows, loop, tc, device, align_weight, anneal)
        train_s = time.perf_counter() - t0

        # Validation on held-out users picks the model and drives lambda_A (rank 0 evaluates;
        # every rank takes its figures, so the schedules and the stop stay in step).
        metrics = broadcast_object(evaluate_model(model, snap.val, tc.eval_batch_size) if ranks.main else None, ranks)
        improved = metrics[SELECTION_METRIC] > loop.best_ndcg
        if improved:
            loop.best_ndcg, loop.best_epoch, loop.best_metrics, loop.since_best = metrics[SELECTION_METRIC], epoch, metrics, 0
            loop.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            loop.since_best += 1
        lambda_used = loop.lam.value
        raised = loop.lam.update(improved)
        # Collapse diagnostics on the same validation users (logged beside the metrics;
        # they do not pick the model). Their own seed: the training RNG streams stay untouched.
        diag = (collapse_metrics(model, snap.val.fold_in, cfg.diagnostics, seed=tc.seed)
                if diagnose and ranks.main and epoch % cfg.diagnostics.every == 0 else {})

        row = {"epoch": epoch, "step": loop.step, "beta": beta_at(loop.step, tc.beta_cap, anneal),
               "lambda_a": lambda_used, "lambda_raised": float(raised), "train_seconds": train_s, **losses,
               **{f"val_{k}": v for k, v in metrics.items()},
               **{f"diag_{k}": v for k, v in diag.items()}}
        loop.history.append(row)
        loop.epoch = epoch
        if on_epoch and ranks.main:
            on_epoch(row)

        _check_finite(model, epoch)
        if checkpoint_path and ranks.main:
            save_checkpoint(checkpoint_path, _snapshot_state(model, opts, loop, device))

    stopped_early = bool(tc.early_stop_patience and loop.since_best >= tc.early_stop_patience)
    best = build_model(snap.train.n_cols, cfg.model)
    best.load_state_dict(loop.best_state if loop.best_state is not None else copy.deepcopy(model.state_dict()))
    best.eval()
    return TrainResult(best, loop.best_epoch, loop.best_metrics, loop.history, loop.lam.value,
                       "early_stop" if stopped_early else "epochs")


def _train_beta_searched(cfg: PipelineConfig, snap: Snapshot, *, on_epoch, on_search_epoch, checkpoint_path,
                         ranks) -> TrainResult:
    """:func:`train`'s ``training.beta_search`` path: search run, pick, final run."""
    probe = build_model(snap.train.n_cols, cfg.model)  # its phases say how many updates an epoch makes
    search_cfg = beta_search_config(cfg, epoch_updates(probe, snap.n_train_users, cfg.training.batch_size))
    del probe
    search = train(search_cfg, snap, on_epoch=on_search_epoch, ranks=ranks,
                   checkpoint_path=f"{checkpoint_path}.beta-search" if checkpoint_path else None)
    beta, epoch = picked_beta(search.history)
    final_cfg = search_cfg.model_copy(update={"training": search_cfg.training.model_copy(update={"beta_cap": beta})})
    result = train(final_cfg, snap, on_epoch=on_epoch, checkpoint_path=checkpoint_path, ranks=ranks)
    result.beta_search = {"beta": beta, "epoch": epoch, "search_best_metrics": search.best_metrics,
                          "search_epochs": len(search.history), "anneal_steps": search_cfg.training.anneal_steps,
                          "history": search.history}
    return result
