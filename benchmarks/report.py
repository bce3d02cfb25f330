"""The side-by-side report: every method and variant on the same world, seeds and machine, in one table.

    python benchmarks/report.py --world toy2d        # 3 seeds + a determinism re-run, plus the frontier sweeps
    python benchmarks/report.py --world flow2d       # the same rows on the flow-matching toy (toy/flow2d.py)
    python benchmarks/report.py --world mnist        # shortened runs (WORLD_SCRIPT_ARGS)
    python benchmarks/report.py --world tiny         # tiny random diffusers pipelines on the CPU (plumbing and cost)
    python benchmarks/report.py --world cuda         # the launcher settings on real checkpoints, on a CUDA GPU
    python benchmarks/update_readme.py               # then copy the tables into README.md
(wall times measured on this project's machine: README.md, "Side-by-side report").

Every run is the method script itself in a fresh process, exactly as a user types it (the command is in the
table's source JSON), `--jobs` at a time with `--threads` torch threads each (default 2 x 1 on a 2-core machine:
torch's threads slow each other down badly when two processes share two cores). Per run it reads:
  metrics.json  reward, quality and distance to the evaluation data, base vs tuned from the same seeds, and every
                further pair <name>_base / <name>_tuned the world or method writes (toy2d's transfer and sharpness,
                1-step scores, ...), read generically (world_metrics); nfe_per_update = the minimum stated in the
                method's docstring (a function of the config)
  log.csv       the NFEs counted in every update (common.CountingDenoiser) and the seconds of every update
  the process   peak resident memory (getrusage of that child, via os.wait4); on CUDA, peak GPU memory
                (torch.cuda.max_memory_allocated, written by the child)
Seed `--seeds[0]` of every main row runs a second time into its own folder: the report compares the two
metrics.json (timings excluded) and the two log.csv (every column but `seconds`) for exact equality.

Reward-quality frontiers (toy worlds; FRONTIERS, `--no-frontier` skips the sweeps): PSO online and offline and
Sharpening RLHF at three values of beta, DI++ at its three alpha_rew rows; one point per setting, (quality, reward)
of the tuned model, mean ± sd over seeds, against the base model the frontier starts from. The methods are compared
by where their points lie, not by raw gain on an unbounded reward (which ranks over-optimisation first).

Writes benchmarks/results/report.json (every run: command, metrics, memory, checks), report.<world>.md (the tables:
main, further read-outs, frontiers), report.<world>.curves.png (reward during training, mean over seeds, min-max
band), report.<world>.frontier.png (reward vs quality per frontier setting) and report.<world>.samples.png (base vs
tuned from the same seeds, first seed of every main row). Run folders: runs/report/<world>/<row>/seed<k>.

What the numbers mean per world is in README.md ("Side-by-side report"); the per-method ablations stay in
benchmarks/{pso,sharpening,diff_instruct_pp}.py.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # full/ and the method scripts, also without `pip install -e .`
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Row:
    method: str  # PSO | Sharpening | DI++
    label: str
    script: str
    args: list[str]
    setting: str = ""  # full backend: the launcher setting (full/launch.py) the row runs
    tiny: str = ""  # --world tiny: which tiny pipeline the setting runs on (xl or sd15)
    frontier: str = ""  # the reward-quality frontier this row is a point of ("" = none)
    knob: str = ""  # the frontier's regularisation knob (beta, alpha_rew) and this row's value of it
    value: str = ""
    main: bool = True  # a row of the main table (and of the determinism re-run); False: a frontier-only point


# The toy rows: each method's variants at the script's defaults (what `python <script> --variant ...` does), and
# the baselines each paper compares against. Per-world arguments only shrink MNIST runs to fit the time budget.
# DI++'s alpha_rew is per world (the IKL term is summed over 2 vs 784 dimensions): none, moderate, strong.
# flow2d is toy2d's data and reward under flow base models: toy2d's scales. The rows run DI++'s default variant
# (dipp); `--variant di` reads the reference from a DDPM state and refuses flow worlds.
DIPP_REWARD_SCALES = {"toy2d": ["0", "0.1", "1"], "flow2d": ["0", "0.1", "1"], "mnist": ["0", "0.3", "1"]}
TOY_WORLDS = ("toy2d", "flow2d", "mnist")

# The reward-quality frontiers: every reward method at three strengths of its regularisation knob, each point the
# mean ± sd over seeds of (quality, reward) of the tuned model. Raw reward gain on an unbounded reward ranks
# over-optimisation first; a frontier shows what each setting pays in quality for its reward. The values bracket
# the paper's setting (PSO: beta 5 online, 50 offline; Sharpening's toy beta 100) by factors of about 5; DI++'s
# frontier is its three main rows (DIPP_REWARD_SCALES). Frontier-only rows run every seed once (the main rows'
# determinism re-run covers the same code paths).
FRONTIERS = [  # (method, frontier name, script, variant arguments, option, knob, values)
    ("PSO", "PSO online, Eq. 7", "pso.py", ["--variant", "online"], "--beta", "beta", ["1", "5", "25"]),
    ("PSO", "PSO offline, Eq. 6", "pso.py", ["--variant", "offline"], "--beta", "beta", ["10", "50", "250"]),
    ("Sharpening", "Sharpening RLHF, n=3 m=3", "sharpening.py", ["--variant", "rlhf"], "--beta", "beta",
     ["25", "100", "400"]),
]
DIPP_FRONTIER = "DI++"


def frontier_rows() -> list[Row]:
    return [Row(method, f"{name.split(' ', 1)[1]}, {knob} = {v}", script, [*args, option, v], frontier=name,
                knob=knob, value=v, main=False)
            for method, name, script, args, option, knob, values in FRONTIERS for v in values]


def toy_rows(world: str, frontier: bool = True) -> list[Row]:
    return [
        Row("PSO", "pso, Eq. 5 (target split)", "pso.py", ["--variant", "pso", "--no-naive-baseline"]),
        Row("PSO", "naive eps-MSE baseline (target split)", "pso.py", ["--variant", "naive"]),
        Row("PSO", "offline, Eq. 6 (preference pairs)", "pso.py", ["--variant", "offline"]),
        Row("PSO", "online, Eq. 7", "pso.py", ["--variant", "online"]),
        Row("PSO", "customize, App. B.3 (concept images)", "pso.py", ["--variant", "customize"]),
        Row("Sharpening", "SFT, n=3 m=3", "sharpening.py", ["--variant", "sft"]),
        Row("Sharpening", "SFT baseline: fine-tuning, n=1 m=1", "sharpening.py",
            ["--variant", "sft", "--n", "1", "--m", "1"]),
        Row("Sharpening", "RLHF, n=3 m=3", "sharpening.py", ["--variant", "rlhf"]),
        Row("Sharpening", "RLHF baseline: Diffusion-DPO, n=2 m=1", "sharpening.py",
            ["--variant", "rlhf", "--n", "2", "--m", "1"]),
        *[Row("DI++", f"alpha_rew = {a}" + (" (Diff-Instruct)" if a == "0" else ""), "diff_instruct_pp.py",
              ["--reward-scale", a], frontier=DIPP_FRONTIER, knob="alpha_rew", value=a)
          for a in DIPP_REWARD_SCALES[world]],
        *(frontier_rows() if frontier else []),
    ]


WORLD_SCRIPT_ARGS = {  # toy2d and flow2d run at the scripts' defaults; MNIST fewer updates and samples (60 minutes)
    "toy2d": {},
    "flow2d": {},
    "mnist": {"pso.py": ["--steps", "100", "--batch", "32", "--eval-samples", "500"],
              "sharpening.py": ["--steps", "100", "--batch", "16", "--final-samples", "200", "--eval-samples", "64"],
              "diff_instruct_pp.py": ["--steps", "150", "--batch", "64", "--eval-samples", "500"]},
}
# --smoke: two updates and a handful of samples (checks the plumbing, not the methods)
SMOKE = {"pso.py": ["--steps", "2", "--batch", "4", "--eval-samples", "8", "--eval-every", "1", "--reference-images",
                    "4", "--concept-images", "2", "--save-every", "1"],
         "sharpening.py": ["--steps", "2", "--batch", "4", "--eval-samples", "4", "--final-samples", "8",
                           "--eval-every", "1", "--save-every", "1"],
         "diff_instruct_pp.py": ["--steps", "2", "--batch", "4", "--eval-samples", "8", "--save-every", "1"]}

# The full backend: every method and variant through its launcher setting (the same list tests/test_full_runs.py
# checks), on tiny random pipelines (--world tiny: "xl" = SDXL + LCMScheduler, "sd15" = SD1.5 + trailing Euler
# ancestral) or on the settings' real checkpoints (--world cuda).
FULL_ROWS = [
    Row("PSO", "pso, Eq. 5 (style transfer)", "pso.py", ["--no-naive-baseline"], "pso-style-turbo", "sd15"),
    Row("PSO", "naive baseline (style transfer)", "pso.py", ["--variant", "naive"], "pso-style-turbo", "sd15"),
    Row("PSO", "offline, Eq. 6 (DMD2, Pick-a-Pic)", "pso.py", [], "pso-offline-dmd2", "xl"),
    Row("PSO", "online, Eq. 7 (DMD2, PickScore)", "pso.py", [], "pso-online-dmd2", "xl"),
    Row("PSO", "online, Eq. 7 (SDXL-Turbo)", "pso.py", [], "pso-online-turbo", "sd15"),
    Row("PSO", "customize, App. B.3 (SDXL-Turbo)", "pso.py", [], "pso-customize-turbo", "sd15"),
    Row("Sharpening", "SFT, n=3 m=3 (SDXL, full UNet)", "sharpening.py", [], "sharpening-sft-sdxl", "xl"),
    Row("Sharpening", "RLHF, n=3 m=3 (SDXL, full UNet)", "sharpening.py", [], "sharpening-rlhf-sdxl", "xl"),
    Row("DI++", "DI++ (DMD2 one-step, LoRA)", "diff_instruct_pp.py", [], "dipp-sdxl-dmd2", "xl"),
    Row("DI++", "DI++ (SD-Turbo, full generator, CFG 4.5)", "diff_instruct_pp.py", [], "dipp-sd-turbo",
        "sd15"),
    Row("DI++", "Diff-Instruct pre-training (SD2.1)", "diff_instruct_pp.py", [], "di-pretrain-sd21", "sd15"),
]
TIMING_KEYS = ("seconds", "wall")  # metrics that measure time, not results: excluded from the determinism check


# ---------------------------------------------------------------------------------------------------
# One run: the method script in a child process
# ---------------------------------------------------------------------------------------------------
def child(argv: list[str]) -> None:
    """`report.py --child <script> <args...>`: run a method's main in this process, then record peak GPU memory."""
    script, args = argv[0], argv[1:]
    method = importlib.import_module(Path(script).stem)
    method.main(args)
    import torch

    if torch.cuda.is_available():
        out = Path(args[len(args) - 1 - args[::-1].index("--out") + 1])  # the last --out wins, as in argparse
        (out / "gpu.json").write_text(json.dumps({"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                                                  "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                                                  "gpu": torch.cuda.get_device_name()}))


