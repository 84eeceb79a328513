"""The daily scoring run on one machine.

    piarec score --engine local --date 2026-03-10 [--histories ROOT] [--out ROOT]
        [--model URI] [--challenger URI] [--k N] [--device auto|cpu|cuda]

:func:`run_local` streams the histories dataset ``<histories root>/dt=D/`` (``user_id,
history, seen``; published with ``_SUCCESS``) batch by batch and writes Parquet as it goes,
so memory stays flat in the number of users. It never imports pyspark. ``threads`` workers
each take whole batches from the reader and score them end to end (vocabulary mapping,
encoder, decoder, exact top-K, Arrow) with one torch thread; the scored batches are written
in input order (:class:`_OrderedSink`), so a rerun of the same inputs and model writes the
same files byte for byte. The device comes from :func:`piarec.device.pick_device`. Arms,
validation and the commit are the Spark job's (:mod:`piarec.daily.arms`,
:mod:`piarec.daily.inputs`, :mod:`piarec.daily.publish`), so both engines write the same output.
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
from piarec.scoring.arrow import POPULARITY
from piarec.daily.arms import ArmPlan
from piarec.daily.availability import withheld_by_arm
from piarec.daily.inputs import histories_partition, read_histories, window
from piarec.daily.validate import seen_in_histories
from piarec.daily.publish import ArmCounts, PartWriter, open_day, publish_run
from piarec.data import layout
from piarec.data.storage import resolve


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
    uri, histories_manifest, files = histories_partition(histories_root, day)
    loc = resolve(uri)
    dev = pick_device(device or cfg.scoring.device)
    prec = precision or cfg.scoring.precision
    n_workers = threads or cfg.scoring.threads or os.cpu_count() or 1
    avail, withheld = withheld_by_arm(cfg.scoring, day, {a.name: a.bundle.item_ids for a in plan.arms})
    scorers = [TopKScorer(a.bundle, k, cfg.scoring.batch_size, device=dev, precision=prec, exclude=withheld[a.name])
               for a in plan.arms]
    vocabs = [pa.array(a.bundle.item_ids.tolist(), pa.string()) for a in plan.arms]
    batches = enumerate(read_histories(loc.fs, files, cfg.scoring.batch_size, uri))
    lock, stop = threading.Lock(), threading.Event()

    def worker(sink: _OrderedSink) -> None:
        try:
            while not stop.is_set():
                with lock:
                    item = next(batches, None)
                if item is None:
                    break
                seq, batch = item
                sink.wait_for_room(seq, stop)
                sink.put(seq, _score_batch(batch, plan, scorers, vocabs))
                if progress is not None:
                    progress(batch.num_rows)
        except BaseException:
            stop.set()
            sink.wake()
            raise

    with open_day(cfg.storage, out_root, day) as run, _torch_threads(torch, 1 if dev.type == "cpu" else None):
        root = resolve(run.data_uri)
        writers = [PartWriter(root.child(layout.arm_dir(a.name)), "local", cfg.scoring.rows_per_file)
                   for a in plan.arms]
        sink = _OrderedSink(plan, writers, window=4 * n_workers)
        try:
            with concurrent.futures.ThreadPoolExecutor(n_workers, thread_name_prefix="piarec-score") as pool:
                futures = [pool.submit(worker, sink) for _ in range(n_workers)]
                for f in concurrent.futures.as_completed(futures):
                    f.result()  # the first failure stops the others and propagates
        finally:
            for w in writers:
                w.close()
        return publish_run(
            run, cfg, day, plan, sink.counts, k=k, window=window(cfg.scoring, day),
            source={"kind": "histories", "uri": uri, "manifest": histories_manifest},
            engine={"name": "local", "device": str(dev), "precision": scorers[0].precision, "threads": n_workers},
            seen=lambda users: seen_in_histories(loc.fs, files, users), availability=avail, withheld=withheld,
        )


class _OrderedSink:
    """Writes the scored batches in input order, whichever worker finished them first, so
    a rerun writes the same files byte for byte (the same rows in the same files under the
    same names). The worker that completes the next batch in line writes it and every
    waiting successor; the others go on scoring. A worker does not run more than
    ``window`` batches ahead of the writer, which bounds the memory of waiting batches."""

    def __init__(self, plan: ArmPlan, writers: list[PartWriter], window: int):
        self.plan, self.writers, self.window = plan, writers, window
        self.counts = {a.name: ArmCounts() for a in plan.arms}
        self.next, self.waiting = 0, {}
        self.cond = threading.Condition()
        self.write_lock = threading.Lock()

    def wait_for_room(self, seq: int, stop: threading.Event) -> None:
        with self.cond:
            self.cond.wait_for(lambda: seq - self.next < self.window or stop.is_set())

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def put(self, seq: int, scored: list) -> None:
        with self.cond:
            self.waiting[seq] = scored
            if seq != self.next:
                return
        with self.write_lock:  # one writer at a time, in order
            while True:
                with self.cond:
                    ready = self.waiting.pop(self.next, None)
                    if ready is None:
                        return
                for a, (arm, out) in enumerate(zip(self.plan.arms, ready)):
                    if out is not None:
                        batch, n_pop, unknown = out
                        self.writers[a].write(batch)
                        self.counts[arm.name].add(batch.num_rows - n_pop, n_pop, unknown)
                with self.cond:
                    self.next += 1
                    self.cond.notify_all()


def _score_batch(batch: pa.RecordBatch, plan: ArmPlan, scorers: list, vocabs: list[pa.Array]) -> list:
    """Score one batch of histories, each user with their arm's model: per arm, None when
    no user of the batch is in it, else (rows dictionary-encoded for the writer, how many
    got the popularity fallback, how many history and seen titles were unknown)."""
    from piarec.scoring.arrow import map_arrow_lists, to_record_batch

    arm_of = plan.assign(batch.column("user_id"))
    out: list = []
    for a, arm in enumerate(plan.arms):
        part = batch if len(plan.arms) == 1 else batch.filter(pa.array(arm_of == a))
        if part.num_rows == 0:
            out.append(None)
            continue
        history, unknown_h = map_arrow_lists(part.column("history"), vocabs[a])
        seen, unknown_s = map_arrow_lists(part.column("seen"), vocabs[a])
        scored = scorers[a].score(history, seen)
        rows = to_record_batch(part.column("user_id"), scored, vocabs[a], arm.version, dictionary=True)
        out.append((rows, int((scored.source == POPULARITY).sum()), int(unknown_h.sum() + unknown_s.sum())))
    return out


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
