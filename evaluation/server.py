"""`vipa-serve`: a stage-3 policy behind a websocket (the openpi pattern), for robots and for simulators that cannot
share this environment. Wire format and client: `evaluation.policy_client` (msgpack, numpy arrays in its codec).

    vipa-serve --policy runs/stage3 --port 8000 [--host 127.0.0.1] [--unnorm-key libero] [--device cuda]
    curl http://127.0.0.1:8000/healthz               # {"status": "ok", "unnorm_key": ..., "requests": ...}

On connect the server sends its metadata map (embodiment, cameras, state/action widths, horizon,
n_action_steps); each observation map it receives gets `{"actions": (H, A) or (B, H, A) float32 in the
dataset's units, "server_timing": {"infer_ms": ...}}`, or `{"error": message}` for a bad observation (the
connection stays open). Requests run one at a time on a worker thread, so the event loop keeps answering
health checks and pings while the model runs.

In Python (the tests run it in a thread):

    from evaluation.policy import VipaPolicy
    from evaluation.server import PolicyServer
    server = PolicyServer(VipaPolicy.from_pretrained("runs/stage3"), host="127.0.0.1", port=0)
    server.start()                                   # background thread; server.port is the bound port
    ...
    server.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from http import HTTPStatus
from typing import Any

from evaluation.policy_client import pack, unpack

__all__ = ["PolicyServer", "main"]

logger = logging.getLogger("vipa.serve")


class PolicyServer:
    """Serves `policy.predict_action_chunk` over websockets (see the module docstring).

    Args:
        policy: a `VipaPolicy` (anything with `predict_action_chunk(observation)` and a `spec`).
        host: address to bind; 127.0.0.1 by default (serve on other interfaces only on a trusted network).
        port: TCP port; 0 picks a free one (read `server.port` after `start()`).
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.policy, self.host, self.port = policy, host, int(port)
        self.requests = 0  # observations answered (errors included)
        self.errors = 0  # observations answered with an error
        self._lock = threading.Lock()  # one inference at a time: the model is not re-entrant
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """Sent to every client on connect."""
        spec = self.policy.spec
        return {
            "policy": "vipa-vla",
            "unnorm_key": spec.unnorm_key,
            "camera_keys": list(spec.camera_keys),
            "state_key": spec.state_key,
            "state_dim": spec.state_dim,
            "action_dim": spec.action_dim,
            "fps": spec.fps,
            "horizon": self.policy.horizon,
            "n_action_steps": self.policy.n_action_steps,
        }

    def _infer(self, observation: Any) -> dict[str, Any]:
        with self._lock:
            tic = time.perf_counter()
            actions = self.policy.predict_action_chunk(observation)
            return {"actions": actions, "server_timing": {"infer_ms": 1000 * (time.perf_counter() - tic)}}

    async def _handler(self, connection: Any) -> None:
        import websockets

        await connection.send(pack(self.metadata))
        try:
            async for message in connection:
                self.requests += 1
                try:
                    if not isinstance(message, bytes):
                        raise ValueError("expected binary msgpack frames, got a text frame")
                    reply = await asyncio.to_thread(self._infer, unpack(message))
                except (ValueError, TypeError, KeyError) as e:  # the client's input: say what is wrong
                    self.errors += 1
                    reply = {"error": f"bad observation: {e}"}
                except Exception as e:  # noqa: BLE001 - the server must outlive a failed request
                    self.errors += 1
                    logger.exception("inference failed")
                    reply = {"error": f"inference failed: {type(e).__name__}: {e}"}
                await connection.send(pack(reply))
        except websockets.ConnectionClosed:
            pass

    def _health(self, connection: Any, request: Any) -> Any:
        if request.path.split("?")[0] in ("/healthz", "/health"):
            body = {"status": "ok", "requests": self.requests, "errors": self.errors, **self.metadata}
            return connection.respond(HTTPStatus.OK, json.dumps(body) + "\n")
        return None  # anything else continues as a websocket handshake

    async def serve(self) -> None:
        """Serve until `stop()` (or forever)."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._health,
            max_size=None,  # observations carry full-resolution images
            compression=None,  # images do not compress; deflate would only cost time
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            logger.info("serving %s on ws://%s:%d", self.policy.spec.unnorm_key, self.host, self.port)
            self._ready.set()
            await self._stopped.wait()

    def start(self, timeout: float = 30.0) -> PolicyServer:
        """Run `serve()` in a daemon thread; returns once the port is bound."""

        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                self._failure = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="vipa-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            raise RuntimeError(f"policy server did not start on {self.host}:{self.port}: {self._failure!r}")
        return self

    def stop(self) -> None:
        """Stop a server started with `start()`."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vipa-serve`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="vipa-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy", required=True, help="stage-3 checkpoint folder (vipa-train stage3 --output)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument(
        "--unnorm-key", default=None, help="dataset whose units to act in (default: the only one)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--n-action-steps", type=int, default=None, help="sent to clients in the metadata")
    parser.add_argument(
        "--seed", type=int, default=None, help="fixed noise seed: the same observation, the same chunk"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from evaluation.policy import VipaPolicy

    try:
        policy = VipaPolicy.from_pretrained(
            args.policy,
            unnorm_key=args.unnorm_key,
            device=args.device,
            n_action_steps=args.n_action_steps,
            noise_seed=args.seed,
        )
    except ValueError as e:
        print(f"vipa-serve: error: {e}", file=sys.stderr)
        return 2
    server = PolicyServer(policy, host=args.host, port=args.port)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    except OSError as e:  # port in use, address not available
        print(f"vipa-serve: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
