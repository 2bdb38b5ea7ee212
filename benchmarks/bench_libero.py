"""LIBERO client throughput (issue 16 §2), measured in one run, printed as ratios against the bare simulator.

On one task (`libero_spatial-0`, settled initial state 0), at 128 x 128 with both cameras:
(a) the simulator alone (zero actions) with shadows off (the client's default) and on: steps/s and the ratio;
(b) closed loop through `vipa-serve` on loopback (a tiny stage-3 checkpoint, CPU) the way `vipa-eval` runs it:
    one server call per step (n_action_steps = 1: the worst case) and one per chunk of the checkpoint
    (n_action_steps = H = 4): steps/s, and the server's share of the wall time (its reported inference time)
    and of the transfer (round trip minus inference);
(c) an episode's reset (hard reset + initial state + 10 settle steps) in seconds.

The simulator runs in `.venv-libero`'s worker process (evaluation/envs/libero/setup_venv.sh builds it).

    python benchmarks/bench_libero.py [--steps 40] [--image-size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.test_libero: the tiny LIBERO-shaped checkpoint

from evaluation.envs.libero import LiberoSuite, libero_python  # noqa: E402
from evaluation.rollout import PolicySpec, make_policy  # noqa: E402


def sim_rate(suite: LiberoSuite, steps: int) -> tuple[float, float]:
    """(steps/s of zero actions, seconds of one reset) on libero_spatial-0."""
    env = suite.make("libero_spatial-0", max_steps=10_000)
    env.reset(0)  # the first reset also builds the environment
    tic = time.perf_counter()
    env.reset(0)
    reset_s = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(steps):
        env.step(np.zeros(7))
    return steps / (time.perf_counter() - tic), reset_s


class Timed:
    """Wraps a policy served by PolicyServer and adds up its inference time."""

    def __init__(self, policy) -> None:
        self.policy, self.spec = policy, policy.spec
        self.horizon, self.n_action_steps = policy.horizon, policy.n_action_steps
        self.infer_s, self.calls = 0.0, 0

    def predict_action_chunk(self, observation):
        tic = time.perf_counter()
        out = self.policy.predict_action_chunk(observation)
        self.infer_s += time.perf_counter() - tic
        self.calls += 1
        return out


def served_rate(suite: LiberoSuite, timed: Timed, port: int, n_action_steps: int, steps: int) -> dict:
    policy = make_policy(PolicySpec("server", path=f"127.0.0.1:{port}", n_action_steps=n_action_steps), suite)
    env = suite.make("libero_spatial-0", max_steps=10_000)
    obs = env.reset(0)
    policy.reset(env.task, 0)
    timed.infer_s, timed.calls = 0.0, 0
    client_s = 0.0
    tic = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        action = policy.act(obs, env)
        client_s += time.perf_counter() - t0
        obs, *_ = env.step(np.clip(action, -1, 1))
    wall = time.perf_counter() - tic
    policy.client.close()
    return {
        "steps_per_s": steps / wall,
        "server_share": timed.infer_s / wall,
        "transfer_share": (client_s - timed.infer_s) / wall,
        "calls": timed.calls,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per measurement")
    parser.add_argument("--image-size", type=int, default=128, help="camera side, px")
    args = parser.parse_args()
    try:
        libero_python()
    except ImportError as e:
        print(f"bench_libero: skipped: {e}")
        return 0
    from evaluation.policy import VipaPolicy
    from evaluation.server import PolicyServer
    from tests.test_libero import build_libero_checkpoint

    size = args.image_size
    fast = LiberoSuite(image_size=size)
    slow = LiberoSuite(image_size=size, fast_render=False)
    rate_fast, reset_s = sim_rate(fast, args.steps)
    rate_slow, _ = sim_rate(slow, max(5, args.steps // 4))
    slow.close()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_libero_checkpoint(Path(tmp))
        timed = Timed(VipaPolicy.from_pretrained(ckpt, device="cpu", noise_seed=0))
        server = PolicyServer(timed, host="127.0.0.1", port=0).start()
        try:
            every = served_rate(fast, timed, server.port, 1, args.steps)
            chunked = served_rate(fast, timed, server.port, timed.horizon, args.steps)
        finally:
            server.stop()
    fast.close()
    print(f"LIBERO libero_spatial-0, {size}x{size}, agent view + wrist, {args.steps} steps per row")
    print(f"{'setting':<46}{'steps/s':>9}{'x sim':>8}{'server':>9}{'transfer':>10}")
    print(f"{'simulator alone, shadows off (default)':<46}{rate_fast:>9.2f}{1.0:>8.2f}{'':>9}{'':>10}")
    print(f"{'simulator alone, shadows on':<46}{rate_slow:>9.2f}{rate_slow / rate_fast:>8.2f}{'':>9}{'':>10}")
    for name, r in (
        ("through vipa-serve, a call per step", every),
        ("through vipa-serve, a call per 4-step chunk", chunked),
    ):
        print(
            f"{name:<46}{r['steps_per_s']:>9.2f}{r['steps_per_s'] / rate_fast:>8.2f}"
            f"{100 * r['server_share']:>8.1f}%{100 * r['transfer_share']:>9.1f}%"
        )
    print(f"reset (hard reset + initial state + 10 settle steps): {reset_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
