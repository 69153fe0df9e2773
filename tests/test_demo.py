"""`llorch demo` as a user runs it: two nodes, one of them dies, and the demo keeps serving on the other, saying
so, so a user can try failover. Before, one node's death stopped the whole network."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import openai
import pytest

from llorch.gateway.localnet import llorch_command
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Output:
    """The demo's stdout and stderr, collected by a thread so the pipe never fills."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.text += line

    def wait_for(self, needle: str, timeout_s: float, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text:
            assert process.poll() is None, f"the demo exited with {process.returncode}:\n{self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s} s:\n{self.text[-3000:]}"
            time.sleep(0.2)


def test_the_demo_survives_a_nodes_death_and_says_so(tmp_path, model_path):
    port = free_port()
    demo = subprocess.Popen(llorch_command() + ["demo", "--dir", str(tmp_path / "demo"), "--http-port", str(port),
                                                "--nodes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    output = Output(demo.stdout)
    try:
        output.wait_for("Press Ctrl-C to stop", 240, demo)
        api_key = next(line.split()[-1] for line in output.text.splitlines() if line.strip().startswith("api key"))
        # The banner names every page: customer dashboard, operator console with a working token, each provider's.
        pages = {line.split()[0]: line.split()[1] for line in output.text.split("Web pages:")[1].splitlines()
                 if line.strip() and line.startswith("  ") and line.split()[1].startswith("http")}
        assert pages["customer"] == f"http://127.0.0.1:{port}/dashboard"
        assert pages["operator"] == f"http://127.0.0.1:{port}/operator"
        providers = [line.split()[1] for line in output.text.splitlines() if line.startswith("  provider   http")]
        assert len(providers) == 2
        for url in providers:
            with urllib.request.urlopen(url, timeout=10) as page:
                assert page.status == 200 and b"<html" in page.read().lower()
        token = output.text.split("sign in with the token ")[1].split()[0]
        console = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        console.request("POST", "/operator/sign-in", urllib.parse.urlencode({"token": token}),
                        {"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://127.0.0.1:{port}"})
        signed_in = console.getresponse()
        assert (signed_in.status, signed_in.getheader("Location")) == (303, "/operator")    # the token works
        assert "llorch_operator" in (signed_in.getheader("Set-Cookie") or "")
        console.close()
        node2 = int((tmp_path / "demo" / "node2.ledger.sqlite.lock").read_text().split()[0])
        os.kill(node2, signal.SIGKILL)
        output.wait_for("node2 exited", 30, demo)
        assert demo.poll() is None, output.text[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=2, timeout=120)
        answer = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, seed=3)
        assert answer.choices[0].message.content is not None
        # The demo's nodes have example payout accounts: a payout run works on it as the banner says.
        paid = subprocess.run(llorch_command() + ["billing", "payouts", "run", "--config",
                                                  str(tmp_path / "demo" / "gateway.toml"), "--month",
                                                  time.strftime("%Y-%m", time.gmtime()), "--min", "0", "--out",
                                                  str(tmp_path / "payouts")], capture_output=True, text=True,
                              timeout=120)
        assert paid.returncode == 0 and "Pay the providers:" in output.text, paid.stderr
        assert "provider(s) paid" in paid.stderr, paid.stderr
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, output.text[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "Traceback" not in output.text