def run_one(cmd: list[str], out: Path, threads: int, env_extra: dict, resume: bool = False) -> dict:
    """Run `cmd` (a method command ending in --out `out`) in a child process; its wall time and peak RSS.
    With `resume`, a run folder that already finished this very command is read instead of run again."""
    done = out / "report_run.json"
    if resume and done.exists() and json.loads(done.read_text())["command"] == "python " + shlex.join(cmd):
        return {**json.loads(done.read_text()), **read_run(out)}
    done.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env_extra}
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.stdout.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *cmd], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would pool them)
        proc.returncode = os.waitstatus_to_exitcode(status)
    record = {"command": "python " + shlex.join(cmd), "out": str(out), "returncode": proc.returncode,
              "wall_seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.stdout.txt").read_text()[-2000:]
        raise RuntimeError(f"{record['command']} failed with exit code {proc.returncode}:\n{tail}")
    gpu = out / "gpu.json"
    if gpu.exists():
        record.update(json.loads(gpu.read_text()))
    done.write_text(json.dumps(record))  # written last: its presence means the run finished
    return {**record, **read_run(out)}


def read_run(out: Path, metrics: bool = True) -> dict:
    """What a finished run folder holds for the report: metrics.json and the rows of log.csv."""
    with open(Path(out) / "log.csv") as f:
        run = {"log": list(csv.DictReader(f))}
    if metrics:
        run["metrics"] = json.loads((Path(out) / "metrics.json").read_text())
    return run


