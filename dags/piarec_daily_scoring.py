"""piarec_daily_scoring: day D's events -> score every active user with ``champion``
(or with the arms asked for) -> check the committed day.

With ``challenger_arm`` the scoring job splits users between the two models by a salted
hash of user_id (``--challenger``, ``challenger_share`` of the users; the job's A/B
mode) and commits ``arm=champion`` and ``arm=challenger`` together. With ``arms``
(``NAME=MODEL:SHARE,...``, e.g. ``champion=models:/piarec@champion:0.9,control=popularity:0.1``)
any number of arms, registered models or baselines (``popularity``, ``ease``), are scored
in the same pass and committed together; it replaces ``challenger_arm``.

Partition: the run with logical date D commits ``recommendations/dt=D/`` (every arm, one
commit; the job validates the day before it commits) from events before D+1 00:00 UTC.
Scheduled daily (CronDataIntervalTimetable): the run of day D starts after D ends, at D+1
03:00 UTC; no catch-up (a first deploy must not re-score every past day with today's champion): ``airflow backfill create`` scores missed days, each
into its own partition. ``@champion`` is resolved when the scoring task runs, so a
person moving the alias in the MLflow UI is honoured by the next run. Once the day is
checked, ``announce_recommendations`` updates the asset ``piarec_recommendations`` (extra
``date``, ``arms``): downstream DAGs (serving load, A/B analysis) schedule on it.

Params: ``date`` (YYYY-MM-DD, overrides the logical date), ``model_version`` (score a
fixed version instead of the champion), ``k`` (recommendations per user; default the
config's ``scoring.k``), ``challenger_arm`` (A/B: also score ``@challenger`` as
arm=challenger), ``challenger_share`` (its share of users; default the config's), ``arms``
(the arms and their shares; default the config's ``scoring.arms``, else the two above).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param

from piarec_dag_support import (DEFAULT_ARGS, RECOMMENDATIONS, REGISTERED_MODEL, BashOperator, announce, arm_names,
                                events_sensor, ops, run_day, schedule, spark_submit)

# The scoring day: the `date` param, else the logical date; a run triggered without one
# (Airflow 3: manual and API runs may have none, and then `ds` is absent) scores the last
# complete day, the one before the run's `run_after`.
DAY = run_day("params.date", days_back=1)
K_ARG = "{{ '--k=%d' % params.k if params.k else '' }}"
# Optional arguments render to "" when their param is unset and are then dropped.
MODEL_ARG = f"{{{{ '--model=models:/{REGISTERED_MODEL}/%s' % params.model_version if params.model_version else '' }}}}"
CHALLENGER_ARGS = (
    f"{{{{ '--challenger=models:/{REGISTERED_MODEL}@challenger' if params.challenger_arm else '' }}}}",
    "{{ '--challenger-share=%s' % params.challenger_share if params.challenger_arm and params.challenger_share else '' }}",
)
ARMS_ARG = "{{ '--arms=%s' % params.arms if params.arms else '' }}"


def without_arms(*args: str) -> list[str]:
    """``args`` rendered only when the ``arms`` param is unset: it replaces them (the job
    refuses both at once)."""
    return [f"{{% if not params.arms %}}{a}{{% endif %}}" for a in args]



ARMS = "{{ arm_names(params.arms, params.challenger_arm) }}"  # the arms the day must hold

with DAG(
    dag_id="piarec_daily_scoring",
    description="day D's events -> score champion (+ challenger), validated and committed -> check",
    schedule=schedule(CronDataIntervalTimetable("0 3 * * *", timezone="UTC")),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    # Off: on first deploy (or after a pause) the scheduler would score every past day since
    # start_date with today's champion. Missed days are scored on purpose with
    # `airflow backfill create --dag-id piarec_daily_scoring --from-date ... --to-date ...`.
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "date": Param(None, type=["null", "string"], format="date",
                      description="scoring day D, default: the logical date"),
        "model_version": Param(None, type=["null", "integer"], minimum=1,
                               description="score this registered version instead of @champion"),
        "k": Param(None, type=["null", "integer"], minimum=1, description="recommendations per user"),
        "challenger_arm": Param(False, type="boolean", description="A/B: also score @challenger as arm=challenger"),
        "challenger_share": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                                  description="share of users in the challenger arm"),
        "arms": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9_-]+=[^,]+:[0-9.eE+-]+(,[A-Za-z0-9_-]+=[^,]+:[0-9.eE+-]+)*$",
                      description="NAME=MODEL:SHARE,... (models:/piarec@champion, popularity, ease); "
                                  "replaces challenger_arm"),
    },
    user_defined_macros={"arm_names": arm_names},
    tags=["piarec"],
    doc_md=__doc__,
) as dag:
    wait_for_events = events_sensor(f"events-ready --day {DAY}", timedelta(minutes=10))
    score = spark_submit(
        "score_users", "score_users", [f"--date={DAY}", ARMS_ARG, *without_arms("--arm=champion", MODEL_ARG), K_ARG,
                                     *without_arms(*CHALLENGER_ARGS)],
        execution_timeout=timedelta(hours=4),
    )
    validate = BashOperator(
        task_id="validate_output",
        bash_command=ops(f"validate --date {DAY} --arms {ARMS} --k '{{{{ params.k or '' }}}}'"),
        execution_timeout=timedelta(minutes=30),
    )

    announce_day = announce("announce_recommendations", RECOMMENDATIONS, date=DAY, arms=ARMS)

    wait_for_events >> score >> validate >> announce_day
