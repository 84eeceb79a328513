"""The daily scoring job end to end on real local Spark and a hand-made events log; the
single-node engine gives the same bytes of output on the same histories."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from piarec.models.bundle import load_bundle, save_bundle
from piarec.config import ModelConfig, load_config
from piarec.models.multivae import MultiVAE
from piarec.daily import local_engine as score_local
from piarec.daily import arms as score_arms, publish as score_publish
from piarec.data import reader
from piarec.data.commit import PartitionCommit, read_pointer
from piarec.scoring.scorer import TopKScorer
from piarec.scoring.arrow import HISTORY_SCHEMA, OUTPUT_SCHEMA, in_share, map_histories
from pipelines import score_users
from test_score_local import assert_output_files

REPO = Path(__file__).resolve().parents[1]
DAY = date(2026, 3, 10)
N_ITEMS, K = 30, 5
ITEMS = [f"t{i:02d}" for i in range(N_ITEMS)]


def ts(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=timezone.utc)


def make_events() -> list[tuple]:
    """(user_id, item_id, event_type, ts, watch_seconds); window [03-03, 03-11) for 7 days."""
    d = lambda n: DAY - timedelta(days=n)  # noqa: E731
    ev = [
        ("u1", "t01", "play", ts(d(1)), 120), ("u1", "t02", "play", ts(d(2)), 300),
        ("u1", "t03", "complete", ts(DAY, 23, 59), 900), ("u1", "t04", "impression", ts(DAY), None),
        # u2: t05 watched too briefly (seen, not positive); "new-1" is unknown to the model.
        ("u2", "t05", "play", ts(d(3)), 10), ("u2", "t06", "play", ts(d(3)), 600),
        ("u2", "new-1", "play", ts(d(4)), 600),
        ("u3", "t07", "impression", ts(d(1)), None),  # impressions only: popularity
        ("u4", "t08", "play", ts(d(9)), 600),  # active only before the window: absent
        ("u5", "t09", "play", ts(DAY + timedelta(days=1), 0, 0), 600),  # at D+1 00:00: absent
        ("u7", "new-2", "play", ts(d(2)), 600),  # only unknown titles: popularity
        ("u7", "t10", "impression", ts(d(2)), None),
    ]
    ev += [("u6", t, "play", ts(d(5)), 600) for t in ITEMS[:27]]  # 3 unseen titles left
    rng = np.random.default_rng(1)
    for u in range(24):  # enough users for several Arrow batches and scorer chunks
        for t in rng.choice(N_ITEMS, 6, replace=False):
            ev.append((f"r{u:02d}", ITEMS[t], "play", ts(d(int(rng.integers(0, 7)))), int(rng.integers(0, 400))))
    return ev


def write_events(root: Path, events: list[tuple]) -> None:
    table = pa.table(
        {
            "user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
            "event_type": [e[2] for e in events],
            "ts": pa.array([e[3] for e in events], pa.timestamp("us", tz="UTC")),
            "watch_seconds": pa.array([e[4] for e in events], pa.int32()),
        }
    )
    days = np.array([e[3].date().isoformat() for e in events])
    for day in sorted(set(days)):
        part = root / f"dt={day}"
        part.mkdir(parents=True)
        pq.write_table(table.filter(pa.array(days == day)), part / "part-0.parquet")


def expected_histories(events, cfg):
    """Histories and seen titles by the documented rules, in plain Python."""
    start, end = ts(DAY - timedelta(days=cfg.scoring.history_days), 0), ts(DAY + timedelta(days=1), 0)
    users: dict[str, tuple[set, set]] = {}
    for user, item, kind, when, watch in events:
        if not start <= when < end:
            continue
        hist, seen = users.setdefault(user, (set(), set()))
        if kind in cfg.positive.event_types and (watch or 0) >= cfg.positive.min_watch_seconds:
            hist.add(item)
        if kind in cfg.scoring.seen_types:
            seen.add(item)
    return {u: (sorted(h), sorted(s)) for u, (h, s) in users.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    events = make_events()
    write_events(root / "events", events)
    torch.manual_seed(0)
    model = MultiVAE(N_ITEMS, ModelConfig(hidden_dim=16, latent_dim=8))
    popularity = np.random.default_rng(0).integers(0, 5, N_ITEMS).astype(np.float32)  # with ties
    save_bundle(root / "model", model, np.array(ITEMS, dtype=object), popularity)
    torch.manual_seed(1)
    save_bundle(root / "model2", MultiVAE(N_ITEMS, ModelConfig(hidden_dim=16, latent_dim=8)),
                np.array(ITEMS, dtype=object), popularity[::-1].copy())
    settings = {
        "storage": {"root": str(root)},
        "scoring": {"history_days": 7, "batch_size": 4, "k": K, "model_uri": str(root / "model")},
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g",
                  "conf": {"spark.sql.execution.arrow.maxRecordsPerBatch": "8"}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    return root, events, load_config(root / "config.yaml", environ={})


@pytest.fixture(scope="module")
def spark(env):
    from pipelines.spark import get_spark

    session = get_spark(env[2].spark)
    yield session
    session.stop()


def read_partition(day: Path, arm: str) -> list[dict]:
    # the reader rule: one arm's rows among the files the day's commit pointer names
    table = reader.read_arm(str(day), arm)
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False), table.schema
    return table.to_pylist()


def day_dir(root: Path, out: str = "recs") -> Path:
    return root / out / f"dt={DAY}"


def versions(day: Path) -> list[str]:
    """The versions the day's folder holds; the folder itself holds only the pointer and them."""
    assert sorted(p.name for p in day.iterdir()) == ["_SUCCESS", "_versions"]
    return sorted(p.name for p in (day / "_versions").iterdir())


