"""Static checks that the images agree with each other, with the project and with the
stack that wires them (no container engine runs here, so nothing is built).

tests/test_infra.py checks each file on its own (compose services, pinned bases, non-root
users, pinned requirement files); this file checks what must hold *across* them: one
Python minor (>= the project's requires-python) in every image, so the Spark driver and
executors agree; the same pins everywhere (pyspark, torch, mlflow among them); the s3a connector derived from the Hadoop that
pyspark bundles (docker/spark/s3a_jars.py, exercised here on a fake Maven repository),
the Airflow secrets and URLs compose gives every component, MLflow's allowed hosts, the
driver / executor Pythons, depends_on targets and loopback-only published ports.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import posixpath
import re
import shlex
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"spark": "docker/spark/Dockerfile", "trainer": "docker/trainer/Dockerfile",
               "airflow": "docker/airflow/Dockerfile", "mlflow": "infra/mlflow/Dockerfile"}
PROJECT_IMAGES = ("spark", "trainer", "airflow")  # images that run piarec code
PIN = re.compile(r"(?<![\w/.\-])([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][\w.+!]*)")
# python .../s3a_jars.py "$(python -c '... pyspark ...')/jars": the jars of the pyspark installed
S3A_RUN = re.compile(r"\bpython3?\s+\S*s3a_jars\.py\s+\"\$\(python3? -c '[^']*\bpyspark\b[^']*'\)/jars\"")
PYTHON_TAG = re.compile(r"(?:^|/)python:(\d+)\.(\d+)|-python(\d+)\.(\d+)")


# ---- parsing -------------------------------------------------------------------------

@dataclass
class Stage:
    name: str | None
    base: str  # the image this stage starts from (stage aliases resolved)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instr: str) -> list[str]:
        return [rest for kind, rest in self.instructions if kind == instr]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.args("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def copies(self) -> list[tuple[str | None, list[str], str, set[str]]]:
        """(from-stage or None, sources, destination, paths it creates) of every COPY,
        relative destinations resolved against the WORKDIR in force."""
        out, workdir = [], "/"
        for kind, rest in self.instructions:
            if kind == "WORKDIR":
                workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
            if kind != "COPY":
                continue
            words = rest.split()
            paths = [w for w in words if not w.startswith("--")]
            source = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            sources, dest = paths[:-1], paths[-1]
            if not dest.startswith("/"):
                dest = f"{workdir.rstrip('/')}/{dest.removeprefix('./')}"
            if len(sources) > 1 or dest.endswith("/"):
                created = {f"{dest.rstrip('/')}/{Path(src).name}" for src in sources}
            else:
                created = {dest.rstrip("/")}
            out.append((source, sources, dest.rstrip("/"), created))
        return out

    def venvs(self) -> list[str]:
        return [m.group(1) for rest in self.args("RUN") for m in re.finditer(r"-m venv (\S+)", rest)]

    def runs_python(self) -> bool:
        return any(re.search(r"\b(python3?|pip3?)\b", rest) for rest in self.args("RUN"))


def parse_dockerfile(rel: str) -> list[Stage]:
    lines = [line for line in (REPO / rel).read_text().splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(str.strip, logical):
        kind, _, rest = line.strip().partition(" ")
        kind, rest = kind.upper(), rest.strip()
        if kind == "ARG" and not stages:
            key, _, value = rest.partition("=")
            global_args[key] = value
        elif kind == "FROM":
            words = rest.split()
            ref = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            alias = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            parent = next((s for s in stages if s.name == ref), None)
            stages.append(Stage(alias, parent.base if parent else ref))
        else:
            stages[-1].instructions.append((kind, rest))
    return stages


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def python_minor(image: str) -> tuple[int, int] | None:
    m = PYTHON_TAG.search(image)
    if not m:
        return None
    major, minor = (g for g in m.groups() if g is not None)
    return int(major), int(minor)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> dict[str, str]:
    """name -> pinned version of a requirement file, following ``-r`` includes."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins.update(read_requirements((path.parent / line[3:].strip()).resolve()))
        elif m := PIN.fullmatch(line):
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def stage_pins(stg: Stage) -> dict[str, str]:
    """What a stage installs pinned: ``name==version`` in its RUN lines and the requirement
    files its RUN lines install with ``-r`` (read from the repository file copied there;
    every ``-r`` include must resolve to a file copied into the image too)."""
    copied = {dest: srcs[0] for _, srcs, dest, _ in stg.copies() if len(srcs) == 1 and srcs[0].endswith(".txt")}

    def read(image_path: str) -> dict[str, str]:
        assert image_path in copied, f"-r {image_path}: not copied into the stage"
        pins: dict[str, str] = {}
        for line in (REPO / copied[image_path]).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                pins.update(read(posixpath.normpath(posixpath.join(posixpath.dirname(image_path), line[3:].strip()))))
            elif m := PIN.fullmatch(line):
                pins[normalize(m.group(1))] = m.group(2)
        return pins

    pins: dict[str, str] = {}
    for rest in stg.args("RUN"):
        pins.update({normalize(n): v for n, v in PIN.findall(rest)})
        for image_path in re.findall(r"(?:^|\s)-r\s+(\S+)", rest):
            pins.update(read(image_path))
    return pins


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def holds(stages: list[Stage], path: str, stg: Stage | None = None) -> bool:
    """Whether ``path`` exists in stage ``stg`` (default: the final one): made by its own
    COPY or venv, or copied from another stage that holds it."""
    stg = stg or stages[-1]
    if any(_under(path, venv) for venv in stg.venvs()):
        return True
    for source, sources, dest, created in stg.copies():
        for top in created:
            if not _under(path, top):
                continue
            if source is None:
                return True
            if len(sources) == 1 and holds(stages, sources[0].rstrip("/") + path[len(top):], stage(stages, source)):
                return True
    return False


