#!/usr/bin/env python3
"""A link emulator: forwards every frame between two interfaces, losing, duplicating and
reordering some of them, like `tc qdisc ... netem loss L duplicate D delay T reorder R`.

The test bed (scripts/testbed.sh --impair) uses tc netem when the kernel has it; kernels
built without CONFIG_NET_SCH_NETEM (some VM kernels) get this instead, so the same drill runs
everywhere. Frames are real frames on real veth interfaces; only the impairment is in user
space.

  linkem.py IF_A IF_B [--loss 10] [--duplicate 5] [--reorder 25] [--delay-ms 1] [--seed N]

Percentages apply independently per frame and direction: a lost frame is dropped, a
duplicated one is sent twice, and a reordered one is held back for a random time up to
`delay-ms` while later frames pass it. It prints its counts on SIGTERM/SIGINT.
"""

import argparse
import heapq
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def open_raw(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--duplicate", type=float, default=0.0)
    ap.add_argument("--reorder", type=float, default=0.0)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    socks = {args.a: open_raw(args.a), args.b: open_raw(args.b)}
    other = {args.a: socks[args.b], args.b: socks[args.a]}
    by_fd = {s.fileno(): name for name, s in socks.items()}
    held = []  # (due, serial, socket, frame)
    serial = 0
    counts = {"forwarded": 0, "lost": 0, "duplicated": 0, "reordered": 0, "send_errors": 0}
    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def send(sock, frame):
        try:
            sock.send(frame)
        except OSError:
            counts["send_errors"] += 1

    while running:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, sock, frame = heapq.heappop(held)
            send(sock, frame)
        timeout = max(0.0, held[0][0] - now) if held else 0.2
        try:
            ready, _, _ = select.select(list(socks.values()), [], [], timeout)
        except InterruptedError:
            continue
        for s in ready:
            name = by_fd[s.fileno()]
            for _ in range(256):
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue  # our own transmission, seen on the way out
                out = other[name]
                if rng.random() * 100 < args.loss:
                    counts["lost"] += 1
                    continue
                copies = 1
                if rng.random() * 100 < args.duplicate:
                    copies = 2
                    counts["duplicated"] += 1
                for _ in range(copies):
                    if rng.random() * 100 < args.reorder:
                        counts["reordered"] += 1
                        serial += 1
                        due = time.monotonic() + rng.random() * args.delay_ms / 1000.0
                        heapq.heappush(held, (due, serial, out, frame))
                    else:
                        send(out, frame)
                counts["forwarded"] += 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
