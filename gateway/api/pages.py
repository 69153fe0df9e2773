"""The gateway's web pages: the customer page (/dashboard, signed in with the tenant's API key) and the operator
console (/operator, signed in with the operator token). Server-rendered (Jinja2, autoescaped, node/web/), charts as
SVG drawn on the server, no script; pages reload themselves every DASHBOARD_REFRESH_S.

Every figure comes from the function the CLI or the API uses for it: spend and budget from the tenants table
(`llorch gateway tenants list`), the month from ``Books.statement`` (GET /v2/billing/usage, `llorch billing
statement`), a receipt's proof from ``Gateway.receipt_proof`` (GET /v2/receipts/{id}), providers and their decisions
from ``ProviderBook`` (`llorch gateway providers ...`), forks from ``WitnessBook.fork_history`` (`providers forks`),
findings from what `llorch billing reconcile` left open; per-day figures from gateway/books/usage.py, which sums the
same postings. Sessions and CSRF: gateway/api/sessions.py. Not part of the OpenAPI document (HTML, not the API).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from llorch.gateway import limits
from llorch.gateway.api.body import read_body_capped
from llorch.gateway.api.sessions import (Session, SessionBook, check_operator_token, operator_token_current,
                                         session_key)
from llorch.gateway.books import payouts
from llorch.gateway.books.postings import period_of
from llorch.gateway.books.reconcile import open_findings
from llorch.gateway.spot_checks import evidence_document_of, evidence_list
from llorch.gateway.books.usage import DAY_MS, latest_billed, market_days, tenant_days
from llorch.gateway.errors import BadRequest, Forbidden, GatewayError
from llorch.gateway.market.providers import ProviderError
from llorch.gateway.market.tenants import Tenant, key_hash
from llorch.gateway.service import Gateway
from llorch.ledger.signing import peer_id_of, public_key_of_peer_id
from llorch.node.stream_io import now_ms
from llorch.node.web.charts import buckets
from llorch.node.web.render import environment

TEMPLATES = Path(__file__).parent / "templates"
TENANT_COOKIE, OPERATOR_COOKIE = "llorch_tenant", "llorch_operator"
ACTIONS = {"approve": "approve (placement may use it)", "certify": "certify the geo claim of",
           "suspend": "suspend (placement stops using it)"}


def mount_pages(app: FastAPI, gateway: Gateway) -> None:
    Pages(gateway).mount(app)


class Pages:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._sessions: SessionBook | None = None
        self.templates = environment(TEMPLATES)

    @property
    def sessions(self) -> SessionBook:
        """Made at first use: the routes (and the OpenAPI document) exist without a gateway key."""
        if self._sessions is None:
            self._sessions = SessionBook(session_key(self.gateway.key.seed))
        return self._sessions

    def mount(self, app: FastAPI) -> None:
        for path, handler, methods in (
                ("/dashboard", self.customer_page, ["GET"]),
                ("/dashboard/sign-in", self.customer_sign_in_form, ["GET"]),
                ("/dashboard/sign-in", self.customer_sign_in, ["POST"]),
                ("/dashboard/sign-out", self.customer_sign_out, ["POST"]),
                ("/dashboard/receipts/{request_id}", self.receipt_download, ["GET"]),
                ("/operator", self.operator_page, ["GET"]),
                ("/operator/sign-in", self.operator_sign_in_form, ["GET"]),
                ("/operator/sign-in", self.operator_sign_in, ["POST"]),
                ("/operator/sign-out", self.operator_sign_out, ["POST"]),
                ("/operator/evidence/{evidence_id}", self.evidence_download, ["GET"]),
                ("/operator/providers/{provider_id}/{action}", self.confirm_action, ["GET"]),
                ("/operator/providers/{provider_id}/{action}", self.provider_action, ["POST"])):
            app.add_api_route(path, handler, methods=methods, include_in_schema=False, response_model=None)

    # -- rendering --------------------------------------------------------------------------------------------------
    def html(self, template: str, status: int = 200, **context) -> HTMLResponse:
        page = self.templates.get_template(template).render(**context)
        # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with every form, and
        # ``form`` refuses that; same-origin still sends nothing to other sites.
        return HTMLResponse(page, status_code=status, headers={
            "cache-control": "no-store", "x-frame-options": "DENY", "referrer-policy": "same-origin",
            "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                       "form-action 'self'; frame-ancestors 'none'"})

    def refused(self, message: str, sign_in: str, status: int = 401) -> HTMLResponse:
        return self.html("refused.html", status, message=message, sign_in=sign_in)

    @staticmethod
    def set_cookie(response: Response, name: str, value: str, path: str) -> None:
        response.set_cookie(name, value, max_age=limits.DASHBOARD_SESSION_LIFETIME_MS // 1000, path=path,
                            secure=True, httponly=True, samesite="strict")

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        """An application/x-www-form-urlencoded body, small, each field at most once, posted from these pages: a
        browser names the page a form came from in ``Origin``, and one from another site is refused (Forbidden)
        before anything is read. This is what protects the sign-in forms, which have no session yet for a CSRF
        token (login CSRF: signing a victim in to the attacker's account); the other forms carry a token too."""
        origin = request.headers.get("origin")        # scheme://host[:port]; the scheme may differ behind a TLS proxy
        if origin is not None and origin.partition("://")[2] != request.headers.get("host", ""):
            raise Forbidden(f"a form posted from another site ({origin[:100]}) is refused: sign in on this page")
        body = await read_body_capped(request, limits.DASHBOARD_FORM_BYTES_MAX)
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                              max_num_fields=8)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"the form is not URL-encoded UTF-8: {exc}") from None
        if any(len(values) != 1 for values in fields.values()):
            raise BadRequest("a form field appears more than once")
        return {name: values[0] for name, values in fields.items()}

    # -- the customer page ------------------------------------------------------------------------------------------
    async def tenant_session(self, request: Request):
        """(session, tenant) of a live customer session whose API key still works, or None."""
        session = self.sessions.find(request.cookies.get(TENANT_COOKIE), "tenant", now_ms())
        if session is None:
            return None
        gateway = self.gateway
        if gateway.config.api_key_sha256 and session.credential_sha256 == gateway.config.api_key_sha256:
            return session, gateway.bootstrap_tenant
        tenant = await gateway.tenants.by_key_hash(session.credential_sha256)
        if tenant is None or tenant.revoked:          # revoked since sign-in: the session ends with the key
            self.sessions.close(session)
            return None
        return session, tenant

    async def customer_sign_in_form(self, request: Request) -> HTMLResponse:
        return self.html("sign_in.html", who="customer", action="/dashboard/sign-in", field="api_key",
                         label="API key", error=None)

    async def customer_sign_in(self, request: Request) -> Response:
        try:
            fields = await self.form(request)
            tenant = await self.gateway.authenticate(f"Bearer {fields.get('api_key', '')}")
        except GatewayError as error:
            return self.html("sign_in.html", error.status, who="customer", action="/dashboard/sign-in",
                             field="api_key", label="API key", error=error.message)
        cookie, _ = self.sessions.open("tenant", tenant.name, key_hash(fields["api_key"].strip()), now_ms())
        response = RedirectResponse("/dashboard", status_code=303)
        self.set_cookie(response, TENANT_COOKIE, cookie, "/dashboard")
        return response

    async def customer_sign_out(self, request: Request) -> Response:
        return await self.sign_out(request, TENANT_COOKIE, "tenant", "/dashboard")

    async def customer_page(self, request: Request) -> Response:
        found = await self.tenant_session(request)
        if found is None:
            return RedirectResponse("/dashboard/sign-in", status_code=303)
        session, tenant = found
        started = time.perf_counter()
        now = now_ms()
        books, database = self.gateway.books, self.gateway.database
        period = period_of(now)
        first_day = now - now % DAY_MS - (limits.DASHBOARD_DAYS - 1) * DAY_MS
        days = await tenant_days(database, tenant.name, first_day)
        spent = await books.tenant_spent(tenant.name)            # the balance admission reads
        charts = per_day_charts(days, first_day, limits.DASHBOARD_DAYS, {
            "spend": lambda d: d.amount_minor, "requests": lambda d: d.requests,
            "tokens": lambda d: d.tokens_in + d.tokens_out})
        return self.html(
            "customer.html", refresh_s=limits.DASHBOARD_REFRESH_S, tenant=tenant, spent=spent,
            left=None if tenant.budget_minor is None else tenant.budget_minor - spent,
            statement=await books.statement("tenant", tenant.name, period), charts=charts,
            billed=await latest_billed(database, tenant.name, limits.DASHBOARD_RECEIPTS_SHOWN_MAX),
            gateway_peer_id=peer_id_of(self.gateway.key.public_key),    # the witness verify-receipt asks for
            csrf=self.sessions.csrf_token(session), now_ms=now, quote=quote,
            render_ms=lambda: round((time.perf_counter() - started) * 1000))

    async def receipt_download(self, request: Request, request_id: str) -> Response:
        """The proof document of one of the signed-in tenant's receipts: the JSON of GET /v2/receipts/{id}."""
        found = await self.tenant_session(request)
        if found is None:
            return self.refused("sign in to download receipts", "/dashboard/sign-in")
        document = await self.gateway.receipt_proof(found[1], request_id)
        if document is None:
            return self.refused(f"no receipt {request_id} for this account", "/dashboard", 404)
        safe_name = "".join(c for c in request_id if c.isalnum() or c in "-_")[:80] or "receipt"
        return JSONResponse(document, headers={"content-disposition": f'attachment; filename="{safe_name}.json"',
                                               "cache-control": "no-store"})

    # -- the operator console ---------------------------------------------------------------------------------------
    def operator_session(self, request: Request) -> Session | None:
        session = self.sessions.find(request.cookies.get(OPERATOR_COOKIE), "operator", now_ms())
        if session is not None and not operator_token_current(self.gateway.config.db_path, session.credential_sha256):
            self.sessions.close(session)                 # a new operator token ends every older session
            return None
        return session

    async def operator_sign_in_form(self, request: Request) -> HTMLResponse:
        return self.html("sign_in.html", who="operator", action="/operator/sign-in", field="token",
                         label="operator token", error=None)

    async def operator_sign_in(self, request: Request) -> Response:
        try:
            fields = await self.form(request)
            credential = check_operator_token(self.gateway.config.db_path, fields.get("token", ""))
        except GatewayError as error:
            return self.html("sign_in.html", error.status, who="operator", action="/operator/sign-in",
                             field="token", label="operator token", error=error.message)
        cookie, _ = self.sessions.open("operator", "operator", credential, now_ms())
        response = RedirectResponse("/operator", status_code=303)
        self.set_cookie(response, OPERATOR_COOKIE, cookie, "/operator")
        return response

    async def operator_sign_out(self, request: Request) -> Response:
        return await self.sign_out(request, OPERATOR_COOKIE, "operator", "/operator")

    async def operator_page(self, request: Request) -> Response:
        session = self.operator_session(request)
        if session is None:
            return RedirectResponse("/operator/sign-in", status_code=303)
        started = time.perf_counter()
        now = now_ms()
        gateway = self.gateway
        first_day = now - now % DAY_MS - (limits.DASHBOARD_DAYS - 1) * DAY_MS
        days = await market_days(gateway.database, first_day)
        charts = per_day_charts(days, first_day, limits.DASHBOARD_DAYS, {
            "revenue": lambda d: d.revenue_minor, "payouts": lambda d: d.payouts_minor, "fees": lambda d: d.fees_minor})
        forked = await gateway.witness_book.forked()
        providers = [{"record": record, "attestation": fresh_or_none(gateway, record.provider_key, now),
                      "standing": gateway.market.standings.get(record.provider_key), "forked": record.provider_key in forked}
                     for record in await gateway.providers.all()]
        return self.html(
            "operator.html", refresh_s=limits.DASHBOARD_REFRESH_S, providers=providers,
            tenants=await self.all_tenants(), bootstrap_tenant=gateway.bootstrap_tenant.name, charts=charts,
            now_ms=now,
            platform=await gateway.books.statement("platform", None, period_of(now)),
            findings=(await open_findings(gateway.database)).findings,
            forks=await gateway.witness_book.fork_history(), evidence=await evidence_list(gateway.database),
            payout_runs=list(reversed(await payouts.runs(gateway.database))),
            csrf=self.sessions.csrf_token(session), quote=quote,
            render_ms=lambda: round((time.perf_counter() - started) * 1000))

    async def all_tenants(self) -> list[Tenant]:
        """The tenants table, and first the bootstrap key's tenant (gateway.tenant), which is not in it: while the
        gateway has a bootstrap key, or while that tenant's account has a balance, its spending from the books."""
        gateway = self.gateway
        bootstrap = gateway.bootstrap_tenant
        spent = await gateway.books.tenant_spent(bootstrap.name)
        shown = [replace(bootstrap, spent_minor=spent)] if gateway.config.api_key_sha256 or spent else []
        return shown + await gateway.tenants.list()

    async def evidence_download(self, request: Request, evidence_id: str) -> Response:
        """One spot-check evidence document, as `llorch gateway providers evidence ID --out F` writes it. It holds
        a customer's prompt: the operator's session only."""
        if self.operator_session(request) is None:
            return self.refused("sign in as the operator first", "/operator/sign-in")
        document = await evidence_document_of(self.gateway.database, int(evidence_id)) \
            if evidence_id.isdigit() and len(evidence_id) <= 18 else None
        if document is None:
            return self.html("refused.html", 404, message="there is no such evidence", sign_in="/operator")
        return Response(document + "\n", media_type="application/json", headers={
            "content-disposition": f'attachment; filename="evidence-{int(evidence_id)}.json"',
            "cache-control": "no-store", "x-content-type-options": "nosniff"})

    async def confirm_action(self, request: Request, provider_id: str, action: str) -> Response:
        """The confirmation step of approve / certify / suspend: what will change, and a form to do it."""
        session = self.operator_session(request)
        if session is None:
            return RedirectResponse("/operator/sign-in", status_code=303)
        record = await self.known_provider(provider_id, action)
        if isinstance(record, Response):
            return record
        return self.html("confirm.html", record=record, action=action, what=ACTIONS[action],
                         csrf=self.sessions.csrf_token(session), quote=quote)

    async def provider_action(self, request: Request, provider_id: str, action: str) -> Response:
        session = self.operator_session(request)
        if session is None:
            return self.refused("sign in as the operator first", "/operator/sign-in")
        try:
            fields = await self.form(request)
            self.sessions.check_csrf(session, fields.get("csrf"))
        except GatewayError as error:
            return self.html("refused.html", error.status, message=error.message, sign_in="/operator")
        record = await self.known_provider(provider_id, action)
        if isinstance(record, Response):
            return record
        providers = self.gateway.providers        # what `llorch gateway providers approve|certify|suspend` calls
        try:
            await (providers.certify_geo(provider_id) if action == "certify" else
                   providers.set_status(provider_id, {"approve": "approved", "suspend": "suspended"}[action]))
        except ProviderError as error:
            return self.html("refused.html", 400, message=str(error), sign_in="/operator")
        return RedirectResponse("/operator#providers", status_code=303)

    async def known_provider(self, provider_id: str, action: str):
        """The provider's record, or the page saying why there is none (unknown action, not a peer id, unknown)."""
        if action not in ACTIONS:
            return self.html("refused.html", 404, message=f"no action {action!r}: approve, certify or suspend",
                             sign_in="/operator")
        try:
            public_key_of_peer_id(provider_id)
        except Exception:                              # EncodingError or a malformed multihash: not a peer id
            return self.html("refused.html", 404, message="that is not a peer id", sign_in="/operator")
        record = await self.gateway.providers.get(provider_id)
        if record is None:
            return self.html("refused.html", 404, message=f"provider {provider_id} has not registered here",
                             sign_in="/operator")
        return record

    # -- both -------------------------------------------------------------------------------------------------------
    async def sign_out(self, request: Request, cookie: str, kind: str, home: str) -> Response:
        session = self.sessions.find(request.cookies.get(cookie), kind, now_ms())
        if session is not None:
            try:
                self.sessions.check_csrf(session, (await self.form(request)).get("csrf"))
            except GatewayError as error:
                return self.html("refused.html", error.status, message=error.message, sign_in=home)
            self.sessions.close(session)
        response = RedirectResponse(f"{home}/sign-in", status_code=303)
        response.delete_cookie(cookie, path=home, secure=True, httponly=True, samesite="strict")
        return response


def fresh_or_none(gateway: Gateway, provider_key: bytes, now: int):
    attestation = gateway.directory.get(provider_key)
    return attestation if attestation is not None and attestation.expires_ms > now else None


def day_label(start_ms: int) -> str:
    return time.strftime("%d %b", time.gmtime(start_ms // 1000))         # "14 Mar"; C locale: English months


def per_day_charts(days: dict, first_day: int, count: int, picks: dict) -> dict:
    """name → the bars of ``picks[name](day's figures)`` for ``count`` days from ``first_day``: pure. A day of
    refunds keeps its sign (the chart draws it below the zero line), so the bars add up to the month."""
    return {name: buckets({day: pick(figures) for day, figures in days.items()}, first_day, count, DAY_MS, day_label)
            for name, pick in picks.items()}
