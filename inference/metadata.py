"""What a GGUF file says it is: its key/value metadata, read from the file's header, and the kind of model that implies.

A model is either instruction-tuned (it follows a chat: ``instruct``) or a pretrained base model (it only continues
text: ``base``). The file's metadata gives two pieces of evidence, checked in this order:

  1. ``general.finetune`` naming an instruction or chat tune (``Instruct``, ``Instruct-AWQ``, ``it``, ``chat``);
  2. a chat template (``tokenizer.chat_template``): converters copy it from an instruction-tuned model's tokenizer
     config (SmolLM2-Instruct's GGUF names its fine-tune ``8k-lc100k-mix1-ep2`` but carries ChatML's template).

Either one means ``instruct``; neither means ``base``. This catches a base model listed as a chat model (and the
reverse); it cannot prove a model was tuned well, and a base model whose converter kept a template would pass as
``instruct``, so the catalog's declared kind stays the primary record and this is its cross-check.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

from llorch.inference.errors import ModelFileError

INSTRUCT = "instruct"
BASE = "base"
KINDS = (INSTRUCT, BASE)

FINETUNE_KEY = "general.finetune"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
INSTRUCTION_TUNE = re.compile(r"(^|[^a-z])(instruct|chat|it)([^a-z]|$)", re.IGNORECASE)
META_VALUE_BYTES_MAX = 1 << 20          # the longest value read (chat templates are a few KiB)


def kind_of(found: dict[str, str]) -> str:
    """``instruct`` or ``base``, from a file's metadata (see the module docstring for the rule)."""
    if INSTRUCTION_TUNE.search(found.get(FINETUNE_KEY, "")):
        return INSTRUCT
    return INSTRUCT if found.get(CHAT_TEMPLATE_KEY) else BASE


def evidence(found: dict[str, str]) -> str:
    """The metadata the kind was decided on, for an error message."""
    finetune = found.get(FINETUNE_KEY)
    parts = [f"{FINETUNE_KEY} {finetune!r}" if finetune else f"{FINETUNE_KEY} unset",
             f"a {CHAT_TEMPLATE_KEY}" if found.get(CHAT_TEMPLATE_KEY) else f"no {CHAT_TEMPLATE_KEY}"]
    return ", ".join(parts)


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
KEY_BYTES_MAX = 1 << 16
KV_COUNT_MAX = 1 << 20
# value type → struct format of one scalar (GGUF spec: 8 is a string, 9 an array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_metadata(path: Path) -> dict[str, str]:
    """Every scalar key/value of the GGUF at ``path`` as strings (arrays are left out: the vocabulary, merges), read
    from the file's header without loading anything: tens of milliseconds, where a llama.cpp vocabulary load takes
    a tenth of a second or more. Integers as decimals, booleans as ``true``/``false``, floats as llama.cpp prints
    them (``%f``). Every length is bounded by the file's size; a file that is not a GGUF raises ModelFileError."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _Header(mapped).key_values()
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"cannot read the metadata of {path}: not a GGUF file ({exc})") from None


class _Header:
    """A cursor over a GGUF file's header (memory-mapped); every read is checked against the file's end."""

    def __init__(self, data) -> None:
        self.data, self.at, self.size = data, 0, len(data)

    def take(self, count: int) -> int:
        start = self.at
        if count < 0 or start + count > self.size:
            raise ValueError("the file ends inside its metadata")
        self.at += count
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt)))[0]

    def string(self, bytes_max: int) -> str | None:
        length = self.unpack("<Q")
        start = self.take(length)
        return None if length > bytes_max else bytes(self.data[start:start + length]).decode("utf-8")

    def key_values(self) -> dict[str, str]:
        start = self.take(4)
        if bytes(self.data[start:start + 4]) != GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        version = self.unpack("<I")
        if version not in GGUF_VERSIONS:
            raise ValueError(f"GGUF version {version} (this reader knows {GGUF_VERSIONS})")
        self.unpack("<Q")                                          # the tensor count
        count = self.unpack("<Q")
        if count > KV_COUNT_MAX:
            raise ValueError(f"{count} keys")
        found: dict[str, str] = {}
        for _ in range(count):
            key = self.string(KEY_BYTES_MAX)
            if key is None:
                raise ValueError("a key longer than 64 KiB")
            kind = self.unpack("<I")
            if kind == STRING:
                value = self.string(META_VALUE_BYTES_MAX)
            elif kind == ARRAY:
                self.skip_array()
                value = None
            elif kind in SCALARS:
                value = _scalar_text(self.unpack(SCALARS[kind]))
            else:
                raise ValueError(f"unknown value type {kind} for key {key!r}")
            if value is not None:
                found[key] = value
        return found

    def skip_array(self) -> None:
        kind, count = self.unpack("<I"), self.unpack("<Q")
        if kind in SCALARS:
            self.take(count * struct.calcsize(SCALARS[kind]))
        elif kind == STRING:
            data, at, size = self.data, self.at, self.size
            for _ in range(count):                   # the hot loop (a vocabulary): lengths only, no decoding
                if at + 8 > size:
                    raise ValueError("the file ends inside its metadata")
                at += 8 + int.from_bytes(data[at:at + 8], "little")
            if at > size:
                raise ValueError("the file ends inside its metadata")
            self.at = at
        else:
            raise ValueError(f"an array of value type {kind}")


def _scalar_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    return str(value)
