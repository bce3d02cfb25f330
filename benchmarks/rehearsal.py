"""Rehearse every launcher setting on this machine and tabulate what each rehearsal found (full/rehearse.py).

    python benchmarks/rehearsal.py                       # all settings, one after the other (1-12 min each here)
    python benchmarks/rehearsal.py pso-online-turbo ...  # some of them
    python benchmarks/rehearsal.py --encoder-cost        # FLUX.2 klein's text encoder per caption, 512 vs 32 tokens
    python benchmarks/rehearsal.py --collect DIR         # the report.json files a run of the slow tests left in DIR:
                                                         # python -m pytest -m slow tests/test_rehearse.py -k every_setting
                                                         # --basetemp DIR

Each setting runs as `python -m full.rehearse SETTING --gpu-memory 80 --json REPORT` (one process, the launcher's
per-GPU batch for an 80 GB GPU). Run nothing else beside it: the largest rehearsals hold ~19 GB of RAM (rehearsal.md's peak RSS column).

Writes benchmarks/results/rehearsal.{json,md}: per setting, whether it passed, the per-GPU batch, the planned peak,
the NFEs of the update (= the stated count), the data sets it opened with their rows, the prompt embeddings it wrote
and their size at the real prompt length and dtype, its seconds and peak RSS."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def rehearse(name: str, folder: Path) -> dict:
    report = folder / f"{name}.json"
    tick = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "full.rehearse", name, "--gpu-memory", "80", "--json", str(report)],
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if p.returncode != 0 or not report.exists():
        return {"setting": name, "passed": False, "wall_s": wall, "error": (p.stdout + p.stderr)[-1500:]}
    return {**json.loads(report.read_text()), "passed": True, "wall_s": wall}


def collect(folder: Path) -> list[dict]:
    """The slow test's reports: <basetemp>/test_every_setting_rehearses_<n>/report.json, the setting in each."""
    out = []
    for f in sorted(Path(folder).glob("test_every_setting_rehearses*/report.json")):
        r = json.loads(f.read_text())
        out.append({**r, "passed": bool(r.get("fits") and r.get("run"))})
    return out


def row(r: dict) -> dict:
    if not r.get("passed"):
        return {"setting": r["setting"], "passed": False, "error": r.get("error", r.get("refusal", ""))}
    run, plan, emb = r["run"], r.get("plan", {}), r.get("embeddings", {})
    return {"setting": r["setting"], "passed": True, "batch": r["batch"], "peak_gib": plan.get("peak_gib"),
            "nfe": float(run["log"][-1]["nfe"]), "stated_nfe": plan.get("stated_nfe"),
            "opened": [f"{o['kind']} {o['rows']:,}" for o in run["opened"]],
            "embeddings": emb.get("count"), "embeddings_real_gb": (emb.get("bytes_real") or 0) / 1e9,
            "update_s": run["seconds"], "peak_rss_gb": r["rss_mb"]["peak"] / 1e3,
            "download_gb": r["download_gb"], "notes": r.get("notes", [])}


def markdown(rows: list[dict], command: str, when: str) -> str:
    passed = sum(r["passed"] for r in rows)
    lines = [f"**Every launcher setting rehearsed on the CPU** ({when}; `{command}`; random weights at depth 1, 64^2, "
             f"fp32, one process, the launcher's per-GPU batch for 80 GB): {passed} of {len(rows)} passed.", "",
             "| setting | batch/GPU (80 GB) | planned peak GiB | NFE = stated | data opened (rows) | prompt embeddings "
             "(real run's cache) | run s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["passed"]:
            lines.append(f"| {r['setting']} | FAILED: {r['error'][-200:].replace(chr(10), ' ')} | | | | | | |")
            continue
        nfe = f"{r['nfe']:g}" + (" = stated" if r["stated_nfe"] == r["nfe"] else f" (stated {r['stated_nfe']:g})")
        lines.append(f"| {r['setting']} | {r['batch']} | {r['peak_gib']:.1f} | {nfe} | "
                     f"{', '.join(r['opened']) or '-'} | {r['embeddings']:,} ({r['embeddings_real_gb']:.2f} GB) | "
                     f"{r['update_s']:.0f} | {r['peak_rss_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def encoder_cost(spec_name: str = "flux2_klein.json", texts: int = 8) -> dict:
    """Seconds per caption of the spec's text encoder at depth 1 on this CPU, at the pipeline's prompt length and at
    the rehearsal's (full/rehearse.py TOKENS): what precompute_embeddings costs a rehearsal per caption."""
    import torch

    from full import architectures, launch, load_world, rehearse
    from full.spec import load_spec

    out = {"spec": spec_name, "texts": texts, "threads": torch.get_num_threads()}
    real = rehearse.prompt_tokens(load_spec(str(launch.SPECS / spec_name)))
    for tokens in (real, rehearse.TOKENS):
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = rehearse.rehearsal_spec(str(launch.SPECS / spec_name), Path(tmp), 10)
            with architectures.depth(rehearse.DEPTH):
                world = load_world(str(path), precompute_embeddings=False, max_sequence_length=tokens)
            world.encode([rehearse.caption(10_000)])  # warm-up
            tick = time.perf_counter()
            world.encode([rehearse.caption(10_001 + k) for k in range(texts)])
            out[f"s_per_caption_{tokens}_tokens"] = (time.perf_counter() - tick) / texts
            del world
    return out


def main(argv=None) -> int:
    from full import launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help="default: every setting in full/launch.py")
    p.add_argument("--collect", help="read the slow test's reports from this pytest --basetemp folder")
    p.add_argument("--ran-on", help="with --collect: the commit(s) the reports were made on, as text (default: HEAD)")
    p.add_argument("--encoder-cost", action="store_true", help="only time FLUX.2 klein's text encoder per caption at "
                                                               "512 and at the rehearsal's tokens (rehearsal_encoder.json)")
    a = p.parse_args(argv)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if a.encoder_cost:
        cost = {"when": when, **encoder_cost()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "rehearsal_encoder.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost, indent=1))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    if a.collect:
        reports = collect(Path(a.collect))
        command = "python -m pytest -m slow tests/test_rehearse.py -k every_setting"
        commit = a.ran_on or commit
    else:
        names = a.settings or sorted(launch.SETTINGS)
        with tempfile.TemporaryDirectory() as tmp:
            reports = []
            for name in names:
                reports.append(rehearse(name, Path(tmp)))
                print(f"{name}: {'passed' if reports[-1]['passed'] else 'FAILED'} ({reports[-1]['wall_s']:.0f} s)",
                      flush=True)
        command = "python benchmarks/rehearsal.py" + (" " + " ".join(a.settings) if a.settings else "")
    rows = [row(r) for r in sorted(reports, key=lambda r: r["setting"])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rehearsal.json").write_text(json.dumps({"when": when, "commit": commit, "command": command,
                                                        "rows": rows}, indent=1))
    (RESULTS / "rehearsal.md").write_text(markdown(rows, command, f"{when}, commit {commit}"))
    print((RESULTS / "rehearsal.md").read_text())
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
