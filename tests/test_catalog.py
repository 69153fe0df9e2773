"""What each catalog model is for: the catalog declares it (instruction-tuned chat, or a base model for raw
completions only), and the GGUF's own metadata must agree, or the model is refused when it is fetched or loaded.

Before, gemma-3-270m-q4_k_m, a base model (no fine-tune, no chat template), was served as a chat model and answered
"What is the capital of France?" with gibberish.
"""

from __future__ import annotations

import dataclasses

import pytest

from llorch.inference import catalog, metadata
from llorch.inference.catalog import BASE, INSTRUCT, CatalogEntry, Part
from llorch.inference.errors import CatalogError

# The metadata that decides the kind, as llama.cpp reads it from each catalog model's file.
SMOLLM2 = {"general.finetune": "8k-lc100k-mix1-ep2", "tokenizer.chat_template": "{% for message in messages %}..."}
QWEN_CODER = {"general.finetune": "Instruct-AWQ", "tokenizer.chat_template": "{%- if tools %}..."}
GEMMA_BASE = {"general.architecture": "gemma3", "general.size_label": "270M"}


@pytest.mark.parametrize("found, kind", [
    (SMOLLM2, INSTRUCT),                                   # a chat template, whatever the fine-tune is called
    (QWEN_CODER, INSTRUCT),
    (GEMMA_BASE, BASE),                                    # no fine-tune, no chat template: the pretrained model
    ({"general.finetune": "it"}, INSTRUCT),                # Gemma's name for its instruction-tuned models
    ({"general.finetune": "Chat"}, INSTRUCT),
    ({"general.finetune": "base"}, BASE),
    ({"general.finetune": "pretrain-v2"}, BASE),
    ({"general.finetune": ""}, BASE),
])
def test_the_kind_comes_from_the_finetune_name_or_the_chat_template(found, kind):
    assert metadata.kind_of(found) == kind


def test_every_catalog_entry_says_what_it_is_for():
    kinds = {entry.id: entry.kind for entry in catalog.CATALOG.values()}
    assert kinds[catalog.DEFAULT_MODEL_ID] == INSTRUCT
    assert kinds["gemma-3-270m-q4_k_m"] == BASE
    assert list(kinds.values())[1] == INSTRUCT, "the second entry is an instruction-tuned chat model"


def test_a_catalog_entry_is_checked_when_it_is_built():
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    with pytest.raises(CatalogError, match="kind"):
        dataclasses.replace(entry, kind="chatty")
    with pytest.raises(CatalogError, match="chat_format"):
        dataclasses.replace(entry, chat_format=None)              # a chat model needs a chat format
    with pytest.raises(CatalogError, match="chat_format"):
        dataclasses.replace(entry, kind=BASE)                     # a base model has none: it never formats a chat


def test_a_declared_kind_that_disagrees_with_the_file_is_refused_at_load(model_path, monkeypatch):
    """The default model's file is instruction-tuned; a catalog entry calling it a base model is refused before a
    single weight is loaded (by the engine, by verified_path and by fetch), naming both kinds."""
    from llorch.inference.engine import Engine

    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    wrong = dataclasses.replace(entry, kind=BASE, chat_format=None)
    monkeypatch.setitem(catalog.CATALOG, entry.id, wrong)
    for attempt in (lambda: Engine.load(entry.id, model_path.parent),
                    lambda: catalog.verified_path(wrong, model_path.parent),
                    lambda: catalog.fetch(wrong, model_path.parent, log=lambda message: None)):
        with pytest.raises(CatalogError) as refused:
            attempt()
        message = str(refused.value)
        assert "declared a base model" in message and "instruction-tuned" in message, message
        assert "tokenizer.chat_template" in message, message
    assert model_path.is_file()                                   # the refusal changes nothing in the cache


def test_models_list_shows_what_each_model_is_for(capsys, monkeypatch, tmp_path):
    from argparse import Namespace

    from llorch.node.cli import models_list

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))          # no node.toml: the built-in catalog
    assert models_list(Namespace(config=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split("\t")
    rows = {line.split("\t")[0]: dict(zip(header, line.split("\t"))) for line in lines[1:]}
    assert rows[catalog.DEFAULT_MODEL_ID]["kind"] == "instruct"
    assert rows["gemma-3-270m-q4_k_m"]["kind"] == "base"
    assert "/v1/completions only" in rows["gemma-3-270m-q4_k_m"]["serves"]
    assert "/v1/chat/completions" in rows[catalog.DEFAULT_MODEL_ID]["serves"]


def test_a_part_list_must_not_be_empty():
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    assert isinstance(entry.parts[0], Part)
    with pytest.raises(CatalogError, match="parts"):
        CatalogEntry(**{**dataclasses.asdict(entry), "parts": ()})


def test_the_catalog_is_a_data_file_read_strictly(tmp_path):
    """inference/catalog.json holds the entries; a malformed file is refused naming the entry and the field."""
    import json

    document = json.loads(catalog.BUILTIN_CATALOG.read_text())
    assert {entry["id"] for entry in document["entries"]} == set(catalog.CATALOG)
    assert catalog.load_catalog(catalog.BUILTIN_CATALOG) == catalog.CATALOG
    default = dict(document["entries"][0])

    def refused(entry: dict, expected: str) -> None:
        path = tmp_path / "catalog.json"
        path.write_text(json.dumps({"format": catalog.CATALOG_FORMAT, "entries": [entry]}))
        with pytest.raises(CatalogError, match=expected):
            catalog.load_catalog(path)

    refused({**default, "colour": "blue"}, r"unknown fields \['colour'\]")
    refused({k: v for k, v in default.items() if k != "sha256"}, r"missing fields \['sha256'\]")
    refused({**default, "sha256": "AB" * 32}, "64 lowercase hex")
    refused({**default, "context_tokens": "8192"}, "context_tokens has the wrong type")
    refused({**default, "context_tokens": True}, "context_tokens has the wrong type")
    refused({**default, "file_name": "../evil.gguf"}, "plain .gguf file name")
    refused({**default, "parts": [], "package": ""}, "has no source")
    refused({**default, "hub": {"repo": "a/b", "revision": "main", "filename": "x.gguf"}}, "pin a commit")
    refused({**default, "urls": ["ftp://x/y.gguf"]}, "http")
    path = tmp_path / "twice.json"
    path.write_text(json.dumps({"format": catalog.CATALOG_FORMAT, "entries": [default, default]}))
    with pytest.raises(CatalogError, match="twice"):
        catalog.load_catalog(path)
    path.write_text(json.dumps({"format": "something-else", "entries": []}))
    with pytest.raises(CatalogError, match="llorch-catalog/1"):
        catalog.load_catalog(path)
