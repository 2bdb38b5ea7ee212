"""evaluation.probe3d: segment centres, token cover, ridge, pair scoring, each against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.probe3d import Probe3DConfig, cell_cover, fit_ridge, frame_pairs, pair_scores, segment_centres
from hand3d_dataset.clip import HAND_SEGMENT, Clip, HandTrack, ObjectTrack


def _clip(depth: np.ndarray, seg: np.ndarray, K: np.ndarray) -> Clip:
    T, H, W = depth.shape
    return Clip(
        clip_id="probe-0", source="test", fps=10.0, K=K, R=np.tile(np.eye(3), (T, 1, 1)), t=np.zeros((T, 3)),
        image_hw=(H, W), hands={"right": HandTrack("right", wrist3d=np.zeros((T, 3)))},
        objects=[ObjectTrack("red can", segment_id=3), ObjectTrack("tiny cube", segment_id=4)],
        task="t", frames=np.zeros((T, H, W, 3), np.uint8), depth=depth, segmentation=seg,
    )  # fmt: skip


def test_segment_centres_by_hand():
    H = W = 12
    fx, cx, cy = 10.0, 5.0, 6.0
    K = np.array([[fx, 0, cx], [0, fx, cy], [0, 0, 1.0]])
    depth = np.full((1, H, W), 2.0, np.float32)
    seg = np.zeros((1, H, W), np.uint8)
    seg[0, 1:6, 2:7] = 3  # red can: 25 px, rows 1..5, cols 2..6, at z = 2
    seg[0, 8:12, 0:5] = HAND_SEGMENT["right"]  # 20 px, on a slanted depth below
    depth[0, 8:12, 0:5] = np.arange(5, dtype=np.float32)[None] * 0.1 + 1.0  # z = 1.0 .. 1.4 by column
    depth[0, 8, 0:5] = np.nan  # one row without depth: 15 valid px left
    seg[0, 0, 10:12] = 4  # tiny cube: 2 px, below min_pixels
    out = segment_centres(_clip(depth, seg, K), min_pixels=10)
    assert [(f, s, n) for f, s, n, _, _ in out] == [(0, 3, "red can"), (0, 255, "right hand")]
    # red can: z = 2 everywhere; the median pixel is column 4, row 3 -> x = (4 - 5) / 10 * 2, y = (3 - 6) / 10 * 2
    np.testing.assert_allclose(out[0][3], [-0.2, -0.6, 2.0], atol=1e-6)
    # hand: rows 9..11 (row 8 has no depth), columns 0..4 with z = 1.0 + 0.1 c; per-axis medians of the points
    cols, rows = np.meshgrid(np.arange(5), np.arange(9, 12))
    z = 1.0 + 0.1 * cols
    x, y = (cols - cx) / fx * z, (rows - cy) / fx * z
    np.testing.assert_allclose(out[1][3], [np.median(x), np.median(y), np.median(z)], atol=1e-6)
    assert out[1][4].sum() == 20  # the mask is the whole segment, holes included


def test_segment_centres_needs_depth_and_segmentation():
    clip = _clip(np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8), np.diag([4.0, 4.0, 1.0]))
    clip.depth = None
    with pytest.raises(ValueError, match="segmentation and metric depth"):
        segment_centres(clip)


def test_cell_cover_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # the left half
    np.testing.assert_allclose(cell_cover(mask, 2, 4), [1, 1, 0, 0, 1, 1, 0, 0])
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # one pixel of the top-left 2x2 cell
    np.testing.assert_allclose(cell_cover(mask, 2, 2), [0.25, 0, 0, 0])


def test_fit_ridge_recovers_a_linear_map_and_picks_the_better_strength():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 10
    A, c = rng.normal(size=(6, 3)), np.array([0.5, -1.0, 2.0])
    probe = fit_ridge(X, X @ A + c, lambdas=[1e-8])
    Xn = rng.normal(size=(50, 6)) * 3
    np.testing.assert_allclose(probe.predict(Xn), Xn @ A + c, atol=1e-5)
    # pure-noise features, few rows: a strong ridge (predict the mean) validates better than a weak one
    Xr, Yr = rng.normal(size=(40, 30)), rng.normal(size=(40, 3))
    assert fit_ridge(Xr, Yr, lambdas=[1e-6, 1e6]).lam == 1e6
    with pytest.raises(ValueError, match="too few"):
        fit_ridge(Xr[:5], Yr[:5], lambdas=[1.0])


def test_frame_pairs_and_pair_scores_by_hand():
    i, j = frame_pairs(np.array([7, 7, 9, 9, 9, 4]))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (2, 3), (2, 4), (3, 4)]
    with pytest.raises(ValueError, match="no frame has two"):
        frame_pairs(np.array([1, 2, 3]))
    d_true = np.array([[0.2, 0.0, 0.0], [0.0, 0.0, 0.3]])
    d_pred = np.array([[0.1, 0.0, 0.005], [0.0, 0.0, -0.3]])
    # pair 1: right / - / - both (0.005 / 0.1 is under gamma = 0.3) -> 3 axes; pair 2: forward vs backward -> 2
    s = pair_scores(d_pred, d_true, gamma=0.3)
    assert s["n_pairs"] == 2 and s["direction_score"] == 2.5
    assert s["axis_accuracy"] == {"x": 1.0, "y": 1.0, "z": 0.5}
    assert s["distance_error_m"] == pytest.approx((0.2 - np.hypot(0.1, 0.005)) / 2)
    with pytest.raises(ValueError, match="d_pred, d_true"):
        pair_scores(d_pred[:, :2], d_true[:, :2])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="Probe3DConfig.train_clips"):
        Probe3DConfig(train_clips=0)
    with pytest.raises(ValueError, match="Probe3DConfig.lambdas"):
        Probe3DConfig(lambdas=(1.0, -1.0))


def _tiny_model_and_row():
    from PIL import Image

    from cpu_demo.standins import (
        StandinConfig,
        build_standin_processor,
        build_standin_tokenizer,
        standin_vipa_config,
    )
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration

    answer = "It is left and forward, roughly 0.40 m from the red can."
    cfg = StandinConfig.quick()
    tok = build_standin_tokenizer(["Where is the red can? " + answer] * 4, cfg.vocab_size)
    processor = build_standin_processor(cfg, tok)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tok)).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    row = {
        "images": [image],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Where is the red can?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }
    return model, processor, row, answer


def test_answer_nll_scores_exactly_the_answer_tokens_and_ablates_the_branch():
    from evaluation.probe3d import ABLATIONS, answer_nll, branch_ablation

    model, processor, row, answer = _tiny_model_and_row()
    answer_ids = processor.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    nll, n = answer_nll(model, processor, row)
    assert n == len(answer_ids)
    # by hand: the answer is the last tokens before the template's trailing newline; sum their -log p
    batch = processor(
        images=[row["images"]], text=[processor.apply_chat_template(row["messages"])], return_tensors="pt"
    )
    ids = batch["input_ids"][0].tolist()
    start = max(i for i in range(len(ids)) if ids[i : i + len(answer_ids)] == answer_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[0].double(), -1)
    expected = -sum(float(logp[start + k - 1, t]) for k, t in enumerate(answer_ids))
    assert nll == pytest.approx(expected, rel=1e-4)
    # a fresh fusion (alpha = 0.5) changes the answer's NLL when V_spa is zeroed or the branch is off,
    # and the model is left as it was (weights and switch)
    alpha = float(model.model.fusion.alpha.detach())
    scores = {name: answer_nll(model, processor, row, name)[0] for name in ABLATIONS}
    assert scores["V_spa zeroed"] != pytest.approx(scores["as trained"], rel=1e-6)
    assert scores["3D branch off (alpha = 0)"] != pytest.approx(scores["as trained"], rel=1e-6)
    assert float(model.model.fusion.alpha.detach()) == alpha and model.config.use_spatial_branch
    assert answer_nll(model, processor, row)[0] == pytest.approx(scores["as trained"], rel=1e-9)
    # alpha = 0 is the branch off exactly: "3D branch off" (CUT3R and the fusion skipped) scores the same
    with torch.no_grad():
        model.model.fusion.alpha.zero_()
    assert answer_nll(model, processor, row)[0] == pytest.approx(
        scores["3D branch off (alpha = 0)"], rel=1e-6
    )
    # with the branch off, what CUT3R says cannot matter: all three agree
    with torch.no_grad():
        model.model.fusion.alpha.zero_()
    res = branch_ablation(model, processor, [row, row])
    assert res["n_rows"] == 2 and res["answer_tokens"] == 2 * n
    values = list(res["nll_per_token"].values())
    assert values == pytest.approx([values[0]] * 3, rel=1e-6)
    with pytest.raises(ValueError, match="last message must be the assistant"):
        answer_nll(model, processor, {"images": row["images"], "messages": row["messages"][:1]})
    with pytest.raises(ValueError, match="spatial: expected one of"):
        answer_nll(model, processor, row, "no 3D")
