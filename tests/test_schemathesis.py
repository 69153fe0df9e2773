"""The gateway's OpenAPI document against the live gateway: schemathesis generates requests for every operation from
the document (valid and invalid ones), sends them over loopback HTTP to a real gateway (hypercorn, real SQLite, a
real libp2p host, one provider per catalog model behind it on its own libp2p host) and checks every answer: no 5xx
but the documented 503, the status code and every header documented, content type and body (each server-sent event
too) as documented, invalid input refused with a 4xx, and no operation that declares the API key answering without
it.

The short run here takes about half a minute. `LLORCH_SCHEMATHESIS_EXAMPLES=N` generates up to N cases per operation
in the fuzzing phase instead (docs/operating.md: the long run).
"""

from __future__ import annotations

import json
import os
import sys

import trio

from llorch.gateway.api.http_api import build_app
from llorch.node.models import BUILTIN
from llorch.node.stream_io import now_ms
from tests.inprocess import market, serving_http

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "negative_data_rejection", "ignored_auth")
EXAMPLES_PER_OPERATION = int(os.environ.get("LLORCH_SCHEMATHESIS_EXAMPLES", "40"))
RUN_TIMEOUT_S = 120 + 2 * EXAMPLES_PER_OPERATION    # 1000 examples took 17 minutes on 2 shared cores
SEED = 20260101

# 503 is a documented answer, not a crash: no provider offers the model under the request's price ceiling
# (`llorch.max_price_out_per_1m: 1`). Any other 5xx fails the run.
CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


def schemathesis_command(base_url: str, api_key: str, workdir, examples: int) -> list[str]:
    (workdir / "schemathesis.toml").write_text(CONFIG)
    return [sys.executable, "-m", "schemathesis.cli", "--config-file", str(workdir / "schemathesis.toml"),
            "--no-color", "run", f"{base_url}/openapi.json",
            "--checks", ",".join(CHECKS), "--header", f"Authorization: Bearer {api_key}",
            "--max-examples", str(examples), "--workers", "1", "--seed", str(SEED),
            "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--continue-on-failure",
            "--suppress-health-check", "all",
            "--report", "json", "--report-json-path", str(workdir / "report.json")]


def document() -> dict:
    return build_app(None).openapi()      # the document needs no gateway: the routes and the models make it


def operations(openapi: dict) -> dict[str, dict]:
    return {f"{method.upper()} {path}": operation for path, methods in openapi["paths"].items()
            for method, operation in methods.items()}


def test_the_document_names_every_body_every_error_shape_and_the_key():
    """What schemathesis cannot see missing: a body the handler reads but the document omits (it would send none
    and accept the 400), or an authenticated route documented as open (ignored_auth checks only those marked)."""
    openapi = document()
    found = operations(openapi)
    open_routes = {"GET /healthz", "GET /livez", "GET /metrics", "POST /v2/platform/providers/register", "GET /v2/platform/gateway",
                   "GET /v1/catalog"}
    assert set(found) == open_routes | {
        "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions", "GET /v2/platform/providers",
        "GET /v2/platform/providers/{provider_id}/capacity", "GET /v2/billing/usage", "GET /v2/receipts/{request_id}"}
    for name, operation in found.items():
        if name.startswith("POST"):
            assert operation["requestBody"]["required"] is True, name
            assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"], name
        assert ("security" in operation) == (name not in open_routes), name
        assert "422" not in operation["responses"], name
        if name not in open_routes:
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, name
    assert openapi["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "The tenant's API key: `Authorization: Bearer <key>`."}
    body = openapi["components"]["schemas"]["ChatRequest"]
    assert body["additionalProperties"] is False and body["required"] == ["model", "messages"]
    assert body["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 4096}


async def test_schemathesis_finds_no_defect_on_the_live_gateway(tmp_path):
    # A provider for every catalog model; each stops after a few tokens whatever max_tokens says (a 4096-token
    # answer takes seconds, and the coverage phase asks for the maximum often).
    providers = {f"p{n}": {"model": model_id, "slots": 2, "tokens": 8}
                 for n, model_id in enumerate(BUILTIN.live_ids())}
    async with market(tmp_path, providers) as built, serving_http(built.gateway) as base_url, \
            trio.open_nursery() as nursery:
        nursery.start_soon(built.attest_forever)
        api_key = await built.gateway.tenants.add("fuzz", "hobby", None, False, False, None, None, None, now_ms())
        with trio.fail_after(RUN_TIMEOUT_S):
            result = await trio.run_process(schemathesis_command(base_url, api_key, tmp_path, EXAMPLES_PER_OPERATION),
                                            capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path)
        settled = (await built.rows("SELECT COUNT(*) FROM tickets WHERE settled_ms IS NOT NULL"))[0][0]
        findings = await built.rows("SELECT * FROM findings")
        nursery.cancel_scope.cancel()
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    report = json.loads((tmp_path / "report.json").read_text())
    cases = report["test_cases"]
    print(f"schemathesis {report['schemathesis_version']}: {report['operations']['tested']} operations, "
          f"{cases['generated']} cases, {cases['with_failures']} with failures, {len(report['errors'])} errors, "
          f"{settled} completions settled, {report['running_time']:.1f} s")
    assert result.returncode == 0, output[-20_000:]
    assert report["operations"]["tested"] == len(operations(document())) and not report["errors"], output[-20_000:]
    assert cases["generated"] >= 300 and cases["with_failures"] == 0
    assert settled >= 10, "the generated requests should reach the providers and be billed"
    assert findings == [], "no generated request may make the gateway blame an honest provider"
