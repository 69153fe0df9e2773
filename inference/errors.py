"""Errors raised by the inference package.

    InferenceError                 base
    ├── CatalogError               unknown model id, or a catalog entry cannot be used
    ├── ModelFileError             model file missing, or its sha256 is not the pinned one (both hashes named)
    ├── FetchError                 a source (registry package, the Hub, a URL, a local file) could not give the
    │                              pinned model: unreachable, gated, cut off (resumable), a wrong file, a full disk
    ├── RequestError               a generation request is invalid for this model (too long, bad parameter);
    │                              raised before any work is done
    └── EngineError                llama.cpp failed while loading or generating (translated at the boundary)
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error the inference package raises on purpose."""


class CatalogError(InferenceError):
    """Raised for a model id the catalog does not know. Remedy: `llorch models list`."""


class ModelFileError(InferenceError):
    """Raised when a model file is missing or does not match its pinned sha256. Remedy: `llorch models fetch ID`."""


class FetchError(InferenceError):
    """Raised when fetching a model from a source fails; nothing unverified is left in the cache (a partial download
    is kept aside for the next try to resume). The message says what to do."""


class RequestError(InferenceError):
    """Raised when a generation request cannot be served by this model as asked; no work was done."""


class EngineError(InferenceError):
    """Raised when llama.cpp itself fails; the message carries llama.cpp's error."""
