"""Image rewards behind one interface: `reward(images, prompts) -> [B]`, differentiable in the images.

`images` are [B, 3, H, W] in [-1, 1] (what the VAE decodes); each wrapper resizes / crops / normalises them with
torch ops (no PIL round trip), so gradients reach the generator (Diff-Instruct++'s explicit reward term).

| name          | score                                                    | default weights (local path or hub id)          |
|---------------|----------------------------------------------------------|-------------------------------------------------|
| `clip`        | cosine of CLIP image and text embeddings (CLIP score)    | openai/clip-vit-large-patch14                   |
| `pickscore`   | logit_scale * cosine, PickScore (Kirstain et al. 2023)   | yuvalkirstain/PickScore_v1 + the laion ViT-H/14 processor |
| `aesthetic`   | LAION improved-aesthetic-predictor MLP on CLIP ViT-L/14 image embeddings | openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth |
| `imagereward` | ImageReward (Xu et al. 2023), when the image-reward package is installed | ImageReward-v1.0                    |

A spec names a reward as a string or as {"name": ..., "model": ..., "processor": ..., "head": ...} to point at
local copies. Text embeddings are cached per prompt (prompts repeat across updates).
"""
from __future__ import annotations

import abc
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEFAULTS = {
    "clip": {"model": "openai/clip-vit-large-patch14"},
    "pickscore": {"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "aesthetic": {"model": "openai/clip-vit-large-patch14",
                  "head": "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"},
    "imagereward": {"model": "ImageReward-v1.0"},
}


def differentiable_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's preprocessing in torch: [-1, 1] -> [0, 1], bicubic resize of the short side, centre crop, normalise."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                          align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Reward(nn.Module, abc.ABC):
    """The one reward interface: reward(images in [-1, 1], prompts) -> [B] scores, differentiable in images."""

    name = ""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


class CLIPReward(Reward):
    """CLIP score (cosine) or PickScore (logit_scale * cosine): the same dual encoder, different weights."""

    def __init__(self, model: str, processor: str | None = None, scaled: bool = False, name: str = "clip",
                 random_weights: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.name, self.scaled = name, scaled
        if random_weights:  # the real-size backbone of this reward with random weights (full/architectures.py)
            from . import architectures

            self.model = architectures.reward_model(random_weights).requires_grad_(False)
            self.tokenizer = architectures.tokenizer({"model_max_length": 77, "pad_token": "!"})
            self.size, self.mean, self.std = self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
            self._text: dict[str, torch.Tensor] = {}
            return
        self.model = _load(CLIPModel, model, name).eval().requires_grad_(False)
        self.tokenizer = _load(AutoTokenizer, processor or model, f"{name} tokenizer")
        self.size, self.mean, self.std = _image_config(processor or model, self.model.config.vision_config.image_size)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        # one prompt per call: in a batch, a prompt's features would depend (in the last bits: padding length,
        # BLAS blocking) on which uncached prompts came with it, and a resumed run would not repeat the original
        for p in dict.fromkeys(prompts):
            if p in self._text:
                continue
            tok = self.tokenizer([p], padding=True, truncation=True, max_length=77, return_tensors="pt")
            dev = next(self.model.parameters()).device
            feats = self.model.get_text_features(**{k: v.to(dev) for k, v in tok.items()})
            feats = getattr(feats, "pooler_output", feats)
            self._text[p] = F.normalize(feats.float(), dim=-1)[0]
        return torch.stack([self._text[p] for p in prompts])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = differentiable_preprocess(images, self.size, self.mean, self.std).to(param.device, param.dtype)
        feats = self.model.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
        return F.normalize(feats.float(), dim=-1)

    def forward(self, images, prompts):
        cos = (self.image_features(images) * self.text_features(list(prompts)).to(images.device)).sum(-1)
        return cos * self.model.logit_scale.exp().float() if self.scaled else cos


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (layer indices as in its released state dict)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class AestheticReward(Reward):
    name = "aesthetic"

    def __init__(self, model: str, head: str, processor: str | None = None, random_weights: bool = False):
        super().__init__()
        self.clip = CLIPReward(model, processor, name="aesthetic backbone",
                               random_weights="aesthetic" if random_weights else None)
        dim = self.clip.model.config.projection_dim
        self.head = AestheticHead(dim).eval().requires_grad_(False)
        if random_weights:
            return
        try:
            state = torch.load(_file(head, "aesthetic head"), map_location="cpu", weights_only=True)
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"aesthetic head {head!r} does not fit a {dim}-dim CLIP embedding: {e}") from e

    def forward(self, images, prompts):
        feats = self.clip.image_features(images)
        return self.head(feats.to(next(self.head.parameters()).dtype)).squeeze(-1).float()


