"""Stand-in training steps per second on a quiet machine vs with one busy core beside them.

    python benchmarks/bench_contention.py            # a table of steps/s and busy/quiet ratios
    python benchmarks/bench_contention.py --steps 8  # shorter

The main job's three training phases (the CUT3R stand-in, the semantic backbone stand-in, stage 1 with the
spatial-token cache) are timed at their real sizes (`StandinConfig()`, the main job's global batches; the
backbone's dense loss left out) in fresh worker processes, each under several settings, first on a quiet
machine and then with one busy-loop process pinned to the last CPU of this process's affinity set (another
user's job on a shared machine). With tiny kernels, OpenMP threads that cannot all run spin at every barrier:
the old default (2 threads, libgomp's active wait) ran 40x slower under one busy core. Target: no phase
slower than 2.5x quiet with the main job's settings (2 data-parallel processes of 1 thread, passive wait:
`cpu_demo.parallel`).

The ratio busy/quiet is measured in one run, per setting; absolute steps/s depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("cut3r", "backbone", "stage1")
# name -> (environment, torch threads or None for configure_threads' choice, data-parallel processes)
SETTINGS = {
    "old: 2 threads, OMP active wait": ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, 1),
    "2 threads, passive wait": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, 1),
    "1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1, 1),
    "main job: 2 processes x 1 thread (DDP)": ({}, 1, 2),
}


def _worker(phase: str, threads: int | None, steps: int, batch: int | None = None) -> float:
    """Median seconds per optimiser step of `phase` (after 3 warm-up steps); under torchrun (WORLD_SIZE > 1)
    a data-parallel step as the main job's (`cpu_demo.parallel`): each rank half the batch, DDP over gloo.
    batch: the global batch (clips for cut3r, samples otherwise; default: the main job's)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from cpu_demo.standins import (
        StandinConfig,
        build_standin_tokenizer,
        pointmap_loss,
        standin_vipa_config,
        token_point_loss,
    )
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    from training.common import configure_threads

    configure_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = StandinConfig()
    tok = build_standin_tokenizer(["the right hand is left of the red mug, 0.3 m"] * 8, cfg.vocab_size)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tok))
    gen = torch.Generator().manual_seed(0)
    S = cfg.spatial_size
    if phase == "cut3r":
        enc = model.model.spatial_encoder.train()
        readout = torch.nn.Linear(enc.config.hidden_size, 3)
        params = [*enc.parameters(), *readout.parameters()]
        clips = (batch or cfg.cut3r_batch) // world
        pixels = torch.randn(clips, cfg.cut3r_frames, 3, S, S, generator=gen)
        points = torch.rand(clips, cfg.cut3r_frames, S, S, 3, generator=gen) + 0.5

        def loss_fn() -> torch.Tensor:
            out = net(pixels, return_heads=True)
            loss = pointmap_loss(out.pts3d_self, out.conf, points)[0]
            return loss + token_point_loss(out.tokens[:, :, 1:], readout, points)[0]

    else:
        n_img, img = model.config.internvl_config.image_seq_length, model.config.image_token_id
        from cpu_demo.main_job import MainJobConfig

        batch = (
            batch or (cfg.backbone_batch if phase == "backbone" else MainJobConfig().stage1_batch)
        ) // world
        text = 80
        ids = torch.randint(10, 300, (batch, n_img + text), generator=gen)
        ids[ids >= 260] = 10
        ids[:, :n_img] = img
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, cfg.tile_size, cfg.tile_size, generator=gen),
            "labels": ids.masked_fill(ids == img, -100),
        }
        if phase == "backbone":  # the single encoder: CUT3R and the fusion skipped
            model.config.use_spatial_branch = False
            params = [
                p for n, p in model.named_parameters() if not n.startswith(("model.spatial", "model.fusion"))
            ]
            inputs["spatial_pixel_values"] = torch.zeros(batch, 1, 3, S, S)
        else:  # stage 1: only the fusion trains; V_spa come from the spatial cache (precomputed tokens)
            params = list(model.model.fusion.parameters())
            n_s = 1 + (S // model.config.spatial_config.patch_size) ** 2
            inputs["spatial_tokens"] = torch.randn(batch, 1, n_s, cfg.cut3r_dim, generator=gen)
        inputs["spatial_frame_mask"] = torch.ones(batch, 1, dtype=torch.bool)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.train()

        def loss_fn() -> torch.Tensor:
            return model(**inputs).loss

    net = enc if phase == "cut3r" else None
    if world > 1:  # the trained module wrapped so its gradients are averaged over the ranks
        ddp = torch.nn.parallel.DistributedDataParallel
        if phase == "cut3r":
            net = ddp(enc, find_unused_parameters=True)
        else:
            model = ddp(model, find_unused_parameters=True)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as the main job's trainers
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if world > 1:  # both ranks done before either exits (tearing the group down here raced at exit)
        dist.barrier()
    return float(np.median(times))


def _busy_loop(cpu: int) -> subprocess.Popen:
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _measure(phase: str, setting: str, steps: int) -> float:
    env_extra, threads, processes = SETTINGS[setting]
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable]
    if processes > 1:  # exactly what the main job's data-parallel phases run under (cpu_demo.parallel.launch)
        from cpu_demo.parallel import worker_environment

        env = worker_environment(env)
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, __file__, "--worker", phase, "--steps", str(steps)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"worker {phase} / {setting} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per phase and condition")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args()
    if a.worker:
        seconds = _worker(a.worker, a.threads, a.steps, a.batch)
        if os.environ.get("RANK", "0") == "0":  # DDP: the ranks step together; rank 0 reports
            print(seconds)
        return
    sys.path.insert(0, str(ROOT))
    from tqdm.auto import tqdm

    cpus = sorted(os.sched_getaffinity(0))
    phases = [x for x in a.phases.split(",") if x]
    print(f"CPUs of this process: {cpus}; busy loop pinned to CPU {cpus[-1]}; {a.steps} timed steps each")
    results: dict = {}
    jobs = [(ph, s) for ph in phases for s in SETTINGS]
    for phase, setting in tqdm(jobs, desc="contention", unit="run"):
        quiet = _measure(phase, setting, a.steps)
        busy_proc = _busy_loop(cpus[-1])
        try:
            busy = _measure(phase, setting, a.steps)
        finally:
            busy_proc.kill()
            busy_proc.wait()
        results.setdefault(phase, {})[setting] = {"quiet_s": quiet, "busy_s": busy, "ratio": busy / quiet}
    width = max(len(s) for s in SETTINGS) + 2
    print(f"\n{'phase':<10}{'setting':<{width}}{'quiet s/step':>14}{'busy s/step':>14}{'busy/quiet':>12}")
    for phase, rows in results.items():
        for setting, r in rows.items():
            print(
                f"{phase:<10}{setting:<{width}}{r['quiet_s']:>14.4f}{r['busy_s']:>14.4f}{r['ratio']:>11.2f}x"
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
