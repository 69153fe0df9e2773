"""Which of a node's addresses it announces (in attestations): only ones others can dial.

A node behind a home router usually has none: it listens on 0.0.0.0 or a LAN address, and the gateways it trusts
reach it over the connection it opened to them (customers' streams, witnessing and ledger sync all ride on it).
So a node announces, in this order of preference:

1. ``announce_addrs`` from node.toml, exactly (an operator who forwarded a port, or a public host, says so);
2. otherwise its listen addresses that name a specific interface: never the unspecified ``0.0.0.0`` / ``::``, and
   loopback only when every gateway it bootstraps to is on loopback too (a demo or a test on one machine; also a
   node with no bootstrap, which only a local test dials);
   then what node/relay.py learnt (``Reach``): the addresses a gateway's dial-back reached, or, when none was
   reached, the relayed address of each live reservation on a trusted gateway
   (``/ip4/…/tcp/…/p2p/<gateway>/p2p-circuit/p2p/<node>``).

Every announced address ends in ``/p2p/<the node's peer id>``. Announcing nothing is valid (protocol.md §5): the
node is then reachable only over its own connections.
"""

from __future__ import annotations

import time
from ipaddress import ip_address

from multiaddr import Multiaddr

from llorch.node import limits

UNSPECIFIED = {"0.0.0.0", "::"}


def is_loopback_addr(addr: str) -> bool:
    host = _ip_of(addr)
    return host is not None and ip_address(host).is_loopback


def is_unspecified_addr(addr: str) -> bool:
    return _ip_of(addr) in UNSPECIFIED


def _ip_of(addr: str) -> str | None:
    try:
        for protocol in Multiaddr(addr).protocols():
            if protocol.name in ("ip4", "ip6"):
                return Multiaddr(addr).value_for_protocol(protocol.code)
    except Exception:  # py-multiaddr raises several types for a bad string; the config check names the problem
        return None
    return None


def announced_addrs(config, listening: list[str], peer_id: str, reach=None, now_s: int | None = None) -> list[str]:
    """The addresses to put in this node's attestations (at most ATTESTATION_ADDRS_MAX). ``reach``: what the
    reachability loop learnt (node/relay.py), None before it has run."""
    if config.announce_addrs:
        chosen = list(config.announce_addrs)
    else:
        local = all(is_loopback_addr(addr) for addr in config.bootstrap)      # no bootstrap: a lone test node
        chosen = [addr for addr in listening
                  if not is_unspecified_addr(addr) and (local or not is_loopback_addr(addr))]
        if reach is not None:
            chosen += reach.direct or reach.relayed(int(time.time()) if now_s is None else now_s)
    suffix = f"/p2p/{peer_id}"
    unique = dict.fromkeys(addr if addr.endswith(suffix) else addr + suffix for addr in chosen)
    return list(unique)[:limits.ATTESTATION_ADDRS_MAX]
