"""An in-process market for settlement and hostile-provider tests: one real Gateway (real libp2p host, real SQLite
database) and providers on their own real libp2p hosts with real SQLite ledgers, all in one trio run.

The providers run the fake echo engine (tests/fakes.py), and ``CheatingProvider`` plays a greedy provider: it signs
receipts with inflated claims. Both are test-only, for protocol, placement and settlement tests; the end-to-end
tests use the real engine.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.custom_types import TProtocol

from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request
from llorch.gateway.books.postings import Books
from llorch.gateway.books.receipts import ReceiptBook
from llorch.gateway.config import GatewayConfig
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.tenants import TenantBook
from llorch.gateway.service import Gateway
from llorch.gateway.books.reconcile import reconcile
from llorch.gateway.witness.witness import Witness, WitnessBook
from llorch.ledger.objects import amount_minor
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.node.config import NodeConfig
from llorch.node.p2p import P2P, running_host
from llorch.node.register import build_registration
from llorch.node.run import build_attestation
from llorch.node.service import EnginePool, ProviderService
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.ledger_service import LedgerService
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from llorch.node.wire.registration import Registration
from llorch.inference import catalog
from llorch.inference.echo import EchoEngine
from tests.fakes import ShortEngine, StallingEngine
from tests.helpers import MODEL_ID

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class CheatingProvider(ProviderService):
    """A greedy provider (test-only): signs receipts whose fields are replaced by ``claims`` (a dict of field →
    value, or of field → function of the honest value). The amount is recomputed, so the receipt is internally
    consistent and validly signed: only the gateway's own measurements can tell."""

    claims: dict = {}

    async def _record(self, ticket, request, engine, generation, accepted_ms, first_token_ms, finished_ms):
        original = self.ledger.append

        async def append(fields: dict) -> bytes:
            for name, claim in self.claims.items():
                fields[name] = claim(fields) if callable(claim) else claim
            fields["amount"] = amount_minor(fields["tokens_in"], fields["tokens_out"], fields["price_in"],
                                            fields["price_out"])
            return await original(fields)

        self.ledger.append = append
        try:
            return await super()._record(ticket, request, engine, generation, accepted_ms, first_token_ms,
                                         finished_ms)
        finally:
            self.ledger.append = original


@dataclass
class Provider:
    name: str
    key: SigningKey
    config: NodeConfig
    service: ProviderService
    ledger: LedgerStore
    attestation: Attestation
    p2p: P2P | None = None
    pool: EnginePool | None = None

    def attest(self) -> Attestation:
        """A fresh attestation (next seq, current capacity), as the node's re-attestation loop signs one."""
        self.attestation = Attestation.from_envelope(build_attestation(
            self.config, self.key, self.p2p, self.pool, self.attestation.seq + 1, now_ms()))
        return self.attestation


@dataclass
class Market:
    gateway: Gateway
    key: SigningKey
    providers: dict[str, Provider] = field(default_factory=dict)

    @property
    def database(self):
        return self.gateway.database

    async def rows(self, sql: str, params: tuple = ()) -> list:
        return await self.database.fetchall(sql, params)

    async def witness_all(self) -> None:
        """A checkpoint signed by every provider, then one witness round each (as the gateway's loop does)."""
        witness = Witness(self.gateway.p2p, self.key, self.gateway.witness_book, self.gateway.directory.exclude)
        for provider in self.providers.values():
            await provider.ledger.sign_checkpoint()
            assert await witness.witness(provider.key.public_key, list(provider.attestation.addrs)) is not None

    async def attest_forever(self, interval_s: float = 1.0) -> None:
        """Every provider re-attests every ``interval_s`` (attestations expire after 3 intervals of the node's
        config): for tests that run longer than that."""
        while True:
            await trio.sleep(interval_s)
            for provider in self.providers.values():
                self.gateway.directory.observe(provider.attest())

    async def reconcile(self, post: bool = False, grace_ms: int = 0):
        return await reconcile(self.database, self.key.public_key, None, now_ms(), grace_ms, post)

    async def complete(self, tenant_name: str, body: dict, on_text=None, request_id: str | None = None):
        """Gateway.complete as the HTTP handler calls it, for the tenant's stored record."""
        tenant = await self.gateway.tenants.get(tenant_name)
        chat = parse_chat_request(json.dumps({"model": MODEL_ID, **body}).encode(), ChatRequest)

        async def ignore(pieces: list, provider: str) -> None:
            return None

        return await self.gateway.complete(chat.to_domain(), tenant, on_text or ignore, request_id)


@asynccontextmanager
async def market_gateway(workdir, gateway_key: SigningKey, gateway_options: dict | None = None):
    """A Market with only its gateway: the database workdir/gateway.sqlite and a libp2p host for ``gateway_key``."""
    config = GatewayConfig(key_file=workdir / "gateway.key", db_path=workdir / "gateway.sqlite",
                           **(gateway_options or {}))
    async with open_gateway_db(config.db_path) as database, running_host(gateway_key, LOOPBACK) as p2p:
        gateway = Gateway(config, gateway_key, p2p, ProviderDirectory(), ReceiptBook(database), TenantBook(database),
                          ProviderBook(database), Books(database), WitnessBook(database))
        await gateway.catalog.load()
        yield Market(gateway, gateway_key)


