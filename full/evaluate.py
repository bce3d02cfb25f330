"""Sample a prompt set with fixed seeds through the diffusers pipeline and score it with the paper's metrics.

    python -m full.evaluate --model full/specs/sdxl_dmd2.json --lora runs/pso-online-dmd2/adapter \
        --prompts data/pickapic_test_prompts.txt --out runs/eval-dmd2

For each model (the base role, then each --lora / fully fine-tuned --unet folder) every prompt i is sampled from the
seed `seed + i` with the role's own scheduler and grid (SDXL-Turbo: Euler ancestral, DMD2: LCMScheduler at [999,
749, 499, 249], a teacher: --steps with --guidance), exactly as a user of the pipeline would; the same noise for
every model. SD3 / FLUX roles sample with FlowMatchEulerDiscreteScheduler on the role's grid (its pipeline's own
sigmas, passed exactly to an unshifted copy of the scheduler: FullWorld.pipeline / pipeline_sigmas): the Euler
step for a flow_sde teacher, its stochastic_sampling step (= the flow_x0_renoise MDP) for a few-step student /
generator; FLUX's CFG is true_cfg_scale, a guidance-distilled FLUX gets the spec's embedded guidance. The scores are
every reward the spec names (reward, quality, eval_rewards: PickScore, CLIP score, LAION aesthetic, ImageReward as
in PSO Table 1 / DI++ Table 2), averaged over prompts. Writes results.json, table.md and samples.png (the first
prompts, one row per model) to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import harness


def sample_latents(world, pipe, prompts: list[str], seed: int, timesteps: list[int], sampler: str, guidance: float,
                   batch: int | None = None) -> torch.Tensor:
    """Latents of `prompts`, prompt i from torch.Generator().manual_seed(seed + i), `batch` (default
    world.decode_batch) prompts per pipeline call. The prompts go in as the world's embeddings (the same the methods
    train on), so this works after precompute_embeddings freed the text encoders."""
    batch = batch or world.decode_batch
    out = []
    for k in range(0, len(prompts), batch):
        chunk = prompts[k:k + batch]
        gens = [torch.Generator().manual_seed(seed + k + j) for j in range(len(chunk))]
        kw = dict(num_inference_steps=len(timesteps))
        if sampler == "x0_renoise":  # LCMScheduler takes the exact grid, e.g. [999, 749, 499, 249] or DMD2's [399]
            kw = dict(timesteps=list(timesteps))
        elif sampler in ("flow_sde", "flow_x0_renoise"):  # world.pipeline's unshifted scheduler: the exact sigmas
            kw = dict(sigmas=world.pipeline_sigmas(timesteps))
        image_kw = dict(height=world.resolution, width=world.resolution)
        args = {"guidance_scale": guidance, **world.pipeline_embeds(chunk, guidance)}
        if world.kind == "flux":  # FluxPipeline: CFG is true_cfg_scale, guidance_scale the embedded guidance
            args["true_cfg_scale"] = max(guidance, 1.0)
        with torch.no_grad():
            res = pipe(**args, generator=gens, output_type="latent", **kw, **image_kw)
        latents = res.images
        if world.kind == "flux":  # FluxPipeline returns its packed latents with output_type="latent"
            latents = pipe._unpack_latents(latents, world.resolution, world.resolution, pipe.vae_scale_factor)
        out.append(latents.float())
    return torch.cat(out)


def score(world, x0: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    from .rewards import reward_name

    cond = world.encode(prompts)
    m = world.metrics(x0, cond)
    names = {"reward": reward_name(world.spec.reward), "quality": reward_name(world.spec.quality)}
    out = {}
    for k, v in m.items():
        if k == "distance":
            continue
        out[names.get(k, k)] = v
    return out


def evaluate(model: str, loras: list[str], prompts_src: str | None, n: int, seed: int, role: str, guidance: float,
             steps: int | None, out: str, batch: int | None = None) -> dict:
    from . import load_world
    from .data import load_prompts

    # prompts from another file than the spec's need the text encoders: no precomputation then
    world = load_world(model, **({"precompute_embeddings": False} if prompts_src else {}))
    prompts = (load_prompts(prompts_src) if prompts_src else world.eval_prompts)[:n]
    sampler, grid = world.role_sampler(role)  # the spec's sampler and grid, validated, without loading a UNet
    timesteps = world.role_sampler(role, steps=steps)[1] if steps else grid  # the role's pipeline grid at --steps
    pipe = world.pipeline(role)  # the role's UNet / transformer, loaded once
    folder = world.parts.net_folder  # unet, or transformer (SD3 / FLUX)
    base_unet = getattr(pipe, folder)
    results, panels = {}, {}
    for name, lora in [("base", None)] + [(Path(p).parent.name + "/" + Path(p).name, p) for p in loras]:
        unet_dir = Path(lora) / folder if lora else None
        if unet_dir is not None and unet_dir.is_dir():  # a fully fine-tuned network replaces the role's for one pass
            tuned = world.parts.net_class().from_pretrained(unet_dir, torch_dtype=world.dtype).to(world.device)
            setattr(pipe, folder, tuned)
            x0 = sample_latents(world, pipe, prompts, seed, timesteps, sampler, guidance, batch)
            setattr(pipe, folder, base_unet)
        elif lora:
            pipe.load_lora_weights(lora, adapter_name="tuned")
            x0 = sample_latents(world, pipe, prompts, seed, timesteps, sampler, guidance, batch)
            pipe.unload_lora_weights()
        else:
            x0 = sample_latents(world, pipe, prompts, seed, timesteps, sampler, guidance, batch)
        results[name] = score(world, x0, prompts)
        panels[name] = (x0, world.encode(prompts))
        print(name, "  ".join(f"{k} {v:.4f}" for k, v in results[name].items()), flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "role": role, "sampler": sampler, "timesteps": timesteps, "guidance": guidance,
            "prompts": len(prompts), "seed": seed}
    harness.write_json_atomic(out / "results.json", {"setup": meta, "results": results})
    (out / "table.md").write_text(table(results, meta))
    world.plot_samples(panels, out / "samples.png")
    return results


def table(results: dict, meta: dict) -> str:
    cols = list(next(iter(results.values())))
    lines = [f"{meta['prompts']} prompts, {meta['sampler']} at {meta['timesteps']}, guidance {meta['guidance']}, "
             f"seeds {meta['seed']}..{meta['seed'] + meta['prompts'] - 1}", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for name, r in results.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model spec or checkpoint")
    p.add_argument("--lora", nargs="*", default=[], help="adapter folders written by the methods (world.save_adapter)")
    p.add_argument("--prompts", help="prompt file (default: the spec's eval_prompts)")
    p.add_argument("-n", type=int, default=500, help="number of prompts (PSO: 500 Pick-a-Pic test, 1632 Parti)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", default="student", choices=["student", "generator", "teacher"])
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale (0/1: off, as few-step models are run)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (0: the role's grid; e.g. 1 for SDXL-Turbo 1-step)")
    p.add_argument("--batch", type=int, default=None, help="prompts per pipeline call (default: the spec's decode_batch)")
    p.add_argument("--out", default="runs/eval")
    a = p.parse_args(argv)
    return evaluate(a.model, a.lora, a.prompts, a.n, a.seed, a.role, a.guidance, a.steps or None, a.out, a.batch)


if __name__ == "__main__":
    main()
