"""The one place that decides where tensors live."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when one is present, else the CPU. ``cuda`` without a
    GPU is an error rather than a silent fallback."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("training.device is 'cuda' but no CUDA GPU is available")
    return torch.device("cpu")
