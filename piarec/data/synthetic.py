"""Deterministic synthetic viewing events for a streaming service.

:func:`generate_events` writes a Hive-partitioned Parquet dataset
(``out/dt=YYYY-MM-DD/part-00000.parquet``) with the columns the pipeline reads::

    user_id string | item_id string | event_type string | ts timestamp[us, UTC] | watch_seconds int32

The data has the shape that matters for recommendation:

* Zipf-like title popularity and lognormal (heavy-tailed) user activity, with a
  share of users below the default "5 positives" training filter;
* latent taste groups: every title has a home group, every user a primary and a
  weaker secondary group whose titles are strongly boosted, so collaborative
  filtering clearly beats popularity;
* a per-title funnel (impressions -> click -> play -> complete) with short plays
  that are not positives under the default rule (play/complete, >= 60 s),
  rewatches on later days, and browsing impressions of titles never played.

Everything is vectorised with numpy (a Python loop only runs per sampling round
and per written day) and driven by one ``numpy.random.default_rng(seed)``, so the
same arguments always produce identical files.
"""

from __future__ import annotations

import datetime
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from piarec.data import layout, storage

EVENT_TYPES = ("impression", "click", "play", "complete")
IMPRESSION, CLICK, PLAY, COMPLETE = range(4)

SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("watch_seconds", pa.int32()),
    ]
)

ZIPF_EXPONENT = 0.9  # title popularity ~ 1 / rank**0.9
POP_GAMMA = 1.0  # how strongly users follow popularity inside the taste mixture
PRIMARY_BOOST = 80.0  # weight multiplier for titles of the user's primary group
SECONDARY_BOOST = 20.0  # ... and of the weaker secondary group
TITLES_MEDIAN, TITLES_SIGMA = 16.0, 1.0  # lognormal number of distinct titles played
TITLES_PER_SESSION = 4  # a user's titles are spread over ceil(n / 4) session days
BROWSE_IMPRESSIONS = (5, 10)  # popularity-drawn impressions per session (inclusive)
P_CLICK, P_SHORT, P_COMPLETE, P_REWATCH = 0.7, 0.15, 0.4, 0.1
DAY = 86_400
FUNNEL_ROOM = 7_400  # seconds a funnel may last: 120 s of browsing + a 7200 s title


def _taste_samples(rng, n, primary, secondary, item_group, weight, groups):
    """Draw titles (with replacement) from each user's taste mixture.

    ``n`` int64[users] draws per user; returns (user int64[sum n], item int64[sum n]).
    The per-user distribution is ∝ weight × (1 + PRIMARY_BOOST·[home == primary]
    + SECONDARY_BOOST·[home == secondary]); it is sampled as a mixture of the global
    distribution and two group components, all through one searchsorted over the
    group-sorted cumulative weights (no users × items matrix).
    """
    by_group = np.argsort(item_group, kind="stable")
    cum = np.cumsum(weight[by_group])
    bounds = np.searchsorted(item_group[by_group], np.arange(groups + 1))  # item positions
    cum0 = np.concatenate([[0.0], cum])
    mass = cum0[bounds[1:]] - cum0[bounds[:-1]]  # float64[groups] total weight per group

    user = np.repeat(np.arange(len(n)), n)
    p, s = primary[user], secondary[user]
    m_all, m_p, m_s = cum[-1], PRIMARY_BOOST * mass[p], SECONDARY_BOOST * mass[s]
    r = rng.random(len(user)) * (m_all + m_p + m_s)
    # Component: 0 = everything, 1 = primary group, 2 = secondary group.
    comp = np.where(r < m_all, 0, np.where(r < m_all + m_p, 1, 2))
    g = np.where(comp == 1, p, s)
    u = rng.random(len(user))
    lo = np.where(comp == 0, 0, bounds[g])
    hi = np.where(comp == 0, len(weight), bounds[g + 1])
    target = cum0[lo] + u * (cum0[hi] - cum0[lo])
    pos = np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)
    return user, by_group[pos]


