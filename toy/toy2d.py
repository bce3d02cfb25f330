"""toy2d: class-conditional 2D mixtures (docs/design.md section 7).

Eight tight Gaussian modes on a ring of radius 1.2 (std 0.05). Three "prompts": class 0 owns the even modes, class 1
the odd ones, class 2 all eight; label 3 is the null condition for classifier-free guidance. The "target" split
(configurable, see Toy2D.__init__) is by default "half": each class keeps its modes at 0-135 degrees (the earlier
default, the ring rotated by 22.5 degrees, is `target_rotation=math.pi / 8, target_keep=range(8)`); the reward
prefers the upper modes (by default a soft membership with an in-distribution optimum, `reward="modes"`; the
unbounded height y, `reward="height"`, shows over-optimisation); quality is the share of samples within 0.2 of one
of their class's modes (blur shows as mass between modes). Transfer read-outs that close or
overlapping mode sets cannot fool: `transfer` (nearer a target mode than any other base mode) and `sharpness`
(within 0.2 of any mode of either split)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import metrics
from .backend import ToyWorld
from .nets import MLP2D

CLASS_MODES = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7], 2: list(range(8))}
PREFERRED = (1, 2, 3)  # the upper modes (45, 90, 135 degrees): what both rewards prefer
REWARDS = ("modes", "height")


class Toy2D(ToyWorld):
    name = "toy2d"
    shape = (2,)
    num_classes = 3
    radius, mode_std, near = 1.2, 0.05, 0.2

    # the default target split: "half" (each class keeps its modes at 0-135 degrees, unmoved: no saddle, no
    # overlapping discs; a new mixture of positions the base model already draws, decided at the high-noise steps)
    default_target = dict(target_rotation=0.0, target_scale=1.0, target_keep=(0, 1, 2, 3))
    # settings for the options a command line does not set (harness.apply_world_defaults; a Config built in code
    # sets every field), each chosen from a measurement (docs/toys.md, "World defaults"):
    # * Eq. 5 with beta 7 on a 16-step training grid, the setting of benchmarks/pso_fig1.py (at the paper's beta 50
    #   and N = 4 the 2-D toy does not move; docs/pso.md, "Claims on toy2d");
    # * DI++ alpha_rew 0.2: the smallest alpha_rew of benchmarks/world_defaults.py's sweep whose reward gain is
    #   visible (diff_instruct_pp.py's 0.1 hardly moves this toy).
    cli_defaults = {("pso", "pso"): {"beta": 7.0, "train_steps": 16},
                    ("diff_instruct_pp", "dipp"): {"reward_scale": 0.2}}

    def __init__(self, weights, target_rotation: float | None = None, target_scale: float | None = None,
                 target_keep: tuple[int, ...] | None = None, reward: str = "modes"):
        """The target split: the base modes rotated by `target_rotation` (radians), scaled about the origin by
        `target_scale`, and only the modes in `target_keep` kept (each class keeps its own modes among them). None
        of these touch the base data, so every target shares the cached base models. An option left None takes
        `default_target`: "half" (`target_rotation=0, target_keep=(0, 1, 2, 3)`); the earlier default, the ring
        rotated by 22.5 degrees, is `target_rotation=math.pi / 8, target_keep=range(8)`.
        `reward`: "modes" (soft membership of the upper modes, in-distribution optimum 1; the default) or "height"
        (y, unbounded: shows over-optimisation; on the command line `--model toy2d:reward=height`)."""
        super().__init__(weights)
        d = self.default_target
        target_rotation = d["target_rotation"] if target_rotation is None else target_rotation
        target_scale = d["target_scale"] if target_scale is None else target_scale
        target_keep = d["target_keep"] if target_keep is None else target_keep
        if reward not in REWARDS:
            raise ValueError(f"unknown toy2d reward {reward!r}; choose one of {list(REWARDS)}")
        self.reward_kind = reward
        self.target_rotation, self.target_scale = float(target_rotation), float(target_scale)
        self.target_keep = tuple(sorted(set(int(k) for k in target_keep)))
        if not self.target_keep or not set(self.target_keep) <= set(range(8)):
            raise ValueError(f"target_keep must be mode ids in 0..7, got {target_keep!r}")
        for c, modes in CLASS_MODES.items():
            if not set(modes) & set(self.target_keep):
                raise ValueError(f"target_keep {self.target_keep} leaves class {c} (modes {modes}) without a mode")

    def make_net(self):
        return MLP2D(self.num_classes)

    def method_defaults(self, method: str, variant: str) -> dict:
        """World.method_defaults: this toy's values for options the user did not set (printed by the run)."""
        return dict(self.cli_defaults.get((method, variant), {}))

    def modes(self, split: str = "base") -> torch.Tensor:
        """[8, 2] positions of the ring's modes in `split` (for the target also the ones it does not keep)."""
        if split not in ("base", "target"):
            raise ValueError(f"unknown data split {split!r}; choose 'base' or 'target'")
        angles = torch.arange(8) * (2 * math.pi / 8) + (self.target_rotation if split == "target" else 0.0)
        radius = self.radius * (self.target_scale if split == "target" else 1.0)
        return radius * torch.stack([angles.cos(), angles.sin()], 1)

    def class_modes(self, split: str = "base") -> dict[int, list[int]]:
        """class -> the mode ids its data uses in `split`."""
        if split == "target":
            return {c: [m for m in modes if m in self.target_keep] for c, modes in CLASS_MODES.items()}
        return CLASS_MODES

    def data_for(self, cond: torch.Tensor, generator: torch.Generator, split: str = "base") -> torch.Tensor:
        class_modes = self.class_modes(split)
        table = torch.tensor([(m * 8)[:8] for m in class_modes.values()])  # [3, 8] mode ids, cycled
        count = torch.tensor([len(m) for m in class_modes.values()])
        slot = (torch.rand(len(cond), generator=generator) * count[cond]).long()
        # cycling keeps each class's own modes equally likely: slot < count picks among them uniformly
        return self.modes(split)[table[cond, slot]] + self.mode_std * torch.randn(len(cond), 2, generator=generator)

    def data(self, n, generator, split="base"):
        cond = self.conditions(n, generator)
        return self.data_for(cond, generator, split), cond

    reward_width = 0.25  # std of the soft membership bumps (adjacent modes are 0.92 apart)

    def reward(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """A smooth, differentiable preference for the upper modes. "modes": sum of Gaussian bumps on the upper base
        modes, 1 on such a mode, ~0 between modes or off the ring (its optimum is in the data distribution);
        "height": the y coordinate (no optimum: moving a mode up pays for ever)."""
        if self.reward_kind == "height":
            return x0[:, 1]
        d2 = ((x0[:, None, :] - self.modes("base")[list(PREFERRED)].to(x0)) ** 2).sum(-1)
        return torch.exp(-d2 / (2 * self.reward_width**2)).sum(1)

    def quality(self, x0: torch.Tensor, cond: torch.Tensor, split: str = "base") -> float:
        d = torch.cdist(x0.double(), self.modes(split).double())  # [B, 8]
        allowed = torch.zeros_like(d, dtype=torch.bool)
        for c, modes in self.class_modes(split).items():
            allowed[cond == c] = torch.isin(torch.arange(8), torch.tensor(modes))
        d = torch.where(allowed, d, torch.inf)
        return float((d.min(1).values < self.near).double().mean())

    def _mode_sets(self):
        """(target modes kept, base modes that are not also a kept target mode) as [K, 2] positions."""
        target = self.modes("target")[list(self.target_keep)].double()
        base = self.modes("base").double()
        other = base[torch.cdist(base, target).min(1).values > 1e-6]
        return target, other

    def transfer(self, x0: torch.Tensor) -> float:
        """Share of samples nearer a (kept) target mode than any other base mode, whatever the class: where the
        samples went, however close the two mode sets are (a blurred sample counts for the set it is nearer)."""
        target, other = self._mode_sets()
        d_target = torch.cdist(x0.double(), target).min(1).values
        if len(other) == 0:
            return 1.0
        return float((d_target < torch.cdist(x0.double(), other).min(1).values).double().mean())

    def sharpness(self, x0: torch.Tensor) -> float:
        """Share of samples within `near` of any mode of either split: blur is mass far from every mode."""
        target, other = self._mode_sets()
        return float((torch.cdist(x0.double(), torch.cat([target, other])).min(1).values < self.near)
                     .double().mean())

    @torch.no_grad()
    def metrics(self, x0, cond, split="base") -> dict[str, float]:
        ref = self.data_for(cond, torch.Generator().manual_seed(1234), split)
        return {
            "reward": float(self.reward(x0, cond).mean()),
            "quality": self.quality(x0, cond, split),
            "distance": metrics.sliced_wasserstein(x0, ref),
            "transfer": self.transfer(x0),
            "sharpness": self.sharpness(x0),
        }

    CLASS_COLOURS = ("tab:blue", "tab:orange", "tab:green")  # samples of class 0, 1, 2

    def plot_samples(self, panels, path, marks: str | None = None) -> None:
        """World.plot_samples: one scatter per panel, samples coloured by their class; the ring's modes as circles
        (blue: class 0's, orange: class 1's; class 2 owns all eight); `marks` adds what the run aims at: "target"
        (x: the modes of the target split) or "reward" (stars: the modes the default reward prefers; with the height
        reward an arrow). A legend under the panels says what every mark and colour means."""
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        if marks not in (None, "target", "reward"):
            raise ValueError(f"plot_samples: marks must be None, 'target' or 'reward', got {marks!r}")
        fig, axes = plt.subplots(1, len(panels), figsize=(max(2.9 * len(panels), 6.2), 4.0), squeeze=False)
        lim = 1.5 * self.radius * max(1.0, self.target_scale)
        base, most_lines = self.modes("base"), 1
        # a subclass with its own reward or target data (docs/extending.md): its aim is not toy2d's modes to mark
        own_reward, own_target = type(self).reward is not Toy2D.reward, type(self).data_for is not Toy2D.data_for
        for ax, (title, (x0, cond)) in zip(axes[0], panels.items()):
            x0, cond = x0.detach().cpu(), cond.cpu()
            for c in range(self.num_classes):
                keep = cond == c
                ax.scatter(x0[keep, 0].clamp(-lim, lim), x0[keep, 1].clamp(-lim, lim), s=3, alpha=0.45,
                           color=self.CLASS_COLOURS[c], linewidths=0)
            for k in range(8):  # the base modes, edged in the colour of the class that owns them
                ax.scatter(base[k, 0], base[k, 1], s=70, facecolors="none", linewidths=1.2, zorder=3,
                           edgecolors=self.CLASS_COLOURS[k % 2])
            if marks == "target" and not own_target:
                m = self.modes("target")[list(self.target_keep)]
                ax.scatter(m[:, 0], m[:, 1], s=55, marker="x", color="k", linewidths=1.4, zorder=4)
            elif marks == "reward" and own_reward:
                pass
            elif marks == "reward" and self.reward_kind == "modes":
                m = base[list(PREFERRED)]
                ax.scatter(m[:, 0], m[:, 1], s=150, marker="*", facecolors="none", edgecolors="crimson",
                           linewidths=1.2, zorder=4)
            elif marks == "reward":
                ax.annotate("", xy=(-0.8 * lim, 0.9 * lim), xytext=(-0.8 * lim, 0.3 * lim),
                            arrowprops=dict(arrowstyle="->", color="crimson", lw=1.5))
            wrapped = [w for line in title.split("\n") for w in textwrap.wrap(line, 34)]
            most_lines = max(most_lines, len(wrapped))
            ax.set_title("\n".join(wrapped), fontsize=9)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
        handles = [Line2D([], [], ls="", marker="o", ms=5, color=self.CLASS_COLOURS[c], label=label) for c, label in
                   enumerate(("class 0 samples", "class 1 samples", "class 2 samples"))]
        handles += [Line2D([], [], ls="", marker="o", ms=8, mfc="none", mec=self.CLASS_COLOURS[0],
                           label="modes of class 0"),
                    Line2D([], [], ls="", marker="o", ms=8, mfc="none", mec=self.CLASS_COLOURS[1],
                           label="modes of class 1 (class 2 owns all 8)")]
        if marks == "target" and own_target:
            handles.append(Line2D([], [], ls="", label=f"target: {type(self).__name__}'s own data (not marked)"))
        elif marks == "target":
            handles.append(Line2D([], [], ls="", marker="x", ms=7, color="k", mew=1.4,
                                  label="target modes (the target split)"))
        elif marks == "reward" and own_reward:
            handles.append(Line2D([], [], ls="", label=f"reward: {type(self).__name__}.reward (not marked)"))
        elif marks == "reward":
            handles.append(Line2D([], [], ls="", marker="*" if self.reward_kind == "modes" else r"$\uparrow$", ms=11,
                                  mfc="none", mec="crimson", color="crimson",
                                  label="rewarded modes (reward 'modes')" if self.reward_kind == "modes"
                                  else "reward = height y (unbounded)"))
        fig.legend(handles=handles, loc="lower center", ncol=2 if len(panels) < 3 else 3, fontsize=8, frameon=False)
        fig.subplots_adjust(left=0.02, right=0.98, top=0.95 - 0.045 * most_lines,
                            bottom=0.25 if len(panels) < 3 else 0.17, wspace=0.06)
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)
