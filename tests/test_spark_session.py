"""The one SparkSession builder under a real ``spark-submit``: what the launcher was given
wins over piarec's defaults, and a value set in piarec's configuration wins over both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = """
import sys
from piarec.config import load_config
from pipelines.spark import get_spark
cfg = load_config(environ={k: v for k, v in __import__("os").environ.items() if k.startswith("PIAREC")})
spark = get_spark(cfg.spark)
print("partitions=" + spark.conf.get("spark.sql.shuffle.partitions"), "tz=" + spark.conf.get("spark.sql.session.timeZone"))
spark.stop()
"""


def submit(tmp_path: Path, *conf: str, env: dict[str, str] | None = None) -> str:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    done = subprocess.run([str(Path(sys.executable).with_name("spark-submit")), "--master", "local[1]",
                           "--conf", "spark.ui.enabled=false", *conf, str(script)],
                          env={**base, "PYSPARK_PYTHON": sys.executable, **(env or {})}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("partitions=")][-1]


def test_spark_submit_conf_wins_over_the_default_and_piarec_config_wins_over_both(tmp_path):
    assert submit(tmp_path) == "partitions=8 tz=UTC"  # piarec's default
    assert submit(tmp_path, "--conf", "spark.sql.shuffle.partitions=3") == "partitions=3 tz=UTC"
    assert submit(tmp_path, "--conf", "spark.sql.shuffle.partitions=3",
                  env={"PIAREC__SPARK__SHUFFLE_PARTITIONS": "5"}) == "partitions=5 tz=UTC"
