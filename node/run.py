"""`llorch node start`: load the key, the engines and the ledger; run the libp2p host; gossip attestations;
serve /llorch/infer/1 until a signal arrives."""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.tools.anyio_service import background_trio_service

from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey, load_key_file, public_key_of_peer_id
from llorch.ledger.store import LedgerStore, exclusive
from llorch.node import limits
from llorch.node.wire.attestation import TOPIC, Attestation
from llorch.node.config import NodeConfig
from llorch.node.errors import StartupError
from llorch.node.dashboard import dashboard_app
from llorch.node.ledger_service import LedgerService, sign_checkpoints
from llorch.node.lifecycle import supervise, write_state_file
from llorch.node.reachability import announced_addrs
from llorch.node.hole_punch import Punches
from llorch.node.relay import Reach, TrustedStop, keep_reachable
from llorch.node.wire.punch import PUNCH_PROTOCOL_ID
from llorch.node.status import Counters, admin_app, serve_admin, status_document, write_admin_url
from llorch.node.p2p import P2P, check_can_listen, keep_connected, running_host
from llorch.node.catalog import keep_catalog, load_kept
from llorch.node.model_loader import NodeModels
from llorch.node.service import EnginePool, ProviderService
from llorch.node.listing import Listings, keep_listing
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from llorch.node.stream_io import now_ms

log = logging.getLogger("llorch.node")

LISTEN_SETTING = "node.listen_addr (LLORCH_NODE_LISTEN_ADDR)"


def build_attestation(config: NodeConfig, key: SigningKey, p2p: P2P, pool: EnginePool, seq: int,
                      issued_ms: int, reach: Reach | None = None, offered: dict[str, bytes] | None = None) -> bytes:
    """The signed attestation of what the node offers now: ``offered`` (model id → pin; default: every model in
    the pool), the slots of those models and how many are free."""
    interval = config.attestation_interval_ms
    offered = pool_models(pool) if offered is None else offered
    slots = [engine for engine in pool.engines if engine.entry.id in offered]
    free = [engine for engine in pool.free if engine.entry.id in offered]
    busy = len(slots) - len(free)
    attestation = Attestation(
        v=VERSION, provider_key=key.public_key, seq=seq, issued_ms=issued_ms,
        expires_ms=issued_ms + interval * limits.ATTESTATION_LIFETIME_INTERVALS,
        addrs=announced_addrs(config, p2p.addrs(), p2p.peer_id, reach),
        models=[{"id": model_id, "sha256": digest, "context_tokens": config.context_tokens}
                for model_id, digest in sorted(offered.items())],
        engine_build=pool.engines[0].fingerprint, slots_total=len(slots), slots_free=len(free),
        queue_depth=0, wait_ms=0 if free else config.sla_ttft_ms * busy,
        price_in=config.price_in_per_1m, price_out=config.price_out_per_1m, currency=config.currency,
        geo={"country": config.country, "region": config.region},
        sla={"uptime_ppm": config.sla_uptime_ppm, "ttft_ms": config.sla_ttft_ms},
    )
    return attestation.seal(key)


def pool_models(pool: EnginePool) -> dict[str, bytes]:
    return {engine.entry.id: bytes.fromhex(engine.entry.sha256) for engine in pool.engines}


async def publish_attestations(config: NodeConfig, key: SigningKey, p2p: P2P, models: NodeModels,
                               counters: Counters, reach: Reach | None = None) -> None:
    """Sign and gossip an attestation every interval, and soon after a slot is taken or freed or the models
    change (at most every ATTESTATION_SPACING_MS_MIN, well under gossip's per-peer rate limit), so the gateway's
    view of free slots is rarely stale. Nothing is gossiped while no model is offered. seq starts at the wall
    clock, so it grows across restarts."""
    seq = 0
    pool = models.pool
    while True:
        pool.changed = trio.Event()
        issued = now_ms()
        seq = max(seq + 1, issued)
        try:
            if models.offered:
                await p2p.pubsub.publish(TOPIC, build_attestation(config, key, p2p, pool, seq, issued, reach,
                                                                  models.offered))
            counters.last_attestation_seq, counters.last_attestation_ms = seq, issued
        except Exception as exc:  # publishing with no peers yet, or a peer dropping mid-send: try next interval
            log.debug("attestation publish failed: %s", exc)
        await trio.sleep(limits.ATTESTATION_SPACING_MS_MIN / 1000)
        with trio.move_on_after(max(0, config.attestation_interval_ms - limits.ATTESTATION_SPACING_MS_MIN) / 1000):
            await pool.changed.wait()


