"""Seconds from an empty virtualenv to a home lab's first earned request, with a join token and no operator step.

A gateway runs from this checkout (LocalNetwork, SQLite) and its operator makes a join token. The clock then starts
for the home lab: a new venv outside the checkout, `pip install` of llorch's wheel (built from the checkout before
the clock starts: the operator or a release hands it out), `llorch node init --token TOKEN` from that venv (a pipe
answers the country; every other value is init's proposal, its SLA measured here), `llorch node start`, and the
first chat completion the gateway places on that node answered 200. The clock stops there.

``--cold``: pip's cache and the model cache are empty for the home lab (fresh directories), so pip downloads every
package and compiles llama.cpp (CMAKE_ARGS="-DGGML_NATIVE=OFF", a portable CPU build), and the model is downloaded;
without it, pip's cache and the model cache of this machine are used (what a second machine of the same lab, or a
re-install, sees). Both share the 2 cores with the gateway.

    .venv/bin/python bench/onboarding.py [--cold]

Prints each phase and the total, and PASS/FAIL against a floor (warm: 180 s, the figure measured from outside before
invitations, 2 min 18 s, plus the operator step it no longer needs; cold: 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llorch.gateway.localnet import LocalNetwork  # noqa: E402
from llorch.ledger.money import readable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOOR_S = {"warm": 180, "cold": 1200}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="empty pip and model caches for the home lab")
    args = parser.parse_args()
    kind = "cold" if args.cold else "warm"
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        wheels = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                       check=True)
        wheel = next(wheels.glob("llorch-*.whl"))
        net = LocalNetwork(work / "net")
        node = None
        try:
            net.start_gateway()
            token = net.cli("gateway", "providers", "invite", "--config", "gateway.toml", "--url",
                            net.http_url).strip()
            home = work / "lab"
            home.mkdir()
            env = {**os.environ, "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
                   "CMAKE_ARGS": "-DGGML_NATIVE=OFF", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            env.pop("VIRTUAL_ENV", None)
            if args.cold:
                env["PIP_CACHE_DIR"] = str(home / "pip-cache")
                env["XDG_CACHE_HOME"] = str(home / "cache")
            phases: list[tuple[str, float]] = []
            started = time.monotonic()

            def phase(name: str, command: list[str], **extra) -> subprocess.CompletedProcess:
                began = time.monotonic()
                done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, **extra)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-3000:]}")
                phases.append((name, time.monotonic() - began))
                return done

            phase("venv", [sys.executable, "-m", "venv", str(home / "venv")])
            phase("pip install", [str(home / "venv" / "bin" / "pip"), "install", "-q", str(wheel)])
            llorch = str(home / "venv" / "bin" / "llorch")
            phase("node init --token", [llorch, "node", "init", "--token", token, "--port", "0"], input="DE\n")
            began = time.monotonic()
            node = subprocess.Popen([llorch, "node", "start"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            net.wait_for_providers(1, timeout_s=300)
            request = urllib.request.Request(
                net.http_url + "/v1/chat/completions",
                json.dumps({"model": "smollm2-135m-instruct-q4_1", "seed": 1, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
                {"Content-Type": "application/json", "Authorization": f"Bearer {net.api_key}"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            total = time.monotonic() - started
            phases.append(("node start → first request served", time.monotonic() - began))
            earned = readable(answer["llorch"]["provider_amount"], answer["llorch"]["currency"])
        finally:
            if node is not None:
                node.terminate()
                node.wait(30)
            net.stop()
    print(f"onboarding ({kind}: {'empty pip and model caches' if args.cold else 'pip and model caches of this machine'}"
          f", 2 shared cores): " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases))
    print(f"first earned request after {total:.1f} s (provider {answer['llorch']['provider']} earned {earned})")
    verdict = "PASS" if total <= FLOOR_S[kind] else "FAIL"
    print(f"{verdict} {kind} {total:.1f} s <= {FLOOR_S[kind]} s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
