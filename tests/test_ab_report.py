"""The A/B report: every figure recomputed by hand from a small world of served lists and
card events, the attribution rules (the lists of dt=E-1, recommended titles only, the
card's events only), the sample-ratio check failing loudly, and the pure table code
against the vector statistics of piarec.evaluate.ab."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piarec.config import load_config
from piarec.data import layout
from piarec.data.commit import PartitionCommit, read_pointer
from piarec.evaluate.ab import UserSums, ratio, ratio_from_sums, uplift
from piarec.evaluate.ab_report import PERIOD, figures
from piarec.scoring.arrow import OUTPUT_SCHEMA

pytestmark = pytest.mark.filterwarnings("ignore")
D1, D2 = date(2026, 5, 2), date(2026, 5, 3)  # event days; their lists are those of dt=D-1


# --------------------------------------------------------------------------- pure part
def test_ratio_from_sums_is_the_vector_delta_method():
    rng = np.random.default_rng(0)
    y, x = rng.poisson(3, 500).astype(float), 1 + rng.poisson(5, 500).astype(float)
    a, b = ratio(y, x), ratio_from_sums(UserSums.of(y, x))
    assert a == b or all(np.isclose(getattr(a, f), getattr(b, f), rtol=1e-12) for f in ("value", "se", "low", "high"))


def test_figures_give_each_arm_its_interval_and_each_treatment_its_uplift():
    rng = np.random.default_rng(1)
    per_arm = {arm: (rng.poisson(lam, 300).astype(float), 1 + rng.poisson(4, 300).astype(float))
               for arm, lam in (("ctl", 1.0), ("new", 1.5))}
    sums = {(PERIOD, None, arm, "click_rate_per_view"): UserSums.of(y, x) for arm, (y, x) in per_arm.items()}
    counts = {(PERIOD, None, arm): {"assigned_users": 300, "users_with_view": 300, "views": 1, "clicks": 1,
                                    "coverage": 0.5} for arm in per_arm}
    rows = {(r["arm"], r["metric"]): r for r in figures(sums, counts, "ctl")}
    want_ctl, want_new = ratio(*per_arm["ctl"]), ratio(*per_arm["new"])
    got = rows[("new", "click_rate_per_view")]
    assert np.isclose(got["value"], want_new.value) and np.isclose(got["low"], want_new.low)
    u = uplift(want_ctl, want_new)
    assert np.isclose(got["uplift"], u.rel) and np.isclose(got["uplift_low"], u.rel_low) and got["control"] == "ctl"
    assert rows[("ctl", "click_rate_per_view")]["uplift"] is None  # the control has no uplift
    assert rows[("ctl", "playtime_per_user_view")]["value"] is None  # no sums: no figure, no error
    assert rows[("new", "coverage")]["value"] == 0.5


# --------------------------------------------------------------------------- the Spark job
USERS = {"A": ["a1", "a2", "a3", "a4"], "B": ["b1", "b2", "b3", "b4"]}


def served_lists(arm: str, user: str) -> list[str]:
    return ["t1", "t2", "t3"] if arm == "A" else ["t4", "t5", "t6"]


def write_day(recs: Path, day: date, shares: dict[str, float]) -> None:
    with PartitionCommit(str(layout.day_uri(str(recs), day)), what="recommendations day") as run:
        for arm, users in USERS.items():
            folder = Path(run.data_uri) / f"arm={arm}"
            folder.mkdir(parents=True)
            lists = [served_lists(arm, u) for u in users]
            pq.write_table(pa.table({"user_id": users, "item_ids": lists,
                                     "scores": [[3.0, 2.0, 1.0]] * len(users), "model_version": ["1"] * len(users),
                                     "source": ["model"] * len(users)}, schema=OUTPUT_SCHEMA), folder / "part-0.parquet")
        run.commit({"date": day.isoformat(), "assignment": {"salt": "s", "shares": shares},
                    "arms": {arm: {"model": {"version": {"A": "7", "B": "popularity-abc"}[arm], "uri": arm,
                                             "kind": "model", "n_items": 10}} for arm in USERS}})


def ts(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=timezone.utc)


# (user, item, type, ts, watch, surface, slot)
EVENTS = [
    # a1, day 1: two views of the card (two render times), one click on a recommended title and its play
    *[("a1", t, "impression", ts(D1, 9), 0, "home", s) for s, t in enumerate(["t1", "t2", "t3"])],
    *[("a1", t, "impression", ts(D1, 12), 0, "home", s) for s, t in enumerate(["t1", "t2", "t3"])],
    ("a1", "t2", "click", ts(D1, 12, 1), 0, "home", 1),
    ("a1", "t2", "play", ts(D1, 12, 2), 1800, "home", 1),
    ("a1", "t9", "click", ts(D1, 12, 3), 0, "home", 2),  # not a recommended title: not counted
    ("a1", "t3", "click", ts(D1, 13), 0, None, None),  # off the card: not a card click
    ("a1", "t3", "play", ts(D1, 13, 1), 600, None, None),  # a recommended title played from elsewhere
    # a2, day 2: one view, no click
    *[("a2", t, "impression", ts(D2, 8), 0, "home", s) for s, t in enumerate(["t1", "t2", "t3"])],
    # a3: views on both days, a click each day
    *[("a3", t, "impression", ts(D1, 8), 0, "home", s) for s, t in enumerate(["t1", "t2", "t3"])],
    ("a3", "t1", "click", ts(D1, 8, 1), 0, "home", 0),
    *[("a3", t, "impression", ts(D2, 8), 0, "home", s) for s, t in enumerate(["t1", "t2", "t3"])],
    ("a3", "t3", "click", ts(D2, 8, 1), 0, "home", 2),
    ("a3", "t3", "play", ts(D2, 8, 2), 900, "home", 2),
    # a4: nothing (assigned, never viewed)
    # B: b1 one view + click, b2 one view, b3 one view, b4 a view of another surface only
    *[("b1", t, "impression", ts(D1, 10), 0, "home", s) for s, t in enumerate(["t4", "t5", "t6"])],
    ("b1", "t4", "click", ts(D1, 10, 1), 0, "home", 0),
    *[("b2", t, "impression", ts(D1, 10), 0, "home", s) for s, t in enumerate(["t4", "t5", "t6"])],
    *[("b3", t, "impression", ts(D2, 10), 0, "home", s) for s, t in enumerate(["t4", "t5", "t6"])],
    ("b4", "t4", "impression", ts(D2, 10), 0, "other", 0),
    ("zz", "t1", "click", ts(D1, 10), 0, "home", 0),  # a user in no arm
]


def write_events(root: Path) -> None:
    for day in (D1, D2):
        rows = [e for e in EVENTS if e[3].date() == day]
        table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                          "event_type": [r[2] for r in rows], "ts": pa.array([r[3] for r in rows], pa.timestamp("us", tz="UTC")),
                          "watch_seconds": pa.array([r[4] for r in rows], pa.int32()),
                          "surface": [r[5] for r in rows], "slot": pa.array([r[6] for r in rows], pa.int32())})
        folder = root / f"dt={day}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.spark import get_spark

    root = tmp_path_factory.mktemp("ab")
    for day in (D1 - timedelta(days=1), D2 - timedelta(days=1)):
        write_day(root / "recommendations", day, {"A": 0.5, "B": 0.5})
    write_events(root / "events")
    cfg = load_config(environ={}, overrides={"storage": {"root": str(root)},
                                             "spark": {"master": "local[2]", "shuffle_partitions": 2,
                                                       "driver_memory": "1g"}})
    spark = get_spark(cfg.spark)
    yield root, cfg, spark
    spark.stop()


def hand_figures() -> dict[str, dict[str, np.ndarray]]:
    """Per arm, per user (sorted ids): numerator and denominator of each metric over the period."""
    # user: views, card clicks on recommended titles, user-days with a view, with such a click,
    #       card playtime of recommended titles, plays of recommended titles (anywhere)
    per_user = {
        "a1": (2, 1, 1, 1, 1800, 2), "a2": (1, 0, 1, 0, 0, 0), "a3": (2, 2, 2, 2, 900, 1), "a4": (0, 0, 0, 0, 0, 0),
        "b1": (1, 1, 1, 1, 0, 0), "b2": (1, 0, 1, 0, 0, 0), "b3": (1, 0, 1, 0, 0, 0), "b4": (0, 0, 0, 0, 0, 0),
    }
    out = {}
    for arm, users in USERS.items():
        v = np.array([per_user[u] for u in users], float)
        viewers = v[:, 2] > 0
        out[arm] = {"click_rate_per_view": (v[viewers, 1], v[viewers, 0]),
                    "click_rate_per_user_view": (v[viewers, 3], v[viewers, 2]),
                    "playtime_per_user_view": (v[viewers, 4], v[viewers, 2]),
                    "rec_plays_per_user": (v[:, 5], np.ones(len(users)))}
    return out


def test_the_report_equals_the_figures_by_hand(world):
    from pipelines import ab_report

    root, cfg, spark = world
    summary = ab_report.run(spark, cfg, D1, D2, surfaces=["home"], log_mlflow=False)
    out = Path(summary["uri"])
    assert read_pointer(str(out)) is not None and summary["control"] == "A" and summary["arms"] == ["A", "B"]
    pointer = read_pointer(str(out))
    base = out / "_versions" / pointer.version
    assert sorted(p.name for p in base.iterdir()) == sorted(ab_report.REPORT_FILES)
    rows = pq.read_table(base / "report.parquet").to_pylist()
    period = {(r["arm"], r["metric"]): r for r in rows if r["scope"] == PERIOD}
    want = hand_figures()
    for arm in USERS:
        for metric, (y, x) in want[arm].items():
            est = ratio(y, x)
            got = period[(arm, metric)]
            assert np.isclose(got["value"], est.value) and np.isclose(got["high"], est.high), (arm, metric)
            assert got["n_users"] == len(y)
    assert period[("A", "views")]["value"] == 5 and period[("A", "users_with_view")]["value"] == 3
    assert period[("B", "users_with_view")]["value"] == 3 and period[("A", "assigned_users")]["value"] == 4
    assert period[("A", "coverage")]["value"] == 0.3  # t1-t3 impressed of 10 titles
    u = uplift(ratio(*want["A"]["click_rate_per_view"]), ratio(*want["B"]["click_rate_per_view"]))
    assert np.isclose(period[("B", "click_rate_per_view")]["uplift"], u.rel)
    daily = {(r["day"], r["arm"], r["metric"]): r for r in rows if r["scope"] == "day"}
    assert daily[(str(D2), "A", "views")]["value"] == 2 and daily[(str(D1), "A", "click_rate_per_view")]["value"] == 2 / 3
    assert summary["srm"]["mismatch"] is False and summary["srm"]["observed"] == {"A": 3, "B": 3}
    page = (base / "report.html").read_text()
    assert "click rate per view" in page and "popularity-abc" in page and (base / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((base / "summary.json").read_text())["models"]["A"]["version"] == "7"


def test_any_surface_counts_without_a_filter(world):
    from pipelines import ab_report

    root, cfg, spark = world
    summary = ab_report.run(spark, cfg, D1, D2, out_uri=str(root / "any"), log_mlflow=False)
    rows = pq.read_table(Path(summary["uri"]) / "_versions" / read_pointer(summary["uri"]).version / "report.parquet")
    period = {(r["arm"], r["metric"]): r["value"] for r in rows.to_pylist() if r["scope"] == PERIOD}
    assert period[("B", "users_with_view")] == 4  # b4's view of the other surface counts now


def test_a_sample_ratio_mismatch_is_committed_then_fails(world, tmp_path):
    from pipelines import ab_report

    root, cfg, spark = world
    skewed = cfg.model_copy(deep=True)
    skewed.storage.root = str(tmp_path)
    for day in (D1 - timedelta(days=1), D2 - timedelta(days=1)):
        write_day(tmp_path / "recommendations", day, {"A": 0.99, "B": 0.01})
    skewed.storage.events = str(root / "events")
    with pytest.raises(ab_report.SampleRatioMismatch, match="sample ratio mismatch"):
        ab_report.run(spark, skewed, D1, D2, surfaces=["home"], log_mlflow=False)
    pointer = read_pointer(layout.ab_report_uri(skewed.storage, D1, D2))
    assert pointer.manifest["srm"]["mismatch"] is True  # kept for inspection


def test_a_missing_served_day_fails_before_anything_is_written(world, tmp_path):
    from piarec.errors import InputDataError
    from pipelines import ab_report

    root, cfg, spark = world
    with pytest.raises(InputDataError, match="is not committed: the lists served on 2026-05-04 are unknown"):
        ab_report.run(spark, cfg, D1, D2 + timedelta(days=1), out_uri=str(tmp_path / "r"), log_mlflow=False)
    assert not (tmp_path / "r").exists()
