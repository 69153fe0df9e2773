"""The provider's warnings (node/warnings.py ``warnings``): a pure function of the status document, which carries
the disk figures and what each gateway answered about the node's listing (/llorch/listing/1). The dashboard and
`llorch node status` show the same list."""

from __future__ import annotations

import pytest

from llorch.node.limits import CLOCK_SKEW_MS_MAX, COSIGNATURE_STALE_MS
from llorch.node.status import render
from llorch.node.warnings import warnings

GIB = 1 << 30
ME = "12D3KooWme"
GATEWAY = "12D3KooWgateway"
APPROVED = {"status": "approved", "country": "DE", "geo_certified": True, "fork_detected_ms": None,
            "fork_reason": None, "clock_offset_ms": 120, "round_trip_ms": 40, "age_ms": 3_000}


STALE = COSIGNATURE_STALE_MS + 1


def status(connected=True, entries=3, cosigned_age_ms: int | None = 1_000, listing: dict | None = None,
           free_bytes: int = 100 * GIB, total_bytes: int = 200 * GIB, country: str = "DE",
           uncosigned_ms: int | None = None) -> dict:
    """``uncosigned_ms``: how long the oldest receipt no cosignature covers has waited (None: the head is
    cosigned); with no cosignature at all and receipts, it defaults to stale."""
    if cosigned_age_ms is None and entries and uncosigned_ms is None:
        uncosigned_ms = STALE
    return {"peer_id": ME, "country": country,
            "gateways": [{"peer_id": GATEWAY, "connected": connected, "listing": listing,
                          "listing_error": None if listing else "not connected"}],
            "ledger": {"entries": entries, "checkpoint_size": entries, "last_cosignature": None if cosigned_age_ms is
                       None else {"witness": "llorch-witness/x", "size": entries, "age_ms": cosigned_age_ms},
                       "uncosigned_ms": uncosigned_ms},
            "disk": {"free_bytes": free_bytes, "total_bytes": total_bytes}}


def listing(**changes) -> dict:
    return {**APPROVED, **changes}


def one(found: list[str]) -> str:
    assert len(found) == 1, found
    return found[0]


def test_a_healthy_node_has_nothing_to_act_on():
    assert warnings(status()) == []
    assert warnings(status(listing=listing())) == []
    assert warnings(status(entries=0, cosigned_age_ms=None)) == []   # nothing to witness yet


@pytest.mark.parametrize("state, said", [("pending", "its operator has not approved your registration yet"),
                                         ("suspended", "its operator suspended you")])
def test_not_approved_says_which_and_what_to_do(state, said):
    warning = one(warnings(status(listing=listing(status=state), cosigned_age_ms=None)))
    assert warning.startswith(f"not approved by gateway {GATEWAY} ({state})") and said in warning
    assert f"llorch gateway providers approve {ME}" in warning
    assert "has not cosigned" not in warning           # the stale-cosignature guess gives way to the answer


def test_unregistered_says_to_register():
    warning = one(warnings(status(listing=listing(status="unregistered", country=None, geo_certified=False))))
    assert f"not registered with gateway {GATEWAY}" in warning and "llorch node register" in warning


def test_geo_not_certified_names_the_claim_and_the_certification():
    warning = one(warnings(status(listing=listing(geo_certified=False))))
    assert warning.startswith(f"geo not certified: gateway {GATEWAY} has not certified your claim DE")
    assert f"llorch gateway providers certify {ME}" in warning
    differs = one(warnings(status(country="FR", listing=listing())))     # node.toml and registration disagree
    assert "node.toml claims FR but your registration with gateway" in differs and "claims DE" in differs


def test_fork_evidence_says_since_when_why_and_the_operators_commands():
    warning = one(warnings(status(listing=listing(fork_detected_ms=1_790_000_000_000,
                                                    fork_reason="two different roots for size 3"))))
    assert warning.startswith(f"fork evidence: gateway {GATEWAY} has excluded you since 2026-09-21 14:13 UTC")
    assert "two different roots for size 3" in warning
    assert "llorch gateway providers forks" in warning and f"llorch gateway providers readmit {ME}" in warning


def test_clock_skew_is_measured_against_the_gateways_clock():
    behind = one(warnings(status(listing=listing(clock_offset_ms=42_000, round_trip_ms=40))))
    assert behind.startswith(f"clock skew: your clock is 42 s behind gateway {GATEWAY}'s")
    ahead = one(warnings(status(listing=listing(clock_offset_ms=-9_000, round_trip_ms=40))))
    assert "9 s ahead of gateway" in ahead
    # Within the limit once the round trip's uncertainty is allowed for: no warning.
    assert warnings(status(listing=listing(clock_offset_ms=CLOCK_SKEW_MS_MAX + 400, round_trip_ms=1_000))) == []


def test_without_an_answer_the_warnings_are_inferred_as_before():
    assert "not connected to gateway 12D3KooWgateway" in one(warnings(status(connected=False)))
    for stale in (status(cosigned_age_ms=None), status(cosigned_age_ms=STALE, uncosigned_ms=STALE)):
        assert "whether you are approved" in one(warnings(stale))
    assert "clock skew" in one(warnings(status(cosigned_age_ms=-60_000)))
    approved_but_stale = one(warnings(status(cosigned_age_ms=None, listing=listing())))
    assert f"gateway {GATEWAY} approved you but has not cosigned" in approved_but_stale


def test_an_idle_node_whose_head_is_cosigned_has_no_cosignature_alarm():
    """Before: after 10 idle minutes the dashboard and `llorch node status` said the gateway "has not cosigned your
    ledger for over 10 minutes" while its head was fully cosigned (a witness cosigns again only when there is
    something new). What counts is how long the newest receipts have waited for a cosignature."""
    hours = 3 * 3_600_000
    assert warnings(status(cosigned_age_ms=hours, listing=listing())) == []
    assert warnings(status(cosigned_age_ms=hours)) == []
    waited = one(warnings(status(cosigned_age_ms=hours, uncosigned_ms=STALE, listing=listing())))
    assert f"gateway {GATEWAY} approved you but has not cosigned your newest receipts" in waited
    assert warnings(status(cosigned_age_ms=hours, uncosigned_ms=60_000, listing=listing())) == []   # just served


def test_disk_nearly_full():
    assert "disk nearly full" in one(warnings(status(free_bytes=GIB - 1)))
    assert "disk nearly full" in one(warnings(status(free_bytes=4 * GIB, total_bytes=100 * GIB)))   # under 5% free


def test_node_status_prints_the_listing_and_the_warnings():
    document = {**status(listing=listing(status="pending", geo_certified=False)), "model": "m",
                "uptime_ms": 0, "reachability": {"how": "direct", "description": "d", "announced": [],
                                                 "reservations": [], "punched": []},
                "slots": {"free": 1, "total": 1}, "last_attestation": {"seq": 1, "age_ms": 5},
                "today": {"requests": 0, "tokens_in": 0, "tokens_out": 0, "earned_minor": 0}}
    document["warnings"] = warnings(document)
    text = render(document)
    assert f"gateway {GATEWAY}: connected; pending, geo DE not certified, not excluded, clock +0.1 s (±20 ms); " \
           f"asked 3 s ago" in text
    assert "to act on:" in text and f"  - not approved by gateway {GATEWAY} (pending)" in text
    document["gateways"][0].update(listing=None, listing_error="did not answer")
    assert f"gateway {GATEWAY}: connected; listing unknown (did not answer)" in render(document)
