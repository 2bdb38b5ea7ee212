"""The Gradio Space served in a subprocess on a loopback port with a tiny random checkpoint, called with
gradio_client: structured outputs checked against independent computations (greedy generation in this
process, pinhole projection by hand, bin centres), bad inputs come back as readable errors, the server
survives them. Also: the untrained marker, the missing-checkpoint message, example export and loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from gradio_client import Client, handle_file  # noqa: E402

from hand3d_dataset.metrics import parse_answer  # noqa: E402
from spaces_demo.examples import export_examples, load_examples  # noqa: E402
from tests.tiny_assets import build_tiny_model, build_tiny_processor, make_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GT_TRAJECTORY = [[0.0, 0.05, 0.4], [0.05, 0.0, 0.45], [0.1, -0.05, 0.5]]
EXAMPLE_K = [[50.0, 0.0, 30.0], [0.0, 55.0, 20.0], [0.0, 0.0, 1.0]]
VISUAL_TARGET = {
    "labels": {"x": "left", "y": "down", "z": None},
    "distance_m": 0.25,
    "text": "left and down, 0.25 m",
    "rotation": None,
    "angle_deg": None,
}


def build_tiny_checkpoint(path: Path, trained: bool = False) -> Path:
    """A random tiny VIPA-VLA with motion tokens, saved with its processor (the Auto classes load it)."""
    processor = build_tiny_processor(with_motion_tokens=True)
    model = build_tiny_model(processor)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if trained:
        (path / "training_summary.json").write_text(json.dumps({"stage": 2, "steps": 10}))
    return path


def write_examples(folder: Path) -> Path:
    """One visual example (2 frames), one action example (1 frame, K, trajectory), one broken entry."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        make_image(40, 60, seed=10 + i).save(folder / f"f{i}.png")
    entries = [
        {"id": "v0", "kind": "visual", "task_type": "spatial_relationship", "source": "synth",
         "question": "Where is the mug relative to the right hand in the last frame?",
         "images": ["f0.png", "f1.png"], "target": VISUAL_TARGET, "trajectory": None, "K": None},
        {"id": "a0", "kind": "action", "task_type": "instructional_motion_generation", "source": "synth",
         "question": "Instruction: pick up the mug.", "images": ["f2.png"], "target": {},
         "trajectory": GT_TRAJECTORY, "K": EXAMPLE_K},
        {"id": "broken", "kind": "visual", "images": ["missing.png"], "question": "?"},
    ]  # fmt: skip
    (folder / "examples.json").write_text(json.dumps(entries))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_space(checkpoint: Path, examples: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `python -m spaces_demo.app` on a free loopback port; returns (process, url) once it answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "spaces_demo.app", "--model", str(checkpoint), "--port", str(port)]
    cmd += ["--examples", str(examples)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not answer within 90 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("space")
    ckpt = build_tiny_checkpoint(root / "ckpt")
    examples = write_examples(root / "examples")
    proc, url = launch_space(ckpt, examples, root / "app.log")
    try:
        yield {"url": url, "client": Client(url, verbose=False), "ckpt": ckpt, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def local_model(space: dict) -> tuple:
    """The same checkpoint loaded here, for an independent greedy generation."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(space["ckpt"], trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(space["ckpt"], trust_remote_code=True)


def _files(root: Path) -> dict[str, Path]:
    out = {"rgb": root / "rgb.png", "rgba": root / "rgba.png", "gray": root / "gray.png"}
    make_image(48, 64, seed=1).save(out["rgb"])
    make_image(30, 70, seed=2, mode="RGBA").save(out["rgba"])
    make_image(50, 50, seed=3, mode="L").save(out["gray"])
    return out


def test_spatial_qa_matches_greedy_generation_in_process(space: dict, local_model: tuple) -> None:
    files = _files(space["root"])
    question = "Where is the mug relative to the right hand?"
    answer, info = space["client"].predict(
        [handle_file(str(files[k])) for k in ("rgb", "rgba", "gray")], question, "", api_name="/spatial_qa"
    )
    model, processor = local_model
    frames = []
    for k in ("rgb", "rgba", "gray"):
        im = PIL.Image.open(files[k])
        if im.mode == "RGBA":  # composited on white, by hand
            bg = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = PIL.Image.alpha_composite(bg, im)
        frames.append(im.convert("RGB"))
    prompt = (
        "<|im_start|>user\n" + "<image>\n" * 3 + question + "<|im_end|>\n<|im_start|>assistant\n"
    )  # ChatML, written out here rather than taken from the app
    batch = processor(images=frames, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=64, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id
        )
    expected = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == expected.strip() == info["answer"]
    assert set(info["parsed"]) == {"labels", "distance_m", "rotation", "angle_deg"}
    assert info["parsed"]["labels"] == parse_answer(answer).labels
    assert info["num_frames"] == 3 and info["ground_truth"] is None and info["score"] is None
    assert info["model"]["trained"] is False and "untrained" in info["model"]["warning"]


def test_spatial_qa_on_an_example_scores_against_its_target(space: dict) -> None:
    answer, info = space["client"].predict([], "", "v0", api_name="/spatial_qa")
    assert info["example_id"] == "v0" and info["num_frames"] == 2
    assert info["question"] == "Where is the mug relative to the right hand in the last frame?"
    assert info["ground_truth"]["labels"] == VISUAL_TARGET["labels"]
    assert info["ground_truth"]["distance_m"] == 0.25
    parsed = parse_answer(answer)
    # scoring rule of Hand3D-test, by hand: one point per axis whose label equals the truth's
    want = sum(parsed.labels is not None and parsed.labels[ax] == VISUAL_TARGET["labels"][ax] for ax in "xyz")
    assert info["score"]["direction_score"] == want
    assert info["score"]["distance_error_m"] == pytest.approx(abs((parsed.distance_m or 0.0) - 0.25))


def test_trajectory_is_bin_centres_projected_with_the_default_intrinsics(space: dict) -> None:
    frame = space["root"] / "traj.png"
    make_image(60, 80, seed=4).save(frame)
    plot, overlay, info = space["client"].predict(
        handle_file(str(frame)), "Pick up the mug.", "", api_name="/predict_trajectory"
    )
    xyz = np.asarray(info["trajectory"])
    assert xyz.ndim == 2 and xyz.shape[1] == 3 and 2 <= len(xyz) <= 16 and info["num_waypoints"] == len(xyz)
    # 1024 bins on x, y in [-0.5, 0.5], z in [0, 1] (DESIGN.md §3): every value is a bin centre
    low = np.array([-0.5, -0.5, 0.0])
    bins = (xyz - low) * 1024 - 0.5
    np.testing.assert_allclose(bins, np.round(bins), atol=1e-6)
    assert (bins >= 0).all() and (bins <= 1023).all()
    text = info["motion_text"]
    assert (
        text.startswith("<motion>") and text.endswith("</motion>") and text.count("<motion_") == 3 * len(xyz)
    )
    f = 30.0 / np.tan(np.radians(65.0) / 2)  # (H / 2) / tan(fovy / 2), H = 60
    u = f * xyz[:, 0] / xyz[:, 2] + 39.5
    v = f * xyz[:, 1] / xyz[:, 2] + 29.5
    np.testing.assert_allclose(np.asarray(info["uv"]), np.stack([u, v], 1), rtol=1e-9)
    assert info["K_source"].startswith("default")
    assert plot["type"] == "plotly" and '"prediction"' in plot["plot"]
    assert PIL.Image.open(overlay).size == (80, 60)


def test_trajectory_on_an_example_uses_its_intrinsics_and_ground_truth(space: dict) -> None:
    _, _, info = space["client"].predict(None, "", "a0", api_name="/predict_trajectory")
    assert info["K"] == EXAMPLE_K and info["K_source"] == "example"
    assert info["ground_truth"] == GT_TRAJECTORY and info["instruction"] == "Instruction: pick up the mug."
    xyz, gt = np.asarray(info["trajectory"]), np.asarray(GT_TRAJECTORY)
    assert info["errors_m"]["final_waypoint"] == pytest.approx(
        float(np.sqrt(((xyz[-1] - gt[-1]) ** 2).sum()))
    )
    uv = np.asarray(info["uv"])
    np.testing.assert_allclose(uv[:, 0], 50.0 * xyz[:, 0] / xyz[:, 2] + 30.0, rtol=1e-9)


def test_bad_inputs_are_readable_errors_and_the_server_survives(space: dict) -> None:
    from gradio_client.exceptions import AppError

    root, client = space["root"], space["client"]
    good = root / "good.png"
    make_image(20, 20).save(good)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    text = root / "notes.png"
    text.write_text("not an image at all")
    huge = root / "huge.png"
    PIL.Image.new("L", (5000, 300)).save(huge)  # small file, too wide
    deep = root / "deep.png"
    PIL.Image.new("I;16", (20, 20)).save(deep)  # 16-bit depth map: refused by the processor with a ValueError
    g = handle_file(str(good))
    cases = [
        (([handle_file(str(corrupt))], "q?", ""), "/spatial_qa", "frame 1"),
        (([handle_file(str(text))], "q?", ""), "/spatial_qa", "not a readable image"),
        (([handle_file(str(huge))], "q?", ""), "/spatial_qa", "too large"),
        (([handle_file(str(deep))], "q?", ""), "/spatial_qa", "8-bit"),
        (([g] * 5, "q?", ""), "/spatial_qa", "at most 4"),
        (([g], "q?", "no-such-example"), "/spatial_qa", "not in the list of choices"),  # checked by gradio
        (([], "q?", ""), "/spatial_qa", "upload 1 to 4 frames"),
        (([g], "   ", ""), "/spatial_qa", "question"),
        (([g], "x" * 501, ""), "/spatial_qa", "at most 500"),
        (([g], "<image> where?", ""), "/spatial_qa", "special tokens"),
        ((g, "", ""), "/predict_trajectory", "instruction"),
        ((None, "go", ""), "/predict_trajectory", "upload a frame"),
        ((handle_file(str(corrupt)), "go", ""), "/predict_trajectory", "frame"),
    ]
    for args, api, needle in cases:
        with pytest.raises(AppError, match=needle):
            client.predict(*args, api_name=api)
    answer, info = client.predict([g], "still alive?", "", api_name="/spatial_qa")
    assert info["answer"] == answer


def test_untrained_marker_and_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from spaces_demo.app import checkpoint_status, main

    (tmp_path / "ckpt").mkdir()
    assert checkpoint_status(tmp_path / "ckpt")["trained"] is False
    assert "Untrained weights" in checkpoint_status(tmp_path / "ckpt")["message"]
    (tmp_path / "ckpt" / "training_summary.json").write_text('{"stage": 2, "steps": 300}')
    status = checkpoint_status(tmp_path / "ckpt")
    assert status["trained"] is True and status["summary"] == {"stage": 2, "steps": 300}
    assert main(["--model", str(tmp_path / "nothing" / "here")]) == 2
    assert "make demo" in capsys.readouterr().err


def test_export_examples_from_a_built_dataset_round_trips_pixels(tmp_path: Path) -> None:
    from datasets import Dataset

    from hand3d_dataset.pipeline import ACTION_FEATURES, VISUAL_FEATURES
    from hand3d_dataset.publish import write_card
    from hand3d_dataset.samples_visual import empty_target

    frames = [make_image(24, 32, seed=s) for s in range(3)]

    def row(i: int, kind: str, task: str, images: list) -> dict:
        msg = [{"role": "user", "content": [{"type": "image", "text": None}] * len(images)
                + [{"type": "text", "text": f"question {i}"}]}]  # fmt: skip
        r = {"id": f"{kind}-{i}", "source": "synth", "clip_id": "c0", "task_type": task, "images": images,
             "messages": msg, "target": {**empty_target(), **VISUAL_TARGET}}  # fmt: skip
        if kind == "action":
            r.update(trajectory=GT_TRAJECTORY, motion_ids=[1, 2, 3] * 3)
        if "K" in VISUAL_FEATURES:  # intrinsics of the last image (a column since the pipeline's K change)
            r["K"] = EXAMPLE_K
        return r

    data = tmp_path / "hand3d"
    for kind, feats, rows in (
        ("visual", VISUAL_FEATURES, [row(0, "visual", "hand_movement", frames[:2])]),
        (
            "action",
            ACTION_FEATURES,
            [  # a motion-translation row answers in words: not a Trajectory-tab example
                row(1, "action", "instructional_motion_generation", frames[2:]),
                row(2, "action", "motion_translation", frames[2:]),
            ],
        ),
    ):
        (data / "data" / kind).mkdir(parents=True)
        Dataset.from_list(rows, features=feats).to_parquet(str(data / "data" / kind / "test-00000.parquet"))
    write_card(data)
    entries = export_examples(data, tmp_path / "ex", n=3)
    assert [e["id"] for e in entries] == ["visual-0", "action-1"]
    examples = load_examples(tmp_path / "ex")
    assert [ex.kind for ex in examples] == ["visual", "action"]
    assert examples[0].question == "question 0" and examples[0].target["labels"] == VISUAL_TARGET["labels"]
    for got, want in zip(examples[0].images + examples[1].images, frames, strict=True):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(got)), np.asarray(want))
    np.testing.assert_allclose(examples[1].trajectory, GT_TRAJECTORY)
    if "K" in VISUAL_FEATURES:
        np.testing.assert_array_equal(examples[1].K, EXAMPLE_K)
    else:  # older Hand3D rows carry no intrinsics: the app falls back to the default K
        assert examples[1].K is None


def test_load_examples_skips_damaged_entries(tmp_path: Path) -> None:
    folder = write_examples(tmp_path / "ex")
    assert [ex.id for ex in load_examples(folder)] == ["v0", "a0"]  # "broken" points at a missing PNG
    (folder / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert [ex.id for ex in load_examples(folder)] == ["v0"]
    (folder / "examples.json").write_text("{not json")
    assert load_examples(folder) == [] and load_examples(tmp_path / "absent") == []


def test_checkpoint_line_is_a_sentence(tmp_path: Path) -> None:
    from spaces_demo.app import checkpoint_status

    ckpt = tmp_path / "vipa"
    ckpt.mkdir()
    # what the main job writes after stage 2 (its recipe values were printed raw before)
    marker = {"stage": 2, "recipe": "cpu-tiny", "recipe_values": {"optim": "adamw_torch", "learning_rate": 1e-3},
              "steps": 300, "loss_first": 3.2, "loss_last": 1.2345, "model": "VIPA-VLA (stages 1-2)",
              "built_on_stand_ins": True}  # fmt: skip
    (ckpt / "training_summary.json").write_text(json.dumps(marker))
    os.utime(ckpt / "training_summary.json", (1_700_000_000, 1_700_000_000))
    message = checkpoint_status(ckpt)["message"]
    assert "{" not in message and "recipe_values" not in message and "adamw" not in message, message
    assert message == (
        f"Checkpoint `{ckpt}`: VIPA-VLA (stages 1-2), trained: stage 2 ran 300 optimiser steps on Hand3D-action, "
        "recipe cpu-tiny, final loss 1.234, built on CPU stand-ins of InternVL and CUT3R (not the paper's weights); "
        "finished 2023-11-14 22:13 UTC."
    )
    # what training.common writes (stage 3): dataset and finish time from the marker itself
    (ckpt / "training_summary.json").write_text(
        json.dumps(
            {
                "stage": 3,
                "steps": 40,
                "dataset": "demos/mw",
                "final_loss": 0.5,
                "finished": "2026-01-02 03:04 UTC",
            }
        )
    )
    assert checkpoint_status(ckpt)["message"].endswith(
        "VIPA-VLA after stage 3, trained: stage 3 ran 40 optimiser steps on demos/mw, final loss 0.500; "
        "finished 2026-01-02 03:04 UTC."
    )


def _write_rollouts(folder: Path) -> Path:
    """A closed-loop evaluation folder as evaluation.rollout writes it: two policies, one video each."""
    from evaluation.rollout import write_video

    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(4)]
    for slug, policy, success in (
        ("vipa", "VIPA-VLA (stages 1-3)", False),
        ("expert", "scripted expert", True),
    ):
        video = write_video(frames, folder / slug / "videos" / "reach-v3" / "seed-001000.mp4")
        record = {"task": "reach-v3", "group": "reach-v3", "seed": 1000, "steps": 3, "success": success,
                  "error": None, "video": str(video), "instruction": "move the gripper to the goal"}  # fmt: skip
        per_task = {"reach-v3": {"successes": int(success), "n": 1}}
        (folder / slug / "summary.json").write_text(
            json.dumps({"policy": policy, "records": [record], "per_task": per_task})
        )
    table = "task  VIPA-VLA (stages 1-3)  scripted expert\nreach-v3  0/1  1/1"
    results = {"policies": {"VIPA-VLA (stages 1-3)": {}, "scripted expert": {}}, "table": table}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_app_opens_on_an_example_and_plays_rollouts(tmp_path: Path) -> None:
    from spaces_demo.app import build_app, load_rollouts

    ckpt = build_tiny_checkpoint(tmp_path / "runs" / "vipa", trained=True)
    rollouts = _write_rollouts(tmp_path / "runs" / "robot" / "eval")
    loaded = load_rollouts(rollouts)
    assert [v["policy"] for v in loaded["videos"]] == ["VIPA-VLA (stages 1-3)", "scripted expert"]
    assert loaded["videos"][0]["label"] == "VIPA-VLA (stages 1-3) · reach-v3 · seed 1000 · failure (3 steps)"
    assert load_rollouts(tmp_path / "nothing") is None
    # the main job's layout is found from the checkpoint folder alone
    app = build_app(str(ckpt), examples_dir=write_examples(tmp_path / "examples"))
    assert app.vipa_rollouts is not None and app.vipa_rollouts["folder"] == str(rollouts.resolve())
    props = {
        c["props"].get("elem_id"): c["props"] for c in app.config["components"] if c["props"].get("elem_id")
    }
    assert props["qa-example"]["value"] == "v0"  # a visual test example is preselected
    assert props["qa-question"]["value"] == "Where is the mug relative to the right hand in the last frame?"
    assert props["rollout-choice"]["value"] == loaded["videos"][0]["path"]
    assert "reach-v3" in props["rollout-table"]["value"] and "Wilson" in props["rollout-table"]["value"]
    assert "**failure** after 3 steps" in props["rollout-caption"]["value"]
    assert '"move the gripper to the goal"' in props["rollout-caption"]["value"]
    tabs = [c["props"].get("label") for c in app.config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Spatial QA", "Trajectory", "Robot rollouts"], tabs
