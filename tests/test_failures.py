"""Scoring stops with one clear line when its model cannot be had, and yesterday's
published output stays exactly as it was."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piarec.data import storage
from piarec.data.commit import PartitionCommit
from piarec.data.synthetic import generate_events

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 1, 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path):
    generate_events(str(tmp_path / "events"), users=200, items=50, days=20, seed=3)
    # Yesterday's committed recommendations for the same partition.
    final = tmp_path / "recommendations" / f"dt={DAY}"
    with PartitionCommit(str(final)) as run:
        os.makedirs(f"{run.data_uri}/arm=champion")
        pq.write_table(pa.table({"user_id": ["u1"], "item_ids": [["t1"]]}), f"{run.data_uri}/arm=champion/part-0.parquet")
        run.commit({"arms": {"champion": {"model": {"version": "1"}}}})
    before = sorted((str(p.relative_to(final)), p.read_bytes()) for p in final.rglob("*") if p.is_file())
    return tmp_path, final, before


def _score(root, tracking_uri: str, extra_env: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    env.update(PIAREC__STORAGE__ROOT=str(root), PIAREC__MLFLOW__TRACKING_URI=tracking_uri,
               PIAREC__SPARK__MASTER="local[1]", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "piarec", "score", "--date", str(DAY)],
                          capture_output=True, text=True, env=env, timeout=300)


def _assert_untouched(final, before):
    assert sorted((str(p.relative_to(final)), p.read_bytes()) for p in final.rglob("*") if p.is_file()) == before
    assert storage.is_published(str(final))


def test_missing_champion_alias_stops_scoring(workdir):
    root, final, before = workdir
    proc = _score(root, f"sqlite:///{root}/mlflow.db")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "champion" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _assert_untouched(final, before)


def test_unreachable_mlflow_server_stops_scoring(workdir):
    root, final, before = workdir
    proc = _score(root, f"http://127.0.0.1:{_free_port()}",
                  {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "models:/piarec@champion" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _assert_untouched(final, before)
