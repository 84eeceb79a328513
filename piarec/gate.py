"""`piarec promote`: the promotion gate between the ``challenger`` and ``champion`` aliases.

The gate reads the metrics the training run stored as tags on the registered version,
decides, records the decision (and its reasons) on the version and on the training run,
and moves ``champion`` only when the challenger passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from piarec import registry
from piarec.config import PipelineConfig
from piarec.errors import ModelNotFoundError

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass
class GateDecision:
    promoted: bool
    challenger: str
    champion_before: str | None
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "promoted" if self.promoted else "refused"
        return f"version {self.challenger} {verdict}: " + "; ".join(self.reasons)


def _metric(tags: dict[str, str], key: str, version: str) -> float:
    if key not in tags:
        raise ModelNotFoundError(f"model version {version} has no {key!r} tag; was it registered by `piarec train`?")
    return float(tags[key])


def promote(cfg: PipelineConfig) -> GateDecision:
    """Promote the challenger when its validation metric beats popularity's by
    ``cfg.gate.min_uplift_over_popularity`` (relative)."""
    name = cfg.mlflow.registered_model
    challenger = registry.alias_version(cfg, CHALLENGER)
    if challenger is None:
        raise ModelNotFoundError(f"registered model {name!r} has no {CHALLENGER!r} alias; run `piarec train` first")
    champion = registry.alias_version(cfg, CHAMPION)
    c = registry.client(cfg)
    mv = c.get_model_version(name, challenger)
    metric = cfg.gate.metric
    model_value = _metric(mv.tags, f"val_{metric}", challenger)
    pop_value = _metric(mv.tags, f"popularity_val_{metric}", challenger)
    needed = pop_value * (1.0 + cfg.gate.min_uplift_over_popularity)

    decision = GateDecision(promoted=model_value > needed, challenger=challenger, champion_before=champion)
    relation = ">" if decision.promoted else "<="
    decision.reasons.append(
        f"validation {metric} {model_value:.4f} {relation} {needed:.4f} (popularity {pop_value:.4f})"
    )
    if challenger == champion:
        decision.reasons.append("challenger is already champion")

    c.set_model_version_tag(name, challenger, "gate_decision", decision.summary())
    if mv.run_id:
        c.set_tag(mv.run_id, "gate_decision", decision.summary())
    if decision.promoted:
        registry.set_alias(cfg, CHAMPION, challenger)
    return decision
