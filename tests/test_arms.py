"""Arms as configuration: any number of named arms, models or baselines, with shares.

The assignment is checked against the two-arm rule it generalises and for its shares; the
baseline arms (popularity, EASE fitted on a committed snapshot) against references computed
here from the snapshot, on the local engine and the Spark job alike.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from piarec.config import ArmConfig, ModelConfig, ScoringConfig, load_config
from piarec.daily import arms as score_arms
from piarec.daily.local_engine import run_local
from piarec.data import reader
from piarec.data.commit import read_pointer
from piarec.errors import ConfigError
from piarec.evaluate.protocol import fit_ease_on_validation
from piarec.models.baselines import train_popularity
from piarec.models.bundle import save_bundle
from piarec.models.multivae import MultiVAE
from piarec.scoring.arrow import in_share
from test_gate import planted, write_snapshot
from test_score_local import write_histories

pytestmark = pytest.mark.filterwarnings("ignore")
DAY = date(2026, 4, 10)
K = 7


# --------------------------------------------------------------------------- assignment
def user_ids(n: int) -> pa.Array:
    return pa.array([f"user-{i}" for i in range(n)])


def test_two_arms_split_as_the_challenger_rule_did():
    users = user_ids(20_000)
    got = score_arms.Assignment("salt-1", (0.7, 0.3)).assign(users)
    assert np.array_equal(got == 1, in_share(users, "salt-1", 0.3))
    assert set(np.unique(got)) == {0, 1}


def test_n_arms_take_their_shares_stably():
    users = user_ids(200_000)
    shares = (0.5, 0.3, 0.15, 0.05)
    assignment = score_arms.Assignment("s", shares)
    arm = assignment.assign(users)
    counts = np.bincount(arm, minlength=4)
    n = len(users)
    for c, p in zip(counts, shares):  # within 5 binomial standard deviations
        assert abs(c - n * p) < 5 * np.sqrt(n * p * (1 - p)), (counts, shares)
    # the same user, the same arm: in any batch, on any day
    assert np.array_equal(np.concatenate([assignment.assign(users.slice(0, 777)), assignment.assign(users.slice(777))]),
                          arm)
    # arms after the first take consecutive ranges: adding a fifth arm moves only the first arm's users
    grown = score_arms.Assignment("s", (0.45, 0.3, 0.15, 0.05, 0.05)).assign(users)
    assert np.array_equal(grown[arm != 0], arm[arm != 0])
    assert set(np.unique(grown[arm == 0])) == {0, 4}
    # a new salt reshuffles
    assert np.mean(score_arms.Assignment("t", shares).assign(users) == arm) < 0.5


# --------------------------------------------------------------------------- configuration
def test_scoring_arms_must_partition_the_users():
    arms = [{"name": "champion", "model": "models:/piarec@champion", "share": 0.9},
            {"name": "control", "model": "popularity", "share": 0.1}]
    assert [a.name for a in ScoringConfig(arms=arms).arms] == ["champion", "control"]
    with pytest.raises(ValidationError, match="add up to 1"):
        ScoringConfig(arms=[{**arms[0], "share": 0.8}, arms[1]])
    with pytest.raises(ValidationError, match="distinct"):
        ScoringConfig(arms=[{**arms[0], "share": 0.5}, {**arms[0], "share": 0.5}])
    with pytest.raises(ValidationError, match="pattern"):
        ScoringConfig(arms=[{**arms[0], "name": "a/b", "share": 1.0}])
    env = {"PIAREC__SCORING__ARMS": "[{name: a, model: ease, share: 0.25}, {name: b, model: popularity, share: 0.75}]"}
    cfg = load_config(environ=env)
    assert [(a.name, a.model, a.share) for a in cfg.scoring.arms] == [("a", "ease", 0.25), ("b", "popularity", 0.75)]


def test_the_arms_option_parses_and_refuses_clearly():
    got = score_arms.parse_arms("champion=models:/piarec@champion:0.9, control=popularity:0.1")
    assert got == [ArmConfig(name="champion", model="models:/piarec@champion", share=0.9),
                   ArmConfig(name="control", model="popularity", share=0.1)]
    for text, message in (("champion=models:/piarec@champion", "NAME=MODEL:SHARE"),
                          ("a=popularity:x", "not a number"),
                          ("a=popularity:0.5,b=ease:0.4", "add up to 1"),
                          ("a=popularity:0.5,a=ease:0.5", "distinct"),
                          ("a=popularity:0", "share"),
                          (",", "names no arm")):
        with pytest.raises(ConfigError, match=message):
            score_arms.parse_arms(text)


def test_arm_sources_do_not_mix():
    cfg = load_config(environ={}, overrides={"scoring": {"challenger_uri": "models:/piarec@challenger",
                                                         "challenger_share": 0.25}})
    assert [(a.name, a.model, a.share) for a in score_arms.arm_specs(cfg)] == [
        ("champion", "models:/piarec@champion", 0.75), ("challenger", "models:/piarec@challenger", 0.25)]
    given = score_arms.parse_arms("x=popularity:1")
    assert score_arms.arm_specs(cfg, arms=given) == given
    with pytest.raises(ConfigError, match="--arms names the arms"):
        score_arms.arm_specs(cfg, arms=given, model_uri="models:/piarec/3")
    configured = load_config(environ={}, overrides={"scoring": {"arms": [{"name": "x", "model": "ease", "share": 1}]}})
    with pytest.raises(ConfigError, match="scoring.arms names the arms"):
        score_arms.arm_specs(configured, challenger_uri="models:/piarec@challenger")
    with pytest.raises(ConfigError, match="share"):
        score_arms.arm_specs(cfg, challenger_share=1.0)


# --------------------------------------------------------------------------- baseline arms
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A committed snapshot, a model over its titles, and day DAY's histories of 300 users."""
    root = tmp_path_factory.mktemp("arms")
    snap = planted()
    snapshot_uri = write_snapshot(snap, root / "snapshots" / "window_end=2026-04-01")
    import torch

    torch.manual_seed(0)
    save_bundle(root / "model", MultiVAE(snap.n_items, ModelConfig(hidden_dim=16, latent_dim=8)), snap.item_ids,
                train_popularity(snap.train))
    rng = np.random.default_rng(3)
    items = [str(i) for i in snap.item_ids]
    data = {"user_id": [], "history": [], "seen": []}
    for u in range(300):
        block = rng.integers(8) * 25
        history = sorted({items[block + j] for j in rng.choice(25, rng.integers(0, 9), replace=False)})
        extra = sorted({items[j] for j in rng.choice(len(items), rng.integers(0, 4), replace=False)})
        data["user_id"].append(f"viewer-{u}")
        data["history"].append(history)
        data["seen"].append(sorted(set(history) | set(extra)))
    data["history"][0], data["seen"][0] = [], ["t3"]  # no history: the popularity fallback in every arm
    write_histories(root / "histories", DAY, data)
    cfg = load_config(environ={}, overrides={
        "storage": {"root": str(root)},
        "scoring": {"k": K, "batch_size": 64, "threads": 2, "history_days": 7, "baseline_snapshot": snapshot_uri,
                    "arms": [{"name": "champion", "model": str(root / "model"), "share": 0.5},
                             {"name": "pop", "model": "popularity", "share": 0.25},
                             {"name": "ease", "model": "ease", "share": 0.25}]},
    })
    return root, snap, data, cfg


