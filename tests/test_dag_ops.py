"""``piarec ops`` (piarec/ops.py): the checks the DAG tasks run in the project environment,
on hand-made events and recommendation partitions with known answers."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piarec import ops
from piarec.cli import main
from piarec.config import load_config
from piarec.data.commit import PartitionCommit, read_pointer
from piarec.scoring.arrow import OUTPUT_SCHEMA

DAY = dt.date(2026, 4, 9)


@pytest.fixture
def cfg(tmp_path):
    root = tmp_path / "work"
    part = root / "events" / f"dt={DAY}"
    part.mkdir(parents=True)
    ts = pa.array([dt.datetime(2026, 4, 9, h, tzinfo=dt.timezone.utc) for h in (1, 2, 3, 4)], pa.timestamp("us", "UTC"))
    pq.write_table(pa.table({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["t1", "t2", "t3", "t4"],
                             "event_type": ["play", "complete", "play", "impression"], "ts": ts,
                             "watch_seconds": pa.array([600, 900, 30, 0], pa.int32())}), part / "part-0.parquet")
    (part / "_SUCCESS").write_bytes(b"")  # upstream's mark: the day is complete
    return load_config(environ={}, overrides={"storage": {"root": str(root)}})


@pytest.fixture
def piarec_ops(cfg, tmp_path, monkeypatch):
    """``piarec ops ...`` through the CLI, with the same configuration as ``cfg``."""
    for name in [n for n in os.environ if n.startswith("PIAREC")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIAREC__STORAGE__ROOT", cfg.storage.root)
    return lambda *argv: main(["ops", *argv])


def publish(cfg, rows: dict[str, list[str]], *, users: int | None = None, k: int = 2,
            extra: pa.Table | None = None, by_source: int | None = None) -> Path:
    """Commit a hand-made day with one arm, ``champion`` (unchecked: these tests check it);
    ``extra`` goes into a second file of the arm."""
    table = pa.table({
        "user_id": list(rows), "item_ids": list(rows.values()),
        "scores": [[float(10 - i) for i in range(len(v))] for v in rows.values()],
        "model_version": ["1"] * len(rows), "source": ["model"] * len(rows),
    }, schema=OUTPUT_SCHEMA)
    n = len(rows) if users is None else users
    manifest = {"date": DAY.isoformat(), "k": k, "arms": {"champion": {
        "model": {"version": "1", "n_items": 6},
        "counts": {"users": n, "by_source": {"model": by_source or len(rows), "popularity": 0}}}}}
    with PartitionCommit(ops.recs_uri(cfg.storage, DAY)) as run:
        part = Path(run.data_uri) / "arm=champion"
        part.mkdir(parents=True)
        pq.write_table(table, part / "part-0.parquet")
        if extra is not None:
            pq.write_table(extra, part / "part-1.parquet")
        run.commit(manifest)
    return part


def test_valid_day_passes_and_nothing_is_written(cfg, piarec_ops, capsys):
    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]})  # u2 saw t3 (play), not t4 (impression)
    day = Path(ops.recs_uri(cfg.storage, DAY))
    before = sorted(str(p) for p in day.rglob("*"))
    assert piarec_ops("validate", "--date", str(DAY), "--arms", "champion") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["arms"][0]["users"] == 2 and report["version"] == read_pointer(str(day)).version
    assert sorted(str(p) for p in day.rglob("*")) == before


def test_files_lists_exactly_the_committed_files(cfg, piarec_ops, capsys):
    part = publish(cfg, {"u1": ["t3", "t5"]}, extra=None)
    stray = part.parent.parent / "_versions" / "killed-run" / "arm=champion"  # a dead run's leftovers
    stray.mkdir(parents=True)
    (stray / "part-9.parquet").write_bytes(b"not committed")
    assert piarec_ops("files", "--date", str(DAY)) == 0
    assert capsys.readouterr().out.split() == [str(part / "part-0.parquet")]
    assert piarec_ops("files", "--date", str(DAY), "--arm", "champion") == 0
    assert capsys.readouterr().out.split() == [str(part / "part-0.parquet")]
    assert piarec_ops("files", "--date", str(DAY), "--arm", "challenger") == 2
    assert "no committed files of arm 'challenger'" in capsys.readouterr().err
    assert piarec_ops("files", "--date", "2026-04-10") == 2
    assert "not committed" in capsys.readouterr().err


def test_the_recommendations_root_can_live_apart_from_the_storage_root(cfg, tmp_path):
    assert ops.recs_uri(cfg.storage, DAY) == str(Path(cfg.storage.root) / "recommendations" / f"dt={DAY}")
    cfg.storage.recommendations = "s3://bucket/recs"
    assert ops.recs_uri(cfg.storage, DAY) == f"s3://bucket/recs/dt={DAY}"


def test_the_committed_arms_must_be_the_expected_ones(cfg, piarec_ops, capsys):
    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]})
    assert piarec_ops("validate", "--date", str(DAY), "--arms", "champion,challenger") == 2
    assert "holds arms ['champion'], expected ['challenger', 'champion']" in capsys.readouterr().err


def test_a_seen_title_is_caught(cfg):
    publish(cfg, {"u1": ["t2", "t5"], "u2": ["t1", "t6"]})  # u1 completed t2
    with pytest.raises(ops.ValidationFailed, match="titles they have seen"):
        ops.validate_day(cfg, DAY, ["champion"], None, 100)


def test_counts_and_k_are_checked_against_the_manifest(cfg):
    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]}, users=3)
    with pytest.raises(ops.ValidationFailed, match="manifest counts 3 users"):
        ops.validate_day(cfg, DAY, ["champion"], None, 100)
    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]})
    with pytest.raises(ops.ValidationFailed, match="not the requested 5"):
        ops.validate_day(cfg, DAY, ["champion"], 5, 100)


def test_uncommitted_day_fails_validation(cfg, piarec_ops, capsys):
    with pytest.raises(ops.ValidationFailed, match="not committed"):
        ops.validate_day(cfg, DAY, ["champion"], None, 100)
    # Through the CLI: one line and status 2 (1 would read as "not ready yet").
    assert piarec_ops("validate", "--date", str(DAY)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not committed" in err[0]


def test_events_ready_waits_for_every_partition(cfg, piarec_ops, capsys):
    assert piarec_ops("events-ready", "--day", str(DAY)) == 0
    assert piarec_ops("events-ready", "--day", "2026-04-10") == ops.NOT_READY
    assert piarec_ops("events-ready", "--window-end", "2026-04-10") == ops.NOT_READY
    assert "waiting for 89 event partition(s)" in capsys.readouterr().out
    assert ops.events_ready(cfg, start=DAY, end=DAY + dt.timedelta(days=1)) == 0
    assert ops.events_ready(cfg, start=DAY, end=DAY + dt.timedelta(days=2)) == ops.NOT_READY


def test_events_ready_waits_for_the_day_to_be_complete_not_for_its_folder(cfg, tmp_path, piarec_ops, capsys):
    """A partition upstream is still writing (its folder and files exist, its marker does
    not) is not ready; the marker's name is configurable."""
    root = Path(cfg.storage.root) / "events"
    writing = root / f"dt={DAY + dt.timedelta(days=1)}"
    writing.mkdir()
    (writing / "part-0.parquet").write_bytes((root / f"dt={DAY}" / "part-0.parquet").read_bytes())
    span = {"start": DAY, "end": DAY + dt.timedelta(days=2)}
    assert ops.events_ready(cfg, **span) == ops.NOT_READY
    assert f"to be complete (_SUCCESS): dt={DAY + dt.timedelta(days=1)}" in capsys.readouterr().out
    (writing / "_SUCCESS").write_bytes(b"")
    assert ops.events_ready(cfg, **span) == 0
    custom = load_config(environ={}, overrides={"storage": {"root": cfg.storage.root},
                                                "events": {"done_marker": "_DONE"}})
    assert ops.events_ready(custom, **span) == ops.NOT_READY  # neither day has _DONE
    for day in (DAY, DAY + dt.timedelta(days=1)):
        (root / f"dt={day}" / "_DONE").write_bytes(b"")
    assert ops.events_ready(custom, **span) == 0


