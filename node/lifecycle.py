"""Process lifecycle shared by `llorch node start` and `llorch gateway start`: logging, signals, state files.

SIGINT and SIGTERM cancel the whole task tree; every task unwinds through its own ``finally``, so the process exits
within a few seconds, with code 0 and no traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Awaitable, Callable

import trio

from llorch.ledger.errors import StoreError, sole_exception

log = logging.getLogger("llorch")


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr. Call after libp2p is imported: it configures its own loggers at import time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # libp2p logs on its own non-propagating loggers; keep them quiet unless something is wrong, and without its
    # tracebacks (its internals failing a peer's connection while this process shuts down are not our bugs: the
    # message says what happened).
    library = logging.StreamHandler(sys.stderr)
    library.setFormatter(handler.formatter)
    library.addFilter(_without_traceback)
    for name in ("libp2p", "multiaddr", "hypercorn.error", "hypercorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [library]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    for name in list(logging.root.manager.loggerDict):  # some libp2p modules pin their own logger to INFO
        if name.startswith("libp2p."):
            logging.getLogger(name).setLevel(logging.WARNING)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A library's record on one line: no traceback attached, none pasted into its message (libp2p does both)."""
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    message = record.getMessage()
    if "\n" in message:
        record.msg, record.args = message.split("\n", 1)[0], None
    return True


def run_until_signal(main: Callable[[], Awaitable[None]], drain: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run ``main`` in trio until it returns or SIGINT/SIGTERM arrives; return the process exit code. With
    ``drain``, the first signal runs it (a graceful stop: the gateway lets the requests being served finish) and
    then stops; a second signal stops at once."""

    async def supervisor() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def drain_then_stop() -> None:
                    assert drain is not None
                    await drain()
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    draining = False
                    async for signum in signals:
                        if drain is not None and not draining:
                            draining = True
                            log.info("received %s: draining (new connections refused, requests being served "
                                     "finish), then shutting down; a second signal stops at once",
                                     signal.Signals(signum).name)
                            nursery.start_soon(drain_then_stop)
                            continue
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                await main()
                nursery.cancel_scope.cancel()

    try:
        trio.run(supervisor)
        # Shutting down: a second signal (a terminal's Ctrl-C reaches every process of the group, then a
        # supervisor may send SIGTERM) must not kill the interpreter halfway through its exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from None
    return 0


def bind_failure(host: str, port: int) -> str | None:
    """Why this process could not listen on TCP ``host``:``port`` right now ("in use by another process", "Cannot
    assign requested address", ...), or None if it could. The socket is closed again at once: a start-up check, so
    a taken port is one clear line before anything else is opened."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        return f"not an address of this machine ({exc})"
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            return "in use by another process" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return None


STARTUP_FAILED = 2      # the exit code of a process that could not start (a port, a file, a key it cannot use)


def report_startup_failure(error: BaseException, debug: bool = False) -> int:
    """Print why the process cannot start as one line on stderr (with the traceback before it if ``debug``);
    return the exit code."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    return STARTUP_FAILED


def write_state_file(path: Path | None, state: dict) -> None:
    """Atomically write a small JSON file telling other processes (the demo, tests) how to reach this one."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


SUPERVISOR_BACKOFF_S_INITIAL = 1.0
SUPERVISOR_BACKOFF_S_MAX = 60.0


async def supervise(name: str, loop: Callable[[], Awaitable[None]],
                    on_restart: Callable[[str], None] | None = None,
                    backoff_s_initial: float = SUPERVISOR_BACKOFF_S_INITIAL,
                    backoff_s_max: float = SUPERVISOR_BACKOFF_S_MAX) -> None:
    """Run a background loop for ever: when it raises (or returns), log why, call ``on_restart(name)`` (a metric), and
    start it again after a back-off (doubling up to ``backoff_s_max``; back to the start after a run that lasted
    longer than that). A fault in one loop never ends the process; only cancellation ends this."""
    backoff = backoff_s_initial
    while True:
        started = trio.current_time()
        try:
            await loop()
            log.error("background loop %s returned; restarting it in %g s", name, backoff)
        except Exception as exc:      # trio.Cancelled is not an Exception: shutdown still unwinds through here
            cause = sole_exception(exc)
            if isinstance(cause, StoreError):     # the database went away for a moment: no bug, no traceback
                log.warning("background loop %s stopped: %s; restarting it in %g s", name, cause, backoff)
            else:
                log.error("background loop %s failed (%s: %s); restarting it in %g s", name, type(cause).__name__,
                          cause, backoff, exc_info=exc)
        if on_restart is not None:
            on_restart(name)
        if trio.current_time() - started > backoff_s_max:
            backoff = backoff_s_initial
        await trio.sleep(backoff)
        backoff = min(backoff * 2, backoff_s_max)
