"""The ``piarec`` command: one parser, parsed once; the Spark entry points parse the same
options; one error wrapper."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import piarec
from piarec.cli import build_parser, main, run_command
from piarec.cli import app, options
from piarec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    env.update(COLUMNS="100", **extra)
    return env


def _python(code: str, *args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, env=_env(**env), timeout=120)


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- parsing once
def test_a_job_name_as_an_option_value_is_just_a_value():
    args = build_parser().parse_args(["report", "--run", "abc", "--out", "score"])
    assert (args.command, args.run, args.out, args.func) == ("report", "abc", "score", app.cmd_report)


REPORT_STUB = r"""
import json, sys
from piarec.cli import app, main
seen = []
app.cmd_report = lambda args: seen.append((args.command, args.run, args.out)) or 0
rc = main(["report", "--run", "abc", "--out", "score"])
print(json.dumps({"rc": rc, "seen": seen, "jobs": sorted(m for m in sys.modules if m.startswith("pipelines"))}))
"""


def test_report_with_out_score_runs_report_and_never_imports_the_score_job():
    proc = _python(REPORT_STUB)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"rc": 0, "seen": [["report", "abc", "score"]], "jobs": []}


def test_score_help_names_piarec_score_and_lists_the_job_options(capsys, monkeypatch):
    out = _help(["score", "--help"], capsys, monkeypatch)
    assert out.startswith("usage: piarec score ")
    for flag in ("--date", "--engine", "--histories", "--events", "--challenger-share", "--threads",
                 "--config", "--debug"):
        assert flag in out
    assert "spark,local" in out


def test_top_level_help_lists_every_command_with_its_one_line_help(capsys, monkeypatch):
    out = _flat(_help(["--help"], capsys, monkeypatch))
    assert out.startswith("usage: piarec ")
    for name in ("build-matrix", "score", "train", "ops", "generate-events"):
        text = options.COMMANDS[name][1]
        assert f"{name} {_flat(text)}" in out
    assert "--version" in out and "before or after the command" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"piarec {piarec.__version__}"


def _options_section(text: str) -> str:
    return text[text.index("\noptions:"):]


def test_the_spark_entry_point_parses_the_same_options_as_piarec_score():
    cli = subprocess.run([sys.executable, "-m", "piarec", "score", "--help"], capture_output=True,
                         text=True, cwd=REPO, env=_env(), timeout=120)
    job = subprocess.run([sys.executable, "pipelines/score_users.py", "--help"], capture_output=True,
                         text=True, cwd=REPO, env=_env(), timeout=120)
    assert cli.returncode == job.returncode == 0, job.stderr[-2000:]
    assert job.stdout.startswith("usage: score_users ")
    flags = lambda text: sorted(set(re.findall(r"--[a-z][a-z-]*", text)))  # noqa: E731
    assert flags(job.stdout) == flags(cli.stdout)
    assert "--histories" in flags(job.stdout) and "--config" in flags(job.stdout)
    # Same names, defaults and help: the option sections are identical.
    assert _options_section(job.stdout) == _options_section(cli.stdout)


def test_build_matrix_job_and_cli_share_options_and_checks(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    ns = options.parse_job_args("build-matrix", ["--daily", "--date", "2026-04-01", "--debug"], "build_matrix")
    assert (ns.daily, str(ns.date), ns.debug, ns.config, ns.window_end) == (True, "2026-04-01", True, None, None)
    with pytest.raises(SystemExit) as exit_:
        main(["build-matrix", "--daily"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["piarec build-matrix: error: --daily needs --date (and no --window-end) "
                   "(see piarec build-matrix --help)"]


# --------------------------------------------------------------------------- global options
@pytest.mark.parametrize("argv", [
    ["--config", "x.yaml", "train", "--snapshot", "s"],
    ["train", "--config", "x.yaml", "--snapshot", "s"],
    ["train", "--snapshot", "s", "--config", "x.yaml"],
])
def test_config_before_or_after_the_command_reaches_the_loader(argv, monkeypatch, capsys):
    import piarec.config

    seen = []

    def fake_load(path=None, **kw):
        seen.append(path)
        raise ConfigError("stop here")

    monkeypatch.setattr(piarec.config, "load_config", fake_load)
    assert main(argv) == 2
    assert seen == ["x.yaml"]
    assert capsys.readouterr().err.strip() == "error: stop here"


def test_a_global_option_before_the_command_survives_the_sub_parser():
    args = build_parser().parse_args(["--debug", "--config", "a.yaml", "score", "--date", "2026-04-01"])
    assert (args.debug, args.config) == (True, "a.yaml")
    args = build_parser().parse_args(["--config", "a.yaml", "score", "--date", "2026-04-01", "--config", "b.yaml"])
    assert args.config == "b.yaml" and args.debug is False
    args = build_parser().parse_args(["ops", "--debug", "events-ready", "--day", "2026-04-01", "--config", "c.yaml"])
    assert (args.ops_command, args.debug, args.config) == ("events-ready", True, "c.yaml")


@pytest.mark.parametrize("argv", [["--config", "x.yaml", "train", "--snapshot", "s"],
                                  ["train", "--snapshot", "s", "--config", "x.yaml"]])
def test_a_missing_config_file_is_one_line_and_status_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIAREC_CONFIG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config file 'x.yaml' does not exist"]


def test_a_bad_date_is_one_line_naming_the_value(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--date", "2026-13-01"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'2026-13-01'" in err[0] and err[0].startswith("piarec score: error: ")


# --------------------------------------------------------------------------- piarec ops
def test_ops_events_ready_exits_1_while_a_partition_is_missing(tmp_path):
    root = tmp_path / "work"
    (root / "events" / "dt=2026-04-09").mkdir(parents=True)
    (root / "events" / "dt=2026-04-09" / "_SUCCESS").write_text("")  # the day is complete
    (root / "events" / "dt=2026-04-08").mkdir(parents=True)  # still being written: no marker
    config = tmp_path / "cfg.yaml"
    config.write_text(f"storage:\n  root: {root}\n")
    cmd = [sys.executable, "-m", "piarec", "ops", "events-ready", "--config", str(config)]
    ready = subprocess.run([*cmd, "--day", "2026-04-09"], capture_output=True, text=True, env=_env(), timeout=120)
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout.strip() == "all 1 event partitions of [2026-04-09, 2026-04-10) are complete"
    waiting = subprocess.run([*cmd, "--start", "2026-04-08", "--end", "2026-04-10"], capture_output=True,
                             text=True, env=_env(), timeout=120)
    assert waiting.returncode == 1, waiting.stderr
    assert waiting.stdout.strip() == (f"waiting for 1 event partition(s) under {root}/events to be complete "
                                      "(_SUCCESS): dt=2026-04-08")


def test_ops_usage_and_errors_never_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PIAREC_CONFIG", raising=False)
    monkeypatch.setenv("PIAREC__STORAGE__ROOT", str(tmp_path))
    assert main(["ops", "events-ready"]) == 2  # no range given
    assert capsys.readouterr().err.strip() == "error: events-ready needs --day, --window-end, or --start and --end"
    with pytest.raises(SystemExit) as exit_:
        main(["ops", "snapshot-uri"])
    assert exit_.value.code == 2
    assert main(["ops", "snapshot-uri", "--window-end", "2026-04-06"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}/snapshots/window_end=2026-04-06"
    assert main(["ops", "snapshot-uri", "--window-end", "2026-04-06", "--require-published"]) == 2


# --------------------------------------------------------------------------- run_command
def test_run_command_maps_errors_to_one_line_and_status(capsys):
    def boom(exc):
        def fn():
            raise exc
        return fn

    assert run_command(lambda: 0, False) == 0
    assert run_command(lambda: 1, False) == 1
    assert run_command(boom(ConfigError("bad key")), False) == 2
    assert capsys.readouterr().err == "error: bad key\n"
    assert run_command(boom(ConfigError("bad key")), False, prog="score_users") == 2
    assert capsys.readouterr().err == "score_users: error: bad key\n"
    assert run_command(boom(KeyboardInterrupt()), False) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert run_command(boom(RuntimeError("disk full\n  at some.jvm.Frame")), False) == 2
    assert capsys.readouterr().err == "error: RuntimeError: disk full (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        run_command(boom(RuntimeError("x")), True)
    with pytest.raises(ConfigError):
        run_command(boom(ConfigError("x")), True)


# --------------------------------------------------------------------------- imports
def test_parsing_imports_nothing_heavy():
    code = ("import sys; import piarec.cli.options, piarec.cli; from piarec.cli import build_parser; "
            "build_parser().parse_args(['score', '--date', '2026-04-01']); "
            "print(sorted(m for m in ('torch', 'pyspark', 'mlflow', 'pipelines', 'numpy', 'pyarrow') "
            "if m in sys.modules))")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) imports of a file, as absolute module names."""
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        else:
            continue
        up, in_function = node, False
        while up in parents:
            up = parents[up]
            in_function |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        (inner if in_function else top).update(names)
    return top, inner


def test_no_import_cycle_between_the_cli_and_the_jobs():
    files = {f"piarec.cli.{p.stem}" if p.stem != "__init__" else "piarec.cli": p
             for p in (REPO / "piarec" / "cli").glob("*.py")}
    files |= {f"pipelines.{p.stem}": p for p in (REPO / "pipelines").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in files.items():
        top, inner = _imports(path)
        # A job's own ``__main__`` block imports itself by name: not a cycle.
        graph[name] = {m for m in top | inner if m in files and m != name}
    assert "pipelines.score_users" in graph["piarec.cli.app"]  # lazily, in its handler
    assert "piarec.cli.options" in graph["pipelines.score_users"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen

    assert [m for m in graph if m in reach(m)] == []
    # The light modules the jobs import lead nowhere near the jobs.
    for light in ("piarec.cli.options", "piarec.cli.errors"):
        assert not {m for m in reach(light) if m.startswith("pipelines")}
        top, inner = _imports(files[light])
        assert {m.split(".")[0] for m in top | inner} <= {"__future__", "argparse", "datetime", "sys", "typing",
                                                         "piarec"}
        assert {m for m in top | inner if m.startswith("piarec")} <= {"piarec.errors", "piarec.errors.PiarecError"}
