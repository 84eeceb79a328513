"""A tiny publisher for the commit tests: one real process writes a two-arm recommendations
day through :class:`piarec.data.commit.PartitionCommit` and the engines' part writer.

    python tests/commit_driver.py URI TAG [ROWS]

Every row of the run carries TAG (its ``model_version``), so a reader can tell runs apart.
``PIAREC_FAULT_AT=<step>`` kills it at that step; a refused or failed run prints one
``error:`` line and exits 2. ``DRIVER_START_AT`` (epoch seconds) holds it until then, so that
two processes race.
"""

from __future__ import annotations

import sys

import pyarrow as pa

from piarec.daily.publish import PartWriter
from piarec.data.commit import PartitionCommit
from piarec.errors import PiarecError
from piarec.scoring.arrow import OUTPUT_SCHEMA, WRITE_SCHEMA

ARMS = ("champion", "challenger")


def rows(tag: str, arm: str, n: int) -> pa.RecordBatch:
    users = [f"{arm[:2]}{u:05d}" for u in range(n)]
    return pa.RecordBatch.from_pydict({
        "user_id": users, "item_ids": [["t1", "t2"]] * n, "scores": [[2.0, 1.0]] * n,
        "model_version": [tag] * n, "source": ["model"] * n}, schema=OUTPUT_SCHEMA).cast(WRITE_SCHEMA)


def publish(uri: str, tag: str, n: int = 2000, **commit) -> None:
    with PartitionCommit(uri, what="recommendations day", **commit) as run:
        for arm in ARMS:
            writer = PartWriter(run.loc.child("_versions", run.version, f"arm={arm}"), "t", rows_per_file=n // 4)
            batch = rows(tag, arm, n)
            for start in range(0, n, n // 8):
                writer.write(batch.slice(start, n // 8))
            writer.close()
        run.commit({"tag": tag, "arms": {a: {"counts": {"users": n}} for a in ARMS}})


if __name__ == "__main__":
    import os
    import time

    grace = float(os.environ.get("DRIVER_GRACE_S", "0"))
    start_at = float(os.environ.get("DRIVER_START_AT", "0"))  # a barrier: racing runs start together
    time.sleep(max(0.0, start_at - time.time()))
    try:
        publish(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]), grace_s=grace)
    except PiarecError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
