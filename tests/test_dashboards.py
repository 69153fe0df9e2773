"""The dashboards in headless Chromium against one live local network that has served real llama.cpp requests:
the customer page, the operator console and the provider dashboard, each checked against the books, the CLI, the
API and the provider's ledger, with a screenshot and its load time, and every page at a phone's width and a
desktop's. The network is shared by the module (one gateway, one llama.cpp node that serves every request until the
operator suspends it, and one echo node awaiting approval); two tenants and the bootstrap key's tenant, whose only
request the customer hung up on. Browser tests skip, saying why, without Chromium."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from decimal import Decimal

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.gateway.market.tenants import format_amount
from llorch.ledger.objects import Receipt
from tests.browser import (WIDTHS, bar_values, browser, chart_ticks, click_and_wait,  # noqa: F401 (fixtures)
                           downloads, layout_problems, reset_viewport, screenshots, set_viewport, sign_in, text_of,
                           timed_get)
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e

HOSTILE = "<script>document.title='owned'</script>"     # a provider-controlled string (its region)
BOOTSTRAP = "bootstrap"                                  # the bootstrap key's tenant (gateway.tenant's default)
LOAD_TIMES_MS: dict[str, float] = {}


@pytest.fixture(scope="module")
def market(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("dashboards"))
    try:
        net.start_gateway()
        net.peers = {"lab": net.start_node("lab", threads=2, extra=f'region = "{HOSTILE}"\n')["peer_id"]}
        net.peers["pending"] = net.start_node("pending", extra='engine = "echo"\n', approve=False)["peer_id"]
        net.wait_for_providers(1)
        net.keys = {name: net.cli("gateway", "tenants", "add", name, "--config", "gateway.toml",
                                  *extra).strip() for name, extra in (("alice", ["--budget", "5"]), ("bob", []))}
        net.request_ids = {name: [] for name in net.keys}
        for name, key in net.keys.items():
            client = openai.OpenAI(base_url=net.base_url, api_key=key, max_retries=0, timeout=120)
            for seed in range(2):
                reply = client.chat.completions.create(model=MODEL_ID, seed=seed, max_tokens=6,
                                                       messages=[{"role": "user", "content": f"Hi {seed}"}])
                net.request_ids[name].append(reply.model_extra["llorch"]["request_id"])
        net.request_ids[BOOTSTRAP] = [hang_up(net, net.api_key)]
        yield net
    finally:
        net.stop()
        if LOAD_TIMES_MS:
            print("page load times (ms): " + ", ".join(f"{page} {ms:.0f}" for page, ms in LOAD_TIMES_MS.items()))


def hang_up(net, api_key: str, received_max: int = 2) -> str:
    """Stream a long answer and go away after ``received_max`` pieces of it; return the request id once the
    gateway has billed it (the customer pays for what was relayed before it left). The key's first request."""
    request_id, received = None, 0
    with httpx.stream("POST", f"{net.base_url}/chat/completions", timeout=120,
                      headers={"authorization": f"Bearer {api_key}"},
                      json={"model": MODEL_ID, "seed": 3, "max_tokens": 400, "stream": True,
                            "messages": [{"role": "user", "content": "Tell me a long story."}]}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                request_id = chunk["id"]
                received += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
                if received == received_max:
                    break
    assert request_id is not None
    deadline = time.monotonic() + 30
    while not httpx.get(net.http_url + "/v2/billing/usage",                   # the API: SQLite or PostgreSQL
                        headers={"authorization": f"Bearer {api_key}"}).json()["totals_minor"]:
        assert time.monotonic() < deadline, f"the request hung up on ({request_id}) was never billed"
        time.sleep(0.2)
    return request_id


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
        tokens = [int(row.find_element(By.CSS_SELECTOR, f"td.{cell}").text) for cell in ("tokens-in", "tokens-out")]
        assert tokens == [receipts[request_id].tokens_in, receipts[request_id].tokens_out]
    assert all(row.get_attribute("data-outcome") == "complete" for row in rows)
    peer = market.gateway.state()["peer_id"]                          # what a receipt's proof must be witnessed by
    assert text_of(browser, "gateway-peer-id") == peer
    command = browser.find_element(By.ID, "verify-command")
    assert command.text == f"llorch ledger verify-receipt FILE --witness {peer}"
    assert browser.execute_script("return getComputedStyle(arguments[0]).userSelect", command) == "all"   # one click
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


def test_a_request_the_customer_hung_up_on_is_marked_cancelled_on_its_receipt(market, browser):
    """The bootstrap key's tenant streamed an answer and went away: it paid for what was relayed, and its receipts
    say the request was cancelled, not complete."""
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/dashboard/sign-in", "api_key", market.api_key)
    assert text_of(browser, "tenant") == BOOTSTRAP
    cancelled, = market.request_ids[BOOTSTRAP]
    row = browser.find_element(By.CSS_SELECTOR, f"tr.receipt[data-request-id='{cancelled}']")
    assert row.get_attribute("data-outcome") == "cancelled"
    assert "cancelled" in row.find_element(By.CSS_SELECTOR, "td.outcome").text
    assert ledger_receipts(market, "lab")[cancelled].finish_reason == "cancelled"      # the provider's word too
    assert minor(row) == minor(browser.find_element(By.ID, "spent")) > 0   # charged what was relayed before


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


# -- the operator console -----------------------------------------------------------------------------------------
def provider_status(browser, peer: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"tr[data-provider-id='{peer}']").get_attribute("data-status")


def operate(browser, peer: str, action: str) -> None:
    """Click the action on the provider's row, then confirm it."""
    from selenium.webdriver.common.by import By

    click_and_wait(browser, browser.find_element(By.CSS_SELECTOR, f"tr[data-provider-id='{peer}'] a.action-{action}"))
    assert peer in text_of(browser, "confirm-what")
    # Wait for the page that answers the form, so the change is made before the test goes on (a request sent at once
    # could still be placed on a provider the form was about to suspend).
    click_and_wait(browser, browser.find_element(By.ID, "confirm"))


@pytest.fixture(scope="module")
def operator_token(market):
    return market.cli("gateway", "operator-token", "--config", "gateway.toml").strip()


def test_operator_console_refuses_without_the_operator_token(market, browser, operator_token):
    browser.delete_all_cookies()
    browser.get(market.http_url + "/operator")
    assert browser.current_url.endswith("/operator/sign-in")
    for credential in (market.keys["alice"], market.api_key, operator_token + "x"):   # tenant keys are not it
        sign_in(browser, market.http_url + "/operator/sign-in", "token", credential)
        assert "incorrect operator token" in text_of(browser, "error")
    refused = httpx.post(market.http_url + f"/operator/providers/{market.peers['pending']}/approve",
                         data={"csrf": "x"}, follow_redirects=False)
    assert refused.status_code == 401
    assert provider_record(market, "pending")["status"] == "pending"


def provider_record(market, name: str) -> dict:
    listed = json.loads(market.cli("gateway", "providers", "list", "--config", "gateway.toml"))
    return next(record for record in listed if record["provider_id"] == market.peers[name])


def test_operator_console_shows_the_numbers_of_the_books_and_the_cli(market, browser, screenshots, operator_token):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/operator/sign-in", "token", operator_token)
    LOAD_TIMES_MS["operator"] = timed_get(browser, market.http_url + "/operator")
    listed = {t["name"]: t for t in json.loads(market.cli("gateway", "tenants", "list", "--config", "gateway.toml"))}
    rows = {row.get_attribute("data-tenant"): int(row.get_attribute("data-spent-minor"))
            for row in browser.find_elements(By.CSS_SELECTOR, "tr.tenant")}
    assert set(rows) == set(listed) | {BOOTSTRAP}                    # the bootstrap key's tenant is one of them
    assert all(format_amount(rows[name]) == listed[name]["spent"] for name in listed)
    bootstrap = json.loads(market.cli("billing", "statement", "--tenant", BOOTSTRAP, "--config", "gateway.toml"))
    assert rows[BOOTSTRAP] == bootstrap["totals_minor"]["EUR"] > 0
    period = time.strftime("%Y-%m", time.gmtime())
    platform = json.loads(market.cli("billing", "statement", "--platform", "--period", period,
                                     "--config", "gateway.toml"))
    fees = {e.get_attribute("data-currency"): minor(e) for e in browser.find_elements(By.CSS_SELECTOR, ".fees-month")}
    assert fees == platform["totals_minor"] and fees["EUR"] > 0
    payouts = sum(json.loads(market.cli("billing", "statement", "--provider", peer, "--period", period, "--config",
                                        "gateway.toml"))["totals_minor"].get("EUR", 0) for peer in market.peers.values())
    revenue = sum(rows.values())
    assert bar_values(browser, "revenue-per-day")[-1] == revenue == payouts + fees["EUR"]
    assert bar_values(browser, "payouts-per-day")[-1] == payouts
    assert bar_values(browser, "fees-per-day")[-1] == fees["EUR"]
    receipts = ledger_receipts(market, "lab")                        # the payouts are what the receipts claim,
    hung_up = rows[BOOTSTRAP] - sum(line["amount_minor"] for line in platform["lines"] if line["tenant"] == BOOTSTRAP)
    assert payouts == sum(receipts[r].amount for name in ("alice", "bob") for r in market.request_ids[name]) + hung_up
    assert 0 < hung_up <= receipts[market.request_ids[BOOTSTRAP][0]].amount   # but for what was not relayed
    assert provider_status(browser, market.peers["pending"]) == "pending"
    assert provider_status(browser, market.peers["lab"]) == "approved"
    assert text_of(browser, "finding-count") == "0" and text_of(browser, "fork-count") == "0"
    screenshots(browser, "operator-console")


def provider_warnings(browser, market, name: str) -> list[str]:
    from selenium.webdriver.common.by import By

    browser.get(admin_url(market, name) + "/")
    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, "li.warning")]


