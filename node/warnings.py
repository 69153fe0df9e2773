"""What a provider must act on, each with what to do: a pure function of the status document (node/status.py),
which the dashboard shows at the top of its page and `llorch node status` prints.

Where a gateway answered /llorch/listing/1 (node/listing.py), the warnings say exactly what its operator decided:
not registered, not approved (pending or suspended), geo claim not certified (or not the claim node.toml makes),
excluded for fork evidence (since when, why), and the node's clock measured against the gateway's. Without an
answer (a gateway from before the protocol, or not reached yet) they fall back to what the node can see alone: a
ledger nobody cosigns, a cosignature stamped in the node's future.
"""

from __future__ import annotations

import time

from llorch.node.limits import CLOCK_SKEW_MS_MAX, COSIGNATURE_STALE_MS, DISK_FREE_BYTES_MIN, DISK_FREE_PPM_MIN

PROVIDERS = "llorch gateway providers"          # the operator's commands, named in the advice


def warnings(status: dict) -> list[str]:
    found = []
    me = status["peer_id"]
    for gateway in status["gateways"]:
        if not gateway["connected"]:
            found.append(f"not connected to gateway {gateway['peer_id']}: no requests reach you from it; check the "
                         f"network and node.bootstrap")
        if gateway.get("listing"):
            found += listing_warnings(me, status["country"], gateway["peer_id"], gateway["listing"])
    found += cosignature_warnings(status)
    for model in status.get("models", []):
        if not model["serving"]:
            found.append(f"model {model['id']} is not served: {model['waiting']}")
    for gateway, reason in status.get("catalog", {}).get("ignored", {}).items():
        found.append(f"catalog from {gateway} not used: {reason}")
    disk = status["disk"]
    if disk["total_bytes"] and (disk["free_bytes"] < DISK_FREE_BYTES_MIN or
                                disk["free_bytes"] * 1_000_000 < disk["total_bytes"] * DISK_FREE_PPM_MIN):
        found.append(f"disk nearly full beside the ledger: {disk['free_bytes'] >> 20} MiB free of "
                     f"{disk['total_bytes'] >> 20} MiB; a full disk stops receipts from being written, and so every "
                     f"request")
    return found


def listing_warnings(me: str, claimed_country: str, gateway: str, listing: dict) -> list[str]:
    """What one gateway's answer asks of the provider."""
    found = []
    if listing["status"] == "unregistered":
        found.append(f"not registered with gateway {gateway}: it places nothing on you and does not witness your "
                     f"ledger; run `llorch node register --gateway <its URL>`, then ask its operator to approve you")
    elif listing["status"] == "pending":
        found.append(f"not approved by gateway {gateway} (pending): its operator has not approved your registration "
                     f"yet; until then no requests are placed on you and your ledger is not witnessed. Ask its "
                     f"operator to run `{PROVIDERS} approve {me} --config <their gateway.toml>`, or for a join token "
                     f"(then `llorch node register --gateway <its URL> --token TOKEN`)")
    elif listing["status"] == "suspended":
        found.append(f"not approved by gateway {gateway} (suspended): its operator suspended you, so no requests are "
                     f"placed on you and your ledger is not witnessed. Ask its operator why, and to approve you again "
                     f"(`{PROVIDERS} approve {me} --config <their gateway.toml>`)")
    if listing["fork_detected_ms"] is not None:
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(listing["fork_detected_ms"] // 1000))
        found.append(f"fork evidence: gateway {gateway} has excluded you since {since} ({listing['fork_reason']}): "
                     f"it saw two histories of your ledger that cannot both be true (two nodes on one key and ledger, "
                     f"or a ledger restored from a backup?). Nothing is placed on you nor witnessed until its operator "
                     f"reviews the evidence (`{PROVIDERS} forks`) and readmits you (`{PROVIDERS} readmit {me}`). Run "
                     f"one node per key and ledger")
    if listing["country"] is not None and listing["country"] != claimed_country:
        found.append(f"geo claim differs: node.toml claims {claimed_country} but your registration with gateway "
                     f"{gateway} claims {listing['country']}: register again (`llorch node register`) so both say "
                     f"the same; the new claim waits for the operator's certification")
    elif listing["country"] is not None and not listing["geo_certified"]:
        found.append(f"geo not certified: gateway {gateway} has not certified your claim {listing['country']}: "
                     f"tenants that require a certified location (EU-only) are not served by you until its operator "
                     f"certifies it (`{PROVIDERS} certify {me}`)")
    offset, uncertainty = listing["clock_offset_ms"], listing["round_trip_ms"] // 2
    if abs(offset) - uncertainty > CLOCK_SKEW_MS_MAX:
        found.append(f"clock skew: your clock is {abs(offset) // 1000} s {'behind' if offset > 0 else 'ahead of'} "
                     f"gateway {gateway}'s (±{uncertainty} ms); set it by NTP: tickets and attestations are refused "
                     f"when clocks differ by 30 s")
    return found


def cosignature_warnings(status: dict) -> list[str]:
    """Receipts that no cosignature has covered for a long time, and a cosignature stamped in the node's future: said
    precisely where a gateway's answer explains it, guessed where none does. An idle ledger whose head is cosigned
    is fine however old that cosignature is: a witness cosigns again only when there is something new to cover."""
    found = []
    connected = [g for g in status["gateways"] if g["connected"]]
    answered = [g for g in connected if g.get("listing")]
    ledger = status["ledger"]
    cosigned = ledger["last_cosignature"]
    waited = ledger.get("uncosigned_ms")
    if ledger["entries"] and connected and waited is not None and waited > COSIGNATURE_STALE_MS:
        clean = [g for g in answered if g["listing"]["status"] == "approved" and
                 g["listing"]["fork_detected_ms"] is None]
        if clean:
            found.append(f"gateway {clean[0]['peer_id']} approved you but has not cosigned your newest receipts "
                         f"for over 10 minutes: its witness does not reach your ledger. Check how you are reached "
                         f"(above) and the node's log for ledger streams")
        elif not answered:
            found.append("the gateway has not cosigned your newest receipts for over 10 minutes: it witnesses only "
                         "providers it has approved and not excluded for a fork. Ask its operator whether you are "
                         "approved (a new registration waits for approval; a geo claim also waits for certification)")
    if not answered and cosigned is not None and cosigned["age_ms"] < -CLOCK_SKEW_MS_MAX:
        found.append(f"clock skew: the gateway's last cosignature is stamped {-cosigned['age_ms'] // 1000} s in "
                     f"your future; set your clock by NTP (tickets and attestations are refused when clocks differ)")
    return found
