"""Save a tiny VipaProcessor, reload it with `AutoProcessor.from_pretrained(..., trust_remote_code=True)` in a
fresh, offline Python process that cannot import this package, and compare its outputs with the arrays the
original processor produced here."""

from __future__ import annotations

import json
import textwrap

import numpy as np

from tests.tiny_assets import build_tiny_processor, make_image, run_offline_child, tiny_norm_stats

CHILD = textwrap.dedent(
    """
    try:
        import processing_vipa  # noqa: F401
        raise SystemExit("the import blocker does not work")
    except ImportError:
        pass

    import json
    import numpy as np
    from transformers import AutoProcessor

    ckpt, data = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    assert type(processor).__name__ == "VipaProcessor", type(processor)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    inputs = json.load(open(f"{data}/inputs.json"))
    frames = [np.load(f"{data}/frame{i}.npy") for i in range(inputs["n_frames"])]
    out = processor(
        images=[frames[:1], frames[1:]],
        text=inputs["text"],
        state=np.load(f"{data}/state.npy"),
        unnorm_key="libero",
        return_tensors="np",
    )
    motion = processor.decode_motion(np.load(f"{data}/motion_ids.npy"))
    actions = processor.unnormalize_actions(np.load(f"{data}/norm_actions.npy"), unnorm_key="robocasa")
    np.savez(
        f"{data}/child.npz",
        motion=motion,
        actions=actions,
        motion_token_ids=np.asarray(processor.motion_token_ids),
        image_token_id=processor.image_token_id,
        **{k: np.asarray(out[k]) for k in out},
    )
    print("child ok")
    """
)


def test_autoprocessor_reload_in_fresh_offline_process(tmp_path):
    processor = build_tiny_processor(
        with_motion_tokens=True, norm_stats=tiny_norm_stats(keys=("libero", "robocasa"))
    )
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    data.mkdir()
    processor.save_pretrained(ckpt)
    saved = sorted(p.name for p in ckpt.iterdir())
    for name in ("processor_config.json", "processing_vipa.py", "motion_tokenizer.py", "chat_template.jinja"):
        assert name in saved, saved
    config = json.loads((ckpt / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_vipa.VipaProcessor"}
    assert config["image_seq_length"] == 4 and config["spatial_image_size"] == [48, 64]

    frames = [
        np.asarray(make_image(40 + 10 * i, 50, seed=i, mode="RGBA" if i == 2 else "RGB")) for i in range(3)
    ]
    for i, frame in enumerate(frames):
        np.save(data / f"frame{i}.npy", frame)
    text = ["<image>\nWhere is the cup?", "<image>\n<image>\nHow does the hand move?"]
    (data / "inputs.json").write_text(json.dumps({"n_frames": 3, "text": text}))
    state = np.random.default_rng(0).normal(size=(2, 8))
    np.save(data / "state.npy", state)
    motion_ids = processor.tokenizer("<motion><motion_3><motion_500><motion_1000></motion>")["input_ids"]
    np.save(data / "motion_ids.npy", np.asarray(motion_ids))
    norm_actions = np.random.default_rng(1).normal(size=(4, 7))
    np.save(data / "norm_actions.npy", norm_actions)
    expected = processor(
        images=[frames[:1], frames[1:]], text=text, state=state, unnorm_key="libero", return_tensors="np"
    )

    result = run_offline_child(CHILD, [ckpt, data], tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    child = np.load(data / "child.npz")
    for key in (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "spatial_pixel_values",
        "spatial_frame_mask",
        "state",
    ):
        np.testing.assert_array_equal(child[key], np.asarray(expected[key]), err_msg=key)
    assert child["pixel_values"].shape == (3, 3, 56, 56)
    np.testing.assert_array_equal(child["motion"], processor.decode_motion(motion_ids))
    np.testing.assert_array_equal(
        child["actions"], processor.unnormalize_actions(norm_actions, unnorm_key="robocasa")
    )
    assert child["motion_token_ids"].tolist() == processor.motion_token_ids
    assert int(child["image_token_id"]) == processor.image_token_id
