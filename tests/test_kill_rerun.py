"""Scoring killed with SIGKILL halfway, then rerun: the committed rows equal a clean
run's, no user appears twice, the killed run never wrote ``_SUCCESS`` (the day's commit
pointer), and the rerun removed what the killed run had written."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from piarec.data import reader
from piarec.data.commit import read_pointer
from piarec.models.bundle import save_bundle
from piarec.config import ModelConfig
from piarec.models.multivae import MultiVAE
from piarec.data.synthetic import generate_events

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 2, 9)
N_ITEMS = 300


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    generate_events(str(root / "events"), users=30_000, items=N_ITEMS, days=40, seed=11)
    torch.manual_seed(0)
    model = MultiVAE(N_ITEMS, ModelConfig(hidden_dim=64, latent_dim=16))
    items = np.array([f"t{i:05d}" for i in range(N_ITEMS)], dtype=object)
    save_bundle(root / "model", model, items, np.arange(N_ITEMS, 0, -1, dtype=np.float32))
    return root


def _cmd(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "piarec", "score", "--events", str(root / "events"), "--date", str(DAY),
            "--out", str(out), "--model", str(root / "model"), "--k", "20"]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    env.update(PIAREC__STORAGE__ROOT=str(root), PIAREC__SPARK__MASTER="local[2]",
               PIAREC__SCORING__BATCH_SIZE="256")
    return env


def _rows(day: Path) -> list[tuple]:
    # the reader rule: the champion arm's files as the day's commit pointer names them
    table = reader.read_arm(str(day), "champion").sort_by("user_id")
    return list(zip(*(table.column(c).to_pylist() for c in ("user_id", "item_ids", "scores", "source"))))


def test_killed_run_then_rerun_equals_a_clean_run(inputs):
    root = inputs
    clean_out, out = root / "clean", root / "recs"
    assert subprocess.run(_cmd(root, clean_out), env=_env(root), capture_output=True, timeout=600).returncode == 0

    proc = subprocess.Popen(_cmd(root, out), env=_env(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    day = out / f"dt={DAY}"
    deadline = time.monotonic() + 300
    # Kill as soon as the run has started writing data under its version of the day
    # (``_versions/<version>/arm=champion/``): the model is loaded, the lease taken,
    # scoring is under way, nothing is committed.
    while time.monotonic() < deadline and proc.poll() is None:
        if (day / "_versions").exists() and any(p.is_file() for p in (day / "_versions").rglob("*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (day / "_SUCCESS").exists() and read_pointer(str(day)) is None
    killed = [p.name for p in (day / "_versions").iterdir()]
    assert len(killed) == 1  # what the killed run left: its version (and its dead lease)

    rerun = subprocess.run(_cmd(root, out), env=_env(root), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    pointer = read_pointer(str(day))
    assert pointer is not None and pointer.version not in killed
    # The killed run's version and lease are gone: the pointer and the committed version only.
    assert sorted(p.name for p in day.iterdir()) == ["_SUCCESS", "_versions"]
    assert [p.name for p in (day / "_versions").iterdir()] == [pointer.version]
    rows = _rows(day)
    assert len({r[0] for r in rows}) == len(rows)
    assert rows == _rows(clean_out / f"dt={DAY}")
