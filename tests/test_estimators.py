"""Point-cloud estimators and object detectors: ground truth on synth, tiny random transformers models."""

import importlib.util
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack  # noqa: E402
from hand3d_dataset.estimators import (  # noqa: E402
    DepthAnythingEstimator,
    GroundingDinoDetector,
    GroundTruthBoxDetector,
    GroundTruthDepthEstimator,
    ObjectDetector,
    PointCloudEstimator,
    default_intrinsics,
    detect_clip,
    estimate_clip,
)

H, W, T = 20, 24, 2


def toy_clip() -> Clip:
    depth = np.full((T, H, W), 2.0, np.float32)
    depth[:, 5:10, 6:12] = 1.0
    seg = np.zeros((T, H, W), np.uint8)
    seg[:, 5:10, 6:12] = 1
    seg[1] = 0  # the object left the view on frame 1
    return Clip(
        clip_id="toy",
        source="test",
        fps=5.0,
        K=np.array([[30.0, 0, 11.5], [0, 30.0, 9.5], [0, 0, 1]]),
        R=np.tile(np.eye(3), (T, 1, 1)),
        t=np.zeros((T, 3)),
        image_hw=(H, W),
        hands={"right": HandTrack("right", wrist3d=np.tile([0.0, 0.0, 1.0], (T, 1)))},
        objects=[ObjectTrack("red mug", segment_id=1)],
        frames=np.zeros((T, H, W, 3), np.uint8),
        depth=depth,
        segmentation=seg,
    )


def test_ground_truth_depth_has_a_hidden_per_clip_scale():
    clip = toy_clip()
    est = GroundTruthDepthEstimator(seed=7)
    pm = estimate_clip(est, clip)
    s = est.true_scale("toy")
    assert 0.3 <= s <= 3.0 and s != GroundTruthDepthEstimator(seed=8).true_scale("toy")
    assert s == GroundTruthDepthEstimator(seed=7).true_scale("toy")
    # by hand: pixel (row 7, col 8) has depth 1.0; its ray through (8, 7) scaled to z = 1 / s
    z = 1.0 / s
    np.testing.assert_allclose(pm[0, 7, 8], [(8 - 11.5) / 30 * z, (7 - 9.5) / 30 * z, z], rtol=1e-6)
    np.testing.assert_allclose(pm[..., 2] * s, clip.depth, rtol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        est.estimate(list(clip.frames), clip.K)
    clip.depth = None
    with pytest.raises(ValueError, match="no depth"):
        estimate_clip(est, clip)


def test_ground_truth_boxes_from_segmentation():
    clip = toy_clip()
    det = GroundTruthBoxDetector()
    boxes = detect_clip(det, clip)
    assert boxes.shape == (T, 1, 4)
    assert boxes[0, 0].tolist() == [5.5, 4.5, 11.5, 9.5]  # cols 6..11, rows 5..9, pixel edges
    assert np.isnan(boxes[1, 0]).all()


def test_protocols_are_runtime_checkable():
    assert isinstance(GroundTruthDepthEstimator(), PointCloudEstimator)
    assert isinstance(GroundTruthBoxDetector(), ObjectDetector)


def test_default_intrinsics():
    K = default_intrinsics((H, W), fov_deg=90.0)
    np.testing.assert_allclose(K, [[12.0, 0, 11.5], [0, 12.0, 9.5], [0, 0, 1]])
    with pytest.raises(ValueError, match="fov_deg"):
        default_intrinsics((H, W), fov_deg=180.0)


# --- tiny random transformers models -------------------------------------------------------------


def tiny_depth_anything(kind: str):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=14,
        image_size=28,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        fusion_hidden_size=16,
        head_hidden_size=8,
        neck_hidden_sizes=[8, 16],
        reassemble_factors=[2, 1],
        depth_estimation_type=kind,
        max_depth=5,
    )
    return DepthAnythingForDepthEstimation(cfg).eval()


def test_depth_anything_metric_pointmap_matches_the_model_output():
    model = tiny_depth_anything("metric")
    est = DepthAnythingEstimator(model, input_size=28)
    frames = [np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8) for i in range(T)]
    K = np.array([[30.0, 0, 11.5], [0, 30.0, 9.5], [0, 0, 1]])
    pm = est.estimate(frames, K)
    assert pm.shape == (T, H, W, 3)
    # independent preprocessing: short side 20 → 28, long side 24·1.4 = 33.6 → 28 (nearest multiple of 14)
    from PIL import Image

    x = np.stack(
        [np.asarray(Image.fromarray(f).resize((28, 28), Image.BICUBIC), np.float32) / 255 for f in frames]
    )
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        pred = model(pixel_values=torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)).predicted_depth
    want = torch.nn.functional.interpolate(pred[:, None], (H, W), mode="bilinear", align_corners=False)[
        :, 0
    ].numpy()
    assert np.all(want > 0)  # metric head: sigmoid × max_depth
    np.testing.assert_allclose(pm[..., 2], want, rtol=1e-4)
    np.testing.assert_allclose(pm[..., 0], (np.arange(W) - 11.5) / 30 * pm[..., 2], rtol=1e-4, atol=1e-9)
    # K=None falls back to a 60° field of view; the z-channel is the same depth
    np.testing.assert_allclose(est.estimate(frames)[..., 2], pm[..., 2], rtol=1e-6)
    with pytest.raises(ValueError, match="frames\\[1\\]"):
        est.estimate([frames[0], frames[1][:10]])


