"""The provider dashboard's warnings (node/dashboard.py ``warnings``): a pure function of the status document and
the disk figures."""

from __future__ import annotations

from llorch.node.dashboard import COSIGNATURE_STALE_MS, warnings

GIB = 1 << 30


def status(connected=True, entries=3, cosigned_age_ms: int | None = 1_000) -> dict:
    return {"gateways": [{"peer_id": "12D3KooWgateway", "connected": connected}],
            "ledger": {"entries": entries, "checkpoint_size": entries, "last_cosignature": None if cosigned_age_ms is
                       None else {"witness": "llorch-witness/x", "size": entries, "age_ms": cosigned_age_ms}}}


def test_a_healthy_node_has_nothing_to_act_on():
    assert warnings(status(), 100 * GIB, 200 * GIB) == []
    assert warnings(status(entries=0, cosigned_age_ms=None), 100 * GIB, 200 * GIB) == []   # nothing to witness yet


def test_each_condition_is_named_with_what_to_do():
    assert "not connected to gateway 12D3KooWgateway" in warnings(status(connected=False), 100 * GIB, 200 * GIB)[0]
    for stale in (status(cosigned_age_ms=None), status(cosigned_age_ms=COSIGNATURE_STALE_MS + 1)):
        assert "whether you are approved" in warnings(stale, 100 * GIB, 200 * GIB)[0]
    assert "clock skew" in warnings(status(cosigned_age_ms=-60_000), 100 * GIB, 200 * GIB)[0]
    assert "disk nearly full" in warnings(status(), GIB - 1, 200 * GIB)[0]
    assert "disk nearly full" in warnings(status(), 4 * GIB, 100 * GIB)[0]          # under 5% free