class ImageRewardReward(Reward):
    """ImageReward through its own package (`pip install image-reward`); its `score_gard` is differentiable."""

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", med_config: str | None = None):
        super().__init__()
        try:
            import ImageReward as RM
        except ImportError as e:
            raise ImportError("the imagereward reward needs the image-reward package: pip install image-reward") from e
        self.model = RM.load(model, med_config=med_config, device="cpu").eval().requires_grad_(False)

    def forward(self, images, prompts):
        dev = next(self.model.parameters()).device
        tok = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt")
        pixels = differentiable_preprocess(images, 224).to(dev)
        return self.model.score_gard(tok.input_ids.to(dev), tok.attention_mask.to(dev), pixels).reshape(-1).float()


def load_reward(spec, device=None, dtype=torch.float32, random_weights: bool = False) -> Reward:
    """A reward from its spec (a name, or a dict with "name" and optional "model"/"processor"/"head").
    `random_weights` (the model spec's key): a reward named without its own "model" gets its real-size CLIP backbone
    (clip, aesthetic: ViT-L/14; pickscore: ViT-H/14) with random weights; ImageReward has no shipped config."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in DEFAULTS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(DEFAULTS)}")
    kw = {**DEFAULTS[name], **spec}
    if "model" in spec and "processor" not in spec:  # a user's own weights bring their own tokenizer
        kw.pop("processor", None)
    unknown = set(kw) - {"model", "processor", "head", "med_config"}
    if unknown:
        raise ValueError(f"reward {name}: unknown option(s) {sorted(unknown)}")
    rand = random_weights and "model" not in spec
    if rand and name == "imagereward":
        raise ValueError("random_weights: there is no shipped configuration for the imagereward reward; point it at a "
                         "local model ({\"name\": \"imagereward\", \"model\": ...}) or use clip / pickscore / "
                         "aesthetic (e.g. full.bench --set reward=pickscore)")
    if name == "clip":
        r = CLIPReward(kw["model"], kw.get("processor"), name="clip", random_weights="clip" if rand else None)
    elif name == "pickscore":
        r = CLIPReward(kw["model"], kw.get("processor"), scaled=True, name="pickscore",
                       random_weights="pickscore" if rand else None)
    elif name == "aesthetic":
        r = AestheticReward(kw["model"], kw["head"], kw.get("processor"), random_weights=rand)
    else:
        r = ImageRewardReward(kw["model"], kw.get("med_config"))
    r = r.to(device or "cpu")
    if dtype != torch.float32:
        r = r.to(dtype)
    return r.eval().requires_grad_(False)


def reward_name(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "")


def _load(cls, source: str, what: str):
    p = Path(source).expanduser()
    if not p.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"{what} model {source!r} does not exist (neither a local path nor a hub id)")
    try:
        return cls.from_pretrained(source)
    except Exception as e:
        raise ValueError(f"cannot load the {what} model from {source!r}: {e}") from e


def _image_config(source: str, default_size: int):
    """Input size, mean and std from the processor's preprocessor_config.json when there is one."""
    p = Path(source) / "preprocessor_config.json"
    cfg = {}
    if p.is_file():
        cfg = json.loads(p.read_text())
    elif not Path(source).exists():
        try:
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
        except Exception:
            cfg = {}
    size = cfg.get("crop_size", default_size)
    size = size.get("height", default_size) if isinstance(size, dict) else size
    return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def _file(source: str, what: str) -> str:
    """A local file, or "org/repo/path/in/repo" fetched with hf_hub_download."""
    p = Path(source).expanduser()
    if p.is_file():
        return str(p)
    parts = source.split("/")
    if len(parts) >= 3 and not source.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    raise FileNotFoundError(f"{what} file {source!r} does not exist")
