"""Stages 1-2 of the spatial-aware pretraining (training/common.py, stage1.py, stage2.py, cli.py) on a tiny
VIPA-VLA and a small Hand3D folder written here in the published layout (parquet + README `configs:`).

Behaviour checked against independent evidence: the weights on disk (safetensors read directly), a reload in
a fresh process, accelerate's own config parser, and the frozen parts compared with the initial checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets  # noqa: E402
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from modeling_vipa.configuration_vipa import VipaFusionConfig  # noqa: E402
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration  # noqa: E402
from training.common import Recipe, load_recipe  # noqa: E402
from training.sft import load_hand3d_split, validate_dataset  # noqa: E402
from training.stage1 import train_stage1  # noqa: E402
from training.stage2 import train_stage2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
# small, fast, exact: global batch 4 = 2 per device x 2 accumulation steps
TINY = dict(
    learning_rate=1e-2,
    global_batch_size=4,
    per_device_batch_size=2,
    image_size=None,
    max_length=256,
    save_steps=2,
    save_total_limit=5,
    logging_steps=1,
    seed=0,
    max_skip_fraction=0.5,
)


# ---- fixtures: a tiny checkpoint and a Hand3D folder in the published layout -----------------------------------
def _png(seed: int, size: tuple[int, int] = (50, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(i: int, config: str, n_frames: int = 1, answer: str | None = None, image_bytes: bytes | None = None):
    question = f"Where is the hand relative to the cup in frame {n_frames}?"
    if answer is None:
        answer = f"left and down and forward, 0.{i % 9 + 1} m"
        if config == "action":
            answer = (
                "<motion>" + "".join(f"<motion_{(i * 37 + k * 101) % 1024}>" for k in range(6)) + "</motion>"
            )
    row = {
        "id": f"{config}-{i:04d}",
        "source": "synth",
        "clip_id": f"clip{i // 4}",
        "task_type": "hand_movement" if config == "action" else "spatial_relationship",
        "images": [
            {"bytes": image_bytes if image_bytes is not None else _png(100 * i + t), "path": None}
            for t in range(n_frames)
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}] * n_frames + [{"type": "text", "text": question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "target": {"distance_m": 0.1 * (i % 9 + 1), "labels": ["left", "down", "forward"]},
    }
    if config == "action":
        row["trajectory"] = [[0.01 * i, -0.02, 0.5 + 0.01 * k] for k in range(2)]
        row["motion_ids"] = [(i * 37 + k * 101) % 1024 for k in range(6)]
    return row


def write_hand3d(root: Path, rows: dict[str, list[dict]], drop_columns: tuple[str, ...] = ()) -> Path:
    """Parquet shards `<config>/train-00000-of-00001.parquet` and a README whose YAML `configs:` names them.

    `root`'s name must be unique: datasets 5 keys its Arrow cache by folder name and config, not full path."""
    lines = ["---", "configs:"]
    for config, config_rows in rows.items():
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "source": datasets.Value("string"),
                "clip_id": datasets.Value("string"),
                "task_type": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
                "messages": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List(
                            {"type": datasets.Value("string"), "text": datasets.Value("string")}
                        ),
                    }
                ),
                "target": {
                    "distance_m": datasets.Value("float64"),
                    "labels": datasets.List(datasets.Value("string")),
                },
                **(
                    {
                        "trajectory": datasets.List(datasets.List(datasets.Value("float64"))),
                        "motion_ids": datasets.List(datasets.Value("int64")),
                    }
                    if config == "action"
                    else {}
                ),
            }
        )
        for row in config_rows:  # parquet structs carry every field; image entries have text=None
            for message in row["messages"]:
                message["content"] = [{"type": c["type"], "text": c.get("text")} for c in message["content"]]
        table = datasets.Dataset.from_list(config_rows, features=features)
        if drop_columns:
            table = table.remove_columns(list(drop_columns))
        (root / config).mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(root / config / "train-00000-of-00001.parquet"))
        lines += [
            f"- config_name: {config}",
            "  data_files:",
            "  - split: train",
            f"    path: {config}/train-*",
        ]
    (root / "README.md").write_text("\n".join([*lines, "---", "", "# tiny Hand3D"]) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny VIPA checkpoint (model + processor), fusion dropout on (RNG must resume)."""
    import tests.tiny_assets as tiny_assets

    processor = tiny_assets.build_tiny_processor()
    model = tiny_assets.build_tiny_model(processor, fusion_layer_config=VipaFusionConfig.tiny(dropout=0.1))
    out = tmp_path_factory.mktemp("vipa_tiny")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hand3d(tmp_path_factory) -> Path:
    rows = {
        "visual": [_row(i, "visual", n_frames=1 + i % 2) for i in range(8)],
        "action": [_row(i, "action") for i in range(8)],
    }
    return write_hand3d(tmp_path_factory.mktemp("hand3d_shared"), rows)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---- recipes and accelerate configs -----------------------------------------------------------------------------
def test_paper_recipe_has_the_paper_hyperparameters() -> None:
    recipe = load_recipe("paper")
    # paper §4.1: AdamW, lr 1e-5, warm-up ratio 0.03, weight decay 0.01, cosine, global batch 32, 1 epoch, 448 px
    assert (recipe.optim, recipe.lr_scheduler_type) == ("adamw_torch", "cosine")
    assert (recipe.learning_rate, recipe.warmup_ratio, recipe.weight_decay) == (1e-5, 0.03, 0.01)
    assert (recipe.global_batch_size, recipe.num_train_epochs, recipe.max_steps, recipe.image_size) == (
        32,
        1,
        -1,
        448,
    )
    assert recipe.gradient_accumulation_steps(8) == 1 and recipe.gradient_accumulation_steps(2) == 4
    with pytest.raises(ValueError, match="global_batch_size=32"):
        recipe.gradient_accumulation_steps(3)
    assert load_recipe("cpu-tiny").image_size is None


def test_recipe_rejects_unknown_fields_and_bad_values(tmp_path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("learning_rate: 1.0e-5\nwarmup_raito: 0.03\n")
    with pytest.raises(ValueError, match="warmup_raito"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="learning_rate"):
        Recipe(learning_rate=-1.0)
    with pytest.raises(ValueError, match="neither a shipped recipe"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize(
    ("name", "distributed", "processes"),
    [
        ("cpu", "NO", 1),
        ("single_gpu", "NO", 1),
        ("multi_gpu_ddp", "MULTI_GPU", 8),
        ("fsdp2", "FSDP", 8),
        ("deepspeed_zero2", "DEEPSPEED", 8),
    ],
)
def test_accelerate_configs_parse_with_accelerate(name: str, distributed: str, processes: int) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "training" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed and config.num_processes == processes
    assert config.use_cpu == (name == "cpu")
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        layers = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert set(layers) == set(VipaForConditionalGeneration._no_split_modules)
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2


# ---- bad input: clear errors at start-up, counted skips ----------------------------------------------------------
def test_missing_column_is_a_startup_error(tmp_path, tiny_checkpoint) -> None:
    data = write_hand3d(
        tmp_path / f"hand3d_{tmp_path.name}",
        {"visual": [_row(i, "visual") for i in range(2)]},
        drop_columns=("messages",),
    )
    with pytest.raises(ValueError, match=r"lacks columns \['messages'\]"):
        load_hand3d_split(data, "visual")
    with pytest.raises(ValueError, match="lacks columns"):
        train_stage1(tiny_checkpoint, data, tmp_path / "out", recipe=Recipe(**TINY), max_steps=1)
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    with pytest.raises(ValueError, match="cannot load config 'action'"):
        load_hand3d_split(data, "action")


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_checkpoint) -> None:
    from processing_vipa.processing_vipa import VipaProcessor

    processor = VipaProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=False)
    good = [_row(i, "visual") for i in range(5)]
    corrupt = _row(5, "visual", image_bytes=b"\x89PNG\r\n\x1a\n not really a png")
    # 4 image tokens + 2 delimiters per frame; the answer alone is > 256 tokens
    too_long = _row(6, "visual", answer="left " * 300)
    mismatched = _row(7, "visual")
    mismatched["messages"][0]["content"].insert(0, {"type": "image", "text": None})  # 2 placeholders, 1 image
    data = write_hand3d(
        tmp_path / f"hand3d_{tmp_path.name}",
        {"visual": [*good[:2], corrupt, too_long, mismatched, *good[2:]]},
    )
    dataset = load_hand3d_split(data, "visual")
    kept, report = validate_dataset(dataset, processor, max_length=256, max_skip_fraction=0.5)
    assert report["skipped"] == {"undecodable_image": 1, "too_long": 1, "bad_messages": 1}
    assert report["skipped_ids"]["undecodable_image"] == ["visual-0005"]
    assert report["skipped_ids"]["too_long"] == ["visual-0006"]
    assert kept["id"] == [f"visual-{i:04d}" for i in range(5)]

    # the length check agrees with what the collator builds: the longest kept sample fits, exactly counted
    def n_tokens(rows: list[dict]) -> list[int]:
        texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        batch = processor(text=texts, images=[r["images"] for r in rows], padding=True)
        return [int(sum(m)) for m in batch["attention_mask"]]

    assert max(n_tokens(list(kept))) <= 256
    assert n_tokens([dataset[3]]) > [256]  # the skipped one really is longer than the context
    # the length check is exact: a sample of exactly max_length tokens is kept, one more is skipped
    (exact,) = n_tokens([dataset[0]])
    assert validate_dataset(dataset.select([0]), processor, exact, 0.0)[1]["kept"] == 1
    with pytest.raises(ValueError, match="'too_long': 1"):
        validate_dataset(dataset.select([0]), processor, exact - 1, 0.0)
    with pytest.raises(ValueError, match="more than max_skip_fraction"):
        validate_dataset(dataset, processor, max_length=256, max_skip_fraction=0.2)

    trainer = train_stage1(tiny_checkpoint, data, tmp_path / "out", recipe=Recipe(**TINY), max_steps=2)
    assert trainer.state.global_step == 2
    on_disk = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert on_disk["kept"] == 5 and on_disk["skipped"]["undecodable_image"] == 1


def test_recipe_image_size_must_match_the_checkpoint(tmp_path, tiny_checkpoint, hand3d) -> None:
    # the paper recipe trains on 448 px tiles; the tiny checkpoint's processor makes 56 px ones
    with pytest.raises(ValueError, match="image_size=448 but the checkpoint's processor uses 56 px"):
        train_stage1(tiny_checkpoint, hand3d, tmp_path / "o", recipe=Recipe(**{**TINY, "image_size": 448}))


# ---- resume: stopped after k steps and resumed == uninterrupted ---------------------------------------------------
class _StopAt(TrainerCallback):
    """Simulates an interruption right after the checkpoint of step `step` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class _CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_matches_uninterrupted_run(tmp_path, tiny_checkpoint, hand3d) -> None:
    recipe = Recipe(**{**TINY, "max_steps": 4, "global_batch_size": 4, "per_device_batch_size": 2})
    full = train_stage1(tiny_checkpoint, hand3d, tmp_path / "full", recipe=recipe)
    interrupted = train_stage1(
        tiny_checkpoint, hand3d, tmp_path / "cut", recipe=recipe, callbacks=[_StopAt(2)]
    )
    assert interrupted.state.global_step == 2 and not (tmp_path / "cut" / "model.safetensors").exists()
    # checkpoints are safetensors
    assert (tmp_path / "cut" / "checkpoint-2" / "model.safetensors").is_file()
    assert not list((tmp_path / "cut").rglob("pytorch_model*.bin"))
    steps = _CountSteps()
    train_stage1(tiny_checkpoint, hand3d, tmp_path / "cut", recipe=recipe, resume=True, callbacks=[steps])
    assert steps.steps == [3, 4]  # continued from the checkpoint: only the missing steps ran

    expected, resumed, initial = (
        _weights(tmp_path / "full"),
        _weights(tmp_path / "cut"),
        _weights(tiny_checkpoint),
    )
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-7, msg=name)
    # stage 1 moved the fusion layer and nothing else
    moved = {n for n in expected if not torch.equal(expected[n], initial[n])}
    assert moved and all(n.startswith("model.fusion.") for n in moved), sorted(moved)
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # a finished run marks its checkpoint as trained (the Space reads this); an interrupted one does not
    summary = json.loads((tmp_path / "full" / "training_summary.json").read_text())
    assert summary["stage"] == 1 and summary["steps"] == 4 and summary["final_loss"] == losses[-1]
    assert summary["trainable_parameters"] == sum(
        v.numel() for n, v in expected.items() if n.startswith("model.fusion.")
    )


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_checkpoint, hand3d) -> None:
    with pytest.raises(ValueError, match="no checkpoint-N folder"):
        train_stage1(tiny_checkpoint, hand3d, tmp_path / "empty", recipe=Recipe(**TINY), resume=True)


