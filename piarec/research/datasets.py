"""Adapters from public interaction files to an in-memory :class:`~piarec.data.snapshot.Snapshot`.

Formats (``fmt``; ``"auto"`` detects from the file name, then from its content):

- ``ml-100k``   MovieLens ``u.data``: user, item, rating, time (tab-separated, no header)
- ``ml-1m``     MovieLens ``ratings.dat``: ``user::item::rating::time``
- ``ml-csv``    MovieLens ``ratings.csv``: header ``userId,movieId,rating,timestamp``
- ``lastfm``    HetRec Last.fm ``user_artists.dat``: header ``userID artistID weight`` (implicit)
- ``sequence``  one user per line, ``user item item ...`` (e.g. Amazon Beauty as prepared
                for sequential recommendation; implicit)
- ``citeulike`` one user per line, ``count item item ...`` (the line number is the user; implicit)
- ``csv`` / ``parquet``  generic tables with user, item and optional rating and timestamp
                columns (names recognised from common spellings, or given in ``columns``)

The split follows Liang et al. (2018)'s strong-generalization preprocessing: explicit
ratings >= ``min_rating`` are positives (implicit formats: every pair), users with fewer
than ``min_user_positives`` positives are dropped, held-out validation and test users are
drawn by a seeded permutation, items are those of the training users, and each held-out
user's positives on those items are split at random into fold-in (80 %) and held-out
(20 %, ``floor``; users with fewer than 5 such positives keep all as fold-in).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from piarec.errors import InputDataError
from piarec.data.snapshot import Snapshot, Split
from piarec.data.csr import CSR

FORMATS = ("ml-100k", "ml-1m", "ml-csv", "lastfm", "sequence", "citeulike", "csv", "parquet")
IMPLICIT = {"lastfm", "sequence", "citeulike"}
_USER_NAMES = ("user", "user_id", "userid", "uid", "user_idx", "customer_id", "visitorid")
_ITEM_NAMES = ("item", "item_id", "itemid", "movieid", "artistid", "sid", "song", "product_id", "asin", "iid")
_RATING_NAMES = ("rating", "ratings", "score", "stars")
_TIME_NAMES = ("timestamp", "ts", "time", "unix_time", "datetime")


@dataclass(frozen=True)
class Interactions:
    """Raw interactions: ``user`` and ``item`` ids (str, [n]), ``rating`` float [n] or None
    (implicit feedback), ``timestamp`` int64 [n] or None."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray | None
    timestamp: np.ndarray | None
    fmt: str


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the format from the file name, then from its first lines."""
    p = Path(path)
    name = p.name.lower()
    by_name = {"u.data": "ml-100k", "ratings.dat": "ml-1m", "ratings.csv": "ml-csv", "user_artists.dat": "lastfm"}
    if name in by_name:
        return by_name[name]
    if name.endswith(".parquet") or p.is_dir():
        return "parquet"
    with open(p, encoding="utf-8", errors="replace") as f:
        head = [line.rstrip("\n") for _, line in zip(range(200), f) if line.strip()]
    if not head:
        raise InputDataError(f"{str(p)!r} is empty")
    first = head[0].lower()
    if "::" in first:
        return "ml-1m"
    if "artistid" in first.replace("_", ""):
        return "lastfm"
    if any(ch.isalpha() for ch in first) and ("," in first or "\t" in first):
        return "ml-csv" if first.replace(" ", "").startswith("userid,movieid,rating") else "csv"
    tokens = [line.split() for line in head]
    if all(len(t) == 4 for t in tokens) and "\t" in head[0]:
        return "ml-100k"
    if all(t[0].isdigit() and int(t[0]) == len(t) - 1 for t in tokens):
        return "citeulike"
    if "," in head[0]:
        return "csv"
    return "sequence"


def _pick(columns: list[str], names: tuple[str, ...], what: str, required: bool) -> str | None:
    lower = {c.lower(): c for c in columns}
    for n in names:
        if n in lower:
            return lower[n]
    if required:
        raise InputDataError(f"no {what} column among {columns}; name it with columns={{'{what}': ...}}")
    return None


def _table(df: pd.DataFrame, fmt: str, columns: Mapping[str, str] | None) -> Interactions:
    cols = list(df.columns)
    columns = dict(columns or {})
    user = columns.get("user") or _pick(cols, _USER_NAMES, "user", True)
    item = columns.get("item") or _pick(cols, _ITEM_NAMES, "item", True)
    rating = columns.get("rating") or _pick(cols, _RATING_NAMES, "rating", False)
    ts = columns.get("timestamp") or _pick(cols, _TIME_NAMES, "timestamp", False)
    for c in (user, item, rating, ts):
        if c is not None and c not in df.columns:
            raise InputDataError(f"column {c!r} is not in the file (columns: {cols})")
    return Interactions(
        df[user].astype(str).to_numpy(object), df[item].astype(str).to_numpy(object),
        None if rating is None else pd.to_numeric(df[rating]).to_numpy(np.float64),
        None if ts is None else pd.to_numeric(df[ts], errors="coerce").fillna(0).to_numpy(np.int64),
        fmt,
    )


def _lists(path: Path, fmt: str) -> Interactions:
    users, items = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            tokens = line.split()
            if not tokens:
                continue
            if fmt == "citeulike":
                if int(tokens[0]) != len(tokens) - 1:
                    raise InputDataError(f"{str(path)!r} line {line_no + 1}: count {tokens[0]} != {len(tokens) - 1} items")
                user, its = str(line_no), tokens[1:]
            else:
                user, its = tokens[0], tokens[1:]
            users.extend([user] * len(its))
            items.extend(its)
    return Interactions(np.asarray(users, object), np.asarray(items, object), None, None, fmt)


def read_interactions(
    path: str | os.PathLike[str], fmt: str = "auto", *, columns: Mapping[str, str] | None = None
) -> Interactions:
    """Read ``path`` in format ``fmt`` (one of :data:`FORMATS` or ``"auto"``)."""
    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{str(p)!r} does not exist")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise InputDataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'")
    names = ["user", "item", "rating", "timestamp"]
    if fmt == "ml-100k":
        return _table(pd.read_csv(p, sep="\t", names=names, dtype=str), fmt, None)
    if fmt == "ml-1m":
        return _table(pd.read_csv(p, sep="::", names=names, engine="python", dtype=str), fmt, None)
    if fmt == "ml-csv":
        return _table(pd.read_csv(p, dtype=str), fmt, {"user": "userId", "item": "movieId", **(columns or {})})
    if fmt == "lastfm":
        df = pd.read_csv(p, sep="\t", dtype=str)
        return _table(df[["userID", "artistID"]], fmt, {"user": "userID", "item": "artistID"})
    if fmt in ("sequence", "citeulike"):
        return _lists(p, fmt)
    if fmt == "parquet":
        return _table(pd.read_parquet(p), fmt, columns)
    return _table(pd.read_csv(p, sep=None, engine="python", dtype=str), fmt, columns)


def build_snapshot(
    inter: Interactions,
    *,
    min_rating: float = 4.0,
    min_user_positives: int = 5,
    heldout_users: int | None = None,
    heldout_frac: float = 0.1,
    fold_in_fraction: float = 0.8,
    seed: int = 0,
    source: str = "memory",
    fold: tuple[int, int] | None = None,
) -> Snapshot:
    """Positives -> user filter -> seeded held-out users -> items of training users -> 80/20
    fold-in split; see the module docstring. ``heldout_users`` (per split) overrides
    ``heldout_frac`` (a fraction of the kept users, rounded, per split).

    ``fold=(f, K)``: the seeded permutation of the users is cut into K disjoint folds of
    near-equal size; fold f is the test users, fold f + 1 (mod K) the validation users and
    the other K - 2 folds the training users (``heldout_users`` and ``heldout_frac`` are then
    unused). Over f = 0..K-1 every user is a test user exactly once."""
    positive = np.ones(len(inter.user), bool) if inter.rating is None else inter.rating >= min_rating
    pairs = pd.DataFrame({"user": inter.user[positive], "item": inter.item[positive]}).drop_duplicates()
    counts = pairs.groupby("user")["item"].transform("size")
    pairs = pairs[counts >= min_user_positives]
    users = np.sort(pairs["user"].unique())  # sorted ids: the permutation alone decides the split
    n = len(users)
    rng = np.random.default_rng(seed)
    perm = users[rng.permutation(n)]
    role = pd.Series(0, index=perm)  # 0 train, 1 val, 2 test
    if fold is None:
        n_held = heldout_users if heldout_users is not None else int(round(heldout_frac * n))
        if n_held < 1 or n - 2 * n_held < 1:
            raise InputDataError(f"{n} users after filtering cannot give {n_held} validation and test users each")
        role.iloc[n - 2 * n_held : n - n_held] = 1
        role.iloc[n - n_held :] = 2
    else:
        f, k = fold
        if not (k >= 3 and 0 <= f < k and n >= 3 * k):
            raise InputDataError(f"fold {f} of {k} over {n} users: need 3 <= K <= users / 3 and 0 <= f < K")
        of = np.arange(n) * k // n  # the fold of each position in the permutation
        role.iloc[of == (f + 1) % k] = 1
        role.iloc[of == f] = 2
        n_held = int((of == f).sum())
    pairs = pairs.assign(role=role.loc[pairs["user"].to_numpy()].to_numpy())

    train_pairs = pairs[pairs["role"] == 0]
    pop = train_pairs["item"].value_counts()
    item_ids = np.asarray(sorted(pop.index, key=lambda i: (-pop[i], i)), object)  # popularity desc, then id
    item_idx = pd.Series(np.arange(len(item_ids)), index=item_ids)

    def csr_of(frame: pd.DataFrame, order: np.ndarray) -> CSR:
        row = pd.Series(np.arange(len(order)), index=order)
        return CSR.from_pairs(row.loc[frame["user"].to_numpy()].to_numpy(),
                              item_idx.loc[frame["item"].to_numpy()].to_numpy(), len(order), len(item_ids))

    train_users = perm[role.to_numpy() == 0]
    train = csr_of(train_pairs, train_users)
    splits = {}
    for code, name in ((1, "val"), (2, "test")):
        ids = perm[role.to_numpy() == code]
        part = pairs[(pairs["role"] == code) & pairs["item"].isin(item_idx.index)]
        full = csr_of(part, ids)
        fold_in, held = [], []
        for u in range(full.n_rows):
            row = full.row(u)
            k = int(np.floor((1 - fold_in_fraction) * len(row) + 1e-9)) if len(row) >= 5 else 0
            out = np.zeros(len(row), bool)
            out[rng.choice(len(row), size=k, replace=False)] = True
            fold_in.append(row[~out])
            held.append(row[out])
        splits[name] = Split(ids, CSR.from_lists(fold_in, len(item_ids)), CSR.from_lists(held, len(item_ids)))

    manifest = {
        "source": source, "format": inter.fmt,
        "protocol": {"min_rating": None if inter.rating is None else min_rating,
                     "min_user_positives": min_user_positives, "heldout_users": n_held,
                     "fold_in_fraction": fold_in_fraction, "seed": seed,
                     **({"fold": list(fold)} if fold is not None else {})},
        "counts": {"users": n, "items": len(item_ids), "train_users": train.n_rows, "train_nnz": train.nnz,
                   **{f"{s}_users": splits[s].n_users for s in splits},
                   **{f"{s}_fold_in_nnz": splits[s].fold_in.nnz for s in splits},
                   **{f"{s}_held_out_nnz": splits[s].held_out.nnz for s in splits}},
    }
    return Snapshot(
        uri=source, manifest=manifest, item_ids=item_ids,
        item_popularity=np.bincount(train.indices, minlength=len(item_ids)).astype(np.int64),
        train=train, train_user_ids=train_users, val=splits["val"], test=splits["test"],
    )


def load_dataset(
    path: str | os.PathLike[str], fmt: str = "auto", *, columns: Mapping[str, str] | None = None, **split
) -> Snapshot:
    """:func:`read_interactions` then :func:`build_snapshot` (keyword arguments go there)."""
    inter = read_interactions(path, fmt, columns=columns)
    return build_snapshot(inter, source=str(path), **split)
