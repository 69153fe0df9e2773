"""The gateway's HTTP/1.1 server (gateway/api/http_server.py) against hostile and careless clients, over real loopback
sockets: oversized and malformed heads, a client trickling its head or stalling its body, keep-alive and pipelining,
chunked answers, Expect: 100-continue, a client that hangs up while its request runs, and an app that fails."""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio

from llorch.gateway.api import http_server


async def app(scope, receive, send):
    """Echoes the method, path, query and body; /fail raises; /stream answers in three chunks; /wait waits for the
    client to hang up and records it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/fail":
        raise ValueError("a bug in a handler")
    if scope["path"] == "/wait":
        HUNG_UP.append((await receive())["type"])
        return
    if scope["path"] == "/flood":                # answers without end, as fast as the client reads
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * (1 << 20), "more_body": True})
        except Exception as exc:
            FLOOD_ENDED.append(type(exc).__name__)
            raise
    if scope["path"] == "/slow":
        await trio.sleep(0.5)
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for piece in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    answer = json.dumps({"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                         "body": body.decode()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


HUNG_UP: list[str] = []
FLOOD_ENDED: list[str] = []


@pytest.fixture
async def server(nursery):
    bound = await nursery.start(http_server.serve_http, app, "127.0.0.1", 0)
    yield int(bound[0].rsplit(":", 1)[1])


async def exchange(port: int, data: bytes, read_until_closed: bool = True, timeout_s: float = 10) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(timeout_s):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return received
                received += chunk
                if not read_until_closed and b"\r\n\r\n" in received:
                    return received


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(server):
    two = (b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
           b"GET /b%20c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    answer = await exchange(server, two)
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [{"method": "POST", "path": "/a", "query": "x=1", "body": "hello"},
                      {"method": "GET", "path": "/b c", "query": "", "body": ""}]


async def test_an_answer_without_length_is_chunked_and_100_continue_is_honoured(server):
    answer = await exchange(server, b"GET /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert b"transfer-encoding: chunked" in answer.lower() and answer.endswith(b"0\r\n\r\n")
    assert b"one " in answer and b"three" in answer
    stream = await trio.open_tcp_stream("127.0.0.1", server)
    async with stream:
        await stream.send_all(b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"ok")
        answer = b""
        with trio.fail_after(5):
            while b'"body": "ok"' not in answer:
                answer += await stream.receive_some(65536)


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n\r\n", b"431"),   # over HEADERS_BYTES_MAX
    (b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n", b"400"),
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab", b"400"),
])
async def test_a_malformed_or_oversized_head_is_refused_and_the_connection_closed(server, head, status):
    answer = await exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith("malformed HTTP request")


async def test_a_client_trickling_its_head_or_stalling_its_body_is_cut_off(server, monkeypatch):
    monkeypatch.setattr(http_server, "REQUEST_WAIT_S", 0.5)
    for opening in (b"", b"GET / HTTP/1.1\r\nHost: h\r\n"):                           # silent; half a head
        started = trio.current_time()
        assert await exchange(server, opening, timeout_s=5) == b""                      # closed, nothing answered
        assert trio.current_time() - started < 3
    monkeypatch.setattr(http_server, "BODY_DEADLINE_S", 0.5)
    started = trio.current_time()                                                       # 3 of 10 body bytes
    answer = await exchange(server, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc", timeout_s=5)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
    assert trio.current_time() - started < 3


async def test_a_body_trickled_in_under_every_piece_timeout_still_meets_one_deadline(server, monkeypatch):
    """Before: the body's timeout was per piece, so a byte every so often kept a connection (and its slot) forever."""
    monkeypatch.setattr(http_server, "BODY_DEADLINE_S", 1.0)
    stream = await trio.open_tcp_stream("127.0.0.1", server)
    async with stream:
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n")
        started, answer = trio.current_time(), b""
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async def trickle() -> None:
                    for _ in range(1000):
                        await trio.sleep(0.1)
                        try:
                            await stream.send_all(b"a")
                        except trio.BrokenResourceError:
                            return
                nursery.start_soon(trickle)
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some(65536)
                nursery.cancel_scope.cancel()
        assert answer.startswith(b"HTTP/1.1 408 ") and trio.current_time() - started < 2.5


