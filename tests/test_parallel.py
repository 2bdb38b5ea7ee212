"""`cpu_demo.parallel`: the main job's data-parallel phases. One data-parallel step of the CUT3R stand-in on two
ranks (gloo, each rank its own clip) must equal one full-batch step in one process on both clips, computed here
by hand with torch's own AdamW; the ranks must end with identical weights."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpu_demo.parallel import PROCESSES_ENV, demo_processes, rank_and_world, worker_environment
from cpu_demo.standins import StandinConfig, _Cut3rObjective, pretrain_cut3r, standin_cut3r_config
from modeling_vipa.spatial_encoder import Cut3rEncoder
from training.common import available_cpus

FRAMES, SIZE = 2, 32  # frames per clip (= cut3r_frames: the sampled window is the whole clip), pixels


def _cfg() -> StandinConfig:
    return replace(
        StandinConfig.quick(), spatial_size=SIZE, cut3r_steps=1, cut3r_batch=2, cut3r_frames=FRAMES,
        cut3r_lr=1e-2, cut3r_token_weight=1.0,
    )  # fmt: skip


def _clips() -> list[dict]:
    """Two clips with depth everywhere (no holes: each rank's loss is a mean over the same number of terms, so
    the average of the ranks' losses is the full batch's loss)."""
    rng = np.random.default_rng(3)
    clips = []
    for _ in range(2):
        pixels = rng.normal(size=(FRAMES, 3, SIZE, SIZE)).astype(np.float32)
        points = rng.normal(size=(FRAMES, SIZE, SIZE, 3)).astype(np.float32)
        points[..., 2] = rng.uniform(0.5, 2.0, size=(FRAMES, SIZE, SIZE))
        clips.append({"pixels": pixels, "points": points})
    return clips


def _encoder() -> Cut3rEncoder:
    torch.manual_seed(0)
    return Cut3rEncoder(standin_cut3r_config(_cfg()))


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        encoder = _encoder()
        summary = pretrain_cut3r(encoder, [_clips()[rank]], _cfg(), None, seed=0, progress=False)
        assert summary["processes"] == world and rank_and_world() == (rank, world)
        torch.save(encoder.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~10 s
def test_two_rank_cut3r_step_equals_one_full_batch_step_by_hand(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), (
        "the ranks' weights diverged: gradients were not averaged"
    )

    # by hand: one process, both clips in one batch, the same objective, clipping, AdamW and first-step lr
    cfg = _cfg()
    encoder = _encoder()
    torch.manual_seed(0)  # pretrain_cut3r seeds before building the token readout
    objective = _Cut3rObjective(encoder, cfg.cut3r_token_weight)
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    clips = _clips()
    pixels = torch.from_numpy(np.stack([c["pixels"] for c in clips]))
    points = torch.from_numpy(np.stack([c["points"] for c in clips]))
    loss, _ = objective(pixels, points)
    loss.backward()
    params = list(objective.parameters())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    # AdamW's first step moves each weight by ~lr * sign(grad): where the gradient is float noise (e.g. a key
    # bias, to which softmax is blind: its exact gradient is 0) the sign is arbitrary, so only weights with a
    # clear gradient are compared
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in grads.values())
    warm = max(1, cfg.cut3r_steps // 30)
    lr0 = cfg.cut3r_lr * min(1.0, 1 / warm) * 0.5 * (1 + math.cos(0.0))
    torch.optim.AdamW(params, lr=lr0, weight_decay=0.01).step()
    expected = encoder.state_dict()
    compared = total = 0
    for name, grad in grads.items():
        clear = grad.abs() > 1e-5 * scale
        compared, total = compared + int(clear.sum()), total + grad.numel()
        assert not torch.equal(expected[name][clear], before[name][clear]) or not clear.any()
        torch.testing.assert_close(w0[name][clear], expected[name][clear], rtol=1e-4, atol=1e-6, msg=name)
    untouched = [k for k in expected if k not in grads]  # no gradient in either run: unchanged in both
    assert all(torch.equal(w0[k], before[k]) for k in untouched)
    assert compared > 0.5 * total, (compared, total)


def test_demo_processes_follows_the_cpus_and_the_override() -> None:
    assert demo_processes({}) == max(1, min(2, available_cpus()))
    assert demo_processes({PROCESSES_ENV: "1"}) == 1 and demo_processes({PROCESSES_ENV: "2"}) == 2
    for bad in ("3", "0", "two"):
        with pytest.raises(ValueError, match=PROCESSES_ENV):
            demo_processes({PROCESSES_ENV: bad})


def test_worker_environment_is_one_thread_with_passive_waiting() -> None:
    env = worker_environment({"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "8"})
    assert env["OMP_NUM_THREADS"] == "1" and env["VIPA_NUM_THREADS"] == "1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert (
        worker_environment({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    )  # the user's choice


def test_an_unknown_rank_phase_is_named() -> None:
    from cpu_demo.main_job import MainJobConfig, run_phase

    with pytest.raises(ValueError, match="'nope'"):
        run_phase("nope", MainJobConfig(), StandinConfig.quick(), {}, {})
