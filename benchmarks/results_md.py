"""benchmarks/RESULTS.md: replace one ``## `` section in place (or append it), keeping the others."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, section: str, results: Path = RESULTS) -> None:
    """Put ``section`` (markdown starting with the heading line ``title``) where the section ``title`` is,
    up to the next ``## `` heading, or at the end of ``results`` when there is none."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    results.write_text(text)
