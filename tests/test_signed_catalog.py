"""The signed catalog (docs/protocol.md §5d): the operator's entries in the gateway's database, signed, published over
/llorch/catalog/1 and taken by a node only from a gateway it trusts.

The attacks come first: a catalog signed by a key the node does not trust, a tampered or replayed (older) one, a
document with an entry the catalog file would refuse, a non-canonical one, oversized or trailing frames: each is
refused with its reason and changes nothing the node serves. Then the operator's commands against the real database
(SQLite here; PostgreSQL in the suite's replica runs), and the exchange over real libp2p on loopback."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import replace

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from llorch.gateway.catalog import CatalogBook, GatewayCatalog
from llorch.gateway.db import open_gateway_db
from llorch.inference import catalog
from llorch.inference.catalog import BUILTIN, entry_map
from llorch.inference.errors import CatalogError
from llorch.ledger import canonical
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.signing import SigningKey
from llorch.node import limits
from llorch.node.catalog import CatalogIgnored, TrustedCatalog, keep, keep_catalog, load_kept
from llorch.node.errors import ProtocolError
from llorch.node.p2p import running_host
from llorch.node.wire.catalog import (CATALOG_PROTOCOL_ID, AskCatalog, CatalogDocument, CatalogRefused,
                                      SignedCatalog, Unchanged, decode_answer)
from llorch.node.wire.frames import encode_uvarint

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GATEWAY = SigningKey(bytes(range(32, 64)))
DEFAULT = catalog.lookup(catalog.DEFAULT_MODEL_ID)
NEW = replace(DEFAULT, id="smollm2-hub-q4_1", file_name="SmolLM2-hub.gguf", parts=(), package="",
              hub=catalog.HubFile("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "ab" * 20, "smollm2.q4_1.gguf"),
              notes="the default model's file, served from a Hub repo")


def signed(version: int, entries=None, key: SigningKey = GATEWAY) -> bytes:
    entries = list(BUILTIN.entries.values()) if entries is None else entries
    return SignedCatalog.of(key.public_key, version, 1_795_690_000_000, entries).seal(key)


def frame(fields) -> bytes:
    body = canonical.encode(fields)
    return encode_uvarint(len(body)) + body


# --- the attacks ------------------------------------------------------------------------------------------------

def test_a_catalog_signed_by_an_untrusted_key_is_ignored_with_its_reason():
    held = TrustedCatalog(frozenset({GATEWAY.public_key}))
    stranger = SigningKey.generate()
    with pytest.raises(CatalogIgnored, match=f"signed by {stranger.peer_id}, which is not in node.trusted_gateways"):
        held.accept(signed(7, [*BUILTIN.entries.values(), NEW], key=stranger))
    assert held.catalog is BUILTIN and held.catalog.live(NEW.id) is None and not held.changed.is_set()


def test_a_tampered_catalog_fails_its_signature_and_an_older_one_is_not_taken():
    held = TrustedCatalog(frozenset({GATEWAY.public_key}))
    document = signed(5, [*BUILTIN.entries.values(), NEW])
    tampered = document.replace(NEW.sha256.encode(), ("0" * 64).encode())
    assert tampered != document
    with pytest.raises(CatalogIgnored, match="not a valid signed catalog"):
        held.accept(tampered)
    assert held.accept(document) and held.catalog.version == 5 and held.catalog.live(NEW.id) == NEW
    retired = replace(NEW, retired_ms=1_795_690_100_000)
    assert not held.accept(signed(4, list(BUILTIN.entries.values())))       # a replay of an older version
    assert not held.accept(document)                                       # the same version again
    assert held.catalog.live(NEW.id) == NEW
    assert held.accept(signed(6, [*BUILTIN.entries.values(), retired]))
    assert held.catalog.live(NEW.id) is None and held.catalog.entries[NEW.id].retired_ms == retired.retired_ms


@pytest.mark.parametrize("spoil, expected", [
    (lambda items: [{**items[0], "sha256": "00"}] + items[1:], "sha256 must be 64 lowercase hex digits"),
    (lambda items: [{**items[0], "hub": {"repo": "a/b", "revision": "main", "filename": "x.gguf"}}] + items[1:],
     "not a commit"),
    (lambda items: [{k: v for k, v in items[0].items() if k != "notes"}] + items[1:], "every field of an entry"),
    (lambda items: [{**items[0], "extra": 1}] + items[1:], "unknown fields"),
    (lambda items: list(reversed(items)), "ascending order of id"),
    (lambda items: items + items[:1], "ascending order of id"),
    (lambda items: [{**items[0], "notes": "x" * 5000}] + items[1:], "text fields are limited"),
    (lambda items: [{**items[0], "urls": ["file:///etc/passwd"]}] + items[1:], "urls must be http"),
])
def test_an_entry_the_catalog_file_would_refuse_is_refused_in_a_signed_catalog(spoil, expected):
    items = [entry_map(e) for _, e in sorted(BUILTIN.entries.items())]
    payload = {"v": 1, "gateway_key": GATEWAY.public_key, "version": 3, "issued_ms": 1, "entries": spoil(items)}
    document = GATEWAY.seal("catalog", payload)             # validly signed: the content is what is wrong
    with pytest.raises(EncodingError, match=expected):
        SignedCatalog.from_envelope(document)
    with pytest.raises(CatalogIgnored, match=expected):
        TrustedCatalog(frozenset({GATEWAY.public_key})).accept(document)


def test_a_catalog_too_large_or_too_long_is_refused_before_anything_else():
    many = [replace(DEFAULT, id=f"m{n:04d}") for n in range(limits.CATALOG_DOCUMENT_ENTRIES_MAX + 1)]
    with pytest.raises(EncodingError, match="at most"):
        SignedCatalog.of(GATEWAY.public_key, 1, 1, many)
    with pytest.raises(EncodingError, match="limit is"):
        SignedCatalog.from_envelope(b"\x82" + b"\x00" * limits.CATALOG_DOCUMENT_BYTES_MAX)
    with pytest.raises(SignatureError):          # a ticket's signature is no catalog's: the domain tags differ
        payload = {"v": 1, "gateway_key": GATEWAY.public_key, "version": 1, "issued_ms": 1, "entries": []}
        SignedCatalog.from_envelope(canonical.encode({"p": canonical.encode(payload),
                                                      "s": GATEWAY.sign("ticket", canonical.encode(payload))}))


@pytest.mark.parametrize("data, expected", [
    (frame({"t": "ask", "have_version": -1}), "unsigned"),
    (frame({"t": "ask", "have_version": 1, "x": 1}), "exactly the keys"),
    (frame({"t": "ask", "have_version": True}), "unsigned"),
    (frame({"t": "ask", "have_version": 1}) + b"\x00", "length prefix"),
    (encode_uvarint(10_000) + b"\x80", "announced"),
])
def test_a_malformed_question_is_refused(data, expected):
    with pytest.raises(ProtocolError, match=expected):
        AskCatalog.from_bytes(data)


@pytest.mark.parametrize("data, expected", [
    (frame({"t": "catalog"}), "exactly the keys"),
    (frame({"t": "catalog", "document": "text"}), "signed catalog's bytes"),
    (frame({"t": "unchanged", "version": "7"}), "unsigned"),
    (frame({"t": "listing", "version": 7}), "t in"),
    (frame({"t": "refused", "code": "teapot", "message": "x"}), "refusal code"),
])
def test_a_malformed_answer_is_refused(data, expected):
    with pytest.raises(ProtocolError, match=expected):
        decode_answer(data)


def test_a_kept_catalog_that_no_longer_checks_out_is_not_used(tmp_path):
    path = tmp_path / "node.catalog"
    keep(path, signed(9, [*BUILTIN.entries.values(), NEW]))
    assert load_kept(path, frozenset({GATEWAY.public_key})).catalog.live(NEW.id) == NEW
    assert load_kept(path, frozenset({SigningKey.generate().public_key})).catalog is BUILTIN   # trust moved on
    path.write_bytes(path.read_bytes()[:-3])
    assert load_kept(path, frozenset({GATEWAY.public_key})).catalog is BUILTIN                  # damaged file


# --- the operator's catalog --------------------------------------------------------------------------------------

async def test_the_operator_adds_and_retires_entries_each_a_new_version(tmp_path):
    async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
        book = CatalogBook(database)
        start, _ = await book.current()
        assert start.live_ids() == BUILTIN.live_ids() and start.version == len(BUILTIN.entries)
        added = await book.add(NEW, 1_000)
        assert added == start.version + 1
        with pytest.raises(CatalogError, match="already in the catalog: ids are never reused"):
            await book.add(replace(NEW, sha256="0" * 64), 2_000)
        retired = await book.retire(NEW.id, 3_000)
        with pytest.raises(CatalogError, match="already retired"):
            await book.retire(NEW.id, 4_000)
        with pytest.raises(CatalogError, match="already retired"):
            await book.add(NEW, 5_000)
        with pytest.raises(CatalogError, match="not in the catalog"):
            await book.retire("no-such-model", 6_000)
        now, issued_ms = await book.current()
        assert now.version == retired == added + 1 and issued_ms == 3_000
        assert now.pin(NEW.id) is None and now.entries[NEW.id].retired_ms == 3_000 and NEW.id not in now.live_ids()
        assert [(c.version, c.action) for c in await book.changes(NEW.id)] == [(added, "add"), (retired, "retire")]

        published = GatewayCatalog(book, GATEWAY)
        assert await published.load() and not await published.load()        # nothing new: not signed again
        taken = SignedCatalog.from_envelope(published.published.document)
        assert taken.version == retired and taken.catalog().entries == now.entries
        assert isinstance(published.answer(AskCatalog(0).to_bytes()), CatalogDocument)
        assert published.answer(AskCatalog(retired).to_bytes()) == Unchanged(retired)
        refused = published.answer(frame({"t": "ask"}))
        assert isinstance(refused, CatalogRefused) and refused.code == "malformed"
    with sqlite3.connect(tmp_path / "gateway.sqlite") as connection:            # nothing was ever rewritten
        assert connection.execute("SELECT COUNT(*) FROM catalog_changes").fetchone()[0] == retired


def llorch(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llorch.gateway", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_the_models_commands_refuse_a_bad_entry_in_one_line_and_write_nothing(tmp_path):
    (tmp_path / "gateway.toml").write_text('[gateway]\nkey_file = "gw.key"\ndb_path = "gw.sqlite"\n')
    config = ("--config", "gateway.toml")
    base = ["gateway", "models", "add", *config, "--id", NEW.id, "--kind", "instruct", "--context-tokens", "8192",
            "--license", "Apache-2.0", "--chat-format", "chatml"]
    hub = f"{NEW.hub.repo}@{NEW.hub.revision}:{NEW.hub.filename}"
    for extra, expected in ((["--sha256", "abc", "--hub", hub], "--sha256 must be 64 hex digits"),
                            (["--sha256", NEW.sha256, "--hub", f"{NEW.hub.repo}@main:x.gguf"], "not a commit"),
                            (["--sha256", NEW.sha256], "needs --hub or --url"),
                            (["--sha256", NEW.sha256, "--url", "ftp://x/y.gguf"], "urls must be http")):
        refused = llorch(*base, *extra, cwd=tmp_path)
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    listed = json.loads(llorch("gateway", "models", "list", *config, "--json", cwd=tmp_path).stdout)
    assert [e["id"] for e in listed["entries"]] == BUILTIN.live_ids()

    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(entry_map(NEW)))
    assert llorch("gateway", "models", "add", *config, "--entry", "entry.json", cwd=tmp_path).returncode == 0
    shown = json.loads(llorch("gateway", "models", "show", NEW.id, *config, cwd=tmp_path).stdout)
    assert shown["entry"] == entry_map(NEW) and [h["action"] for h in shown["history"]] == ["add"]
    assert llorch("gateway", "models", "retire", NEW.id, *config, cwd=tmp_path).returncode == 0
    table = llorch("gateway", "models", "list", *config, cwd=tmp_path).stdout
    assert f"{NEW.id}\tretired" in table and f"{DEFAULT.id}\tlive" in table


# --- over libp2p -------------------------------------------------------------------------------------------------

async def test_over_libp2p_a_node_takes_only_its_trusted_gateways_catalog(tmp_path):
    """Two gateways answer /llorch/catalog/1, one the node trusts and one it does not (which offers a higher
    version): the node serves from the trusted one's, keeps it on disk, and says why it ignored the other."""
    stranger, node_key = SigningKey.generate(), SigningKey.generate()
    async with open_gateway_db(tmp_path / "trusted.sqlite") as trusted_db, \
            open_gateway_db(tmp_path / "stranger.sqlite") as stranger_db:
        trusted, untrusted = GatewayCatalog(CatalogBook(trusted_db), GATEWAY), \
            GatewayCatalog(CatalogBook(stranger_db), stranger)
        await CatalogBook(stranger_db).add(replace(NEW, id="sneaky"), 1)
        await CatalogBook(stranger_db).add(replace(NEW, id="sneakier"), 2)
        await trusted.load(), await untrusted.load()
        held = TrustedCatalog(frozenset({GATEWAY.public_key}))
        kept = tmp_path / "node.catalog"
        async with running_host(GATEWAY, LOOPBACK) as gateway_p2p, running_host(stranger, LOOPBACK) as stranger_p2p, \
                running_host(node_key, LOOPBACK) as node_p2p, trio.open_nursery() as nursery:
            gateway_p2p.host.set_stream_handler(TProtocol(CATALOG_PROTOCOL_ID), trusted.serve_catalog)
            stranger_p2p.host.set_stream_handler(TProtocol(CATALOG_PROTOCOL_ID), untrusted.serve_catalog)
            for peer in (gateway_p2p, stranger_p2p):
                with trio.fail_after(10):
                    await node_p2p.host.connect(info_from_p2p_addr(Multiaddr(f"{peer.addrs()[0]}/p2p/{peer.peer_id}")))
            nursery.start_soon(keep_catalog, node_p2p, (GATEWAY.peer_id, stranger.peer_id), held, kept, 0.2)
            with trio.fail_after(20):
                while held.catalog.version == 0 or stranger.peer_id not in held.failures:
                    await trio.sleep(0.05)
            assert held.signed_by == GATEWAY.peer_id and "sneaky" not in held.catalog.entries
            assert "not in node.trusted_gateways" in held.failures[stranger.peer_id]

            # The operator adds a model: the next question brings the new version.
            await CatalogBook(trusted_db).add(NEW, 3)
            await trusted.load()
            with trio.fail_after(20):
                while held.catalog.live(NEW.id) is None:
                    await held.changed.wait()
            nursery.cancel_scope.cancel()
        assert load_kept(kept, frozenset({GATEWAY.public_key})).catalog.live(NEW.id) == NEW


