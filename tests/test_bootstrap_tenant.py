"""The bootstrap API key (gateway.api_key_sha256) serves the tenant the config names, and that tenant never shares
books with a real tenant: before, it was hard-coded "default", and a real tenant called "default" had the bootstrap
key's spending charged to its own account."""

from __future__ import annotations

import hashlib
import subprocess

from llorch.gateway.localnet import llorch_command
from llorch.ledger.signing import SigningKey, write_key_file
from llorch.node.stream_io import now_ms
from tests.inprocess import market_gateway

BOOTSTRAP_KEY = "sk-bootstrap-test"


def write_config(tmp_path, tenant_line: str) -> None:
    write_key_file(tmp_path / "gateway.key", SigningKey.generate())
    (tmp_path / "gateway.toml").write_text(
        '[gateway]\nkey_file = "gateway.key"\ndb_path = "gateway.sqlite"\nhttp_port = 0\n'
        f'api_key_sha256 = "{hashlib.sha256(BOOTSTRAP_KEY.encode()).hexdigest()}"\n' + tenant_line)


def llorch(tmp_path, *args, timeout=30):
    return subprocess.run(llorch_command() + list(args), cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


async def test_the_bootstrap_key_serves_the_tenant_the_config_names(tmp_path):
    options = {"api_key_sha256": hashlib.sha256(BOOTSTRAP_KEY.encode()).hexdigest(), "tenant": "ops"}
    async with market_gateway(tmp_path, SigningKey.generate(), options) as built:
        tenant = await built.gateway.authenticate(f"Bearer {BOOTSTRAP_KEY}")
        assert tenant.name == "ops"
        real_key = await built.gateway.tenants.add("default", "hobby", 1_000, False, False, None, None, None,
                                                   now_ms())
        assert (await built.gateway.authenticate(f"Bearer {real_key}")).name == "default"


def test_no_real_tenant_may_take_the_bootstrap_tenants_name(tmp_path):
    write_config(tmp_path, 'tenant = "ops"\n')
    refused = llorch(tmp_path, "gateway", "tenants", "add", "ops", "--config", "gateway.toml")
    assert refused.returncode == 2 and "bootstrap" in refused.stderr and "Traceback" not in refused.stderr
    assert llorch(tmp_path, "gateway", "tenants", "add", "acme", "--config", "gateway.toml").returncode == 0


def test_a_gateway_whose_bootstrap_name_is_a_real_tenants_refuses_to_start(tmp_path):
    write_config(tmp_path, "")
    assert llorch(tmp_path, "gateway", "tenants", "add", "ops", "--config", "gateway.toml").returncode == 0
    (tmp_path / "gateway.toml").write_text((tmp_path / "gateway.toml").read_text() + 'tenant = "ops"\n')
    started = llorch(tmp_path, "gateway", "start", "--config", "gateway.toml", timeout=60)
    assert started.returncode == 2, started.stderr[-2000:]
    assert "ops" in started.stderr and "Traceback" not in started.stderr
