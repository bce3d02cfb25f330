"""Time the README's two commands as a user runs them, and record what else the machine was doing.

    python benchmarks/quickstart.py            # the first command: install, pso.py, sharpening.py, diff_instruct_pp.py
    python benchmarks/quickstart.py --suite    # ... and the second: install with [test] + python -m pytest -q
    python benchmarks/quickstart.py --suite-only --reuse benchmarks/results/quickstart.json   # only the second

Run it without OMP_NUM_THREADS on an idle machine (the README's commands use torch's default threads); on a machine
shared with other jobs, OMP_NUM_THREADS=1 (recorded with the result) avoids two torch threads per process fighting
them for the cores. The install step runs in a
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


def record(cmd: str) -> dict:
    threads = os.environ.get("OMP_NUM_THREADS")
    return {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + cmd,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "threads": f"OMP_NUM_THREADS={threads}" if threads else "torch's default threads",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(), "start": state(), "steps": {}}


def upgrade(old: dict) -> dict:
    """A results file written before the two commands were separate records: its one record is the first command."""
    if "first" in old or "second" in old:
        return old
    first = {k: old[k] for k in ("command", "date", "machine", "commit", "start", "steps") if k in old}
    first.update(seconds=old.get("first_command_seconds"), end=old.get("after_first"))
    return {"first": first, **({"earlier": old["earlier"]} if "earlier" in old else {})}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="also time the second command (the test suite)")
    p.add_argument("--suite-only", action="store_true", help="time only the second command (the other records are "
                   "kept from --reuse)")
    p.add_argument("--earlier", help="a JSON record of an earlier measurement of the first command, kept beside this "
                   "one (e.g. one taken by hand on an idle machine): "
                   "{\"when\", \"how\", \"load_average\", \"steps\": {...}}")
    p.add_argument("--reuse", help="a results JSON whose records are kept (only what this call measures is replaced)")
    p.add_argument("--out", default=str(RESULTS / "quickstart.json"))
    args = p.parse_args(argv)
    cmd = "python benchmarks/quickstart.py " + " ".join(f"'{a}'" if " " in a else a for a in (argv or sys.argv[1:]))
    res = upgrade(json.loads(Path(args.reuse).read_text())) if args.reuse else {}
    if args.earlier:
        res["earlier"] = json.loads(args.earlier)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if not args.suite_only:
            r = res["first"] = record(cmd)
            r["steps"]["pip install \"torch==2.13.0\" -e ."] = timed(
                [py, "-m", "pip", "install", "-q", "torch==2.13.0", "-e", str(ROOT)], tmp, env)[0]
            for script in SCRIPTS:
                r["steps"][f"python {script}"] = timed([py, str(ROOT / script)], tmp, env)[0]
            r.update(seconds=sum(r["steps"].values()), end=state())
        if args.suite or args.suite_only:
            r = res["second"] = record(cmd)
            r["steps"]["pip install \"torch==2.13.0\" -e \".[test]\""] = timed(
                [py, "-m", "pip", "install", "-q", "torch==2.13.0", "-e", f"{ROOT}[test]"], tmp, env)[0]
            t, out = timed([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], ROOT, env)
            r["steps"]["python -m pytest -q"] = t
            m = re.search(r"(\d+) passed", out)
            r.update(seconds=sum(r["steps"].values()), end=state(), tests_passed=int(m.group(1)) if m else None)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    def where(s: dict) -> str:
        return f"load average {s['load_average']}, other busy processes: " + (", ".join(s["busy"]) or "none")

    lines = []
    for key, title in (("first", "First command (install + the three default runs)"),
                       ("second", "Second command (install + the test suite)")):
        if key not in res:
            continue
        r = res[key]
        lines += [f"**{title}**: {r['seconds']:.0f} s" + (f", {r['tests_passed']} tests passed" if key == "second"
                                                          else "") + ".",
                  f"Command: `{r['command']}` ({r['date']}, commit {r['commit']}). Machine: {r['machine']}; "
                  f"{r.get('threads', 'torch' + chr(39) + 's default threads')}. At the start: {where(r['start'])}. "
                  f"At the end: {where(r['end'])}.", "",
                  "| step | seconds |", "|---|---|"]
        lines += [f"| `{k}` | {v:.1f} |" for k, v in r["steps"].items()]
        lines.append("")
    if "earlier" in res:
        e = res["earlier"]
        lines += [f"**First command, earlier measurement** ({e['when']}; {e['how']}; load average "
                  f"{e['load_average']} at the start): " + ", ".join(f"`{k}` {v:.1f} s" for k, v in e["steps"].items())
                  + f"; {sum(e['steps'].values()):.0f} s in all.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