def _pick_titles(rng, n_titles, primary, secondary, item_group, weight, groups):
    """Distinct (user, item) pairs, about ``n_titles[u]`` per user, sorted by user then item.

    Draws with replacement and tops up each user's deficit for a few rounds; a heavy
    user whose taste is too concentrated may end with slightly fewer titles.
    """
    items = len(weight)
    keys = np.empty(0, dtype=np.int64)
    need = n_titles.astype(np.int64)
    for _ in range(6):
        user, item = _taste_samples(rng, need, primary, secondary, item_group, weight, groups)
        keys = np.unique(np.concatenate([keys, user * items + item]))
        need = n_titles - np.bincount(keys // items, minlength=len(n_titles))
        if not need.any():
            break
    return keys // items, keys % items


def generate_events(
    out: str,
    *,
    users: int = 50_000,
    items: int = 2_000,
    days: int = 120,
    seed: int = 0,
    start: datetime.date = datetime.date(2026, 1, 1),
    groups: int = 20,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write ``days`` daily partitions of synthetic events under ``out``; return a summary.

    ``out`` is a local path or URI (resolved with :func:`piarec.data.storage.resolve`); an
    existing dataset there is deleted first. Users need at least one per day
    (``users >= days``) so every partition has events. The summary holds ``events``
    (rows), ``users``/``items`` (distinct ids with any event), ``days``, ``start`` and
    ``end`` (ISO dates of the first and last day) and ``files``.
    """
    if min(users, items, days, groups) < 1 or users < days:
        raise ValueError("need users >= days >= 1, items >= 1 and groups >= 1")
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: the data depend on it
    cat = _catalogue(rng, items, groups)
    pop = _population(rng, users, days, groups, cat)
    events = _events(rng, days, groups, cat, pop)
    user, item, _, ts, _ = events
    _write_days(out, events, users, items, days, start, progress)
    return {
        "events": int(len(ts)),
        "users": int(np.count_nonzero(np.bincount(user, minlength=users))),
        "items": int(np.count_nonzero(np.bincount(item, minlength=items))),
        "days": days,
        "start": start.isoformat(),
        "end": (start + datetime.timedelta(days=days - 1)).isoformat(),
        "files": days,
    }


def _catalogue(rng: np.random.Generator, items: int, groups: int) -> dict[str, np.ndarray]:
    """Popularity over a random permutation, each title's home group and full length."""
    rank = np.empty(items, dtype=np.int64)
    rank[rng.permutation(items)] = np.arange(1, items + 1)
    popularity = rank ** -ZIPF_EXPONENT
    item_group = rng.integers(0, groups, items)
    length = rng.integers(1_200, 7_201, items)  # seconds; a complete watches all of it
    return {"popularity": popularity, "item_group": item_group, "length": length}


def _population(rng: np.random.Generator, users: int, days: int, groups: int, cat: dict) -> dict[str, np.ndarray]:
    """Users (taste groups, heavy-tailed appetite, activity window) and their sessions."""
    # Group sizes follow the titles' popularity (popular genres have more fans); were
    # they uniform, niche groups would get as many plays as popular ones and flatten
    # the popularity curve. A secondary equal to the primary means a single taste.
    weight = cat["popularity"] ** POP_GAMMA
    group_mass = np.bincount(cat["item_group"], weights=weight, minlength=groups)
    primary, secondary = rng.choice(groups, (2, users), p=group_mass / group_mass.sum())
    n_titles = np.rint(rng.lognormal(np.log(TITLES_MEDIAN), TITLES_SIGMA, users))
    n_titles = np.clip(n_titles, 1, max(1, len(weight) // 4)).astype(np.int64)
    # Stratified arrivals: uniform over the period, yet every day gets an arrival
    # (whose first session is that day), so no partition is ever empty.
    arrival = (days * (rng.permutation(users) + rng.random(users)) / users).astype(np.int64)
    span = np.maximum(1, np.ceil(days * rng.beta(0.7, 2.0, users))).astype(np.int64)
    span = np.minimum(span, days - arrival)

    # Sessions: ceil(n / 4) days per user inside the window, the first on arrival.
    n_sess = -(-n_titles // TITLES_PER_SESSION)
    sess_user = np.repeat(np.arange(users), n_sess)
    first_sess = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
    sess_day = arrival[sess_user] + (rng.random(len(sess_user)) * span[sess_user]).astype(np.int64)
    sess_day[first_sess] = arrival
    return {"weight": weight, "primary": primary, "secondary": secondary, "n_titles": n_titles,
            "n_sess": n_sess, "sess_user": sess_user, "first_sess": first_sess, "sess_day": sess_day}


def _events(rng: np.random.Generator, days: int, groups: int, cat: dict, pop: dict) -> tuple[np.ndarray, ...]:
    """``(user, item, event type, ts, watch_seconds)`` int arrays sorted by time, ts in
    seconds since the start of day 0: every watched title's funnel, plus browsing."""
    length, items = cat["length"], len(cat["length"])
    n_sess, first_sess, sess_day, sess_user = pop["n_sess"], pop["first_sess"], pop["sess_day"], pop["sess_user"]
    t_user, t_item = _pick_titles(rng, pop["n_titles"], pop["primary"], pop["secondary"], cat["item_group"],
                                  pop["weight"], groups)
    n_t = len(t_user)
    sess = first_sess[t_user] + (rng.random(n_t) * n_sess[t_user]).astype(np.int64)
    t0 = sess_day[sess] * DAY + rng.integers(0, DAY - FUNNEL_ROOM, n_t)

    def watch(idx):  # int32 watch_seconds for plays of titles idx: ~15 % short (< 60 s)
        short = rng.random(len(idx)) < P_SHORT
        full = rng.integers(60, length[t_item[idx]] + 1)
        return np.where(short, rng.integers(1, 60, len(idx)), full).astype(np.int32), ~short

    # 1-3 impressions in 20 s slots, a click (p=0.7) and the play, strictly ordered in time.
    n_imp = rng.integers(1, 4, n_t)
    imp = np.repeat(np.arange(n_t), n_imp)
    slot = np.arange(len(imp)) - np.repeat(np.cumsum(n_imp) - n_imp, n_imp)
    imp_ts = t0[imp] + 20 * slot + rng.integers(0, 20, len(imp))
    clk = np.flatnonzero(rng.random(n_t) < P_CLICK)
    clk_ts = t0[clk] + 60 + rng.integers(0, 30, len(clk))
    play_ts = t0 + 90 + rng.integers(0, 30, n_t)
    play_w, long_play = watch(np.arange(n_t))
    cmp = np.flatnonzero(long_play & (rng.random(n_t) < P_COMPLETE))
    # Rewatch: one more play of the same title 1-14 days later (dropped past the end).
    rw = np.flatnonzero(rng.random(n_t) < P_REWATCH)
    rw_day = t0[rw] // DAY + rng.integers(1, 15, len(rw))
    rw, rw_day = rw[rw_day < days], rw_day[rw_day < days]
    rw_w, _ = watch(rw)

    # Browsing: popularity-drawn impressions per session, minus titles the user plays.
    popularity = cat["popularity"]
    n_b = rng.integers(BROWSE_IMPRESSIONS[0], BROWSE_IMPRESSIONS[1] + 1, len(sess_user))
    b_sess = np.repeat(np.arange(len(sess_user)), n_b)
    b_user = sess_user[b_sess]
    b_item = np.searchsorted(np.cumsum(popularity), rng.random(len(b_sess)) * popularity.sum(),
                             side="right").clip(0, items - 1)
    keep = ~np.isin(b_user * items + b_item, t_user * items + t_item)
    b_sess, b_user, b_item = b_sess[keep], b_user[keep], b_item[keep]
    b_ts = sess_day[b_sess] * DAY + rng.integers(0, DAY, len(b_sess))

    parts = [  # (user, item, event type, ts, watch_seconds) per kind of event
        (t_user[imp], t_item[imp], IMPRESSION, imp_ts, 0),
        (t_user[clk], t_item[clk], CLICK, clk_ts, 0),
        (t_user, t_item, PLAY, play_ts, play_w),
        (t_user[cmp], t_item[cmp], COMPLETE, play_ts[cmp] + length[t_item[cmp]],
         length[t_item[cmp]]),
        (t_user[rw], t_item[rw], PLAY, rw_day * DAY + rng.integers(0, DAY, len(rw)), rw_w),
        (b_user, b_item, IMPRESSION, b_ts, 0),
    ]
    user = np.concatenate([p[0] for p in parts]).astype(np.int32)
    item = np.concatenate([p[1] for p in parts]).astype(np.int32)
    etype = np.concatenate([np.full(len(p[0]), p[2], np.int8) for p in parts])
    ts = np.concatenate([p[3] for p in parts]).astype(np.int64)
    wsec = np.concatenate([np.broadcast_to(np.int32(p[4]), len(p[0])) for p in parts])
    order = np.lexsort((user, ts))  # stable: by time, then user, then generation order
    return user[order], item[order], etype[order], ts[order], wsec[order]


DONE_MARKER = "_SUCCESS"  # the default of events.done_marker


def _write_days(out: str, events: tuple[np.ndarray, ...], users: int, items: int, days: int,
                start: datetime.date, progress: Callable[[str], None] | None) -> None:
    """One Parquet file per day under ``out`` (``dt=YYYY-MM-DD/part-00000.parquet``), then
    that day's completion marker ``_SUCCESS``."""
    user, item, etype, ts, wsec = events
    loc = storage.resolve(out)
    if storage.exists(loc):
        storage.remove(loc)
    user_names = pa.array([f"u{u:07d}" for u in range(users)])
    item_names = pa.array([f"t{i:05d}" for i in range(items)])
    type_names = pa.array(EVENT_TYPES)
    epoch_us = int(datetime.datetime(start.year, start.month, start.day,
                                     tzinfo=datetime.timezone.utc).timestamp()) * 1_000_000
    cuts = np.searchsorted(ts, np.arange(days + 1) * DAY)
    for d in range(days):
        sl = slice(cuts[d], cuts[d + 1])
        table = pa.Table.from_arrays(
            [
                user_names.take(pa.array(user[sl])),
                item_names.take(pa.array(item[sl])),
                type_names.take(pa.array(etype[sl])),
                pa.array(epoch_us + ts[sl] * 1_000_000, type=SCHEMA.field("ts").type),
                pa.array(wsec[sl], type=pa.int32()),
            ],
            schema=SCHEMA,
        )
        part = loc.child(layout.day_dir(start + datetime.timedelta(days=d)))
        loc.fs.create_dir(part.path, recursive=True)
        pq.write_table(table, part.child("part-00000.parquet").path,
                       filesystem=loc.fs, compression="zstd")
        storage.write_bytes(part.child(DONE_MARKER), b"")  # the day is complete (sensors wait for it)
        if progress is not None and ((d + 1) % 20 == 0 or d + 1 == days):
            progress(f"synthetic events: {d + 1}/{days} days written, {int(cuts[d + 1]):,} rows")
