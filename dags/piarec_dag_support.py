"""Settings and task factories shared by the piarec DAGs (light: stdlib + Airflow only).

Airflow runs in its own environment and never imports piarec. Work happens in the
project environment, located by these settings (environment variables of the Airflow
scheduler and workers, read when a DAG file is parsed -- cheap, no I/O):

=========================  ===============================================================
PIAREC_HOME                the piarec checkout / install holding ``pipelines/``
                           (default: the folder above this file)
PIAREC_VENV                the project virtualenv (default: ``$PIAREC_HOME/.venv``)
PIAREC_SPARK_SUBMIT        spark-submit of the Spark environment (default: the project
                           venv's; the provider refuses a path in the connection's
                           ``spark-binary`` extra, so it is passed to the operator)
PIAREC_SPARK_PYTHON        Python of the Spark executors (default: the project venv's
                           python); on a cluster, the executors' own (the Spark image's)
PIAREC_SPARK_DRIVER_PYTHON Python of the Spark driver, where spark-submit runs
                           (default: ``PIAREC_SPARK_PYTHON``)
PIAREC_PY_FILES            the code zip for ``--py-files`` (``piarec package``; default
                           none: the driver's ``get_spark`` ships its own code)
PIAREC_SPARK_CONN_ID       Airflow connection of the Spark master (default ``piarec_spark``;
                           ``local[*]`` by default, ``spark://host:7077`` on a cluster)
PIAREC_REGISTERED_MODEL    MLflow registered model name (default ``piarec``)
PIAREC_TRAINER             ``local`` (default) or ``kubernetes`` (a GPU pod)
PIAREC_TRAINER_IMAGE       trainer image for ``kubernetes``
PIAREC_TRAINER_PROCS       training processes (default 1): N > 1 trains data-parallel under
                           torchrun (``piarec train --nproc-per-node N``); on ``kubernetes``
                           the pod asks for N GPUs, one per process
PIAREC_TUNED_CONFIG        the weekly DAG's default ``tuned_config``: a ``piarec tune``
                           best_config.yaml the training applies (default none)
PIAREC_K8S_NAMESPACE       namespace of the trainer pod (default ``piarec``)
PIAREC_K8S_CONFIGMAP       ConfigMap with the pipeline YAML, mounted at /etc/piarec
PIAREC_DAG_RETRIES         task retries, exponential back-off from 5 minutes (default 2)
PIAREC_POKE_INTERVAL_S     seconds between sensor pokes (default: each DAG's own, 10-15 min)
PIAREC_SCHEDULES           ``on`` (default) or ``off``: the weekly and daily DAGs run only
                           when triggered (a staging stack, a test)
=========================  ===============================================================

Assets: the weekly DAG updates :data:`SNAPSHOTS` (a window's snapshot committed) and
:data:`MODELS` (a version registered as ``@challenger``), the daily DAG
:data:`RECOMMENDATIONS` (a day committed and checked); each event's ``extra`` names the
partition (``window_end`` / ``date``), so a downstream DAG scheduled on the asset knows what
to read (:func:`asset_extra`).

The pipeline configuration itself (storage root, MLflow URI, ...) reaches every task
through the workers' ``PIAREC_CONFIG`` / ``PIAREC__*`` variables, as for the CLI.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.bash import BashSensor
from airflow.sdk import Asset

PIAREC_HOME = os.environ.get("PIAREC_HOME") or str(Path(__file__).resolve().parents[1])
PIAREC_VENV = os.environ.get("PIAREC_VENV") or os.path.join(PIAREC_HOME, ".venv")
PYTHON = os.path.join(PIAREC_VENV, "bin", "python")
PIAREC = os.path.join(PIAREC_VENV, "bin", "piarec")
SPARK_SUBMIT = os.environ.get("PIAREC_SPARK_SUBMIT") or os.path.join(PIAREC_VENV, "bin", "spark-submit")
SPARK_PYTHON = os.environ.get("PIAREC_SPARK_PYTHON") or PYTHON
SPARK_DRIVER_PYTHON = os.environ.get("PIAREC_SPARK_DRIVER_PYTHON") or SPARK_PYTHON
PY_FILES = os.environ.get("PIAREC_PY_FILES") or None
POKE_INTERVAL_S = os.environ.get("PIAREC_POKE_INTERVAL_S")
SCHEDULES = os.environ.get("PIAREC_SCHEDULES", "on")
if SCHEDULES not in ("on", "off"):
    raise ValueError(f"PIAREC_SCHEDULES must be 'on' or 'off', got {SCHEDULES!r}")
SPARK_CONN_ID = os.environ.get("PIAREC_SPARK_CONN_ID", "piarec_spark")
REGISTERED_MODEL = os.environ.get("PIAREC_REGISTERED_MODEL", "piarec")
TRAINER = os.environ.get("PIAREC_TRAINER", "local")
TRAINER_PROCS = int(os.environ.get("PIAREC_TRAINER_PROCS", "1"))
if TRAINER_PROCS < 1:
    raise ValueError(f"PIAREC_TRAINER_PROCS must be a positive number of processes, got {TRAINER_PROCS}")
PIPELINES = os.path.join(PIAREC_HOME, "pipelines")

SNAPSHOTS = Asset(name="piarec_snapshots", uri="piarec://snapshots")
MODELS = Asset(name="piarec_models", uri="piarec://models")
RECOMMENDATIONS = Asset(name="piarec_recommendations", uri="piarec://recommendations")

# Exit codes of the project commands (``piarec ...``, ``piarec ops ...``).
NOT_READY = 1  # events-ready: poke again
REFUSED = 1  # piarec promote --strict: the gate refused the challenger
SKIP = 99  # BashOperator: leave the task skipped

DEFAULT_ARGS = {
    "owner": "piarec",
    "retries": int(os.environ.get("PIAREC_DAG_RETRIES", "2")),
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(hours=1),
}


def run_day(param: str, days_back: int) -> str:
    """A template for the day a run works on: ``param`` when given, else the run's logical
    date (``ds``), else -- a run triggered without a logical date, where Airflow 3 leaves
    ``ds`` out of the context -- the day of its ``run_after`` minus ``days_back``."""
    fallback = "dag_run.run_after | ds" if days_back == 0 else f"macros.ds_add(dag_run.run_after | ds, -{days_back})"
    return f"{{{{ {param} or (ds if ds is defined else {fallback}) }}}}"


def arm_names(arms: str | None, challenger: bool = False) -> str:
    """The arm names of the daily DAG's ``arms`` param (``NAME=MODEL:SHARE,...``), comma
    separated; without it, ``champion`` (and ``challenger`` with ``challenger``)."""
    if arms:
        return ",".join(e.split("=", 1)[0].strip() for e in arms.split(",") if e.strip())
    return "champion,challenger" if challenger else "champion"


def schedule(timetable):
    """``timetable``, or None (triggered runs only) when ``PIAREC_SCHEDULES=off``."""
    return timetable if SCHEDULES == "on" else None


def ops(command: str) -> str:
    """A bash command running ``piarec ops <command>`` in the project venv."""
    return f"{PIAREC} ops {command}"


def events_sensor(ops_args: str, poke_every: timedelta) -> BashSensor:
    """``wait_for_events``: pokes ``piarec ops <ops_args>`` (exit 1 = not ready yet) in
    reschedule mode, so a waiting DAG run holds no worker slot; gives up after 12 hours."""
    return BashSensor(
        task_id="wait_for_events",
        bash_command=ops(ops_args),
        retry_exit_code=NOT_READY,
        mode="reschedule",
        poke_interval=float(POKE_INTERVAL_S) if POKE_INTERVAL_S else poke_every.total_seconds(),
        timeout=timedelta(hours=12).total_seconds(),
    )


def spark_conf() -> dict[str, str]:
    """Driver and executors run Python of the Spark environment, each its own, never Airflow's."""
    return {"spark.pyspark.python": SPARK_PYTHON, "spark.pyspark.driver.python": SPARK_DRIVER_PYTHON}