async def test_content_length_with_transfer_encoding_is_refused_and_closed(server):
    """RFC 9112 §6.3: both framing headers may be request smuggling; before, the body was read as chunked and the
    connection kept open for the next request."""
    answer = await exchange(server, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                                    b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower()
    assert b"smuggled" not in answer and answer.count(b"HTTP/1.1 ") == 1


async def test_a_malformed_chunked_body_is_a_400_not_a_500(server, caplog):
    answer = await exchange(server, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"zz\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
    assert "malformed HTTP request" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(server, monkeypatch):
    """Before: send_all had no timeout, so a client that stopped reading pinned the answer (and, on the gateway, a
    provider's stream) for as long as it kept the connection open."""
    monkeypatch.setattr(http_server, "SEND_TIMEOUT_S", 0.5)
    FLOOD_ENDED.clear()
    stream = await trio.open_tcp_stream("127.0.0.1", server)
    async with stream:
        await stream.send_all(b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n")
        with trio.fail_after(10):
            while not FLOOD_ENDED:
                await trio.sleep(0.05)
    assert FLOOD_ENDED == ["_Closed"]


async def test_connections_beyond_the_limit_wait_a_bounded_time_then_get_503(nursery, monkeypatch):
    monkeypatch.setattr(http_server, "CONNECTIONS_MAX", 1)
    monkeypatch.setattr(http_server, "CONNECTION_WAIT_S", 0.3)
    bound = await nursery.start(http_server.serve_http, app, "127.0.0.1", 0)
    port = int(bound[0].rsplit(":", 1)[1])
    holder = await trio.open_tcp_stream("127.0.0.1", port)       # holds the one slot (an idle connection)
    async with holder:
        await trio.sleep(0.1)
        started = trio.current_time()
        answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", timeout_s=4)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
        assert "busy" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        assert trio.current_time() - started < 2


async def test_a_client_hanging_up_is_told_to_the_app_at_once(server):
    HUNG_UP.clear()
    stream = await trio.open_tcp_stream("127.0.0.1", server)
    await stream.send_all(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
    await trio.sleep(0.2)
    await stream.aclose()
    with trio.fail_after(5):
        while not HUNG_UP:
            await trio.sleep(0.01)
    assert HUNG_UP == ["http.disconnect"]


async def test_an_app_failing_is_a_500_and_the_server_goes_on(server, caplog):
    answer = await exchange(server, b"GET /fail HTTP/1.1\r\nHost: h\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ") and b"internal error" in answer
    assert "a bug in a handler" in caplog.text
    assert b'"path": "/ok"' in await exchange(server, b"GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")


async def test_a_drain_finishes_what_is_served_refuses_new_connections_and_closes_idle_ones(nursery):
    """A deployment's SIGTERM: the request being served gets its answer (with Connection: close), an idle
    keep-alive connection is closed, a new connection is refused; the drain ends when the served request did."""
    drain = http_server.Drain()
    bound = await nursery.start(partial(http_server.serve_http, app, "127.0.0.1", 0, drain=drain))
    port = int(bound[0].rsplit(":", 1)[1])
    idle = await trio.open_tcp_stream("127.0.0.1", port)
    await idle.send_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    with trio.fail_after(5):
        assert (await idle.receive_some(65536)).startswith(b"HTTP/1.1 200 ")        # now idle, kept alive
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await trio.sleep(0.1)
    started = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(drain)
        await trio.sleep(0.05)
        with trio.fail_after(5):
            assert await idle.receive_some(65536) == b""                                 # closed by the drain
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)                               # refused
        answer = b""
        with trio.fail_after(5):
            while True:
                chunk = await slow.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer.lower()
    assert drain.requests == 0 and trio.current_time() - started < 2


async def test_a_connection_opened_before_the_drain_gets_its_request_answered(nursery):
    """A client that connected just before the SIGTERM and sends its request just after is served (with Connection:
    close), not hung up on: it saw its connection accepted, so it cannot know to go elsewhere. Before: the drain
    closed it as if it were an idle keep-alive connection, and the client read "Server disconnected without sending
    a response" (a CI run of test_replicas' rolling restart hit it). A connection that never sends a request holds
    the drain up at most DRAIN_FRESH_S."""
    drain = http_server.Drain()
    bound = await nursery.start(partial(http_server.serve_http, app, "127.0.0.1", 0, drain=drain))
    port = int(bound[0].rsplit(":", 1)[1])
    fresh = await trio.open_tcp_stream("127.0.0.1", port)
    silent = await trio.open_tcp_stream("127.0.0.1", port)          # connects, never asks
    await trio.sleep(0.1)                                             # both accepted by the server
    started = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(drain)
        await trio.sleep(0.05)
        await fresh.send_all(b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while chunk := await fresh.receive_some(65536):
                answer += chunk
            assert await silent.receive_some(65536) == b""            # closed once its grace ran out
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer.lower(), answer
    assert b'"path": "/late"' in answer
    assert trio.current_time() - started < http_server.DRAIN_FRESH_S + 1
