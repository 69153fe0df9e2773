"""Every operator command (`llorch gateway ...` but `start`, `llorch billing ...`) against a PostgreSQL gateway that has
served requests: each runs its SQL on PostgreSQL and ends with its documented exit code, never a database error.
Before: `llorch gateway providers sla` exited 2 on PostgreSQL ("function sum(boolean) does not exist"), an error the
SQLite suite could not see. The command list is checked against the CLI's parser, so a new command must be added
here. Nodes run the echo engine (test-only): this is about the SQL."""

from __future__ import annotations

import argparse
import time

import httpx
import pytest

from llorch.gateway.cli import build_parser, main
from llorch.gateway.localnet import LocalNetwork
from llorch.ledger.signing import load_key_file
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> set[tuple[str, ...]]:
    """Every runnable command path under ``parser`` (its subparsers' leaves)."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= leaf_commands(sub, prefix + (name,))
    return found or {prefix}


@pytest.fixture(scope="module")
def served(postgres_cluster, tmp_path_factory):
    net = LocalNetwork(tmp_path_factory.mktemp("cli-pg"))
    try:
        net.start_gateway(database=postgres_cluster.new_database())
        net.start_node("a", extra='engine = "echo"\nslots = 2\ncheckpoint_every_ms = 1000\n')
        net.wait_for_providers(1)
        key = net.cli("gateway", "tenants", "add", "buyer", "--config", "gateway.toml").strip()
        for seed in range(3):
            response = httpx.post(f"{net.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 3, "seed": seed}, timeout=60)
            assert response.status_code == 200, response.text
        yield net, response.json()["id"]
    finally:
        net.stop()


def test_every_operator_command_runs_its_sql_on_postgresql(served, capsys, monkeypatch):
    net, request_id = served
    monkeypatch.chdir(net.workdir)                    # gateway.toml names its key and files relative to it
    peer = load_key_file(net.workdir / "a.key").peer_id
    config = ["--config", "gateway.toml"]
    month = time.strftime("%Y-%m", time.gmtime())
    commands: dict[tuple[str, ...], tuple[list[str], int]] = {     # path → (arguments, exit code)
        ("gateway", "tenants", "add"): (["other", *config], 0),
        ("gateway", "tenants", "update"): (["other", "--tier", "startup", "--budget", "12.50", "--max-concurrent", "3",
                                           *config], 0),
        ("gateway", "tenants", "list"): (config, 0),
        ("gateway", "tenants", "revoke"): (["other", *config], 0),
        ("gateway", "providers", "list"): (config, 0),
        ("gateway", "providers", "certify"): ([peer, *config], 0),
        ("gateway", "providers", "forks"): (config, 0),
        ("gateway", "providers", "evidence"): (config, 0),
        ("gateway", "providers", "checks"): (["--json", *config], 0),
        ("gateway", "providers", "sla"): (config, 0),
        ("gateway", "providers", "suspend"): ([peer, *config], 0),
        ("gateway", "providers", "approve"): ([peer, *config], 0),
        ("gateway", "providers", "readmit"): ([peer, "--note", "checked", *config], 2),      # it never forked
        ("gateway", "operator-token"): (config, 0),
        ("gateway", "db", "status"): (config, 0),
        ("gateway", "db", "upgrade"): (config, 0),
        ("gateway", "models", "add"): (["--id", "pg-check-q4", "--kind", "base", "--sha256", "cd" * 32, "--size",
                                        str(1 << 20), "--context-tokens", "2048", "--license", "MIT", "--url",
                                        "https://models.example/pg-check.gguf", *config], 0),
        ("gateway", "models", "list"): (["--json", *config], 0),
        ("gateway", "models", "show"): (["pg-check-q4", *config], 0),
        ("gateway", "models", "retire"): (["pg-check-q4", *config], 0),
        ("billing", "reconcile"): (["--grace-s", "0", *config], None),      # 0 or 1: it reports what it found
        ("billing", "statement"): (["--tenant", "buyer", "--format", "csv", *config], 0),
        ("billing", "correct"): (["--request-id", request_id, "--from", "platform:fees", "--to", "tenant:buyer",
                                  "--amount", "1", *config], 0),
        ("gateway", "init"): (["--host", "gw.example.org", "--config", str(net.workdir / "init" / "gateway.toml")], 0),
        ("gateway", "providers", "invite"): (["--certify-geo", "DE", "--url", "https://gw.example.org", *config], 0),
        ("gateway", "providers", "invites"): (config, 0),
        ("gateway", "providers", "revoke-invite"): (["00" * 16, *config], 2),            # no such invitation
        ("billing", "payouts", "run"): (["--month", month, "--min", "0", "--out", str(net.workdir / "payouts"),
                                         "--settled-s", "0", *config], 0),
        ("billing", "payouts", "list"): (config, 0),
        ("billing", "payouts", "show"): ([f"{month}-1", *config], 0),
        ("billing", "payouts", "mark-paid"): ([f"{month}-1", *config], 0),
        ("billing", "payouts", "mark-failed"): ([f"{month}-1", peer, *config], 2),     # nothing was sent to it
    }
    parser = build_parser()
    expected = {path for path in leaf_commands(parser) if path[0] in ("gateway", "billing")} - {("gateway", "start")}
    assert set(commands) == expected, "add the new command here, with arguments that run its SQL"
    extra = {("billing", "statement"): [["--provider", peer], ["--platform"]]}
    for path, (arguments, code) in commands.items():
        runs = [arguments] + [[*variant, *config] for variant in extra.get(path, [])]
        for argv in runs:
            returned = main([*path, *argv])           # in this process: the same code, no interpreter start
            stderr = capsys.readouterr().err
            where = f"llorch {' '.join(path)} {' '.join(argv)}: {returned}\n{stderr[-1500:]}"
            assert "Traceback" not in stderr and "does not exist" not in stderr, where
            assert code is None and returned in (0, 1) or returned == code, where


def test_a_dropped_postgresql_connection_is_never_a_500(served):
    """Before: a request whose statement met a dropped connection (a PostgreSQL restart) answered 500 "internal
    error". Now every answer while the gateway's connection is dropped again and again is a 200 (the statement that
    met the loss was a background loop's) or a 503 database_unavailable with Retry-After; none is a 500."""
    import psycopg

    net, _ = served
    key = net.cli("gateway", "tenants", "add", "blip", "--config", "gateway.toml").strip()
    statuses = []
    for seed in range(8):
        with psycopg.connect(net.database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                          "AND pid <> pg_backend_pid()")
        response = httpx.post(f"{net.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 2, "seed": seed}, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "database_unavailable", response.text
        else:
            assert response.status_code == 200, response.text
    assert "Traceback" not in (net.workdir / "gateway.log").read_text()
