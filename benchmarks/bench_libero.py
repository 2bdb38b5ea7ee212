"""LIBERO client throughput (issue 16 §2), measured in one run, printed as ratios against the bare simulator.

On one task (`libero_spatial-0`, settled initial state 0), at 128 x 128 with both cameras:
(a) the simulator alone (zero actions) with shadows off (the client's default) and on: steps/s and the ratio;
    every row is measured in interleaved segments (the shared machine's load changes in time);
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


class Timed:
    """Wraps a policy served by PolicyServer and adds up its inference time."""

    def __init__(self, policy) -> None:
        self.policy, self.spec = policy, policy.spec
        self.horizon, self.n_action_steps = policy.horizon, policy.n_action_steps
        self.infer_s = 0.0

    def predict_action_chunk(self, observation):
        tic = time.perf_counter()
        out = self.policy.predict_action_chunk(observation)
        self.infer_s += time.perf_counter() - tic
        return out


class Setting:
    """One row: an environment (and a served policy or zero actions), timed over interleaved segments."""

    def __init__(self, name: str, suite: LiberoSuite, policy=None, timed: Timed | None = None) -> None:
        self.name, self.policy, self.timed = name, policy, timed
        self.env = suite.make("libero_spatial-0", max_steps=10**6)
        self.obs = self.env.reset(0)
        if policy is not None:
            policy.reset(self.env.task, 0)
        self.steps, self.wall, self.infer, self.client = 0, 0.0, 0.0, 0.0

    def run(self, steps: int) -> None:
        infer0 = self.timed.infer_s if self.timed else 0.0
        tic = time.perf_counter()
        for _ in range(steps):
            if self.policy is None:
                action = np.zeros(7)
            else:
                t0 = time.perf_counter()
                action = np.clip(self.policy.act(self.obs, self.env), -1, 1)
                self.client += time.perf_counter() - t0
            self.obs, *_ = self.env.step(action)
        self.wall += time.perf_counter() - tic
        self.steps += steps
        self.infer += (self.timed.infer_s - infer0) if self.timed else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per row")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved segments per row")
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
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_libero_checkpoint(Path(tmp))
        timed = Timed(VipaPolicy.from_pretrained(ckpt, device="cpu", noise_seed=0))
        server = PolicyServer(timed, host="127.0.0.1", port=0).start()
        try:
            tic = time.perf_counter()
            settings = [Setting("simulator alone, shadows off (default)", fast)]
            reset_s = time.perf_counter() - tic  # the first reset also builds the environment
            tic = time.perf_counter()
            settings[0].env.reset(0)
            reset_s = time.perf_counter() - tic
            settings.append(Setting("simulator alone, shadows on", slow))
            for name, n in (
                ("through vipa-serve, a call per step", 1),
                ("through vipa-serve, a call per 4-step chunk", 4),
            ):
                spec = PolicySpec("server", path=f"127.0.0.1:{server.port}", n_action_steps=n)
                settings.append(Setting(name, fast, make_policy(spec, fast), timed))
            # interleaved segments: the machine's load changes in time, every row sees the same share of it
            for _ in range(args.rounds):
                for setting in settings:
                    setting.run(max(1, args.steps // args.rounds))
        finally:
            server.stop()
    fast.close()
    slow.close()
    base = settings[0].steps / settings[0].wall
    print(
        f"LIBERO libero_spatial-0, {size}x{size}, agent view + wrist, {settings[0].steps} steps per row in {args.rounds} interleaved rounds"
    )
    print(f"{'setting':<46}{'steps/s':>9}{'x sim':>8}{'server':>9}{'transfer':>10}")
    for st in settings:
        rate = st.steps / st.wall
        shares = ""
        if st.policy is not None:
            shares = f"{100 * st.infer / st.wall:>8.1f}%{100 * (st.client - st.infer) / st.wall:>9.1f}%"
        print(f"{st.name:<46}{rate:>9.2f}{rate / base:>8.2f}{shares}")
    print(
        f"reset (hard reset + initial state + 10 settle steps, cameras off while settling): {reset_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