@pytest.fixture(scope="module")
def images() -> dict[str, list[Stage]]:
    return {name: parse_dockerfile(rel) for name, rel in DOCKERFILES.items()}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def airflow_services(compose) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items()
            if s.get("image", "").startswith("piarec-airflow:") or (s.get("command") or [""])[0] == "airflow"}


def python_stages(stages: list[Stage]) -> list[Stage]:
    """The stages that run Python: those whose RUN lines call it, and the final one."""
    return [s for s in stages if s.runs_python()] + ([stages[-1]] if not stages[-1].runs_python() else [])


# ---- Python ----------------------------------------------------------------------------

@pytest.mark.parametrize("image", [*PROJECT_IMAGES, "mlflow"])
def test_every_python_stage_has_the_projects_python(images, pyproject, image):
    requires = SpecifierSet(pyproject["requires-python"])
    for stg in python_stages(images[image]):
        minor = python_minor(stg.base)
        assert minor, f"{image}: stage {stg.name or 'final'} starts from {stg.base}, which names no Python version"
        assert requires.contains(f"{minor[0]}.{minor[1]}"), \
            f"{image}: {stg.base} has Python {minor[0]}.{minor[1]}, the project requires {requires}"
        for rest in stg.args("RUN"):  # a distro python would replace the base's interpreter
            assert not re.search(r"apt-get install[^&;|]*\bpython3", rest), f"{image}: installs a distro Python: {rest}"


def test_one_python_minor_in_every_image(images):
    minors = {(name, stg.name or "final"): python_minor(stg.base)
              for name, stages in images.items() for stg in python_stages(stages)}
    assert len(set(minors.values())) == 1, f"Python minors differ between images: {minors}"


@pytest.mark.parametrize("image", [*PROJECT_IMAGES, "mlflow"])
def test_a_venv_runs_on_the_interpreter_it_was_made_with(images, image):
    """A venv links to its base interpreter: the stage that makes a venv copied into the
    final image must start from the final image's base."""
    stages = images[image]
    for source, sources, _, _ in stages[-1].copies():
        if source is None:
            continue
        src_stage = stage(stages, source)
        for venv in src_stage.venvs():
            if any(venv == s.rstrip("/") or venv.startswith(s.rstrip("/") + "/") for s in sources):
                assert src_stage.base == stages[-1].base, \
                    f"{image}: venv {venv} made on {src_stage.base} runs on {stages[-1].base}"


