"""A model split in several GGUF files (llama.cpp's gguf-split: ``<prefix>-00001-of-00003.gguf`` ...), as the big
models are published on the Hub. The test splits the real default model in three with gguf-py's writer (the same
split format), serves the files from a local Hub server, and checks that the catalog pins each file, that a node
downloads, checks and loads all three, and that the split model writes exactly what the single file writes.

The attacks first: a split entry whose pin is not the split pin of its files, whose files are misnamed (llama.cpp
finds the others by name), or one of whose files the server changed, is refused, and the wrong file is removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llorch.inference import catalog, sources
from llorch.inference.catalog import HubFile, Shard, entry_map, entry_of, split_pin
from llorch.inference.engine import Engine, Sampling
from llorch.inference.errors import CatalogError, FetchError, ModelFileError
from tests.hub_server import HubFiles, HubServer

REPO = "llorch-test/SmolLM2-135M-Instruct-GGUF"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
DEFAULT = catalog.lookup(catalog.DEFAULT_MODEL_ID)
PREFIX = "smollm2-135m-instruct-q4_1"

SPLIT_SCRIPT = """
import sys
from pathlib import Path

import gguf

source, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
reader = gguf.GGUFReader(source)
writer = gguf.GGUFWriter(out, reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                         split_max_tensors=-(-len(reader.tensors) // count))
for field in reader.fields.values():
    if field.name != gguf.Keys.General.ARCHITECTURE and not field.name.startswith("GGUF."):
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
for tensor in reader.tensors:
    writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, model_path) -> list[Path]:
    """The default model split in three files by gguf-py (in a subprocess: its writer prints progress)."""
    folder = tmp_path_factory.mktemp("split")
    subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(model_path), str(folder / f"{PREFIX}.gguf"), "3"],
                   check=True, capture_output=True, timeout=300)
    files = sorted(folder.glob("*.gguf"))
    assert [f.name for f in files] == [f"{PREFIX}-{n:05d}-of-00003.gguf" for n in (1, 2, 3)]
    return files


def split_entry(files: list[Path], model_id: str = "smollm2-split") -> catalog.CatalogEntry:
    pins = [Shard(f.name, catalog.file_sha256(f), f.stat().st_size) for f in files]
    return replace(DEFAULT, id=model_id, package="", parts=(), file_name=files[0].name,
                   sha256=split_pin([p.sha256 for p in pins]), size_bytes=sum(p.size_bytes or 0 for p in pins),
                   hub=HubFile(REPO, COMMIT, f"gguf/{files[0].name}"), shards=tuple(pins))


@pytest.fixture
def hub(shards, monkeypatch, tmp_path):
    files = HubFiles(files={(REPO, COMMIT, f"gguf/{f.name}"): f for f in shards},
                     plain={f.name: f for f in shards})
    with HubServer(files) as base_url:
        monkeypatch.setenv("HF_ENDPOINT", base_url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield files, base_url


def quiet(message: str) -> None:
    return None


# --- the attacks ------------------------------------------------------------------------------------------------

def test_a_split_entry_must_pin_its_files_and_name_them_as_llama_cpp_finds_them(shards):
    good = entry_map(split_entry(shards))
    assert entry_of(good, "split") == split_entry(shards)
    cases = [
        ({**good, "sha256": catalog.file_sha256(shards[0])}, "split pin of its shards' hashes"),
        ({**good, "shards": [good["shards"][1], good["shards"][0], good["shards"][2]]}, "must be named"),
        ({**good, "shards": [{**good["shards"][0], "file_name": "other-00001-of-00003.gguf"}, *good["shards"][1:]]},
         "must be named"),
        ({**good, "shards": good["shards"][:1]}, "2.."),
        ({**good, "size_bytes": 1}, "sum of its shards"),
        ({**good, "parts": [{"package": "x==1", "member": "y"}]}, "no registry parts"),
        ({**good, "shards": [{**good["shards"][0], "sha256": "zz"}, *good["shards"][1:]]}, "64 lowercase hex"),
        ({**good, "shards": [{"file_name": shards[0].name}, *good["shards"][1:]]}, "a shard is"),
    ]
    for item, expected in cases:
        with pytest.raises(CatalogError, match=expected):
            entry_of(item, "split")


def test_a_changed_file_of_a_split_model_is_refused_and_removed(hub, shards, tmp_path):
    files, _ = hub
    entry = split_entry(shards)
    tampered = tmp_path / "tampered.gguf"
    tampered.write_bytes(shards[1].read_bytes()[:-1] + b"\x00")
    files.files[(REPO, COMMIT, f"gguf/{shards[1].name}")] = tampered          # the server serves another file 2
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"pinned to {entry.shards[1].sha256}: refused and removed"):
        sources.fetch_any(entry, cache, quiet)
    assert not (cache / shards[1].name).exists() and (cache / shards[0].name).is_file()   # file 1 is good: kept
    with pytest.raises(ModelFileError, match=f"missing {shards[1].name}, {shards[2].name}"):
        catalog.verified_path(entry, cache)
    files.files[(REPO, COMMIT, f"gguf/{shards[1].name}")] = shards[1]          # fixed: the next try finishes
    assert sources.fetch_any(entry, cache, quiet) == cache / shards[0].name