def same_results(a: dict, b: dict) -> list[str]:
    """The entries where two runs of one command differ (timings excluded): [] means bit-identical results."""
    diff = [k for k in sorted(set(a["metrics"]) | set(b["metrics"]))
            if not any(t in k for t in TIMING_KEYS) and a["metrics"].get(k) != b["metrics"].get(k)]
    if len(a["log"]) != len(b["log"]):
        return diff + ["log.csv length"]
    cols = [c for c in a["log"][0] if c != "seconds"] if a["log"] else []
    return diff + [f"log.csv {c}" for c in cols if [r[c] for r in a["log"]] != [r.get(c) for r in b["log"]]]


# ---------------------------------------------------------------------------------------------------
# What each world runs
# ---------------------------------------------------------------------------------------------------
def rows_of(world: str, frontier: bool = True) -> list[Row]:
    """The rows `--world` runs, in table order."""
    return FULL_ROWS if world in ("tiny", "cuda") else toy_rows(world, frontier)


def plan(world: str, seeds: list[int], smoke: bool, only: list[str] | None, model: str | None, steps: int | None,
         batch: int | None, repeat: bool, setup: Path | None, runs_root: Path, frontier: bool = True) -> list[tuple]:
    """(row, seed, is_repeat, command, out folder) of every run, longest-running rows first. The first seed of
    every main row runs twice (`repeat`); frontier-only rows run once per seed."""
    rows = rows_of(world, frontier)
    jobs = []
    for row in rows:
        if only and not any(o.lower() in row.label.lower() or o.lower() in row.method.lower() for o in only):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in f"{row.method} {row.label}".lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        if smoke or world == "tiny":
            extra = list(SMOKE[row.script])
        elif world == "cuda":  # the training loop's cost: small evaluations, as full/bench.py
            from full.launch import SMALL_RUN

            extra = list(SMALL_RUN[row.script])
        else:
            extra = []
        extra += ["--steps", str(steps)] if steps else []
        extra += ["--batch", str(batch)] if batch else []
        for seed in seeds:
            for again in ([False, True] if repeat and row.main and seed == seeds[0] else [False]):
                out = runs_root / slug / (f"seed{seed}" + ("-repeat" if again else ""))
                tail = [*row.args, *extra, "--seed", str(seed), "--out", str(out)]
                if world in ("tiny", "cuda"):
                    from full import launch

                    spec = model or (str(setup / row.tiny / "spec.json") if world == "tiny" else None)
                    script, argv = launch.method_argv(row.setting, spec, 1, tail)
                    cmd = [script.name, *argv]
                else:
                    cmd = [row.script, "--model", world, *row.args,
                           *([] if smoke else WORLD_SCRIPT_ARGS[world].get(row.script, [])), *extra,
                           "--seed", str(seed), "--out", str(out)]
                jobs.append((row, seed, again, cmd, out))
    cost = {"sharpening.py": 2, "diff_instruct_pp.py": 1, "pso.py": 1}  # RLHF sharpening rows are the long ones
    return sorted(jobs, key=lambda j: -(cost[j[0].script] + ("rlhf" in j[3]) * 2))


