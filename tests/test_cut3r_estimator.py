"""CUT3R as the Hand3D point-cloud estimator (tiny random weights: geometry of the resize/crop undo, the
recurrent pass, and that scale calibration runs on the output; no accuracy claims)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from hand3d_dataset.calibration import calibrate_scale
from hand3d_dataset.cameras import intrinsics_matrix
from hand3d_dataset.cut3r_estimator import Cut3rPointCloudEstimator
from hand3d_dataset.estimators import GroundTruthBoxDetector, PointCloudEstimator
from hand3d_dataset.pipeline import PipelineConfig, process_clip
from modeling_vipa.configuration_cut3r import Cut3rConfig
from tests.hand3d_fake_source import make_clip
from tests.tiny_assets import build_tiny_processor

SPATIAL = (48, 64)


@pytest.fixture(scope="module")
def estimator() -> Cut3rPointCloudEstimator:
    torch.manual_seed(0)
    return Cut3rPointCloudEstimator(Cut3rConfig.tiny(), spatial_image_size=SPATIAL)


def frames_of(h: int, w: int, n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def reference_pointmaps(estimator: Cut3rPointCloudEstimator, frames: list[np.ndarray]) -> np.ndarray:
    """The encoder run by hand on the model processor's own CUT3R input: (T, 48, 64, 3)."""
    processor = build_tiny_processor(spatial_image_size=SPATIAL)
    pixels = np.stack([processor.spatial_frame(PIL.Image.fromarray(f)) for f in frames])
    with torch.no_grad():
        return estimator.encoder(torch.from_numpy(pixels)[None]).pts3d_self[0].double().numpy()


def test_wide_frames_lose_their_side_columns(estimator):
    # 40x70 -> scale max(48/40, 64/70) = 1.2 -> 48x84, left = 10: u_c = 1.2 (u + 1/2) - 10.5, inside for
    # u in 8..61 (by hand: 1.2 * 8.5 - 10.5 = -0.3 >= -0.5, 1.2 * 7.5 - 10.5 = -1.5; 1.2 * 61.5 - 10.5 = 63.3 < 63.5)
    frames = frames_of(40, 70)
    pointmaps = estimator.estimate(frames)
    assert pointmaps.shape == (2, 40, 70, 3) and pointmaps.dtype == np.float64
    finite_cols = np.flatnonzero(np.isfinite(pointmaps).all(axis=(0, 1, 3)))
    assert finite_cols.tolist() == list(range(8, 62))
    assert np.isnan(pointmaps[:, :, list(range(8)) + list(range(62, 70))]).all()

    ref = reference_pointmaps(estimator, frames)
    for v, u in [(0, 8), (39, 61), (17, 30), (5, 44)]:
        row, col = int(np.floor(1.2 * (v + 0.5))), int(np.floor(1.2 * (u + 0.5) - 10.0))
        np.testing.assert_allclose(pointmaps[:, v, u], ref[:, row, col], rtol=1e-6, atol=1e-7)


def test_tall_frames_lose_their_top_and_bottom_rows(estimator):
    # 80x50 -> scale 1.28 -> 102x64, top = 27, s_y = 102/80: inside for v in 21..58 (by hand)
    pointmaps = estimator.estimate(frames_of(80, 50, n=1))
    finite_rows = np.flatnonzero(np.isfinite(pointmaps).all(axis=(0, 2, 3)))
    assert finite_rows.tolist() == list(range(21, 59))


def test_one_recurrent_pass_per_clip(estimator):
    frames = frames_of(48, 64, n=2, seed=3)  # no resize, no crop: the maps are CUT3R's own
    clip = estimator.estimate(frames)
    np.testing.assert_allclose(clip, reference_pointmaps(estimator, frames), rtol=1e-6, atol=1e-7)
    alone = estimator.estimate(frames[1:])
    assert not np.allclose(clip[1], alone[0])  # frame 1 saw frame 0 through the state


def test_bilinear_agrees_at_crop_pixel_centres_and_confidence_masks(estimator):
    frames = frames_of(48, 64, n=1, seed=4)
    bilinear = Cut3rPointCloudEstimator(
        estimator.encoder, spatial_image_size=SPATIAL, interpolation="bilinear"
    )
    np.testing.assert_allclose(bilinear.estimate(frames), estimator.estimate(frames), rtol=1e-6, atol=1e-7)
    _, confidence = estimator.predict(frames)
    threshold = float(np.median(confidence))
    masked = Cut3rPointCloudEstimator(estimator.encoder, spatial_image_size=SPATIAL, min_confidence=threshold)
    nan = np.isnan(masked.estimate(frames)[..., 0])
    assert np.array_equal(nan, confidence < threshold)


def test_scale_calibration_runs_on_the_output(estimator):
    assert isinstance(estimator, PointCloudEstimator)
    frames = frames_of(40, 70, n=2, seed=5)
    K = intrinsics_matrix((50.0, 50.0), (34.5, 19.5))
    # a 21-joint "hand" 0.6 m in front of the camera, inside the crop (columns 8..61)
    grid = np.stack(np.meshgrid(np.linspace(-0.25, 0.25, 7), np.linspace(-0.15, 0.15, 3)), -1).reshape(21, 2)
    joints = np.concatenate([grid, np.full((21, 1), 0.6)], axis=1)
    joints = np.stack([joints, joints + [0.02, 0.0, 0.05]])  # (T, 21, 3)
    result = calibrate_scale(joints, estimator.estimate(frames, K), K)
    assert result.scale is not None and np.isfinite(result.scale) and result.scale > 0, result.reason
    assert result.num_valid >= 3


def test_bad_input_is_named(estimator):
    with pytest.raises(ValueError, match="frames\\[1\\]"):
        estimator.estimate([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="frames: expected at least one"):
        estimator.estimate([])
    with pytest.raises(ValueError, match="K"):
        estimator.estimate(frames_of(40, 70), K=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="spatial_image_size"):
        Cut3rPointCloudEstimator(estimator.encoder, spatial_image_size=(50, 64))
    with pytest.raises(ValueError, match="interpolation"):
        Cut3rPointCloudEstimator(estimator.encoder, spatial_image_size=SPATIAL, interpolation="cubic")


def test_the_hand3d_pipeline_runs_on_it(estimator):
    """A whole clip through `process_clip` with this estimator: one recurrent pass, a calibrated scale."""
    result = process_clip(make_clip(0), estimator, GroundTruthBoxDetector(), PipelineConfig(), seed=0)
    assert result.skipped is None, result.skipped
    assert result.scale is not None and np.isfinite(result.scale) and result.scale > 0
    assert result.scale_num_valid >= 3 and result.rows_visual