def reference_topk(scores: np.ndarray, seen: list[int], k: int) -> list[int]:
    """The ranking contract: a stable descending sort, ties to the lower index, seen removed."""
    s = scores.astype(np.float32).copy()
    s[seen] = -np.inf
    order = np.argsort(-s, kind="stable")
    return [int(i) for i in order[: min(k, len(s) - len(set(seen)))]]


def expected_arm_rows(snap, data, members, arm: str) -> dict[str, list[str]]:
    index = {str(t): i for i, t in enumerate(snap.item_ids)}
    popularity = train_popularity(snap.train)
    ease = fit_ease_on_validation(snap.train, snap.val) if arm == "ease" else None
    out = {}
    for u in np.flatnonzero(members):
        history = [index[t] for t in data["history"][u]]
        seen = [index[t] for t in data["seen"][u]]
        if arm == "ease" and history:
            from piarec.data.csr import CSR

            scores = ease.scores(CSR.from_lists([np.array(history)], snap.n_items)).numpy()[0]
        else:
            scores = popularity
        out[data["user_id"][u]] = [str(snap.item_ids[i]) for i in reference_topk(scores, seen, K)]
    return out


def test_baseline_arms_score_exactly_on_the_local_engine(world):
    root, snap, data, cfg = world
    plan = score_arms.plan_arms(cfg, score_arms.arm_specs(cfg))
    manifests = run_local(cfg, DAY, str(root / "histories"), str(root / "recs"), plan, K)
    arm_of = score_arms.Assignment(cfg.scoring.ab_salt, (0.5, 0.25, 0.25)).assign(pa.array(data["user_id"]))
    day = str(root / "recs" / f"dt={DAY}")
    seen_users: set[str] = set()
    for a, name in enumerate(["champion", "pop", "ease"]):
        rows = reader.read_arm(day, name).to_pylist()
        users = [r["user_id"] for r in rows]
        assert len(users) == len(set(users)) and not seen_users & set(users)  # each user in exactly one arm
        seen_users |= set(users)
        assert set(users) == {data["user_id"][i] for i in np.flatnonzero(arm_of == a)}
        if name != "champion":
            expected = expected_arm_rows(snap, data, arm_of == a, name)
            assert {r["user_id"]: r["item_ids"] for r in rows} == expected
            assert {r["model_version"] for r in rows} == {manifests[name]["model"]["version"]}
            assert manifests[name]["model"]["version"].startswith(f"{name if name == 'ease' else 'popularity'}-")
    assert seen_users == set(data["user_id"])
    manifest = read_pointer(day).manifest
    assert manifest["assignment"]["shares"] == {"champion": 0.5, "pop": 0.25, "ease": 0.25}
    ease = manifest["arms"]["ease"]["model"]
    assert ease["kind"] == "ease"  # fitted on the committed version of the snapshot: immutable
    assert ease["fitted"]["snapshot_uri"].startswith(f"{cfg.scoring.baseline_snapshot}/_versions/")
    assert ease["fitted"]["lambda"] == fit_ease_on_validation(snap.train, snap.val).lam
    assert manifest["arms"]["pop"]["share"] == 0.25 and manifest["arms"]["champion"]["model"]["kind"] == "model"
    for name in ("champion", "pop", "ease"):  # validated before the commit, like any model's arm
        assert manifest["validation"][name]["users"] == int(np.sum(arm_of == ["champion", "pop", "ease"].index(name)))
        assert manifest["validation"][name]["model_version"] == manifests[name]["model"]["version"]


