"""The README's and docs' Python examples run as written, and every file they (or the code) cite ships with the project."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "src").rglob("*.py")) + [ROOT / "Makefile", *sorted((ROOT / "examples").glob("*.py"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc):
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    if doc == README:
        assert blocks, "README has no python example"
    for code in blocks:
        assert not re.search(r"^\s*\.\.\.", code, flags=re.M), f"{doc.name}: a '...' line does not run"
        exec(compile(code, str(doc), "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def cited_paths(path: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for markdown links and repo-relative paths like docs/x.md or results/y/."""
    text = path.read_text()
    out = []
    for link in re.findall(r"\]\(([^)#\s]+)", text) if path.suffix == ".md" else []:
        if not re.match(r"[a-z]+://", link):
            out.append((link, (path.parent / link).resolve()))
    for ref in re.findall(r"(?<![\w/.-])((?:docs|results|examples|tests|src)/[\w./-]*\w)", text):
        out.append((ref, ROOT / ref))
    return out


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_files_ship_with_the_project(path):
    text = path.read_text()
    assert "shared/" not in text and "PAPER.md" not in text and "PERF_NOTES" not in text, "cites a file outside the project"
    missing = [written for written, resolved in cited_paths(path) if not resolved.exists()]
    assert not missing, f"{path.name} cites files that do not exist: {missing}"
