"""DI++ Theorem 3.4 as a toy run pair: Diff-Instruct with a CFG teacher of scale omega against DI++ with the implicit
classifier's reward at alpha_rew = omega - 1, same seeds, side by side.

    OMP_NUM_THREADS=1 python benchmarks/dipp_cfg_reward.py                 # omega 2 and 4, seeds 0 1 2 (~15 min)
    OMP_NUM_THREADS=1 python benchmarks/dipp_cfg_reward.py --omegas 2 --seeds 0

tests/test_diff_instruct_pp.py proves the identity draw by draw in a Gaussian world. Here the two *training runs*
are compared on toy2d (the one-step generator, diff_instruct_pp.py's defaults otherwise: 400 updates of batch 256):

  CFG teacher   `diff_instruct_pp.py --reward-scale 0 --cfg-scale omega`: the IKL term against
                eps_cfg = eps_ref(null) + omega (eps_ref(c) - eps_ref(null)) (DI++ (3.5)-(3.6)).
  CFG reward    `--cfg-scale 1` and the explicit reward r_cfg of (3.5) at alpha_rew = omega - 1, as a world whose
                reward is a one-draw estimator of it: t ~ pi, x_t = alpha_t x_0 + sigma_t eps (its own draws),
                r = < sg[ w(t) (s_ref(x_t | c) - s_ref(x_t | null)) ], x_t > summed over dimensions, so its
                x_0-gradient is alpha_t w(t) grad_x log p_t(c | x_t), the implicit classifier's, with the same w(t)
                and pi(t) as the IKL term (the frozen teacher, not counted in the NFEs, as every reward model).

Theorem 3.4 says the two gradients are equal in expectation; a run pair differs only by the reward's own draws of
t and eps (the CFG teacher's run evaluates the guidance at the IKL term's x_t). The metrics are toy2d's: the default
reward (soft membership of the upper modes; CFG does not target it), quality (share of samples within 0.2 of a
mode of their class: what guidance away from the null condition should raise), distance (sliced W2 to the data)
and sharpness (within 0.2 of any mode), of 2000 fixed-seed samples. Plain Diff-Instruct (omega 1, alpha_rew 0) is
the row both start from.

Writes benchmarks/results/dipp_cfg_reward.{json,md} and dipp_cfg_reward.samples.png (seed 0: base generator, then
each pair); run folders under runs/bench-dipp-cfg-reward/."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import diff_instruct_pp as dipp  # noqa: E402
import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "bench-dipp-cfg-reward"
KEYS = ("reward", "quality", "distance", "sharpness")


class CFGRewardWorld:
    """A world whose reward is DI++'s implicit CFG reward (3.5), estimated with one draw of (t, eps) per sample;
    everything else (metrics, data, base models) is the wrapped world's."""

    def __init__(self, world, cfg: dipp.Config, seed: int, draws: int = 1):
        self._world, self._draws = world, draws
        self._teacher = world.denoiser("teacher")
        self._pi = dipp.time_density(world.schedule, cfg.time_density, cfg.t_min, cfg.t_max)
        self._weighting = cfg.weighting
        self._gen = torch.Generator().manual_seed(7_000 + seed)

    def __getattr__(self, name):
        return getattr(self._world, name)

    def reward(self, x0: torch.Tensor, cond) -> torch.Tensor:
        """The mean of `draws` one-draw estimates (the same expectation; less variance with more draws)."""
        return sum(self._one_draw(x0, cond) for _ in range(self._draws)) / self._draws

    def _one_draw(self, x0: torch.Tensor, cond) -> torch.Tensor:
        sched = self._world.schedule
        t = dipp.sample_t(len(x0), self._gen, self._pi).to(x0.device)
        eps = torch.randn(x0.shape, generator=self._gen).to(x0.device)
        x_t = common.add_noise(sched, x0, eps, t)
        null = common.cond_to(self._world.null_condition(len(x0)), x0.device)
        with torch.no_grad(), self._teacher.frozen():
            e_c = sched.eps_from_pred(x_t, self._teacher(x_t.detach(), t, cond).float(), t)
            e_null = sched.eps_from_pred(x_t, self._teacher(x_t.detach(), t, null).float(), t)
        _, sigma = sched.alpha_sigma(t, x_t)
        # grad_{x_t} log p_t(c | x_t) = s_ref(x_t | c) - s_ref(x_t | null), weighted as the IKL term: w(t) (3.5)
        classifier = (dipp.ikl_weight(sched, t, self._weighting, x_t)
                      * (dipp.score_from_eps(e_c, sigma) - dipp.score_from_eps(e_null, sigma))).detach()
        return common.reduce_dims(classifier * x_t)


def run_one(label: str, seed: int, world, omega: float, explicit: bool, draws: int = 1) -> dict:
    out = RUNS / f"{label}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = dipp.Config(seed=seed, out=str(out), progress=False, save_every=400,
                      reward_scale=(omega - 1.0) if explicit else 0.0, cfg_scale=1.0 if explicit else omega)
    cpu = time.process_time()
    m = dipp.train(cfg, world=CFGRewardWorld(world, cfg, seed, draws) if explicit else world)
    print(f"[bench] {label} seed {seed}: " + ", ".join(f"{k} {m[k + '_tuned']:.3f}" for k in KEYS)
          + f" ({time.process_time() - cpu:.0f} CPU s)", flush=True)
    return {k: m[k] for k in m if k.split("_")[0] in KEYS}


