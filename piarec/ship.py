"""Shipping piarec's code to Spark executors that do not have it installed.

A cluster's executors have the third-party libraries (torch, pyarrow, numpy: the Spark
image, or a venv archive) but not this project. Its code travels as one zip on Spark's
``--py-files`` path, which spark-submit puts on ``sys.path`` of the driver and of every
executor's Python workers::

    piarec package --out dist                  # (make dist) -> dist/piarec.zip
    spark-submit --master spark://host:7077 --py-files dist/piarec.zip \\
        pipelines/score_users.py --date 2026-04-09

The zip holds the ``piarec`` and ``pipelines`` packages (their ``.py`` files and the
packaged defaults) exactly as imported by the Python that builds it, so executors run the
driver's code. :func:`pipelines.spark.get_spark` adds the same zip itself when a session on
a cluster was started without it (an in-process ``piarec score --master spark://...``, or a
spark-submit that left out ``--py-files``), so shipping is never a step a person can forget.
"""

from __future__ import annotations

import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

__all__ = ["ZIP_NAME", "build_zip", "code_zip"]

ZIP_NAME = "piarec.zip"
_PACKAGES = ("piarec", "pipelines")
_SUFFIXES = {".py", ".yaml"}


def _package_root(name: str) -> Path:
    import importlib

    module = importlib.import_module(name)
    return Path(module.__file__).resolve().parent


def build_zip(out: str | Path) -> Path:
    """Write the code zip to ``out`` (a folder gets ``piarec.zip`` inside); returns its path.

    Written to a temporary name and renamed, so a reader never sees half a zip. Entries are
    sorted and carry a fixed timestamp: the same code gives the same bytes.
    """
    import piarec

    target = Path(out)
    if target.suffix != ".zip":
        target = target / ZIP_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in _PACKAGES:
            root = _package_root(name)
            for path in sorted(root.rglob("*")):
                if path.suffix not in _SUFFIXES or "__pycache__" in path.parts:
                    continue
                entry = zipfile.ZipInfo(f"{name}/{path.relative_to(root).as_posix()}", date_time=(2020, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(entry, path.read_bytes())
        archive.comment = f"piarec {piarec.__version__}".encode()
    partial.replace(target)
    return target


@lru_cache(maxsize=1)
def code_zip() -> str:
    """This process's code as a zip in a temporary folder (built once per process)."""
    return str(build_zip(Path(tempfile.mkdtemp(prefix="piarec-code-")) / ZIP_NAME))
