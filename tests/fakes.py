"""A fast fake engine for protocol and placement tests (never for end-to-end tests): the echo engine on the
default catalog entry."""

from __future__ import annotations

from llorch.inference import catalog
from llorch.inference.echo import EchoEngine


def FakeEngine(delay_s: float = 0.0) -> EchoEngine:
    return EchoEngine(catalog.lookup(catalog.DEFAULT_MODEL_ID), delay_s)
