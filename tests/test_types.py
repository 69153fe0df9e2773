"""The type checker over the whole package, at the strictness pyproject.toml's [tool.mypy] documents: 0 errors.

mypy resolves ``llorch.*`` through src/llorch/ (symlinks to the four folders), as pyright and an IDE do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_type_checker_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"mypy found errors:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout


def test_static_tools_resolve_the_package_from_a_checkout():
    """src/llorch/<part> is each of the four folders, so a static tool reads the same files the package runs."""
    for part in ("ledger", "inference", "node", "gateway"):
        link = ROOT / "src" / "llorch" / part
        assert link.is_symlink() and link.resolve() == (ROOT / part).resolve(), link