# ---- stage 2 in process, stage 1 through accelerate launch ---------------------------------------------------------
def test_stage2_adds_motion_tokens_and_trains_fusion_and_llm(tmp_path, tiny_checkpoint, hand3d) -> None:
    out = tmp_path / "stage2"
    trainer = train_stage2(tiny_checkpoint, hand3d, out, recipe=Recipe(**TINY), max_steps=2)
    initial, trained = _weights(tiny_checkpoint), _weights(out)
    embed = "model.language_model.embed_tokens.weight"
    assert trained[embed].shape[0] == initial[embed].shape[0] + 1026  # 1024 bins + <motion> + </motion>
    moved = {n for n in initial if n != embed and not torch.equal(trained[n], initial[n])}
    assert any(n.startswith("model.fusion.") for n in moved)
    assert any(n.startswith("model.language_model.layers.") for n in moved)
    frozen = ("model.vision_tower.", "model.spatial_encoder.", "model.multi_modal_projector.")
    assert not [n for n in moved if n.startswith(frozen)]
    # assistant-only loss: the labelled tokens of a collated batch are exactly the motion answer + <|im_end|>
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([dict(row)])
    labelled = batch["input_ids"][0][batch["labels"][0] != -100]
    answer = row["messages"][-1]["content"][0]["text"]
    assert trainer.processing_class.tokenizer.decode(labelled) == answer + "<|im_end|>"
    saved = json.loads((out / "trainable_parameters.json").read_text())
    assert saved["stage"] == 2 and embed in saved["names"]


