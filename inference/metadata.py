"""What a GGUF file says it is: its key/value metadata read through llama.cpp, and the kind of model that implies.

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

import ctypes
import re
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


def read_metadata(path: Path) -> dict[str, str]:
    """Every key/value of the GGUF at ``path`` as strings, as llama.cpp reads them (arrays are left out).

    Loads the vocabulary only (no weights, no context): a fraction of a second for the catalog's models."""
    import llama_cpp  # lazily: the native library is only needed where models are loaded
    from llama_cpp._utils import suppress_stdout_stderr

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):     # as Llama(verbose=False) loads: the loader's notes stay quiet
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFileError(f"llama.cpp cannot read the metadata of {path}: not a GGUF file it can load")
    try:
        buffer = ctypes.create_string_buffer(META_VALUE_BYTES_MAX)
        found = {}
        for index in range(llama_cpp.llama_model_meta_count(model)):
            llama_cpp.llama_model_meta_key_by_index(model, index, buffer, len(buffer))
            key = buffer.value.decode("utf-8", "replace")
            llama_cpp.llama_model_meta_val_str_by_index(model, index, buffer, len(buffer))
            found[key] = buffer.value.decode("utf-8", "replace")
        return found
    finally:
        llama_cpp.llama_model_free(model)