def test_driver_and_executors_run_the_same_java(images):
    def jre(stages):
        copied = {src for src, sources, _, _ in stages[-1].copies() if "/opt/java/openjdk" in sources}
        assert copied, "the final stage copies no JRE"
        return {stage(stages, s).base for s in copied}

    assert jre(images["spark"]) == jre(images["airflow"])


# ---- versions ----------------------------------------------------------------------------

def test_pins_agree_across_images_requirement_files_and_makefile(images, pyproject):
    sources: dict[str, dict[str, set[str]]] = {}
    files = sorted((REPO / "docker").rglob("*requirements*.txt")) + sorted((REPO / "infra").rglob("*requirements*.txt")) \
        + [REPO / "dags" / "requirements.txt"]
    for path in files:
        for name, version in read_requirements(path).items():
            sources.setdefault(name, {}).setdefault(version, set()).add(str(path.relative_to(REPO)))
    for image, stages in images.items():
        for stg in stages:
            for rest in stg.args("RUN"):
                for name, version in PIN.findall(rest):
                    sources.setdefault(normalize(name), {}).setdefault(version, set()).add(DOCKERFILES[image])
    for name, version in PIN.findall((REPO / "Makefile").read_text()):
        sources.setdefault(normalize(name), {}).setdefault(version, set()).add("Makefile")
    for name, versions in sources.items():
        assert len(versions) == 1, f"{name} is pinned to different versions: {versions}"
    mlflow = {v for n in ("mlflow", "mlflow-skinny") for v in sources.get(n, {})}
    assert len(mlflow) == 1, f"mlflow and mlflow-skinny differ: {mlflow}"
    for dep in map(Requirement, pyproject["dependencies"]):
        for version in sources.get(normalize(dep.name), {}):
            assert dep.specifier.contains(version, prereleases=True), f"{dep.name}=={version} is outside pyproject's {dep}"


@pytest.mark.parametrize(("image", "stage_name", "needs", "torch_index"), [
    ("spark", "build", {"pyspark", "torch", "mlflow"}, r"/whl/cpu\b"),
    ("airflow", "project", {"pyspark", "torch", "mlflow"}, r"/whl/cpu\b"),
    ("trainer", "build", {"torch", "mlflow", "optuna"}, r"/whl/cu\d+\b"),
])
def test_project_environments_pin_the_core_packages(images, image, stage_name, needs, torch_index):
    stg = stage(images[image], stage_name)
    pins = stage_pins(stg)
    have = {("mlflow" if n == "mlflow-skinny" else n) for n in pins}
    assert needs <= have, f"{image}/{stage_name} does not pin {needs - have}"
    torch_runs = [r for r in stg.args("RUN") if "torch==" in r]
    assert torch_runs and all(re.search(rf"download\.pytorch\.org{torch_index}", r) for r in torch_runs), \
        f"{image}: torch must come from the PyTorch {torch_index} index"
    if "pyspark" in needs:  # a Spark Python environment: no Airflow, no pyspark-client over pyspark
        assert not {n for n in pins if n.startswith("apache-airflow") or n == "pyspark-client"}, \
            f"{image}/{stage_name}: Airflow packages in the Spark Python environment"


def test_airflow_image_is_the_pinned_airflow_with_the_dags_requirements(images):
    stages = images["airflow"]
    pins = stage_pins(stages[-1])
    dags = read_requirements(REPO / "dags" / "requirements.txt")
    assert dags.items() <= pins.items(), "the Airflow image must install dags/requirements.txt"
    tag = re.search(r"apache/airflow:(\d+\.\d+\.\d+)", stages[-1].base)
    assert tag and tag.group(1) == pins["apache-airflow"] == "3.3.2", stages[-1].base


# ---- the s3a connector -------------------------------------------------------------------

def load_s3a() -> types.ModuleType:
    """docker/spark/s3a_jars.py as a module (executed from source: no __pycache__ in docker/)."""
    path = REPO / "docker" / "spark" / "s3a_jars.py"
    module = types.ModuleType("s3a_jars")
    module.__file__ = str(path)
    exec(compile(path.read_text(), path, "exec"), module.__dict__)  # noqa: S102 -- the repository's own file
    return module