def score_on_spark(cfg, plan, histories, out) -> None:
    """The Spark job on ``histories`` into ``out``, in a local[2] session of its own."""
    from pipelines import score_users
    from pipelines.spark import get_spark

    spark = get_spark(cfg.spark.model_copy(update={"master": "local[2]", "driver_memory": "1g"}))
    try:
        score_users.run(spark, cfg, "unused", DAY, str(out), plan, K, histories_uri=str(histories))
    finally:
        spark.stop()


def test_the_spark_job_writes_the_same_baseline_arms(world):
    root, _, _, cfg = world
    plan = score_arms.plan_arms(cfg, score_arms.arm_specs(cfg))
    score_on_spark(cfg, plan, root / "histories", root / "recs-spark")
    if not (root / "recs" / f"dt={DAY}").exists():
        run_local(cfg, DAY, str(root / "histories"), str(root / "recs"), plan, K)
    for name in ("champion", "pop", "ease"):
        def rows(recs):
            table = reader.read_arm(str(root / recs / f"dt={DAY}"), name)
            return sorted(table.to_pylist(), key=lambda r: r["user_id"])
        assert rows("recs-spark") == rows("recs"), name


def test_a_baseline_needs_a_snapshot(world):
    root, _, _, cfg = world
    bare = cfg.model_copy(deep=True)
    bare.scoring.baseline_snapshot = None
    with pytest.raises(ConfigError, match="baseline_snapshot"):
        score_arms.plan_arms(bare, score_arms.arm_specs(bare))


