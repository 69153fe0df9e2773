"""The gateway's storage on both engines (gateway/storage.py): the same tests against SQLite and against a real
PostgreSQL cluster (tests/postgres.py; skipped, saying why, where PostgreSQL is not installed). Group commit and a
caller's own integrity error, the books' rules enforced by the database itself, the versioned migrations, and a
database at the previous schema version upgraded in place with its data intact."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from llorch.gateway import db as gateway_db
from llorch.gateway.storage import PostgresEngine, _placeholders, engine_for, postgres_ddl
from llorch.ledger import sqlite as sqlite_module
from llorch.ledger.sqlite import Engine, IntegrityError, open_database

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path):
    if request.param == "sqlite":
        return Engine(tmp_path / "gateway.sqlite")
    return PostgresEngine(request.getfixturevalue("postgres_cluster").new_database())


async def test_concurrent_transactions_share_commits_and_one_callers_error_stays_its_own(engine):
    async with open_database(engine) as database:
        await database.executescript("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, v TEXT NOT NULL)")
        outcomes: dict[int, str] = {}

        async def write(n: int) -> None:
            rows = [(n, "first"), (7, "clash")] if n == 5 else [(n, "ok")]
            try:
                await database.transaction([("INSERT INTO t (id, v) VALUES (?, ?)", rows)])
                outcomes[n] = "written"
            except IntegrityError:
                outcomes[n] = "refused"

        await write(7)                                  # there before the clash
        async with trio.open_nursery() as nursery:
            for n in range(20):
                if n != 7:
                    nursery.start_soon(write, n)
        assert outcomes.pop(5) == "refused" and set(outcomes.values()) == {"written"}
        assert await database.fetchall("SELECT id FROM t ORDER BY id") == [(n,) for n in range(20) if n != 5]
        assert await database.peek("SELECT v FROM t WHERE id = ?", (7,)) == ("ok",)


async def test_the_books_rules_hold_in_the_database_itself(engine):
    """Postings are never edited or deleted and keep the running balances; a settled ticket is never settled
    again: triggers on both engines, raising the same IntegrityError."""
    async with gateway_db.open_gateway_db(engine) as database:
        posting = ("INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, "
                   "provider_id, model_id, tokens_in, tokens_out, margin_bp, posted_ms) "
                   "VALUES (?, ?, ?, ?, ?, 'EUR', '2026-11', 'alice', 'p1', 'm', 10, 20, 4000, ?)")
        await database.transaction([(posting, [("req-1", "payout", "tenant:alice", "provider:p1", 300, 1),
                                               ("req-1", "fee", "tenant:alice", "platform:fees", 200, 2)])])
        balances = dict(await database.fetchall(
            "SELECT account, credits - debits FROM account_balances ORDER BY account"))
        assert balances == {"platform:fees": 200, "provider:p1": 300, "tenant:alice": -500}
        for sql in ("UPDATE postings SET amount = 0", "DELETE FROM postings"):
            with pytest.raises(IntegrityError, match="never"):
                await database.transaction([(sql, [()])])
        assert (await database.fetchone("SELECT SUM(amount) FROM postings"))[0] == 500     # an int, not Decimal
        await database.transaction([(
            "INSERT INTO tickets (ticket_sha256, request_id, provider_key, issued_ms, ticket, state) "
            "VALUES (?, 'req-1', ?, 1, ?, 'settled')", [(bytes(32), bytes(32), b"envelope")])])
        with pytest.raises(IntegrityError, match="already settled"):
            await database.transaction([("UPDATE tickets SET state = 'issued'", [()])])
        # a repeated leg is ignored, as settlement relies on (ON CONFLICT DO NOTHING on both engines)
        await database.transaction([(posting + " ON CONFLICT DO NOTHING",
                                     [("req-1", "payout", "tenant:alice", "provider:p1", 999, 3)])])
        assert (await database.fetchone("SELECT COUNT(*), SUM(amount) FROM postings")) == (2, 500)


async def test_migrations_are_versioned_and_a_previous_version_upgrades_in_place(engine):
    previous = gateway_db.MIGRATIONS[-2]
    async with open_database(engine) as database:                 # a database made by the previous gateway
        await gateway_db.applied_versions(database)
        for migration in gateway_db.MIGRATIONS[:-1]:
            await migration.apply(database)
            await database.transaction([("INSERT INTO schema_version (version, applied_ms) VALUES (?, 1)",
                                         [(migration.version,)])])
        await database.transaction([(
            "INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, provider_id, "
            "model_id, tokens_in, tokens_out, margin_bp, posted_ms) VALUES ('req-1', 'payout', 'tenant:alice', "
            "'provider:p1', 300, 'EUR', '2026-11', 'alice', 'p1', 'm', 1, 2, 4000, 5)", [()])])
        assert set(await gateway_db.applied_versions(database)) == {m.version for m in gateway_db.MIGRATIONS[:-1]}

    async with gateway_db.open_gateway_db(engine, migrate=False) as database:     # `db status`: nothing applied
        assert max(await gateway_db.applied_versions(database)) == previous.version
        done = await gateway_db.upgrade(database)                                 # `db upgrade`
        assert [m.version for m in done] == [gateway_db.SCHEMA_VERSION]
        assert await gateway_db.upgrade(database) == []                           # idempotent
        assert await database.fetchall("SELECT request_id, amount FROM postings") == [("req-1", 300)]
        assert await database.fetchall("SELECT account, credits - debits FROM account_balances ORDER BY 1") == [
            ("provider:p1", 300), ("tenant:alice", -300)]
        await database.transaction([("INSERT INTO witness_leases (provider_key, holder, expires_ms) VALUES (?, ?, ?)",
                                     [(bytes(32), "12D3KooWreplica", 10)])])


async def test_a_database_newer_than_the_gateway_is_refused(engine):
    from llorch.ledger.errors import StoreError
    async with gateway_db.open_gateway_db(engine) as database:
        await database.transaction([("INSERT INTO schema_version (version, applied_ms) VALUES (?, 1)",
                                     [(gateway_db.SCHEMA_VERSION + 1,)])])
    with pytest.raises(StoreError, match="newer than this gateway"):
        async with gateway_db.open_gateway_db(engine):
            pass


def test_postgresql_spellings():
    assert _placeholders("SELECT a FROM t WHERE b = ? AND c LIKE 'x:%' AND d = '?'") == \
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x:%%' AND d = '?'"
    ddl = postgres_ddl("CREATE TABLE t (id INTEGER PRIMARY KEY, k BLOB NOT NULL, n INTEGER) WITHOUT ROWID;\n"
                       "CREATE TRIGGER IF NOT EXISTS x BEFORE DELETE ON t BEGIN SELECT RAISE(ABORT, 'no'); END;")
    assert ddl.strip() == ("CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, k BYTEA NOT NULL, "
                           "n BIGINT);")
    with pytest.raises(Exception, match="gateway.database must be"):
        engine_for("mysql://x", None)


async def test_a_lost_postgresql_connection_fails_one_statement_and_the_next_reconnects(postgres_cluster):
    """A PostgreSQL restart or failover drops the gateway's connection: the statement that meets the loss fails with
    a StoreError (its caller is told; nothing is retried behind it), the next one runs on a new connection."""
    import psycopg
    from llorch.ledger.errors import StoreError

    url = postgres_cluster.new_database()
    async with open_database(PostgresEngine(url)) as database:
        await database.executescript("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY)")
        (backend,) = await database.fetchone("SELECT pg_backend_pid()")
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(StoreError):
            await database.transaction([("INSERT INTO t (id) VALUES (?)", [(1,)])])
        await database.transaction([("INSERT INTO t (id) VALUES (?)", [(2,)])])
        assert await database.fetchall("SELECT id FROM t") == [(2,)]
        assert (await database.fetchone("SELECT pg_backend_pid()"))[0] != backend


class Ticker:
    """The longest gap between the wake-ups of a task that sleeps 1 ms at a time: how long trio's thread was held."""

    def __init__(self) -> None:
        self.longest_s = 0.0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.001)
            now = time.perf_counter()
            self.longest_s, last = max(self.longest_s, now - last), now