def test_no_connector_version_is_written_by_hand():
    hard_coded = re.compile(r"hadoop-aws[-:/]\d|HADOOP_AWS_VERSION|awssdk[/:]bundle[/:]\d|bundle-\d|aws-java-sdk-bundle")
    for path in (REPO / "docker").rglob("*"):
        if path.is_file() and path.suffix not in (".md", ".pyc"):
            assert not hard_coded.search(path.read_text()), f"{path.relative_to(REPO)} pins the s3a connector by hand"


@pytest.mark.parametrize("image", ["spark", "airflow"])
def test_spark_python_images_add_s3a_for_the_bundled_hadoop(images, image):
    stages = images[image]
    spark_stages = [s for s in stages if "pyspark" in stage_pins(s)]
    assert spark_stages, f"{image}: no stage installs pyspark"
    for stg in spark_stages:
        assert any(src == ["docker/spark/s3a_jars.py"] for _, src, _, _ in stg.copies()), f"{image}: s3a_jars.py not copied"
        assert any(S3A_RUN.search(r) for r in stg.args("RUN")), \
            f"{image}: s3a_jars.py must run on pyspark's jars folder"
    conf_dir = stages[-1].env().get("SPARK_CONF_DIR")
    assert conf_dir and holds(stages, f"{conf_dir}/spark-defaults.conf"), \
        f"{image}: spark-defaults.conf (s3:// -> s3a) is not in SPARK_CONF_DIR"


def _publish(repo: Path, group: str, artifact: str, version: str, pom: str | None = None, jar: bytes = b""):
    folder = repo.joinpath(*group.split("."), artifact, version)
    folder.mkdir(parents=True, exist_ok=True)
    if pom is not None:
        (folder / f"{artifact}-{version}.pom").write_text(pom)
    jar = jar or f"{artifact}-{version}".encode()
    (folder / f"{artifact}-{version}.jar").write_bytes(jar)
    (folder / f"{artifact}-{version}.jar.sha1").write_text(hashlib.sha1(jar).hexdigest() + "  x.jar\n")


HADOOP_PROJECT = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <groupId>org.apache.hadoop</groupId><artifactId>hadoop-project</artifactId><version>9.8.7</version>
  <properties><aws-java-sdk-v2.version>2.31.4</aws-java-sdk-v2.version><sdk>${aws-java-sdk-v2.version}</sdk></properties>
  <dependencyManagement><dependencies>
    <dependency><groupId>software.amazon.awssdk</groupId><artifactId>bundle</artifactId><version>${sdk}</version></dependency>
    <dependency><groupId>org.wildfly.openssl</groupId><artifactId>wildfly-openssl</artifactId><version>1.1.3.Final</version></dependency>
  </dependencies></dependencyManagement>
</project>"""
HADOOP_AWS = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <parent><groupId>org.apache.hadoop</groupId><artifactId>hadoop-project</artifactId><version>9.8.7</version></parent>
  <artifactId>hadoop-aws</artifactId><version>9.8.7</version>
  <dependencies>
    <dependency><groupId>org.apache.hadoop</groupId><artifactId>hadoop-common</artifactId><scope>provided</scope></dependency>
    <dependency><groupId>org.apache.hadoop.thirdparty</groupId><artifactId>hadoop-shaded-guava</artifactId><version>1.4.0</version></dependency>
    <dependency><groupId>software.amazon.awssdk</groupId><artifactId>bundle</artifactId><scope>compile</scope></dependency>
    <dependency><groupId>org.wildfly.openssl</groupId><artifactId>wildfly-openssl</artifactId><scope>runtime</scope></dependency>
    <dependency><groupId>junit</groupId><artifactId>junit</artifactId><version>4.13</version><scope>test</scope></dependency>
    <dependency><groupId>com.example</groupId><artifactId>opt</artifactId><version>1</version><optional>true</optional></dependency>
  </dependencies>
</project>"""