# --- downloading and serving ---------------------------------------------------------------------------------------

def test_a_split_model_comes_from_the_hub_file_by_file_and_writes_what_the_single_file_writes(hub, shards, tmp_path,
                                                                                             model_path):
    files, base_url = hub
    entry = split_entry(shards)
    cache = tmp_path / "cache"
    first = sources.fetch_any(entry, cache, quiet)
    assert first == cache / shards[0].name and catalog.verified_path(entry, cache) == first
    assert [path.name for path in catalog.model_files(entry, cache)] == [f.name for f in shards]
    assert all(("GET", f"/{REPO}/resolve/{COMMIT}/gguf/{f.name}", None) in files.requests for f in shards)
    assert not (cache / ".downloads").exists()

    # From a plain URL (the first file's; the others beside it), and from files the operator has.
    by_url = sources.fetch_from_url(entry, f"{base_url}/files/{shards[0].name}", tmp_path / "by-url", quiet)
    imported = sources.import_file(entry, shards[0], tmp_path / "imported", quiet)
    assert catalog.verified_path(entry, by_url.parent) == by_url and imported.name == shards[0].name

    sampling = Sampling(seed=11, temperature_ppm=0, top_p_ppm=1_000_000, max_tokens=16, stop=())
    prompt = {"messages": [{"role": "user", "content": "Name three colours."}]}
    texts = []
    for engine in (Engine(entry, first, 1, 512, 512, 0), Engine(DEFAULT, model_path, 1, 512, 512, 0)):
        text: list[str] = []

        async def collect(piece: str) -> None:
            text.append(piece)

        import trio
        trio.run(engine.generate, engine.prepare(prompt, sampling), collect)
        texts.append("".join(text))
    assert texts[0] and texts[0] == texts[1]


def test_models_add_takes_the_files_of_a_split_model_and_computes_its_pin(shards, tmp_path):
    (tmp_path / "gateway.toml").write_text('[gateway]\nkey_file = "gw.key"\ndb_path = "gw.sqlite"\n')
    shard_args = [arg for f in shards for arg in ("--shard", f"{f.name}:{catalog.file_sha256(f)}:{f.stat().st_size}")]
    added = subprocess.run(
        [sys.executable, "-m", "llorch.gateway", "gateway", "models", "add", "--config", "gateway.toml",
         "--id", "smollm2-split", "--kind", "instruct", "--chat-format", "chatml", "--context-tokens", "8192",
         "--license", "Apache-2.0", "--hub", f"{REPO}@{COMMIT}:gguf/{shards[0].name}", *shard_args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert added.returncode == 0, added.stderr
    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "llorch.gateway", "gateway", "models", "show", "smollm2-split", "--config",
         "gateway.toml"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout)
    assert entry_of(shown["entry"], "shown") == replace(split_entry(shards), notes="")
