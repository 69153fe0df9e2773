"""The real engine: llama.cpp on the pinned SmolLM2 model."""

import pytest
import trio

from llorch.inference import catalog
from llorch.inference.engine import Engine, Sampling
from llorch.inference.errors import ModelFileError, RequestError

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(catalog.DEFAULT_MODEL_ID, model_path.parent, threads=2)


async def run(engine, seed=7, max_tokens=24, stop=(), temperature_ppm=800_000, messages=MESSAGES):
    pieces = []

    async def emit(text):
        pieces.append(text)

    prepared = engine.prepare({"messages": messages}, Sampling(seed, temperature_ppm, 950_000, max_tokens, tuple(stop)))
    generation = await engine.generate(prepared, emit)
    assert "".join(pieces) == generation.text
    # one piece per generated token (possibly empty), plus at most one trailing piece of held-back text: the
    # gateway bounds billed output tokens by the token frames it relayed
    assert generation.tokens_out <= len(pieces) <= generation.tokens_out + 1, (len(pieces), generation.tokens_out)
    return generation


async def test_same_seed_same_output_on_one_instance(engine):
    # Without a canonical evaluation path, llama-cpp-python reuses the cached prompt prefix and this exact request
    # gives a different continuation from its second run on (measured: A, B, B, B).
    rainbow = [{"role": "user", "content": "Name three colours of the rainbow."}]
    runs = [await run(engine, seed=7, max_tokens=48, messages=rainbow) for _ in range(10)]
    await run(engine, messages=[{"role": "user", "content": "Count to three."}])
    runs.append(await run(engine, seed=7, max_tokens=48, messages=rainbow))
    assert len({(g.text, g.tokens_out) for g in runs}) == 1
    assert runs[0].text.strip()


async def test_different_seeds_differ(engine):
    texts = {(await run(engine, seed=seed)).text for seed in (1, 2, 3)}
    assert len(texts) >= 2


async def test_max_tokens_gives_length(engine):
    generation = await run(engine, max_tokens=5, messages=[{"role": "user", "content": "Tell me a long story."}])
    assert generation.finish_reason == "length" and generation.tokens_out == 5


async def test_stop_string_truncates(engine):
    full = await run(engine, seed=11, max_tokens=24)
    word = full.text.split()[2]
    stopped = await run(engine, seed=11, max_tokens=24, stop=[word])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(word)]


async def test_prompt_plus_max_tokens_over_context_is_refused_before_work(engine):
    with pytest.raises(RequestError, match="exceed this engine's context"):
        engine.prepare({"messages": [{"role": "user", "content": "word " * 2500}]}, Sampling(1, 0, 1_000_000, 10))
    with pytest.raises(RequestError, match="max_tokens"):
        engine.prepare({"messages": MESSAGES}, Sampling(1, 0, 1_000_000, 100_000))


async def test_generation_stops_when_the_reader_goes_away(engine):
    received = []

    async def emit(text):
        received.append(text)
        if len(received) == 3:
            raise ConnectionError("customer went away")

    prepared = engine.prepare({"messages": [{"role": "user", "content": "Tell me a long story."}]},
                              Sampling(5, 800_000, 950_000, 200))
    generation = await engine.generate(prepared, emit)
    assert generation.finish_reason == "cancelled"
    # the third piece was refused: the result is exactly the two delivered pieces, one token each (the receipt's
    # output hash then matches the frames sent, and its count never exceeds them)
    assert generation.tokens_out == 2 and generation.text == "".join(received[:2])


async def test_a_reader_gone_at_the_last_piece_still_makes_a_cancelled_result_of_what_it_took(engine):
    """The thread queues pieces ahead of emit (it never waits for the event loop while emit keeps up), so it may
    finish generating before emit refuses the last piece: the result is still "cancelled" and covers only the
    pieces emit took."""
    received = []

    async def emit(text):
        received.append(text)
        await trio.sleep(0.05)              # slower than the engine: the thread finishes first
        if len(received) == 4:
            raise ConnectionError("customer went away")

    prepared = engine.prepare({"messages": [{"role": "user", "content": "Tell me a long story."}]},
                              Sampling(5, 800_000, 950_000, 4))
    generation = await engine.generate(prepared, emit)
    assert generation.finish_reason == "cancelled"
    assert generation.tokens_out == 3 and generation.text == "".join(received[:3])


async def test_generation_runs_off_the_trio_thread(engine):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await run(engine, max_tokens=32, messages=[{"role": "user", "content": "Tell me a long story."}])
        nursery.cancel_scope.cancel()
    assert ticks > 10


def test_a_model_file_that_does_not_match_its_pin_is_refused(tmp_path):
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    (tmp_path / entry.file_name).write_bytes(b"GGUF not really")
    with pytest.raises(ModelFileError, match=entry.sha256):
        Engine.load(entry.id, tmp_path)


def test_unknown_model_is_a_catalog_error():
    with pytest.raises(catalog.CatalogError, match="not in the catalog"):
        catalog.lookup("gpt-17")


def test_fetch_refuses_a_package_whose_model_does_not_match_the_pin(tmp_path):
    real = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    wrong_pin = "0" * 64
    impostor = catalog.CatalogEntry(id="impostor", sha256=wrong_pin, package=real.package, file_name="impostor.gguf",
                                    parts=real.parts, context_tokens=real.context_tokens, license=real.license,
                                    kind=real.kind, chat_format=real.chat_format)
    with pytest.raises(catalog.FetchError) as caught:
        catalog.fetch(impostor, tmp_path, log=lambda message: None)
    assert wrong_pin in str(caught.value) and real.sha256 in str(caught.value)
    assert list(tmp_path.iterdir()) == []          # nothing partial left that could look complete


def test_catalog_entries_are_complete():
    assert len(catalog.CATALOG) >= 2
    for entry in catalog.CATALOG.values():
        assert len(entry.sha256) == 64 and entry.context_tokens > 0 and entry.license
        assert entry.parts or entry.hub or entry.urls                 # somewhere to fetch it from
        assert all("==" in part.package for part in entry.parts)      # every registry package pinned to a version
