"""Code shipping (piarec/ship.py): the zip Spark's ``--py-files`` carries to executors whose
Python has the libraries but not piarec -- the stack's executor Python, tested here
without Spark; tests/test_stack.py runs the jobs on the cluster with it."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from piarec import stack
from piarec.cli import main
from piarec.ship import build_zip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    return stack.executor_python(tmp_path_factory.mktemp("executor"))


def run(python: str, code: str, *path: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": ":".join(path)} if path else {}
    return subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)


def test_the_zip_holds_both_packages_and_the_packaged_defaults(tmp_path, capsys):
    assert main(["package", "--out", str(tmp_path / "dist")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "dist" / "piarec.zip"
    names = set(zipfile.ZipFile(path).namelist())
    assert {"piarec/__init__.py", "piarec/defaults/local.yaml", "pipelines/score_users.py",
            "pipelines/build_matrix.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    expected = {f"{pkg}/{p.relative_to(REPO / pkg).as_posix()}" for pkg in ("piarec", "pipelines")
                for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= names  # every module, none left behind
    assert build_zip(tmp_path / "again.zip").read_bytes() == path.read_bytes()  # same code, same bytes
    assert not list(path.parent.glob(".*partial"))


def test_an_executor_python_without_piarec_runs_it_from_the_zip(tmp_path, bare_python):
    assert "No module named 'piarec'" in run(bare_python, "import piarec").stderr
    assert run(bare_python, "import torch, pyarrow, numpy, pyspark").returncode == 0  # the libraries are there
    zipped = str(build_zip(tmp_path))
    code = ("import piarec, pipelines.score_users as s; from piarec.config import load_config; "
            "print(piarec.__file__); print(load_config(None).spark.master)")
    done = run(bare_python, code, zipped)
    assert done.returncode == 0, done.stderr
    origin, master = done.stdout.split()
    assert origin.startswith(zipped) and master == "local[*]"  # defaults read from inside the zip
