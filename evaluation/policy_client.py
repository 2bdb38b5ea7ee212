"""Client of `vipa-serve` (the openpi pattern: websockets + msgpack, numpy arrays in a small codec), without torch.

A robot or a simulator whose packages cannot share this environment (LIBERO pins other mujoco / robosuite
versions) installs only `numpy msgpack websockets` and talks to a policy server:

    from evaluation.policy_client import PolicyClient
    client = PolicyClient("127.0.0.1", 8000)
    client.health()                                   # {"status": "ok", ...} over HTTP GET /healthz
    client.metadata                                   # what the server sent on connect: cameras, widths, horizon
    out = client.infer({"observation.images.image": img_uint8_hwc, "observation.state": state, "task": "open it"})
    out["actions"]                                    # (H, A) float32, the dataset's units ((B, H, A) for a batch)

Wire format: every message is one binary websocket frame holding one msgpack map. numpy arrays travel as
msgpack extension type 1, whose payload is itself msgpack `[dtype string, shape list, raw bytes]` (C order,
little-endian; only bool, integer and floating dtypes); numpy scalars become plain numbers. The server sends
its metadata map first; then each request map (an observation) gets one reply map: `{"actions": array,
"server_timing": {"infer_ms": ...}}` or `{"error": message}` (raised here as `PolicyServerError`).
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import msgpack
import numpy as np

__all__ = ["PolicyClient", "PolicyServerError", "pack", "unpack"]

_NDARRAY_EXT = 1  # msgpack extension type code of a numpy array
_KINDS = "biuf"  # bool, signed / unsigned integer, floating: what the codec carries


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype} (only bool, int, uint, float)")
        arr = obj.astype(obj.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d arrays 0-d
        payload = msgpack.packb([arr.dtype.str, list(arr.shape), arr.tobytes()], use_bin_type=True)
        return msgpack.ExtType(_NDARRAY_EXT, payload)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"cannot send an object of type {type(obj).__name__}; use numpy arrays, numbers, str, lists, dicts"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        return msgpack.ExtType(code, data)
    dtype, shape, raw = msgpack.unpackb(data, raw=False)
    dt = np.dtype(dtype)
    if dt.kind not in _KINDS:
        raise ValueError(
            f"received an array of dtype {dtype}; only bool, int, uint and float arrays are accepted"
        )
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()  # writable, native layout kept


def pack(obj: Any) -> bytes:
    """msgpack bytes of a map of numpy arrays, numbers, strings, lists and maps."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """The inverse of `pack`."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


class PolicyServerError(RuntimeError):
    """The server could not answer a request (bad observation, model error); the message says why."""


class PolicyClient:
    """A websocket connection to `vipa-serve` (opened lazily, reopened after a drop).

    Args:
        host, port: the server's address.
        timeout: seconds to wait for a connection or an answer.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self._ws = None
        self._metadata: dict[str, Any] | None = None

    @property
    def uri(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _connect(self) -> Any:
        if self._ws is None:
            from websockets.sync.client import connect

            # a long-lived connection: entered here (websockets' context protocol), left in close()
            connection = connect(self.uri, open_timeout=self.timeout, max_size=None, compression=None)
            self._ws = connection.__enter__()
            self._metadata = unpack(self._ws.recv(timeout=self.timeout))
        return self._ws

    @property
    def metadata(self) -> dict[str, Any]:
        """The server's description of its policy (embodiment, cameras, widths, horizon, n_action_steps)."""
        self._connect()
        return dict(self._metadata or {})

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        """Send one observation (LeRobot keys, numpy arrays, one sample or a batch); return the reply map with
        `actions` as numpy, in the dataset's units. Raises `PolicyServerError` when the server reports one."""
        ws = self._connect()
        ws.send(pack(observation))
        reply = unpack(ws.recv(timeout=self.timeout))
        if "error" in reply:
            raise PolicyServerError(reply["error"])
        return reply

    def health(self) -> dict[str, Any]:
        """GET http://host:port/healthz: the server's status map (raises `OSError` when it does not answer)."""
        url = f"http://{self.host}:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:  # noqa: S310 - our own server
            return json.loads(response.read().decode())

    def wait_until_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll `health()` until the server answers (it loads the model first); returns its status."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.__exit__(None, None, None)
            self._ws = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
