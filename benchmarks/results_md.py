"""Write one benchmark's section of benchmarks/RESULTS.md, keeping the other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(text: str) -> Path:
    """Replace (or append) the section that ``text`` is: it starts with its ``## Heading`` line."""
    heading = text.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"a RESULTS.md section starts with '## ', got {heading!r}")
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = text.rstrip("\n") + "\n\n"
    if pattern.search(current):
        updated = pattern.sub(lambda _: section, current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(updated.rstrip("\n") + "\n")
    return RESULTS