def assert_nothing_committed(day: Path) -> None:
    """A refused first run of a day leaves nothing: no pointer, no lease, no folder."""
    assert read_pointer(str(day)) is None and not day.exists()


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_job(spark, env, k=K, arm="champion", out="recs", cfg=None, challenger_uri=None, challenger_share=None, **kw):
    """Score DAY with the test model as ``arm`` (and a challenger); the control arm's manifest."""
    root, _, env_cfg = env
    cfg = cfg or env_cfg
    plan = score_arms.plan_models(cfg, str(root / "model"), challenger_uri, challenger_share, arm=arm)
    return score_users.run(spark, cfg, str(root / "events"), DAY, str(root / out), plan, k, **kw)[arm]


def test_scores_every_active_user_once(spark, env):
    root, events, cfg = env
    manifest = run_job(spark, env)
    rows = read_partition(day_dir(root), "champion")
    by_user = {r["user_id"]: r for r in rows}
    assert len(rows) == len(by_user)  # one row per user
    expected = expected_histories(events, cfg)
    assert set(by_user) == set(expected)
    assert {"u1", "u2", "u3", "u6", "u7"} <= set(by_user) and not {"u4", "u5"} & set(by_user)

    # Exactly what TopKScorer gives when run directly on the same histories.
    bundle = load_bundle(root / "model")
    users = sorted(expected)
    history, unknown_h = map_histories([expected[u][0] for u in users], bundle.item_index(), N_ITEMS)
    seen, unknown_s = map_histories([expected[u][1] for u in users], bundle.item_index(), N_ITEMS)
    direct = TopKScorer(bundle, K).score(history, seen)
    for b, user in enumerate(users):
        row, c = by_user[user], direct.count[b]
        assert row["item_ids"] == [ITEMS[i] for i in direct.item_idx[b, :c]], user
        assert row["scores"] == direct.scores[b, :c].tolist(), user  # bit for bit
        assert row["source"] == direct.source[b]
        assert row["model_version"] == manifest["model"]["version"]
        assert not set(row["item_ids"]) & set(expected[user][1]), f"{user} got a seen title"
        assert len(row["item_ids"]) == (3 if user == "u6" else K)
    assert by_user["u3"]["source"] == by_user["u7"]["source"] == "popularity"
    assert by_user["u1"]["source"] == "model" and "t05" not in by_user["u2"]["item_ids"]

    assert manifest["counts"] == {
        "users": len(users),
        "by_source": {"model": int((direct.source == "model").sum()),
                      "popularity": int((direct.source == "popularity").sum())},
    }
    assert manifest["unknown_titles"] == unknown_h + unknown_s == 4  # new-1 and new-2, each history + seen
    assert {k: manifest["input"][k] for k in ("kind", "uri")} == {"kind": "events", "uri": str(root / "events")}
    # The events read are counted as in `build_matrix --daily`: every event of the window's dt partitions.
    lo, hi = DAY - timedelta(days=cfg.scoring.history_days), DAY + timedelta(days=1)
    in_window = [e for e in events if lo <= e[3].date() < hi]
    counts = manifest["input"]["counts"]
    assert counts["events_read"] == counts["events_in_window"] == len(in_window)
    assert counts["dirty_fraction"] == 0.0 and set(counts["dropped_events"].values()) == {0}
    assert counts["positive_events"] == sum(e[2] in ("play", "complete") and (e[4] or 0) >= 60 for e in in_window)
    assert manifest["input"]["input"]["partitions"] == sorted({f"{e[3].date()}" for e in in_window})