class PiarecSparkSubmitOperator(SparkSubmitOperator):
    """SparkSubmitOperator that drops application arguments rendered empty."""

    def execute(self, context):
        self.application_args = [a for a in (self.application_args or []) if str(a).strip()]
        return super().execute(context)


def spark_submit(task_id: str, job: str, args: list[str], **kwargs):
    """``spark-submit pipelines/<job>.py <args>`` on the configured connection.

    Arguments that render to an empty string are dropped, so an optional DAG param can
    be written as ``"{{ '--k=%d' % params.k if params.k else '' }}"``.
    """
    return PiarecSparkSubmitOperator(
        task_id=task_id,
        application=os.path.join(PIPELINES, f"{job}.py"),
        application_args=args,
        conn_id=SPARK_CONN_ID,
        spark_binary=SPARK_SUBMIT,
        conf=spark_conf(),
        py_files=PY_FILES,
        # pip-installed spark-submit finds SPARK_HOME with the driver's Python (not Airflow's).
        env_vars={"PYSPARK_PYTHON": SPARK_PYTHON, "PYSPARK_DRIVER_PYTHON": SPARK_DRIVER_PYTHON},
        name=f"piarec-{job}",
        **kwargs,
    )


def _announce(outlet_events, name: str, uri: str, extra: dict[str, str]) -> None:
    outlet_events[Asset(name=name, uri=uri)].extra = extra


