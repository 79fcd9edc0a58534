"""Imports point one way (DESIGN.md): quant knows no model; offload builds on localglm's config, layers and
errors; localglm's core never reaches up into offload or the chat app, only its composition root (the loader),
the commands and the evaluation that attach offloading do. A test, because a cycle creeps in one lazy import at a time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# localglm modules that compose offloading into a model or a command (allowed to import offload)
COMPOSERS = {"localglm/loader.py", "localglm/training/evaluate.py"}
COMPOSER_DIRS = ("localglm/commands/",)


def _imports(path: Path, depth: int = 1) -> set[str]:
    """The first `depth` parts of every absolute import's module in `path`, lazy ones inside functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[:depth]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(".".join(node.module.split(".")[:depth]))
    return found


def _offenders(package: str, banned: set[str], allowed: set[str] = frozenset(), allowed_dirs: tuple[str, ...] = (), depth: int = 1) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed or rel.startswith(allowed_dirs):
            continue
        bad = _imports(path, depth) & banned
        if bad:
            out.append(f"{rel} imports {', '.join(sorted(bad))}")
    return out


def test_quant_knows_no_model_nor_offloading() -> None:
    assert _offenders("quant", {"localglm", "offload", "tui"}) == []


def test_offload_never_reaches_the_app() -> None:
    """offload sits under the loader: importing the composition root, a command or a front end would be a cycle."""
    assert _offenders("offload", {"tui"}) == []
    above = {"localglm.loader", "localglm.commands", "localglm.cli", "localglm.server", "localglm.engine", "localglm.training"}
    assert _offenders("offload", above, depth=2) == []


def test_localglm_core_does_not_import_offload_or_the_chat_app() -> None:
    assert _offenders("localglm", {"offload"}, COMPOSERS, COMPOSER_DIRS) == []
    assert _offenders("localglm", {"tui"}) == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from offload.planner import x\n    import tui.app\n")
    assert _imports(f) == {"offload", "tui"}
