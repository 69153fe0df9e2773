"""A long fuzzing sweep of every decoder: tests/test_fuzz_decoders.py with many examples per decoder, random seeds.

The test suite runs the same properties with 200 fixed examples each (about 40 s on 2 cores); this runs them with
``--examples`` (default 20,000: about 45 minutes on 2 cores; 2,000 took 273 s) random examples each and prints
each decoder's time. A failure prints the smallest failing input: keep it as an ``@example`` next to the property
before fixing the decoder.

    .venv/bin/python bench/fuzz_decoders.py [--examples 20000] [-k EXPRESSION]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per decoder (default 20,000)")
    parser.add_argument("-k", dest="expression", help="only the decoders whose test names match (pytest -k)")
    args = parser.parse_args()
    environment = {**os.environ, "LLORCH_FUZZ_EXAMPLES": str(args.examples), "LLORCH_FUZZ_RANDOM": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--durations=0",
               "tests/test_fuzz_decoders.py"] + (["-k", args.expression] if args.expression else [])
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=environment)
    print(f"{args.examples} examples per decoder: {time.monotonic() - started:.0f} s, exit {result.returncode}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
