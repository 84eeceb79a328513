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
import pyarrow.parquet as pq
import pytest
import torch

from piarec.daily import local_engine as score_local

from piarec.daily import arms as score_arms, publish as score_publish
from piarec.data import reader
from piarec.data.commit import read_pointer
from piarec.models.bundle import load_bundle, save_bundle
from piarec.config import ModelConfig, load_config
from piarec.errors import InputDataError, ValidationFailed
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
    plan = score_arms.plan_models(cfg, str(root / "champion"), str(root / "challenger") if challenger else None, share)
    return score_local.run_local(cfg, DAY, str(root / "histories"), str(root / "recs"), plan, k)


def read_arm(root: Path, arm: str, recs: str = "recs") -> list[dict]:
    # the reader rule: the files the day's commit pointer names
    table = reader.read_arm(str(root / recs / f"dt={DAY}"), arm)
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False), table.schema
    return table.to_pylist()


def day_entries(root: Path, recs: str = "recs") -> dict[str, list[str]]:
    """What the day's folder holds: its top-level names and the versions under _versions/."""
    day = root / recs / f"dt={DAY}"
    return {"day": sorted(p.name for p in day.iterdir()),
            "versions": sorted(p.name for p in (day / "_versions").iterdir())}


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
        pointer = read_pointer(str(root / "recs" / f"dt={DAY}"))
        assert score_publish.arm_manifests(pointer.manifest)[arm] == {
            k: v for k, v in m.items() if k not in ("version", "committed_at")}
        assert (m["version"], m["committed_at"]) == (pointer.version, pointer.committed_at)
        assert pointer.manifest["validation"][arm]["users"] == len(rows)
        assert m["arm"] == arm and m["date"] == DAY.isoformat() and m["k"] == K
        assert m["counts"] == {"users": len(rows), "by_source": {
            s: sum(r["source"] == s for r in rows) for s in ("model", "popularity")}}
        assert m["model"]["uri"] == str(root / model) and m["model"]["n_items"] == N_ITEMS
    assert 0 < len(read_arm(root, "challenger")) < n
    m = manifests["champion"]
    assert m["arms"]["challenger"] == {k: manifests["challenger"][k] for k in ("model", "share", "counts", "unknown_titles")}
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
    assert parts and {p.name for p in final.iterdir()} == {p.name for p in parts}
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
    m = run(env, challenger=False)["champion"]
    version = root / "recs" / f"dt={DAY}" / "_versions" / m["version"]
    assert sorted(p.name for p in version.iterdir()) == ["arm=champion"]
    assert_output_files(version / "arm=champion")
    assert day_entries(root) == {"day": ["_SUCCESS", "_versions"], "versions": [m["version"]]}
    pointer = read_pointer(str(root / "recs" / f"dt={DAY}"))
    assert [f["path"] for f in pointer.files] == [
        str(p.relative_to(root / "recs" / f"dt={DAY}")) for p in sorted((version / "arm=champion").glob("*.parquet"))]


def test_empty_arm_is_a_typed_empty_table(env):
    root, _, _ = env
    manifests = run(env, share=1e-9)
    assert read_arm(root, "challenger") == []
    assert manifests["challenger"]["counts"] == {"users": 0, "by_source": {"model": 0, "popularity": 0}}
    assert reader.read_arm(str(root / "recs" / f"dt={DAY}"), "challenger").schema.equals(OUTPUT_SCHEMA)


def test_rerun_replaces_partition_and_keeps_the_old_version_for_the_grace(env):
    root, data, cfg = env
    first = run(env)
    second = run(env, k=2)
    rows = read_arm(root, "champion") + read_arm(root, "challenger")
    assert len(rows) == len({r["user_id"] for r in rows}) == len(data["user_id"])
    assert max(len(r["item_ids"]) for r in rows) == 2 and second["champion"]["k"] == 2
    # The first version stays readable for storage.retain_versions_s, named as retired.
    pointer = read_pointer(str(root / "recs" / f"dt={DAY}"))
    assert [r["version"] for r in pointer.retired] == [first["champion"]["version"]]
    assert day_entries(root)["versions"] == sorted([first["champion"]["version"], second["champion"]["version"]])
    cfg.storage.retain_versions_s = 0  # the next run deletes it
    third = run(env, k=3)
    assert day_entries(root) == {"day": ["_SUCCESS", "_versions"], "versions": [third["champion"]["version"]]}


