"""A training run through harness.Run with a stub world and model, as a script (tests/test_cli.py runs it in a
child process to interrupt, kill or race it): --steps updates of a 2x3 tensor, --sleep seconds each."""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import harness  # noqa: E402


@dataclasses.dataclass
class Config(harness.RunConfig):
    model: str = harness.arg("stub", "world")
    steps: int = harness.arg(1000, "updates")
    sleep: float = harness.arg(0.05, "seconds per update")


class Model:
    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(2, 3))
        self.module = None

    def adapter_state(self):
        return {"w": self.w.detach().clone()}

    def load_adapter_state(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


class World:
    def __init__(self):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=True)


def main(argv=None):
    cfg = harness.parse_config(Config, argv)
    run = harness.Run("stub", cfg, free=["sleep"])
    world = World()
    cfg = run.configure(world)
    model = Model()
    opt = torch.optim.SGD([model.w], lr=0.1)
    run.start(world, {"model": model}, {"model": opt})
    for step in run.updates():
        loss = (model.w - step).square().sum()
        run.optimizer_step(loss, opt, [model.w])
        run.log({"step": step, "loss": float(loss.detach()), "reward": "", "nfe": 1, "seconds": cfg.sleep})
        time.sleep(cfg.sleep)
    return run.finish({"reward_base": 0.0, "reward_tuned": float(model.w.mean())}, curves=[("loss", "loss")])


if __name__ == "__main__":
    harness.run_cli(main)
