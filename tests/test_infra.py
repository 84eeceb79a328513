"""Static checks of the images and the local stack (no container engine runs here).

The compose file parses and wires what infra/README.md promises; every image is
multi-stage, pinned and runs as a non-root user; requirement files pin every package.
What must agree across the images and the stack is checked in tests/test_images.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["docker/spark/Dockerfile", "docker/trainer/Dockerfile", "docker/airflow/Dockerfile",
               "infra/mlflow/Dockerfile"]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())


def test_compose_has_the_stack(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "spark-master", "spark-worker", "airflow-init",
            "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"} <= set(services)
    assert set(compose["volumes"]) == {"postgres-data", "minio-data"}
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (REPO / "infra" / src).exists(), f"{name}: mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"
        build = svc.get("build")
        if build:
            ctx = REPO / "infra" / build["context"]
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file()


def test_mlflow_runs_on_postgres_with_s3_artifacts_and_airflow_points_at_spark(compose):
    cmd = " ".join(compose["services"]["mlflow"]["command"])
    assert "--backend-store-uri=postgresql" in cmd and "--artifacts-destination=s3://" in cmd
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert "spark://spark-master" in env["AIRFLOW_CONN_PIAREC_SPARK"]
    conf = yaml.safe_load((REPO / "infra" / "conf" / "pipeline.yaml").read_text())
    from piarec.config import load_config

    cfg = load_config(REPO / "infra" / "conf" / "pipeline.yaml", environ={})
    assert cfg.storage.root.startswith("s3://") and cfg.mlflow.tracking_uri == "http://mlflow:5000"
    assert conf["spark"]["master"] == "spark://spark-master:7077"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_images_are_multi_stage_pinned_and_non_root(path):
    text = (REPO / path).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for ref in froms:
        image = args.get(ref.strip("${}"), ref)
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, re.M):
        if not src.startswith("--") and "/" in src and not src.startswith("/"):
            base = REPO if path.startswith("docker/") else REPO / Path(path).parent
            assert (base / src).exists(), f"{path}: COPY source {src} is missing"


@pytest.mark.parametrize("path", ["docker/spark/requirements.txt", "docker/trainer/requirements.txt",
                                  "docker/airflow/requirements.txt", "docker/airflow/project-requirements.txt",
                                  "infra/mlflow/requirements.txt", "dags/requirements.txt"])
def test_requirements_are_pinned(path):
    lines = [line.split("#")[0].strip() for line in (REPO / path).read_text().splitlines()]
    for line in filter(None, lines):
        if line.startswith("-r "):
            assert (REPO / path).parent.joinpath(line[3:]).resolve().is_file()
        else:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), f"{path}: not pinned: {line}"
