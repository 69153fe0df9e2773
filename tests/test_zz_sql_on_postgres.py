"""Every SQL statement the gateway ran in this test session is valid on PostgreSQL too. The suite runs the gateway on
SQLite almost everywhere; PostgreSQL resolves functions and types strictly (`SUM(boolean)` does not exist there, so
`llorch gateway providers sla` once exited 2 on PostgreSQL while every SQLite test passed). Each recorded statement
(tests/sql_recorder.py; this file runs last, named so) is prepared on a PostgreSQL database with the gateway's
schema, which checks its syntax, names, types and functions without running it. A short in-process market run of
its own makes the check mean something when this file runs alone."""

from __future__ import annotations

import psycopg

from llorch.gateway.db import open_gateway_db
from llorch.gateway.storage import PostgresEngine
from tests import sql_recorder
from tests.inprocess import market

SQLITE_ONLY = ("PRAGMA ",)        # the branches that run only on SQLite (gateway/db.py table_columns)


def dollar_placeholders(sql: str) -> str:
    """``?`` → ``$1``, ``$2``, ... outside single-quoted strings (PREPARE's parameters)."""
    out, quoted, number = [], False, 0
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "?" and not quoted:
            number += 1
            out.append(f"${number}")
        else:
            out.append(char)
    return "".join(out)


async def test_every_gateway_statement_of_this_session_prepares_on_postgresql(postgres_cluster, tmp_path):
    async with market(tmp_path, {"a": {}, "b": {}}) as m:
        for seed in range(3):
            await m.complete("acme", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                      "seed": seed})
        await m.witness_all()
        await m.reconcile(post=True)
    statements = sorted(s for s in sql_recorder.STATEMENTS if not s.startswith(SQLITE_ONLY))
    assert len(statements) > 40, statements
    url = postgres_cluster.new_database()
    async with open_gateway_db(PostgresEngine(url)):
        pass                                                   # the gateway's schema, every migration
    failures = []
    with psycopg.connect(url, autocommit=True) as connection:
        for number, sql in enumerate(statements):
            try:
                connection.execute(f"PREPARE checked_{number} AS {dollar_placeholders(sql)}")
            except psycopg.errors.IndeterminateDatatype:
                continue                      # a bare parameter PostgreSQL cannot type without a value: not an error
            except psycopg.Error as exc:
                failures.append(f"{sql}\n    {str(exc).strip().splitlines()[0]}")
    print(f"\n{len(statements)} statements prepared on PostgreSQL")
    assert failures == [], "\n".join(failures)
