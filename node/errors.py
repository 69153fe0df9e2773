"""Errors raised by the node package.

    NodeError                    base
    ├── ConfigError              node.toml (or an env override) is missing a field or has a bad value
    ├── StartupError             the process cannot have what it needs to start: a port is taken, an address is
    │                            not this machine's (the message names it and the setting to change)
    ├── ProtocolError            a peer broke /llorch/infer/1: bad frame, oversized frame, frame out of order
    │   │                        (a remote fault: drop the stream, keep serving others)
    │   └── FrameTimeout         no complete frame arrived within the read's timeout (the peer is too slow)
    ├── TicketRejected           a ticket is not acceptable here (untrusted gateway, wrong provider, expired,
    │                            replayed request_id, model not offered, underpriced); carries the error code
    └── AttestationRejected      a gossiped attestation failed validation (size, signature, skew, seq, expiry)
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node package raises on purpose."""


class ConfigError(NodeError):
    """Raised when a config file or env override is invalid; the message names the field and the remedy."""


class StartupError(NodeError):
    """Raised at start-up when a resource cannot be had (an HTTP or libp2p port in use, an address this machine does
    not have). The commands print it as one line and exit 2; the message says what and which setting to change."""


class ProtocolError(NodeError):
    """Raised when the remote side of a stream protocol breaks it; the stream must be reset."""


class FrameTimeout(ProtocolError):
    """Raised when no complete frame arrives within a read's timeout: the peer is alive but too slow, or gone."""


class TicketRejected(NodeError):
    """Raised when a provider refuses a ticket; ``code`` is sent to the gateway in an error frame."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class AttestationRejected(NodeError):
    """Raised when an attestation must be dropped; the message is logged as the reason, and ``reason`` (one word of
    docs/protocol.md §5's drop table: oversized, malformed, bad_address, ...) is what the gateway counts."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        self.reason = reason
        super().__init__(message)
