"""The words a newcomer reads first stay true (issue 17, "stale words"): README's required parts are there,
and neither README nor any package docstring points at a file outside the repository, promises what has
shipped ("until one ships"), or says a package is "filled in by its issue"."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGES = ("localglm", "quant", "offload", "tui")
STALE = ("filled in by its issue", "until one ships", "../shared", "DESIGN.md", "GLM_REFERENCE.md", "README_SECTION.md")


def _docstrings() -> dict[str, str]:
    """The docstrings (module, class, function) of every Python file in the packages, joined, by path."""
    out = {}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docs = [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]
            if docs:
                out[str(path.relative_to(ROOT))] = "\n".join(docs)
    return out


DOCS = {"README.md": README, **_docstrings()}


def test_readme_has_its_required_parts() -> None:
    assert "pip install torch==2.13.0 -e '.[test]' && python -m pytest -q" in README  # what .ci/run calls
    for heading in ("## Run it", "## Test it", "## Getting a real model", "### What each model needs", "## Command line",
                    "## Python API", "## Supported models and formats", "## Benchmarks"):  # fmt: skip
        assert f"\n{heading}" in README, heading
    assert "**Status of the GPU path.**" in README[:3000]  # near the top
    assert "export from the float checkpoint" in README or "export from that" in README


@pytest.mark.parametrize("name", sorted(DOCS))
def test_no_stale_words(name: str) -> None:
    text = DOCS[name]
    assert not [w for w in STALE if w in " ".join(text.split())], f"{name}: stale words"


def test_markdown_files_named_in_docs_exist() -> None:
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = {(name, md) for name, text in DOCS.items() for md in re.findall(r"[\w./-]+\.md\b", text) if Path(md).name not in present}
    assert not missing, missing
