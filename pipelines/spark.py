"""The one place a SparkSession is built, so every job runs with the same settings.

Settings that matter for correctness are fixed here rather than left to the cluster
defaults: the session time zone is UTC (event dates, window edges and ``dt=`` partitions
are all UTC days, see docs/architecture.md) and Arrow is on (``mapInArrow`` scoring and
``toPandas`` in tests). Everything else comes from :class:`piarec.config.SparkConfig`.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from piarec.config import SparkConfig
from piarec.data.storage import is_s3

__all__ = ["get_spark", "ship_code", "spark_path"]

_DISCOVERY = "spark.sql.sources.parallelPartitionDiscovery.threshold"


def get_spark(cfg: SparkConfig) -> SparkSession:
    """Return the active SparkSession, creating it from ``cfg`` when there is none.

    ``getOrCreate`` semantics: when a session exists (a test fixture, a notebook) it is
    returned and only the runtime SQL settings are applied to it.

    Under ``spark-submit`` the launcher owns the JVM: ``--master``, ``--name`` and
    ``--driver-memory`` given there win, so ``cfg.master``, ``cfg.app_name`` and
    ``cfg.driver_memory`` are not set (a master set in code would silently override the
    cluster's). Outside spark-submit a ``cfg.master`` of None is not set either: the master
    is the cluster's (whatever ``spark-defaults.conf`` sets). ``spark.sql.shuffle.partitions``
    from spark-submit wins over ``cfg.shuffle_partitions``'s default, not over a value set in
    the configuration. ``cfg.conf`` is applied last so an operator can override anything.
    """
    builder = (
        SparkSession.builder
        # Event timestamps are compared with UTC day boundaries; never the machine's zone.
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    if not _launcher_sets("spark.sql.shuffle.partitions") or "shuffle_partitions" in cfg.model_fields_set:
        # piarec's default yields to a spark-submit --conf; a value set in piarec's config wins.
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
    if not _under_spark_submit():
        builder = builder.appName(cfg.app_name).config("spark.driver.memory", cfg.driver_memory)
        if cfg.master is not None:
            builder = builder.master(cfg.master)
        if cfg.master is not None and cfg.master.startswith("local"):
            # No web UI for local runs: it only costs a port and start-up time.
            builder = builder.config("spark.ui.enabled", "false")
        # Python workers must run the project's interpreter (``spark.pyspark.python``, by
        # default the driver's: its virtualenv), not whatever `python3` is first on PATH,
        # which may lack pyarrow and torch. Outside spark-submit PySpark reads only the
        # environment variable for this, when the context starts (the conf alone is ignored).
        os.environ.setdefault("PYSPARK_PYTHON", cfg.conf.get("spark.pyspark.python", sys.executable))
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    if session.sparkContext.master.startswith("local"):
        if _DISCOVERY not in cfg.conf:
            # Spark lists more than 32 folders (a 90-day window) with a distributed job; without
            # a cluster that job costs more than listing them in the driver (~1.5 s per read).
            session.conf.set(_DISCOVERY, "1024")
    else:
        ship_code(session)
    return session


def ship_code(session: SparkSession) -> None:
    """Put this process's piarec code on the executors' Python path, unless the launcher
    already ships it (``--py-files .../piarec*.zip``): a cluster's executors have the
    third-party libraries but not the project (:mod:`piarec.ship`)."""
    context = session.sparkContext
    shipped = [f for f in context.getConf().get("spark.submit.pyFiles", "").split(",") if f]
    if any(os.path.basename(f).startswith("piarec") and f.endswith(".zip") for f in shipped):
        return
    from piarec.ship import code_zip

    zipped = code_zip()
    if zipped not in getattr(context, "_piarec_shipped", ()):
        context.addPyFile(zipped)
        context._piarec_shipped = (zipped,)


def _launcher_sets(key: str) -> bool:
    """Whether spark-submit was given ``key`` (``--conf``, ``--properties-file`` or
    spark-defaults.conf): the launcher passes them to the JVM as system properties."""
    if not _under_spark_submit():
        return False
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # attach to the launcher's JVM, whose properties SparkConf reads
    return SparkConf().contains(key)


def _under_spark_submit() -> bool:
    # spark-submit (and the pyspark shell) start the JVM first and hand its gateway port
    # to Python; a plain `python job.py` has none and PySpark launches the JVM itself.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_path(uri: str) -> str:
    """The path Spark should read or write for a storage URI.

    Local paths become absolute, so Spark and :mod:`piarec.data.storage` (which also makes them
    absolute) name the same folder whatever the working directory of the executors is.
    ``s3://`` URIs are passed through unchanged: the cluster maps the scheme onto the s3a
    connector (``spark.hadoop.fs.s3.impl``), see docs/architecture.md.
    """
    if is_s3(uri) or "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(uri)