def test_operator_approves_and_suspends_through_the_browser_and_placement_sees_it(market, browser, operator_token,
                                                                                 screenshots):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 30            # the node asked once it was connected, and again after registering
    while not any("(pending)" in w for w in provider_warnings(browser, market, "pending")) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    warned = [w for w in provider_warnings(browser, market, "pending") if w.startswith("not approved by gateway")]
    assert warned and warned[0].startswith(f"not approved by gateway {market.gateway.state()['peer_id']} (pending)")
    assert f"llorch gateway providers approve {market.peers['pending']}" in warned[0]
    listing = browser.find_element(By.CSS_SELECTOR, "td.listing")
    assert listing.get_attribute("data-status") == "pending" and "geo DE certified" in listing.text
    screenshots(browser, "provider-dashboard-pending")
    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/operator/sign-in", "token", operator_token)
    cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
    forged = httpx.post(market.http_url + f"/operator/providers/{market.peers['pending']}/approve",
                        data={"csrf": "0" * 64}, cookies=cookie, follow_redirects=False)
    assert forged.status_code == 400 and "CSRF" in forged.text
    assert provider_record(market, "pending")["status"] == "pending"          # a forged form changed nothing
    operate(browser, market.peers["pending"], "approve")
    assert provider_status(browser, market.peers["pending"]) == "approved"
    deadline = time.monotonic() + 30            # the node's next question (every 10 s while pending) hears it
    while any(w.startswith("not approved") for w in provider_warnings(browser, market, "pending")) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [w for w in provider_warnings(browser, market, "pending") if w.startswith("not approved")]
    assert browser.find_element(By.CSS_SELECTOR, "td.listing").get_attribute("data-status") == "approved"
    browser.get(market.http_url + "/operator")
    operate(browser, market.peers["lab"], "suspend")
    assert provider_status(browser, market.peers["lab"]) == "suspended"
    assert [provider_record(market, n)["status"] for n in ("pending", "lab")] == ["approved", "suspended"]
    client = openai.OpenAI(base_url=market.base_url, api_key=market.keys["bob"], max_retries=0, timeout=60)
    deadline, served = time.monotonic() + 20, None
    while served != market.peers["pending"] and time.monotonic() < deadline:   # its next attestation counts
        try:
            served = client.chat.completions.with_raw_response.create(
                model=MODEL_ID, max_tokens=4, messages=[{"role": "user", "content": "hi"}]).headers["x-llorch-provider"]
            assert served == market.peers["pending"], "placed on a suspended provider"
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
            time.sleep(0.5)
    assert served == market.peers["pending"]
    operate(browser, market.peers["pending"], "suspend")
    with pytest.raises(openai.APIStatusError) as caught:              # nobody left to place on
        client.chat.completions.create(model=MODEL_ID, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    operate(browser, market.peers["lab"], "approve")                  # as it was, for the tests after this one


# -- the provider dashboard ---------------------------------------------------------------------------------------
def admin_url(market, name: str) -> str:
    return next(node for node in market.nodes if node.name == name).state()["admin_url"]


def test_provider_dashboard_shows_the_numbers_of_its_own_ledger(market, browser, screenshots):
    from selenium.webdriver.common.by import By

    status = json.loads(market.cli("node", "status", "--config", "lab.toml", "--json"))        # the CLI
    LOAD_TIMES_MS["provider"] = timed_get(browser, admin_url(market, "lab") + "/")
    receipts = ledger_receipts(market, "lab")
    midnight = int(time.time() * 1000) // 86_400_000 * 86_400_000
    today = [r for r in receipts.values() if r.finished_ms >= midnight]
    earned = minor(browser.find_element(By.ID, "earned-today"))
    assert earned == status["today"]["earned_minor"] == sum(r.amount for r in today) > 0
    assert bar_values(browser, "earned-per-day")[-1] == earned
    assert sum(bar_values(browser, "requests-per-hour")) == len(receipts) == int(text_of(browser, "entries"))
    assert sum(bar_values(browser, "tokens-per-hour")) == sum(r.tokens_in + r.tokens_out for r in receipts.values())
    rows = {row.get_attribute("data-request-id"): minor(row)
            for row in browser.find_elements(By.CSS_SELECTOR, "tr.receipt")}
    assert rows == {request_id: r.amount for request_id, r in receipts.items()}
    assert text_of(browser, "class").startswith("dc1-")
    assert "connected" in browser.find_element(By.CSS_SELECTOR, "td.gateway").text
    screenshots(browser, "provider-dashboard")


def test_a_provider_controlled_script_is_escaped_on_every_page_that_shows_it(market, browser, operator_token):
    """The lab node's region is ``<script>...``: the operator console and the provider dashboard show it as text.
    The control first: the same page rendered without escaping runs the script (so this test can fail)."""
    from jinja2 import Environment, FileSystemLoader
    from selenium.webdriver.common.by import By

    from llorch.node import dashboard

    naive = Environment(loader=FileSystemLoader([str(dashboard.TEMPLATES), str(dashboard.TEMPLATES.parent / "web" /
                                                                               "templates")]), autoescape=False)
    naive.filters.update(environment_filters())
    naive.globals.update(bar_chart=lambda *a, **k: "")
    browser.get(admin_url(market, "lab") + "/")
    page = browser.page_source
    assert HOSTILE not in page and "&lt;script&gt;document.title" in page
    unescaped = market.workdir / "naive.html"
    unescaped.write_text(naive.get_template("provider.html").render(**naive_context(market)))
    browser.get(unescaped.as_uri())
    assert browser.title == "owned"                                  # injectable without escaping
    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/operator/sign-in", "token", operator_token)
    for url in (admin_url(market, "lab") + "/", market.http_url + "/operator"):
        browser.get(url)
        assert browser.title != "owned"
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".region")]
        assert HOSTILE in shown, f"{url} does not show the region as text: {shown}"


