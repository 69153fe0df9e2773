"""/llorch/infer/2 as a state machine: a client and a server driven against each other with no network."""

import pytest

from llorch.ledger import canonical
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import (Accepted, Busy, Cancel, Error, Final, More, Request, Tokens, encode_frame,
                                    encode_uvarint)
from llorch.node.wire.infer_protocol import InferProtocol, Role, State

PROMPT = {"messages": [{"role": "user", "content": "hi"}]}


def request():
    return Request(ticket=b"ticket-bytes", salt=bytes(limits.SALT_BYTES), prompt=PROMPT)


def pair():
    return InferProtocol(Role.CLIENT), InferProtocol(Role.SERVER)


def deliver(sender, receiver, frame):
    receiver.receive_data(sender.send(frame))
    return receiver.next_frame()


def test_happy_path_both_sides_agree():
    client, server = pair()
    assert deliver(client, server, request()) == request()
    assert deliver(server, client, Accepted()) == Accepted()
    assert deliver(server, client, Tokens(0, ["Hel"])) == Tokens(0, ["Hel"])
    assert deliver(server, client, Tokens(1, ["lo", ",", " you"])) == Tokens(1, ["lo", ",", " you"])
    assert client.tokens_seen == server.tokens_seen == 4 and client.token_frames == 2
    assert deliver(server, client, Final(b"receipt")) == Final(b"receipt")
    assert client.state is server.state is State.DONE


def test_byte_at_a_time_delivery():
    client, server = pair()
    data = client.send(request())
    for byte in data[:-1]:
        server.receive_data(bytes([byte]))
        assert server.next_frame() is None
    server.receive_data(data[-1:])
    assert server.next_frame() == request()


def test_two_frames_in_one_read():
    client, server = pair()
    server.receive_data(client.send(request()))
    assert server.next_frame() == request()
    client.receive_data(server.send(Accepted()) + server.send(Tokens(0, ["a"])))
    assert client.next_frame() == Accepted()
    assert client.next_frame() == Tokens(0, ["a"])


def test_busy_ends_the_conversation():
    client, server = pair()
    deliver(client, server, request())
    assert deliver(server, client, Busy("full")) == Busy("full")
    assert client.done


def test_out_of_order_token_is_rejected():
    client, server = pair()
    deliver(client, server, request())
    deliver(server, client, Accepted())
    deliver(server, client, Tokens(0, ["a", "b"]))
    client.receive_data(encode_frame(Tokens(1, ["c"])))          # an index that does not count the texts before
    with pytest.raises(ProtocolError, match="index 1 arrived when 2 was expected"):
        client.next_frame()


def test_token_before_accepted_is_rejected():
    client, server = pair()
    deliver(client, server, request())
    client.receive_data(encode_frame(Tokens(0, ["a"])))
    with pytest.raises(ProtocolError, match="not allowed in state await_admission"):
        client.next_frame()


def test_frame_from_the_wrong_side_is_rejected():
    client, server = pair()
    server.receive_data(encode_frame(Accepted()))
    with pytest.raises(ProtocolError, match="accepted frame from the client is not allowed"):
        server.next_frame()


def test_second_request_on_one_stream_is_rejected():
    client, server = pair()
    deliver(client, server, request())
    server.receive_data(encode_frame(request()))
    with pytest.raises(ProtocolError):
        server.next_frame()


