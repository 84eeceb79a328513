"""The single-node engine: exact output, A/B arms, publishing, failures; no Spark here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from piarec.daily import local_engine as score_local

from piarec.daily import arms as score_arms, publish as score_publish
from piarec.models.bundle import load_bundle, save_bundle
from piarec.config import ModelConfig, load_config
from piarec.errors import InputDataError
from piarec.models.multivae import MultiVAE
from piarec.scoring.arrow import OUTPUT_SCHEMA, in_share, map_histories
from test_scorer import reference

REPO = Path(__file__).resolve().parents[1]
DAY = date(2026, 3, 10)
N_ITEMS, K = 30, 5
ITEMS = [f"t{i:02d}" for i in range(N_ITEMS)]


def make_histories(n_users: int, seed: int = 0) -> dict[str, list]:
    """Histories as the daily build publishes them, plus awkward users."""
    rng = np.random.default_rng(seed)
    users, history, seen = [], [], []
    for u in range(n_users):
        s = sorted(ITEMS[i] for i in rng.choice(N_ITEMS, rng.integers(0, 12), replace=False))
        h = [t for t in s if rng.random() < 0.7]
        users.append(f"u{u:03d}")
        history.append(h + (["new-1"] if u % 9 == 0 else []))
        seen.append(s + (["new-1"] if u % 9 == 0 else []))
    users += ["only-unknown", "seen-all", "nulls"]
    history += [["new-2"], ITEMS[:3], None]
    seen += [["new-2"], ITEMS[:28], None]  # seen-all: 2 titles left
    return {"user_id": users, "history": history, "seen": seen}


def write_histories(root: Path, day: date, data: dict, publish: bool = True) -> None:
    part = root / f"dt={day.isoformat()}"
    part.mkdir(parents=True)
    table = pa.table(data, schema=pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.string())),
                                             ("seen", pa.list_(pa.string()))]))
    half = table.num_rows // 2  # two files, small row groups: many batches
    pq.write_table(table.slice(0, half), part / "part-0.parquet", row_group_size=7)
    pq.write_table(table.slice(half), part / "part-1.parquet", row_group_size=7)
    if publish:
        (part / "_manifest.json").write_text(json.dumps({"users": table.num_rows}))
        (part / "_SUCCESS").write_bytes(b"")


def save_model(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    popularity = np.random.default_rng(seed).integers(0, 5, N_ITEMS).astype(np.float32)  # with ties
    save_bundle(path, MultiVAE(N_ITEMS, ModelConfig(hidden_dim=16, latent_dim=8)),
                np.array(ITEMS, dtype=object), popularity)


@pytest.fixture
def env(tmp_path):
    data = make_histories(80)
    write_histories(tmp_path / "histories", DAY, data)
    save_model(tmp_path / "champion", 0)
    save_model(tmp_path / "challenger", 1)
    cfg = load_config(environ={}, overrides={
        "storage": {"root": str(tmp_path)},
        "scoring": {"k": K, "batch_size": 8, "threads": 2, "history_days": 7,
                    "model_uri": str(tmp_path / "champion"), "challenger_share": 0.4},
    })
    return tmp_path, data, cfg


def run(env, k=K, challenger=True, share=None):
    root, _, cfg = env
    plan = score_arms.plan_arms(cfg, str(root / "champion"), "champion",
                                 str(root / "challenger") if challenger else None, share)
    return score_local.run_local(cfg, DAY, str(root / "histories"), str(root / "recs"), plan, k)


def read_arm(root: Path, arm: str, recs: str = "recs") -> list[dict]:
    # a plain Parquet read of the partition: _SUCCESS and _manifest.json are skipped
    table = ds.dataset(root / recs / f"dt={DAY}" / f"arm={arm}", format="parquet").to_table()
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False), table.schema
    return table.to_pylist()


def expected_rows(root: Path, data: dict, users: list[int], model: str) -> dict[str, tuple]:
    bundle = load_bundle(root / model)
    history, _ = map_histories([data["history"][i] for i in users], bundle.item_index(), N_ITEMS)
    seen, _ = map_histories([data["seen"][i] for i in users], bundle.item_index(), N_ITEMS)
    ref = reference(bundle, history, seen, K)
    return {data["user_id"][i]: ([ITEMS[j] for j in items], scores.tolist(), source)
            for i, (items, scores, source) in zip(users, ref)}


def test_ab_run_is_exact_per_arm(env):
    root, data, cfg = env
    manifests = run(env)
    in_challenger = in_share(pa.array(data["user_id"]), cfg.scoring.ab_salt, 0.4)
    n = len(data["user_id"])
    for arm, model, members in (("champion", "champion", ~in_challenger), ("challenger", "challenger", in_challenger)):
        rows = read_arm(root, arm)
        by_user = {r["user_id"]: r for r in rows}
        assert len(rows) == len(by_user)  # one row per user
        expected = expected_rows(root, data, list(np.flatnonzero(members)), model)
        assert set(by_user) == set(expected)  # the salted hash decides the arm
        for user, (items, scores, source) in expected.items():
            row = by_user[user]
            assert (row["item_ids"], row["scores"], row["source"]) == (items, scores, source), user
            assert row["model_version"] == manifests[arm]["model"]["version"]
        m = manifests[arm]
        assert json.loads((root / "recs" / f"dt={DAY}" / f"arm={arm}" / "_manifest.json").read_text()) == m
        assert m["arm"] == arm and m["date"] == DAY.isoformat() and m["k"] == K
        assert m["counts"] == {"users": len(rows), "by_source": {
            s: sum(r["source"] == s for r in rows) for s in ("model", "popularity")}}
        assert m["model"]["uri"] == str(root / model) and m["model"]["n_items"] == N_ITEMS
    assert 0 < len(read_arm(root, "challenger")) < n
    m = manifests["champion"]
    assert m["arms"]["challenger"] == {k: manifests["challenger"][k] for k in ("model", "counts", "unknown_titles")}
    assert m["assignment"]["salt"] == cfg.scoring.ab_salt and m["assignment"]["shares"]["challenger"] == 0.4
    assert m["window"] == {"start": "2026-03-03", "end": "2026-03-11"}
    assert m["input"]["uri"].endswith(f"histories/dt={DAY}") and m["input"]["manifest"] == {"users": n}
    # Unknown titles: new-1 in history and seen of every 9th user, new-2 of one user.
    assert sum(mm["unknown_titles"] for mm in manifests.values()) == 2 * len(range(0, 80, 9)) + 2
    by_user = {r["user_id"]: r for arm in ("champion", "challenger") for r in read_arm(root, arm)}
    assert by_user["only-unknown"]["source"] == by_user["nulls"]["source"] == "popularity"
    assert len(by_user["seen-all"]["item_ids"]) == 2


def assert_output_files(final: Path) -> None:
    """The published Parquet of one arm, as both engines write it: only data files beside
    the markers; zstd everywhere; item ids dictionary-encoded; unique user ids and float
    scores without a dictionary."""
    parts = sorted(final.glob("*.parquet"))
    assert parts and {p.name for p in final.iterdir() if not p.name.startswith("_")} == {p.name for p in parts}
    for part in parts:
        meta = pq.ParquetFile(part).metadata
        for g in range(meta.num_row_groups):
            cols = {meta.row_group(g).column(i).path_in_schema: meta.row_group(g).column(i)
                    for i in range(meta.num_columns)}
            assert {c.compression for c in cols.values()} == {"ZSTD"}
            for name in ("scores.list.element", "user_id"):
                assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(cols[name].encodings)
            assert "RLE_DICTIONARY" in cols["item_ids.list.element"].encodings


def test_output_files(env):
    root, _, _ = env
    run(env, challenger=False)
    final = root / "recs" / f"dt={DAY}" / "arm=champion"
    assert (final / "_SUCCESS").is_file() and not (root / "recs" / f"dt={DAY}" / "arm=challenger").exists()
    assert_output_files(final)
    # Nothing left in staging.
    assert [p for p in (root / "recs" / "_staging").iterdir()] == []


def test_empty_arm_is_a_typed_empty_table(env):
    root, _, _ = env
    manifests = run(env, share=1e-9)
    assert read_arm(root, "challenger") == []
    assert manifests["challenger"]["counts"] == {"users": 0, "by_source": {"model": 0, "popularity": 0}}
    assert (root / "recs" / f"dt={DAY}" / "arm=challenger" / "_SUCCESS").is_file()


def test_rerun_replaces_partition_and_day_marker(env):
    root, data, _ = env
    run(env)
    day = root / "recs" / f"dt={DAY}"
    (day / "_SUCCESS").write_bytes(b"")  # the DAG's validated-day marker of the first run
    (day / "_validation.json").write_text("{}")
    second = run(env, k=2)
    rows = read_arm(root, "champion") + read_arm(root, "challenger")
    assert len(rows) == len({r["user_id"] for r in rows}) == len(data["user_id"])
    assert max(len(r["item_ids"]) for r in rows) == 2 and second["champion"]["k"] == 2
    assert not (day / "_SUCCESS").exists() and not (day / "_validation.json").exists()  # revalidate
    leftovers = [p.name for p in day.iterdir() if p.name.startswith(("_tmp-", "_old-"))]
    assert leftovers == []


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failure_before_publish_keeps_previous_output(env, monkeypatch):
    root, _, _ = env
    run(env)
    before = snapshot(root / "recs" / f"dt={DAY}")

    def boom(*args, **kwargs):
        raise RuntimeError("injected before publish")

    monkeypatch.setattr(score_local, "publish_run", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run(env, k=3)
    assert snapshot(root / "recs" / f"dt={DAY}") == before
    assert [p for p in (root / "recs" / "_staging").iterdir()] == []  # the failed run cleaned up


def test_broken_model_fails_in_a_worker_and_keeps_previous_output(env):
    root, _, _ = env
    run(env, challenger=False)
    before = snapshot(root / "recs" / f"dt={DAY}")
    bundle = load_bundle(root / "challenger")
    with torch.no_grad():
        bundle.model.decoder[-1].bias[3] = float("nan")
    save_bundle(root / "challenger", bundle.model, bundle.item_ids, bundle.popularity)
    with pytest.raises(ValueError, match="NaN"):
        run(env)
    assert snapshot(root / "recs" / f"dt={DAY}") == before


KILL_SCRIPT = """
import sys, time
from datetime import date
from pathlib import Path
from piarec.daily import local_engine as score_local
from piarec.daily import arms as score_arms, publish as score_publish
from piarec.config import load_config
root = Path(sys.argv[1])
cfg = load_config(environ={}, overrides={"storage": {"root": str(root)}, "scoring": {"k": 3, "batch_size": 4}})
plan = score_arms.plan_arms(cfg, str(root / "champion"), "champion")
def progress(n):
    (root / "started").write_text("1")  # some output is staged; now hang until killed
    time.sleep(120)
