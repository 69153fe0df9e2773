"""/llorch/infer/1 over real libp2p hosts on loopback (Noise + Yamux), with a fake engine and a real SQLite ledger."""

from contextlib import asynccontextmanager
import logging

import pytest
import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from llorch.inference import catalog
from llorch.gateway import limits as gateway_limits
from llorch.gateway.market import node_client
from llorch.gateway.market.node_client import AttemptFailed, StreamPool, request_inference
from llorch.gateway.books.receipts import check_receipt
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import read_sqlite_entries
from llorch.node.wire.frames import Cancel, Final, More, Request, encode_frame
from llorch.node.p2p import running_host
from llorch.node.run import build_attestation
from llorch.node.service import EnginePool, GatewayReader, ProviderService
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID, InferProtocol, Role
from llorch.node.config import NodeConfig
from llorch.node.stream_io import now_ms, read_frame, write_frame
from llorch.node.wire.attestation import Attestation
from tests.fakes import FakeEngine
from tests.helpers import MODEL_ID, MODEL_SHA256, make_ticket

PROMPT = {"messages": [{"role": "user", "content": "one two three"}]}
SALT = bytes(16)
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def provider_and_gateway(tmp_path, slots=1, delay_s=0.0, service_class=ProviderService):
    gateway_key, provider_key = SigningKey.generate(), SigningKey.generate()
    pool = EnginePool([FakeEngine(delay_s) for _ in range(slots)])
    config = NodeConfig(key_file=tmp_path / "k", ledger_path=tmp_path / "ledger.sqlite", bootstrap=(),
                        trusted_gateways=(gateway_key.peer_id,))
    async with LedgerStore.open(config.ledger_path, provider_key) as ledger:
        service = service_class(provider_key.public_key, frozenset({gateway_key.public_key}), pool, ledger,
                                  {MODEL_ID: MODEL_SHA256})
        async with running_host(provider_key, LOOPBACK) as provider_p2p, \
                running_host(gateway_key, LOOPBACK) as gateway_p2p:
            provider_p2p.host.set_stream_handler(TProtocol(INFER_PROTOCOL_ID), service.serve_inference)
            attestation = Attestation.from_envelope(
                build_attestation(config, provider_key, provider_p2p, pool, 1, now_ms()))
            yield gateway_key, provider_key, gateway_p2p, provider_p2p, attestation, config


async def serve_one(gateway_p2p, gateway_key, attestation, max_tokens=5, seed=3, pool=None, **ticket_overrides):
    sampling = {"seed": seed, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": max_tokens, "stop": []}
    ticket, ticket_bytes = make_ticket(gateway_key, attestation.provider_key, now_ms(), sampling=sampling,
                                       **ticket_overrides)
    tokens = []
    async with request_inference(gateway_p2p, attestation, Request(ticket_bytes, SALT, PROMPT), pool) as call:
        while True:
            frame = await call.next_frame()
            if isinstance(frame, Final):
                return ticket, ticket_bytes, tokens, frame.receipt
            tokens.extend(frame.texts)


async def test_request_is_served_and_the_receipt_is_durable_before_it_is_sent(tmp_path):
    async with provider_and_gateway(tmp_path) as (gateway_key, provider_key, gateway_p2p, _, attestation, config):
        ticket, ticket_bytes, tokens, receipt_bytes = await serve_one(gateway_p2p, gateway_key, attestation)
        # the moment the final frame arrives, the receipt is already in the ledger file (read independently)
        assert receipt_bytes in list(read_sqlite_entries(config.ledger_path))
        receipt = check_receipt(receipt_bytes, ticket, ticket_bytes, SALT, PROMPT, "".join(tokens))
        assert receipt.tokens_out == 5 and receipt.tokens_in == 3 and len(tokens) == 5


async def test_busy_provider_answers_busy_at_once(tmp_path):
    async with provider_and_gateway(tmp_path, slots=1, delay_s=0.05) as (gateway_key, _, gateway_p2p, _, att, _c):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one, gateway_p2p, gateway_key, att, 20)
            await trio.sleep(0.3)
            with trio.fail_after(2):
                with pytest.raises(AttemptFailed) as caught:
                    await serve_one(gateway_p2p, gateway_key, att, 2)
            assert caught.value.busy


async def test_rejected_ticket_is_an_attempt_failure_with_the_code(tmp_path):
    async with provider_and_gateway(tmp_path) as (gateway_key, _, gateway_p2p, _, attestation, _c):
        with pytest.raises(AttemptFailed, match="model_not_offered"):
            await serve_one(gateway_p2p, gateway_key, attestation, model_sha256=bytes(32))
        outsider = SigningKey.generate()
        with pytest.raises(AttemptFailed, match="untrusted_gateway"):
            await serve_one(gateway_p2p, outsider, attestation)