def test_manifest_and_success_marker(spark, env):
    root, _, _ = env
    manifest = run_job(spark, env, arm="challenger")
    day = day_dir(root)
    pointer = read_pointer(str(day))  # the day's _SUCCESS: the commit pointer with the manifest
    assert pointer is not None and (day / "_SUCCESS").is_file()
    assert score_publish.arm_manifests(pointer.manifest)["challenger"] == {
        k: v for k, v in manifest.items() if k not in ("version", "committed_at")}
    assert (manifest["version"], manifest["committed_at"]) == (pointer.version, pointer.committed_at)
    assert datetime.fromisoformat(pointer.committed_at).tzinfo is not None and "created_at" not in manifest
    assert manifest["date"] == "2026-03-10" and manifest["k"] == K and manifest["arm"] == "challenger"
    assert manifest["window"] == {"start": "2026-03-03", "end": "2026-03-11"}
    assert manifest["model"]["uri"] == str(root / "model") and manifest["model"]["n_items"] == N_ITEMS
    rows = read_partition(day, "challenger")
    assert manifest["counts"]["users"] == len(rows)
    assert manifest["engine"]["name"] == "spark" and list(pointer.manifest["arms"]) == ["challenger"]
    assert pointer.manifest["validation"]["challenger"]["users"] == len(rows)  # validated before the commit
    assert pointer.version in versions(day)
    version = day / "_versions" / pointer.version
    assert sorted(p.name for p in version.iterdir()) == ["arm=challenger"]
    assert [f["path"] for f in pointer.files] == [
        str(p.relative_to(day)) for p in sorted((version / "arm=challenger").glob("*.parquet"))]
    assert_output_files(version / "arm=challenger")  # the same files as the single-node engine writes


def test_rerun_replaces_partition(spark, env):
    root, _, _ = env
    first = run_job(spark, env, arm="rerun")
    second = run_job(spark, env, k=2, arm="rerun")
    day = day_dir(root)
    rows = read_partition(day, "rerun")
    assert len(rows) == len({r["user_id"] for r in rows}) == first["counts"]["users"]
    assert max(len(r["item_ids"]) for r in rows) == 2
    pointer = read_pointer(str(day))
    assert score_publish.arm_manifests(pointer.manifest)["rerun"]["k"] == second["k"] == 2
    assert pointer.version == second["version"] != first["version"]
    # No leftover: the pointer, the new version and the one it replaced (readable for
    # storage.retain_versions_s, 1 h by default).
    assert pointer.retired[0]["version"] == first["version"]
    assert {first["version"], second["version"]} <= set(versions(day))
    assert all(f["path"].startswith(f"_versions/{second['version']}/arm=rerun/") for f in pointer.files)
    # Without retention a rerun leaves exactly the pointer and its version.
    _, _, cfg = env
    eager = cfg.model_copy(deep=True)
    eager.storage.retain_versions_s = 0
    third = run_job(spark, env, k=2, arm="rerun", cfg=eager)
    assert versions(day) == [third["version"]] == [read_pointer(str(day)).version]
    assert sorted(r["user_id"] for r in read_partition(day, "rerun")) == sorted(r["user_id"] for r in rows)


