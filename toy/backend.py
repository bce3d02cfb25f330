"""The toy implementation of the backend interface of common.py: a LoRA-adapted eps-network (peft) whose
disabled adapter is the frozen pre-trained model, plus the parts the two toy worlds share."""
from __future__ import annotations

import abc
import contextlib
import copy
import functools
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

import common


class ToyDenoiser:
    """eps_theta(x_t, t, c) with a peft LoRA adapter on `net.lora_targets`; `frozen()` disables it.

    With `train_full=True` every weight trains and a frozen copy of the pre-trained net is kept instead (the
    toy nets are small; full/ offers full fine-tuning the same way)."""

    def __init__(self, net: nn.Module, sampler: str, timesteps: list[int], lora_rank: int = 16,
                 train_full: bool = False):
        self.sampler, self.timesteps, self.train_full = sampler, list(timesteps), train_full
        net.requires_grad_(False)
        if train_full:
            self.reference_net = copy.deepcopy(net).eval()
            self.net = net.requires_grad_(True)
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=net.lora_targets,
                                init_lora_weights=True)  # B = 0: the adapted model starts equal to the base
            self.net = get_peft_model(net, config)
        self._frozen = False

    def __call__(self, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        if self._frozen and self.train_full:
            return self.reference_net(x_t, t, cond)
        return self.net(x_t, t, cond)

    @contextlib.contextmanager
    def frozen(self):
        """The pre-trained prediction eps_pre: the same network with its adapter disabled."""
        self._frozen = True
        try:
            if self.train_full:
                yield
            else:
                with self.net.disable_adapter():
                    yield
        finally:
            self._frozen = False

    @property
    def module(self) -> nn.Module:
        """The trained nn.Module (the peft model, or the whole net with `train_full`), for accelerate's
        `accumulate(*modules)`."""
        return self.net

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trained weights: the LoRA tensors, or every weight with `train_full`."""
        state = self.net.state_dict() if self.train_full else get_peft_model_state_dict(self.net)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load `adapter_state()` output; raises ValueError naming missing keys (weights that would silently stay
        at their initial value), unexpected keys and shape mismatches."""
        expected = self.net.state_dict() if self.train_full else get_peft_model_state_dict(self.net)
        problems = state_mismatch(state, {k: tuple(v.shape) for k, v in expected.items()})
        if problems:
            raise ValueError(f"adapter state does not fit this {'model' if self.train_full else 'LoRA adapter'}: "
                             f"{problems}")
        if self.train_full:
            try:
                self.net.load_state_dict(state, strict=True)
            except RuntimeError as e:  # e.g. a dtype that cannot be copied
                raise ValueError(f"adapter state does not fit this model: {e}") from None
        else:
            set_peft_model_state_dict(self.net, state)  # keys and shapes checked above

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self


def fold_lora(net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`net` with a LoRA merged into its weights (peft's merge_and_unload): `state` is the adapter_state() of a
    ToyDenoiser of this network, of any rank (the de-distill practice's adapter, merged while another LoRA trains)."""
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise ValueError(f"the adapter to merge has no LoRA of one rank (lora_A ranks found: {sorted(ranks)})")
    rank = ranks.pop()
    lora = get_peft_model(net, LoraConfig(r=rank, lora_alpha=rank, target_modules=net.lora_targets))
    problems = state_mismatch(state, {k: tuple(v.shape) for k, v in get_peft_model_state_dict(lora).items()})
    if problems:
        raise ValueError(f"the adapter to merge does not fit this network: {problems}")
    set_peft_model_state_dict(lora, state)
    return lora.merge_and_unload()


def state_mismatch(state: dict, expected: dict[str, tuple[int, ...]], show: int = 5) -> str:
    """'' when `state` has exactly the keys of `expected`, each a tensor of the expected shape; otherwise one line
    naming the missing keys, the unexpected keys and the shape mismatches (the first `show` of each)."""
    def names(keys):
        keys = sorted(keys)
        return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")

    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [f"{k} (expected {list(expected[k])}, found "
             + (f"{list(state[k].shape)})" if isinstance(state[k], torch.Tensor) else f"a {type(state[k]).__name__})")
             for k in sorted(expected.keys() & state.keys())
             if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k])]
    parts = [f"{len(missing)} missing key(s): {names(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {names(unexpected)}" if unexpected else "",
             f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:show])}" if wrong else ""]
    return "; ".join(p for p in parts if p)


