"""Helpers for the probe suites (test_config_fuzz, test_probe_files, test_hardening_cli).

A probe feeds the CLI or a reader one bad input and sorts what happened into one outcome:
`ok` (exit 0), `clean` (one `localglm: error:` line, or argparse's usage error, and exit 2),
`traceback` (an exception escaped to the caller) or `unclear` (any other exit). Tests assert the
outcome they expect, and the assertion message starts with the outcome, so a failing run can be
counted by kind.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from localglm.cli import main


@dataclass(frozen=True)
class Outcome:
    """What one CLI run did."""

    kind: str  # ok | clean | traceback | unclear
    rc: int | None
    out: str
    err: str
    exc: str = ""

    def why(self) -> str:
        """The assertion message: the kind first (counted by the probe report), then the detail."""
        return f"{self.kind}: {self.exc or self.err.strip()[:300]}"


def _is_clean(rc: int | None, err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if rc != 2 or not lines:
        return False
    if lines[0].startswith("usage:"):  # argparse: usage, then one error line
        return lines[-1].split(": error: ", 1)[0].startswith("localglm")
    errors = [line for line in lines if line.startswith("localglm: error:")]
    return len(errors) == 1 and lines[-1].startswith("localglm: error:")


def run_cli(*argv: object) -> Outcome:
    """`localglm ARGV` in this process, stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits with its usage error
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 -- a probe reports whatever escaped
        return Outcome("traceback", None, out.getvalue(), err.getvalue(), f"{type(exc).__name__}: {str(exc)[:200]}")
    kind = "ok" if rc == 0 else "clean" if _is_clean(rc, err.getvalue()) else "unclear"
    return Outcome(kind, rc, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, to show that a failed command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path, before: set[str]) -> list[str]:
    """Entries of `parent` that were not there before (a half-written output or a temp file)."""
    return sorted(set(os.listdir(parent)) - before)
