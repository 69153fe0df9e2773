"""The node's models: those of ``node.models`` that the catalog it serves from (node/catalog.py) lists as live.

At start, each configured model the catalog already lists is checked against its pin and loaded (``node.slots``
engines each), all of them together within the machine's memory (one line naming what they need, if not). A
configured model the catalog does not list yet is waited for: when a trusted gateway's newer catalog lists it,
``keep_models`` (under ``supervise``) fetches it from its sources (inference/sources.py: the registry, the Hugging
Face Hub, URLs; sha256-checked), checks that it fits beside the models already loaded, loads it and offers it (the
next attestation says so). A model the catalog retires is no longer offered: tickets for it are refused
(``model_not_offered``), and its slots leave the attestation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import trio

from llorch.inference import catalog, memory, metadata, sources
from llorch.inference.catalog import CatalogEntry
from llorch.inference.echo import EchoEngine
from llorch.inference.engine import Engine, build_fingerprint
from llorch.inference.errors import InferenceError
from llorch.node.catalog import TrustedCatalog
from llorch.node.config import NodeConfig
from llorch.node.errors import StartupError
from llorch.node.service import EnginePool, SlotEngine

log = logging.getLogger("llorch.node.models")

MODEL_RETRY_S = 60.0          # a model that failed to fetch or load is tried again after this long


@dataclass
class NodeModels:
    """What the node serves: ``offered`` (model id → pinned sha256, shared with the ProviderService, which refuses
    a ticket for any other), the engines in ``pool``, and why a configured model is not served (``waiting``)."""

    config: NodeConfig
    held: TrustedCatalog
    pool: EnginePool = field(default_factory=lambda: EnginePool([]))
    offered: dict[str, bytes] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    loaded_bytes: int = 0                     # the memory the loaded models need (inference/memory.py)

    def load_at_start(self) -> None:
        """Load every configured model the catalog lists now (in a worker thread); StartupError if one cannot be
        loaded, or if together they do not fit. The others are left ``waiting``."""
        entries = []
        for model_id in self.config.models:
            entry = self.held.catalog.live(model_id)
            if entry is None:
                self.waiting[model_id] = self._unlisted(model_id)
                log.warning("%s: %s", model_id, self.waiting[model_id])
            else:
                entries.append(entry)
        if self.config.engine == "echo":
            log.warning("this node runs the ECHO engine: a fake for tests and benchmarks, not a real model")
        try:
            paths = {entry.id: self._path(entry) for entry in entries}
        except InferenceError as exc:
            raise StartupError(str(exc)) from None
        need = self._check_fits([(entry, paths[entry.id]) for entry in entries])
        for entry in entries:
            self._load(entry, paths[entry.id])
        self.loaded_bytes += need

    async def keep_models(self) -> None:
        """Runs under ``supervise``: whenever the catalog changes (and every MODEL_RETRY_S while a model waits),
        load the configured models it lists now, and stop offering those it retired."""
        while True:
            changed = self.held.changed
            for model_id in list(self.offered):
                if self.held.catalog.live(model_id) is None:
                    del self.offered[model_id]
                    self.waiting[model_id] = "retired from the catalog: no longer offered"
                    self.pool.changed.set()
                    log.warning("%s was retired from the catalog (version %d): no longer offered", model_id,
                                self.held.catalog.version)
            for model_id in self.config.models:
                entry = self.held.catalog.live(model_id)
                if model_id in self.offered:
                    continue
                if entry is None:
                    self.waiting[model_id] = self._unlisted(model_id)
                    continue
                self.waiting[model_id] = f"fetching and loading (catalog version {self.held.catalog.version})"
                try:
                    path = await trio.to_thread.run_sync(self._fetch, entry)
                    need = self._check_fits([(entry, path)])
                    await trio.to_thread.run_sync(self._load, entry, path)
                    self.loaded_bytes += need
                except (InferenceError, StartupError) as exc:
                    self.waiting[model_id] = f"cannot serve it: {exc}"
                    log.error("%s: %s (trying again in %g s)", model_id, exc, MODEL_RETRY_S)
            with trio.move_on_after(MODEL_RETRY_S if self.waiting_to_load() else float("inf")):
                await changed.wait()

    def waiting_to_load(self) -> bool:
        return any(self.held.catalog.live(model_id) for model_id in self.waiting)

    def _unlisted(self, model_id: str) -> str:
        retired = self.held.catalog.entries.get(model_id)
        if retired is not None:
            return f"retired from the catalog (version {self.held.catalog.version}): not served"
        return (f"not in the catalog (version {self.held.catalog.version}): waiting for a trusted gateway's "
                f"catalog to list it (check the id against `llorch models list`)")

    def _path(self, entry: CatalogEntry) -> Path | None:
        return None if self.config.engine == "echo" else catalog.verified_path(entry, self.config.model_cache_dir)

    def _fetch(self, entry: CatalogEntry) -> Path | None:
        if self.config.engine == "echo":
            return None
        return sources.fetch_any(entry, self.config.model_cache_dir, log=lambda line: log.info("%s", line))

    def _check_fits(self, adding: list[tuple[CatalogEntry, Path | None]]) -> int:
        """Refuse, in one line, models this machine cannot hold beside those loaded, with the configured slots and
        context (CPU-only nodes: with ``gpu_layers`` the offloaded layers are in VRAM, which this does not see);
        return the memory they need."""
        if self.config.gpu_layers or self.config.engine == "echo":
            return 0
        config = self.config
        needs = [(entry, memory.memory_need(path, metadata.read_metadata(path), config.context_tokens, config.slots,
                                            sum(f.stat().st_size for f in catalog.model_files(entry, path.parent))))
                 for entry, path in adding if path is not None]
        total = sum(need.total_bytes for _, need in needs)
        limit = (config.memory_max_bytes - self.loaded_bytes if config.memory_max_bytes
                 else memory.available_memory_bytes())
        if total > limit:
            why = "left of node.memory_max_bytes" if config.memory_max_bytes else "available on this machine now"
            what = " and ".join(f"{entry.id} needs about {need.explain()}" for entry, need in needs)
            raise StartupError(f"{what} for {config.slots} slot(s) of {config.context_tokens} context tokens, but "
                               f"only {memory.gib(max(limit, 0))} is {why}: lower node.slots or "
                               f"node.context_tokens, or serve a smaller model (`llorch models list`)")
        return total

    def _load(self, entry: CatalogEntry, path: Path | None) -> None:
        config = self.config
        engines: list[SlotEngine]
        if path is None:
            engines = [EchoEngine(entry, config.echo_token_delay_ms / 1000) for _ in range(config.slots)]
        else:
            build_fingerprint(config.context_tokens, config.batch_tokens, config.gpu_layers)   # can it offload?
            engines = [Engine(entry, path, config.threads_per_slot, config.context_tokens, config.batch_tokens,
                              config.gpu_layers) for _ in range(config.slots)]
        self.pool.add(engines)
        self.offered[entry.id] = bytes.fromhex(entry.sha256)
        self.waiting.pop(entry.id, None)
        log.info("serving %s: %d slot(s), build %s", entry.id, config.slots, self.pool.fingerprint)
