"""The provider's side of /llorch/ledger/1 (``serve_ledger``): its checkpoints, entries and proofs for witnesses and
auditors, and cosigned checkpoints back from trusted gateways. Also the task that signs checkpoints.

Who may read what: checkpoints and proofs are public (anyone may check that a receipt is included); full entries
(which carry tenant pseudonyms, token counts and times) go only to the node's trusted gateways and to the holder of
an auditor grant this node signed (node/wire/auditor_grant.py), identified by the stream's Noise-authenticated peer.
"""

from __future__ import annotations

import logging

import trio

from llorch.ledger import limits as ledger_limits
from llorch.ledger.errors import LedgerError
from llorch.ledger.note import NoteError, verify_cosignature
from llorch.ledger.store import LedgerStore
from llorch.node import limits
from llorch.node.wire.frames import Error
from llorch.node.wire.infer_protocol import Role
from llorch.node.wire.ledger_protocol import (Ack, CheckpointReply, EntriesReply, GetCheckpoint, GetConsistency,
                                              GetEntries, GetInclusion, LedgerProtocol, ProofReply, PutCosigned,
                                              witness_name)
from llorch.node.p2p import peer_key_of
from llorch.node.stream_io import now_ms, read_frame, serve_stream, write_frame
from llorch.node.wire.auditor_grant import AuditorGrant

log = logging.getLogger("llorch.node")

class LedgerService:
    def __init__(self, ledger: LedgerStore, trusted_gateway_keys: frozenset[bytes]) -> None:
        self.ledger = ledger
        self.trusted_gateway_keys = trusted_gateway_keys

    async def serve_ledger(self, stream) -> None:
        """Stream handler for /llorch/ledger/1. Never raises."""
        await serve_stream(stream, "ledger", self._serve)

    async def _serve(self, stream) -> None:
        protocol = LedgerProtocol(Role.SERVER)
        request = await read_frame(stream, protocol, limits.LEDGER_READ_TIMEOUT_S)
        await write_frame(stream, protocol, await self.answer(request, peer_key_of(stream.muxed_conn.peer_id)))

    async def answer(self, request, remote_key: bytes | None):
        """The reply to one request from the peer with ``remote_key``; refusals, bad ranges and store failures
        become error frames."""
        try:
            if isinstance(request, GetCheckpoint):
                note = await self.ledger.sign_checkpoint()
                return CheckpointReply(note)
            if isinstance(request, GetEntries):
                self._check_reader(remote_key, request.grant)
                return await self._entries(request)
            if isinstance(request, GetConsistency):
                self._check_range(request.new_size)
                return ProofReply(await self.ledger.consistency_proof(request.old_size, request.new_size))
            if isinstance(request, GetInclusion):
                self._check_range(request.size)
                return ProofReply(await self.ledger.inclusion_proof(request.index, request.size))
            if isinstance(request, PutCosigned):
                return await self._put_cosigned(request)
        except _Refused as refused:
            return Error(refused.code, str(refused))
        except LedgerError as exc:
            return Error("ledger_failed", str(exc)[:1000])
        raise AssertionError(f"unhandled request {request!r}")

    async def _entries(self, request: GetEntries) -> EntriesReply:
        self._check_range(request.end)
        end = min(request.end, request.start + ledger_limits.ENTRIES_PAGE_MAX)
        entries = await self.ledger.entries(request.start, end)
        page: list[bytes] = []
        total = 0
        for entry in entries:
            if page and total + len(entry) > ledger_limits.ENTRIES_PAGE_BYTES_MAX:
                break
            page.append(entry)
            total += len(entry)
        return EntriesReply(request.start, page)

    async def _put_cosigned(self, request: PutCosigned) -> Ack:
        for gateway_key in self.trusted_gateway_keys:
            try:
                verify_cosignature(request.note, witness_name(gateway_key), gateway_key)
            except NoteError:
                continue
            await self.ledger.add_cosigned(request.note, witness_name(gateway_key))
            return Ack()
        raise _Refused("untrusted_witness", "the note carries no valid cosignature by a gateway this node trusts")

    def _check_reader(self, remote_key: bytes | None, grant: bytes) -> None:
        if remote_key is not None and remote_key in self.trusted_gateway_keys:
            return
        if not grant:
            raise _Refused("not_authorized", "entries go only to this node's trusted gateways and to holders of an "
                                             "auditor grant it signed; checkpoints and proofs are public")
        try:
            parsed = AuditorGrant.from_envelope(grant)
        except LedgerError as exc:
            raise _Refused("not_authorized", f"the auditor grant is not valid: {exc}") from None
        if parsed.provider_key != self.ledger.provider_key:
            raise _Refused("not_authorized", "the auditor grant was not signed by this node")
        if parsed.auditor_key != remote_key:
            raise _Refused("not_authorized", "the auditor grant names another peer than the one asking")
        if not parsed.in_force(now_ms(), limits.TICKET_CLOCK_SKEW_MS):
            raise _Refused("not_authorized", "the auditor grant is not in force (expired, or issued in the future)")

    def _check_range(self, size: int) -> None:
        if size > self.ledger.size:
            raise _Refused("range_beyond_size", f"the ledger has {self.ledger.size} entries; {size} asked for")


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def sign_checkpoints(ledger: LedgerStore, every_entries: int, every_s: float) -> None:
    """Sign a checkpoint whenever ``every_entries`` new entries arrived, or ``every_s`` passed with any new entry."""
    last_signed_at = trio.current_time()
    while True:
        await trio.sleep(ledger_limits.CHECKPOINT_POLL_S)
        latest = ledger.latest_checkpoint
        signed_size = latest[0].size if latest else 0
        grown = ledger.size - signed_size
        due = grown >= every_entries or (grown > 0 and trio.current_time() - last_signed_at >= every_s)
        if due:
            try:
                await ledger.sign_checkpoint()
                last_signed_at = trio.current_time()
            except LedgerError as exc:
                log.error("checkpoint not signed: %s", exc)