def test_every_user_is_checked_not_only_the_sample(cfg):
    """Streaming validation reads every row: a user repeated in another file of the arm and
    a user with scores out of rank order are caught with a sample of one user."""
    extra = pa.table({"user_id": ["u1"], "item_ids": [["t1", "t6"]], "scores": [[1.0, 2.0]],
                      "model_version": ["1"], "source": ["model"]}, schema=OUTPUT_SCHEMA)
    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]}, users=3, extra=extra, by_source=3)
    with pytest.raises(ops.ValidationFailed) as exc:
        ops.validate_day(cfg, DAY, ["champion"], None, 1)
    assert "user_id is not unique (1 repeated rows)" in str(exc.value)
    assert "1 users have non-finite or unordered scores" in str(exc.value)


def test_uniqueness_is_exact_when_user_hashes_collide(cfg, monkeypatch):
    """Two distinct users with the same 64-bit hash are not a duplicate: candidates are
    compared by id."""
    import piarec.scoring.arrow as arrow

    publish(cfg, {"u1": ["t3", "t5"], "u2": ["t1", "t6"]})
    monkeypatch.setattr(arrow, "user_hash", lambda ids, salt: np.zeros(len(ids), np.uint64))
    assert ops.validate_day(cfg, DAY, ["champion"], None, 100)["arms"][0]["users"] == 2
