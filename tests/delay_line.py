"""A slow, lossy cable between two network namespaces, in user space: what ``tc qdisc … netem delay D loss L`` on
both ends of a veth pair does, for kernels built without the netem qdisc (CONFIG_NET_SCH_NETEM).

It opens one TAP device in each namespace (an Ethernet interface whose frames this process reads and writes) and
passes every frame to the other side ``delay_ms`` later, dropping each with probability ``loss_ppm`` / 10^6, in
each direction. Constant delay keeps frames in order, as netem does without jitter. The devices exist while the
process runs, so ending it unplugs the cable. It prints "ready" once both devices exist; the caller then gives them
addresses and brings them up.

    python -m tests.delay_line NS_A DEV_A NS_B DEV_B --delay-ms 40 --loss-ppm 10000 [--seed 1]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import selectors
import signal
import struct
import sys
import time
from collections import deque

from tests.small_internet import NETNS_DIR, entered

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_BYTES_MAX = 65_536
QUEUED_FRAMES_MAX = 10_000          # per direction; beyond this a frame is dropped, as by a full router queue
READS_PER_WAKE_MAX = 256


def open_tap(namespace: str, device: str) -> int:
    """Create TAP ``device`` in ``namespace`` and return its non-blocking file descriptor."""
    with entered(NETNS_DIR / namespace):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Direction:
    """Frames read from ``source`` wait here until they are due on ``sink``."""

    def __init__(self, source: int, sink: int, delay_s: float, loss_ppm: int, rng: random.Random) -> None:
        self.source, self.sink, self.delay_s, self.loss_ppm, self.rng = source, sink, delay_s, loss_ppm, rng
        self.queue: deque[tuple[float, bytes]] = deque()

    def take(self, now: float) -> None:
        for _ in range(READS_PER_WAKE_MAX):
            try:
                frame = os.read(self.source, FRAME_BYTES_MAX)
            except BlockingIOError:
                return
            if self.rng.randrange(1_000_000) >= self.loss_ppm and len(self.queue) < QUEUED_FRAMES_MAX:
                self.queue.append((now + self.delay_s, frame))

    def deliver(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            try:
                os.write(self.sink, frame)
            except (BlockingIOError, OSError):      # the far device is down or full: the frame is lost
                pass

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def run(namespace_a: str, device_a: str, namespace_b: str, device_b: str, delay_ms: int, loss_ppm: int,
        seed: int) -> None:
    fd_a, fd_b = open_tap(namespace_a, device_a), open_tap(namespace_b, device_b)
    rng = random.Random(seed)
    directions = {fd_a: Direction(fd_a, fd_b, delay_ms / 1000, loss_ppm, rng),
                  fd_b: Direction(fd_b, fd_a, delay_ms / 1000, loss_ppm, rng)}
    selector = selectors.DefaultSelector()
    for fd in directions:
        selector.register(fd, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        dues = [due for direction in directions.values() if (due := direction.next_due()) is not None]
        timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
        for key, _ in selector.select(timeout):
            directions[key.fd].take(time.monotonic())
        now = time.monotonic()
        for direction in directions.values():
            direction.deliver(now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("namespace_a")
    parser.add_argument("device_a")
    parser.add_argument("namespace_b")
    parser.add_argument("device_b")
    parser.add_argument("--delay-ms", type=int, required=True, help="one-way delay, each direction")
    parser.add_argument("--loss-ppm", type=int, default=0, help="frames lost per million, each direction")
    parser.add_argument("--seed", type=int, default=1, help="seed of the loss pattern")
    args = parser.parse_args()
    if not (0 <= args.delay_ms <= 10_000 and 0 <= args.loss_ppm <= 1_000_000):
        parser.error("--delay-ms must be 0..10000 and --loss-ppm 0..1000000")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(args.namespace_a, args.device_a, args.namespace_b, args.device_b, args.delay_ms, args.loss_ppm, args.seed)


if __name__ == "__main__":
    main()
