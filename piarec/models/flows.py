"""Inverse autoregressive flow (Kingma et al. 2016) for the "iaf" encoder of the PIA paper.

Each step maps ``z`` to ``sigma * z + (1 - sigma) * m`` where ``m`` and
``sigma = sigmoid(s)`` come from a MADE network that sees only earlier coordinates of
``z`` (plus the encoder's context ``h``). The Jacobian dz'/dz is triangular with
diagonal ``sigma``, so ``log|det| = sum(log sigma)``. Consecutive steps use reversed
coordinate orders so every coordinate can depend on every other after two steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(logvar)), same shape as ``z``."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask [out, in]."""

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step on d coordinates with a MADE of width ``hidden`` and context size ``context``."""

    def __init__(self, d: int, hidden: int, context: int, reverse: bool, forget_bias: float = 2.0):
        super().__init__()
        order = torch.arange(d - 1, -1, -1) if reverse else torch.arange(d)  # position of each coordinate
        deg_in = order + 1  # degrees 1..d
        deg_h = torch.arange(hidden) % max(d - 1, 1) + 1  # degrees 1..d-1
        self.inp = MaskedLinear(d, hidden, deg_h[:, None] >= deg_in[None, :])
        self.ctx = nn.Linear(context, hidden, bias=False)
        out_mask = deg_in[:, None] > deg_h[None, :]  # strictly earlier coordinates only
        self.out_m = MaskedLinear(hidden, d, out_mask)
        self.out_s = MaskedLinear(hidden, d, out_mask)
        # Start close to the identity: small outputs and sigma = sigmoid(forget_bias) ~ 0.88.
        for layer in (self.out_m, self.out_s):
            nn.init.normal_(layer.weight, 0.0, 1e-3)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.out_s.bias, forget_bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``z'`` [B, d] and ``log|det dz'/dz|`` [B]."""
        a = F.elu(self.inp(z) + self.ctx(h))
        m, s = self.out_m(a), self.out_s(a)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(dim=1)


class IAF(nn.Module):
    """``steps`` IAF steps with alternating coordinate orders."""

    def __init__(self, d: int, hidden: int, context: int, steps: int):
        super().__init__()
        self.steps = nn.ModuleList(IAFStep(d, hidden, context, reverse=bool(t % 2)) for t in range(steps))

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_T [B, d] and the summed log-determinant [B]."""
        logdet = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for step in self.steps:
            z, ld = step(z, h)
            logdet = logdet + ld
        return z, logdet