def test_depth_anything_relative_is_inverse_disparity():
    """Relative checkpoints predict disparity: depth = 1 / (disparity resized to the frame)."""
    from types import SimpleNamespace

    model = tiny_depth_anything("relative")
    est = DepthAnythingEstimator(model, input_size=14)
    disp = torch.linspace(1.0, 4.0, 14 * 14).reshape(1, 14, 14)

    def fake_forward(pixel_values):
        assert tuple(pixel_values.shape) == (1, 3, 14, 14)  # short side 20 → 14, long side 16.8 → 14
        return SimpleNamespace(predicted_depth=disp)

    est.model = lambda pixel_values: fake_forward(pixel_values)
    d = est.depth([np.full((H, W, 3), 128, np.uint8)])
    want = (
        1 / torch.nn.functional.interpolate(disp[:, None], (H, W), mode="bilinear", align_corners=False)[:, 0]
    )
    np.testing.assert_allclose(d, want.numpy(), rtol=1e-6)


def tiny_grounding_dino(tmp_path):
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )

    try:
        from transformers import GroundingDinoImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import GroundingDinoImageProcessor as ImageProcessor

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "mug", "small", "blue", "box"]
    tokenizer = BertTokenizerFast(vocab={v: i for i, v in enumerate(vocab)})
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 1],
            window_size=4,
            image_size=32,
            out_features=["stage1", "stage2"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
        use_timm_backbone=False,
    )
    processor = GroundingDinoProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 32, "longest_edge": 48}), tokenizer=tokenizer
    )
    return GroundingDinoForObjectDetection(cfg).eval(), processor


@pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="needs Pillow")
def test_grounding_dino_tiny_model_plumbing(tmp_path):
    model, processor = tiny_grounding_dino(tmp_path)
    det = GroundingDinoDetector(model, processor, box_threshold=0.0, text_threshold=0.0)
    assert GroundingDinoDetector.prompt(["Red mug", "small blue box"]) == "red mug . small blue box ."
    frames = [np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8) for i in range(T)]
    boxes = det.detect(frames, ["red mug", "small blue box"])
    assert boxes.shape == (T, 2, 4)
    found = np.isfinite(boxes).all(-1)
    assert np.array_equal(found, np.isfinite(boxes).any(-1))  # rows all-finite or all-NaN
    b = boxes[found]
    assert np.all(b[:, 0] < b[:, 2]) and np.all(b[:, 1] < b[:, 3])
    assert np.all(b[:, :2] >= -0.5) and np.all(b[:, 2] <= W - 0.5) and np.all(b[:, 3] <= H - 0.5)


def test_grounding_dino_picks_the_best_box_per_name(tmp_path):
    """Drive the real processor's post-processing with known logits and boxes; check the mapping by hand."""
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

    model, processor = tiny_grounding_dino(tmp_path)
    names = ["red mug", "small blue box"]
    ids = processor(
        images=np.zeros((H, W, 3), np.uint8), text=GroundingDinoDetector.prompt(names), return_tensors="pt"
    )["input_ids"][0].tolist()
    vocab = {v: k for k, v in processor.tokenizer.get_vocab().items()}
    tokens = [vocab[i] for i in ids]  # [CLS] red mug . small blue box . [SEP]

    class Fake(torch.nn.Module):
        def forward(self, **inputs):
            n = inputs["input_ids"].shape[1]
            logits = torch.full((1, 3, n), -10.0)
            logits[0, 0, [tokens.index("red"), tokens.index("mug")]] = 3.0  # query 0: "red mug", score 0.95
            logits[0, 1, [tokens.index("small"), tokens.index("blue"), tokens.index("box")]] = 1.0  # 0.73
            logits[0, 2, [tokens.index("red"), tokens.index("mug")]] = 0.5  # a weaker "red mug"
            boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.2, 0.3], [0.9, 0.9, 0.1, 0.1]]])
            return GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    det = GroundingDinoDetector(Fake(), processor, box_threshold=0.5, text_threshold=0.25)
    out = det.detect([np.zeros((H, W, 3), np.uint8)], names + ["green ball"])
    # cx, cy, w, h normalised → pixels on [0, W] × [0, H], then −½ to integer pixel centres
    np.testing.assert_allclose(
        out[0, 0], [0.25 * W - 0.5, 0.25 * H - 0.5, 0.75 * W - 0.5, 0.75 * H - 0.5], atol=1e-4
    )
    np.testing.assert_allclose(
        out[0, 1], [0.15 * W - 0.5, 0.1 * H - 0.5, 0.35 * W - 0.5, 0.4 * H - 0.5], atol=1e-4
    )
    assert np.isnan(out[0, 2]).all()


