"""The gateway's HTTP/1.1 server: h11 on trio sockets, speaking ASGI (HTTP only) to the app of http_api.py.

It replaces a general-purpose ASGI server on the request path because that server's own work was about 0.35 ms of
every request (measured against this one on loopback, keep-alive, one client), a quarter of the latency the gateway
may add. It does what the gateway needs and no more: HTTP/1.1 and 1.0, keep-alive, request bodies streamed to the
app, responses with Content-Length or chunked (server-sent events), ``Expect: 100-continue``, and
``http.disconnect`` as soon as the client closes its connection while a request runs (a queued request leaves the
queue, a placed one is cancelled and billed for what was relayed). No TLS (a load balancer or proxy terminates it)
and no HTTP/2.

Every read and write is bounded: the request line and headers by HEADERS_BYTES_MAX, the wait for them (a new or
idle keep-alive connection, or a client trickling its headers) by REQUEST_WAIT_S, the whole body by one deadline,
BODY_DEADLINE_S from the head (408 past it, however the body trickles in), each write by SEND_TIMEOUT_S (a client
that stops reading is cut off: the app's send fails, as if it had hung up). Connections beyond CONNECTIONS_MAX wait
at most CONNECTION_WAIT_S for a slot, then are answered 503 with Retry-After. A malformed request (a bad head, a
malformed chunked body, both Content-Length and Transfer-Encoding: RFC 9112 §6.3) is answered 400 and the
connection closed, whatever the app was doing with it; an app that fails before it answered is a 500.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Awaitable, Callable
from urllib.parse import unquote

import h11
import trio

log = logging.getLogger("llorch.gateway.http")

HEADERS_BYTES_MAX = 16 * 1024        # request line and headers together
REQUEST_WAIT_S = 5.0                 # a connection without a whole request head this long after it opened (or after
                                     # its last answer) is closed
BODY_DEADLINE_S = 60.0               # the whole request body must have arrived this long after its head
SEND_TIMEOUT_S = 30.0                # the longest a write to the client may block (it stopped reading)
CONNECTIONS_MAX = 1_024              # client connections served at once; more wait their turn...
CONNECTION_WAIT_S = 5.0              # ... this long at most, then are answered 503
DRAIN_S = 10.0                       # a graceful stop gives the requests being served this long to finish
DRAIN_FRESH_S = 1.0                  # ... and a connection accepted before it, its request not yet sent, this long
                                     # to send it (then it is served too)
READ_BYTES = 64 * 1024
SERVER = b"llorch"

App = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Drain:
    """A graceful stop (a deployment's SIGTERM): ``await drain()`` stops accepting connections, closes idle
    keep-alive ones, answers what is being served with ``Connection: close``, and waits, at most DRAIN_S, for the
    requests being served to finish. A connection accepted before the drain that has not sent its request yet is
    not idle: its client saw it accepted and is sending; it gets DRAIN_FRESH_S to do so and is served (Go's
    http.Server.Shutdown does the same for its new connections). Meanwhile a load balancer sees new connections
    refused (and the gateway's /healthz says "draining", 503) and sends customers to another replica: nobody's
    request is cut."""

    def __init__(self) -> None:
        self.draining = False
        self.requests = 0                            # being served now
        self._accepting: trio.CancelScope | None = None
        self._idle: set[trio.CancelScope] = set()    # keep-alive connections waiting for their next request
        self._fresh: set[trio.CancelScope] = set()   # connections waiting for their first request

    async def __call__(self) -> None:
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in list(self._idle):
            scope.cancel()
        for scope in list(self._fresh):
            scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_FRESH_S)
        with trio.move_on_after(DRAIN_S):
            while True:
                await trio.sleep(0.02)               # first: a connection accepted a moment ago starts serving
                if not self.requests and not self._fresh:
                    break
        if self.requests:
            log.warning("%d requests still running after %g s of draining: they are cut", self.requests, DRAIN_S)


async def serve_http(app: App, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED,
                     drain: Drain | None = None) -> None:
    """Serve ``app`` on host:port until cancelled (or drained: ``drain``); report ``[base URL]`` once listening
    (OSError if it cannot)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(CONNECTIONS_MAX)
    drain = drain if drain is not None else Drain()

    async def handle(stream: trio.SocketStream) -> None:
        acquired = False
        with trio.move_on_after(CONNECTION_WAIT_S):
            await limiter.acquire()
            acquired = True
        if not acquired:
            await Connection(app, stream, (host, bound_port)).refuse_busy()
            return
        try:
            await Connection(app, stream, (host, bound_port), drain).serve()
        except Exception:            # a bug here ends this connection, never the server (and the gateway)
            log.exception("an HTTP connection failed")
        finally:
            limiter.release()

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            drain._accepting = accepting.cancel_scope
            await accepting.start(partial(trio.serve_listeners, handle, listeners, handler_nursery=connections))
            task_status.started([f"http://{host}:{bound_port}"])
        for listener in listeners:             # drained: new connections are refused from here
            await listener.aclose()


class _Closed(Exception):
    """The client closed the connection, or broke the protocol: stop serving it."""


class _Refused(Exception):
    """The server answers this request itself (its body broke the protocol or its deadline), whatever the app does:
    ``status`` and ``message``, then the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Connection:
    """One client connection: its requests one after another (keep-alive)."""

    def __init__(self, app: App, stream: trio.SocketStream, server: tuple[str, int],
                 drain: Drain | None = None) -> None:
        self.app, self.stream, self.server = app, stream, server
        self.drain = drain if drain is not None else Drain()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADERS_BYTES_MAX)
        try:
            peer = stream.socket.getpeername()
            self.client: tuple[str, int] | None = (peer[0], peer[1])
        except OSError:
            self.client = None
        self.eof = trio.Event()              # the client closed its side (or the connection broke)

    async def serve(self) -> None:
        fresh = True                         # no request on this connection yet
        try:
            while True:
                if self.drain.draining and not fresh and not self.h11.trailing_data[0]:
                    return                   # idle while the server drains: closed, the client reconnects elsewhere
                with trio.move_on_after(REQUEST_WAIT_S) as waited:
                    if self.drain.draining:              # accepted just before the drain: a short grace
                        waited.deadline = min(waited.deadline, trio.current_time() + DRAIN_FRESH_S)
                    waiting = self.drain._fresh if fresh else self.drain._idle
                    waiting.add(waited)
                    try:
                        event = await self._next_event()
                    finally:
                        waiting.discard(waited)
                fresh = False
                if waited.cancelled_caught:
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                if len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers) > \
                        HEADERS_BYTES_MAX:          # h11 caps a head only while it is incomplete: one read held it
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                names = {name.lower() for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:      # RFC 9112 §6.3: smuggling
                    raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
                self.drain.requests += 1
                try:
                    await self._run(event)
                finally:
                    self.drain.requests -= 1
                if self.drain.draining:
                    return                   # answered with Connection: close (_Exchange.send)
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return                   # not reusable: the app left the body unread, or an error closed it
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc)
        except _Closed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _next_event(self):
        """The next h11 event, reading from the socket as needed (the caller bounds the wait). EOF between requests
        is h11's ConnectionClosed; inside one, its RemoteProtocolError."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._receive())

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof.set()
        return data

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """A request h11 cannot parse: 400 (or 431 for oversized headers) if nothing was answered yet."""
        status = exc.error_status_hint
        await self._answer_and_close(status, f"malformed HTTP request: {status} ({exc})", "invalid_request_error")

    async def _answer_and_close(self, status: int, message: str, kind: str,
                                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer ``status`` with OpenAI's error shape and ``Connection: close``, if nothing was answered yet."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error_body(message, kind)
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                await self.stream.send_all(self.h11.send(h11.Response(status_code=status, headers=[
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), (b"server", SERVER), *(headers or [])])) +
                    self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.LocalProtocolError):
            pass

    async def refuse_busy(self) -> None:
        """A connection that found no slot in time: read its request head (bounded), answer 503, close."""
        try:
            with trio.move_on_after(REQUEST_WAIT_S):
                event = await self._next_event()
                if isinstance(event, h11.Request):
                    await self._answer_and_close(503, f"the gateway is busy: more than {CONNECTIONS_MAX} "
                                                      f"connections; retry shortly", "server_error",
                                                 [(b"retry-after", b"1")])
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc)
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _run(self, request: h11.Request) -> None:
        target = request.target
        path, _, query = target.partition(b"?")
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": request.http_version.decode(), "method": request.method.decode("ascii"),
                 "scheme": "http", "path": _percent_decoded(path), "raw_path": path, "query_string": query,
                 "root_path": "", "headers": [(name.lower(), value) for name, value in request.headers],
                 "client": self.client, "server": self.server, "state": {}}
        exchange = _Exchange(self, request)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except _Closed:
            raise
        except Exception:
            if exchange.refused is not None:     # the app failed on the error its receive raised
                raise _Closed() from None
            if self.eof.is_set():            # the client went away under it: nothing to answer, nothing wrong
                raise _Closed() from None
            log.exception("the HTTP app failed on %s %s", scope["method"], scope["path"])
            if not exchange.started:
                await exchange.send_plain(500, error_body("internal error", "server_error"))
            raise _Closed() from None
        if exchange.refused is not None:
            raise _Closed()
        if not exchange.started:
            await exchange.send_plain(500, error_body("no response", "server_error"))
        elif self.h11.our_state is h11.SEND_BODY:     # the app returned mid-body: the client cannot trust it
            raise _Closed()


