"""piarec_weekly_training: the window's events -> snapshot (Spark) -> train, evaluate and
register as ``challenger`` -> promotion gate -> ``champion`` (or a refusal report).

Partition: the run with logical date E builds the snapshot ``window_end=E`` (events of
``[E - window_days, E)``, UTC) -- a pure function of the logical date, so reruns, catch-up
and ``airflow backfill`` rebuild exactly their own week. Scheduled Mondays 04:00 UTC
(CronTriggerTimetable: the logical date is the trigger time, the window ends that day).

Params for ad-hoc runs: ``window_end`` (YYYY-MM-DD, overrides the logical date);
``tuned_config`` (default ``$PIAREC_TUNED_CONFIG``): the URI of a configuration written by
``piarec tune``, whose model / pia / training keys the training then uses.
A refused challenger leaves the gate task *skipped* with the report in its log and in
MLflow (run "gate vN"); ``champion`` stays where it was.

Assets: ``announce_snapshot`` updates ``piarec_snapshots`` (extra ``window_end``, ``uri``) once
the snapshot is committed; ``announce_model`` updates ``piarec_models`` (extra
``window_end``) once a version is registered as ``@challenger``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from piarec_dag_support import (DEFAULT_ARGS, MODELS, PIAREC, REFUSED, SKIP, SNAPSHOTS, BashOperator, announce,
                                events_sensor, ops, run_day, schedule, spark_submit, trainer)

# The window end: the `window_end` param, else the logical date, else (a run triggered
# without one) the day of the run's `run_after`.
WINDOW_END = run_day("params.window_end", days_back=0)
# `--tuned-config URI` when the run has one (the param's pattern keeps it a single shell word).
TUNED = "{% if params.tuned_config %} --tuned-config {{ params.tuned_config }}{% endif %}"

with DAG(
    dag_id="piarec_weekly_training",
    description="events -> snapshot -> train + register challenger -> gate -> champion",
    schedule=schedule(CronTriggerTimetable("0 4 * * 1", timezone="UTC")),
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,  # only the newest model matters; `airflow backfill create` rebuilds old weeks
    max_active_runs=1,  # the challenger alias is shared: one training at a time
    default_args=DEFAULT_ARGS,
    params={"window_end": Param(None, type=["null", "string"], format="date",
                                description="snapshot window end (exclusive), default: the logical date"),
            "tuned_config": Param(os.environ.get("PIAREC_TUNED_CONFIG") or None, type=["null", "string"],
                                  pattern=r"^[A-Za-z0-9_./:=+-]*$",
                                  description="a `piarec tune` best_config.yaml (an absolute path or s3:// URI); "
                                              "empty = the pipeline config as it is")},
    tags=["piarec"],
    doc_md=__doc__,
) as dag:
    wait_for_events = events_sensor(f"events-ready --window-end {WINDOW_END}", timedelta(minutes=15))
    build_snapshot = spark_submit(
        "build_snapshot", "build_matrix", [f"--window-end={WINDOW_END}"],
        execution_timeout=timedelta(hours=3),
    )
    locate_snapshot = BashOperator(  # its last output line (the URI) goes to XCom
        task_id="locate_snapshot",
        bash_command=ops(f"snapshot-uri --window-end {WINDOW_END} --require-published"),
        execution_timeout=timedelta(minutes=10),
    )
    train = trainer(
        "train_and_register",
        "train --snapshot {{ ti.xcom_pull(task_ids='locate_snapshot') }}" + TUNED,
        execution_timeout=timedelta(hours=8),
    )
    gate = BashOperator(
        task_id="promotion_gate",
        # A refusal (exit 1 of --strict) is a decision, not a failure: skip, no retries.
        bash_command=f"{PIAREC} promote --strict; rc=$?; "
        f"if [ $rc -eq {REFUSED} ]; then echo 'challenger refused; champion unchanged'; exit {SKIP}; fi; exit $rc",
        skip_on_exit_code=SKIP,
        execution_timeout=timedelta(minutes=30),
    )

    announce_snapshot = announce("announce_snapshot", SNAPSHOTS, window_end=WINDOW_END,
                                 uri="{{ ti.xcom_pull(task_ids='locate_snapshot') }}")
    announce_model = announce("announce_model", MODELS, window_end=WINDOW_END)

    wait_for_events >> build_snapshot >> locate_snapshot >> train >> gate
    locate_snapshot >> announce_snapshot
    train >> announce_model
