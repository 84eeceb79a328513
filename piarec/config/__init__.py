"""Typed configuration for the whole pipeline.

One :class:`PipelineConfig` describes every stage. Its section models and every default
live in :mod:`piarec.config.schema`; :mod:`piarec.config.loader` layers the packaged local
default (``piarec/defaults/local.yaml``, only what the embedded local stack changes), a YAML
file and ``PIAREC__SECTION__KEY=value`` environment variables on top (field names match
case-insensitively, map keys such as ``spark.conf`` keys are kept verbatim, and values
follow the field's type: raw strings for ``str`` fields, YAML scalars otherwise).

Unknown keys and wrong types fail with :class:`ConfigError`, naming the key.
Nothing here touches the filesystem or global state at import time. This package imports
only the standard library, pydantic, yaml and :mod:`piarec.errors`.
"""

from piarec.config.loader import CONFIG_ENV, ENV_PREFIX, deep_merge, env_overrides, load_config, parse_tuned
from piarec.config.schema import (
    BASELINES,
    ArmConfig,
    DiagnosticsConfig,
    EventsSchema,
    FilterConfig,
    GateConfig,
    GateMetric,
    MlflowConfig,
    ModelConfig,
    PIAConfig,
    PipelineConfig,
    PositiveRule,
    QualityConfig,
    RegularizerConfig,
    ScoringConfig,
    SearchParam,
    SparkConfig,
    SplitConfig,
    StorageConfig,
    TrainingConfig,
    TUNABLE_SECTIONS,
    TuneConfig,
    check_arms,
    integer_field,
    space_field,
)
from piarec.errors import ConfigError

__all__ = [
    "ArmConfig",
    "BASELINES",
    "CONFIG_ENV",
    "ENV_PREFIX",
    "ConfigError",
    "DiagnosticsConfig",
    "EventsSchema",
    "FilterConfig",
    "GateConfig",
    "GateMetric",
    "MlflowConfig",
    "ModelConfig",
    "PIAConfig",
    "PipelineConfig",
    "PositiveRule",
    "QualityConfig",
    "RegularizerConfig",
    "ScoringConfig",
    "SearchParam",
    "SparkConfig",
    "SplitConfig",
    "StorageConfig",
    "TrainingConfig",
    "TUNABLE_SECTIONS",
    "TuneConfig",
    "check_arms",
    "deep_merge",
    "env_overrides",
    "integer_field",
    "load_config",
    "parse_tuned",
    "space_field",
]
