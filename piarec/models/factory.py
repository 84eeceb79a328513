"""Build the model a :class:`~piarec.config.ModelConfig` describes."""

from __future__ import annotations

from piarec.config import ModelConfig
from piarec.models.contract import RecommenderModel
from piarec.models.multivae import MultiVAE
from piarec.models.recvae import RecVAE


def build_model(n_items: int, cfg: ModelConfig) -> RecommenderModel:
    """The model ``cfg`` describes, freshly initialised, on CPU."""
    if n_items < 1:
        raise ValueError(f"a model needs at least one item, got n_items={n_items}")
    if cfg.backbone == "recvae":  # (ModelConfig refuses regularizers for RecVAE)
        return RecVAE(n_items, cfg)
    return MultiVAE(n_items, cfg)
