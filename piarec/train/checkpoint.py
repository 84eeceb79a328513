"""The training checkpoint: the one place its layout is written and read.

A checkpoint holds everything a run needs to continue exactly where it stopped: the
weights, every optimizer, the update counter, the best epoch so far (its weights and
metrics), the λ_A schedule and every random-number generator. It is saved after each
epoch (atomically: a local rename, or one S3 PUT) and loaded weights-only: tensors and
plain values, never code.

The key names are the format: checkpoints written by piarec 0.1.0 load unchanged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from typing import Any

import torch

from piarec.data.storage import exists, read_bytes, replace_bytes, resolve

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint"]


@dataclass
class TrainState:
    """A training run between two epochs."""

    model: dict[str, torch.Tensor]  # the current weights (state_dict)
    optimizers: dict[str, dict[str, Any]]  # parameter group -> optimizer state_dict
    step: int  # updates made so far
    epoch: int  # the last completed epoch
    best_ndcg: float  # best validation metric so far
    best_epoch: int
    since_best: int  # epochs since the best one
    best_state: dict[str, torch.Tensor] | None  # the best epoch's weights (CPU)
    best_metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per completed epoch
    lambda_a: float  # the λ_A schedule: its value ...
    lambda_stall: int  # ... and its stall counter
    torch_rng: torch.Tensor
    numpy_rng: dict[str, Any]  # numpy Generator.bit_generator.state
    cuda_rng: torch.Tensor | None = None  # on a GPU only

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["cuda_rng"] is None:
            del out["cuda_rng"]
        return out

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "TrainState":
        names = {f.name for f in fields(cls)}
        missing = names - set(state) - {"cuda_rng"}
        if missing:
            raise ValueError(f"the checkpoint lacks {', '.join(sorted(missing))}; it was not written by piarec")
        return cls(**{k: v for k, v in state.items() if k in names})


def save_checkpoint(uri: str, state: TrainState) -> None:
    """Write ``state`` at ``uri`` (a local path or ``s3://``); a crash mid-write leaves the
    previous checkpoint in place, never a truncated one."""
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    replace_bytes(resolve(uri), buf.getvalue())


def load_checkpoint(uri: str, device: torch.device) -> TrainState | None:
    """The checkpoint at ``uri``, or None when there is none. Loaded weights-only."""
    loc = resolve(uri)
    if not exists(loc):
        return None
    return TrainState.from_dict(torch.load(io.BytesIO(read_bytes(loc)), map_location=device, weights_only=True))