@pytest.mark.slow  # two fresh interpreters (accelerate launch, the reload probe): ~15-30 s
def test_accelerate_launch_stage1_cli_gives_a_loadable_checkpoint(tmp_path, tiny_checkpoint, hand3d) -> None:
    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "training/accelerate/cpu.yaml"), "-m",
           "training.cli", "stage1", "--recipe", "cpu-tiny", "--model", str(tiny_checkpoint), "--data",
           str(hand3d), "--output", str(out), "--max-steps", "2"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1:" in result.stderr and "trainable" in result.stderr
    trained, initial = _weights(out), _weights(tiny_checkpoint)
    moved = {n for n in initial if not torch.equal(trained[n], initial[n])}
    assert moved and all(n.startswith("model.fusion.") for n in moved), sorted(moved)

    # the output folder is a VIPA checkpoint with remote code: a fresh process loads it through the Auto classes
    probe = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "print(type(p).__name__, float(m.model.fusion.alpha.detach().reshape(-1)[0]))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(out)], cwd=tmp_path, env={**ENV, "PYTHONPATH": ""},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    name, alpha = loaded.stdout.split()
    assert name == "VipaProcessor"
    assert float(alpha) == pytest.approx(float(trained["model.fusion.alpha"].reshape(-1)[0]), abs=0)


