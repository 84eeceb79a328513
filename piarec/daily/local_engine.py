"""The daily scoring run on one machine.

    piarec score --engine local --date 2026-03-10 [--histories ROOT] [--out ROOT]
        [--model URI] [--challenger URI] [--k N] [--device auto|cpu|cuda]

:func:`run_local` streams the histories dataset ``<histories root>/dt=D/`` (``user_id,
history, seen``; published with ``_SUCCESS``) batch by batch and writes Parquet as it goes,
so memory stays flat in the number of users. It never imports pyspark. ``threads`` workers
each take whole batches from the reader and run them end to end (vocabulary mapping,
encoder, decoder, exact top-K, Arrow, Parquet) with one torch thread and their own output
files: every stage runs in parallel, with no hand-off between threads. The device comes
from :func:`piarec.device.pick_device`. Arms, staging and publication are the Spark job's
(:mod:`piarec.daily.arms`, :mod:`piarec.daily.inputs`, :mod:`piarec.daily.publish`), so both engines write the same output.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from datetime import date
from typing import Any, Callable

import pyarrow as pa

from piarec.config import PipelineConfig
from piarec.errors import ConfigError
from piarec.scoring.arrow import MODEL, POPULARITY
from piarec.daily.arms import ArmPlan
from piarec.daily.inputs import histories_files, histories_partition, read_histories, window
from piarec.daily.publish import ArmCounts, PartWriter, publish_run, staged
from piarec.data import layout
from piarec.data.storage import Location, resolve


def run_local(
    cfg: PipelineConfig,
    day: date,
    histories_root: str,
    out_root: str,
    plan: ArmPlan,
    k: int,
    *,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every user of the histories partition of ``day`` and publish each arm;
    returns the manifests by arm. See the module docstring."""
    import torch

    from piarec.device import pick_device
    from piarec.scoring.scorer import TopKScorer

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    uri, histories_manifest = histories_partition(histories_root, day)
    loc = resolve(uri)
    files = histories_files(loc)
    dev = pick_device(device or cfg.scoring.device)
    prec = precision or cfg.scoring.precision
    n_workers = threads or cfg.scoring.threads or os.cpu_count() or 1
    scorers = [TopKScorer(a.bundle, k, cfg.scoring.batch_size, device=dev, precision=prec) for a in plan.arms]
    vocabs = [pa.array(a.bundle.item_ids.tolist(), pa.string()) for a in plan.arms]
    batches = read_histories(loc.fs, files, cfg.scoring.batch_size, uri)
    lock, stop = threading.Lock(), threading.Event()
    counts = {a.name: ArmCounts() for a in plan.arms}

    def worker(wid: int, staging: Location) -> None:
        writers = [PartWriter(staging.child(layout.arm_dir(a.name)), f"{wid:03d}", cfg.scoring.rows_per_file)
                   for a in plan.arms]
        local = {a.name: ArmCounts() for a in plan.arms}
        try:
            while not stop.is_set():
                with lock:
                    batch = next(batches, None)
                if batch is None:
                    break
                _score_batch(batch, plan, scorers, vocabs, writers, local)
                if progress is not None:
                    progress(batch.num_rows)
        except BaseException:
            stop.set()
            raise
        finally:
            for w in writers:
                w.close()
            with lock:
                for name, c in local.items():
                    counts[name].add(c.users[MODEL], c.users[POPULARITY], c.unknown_titles)

    with staged(out_root, day) as staging, _torch_threads(torch, 1 if dev.type == "cpu" else None):
        root = resolve(staging)
        with concurrent.futures.ThreadPoolExecutor(n_workers, thread_name_prefix="piarec-score") as pool:
            futures = [pool.submit(worker, w, root) for w in range(n_workers)]
            for f in concurrent.futures.as_completed(futures):
                f.result()  # the first failure stops the others and propagates
        return publish_run(
            staging, out_root, day, plan, counts, k=k, window=window(cfg.scoring, day),
            source={"kind": "histories", "uri": uri, "manifest": histories_manifest},
            engine={"name": "local", "device": str(dev), "precision": scorers[0].precision, "threads": n_workers},
        )


def _score_batch(batch: pa.RecordBatch, plan: ArmPlan, scorers: list, vocabs: list[pa.Array],
                 writers: list[PartWriter], counts: dict[str, ArmCounts]) -> None:
    """Score one batch of histories: each user with their arm's model, each arm's rows
    written by that arm's writer and counted."""
    from piarec.scoring.arrow import map_arrow_lists, to_record_batch

    arm_of = plan.assign(batch.column("user_id"))
    for a, arm in enumerate(plan.arms):
        part = batch if len(plan.arms) == 1 else batch.filter(pa.array(arm_of == a))
        if part.num_rows == 0:
            continue
        history, unknown_h = map_arrow_lists(part.column("history"), vocabs[a])
        seen, unknown_s = map_arrow_lists(part.column("seen"), vocabs[a])
        scored = scorers[a].score(history, seen)
        writers[a].write(to_record_batch(part.column("user_id"), scored, vocabs[a], arm.version, dictionary=True))
        n_pop = int((scored.source == POPULARITY).sum())
        counts[arm.name].add(part.num_rows - n_pop, n_pop, unknown_h.sum() + unknown_s.sum())


@contextlib.contextmanager
def _torch_threads(torch, n: int | None):
    """Each worker runs its batch on one torch thread; restore the setting afterwards."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
