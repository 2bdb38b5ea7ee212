"""Training-step benchmark of the pretraining stages (issue 6 §5), all measured in one run, printed as a table.

Compares, on the same model and the same batch: a stage-1 step (only the fusion layer trains, paper §3.2.3),
a full fine-tuning step (every parameter trains), a stage-2 step (fusion + LLM), and a stage-1 step on
precomputed CUT3R tokens (`spatial_tokens`, what `training/spatial_cache.py` provides). A step is forward +
backward + AdamW step + zero_grad. Each mode runs in its own fresh process so that its peak memory is its own.

Measured per mode: samples/s (best of `--repeats` steps after a warm-up), peak memory (CPU: peak RSS of the
process, `resource.getrusage`, and its rise over the model alone; CUDA: `torch.cuda.max_memory_allocated`),
the bytes autograd saves for backward during the forward (`saved_tensors_hooks`), gradient + AdamW state bytes,
and whether the outputs of the frozen encoders (InternViT, CUT3R) require grad: they must not in stages 1-2,
so that backward never enters them (target: stage-1 step <= 0.5x the full step's time, clearly less memory).

Usage:

    python benchmarks/bench_train.py                         # `small` config (~100 M), CPU
    python benchmarks/bench_train.py --config tiny --repeats 3
    python benchmarks/bench_train.py --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import small_config  # noqa: E402  (the ~100 M config of the model benchmark)

from modeling_vipa.configuration_vipa import VipaConfig  # noqa: E402
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, set_trainable  # noqa: E402

MODES = ("stage1", "full", "stage2", "stage1_cached")
_TRAINS = {
    "stage1": 1,
    "stage2": 2,
    "stage1_cached": 1,
    "full": None,
}  # set_trainable stage; None: everything


def make_batch(config: VipaConfig, batch: int, device: torch.device, text_tokens: int = 32) -> dict:
    """`batch` samples of one frame, a prompt and an answer; labels on the last half of the text (the answer).

    input_ids: (B, L), L = image_seq_length + text_tokens; pixel_values: (B, 3, S, S);
    spatial_pixel_values: (B, 1, 3, Hs, Ws) with Hs = Ws = the CUT3R image size.
    """
    ivl = config.internvl_config
    size = tuple(ivl.vision_config.image_size)
    side = config.spatial_config.img_size if hasattr(config.spatial_config, "img_size") else 32
    side = side if isinstance(side, int) else side[0]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(2, 100, (batch, text_tokens), generator=gen)
    ids = torch.cat([torch.full((batch, ivl.image_seq_length), ivl.image_token_id), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -text_tokens // 2 :] = ids[:, -text_tokens // 2 :]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, *size, generator=gen).to(device),
        "spatial_pixel_values": torch.randn(batch, 1, 3, side, side, generator=gen).to(device),
        "spatial_frame_mask": torch.ones(batch, 1, dtype=torch.bool, device=device),
        "labels": labels.to(device),
    }


def _rss_mb() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def worker(mode: str, config_name: str, batch: int, repeats: int, device: torch.device) -> dict:
    """One mode in this process: returns its measurements (see the module docstring)."""
    torch.manual_seed(0)
    config = small_config() if config_name == "small" else VipaConfig.tiny()
    model = VipaForConditionalGeneration(config).to(device).train()
    stage = _TRAINS[mode]
    if stage is None:
        model.requires_grad_(True)
    else:
        set_trainable(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    inputs = make_batch(config, batch, device)
    if mode == "stage1_cached":
        with torch.no_grad():  # once per clip in a real run; read back from disk in every later epoch
            mask = inputs["spatial_frame_mask"]
            inputs["spatial_tokens"] = model.spatial_encoder(
                inputs.pop("spatial_pixel_values"), frame_mask=mask, return_heads=False
            ).tokens

    frozen_outputs_require_grad = {}

    def record(name: str):
        def hook(module, args, output):
            tensor = output.last_hidden_state if hasattr(output, "last_hidden_state") else output.tokens
            frozen_outputs_require_grad[name] = bool(tensor.requires_grad)

        return hook

    hooks = [
        model.model.vision_tower.register_forward_hook(record("vision_tower")),
        model.model.spatial_encoder.register_forward_hook(record("spatial_encoder")),
    ]
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_model = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warm-up; also allocates the AdamW state
    for h in hooks:
        h.remove()
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - start)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    result = {
        "mode": mode,
        "samples_per_s": batch / best,
        "step_s": best,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "saved_for_backward_mb": saved[0] / 2**20,
        "grad_and_adam_mb": (sum(p.numel() * p.element_size() for p in params) + state_bytes) / 2**20,
        "frozen_outputs_require_grad": frozen_outputs_require_grad,
        "frozen_params_with_grad": len(frozen_grads),
    }
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_over_model_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        result["peak_mb"] = _rss_mb()
        result["peak_over_model_mb"] = _rss_mb() - rss_model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "small"), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.batch, args.repeats, device)))
        return

    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--config", args.config, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])

    full = results["full"]
    print(
        f"config={args.config} batch={args.batch} device={device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} machine={platform.machine()} {platform.processor() or ''}"
    )
    header = (
        f"{'mode':<14}{'trainable':>12}{'samples/s':>11}{'step s':>9}{'x full':>8}{'peak MB':>9}"
        f"{'+model MB':>10}{'x full':>8}{'saved MB':>10}{'grad+Adam MB':>13}  frozen encoder outputs need grad"
    )
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        print(
            f"{mode:<14}{r['trainable']:>12,}{r['samples_per_s']:>11.2f}{r['step_s']:>9.3f}"
            f"{r['step_s'] / full['step_s']:>8.2f}{r['peak_mb']:>9.0f}{r['peak_over_model_mb']:>10.0f}"
            f"{r['peak_over_model_mb'] / max(full['peak_over_model_mb'], 1e-9):>8.2f}"
            f"{r['saved_for_backward_mb']:>10.1f}{r['grad_and_adam_mb']:>13.1f}  {r['frozen_outputs_require_grad']}"
        )
    stage1 = results["stage1"]
    ok_time = stage1["step_s"] <= 0.5 * full["step_s"]
    ok_grad = (
        not any(stage1["frozen_outputs_require_grad"].values()) and stage1["frozen_params_with_grad"] == 0
    )
    print(
        f"stage-1 step / full step: {stage1['step_s'] / full['step_s']:.2f}x time (target <= 0.5: "
        f"{'met' if ok_time else 'NOT met'}), {stage1['saved_for_backward_mb'] / full['saved_for_backward_mb']:.2f}x "
        f"saved activations; frozen encoders outside autograd: {'yes' if ok_grad else 'NO'}"
    )


if __name__ == "__main__":
    main()