async def run_node(config: NodeConfig) -> None:
    with exclusive(Path(config.key_file), "key"):      # one process per identity, as per ledger (LedgerStore.open)
        await _run_node(config)


async def _run_node(config: NodeConfig) -> None:
    key = load_key_file(config.key_file)
    check_can_listen(config.listen_addr, LISTEN_SETTING)    # before the engines load: a taken port fails at once
    trusted = frozenset(public_key_of_peer_id(peer) for peer in config.trusted_gateways)
    held = load_kept(config.kept_catalog_path, trusted)
    models = NodeModels(config, held)
    await trio.to_thread.run_sync(models.load_at_start)
    pool = models.pool
    log.info("engine ready: %s × %d slots, build %s; catalog version %d", ", ".join(models.offered) or "no model yet",
             config.slots, pool.fingerprint, held.catalog.version)
    async with LedgerStore.open(config.ledger_path, key) as ledger:
        service = ProviderService(key.public_key, trusted, pool, ledger, models.offered,
                                  (config.price_in_per_1m, config.price_out_per_1m, config.currency))
        async with running_host(key, config.listen_addr, LISTEN_SETTING) as p2p:
            p2p.host.set_stream_handler(TProtocol(INFER_PROTOCOL_ID), service.serve_inference)
            p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), LedgerService(ledger, trusted).serve_ledger)
            counters, reach, listings = Counters(), Reach(), Listings()
            p2p.host.set_stream_handler(TProtocol(PUNCH_PROTOCOL_ID),
                                        Punches(p2p, reach, frozenset(config.trusted_gateways)).serve)
            async with background_trio_service(TrustedStop(p2p.host, frozenset(config.trusted_gateways))), \
                    trio.open_nursery() as nursery:
                status = lambda: status_document(config, p2p, models, ledger, counters, now_ms(),  # noqa: E731
                                                 reach, listings)
                admin_url = await nursery.start(serve_admin, config.admin_port, dashboard_app(
                    admin_app(status), config, ledger, status, now_ms))
                write_admin_url(config, admin_url)
                nursery.start_soon(supervise, "bootstrap", lambda: keep_connected(
                    p2p, config.bootstrap, lambda: pool.changed.set()))       # an attestation at once
                nursery.start_soon(supervise, "checkpoints", lambda: sign_checkpoints(
                    ledger, config.checkpoint_every_entries, config.checkpoint_every_ms / 1000))
                nursery.start_soon(supervise, "listing", lambda: keep_listing(
                    p2p, config.trusted_gateways, listings))
                nursery.start_soon(supervise, "catalog", lambda: keep_catalog(
                    p2p, config.trusted_gateways, held, config.kept_catalog_path, config.catalog_poll_ms / 1000))
                nursery.start_soon(supervise, "models", models.keep_models)
                nursery.start_soon(supervise, "attestations", lambda: publish_attestations(
                    config, key, p2p, models, counters, reach))
                if not config.announce_addrs:        # an operator's announce_addrs are the whole truth
                    nursery.start_soon(supervise, "reachability", lambda: keep_reachable(
                        p2p, config.bootstrap, frozenset(config.trusted_gateways), reach, lambda: pool.changed.set()))
                write_state_file(config.state_file, {"peer_id": p2p.peer_id, "addrs": p2p.addrs(),
                                                     "ledger": str(Path(config.ledger_path).resolve()),
                                                     "admin_url": admin_url})
                log.info("node %s listening on %s; ledger %s (%d entries); dashboard %s/ (this machine only)",
                         p2p.peer_id, ", ".join(p2p.addrs()), config.ledger_path, ledger.size, admin_url)
                await trio.sleep_forever()
