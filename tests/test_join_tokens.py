"""Invitations: the operator makes a signed, single-use join token; a home lab that runs `llorch node init --token`
joins approved (geo-certified when the token says so) and serves, with no step of the operator's. Every way to
misuse a token is refused and stores nothing: spent twice, made by another gateway, damaged, revoked, expired, or
for another country than the registration claims."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import urllib.error
import urllib.request

import pytest

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.stream_io import now_ms
from llorch.node.wire.invitation import Invitation, parse_token, token_of
from llorch.node.wire.registration import Registration
from tests.test_node_init import environment


@pytest.fixture(scope="module")
def net(tmp_path_factory, model_path):
    network = LocalNetwork(tmp_path_factory.mktemp("join"))
    network.start_gateway()
    yield network
    network.stop()


def invite(net: LocalNetwork, *args: str) -> str:
    return net.cli("gateway", "providers", "invite", "--config", "gateway.toml", "--url", net.http_url,
                   *args).strip()


def providers(net: LocalNetwork) -> dict[str, dict]:
    return {p["provider_id"]: p for p in json.loads(net.cli("gateway", "providers", "list", "--config",
                                                            "gateway.toml"))}


def node_init(home, *args: str, stdin: str = ""):
    return subprocess.run(llorch_command() + ["node", "init", "--port", "0", "--sla-ttft-ms", "2000", *args],
                          cwd=home, env=environment(home), input=stdin, capture_output=True, text=True, timeout=300)


def post_registration(net: LocalNetwork, country: str, token: str | None,
                      payout: dict | None = None) -> tuple[int, dict, str]:
    """A registration of a fresh key, POSTed as `node register` does; (status, answer, its peer id)."""
    key = SigningKey.generate()
    registration = Registration(
        v=VERSION, provider_key=key.public_key, provider_id=key.peer_id, endpoint=f"/p2p/{key.peer_id}",
        pricing={"currency": "EUR", "input_per_1m": 100_000, "output_per_1m": 200_000},
        capacity={"slots": 1, "gpus": 0, "vram_gb": 0}, sla={"uptime_ppm": 950_000, "ttft_ms": 2_000},
        geo={"country": country, "region": "eu-west"}, issued_ms=now_ms(), payout=payout)
    body = {"registration": base64.b64encode(registration.seal(key)).decode(), **({"invitation": token} if token
                                                                                  else {})}
    request = urllib.request.Request(net.http_url + "/v2/platform/providers/register", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), key.peer_id
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), key.peer_id


def test_a_join_token_registers_approved_and_certified_with_no_operator_step(net, tmp_path):
    token = invite(net, "--certify-geo", "FR", "--note", "alice's box")
    assert token.startswith("llorch-join-") and parse_token(token).certify_geo == "FR"
    # The country is proposed from the token: a pipe that answers nothing takes every proposal.
    done = node_init(tmp_path, "--token", token, stdin="")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "approved, its geo claim (FR) certified" in done.stderr
    assert "approve" not in done.stderr.replace("approved", "")         # nothing for the operator to do
    peer = next(line.split()[-1] for line in done.stderr.splitlines() if "peer id" in line)
    record = providers(net)[peer]
    assert (record["status"], record["geo_certified"], record["geo"]["country"]) == ("approved", True, "FR")
    used = json.loads(net.cli("gateway", "providers", "invites", "--config", "gateway.toml"))
    assert [(i["state"], i["used_by"], i["note"]) for i in used if i["used_by"] == peer] == \
        [("used", peer, "alice's box")]
    # The node it set up then serves with no operator step: tests/test_install.py starts it and serves a request,
    # from each install path.


def test_a_join_token_is_accepted_once(net):
    token = invite(net)
    status, answer, first = post_registration(net, "DE", token)
    assert (status, answer["status"]) == (201, "approved")
    status, answer, second = post_registration(net, "DE", token)
    assert status == 403 and answer["error"]["code"] == "invitation_refused"
    assert "used already" in answer["error"]["message"]
    assert second not in providers(net) and providers(net)[first]["status"] == "approved"


def test_a_second_node_init_with_a_spent_token_says_so_and_registers_nothing(net, tmp_path):
    token = invite(net)
    assert post_registration(net, "DE", token)[0] == 201
    done = node_init(tmp_path, "--token", token, "--country", "DE", "--non-interactive")
    assert done.returncode == 1 and "used already" in done.stderr and "Traceback" not in done.stderr


def test_a_token_another_gateway_made_is_refused_by_the_node_and_by_the_gateway(net, tmp_path):
    other = SigningKey.generate()
    forged = token_of(Invitation(v=VERSION, gateway_key=other.public_key, invite_id=bytes(16),
                                 gateway_url=net.http_url, issued_ms=now_ms(), expires_ms=now_ms() + 3_600_000,
                                 certify_geo="DE").seal(other))
    done = node_init(tmp_path, "--token", forged, "--country", "DE", "--non-interactive")
    assert done.returncode == 2 and "refusing to trust it" in done.stderr
    assert not (tmp_path / "config" / "llorch" / "node.toml").exists()
    status, answer, peer = post_registration(net, "DE", forged)
    assert status == 403 and "not this one" in answer["error"]["message"] and peer not in providers(net)


def test_a_damaged_token_is_refused_in_one_line(net, tmp_path):
    token = invite(net)
    damaged = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
    done = node_init(tmp_path, "--token", damaged, "--country", "DE", "--non-interactive")
    assert done.returncode == 2 and "not a valid join token" in done.stderr and "Traceback" not in done.stderr
    status, answer, _ = post_registration(net, "DE", damaged)
    assert status == 400 and answer["error"]["param"] == "invitation"


def test_revoked_expired_and_other_country_tokens_are_refused_and_stay_unspent(net):
    revoked = invite(net)
    invite_id = parse_token(revoked).invite_hex
    net.cli("gateway", "providers", "revoke-invite", invite_id, "--config", "gateway.toml")
    status, answer, peer = post_registration(net, "DE", revoked)
    assert status == 403 and "revoked" in answer["error"]["message"] and peer not in providers(net)

    expired = invite(net, "--expires", "1m")
    with sqlite3.connect(net.workdir / "gateway.sqlite") as database:      # a minute later, as far as it knows
        database.execute("UPDATE invites SET expires_ms = ? WHERE invite_id = ?",
                         (now_ms() - 1, parse_token(expired).invite_id))
    status, answer, _ = post_registration(net, "DE", expired)
    assert status == 403 and "expired" in answer["error"]["message"]

    french = invite(net, "--certify-geo", "FR")
    status, answer, peer = post_registration(net, "DE", french)
    assert status == 403 and "certifies a machine in FR" in answer["error"]["message"] and peer not in providers(net)
    status, answer, _ = post_registration(net, "FR", french)           # not spent by the refusal
    assert (status, answer["status"], answer["geo_certified"]) == (201, "approved", True)


def test_invite_refuses_bad_options_in_one_line(net):
    for args, message in [(["--certify-geo", "France"], "two-letter"), (["--expires", "91d"], "at most 90 days"),
                          (["--expires", "soon"], "30m, 12h, 7d")]:
        result = subprocess.run(llorch_command() + ["gateway", "providers", "invite", "--config", "gateway.toml",
                                                    *args], cwd=net.workdir, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args


def test_a_damaged_iban_is_refused_at_registration_naming_it_and_a_good_one_is_shown_masked(net, tmp_path):
    damaged = {"holder": "Alice Example", "iban": "DE89370400440532013001", "bic": None, "currency": "EUR"}
    status, answer, peer = post_registration(net, "DE", None, damaged)
    assert status == 400 and answer["error"]["param"] == "payout.iban", answer
    assert "DE89 3704 0044 0532 0130 01: checksum does not match" in answer["error"]["message"]
    assert peer not in providers(net)
    good = {**damaged, "iban": "DE89370400440532013000"}
    status, answer, peer = post_registration(net, "DE", None, good)
    assert status == 201 and answer["payout"]["iban"] == "DE89 •••• •••• •••• •••• 3000", answer
    listed = net.cli("gateway", "providers", "list", "--config", "gateway.toml")
    assert "DE89370400440532013000" not in listed and "DE89 •••• •••• •••• •••• 3000" in listed, listed     # masked everywhere
    done = node_init(tmp_path, "--gateway", net.http_url, "--country", "DE", "--non-interactive",
                     "--payout-iban", "DE89 3704 0044 0532 0130 01", "--payout-holder", "Alice Example")
    assert done.returncode == 1 and "payout.iban" in done.stderr and "Traceback" not in done.stderr, done.stderr