def announce(task_id: str, asset: Asset, **extra: str) -> PythonOperator:
    """A task that updates ``asset`` with ``extra`` (templates, rendered per run) as the
    event's extra: which partition is new. Stdlib only: Airflow never imports piarec."""
    return PythonOperator(
        task_id=task_id,
        python_callable=_announce,
        op_kwargs={"name": asset.name, "uri": asset.uri, "extra": extra},
        outlets=[asset],
        execution_timeout=timedelta(minutes=5),
    )


def asset_extra(triggering_asset_events, asset: Asset, key: str) -> str:
    """``extra[key]`` of the newest event of ``asset`` that triggered this run (a macro:
    ``{{ asset_extra(triggering_asset_events, RECOMMENDATIONS, 'date') }}``)."""
    events = triggering_asset_events[asset]
    if not events:
        raise ValueError(f"this run was not triggered by {asset.name}")
    return str(events[-1].extra[key])


def trainer(task_id: str, command: str, **kwargs):
    """The training task: a bash task in the project venv (``local``), or a GPU pod
    (``kubernetes``; the cncf provider is imported only then); on ``PIAREC_TRAINER_PROCS``
    processes (GPUs in the pod)."""
    if TRAINER_PROCS > 1:
        command = f"{command} --nproc-per-node {TRAINER_PROCS}"
    if TRAINER == "local":
        return BashOperator(task_id=task_id, bash_command=f"{PIAREC} {command}", **kwargs)
    if TRAINER != "kubernetes":
        raise ValueError(f"PIAREC_TRAINER must be 'local' or 'kubernetes', got {TRAINER!r}")
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    configmap = os.environ.get("PIAREC_K8S_CONFIGMAP", "piarec-config")
    return KubernetesPodOperator(
        task_id=task_id,
        name="piarec-train",
        namespace=os.environ.get("PIAREC_K8S_NAMESPACE", "piarec"),
        image=os.environ["PIAREC_TRAINER_IMAGE"],
        cmds=["bash", "-c"],
        arguments=[f"piarec {command}"],
        env_vars={"PIAREC_CONFIG": "/etc/piarec/pipeline.yaml"},
        volumes=[k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=configmap))],
        volume_mounts=[k8s.V1VolumeMount(name="config", mount_path="/etc/piarec", read_only=True)],
        container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(TRAINER_PROCS)}),
        get_logs=True,
        on_finish_action="delete_pod",
        **kwargs,
    )
