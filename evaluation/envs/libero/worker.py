"""The LIBERO worker process: a `LiberoSimulator` serving request maps over its stdin / stdout.

Started by `evaluation.envs.libero.LiberoSuite` with LIBERO's interpreter (`.venv-libero/bin/python`):

    .venv-libero/bin/python -m evaluation.envs.libero.worker      # cwd / PYTHONPATH: the repository root

Frames: a 4-byte big-endian length, then that many bytes of msgpack (`evaluation.policy_client.pack`: numpy
arrays in its codec). One reply frame per request frame, in order. The process writes its frames to a copy
of the original stdout and points file descriptor 1 at stderr, so whatever LIBERO, robosuite or MuJoCo print
cannot corrupt the stream; likewise it reads requests from a copy of stdin and gives the simulator /dev/null. It exits on a `close` request with `"exit": true` or at the end of its stdin (the
parent is gone). Needs only numpy, msgpack and LIBERO: no torch.
"""

from __future__ import annotations

import os
import struct
import sys
import traceback
from typing import BinaryIO

HEADER = struct.Struct(">I")  # frame length


def read_frame(stream: BinaryIO) -> bytes | None:
    """One frame's payload, or None at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(HEADER.pack(len(payload)) + payload)
    stream.flush()


def main() -> int:
    protocol_in = os.fdopen(os.dup(0), "rb", buffering=0)
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # prints of the simulator go to stderr, never into the frame stream
    sys.stdout = sys.stderr
    # nothing but this loop reads the requests: the official LIBERO asks for its dataset path with input() on
    # first import when ~/.libero/config.yaml is missing, which would swallow a frame; it gets an EOF instead
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    from evaluation.envs.libero.sim import LiberoSimulator
    from evaluation.policy_client import pack, unpack

    sim = LiberoSimulator()
    while True:
        payload = read_frame(protocol_in)
        if payload is None:
            break
        request = unpack(payload)
        try:
            reply = sim.handle(request)
        except Exception as e:  # noqa: BLE001 - a simulator fault is this request's answer; the worker lives on
            traceback.print_exc()
            reply = {"error": f"simulator error: {type(e).__name__}: {e}"}
        write_frame(protocol_out, pack(reply))
        if isinstance(request, dict) and request.get("cmd") == "close" and request.get("exit"):
            break
    sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
