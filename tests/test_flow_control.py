"""Flow control on /llorch/infer/2 (docs/protocol.md §6): a provider sends each token as soon as it may, at most 16
tokens frames beyond the gateway's last ``more``, and puts every token it held meanwhile into its next frame. So a
gateway (or a customer it relays to) that falls behind gets fewer, fuller frames instead of a backlog, every token
still arrives, and the bill still counts texts (one per token), not frames.

Played on real libp2p hosts in this process: the provider is ``ProviderService`` with the test-only echo engine, the
gateway its real ``TicketRunner`` (tests/inprocess.py) or, to misbehave, a raw client of the protocol.
"""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol

from llorch.ledger.objects import Receipt, amount_minor
from llorch.ledger.verify import read_sqlite_entries
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import now_ms, read_frame, write_frame
from llorch.node.wire.frames import Accepted, Final, More, Request, Tokens
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID, InferProtocol, Role
from tests.helpers import make_ticket
from tests.inprocess import market
from tests.test_p2p_service import PROMPT, SALT, provider_and_gateway

TOKENS = 200


async def test_a_slow_customer_gets_every_token_in_fewer_fuller_frames_and_pays_for_each(tmp_path):
    """Before (/llorch/infer/1): one frame per token whatever the customer's pace, so a gateway relaying to slow
    customers buffered the backlog and paid a frame's cost per token. Now the customer who takes 100 ms per chunk
    write gets all 200 tokens (generated in about 0.2 s) in at most 40 writes, and is billed for 200."""
    async with market(tmp_path, {"alpha": {"delay_s": 0.001}}) as m:
        writes: list[int] = []

        async def slow_customer(pieces: list, provider: str) -> None:
            writes.append(len(pieces))
            await trio.sleep(0.1)

        completion = await m.complete("acme", {"messages": PROMPT["messages"], "max_tokens": TOKENS, "seed": 5},
                                      slow_customer)
        assert sum(writes) == TOKENS and completion.receipt.tokens_out == TOKENS
        assert len(writes) <= 40 and max(writes) > limits.TOKEN_FRAMES_AHEAD_MAX, writes
        [(tokens_in, tokens_out, payout)] = await m.rows(
            "SELECT tokens_in, tokens_out, amount FROM postings WHERE leg = 'payout'")
        assert tokens_out == TOKENS and payout == amount_minor(tokens_in, TOKENS, 100_000, 200_000)
        [(frames,)] = await m.rows("SELECT frames FROM tickets")
        assert frames == TOKENS                               # the tickets table counts texts, one per token


async def open_request(gateway_p2p, gateway_key, provider_p2p, attestation, max_tokens: int):
    peer = provider_p2p.host.get_id()
    gateway_p2p.host.get_peerstore().add_addrs(peer, provider_p2p.host.get_addrs(), 60)
    stream = await gateway_p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
    protocol = InferProtocol(Role.CLIENT)
    sampling = {"seed": 1, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": max_tokens, "stop": []}
    ticket, ticket_bytes = make_ticket(gateway_key, attestation.provider_key, now_ms(), sampling=sampling)
    await write_frame(stream, protocol, Request(ticket_bytes, SALT, PROMPT))
    assert await read_frame(stream, protocol, 5) == Accepted()
    return stream, protocol, ticket


async def test_a_gateway_that_never_says_more_gets_16_frames_then_the_stream_ends_without_a_receipt(tmp_path,
                                                                                                  monkeypatch):
    """A gateway that reads but never says ``more`` cannot make the provider buffer frames for it without end: it
    gets exactly TOKEN_FRAMES_AHEAD_MAX frames; the provider gives up TOKENS_DRAIN_TIMEOUT_S after generating and
    resets the stream, recording no receipt (its count would include tokens the gateway never had)."""
    monkeypatch.setattr(limits, "TOKENS_DRAIN_TIMEOUT_S", 1.0)
    async with provider_and_gateway(tmp_path, delay_s=0.002) as (gateway_key, _, gateway_p2p, provider_p2p,
                                                                 attestation, config):
        stream, protocol, _ = await open_request(gateway_p2p, gateway_key, provider_p2p, attestation, 100)
        frames = []
        try:
            while True:
                frames.append(await read_frame(stream, protocol, 5))
        except ProtocolError as exc:
            ended = str(exc)
        assert len(frames) == limits.TOKEN_FRAMES_AHEAD_MAX and all(isinstance(f, Tokens) for f in frames), frames
        assert "closed" in ended or "failed" in ended, ended
        assert list(read_sqlite_entries(config.ledger_path)) == []


async def test_a_gateway_that_says_more_late_gets_the_held_tokens_in_one_frame_and_the_receipt_counts_them(
        tmp_path):
    async with provider_and_gateway(tmp_path, delay_s=0.001) as (gateway_key, _, gateway_p2p, provider_p2p,
                                                                 attestation, _c):
        stream, protocol, _ = await open_request(gateway_p2p, gateway_key, provider_p2p, attestation, TOKENS)
        frames = [await read_frame(stream, protocol, 5) for _ in range(limits.TOKEN_FRAMES_AHEAD_MAX)]
        await trio.sleep(0.5)                        # behind: the provider finishes generating meanwhile
        await write_frame(stream, protocol, More(protocol.token_frames))
        while not isinstance(frame := await read_frame(stream, protocol, 5), Final):
            frames.append(frame)
        texts = [text for frame in frames for text in frame.texts]
        assert len(texts) == TOKENS, [len(f.texts) for f in frames]
        assert len(frames) <= limits.TOKEN_FRAMES_AHEAD_MAX + 2, [len(f.texts) for f in frames]
        assert Receipt.from_envelope(frame.receipt).tokens_out == TOKENS
