"""The dashboards in headless Chromium against one live local network that has served real llama.cpp requests:
the customer page, the operator console and the provider dashboard, each checked against the books, the CLI, the
API and the provider's ledger, with a screenshot and its load time. The network is shared by the module (one
gateway, one llama.cpp node, two echo nodes); browser tests skip, saying why, without Chromium."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.gateway.market.tenants import format_amount
from llorch.ledger.objects import Receipt
from tests.browser import (bar_values, browser, downloads, screenshots, sign_in, text_of,  # noqa: F401 (fixtures)
                           timed_get)
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e

HOSTILE = "<script>document.title='owned'</script>"     # a provider-controlled string (its region)
LOAD_TIMES_MS: dict[str, float] = {}


@pytest.fixture(scope="module")
def market(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("dashboards"))
    try:
        net.start_gateway()
        net.peers = {"lab": net.start_node("lab", threads=2, extra=f'region = "{HOSTILE}"\n')["peer_id"]}
        net.peers["pending"] = net.start_node("pending", extra='engine = "echo"\n', approve=False)["peer_id"]
        net.peers["dear"] = net.start_node("dear", price_in=900_000, price_out=900_000,
                                           extra='engine = "echo"\n')["peer_id"]
        net.wait_for_providers(2)
        net.keys = {name: net.cli("gateway", "tenants", "add", name, "--config", "gateway.toml",
                                  *extra).strip() for name, extra in (("alice", ["--budget", "5"]), ("bob", []))}
        net.request_ids = {name: [] for name in net.keys}
        for name, key in net.keys.items():
            client = openai.OpenAI(base_url=net.base_url, api_key=key, max_retries=0, timeout=120)
            for seed in range(2):
                reply = client.chat.completions.create(model=MODEL_ID, seed=seed, max_tokens=6,
                                                       messages=[{"role": "user", "content": f"Hi {seed}"}])
                net.request_ids[name].append(reply.model_extra["llorch"]["request_id"])
        yield net
    finally:
        net.stop()
        if LOAD_TIMES_MS:
            print("page load times (ms): " + ", ".join(f"{page} {ms:.0f}" for page, ms in LOAD_TIMES_MS.items()))


def ledger_receipts(market, node: str) -> dict[str, Receipt]:
    with sqlite3.connect(market.workdir / f"{node}.ledger.sqlite") as connection:
        return {request_id: Receipt.from_envelope(entry)
                for request_id, entry in connection.execute("SELECT request_id, entry FROM entries")}


def minor(element) -> int:
    return int(element.get_attribute("data-minor"))


# -- the customer page --------------------------------------------------------------------------------------------
def test_customer_page_refuses_without_signing_in(market, browser):
    browser.delete_all_cookies()
    browser.get(market.http_url + "/dashboard")
    assert browser.current_url.endswith("/dashboard/sign-in")          # redirected to sign in
    assert httpx.get(market.http_url + f"/dashboard/receipts/{market.request_ids['alice'][0]}").status_code == 401
    sign_in(browser, market.http_url + "/dashboard/sign-in", "api_key", "sk-llorch-not-a-key")
    assert "incorrect API key" in text_of(browser, "error")


def test_customer_page_shows_the_numbers_of_the_books_the_cli_and_the_api(market, browser, screenshots, downloads):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/dashboard/sign-in", "api_key", market.keys["alice"])
    LOAD_TIMES_MS["customer"] = timed_get(browser, market.http_url + "/dashboard")
    assert text_of(browser, "tenant") == "alice"
    listed = {t["name"]: t for t in json.loads(market.cli("gateway", "tenants", "list", "--config", "gateway.toml"))}
    spent = minor(browser.find_element(By.ID, "spent"))
    assert spent > 0 and format_amount(spent) == listed["alice"]["spent"]                       # the CLI
    assert minor(browser.find_element(By.ID, "left")) == 5_000_000 - spent
    usage = httpx.get(market.base_url.removesuffix("/v1") + "/v2/billing/usage",
                      headers={"authorization": f"Bearer {market.keys['alice']}"}).json()      # the API
    month = {e.get_attribute("data-currency"): minor(e) for e in browser.find_elements(By.CSS_SELECTOR, ".month-total")}
    assert month == usage["totals_minor"] == {"EUR": spent}
    assert bar_values(browser, "spend-per-day")[-1] == spent                                   # all of it today
    assert bar_values(browser, "requests-per-day")[-1] == 2
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.receipt")
    shown = {row.get_attribute("data-request-id"): minor(row) for row in rows}
    assert set(shown) == set(market.request_ids["alice"])           # its own receipts, never bob's
    assert sum(shown.values()) == spent
    receipts = ledger_receipts(market, "lab")                         # the provider's signed ledger
    for row in rows:
        request_id = row.get_attribute("data-request-id")
        cells = row.find_elements(By.TAG_NAME, "td")
        assert (int(cells[4].text), int(cells[5].text)) == (receipts[request_id].tokens_in,
                                                              receipts[request_id].tokens_out)
    screenshots(browser, "customer-page")
    first = market.request_ids["alice"][0]
    browser.find_element(By.CSS_SELECTOR, f"tr[data-request-id='{first}'] a.proof").click()
    saved = downloads / f"{first}.json"
    deadline = time.monotonic() + 10
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    api = httpx.get(market.http_url + f"/v2/receipts/{first}",
                    headers={"authorization": f"Bearer {market.keys['alice']}"}).json()
    assert json.loads(saved.read_text()) == api and api["request_id"] == first      # the same proof document


def test_a_tenant_never_sees_another_tenants_receipts(market, browser):
    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/dashboard/sign-in", "api_key", market.keys["alice"])
    cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
    for foreign in market.request_ids["bob"]:
        assert foreign not in browser.page_source
        answer = httpx.get(market.http_url + f"/dashboard/receipts/{foreign}", cookies=cookie)
        assert answer.status_code == 404 and foreign not in answer.text.replace(f"no receipt {foreign}", "")
    mine = httpx.get(market.http_url + f"/dashboard/receipts/{market.request_ids['alice'][0]}", cookies=cookie)
    assert mine.status_code == 200 and mine.json()["request_id"] == market.request_ids["alice"][0]
