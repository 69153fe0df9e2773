"""The layout is layered, and a test keeps it so.

Packages (all under ``llorch``): ledger and inference import nothing of ours; node imports ledger and inference;
gateway imports node and ledger (never inference directly).

Inside node, ``node/wire/`` holds what both sides of the wire speak (frames, the two sans-IO stream protocols,
attestations, registrations, sampling). The gateway imports from node only that package and shared plumbing (the p2p
host, stream I/O, lifecycle, config loading, errors, limits, the catalog wrapper); never the provider's service code.

Inside gateway, the sub-packages own one concern each: ``books`` and ``witness`` import only the gateway's base
modules (errors, limits, config), ``market`` also ``books`` (placement compares customer prices); ``api`` (the HTTP surface) may import them and the request flow
and the domain at the top (``service``, ``ticket_runner``, ``spot_checks``, ``request``, ``metrics``); the domain never
imports ``api`` back: only the wiring (run, the CLIs) does.
"""

import ast
import os
import zipfile
import shutil
import subprocess
import sys
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
NODE_SHARED = {"wire", "errors", "limits", "p2p", "stream_io", "lifecycle", "config", "models", "ledger_client",
               "web"}
NODE_WIRE_MAY_IMPORT = {"wire", "errors", "limits"}
GATEWAY_BASE = {"errors", "limits", "config", "rails"}    # rails: payout accounts and files, a leaf like the rest
GATEWAY_SUBPACKAGES = {
    "market": GATEWAY_BASE | {"books"},       # placement compares the customer's prices (books.pricing)
    "books": GATEWAY_BASE,
    "witness": GATEWAY_BASE,
    "api": GATEWAY_BASE | {"market", "books", "witness", "service", "ticket_runner", "spot_checks", "request",
                           "metrics"},
}
GATEWAY_DOMAIN = {"service.py", "ticket_runner.py", "spot_checks.py", "probes.py", "request.py", "metrics.py"}
GATEWAY_ENTRY = {"cli.py"}          # the `llorch` command assembles every role's subcommands


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            found |= {alias.name for alias in item.names}
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            found.add(item.module)
            found |= {f"{item.module}.{alias.name}" for alias in item.names}
    return found


def ours(modules: set[str]) -> set[tuple[str, ...]]:
    """Our modules as name parts after ``llorch`` (("node", "wire", "frames"), ...)."""
    return {tuple(m.split(".")[1:]) for m in modules if m.startswith("llorch.") and len(m.split(".")) > 1}


def bare_imports(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in OURS}


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    return files


@pytest.mark.parametrize("package", sorted(OURS))
def test_import_direction(package):
    for path in python_files(package):
        modules = imported_modules(path)
        assert not bare_imports(modules), f"{path.relative_to(ROOT)} imports {sorted(bare_imports(modules))}: " \
                                          f"our packages are imported as llorch.<package>"
        foreign = {parts[0] for parts in ours(modules)} - ALLOWED[package] - {package}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}, which {package} may not import"


def test_the_gateway_uses_only_the_shared_parts_of_node():
    for path in python_files("gateway"):
        if path.name in GATEWAY_ENTRY and path.parent.name == "gateway":
            continue
        reached = {parts[1] for parts in ours(imported_modules(path)) if parts[0] == "node" and len(parts) > 1}
        assert reached <= NODE_SHARED, f"{path.relative_to(ROOT)} reaches into node's {sorted(reached - NODE_SHARED)}"


def test_the_wire_package_is_self_contained():
    for path in python_files("node/wire"):
        reached = {parts[1] for parts in ours(imported_modules(path)) if parts[0] == "node" and len(parts) > 1}
        assert reached <= NODE_WIRE_MAY_IMPORT, f"{path.relative_to(ROOT)} imports node's " \
                                                f"{sorted(reached - NODE_WIRE_MAY_IMPORT)}"


@pytest.mark.parametrize("sub", sorted(GATEWAY_SUBPACKAGES))
def test_gateway_sub_packages_import_only_downwards(sub):
    for path in python_files(f"gateway/{sub}"):
        reached = {parts[1] for parts in ours(imported_modules(path)) if parts[0] == "gateway" and len(parts) > 1}
        foreign = reached - GATEWAY_SUBPACKAGES[sub] - {sub}
        assert not foreign, f"{path.relative_to(ROOT)} imports gateway's {sorted(foreign)}, which {sub} may not"


@pytest.mark.parametrize("module", sorted(GATEWAY_DOMAIN))
def test_the_domain_never_imports_the_api(module):
    """The API parses HTTP into the domain's types (gateway/request.py); the domain never sees the HTTP shapes."""
    path = ROOT / "gateway" / module
    reached = {parts[1] for parts in ours(imported_modules(path)) if parts[0] == "gateway" and len(parts) > 1}
    assert "api" not in reached, f"gateway/{module} imports the API"


@pytest.mark.parametrize("sub", sorted(GATEWAY_SUBPACKAGES) + ["../node/wire"])
def test_each_sub_package_says_what_it_owns(sub):
    init = ROOT / "gateway" / sub / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and docstring.splitlines()[0].strip(), f"{init.relative_to(ROOT.parent)} has no one-line docstring"


def test_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import llorch.gateway.cli\nfrom llorch.node.wire import frames\nimport node\n")
    modules = imported_modules(sample)
    assert ours(modules) == {("gateway", "cli"), ("node", "wire"), ("node", "wire", "frames")}
    assert bare_imports(modules) == {"node"}


def test_the_wheel_installs_nothing_but_llorch(tmp_path):
    """Build the wheel from the committed layout and open it: only llorch/... and its dist-info."""
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("llorch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"llorch", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    for expected in ("llorch/gateway/cli.py", "llorch/node/wire/frames.py", "llorch/ledger/verify.py",
                     "llorch/inference/catalog.py", "llorch/gateway/api/http_api.py"):
        assert expected in names, f"the wheel lacks {expected}"
    installed_and_used_outside_the_checkout(wheel, tmp_path)


def installed_and_used_outside_the_checkout(wheel, tmp_path) -> None:
    """Install the wheel into a fresh virtualenv outside the checkout and use it as a provider would. Its
    dependencies come from this test's environment (a path entry, so no editable install leaks in); llorch itself
    comes only from the wheel."""
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True, capture_output=True, timeout=120)
    python = fresh / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "test_dependencies.pth").write_text(ours + "\n")
    home = tmp_path / "home"
    environment = {"PATH": f"{fresh / 'bin'}:/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / "cfg"),
                   "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(
                       Path.home() / ".cache"))}

    def llorch(*args):
        return subprocess.run([str(fresh / "bin" / "llorch"), *args], cwd=tmp_path, env=environment,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import llorch.node; print(llorch.node.__path__[0])"], cwd=tmp_path,
                           env=environment, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), f"llorch was imported from {where}, not the wheel"
    assert llorch("--help").returncode == 0
    made = llorch("keys", "new", str(tmp_path / "auditor.key"))
    assert made.returncode == 0 and made.stdout.startswith("12D3KooW"), made.stderr
    init = llorch("node", "init", "--gateway", "/ip4/203.0.113.1/tcp/4001/p2p/" + made.stdout.strip(),
                  "--country", "DE", "--non-interactive")
    assert init.returncode == 0, init.stderr
    assert (home / "cfg" / "llorch" / "node.toml").is_file()
    info = llorch("node", "info")
    assert info.returncode == 0 and '"country": "DE"' in info.stdout, info.stderr
