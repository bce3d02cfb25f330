"""The README and docs/ against what backs them: every generated block equals what benchmarks/update_readme.py would
write from its results file, every results file they cite exists, every "docs/design.md section N" in the repository
lands on a section of docs/design.md, nothing cites a file outside the repository, the README stays one screen plus
links, and its test command is the one CI runs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # after the root: benchmarks/pso.py must not shadow pso.py
import update_readme  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): every file under the root but results data
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def expand(pattern: str) -> list[str]:
    """'a.{md,json}' -> ['a.md', 'a.json'] (one brace group, as the docs write them)."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    return [pattern[:m.start()] + alt + pattern[m.end():] for alt in m.group(1).split(",")]


def cited_results(text: str) -> set[str]:
    """Results files a text names: 'benchmarks/results/<file>' anywhere, and a bare `<file>` in backticks that names a
    results file by its stem (pso_fig1.md, report.toy2d.md, ...). Patterns with <placeholders> are skipped."""
    names = set()
    for m in re.finditer(r"benchmarks/results/([A-Za-z0-9_.\-{},]+)(<?)", text):
        if not m.group(2):  # 'report.<world>.md': a pattern, not a file
            names.update(expand(m.group(1).rstrip(".,)")))
    stems = {p.name.split(".")[0] for p in RESULTS.iterdir()}
    for m in re.finditer(r"`([A-Za-z0-9_.\-{},]+\.(?:md|json|jsonl|png|\{[a-z,]+\}))`", text):
        name = m.group(1)
        if name.split(".")[0] in stems:
            names.update(expand(name))
    return {n for n in names if n and "<" not in n and not n.endswith("/")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_generated_block_equals_its_results_file(doc):
    text = doc.read_text()
    filled, missing = update_readme.fill(text)
    assert not missing, f"{doc.name}: generated blocks name results files that do not exist: {missing}"
    assert filled == text, (f"{doc.name}: a generated block differs from its results file; run "
                            "python benchmarks/update_readme.py")


def test_a_changed_generated_block_is_caught(tmp_path):
    """The check above is not vacuous: a block edited by hand differs from what update_readme.py writes."""
    doc = next(d for d in DOCS if "<!-- generated:" in d.read_text())
    text = doc.read_text()
    edited = re.sub(r"(<!-- generated: [^ ]+ -->\n)(.)", r"\1X\2", text, count=1)
    assert update_readme.fill(edited)[0] != edited


def ignored(names: list[str]) -> set[str]:
    """The names git is told not to keep (.gitignore: the tiny report's figures of random networks)."""
    out = subprocess.run(["git", "check-ignore", *[f"benchmarks/results/{n}" for n in names]], cwd=ROOT,
                         capture_output=True, text=True)
    return {Path(line).name for line in out.stdout.splitlines()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_results_file_exists(doc):
    missing = sorted(n for n in cited_results(doc.read_text()) if not (RESULTS / n).exists())
    missing = sorted(set(missing) - ignored(missing)) if missing else missing
    assert not missing, f"{doc.name} cites results files that are not in benchmarks/results: {missing}"


def test_results_citations_are_found():
    """The citation scanner sees both forms the docs use."""
    found = cited_results("see `pso_fig1.md` and benchmarks/results/report.{json,md}; `pso.<world>.<run>.png`")
    assert {"pso_fig1.md", "report.json", "report.md"} <= found and not any("<" in n for n in found)


def design_sections() -> set[int]:
    text = (ROOT / "docs" / "design.md").read_text()
    return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\. ", text, re.M)}


def test_design_doc_has_the_twelve_sections():
    assert design_sections() == set(range(1, 13))


def test_every_design_section_citation_lands():
    sections = design_sections()
    bad = []
    pattern = re.compile(r"docs/design\.md,? sections? (\d+)(?:\s*(?:-|–|and)\s*(\d+))?")
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".yaml", ".json") or "results" in path.parts:
            continue
        for m in pattern.finditer(path.read_text(errors="replace")):
            for n in filter(None, m.groups()):
                if int(n) not in sections:
                    bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, f"citations of docs/design.md sections that do not exist: {bad}"


def test_nothing_cites_a_file_outside_the_repository():
    bad = []
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".yaml", ".cfg", ".txt") or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"(?<![\w/])(\.\./)?shared/|DESIGN\.md|shared/papers", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not bad, "citations of files outside the repository:\n" + "\n".join(bad)


def test_readme_is_one_screen_plus_links():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the target is <= 150 (the rest belongs in docs/)"


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'pip install .*pytest -q', ci).group(0).replace("install -q ", "install ")
    assert command in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    links = re.findall(r"\]\(([^)#\s]+)", doc.read_text())
    missing = [t for t in links if not t.startswith("http") and not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


def test_a_non_editable_install_carries_every_file_of_the_packages():
    """`pip install .` (not -e) installs what pyproject.toml names: every tracked file under full/ and toy/ must be a
    module of a package it finds or match a package-data pattern (the families, configs and FSDP config were not)."""
    import fnmatch
    import tomllib

    st = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = st["packages"]["find"]["include"]
    data = st.get("package-data", {})
    missed = []
    for f in tracked_files():
        rel = f.relative_to(ROOT)
        if rel.parts[0] not in ("full", "toy") or "__pycache__" in rel.parts:
            continue
        package = ".".join(rel.parts[:-1])
        if f.suffix == ".py":
            ok = (f.parent / "__init__.py").exists() and any(fnmatch.fnmatch(package, p) for p in include)
        else:
            top = rel.parts[0]
            ok = any(fnmatch.fnmatch(str(rel.relative_to(top)), p) for p in data.get(top, []))
        if not ok:
            missed.append(str(rel))
    assert not missed, f"pyproject.toml does not install: {missed}"


def test_the_fast_suite_runs_in_two_workers_and_the_slow_tests_in_one_process():
    """pyproject.toml's `-n 2` for the fast suite; tests/conftest.py turns it off under `-m slow` (up to 19 GB each)."""
    def header(*args):
        p = subprocess.run([sys.executable, "-m", "pytest", "tests/test_docs.py", "-k", "readme_is_one_screen",
                            "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        return p.stdout

    assert "2 workers" in header()
    assert "workers" not in header("-m", "slow")
