"""Distribution distances shared by the toy worlds."""
from __future__ import annotations

import torch


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds [N, D]: the mean over random unit
    directions of the 1D W2 between sorted projections (exact in 1D)."""
    if x.shape != y.shape:
        raise ValueError(f"point clouds must have equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ dirs.double()).sort(0)
    py, _ = (y.double() @ dirs.double()).sort(0)
    return float(((px - py) ** 2).mean().sqrt())
