"""The memory a model needs to serve (inference/memory.py), from the real default GGUF's own metadata."""

from __future__ import annotations

from llorch.inference import catalog, memory, metadata


def test_the_estimate_follows_the_model_the_slots_and_the_context():
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    path = catalog.fetch(entry, log=lambda message: None)
    found = metadata.read_metadata(path)
    one = memory.memory_need(path, found, 2048, 1)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64: K and V in f16 for 2048 tokens (llama.cpp reports 45 MiB)
    assert one.kv_bytes_per_slot == 2 * 30 * 2048 * 3 * 64 * 2
    assert one.weights_bytes == path.stat().st_size
    two = memory.memory_need(path, found, 4096, 2)
    assert two.kv_bytes_per_slot == 2 * one.kv_bytes_per_slot
    assert two.total_bytes - one.total_bytes == 3 * one.kv_bytes_per_slot + memory.COMPUTE_BYTES_PER_SLOT
    assert "per slot × 2" in two.explain()
    assert memory.available_memory_bytes() > 0