@torch.no_grad()
def samples_of(world, out: Path, seed: int, n: int = 2000):
    """The run's evaluation samples again (its saved generator adapter, its evaluation noise and conditions)."""
    gen_net = world.denoiser("generator")
    if out is not None:
        gen_net.load_adapter_state(load_file(str(out / "adapter" / "adapter.safetensors")))
    kernel = common.make_kernel(gen_net.sampler, world.schedule)
    cond = world.eval_conditions(n)
    z = torch.randn(n, *world.shape, generator=torch.Generator().manual_seed(2**31 - 1 - seed))
    return dipp.generate_in_chunks(gen_net, kernel, z, cond, world.decode_batch), cond


def ms(v: list[float]) -> str:
    t = torch.tensor(v, dtype=torch.float64)
    return f"{float(t.mean()):.3f} ± {float(t.std()) if len(t) > 1 else 0.0:.3f}"


def markdown(res: dict) -> str:
    runs = res["runs"]
    base = next(iter(runs.values()))[0]
    lines = ["Commands: " + ", then ".join(f"`{c}`" for c in res["commands"]) + f" ({res['date']}). Machine: "
             f"{res['machine']}. Total {res['cpu_seconds']:.0f} "
             f"CPU s. toy2d, diff_instruct_pp.py's defaults (400 updates of batch 256, pi(t) uniform on [20, 980], "
             f"w(t) = sigma^2/alpha^2) but for the columns named; mean ± sd over seeds {res['seeds']} of 2000 "
             f"fixed-seed samples of the tuned generator. Base generator: "
             + ", ".join(f"{k} {base[k + '_base']:.3f}" for k in KEYS) + ".", "",
             "| run | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for label, rs in runs.items():
        lines.append(f"| {label} | " + " | ".join(ms([r[k + "_tuned"] for r in rs]) for k in KEYS) + " |")
    lines += ["", "Pair differences, CFG reward − CFG teacher, per seed (mean ± sd over seeds), against the "
              "seed-to-seed "
              "sd of the CFG-teacher run:", "", "| pair | " + " | ".join(f"{k}: difference / seed sd" for k in KEYS)
              + " |", "|---|" + "---|" * len(KEYS)]
    pairs = [(omega, f"CFG reward, alpha_rew {omega - 1:g}") for omega in res["omegas"]]
    pairs += [(omega, label) for omega in res["omegas"] for label in runs
              if label.startswith(f"CFG reward, alpha_rew {omega - 1:g}, ")]
    for omega, label in pairs:
        a, b = runs[f"CFG teacher, omega {omega:g}"], runs[label]
        cells = []
        for k in KEYS:
            d = [y[k + "_tuned"] - x[k + "_tuned"] for x, y in zip(a, b)]
            sd = torch.tensor([x[k + "_tuned"] for x in a], dtype=torch.float64).std()
            cells.append(f"{ms(d)} / {float(sd):.3f}")
        lines.append(f"| {label} vs omega {omega:g} | " + " | ".join(cells) + " |")
    lines += ["", "Figure: `benchmarks/results/dipp_cfg_reward.samples.png` (seed 0; base generator, then each pair)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--omegas", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--draws", type=int, default=0, help="only add the rows 'CFG reward, alpha_rew omega - 1, DRAWS "
                   "draws' (the reward averaged over DRAWS draws) to the --reuse results")
    p.add_argument("--reuse", help="a results JSON whose rows are kept")
    p.add_argument("--out", default=str(RESULTS / "dipp_cfg_reward.json"))
    args = p.parse_args(argv)
    cpu = time.process_time()
    world = harness.load_world("toy2d")
    old = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    command = "OMP_NUM_THREADS=1 python benchmarks/dipp_cfg_reward.py " + " ".join(argv or sys.argv[1:])
    res = {"commands": old.get("commands", [old["command"]] if "command" in old else []) + [command],
           "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "omegas": old.get("omegas", args.omegas),
           "runs": old.get("runs", {}),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                      f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, load average "
                      f"{os.getloadavg()[0]:.1f} at the start"}
    if args.draws:
        for omega in args.omegas:
            label = f"CFG reward, alpha_rew {omega - 1:g}, {args.draws} draws"
            res["runs"][label] = [run_one(f"reward-{omega:g}-d{args.draws}", s, world, omega, True, args.draws)
                                  for s in args.seeds]
        return finish(res, args, cpu, None)
    res["runs"]["Diff-Instruct (omega 1, alpha_rew 0)"] = [run_one("di", s, world, 1.0, False) for s in args.seeds]
    panels = {"base generator": samples_of(world, None, args.seeds[0])}
    for omega in args.omegas:
        for explicit, label in ((False, f"CFG teacher, omega {omega:g}"),
                                (True, f"CFG reward, alpha_rew {omega - 1:g}")):
            tag = f"{'reward' if explicit else 'teacher'}-{omega:g}"
            res["runs"][label] = [run_one(tag, s, world, omega, explicit) for s in args.seeds]
            panels[label] = samples_of(world, RUNS / f"{tag}-s{args.seeds[0]}", args.seeds[0])
    return finish(res, args, cpu, lambda path: world.plot_samples(panels, path))


def finish(res: dict, args, cpu: float, plot) -> dict:
    res["cpu_seconds"] = res.get("cpu_seconds", 0.0) + time.process_time() - cpu
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    if plot is not None:
        plot(out.with_suffix(".samples.png"))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
