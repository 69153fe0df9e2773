"""The per-day figures of the dashboards (gateway/books/usage.py) against a real gateway database: a day of refunds
nets negative and is charted with its sign, and the operator's per-day query reads an index, not every posting."""

from __future__ import annotations

import sqlite3

from llorch.gateway.api.pages import per_day_charts
from llorch.gateway.books.usage import DAY_MS, MARKET_DAYS_SQL, TENANT_DAYS_SQL, Market
from llorch.gateway.db import open_gateway_db


def plan(path, sql: str, params: tuple) -> str:
    with sqlite3.connect(path) as connection:
        return " | ".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + sql, params))


async def test_the_per_day_queries_read_an_index_not_every_posting(tmp_path):
    path = tmp_path / "gateway.sqlite"
    async with open_gateway_db(path):
        pass
    market = plan(path, MARKET_DAYS_SQL, (DAY_MS, DAY_MS, "platform", "platform", 0))
    assert "SCAN postings" not in market and "USING INDEX postings_posted" in market, market
    tenant = plan(path, TENANT_DAYS_SQL, (DAY_MS, DAY_MS, "tenant:a", "tenant:a", "tenant:a", 0))
    assert "SCAN postings" not in tenant, tenant


def test_a_day_of_refunds_is_charted_negative_not_zero():
    days = {0: Market(100, 80, 20), DAY_MS: Market(-40, -32, -8)}
    charts = per_day_charts(days, 0, 3, {"revenue": lambda d: d.revenue_minor, "fees": lambda d: d.fees_minor})
    assert [bar.value for bar in charts["revenue"]] == [100, -40, 0]
    assert [bar.value for bar in charts["fees"]] == [20, -8, 0]