def test_cli_reports_bad_arguments_before_training(tmp_path, tiny_checkpoint) -> None:
    from training.cli import main

    assert main(["stage1", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "none"),
                 "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert main(["stage2", "--recipe", "nope", "--model", str(tiny_checkpoint), "--data", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2  # fmt: skip


def test_stage1_with_the_spatial_cache_trains_the_same_weights(tmp_path, tiny_checkpoint, hand3d) -> None:
    """recipe.spatial_cache: CUT3R's tokens come from disk after the first epoch; the weights match a run that
    runs CUT3R every step (an independent path through the encoder)."""
    base = {**TINY, "max_steps": 4, "global_batch_size": 4, "per_device_batch_size": 4}
    plain = train_stage1(tiny_checkpoint, hand3d, tmp_path / "plain", recipe=Recipe(**base))
    cached = train_stage1(
        tiny_checkpoint, hand3d, tmp_path / "cached", recipe=Recipe(**base, spatial_cache=True)
    )
    cache = type(cached).spatial_cache
    # 8 rows, 4 per step, 4 steps: every row is computed once (epoch 1) and read back once (epoch 2)
    assert (cache.misses, cache.hits) == (8, 8)
    assert len(list((tmp_path / "cached" / "spatial_cache").rglob("*.safetensors"))) == 8
    assert not hasattr(type(plain), "spatial_cache")
    want, got = _weights(tmp_path / "plain"), _weights(tmp_path / "cached")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert any(
        not torch.equal(want[n], _weights(tiny_checkpoint)[n]) for n in want if n.startswith("model.fusion.")
    )


# ---- precision and threads: chosen on purpose ----------------------------------------------------------------
def test_every_trainer_runs_float32_on_cpu_unless_asked(
    tmp_path, tiny_checkpoint, hand3d, monkeypatch
) -> None:
    """TRL's SFTConfig defaults to bf16; on a CPU without native bf16 that is ~50x slower (BENCHMARKS.md)."""
    from cpu_demo.standins import StandinConfig, backbone_sft_args
    from training.common import mixed_precision, resolve_bf16
    from training.sft import build_trainer

    assert (
        not torch.cuda.is_available()
    )  # the test machine; the GPU branch is checked with a patched torch below
    trainer = build_trainer(1, Recipe(**TINY), tiny_checkpoint, hand3d, tmp_path / "a")
    assert trainer.args.bf16 is False and trainer.args.fp16 is False
    assert trainer.accelerator.mixed_precision == "no"
    assert backbone_sft_args(StandinConfig.quick(), tmp_path / "b").bf16 is False
    try:
        asked = build_trainer(1, Recipe(**{**TINY, "bf16": True}), tiny_checkpoint, hand3d, tmp_path / "c")
        assert asked.args.bf16 is True  # the user asked: bf16 autocast on CPU too
    finally:  # accelerate keeps one process-wide state: later tests in this process must not inherit bf16
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert mixed_precision() == "no" and resolve_bf16(False) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_bf16(None) is True and mixed_precision() == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_bf16(None) is False
    with pytest.raises(ValueError, match="recipe.bf16"):
        resolve_bf16(True)
    with pytest.raises(ValueError, match="recipe.bf16"):
        Recipe(**{**TINY, "bf16": "yes"})


def test_thread_count_follows_the_cpus_this_process_may_use(monkeypatch) -> None:
    from training.common import THREADS_ENV, available_cpus, configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(THREADS_ENV, raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # pinned to one core
        assert available_cpus() == 1 and configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        monkeypatch.setenv(THREADS_ENV, "2")
        assert configure_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv(THREADS_ENV, "two")
        with pytest.raises(ValueError, match=THREADS_ENV):
            configure_threads()
        with pytest.raises(ValueError, match="num_threads"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)
