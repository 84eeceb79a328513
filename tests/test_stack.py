"""``piarec stack``: a real Spark standalone cluster (a master and two workers), a real
MLflow tracking server and the loopback S3 server, on 127.0.0.1; the pipeline runs against
them through the configuration ``stack up`` writes: the weekly build and the daily scoring
run on the cluster's executors, training logs to the server and its artifacts land on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from piarec import stack
from piarec.data import reader

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    where = tmp_path_factory.mktemp("stack")
    state = stack.up(str(where / "stack"))
    try:
        yield state
    finally:
        stack.down(str(where / "stack"))
    assert not any(stack._alive(p["pid"]) for p in state["processes"])  # everything stopped


def piarec(state, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAREC", "AWS_", "MLFLOW_"))}
    for line in Path(state["dir"], "stack.env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    done = subprocess.run([sys.executable, "-m", "piarec", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def completed_apps(state) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{state['ports']['spark_ui']}/json/", timeout=5) as resp:
        return len(json.loads(resp.read())["completedapps"])


def test_the_pipeline_runs_on_the_cluster_against_the_servers(running, tmp_path):
    state = running
    assert stack.status(state["dir"])["running"]
    cfg = yaml.safe_load(Path(state["config"]).read_text())
    assert cfg["spark"]["master"] == state["master"] and cfg["mlflow"]["tracking_uri"] == state["tracking_uri"]
    data = Path(cfg["storage"]["root"])
    piarec(state, "generate-events", "--out", str(data / "events"), "--users", "1500", "--items", "120",
           "--days", "100", "--seed", "2")
    piarec(state, "build-matrix", "--window-end", "2026-04-01")
    snapshot = data / "snapshots" / "window_end=2026-04-01"
    out = piarec(state, "train", "--snapshot", str(snapshot), "--epochs", "2").stdout
    trained, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])  # MLflow prints its run links first
    assert trained["version"] == "1"
    scored = piarec(state, "score", "--date", "2026-03-31", "--model", "models:/piarec/1")
    assert "score_users 2026-03-31 arm=champion" in scored.stdout
    assert completed_apps(state) == 2  # the build and the scoring ran on the cluster, as applications
    table = reader.read_arm(str(data / "recommendations" / "dt=2026-03-31"), "champion")
    assert table.num_rows > 1000 and set(table.column("model_version").to_pylist()) == {"1"}
    # The model's artifacts went through the server to the loopback S3 server.
    import boto3

    s3 = boto3.client("s3", endpoint_url=state["s3_endpoint"], aws_access_key_id=stack.AWS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.AWS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.BUCKET, Prefix="mlartifacts/").get("Contents", [])]
    assert any(k.endswith("weights.pt") for k in keys), keys[:20]


def test_a_second_stack_in_the_same_folder_is_refused(running):
    with pytest.raises(stack.PiarecError, match="already running"):
        stack.up(running["dir"])
