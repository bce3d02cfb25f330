"""The two toy eps-networks. Both take (x_t, t, label) with label = num_classes for the null condition
(classifier-free guidance), and expose plain nn.Linear / nn.Conv2d layers for peft's LoRA to target.

The MNIST net is a small hand-written UNet rather than diffusers' UNet2DModel: at the size that trains on two
CPU cores in minutes, UNet2DModel took 0.39 s per batch-64 update against 0.046 s for this one (measured
while choosing; the full/ path uses diffusers' UNets)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the integer time t in [0, 1000) (DDPM / transformer style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLP2D(nn.Module):
    """eps_theta(x_t, t, c) for 2D points: residual MLP with time and class embeddings added to the input."""

    lora_targets = ["inp", "fc1", "fc2", "out"]

    def __init__(self, num_classes: int, width: int = 128, depth: int = 3, dim: int = 2):
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width)  # last index = null condition
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Res(width) for _ in range(depth))
        self.out = nn.Linear(width, dim)

    def forward(self, x, t, c):
        h = self.inp(x) + self.time(timestep_embedding(t, 64)) + self.label(c)
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(h))


class _Res(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.fc2(F.silu(self.fc1(self.norm(h))))


class _ResConv(nn.Module):
    """Conv residual block with FiLM conditioning on the (time + class) embedding."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm = nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = F.silu(self.conv1(x))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = self.norm(h) * (1 + scale) + shift
        return self.conv2(F.silu(h)) + self.skip(x)


class TinyUNet(nn.Module):
    """eps_theta for 1x28x28 digits: 28 -> 14 -> 7 -> 14 -> 28 with skip connections."""

    lora_targets = ["conv1", "conv2", "film"]

    def __init__(self, num_classes: int = 10, channels=(16, 32), emb: int = 128):
        super().__init__()
        c0, c1 = channels
        self.time = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb)
        self.inp = nn.Conv2d(1, c0, 3, padding=1)
        self.down1, self.down2 = _ResConv(c0, c0, emb), _ResConv(c0, c1, emb)
        self.mid = _ResConv(c1, c1, emb)
        self.up2, self.up1 = _ResConv(2 * c1, c1, emb), _ResConv(c1 + c0, c0, emb)
        self.out = nn.Conv2d(c0, 1, 3, padding=1)

    def forward(self, x, t, c):
        e = self.time(timestep_embedding(t, 64)) + self.label(c)
        h28 = self.down1(self.inp(x), e)
        h14 = self.down2(F.avg_pool2d(h28, 2), e)
        h = self.mid(F.avg_pool2d(h14, 2), e)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), h14], 1), e)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), h28], 1), e)
        return self.out(h)


class DigitClassifier(nn.Module):
    """Small CNN with two heads on the same features: the digit (10-way) and the stroke style (bold vs
    regular). Its features also serve the distance metric."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.SiLU(),
        )
        self.digit = nn.Linear(64, 10)
        self.bold = nn.Linear(64, 1)

    def forward(self, x):
        f = self.features(x)
        return self.digit(f), self.bold(f).squeeze(1), f