async def test_replayed_request_id_is_refused(tmp_path):
    async with provider_and_gateway(tmp_path) as (gateway_key, _, gateway_p2p, _, attestation, _c):
        await serve_one(gateway_p2p, gateway_key, attestation, request_id="req-replay-01")
        with pytest.raises(AttemptFailed, match="replayed_request"):
            await serve_one(gateway_p2p, gateway_key, attestation, request_id="req-replay-01")


async def test_garbage_on_the_stream_does_not_take_the_host_down(tmp_path):
    async with provider_and_gateway(tmp_path) as (gateway_key, _, gateway_p2p, provider_p2p, attestation, _c):
        peer = provider_p2p.host.get_id()
        gateway_p2p.host.get_peerstore().add_addrs(peer, provider_p2p.host.get_addrs(), 60)
        for garbage in (b"\xff\xff\xff\xff\xff", b"\x05\xc1\xc1\xc1\xc1\xc1", b"\x03abc"):
            stream = await gateway_p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
            await stream.write(garbage)
            assert await read_until_closed(stream) == b""
        _, _, tokens, _ = await serve_one(gateway_p2p, gateway_key, attestation)
        assert len(tokens) == 5


async def test_a_silent_client_is_timed_out(tmp_path, monkeypatch):
    monkeypatch.setattr("llorch.node.limits.REQUEST_READ_TIMEOUT_S", 0.3)
    async with provider_and_gateway(tmp_path) as (gateway_key, _, gateway_p2p, provider_p2p, attestation, _c):
        peer = provider_p2p.host.get_id()
        gateway_p2p.host.get_peerstore().add_addrs(peer, provider_p2p.host.get_addrs(), 60)
        stream = await gateway_p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
        assert await read_until_closed(stream) == b""


async def read_until_closed(stream) -> bytes:
    """What the provider sends before closing or resetting the stream; fails the test if it never does."""
    with trio.fail_after(5):
        try:
            return await stream.read(100)
        except BaseLibp2pError:
            return b""  # reset by the provider


def test_taking_or_freeing_a_slot_signals_a_capacity_change():
    pool = EnginePool([FakeEngine(), FakeEngine()])
    assert not pool.changed.is_set()
    model = catalog.DEFAULT_MODEL_ID
    assert pool.try_take("another-model") is None and not pool.changed.is_set()    # a slot serves one model
    engine = pool.try_take(model)
    assert engine is not None and pool.changed.is_set() and len(pool.free) == 1
    pool.changed = trio.Event()
    pool.give_back(engine)
    assert pool.changed.is_set() and len(pool.free) == 2
    pool.changed = trio.Event()
    pool.try_take(model), pool.try_take(model)
    pool.changed = trio.Event()
    assert pool.try_take(model) is None and not pool.changed.is_set()     # a refusal changes nothing


async def wait_for_idle_stream(pool: StreamPool, peer) -> None:
    with trio.fail_after(5):
        while pool.idle(peer) == 0:
            await trio.sleep(0.01)