@pytest.fixture
def maven(tmp_path):
    repo = tmp_path / "repo"
    _publish(repo, "org.apache.hadoop", "hadoop-project", "9.8.7", HADOOP_PROJECT)
    _publish(repo, "org.apache.hadoop", "hadoop-aws", "9.8.7", HADOOP_AWS)
    _publish(repo, "software.amazon.awssdk", "bundle", "2.31.4")
    _publish(repo, "org.wildfly.openssl", "wildfly-openssl", "1.1.3.Final")
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "hadoop-client-api-9.8.7.jar").write_bytes(b"")
    (jars / "hadoop-client-runtime-9.8.7.jar").write_bytes(b"")
    return repo, jars


def test_s3a_jars_follow_the_bundled_hadoop_and_its_pom(maven):
    repo, jars = maven
    added = load_s3a().install(jars, repo.as_uri())
    assert sorted(p.name for p in added) == ["bundle-2.31.4.jar", "hadoop-aws-9.8.7.jar", "wildfly-openssl-1.1.3.Final.jar"]
    assert (jars / "bundle-2.31.4.jar").read_bytes() == b"bundle-2.31.4"


def test_s3a_jars_refuse_a_bad_checksum_a_missing_bundle_and_an_unknown_hadoop(maven, tmp_path):
    repo, jars = maven
    s3a = load_s3a()
    sha1 = repo / "software/amazon/awssdk/bundle/2.31.4/bundle-2.31.4.jar.sha1"
    good = sha1.read_text()
    sha1.write_text("0" * 40)
    with pytest.raises(SystemExit, match="SHA-1 mismatch"):
        s3a.install(jars, repo.as_uri())
    sha1.write_text(good)
    pom = repo / "org/apache/hadoop/hadoop-aws/9.8.7/hadoop-aws-9.8.7.pom"
    pom.write_text("\n".join(line for line in HADOOP_AWS.splitlines() if "<artifactId>bundle<" not in line))
    with pytest.raises(SystemExit, match="no software.amazon.awssdk:bundle"):
        s3a.install(jars, repo.as_uri())
    (jars / "hadoop-client-api-9.8.6.jar").write_bytes(b"")
    with pytest.raises(SystemExit, match="expected one hadoop-client-api"):
        s3a.hadoop_version(jars)
    with pytest.raises(SystemExit, match="found none"):
        s3a.hadoop_version(tmp_path)


def test_the_pinned_pyspark_ships_one_hadoop_client_api():
    """The script's assumption, on the pyspark the images pin (when it is the one installed)."""
    pinned = read_requirements(REPO / "docker" / "spark" / "requirements.txt")["pyspark"]
    try:
        installed = importlib.metadata.version("pyspark")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyspark is not installed here")
    if installed != pinned:
        pytest.skip(f"pyspark {installed} installed, the images pin {pinned}")
    import pyspark

    version = load_s3a().hadoop_version(Path(pyspark.__file__).parent / "jars")
    assert (Path(pyspark.__file__).parent / "jars" / f"hadoop-client-runtime-{version}.jar").is_file()


# ---- compose -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
                                 "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
def test_every_airflow_component_shares_one_value(compose, key):
    services = airflow_services(compose)
    assert {"airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-init"} <= set(services)
    values = {name: (svc.get("environment") or {}).get(key) for name, svc in services.items()}
    assert all(values.values()) and len(set(values.values())) == 1, f"{key} differs or is missing: {values}"
    text = (REPO / "infra" / "compose.yaml").read_text()
    assert len(re.findall(rf"^\s*{key}\s*:", text, re.M)) == 1, f"{key} must be written once (one anchor)"


