"""Download rate of `llorch models fetch --hub` (the real huggingface_hub client, then the sha256 check and the
move into place) and `--url` against `curl` of the same file from the same local server (tests/hub_server.py,
which speaks the Hub's file protocol), in one run, alternating: on loopback (where the clients' own CPU cost is
all there is to measure) and with the server paced to --link-mib (a home connection). The default GGUF (94 MiB).
Prints each rate and the ratio to curl's; PASS when it is at least --floor (default 0.5) of curl's.

    .venv/bin/python bench/model_download.py [--rounds 3] [--floor 0.5] [--link-mib 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llorch.inference import catalog  # noqa: E402
from llorch.inference.sources import HubFile, fetch_from_hub, fetch_from_url  # noqa: E402
from tests.hub_server import HubFiles, HubServer  # noqa: E402

REPO = "llorch-bench/model"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(entry, gguf: Path, rounds: int, link_bytes_per_s: int | None) -> dict[str, float]:
    """MiB/s of curl, `--hub` and `--url` (median of ``rounds`` alternating rounds), the server paced to
    ``link_bytes_per_s`` (None: as fast as loopback goes)."""
    files = HubFiles(files={(REPO, COMMIT, entry.file_name): gguf}, plain={entry.file_name: gguf},
                     link_bytes_per_s=link_bytes_per_s)
    times: dict[str, list[float]] = {"curl": [], "hub": [], "url": []}
    with HubServer(files) as base_url, tempfile.TemporaryDirectory() as scratch:
        os.environ["HF_ENDPOINT"] = base_url
        url = f"{base_url}/files/{entry.file_name}"
        for n in range(rounds):
            work = Path(scratch) / str(n)
            times["curl"].append(timed(lambda: subprocess.run(
                ["curl", "-sf", "-o", str(work / "curl.gguf"), "--create-dirs", url], check=True)))
            times["hub"].append(timed(lambda: fetch_from_hub(entry, HubFile(REPO, COMMIT, entry.file_name),
                                                             work / "hub", lambda m: None)))
            times["url"].append(timed(lambda: fetch_from_url(entry, url, work / "url", lambda m: None)))
            shutil.rmtree(work)
    size = gguf.stat().st_size
    return {name: size / statistics.median(values) / 2**20 for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", type=float, default=0.5)
    parser.add_argument("--link-mib", type=float, default=50.0,
                        help="the paced run's link rate in MiB/s (default 50: a fast home connection)")
    args = parser.parse_args()
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    gguf = catalog.fetch(entry, log=lambda message: None)
    size = gguf.stat().st_size
    if shutil.which("curl") is None:
        print("FAIL  curl is not installed: nothing to compare with")
        return 1
    hashing = statistics.median(timed(lambda: catalog.file_sha256(gguf)) for _ in range(args.rounds))
    kind = statistics.median(timed(lambda: catalog.check_kind(entry, gguf)) for _ in range(args.rounds))
    print(f"{entry.file_name}, {size / 2**20:.1f} MiB from a local server speaking the Hub's file protocol, median "
          f"of {args.rounds} alternating rounds (client, server and hashing share the cores); llorch's figure "
          f"includes the sha256 check and the move into place")
    print(f"fixed costs inside llorch's figure: sha256 of the file {hashing * 1000:.0f} ms (--hub hashes after the "
          f"download; --url while it writes), the GGUF kind check (its header) {kind * 1000:.0f} ms, one fsync")
    failed = False
    for label, link in (("loopback", None), (f"a {args.link_mib:g} MiB/s link", int(args.link_mib * 2**20))):
        rates = measure(entry, gguf, args.rounds, link)
        for name in ("hub", "url"):
            ratio = rates[name] / rates["curl"]
            verdict = "PASS" if ratio >= args.floor else "FAIL"
            failed |= verdict == "FAIL"
            print(f"{verdict}  {label}: --{name} {rates[name]:.0f} MiB/s against curl's {rates['curl']:.0f} MiB/s: "
                  f"ratio {ratio:.2f} (floor {args.floor})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