def test_challenger_run_then_plain_rerun_leaves_each_user_once(env):
    root, data, _ = env
    run(env)  # champion + challenger
    run(env, challenger=False)
    table = reader.read_table(str(root / "recs" / f"dt={DAY}"))
    assert set(table.column("arm").to_pylist()) == {"champion"}
    assert sorted(table.column("user_id").to_pylist()) == sorted(data["user_id"])


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
    assert snapshot(root / "recs" / f"dt={DAY}") == before  # the failed run removed its version


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
plan = score_arms.plan_models(cfg, str(root / "champion"))
def progress(n):
    (root / "started").write_text("1")  # some output is staged; now hang until killed
    time.sleep(120)
score_local.run_local(cfg, date(2026, 3, 10), str(root / "histories"), str(root / "recs"), plan, 3,
                      threads=1, progress=progress)
"""


def test_killed_run_publishes_nothing(env):
    root, _, _ = env
    first = run(env, challenger=False)["champion"]["version"]
    before = snapshot(root / "recs" / f"dt={DAY}")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (root / "started").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        staged = [p for p in (root / "recs" / f"dt={DAY}" / "_versions").rglob("*.parquet")
                  if p.parent.parent.name != first]
        assert staged  # the run was mid-write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert read_pointer(str(root / "recs" / f"dt={DAY}")).version == first  # the old commit in force
    assert {k: v for k, v in snapshot(root / "recs" / f"dt={DAY}").items() if first in k or k == "_SUCCESS"} == before


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
    plan = score_arms.plan_models(cfg, str(root / "champion"))
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


def version_checksums(root: Path, manifests: dict) -> dict[str, str]:
    """sha256 of every data file of the committed version, by path inside the version."""
    import hashlib

    version = root / "recs" / f"dt={DAY}" / "_versions" / manifests["champion"]["version"]
    return {str(p.relative_to(version)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(version.rglob("*")) if p.is_file()}


def test_a_rerun_writes_the_same_bytes(env):
    """Same inputs and model, several worker threads and small files (so batches finish out
    of order and roll over files): the data files are equal byte for byte; only the
    pointer's run fields differ."""
    root, _, cfg = env
    cfg.scoring.rows_per_file = 20
    cfg.scoring.threads = 3
    first = version_checksums(root, run(env))
    first_pointer = read_pointer(str(root / "recs" / f"dt={DAY}"))
    second = version_checksums(root, run(env))
    second_pointer = read_pointer(str(root / "recs" / f"dt={DAY}"))
    assert len(first) > 4 and first == second
    assert first_pointer.version != second_pointer.version
    assert first_pointer.manifest == second_pointer.manifest  # no timestamp in the manifest


def test_a_day_failing_validation_is_not_committed(env, monkeypatch):
    """The checks run before the commit: a broken day leaves the previous one in force and
    no files of its own."""
    root, _, _ = env
    first = run(env)["champion"]["version"]
    before = snapshot(root / "recs" / f"dt={DAY}")
    from piarec.daily import validate

    real = validate.validate_arm_files

    def strict(*args, **kwargs):  # the same checks, against a manifest that counts one user more
        manifest = {**args[2], "counts": {**args[2]["counts"], "users": args[2]["counts"]["users"] + 1}}
        return real(args[0], args[1], manifest, **kwargs)

    monkeypatch.setattr(score_publish, "validate_arm_files", strict)
    with pytest.raises(ValidationFailed, match="manifest counts"):
        run(env, k=3)
    assert read_pointer(str(root / "recs" / f"dt={DAY}")).version == first
    assert snapshot(root / "recs" / f"dt={DAY}") == before
