"""Test-only: records the text of every SQL statement a gateway database runs in this test process (on SQLite, as
nearly every test runs it), so tests/test_zz_sql_on_postgres.py can check each one on PostgreSQL. A database counts
as the gateway's when gateway/db.py ``upgrade`` ran on it (``open_gateway_db``)."""

from __future__ import annotations

import re

STATEMENTS: set[str] = set()
_LIST = re.compile(r"\bIN \(\?(?:\s*,\s*\?)*\)", re.IGNORECASE)    # IN (?, ?, ...) of any length: one


def record(sql: str) -> None:
    STATEMENTS.add(_LIST.sub("IN (?)", " ".join(sql.split())))


def install(monkeypatch) -> None:
    """Wrap the gateway's ``upgrade`` (to mark its databases) and the Database methods that run statements."""
    from llorch.gateway import db as gateway_db
    from llorch.ledger.sqlite import Database

    original_upgrade = gateway_db.upgrade

    async def upgrade(database):
        database._records_sql = True
        return await original_upgrade(database)

    monkeypatch.setattr(gateway_db, "upgrade", upgrade)
    for name in ("execute", "fetchone", "fetchall", "peek"):
        original = getattr(Database, name)

        def wrapped(self, sql, params=(), _original=original):
            if getattr(self, "_records_sql", False):
                record(sql)
            return _original(self, sql, params)

        monkeypatch.setattr(Database, name, wrapped)
    original_transaction = Database.transaction

    def transaction(self, statements):
        if getattr(self, "_records_sql", False):
            for statement in statements:
                record(statement[0])
        return original_transaction(self, statements)

    monkeypatch.setattr(Database, "transaction", transaction)
