"""Loading the configuration: packaged local default, a YAML file, the environment, overrides.

Precedence, lowest first: the typed defaults of :mod:`piarec.config.schema`, the packaged
``piarec/defaults/local.yaml`` (only what the embedded local stack sets differently), the
YAML file at ``path`` or ``$PIAREC_CONFIG``, ``PIAREC__*`` environment variables, then the
explicit ``overrides`` of the CLI.

Environment variables ``PIAREC__SECTION__KEY=value`` are resolved against the model
classes, not guessed from the text:

* field names match case-insensitively (``PIAREC__TRAINING__EPOCHS`` is ``training.epochs``);
  an unknown field fails with :class:`ConfigError` naming the variable;
* below a map field (``spark.conf``, any ``dict[str, ...]``) the key is kept verbatim
  (``PIAREC__SPARK__CONF__spark.sql.adaptive.coalescePartitions.enabled``);
* a ``str`` field (``str | None``, or a ``Literal`` of strings) gets the raw string, so
  ``true`` stays ``"true"``; any other type gets the value parsed as a YAML scalar or flow
  value (``30``, ``false``, ``[play]``) and pydantic validates it;
* an empty value is null for a field that accepts null.

Nothing here touches the filesystem or global state at import time.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping as AbcMapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from piarec.config.schema import TUNABLE_SECTIONS, PipelineConfig
from piarec.errors import ConfigError

ENV_PREFIX = "PIAREC__"
CONFIG_ENV = "PIAREC_CONFIG"
_DEFAULT_YAML = "defaults/local.yaml"  # inside the piarec package (package data)

_NONE = type(None)


def _default_yaml() -> dict[str, Any]:
    text = resources.files("piarec").joinpath(_DEFAULT_YAML).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"packaged piarec/{_DEFAULT_YAML} must hold a mapping at the top level")
    return data


# -- reading the model's annotations ------------------------------------------------------

def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(tp without None and Annotated, whether None is accepted)``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        rest = [a for a in args if a is not _NONE]
        nullable = len(rest) < len(args)
        if len(rest) == 1:
            inner, inner_nullable = _unwrap(rest[0])
            return inner, nullable or inner_nullable
        return Union[tuple(rest)], nullable
    return tp, tp is _NONE or tp is Any


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _map_value_type(tp: Any) -> Any | None:
    """The value type of a map annotation (``dict[str, V]``, ``Mapping[str, V]``), else None."""
    origin = get_origin(tp)
    if tp is dict or origin is dict or (origin is not None and origin is AbcMapping):
        args = get_args(tp)
        return args[1] if len(args) == 2 else Any
    return None


def _is_str_like(tp: Any) -> bool:
    """A type whose env value is taken as the raw string: str, a Literal of strings, a union of them."""
    tp, _ = _unwrap(tp)
    if tp is str:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return all(isinstance(v, str) for v in get_args(tp))
    if origin is Union or origin is types.UnionType:
        return all(_is_str_like(a) for a in get_args(tp))
    return False


def _resolve(name: str, parts: list[str]) -> tuple[tuple[str, ...], Any]:
    """The canonical key path of an env variable's parts and the annotation at its end."""
    tp: Any = PipelineConfig
    path: list[str] = []
    for part in parts:
        inner, _ = _unwrap(tp)
        value_type = _map_value_type(inner)
        if _is_model(inner):
            by_lower = {f.lower(): f for f in inner.model_fields}
            field = by_lower.get(part.lower())
            if field is None:
                key = ".".join([*path, part.lower()])
                allowed = ", ".join(inner.model_fields)
                raise ConfigError(f"environment variable {name}: unknown key {key!r} "
                                  f"(known keys{' of ' + '.'.join(path) if path else ''}: {allowed})")
            path.append(field)
            tp = inner.model_fields[field].annotation
        elif value_type is not None:
            path.append(part)  # a map key: verbatim, case and dots included
            tp = value_type
        else:
            raise ConfigError(f"environment variable {name}: {'.'.join(path)!r} is a value, "
                              f"not a section (it has no key {part!r})")
    return tuple(path), tp


def _parse(name: str, raw: str, tp: Any) -> Any:
    """The value of one env variable for a field of annotation ``tp``."""
    _, nullable = _unwrap(tp)
    if raw == "" and nullable:
        return None
    if _is_str_like(tp):
        return raw
    if raw == "":
        return None  # pydantic names the field and the missing value
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"environment variable {name}: {raw!r} is not a YAML value ({detail})") from None


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any, name: str) -> None:
    node = tree
    for i, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment variable {name}: {'.'.join(path[:i + 1])} "
                              "is set to a value by another variable, not a section")
        node = child
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Collect ``PIAREC__A__B=v`` variables into a nested dict ``{"a": {"b": v}}``.

    Keys are the model's field names (matched case-insensitively) and, below a map field,
    the variable's text verbatim; values follow the field's type (see the module doc).
    """
    tree: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        path, tp = _resolve(name, parts)
        if path in seen:
            raise ConfigError(f"environment variables {seen[path]} and {name} both set {'.'.join(path)}")
        seen[path] = name
        _set_path(tree, path, _parse(name, raw, tp), name)
    return tree


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_tuned(text: str, source: str) -> dict[str, Any]:
    """A tuned configuration (what ``piarec tune`` writes): YAML holding only the tunable
    sections (model, pia, training). Anything else -- a storage root, an MLflow server --
    is refused, so a tuned file can change how a model trains but not where anything goes."""
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"tuned config {source!r} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"tuned config {source!r} must hold a mapping at the top level")
    other = sorted(set(loaded) - set(TUNABLE_SECTIONS))
    if other:
        raise ConfigError(f"tuned config {source!r} may set only {', '.join(TUNABLE_SECTIONS)}; "
                          f"it also sets {', '.join(map(str, other))}")
    return loaded


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    tuned: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Load the pipeline configuration.

    Precedence, lowest first: the typed defaults, the packaged local default, the YAML file
    at ``path`` (or ``$PIAREC_CONFIG``), ``tuned`` (a tuned configuration, :func:`parse_tuned`),
    ``PIAREC__*`` environment variables, then ``overrides`` (a nested dict, used by the CLI
    for explicit options).
    """
    environ = os.environ if environ is None else environ
    data = _default_yaml()
    path = path or environ.get(CONFIG_ENV)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = deep_merge(data, loaded)
    if tuned:
        data = deep_merge(data, tuned)
    data = deep_merge(data, env_overrides(environ))
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration: {_describe(err)}") from None
