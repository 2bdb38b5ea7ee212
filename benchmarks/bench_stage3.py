"""Stage-3 and policy benchmarks (issue 14 §5), measured in one run, printed as ratios against baselines of the same run.

(a) a stage-3 training step (semantic encoder and CUT3R frozen; LLM, fusion and action head train) vs a full
    fine-tune step of the same model and batch: time and memory (target <= 0.6x the time, clearly less memory);
    memory is the peak resident set size growth of a fresh process over its model-built baseline on CPU, the
    peak allocated memory on a GPU;
(b) `VipaPolicy.predict_action_chunk` (N = 10 Euler steps; preprocessing included) and the model's
    `predict_action` vs one prefix forward (`encode_action_queries`) at the tiny config (target <= 1.5x);
(c) the control rate of `select_action` with chunking (H = 16, 8 actions executed per chunk) on CPU at the tiny
    config with two 224 x 224 cameras (target >= 50 Hz);
(d) the policy server: loopback round trip minus the server's own inference time, and minus the in-process
    `predict_action_chunk` time, at 2 x 224^2 uint8 images (target <= 5 ms per call).

Usage:

    python benchmarks/bench_stage3.py                      # tiny and small configs, CPU (or --device cuda)
    python benchmarks/bench_stage3.py --configs tiny --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.tiny_assets: the tiny processor

from bench_model import small_config, time_interleaved  # noqa: E402  same folder: one small model

from evaluation.policy import EmbodimentSpec, PolicyConfigFile, VipaPolicy, prepare_observation_inputs  # noqa: E402
from modeling_vipa.configuration_vipa import VipaActionHeadConfig, VipaConfig  # noqa: E402
from modeling_vipa.modeling_vipa import VipaForActionPrediction  # noqa: E402
from tests.tiny_assets import build_tiny_processor, tiny_vipa_config  # noqa: E402
from training.stage3 import Stage3Recipe, StartPoint, masked_flow_loss, stage3_trainable_prefixes  # noqa: E402

CAMERAS = ("observation.images.image", "observation.images.wrist_image")


def tiny_config(horizon: int = 4) -> VipaConfig:
    return VipaConfig.tiny(action_head_config=VipaActionHeadConfig.tiny(horizon=horizon))


def train_batch(config: VipaConfig, batch: int, spatial_side: int, device: torch.device) -> dict:
    """`batch` samples of one frame each (the paper's post-training input) with a 24-token instruction."""
    ivl, head = config.internvl_config, config.action_head_config
    size = tuple(ivl.vision_config.image_size)
    ids = [1] + [ivl.image_token_id] * ivl.image_seq_length + [2 + i % 50 for i in range(24)]
    g = torch.Generator().manual_seed(0)
    actions = torch.randn(batch, head.horizon, head.action_dim, generator=g)
    return {
        "input_ids": torch.tensor([ids] * batch, device=device),
        "attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch, 3, *size, generator=g).to(device),
        "spatial_pixel_values": torch.randn(batch, 1, 3, spatial_side, spatial_side, generator=g).to(device),
        "spatial_frame_mask": torch.ones(batch, 1, dtype=torch.bool, device=device),
        "state": torch.randn(batch, head.state_dim, generator=g).to(device),
        "actions": actions.to(device),
        "noise": torch.randn(actions.shape, generator=g).to(device),
        "tau": torch.rand(batch, generator=g).to(device),
        "mask": torch.ones_like(actions).to(device),
    }


def build_step(config: VipaConfig, variant: str, device: torch.device, batch: dict):
    """(model, one-optimiser-step function) for `variant` "frozen" (stage 3) or "full" (everything trains)."""
    torch.manual_seed(0)
    model = VipaForActionPrediction(config).to(device)
    start = StartPoint("stage2", True, True, 0.5)
    prefixes = stage3_trainable_prefixes(model, Stage3Recipe(), start)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(variant == "full" or name.startswith(prefixes))
    if variant == "frozen":
        for module in (
            model.model.vision_tower,
            model.model.spatial_encoder,
            model.model.multi_modal_projector,
        ):
            module.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs = {k: v for k, v in batch.items() if k not in ("mask",)}

    def step() -> None:
        out = model(**inputs)
        loss = masked_flow_loss(out.velocity, batch["actions"] - batch["noise"], batch["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def memory_child(config_name: str, variant: str, batch_size: int) -> None:
    """In a fresh process: peak RSS growth of 3 training steps over the built model and batch (CPU)."""
    config, side = CONFIGS[config_name]()
    batch = train_batch(config, batch_size, side, torch.device("cpu"))
    _, step = build_step(config, variant, torch.device("cpu"), batch)
    base = peak_rss_mb()
    for _ in range(3):
        step()
    print(json.dumps({"delta_mb": peak_rss_mb() - base}))


def bench_step(name: str, repeats: int, device: torch.device, batch_size: int) -> dict[str, float]:
    config, side = CONFIGS[name]()
    batch = train_batch(config, batch_size, side, device)
    steps, memory = {}, {}
    for variant in ("frozen", "full"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        model, steps[variant] = build_step(config, variant, device, batch)
        if device.type == "cuda":
            steps[variant]()
            memory[variant] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del model
        else:
            cmd = [sys.executable, __file__, "--memory-child", name, variant, str(batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]
    t = time_interleaved(steps, repeats, device)
    print(f"\n[{name}] stage-3 step, batch {batch_size}, device {device}, best of {repeats}")
    for variant in ("frozen", "full"):
        print(f"  {variant:<8} {t[variant] * 1e3:9.1f} ms   memory +{memory[variant]:8.1f} MiB")
    return {
        f"[{name}] frozen / full step time (<= 0.6)": t["frozen"] / t["full"],
        f"[{name}] frozen / full step memory": memory["frozen"] / max(memory["full"], 1e-9),
    }


def tiny_policy(horizon: int, n_action_steps: int, device: torch.device) -> VipaPolicy:
    """An untrained tiny policy (timings do not depend on the weights) with two cameras and LIBERO widths."""
    processor = build_tiny_processor()  # tiny_norm_stats(): key "tiny", action 7, state 8
    torch.manual_seed(0)
    head = VipaActionHeadConfig.tiny(horizon=horizon)
    model = VipaForActionPrediction(tiny_vipa_config(processor, action_head_config=head)).to(device).eval()
    spec = EmbodimentSpec("tiny", list(CAMERAS), state_dim=8, action_dim=7, fps=20.0)
    return VipaPolicy(model, processor, spec, n_action_steps=n_action_steps)


def observation(size: int = 224, batch: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    lead = () if batch is None else (batch,)
    obs = {k: rng.integers(0, 255, (*lead, size, size, 3), dtype=np.uint8) for k in CAMERAS}
    obs["observation.state"] = rng.normal(size=(*lead, 8)).astype(np.float32)
    obs["task"] = "put the bowl on the plate"
    return obs


def time_policy(policy: VipaPolicy, obs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Best-of times (s) of the prefix, the model's predict_action (N = 10) and the policy's chunk."""
    frames, tasks, _, _, _ = policy._parse(obs)
    inputs = prepare_observation_inputs(policy.processor, frames, tasks)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    state = torch.randn(1, 8, device=device)
    model = policy.model
    with torch.inference_mode():
        return time_interleaved(
            {
                "prefix": lambda: model.encode_action_queries(**inputs),
                "predict_action": lambda: model.predict_action(
                    **inputs, state=state, num_steps=10, return_normalized=True
                ),
                "predict_action_chunk": lambda: policy.predict_action_chunk(obs),
                "preprocess": lambda: prepare_observation_inputs(policy.processor, frames, tasks),
            },
            repeats,
            device,
        )


def bench_policy(repeats: int, device: torch.device) -> dict[str, float]:
    """(b) at H = 4 (the tiny head, bench_model's setting) and H = 16; (c) at H = 16 with 8 executed."""
    rows: dict[str, float] = {}
    obs = observation()
    for horizon in (4, 16):
        policy = tiny_policy(horizon=horizon, n_action_steps=min(8, horizon), device=device)
        t = time_policy(policy, obs, repeats, device)
        print(f"\n[tiny] policy, 2 x 224^2 cameras, H = {horizon}, device {device}, best of {repeats}")
        for key, value in t.items():
            print(f"  {key:<22} {value * 1e3:9.2f} ms")
        tag = f"[tiny, H={horizon}]"
        rows[f"{tag} predict_action (N=10) / prefix (<= 1.5)"] = t["predict_action"] / t["prefix"]
        rows[f"{tag} predict_action_chunk / prefix (preprocessing included)"] = (
            t["predict_action_chunk"] / t["prefix"]
        )
    calls = 8 * max(4, repeats)
    policy.reset()
    policy.select_action(obs)  # warm-up
    policy.reset()
    start = time.perf_counter()
    for _ in range(calls):
        policy.select_action(obs)
    rate = calls / (time.perf_counter() - start)
    print(f"  select_action rate     {rate:9.1f} Hz (8 of 16 actions executed per chunk)")
    rows["[tiny, H=16] select_action control rate, Hz (>= 50)"] = rate
    return rows


def bench_server(repeats: int) -> dict[str, float]:
    """Server in its own process (CPU), client here; in-process time measured here on the same checkpoint."""
    from evaluation.policy_client import PolicyClient

    policy = tiny_policy(horizon=16, n_action_steps=8, device=torch.device("cpu"))
    obs = observation()
    with tempfile.TemporaryDirectory() as tmp:
        policy.model.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        PolicyConfigFile({"tiny": policy.spec}, "tiny").write(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [
            sys.executable,
            "-m",
            "evaluation.server",
            "--policy",
            tmp,
            "--port",
            str(port),
            "--device",
            "cpu",
        ]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = PolicyClient("127.0.0.1", port)
            client.wait_until_ready(120)
            client.infer(obs)  # warm-up
            in_process = time_interleaved(
                {"local": lambda: policy.predict_action_chunk(obs)}, repeats, torch.device("cpu")
            )
            round_trips, server_ms = [], []
            for _ in range(max(5, repeats)):
                tic = time.perf_counter()
                reply = client.infer(obs)
                round_trips.append(time.perf_counter() - tic)
                server_ms.append(reply["server_timing"]["infer_ms"])
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    transport = min(r * 1e3 - s for r, s in zip(round_trips, server_ms, strict=True))
    print("\n[tiny] policy server on loopback, 2 x 224^2 uint8 images, CPU")
    print(f"  in-process chunk       {in_process['local'] * 1e3:9.2f} ms")
    print(f"  round trip (best)      {min(round_trips) * 1e3:9.2f} ms")
    print(f"  server inference       {min(server_ms):9.2f} ms")
    return {
        "[server] round trip - server inference, ms (<= 5)": transport,
        "[server] round trip - in-process chunk, ms": min(round_trips) * 1e3 - in_process["local"] * 1e3,
    }


CONFIGS = {"tiny": lambda: (tiny_config(), 32), "small": lambda: (small_config(), 224)}


def main() -> None:
    parser = argparse.ArgumentParser(description="stage-3 and policy benchmarks")
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="samples per training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--memory-child", nargs=3, metavar=("CONFIG", "VARIANT", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return
    device = torch.device(args.device)
    rows: dict[str, float] = {}
    for name in args.configs:
        rows.update(bench_step(name, args.repeats, device, args.batch))
    rows.update(bench_policy(args.repeats, torch.device("cpu")))
    if device.type == "cuda":
        rows.update(
            {k.replace("[tiny", "[cuda, tiny"): v for k, v in bench_policy(args.repeats, device).items()}
        )
    rows.update(bench_server(args.repeats))
    print("\n| measurement | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value:.3g} |")


if __name__ == "__main__":
    main()
