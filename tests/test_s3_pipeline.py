"""The pipeline's own S3 paths against a real S3-protocol server on 127.0.0.1.

Covered here: events written by the generator, snapshot and manifest reads, MLflow
artifact logging and model resolution, training checkpoints, and the single-node scorer
end to end. Spark's own reads and writes of s3:// need the s3a connector jars of the
Spark image (README, Operations, lists those paths).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from s3server import BUCKET, moto_s3

from piarec.data import reader, storage
from piarec.data.commit import read_pointer
from piarec.config import load_config
from piarec.data.synthetic import generate_events
from piarec.data import layout

pytestmark = pytest.mark.slow
START, DAYS = dt.date(2026, 1, 1), 40
WINDOW_END = START + dt.timedelta(days=DAYS)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def local_snapshot(tmp_path_factory):
    from pipelines import build_matrix
    from pipelines.spark import get_spark

    root = tmp_path_factory.mktemp("local")
    cfg = load_config(environ={}, overrides={"storage": {"root": str(root)},
                                             "spark": {"master": "local[2]", "shuffle_partitions": 2}})
    generate_events(layout.events_root(cfg.storage), users=1500, items=120, days=DAYS, seed=5, start=START)
    spark = get_spark(cfg.spark)
    try:
        manifest = build_matrix.run(spark, cfg, layout.events_root(cfg.storage), WINDOW_END, layout.snapshots_root(cfg.storage))
    finally:
        spark.stop()
    return cfg, manifest["uri"]


def test_generator_writes_events_to_s3(s3, local_snapshot):
    cfg, _ = local_snapshot
    uri = f"s3://{BUCKET}/gen/events"
    summary = generate_events(uri, users=1500, items=120, days=DAYS, seed=5, start=START)
    loc = storage.resolve(uri)
    remote = ds.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning="hive").to_table()
    local = ds.dataset(layout.events_root(cfg.storage), format="parquet", partitioning="hive").to_table()
    assert remote.num_rows == summary["events"] == local.num_rows
    assert remote.sort_by([("user_id", "ascending"), ("ts", "ascending")]).equals(
        local.sort_by([("user_id", "ascending"), ("ts", "ascending")]))


def test_snapshot_reads_the_same_from_s3(s3, local_snapshot):
    from piarec.data.snapshot import load_snapshot

    _, local_uri = local_snapshot
    remote_uri = f"s3://{BUCKET}/root/snapshots/{local_uri.rsplit('/', 1)[1]}"
    dst = storage.resolve(remote_uri)
    pafs.copy_files(local_uri, dst.path, destination_filesystem=dst.fs)
    a, b = load_snapshot(local_uri), load_snapshot(remote_uri)
    assert read_pointer(remote_uri) == read_pointer(local_uri)  # the pointer names its files relative to it
    assert a.manifest == b.manifest == read_pointer(remote_uri).manifest
    assert (a.item_ids == b.item_ids).all()
    for x, y in [(a.train, b.train), (a.val.fold_in, b.val.fold_in), (a.test.held_out, b.test.held_out)]:
        assert np.array_equal(x.indptr, y.indptr) and np.array_equal(x.indices, y.indices)


def test_training_logs_model_artifacts_to_s3_and_resolves_them(s3, local_snapshot, tmp_path):
    import boto3

    from piarec.registry.client import load_model
    from piarec.train.job import run_training

    _, snap_uri = local_snapshot
    cfg = load_config(environ={}, overrides={
        "storage": {"root": f"s3://{BUCKET}/root"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "model": {"hidden_dim": 32, "latent_dim": 8},
        "training": {"epochs": 2, "batch_size": 200},
    })
    assert layout.artifact_location(cfg.mlflow, cfg.storage) == f"s3://{BUCKET}/root/mlartifacts"
    out = run_training(cfg, snap_uri)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix="root/mlartifacts/")["Contents"]]
    assert any(k.endswith("/weights.pt") for k in keys) and any(k.endswith("/items.parquet") for k in keys)
    bundle, ref = load_model(cfg, "models:/piarec@challenger")
    assert ref.version == out["version"]
    assert bundle.n_items == len(bundle.item_ids) > 0
    left = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="root/checkpoints/").get(
        "Contents", [])]
    assert not [k for k in left if not k.endswith("/")]  # written while training, removed once registered


def test_training_resumes_from_a_checkpoint_on_s3(s3, planted_snapshot):
    import torch

    from piarec.train.trainer import train

    cfg = lambda epochs: load_config(environ={}, overrides={  # noqa: E731
        "model": {"hidden_dim": 32, "latent_dim": 8},
        "training": {"epochs": epochs, "batch_size": 100, "lr": 3e-3, "device": "cpu"}})
    ck = f"s3://{BUCKET}/ck/run/checkpoint.pt"
    straight = train(cfg(3), planted_snapshot)
    train(cfg(1), planted_snapshot, checkpoint_path=ck)
    assert storage.exists(storage.resolve(ck))
    resumed = train(cfg(3), planted_snapshot, checkpoint_path=ck)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def _s3_partition_entries(fs, path: str) -> dict[str, list[str]]:
    """What an S3 partition holds: the names directly under it and the versions under
    ``_versions/`` (files only exist as keys; a "folder" is a common prefix)."""
    top = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    versions = fs.get_file_info(pafs.FileSelector(f"{path}/_versions", recursive=False, allow_not_found=True))
    return {"day": sorted(i.base_name for i in top), "versions": sorted(i.base_name for i in versions)}


def test_single_node_scorer_end_to_end_on_s3(s3, tmp_path):
    """Histories read from S3, recommendations committed to S3: the same rows, manifest
    and commit pointer as the same run on local folders."""
    from piarec.daily import local_engine as score_local
    from piarec.daily import arms as score_arms, publish as score_publish
    from test_score_local import DAY, make_histories, read_arm, save_model, write_histories

    data = make_histories(60, seed=3)
    write_histories(tmp_path / "histories", DAY, data)
    save_model(tmp_path / "champion", 0)
    fs = storage.resolve(f"s3://{BUCKET}/x").fs
    pafs.copy_files(str(tmp_path / "histories"), f"{BUCKET}/e2e/histories",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    cfg = load_config(environ={}, overrides={"scoring": {"k": 5, "batch_size": 8, "threads": 2, "history_days": 7}})

    def run(hist: str, out: str) -> dict:
        plan = score_arms.plan_models(cfg, str(tmp_path / "champion"))
        return score_local.run_local(cfg, DAY, hist, out, plan, 5)["champion"]

    local = run(str(tmp_path / "histories"), str(tmp_path / "recs"))
    remote = run(f"s3://{BUCKET}/e2e/histories", f"s3://{BUCKET}/e2e/recs")
    day = f"s3://{BUCKET}/e2e/recs/dt={DAY}"
    assert storage.is_published(day)
    remote_rows = reader.read_arm(day, "champion").to_pylist()
    assert sorted(remote_rows, key=lambda r: r["user_id"]) == sorted(read_arm(tmp_path, "champion"),
                                                                     key=lambda r: r["user_id"])
    assert len(remote_rows) == len(data["user_id"])
    assert remote["counts"] == local["counts"] and remote["input"]["uri"].startswith("s3://")
    pointer, local_pointer = read_pointer(day), read_pointer(str(tmp_path / "recs" / f"dt={DAY}"))
    assert pointer.version == remote["version"] and pointer.committed_at == remote["committed_at"]
    assert score_publish.arm_manifests(pointer.manifest)["champion"] == {
        k: v for k, v in remote.items() if k not in ("version", "committed_at")}
    assert pointer.manifest["arms"] == local_pointer.manifest["arms"]
    assert pointer.manifest["validation"] == local_pointer.manifest["validation"]
    assert [f["path"].split("/", 2)[2] for f in pointer.files] == [
        f["path"].split("/", 2)[2] for f in local_pointer.files]  # the same files under each version
    # Nothing left behind: no lease, no other version; only the pointer and its version.
    assert _s3_partition_entries(fs, f"{BUCKET}/e2e/recs/dt={DAY}") == {
        "day": ["_SUCCESS", "_versions"], "versions": [pointer.version]}


def test_spark_scoring_job_publishes_to_s3_without_s3a(s3, tmp_path):
    """The Spark job's tasks write their Parquet with pyarrow and the driver commits, so
    its output path needs no Hadoop S3 connector: same rows as the local engine."""
    import os

    from pyspark.sql import SparkSession

    from piarec.daily import local_engine as score_local

    from piarec.daily import arms as score_arms, publish as score_publish
    from pipelines import score_users
    from pipelines.spark import get_spark
    from test_score_local import DAY, make_histories, read_arm, save_model, write_histories

    data = make_histories(70, seed=4)
    write_histories(tmp_path / "histories", DAY, data)
    save_model(tmp_path / "champion", 0)
    save_model(tmp_path / "challenger", 1)
    scoring = {"k": 5, "batch_size": 8, "threads": 2, "history_days": 7, "challenger_share": 0.4}
    local_cfg = load_config(environ={}, overrides={"scoring": scoring})
    plan = score_arms.plan_models(local_cfg, str(tmp_path / "champion"), str(tmp_path / "challenger"))
    score_local.run_local(local_cfg, DAY, str(tmp_path / "histories"), str(tmp_path / "recs"), plan, 5)

    # Executors get their AWS settings from their own environment, as on a cluster node.
    aws = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_ENDPOINT_URL")}
    cfg = load_config(environ={}, overrides={"scoring": scoring, "spark": {
        "master": "local[2]", "shuffle_partitions": 2, "conf": {f"spark.executorEnv.{k}": v for k, v in aws.items()}}})
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    spark = get_spark(cfg.spark)
    out = f"s3://{BUCKET}/spark/recs"
    try:
        plan = score_arms.plan_models(cfg, str(tmp_path / "champion"), str(tmp_path / "challenger"))
        manifest = score_users.run(spark, cfg, "unused", DAY, out, plan, 5,
                                   histories_uri=str(tmp_path / "histories"))["champion"]
    finally:
        spark.stop()
    fs = storage.resolve(out).fs
    day = f"{out}/dt={DAY}"
    assert storage.is_published(day)
    pointer = read_pointer(day)
    total = 0
    for arm in ("champion", "challenger"):
        rows = reader.read_arm(day, arm).to_pylist()
        assert sorted(rows, key=lambda r: r["user_id"]) == sorted(read_arm(tmp_path, arm), key=lambda r: r["user_id"])
        total += len(rows)
    assert total == len(data["user_id"]) == manifest["counts"]["users"] + pointer.manifest["arms"]["challenger"]["counts"]["users"]
    assert manifest["engine"]["name"] == "spark" and manifest["version"] == pointer.version
    assert sorted(pointer.manifest["validation"]) == ["challenger", "champion"]
    assert _s3_partition_entries(fs, f"{BUCKET}/spark/recs/dt={DAY}") == {
        "day": ["_SUCCESS", "_versions"], "versions": [pointer.version]}
