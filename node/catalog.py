"""Which catalog this node serves from: the newest one signed by a gateway it trusts, asked for over
/llorch/catalog/1 (node/wire/catalog.py, docs/protocol.md §5d).

The node starts from the built-in catalog (version 0, shipped with llorch: the entries a fresh gateway starts
with), or from the signed catalog it kept from its last run (``node.catalog_file``, checked again as it is read).
``keep_catalog`` (under ``supervise``) asks every trusted gateway it is connected to, over the connection it keeps
to it, for a version newer than the one it holds: at once, then every ``node.catalog_poll_ms``. A document is taken
only if its signature is valid and its key is one of ``node.trusted_gateways``, and only if its version is newer;
anything else is ignored, with the reason logged and kept for `llorch node status`. A taken catalog is written to
``node.catalog_file`` (atomically) and wakes the model loader (node/model_loader.py), which fetches and loads a
configured model that became live, and stops offering one that was retired.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.peer.id import ID

from llorch.inference.catalog import BUILTIN, Catalog
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.signing import peer_id_of
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.p2p import P2P
from llorch.node.stream_io import Unanswered, ask_once
from llorch.node.wire.catalog import (CATALOG_PROTOCOL_ID, AskCatalog, CatalogDocument, CatalogRefused,
                                      SignedCatalog, Unchanged, decode_answer)

log = logging.getLogger("llorch.node.catalog")


class CatalogIgnored(Exception):
    """A catalog document this node will not serve from: the message says why (bad signature, untrusted key,
    malformed)."""


class CatalogUnknown(Exception):
    """The gateway could not be asked, did not answer in time, or refused; the message says which."""


@dataclass
class TrustedCatalog:
    """The catalog the node serves from, where it came from, and what it ignored (per gateway peer id)."""

    trusted_keys: frozenset[bytes]
    catalog: Catalog = BUILTIN
    signed_by: str | None = None               # the peer id of the gateway that signed it (None: built in)
    document: bytes = b""
    changed: trio.Event = field(default_factory=trio.Event)
    failures: dict[str, str] = field(default_factory=dict)

    def accept(self, document: bytes) -> bool:
        """Take ``document`` if it is a valid catalog signed by a trusted gateway and newer than the one held;
        True if it was taken. CatalogIgnored if it is not one this node may serve from."""
        try:
            signed = SignedCatalog.from_envelope(document)
        except (EncodingError, SignatureError) as exc:
            raise CatalogIgnored(f"not a valid signed catalog: {exc}") from None
        if signed.gateway_key not in self.trusted_keys:
            raise CatalogIgnored(f"catalog version {signed.version} is signed by {peer_id_of(signed.gateway_key)}, "
                                 f"which is not in node.trusted_gateways: ignored")
        if signed.version <= self.catalog.version:
            return False
        self.catalog, self.signed_by, self.document = signed.catalog(), peer_id_of(signed.gateway_key), document
        self.changed.set()
        self.changed = trio.Event()
        return True

    def status(self) -> dict:
        """The status document's view (`llorch node status`)."""
        return {"version": self.catalog.version, "signed_by": self.signed_by, "live": self.catalog.live_ids(),
                "ignored": dict(self.failures)}


def load_kept(path: Path | None, trusted_keys: frozenset[bytes]) -> TrustedCatalog:
    """The catalog kept from the last run at ``path``, if it is still one to serve from; else the built-in one."""
    held = TrustedCatalog(trusted_keys)
    if path is None or not path.is_file():
        return held
    try:
        held.accept(path.read_bytes()[:limits.CATALOG_DOCUMENT_BYTES_MAX + 1])
    except (CatalogIgnored, OSError) as exc:
        log.warning("not using the catalog kept in %s (%s): starting from the built-in one", path, exc)
    return held


def keep(path: Path | None, document: bytes) -> None:
    """Write the taken catalog to ``path`` (atomically: a crash leaves the old file or the new one)."""
    if path is None:
        return
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(document)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


async def ask_catalog(p2p: P2P, gateway: ID, have_version: int) -> bytes | None:
    """Ask ``gateway`` over the existing connection for a catalog newer than ``have_version``: its document, or
    None if it has no newer one; CatalogUnknown if it cannot say."""
    try:
        frame, _, _ = await ask_once(p2p.host, gateway, CATALOG_PROTOCOL_ID, AskCatalog(have_version).to_bytes(),
                                     limits.CATALOG_ANSWER_FRAME_BYTES_MAX, limits.CATALOG_TIMEOUT_S, "catalog")
        answer = decode_answer(frame)
    except Unanswered as exc:
        raise CatalogUnknown(str(exc)) from None
    except ProtocolError as exc:
        raise CatalogUnknown(f"{gateway} answered a catalog question badly: {exc}") from None
    if isinstance(answer, CatalogRefused):
        raise CatalogUnknown(f"{gateway} refused the catalog question ({answer.code}): {answer.message}")
    if isinstance(answer, Unchanged):
        return None
    assert isinstance(answer, CatalogDocument)
    return answer.document


async def keep_catalog(p2p: P2P, gateways: tuple[str, ...], held: TrustedCatalog, path: Path | None,
                       poll_s: float) -> None:
    """Runs until cancelled (under ``supervise``): ask each trusted gateway the node is connected to for a newer
    catalog, every ``poll_s`` (sooner after a failure), and take what is valid and newer."""
    peers = [ID.from_base58(gateway) for gateway in gateways]
    while True:
        wait_s = poll_s
        for peer in peers:
            name = peer.to_base58()
            try:
                document = await ask_catalog(p2p, peer, held.catalog.version)
                if document is not None and held.accept(document):
                    keep(path, document)
                    log.info("catalog version %d from %s: %s", held.catalog.version, name,
                             ", ".join(held.catalog.live_ids()))
                held.failures.pop(name, None)
            except CatalogUnknown as exc:
                wait_s = min(wait_s, limits.CATALOG_RETRY_S)
                _note(held, name, str(exc), logging.DEBUG)
            except CatalogIgnored as exc:
                _note(held, name, str(exc), logging.WARNING)
            except OSError as exc:
                _note(held, name, f"cannot keep the catalog in {path}: {exc}", logging.ERROR)
        await trio.sleep(wait_s)


def _note(held: TrustedCatalog, gateway: str, reason: str, level: int) -> None:
    if held.failures.get(gateway) != reason:
        log.log(level, "catalog from %s: %s", gateway, reason)
    held.failures[gateway] = reason