class ToyWorld(abc.ABC):
    """What toy2d and MNIST share: integer labels with a null label for CFG, denoisers built from cached
    base-model weights, adapter export as safetensors."""

    name: str
    shape: tuple[int, ...]
    num_classes: int
    decode_batch = 4096  # the most rows a sampling / evaluation / reward call puts through a net at once
    ode_sampler = "ddim"  # the teacher's deterministic sampler (eta = 0) that the student is distilled from
    roles = {  # role -> (sampler, timesteps)
        "teacher": ("ddim", common.few_step_timesteps(25)),
        "student": ("x0_renoise", common.few_step_timesteps(4)),
        "generator": ("x0_renoise", common.few_step_timesteps(1)),
    }

    def __init__(self, weights: dict[str, dict[str, torch.Tensor]]):
        self.schedule = common.Schedule("scaled_linear")
        self.weights = weights

    @abc.abstractmethod
    def make_net(self) -> nn.Module:
        """A fresh, randomly initialised eps-network of this world."""

    def base_model_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{role: {weight name: shape}} of every base model this world needs (what a cache file must hold)."""
        net = {k: tuple(v.shape) for k, v in self.make_net().state_dict().items()}
        return {role: net for role in self.roles}

    def denoiser(self, role: str, lora_rank: int = 16, train_full: bool = False,
                 sampler: str | None = None, timesteps: list[int] | None = None,
                 merged_adapter: dict[str, torch.Tensor] | None = None) -> ToyDenoiser:
        if role not in self.roles:
            raise ValueError(f"unknown model role {role!r} for {self.name}; choose one of {sorted(self.roles)}")
        net = self.make_net()
        net.load_state_dict(self.weights[role])
        if merged_adapter is not None:  # folded into the weights: the frozen model and the base of the new LoRA
            net = fold_lora(net, merged_adapter)
        default_sampler, default_times = self.roles[role]
        sampler = sampler or default_sampler
        common.make_kernel(sampler, self.schedule)  # validates the name
        return ToyDenoiser(net.eval(), sampler, timesteps or default_times, lora_rank, train_full)

    @functools.cached_property
    def accelerator(self):
        """The same accelerate API the full backend uses (backward, clip_grad_norm_, prepare, is_main_process),
        here on one CPU process, so a method's training loop is written once for both worlds."""
        from accelerate import Accelerator

        return Accelerator(cpu=True)

    def conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=generator)

    def eval_conditions(self, n: int) -> torch.Tensor:
        return torch.arange(n) % self.num_classes

    def null_condition(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def save_adapter(self, denoiser: ToyDenoiser, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(denoiser.adapter_state(), str(path / "adapter.safetensors"))

    concept_label = 0  # customization: the class whose target-split samples play the concept images

    def preference_pairs(self, n: int, generator: torch.Generator, path: str | Path | None = None):
        """World.preference_pairs: two real samples of one condition ranked by the reward, the preferred first
        (as Pick-a-Pic ranks two images of one prompt); or n rows drawn from a stored pairs file (toy/pairs.py)."""
        if path is not None:
            cache = self.__dict__.setdefault("_pairs_files", {})
            if str(path) not in cache:
                from .pairs import load_pairs

                cache[str(path)] = load_pairs(path, self.shape, self.num_classes)
            win, lose, cond = cache[str(path)]
            i = torch.randint(0, len(cond), (n,), generator=generator)
            return win[i], lose[i], cond[i]
        cond = self.conditions(n, generator)
        a, b = self.data_for(cond, generator), self.data_for(cond, generator)
        with torch.no_grad():
            a_wins = (self.reward(a, cond) >= self.reward(b, cond)).view(-1, *[1] * len(self.shape))
        return torch.where(a_wins, a, b), torch.where(a_wins, b, a), cond

    def concept_images(self, n: int, generator: torch.Generator):
        """World.concept_images: n target-split samples of class `concept_label`. The toys have no spare
        identifier token, so the concept condition and the class condition are the same label."""
        cond = torch.full((n,), self.concept_label, dtype=torch.long)
        return self.data_for(cond, generator, split="target"), cond, cond.clone()
