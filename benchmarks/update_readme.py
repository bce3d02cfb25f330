"""Copy the generated result tables into README.md and docs/*.md, so no number there is typed by hand.

    python benchmarks/update_readme.py

A document marks a generated block with a pair of HTML comments naming the file it comes from:

    <!-- generated: benchmarks/results/base_models.md -->
    ...replaced on every run...
    <!-- end generated -->

Each results file is written by its benchmark script (the command is in the file's first lines)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<src>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def fill(text: str) -> tuple[str, list[str]]:
    missing = []

    def replace(m: re.Match) -> str:
        src = ROOT / m["src"]
        if not src.exists():
            missing.append(m["src"])
            return m[0]
        return m[1] + src.read_text().rstrip() + "\n" + m[4]

    return BLOCK.sub(replace, text), missing


def main() -> int:
    missing_all = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        new, missing = fill(text)
        missing_all += missing
        if new != text:
            doc.write_text(new)
            print(f"updated {doc.relative_to(ROOT)}")
    for m in missing_all:
        print(f"missing results file {m}: run its benchmark first", file=sys.stderr)
    return 1 if missing_all else 0


if __name__ == "__main__":
    sys.exit(main())