def environment_filters() -> dict:
    from llorch.node.web.render import environment

    return environment().filters


def naive_context(market) -> dict:
    """The dashboard's context for the lab node, as the node builds it."""
    from llorch.node.cli import load_node_config
    from llorch.node.dashboard import History, page_context

    status = json.loads(market.cli("node", "status", "--config", "lab.toml", "--json"))
    config = load_node_config(market.workdir / "lab.toml")
    return page_context(config, status, History(), int(time.time() * 1000))


def test_provider_dashboard_answers_only_on_loopback(market):
    import socket

    url = admin_url(market, "lab")
    port = int(url.rsplit(":", 1)[1])
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))                     # no packet is sent: it only picks the outbound address
        address = probe.getsockname()[0]
    except OSError:
        address = None
    finally:
        probe.close()
    if address is None or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to try the dashboard on")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}:{port}/", timeout=5)
    assert httpx.get(url + "/", timeout=10).status_code == 200
    rebound = httpx.get(url + "/", headers={"host": f"attacker.example:{port}"}, timeout=10)     # DNS rebinding
    assert rebound.status_code == 421 and "llorch" not in rebound.text.replace("127.0.0.1", "")
    assert httpx.get(url + "/status", headers={"host": "attacker.example"}, timeout=10).status_code == 421