async def held_while(database, rows: int) -> float:
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await trio.sleep(0.01)
        await database.transaction([("INSERT INTO t (n) VALUES (?)", [(n,) for n in range(rows)])])
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return ticker.longest_s


async def test_sqlite_commits_inline_while_quick_and_in_threads_once_the_disk_is_slow(tmp_path, monkeypatch, caplog):
    """Small group commits run on trio's thread (cheaper than two thread hops); a disk that stalls a commit
    (60 ms here) sends them to worker threads, so it holds trio's thread once, not on every request; large groups
    never run inline."""
    caplog.set_level(logging.INFO, "llorch.store")
    async with open_database(tmp_path / "t.sqlite") as database:
        await database.execute("CREATE TABLE t (n INTEGER)")
        await held_while(database, 1)                                   # quick: inline
        commit = database._commit_group

        def stalled_disk(batch) -> None:
            time.sleep(0.06)
            commit(batch)

        monkeypatch.setattr(database, "_commit_group", stalled_disk)
        assert await held_while(database, 1) >= 0.06                    # inline once: it held the thread
        assert "run in worker threads" in caplog.text
        assert await held_while(database, 1) < 0.03                     # then in a worker thread
        assert (await database.fetchone("SELECT COUNT(*) FROM t"))[0] == 3
    async with open_database(tmp_path / "u.sqlite") as database:
        await database.execute("CREATE TABLE t (n INTEGER)")
        commit = database._commit_group
        monkeypatch.setattr(database, "_commit_group", lambda batch: (time.sleep(0.06), commit(batch)))
        assert await held_while(database, sqlite_module.INLINE_COMMIT_ROWS_MAX + 1) < 0.03   # a large group: a thread
