"""``piarec stack``: the production topology as real processes on 127.0.0.1 -- a Spark
standalone cluster (a master, two workers) whose executors' Python does not have piarec, an
MLflow tracking server with artifacts on the loopback S3 server, and Airflow 3 (api-server,
scheduler, dag-processor). The pipeline runs against it twice over:

- from the command line (``piarec build-matrix|train|score`` with ``stack.env``): in-process
  Spark sessions on the cluster, which ship their own code to the executors;
- through the scheduler: the weekly DAG, then the daily DAG triggered over Airflow's REST
  API without a logical date, a person moving ``@champion`` over MLflow's REST API, the
  downstream DAG scheduled on the recommendations asset, and an ad-hoc ``spark-submit`` from
  the checkout with ``--py-files``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from piarec import stack
from piarec.data import reader

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = Path(os.environ.get("PIAREC_AIRFLOW_VENV", REPO / ".venv-airflow"))
WEEK = "2026-04-06"  # the 90-day window [2026-01-06, 2026-04-06) lies inside the events
# What the DAGs' tasks see: no schedules (only triggered runs), quick pokes, no retries, a
# short training, small shuffles.
TEST_ENV = {"PIAREC_SCHEDULES": "off", "PIAREC_POKE_INTERVAL_S": "3", "PIAREC_DAG_RETRIES": "0",
            "PIAREC__TRAINING__EPOCHS": "3", "PIAREC__SPARK__SHUFFLE_PARTITIONS": "4"}
DAGS = ("piarec_weekly_training", "piarec_daily_scoring", "piarec_recommendations_files")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    if not (AIRFLOW_VENV / "bin" / "airflow").exists():
        pytest.fail(f"{AIRFLOW_VENV} is missing: build the Airflow environment with `make airflow-env`")
    where = tmp_path_factory.mktemp("stack")
    started = time.monotonic()
    state = stack.up(str(where / "stack"), env=TEST_ENV)
    print(f"stack up in {time.monotonic() - started:.0f} s")
    try:
        piarec(state, "generate-events", "--out", str(data_root(state) / "events"), "--users", "3000",
               "--items", "300", "--days", "100", "--seed", "0", "--start", "2026-01-01")
        yield state
    finally:
        stack.down(str(where / "stack"))
    assert not any(stack._alive(p["pid"]) for p in state["processes"])  # everything stopped
    assert not list((where / "stack" / stack.PIDS).glob("*.pid"))


def client_env(state) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAREC", "AWS_", "MLFLOW_"))}
    for line in Path(state["dir"], "stack.env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def piarec(state, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "piarec", *argv], cwd=REPO, env={**client_env(state), **TEST_ENV},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def data_root(state) -> Path:
    return Path(yaml.safe_load(Path(state["config"]).read_text())["storage"]["root"])


def http(url: str, method: str = "GET", body: dict | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def spark_apps(state) -> list[str]:
    """Names of the applications the standalone master has run."""
    return [a["name"] for a in http(f"http://127.0.0.1:{state['ports']['spark_ui']}/json/")["completedapps"]]


@pytest.fixture
def on_stack_s3(state_env, monkeypatch):
    for key, value in state_env.items():
        if key.startswith("AWS"):
            monkeypatch.setenv(key, value)


@pytest.fixture
def state_env(running):
    return client_env(running)


def test_the_pipeline_runs_on_the_cluster_against_the_servers(running, on_stack_s3):
    state = running
    assert stack.status(state["dir"])["running"]
    pids = {p.stem: int(p.read_text()) for p in Path(state["dir"], stack.PIDS).glob("*.pid")}
    assert pids == {p["name"]: p["pid"] for p in state["processes"]}
    assert {"s3", "mlflow", "spark-master", "spark-worker-0", "spark-worker-1", "airflow-api-server",
            "airflow-scheduler", "airflow-dag-processor"} == set(pids)
    cfg = yaml.safe_load(Path(state["config"]).read_text())
    assert cfg["spark"]["master"] == state["master"] and cfg["mlflow"]["tracking_uri"] == state["tracking_uri"]
    # The executors' Python has the libraries but not piarec: the code must travel.
    probe = subprocess.run([state["executor_python"], "-c", "import torch, pyarrow, pyspark; import piarec"],
                           capture_output=True, text=True, cwd="/")
    assert probe.returncode != 0 and "No module named 'piarec'" in probe.stderr, probe.stderr
    apps = len(spark_apps(state))
    piarec(state, "build-matrix", "--window-end", "2026-04-01")
    snapshot = data_root(state) / "snapshots" / "window_end=2026-04-01"
    out = piarec(state, "train", "--snapshot", str(snapshot), "--epochs", "2").stdout
    trained, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])  # MLflow prints its run links first
    scored = piarec(state, "score", "--date", "2026-03-31", "--model", f"models:/piarec/{trained['version']}")
    assert "score_users 2026-03-31 arm=champion" in scored.stdout
    assert len(spark_apps(state)) == apps + 2  # the build and the scoring ran on the cluster, as applications
    # Recommendations are committed on the loopback S3 server (written task-side by pyarrow).
    table = reader.read_arm("s3://piarec/recommendations/dt=2026-03-31", "champion")
    assert table.num_rows > 2000 and set(table.column("model_version").to_pylist()) == {trained["version"]}
    # The model's artifacts went through the server to the loopback S3 server.
    import boto3

    s3 = boto3.client("s3", endpoint_url=state["s3_endpoint"], aws_access_key_id=stack.AWS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.AWS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.BUCKET, Prefix="mlartifacts/").get("Contents", [])]
    assert any(k.endswith("weights.pt") for k in keys), keys[:20]


# --------------------------------------------------------------------------- under the scheduler
def airflow(state, path: str, method: str = "GET", body: dict | None = None) -> dict:
    return http(f"{state['airflow_api']}/api/v2/{path}", method, body)


def trigger(state, dag_id: str, conf: dict) -> dict:
    """A run with no logical date (Airflow 3's manual and API runs may have none)."""
    return airflow(state, f"dags/{dag_id}/dagRuns", "POST", {"logical_date": None, "conf": conf})


def wait_for(state, dag_id: str, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = airflow(state, f"dags/{dag_id}/dagRuns/{urllib.request.quote(run_id)}")
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            break
        time.sleep(2)
    tasks = airflow(state, f"dags/{dag_id}/dagRuns/{urllib.request.quote(run_id)}/taskInstances")["task_instances"]
    states = {t["task_id"]: t["state"] for t in tasks}
    assert run["state"] == "success", f"{dag_id} {run_id}: {run['state']} {states}; logs under {state['dir']}/airflow/logs"
    return {**run, "tasks": states}


def aliases(state) -> dict[str, str]:
    """The registered model's aliases, read over the tracking server's REST API."""
    model = http(f"{state['tracking_uri']}/api/2.0/mlflow/registered-models/get?name=piarec")["registered_model"]
    return {a["alias"]: a["version"] for a in model.get("aliases", [])}


def versions(state) -> list[str]:
    found = http(f"{state['tracking_uri']}/api/2.0/mlflow/model-versions/search?filter=name%3D%27piarec%27")
    return sorted((v["version"] for v in found.get("model_versions", [])), key=int)


def models_in(day: str) -> set[str]:
    return set(reader.read_arm(f"s3://piarec/recommendations/dt={day}", "champion").column("model_version").to_pylist())


def test_the_dags_run_under_the_scheduler(running, on_stack_s3, state_env):
    state = running
    started = time.monotonic()
    assert {d["dag_id"] for d in airflow(state, "dags")["dags"]} >= set(DAGS)
    assert airflow(state, "importErrors")["total_entries"] == 0
    for dag_id in DAGS:
        airflow(state, f"dags/{dag_id}", "PATCH", {"is_paused": False})
    apps = spark_apps(state)
    before = versions(state)

    weekly = wait_for(state, "piarec_weekly_training",
                      trigger(state, "piarec_weekly_training", {"window_end": WEEK})["dag_run_id"])
    assert weekly["logical_date"] is None and weekly["tasks"]["promotion_gate"] == "success"
    assert reader.open_committed(str(data_root(state) / "snapshots" / f"window_end={WEEK}")) is not None
    new = [v for v in versions(state) if v not in before]
    assert len(new) == 1
    assert aliases(state)["challenger"] == new[0]
    champion = aliases(state)["champion"]  # the gate promoted the new version, or kept a better one

    daily = wait_for(state, "piarec_daily_scoring", trigger(state, "piarec_daily_scoring", {"date": "2026-04-09"})["dag_run_id"])
    assert daily["logical_date"] is None and set(daily["tasks"].values()) == {"success"}
    assert models_in("2026-04-09") == {champion}

    # The downstream DAG ran on the daily run's asset event, for that day.
    deadline = time.monotonic() + 180
    while not (runs := [r for r in airflow(state, "dags/piarec_recommendations_files/dagRuns")["dag_runs"]
                        if r["run_type"] == "asset_triggered"]) and time.monotonic() < deadline:
        time.sleep(2)
    assert runs, "the asset-scheduled DAG never ran"
    run_path = f"dags/piarec_recommendations_files/dagRuns/{urllib.request.quote(runs[0]['dag_run_id'])}"
    wait_for(state, "piarec_recommendations_files", runs[0]["dag_run_id"], timeout=180)
    (event,) = airflow(state, f"{run_path}/upstreamAssetEvents")["asset_events"]
    assert (event["name"], event["source_run_id"], event["extra"]) == (
        "piarec_recommendations", daily["dag_run_id"], {"date": "2026-04-09", "arms": "champion"})
    listed = airflow(state, f"{run_path}/taskInstances/list_committed_files/xcomEntries/return_value")["value"]
    assert listed == reader.uris("s3://piarec/recommendations/dt=2026-04-09")[-1]  # the last line it printed

    # A person moves @champion to another version over MLflow's REST API; the next run scores with it.
    other = next(v for v in reversed(versions(state)) if v != champion)
    http(f"{state['tracking_uri']}/api/2.0/mlflow/registered-models/alias", "POST",
         {"name": "piarec", "alias": "champion", "version": other})
    assert aliases(state)["champion"] == other
    wait_for(state, "piarec_daily_scoring", trigger(state, "piarec_daily_scoring", {"date": "2026-04-10"})["dag_run_id"])
    assert models_in("2026-04-10") == {other}

    # Every Spark task ran on the standalone master, as an application of its own.
    ran = spark_apps(state)[len(apps):]
    assert sorted(ran) == ["piarec-build_matrix", "piarec-score_users", "piarec-score_users"], ran
    print(f"weekly + daily x2 + downstream under the scheduler: {time.monotonic() - started:.0f} s")


def test_an_ad_hoc_spark_submit_from_the_checkout(running, on_stack_s3, state_env):
    """The documented rerun: the checkout's job file, the code zip on --py-files, and a driver
    Python without piarec (the executors' own)."""
    state = running
    done = subprocess.run(
        [str(Path(sys.executable).with_name("spark-submit")), "--master", state["master"],
         "--py-files", state["code_zip"], "pipelines/score_users.py", "--date", "2026-04-11",
         "--model", "models:/piarec/1"],
        cwd=REPO, env={**state_env, "PYSPARK_PYTHON": state["executor_python"]}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "score_users 2026-04-11 arm=champion" in done.stdout
    assert models_in("2026-04-11") == {"1"}


def test_a_second_stack_in_the_same_folder_is_refused(running):
    with pytest.raises(stack.PiarecError, match="already running"):
        stack.up(running["dir"])