def run_all(jobs, n_jobs: int, threads: int, resume: bool, keep_going: bool = False) -> list[dict]:
    """Every job's record; with `keep_going`, a run that fails is an {"error": ...} record (the others go on)."""
    def work(job):
        row, seed, again, cmd, out = job
        try:
            rec = run_one(cmd, out, threads, {}, resume)
        except RuntimeError as e:
            if not keep_going:
                raise
            print(f"[report] {row.method} | {row.label} | seed {seed}: could not run", flush=True)
            return {"method": row.method, "label": row.label, "setting": row.setting, "seed": seed, "repeat": again,
                    "error": " | ".join(str(e).strip().splitlines()[-3:])[-600:]}
        print(f"[report] {row.method} | {row.label} | seed {seed}{' (repeat)' if again else ''}: "
              f"{rec['wall_seconds']:.0f} s, {rec['peak_rss_mib']:.0f} MiB", flush=True)
        return {"method": row.method, "label": row.label, "setting": row.setting, "seed": seed, "repeat": again,
                "frontier": row.frontier, "knob": row.knob, "value": row.value, "main": row.main, **rec}

    with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
        return list(pool.map(work, jobs))


# ---------------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------------
CORE_METRICS = ("reward", "quality", "distance")  # every world reports these; the main table's columns


