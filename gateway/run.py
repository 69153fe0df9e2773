"""`llorch gateway start`: the libp2p host listening to attestation gossip, and the HTTP API, in one trio run."""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from libp2p.tools.anyio_service import background_trio_service

from llorch.gateway.config import GatewayConfig
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.api import http_server
from llorch.gateway.api.http_api import build_app
from llorch.gateway.api.openai_api import request_of
from llorch.gateway.metrics import Metrics
from llorch.gateway.attestation_checks import AttestationChecks
from llorch.gateway import limits
from llorch.gateway.books.postings import Books
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.view import MarketView
from llorch.ledger.sqlite import Database
from llorch.gateway.market.sla import AttestationClock, missed_sla
from llorch.gateway.relay import DialbackProbes, ProviderRelay
from llorch.gateway.books import payouts
from llorch.gateway.listing import ListingDesk
from llorch.gateway.books.receipts import ReceiptBook
from llorch.gateway.market.tenants import TenantBook
from llorch.gateway.witness.witness import Witness, WitnessBook, WitnessLeases, witness_forever
from llorch.gateway.service import Gateway
from llorch.gateway.probes import Prober
from llorch.ledger.signing import load_key_file
from llorch.node.wire.attestation import TOPIC, Attestation, parse_attestation
from llorch.node.wire.dialback import DIALBACK_PROTOCOL_ID
from llorch.node.wire.catalog import CATALOG_PROTOCOL_ID
from llorch.node.wire.listing import LISTING_PROTOCOL_ID
from llorch.node.errors import AttestationRejected, ConfigError, StartupError
from llorch.node.lifecycle import bind_failure, supervise, write_state_file
from llorch.node.p2p import P2P, check_can_listen, peer_key_of, running_host
from llorch.node.stream_io import now_ms

WITNESS_LEASE_ROUNDS = 3          # a witness lease lasts this many rounds: a dead replica's providers move on then
log = logging.getLogger("llorch.gateway")


def _sender_key(message) -> bytes | None:
    try:
        return peer_key_of(ID(message.from_id))
    except Exception:  # a malformed from_id: the attestation check below names the problem
        return None


class CheckedAttestations:
    """Attestations the topic validator parsed and checked, by their bytes, so the subscription's reader takes each
    without parsing and verifying it again (bounded: the oldest are forgotten first; one forgotten is parsed again).
    Only a message that passed the validator reaches the reader, so bytes found here were checked against that
    message's sender."""

    def __init__(self, size: int = limits.CHECKED_ATTESTATIONS_MAX) -> None:
        self._kept: OrderedDict[bytes, Attestation] = OrderedDict()
        self._size = size

    def keep(self, data: bytes, attestation: Attestation) -> None:
        self._kept[data] = attestation
        while len(self._kept) > self._size:
            self._kept.popitem(last=False)

    def take(self, data: bytes, sender_key: bytes | None, now: int, relays: frozenset[str]) -> Attestation:
        """The attestation of ``data``: as checked (if it has not expired while it waited), or parsed now."""
        attestation = self._kept.pop(data, None)
        if attestation is None:
            return parse_attestation(data, sender_key, now, relays)
        if attestation.expires_ms <= now:
            raise AttestationRejected(f"attestation expired {now - attestation.expires_ms} ms ago", "expired")
        return attestation


def attestation_validator(directory: ProviderDirectory, metrics: Metrics, checks: AttestationChecks,
                          checked: CheckedAttestations | None = None):
    """The GossipSub topic validator (asynchronous: ``checks`` parses and verifies, in batches off the event loop
    while attestations come in numbers): a message that fails any rule of docs/protocol.md §5 (including a replayed
    or reordered seq) is neither kept nor forwarded to other peers; the reason is logged and counted. Never raises.
    What passes is kept in ``checked`` for the subscription's reader."""

    async def validate(peer_id, message) -> bool:
        try:
            attestation = await checks.check(message.data, _sender_key(message), now_ms())
            directory.check_newer(attestation)
            if checked is not None:
                checked.keep(message.data, attestation)
            return True
        except AttestationRejected as exc:
            metrics.attestation_dropped(exc.reason)
            # gossip hands a (re)connected peer recent messages again: an older seq is routine, said only at debug
            (log.debug if exc.reason == "replay" else log.warning)(
                "dropped attestation from %s (%s): %s", peer_id, exc.reason, exc)
            return False
        except Exception:
            metrics.attestation_dropped("malformed")
            log.exception("attestation validator failed; dropping the message")
            return False

    return validate


class Departures(INotifee):
    """Told by the gateway's libp2p network of every closed connection: when the last one to a peer closes, a
    provider of that key is taken out of placement (``ProviderDirectory.departed``) until it attests again. A node
    killed, powered off cleanly or cut off is out at once instead of when its attestation expires (three slow
    heartbeats); a live node redials its gateways at once and re-announces within a second (node/p2p.py
    ``keep_connected``). A peer that vanishes without its connection closing (power cut, cable pulled) is found out
    by the first request placed on it: ``Liveness`` (gateway/market/node_client.py) closes the connections of a
    provider that does not answer a ping, and this takes it out; with no request, it stays until its attestation
    expires."""

    def __init__(self, directory: ProviderDirectory) -> None:
        self.directory = directory

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if peer in network.connections:             # another connection to it is still open (or it came back)
            return
        provider_key = peer_key_of(peer)
        if provider_key is not None and self.directory.placeable(provider_key) is not None:
            log.info("provider %s disconnected: not placed on until it attests again", peer)
            self.directory.departed(provider_key)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


