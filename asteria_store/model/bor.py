"""BOR: butterfly orthogonal rotation with learnable angles (torch).

``R = B_L ... B_1``; layer ``l`` rotates the coordinate pairs ``(i, i + s)`` at stride
``s = 2**(l mod log2 D)`` by its own angle (one Givens rotation per pair, D/2 per layer).
The dimension is zero-padded to the next power of two D. Every layer is orthogonal by
construction, so R is exactly orthogonal for any angles, and applying it costs O(D log D)
per vector. At inference it is materialised once as a dense D x D matrix (a BLAS matmul
beats a Python loop over layers).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class ButterflyRotation(nn.Module):
    """An exactly orthogonal D x D rotation with L * D/2 learnable angles.

    Args:
        dim: input dimension (padded to D = next power of two).
        layers: number of butterfly layers; default log2(D) (every coordinate can reach
            every other). More layers: a richer family of rotations, more parameters.
        init_scale: angles start uniform in [-init_scale, init_scale]; 0 is the identity.
    """

    def __init__(self, dim: int, layers: int | None = None, *, init_scale: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.dim = dim
        self.size = next_pow2(dim)
        self.levels = max(1, int(math.log2(self.size)))
        self.layers = layers if layers is not None else self.levels
        g = torch.Generator().manual_seed(seed)
        init = (torch.rand(self.layers, self.size // 2, generator=g) * 2 - 1) * init_scale
        self.angles = nn.Parameter(init)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size:
            return x
        return nn.functional.pad(x, (0, self.size - x.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate rows of ``x`` (n, dim or D) -> (n, D)."""
        y = self.pad(x)
        n, d = y.shape
        if d < 2:  # one coordinate: nothing to pair, the rotation is the identity
            return y
        for layer in range(self.layers):
            stride = 1 << (layer % self.levels)
            blocks = d // (2 * stride)
            v = y.reshape(n, blocks, 2, stride)
            theta = self.angles[layer].reshape(blocks, stride)
            c, s = torch.cos(theta), torch.sin(theta)
            a, b = v[:, :, 0, :], v[:, :, 1, :]
            y = torch.stack((c * a - s * b, s * a + c * b), dim=2).reshape(n, d)
        return y

    def matrix(self) -> torch.Tensor:
        """Dense M (D x D) with ``forward(x) == pad(x) @ M``."""
        return self.forward(torch.eye(self.size, dtype=self.angles.dtype, device=self.angles.device))

    def dense(self) -> np.ndarray:
        """The rotation as a float32 numpy matrix (D x D), for inference without torch."""
        with torch.no_grad():
            return self.matrix().detach().cpu().numpy().astype(np.float32)