# -- every page at a phone's width and a desktop's ------------------------------------------------------------------
MONEY_TICK = re.compile(r"-?\d{1,3}(,\d{3})*\.\d{2,6} EUR")       # a person's amount: EUR with 2-6 decimals
COUNT_TICK = re.compile(r"-?\d{1,3}(,\d{3})*")
DAY_TICK = re.compile(r"\d{2} [A-Z][a-z]{2}")                     # "14 Mar"
HOUR_TICK = re.compile(r"\d{2}:00")
CHARTS = {  # page → chart element id → (the y axis's values, the x axis's labels)
    "customer": {"spend-per-day": (MONEY_TICK, DAY_TICK), "requests-per-day": (COUNT_TICK, DAY_TICK),
                 "tokens-per-day": (COUNT_TICK, DAY_TICK)},
    "operator": {"revenue-per-day": (MONEY_TICK, DAY_TICK), "payouts-per-day": (MONEY_TICK, DAY_TICK),
                 "fees-per-day": (MONEY_TICK, DAY_TICK)},
    "provider": {"requests-per-hour": (COUNT_TICK, HOUR_TICK), "tokens-per-hour": (COUNT_TICK, HOUR_TICK),
                 "earned-per-day": (MONEY_TICK, DAY_TICK)},
}


