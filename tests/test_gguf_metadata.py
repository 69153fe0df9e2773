"""A GGUF's metadata read from its header (inference/metadata.py), checked against llama.cpp's own reading of the
same real files, and hostile headers refused quickly with a clear error (every length bounded by the file)."""

from __future__ import annotations

import ctypes
import struct
import time

import pytest

from llorch.inference import metadata
from llorch.inference.errors import ModelFileError


def read_with_llama_cpp(path) -> dict[str, str]:
    """The reference: llama.cpp loads the vocabulary and lists every scalar key as a string."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, path
    try:
        buffer, found = ctypes.create_string_buffer(1 << 20), {}
        for index in range(llama_cpp.llama_model_meta_count(model)):
            llama_cpp.llama_model_meta_key_by_index(model, index, buffer, len(buffer))
            key = buffer.value.decode()
            llama_cpp.llama_model_meta_val_str_by_index(model, index, buffer, len(buffer))
            found[key] = buffer.value.decode()
        return found
    finally:
        llama_cpp.llama_model_free(model)


def test_the_header_gives_what_llama_cpp_reads(model_path):
    started = time.perf_counter()
    ours = metadata.read_metadata(model_path)
    took = time.perf_counter() - started
    assert ours == read_with_llama_cpp(model_path)
    assert metadata.kind_of(ours) == metadata.INSTRUCT and took < 2.0     # a header, not a model load


def header(*kv: bytes, count: int | None = None, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kv) if count is None else count) + b"".join(kv)


def text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("data, expected", [
    (b"", "not a GGUF file"),
    (b"GGML" + bytes(20), "no GGUF magic"),
    (header(version=1), "GGUF version 1"),
    (header(count=2**40), "keys"),
    (header(text("general.name") + struct.pack("<I", 8) + struct.pack("<Q", 2**62)), "ends inside"),
    (header(text("a") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2**60)), "ends inside"),
    (header(text("a") + struct.pack("<I", 9) + struct.pack("<IQ", 4, 2**60)), "ends inside"),
    (header(text("a") + struct.pack("<I", 13) + b"\0" * 8), "unknown value type 13"),
    (header(text("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1)), "an array of value type 9"),
    (header(struct.pack("<Q", 3) + b"\xff\xfe\xfd" + struct.pack("<I", 4) + b"\0" * 4), "utf-8"),
])
def test_a_hostile_header_is_refused_quickly(tmp_path, data, expected):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(ModelFileError, match=expected):
        metadata.read_metadata(path)
    assert time.perf_counter() - started < 1.0


def test_scalars_read_as_llama_cpp_prints_them(tmp_path):
    path = tmp_path / "small.gguf"
    path.write_bytes(header(text("general.name") + struct.pack("<I", 8) + text("tiny"),
                            text("general.finetune") + struct.pack("<I", 8) + text("Instruct"),
                            text("x.block_count") + struct.pack("<I", 4) + struct.pack("<I", 30),
                            text("x.flag") + struct.pack("<I", 7) + b"\x01",
                            text("x.eps") + struct.pack("<I", 6) + struct.pack("<f", 1e-5),
                            text("tokenizer.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2)
                            + text("a") + text("b")))
    assert metadata.read_metadata(path) == {"general.name": "tiny", "general.finetune": "Instruct",
                                            "x.block_count": "30", "x.flag": "true", "x.eps": "0.000010"}