# --------------------------------------------------------------------------- availability
def write_availability(path, rows: list[tuple], region: bool = False, ts: bool = False) -> str:
    """rows: (item_id, available_from, available_to[, region]) with dates or None."""
    import pyarrow.parquet as pq
    from datetime import datetime, timezone

    def col(i):
        values = [r[i] for r in rows]
        if ts:
            return pa.array([None if v is None else datetime.combine(v, datetime.min.time(), timezone.utc)
                             for v in values], pa.timestamp("ms", tz="UTC"))
        return pa.array(values, pa.date32())
    table = pa.table({"item_id": [r[0] for r in rows], "available_from": col(1), "available_to": col(2),
                      **({"region": [r[3] for r in rows]} if region else {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("ts", [False, True])
def test_availability_windows_regions_and_unlisted_titles(tmp_path, ts):
    from datetime import timedelta

    from piarec.daily.availability import load_availability

    d = DAY
    rows = [("always", None, None, None), ("unreleased", d + timedelta(days=1), None, None),
            ("withdrawn-tomorrow", None, d + timedelta(days=1), None), ("until-the-day-after", d, d + timedelta(days=2), None),
            ("old", None, d, None), ("french", None, None, "fr"), ("twice", None, d, None),
            ("twice", d - timedelta(days=3), None, None)]
    uri = write_availability(tmp_path / "avail.parquet", rows, region=True, ts=ts)
    scoring = ScoringConfig(availability=uri)
    got = load_availability(scoring, d)
    assert got.available == {"always", "until-the-day-after", "twice"}  # whole [D, D+2) UTC; region rows skipped
    assert got.listed == 6 and got.window == (f"{d}T00:00:00+00:00", f"{d + timedelta(days=2)}T00:00:00+00:00")
    assert load_availability(ScoringConfig(availability=uri, region="fr"), d).available == {
        "always", "until-the-day-after", "twice", "french"}
    assert load_availability(ScoringConfig(availability=uri, availability_days=1), d).available == {
        "always", "until-the-day-after", "twice", "withdrawn-tomorrow"}
    vocabulary = np.array(["always", "unlisted", "old", "twice"], dtype=object)
    assert got.withheld(vocabulary).tolist() == [1, 2]  # a title the table does not list is not served
    assert load_availability(ScoringConfig(), d) is None


def test_a_bad_availability_table_fails_clearly(tmp_path):
    import pyarrow.parquet as pq

    from piarec.daily.availability import load_availability
    from piarec.errors import InputDataError

    pq.write_table(pa.table({"item_id": ["a"], "available_from": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(InputDataError, match="lacks column"):
        load_availability(ScoringConfig(availability=str(tmp_path / "bad.parquet")), DAY)
    pq.write_table(pa.table({"item_id": ["a"], "available_from": [1], "available_to": [2]}), tmp_path / "int.parquet")
    with pytest.raises(InputDataError, match="not a date or timestamp"):
        load_availability(ScoringConfig(availability=str(tmp_path / "int.parquet")), DAY)
    with pytest.raises(InputDataError, match="cannot be read"):
        load_availability(ScoringConfig(availability=str(tmp_path / "missing")), DAY)
    uri = write_availability(tmp_path / "plain.parquet", [("a", None, None)])
    with pytest.raises(InputDataError, match="no region column"):
        load_availability(ScoringConfig(availability=uri, region="fr"), DAY)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_scorer_never_serves_an_excluded_title(precision):
    import torch

    from piarec.data.csr import CSR
    from piarec.models.bundle import ModelBundle
    from piarec.scoring.scorer import TopKScorer

    torch.manual_seed(1)
    n_items, k = 40, 10
    model = MultiVAE(n_items, ModelConfig(hidden_dim=16, latent_dim=8)).eval()
    popularity = np.random.default_rng(0).integers(0, 6, n_items).astype(np.float32)
    bundle = ModelBundle(model, np.array([f"t{i}" for i in range(n_items)], dtype=object), popularity)
    rng = np.random.default_rng(2)
    history = [np.sort(rng.choice(n_items, rng.integers(0, 6), replace=False)) for _ in range(50)]
    seen = [np.union1d(h, rng.choice(n_items, 3, replace=False)) for h in history]
    seen[-1] = np.arange(n_items - 12)  # with the exclusions, fewer than k titles are left
    exclude = np.array([0, 1, 5, 17, 33, 39, 28, 29, 30])
    hist, seen_csr = CSR.from_lists(history, n_items), CSR.from_lists(seen, n_items)
    got = TopKScorer(bundle, k, 16, precision=precision, exclude=exclude).score(hist, seen_csr)
    both = CSR.from_lists([np.union1d(s, exclude) for s in seen], n_items)
    want = TopKScorer(bundle, k, 16, precision=precision).score(hist, both)  # the same as seeing them
    assert np.array_equal(got.count, want.count) and np.array_equal(got.item_idx, want.item_idx)
    assert np.array_equal(got.scores, want.scores, equal_nan=True)
    assert got.count[-1] == n_items - len(np.union1d(seen[-1], exclude)) < k
    assert not np.isin(got.item_idx, exclude).any()


def test_both_engines_withhold_unavailable_titles_in_every_arm(world, tmp_path):
    root, snap, data, cfg = world
    items = [str(i) for i in snap.item_ids]
    withdrawn = items[:5] + items[25:28]  # the most popular titles of two blocks
    rows = [(t, None, DAY, None) if t in withdrawn else (t, None, None, None) for t in items]
    avail = cfg.model_copy(deep=True)
    avail.scoring.availability = write_availability(tmp_path / "availability.parquet", [r[:3] for r in rows])
    plan = score_arms.plan_arms(avail, score_arms.arm_specs(avail))
    manifests = run_local(avail, DAY, str(root / "histories"), str(tmp_path / "recs"), plan, K)
    score_on_spark(avail, plan, root / "histories", tmp_path / "recs-spark")
    arm_of = score_arms.Assignment(avail.scoring.ab_salt, (0.5, 0.25, 0.25)).assign(pa.array(data["user_id"]))
    for a, name in enumerate(["champion", "pop", "ease"]):
        local = sorted(reader.read_arm(str(tmp_path / "recs" / f"dt={DAY}"), name).to_pylist(), key=lambda r: r["user_id"])
        spark_rows = sorted(reader.read_arm(str(tmp_path / "recs-spark" / f"dt={DAY}"), name).to_pylist(),
                            key=lambda r: r["user_id"])
        assert local == spark_rows, name
        assert local and not any(set(r["item_ids"]) & set(withdrawn) for r in local)
        assert all(len(r["item_ids"]) == K for r in local)  # the next titles take their places
        assert manifests[name]["withheld"] == {"titles": len(withdrawn), "item_ids": sorted(withdrawn)}
        if name == "pop":  # exactly popularity with the withdrawn titles treated as seen
            held = {**data, "seen": [sorted(set(s) | set(withdrawn)) for s in data["seen"]]}
            assert {r["user_id"]: r["item_ids"] for r in local} == expected_arm_rows(snap, held, arm_of == a, name)
    assert manifests["pop"]["availability"]["titles_available"] == len(items) - len(withdrawn)
