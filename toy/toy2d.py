"""toy2d: class-conditional 2D mixtures (DESIGN.md section 7).

Eight tight Gaussian modes on a ring of radius 1.2 (std 0.05). Three "prompts": class 0 owns the even modes,
class 1 the odd ones, class 2 all eight; label 3 is the null condition for classifier-free guidance. The
"target" split is the same data rotated by 22.5 degrees (a new style the base model never produced), the
reward is the height y of a point (prefer the upper modes), and quality is the share of samples within 0.2 of
one of their class's modes (blur shows as mass between modes)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import metrics
from .backend import ToyWorld
from .nets import MLP2D

CLASS_MODES = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7], 2: list(range(8))}


class Toy2D(ToyWorld):
    name = "toy2d"
    shape = (2,)
    num_classes = 3
    radius, mode_std, near = 1.2, 0.05, 0.2
    target_rotation = math.pi / 8

    def make_net(self):
        return MLP2D(self.num_classes)

    def modes(self, split: str = "base") -> torch.Tensor:
        if split not in ("base", "target"):
            raise ValueError(f"unknown data split {split!r}; choose 'base' or 'target'")
        angles = torch.arange(8) * (2 * math.pi / 8) + (self.target_rotation if split == "target" else 0.0)
        return self.radius * torch.stack([angles.cos(), angles.sin()], 1)

    def data_for(self, cond: torch.Tensor, generator: torch.Generator, split: str = "base") -> torch.Tensor:
        table = torch.tensor([(m * 8)[:8] for m in CLASS_MODES.values()])  # [3, 8] mode ids, cycled
        count = torch.tensor([len(m) for m in CLASS_MODES.values()])
        slot = (torch.rand(len(cond), generator=generator) * count[cond]).long()
        # cycling keeps each class's own modes equally likely: slot < count picks among them uniformly
        return self.modes(split)[table[cond, slot]] + self.mode_std * torch.randn(len(cond), 2, generator=generator)

    def data(self, n, generator, split="base"):
        cond = self.conditions(n, generator)
        return self.data_for(cond, generator, split), cond

    def reward(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Height of the point: a smooth, differentiable preference for the upper modes."""
        return x0[:, 1]

    def quality(self, x0: torch.Tensor, cond: torch.Tensor, split: str = "base") -> float:
        d = torch.cdist(x0.double(), self.modes(split).double())  # [B, 8]
        allowed = torch.zeros_like(d, dtype=torch.bool)
        for c, modes in CLASS_MODES.items():
            allowed[cond == c] = torch.isin(torch.arange(8), torch.tensor(modes))
        d = torch.where(allowed, d, torch.inf)
        return float((d.min(1).values < self.near).double().mean())

    @torch.no_grad()
    def metrics(self, x0, cond, split="base") -> dict[str, float]:
        ref = self.data_for(cond, torch.Generator().manual_seed(1234), split)
        return {
            "reward": float(self.reward(x0, cond).mean()),
            "quality": self.quality(x0, cond, split),
            "distance": metrics.sliced_wasserstein(x0, ref),
        }

    def plot_samples(self, panels, path, split: str | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, (x0, cond)) in zip(axes[0], panels.items()):
            for s, marker in (("base", "o"), ("target", "x")):
                if split in (None, s):
                    m = self.modes(s)
                    ax.scatter(m[:, 0], m[:, 1], s=60, marker=marker, facecolors="none" if marker == "o" else None,
                               edgecolors="k" if marker == "o" else None, c=None if marker == "o" else "k",
                               linewidths=0.8, zorder=3)
            x0 = x0.detach().cpu()
            ax.scatter(x0[:, 0], x0[:, 1], s=3, c=cond.cpu(), cmap="viridis", vmin=0, vmax=self.num_classes,
                       alpha=0.5)
            ax.set(title=title, xlim=(-1.8, 1.8), ylim=(-1.8, 1.8), aspect="equal", xticks=[], yticks=[])
        fig.tight_layout()
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)
