#!/usr/bin/env python3
"""Writes seed inputs for the actor_frames fuzz target: sequences of well-formed frames from
endpoint 1/2 to 2/3 (a first contact, data frames in and out of order, fragments, acks), each
after a two-byte little-endian length, as the target reads them. Layout: proto/src/frame.rs."""
import os
import struct
import sys

ME, PEER = (2, 3), (1, 2)
MY_SESSION, PEER_SESSION = 77, 500


def mac(ep):
    return bytes([0x02, 0x4E, 0x43]) + struct.pack(">HB", ep[0], ep[1])


def frame(kind, seq, ack, payload=b"", dst_session=MY_SESSION, frag=(0, 1), sack=0, msg_type=3):
    eth = mac(ME) + mac(PEER) + struct.pack(">H", 0x88B5)
    h = struct.pack(">BBHHHHHQQHHHHQQQQQ", 1, kind, 0, PEER[0], PEER[1], ME[0], ME[1], 0, 0,
                    msg_type, frag[0], frag[1] if kind == 1 else 0, len(payload), PEER_SESSION,
                    dst_session, seq, ack, sack)
    assert len(h) == 76
    b = eth + h + payload
    return struct.pack("<H", len(b)) + b


def main(out):
    os.makedirs(out, exist_ok=True)
    seeds = {
        "first_contact": frame(1, 1, 1, b"\x05\x00", dst_session=0) + frame(1, 1, 1, b"\x05\x00"),
        "in_order": b"".join(frame(1, s, 1, bytes([5, s])) for s in range(1, 6)),
        "out_of_order": b"".join(frame(1, s, 1, bytes([5, s])) for s in (2, 1, 4, 3, 3)),
        "fragments": b"".join(frame(1, s, 1, b"x" * 100, frag=(s - 1, 3)) for s in (1, 2, 3)),
        "acks": frame(2, 0, 1) + frame(2, 0, 1, sack=0b101),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "actor_frames"))