def test_workers_reach_the_execution_api_on_the_api_server(compose):
    url = urlsplit(next(iter(airflow_services(compose).values()))["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    server = compose["services"].get(url.hostname)
    assert server and server.get("command", [])[:2] == ["airflow", "api-server"], f"{url.hostname} is not the api-server"
    container_ports = {str(p).rsplit(":", 1)[-1] for p in server.get("ports", [])} or {"8080"}
    assert str(url.port) in container_ports and url.path == "/execution/"
    secret = server["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert len(secret.encode()) >= 64, "HS512 wants a JWT secret of at least 64 bytes"


def test_mlflow_accepts_the_hosts_its_clients_use(compose):
    mlflow = compose["services"]["mlflow"]
    cmd = " ".join(mlflow["command"])
    m = re.search(r"--allowed-hosts[= ](\S+)", cmd)
    assert m, "mlflow server needs --allowed-hosts (MLflow >= 3.5 rejects other Host headers with 403)"
    allowed = m.group(1).split(",")
    assert "*" not in allowed

    def accepted(host: str) -> bool:  # mlflow.server.security_utils.is_allowed_host_header
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    pipeline = yaml.safe_load((REPO / "infra" / "conf" / "pipeline.yaml").read_text())
    uris = [pipeline["mlflow"]["tracking_uri"]] + [
        env["MLFLOW_TRACKING_URI"] for svc in compose["services"].values()
        if isinstance(env := svc.get("environment"), dict) and "MLFLOW_TRACKING_URI" in env]
    for uri in uris:
        netloc = urlsplit(uri).netloc
        assert urlsplit(uri).hostname in compose["services"], f"{uri}: no such service"
        assert accepted(netloc), f"{netloc} ({uri}) is not in --allowed-hosts {allowed}"
    for port in mlflow.get("ports", []):
        host_port = str(port).split(":")[-2]
        assert accepted(f"localhost:{host_port}") and accepted(f"127.0.0.1:{host_port}"), \
            f"the published UI (localhost:{host_port}) is not in --allowed-hosts"


def test_spark_submit_gives_driver_and_executors_their_own_python(compose, images):
    airflow, spark = images["airflow"], images["spark"]
    spark_services = [n for n, s in compose["services"].items() if s.get("image", "").startswith("piarec-spark:")]
    assert {"spark-master", "spark-worker"} <= set(spark_services)
    image_env = airflow[-1].env()
    for name, svc in airflow_services(compose).items():
        env = svc["environment"]
        keys = ("PIAREC_HOME", "PIAREC_VENV", "PIAREC_SPARK_SUBMIT", "PIAREC_SPARK_DRIVER_PYTHON", "PIAREC_SPARK_PYTHON")
        assert all(str(env.get(k, "")).startswith("/") for k in keys), f"{name}: {keys} must all be absolute paths"
        venv = env["PIAREC_VENV"]
        assert env["PIAREC_HOME"] == image_env["PIAREC_HOME"] and venv == image_env["PIAREC_VENV"]
        # the driver: the Airflow image's project venv (made there, copied into its final stage)
        assert env["PIAREC_SPARK_DRIVER_PYTHON"] == f"{venv}/bin/python"
        assert env["PIAREC_SPARK_SUBMIT"] == f"{venv}/bin/spark-submit"
        assert venv in {v for s in airflow for v in s.venvs()} and holds(airflow, venv), f"{venv}: not in the Airflow image"
        assert holds(airflow, f"{env['PIAREC_HOME']}/pipelines"), "PIAREC_HOME holds no pipelines/ in the Airflow image"
        # the executors: a venv of the Spark image, never Airflow's interpreter
        executor_venv = env["PIAREC_SPARK_PYTHON"].rsplit("/bin/", 1)[0]
        assert env["PIAREC_SPARK_PYTHON"] == f"{executor_venv}/bin/python"
        assert executor_venv in {v for s in spark for v in s.venvs()} and holds(spark, executor_venv), \
            f"{name}: PIAREC_SPARK_PYTHON={env['PIAREC_SPARK_PYTHON']} is not the Spark image's Python"
    assert spark[-1].env().get("PYSPARK_PYTHON", "").startswith(executor_venv + "/bin/"), \
        "the Spark image's own PYSPARK_PYTHON must be its venv"


def test_depends_on_names_existing_services_without_cycles(compose):
    services = compose["services"]
    graph = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = dict.fromkeys(deps, {}) if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in services and dep != name, f"{name} depends on {dep!r}, which is not another service"
            if (spec or {}).get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        graph[name] = set(deps)
    done: set[str] = set()
    while graph.keys() - done:  # peel services whose dependencies are all placed
        ready = {n for n in graph.keys() - done if graph[n] <= done}
        assert ready, f"depends_on cycle among {sorted(graph.keys() - done)}"
        done |= ready


def test_published_ports_bind_to_loopback(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else (str(port).split(":")[0] if str(port).count(":") == 2 else None)
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published on every interface"