score_local.run_local(cfg, date(2026, 3, 10), str(root / "histories"), str(root / "recs"), plan, 3,
                      threads=1, progress=progress)
"""


def test_killed_run_publishes_nothing(env):
    root, _, _ = env
    run(env, challenger=False)
    before = snapshot(root / "recs" / f"dt={DAY}")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (root / "started").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        staged = [p for p in (root / "recs" / "_staging").rglob("*.parquet")]
        assert staged  # the run was mid-write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(root / "recs" / f"dt={DAY}") == before  # old partition intact
    assert not list((root / "recs" / "_staging").rglob("_SUCCESS"))


def test_cli_local_engine_never_imports_pyspark(env):
    root, _, _ = env
    (root / "conf.yaml").write_text(json.dumps({
        "storage": {"root": str(root)}, "scoring": {"k": 4, "model_uri": str(root / "champion")}}))
    code = ("import sys; from piarec.cli import main; rc = main(['--config', sys.argv[1], 'score', "
            "'--engine', 'local', '--date', '2026-03-10', '--threads', '1']); "
            "print('pyspark loaded' if 'pyspark' in sys.modules else 'no pyspark'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(root / "conf.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PIAREC")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "no pyspark"
    summary = [line for line in done.stdout.splitlines() if line.startswith("score_users ")]
    assert len(summary) == 1 and "arm=champion" in summary[0] and "k=4" in summary[0]
    rows = read_arm(root, "champion", "recommendations")  # the default roots under storage.root
    assert len(rows) == 83 and max(len(r["item_ids"]) for r in rows) == 4


def test_unpublished_or_malformed_histories_are_refused(env, capsys):
    root, _, cfg = env
    write_histories(root / "histories", date(2026, 3, 11), make_histories(5), publish=False)
    plan = score_arms.plan_arms(cfg, str(root / "champion"), "champion")
    with pytest.raises(InputDataError, match="not published"):
        score_local.run_local(cfg, date(2026, 3, 11), str(root / "histories"), str(root / "recs"), plan, K)
    bad = root / "histories" / "dt=2026-03-12"
    bad.mkdir()
    pq.write_table(pa.table({"user_id": ["a"], "history": ["t01"]}), bad / "part-0.parquet")
    (bad / "_SUCCESS").write_bytes(b"")
    with pytest.raises(InputDataError, match="history .*seen"):
        score_local.run_local(cfg, date(2026, 3, 12), str(root / "histories"), str(root / "recs"), plan, K)
    from pipelines.score_users import main

    assert main(["--engine", "local", "--date", "2026-03-11", "--histories", str(root / "histories"),
                 "--model", str(root / "champion")]) == 2
    assert "not published" in capsys.readouterr().err
