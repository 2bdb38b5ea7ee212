"""The main job on the embedded default (README command 1, `make demo`): build a synth Hand3D, train stand-ins for
the pretrained parts, run the paper's pretraining stages 1 and 2, evaluate on the Hand3D test split, print a
table shaped like the paper's Table 8, write plots and `results.json`, then serve the Space.

    python -m cpu_demo                      # outputs/demo, ~14 min on 2 CPU cores, then serves (= make demo)
    python -m cpu_demo --quick --no-serve   # seconds-long smoke run (tests)

Phases, each writing its outputs atomically (a temporary folder renamed, or a marker file written last) and
skipped when already complete, so an interrupted run continues where it stopped. The training phases (3, 4,
6, 7, 11) run data parallel on min(2, usable CPUs) processes of one thread each, phases 8-10 side by side
(`cpu_demo.parallel`; `VIPA_DEMO_PROCESSES=1`: everything in this process):

1. `hand3d/`: synth Hand3D (`hand3d build`; the builder resumes by shard); the rendered clips are kept in
   `render_cache/` for phases 3, 4 and 9, and removed once they are done.
2. `standins/init/`: tokenizer (BPE on the train texts), processor and the random stand-in VIPA model.
3. `standins/cut3r/`: the CUT3R STAND-IN, pointmap regression from rendered metric depth (synth train clips),
   plus a linear 3D readout of its patch tokens (`pretrain_standins.token_point_loss`).
4. `single_encoder/`: the semantic backbone STAND-IN (tiny InternVL, 3D branch off), trained on Hand3D-visual
   train plus a dense "name what each image token shows" loss on the same train frames (`cpu_demo.dense_names`,
   the stand-in for InternVL's grounding pretraining): Table 8's "single-encoder model trained with Hand3D".
5. `standins/vipa_init/`: VIPA-VLA initialised as the paper does (§3.2.3): that backbone + the CUT3R stand-in
   + a freshly initialised fusion layer (alpha = 0.5).
6. `runs/stage1/`: stage 1 (`training.stage1`: only the fusion layer, Hand3D-visual) -> Table 8's VIPA-VLA-PT.
7. `vipa/`: stage 2 (`training.stage2`: motion tokens + fusion + LLM, Hand3D-action): the served checkpoint.
8. `eval/`: the three Table 8 rows on the visual test split (+ stage 2's trajectories on the action test split),
   `results.json`, `figure8.png`, `figure9.png`.
9. `eval/probe3d.json`, `probe3d.png`: what the tokens carry (`evaluation.probe3d`): a linear probe of V_sem,
   V_spa, V_f and the LLM input of VIPA-VLA-PT for the 3D centres of objects and hands, scored on test-frame
   pairs like Hand3D answers, next to the answers' scores (perception vs reading); and the answers' NLL on
   test rows with the 3D branch as trained, with V_spa zeroed and with alpha = 0 (does the fusion matter?).

10. `robot/demos/`: Meta-World demonstrations of the scripted experts (`evaluation.demos`, LeRobot v3) for a few
   tasks; failed expert episodes dropped and counted.
11. `runs/stage3/`: stage 3 (`training.stage3`: LLM + action head + fusion on the demonstrations) from the stage-2
   checkpoint `vipa/`: the closed-loop policy.
12. `robot/eval/`: closed-loop Meta-World evaluation (`evaluation.rollout`) on seeds the demonstrations never
   used, next to the scripted expert (ceiling) and a random policy (floor); success table, per-episode records,
   MP4 videos (the Space's "Robot rollouts" tab plays them); `vipa-eval` gives the same numbers for the same seeds.

A fair comparison: the single-encoder model and VIPA-VLA share the same backbone and the same Hand3D-visual
training steps; VIPA-VLA then trains only its fusion layer (stage 1), never the backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["MainJobConfig", "run_main_job", "format_table", "main"]

from hand3d_dataset.atomic import write_json
from training.common import TRAINING_MARKER


@dataclass
class MainJobConfig:
    """Sizes of one main-job run; `quick()` for tests."""

    out: str = "outputs/demo"  # output folder of every phase
    num_clips: int = 1500  # synth clips (about 9 visual + 3 action samples each; ~10% go to the test split)
    image_size: int = (
        128  # rendered frame side, px (= the CUT3R stand-in's input: pointmaps at full resolution)
    )
    frames: int = 3  # frames per clip (samples show 1-3: each frame costs a CUT3R pass)
    num_workers: int = 2  # processes of the dataset build
    cut3r_clips: int = 200  # synth TRAIN clips rendered (with depth) for the CUT3R stand-in
    stage1_steps: int = 600  # optimiser steps of stage 1 (cpu-tiny recipe, global batch stage1_batch)
    stage1_batch: int = 16  # global batch of stage 1 (split over the data-parallel processes)
    stage2_steps: int = (
        600  # optimiser steps of stage 2 (cpu-tiny recipe, global batch 8; 300: final error +0.07 m)
    )
    eval_limit: int | None = None  # test rows per config evaluated (None: all)
    eval_batch_size: int = 16  # prompts per generate() call
    eval_max_new_tokens: int = 48  # answer tokens generated per visual question (answers use ~20-35)
    seed: int = 0  # data and model seed
    fusion_qk_position: str = "none"  # VipaFusionConfig.qk_position of the composed VIPA-VLA ("none": paper)
    probe_train_clips: int = 300  # train clips the phase-9 probe (evaluation.probe3d) fits on; 0: phase 9 off
    ablation_rows: int = 200  # test rows (evenly spaced) of phase 9's 3D-branch ablation of the answers
    robot_tasks: str = (
        "drawer-open-v3,button-press-topdown-v3,window-open-v3"  # phases 10-12's tasks; "": off
    )
    robot_demo_episodes: int = 15  # expert attempts per task (seeds 0..N-1; failures dropped)
    robot_image_size: int = 64  # Meta-World camera side, px, of demonstrations and evaluation
    robot_max_steps: int = 120  # episode cap of demos and evaluation (these tasks' experts need 59-96 steps)
    robot_stage3_steps: int = (
        1500  # stage-3 optimiser steps (cpu-tiny recipe, global batch 8; 150: 0 % success)
    )
    robot_eval_episodes: int = 10  # closed-loop episodes per task and policy
    robot_eval_seed: int = 1000  # seed of evaluation episode 0 (checked disjoint from the demos' seeds)
    robot_workers: int = 2  # environment processes of the closed-loop evaluation
    quick: bool = False  # the test-sized run
    standins: dict = field(default_factory=dict)  # StandinConfig overrides

    def __post_init__(self) -> None:
        from modeling_vipa.configuration_vipa import VipaFusionConfig

        try:  # the fusion config owns the allowed values: fail now, not after the stand-ins have trained
            VipaFusionConfig(qk_position=self.fusion_qk_position)
        except ValueError as e:
            raise ValueError(f"MainJobConfig.fusion_qk_position: {e}") from e
        if self.ablation_rows < 1:
            raise ValueError(f"MainJobConfig.ablation_rows: must be >= 1, got {self.ablation_rows}")
        for name in ("stage1_batch", "robot_demo_episodes", "robot_image_size", "robot_max_steps", "robot_stage3_steps", "robot_eval_episodes", "robot_workers"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MainJobConfig.{name}: must be an int >= 1, got {getattr(self, name)!r}")
        if self.robot_eval_seed < self.robot_demo_episodes:  # demonstrations use seeds 0..episodes-1
            raise ValueError(
                f"MainJobConfig.robot_eval_seed: {self.robot_eval_seed} overlaps the demonstration seeds "
                f"0..{self.robot_demo_episodes - 1}"
            )
        if self.probe_train_clips < 0:
            raise ValueError(
                f"MainJobConfig.probe_train_clips: must be >= 0 (0: off), got {self.probe_train_clips}"
            )

    @classmethod
    def quick_config(cls, out: str) -> MainJobConfig:
        """A smoke-test run: a few clips, a few steps, nothing learnt."""
        return cls(
            out=out, num_clips=8, image_size=64, frames=3, num_workers=1, cut3r_clips=3, stage1_steps=2,
            stage2_steps=2, eval_limit=4, eval_batch_size=4, eval_max_new_tokens=6, probe_train_clips=7, ablation_rows=4, quick=True,
            robot_tasks="reach-v3", robot_demo_episodes=1, robot_image_size=32, robot_max_steps=60,
            robot_stage3_steps=2, robot_eval_episodes=1, robot_workers=1,
        )  # fmt: skip


# ---- phase plumbing --------------------------------------------------------------------------------------------
@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only when the block succeeds."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class _Phases:
    """Wall time per phase, kept in `phase_times.json` across resumed runs."""

    def __init__(self, out: Path) -> None:
        self.path = out / "phase_times.json"
        self.times = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def run(self, name: str, done: bool) -> Iterator[bool]:
        """Yields True when the phase must run; records its seconds (or that it was skipped)."""
        if done:
            print(f"[main_job] {name}: already complete, skipped", flush=True)
            self.times.setdefault(name, {"seconds": None})["skipped_last_run"] = True
            write_json(self.times, self.path)
            yield False
            return
        print(f"[main_job] {name} ...", flush=True)
        t0 = time.time()
        yield True
        self.times[name] = {"seconds": round(time.time() - t0, 1), "skipped_last_run": False}
        print(f"[main_job] {name}: {self.times[name]['seconds']} s", flush=True)
        write_json(self.times, self.path)

    def run_concurrently(
        self, lanes: dict[str, tuple[str, bool, dict]], cfg: MainJobConfig, scfg: Any, processes: int
    ) -> None:
        """Phases that need nothing of each other (label -> (phase, done, spec)): one after the other in this
        process when `processes` is 1, else one `cpu_demo.phase_worker` each, `processes` at a time (each
        phase's seconds: from its start to its end, overlapping the others')."""
        from cpu_demo.parallel import run_lanes

        todo = {}
        for label, (phase, done, spec) in lanes.items():
            if processes == 1 or done:
                with self.run(label, done) as run:
                    if run:
                        run_phase(phase, cfg, scfg, spec["paths"], spec["extra"])
            else:
                todo[label] = (phase, [str(Path(cfg.out) / "job_config.json"), json.dumps(spec)])
        if not todo:
            return
        print(f"[main_job] {', '.join(todo)}: one process each, {processes} at a time ...", flush=True)
        for label, seconds in run_lanes(todo, processes).items():
            self.times[label] = {"seconds": round(seconds, 1), "skipped_last_run": False, "concurrent": True}
            print(f"[main_job] {label}: {self.times[label]['seconds']} s (concurrent)", flush=True)
        write_json(self.times, self.path)


# ---- phases ----------------------------------------------------------------------------------------------------
def _build_dataset(cfg: MainJobConfig, data_dir: Path) -> None:
    from hand3d_dataset.build import BuildConfig, build

    build(
        BuildConfig(
            source="synth", num_clips=cfg.num_clips, out=str(data_dir), num_workers=cfg.num_workers,
            seed=cfg.seed, image_size=cfg.image_size, frames=cfg.frames,
            # the paper's annotation path (point cloud + boxes), as for real video without object poses;
            # `auto` would read synth's exact object poses instead
            object_source="estimate",
            synth_cache=str(_render_cache(cfg)),  # phases 3, 4 and 9 read these pixels instead of rendering
        )
    )  # fmt: skip


def _texts(dataset: Any) -> list[str]:
    return [c["text"] for msgs in dataset["messages"] for m in msgs for c in m["content"] if c.get("text")]


def _init_standins(cfg: MainJobConfig, scfg: Any, data_dir: Path, out: Path) -> None:
    import torch

    from cpu_demo.standins import (
        STANDIN_NOTE,
        build_standin_processor,
        build_standin_tokenizer,
        init_standin_vision_positions,
        standin_vipa_config,
    )
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    from training.sft import load_hand3d_split

    # train split only: the test texts must not shape the vocabulary either
    texts = _texts(load_hand3d_split(data_dir, "visual", "train"))
    tokenizer = build_standin_tokenizer(texts, scfg.vocab_size)
    processor = build_standin_processor(scfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = VipaForConditionalGeneration(standin_vipa_config(scfg, tokenizer))
    init_standin_vision_positions(model)  # zero (transformers' init) leaves the tiny ViT blind to position
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    write_json({"stand_in": True, "note": STANDIN_NOTE, "trained": False}, out / "standin_info.json")


def _synth_train_clips(cfg: MainJobConfig, limit: int | None, desc: str) -> Iterator[Any]:
    """The synth TRAIN clips of the build, rendered again (with depth and segmentation, which Hand3D rows lack).

    The build's split rule by clip position: nothing of a test clip ever teaches a stand-in. In a
    data-parallel phase, this rank's share of them (every world-th clip from the rank's).
    """
    from cpu_demo.parallel import rank_and_world
    from evaluation.probe3d import synth_split_clips

    return synth_split_clips(
        cfg.num_clips, cfg.seed, cfg.image_size, cfg.frames, False, limit, desc, shard=rank_and_world(),
        cache_dir=_render_cache(cfg),
    )  # fmt: skip


def _render_cache(cfg: MainJobConfig) -> Path:
    """The build's synth render cache: the pixels, depth and segmentation of every clip, read back by the
    stand-ins (phases 3-4) and the probe (9) instead of rendering again; removed once phase 9 is done."""
    return Path(cfg.out) / "render_cache"


def _train_cut3r(cfg: MainJobConfig, scfg: Any, init_dir: Path, out: Path) -> None:
    """Phase 3 (data parallel under `cpu_demo.parallel.launch`: rank 0 writes `out`)."""
    import torch.distributed as dist

    from cpu_demo.parallel import rank_and_world
    from cpu_demo.standins import STANDIN_NOTE, prepare_cut3r_clips, pretrain_cut3r
    from evaluation.probe3d import synth_split_indices
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    from processing_vipa.processing_vipa import VipaProcessor

    rank, world = rank_and_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    model = VipaForConditionalGeneration.from_pretrained(str(init_dir))
    processor = VipaProcessor.from_pretrained(str(init_dir), trust_remote_code=False)
    encoder = model.model.spatial_encoder
    clips = prepare_cut3r_clips(
        _synth_train_clips(cfg, cfg.cut3r_clips, "render synth depth"), processor, scfg.spatial_size
    )
    summary = pretrain_cut3r(encoder, clips, scfg, processor, seed=cfg.seed)
    clips_all_ranks = len(synth_split_indices(cfg.num_clips, False, cfg.cut3r_clips))
    summary.update(stand_in=True, note=STANDIN_NOTE, clips=clips_all_ranks)
    if rank == 0:
        encoder.save_pretrained(str(out))
        write_json(summary, out / "cut3r_summary.json")


def _train_backbone(cfg: MainJobConfig, scfg: Any, init_dir: Path, data_dir: Path, out: Path) -> None:
    """Phase 4 (data parallel under `cpu_demo.parallel.launch`: each rank renders and samples the dense name
    frames of its share of the clips, `dense_batch / world` per step; rank 0 writes `out`)."""
    import numpy as np

    from cpu_demo.dense_names import DenseNameLoss
    from cpu_demo.parallel import rank_and_world
    from cpu_demo.standins import STANDIN_NOTE, pretrain_semantic_backbone
    from evaluation.probe3d import synth_split_indices
    from training.common import load_model_and_processor
    from training.sft import load_hand3d_split, validate_dataset

    model, processor = load_model_and_processor(init_dir)
    train = load_hand3d_split(data_dir, "visual", "train")
    train, report = validate_dataset(train, processor, max_length=1024, max_skip_fraction=0.05)
    rank, world = rank_and_world()
    if scfg.dense_batch % world:
        raise ValueError(
            f"StandinConfig.dense_batch: {scfg.dense_batch} frames do not split over {world} processes"
        )
    dense = None
    if scfg.dense_weight:  # what a pretrained InternVL brings: image tokens that say what they show
        clips = list(_synth_train_clips(cfg, None, "render synth segmentation"))
        dense = DenseNameLoss.from_clips(
            clips,
            processor,
            model.config,
            scfg.dense_batch // world,
            seed=cfg.seed + rank,
            depth_weight=scfg.dense_depth_weight,
            relative_depth=scfg.dense_relative_depth,
        )
        del clips
    trainer = pretrain_semantic_backbone(
        model, processor, train, out / "_trainer", scfg, seed=cfg.seed, dense=dense
    )
    if rank != 0:
        return
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    summary = {
        "model": "single encoder (semantic backbone stand-in, tiny InternVL; 3D branch off: use_spatial_branch = False)",
        "stand_in": True,
        "note": STANDIN_NOTE,
        "data": "Hand3D-visual train",
        "steps": scfg.backbone_steps,
        "batch_size": scfg.backbone_batch,
        "processes": world,
        "learning_rate": scfg.backbone_lr,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "dense_names": None
        if dense is None
        else {
            "weight": scfg.dense_weight,
            "frames": len(synth_split_indices(cfg.num_clips, False)) * cfg.frames,  # all ranks' shares
            "loss_of": "rank 0's share of each step's frames" if world > 1 else "each step's frames",
            "name_tokens": len(dense.token_ids),
            "loss_first": float(np.mean(dense.history[:20])),
            "loss_last": float(np.mean(dense.history[-20:])),
            "depth_weight": dense.depth_weight if dense.depth is not None else 0.0,
            "depth_loss_first": float(np.mean(dense.depth_history[:20])) if dense.depth_history else None,
            "depth_loss_last": float(np.mean(dense.depth_history[-20:])) if dense.depth_history else None,
        },
        "data_report": report,
    }
    write_json(summary, out / TRAINING_MARKER)


def _compose_vipa(cfg: MainJobConfig, backbone_dir: Path, cut3r_dir: Path, out: Path) -> None:
    """Paper §3.2.3: the (stand-in) pretrained VLM + the (stand-in) pretrained CUT3R + a fresh fusion layer."""
    import torch

    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    from modeling_vipa.spatial_encoder import Cut3rEncoder
    from training.common import load_model_and_processor

    backbone, processor = load_model_and_processor(backbone_dir)
    torch.manual_seed(cfg.seed + 1)
    config = backbone.config
    config.use_spatial_branch = True  # the backbone was trained as the single encoder, without the branch
    fusion = (
        config.fusion_layer_config
    )  # rebuilt, so its checks (e.g. sincos2d's head size) run on the real dims
    config.fusion_layer_config = type(fusion).from_dict(
        {**fusion.to_dict(), "qk_position": cfg.fusion_qk_position}
    )
    model = VipaForConditionalGeneration(config)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("model.fusion.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.fusion.") for k in missing):
        raise RuntimeError(f"compose: unexpected keys {unexpected[:5]}, missing {missing[:5]}")
    cut3r = Cut3rEncoder.from_pretrained(str(cut3r_dir))
    model.model.spatial_encoder.load_state_dict(cut3r.state_dict())
    if float(model.model.fusion.alpha) != model.config.fusion_layer_config.alpha_init:
        raise RuntimeError("compose: the fresh fusion layer must start at alpha_init")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))


def _run_stage(
    cfg: MainJobConfig, stage: int, model_dir: Path, data_dir: Path, out: Path, extra: dict
) -> None:
    """Phases 6-7 (data parallel under `cpu_demo.parallel.launch`: the recipe's global batch split over the
    ranks; rank 0 writes the marker)."""
    from cpu_demo.standins import STANDIN_NOTE, TqdmCallback
    from training.common import load_recipe, world_size
    from training.stage1 import train_stage1
    from training.stage2 import train_stage2

    steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
    recipe = load_recipe("cpu-tiny", max_steps=steps)
    batch = cfg.stage1_batch if stage == 1 else recipe.global_batch_size
    # one pass per step on each process
    recipe = replace(recipe, global_batch_size=batch, per_device_batch_size=batch // world_size())
    resume = out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir())
    train = train_stage1 if stage == 1 else train_stage2
    trainer = train(
        model_dir, data_dir, out, recipe=recipe, resume=resume, callbacks=[TqdmCallback(f"stage {stage}")]
    )
    if trainer.state.global_step < steps:
        raise RuntimeError(f"stage {stage} stopped at step {trainer.state.global_step} of {steps}")
    if not trainer.is_world_process_zero():
        return
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "stage": stage,
        "recipe": "cpu-tiny",
        "recipe_values": asdict(recipe),
        "steps": steps,
        "processes": world_size(),
        "resumed": resume,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "alpha": float(trainer.model.model.fusion.alpha),
        "initialised_from": str(model_dir),
        "built_on_stand_ins": True,
        "note": STANDIN_NOTE,
        **extra,
    }
    write_json(summary, out / TRAINING_MARKER)


def _evaluate(
    cfg: MainJobConfig, data_dir: Path, models: dict[str, Path], stage2_dir: Path, out: Path
) -> None:
    """Phase 8: the Table 8 rows (`models`, name -> checkpoint) and stage 2's trajectories -> `table8.json`."""
    from evaluation.hand3d_test import evaluate_model
    from hand3d_dataset.scoring import (
        evaluate_predictions,
        load_rows,
        plot_figure8,
        trivial_baseline_predictions,
    )
    from training.common import load_model_and_processor

    train_rows = load_rows(data_dir, "visual", "train")
    test_rows = load_rows(data_dir, "visual", "test", cfg.eval_limit)
    baseline = evaluate_predictions(trivial_baseline_predictions(train_rows, test_rows), test_rows)
    text = {"trivial baseline": baseline["text"]}
    runs = {}
    for name, model_dir in models.items():
        model, processor = load_model_and_processor(model_dir)
        res = evaluate_model(
            model.eval(), processor, data_dir, config="visual", batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.eval_max_new_tokens, limit=cfg.eval_limit, out_dir=out / _slug(name), name=name,
        )  # fmt: skip
        runs[name] = res
        text[name] = res["configs"]["visual"]["text"]
    figure8 = plot_figure8(text, out / "figure8.png")
    # Figure 9: the stage-2 model's trajectories on the Hand3D-action test split
    model, processor = load_model_and_processor(stage2_dir)
    motion = evaluate_model(
        model.eval(), processor, data_dir, config="action", batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.eval_max_new_tokens if cfg.quick else None, limit=cfg.eval_limit,
        out_dir=out / "vipa_stage2_action", name="VIPA-VLA (stage 2)",
    )  # fmt: skip
    rows = [_table_row("Trivial baseline (most frequent labels, mean distance)", baseline["text"]["overall"])]
    for name, res in runs.items():
        rows.append(_table_row(name, res["configs"]["visual"]["text"]["overall"]))
    result = {
        "split": "test",
        "n_test_rows": len(test_rows),
        "table8": rows,
        "per_task": {
            "trivial baseline": baseline["text"]["per_task"],
            **{n: r["configs"]["visual"]["text"]["per_task"] for n, r in runs.items()},
        },
        "motion_stage2": motion["configs"].get("action", {}).get("summary"),
        "plots": {"figure8": str(figure8), "figure9": motion["plots"].get("figure9")},
    }
    write_json(result, out / "table8.json")