class _Exchange:
    """One request and its response, as the app's ASGI ``receive`` and ``send``."""

    def __init__(self, connection: Connection, request: h11.Request) -> None:
        self.connection, self.h11 = connection, connection.h11
        self.head_only = request.method == b"HEAD"
        self.started = False
        self.head = b""                      # the response head, until the body's first piece goes with it
        self.body_done = False
        self.body_deadline = trio.current_time() + BODY_DEADLINE_S
        self.refused: _Refused | None = None     # the server answered this request itself

    async def receive(self) -> dict:
        if not self.body_done:
            if self.h11.they_are_waiting_for_100_continue:
                await self._send_bytes(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
            try:
                with trio.move_on_at(self.body_deadline) as waited:
                    event = await self.connection._next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(400, f"malformed HTTP request: 400 ({exc})", "invalid_request_error")
            if waited.cancelled_caught:
                await self._refuse(408, f"the request body did not arrive within {BODY_DEADLINE_S:g} s",
                                   "invalid_request_error")
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            raise _Closed()                      # ConnectionClosed mid-body
        await self._until_the_client_closes()
        return {"type": "http.disconnect"}

    async def _until_the_client_closes(self) -> None:
        """After the body: read on (keeping what a pipelining client sent next) until EOF."""
        connection = self.connection
        while not connection.eof.is_set():
            data = await connection._receive()
            connection.h11.receive_data(data)
            if len(connection.h11.trailing_data[0]) > HEADERS_BYTES_MAX:
                raise _Closed()

    async def _refuse(self, status: int, message: str, kind: str) -> None:
        """Answer the request here (the app's own answer is dropped), then make the app's receive fail."""
        self.refused = _Refused(status, message)
        if not self.started:
            await self.connection._answer_and_close(status, message, kind)
        raise _Closed()

    async def send(self, message: dict) -> None:
        if self.refused is not None:             # the server answered already: the connection is closing
            raise _Closed()
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            headers = [(name, value) for name, value in message.get("headers", [])]
            if not any(name.lower() == b"server" for name, _ in headers):
                headers.append((b"server", SERVER))
            if self.connection.drain.draining:       # no next request on this connection: it closes after this
                headers.append((b"connection", b"close"))
            # Sent with the first piece of the body (one write, one segment): every app sends one straight after.
            self.head = self.h11.send(h11.Response(status_code=message["status"], headers=headers))
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            body = message.get("body", b"")
            data = self.head + (self.h11.send(h11.Data(data=body)) if body and not self.head_only else b"")
            self.head = b""
            if not message.get("more_body", False):
                data += self.h11.send(h11.EndOfMessage())
            if data:
                await self._send_bytes(data)

    async def send_plain(self, status: int, body: bytes) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})

    async def _send_bytes(self, data: bytes) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                await self.connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.connection.eof.set()            # gone, or not reading: either way nobody takes the answer
            raise _Closed() from None


def error_body(message: str, kind: str) -> bytes:
    """OpenAI's error shape, as the app's own errors have it."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def _percent_decoded(path: bytes) -> str:
    return unquote(path.decode("latin-1")) if b"%" in path else path.decode("latin-1")
