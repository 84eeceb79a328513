"""A closed loop over the synthetic world: the next day's card events respond to what each
user was served, so the A/B machinery can be seen to work before it meets real traffic.

:func:`generate_events` (``piarec.data.synthetic``) plants every user's tastes (a primary
and a secondary group of titles). :class:`PlantedTastes` recovers that world from the same
arguments; :func:`simulate_card_day` then writes one day of events on a recommendation card
(``surface``, docs/ab-logging.md) from the lists served to each user that day:

- a user visits with ``visit_prob``, and sees the card once or more (one ``impression``
  per title shown, the first ``slots`` titles of their list, all with the view's ``ts``);
- each title shown is clicked with probability ``base_ctr * affinity * decay**slot``, where
  ``affinity`` is :data:`AFFINITY` by whether the title is of the user's primary group, of
  the secondary group, or of neither;
- a click starts a ``play`` from the card with probability :data:`P_PLAY`; a title of the
  user's taste is watched for most of its length (a positive under the default rule),
  another one briefly.

So a model that finds the planted tastes gets more clicks and playtime than popularity, and
the direction of any A/B test is known in advance. Deterministic in ``seed`` and the day.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from piarec.data import layout, storage
from piarec.data.synthetic import DONE_MARKER, SCHEMA, _catalogue, _population

AFFINITY = {"primary": 6.0, "secondary": 3.0, "other": 1.0}
P_PLAY = 0.85
CARD_SCHEMA = SCHEMA.append(pa.field("surface", pa.string())).append(pa.field("slot", pa.int32()))


@dataclass(frozen=True)
class PlantedTastes:
    """The world :func:`~piarec.data.synthetic.generate_events` drew for the same arguments."""

    primary: np.ndarray  # int [users]: each user's primary taste group
    secondary: np.ndarray  # int [users]
    item_group: np.ndarray  # int [items]: each title's home group
    length: np.ndarray  # int [items]: seconds

    @classmethod
    def of(cls, users: int, items: int, days: int, seed: int = 0, groups: int = 20) -> "PlantedTastes":
        rng = np.random.default_rng(seed)  # the generator's first draws, in its order
        cat = _catalogue(rng, items, groups)
        pop = _population(rng, users, days, groups, cat)
        return cls(pop["primary"], pop["secondary"], cat["item_group"], cat["length"])

    def affinity(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """float [n]: how much user ``user[j]`` likes title ``item[j]`` (indices)."""
        g = self.item_group[item]
        return np.where(g == self.primary[user], AFFINITY["primary"],
                        np.where(g == self.secondary[user], AFFINITY["secondary"], AFFINITY["other"]))


def _index(ids: list[str], prefix: str) -> np.ndarray:
    """The generator's names (``u0000042``, ``t00017``) back to indices."""
    return np.array([int(i[len(prefix):]) for i in ids], dtype=np.int64)


def simulate_card_day(out: str, day: datetime.date, served: pa.Table, tastes: PlantedTastes, *, seed: int = 0,
                      surface: str = "home_card", slots: int = 10, visit_prob: float = 0.5,
                      base_ctr: float = 0.02, decay: float = 0.92) -> dict[str, int]:
    """Write ``out/dt=day/`` (then its ``_SUCCESS``): the card events of ``day`` for the
    users of ``served`` (``user_id``, ``item_ids`` best first: the lists served that day,
    every arm together). Returns counts of what was written."""
    rng = np.random.default_rng([seed, day.toordinal()])
    users = served.column("user_id").to_pylist()
    lists = served.column("item_ids").to_pylist()
    visit = np.flatnonzero(rng.random(len(users)) < visit_prob)
    views = 1 + rng.poisson(0.5, len(visit))  # renders of the card per visitor
    rows: dict[str, list] = {name: [] for name in CARD_SCHEMA.names}
    day0 = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)
    for u, n_views in zip(visit, views):
        shown = lists[u][:slots]
        if not shown:
            continue
        uid = _index([users[u]], "u")
        items = _index(shown, "t")
        like = tastes.affinity(np.repeat(uid, len(items)), items)
        for start in np.sort(rng.integers(0, 86_400 - 7_200, n_views)):
            t = day0 + datetime.timedelta(seconds=int(start))
            for slot, title in enumerate(shown):
                _add(rows, users[u], title, "impression", t, 0, surface, slot)
            clicked = np.flatnonzero(rng.random(len(items)) < base_ctr * like * decay ** np.arange(len(items)))
            for slot in clicked:
                title, lik = shown[slot], like[slot]
                _add(rows, users[u], title, "click", t + datetime.timedelta(seconds=30), 0, surface, int(slot))
                if rng.random() < P_PLAY:
                    full = int(tastes.length[items[slot]])
                    share = rng.uniform(0.5, 1.0) if lik > AFFINITY["other"] else rng.uniform(0.02, 0.3)
                    _add(rows, users[u], title, "play", t + datetime.timedelta(seconds=60), int(full * share),
                         surface, int(slot))
    table = pa.table(rows, schema=CARD_SCHEMA).sort_by([("ts", "ascending"), ("user_id", "ascending")])
    loc = storage.resolve(out).child(layout.day_dir(day))
    loc.fs.create_dir(loc.path, recursive=True)
    pq.write_table(table, loc.child("part-00000.parquet").path, filesystem=loc.fs, compression="zstd")
    storage.write_bytes(loc.child(DONE_MARKER), b"")
    kinds = table.column("event_type").to_pylist()
    return {"users": len(users), "visitors": int(len(visit)), "impressions": kinds.count("impression"),
            "clicks": kinds.count("click"), "plays": kinds.count("play")}


def _add(rows: dict[str, list], user: str, item: str, kind: str, ts, watch: int, surface: str, slot: int) -> None:
    for name, value in zip(CARD_SCHEMA.names, (user, item, kind, ts, watch, surface, slot)):
        rows[name].append(value)
