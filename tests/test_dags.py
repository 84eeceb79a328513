"""The Airflow DAGs, for real: DagBag parsing, task structure, and `airflow dags test`
runs of both DAGs against local Spark, a SQLite MLflow store and a local storage root.

Airflow runs from its own environment (``.venv-airflow``, built by ``make airflow-env``:
apache-airflow + the Spark provider); its tasks launch work in the project environment
(``.venv/bin/spark-submit``, ``.venv/bin/piarec``), exactly as in production. So the
Spark jobs -- the scoring job's ``mapInArrow`` UDF included -- run where pyspark has no
``pyspark-client`` on top of it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = Path(os.environ.get("PIAREC_AIRFLOW_VENV", REPO / ".venv-airflow"))
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
WEEK = "2026-04-06"  # a Monday; the 90-day window [2026-01-06, 2026-04-06) lies inside the events
DAY, NEXT_DAY = dt.date(2026, 4, 9), dt.date(2026, 4, 10)

pytestmark = pytest.mark.slow


def _require_airflow() -> None:
    if not AIRFLOW.exists():
        pytest.fail(f"{AIRFLOW} is missing: build the Airflow environment with `make airflow-env`")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """AIRFLOW_HOME with a migrated SQLite metadata DB, the Spark connection from the
    environment, a storage root with generated events, and the env for every command."""
    _require_airflow()
    from piarec.data.synthetic import generate_events

    base = tmp_path_factory.mktemp("airflow")
    root = base / "work"
    generate_events(str(root / "events"), users=3000, items=300, days=100, seed=0, start=dt.date(2026, 1, 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAREC", "AIRFLOW", "PYSPARK", "SPARK_HOME"))}
    env.update({
        "AIRFLOW_HOME": str(base / "home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_PIAREC_SPARK": json.dumps(
            {"conn_type": "spark", "host": "local[2]", "extra": {"spark-binary": "spark-submit"}}),
        "PIAREC_HOME": str(REPO),
        "PIAREC_VENV": str(Path(sys.executable).parent.parent),  # the environment running the tests
        "PIAREC_DAG_RETRIES": "0",
        "PIAREC__STORAGE__ROOT": str(root),
        "PIAREC__TRAINING__EPOCHS": "3",
        "PIAREC__SPARK__DRIVER_MEMORY": "2g",
        "PIAREC__SPARK__SHUFFLE_PARTITIONS": "4",
    })
    (base / "home").mkdir()
    run([str(AIRFLOW), "db", "migrate"], env, timeout=300)
    return env, root


def run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=env.get("AIRFLOW_HOME"))
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def dags_test(env, dag_id: str, logical_date: str, conf: dict | None = None) -> str:
    cmd = [str(AIRFLOW), "dags", "test", dag_id, logical_date]
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    proc = run(cmd, env)
    out = proc.stdout + proc.stderr
    assert "new_state=failed" not in out and "upstream_failed" not in out, out[-6000:]
    return out


def committed_day(day: Path):
    """The commit pointer of a recommendations day, after checking the day's folder holds
    only it and the committed version (no lease, no run's leftovers, no _validation.json:
    the DAG's validate task only reads)."""
    from piarec.data.commit import read_pointer

    pointer = read_pointer(str(day))
    assert pointer is not None, f"{day} is not committed"
    assert sorted(p.name for p in day.iterdir()) == ["_SUCCESS", "_versions"]
    assert [p.name for p in (day / "_versions").iterdir()] == [pointer.version]
    return pointer


def validate_report(out: str, version: str) -> dict:
    """The report ``piarec ops validate`` (the validate_output task) printed for the
    committed ``version`` of a day, from the task log in the ``dags test`` output."""
    lines = [line for line in out.splitlines() if f'"version": "{version}"' in line]
    assert len(lines) == 1, out[-6000:]
    return json.loads(lines[0][lines[0].index("{"): lines[0].rindex("}") + 1])


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------- parsing
PARSE = r"""
import json, sys, time
t = time.perf_counter()
sys.path.insert(0, sys.argv[1])  # as Airflow's DAG bundle parsing does for the DAGs folder
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("piarec", "torch", "pyspark.sql", "mlflow", "kubernetes") if m in sys.modules)
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "seconds": time.perf_counter() - t,
    "heavy": heavy,
    "dags": {d.dag_id: {"upstream": {t.task_id: sorted(t.upstream_task_ids) for t in d.tasks},
                        "types": {t.task_id: type(t).__name__ for t in d.tasks},
                        "params": sorted(d.params.keys()),
                        "retries": {t.task_id: t.retries for t in d.tasks},
                        "commands": {t.task_id: t.bash_command for t in d.tasks
                                     if isinstance(getattr(t, "bash_command", None), str)},
                        "timeouts": {t.task_id: bool(t.execution_timeout or getattr(t, "timeout", None)) for t in d.tasks},
                        "outlets": {t.task_id: sorted(a.name for a in t.outlets) for t in d.tasks if t.outlets},
                        "timetable": type(d.timetable).__name__,
                        "assets": sorted(a.name for a in getattr(d.timetable.asset_condition, "objects", [])),
                        "catchup": d.catchup, "max_active_runs": d.max_active_runs}
             for d in bag.dags.values()},
}))
"""


def parse_dags(tmp_path_factory, **settings: str) -> dict:
    _require_airflow()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIAREC"))}
    env.update({"AIRFLOW_HOME": str(tmp_path_factory.mktemp("airflow-parse")), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), **settings})  # Airflow puts it on sys.path
    proc = run([str(AIRFLOW_VENV / "bin" / "python"), "-c", PARSE, str(REPO / "dags")], env, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return parse_dags(tmp_path_factory)


DAG_IDS = {"piarec_weekly_training", "piarec_daily_scoring", "piarec_recommendations_files"}


def test_dagbag_imports_without_errors_or_heavy_modules(parsed):
    assert parsed["errors"] == {}
    assert set(parsed["dags"]) == DAG_IDS
    assert parsed["heavy"] == []  # DAG files only wire tasks
    assert parsed["seconds"] < 30


def test_weekly_structure(parsed):
    d = parsed["dags"]["piarec_weekly_training"]
    assert d["upstream"] == {
        "wait_for_events": [], "build_snapshot": ["wait_for_events"], "locate_snapshot": ["build_snapshot"],
        "train_and_register": ["locate_snapshot"], "promotion_gate": ["train_and_register"],
        "announce_snapshot": ["locate_snapshot"], "announce_model": ["train_and_register"],
    }
    assert d["outlets"] == {"announce_snapshot": ["piarec_snapshots"], "announce_model": ["piarec_models"]}
    assert d["types"]["build_snapshot"] == "PiarecSparkSubmitOperator"
    assert d["types"]["wait_for_events"] == "BashSensor"
    assert d["params"] == ["tuned_config", "window_end"] and d["max_active_runs"] == 1
    assert d["timetable"] == "CronTriggerTimetable"
    assert all(d["timeouts"].values()) and all(r == 2 for r in d["retries"].values())


def test_daily_structure(parsed):
    d = parsed["dags"]["piarec_daily_scoring"]
    assert d["upstream"] == {  # the scoring job validates and commits; the last tasks only check and announce
        "wait_for_events": [], "score_users": ["wait_for_events"], "validate_output": ["score_users"],
        "announce_recommendations": ["validate_output"],
    }
    assert d["outlets"] == {"announce_recommendations": ["piarec_recommendations"]}
    assert d["types"]["score_users"] == "PiarecSparkSubmitOperator"
    assert d["params"] == ["arms", "challenger_arm", "challenger_share", "date", "k", "model_version"]
    assert d["catchup"] is False and all(d["timeouts"].values())  # no re-scoring of the past on deploy
    assert d["timetable"] == "CronDataIntervalTimetable"


def test_the_downstream_dag_is_scheduled_on_the_recommendations_asset(parsed):
    d = parsed["dags"]["piarec_recommendations_files"]
    assert d["timetable"] == "AssetTriggeredTimetable" and d["assets"] == ["piarec_recommendations"]
    assert d["upstream"] == {"list_committed_files": []} and d["catchup"] is False


def test_schedules_off_leaves_only_triggered_runs(tmp_path_factory):
    off = parse_dags(tmp_path_factory, PIAREC_SCHEDULES="off")
    assert off["errors"] == {}
    assert {k: d["timetable"] for k, d in off["dags"].items()} == {
        "piarec_weekly_training": "NullTimetable", "piarec_daily_scoring": "NullTimetable",
        "piarec_recommendations_files": "AssetTriggeredTimetable"}  # downstream still follows the asset


def test_the_trainer_task_can_ask_for_several_processes(parsed, tmp_path_factory):
    one = parsed["dags"]["piarec_weekly_training"]["commands"]["train_and_register"]
    assert "train --snapshot {{ ti.xcom_pull(task_ids='locate_snapshot') }}{% if params.tuned_config %}" in one
    two = parse_dags(tmp_path_factory, PIAREC_TRAINER_PROCS="2")["dags"]["piarec_weekly_training"]
    assert two["commands"]["train_and_register"] == f"{one} --nproc-per-node 2"  # torchrun, 2 ranks
    bad = parse_dags(tmp_path_factory, PIAREC_TRAINER_PROCS="0")
    assert any("PIAREC_TRAINER_PROCS must be a positive" in e for e in bad["errors"].values())


def test_spark_environment_has_no_pyspark_client():
    """The environment that runs the Spark jobs (this one) must not carry the Spark
    provider's pyspark-client over pyspark (it breaks Python UDFs)."""
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("pyspark-client")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("apache-airflow-providers-apache-spark")


# --------------------------------------------------------------------------- real runs
def test_weekly_training_then_daily_scoring_end_to_end(stack):
    env, root = stack
    from piarec.data import reader
    from piarec.data.commit import read_pointer
    from piarec.data.storage import is_published

    out = dags_test(env, "piarec_weekly_training", WEEK)
    snap = root / "snapshots" / f"window_end={WEEK}"
    assert is_published(str(snap)), out[-4000:]
    manifest = read_pointer(str(snap)).manifest
    assert (manifest["window"]["start"], manifest["window"]["end"]) == ("2026-01-06", WEEK)

    c = mlflow_client(root)
    champion = c.get_model_version_by_alias("piarec", "champion")
    assert str(champion.version) == str(c.get_model_version_by_alias("piarec", "challenger").version) == "1"
    assert champion.tags["window_end"] == WEEK and champion.tags["snapshot_uri"] == str(snap)
    assert champion.tags["gate_decision"].startswith("promoted")

    out = dags_test(env, "piarec_daily_scoring", DAY.isoformat())
    day = root / "recommendations" / f"dt={DAY}"
    pointer = committed_day(day)  # the day's _SUCCESS: committed after the job validated it
    assert list(pointer.manifest["arms"]) == ["champion"]
    validation = pointer.manifest["validation"]
    assert list(validation) == ["champion"]
    recs = reader.read_arm(str(day), "champion").to_pandas()
    assert len(recs) == validation["champion"]["users"] == pointer.manifest["arms"]["champion"]["counts"]["users"] > 2000
    report = validate_report(out, pointer.version)  # the DAG's check of the committed day
    assert report["date"] == DAY.isoformat() and report["committed_at"] == pointer.committed_at
    assert [a["arm"] for a in report["arms"]] == ["champion"] and report["arms"][0]["users"] == len(recs)
    assert set(recs.model_version) == {"1"}
    assert (recs.item_ids.map(len) == 100).all()


def test_daily_run_follows_a_manual_champion_move_and_scores_the_challenger_arm(stack):
    """A person moves @champion in the MLflow UI; the next daily run scores with it.
    Also: the challenger arm and the k param, for the next day's partition."""
    from piarec.data import reader

    env, root = stack
    c = mlflow_client(root)
    if str(c.get_model_version_by_alias("piarec", "champion").version) != "1":
        pytest.fail("needs the weekly run of the previous test")
    # A second version, registered as challenger (a real training run, not promoted).
    run([sys.executable, "-m", "piarec", "train", "--snapshot", str(root / "snapshots" / f"window_end={WEEK}"),
         "--epochs", "2"], env)
    assert str(c.get_model_version_by_alias("piarec", "challenger").version) == "2"
    c.set_registered_model_alias("piarec", "champion", "2")  # what the UI does
    prev_day = root / "recommendations" / f"dt={DAY}"
    prev_files = {str(p.relative_to(prev_day)): p.read_bytes() for p in prev_day.rglob("*") if p.is_file()}

    out = dags_test(env, "piarec_daily_scoring", NEXT_DAY.isoformat(),
                    conf={"challenger_arm": True, "challenger_share": 0.3, "k": 20})
    day = root / "recommendations" / f"dt={NEXT_DAY}"
    pointer = committed_day(day)
    champion = reader.read_arm(str(day), "champion").to_pandas()
    challenger = reader.read_arm(str(day), "challenger").to_pandas()
    assert set(champion.model_version) == {"2"} and set(challenger.model_version) == {"2"}
    assert not set(champion.user_id) & set(challenger.user_id)  # A/B: each user in one arm
    assert 0.2 < len(challenger) / (len(champion) + len(challenger)) < 0.4
    assert (champion.item_ids.map(len) == 20).all() and (challenger.item_ids.map(len) == 20).all()
    assert sorted(pointer.manifest["arms"]) == sorted(pointer.manifest["validation"]) == ["challenger", "champion"]
    assert {a: pointer.manifest["validation"][a]["users"] for a in ("champion", "challenger")} == {
        "champion": len(champion), "challenger": len(challenger)}
    report = validate_report(out, pointer.version)
    assert [(a["arm"], a["users"], a["k"]) for a in report["arms"]] == [
        ("champion", len(champion), 20), ("challenger", len(challenger), 20)]
    # The previous day's partition is untouched by this run.
    assert {str(p.relative_to(prev_day)): p.read_bytes() for p in prev_day.rglob("*") if p.is_file()} == prev_files
    prev = reader.read_arm(str(prev_day), "champion")
    assert set(prev.column("model_version").to_pylist()) == {"1"}
    assert list(committed_day(prev_day).manifest["arms"]) == ["champion"]



def test_daily_run_with_baseline_control_arms_replaces_the_day(stack):
    """The `arms` param: the champion against popularity and EASE controls, fitted on the
    champion's training snapshot; a rerun of DAY replaces its champion-only output."""
    from piarec.data import reader

    env, root = stack
    day = root / "recommendations" / f"dt={DAY}"
    before = committed_day(day)
    if list(before.manifest["arms"]) != ["champion"]:
        pytest.fail("needs the daily run of the first test")
    users_before = before.manifest["arms"]["champion"]["counts"]["users"]
    out = dags_test(env, "piarec_daily_scoring", DAY.isoformat(),
                    conf={"arms": "champion=models:/piarec@champion:0.6,pop=popularity:0.2,ease=ease:0.2"})
    from piarec.data.commit import read_pointer

    pointer = read_pointer(str(day))  # the retired version stays readable for storage.retain_versions_s
    assert sorted(p.name for p in (day / "_versions").iterdir()) == sorted([before.version, pointer.version])
    manifest = pointer.manifest
    assert pointer.version != before.version and list(manifest["arms"]) == ["champion", "pop", "ease"]
    assert manifest["assignment"]["shares"] == {"champion": 0.6, "pop": 0.2, "ease": 0.2}
    frames = {a: reader.read_arm(str(day), a).to_pandas() for a in ("champion", "pop", "ease")}
    ids = [u for f in frames.values() for u in f.user_id]
    assert len(ids) == len(set(ids)) == users_before  # every active user, in exactly one arm
    for arm, share in (("pop", 0.2), ("ease", 0.2)):
        assert abs(len(frames[arm]) / users_before - share) < 0.05
        model = manifest["arms"][arm]["model"]
        assert model["kind"] == {"pop": "popularity", "ease": "ease"}[arm]
        assert set(frames[arm].model_version) == {model["version"]} and model["version"].startswith(model["kind"])
        assert model["fitted"]["snapshot_uri"].startswith(str(root / "snapshots" / f"window_end={WEEK}"))
    assert set(frames["champion"].model_version) == {"2"}  # the champion the previous test moved
    report = validate_report(out, pointer.version)
    assert [a["arm"] for a in report["arms"]] == ["champion", "pop", "ease"]


RENDER = r"""
import json, sys, types
sys.path.insert(0, sys.argv[1])
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {}
ti = types.SimpleNamespace(xcom_pull=lambda task_ids: f"<{task_ids}>")
for dag_id, task_id, field, ds, params in json.loads(sys.argv[2]):
    dag = bag.dags[dag_id]
    task = dag.get_task(task_id)
    merged = {k: v.value if hasattr(v, "value") else v for k, v in dag.params.items()} | params
    value = task.render_template(getattr(task, field), {"ds": ds, "params": merged, "ti": ti})
    if isinstance(value, list):
        value = [v for v in value if str(v).strip()]
    out[f"{task_id}:{ds}:{json.dumps(params, sort_keys=True)}"] = value
print(json.dumps(out))
"""


def test_partitions_come_from_the_logical_date_and_params(parsed, tmp_path):
    """What catch-up, backfill and ad-hoc reruns rely on: each run's commands name the
    partition of its own logical date, or of the date param when given."""
    cases = [
        ["piarec_daily_scoring", "score_users", "application_args", "2026-03-02", {}],
        ["piarec_daily_scoring", "score_users", "application_args", "2026-03-03",
         {"date": "2026-02-01", "model_version": 7, "k": 20, "challenger_arm": True, "challenger_share": 0.25}],
        ["piarec_daily_scoring", "wait_for_events", "bash_command", "2026-03-02", {}],
        ["piarec_daily_scoring", "validate_output", "bash_command", "2026-03-02", {"challenger_arm": True}],
        ["piarec_daily_scoring", "score_users", "application_args", "2026-03-02",
         {"arms": "champion=models:/piarec@champion:0.8,control=popularity:0.2", "model_version": 7, "k": 20,
          "challenger_arm": True}],
        ["piarec_daily_scoring", "validate_output", "bash_command", "2026-03-02",
         {"arms": "champion=models:/piarec@champion:0.8, control=ease:0.2", "challenger_arm": True}],
        ["piarec_weekly_training", "build_snapshot", "application_args", "2026-03-02", {}],
        ["piarec_weekly_training", "wait_for_events", "bash_command", "2026-03-09", {"window_end": "2026-01-05"}],
        ["piarec_weekly_training", "train_and_register", "bash_command", "2026-03-09", {}],
        ["piarec_weekly_training", "train_and_register", "bash_command", "2026-03-09",
         {"tuned_config": "s3://bucket/piarec/tuning/tune-abc/best_config.yaml"}],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIAREC"))}
    env.update({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags")})
    proc = run([str(AIRFLOW_VENV / "bin" / "python"), "-c", RENDER, str(REPO / "dags"), json.dumps(cases)], env)
    got = list(json.loads(proc.stdout.strip().splitlines()[-1]).values())
    assert got[0] == ["--date=2026-03-02", "--arm=champion"]
    assert got[1] == ["--date=2026-02-01", "--arm=champion", "--model=models:/piarec/7", "--k=20",
                      "--challenger=models:/piarec@challenger", "--challenger-share=0.25"]
    assert got[2].endswith("events-ready --day 2026-03-02")
    assert "validate --date 2026-03-02 --arms champion,challenger --k ''" in got[3]
    # `arms` replaces the champion / challenger arguments, and the day must hold exactly its arms
    assert got[4] == ["--date=2026-03-02", "--arms=champion=models:/piarec@champion:0.8,control=popularity:0.2",
                      "--k=20"]
    assert "validate --date 2026-03-02 --arms champion,control --k ''" in got[5]
    assert got[6] == ["--window-end=2026-03-02"]
    assert got[7].endswith("events-ready --window-end 2026-01-05")
    assert got[8].endswith("train --snapshot <locate_snapshot>")  # no tuned config: the pipeline's own
    assert got[9].endswith("train --snapshot <locate_snapshot> --tuned-config "
                           "s3://bucket/piarec/tuning/tune-abc/best_config.yaml")


RENDER_WITHOUT_LOGICAL_DATE = r"""
import json, sys, types
import pendulum
sys.path.insert(0, sys.argv[1])
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.execution_time import macros
bag = DagBag(dag_folder=sys.argv[1])
run_after = pendulum.datetime(2026, 4, 10, 9, 30, tz="UTC")
out = {}
for dag_id, task_id, field in (("piarec_daily_scoring", "wait_for_events", "bash_command"),
                               ("piarec_daily_scoring", "score_users", "application_args"),
                               ("piarec_weekly_training", "wait_for_events", "bash_command")):
    dag = bag.dags[dag_id]
    task = dag.get_task(task_id)
    params = {k: dag.params[k] for k in dag.params}
    for name, ctx in (("no logical date", {}), ("logical date", {"ds": "2026-04-01"}),
                      ("param", {"ds": "2026-04-01", "params": {**params, "date": "2026-03-15",
                                                                   "window_end": "2026-03-16"}})):
        context = {"params": params, "dag_run": types.SimpleNamespace(run_after=run_after), "macros": macros, **ctx}
        out[f"{dag_id}/{task_id}/{name}"] = str(task.render_template(getattr(task, field), context, dag.get_template_env()))
print(json.dumps(out))
"""


def test_the_day_renders_with_and_without_a_logical_date(parsed, tmp_path):
    """Airflow 3 runs triggered without a logical date have no ``ds``: the daily DAG then
    scores the day before ``run_after``, the weekly one ends its window on ``run_after``'s
    day; a logical date or a param wins over that (rendered by Airflow's own templating)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIAREC"))}
    env.update({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    proc = run([str(AIRFLOW_VENV / "bin" / "python"), "-c", RENDER_WITHOUT_LOGICAL_DATE, str(REPO / "dags")], env,
               timeout=300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    daily, weekly = "piarec_daily_scoring", "piarec_weekly_training"
    assert "--day 2026-04-09" in got[f"{daily}/wait_for_events/no logical date"]
    assert "--date=2026-04-09" in got[f"{daily}/score_users/no logical date"]
    assert "--day 2026-04-01" in got[f"{daily}/wait_for_events/logical date"]
    assert "--date=2026-03-15" in got[f"{daily}/score_users/param"]
    assert "--window-end 2026-04-10" in got[f"{weekly}/wait_for_events/no logical date"]
    assert "--window-end 2026-04-01" in got[f"{weekly}/wait_for_events/logical date"]
    assert "--window-end 2026-03-16" in got[f"{weekly}/wait_for_events/param"]


CHECK_PARAM = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags["piarec_weekly_training"]
out = {}
for value in ("s3://bucket/tuning/tune-1/best_config.yaml", "x.yaml; rm -rf /", "$(id)", None, ""):
    try:
        out[str(value)] = dag.params.get_param("tuned_config").resolve(value)
    except Exception as exc:
        out[str(value)] = type(exc).__name__
print(json.dumps(out))
"""


def test_the_tuned_config_param_stays_one_shell_word(tmp_path):
    """The param lands in a bash command: a value with spaces or shell syntax is refused at trigger."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIAREC"))}
    env.update({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    proc = run([str(AIRFLOW_VENV / "bin" / "python"), "-c", CHECK_PARAM, str(REPO / "dags")], env, timeout=300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"s3://bucket/tuning/tune-1/best_config.yaml": "s3://bucket/tuning/tune-1/best_config.yaml",
                   "x.yaml; rm -rf /": "ParamValidationError", "$(id)": "ParamValidationError", "None": None, "": ""}
