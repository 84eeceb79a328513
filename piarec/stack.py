"""The production topology on one machine, as real processes: ``piarec stack up|down|status``.

    piarec stack up [--dir piarec-stack] [--workers 2]     (make stack)
    piarec stack down [--dir piarec-stack]                  (make stack-down)

``up`` starts, every one bound to 127.0.0.1 and on free ports:

- a Spark standalone cluster from the pyspark distribution: a master and ``--workers``
  workers (1 core, 2 GB each; ``spark-class org.apache.spark.deploy.master.Master`` /
  ``...worker.Worker``), whose Python workers run this virtualenv's interpreter;
- the loopback S3 server (moto's server mode) with the bucket ``piarec``;
- an MLflow tracking server (``mlflow server``: SQLite backend store, artifacts proxied
  to ``s3://piarec/mlartifacts`` on the loopback S3 server).

It waits until each answers (the workers registered with the master), then writes
``<dir>/stack.yaml``, a pipeline configuration pointing at them (``PIAREC_CONFIG``), and
``<dir>/stack.env``, the environment for clients (the AWS settings of the loopback S3
server and ``PIAREC_CONFIG``). The storage root stays on the shared local disk,
``<dir>/data``: Spark's own DataFrame I/O on ``s3://`` needs the ``s3a`` jars, which only
the Spark image ships; piarec's own S3 paths run against the loopback server in the tests.
``down`` stops every process ``up`` started (their pids are in ``<dir>/stack.json``).
"""

from __future__ import annotations

import json
import os
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
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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


def up(directory: str, workers: int = 2, worker_memory: str = "2g") -> dict[str, Any]:
    """Start the stack under ``directory``; returns its state (also in ``stack.json``)."""
    root = Path(directory).resolve()
    if (root / STATE).exists() and status(directory)["running"]:
        raise PiarecError(f"a stack is already running from {root} (piarec stack down --dir {directory})")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    ports = {k: _free_port() for k in ("s3", "mlflow", "spark", "spark_ui")}
    s3 = f"http://{HOST}:{ports['s3']}"
    env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
           "SPARK_LOCAL_IP": HOST, "PYSPARK_PYTHON": sys.executable}
    procs: list[dict[str, Any]] = []
    state = {"dir": str(root), "ports": ports, "processes": procs}
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
        master = f"spark://{HOST}:{ports['spark']}"
        _wait("Spark master", lambda: _get(f"http://{HOST}:{ports['spark_ui']}/json/"), 60, procs)
        for i in range(workers):
            work = root / f"spark-worker-{i}"
            work.mkdir(exist_ok=True)
            procs.append(_start(f"spark-worker-{i}", [
                _spark_class(), "org.apache.spark.deploy.worker.Worker", master, "--host", HOST,
                "--cores", "1", "--memory", worker_memory, "--webui-port", "0", "--work-dir", str(work)], logs, env))
        _wait(f"{workers} Spark workers", lambda: json.loads(_get(f"http://{HOST}:{ports['spark_ui']}/json/"))
              .get("aliveworkers", 0) >= workers, 90, procs)
        tracking = f"http://{HOST}:{ports['mlflow']}"
        _wait("MLflow server", lambda: _get(f"{tracking}/health") == b"OK", 90, procs)
    except BaseException:
        _stop(procs)
        raise
    _write_clients(root, master, tracking, s3, worker_memory)
    state.update(master=master, tracking_uri=tracking, s3_endpoint=s3, config=str(root / "stack.yaml"))
    (root / STATE).write_text(json.dumps(state, indent=2))
    return state


def _write_clients(root: Path, master: str, tracking: str, s3: str, worker_memory: str) -> None:
    """``stack.yaml`` (the pipeline configuration) and ``stack.env`` (client environment)."""
    import yaml

    config = {
        "storage": {"root": str(root / "data")},
        # Artifacts through the server's proxy, which stores them on the loopback S3 server.
        "mlflow": {"tracking_uri": tracking, "artifact_location": "mlflow-artifacts:/piarec"},
        "spark": {"master": master, "conf": {
            "spark.pyspark.python": sys.executable, "spark.pyspark.driver.python": sys.executable,
            "spark.executor.memory": "1g" if worker_memory == "2g" else worker_memory,
            "spark.driver.host": HOST, "spark.ui.enabled": "false"}},
    }
    (root / "stack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**AWS, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, "PIAREC_CONFIG": str(root / "stack.yaml")}
    (root / "stack.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))


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
    path = Path(directory).resolve() / STATE
    if path.exists():
        path.unlink()
    return state
