"""Put the s3a connector matching a Spark distribution's Hadoop into its jars folder.

Run at image build time (stdlib only)::

    python s3a_jars.py "$SPARK_HOME/jars"

The Hadoop version is read from the ``hadoop-client-api-<version>.jar`` Spark ships, so
``hadoop-aws`` is never pinned by hand: a Spark upgrade brings the matching connector.
The jars added are ``hadoop-aws-<version>.jar`` and the direct runtime dependencies its
POM names outside ``org.apache.hadoop`` (the shaded Hadoop client jars already hold
those): the AWS SDK v2 ``bundle`` (required) and whatever else that release lists. Their
versions come from the POM, its properties and its parents' ``dependencyManagement``, as
Maven would resolve them. Dependencies of those dependencies are not followed (the SDK
bundle is shaded and self-contained). Every download is checked against the
repository's ``.sha1``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
HADOOP_CLIENT_API = re.compile(r"hadoop-client-api-(\d+\.\d+\.\d+[\w.\-]*)\.jar")
RUNTIME_SCOPES = {"compile", "runtime"}


def hadoop_version(jars_dir: Path) -> str:
    """The Hadoop version of the ``hadoop-client-api-<version>.jar`` in ``jars_dir``."""
    found = sorted({m.group(1) for p in jars_dir.glob("hadoop-client-api-*.jar")
                    if (m := HADOOP_CLIENT_API.fullmatch(p.name))})
    if len(found) != 1:
        raise SystemExit(f"expected one hadoop-client-api-<version>.jar in {jars_dir}, found {found or 'none'}")
    return found[0]


def _url(repo: str, group: str, artifact: str, version: str, ext: str) -> str:
    return f"{repo}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{ext}"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 -- a fixed https/file repository
        return resp.read()


def _text(elem: ET.Element, path: str) -> str | None:
    found = elem.find(path)
    return None if found is None or found.text is None else found.text.strip()


def _is_hadoop(group: str) -> bool:
    """Hadoop's own artifacts (and its shaded third-party ones) are in Spark's
    hadoop-client-api / hadoop-client-runtime jars already."""
    return group == "org.apache.hadoop" or group.startswith("org.apache.hadoop.")


class Pom:
    """One POM and its parent chain: enough to resolve its dependencies' versions."""

    def __init__(self, repo: str, group: str, artifact: str, version: str):
        root = ET.fromstring(_get(_url(repo, group, artifact, version, "pom")))
        for elem in root.iter():  # drop the POM namespace (old POMs have none)
            if isinstance(elem.tag, str):
                elem.tag = elem.tag.rsplit("}", 1)[-1]
        self.root, self.version = root, version
        parent = root.find("parent")
        self.parent = None if parent is None else Pom(
            repo, _text(parent, "groupId"), _text(parent, "artifactId"), _text(parent, "version"))
        self.properties = {prop.tag: (prop.text or "").strip() for prop in root.findall("properties/*")}

    def prop(self, name: str) -> str | None:
        """A property as Maven sees it from this POM: its own first, then its parents'."""
        if name in ("project.version", "version"):
            return self.version
        if name == "project.parent.version" and self.parent is not None:
            return self.parent.version
        if name in self.properties:
            return self.properties[name]
        return self.parent.prop(name) if self.parent is not None else None

    def interpolate(self, value: str) -> str:
        for _ in range(10):  # a property may refer to another
            new = re.sub(r"\$\{([^}]+)\}", lambda m: self.prop(m.group(1)) or m.group(0), value)
            if new == value:
                break
            value = new
        if "${" in value:
            raise SystemExit(f"cannot resolve {value!r} from the POM properties")
        return value

    def managed_version(self, group: str, artifact: str) -> str | None:
        """The raw version ``dependencyManagement`` gives, nearest POM first."""
        for dep in self.root.findall("dependencyManagement/dependencies/dependency"):
            if (_text(dep, "groupId"), _text(dep, "artifactId")) == (group, artifact) and _text(dep, "version"):
                return _text(dep, "version")
        return self.parent.managed_version(group, artifact) if self.parent is not None else None

    def runtime_dependencies(self) -> list[tuple[str, str, str]]:
        """(group, artifact, version) of the direct compile/runtime, non-optional jar
        dependencies outside Hadoop, versions interpolated with this POM's properties."""
        deps = []
        for dep in self.root.findall("dependencies/dependency"):
            group, artifact = _text(dep, "groupId"), _text(dep, "artifactId")
            if ((_text(dep, "scope") or "compile") not in RUNTIME_SCOPES or _text(dep, "optional") == "true"
                    or (_text(dep, "type") or "jar") != "jar" or _is_hadoop(group)):
                continue
            version = _text(dep, "version") or self.managed_version(group, artifact)
            if not version:
                raise SystemExit(f"no version for {group}:{artifact} in the POM or its parents")
            deps.append((group, artifact, self.interpolate(version)))
        return deps


def download(repo: str, group: str, artifact: str, version: str, dest: Path) -> Path:
    """Fetch one jar into ``dest``, checked against the repository's SHA-1."""
    url = _url(repo, group, artifact, version, "jar")
    data = _get(url)
    expected = _get(url + ".sha1").decode().split()[0].lower()
    if hashlib.sha1(data).hexdigest() != expected:  # noqa: S324 -- Maven's published checksum
        raise SystemExit(f"{url}: SHA-1 mismatch (expected {expected})")
    path = dest / f"{artifact}-{version}.jar"
    path.write_bytes(data)
    return path


def install(jars_dir: Path, repo: str = MAVEN_CENTRAL) -> list[Path]:
    """Add hadoop-aws for the bundled Hadoop and its runtime dependencies to ``jars_dir``."""
    version = hadoop_version(jars_dir)
    pom = Pom(repo, "org.apache.hadoop", "hadoop-aws", version)
    deps = pom.runtime_dependencies()
    if not any(group == "software.amazon.awssdk" and artifact == "bundle" for group, artifact, _ in deps):
        raise SystemExit(f"hadoop-aws {version} names no software.amazon.awssdk:bundle dependency")
    return [download(repo, g, a, v, jars_dir) for g, a, v in [("org.apache.hadoop", "hadoop-aws", version), *deps]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jars_dir", type=Path, help="the Spark distribution's jars folder")
    parser.add_argument("--repo", default=MAVEN_CENTRAL, help="Maven repository URL (default: Maven Central)")
    args = parser.parse_args(argv)
    for path in install(args.jars_dir, args.repo.rstrip("/")):
        print(f"added {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