def _probe(cfg: MainJobConfig, data_dir: Path, stage1_dir: Path, out: Path) -> None:
    """Phase 9: what the tokens of the stage-1 model carry (linear 3D probe) and what its answers use (the 3D
    branch ablated on test answers), in `probe3d_raw.json`; `_finish_probe` adds what the answers score."""
    from evaluation.probe3d import Probe3DConfig, branch_ablation, probe_model
    from training.common import load_model_and_processor
    from training.sft import load_hand3d_split

    model, processor = load_model_and_processor(stage1_dir)
    pcfg = Probe3DConfig(
        num_clips=cfg.num_clips, train_clips=cfg.probe_train_clips, image_size=cfg.image_size,
        frames=cfg.frames, seed=cfg.seed, render_cache=str(_render_cache(cfg)),
    )  # fmt: skip
    try:
        result = probe_model(model, pcfg, processor)
    except ValueError as e:  # e.g. the quick run's few clips: say so in results.json, do not fail the job
        result = {"skipped": str(e)}
    test = load_hand3d_split(data_dir, "visual", "test")
    step = max(1, len(test) // cfg.ablation_rows)
    rows = test.select(range(0, len(test), step)[: cfg.ablation_rows])
    result["branch_ablation"] = branch_ablation(model, processor, rows)
    write_json(result, out / "probe3d_raw.json")


def _finish_probe(table: dict, out: Path) -> None:
    """Phase 9's result next to the answers' Table 8 scores: `probe3d.json` and `probe3d.png`."""
    from evaluation.probe3d import plot_probe

    result = json.loads((out / "probe3d_raw.json").read_text())
    result["answers"] = {r["model"]: r for r in table["table8"][1:]}
    if "rows" in result:
        result["plot"] = str(plot_probe(result, out / "probe3d.png", result["answers"]))
    write_json(result, out / "probe3d.json")


def _record_robot_demos(cfg: MainJobConfig, out: Path) -> None:
    """Phase 10: the scripted experts' Meta-World episodes as a LeRobot v3 dataset (images in the parquet: at
    64 px PNG reads back faster than AV1 decoding, and stage 3 reads every frame many times)."""
    from evaluation.demos import DemoConfig, record_demos

    shutil.rmtree(out.with_name(f"{out.name}.partial"), ignore_errors=True)
    record_demos(
        DemoConfig(
            out=str(out), env="metaworld", tasks=cfg.robot_tasks, episodes=cfg.robot_demo_episodes, seed=0,
            image_size=cfg.robot_image_size, max_steps=cfg.robot_max_steps, use_videos=False,
        )
    )  # fmt: skip


def _robot_stage3(cfg: MainJobConfig, stage2_dir: Path, demos: Path, out: Path) -> None:
    """Phase 11: stage 3 from the stage-2 checkpoint on the demonstrations (resumes from its checkpoints; data
    parallel under `cpu_demo.parallel.launch`, as `training.stage3` runs under any torchrun launch)."""
    from training.stage3 import latest_checkpoint, train_stage3

    resume = latest_checkpoint(out) is not None
    result = train_stage3(
        stage2_dir, demos, out, recipe="cpu-tiny", resume=resume, max_steps=cfg.robot_stage3_steps
    )
    if not result.finished:
        raise RuntimeError(f"stage 3 stopped at step {result.steps} of {cfg.robot_stage3_steps}")


# ---- phases in worker processes (cpu_demo.parallel) ------------------------------------------------------------
# Data parallel: every rank of a `cpu_demo.parallel.launch` runs the phase on its share of each batch.
RANK_PHASES = ("cut3r", "backbone", "stage1", "stage2", "stage3")
# One process each, several at once (`cpu_demo.parallel.run_lanes`): phases 8-10 need nothing of each other.
LANE_PHASES = ("evaluate", "probe", "demos")


def run_phase(name: str, cfg: MainJobConfig, scfg: Any, paths: dict[str, str], extra: dict) -> None:
    """Phase `name` (or one rank's share of it) in this process: the main process when it runs alone, else a
    `cpu_demo.phase_worker`. paths: the phase's folders by role; extra: its other arguments (JSON values)."""
    p = {k: Path(v) for k, v in paths.items()}
    if name == "evaluate":
        models = {label: Path(path) for label, path in extra["models"].items()}
        _evaluate(cfg, p["data"], models, p["stage2"], p["out"])
    elif name == "probe":
        _probe(cfg, p["data"], p["model"], p["out"])
    elif name == "demos":
        _record_robot_demos(cfg, p["out"])
    elif name == "cut3r":
        _train_cut3r(cfg, scfg, p["init"], p["out"])
    elif name == "backbone":
        _train_backbone(cfg, scfg, p["init"], p["data"], p["out"])
    elif name in ("stage1", "stage2"):
        _run_stage(cfg, int(name[-1]), p["model"], p["data"], p["out"], extra)
    elif name == "stage3":
        _robot_stage3(cfg, p["model"], p["data"], p["out"])
    else:
        raise ValueError(f"phase: expected one of {RANK_PHASES + LANE_PHASES}, got {name!r}")


def _ranked(
    name: str,
    cfg: MainJobConfig,
    scfg: Any,
    processes: int,
    paths: dict[str, Path],
    extra: dict | None = None,
) -> None:
    """Phase `name` in this process (1 process) or on `processes` data-parallel ranks."""
    from cpu_demo.parallel import launch

    spec = _spec(paths, extra)
    if processes == 1:
        run_phase(name, cfg, scfg, spec["paths"], spec["extra"])
        return
    launch(name, [str(Path(cfg.out) / "job_config.json"), json.dumps(spec)], processes)


def _spec(paths: dict[str, Path], extra: dict | None) -> dict:
    return {"paths": {k: str(v) for k, v in paths.items()}, "extra": extra or {}}


def _robot_eval_config(cfg: MainJobConfig, out: Path) -> Any:
    from evaluation.rollout import RolloutConfig

    return RolloutConfig(
        out=str(out), env="metaworld", tasks=cfg.robot_tasks, episodes=cfg.robot_eval_episodes,
        seed=cfg.robot_eval_seed, max_steps=cfg.robot_max_steps, image_size=cfg.robot_image_size,
        num_workers=cfg.robot_workers, videos_per_task=1 if cfg.quick else 2, episode_timeout_s=600.0,
    )  # fmt: skip


def _robot_eval(cfg: MainJobConfig, policy_dir: Path, demos: Path, out: Path) -> dict:
    """Phase 12: VIPA-VLA (stage 3), the scripted expert and a random policy on the same unseen seeds."""
    from evaluation.demos import check_disjoint_seeds
    from evaluation.rollout import PolicySpec, evaluate_policies

    rcfg = _robot_eval_config(cfg, out)
    tasks = [t.strip() for t in cfg.robot_tasks.split(",")]
    check_disjoint_seeds(demos, tasks, rcfg.seeds())  # evaluation scenes were never demonstrations
    specs = [
        PolicySpec("vipa", path=str(policy_dir), name="VIPA-VLA (stages 1-3)"),
        PolicySpec("expert"),
        PolicySpec("random"),
    ]
    result = evaluate_policies(specs, rcfg)
    return json.loads((out / "results.json").read_text()) | {"plot": result["plot"]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def _table_row(name: str, overall: dict) -> dict:
    return {
        "model": name,
        "distance_error_m": overall["distance_error_m"],
        "direction_score": overall["direction_score"],
        "axis_accuracy": overall["axis_accuracy"],
        "n": overall["n_direction"],
        "n_unparseable": overall["n_unparseable"],
    }


def format_table(rows: list[dict]) -> str:
    """Table 8's shape: model | Dist. Err. (m) lower is better | Dir. Scr. /3 higher is better, plus per-axis."""

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    width = max(len(r["model"]) for r in rows) + 2
    head = (
        f"{'Model':<{width}}{'Dist. Err. (m) ↓':>18}{'Dir. Scr. ↑':>14}{'x/y/z acc.':>20}{'unparseable':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "/".join(num(r["axis_accuracy"].get(ax), ".2f") for ax in ("x", "y", "z"))
        score = "n/a" if r["direction_score"] is None else f"{r['direction_score']:.2f}/3"
        lines.append(
            f"{r['model']:<{width}}{num(r['distance_error_m'], '.3f'):>18}{score:>14}{acc:>20}"
            f"{r['n_unparseable']:>8} of {r['n']}"
        )
    return "\n".join(lines)


# ---- the job ---------------------------------------------------------------------------------------------------
def run_main_job(cfg: MainJobConfig) -> dict:
    """Run (or resume) every phase; returns the `results.json` content."""
    from cpu_demo.parallel import demo_processes
    from cpu_demo.standins import StandinConfig
    from training.common import configure_threads

    # One thread unless $VIPA_NUM_THREADS says otherwise: the stand-ins' kernels are so small that a second
    # thread gains less than its barriers cost (bench_contention: 1 thread is faster than 2 with passive wait
    # in every phase, and unchanged with one core busy elsewhere; 2 threads with active wait are 2.1-2.3x
    # slower then).
    threads = configure_threads(None if os.environ.get("VIPA_NUM_THREADS") else 1)
    procs = demo_processes()  # the training phases: data parallel over this many 1-thread processes
    print(
        f"[main_job] {threads} torch thread(s) per process; training phases on {procs} process(es)",
        flush=True,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scfg = StandinConfig.quick() if cfg.quick else StandinConfig()
    if cfg.standins:
        scfg = StandinConfig(**{**asdict(scfg), **cfg.standins})
    config_path = out / "job_config.json"
    job = {"main_job": asdict(cfg), "standins": asdict(scfg)}
    if config_path.is_file() and json.loads(config_path.read_text()) != json.loads(json.dumps(job)):
        raise ValueError(f"out: {out} holds a run with other settings ({config_path}); use another --out")
    write_json(job, config_path)
    phases = _Phases(out)
    t_start = time.time()
    data, init, cut3r = out / "hand3d", out / "standins" / "init", out / "standins" / "cut3r"
    single, vipa_init, stage1, stage2 = out / "single_encoder", out / "standins" / "vipa_init", out / "runs" / "stage1", out / "vipa"  # fmt: skip
    (out / "standins").mkdir(exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)

    report = data / "report.json"
    done = (
        report.is_file()
        and json.loads(report.read_text()).get("config", {}).get("num_clips") == cfg.num_clips
    )
    with phases.run("1 build synth Hand3D", done) as todo:
        if todo:
            _build_dataset(cfg, data)  # read back through load_hand3d: its cache is keyed by content
    with phases.run("2 tokenizer + stand-in init", init.is_dir()) as todo:
        if todo:
            with _atomic_dir(init) as tmp:
                _init_standins(cfg, scfg, data, tmp)
    with phases.run("3 CUT3R stand-in (pointmaps from depth)", cut3r.is_dir()) as todo:
        if todo:
            with _atomic_dir(cut3r) as tmp:
                _ranked("cut3r", cfg, scfg, procs, {"init": init, "out": tmp})
    with phases.run("4 semantic backbone stand-in = single encoder", single.is_dir()) as todo:
        if todo:
            with _atomic_dir(single) as tmp:
                _ranked("backbone", cfg, scfg, procs, {"init": init, "data": data, "out": tmp})
    with phases.run("5 compose VIPA-VLA init", vipa_init.is_dir()) as todo:
        if todo:
            with _atomic_dir(vipa_init) as tmp:
                _compose_vipa(cfg, single, cut3r, tmp)
    with phases.run("6 stage 1 (fusion only, Hand3D-visual)", (stage1 / TRAINING_MARKER).is_file()) as todo:
        if todo:
            paths = {"model": vipa_init, "data": data, "out": stage1}
            _ranked("stage1", cfg, scfg, procs, paths, {"model": "VIPA-VLA-PT (stage 1)"})
    with phases.run("7 stage 2 (motion tokens + fusion + LLM, Hand3D-action)", (stage2 / TRAINING_MARKER).is_file()) as todo:  # fmt: skip
        if todo:
            paths = {"model": stage1, "data": data, "out": stage2}
            _ranked("stage2", cfg, scfg, procs, paths, {"model": "VIPA-VLA (stages 1-2)"})
    names = {
        "Single encoder + Hand3D (no 3D branch)": str(single),
        "VIPA-VLA-PT (stage 1: fusion only)": str(stage1),
    }
    evaluation, probe_path = out / "eval" / "table8.json", out / "eval" / "probe3d.json"
    demos, stage3, robot_eval = out / "robot" / "demos", out / "runs" / "stage3", out / "robot" / "eval"
    (out / "eval").mkdir(exist_ok=True)
    (out / "robot").mkdir(exist_ok=True)
    # phases 8-10 need nothing of each other: one process each, as many at once as there are processes
    lanes = {
        "8 evaluate on Hand3D test": (
            "evaluate", evaluation.is_file(),
            _spec({"data": data, "stage2": stage2, "out": out / "eval"}, {"models": names}),
        ),
    }  # fmt: skip
    if cfg.probe_train_clips:
        lanes["9 3D probe of the tokens (evaluation.probe3d)"] = (
            "probe", (out / "eval" / "probe3d_raw.json").is_file(),
            _spec({"data": data, "model": stage1, "out": out / "eval"}, None),
        )  # fmt: skip
    if cfg.robot_tasks:
        lanes["10 Meta-World expert demonstrations (LeRobot v3)"] = (
            "demos", demos.is_dir(), _spec({"out": demos}, None),
        )  # fmt: skip
    phases.run_concurrently(lanes, cfg, scfg, procs)
    table = json.loads(evaluation.read_text())
    shutil.rmtree(_render_cache(cfg), ignore_errors=True)  # every phase that reads it is done
    probe = None
    if cfg.probe_train_clips:
        if not probe_path.is_file():
            _finish_probe(table, out / "eval")
        probe = json.loads(probe_path.read_text())
    robot = None
    if cfg.robot_tasks:
        with phases.run("11 stage 3 on the demonstrations (from the stage-2 checkpoint)", (stage3 / TRAINING_MARKER).is_file()) as todo:  # fmt: skip
            if todo:
                _ranked("stage3", cfg, scfg, procs, {"model": stage2, "data": demos, "out": stage3})
        with phases.run("12 closed-loop Meta-World evaluation (unseen seeds)", (robot_eval / "results.json").is_file()) as todo:  # fmt: skip
            if todo:
                _robot_eval(cfg, stage3, demos, robot_eval)
        robot = json.loads((robot_eval / "results.json").read_text())
        robot["demos"] = json.loads((demos / "meta" / "vipa_demos.json").read_text())
        robot["stage3"] = {
            k: v for k, v in json.loads((stage3 / TRAINING_MARKER).read_text()).items() if k != "losses"
        }
    results = {
        **table,
        "probe3d": probe,
        "metaworld": robot,
        "phase_seconds": {k: v.get("seconds") for k, v in phases.times.items()},
        "this_run_seconds": round(time.time() - t_start, 1),
        "stand_ins": {
            "note": "the semantic backbone and CUT3R are STAND-INS trained here, not InternVL3.5 / CUT3R",
            "cut3r": json.loads((cut3r / "cut3r_summary.json").read_text()),
            "backbone": {
                k: v
                for k, v in json.loads((single / TRAINING_MARKER).read_text()).items()
                if k != "data_report"
            },
        },  # fmt: skip
        "stages": {
            "stage1": json.loads((stage1 / TRAINING_MARKER).read_text()),
            "stage2": json.loads((stage2 / TRAINING_MARKER).read_text()),
        },
        "config": job,
    }
    write_json(results, out / "results.json")
    print("\nHand3D test split (synth), Table 8 shape, all rows measured in this run:\n")
    print(format_table(table["table8"]))
    if table.get("motion_stage2"):
        m = table["motion_stage2"]
        print(
            f"\nStage-2 trajectories (Hand3D-action test): waypoint error {m.get('motion_waypoint_error_m')} m, "
            f"final error {m.get('motion_final_error_m')} m, decodable {m.get('motion_decodable_fraction')}"
        )
    if probe and "rows" in probe:
        from evaluation.probe3d import format_probe_table

        print(
            "\nWhat the tokens carry: a linear probe of each feature set of VIPA-VLA-PT predicts the 3D centre of"
            "\nevery object and hand; pairs of them in a test frame are scored like Hand3D answers (pairs of"
            "\nsegments, not the test questions: compare the rows, not the exact numbers):\n"
        )
        print(format_probe_table(probe, probe.get("answers")))
    elif probe:
        print(f"\n3D probe skipped: {probe['skipped']}")
    if probe:
        a = probe["branch_ablation"]
        nll = "; ".join(f"{k} {v:.5f}" for k, v in a["nll_per_token"].items())
        print(
            f"\nWhat the answers use: per-token NLL of VIPA-VLA-PT's {a['answer_tokens']} answer tokens on "
            f"{a['n_rows']} test rows: {nll}"
        )
    if robot:
        demos_meta = robot["demos"]
        print(
            f"\nMeta-World closed loop ({cfg.robot_eval_episodes} episodes per task on seeds {cfg.robot_eval_seed}+, "
            f"never demonstrated; stage 3: {cfg.robot_stage3_steps} steps on {demos_meta['episodes']} expert "
            f"episodes, {demos_meta['failed']} failed expert episodes dropped). Cells: successes/n, rate "
            "[95 % Wilson CI]:\n"
        )
        print(robot["table"])
        print(f"videos: {out / 'robot' / 'eval'}/*/videos; plot: {robot['plot']}")
    print(f"\nresults: {out / 'results.json'}; plots: {table['plots']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m cpu_demo.main_job [--out DIR] [--quick] [--no-serve]`; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=None, help="output folder (default outputs/demo; --quick: outputs/demo-quick)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run: a few clips and steps")
    parser.add_argument(
        "--no-serve", action="store_true", help="do not launch the Space at the end (or VIPA_NO_SERVE=1)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out or ("outputs/demo-quick" if args.quick else "outputs/demo")
    cfg = MainJobConfig.quick_config(out) if args.quick else MainJobConfig(out=out)
    try:
        run_main_job(cfg)
    except ValueError as e:
        print(f"main_job: error: {e}", file=sys.stderr)
        return 2
    if args.no_serve or os.environ.get("VIPA_NO_SERVE") == "1":
        return 0
    from spaces_demo.app import main as serve

    return serve(["--model", str(Path(out) / "vipa"), "--host", "127.0.0.1"])


if __name__ == "__main__":
    sys.exit(main())
