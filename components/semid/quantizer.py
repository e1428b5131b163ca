"""Residual quantization: L codebooks of K vectors turn a latent z into coarse-to-fine codes (c_1, ..., c_L).

    r_1 = z;   c_l = argmin_k ||v^l_k - r_l||_2;   r_{l+1} = r_l - v^l_{c_l};   z_q = sum_l v^l_{c_l}
    loss   = sum_l ( beta * ||r_l - sg(v^l_{c_l})||^2 + ||sg(r_l) - v^l_{c_l}||^2 )      (sg: stop-gradient)

The two training tricks that keep every code in use are here, small and switchable by the caller:
k-means initialisation of each level on the residuals it will see (faiss.Kmeans), and restart of dead codes
(a code no residual chose for a while is moved onto a residual that exists).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class Quantized:
    codes: torch.Tensor  # (B, L) int64, c_l
    z_q: torch.Tensor  # (B, D') sum of the chosen codebook vectors
    loss: torch.Tensor  # () commitment + codebook loss, summed over levels
    residuals: torch.Tensor  # (B, L, D') r_l, detached: what each level saw


class ResidualQuantizer(nn.Module):
    def __init__(self, L: int, K: int, dim: int):
        super().__init__()
        self.L, self.K, self.dim = L, K, dim
        self.codebooks = nn.Parameter(torch.randn(L, K, dim) * 0.01)  # v^l_k: (L, K, D')

    def nearest(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """argmin_k ||v_k - r||^2 = argmin_k (||v_k||^2 - 2 r.v_k): one matmul, no (B, K, D') tensor."""
        v = self.codebooks[level]  # (K, D')
        return ((v * v).sum(1) - 2 * r @ v.T).argmin(1)  # (B,)

    def forward(self, z: torch.Tensor, beta: float) -> Quantized:
        r = z  # (B, D')
        z_q = torch.zeros_like(z)
        loss = z.new_zeros(())
        codes, residuals = [], []
        for level in range(self.L):
            c = self.nearest(r.detach(), level)
            v = self.codebooks[level][c]  # (B, D')
            loss = loss + beta * ((r - v.detach()) ** 2).sum(1).mean() + ((r.detach() - v) ** 2).sum(1).mean()
            codes.append(c)
            residuals.append(r.detach())
            z_q = z_q + v
            r = r - v
        return Quantized(torch.stack(codes, 1), z_q, loss, torch.stack(residuals, 1))

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, L) only: the assignment path, no graph, no losses."""
        r = z
        codes = torch.empty(z.shape[0], self.L, dtype=torch.int64)
        for level in range(self.L):
            c = self.nearest(r, level)
            codes[:, level] = c
            r = r - self.codebooks[level][c]
        return codes

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, seed: int, iterations: int = 20) -> None:
        """Set each level's codebook to the k-means centroids of the residuals that level sees."""
        import faiss  # heavy; only training needs it

        r = z.detach().float().contiguous()
        for level in range(self.L):
            kmeans = faiss.Kmeans(self.dim, self.K, niter=iterations, seed=seed + level, verbose=False,
                                  min_points_per_centroid=1,
                                  max_points_per_centroid=max(256, -(-len(r) // self.K)))
            kmeans.train(r.numpy().astype(np.float32))
            self.codebooks[level] = torch.from_numpy(kmeans.centroids)
            r = r - self.codebooks[level][self.nearest(r, level)]

    @torch.no_grad()
    def restart_dead_codes(self, usage: torch.Tensor, residuals: torch.Tensor, generator: torch.Generator) -> int:
        """Move every code with zero `usage` (L, K) onto a residual of that level drawn from `residuals`
        (B, L, D'); return how many codes were restarted."""
        restarted = 0
        for level in range(self.L):
            dead = torch.nonzero(usage[level] == 0).flatten()
            if len(dead) == 0:
                continue
            pick = torch.randint(0, residuals.shape[0], (len(dead),), generator=generator)
            self.codebooks[level, dead] = residuals[pick, level]
            restarted += len(dead)
        return restarted