async def follow_attestations(p2p: P2P, directory: ProviderDirectory, providers: ProviderBook,
                              metrics: Metrics, on_free_slots=lambda count: None,
                              relays: frozenset[str] = frozenset(), clock: AttestationClock | None = None) -> None:
    """Drain the attestation subscription into the directory (a full subscription channel would drop messages),
    and take out of it providers whose connection closed (``Departures``). ``relays``: the peer ids whose relayed
    provider addresses are accepted (docs/protocol.md §5); ``clock`` records when approved providers attested, for
    their uptime (gateway/market/sla.py)."""
    checked, checks = CheckedAttestations(), AttestationChecks(relays)
    departures, network = Departures(directory), p2p.host.get_network()
    network.register_notifee(departures)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checks.run)
            p2p.pubsub.set_topic_validator(TOPIC, attestation_validator(directory, metrics, checks, checked), True)
            await _follow(p2p, directory, providers, metrics, on_free_slots, relays, clock, checked)
    finally:
        network.remove_notifee(departures)


async def _follow(p2p: P2P, directory: ProviderDirectory, providers: ProviderBook, metrics: Metrics, on_free_slots,
                  relays: frozenset[str], clock: AttestationClock | None, checked: CheckedAttestations) -> None:
    subscription = await p2p.pubsub.subscribe(TOPIC)
    while True:
        message = await subscription.get()
        try:
            attestation = checked.take(message.data, _sender_key(message), now_ms(), relays)
            known = directory.get(attestation.provider_key)
            approved = attestation.provider_key in await providers.approved_keys(limits.GOSSIP_APPROVALS_RECHECK_S)
            directory.observe(attestation, approved)
            if approved and attestation.slots_free:
                on_free_slots(attestation.slots_free)        # wake that many queued requests to try again
            if approved and clock is not None:
                await clock.observe(attestation.provider_key, now_ms())
            if known is None:                    # unapproved keys are anyone's to make: not worth a line each
                log.log(logging.INFO if approved else logging.DEBUG, "provider %s joined%s: %s", ID(message.from_id),
                        "" if approved else " (not approved: pending)", ", ".join(m["id"] for m in attestation.models))
        except AttestationRejected as exc:   # e.g. expired or overtaken while it waited in the channel
            metrics.attestation_dropped(exc.reason)
            log.debug("attestation not kept: %s", exc)


async def follow_sla(market: MarketView, database: Database, probe_tenant: str) -> None:
    """Every SLA_REFRESH_S: the providers whose figures this month miss their registered SLA, for placement."""
    while True:
        market.sla_missed_now(await missed_sla(database, now_ms(), probe_tenant))
        await trio.sleep(limits.SLA_REFRESH_S)


HTTP_PORT_SETTING = "gateway.http_port (LLORCH_GATEWAY_HTTP_PORT)"
P2P_LISTEN_SETTING = "gateway.p2p_listen_addr (LLORCH_GATEWAY_P2P_LISTEN_ADDR)"


def http_bind_error(host: str, port: int, reason: str) -> StartupError:
    return StartupError(f"cannot serve HTTP on {host}:{port}: {reason}: stop what uses it or set {HTTP_PORT_SETTING} "
                        f"(or gateway.http_host) to another port")


async def serve_http(app, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED,
                     drain: http_server.Drain | None = None) -> None:
    """gateway/api/http_server.py's ``serve_http``, with a failure to bind (before it is up) translated into
    StartupError."""
    up = False

    class Status:
        def started(self, value=None) -> None:
            nonlocal up
            up = True
            task_status.started(value)

    try:
        await http_server.serve_http(app, host, port, task_status=Status(), drain=drain)
    except OSError as exc:
        if up:
            raise
        raise http_bind_error(host, port, exc.strerror or str(exc)) from None


OTHERS_TICKETS_EVERY_S = 0.2      # replicas: how often each counts the others' open tickets per provider


async def count_others_tickets(gateway: Gateway) -> None:
    """Replicas: every OTHERS_TICKETS_EVERY_S, count every replica's open tickets per provider in the shared books and
    tell placement the others' share (all minus this replica's), so it asks no provider whose every slot is taken
    by any replica. Runs under ``supervise``."""
    while True:
        ours = gateway.market.in_flight()
        counts = await gateway.tickets.open_per_provider(now_ms() - limits.TICKET_LIFETIME_MS)
        gateway.market.others_now({key: count - ours.get(key, 0) for key, count in counts.items()
                                   if count > ours.get(key, 0)})
        await trio.sleep(OTHERS_TICKETS_EVERY_S)


