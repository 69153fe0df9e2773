"""The determinism claim on every catalog entry this machine can fetch: within a determinism class (the model's pin
and the engine build), the same prompt, sampling and seed give byte-identical output, whether the request runs
alone or beside another on a second engine instance, first or after other requests. Real llama.cpp on each real
GGUF (two engines of one thread each: slots × threads = the 2 cores).

Which entries: those with registry parts (the package registry is reachable here) and the default model split in
three files (a split model is one class with its own pin). The Hub-only entries cannot be downloaded on this
machine; the last test checks that their notes say so, rather than skipping them quietly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from llorch.inference import catalog
from llorch.inference.catalog import Shard, split_pin
from llorch.inference.engine import Engine, Sampling
from tests.test_split_models import PREFIX, SPLIT_SCRIPT

FETCHABLE = [entry.id for entry in catalog.CATALOG.values() if entry.parts]
HUB_ONLY = [entry.id for entry in catalog.CATALOG.values() if not entry.parts]
SEEDS = (3, 1_000_003, 2**32 - 1)
CHAT = {"messages": [{"role": "user", "content": "Tell me a short fact about rivers."}]}
RAW = {"text": "Rivers carry water from the mountains to"}


async def generate(engine: Engine, prompt: dict, seed: int) -> str:
    pieces: list[str] = []

    async def emit(text: str) -> None:
        pieces.append(text)

    sampling = Sampling(seed, 800_000, 950_000, 24, ())
    await engine.generate(engine.prepare(prompt, sampling), emit)
    return "".join(pieces)


async def sweep(entry: catalog.CatalogEntry, path) -> None:
    prompt = CHAT if entry.serves_chat else RAW
    first, second = (Engine(entry, path, 1, 512, 512) for _ in range(2))
    alone = {seed: await generate(first, prompt, seed) for seed in SEEDS}
    assert all(alone.values()) and len(set(alone.values())) > 1, alone       # seeds matter, output is not empty
    for seed in SEEDS:                              # two instances at once, after other requests: the same bytes
        together: dict[str, str] = {}

        async def on(name: str, engine: Engine) -> None:
            together[name] = await generate(engine, prompt, seed)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on, "first", first)
            nursery.start_soon(on, "second", second)
        assert together == {"first": alone[seed], "second": alone[seed]}, (entry.id, seed)


@pytest.mark.parametrize("model_id", FETCHABLE)
async def test_every_fetchable_catalog_model_is_deterministic_within_its_class(model_id):
    entry = catalog.lookup(model_id)
    path = await trio.to_thread.run_sync(lambda: catalog.fetch(entry, log=lambda message: None))
    await sweep(entry, path)


async def test_a_split_model_is_deterministic_within_its_class(tmp_path, model_path):
    folder = tmp_path / "split"
    folder.mkdir()
    await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT, str(model_path), str(folder / f"{PREFIX}.gguf"), "3"], check=True,
        capture_output=True, timeout=300))
    files = sorted(folder.glob("*.gguf"))
    shards = tuple(Shard(f.name, catalog.file_sha256(f), f.stat().st_size) for f in files)
    default = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    entry = catalog.CatalogEntry("smollm2-split", split_pin([s.sha256 for s in shards]), "", files[0].name, (),
                                 default.context_tokens, default.license, default.kind, default.chat_format,
                                 urls=("https://models.example/" + files[0].name,), shards=shards)
    await sweep(entry, catalog.verified_path(entry, folder))


def test_entries_this_machine_cannot_fetch_say_so():
    assert HUB_ONLY, "the catalog has no Hub-only entry: this test has nothing to check"
    for model_id in HUB_ONLY:
        entry = catalog.lookup(model_id)
        assert entry.hub is not None and "could not be reached" in entry.notes, entry
