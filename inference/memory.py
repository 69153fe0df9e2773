"""How much memory a model needs to serve, and how much this machine has: a node refuses at start, in one line,
a model it cannot hold (docs/operating.md "What memory a model needs").

The estimate, from the GGUF's own metadata (inference/metadata.py) and the node's settings:

    weights     the file's size, once: every slot's context maps the same file, so the pages are shared
    kv cache    per slot: 2 (K and V) × layers × context tokens × KV width × 2 bytes (f16), where the KV width is
                head_count_kv × head length (``attention.key_length``, else embedding_length / head_count)
    compute     per slot: COMPUTE_BYTES_PER_SLOT for llama.cpp's scratch buffers, plus 10% of the weights

It is an estimate (llama.cpp's own figures vary by version and backend), on the safe side for CPU inference; with
``gpu_layers`` the offloaded layers live in VRAM, which this machine's RAM figure does not cover, so the check is
made for CPU-only nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llorch.inference.errors import ModelFileError

F16_BYTES = 2
COMPUTE_BYTES_PER_SLOT = 64 << 20
WEIGHTS_OVERHEAD_PERCENT = 10


@dataclass(frozen=True)
class MemoryNeed:
    weights_bytes: int
    kv_bytes_per_slot: int
    compute_bytes_per_slot: int
    slots: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes * (100 + WEIGHTS_OVERHEAD_PERCENT) // 100
                + self.slots * (self.kv_bytes_per_slot + self.compute_bytes_per_slot))

    def explain(self) -> str:
        return (f"{gib(self.total_bytes)} (weights {gib(self.weights_bytes)}, KV cache {gib(self.kv_bytes_per_slot)} "
                f"per slot × {self.slots})")


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def memory_need(path: Path, metadata: dict[str, str], context_tokens: int, slots: int,
                file_bytes: int | None = None) -> MemoryNeed:
    """The estimate for serving the GGUF at ``path`` (its ``metadata``) with ``slots`` contexts of
    ``context_tokens``; ``file_bytes``: the model's size when it is split in several files (default: ``path``'s).
    Raises ModelFileError if the metadata lacks what the estimate needs."""
    arch = metadata.get("general.architecture")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        width = int(metadata[f"{arch}.embedding_length"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_length = int(metadata.get(f"{arch}.attention.key_length", width // max(heads, 1)))
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: its GGUF metadata lacks what a memory estimate needs ({exc}; "
                             f"architecture {arch!r})") from None
    kv = 2 * layers * context_tokens * kv_heads * head_length * F16_BYTES
    return MemoryNeed(path.stat().st_size if file_bytes is None else file_bytes, kv, COMPUTE_BYTES_PER_SLOT, slots)


def available_memory_bytes() -> int:
    """Memory this machine can give now without swapping: MemAvailable (Linux), else the physical total."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