async def run_gateway(config: GatewayConfig, drain: http_server.Drain | None = None) -> None:
    """The gateway until cancelled; ``drain``: its graceful stop (the CLI runs it at the first SIGTERM)."""
    key = load_key_file(config.key_file)
    # Ports first, before the database and the libp2p host: a taken port is one line at once.
    reason = bind_failure(config.http_host, config.http_port)
    if reason is not None:
        raise http_bind_error(config.http_host, config.http_port, reason)
    check_can_listen(config.p2p_listen_addr, P2P_LISTEN_SETTING)
    directory = ProviderDirectory()
    async with open_gateway_db(config.store()) as database, \
            running_host(key, config.p2p_listen_addr, P2P_LISTEN_SETTING) as p2p:
        witness_book = WitnessBook(database)
        directory.excluded |= await witness_book.forked()
        gateway = Gateway(config, key, p2p, directory, ReceiptBook(database), TenantBook(database),
                          ProviderBook(database), Books(database), witness_book)
        gateway.drain = drain
        if config.api_key_sha256 and await gateway.tenants.get(config.tenant) is not None:
            raise ConfigError(f"gateway.tenant names the bootstrap key's tenant {config.tenant!r}, but a real tenant "
                              f"has that name: the two would share one account. Set gateway.tenant to another name")
        leases = (WitnessLeases(database, p2p.peer_id, WITNESS_LEASE_ROUNDS * config.witness_interval_ms)
                  if database.engine.name == "postgresql" else None)        # replicas share out the witnessing
        witness = Witness(p2p, key, witness_book, directory.exclude, leases)
        p2p.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), DialbackProbes(key).serve)
        async def payouts_of(provider_id: str, account: str | None, now: int) -> dict:
            return await payouts.provider_view(database, provider_id, config.payout_min_minor, config.payout_day,
                                               account, now)
        p2p.host.set_stream_handler(TProtocol(LISTING_PROTOCOL_ID),
                                    ListingDesk(gateway.providers, witness_book, payouts=payouts_of).serve_listing)
        await gateway.catalog.load()
        p2p.host.set_stream_handler(TProtocol(CATALOG_PROTOCOL_ID), gateway.catalog.serve_catalog)

        async def may_reserve(peer: ID) -> bool:
            """Only approved providers hold a relay reservation (gateway/relay.py)."""
            provider_key = peer_key_of(peer)
            return provider_key is not None and provider_key in await gateway.providers.approved_keys()

        async def providers_to_witness():
            """Approved providers only: the witness never dials an address a key that nobody approved gossiped.
            Each round also takes the exclusions from the database, so `providers readmit` takes effect."""
            directory.excluded = await witness_book.forked()
            approved = await gateway.providers.approved_keys()
            return [(a.provider_key, list(a.addrs)) for a in directory.fresh(now_ms()) if a.provider_key in approved]

        async with background_trio_service(ProviderRelay(p2p.host, may_reserve)), trio.open_nursery() as nursery:
            restarts = gateway.metrics.loop_restarted
            nursery.start_soon(supervise, "attestations", lambda: follow_attestations(
                p2p, directory, gateway.providers, gateway.metrics, gateway.waiting.wake,
                frozenset({p2p.peer_id, *config.relay_peers}), AttestationClock(database)), restarts)
            nursery.start_soon(supervise, "streams", gateway.streams.run, restarts)
            nursery.start_soon(supervise, "catalog", gateway.catalog.keep_fresh, restarts)
            nursery.start_soon(supervise, "spot-checks", gateway.spot_checks.run, restarts)
            nursery.start_soon(supervise, "sla", lambda: follow_sla(gateway.market, database, config.probe_tenant),
                               restarts)
            if config.probe_interval_ms:
                prober = Prober(gateway.runner, gateway.market, database, gateway.spot_checks, request_of,
                                config.probe_interval_ms, config.probe_tenant)
                nursery.start_soon(supervise, "probes", prober.run, restarts)
            shared = gateway.admission.shared
            if shared is not None:
                await shared.start(now_ms())
                nursery.start_soon(supervise, "replica", lambda: shared.heartbeat_forever(now_ms), restarts)
                nursery.start_soon(supervise, "placement", lambda: count_others_tickets(gateway), restarts)
            nursery.start_soon(supervise, "witness", lambda: witness_forever(
                witness, providers_to_witness, config.witness_interval_ms / 1000, config.witness_period_ms / 1000),
                restarts)
            bound = await nursery.start(lambda task_status: serve_http(
                build_app(gateway), config.http_host, config.http_port, task_status=task_status, drain=drain))
            base_url = f"{bound[0]}/v1" if bound else f"http://{config.http_host}:{config.http_port}/v1"
            addrs = [f"{addr}/p2p/{p2p.peer_id}" if "/p2p/" not in addr else addr for addr in p2p.addrs()]
            write_state_file(config.state_file, {"peer_id": p2p.peer_id, "multiaddrs": addrs, "base_url": base_url})
            log.info("gateway %s: OpenAI base_url %s; libp2p %s", p2p.peer_id, base_url, ", ".join(addrs))
            await trio.sleep_forever()
