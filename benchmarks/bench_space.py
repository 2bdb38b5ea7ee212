"""Space benchmarks (issue 7 §4), measured in one run on CPU with the tiny random checkpoint:

(a) latency per request of `/spatial_qa` (2 frames) and `/predict_trajectory`, p50/p95 over sequential
    `gradio_client` calls to the app served in a subprocess on loopback, beside the same prediction called
    in-process (`app.vipa_demo`), so the ratio is the serving overhead (upload, queue, JSON, plot);
(b) 8 concurrent `gradio_client` callers (each its own client, alternating endpoints) for 30 s: requests
    served, errors (target: none), throughput and the latency under load.

Usage, from the repository root:

    python benchmarks/bench_space.py                          # 20 sequential requests, 8 callers x 30 s
    python benchmarks/bench_space.py --requests 5 --duration 5 --callers 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradio_client import Client, handle_file  # noqa: E402

from tests.test_space import build_tiny_checkpoint, launch_space, write_examples  # noqa: E402
from tests.tiny_assets import make_image  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="sequential requests per endpoint")
    parser.add_argument("--callers", type=int, default=8, help="concurrent gradio_client callers")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of concurrent load")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request limit under load, seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "ckpt")
        frames = [root / f"f{i}.png" for i in range(2)]
        for i, f in enumerate(frames):
            make_image(240, 320, seed=i).save(f)
        proc, url = launch_space(ckpt, write_examples(root / "examples"), root / "app.log")
        try:
            qa_args = (
                [handle_file(str(f)) for f in frames],
                "Where is the mug relative to the right hand?",
                "",
            )
            tr_args = (handle_file(str(frames[0])), "Pick up the mug.", "")
            calls = {"/spatial_qa": qa_args, "/predict_trajectory": tr_args}

            # (a) sequential latency, served and in-process
            from spaces_demo.app import build_app

            demo = build_app(str(ckpt), examples_dir=None).vipa_demo
            local = {
                "/spatial_qa": lambda: demo.spatial_qa([str(f) for f in frames], qa_args[1], ""),
                "/predict_trajectory": lambda: demo.predict_trajectory(str(frames[0]), tr_args[1], ""),
            }
            client = Client(url, verbose=False)
            rows = []
            for api, call_args in calls.items():
                served, inproc = [], []
                for i in range(args.requests + 2):  # 2 warm-up calls
                    t = time.perf_counter()
                    client.predict(*call_args, api_name=api)
                    dt = time.perf_counter() - t
                    t = time.perf_counter()
                    local[api]()
                    dl = time.perf_counter() - t
                    if i >= 2:
                        served.append(dt)
                        inproc.append(dl)
                rows.append((api, served, inproc))

            # (b) concurrent callers
            stop = time.monotonic() + args.duration
            lock = threading.Lock()
            served_lat: list[float] = []
            errors: list[str] = []

            def caller(k: int) -> None:
                c = Client(url, verbose=False)
                apis = list(calls)
                i = k
                while time.monotonic() < stop:
                    api = apis[i % 2]
                    i += 1
                    t = time.perf_counter()
                    try:
                        c.submit(*calls[api], api_name=api).result(timeout=args.timeout)
                        with lock:
                            served_lat.append(time.perf_counter() - t)
                    except Exception as e:  # counted, not raised: the number of errors is the result
                        with lock:
                            errors.append(f"{api}: {type(e).__name__}: {e}"[:200])

            t0 = time.monotonic()
            threads = [threading.Thread(target=caller, args=(k,)) for k in range(args.callers)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(args.duration + args.timeout + 30)
            wall = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nSpace latency on CPU, tiny random checkpoint, {args.requests} sequential requests per endpoint")
    print(f"| {'endpoint':<20} | {'served p50 ms':>13} | {'served p95 ms':>13} | {'in-process p50 ms':>17} | "
          f"{'served / in-process':>19} |")  # fmt: skip
    print(f"|{'-' * 22}|{'-' * 15}|{'-' * 15}|{'-' * 19}|{'-' * 21}|")
    for api, served, inproc in rows:
        ratio = np.median(served) / np.median(inproc)
        print(f"| {api:<20} | {_pct(served, 50):>13.1f} | {_pct(served, 95):>13.1f} | "
              f"{_pct(inproc, 50):>17.1f} | {ratio:>18.2f}x |")  # fmt: skip
    print(
        f"\n{args.callers} concurrent gradio_client callers for {args.duration:.0f} s "
        "(loopback, alternating endpoints, the same inputs from every caller)"
    )
    print(f"| {'served':>6} | {'errors':>6} | {'req/s':>6} | {'p50 ms':>8} | {'p95 ms':>8} |")
    print(f"|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    print(f"| {len(served_lat):>6} | {len(errors):>6} | {len(served_lat) / wall:>6.2f} | "
          f"{_pct(served_lat, 50):>8.1f} | {_pct(served_lat, 95):>8.1f} |")  # fmt: skip
    for e in errors[:5]:
        print("error:", e)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
