"""The packages are layered: ledger and inference import nothing of ours; node imports ledger and inference;
gateway imports node and ledger (never inference directly)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"ledger", "inference", "node", "gateway"}
ALLOWED = {
    "ledger": set(),
    "inference": set(),
    "node": {"ledger", "inference"},
    "gateway": {"node", "ledger"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            found |= {package_of(alias.name) for alias in item.names}
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            found.add(package_of(item.module))
    return found & OURS


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "llorch" and len(parts) > 1 else parts[0]


@pytest.mark.parametrize("package", sorted(OURS))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    for path in files:
        foreign = imported_packages(path) - ALLOWED[package] - {package}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}, which {package} may not import"


def test_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import gateway.cli\nfrom node import frames\n")
    assert imported_packages(sample) == {"gateway", "node"}