def world_metrics(metrics: dict) -> list[tuple[str, str]]:
    """The world's read-outs in a run's metrics.json, read generically: every pair of numbers k_base<rest> and
    k_tuned<rest> (base and tuned model on the same noise), in the file's order. Returns (name, key template)
    pairs, name = k<rest> with "_1step" shown as " (1 step)", template.format("_base" or "_tuned") = the two keys.
    A world or method that adds a read-out (toy2d's transfer and sharpness, MNIST's bold share, PSO's 1-step and
    base-split scores) gets its column without a change here."""
    out = []
    for key, v in metrics.items():
        k, sep, rest = key.partition("_base")
        if not (k and sep) or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if any(t in key for t in TIMING_KEYS) or k + "_tuned" + rest not in metrics:
            continue
        out.append((k + rest.replace("_1step", " (1 step)").replace("_", " "), k + "{}" + rest))
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One entry per row: mean and sd over seeds, the NFE check and the determinism check."""
    import statistics

    out = []
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label and not r["repeat"]]
        repeats = [r for r in records if r["label"] == label and r["repeat"]]

        def stat(f):
            xs = [f(r) for r in runs]
            xs = [x for x in xs if x is not None]
            if not xs:
                return None
            return (statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)

        m = lambda k: (lambda r: r["metrics"].get(k))  # noqa: E731
        counted = sorted({float(row["nfe"]) for r in runs for row in r["log"]})
        stated = sorted({float(r["metrics"]["nfe_per_update"]) for r in runs})
        updates = [float(row["seconds"]) for r in runs for row in r["log"][1:]]  # the first update warms up
        deterministic = None
        if repeats:
            first = next(r for r in runs if r["seed"] == repeats[0]["seed"])
            deterministic = same_results(first, repeats[0])
        out.append({
            "method": runs[0]["method"], "label": label, "setting": runs[0]["setting"],
            "seeds": [r["seed"] for r in runs], "command": runs[0]["command"],
            "eval_split": runs[0]["metrics"].get("eval_split", "base"),
            "updates": int(len(runs[0]["log"])),
            "reward_base": stat(m("reward_base")), "reward_tuned": stat(m("reward_tuned")),
            "reward_gain": stat(lambda r: r["metrics"]["reward_tuned"] - r["metrics"]["reward_base"]),
            "quality_base": stat(m("quality_base")), "quality_tuned": stat(m("quality_tuned")),
            "distance_base": stat(m("distance_base")), "distance_tuned": stat(m("distance_tuned")),
            "extras": {name: [stat(m(stem.format("_base"))), stat(m(stem.format("_tuned")))]
                       for name, stem in dict.fromkeys(w for r in runs for w in world_metrics(r["metrics"]))
                       if name not in CORE_METRICS},
            "frontier": runs[0].get("frontier", ""), "knob": runs[0].get("knob", ""),
            "value": runs[0].get("value", ""), "main": runs[0].get("main", True),
            "nfe_counted": counted, "nfe_stated": stated, "nfe_ok": counted == stated,
            "s_per_update": statistics.median(updates) if updates else None,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_gpu_gib": max((r.get("peak_gpu_gib", 0.0) for r in runs), default=0.0) or None,
            "peak_gpu_reserved_gib": max((r.get("peak_gpu_reserved_gib", 0.0) for r in runs), default=0.0) or None,
            "wall_seconds": stat(lambda r: r["wall_seconds"]),
            "determinism": None if deterministic is None else ("identical" if not deterministic else deterministic),
        })
    return out


def _ms(v, digits=3) -> str:
    if v is None:
        return "-"
    mean, sd = v
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def _arrow(pair) -> str:
    base, tuned = pair
    return "-" if base is None and tuned is None else f"{_ms(base)} → {_ms(tuned)}"


def markdown(world: str, result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    main = [r for r in rows if r.get("main", True)]
    seeds = rows[0]["seeds"] if rows else []
    lines = [f"Command: `{meta['command']}` ({meta['date']}). Machine: {meta['machine']}; {meta['jobs']} runs at a "
             f"time, {meta['threads']} torch thread(s) each; {meta['load']}. Total wall time "
             f"{meta['wall_seconds'] / 60:.1f} min. Mean ± sd over seeds {seeds}; reward, quality and distance of "
             "fixed-seed samples of the base and the tuned model (same noise); distance to the evaluation split's "
             "data ('target' for the transfer rows); NFE = network evaluations per condition per update: counted "
             "in every update of every run / stated in the method's docstring; s/update = median over updates "
             "(first excluded); peak memory = the process's peak resident set (max over seeds)"
             + (", and peak GPU memory: torch.cuda max_memory_allocated / max_memory_reserved (the caching "
                "allocator's, fragmentation included)" if any(r["peak_gpu_gib"] for r in rows) else "") + ".", ""]
    gpu = any(r["peak_gpu_gib"] for r in rows)
    lines += ["| method | run | updates | reward: base → tuned | reward gain | quality: base → tuned | "
              "distance: base → tuned (split) | NFE counted / stated | s/update | peak RSS (MiB) |"
              + (" peak GPU allocated / reserved (GiB) |" if gpu else "") + " same seed twice |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in main:
        lines.append(
            f"| {r['method']} | {r['label']} | {r['updates']} | {_ms(r['reward_base'])} → {_ms(r['reward_tuned'])} | "
            f"{_ms(r['reward_gain'])} | {_ms(r['quality_base'])} → {_ms(r['quality_tuned'])} | "
            f"{_ms(r['distance_base'])} → {_ms(r['distance_tuned'])} ({r['eval_split']}) | {_nfe(r)} | "
            f"{r['s_per_update']:.3f} | {r['peak_rss_mib']:.0f} |"
            + (f" {r['peak_gpu_gib']:.2f} / {r.get('peak_gpu_reserved_gib') or 0:.2f} |" if gpu else "")
            + f" {_det(r)} |")
    lines += extras_table(main)
    lines += frontier_table(world, rows)
    off = [r["label"] for r in rows if not r["nfe_ok"]]
    checks = ["NFEs: counted == stated in every update of every run"
              + (" (frontier rows included)" if len(main) < len(rows) else "") + ": "
              + ("yes." if not off else f"NO ({', '.join(off)}).")]
    det = [r for r in rows if r["determinism"] is not None]
    if det:
        same = all(r["determinism"] == "identical" for r in det)
        checks.append(f"Determinism: seed {det[0]['seeds'][0]} of every main row run twice: metrics.json (timings "
                      "excluded) and every log.csv column but `seconds` "
                      + (f"identical in all {len(det)} rows." if same else "DIFFER in some rows (table)."))
    frontier_png = (f"`benchmarks/results/report.{world}.frontier.png` (reward vs quality per setting), "
                    if any(r.get("frontier") for r in rows) else "")
    lines += ["", *checks, "",
              f"Figures: `benchmarks/results/report.{world}.curves.png` (reward during training), {frontier_png}"
              f"`benchmarks/results/report.{world}.samples.png` (base vs tuned, seed {seeds[0] if seeds else 0}). "
              "The exact command of each run is in `benchmarks/results/report.json`.", ""]
    if result.get("failed"):  # --world cuda goes on past a setting that cannot run
        lines += ["Could not run:", ""] + [f"* {r['method']} | {r['label']} (seed {r['seed']}): {r['error']}"
                                           for r in result["failed"]] + [""]
    return "\n".join(lines)


def _nfe(r: dict) -> str:
    nfe = f"{'/'.join(f'{x:g}' for x in r['nfe_counted'])} / {'/'.join(f'{x:g}' for x in r['nfe_stated'])}"
    return nfe + ("" if r["nfe_ok"] else " (differs)")


def _det(r: dict) -> str:
    return "-" if r["determinism"] is None else ("identical" if r["determinism"] == "identical"
                                                 else "differs: " + ", ".join(r["determinism"][:4]))


def extra_names(rows: list[dict], one_step: bool = True) -> list[str]:
    """The read-outs beyond reward / quality / distance that any row reports, 4-step ones first."""
    names = list(dict.fromkeys(n for r in rows for n in r.get("extras", {})))
    four = [n for n in names if "(1 step)" not in n]
    return four + ([n for n in names if "(1 step)" in n] if one_step else [])


def extras_table(rows: list[dict]) -> list[str]:
    """Every further read-out the world and the method write (base → tuned), one column each, '-' where a row
    has none; nothing when no row has one."""
    names = extra_names(rows)
    rows = [r for r in rows if r.get("extras")]
    if not names or not rows:
        return []
    return ["", "Further read-outs the runs report (base → tuned, same noise; names as in metrics.json; '1 step': "
            "the same model sampled with one step):", "",
            "| method | run | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
            *[f"| {r['method']} | {r['label']} | " + " | ".join(_arrow(r["extras"].get(n, [None, None]))
                                                             for n in names) + " |" for r in rows]]


def frontiers(rows: list[dict]) -> dict[str, list[dict]]:
    """The frontier rows grouped by frontier name, in table order (a group's rows in the order of their knob)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("frontier"):
            groups.setdefault(r["frontier"], []).append(r)
    return {name: sorted(g, key=lambda r: float(r["value"])) for name, g in groups.items()}


def frontier_table(world: str, rows: list[dict]) -> list[str]:
    """One line per frontier point (tuned model, mean ± sd over seeds) and one for the base model it starts from."""
    groups = frontiers(rows)
    if not groups:
        return []
    names = extra_names([r for g in groups.values() for r in g], one_step=False)
    out = ["", f"Reward–quality frontiers ({world}): every reward method at three settings of its regularisation "
           "knob; compare the methods by where their points lie in (quality, reward), not by reward gain alone "
           "(figure: `report." + world + ".frontier.png`). Tuned model, mean ± sd over seeds; 'base' = the model "
           "every point of the frontier starts from.", "",
           "| frontier | setting | reward | quality | distance (split) | " + "".join(f"{n} | " for n in names)
           + "NFE counted / stated |",
           "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for name, group in groups.items():
        b = group[0]
        out.append(f"| {name} | base | {_ms(b['reward_base'])} | {_ms(b['quality_base'])} | "
                   f"{_ms(b['distance_base'])} ({b['eval_split']}) | "
                   + "".join(f"{_ms(b.get('extras', {}).get(n, [None, None])[0])} | " for n in names) + "- |")
        for r in group:
            out.append(f"| {name} | {r['knob']} = {r['value']} | {_ms(r['reward_tuned'])} | "
                       f"{_ms(r['quality_tuned'])} | {_ms(r['distance_tuned'])} ({r['eval_split']}) | "
                       + "".join(f"{_ms(r.get('extras', {}).get(n, [None, None])[1])} | " for n in names)
                       + f"{_nfe(r)} |")
    return out


def plot_curves(world: str, records: list[dict], path: Path) -> None:
    """Reward during training per method: fixed-seed evaluations (PSO, Sharpening) or the training batch (DI++,
    smoothed over 20 updates); mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in records if r.get("main", True)]  # the frontier points have their own figure
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for label in dict.fromkeys(r["label"] for r in records if r["method"] == method):
            runs = [r for r in records if r["label"] == label and not r["repeat"]]
            key = "eval_reward" if runs[0]["log"] and "eval_reward" in runs[0]["log"][0] else "reward"
            curves = []
            for r in runs:
                pts = [(int(row["step"]), float(row[key])) for row in r["log"] if row.get(key) not in ("", None)]
                curves.append(pts)
            steps = np.array([s for s, _ in curves[0]])
            ys = np.array([[v for _, v in c] for c in curves])
            if key == "reward" and not ys.any():  # DI++ with alpha_rew = 0 does not evaluate the reward
                ax.plot([], [], lw=1.2, label=f"{label}: reward not computed")
                continue
            if key == "reward" and ys.shape[1] >= 20:
                kernel = np.ones(20) / 20
                ys = np.stack([np.convolve(y, kernel, mode="valid") for y in ys])
                steps = steps[19:]
            (line,) = ax.plot(steps, ys.mean(0), lw=1.2, label=label)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        what = "fixed-seed samples" if method != "DI++" else "training batch (20-update mean)"
        ax.set(title=f"{method} ({world}): reward of {what}", xlabel="update")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_frontier(world: str, rows: list[dict], path: Path) -> bool:
    """Reward vs quality of the tuned model, one point per setting of each frontier (mean ± sd over seeds as error
    bars on both axes), the points of a frontier joined in the order of its knob and labelled with its value; a
    hollow marker for the base model of each frontier. False (and no file) when no row is a frontier point."""
    groups = frontiers(rows)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, (name, group) in enumerate(groups.items()):
        ok = [r for r in group if r["quality_tuned"] and r["reward_tuned"]]
        if not ok:
            continue
        color, marker = f"C{i}", "osD^v<>p"[i % 8]
        q = [r["quality_tuned"] for r in ok]
        w = [r["reward_tuned"] for r in ok]
        ax.errorbar([m for m, _ in q], [m for m, _ in w], xerr=[sd for _, sd in q], yerr=[sd for _, sd in w],
                    color=color, marker=marker, ms=5, lw=1.2, capsize=2, label=f"{name} ({ok[0]['knob']})")
        for r, (qm, _), (wm, _) in zip(ok, q, w):
            ax.annotate(r["value"], (qm, wm), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        b = group[0]
        if b["quality_base"] and b["reward_base"]:
            ax.plot([b["quality_base"][0]], [b["reward_base"][0]], marker=marker, ms=8, mfc="none", color=color,
                    ls="none", label=f"{name}: base")
    ax.set(title=f"reward-quality frontiers ({world}), tuned model, mean ± sd over seeds", xlabel="quality",
           ylabel="reward")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_samples(world: str, records: list[dict], path: Path) -> None:
    """The first seed's samples.png of every row (base vs tuned from the same noise), one tile per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    first = {}
    for r in records:
        if not r["repeat"] and r.get("main", True) and r["label"] not in first:
            first[r["label"]] = r
    tiles = [(f"{r['method']}: {r['label']}", Path(r["out"]) / "samples.png") for r in first.values()]
    tiles = [(t, p) for t, p in tiles if p.exists()]
    cols = 2
    nrows = (len(tiles) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(9 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, p) in zip(axes.flat, tiles):
        ax.imshow(mpimg.imread(p))
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # MNIST digits stay legible
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = f"{name} ({cpu})"
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="toy2d", choices=[*TOY_WORLDS, "tiny", "cuda"])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (toys), 0 (tiny, cuda)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on the CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--no-repeat", action="store_true", help="skip the determinism re-run of the first seed")
    p.add_argument("--no-frontier", action="store_true", help="toy worlds: skip the frontier-only rows (the beta "
                   "sweeps of FRONTIERS; DI++'s frontier is its main rows and stays)")
    p.add_argument("--only", nargs="*", default=None, help="rows whose method or label contains one of these")
    p.add_argument("--model", default=None, help="--world cuda: one model spec for every row (default: each "
                   "launcher setting's own spec in full/specs)")
    p.add_argument("--steps", type=int, default=None, help="updates per run (default: per world; tiny 2, cuda 20)")
    p.add_argument("--batch", type=int, default=None, help="per-process batch of every run (default: per world; "
                   "cuda: the paper's global batch, which may not fit one GPU)")
    p.add_argument("--resume", action="store_true", help="reuse run folders that finished the same command "
                   "(an interrupted report goes on where it stopped; timings are then the earlier ones)")
    p.add_argument("--replot", action="store_true", help="only rewrite the table and figures of --world from "
                   "report.json and its run folders")
    p.add_argument("--smoke", action="store_true", help="2 updates and a few samples per run (plumbing only)")
    p.add_argument("--results", default=str(RESULTS), help="where report.json / .md / .png go")
    p.add_argument("--runs", default=str(ROOT / "runs" / "report"), help="run folders go to RUNS/<world>/")
    a = p.parse_args(argv)
    if a.replot:  # the tables and figures again from report.json and the run folders, nothing is run
        path = Path(a.results) / "report.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        if a.world not in saved:
            raise SystemExit(f"--replot: {path} holds no {a.world} report; run `python benchmarks/report.py "
                             f"--world {a.world}` first")
        result = saved[a.world]
        records = [{**r, **read_run(r["out"], metrics=False)} for r in result["runs"]]
        result = {**result, "rows": summarize(records)}  # columns added since the runs are read from them too
        write_outputs(a.world, result, records, Path(a.results))
        return result
    if a.world == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--world cuda needs a CUDA GPU (torch.cuda.is_available() is False); on the CPU use "
                             "--world tiny for the full backend on tiny random pipelines")
    seeds = a.seeds or ([0] if a.world in ("tiny", "cuda") else [0, 1, 2])
    a.jobs = a.jobs or (1 if a.world == "cuda" else max(1, min(2, os.cpu_count() or 1)))
    steps = a.steps or (20 if a.world == "cuda" else None)
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    start, load = time.perf_counter(), os.getloadavg()[0]

    setup = None
    if a.world == "tiny":
        from full import tiny

        setup = Path(tempfile.mkdtemp(prefix="fewstep-report-tiny-"))
        tiny.save_tiny_setup(setup / "xl", "sdxl", "lcm")
        tiny.save_tiny_setup(setup / "sd15", "sd15", "euler_ancestral")
    elif not a.smoke:  # build the toy base models once, before parallel runs would each try to
        subprocess.run([sys.executable, "-m", "toy", "--model", a.world, "--samples", "16",
                        "--out", str(Path(a.runs) / a.world / "base")], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    jobs = plan(a.world, seeds, a.smoke, a.only, a.model, steps, a.batch, not a.no_repeat, setup,
                Path(a.runs) / a.world, not a.no_frontier)
    print(f"[report] {a.world}: {len(jobs)} runs, {a.jobs} at a time, {a.threads} thread(s) each", flush=True)
    records = run_all(jobs, a.jobs, a.threads, a.resume, keep_going=a.world == "cuda")
    failed = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    order = {row.label: i for i, row in enumerate(rows_of(a.world))}
    records.sort(key=lambda r: (order[r["label"]], r["seed"], r["repeat"]))
    result = {"meta": {"command": "python benchmarks/report.py " + shlex.join(argv), "machine": machine(),
                       "date": datetime.date.today().isoformat(), "jobs": a.jobs, "threads": a.threads,
                       "load": f"load average {load:.1f} at the start", "wall_seconds": time.perf_counter() - start},
              "rows": summarize(records), "runs": [{k: v for k, v in r.items() if k != "log"} for r in records],
              "failed": failed}
    path = results / "report.json"
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[a.world] = result
    path.write_text(json.dumps(everything, indent=2, default=str))
    write_outputs(a.world, result, records, results)
    return result


def write_outputs(world: str, result: dict, records: list[dict], results: Path) -> None:
    (results / f"report.{world}.md").write_text(markdown(world, result))
    plot_curves(world, records, results / f"report.{world}.curves.png")
    plot_frontier(world, result["rows"], results / f"report.{world}.frontier.png")
    plot_samples(world, records, results / f"report.{world}.samples.png")
    print(markdown(world, result))


if __name__ == "__main__":
    main()
