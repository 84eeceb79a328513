"""The production topology on one machine, as real processes: ``piarec stack up|down|status``.

    piarec stack up [--dir piarec-stack] [--workers 2] [--no-airflow]   (make stack)
    piarec stack down [--dir piarec-stack]                               (make stack-down)

``up`` starts, every one bound to 127.0.0.1 and on free ports:

- a Spark standalone cluster from the pyspark distribution: a master and ``--workers``
  workers (1 core, 2 GB each; ``spark-class org.apache.spark.deploy.master.Master`` /
  ``...worker.Worker``). Their executors run a Python that has the third-party libraries
  but **not** piarec (``<dir>/executor-python``: a bare virtualenv that sees this
  environment's site-packages, where an editable piarec is not on the path), as on a real
  cluster: the code travels as ``<dir>/dist/piarec.zip`` on ``--py-files``, or is added by
  :func:`pipelines.spark.get_spark` (:mod:`piarec.ship`);
- the loopback S3 server (moto's server mode) with the bucket ``piarec``;
- an MLflow tracking server (``mlflow server``: SQLite backend store, artifacts proxied
  to ``s3://piarec/mlartifacts`` on the loopback S3 server);
- Airflow 3 from ``.venv-airflow`` (``make airflow-env``): api-server, scheduler (the
  LocalExecutor) and dag-processor on a SQLite metadata DB, with the project's DAGs, the
  connection ``piarec_spark`` pointing at the master, and the DAGs' settings
  (``PIAREC_SPARK_PYTHON`` the executors', ``PIAREC_SPARK_DRIVER_PYTHON`` this one,
  ``PIAREC_PY_FILES`` the zip). Loopback only: every request is an admin (the simple auth
  manager's ``all_admins``), so there is no login. DAGs are paused at creation, as Airflow's
  default; unpause them in the UI.

It waits until each answers (the workers registered with the master, the scheduler and
dag-processor healthy), prints every UI's URL and writes ``<dir>/stack.yaml``, a pipeline
configuration pointing at them (``PIAREC_CONFIG``), ``<dir>/stack.env``, the environment for
clients (the loopback S3 server's AWS settings and ``PIAREC_CONFIG``), and
``<dir>/airflow.env`` for the ``airflow`` command (``airflow backfill create ...``).
Recommendations are committed to ``s3://piarec/recommendations`` on the loopback S3 server
(the scoring job writes them task-side with pyarrow). Everything Spark reads or writes with
its own DataFrame I/O (events, snapshots, histories) stays on the shared local disk,
``<dir>/data``: Spark's ``s3://`` needs the ``s3a`` jars, which only the Spark image ships.
``down`` stops every process ``up`` started (their pids are in ``<dir>/stack.json`` and
``<dir>/run/<name>.pid``; each was started in a session of its own, so its children go too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from piarec.errors import PiarecError

__all__ = ["down", "status", "up"]

BUCKET = "piarec"
HOST = "127.0.0.1"
STATE = "stack.json"
PIDS = "run"  # <dir>/run/<process>.pid
# Loopback credentials of the local S3 server (moto accepts any); nothing real.
AWS = {"AWS_ACCESS_KEY_ID": "piarec-local", "AWS_SECRET_ACCESS_KEY": "piarec-local", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """An executable of this virtualenv (``sys.executable``'s folder), else from PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise PiarecError(f"{name} not found next to {sys.executable} or on PATH; install the project (make install)")
    return found


def _spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def _start(name: str, cmd: list[str], logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """Start ``cmd`` in a session of its own (``down`` stops its whole process group); its
    output goes to ``logs/<name>.log``, its pid to ``run/<name>.pid``."""
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pids = logs.parent / PIDS
    pids.mkdir(exist_ok=True)
    (pids / f"{name}.pid").write_text(f"{proc.pid}\n")
    return {"name": name, "pid": proc.pid, "log": str(logs / f"{name}.log")}


def _wait(what: str, check, timeout: float, procs: list[dict[str, Any]]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        dead = [p for p in procs if not _alive(p["pid"])]
        if dead or time.monotonic() > deadline:
            why = f"{dead[0]['name']} exited" if dead else f"not ready after {timeout:.0f} s"
            raise PiarecError(f"stack: {what}: {why}; see {(dead or procs)[0]['log']}")
        time.sleep(0.5)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _repo() -> Path:
    """The checkout (or install) holding ``dags/`` and ``pipelines/``."""
    import piarec

    return Path(piarec.__file__).resolve().parents[1]


def _airflow_venv() -> Path:
    venv = Path(os.environ.get("PIAREC_AIRFLOW_VENV") or _repo() / ".venv-airflow")
    if not (venv / "bin" / "airflow").exists():
        raise PiarecError(f"no Airflow in {venv}: build it with `make airflow-env` (or start with --no-airflow)")
    return venv


def executor_python(root: Path) -> str:
    """A Python for executors: this environment's third-party packages, not piarec.

    A virtualenv without pip whose one ``.pth`` line adds this environment's site-packages
    to its path. Lines of a ``.pth`` file are plain paths: the ``.pth`` files *inside* that
    folder (an editable install's import hook among them) are not run, so ``import piarec``
    fails there unless the code is shipped.
    """
    import site
    import sysconfig

    env = root / "executor-python"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "piarec-deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(ours)))
    return str(python)


def up(directory: str, workers: int = 2, worker_memory: str = "2g", airflow: bool = True,
       env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the stack under ``directory``; returns its state (also in ``stack.json``).
    ``env``: extra environment for every process (the jobs, the DAGs' tasks)."""
    from piarec.ship import build_zip

    root = Path(directory).resolve()
    if (root / STATE).exists() and status(directory)["running"]:
        raise PiarecError(f"a stack is already running from {root} (piarec stack down --dir {directory})")
    airflow_venv = _airflow_venv() if airflow else None
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    code = str(build_zip(root / "dist"))
    executors = executor_python(root)
    ports = {k: _free_port() for k in ("s3", "mlflow", "spark", "spark_ui", *(["airflow"] if airflow else []))}
    s3 = f"http://{HOST}:{ports['s3']}"
    env = {**os.environ, **(env or {}), **AWS, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
           "SPARK_LOCAL_IP": HOST, "PYSPARK_PYTHON": executors}
    procs: list[dict[str, Any]] = []
    state = {"dir": str(root), "ports": ports, "processes": procs, "executor_python": executors, "code_zip": code}
    master = f"spark://{HOST}:{ports['spark']}"
    tracking = f"http://{HOST}:{ports['mlflow']}"
    try:
        procs.append(_start("s3", [_bin("moto_server"), "-H", HOST, "-p", str(ports["s3"])], logs, env))
        _wait("loopback S3", lambda: _get(f"{s3}/moto-api/"), 30, procs)
        import boto3

        boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
                     region_name=AWS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
        procs.append(_start("mlflow", [
            _bin("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"], logs, env))
        procs.append(_start("spark-master", [
            _spark_class(), "org.apache.spark.deploy.master.Master", "--host", HOST,
            "--port", str(ports["spark"]), "--webui-port", str(ports["spark_ui"])], logs, env))
        _wait("Spark master", lambda: _get(f"http://{HOST}:{ports['spark_ui']}/json/"), 60, procs)
        for i in range(workers):
            work = root / f"spark-worker-{i}"
            work.mkdir(exist_ok=True)
            procs.append(_start(f"spark-worker-{i}", [
                _spark_class(), "org.apache.spark.deploy.worker.Worker", master, "--host", HOST,
                "--cores", "1", "--memory", worker_memory, "--webui-port", "0", "--work-dir", str(work)], logs, env))
        _wait(f"{workers} Spark workers", lambda: json.loads(_get(f"http://{HOST}:{ports['spark_ui']}/json/"))
              .get("aliveworkers", 0) >= workers, 90, procs)
        _wait("MLflow server", lambda: _get(f"{tracking}/health") == b"OK", 90, procs)
        clients = _write_clients(root, master, tracking, s3, worker_memory, executors)
        urls = {"Spark master": f"http://{HOST}:{ports['spark_ui']}", "MLflow": tracking, "S3 (moto)": s3}
        if airflow_venv is not None:
            api = _start_airflow(root, airflow_venv, ports, {**env, **clients}, code, executors, logs, procs)
            urls["Airflow"] = api
            state["airflow_api"] = api
    except BaseException:
        _stop(procs)
        raise
    state.update(master=master, tracking_uri=tracking, s3_endpoint=s3, config=str(root / "stack.yaml"), urls=urls)
    (root / STATE).write_text(json.dumps(state, indent=2))
    return state


def _write_clients(root: Path, master: str, tracking: str, s3: str, worker_memory: str,
                   executors: str) -> dict[str, str]:
    """``stack.yaml`` (the pipeline configuration) and ``stack.env`` (client environment);
    returns that environment."""
    import yaml

    config = {
        "storage": {"root": str(root / "data"),
                    # Written task-side with pyarrow, so on the loopback S3 server (no s3a needed).
                    "recommendations": f"s3://{BUCKET}/recommendations"},
        # Artifacts through the server's proxy, which stores them on the loopback S3 server.
        "mlflow": {"tracking_uri": tracking, "artifact_location": "mlflow-artifacts:/piarec"},
        "spark": {"master": master, "conf": {
            "spark.pyspark.python": executors, "spark.pyspark.driver.python": sys.executable,
            "spark.executor.memory": "1g" if worker_memory == "2g" else worker_memory,
            "spark.driver.host": HOST, "spark.ui.enabled": "false"}},
    }
    (root / "stack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**AWS, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, "PIAREC_CONFIG": str(root / "stack.yaml")}
    (root / "stack.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def _start_airflow(root: Path, venv: Path, ports: dict[str, int], env: dict[str, str], code: str,
                   executors: str, logs: Path, procs: list[dict[str, Any]]) -> str:
    """Migrate Airflow's metadata DB, start api-server, scheduler and dag-processor; returns
    the API's URL once the scheduler and dag-processor report healthy."""
    api = f"http://{HOST}:{ports['airflow']}"
    home = root / "airflow"
    home.mkdir(exist_ok=True)
    settings = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(_repo() / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # One secret for every component: the API server signs the tasks' tokens with it.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW_CONN_PIAREC_SPARK": json.dumps({"conn_type": "spark", "host": f"spark://{HOST}",
                                                 "port": ports["spark"]}),
        "PIAREC_HOME": str(_repo()),
        "PIAREC_VENV": sys.prefix,
        "PIAREC_SPARK_PYTHON": executors,
        "PIAREC_SPARK_DRIVER_PYTHON": sys.executable,
        "PIAREC_PY_FILES": code,
        "PIAREC_POKE_INTERVAL_S": env.get("PIAREC_POKE_INTERVAL_S", "30"),
    }
    (root / "airflow.env").write_text("".join(f"export {k}='{v}'\n" for k, v in settings.items()))
    env = {**env, **settings}
    airflow = str(venv / "bin" / "airflow")
    with open(logs / "airflow-db-migrate.log", "ab") as log:
        done = subprocess.run([airflow, "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    if done.returncode != 0:
        raise PiarecError(f"stack: airflow db migrate exited {done.returncode}; see {logs / 'airflow-db-migrate.log'}")
    procs.append(_start("airflow-api-server", [airflow, "api-server", "-H", HOST, "-p", str(ports["airflow"]),
                                               "-w", "1"], logs, env))
    procs.append(_start("airflow-scheduler", [airflow, "scheduler"], logs, env))
    procs.append(_start("airflow-dag-processor", [airflow, "dag-processor"], logs, env))

    def healthy():
        health = json.loads(_get(f"{api}/api/v2/monitor/health"))
        return all(health.get(part, {}).get("status") == "healthy" for part in ("scheduler", "dag_processor"))

    _wait("Airflow (scheduler and dag-processor healthy)", healthy, 240, procs)
    return api


def _stop(procs: list[dict[str, Any]]) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 20
    for p in reversed(procs):
        while _alive(p["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(p["pid"]):
            try:
                os.killpg(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def status(directory: str) -> dict[str, Any]:
    """The stack's state with ``running`` (every process alive) and each process's ``alive``."""
    path = Path(directory).resolve() / STATE
    if not path.exists():
        return {"dir": str(path.parent), "running": False, "processes": []}
    state = json.loads(path.read_text())
    for p in state["processes"]:
        p["alive"] = _alive(p["pid"])
    state["running"] = bool(state["processes"]) and all(p["alive"] for p in state["processes"])
    return state


def down(directory: str) -> dict[str, Any]:
    """Stop every process of the stack under ``directory``; its data and logs stay."""
    state = status(directory)
    _stop(state["processes"])
    root = Path(directory).resolve()
    for p in state["processes"]:
        (root / PIDS / f"{p['name']}.pid").unlink(missing_ok=True)
    if (root / STATE).exists():
        (root / STATE).unlink()
    return state