async def test_a_stream_opened_ahead_serves_the_next_request_without_opening_one(tmp_path, monkeypatch):
    opened_on_the_request_path = []
    new_stream = node_client._new_stream

    async def counted(p2p, peer):
        opened_on_the_request_path.append(peer)
        return await new_stream(p2p, peer)

    monkeypatch.setattr(node_client, "_new_stream", counted)
    async with provider_and_gateway(tmp_path, slots=2) as (gateway_key, provider_key, gateway_p2p, _, attestation, _):
        pool, peer = StreamPool(gateway_p2p), ID.from_base58(provider_key.peer_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            for seed in range(4):
                _, _, tokens, _ = await serve_one(gateway_p2p, gateway_key, attestation, seed=seed, pool=pool)
                assert len(tokens) == 5
                await wait_for_idle_stream(pool, peer)
            nursery.cancel_scope.cancel()
    assert len(opened_on_the_request_path) == 1          # the first request only: the pool was empty


async def test_a_pooled_stream_whose_connection_died_is_not_a_failure_of_the_provider(tmp_path):
    """The provider's connection went away while a stream waited in the pool (a restart, a NAT that forgot us):
    the request goes once more on a new stream, and is served."""
    async with provider_and_gateway(tmp_path, slots=2) as (gateway_key, provider_key, gateway_p2p, provider_p2p,
                                                           attestation, _):
        pool, peer = StreamPool(gateway_p2p), ID.from_base58(provider_key.peer_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            await serve_one(gateway_p2p, gateway_key, attestation, seed=1, pool=pool)
            await wait_for_idle_stream(pool, peer)
            await provider_p2p.host.disconnect(gateway_p2p.host.get_id())
            await trio.sleep(0.1)
            _, _, tokens, receipt = await serve_one(gateway_p2p, gateway_key, attestation, seed=2, pool=pool)
            assert len(tokens) == 5 and receipt
            nursery.cancel_scope.cancel()


async def test_unused_pooled_streams_are_closed_in_time_and_the_node_takes_that_quietly(tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setattr(gateway_limits, "POOLED_STREAM_AGE_S_MAX", 0.2)
    async with provider_and_gateway(tmp_path, slots=2) as (gateway_key, provider_key, gateway_p2p, _, attestation, _):
        pool, peer = StreamPool(gateway_p2p), ID.from_base58(provider_key.peer_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            await serve_one(gateway_p2p, gateway_key, attestation, seed=1, pool=pool)
            await wait_for_idle_stream(pool, peer)
            caplog.clear()
            await trio.sleep(0.5)
            assert pool.idle(peer) == 0 and pool.take(peer) is None
            _, _, tokens, _ = await serve_one(gateway_p2p, gateway_key, attestation, seed=2, pool=pool)
            assert len(tokens) == 5
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_requests_one_after_another_share_one_stream(tmp_path):
    """After a request ends cleanly the next one to the same provider goes on the same stream: five requests, one
    after another, open at most two streams (the first request's own and one spare), not six."""
    async with provider_and_gateway(tmp_path, slots=2) as (gateway_key, provider_key, gateway_p2p, _, attestation, _):
        pool, peer = StreamPool(gateway_p2p), ID.from_base58(provider_key.peer_id)
        opened = []
        new_stream = gateway_p2p.host.new_stream

        async def counted(peer_id, protocols, *args, **kwargs):
            if INFER_PROTOCOL_ID in protocols:
                opened.append(peer_id)
            return await new_stream(peer_id, protocols, *args, **kwargs)

        gateway_p2p.host.new_stream = counted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            receipts = []
            for seed in range(5):
                _, _, tokens, receipt = await serve_one(gateway_p2p, gateway_key, attestation, seed=seed, pool=pool)
                assert len(tokens) == 5
                receipts.append(receipt)
                await wait_for_idle_stream(pool, peer)
            nursery.cancel_scope.cancel()
        assert len(set(receipts)) == 5
        assert len(opened) <= 2, f"{len(opened)} streams opened for 5 requests"


async def test_a_provider_that_closes_the_stream_after_each_request_is_still_served(tmp_path):
    """A provider from before streams carried several requests closes the stream after its final frame: the
    gateway's next request on that stream finds it closed before any answer and goes on a new stream."""

    class OneRequestPerStream(ProviderService):
        async def _serve(self, stream, protocol) -> None:
            reader = GatewayReader(stream, protocol)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                request = await reader.requests.receive()
                await self._serve_one(stream, protocol, request, reader)
                nursery.cancel_scope.cancel()

    async with provider_and_gateway(tmp_path, slots=2, service_class=OneRequestPerStream) as \
            (gateway_key, provider_key, gateway_p2p, _, attestation, _):
        pool, peer = StreamPool(gateway_p2p), ID.from_base58(provider_key.peer_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            for seed in range(4):
                _, _, tokens, _ = await serve_one(gateway_p2p, gateway_key, attestation, seed=seed, pool=pool)
                assert len(tokens) == 5
                await wait_for_idle_stream(pool, peer)
            nursery.cancel_scope.cancel()


async def test_a_cancel_that_crosses_the_final_frame_is_ignored_and_the_stream_serves_on(tmp_path, caplog):
    async with provider_and_gateway(tmp_path, slots=1) as (gateway_key, provider_key, gateway_p2p, provider_p2p,
                                                           attestation, _):
        peer = provider_p2p.host.get_id()
        gateway_p2p.host.get_peerstore().add_addrs(peer, provider_p2p.host.get_addrs(), 60)
        stream = await gateway_p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
        outputs = []
        for seed in (1, 2):
            protocol = InferProtocol(Role.CLIENT)
            _, ticket_bytes = make_ticket(gateway_key, attestation.provider_key, now_ms(), sampling={
                "seed": seed, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": 5, "stop": []})
            await write_frame(stream, protocol, Request(ticket_bytes, SALT, PROMPT))
            frames = []
            while not isinstance(frame := await read_frame(stream, protocol, 5), Final):
                frames.append(frame)
            texts = [text for f in frames[1:] for text in f.texts]
            assert frames[1].index == 0 and len(texts) == 5             # indexes start at 0 for each request
            outputs.append("".join(texts))
            await stream.write(encode_frame(More(len(frames) - 1)))      # too late: the request is done
            await stream.write(encode_frame(Cancel()))
        assert outputs[0] != outputs[1]
        await stream.close()
        await trio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
