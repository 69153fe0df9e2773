"""The catalog as the gateway sees it (the gateway imports inference only through here): an entry's fields and
their checks, the catalog-at-a-version type, and the built-in entries a fresh gateway starts with.

The gateway never loads models; it needs each model's pin to check attestations and write tickets, and the entries
to curate, sign and publish (gateway/catalog.py).
"""

from __future__ import annotations

from llorch.inference import catalog
from llorch.inference.catalog import (BUILTIN, KINDS, SHA256_RE, Catalog, CatalogEntry, entry_map, entry_of,
                                      hub_file, split_pin)
from llorch.inference.errors import CatalogError
from llorch.inference.errors import InferenceError as ModelError     # catalog, fetch and model-file errors

__all__ = ["BUILTIN", "KINDS", "SHA256_RE", "Catalog", "CatalogEntry", "CatalogError", "DEFAULT_MODEL_ID",
           "ModelError", "entry_map", "entry_of", "fetch_model", "hub_file", "split_pin"]


def fetch_model(model_id: str, log=print) -> None:
    """Make sure a built-in model is in the local cache, fetched from its sources and sha256-checked."""
    catalog.fetch(catalog.lookup(model_id), log=log)


DEFAULT_MODEL_ID = catalog.DEFAULT_MODEL_ID
