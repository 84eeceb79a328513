"""piarec_recommendations_files: a downstream DAG, scheduled on the ``piarec_recommendations``
asset -- the pattern for the serving load and the A/B analysis.

It runs once per day the daily DAG commits and checks, reads that day from the asset event's
``extra`` and lists the day's committed files (``piarec ops files``: exactly the files the
commit pointer lists, the reader contract of docs/architecture.md). A loader replaces
this task with its own, reading the same list.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from piarec_dag_support import DEFAULT_ARGS, RECOMMENDATIONS, BashOperator, asset_extra, ops

DAY = "{{ asset_extra(triggering_asset_events, RECOMMENDATIONS, 'date') }}"

with DAG(
    dag_id="piarec_recommendations_files",
    description="on each committed recommendations day: list its committed files",
    schedule=[RECOMMENDATIONS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    user_defined_macros={"asset_extra": asset_extra, "RECOMMENDATIONS": RECOMMENDATIONS},
    tags=["piarec"],
    doc_md=__doc__,
) as dag:
    BashOperator(
        task_id="list_committed_files",
        bash_command=ops(f"files --date {DAY}"),
        execution_timeout=timedelta(minutes=10),
    )
