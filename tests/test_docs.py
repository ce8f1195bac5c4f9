"""The docs point at files that exist: links, and the results they cite as evidence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    REPO / "README.md",
    REPO / "CHANGELOG.md",
    REPO / "rt_engine/assets/default_model.md",
    *sorted((REPO / "docs").glob("*.md")),
]


def prose(path: Path) -> str:
    """The file without its fenced code blocks (commands there may name outputs yet to be written)."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_cited_results_exist(doc):
    text = prose(doc)
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target and not (doc.parent / target).exists():
            missing.append(target)
    for cited in re.findall(r"`(benchmarks/results/[^`*{}<> ]+?)`", text):
        if "TAG" not in cited and not list(REPO.glob(cited.rstrip("/") + "*")):
            missing.append(cited)
    assert not missing, f"{doc.name} points at missing files: {missing}"


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 160  # details belong in docs/
