"""Time the README's two commands as a user runs them, and record what else the machine was doing.

    python benchmarks/quickstart.py            # the first command: install, pso.py, sharpening.py, diff_instruct_pp.py
    python benchmarks/quickstart.py --suite    # ... and the second: install with [test] + python -m pytest -q

Run it *without* OMP_NUM_THREADS (the README's commands use torch's default threads). The install step runs in a
throw-away virtual environment with the system's site packages (`python -m venv --system-site-packages`), so
`pip install "torch==2.13.0" -e .` finds torch installed and times what a user with torch already installed waits
for; the project is installed editable from this checkout into that environment only. The three scripts run in a
temporary folder (their runs/ go there) with their default arguments; the toy2d base models come from the cache
(`~/.cache/fewstep-finetune`; a missing cache is built first and that build is part of the time). At the start and
the end the script records the 1-minute load average and the other processes using more than 10% of a core.

Writes benchmarks/results/quickstart.{json,md}."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = ("pso.py", "sharpening.py", "diff_instruct_pp.py")


def busy_processes() -> list[str]:
    """Other processes above 10% CPU (ps), as 'command (cpu%)'."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines()[1:]:
        pid, cpu, args = line.split(None, 2)
        if float(cpu) > 10 and int(pid) != os.getpid() and "quickstart.py" not in args:
            rows.append(f"{' '.join(args.split()[:3])[:60]} ({float(cpu):.0f}%)")
    return rows


def state() -> dict:
    return {"load_average": round(os.getloadavg()[0], 2), "busy": busy_processes()}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return seconds, p.stdout + p.stderr


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="also time the second command (the test suite)")
    p.add_argument("--earlier", help="a JSON record of an earlier measurement of the same steps, kept beside this one "
                   "(e.g. one taken by hand on an idle machine): "
                   "{\"when\", \"how\", \"load_average\", \"steps\": {...}}")
    p.add_argument("--out", default=str(RESULTS / "quickstart.json"))
    args = p.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        raise SystemExit("unset OMP_NUM_THREADS: the README's commands run with torch's default threads")
    res = {"command": "python benchmarks/quickstart.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(), "start": state(), "steps": {}}
    if args.earlier:
        res["earlier"] = json.loads(args.earlier)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
        first = 0.0
        s, _ = timed([py, "-m", "pip", "install", "-q", "torch==2.13.0", "-e", str(ROOT)], tmp, env)
        res["steps"]["pip install \"torch==2.13.0\" -e ."] = s
        first += s
        for script in SCRIPTS:
            s, _ = timed([py, str(ROOT / script)], tmp, env)
            res["steps"][f"python {script}"] = s
            first += s
        res["first_command_seconds"] = first
        res["after_first"] = state()
        if args.suite:
            s, _ = timed([py, "-m", "pip", "install", "-q", "torch==2.13.0", "-e", f"{ROOT}[test]"], tmp, env)
            res["steps"]["pip install \"torch==2.13.0\" -e \".[test]\""] = s
            t, out = timed([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], ROOT, env)
            res["steps"]["python -m pytest -q"] = t
            res["second_command_seconds"] = s + t
            m = re.search(r"(\d+) passed", out)
            res["tests_passed"] = int(m.group(1)) if m else None
            res["after_second"] = state()
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    def where(s: dict) -> str:
        return f"load average {s['load_average']}, other busy processes: " + (", ".join(s["busy"]) or "none")

    lines = [f"Command: `{res['command']}` ({res['date']}, commit {res['commit']}). Machine: {res['machine']}; torch's "
             f"default threads. At the start: {where(res['start'])}. After the first command: "
             f"{where(res['after_first'])}"
             + (f". After the second: {where(res['after_second'])}" if "after_second" in res else "") + ".", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| `{k}` | {v:.1f} |" for k, v in res["steps"].items()]
    lines += ["", f"First command (install + the three default runs): {res['first_command_seconds']:.0f} s."]
    if "earlier" in res:
        e = res["earlier"]
        lines += ["", f"Earlier measurement ({e['when']}; {e['how']}; load average {e['load_average']} at the start): "
                  + ", ".join(f"`{k}` {v:.1f} s" for k, v in e["steps"].items())
                  + f"; first command {sum(e['steps'].values()):.0f} s."]
    if "second_command_seconds" in res:
        lines.append(f"Second command (install + the test suite, {res['tests_passed']} tests passed): "
                     f"{res['second_command_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