@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs the `sim` extra")
def test_ground_truth_pipeline_on_synth_recovers_scale():
    """Calibrating the GT-depth cloud against the clip's joints gives back the hidden scale."""
    from hand3d_dataset.calibration import calibrate_scale
    from hand3d_dataset.sources.synth import SynthSource

    clip = SynthSource(num_clips=1, seed=2, image_size=64, num_frames=2).load_clip("synth-s2-000000")
    est = GroundTruthDepthEstimator(seed=1)
    pm = estimate_clip(est, clip)
    side = clip.meta["active_hand"]
    res = calibrate_scale(clip.joints_cam(side)[0], pm[0], clip.K[0])
    # joints lie inside capsules of radius ~1 cm: the surface is slightly nearer than the joint centres
    assert res.scale == pytest.approx(est.true_scale(clip.clip_id), rel=0.05)
    boxes = detect_clip(GroundTruthBoxDetector(), clip)
    np.testing.assert_array_equal(boxes[:, :, :], np.stack([o.box2d for o in clip.objects], axis=1))


# --- `hand3d build --estimator/--detector`: the named checkpoints are loaded from disk ------------------------


def test_build_loads_the_named_estimator_and_detector_checkpoints(tmp_path, monkeypatch):
    from hand3d_dataset import build as build_mod
    from hand3d_dataset.cli import main
    from hand3d_dataset.cut3r_estimator import Cut3rPointCloudEstimator
    from modeling_vipa.configuration_cut3r import Cut3rConfig
    from modeling_vipa.spatial_encoder import Cut3rEncoder

    torch.manual_seed(0)
    cut3r = Cut3rEncoder(Cut3rConfig.tiny())
    cut3r.save_pretrained(tmp_path / "cut3r")
    depth = tiny_depth_anything("metric")
    depth.save_pretrained(tmp_path / "da")
    dino, dino_processor = tiny_grounding_dino(tmp_path)
    dino.save_pretrained(tmp_path / "gd")
    dino_processor.save_pretrained(tmp_path / "gd")

    def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    cfg = build_mod.BuildConfig(
        estimator=f"cut3r:{tmp_path / 'cut3r'}", detector=f"grounding-dino:{tmp_path / 'gd'}"
    )
    est, det = build_mod.make_models(cfg)
    assert isinstance(est, Cut3rPointCloudEstimator) and same_weights(est.encoder, cut3r)
    assert isinstance(det, GroundingDinoDetector) and same_weights(det.model, dino)
    est, det = build_mod.make_models(build_mod.BuildConfig(estimator=f"depth-anything:{tmp_path / 'da'}"))
    assert isinstance(est, DepthAnythingEstimator) and est.metric and same_weights(est.model, depth)
    assert isinstance(det, GroundTruthBoxDetector)

    # errors name the field and the bad value
    for field, spec, msg in [
        ("estimator", "midas:/x", "estimator: unknown kind 'midas'"),
        ("estimator", "cut3r", "estimator: 'cut3r' needs a checkpoint"),
        ("estimator", "gt-depth:/x", "estimator: 'gt-depth' takes no checkpoint"),
        ("detector", "yolo", "detector: unknown kind 'yolo'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build_mod.BuildConfig(**{field: spec})
    with pytest.raises(ValueError, match="no CUT3R checkpoint folder"):
        build_mod.make_models(build_mod.BuildConfig(estimator=f"cut3r:{tmp_path / 'missing'}"))

    # the CLI passes the flags through (the build itself is replaced: the point is the plumbing)
    seen = {}

    def fake_build(c):
        seen["cfg"] = c
        raise RuntimeError("stop here")

    monkeypatch.setattr(build_mod, "build", fake_build)
    argv = ["build", "--out", str(tmp_path / "o"), "--estimator", f"cut3r:{tmp_path / 'cut3r'}"]
    with pytest.raises(RuntimeError, match="stop here"):
        main([*argv, "--detector", f"grounding-dino:{tmp_path / 'gd'}", "--device", "cpu"])
    c = seen["cfg"]
    assert (c.estimator, c.detector, c.device) == (
        f"cut3r:{tmp_path / 'cut3r'}",
        f"grounding-dino:{tmp_path / 'gd'}",
        "cpu",
    )
    assert main(["build", "--out", str(tmp_path / "o"), "--estimator", "midas:/x"]) == 2
