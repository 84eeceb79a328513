"""Counter-based noise: random draws keyed by (stream, user, element) instead of read from a
generator's state.

The same user draws the same input mask and the same reparameterisation noise in a pass,
whichever process, batch or position it lands in: data-parallel training
(:mod:`piarec.train.distributed`) then equals one process over the same global batches
(docs/training-scale.md). The hash is murmur3's 32-bit finaliser, chained over the keys and
computed in int64 without overflow, so it gives the same bits on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KeyedNoise", "hash32", "stream_key"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32): 16-bit halves keep every product below 2**49."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(*keys: torch.Tensor | int) -> torch.Tensor:
    """A 32-bit hash (int64 tensor in [0, 2**32)) of broadcastable non-negative int keys
    (each taken mod 2**32)."""
    h = None
    for key in keys:
        k = torch.as_tensor(key, dtype=torch.int64) & _M32
        h = _fmix32(k if h is None else h ^ k)
    return h


def stream_key(seed: int, pass_index: int) -> int:
    """The ``stream`` of one pass over the training users (the run's seed, the pass's index
    since the start of training): one number that keys every draw of that pass."""
    return int(hash32(seed, pass_index))


def _unit(h: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) from 32-bit hashes: the top 24 bits, centred in their cell."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class KeyedNoise:
    """Draws for one batch keyed by ``stream`` (seed and pass) and each row's global user id
    ``users`` (int64 [B], on the batch's device)."""

    stream: int
    users: torch.Tensor

    def entry_uniform(self, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """U(0, 1) per stored entry (its batch row ``rows`` and item ``items``, int64 [nnz]),
        float32 [nnz], keyed by (stream, user, item)."""
        return _unit(hash32(self.stream, 0x51ED27, self.users[rows], items))

    def normal(self, d: int) -> torch.Tensor:
        """N(0, 1) float32 [B, d], keyed by (stream, user, dimension); Box-Muller."""
        dims = torch.arange(d, device=self.users.device)
        base = hash32(self.stream, 0x2545F491, self.users[:, None], dims[None, :])
        u1, u2 = _unit(base), _unit(_fmix32(base ^ 0x9E3779B9))
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