def pages(market) -> dict[str, str]:
    """Every kind of page, by name → its URL (the customer and the operator signed in)."""
    return {"customer sign-in": market.http_url + "/dashboard/sign-in",
            "operator sign-in": market.http_url + "/operator/sign-in",
            "refused": market.http_url + "/dashboard/receipts/no-such-request",
            "customer": market.http_url + "/dashboard",
            "operator": market.http_url + "/operator",
            "confirm": market.http_url + f"/operator/providers/{market.peers['lab']}/suspend",
            "provider": admin_url(market, "lab") + "/"}


@pytest.fixture
def signed_in(market, browser, operator_token):
    """A browser signed in to the operator console and, as ``signed_in(key)``, to the customer page; its viewport
    back to the window's after the test."""
    browser.delete_all_cookies()
    sign_in(browser, market.http_url + "/operator/sign-in", "token", operator_token)
    yield lambda key: sign_in(browser, market.http_url + "/dashboard/sign-in", "api_key", key)
    reset_viewport(browser)


@pytest.mark.parametrize("width, height", WIDTHS)
def test_every_page_fits_the_window_with_readable_text(market, browser, signed_in, screenshots, width, height):
    """No page scrolls sideways at a phone's width (a wide table scrolls inside its card), no text (a chart's
    labels included) renders under 10 px, and amounts are read in the currency, never in micro-units."""
    urls = pages(market)
    for customer, key, shown in ((BOOTSTRAP, market.api_key, list(urls)),     # with a receipt hung up on
                                 ("alice", market.keys["alice"], ["customer"])):
        reset_viewport(browser)
        signed_in(key)
        set_viewport(browser, width, height)
        for page, url in ((page, urls[page]) for page in shown):
            browser.get(url)
            assert browser.execute_script("return window.innerWidth") == width
            assert layout_problems(browser) == [], f"{page} page ({customer}) at {width} px"
            source = browser.page_source.lower()
            assert "micro-" not in source and "minor units" not in source, f"{page} page ({customer})"
            if customer == BOOTSTRAP:
                screenshots(browser, f"{page.replace(' ', '-')}-{width}px", whole=True)


def test_every_chart_has_values_on_its_y_axis_and_dates_along_its_x_axis(market, browser, signed_in):
    """A few values up the y axis, in the chart's unit (EUR with 2-6 decimals for money), the top one above the
    largest bar; several dates (or hours) along the x axis, each the label of a bar under it, the last one today."""
    from selenium.webdriver.common.by import By

    signed_in(market.keys["alice"])
    urls = pages(market)
    for page, charts in CHARTS.items():
        browser.get(urls[page])
        for chart, (y_format, x_format) in charts.items():
            y_ticks, x_ticks = chart_ticks(browser, chart)
            assert len(y_ticks) >= 2 and all(y_format.fullmatch(tick) for tick in y_ticks), (page, chart, y_ticks)
            values = [Decimal(tick.removesuffix(" EUR").replace(",", "")) for tick in y_ticks]
            assert values == sorted(values) and 0 in values, (chart, y_ticks)                # bottom to top
            per_unit = 1_000_000 if y_format is MONEY_TICK else 1
            assert max(values) * per_unit >= max(bar_values(browser, chart)), (chart, y_ticks)
            labels = [bar.get_attribute("data-label")
                      for bar in browser.find_elements(By.CSS_SELECTOR, f"#{chart} rect.bar")]
            assert len(x_ticks) >= 3 and all(x_format.fullmatch(tick) for tick in x_ticks), (page, chart, x_ticks)
            assert [label for label in labels if label in x_ticks] == x_ticks and x_ticks[-1] == labels[-1]