def test_models_list_with_a_config_shows_the_catalog_the_node_serves_from(tmp_path, monkeypatch, capsys):
    """`llorch models list --config node.toml`: the node's kept catalog when it is signed by a trusted gateway
    (with the models the operator added), the built-in one when it is not."""
    from argparse import Namespace

    from llorch.ledger.signing import write_key_file
    from llorch.node.cli import models_list

    write_key_file(tmp_path / "node.key", SigningKey.generate())
    keep(tmp_path / "node.catalog", signed(12, [*BUILTIN.entries.values(), NEW]))

    def listed(trusted: str) -> tuple[list[str], str]:
        (tmp_path / "node.toml").write_text(
            f'[node]\nkey_file = "node.key"\nledger_path = "node.sqlite"\nbootstrap = []\n'
            f'trusted_gateways = ["{trusted}"]\ncatalog_file = "node.catalog"\nmodel_cache_dir = "cache"\n')
        assert models_list(Namespace(config=tmp_path / "node.toml")) == 0
        out, err = capsys.readouterr()
        return [line.split("\t")[0] for line in out.splitlines()[1:]], err

    ids, said = listed(GATEWAY.peer_id)
    assert NEW.id in ids and "catalog version 12" in said
    ids, said = listed(SigningKey.generate().peer_id)
    assert NEW.id not in ids and "built in" in said