def test_oversized_frame_is_rejected_from_its_header():
    client, server = pair()
    deliver(client, server, request())
    deliver(server, client, Accepted())
    client.receive_data(encode_uvarint(limits.FRAME_BYTES_MAX + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        client.next_frame()


def test_oversized_request_is_rejected_before_buffering_it_all():
    server = InferProtocol(Role.SERVER)
    server.receive_data(encode_uvarint(limits.REQUEST_FRAME_BYTES_MAX + 1) + b"x" * 100)
    with pytest.raises(ProtocolError, match="exceeds"):
        server.next_frame()


def test_buffer_is_bounded():
    server = InferProtocol(Role.SERVER)
    with pytest.raises(ProtocolError, match="without a whole frame"):
        server.receive_data(b"\x80" * (limits.RECEIVE_BUFFER_BYTES_MAX + 1))


@pytest.mark.parametrize("body, message", [
    (canonical.encode({"t": "teleport"}), "unknown frame type"),
    (canonical.encode({"t": "request", "ticket": b"x"}), "exactly the fields"),
    (canonical.encode([1, 2]), "map"),
    (b"\xc1", "canonical"),
    (canonical.encode({"t": "request", "ticket": b"x", "salt": b"short", "prompt": PROMPT}), "salt"),
    (canonical.encode({"t": "request", "ticket": b"x", "salt": bytes(16),
                       "prompt": {"messages": [{"role": "root", "content": "x"}]}}), "role"),
])
def test_malformed_request_frames(body, message):
    server = InferProtocol(Role.SERVER)
    server.receive_data(encode_uvarint(len(body)) + body)
    with pytest.raises(ProtocolError, match=message):
        server.next_frame()


def test_non_minimal_length_prefix_is_rejected():
    server = InferProtocol(Role.SERVER)
    server.receive_data(b"\x85\x00")
    with pytest.raises(ProtocolError, match="minimal"):
        server.next_frame()


def test_sending_an_invalid_frame_is_a_local_bug():
    client = InferProtocol(Role.CLIENT)
    with pytest.raises(AssertionError):
        client.send(Accepted())


def test_error_frame_mid_stream_ends_it():
    client, server = pair()
    deliver(client, server, request())
    deliver(server, client, Accepted())
    assert deliver(server, client, Error("engine_failed", "boom")) == Error("engine_failed", "boom")
    assert client.done


def streaming_pair():
    client, server = pair()
    deliver(client, server, request())
    deliver(server, client, Accepted())
    return client, server


def test_a_provider_that_ignores_flow_control_is_caught_by_the_gateway():
    """docs/protocol.md §6: at most TOKEN_FRAMES_AHEAD_MAX tokens frames beyond the gateway's last more.taken. A
    provider that floods the gateway with one-token frames regardless is a protocol error at the first frame past
    the bound."""
    client, server = streaming_pair()
    for index in range(limits.TOKEN_FRAMES_AHEAD_MAX):
        deliver(server, client, Tokens(index, ["x"]))
    assert not server.may_send_tokens and client.owes_more
    client.receive_data(encode_frame(Tokens(limits.TOKEN_FRAMES_AHEAD_MAX, ["x"])))
    with pytest.raises(ProtocolError, match="beyond flow control"):
        client.next_frame()


def test_more_opens_flow_control_and_is_checked():
    client, server = streaming_pair()
    for index in range(limits.TOKEN_FRAMES_AHEAD_MAX):
        deliver(server, client, Tokens(index, ["x"]))
    assert deliver(client, server, More(limits.TOKEN_FRAMES_PER_MORE)) == More(limits.TOKEN_FRAMES_PER_MORE)
    assert server.may_send_tokens and server.taken == client.taken == limits.TOKEN_FRAMES_PER_MORE
    for bad, message in ((More(limits.TOKEN_FRAMES_PER_MORE - 1), "outside"),      # taken never decreases
                         (More(limits.TOKEN_FRAMES_AHEAD_MAX + 1), "outside")):     # nor exceeds what was sent
        fresh_client, fresh_server = streaming_pair()
        for index in range(limits.TOKEN_FRAMES_AHEAD_MAX):
            deliver(fresh_server, fresh_client, Tokens(index, ["x"]))
        deliver(fresh_client, fresh_server, More(limits.TOKEN_FRAMES_PER_MORE))
        fresh_server.receive_data(encode_frame(bad))
        with pytest.raises(ProtocolError, match=message):
            fresh_server.next_frame()


def test_more_and_cancel_that_crossed_the_final_frame_are_ignored_and_a_request_resets_the_counts():
    client, server = streaming_pair()
    for index in range(limits.TOKEN_FRAMES_PER_MORE):
        deliver(server, client, Tokens(index, ["x"]))
    deliver(server, client, Final(b"receipt"))
    assert deliver(client, server, More(limits.TOKEN_FRAMES_PER_MORE)) == More(limits.TOKEN_FRAMES_PER_MORE)
    assert deliver(client, server, Cancel()) == Cancel()
    assert deliver(client, server, request()) == request()
    assert (server.tokens_seen, server.token_frames, server.taken) == (0, 0, 0)


@pytest.mark.parametrize("fields, message", [
    ({"index": 0, "texts": []}, "list of 1-256 texts"),
    ({"index": 0, "texts": ["x"] * (limits.TOKENS_PER_FRAME_MAX + 1)}, "list of 1-256 texts"),
    ({"index": 0, "texts": "abc"}, "list of 1-256 texts"),
    ({"index": 0, "texts": [b"x"]}, "texts"),
    ({"index": 0, "texts": ["x" * (limits.TOKEN_TEXT_CHARS_MAX + 1)]}, "texts"),
    ({"index": -1, "texts": ["x"]}, "unsigned"),
    ({"index": 0, "text": "x"}, "exactly the fields"),          # the /llorch/infer/1 token frame's shape
])
def test_malformed_tokens_frames(fields, message):
    client, server = streaming_pair()
    body = canonical.encode({"t": "tokens", **fields})
    client.receive_data(encode_uvarint(len(body)) + body)
    with pytest.raises(ProtocolError, match=message):
        client.next_frame()


def test_more_from_the_provider_or_tokens_from_the_gateway_are_refused():
    client, server = streaming_pair()
    client.receive_data(encode_frame(More(0)))
    with pytest.raises(ProtocolError, match="more frame from the server is not allowed"):
        client.next_frame()
    server.receive_data(encode_frame(Tokens(0, ["x"])))
    with pytest.raises(ProtocolError, match="tokens frame from the client is not allowed"):
        server.next_frame()