@asynccontextmanager
async def market(tmp_path, providers: dict[str, dict], tenants: dict[str, dict] | None = None,
                 gateway_options: dict | None = None):
    """``providers``: name → {"cls": ProviderService subclass, "claims": {...}, "delay_s": float, "slots": int,
    "price_in": int, "price_out": int, "model": catalog id, "tokens": int, "stall": (tokens, seconds),
    "engine": an echo engine class (tests/cheaters.py), "certified": bool (the operator certified its geo claim)}.
    ``tenants``: name → TenantBook.add options (tier, budget_minor, ..., spot_checks).
    With ``gateway_options["spot_check_rate_ppm"]`` the gateway's spot-check loop runs (gateway/spot_checks.py).
    """
    gateway_key = SigningKey.generate()
    async with AsyncExitStack() as stack:
        built = await stack.enter_async_context(market_gateway(tmp_path, gateway_key, gateway_options))
        gateway, directory = built.gateway, built.gateway.directory
        for seq, (name, spec) in enumerate(providers.items(), start=1):
            key = SigningKey.generate()
            node_config = NodeConfig(key_file=tmp_path / f"{name}.key", ledger_path=tmp_path / f"{name}.sqlite",
                                     bootstrap=(), trusted_gateways=(gateway_key.peer_id,), engine="echo",
                                     slots=spec.get("slots", 1), price_in_per_1m=spec.get("price_in", 100_000),
                                     price_out_per_1m=spec.get("price_out", 200_000))
            ledger = await stack.enter_async_context(LedgerStore.open(node_config.ledger_path, key))
            pool = EnginePool([engine_for(spec) for _ in range(node_config.slots)])
            cls = spec.get("cls", ProviderService)
            service = cls(key.public_key, frozenset({gateway_key.public_key}), pool, ledger,
                          {engine.entry.id: bytes.fromhex(engine.entry.sha256) for engine in pool.engines},
                          **provider_prices(cls, node_config))
            if "claims" in spec:
                service.claims = spec["claims"]
            p2p = await stack.enter_async_context(running_host(key, LOOPBACK))
            p2p.host.set_stream_handler(TProtocol(INFER_PROTOCOL_ID), service.serve_inference)
            p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                        LedgerService(ledger, frozenset({gateway_key.public_key})).serve_ledger)
            attestation = Attestation.from_envelope(build_attestation(node_config, key, p2p, pool, seq, now_ms()))
            directory.observe(attestation)
            registration = build_registration(node_config, key, p2p.addrs()[0])
            await gateway.providers.register(Registration.from_envelope(registration), registration, now_ms())
            await gateway.providers.set_status(key.peer_id, "approved")
            if spec.get("certified"):
                await gateway.providers.certify_geo(key.peer_id)
            built.providers[name] = Provider(name, key, node_config, service, ledger, attestation, p2p, pool)
        for name, options in (tenants or {"acme": {}}).items():
            await gateway.tenants.add(name, options.get("tier", "hobby"), options.get("budget_minor"),
                                      options.get("eu_only", False), options.get("require_determinism", False),
                                      None, None, options.get("max_concurrent"), now_ms(),
                                      options.get("spot_checks", False))
        if (gateway_options or {}).get("spot_check_rate_ppm"):
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(gateway.spot_checks.run)
            stack.callback(nursery.cancel_scope.cancel)
        yield built


def engine_for(spec: dict):
    """The test-only engine a provider spec asks for: echo (of catalog model "model", the default one unless
    given), stopping early ("tokens") or stalling ("stall")."""
    entry, delay_s = catalog.lookup(spec.get("model", MODEL_ID)), spec.get("delay_s", 0.0)
    if "engine" in spec:
        return spec["engine"](entry, delay_s)
    if "tokens" in spec:
        return ShortEngine(entry, delay_s, spec["tokens"])
    if "stall" in spec:
        return StallingEngine(entry, delay_s, *spec["stall"])
    return EchoEngine(entry, delay_s)


def provider_prices(cls, node_config: NodeConfig) -> dict:
    """The attested prices a provider service refuses to go below, where the service knows them."""
    import inspect
    parameters = inspect.signature(cls.__init__).parameters
    if "attested_prices" not in parameters:
        return {}
    return {"attested_prices": (node_config.price_in_per_1m, node_config.price_out_per_1m, node_config.currency)}


def cancel_after(pieces: int):
    """An on_text callback that plays a customer who hangs up once it has ``pieces`` pieces of text (it cancels the
    surrounding scope, as the HTTP layer does on http.disconnect). Returns (callback, cancel scope, the pieces
    seen)."""
    scope = trio.CancelScope()
    seen = []

    async def on_text(frame_pieces: list, provider: str) -> None:
        seen.extend(text for text, _ in frame_pieces)
        if len(seen) >= pieces:
            scope.cancel()
            await trio.sleep(0)        # the disconnect is noticed at the next checkpoint

    return on_text, scope, seen


@asynccontextmanager
async def serving_http(gateway: Gateway):
    """The gateway's HTTP API (gateway/api/http_api.py) served by its HTTP server (gateway/api/http_server.py) on
    127.0.0.1, an ephemeral port, in this trio run, as `llorch gateway start` serves it. Yields the base URL
    (``http://127.0.0.1:PORT``)."""
    from llorch.gateway.api.http_api import build_app
    from llorch.gateway.api.http_server import serve_http

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_http, build_app(gateway), "127.0.0.1", 0)
        yield bound[0]
        nursery.cancel_scope.cancel()