def test_failure_before_publish_keeps_previous_output(spark, env, monkeypatch):
    root, _, _ = env
    kept = run_job(spark, env, arm="kept")
    day = day_dir(root)
    before, rows = all_files(day), read_partition(day, "kept")

    def boom(*args, **kwargs):
        raise RuntimeError("injected before publish")

    monkeypatch.setattr(score_users, "publish_run", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_job(spark, env, k=2, arm="kept")
    # Every byte of the day as it was: the pointer, its version, nothing of the failed run.
    assert all_files(day) == before
    assert read_pointer(str(day)).version == kept["version"] in versions(day)
    assert read_partition(day, "kept") == rows


def test_ab_pass_and_local_engine_write_the_same(spark, env):
    """Histories published once (the daily transform, as the daily build publishes them);
    the Spark job and the single-node engine score them with a challenger arm."""
    root, events, cfg = env
    from pipelines.events import daily_histories

    hist_root = root / "histories"
    with PartitionCommit(str(hist_root / f"dt={DAY}"), what="histories day") as commit:
        daily_histories(spark, str(root / "events"), cfg, DAY).write.parquet(commit.data_uri)
        commit.commit({"date": DAY.isoformat(), "users": len(expected_histories(events, cfg))})
    assert read_pointer(str(hist_root / f"dt={DAY}")).files
    kw = {"histories_uri": str(hist_root), "challenger_uri": str(root / "model2"), "challenger_share": 0.5}
    spark_manifest = run_job(spark, env, out="recs-ab", **kw)
    plan = score_arms.plan_models(cfg, str(root / "model"), str(root / "model2"), 0.5)
    local = score_local.run_local(cfg, DAY, str(hist_root), str(root / "recs-local"), plan, K, threads=2)

    expected = expected_histories(events, cfg)
    challenger = in_share(pa.array(sorted(expected)), cfg.scoring.ab_salt, 0.5)
    members = {"champion": {u for u, c in zip(sorted(expected), challenger) if not c},
               "challenger": {u for u, c in zip(sorted(expected), challenger) if c}}
    assert members["champion"] and members["challenger"]
    for arm, model in (("champion", "model"), ("challenger", "model2")):
        got = sorted(read_partition(day_dir(root, "recs-ab"), arm), key=lambda r: r["user_id"])
        assert got == sorted(read_partition(day_dir(root, "recs-local"), arm), key=lambda r: r["user_id"])
        assert {r["user_id"] for r in got} == members[arm]
        bundle = load_bundle(root / model)
        users = [r["user_id"] for r in got]
        history, _ = map_histories([expected[u][0] for u in users], bundle.item_index(), N_ITEMS)
        seen, _ = map_histories([expected[u][1] for u in users], bundle.item_index(), N_ITEMS)
        direct = TopKScorer(bundle, K).score(history, seen)
        assert [r["item_ids"] for r in got] == [[ITEMS[i] for i in direct.item_idx[b, : direct.count[b]]]
                                                for b in range(len(users))]
    drop = ("version", "committed_at", "engine", "input")
    spark_day = read_pointer(str(day_dir(root, "recs-ab"))).manifest
    local_day = read_pointer(str(day_dir(root, "recs-local"))).manifest
    spark_m = score_publish.arm_manifests(spark_day)["challenger"]
    assert {k: v for k, v in spark_m.items() if k not in drop} == {
        k: v for k, v in local["challenger"].items() if k not in drop}
    assert spark_day["arms"] == local_day["arms"] and spark_day["assignment"] == local_day["assignment"]
    assert spark_day["validation"] == local_day["validation"]
    assert {k: v for k, v in spark_manifest.items() if k not in drop} == {
        k: v for k, v in local["champion"].items() if k not in drop}
    assert spark_manifest["input"]["uri"] == str(hist_root / f"dt={DAY}")
    assert spark_manifest["input"]["manifest"] == read_pointer(str(hist_root / f"dt={DAY}")).manifest


class _CountingBroadcast:
    def __init__(self, payload):
        self._payload, self.reads = payload, 0

    @property
    def value(self):
        self.reads += 1
        return self._payload


def test_worker_loads_each_model_once(env):
    root, _, cfg = env
    plan = score_arms.plan_models(cfg, str(root / "model"))
    arm = plan.arms[0]
    bc = _CountingBroadcast({"files": arm.files})
    batch = pa.RecordBatch.from_pydict(
        {"user_id": ["a", "b"], "history": [["t01", "zz"], []], "seen": [["t01"], ["t02"]]},
        schema=pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.string())),
                          ("seen", pa.list_(pa.string()))]),
    )
    spec = {"name": "champion", "version": "1", "digest": arm.digest, "broadcast": bc, "exclude": np.zeros(0, np.int64)}
    score_users._WORKER_MODELS.clear()
    threads = torch.get_num_threads()  # score_partition pins torch to one thread, as in a worker
    try:
        def task(s):
            return list(score_users.score_partition(iter([batch]), arms=[s], assignment=score_arms.Assignment("x", (1.0,)),
                                                    k=3, batch_size=4))
        outs = [task(spec) for _ in range(3)]
        task({**spec, "digest": "other"})
        cached = list(score_users._WORKER_MODELS)
    finally:
        torch.set_num_threads(threads)
        score_users._WORKER_MODELS.clear()
    assert bc.reads == 2  # three tasks loaded the model once, then another model once
    assert cached == ["other"]  # a later run's model replaced the old one
    out = outs[-1][0]
    assert out.column("unknown_titles").to_pylist() == [1, 0]
    assert out.column("arm").to_pylist() == ["champion"] * 2
    assert out.column("source").to_pylist() == ["model", "popularity"]
    assert "t01" not in out.column("item_ids").to_pylist()[0]  # seen
    rebuilt = score_arms.bundle_from_files(arm.files)
    for name, tensor in arm.bundle.model.state_dict().items():
        torch.testing.assert_close(rebuilt.model.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_spark_submit_from_checkout(env):
    root, _, _ = env
    submit = Path(sys.executable).parent / "spark-submit"
    cmd = [str(submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
           "pipelines/score_users.py", "--config", str(root / "config.yaml"), "--date", DAY.isoformat(),
           "--arm", "submitted", "--k", "4"]
    env_vars = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [line for line in done.stdout.splitlines() if line.startswith("score_users ")]
    assert len(summary) == 1 and "arm=submitted" in summary[0], done.stdout
    day = root / "recommendations" / f"dt={DAY}"  # defaults from the config
    manifest = score_publish.arm_manifests(read_pointer(str(day)).manifest)["submitted"]
    rows = read_partition(day, "submitted")
    assert manifest["counts"]["users"] == len(rows) and manifest["k"] == 4
    assert max(len(r["item_ids"]) for r in rows) == 4


def test_driver_keeps_only_the_committed_attempts_files(env, tmp_path, monkeypatch):
    """A task attempt that died after writing some rows, and its successful retry: the
    commit keeps the retry's files only, so every user appears once."""
    import pyspark

    root, events, cfg = env
    plan = score_arms.plan_models(cfg, str(root / "model"))
    arm = plan.arms[0]
    spec = {"name": "champion", "version": "1", "digest": arm.digest, "broadcast": _CountingBroadcast({"files": arm.files}),
            "exclude": np.zeros(0, np.int64)}
    hist = expected_histories(events, cfg)
    users = sorted(hist)
    table = pa.table({"user_id": users, "history": [hist[u][0] for u in users], "seen": [hist[u][1] for u in users]},
                     schema=HISTORY_SCHEMA)
    batches = table.to_batches(max_chunksize=4)
    assert len(batches) >= 4
    staging = str(tmp_path / "staging")

    class Ctx:
        def __init__(self, attempt):
            self.attempt = attempt

        def partitionId(self):
            return 3

        def attemptNumber(self):
            return self.attempt

    def attempt(n, batches):
        monkeypatch.setattr(pyspark.TaskContext, "get", classmethod(lambda cls: Ctx(n)))
        return score_users.write_partition(iter(batches), staging=staging, rows_per_file=20, arms=[spec],
                                           assignment=score_arms.Assignment("x", (1.0,)), k=3, batch_size=8)

    threads = torch.get_num_threads()
    try:
        list(attempt(0, batches[:2]))  # wrote part of the partition, then its executor was lost
        summary = list(attempt(1, batches))[0].to_pylist()
    finally:
        torch.set_num_threads(threads)
    assert [s["task"] for s in summary] == ["p00003-a1"]
    names = sorted(p.name for p in (tmp_path / "staging" / "arm=champion").iterdir())
    assert any("-a0-" in n for n in names) and any("-a1-" in n for n in names)
    assert score_publish.keep_committed_parts(staging, ["champion"], {"p00003-a1"}) == sum("-a0-" in n for n in names)
    rows = ds.dataset(str(tmp_path / "staging" / "arm=champion"), format="parquet").to_table()
    assert sorted(rows.column("user_id").to_pylist()) == users  # each user once
    assert summary[0]["model"] + summary[0]["popularity"] == len(users)


# -- input checks on the path from raw events: the rules and messages of `build_matrix --daily` --
def _published(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


def _both_refuse(spark, env, events_dir: Path, out: str, day: date = DAY) -> str:
    """Score ``day`` from ``events_dir`` and build its histories with ``build_matrix --daily``:
    both must refuse with the same message and publish nothing. Returns the message."""
    from piarec.errors import InputDataError
    from pipelines import build_matrix

    root, _, cfg = env
    with pytest.raises(InputDataError) as scoring:
        score_users.run(spark, cfg, str(events_dir), day, str(root / out), score_arms.plan_models(cfg, str(root / "model")), K)
    with pytest.raises(InputDataError) as daily:
        build_matrix.run_daily(spark, cfg, str(events_dir), day, str(root / f"{out}-histories"))
    assert str(scoring.value) == str(daily.value)
    assert _published(root / out) == [] and _published(root / f"{out}-histories") == []  # no file anywhere
    return str(scoring.value)


def test_events_path_refuses_an_empty_window(spark, env):
    root, _, _ = env
    message = _both_refuse(spark, env, root / "events", "recs-empty", day=DAY + timedelta(days=60))
    assert message.startswith("no events in the window [2026-05-02, 2026-05-10)") and "no dt partition" in message


def test_events_path_refuses_a_dirty_day(spark, env, tmp_path):
    events = make_events()
    dirty = [(None, "t01", "play", ts(DAY), 600)] * 20 + [("u9", "t01", "teleport", ts(DAY), 600)] * 20
    write_events(tmp_path / "events", events + dirty)
    message = _both_refuse(spark, env, tmp_path / "events", "recs-dirty")
    assert "are dirty" in message and "above quality.max_dirty_fraction = 1.00%" in message
    assert "(missing_user_id 20, unknown_event_type 20)" in message


def test_events_path_refuses_a_day_of_nothing_but_dirt(spark, env, tmp_path):
    root, _, cfg = env
    write_events(tmp_path / "events", [(None, "t01", "play", ts(DAY), 600)] * 5)
    lenient = cfg.model_copy(deep=True)
    lenient.quality.max_dirty_fraction = 1.0
    with pytest.raises(Exception) as exc:
        score_users.run(spark, lenient, str(tmp_path / "events"), DAY, str(root / "recs-dirt"),
                        score_arms.plan_models(lenient, str(root / "model")), K)
    assert "all dropped" in str(exc.value)
    assert_nothing_committed(root / "recs-dirt" / f"dt={DAY}")


def test_events_path_refuses_missing_columns_with_one_line(env, tmp_path):
    root, _, _ = env
    table = pa.table({"user_id": ["u1"], "item_id": ["t01"], "ts": pa.array([ts(DAY)], pa.timestamp("us", tz="UTC"))})
    (tmp_path / "events" / f"dt={DAY}").mkdir(parents=True)
    pq.write_table(table, tmp_path / "events" / f"dt={DAY}" / "part-0.parquet")
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "score_users.py"), "--config", str(root / "config.yaml"),
         "--date", str(DAY), "--events", str(tmp_path / "events"), "--out", str(tmp_path / "recs")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "event_type" in lines[0], proc.stderr
    assert not (tmp_path / "recs" / f"dt={DAY}").exists()


def test_plain_rerun_after_a_challenger_run_leaves_each_user_once(spark, env):
    """Day D scored with a challenger, then rerun without one: the earlier challenger arm
    goes, and every active user appears exactly once in the day."""
    root, events, cfg = env
    run_job(spark, env, out="recs-ab", challenger_uri=str(root / "model2"), challenger_share=0.5)
    day = day_dir(root, "recs-ab")

    def committed_arms() -> list[str]:
        pointer = read_pointer(str(day))
        assert sorted({f["path"].split("/")[2] for f in pointer.files}) == [f"arm={a}" for a in sorted(pointer.manifest["arms"])]
        return sorted(pointer.manifest["arms"])

    assert committed_arms() == ["challenger", "champion"]
    run_job(spark, env, out="recs-ab")
    assert committed_arms() == ["champion"]
    table = reader.read_table(str(day))  # the whole committed day, arm column from the Hive folders
    assert set(table.column("arm").to_pylist()) == {"champion"}
    users = table.column("user_id").to_pylist()
    assert len(users) == len(set(users)) == len(expected_histories(events, cfg))
