"""benchmarks/gpu_host.sh, the prepared GPU run, on a stand-in of the GPU host: a Python that
can import only the distributions that host holds (benchmarks/gpu_host_packages.txt, with what
they require) and the ones the script carries as wheels. A new import of anything else into the
code the run executes (MLflow, boto3, Spark, ...) fails here instead of on the lent machine,
whose minutes are few.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as _name

ROOT = Path(__file__).resolve().parents[1]
CARRIED = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}  # gpu_host.sh prepare


def host_distributions() -> set[str]:
    """The host's distributions installed here, with what they require (transitively)."""
    lines = (ROOT / "benchmarks/gpu_host_packages.txt").read_text().splitlines()
    listed = {_name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}
    installed = {_name(d.metadata["Name"]): d for d in md.distributions()}
    todo, seen = [n for n in listed if n in installed], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in installed[name].requires or []:
            r = Requirement(req)
            if (r.marker is None or r.marker.evaluate({"extra": ""})) and _name(r.name) in installed:
                todo.append(_name(r.name))
    return seen


def host_site(dest: Path, names: set[str]) -> Path:
    """A folder of links to the installed files of ``names`` only."""
    dest.mkdir()
    for name in names:
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            if len(f.parts) > 1 or top.endswith((".py", ".so")):
                src = Path(dist.locate_file(top))
                if not (dest / top).exists() and src.exists() and not top.endswith((".dist-info", "__pycache__")) \
                        and top != "..":
                    (dest / top).symlink_to(src)
    return dest


def write_ml100k(path: Path, users: int = 120, items: int = 150, seed: int = 0) -> None:
    """A MovieLens-100K-format file (user, item, rating, time; tab-separated)."""
    rng = np.random.default_rng(seed)
    lines = [f"{u + 1}\t{i + 1}\t{rng.integers(3, 6)}\t{881250949 + u}"
             for u in range(users) for i in rng.choice(items, rng.integers(8, 30), replace=False)]
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A virtual environment whose only packages are the host's and the carried ones, so the
    processes the run starts with ``sys.executable`` (score.py's arms) see no more than it."""
    tmp = tmp_path_factory.mktemp("gpu-host")
    site = host_site(tmp / "site", host_distributions() | CARRIED)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "host.pth").write_text(f"{site}\n")
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp), "LANG": "C.UTF-8"}
    return tmp, env


def test_the_stand_in_lacks_what_the_host_lacks(stand_in):
    _, env = stand_in
    probe = ("import importlib.util as u, subprocess, sys; "
             "print([m for m in ('mlflow', 'boto3', 'pyspark', 'torch', 'pydantic') if u.find_spec(m)]); "
             "subprocess.run([sys.executable, '-c', 'import mlflow'])")  # a child process: the same
    got = subprocess.run(["python3", "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    assert got.stdout.strip() == "['torch', 'pydantic']"
    assert "No module named 'mlflow'" in got.stderr


def test_the_gpu_run_completes_with_only_what_the_host_has(stand_in):
    tmp, env = stand_in
    kit, out = tmp / "kit", tmp / "out"
    write_ml100k(kit / "data" / "ml-100k" / "u.data")
    env = {**env, "GPU_HOST_KIT": str(kit), "GPU_HOST_SCALE": "small", "PIAREC_TEST_DEVICE": "cpu"}
    done = subprocess.run(["bash", "benchmarks/gpu_host.sh", "run", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    steps = dict(line.split()[:2] for line in (out / "steps.txt").read_text().splitlines())
    assert steps == {"cuda-tests": "rc=0", "train-scale": "rc=0", "score": "rc=0", "quality-ml-100k": "rc=0"}, \
        (out / "log.txt").read_text()[-4000:]
    scale = json.loads((out / "train_scale.json").read_text())
    assert [a["arm"] for a in scale["arms"]] == ["fp32", "bf16", "batch2000", "bf16+batch2000", "compiled"]  # pinned: CUDA
    assert all(a["samples_per_s"] > 0 and a["weekly_projected_h"] > 0 for a in scale["arms"])
    quality = json.loads((out / "quality-ml-100k.json").read_text())
    assert set(quality["results"]) == {"multivae+pia", "multivae+pia@levers-batch2000", "multivae+pia@levers-bf16",
                                       "multivae+pia@levers-bf16-batch2000"}
    assert "| local, 1 thread |" in (out / "score.md").read_text()
    assert "8 passed" in (out / "log.txt").read_text()  # tests/test_cuda.py, the CPU standing in
