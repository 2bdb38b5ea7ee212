"""CUT3R as the Hand3D point-cloud estimator (paper §3.2.1): a clip's frames run in ONE recurrent pass of
`Cut3rEncoder`, and its self-view pointmaps come back at the frames' own resolution, ready for
`calibration.calibrate_scale`. Implements `estimators.PointCloudEstimator`.

Usage (random tiny weights here; pass a converted checkpoint folder for real pointmaps,
`python -m training.convert_cut3r cut3r_512_dpt_4_64.pth checkpoints/cut3r`):

    import numpy as np
    from modeling_vipa.configuration_cut3r import Cut3rConfig
    from hand3d_dataset.cut3r_estimator import Cut3rPointCloudEstimator
    estimator = Cut3rPointCloudEstimator(Cut3rConfig.tiny(), spatial_image_size=(48, 64))
    frames = [np.zeros((40, 70, 3), np.uint8)] * 2
    estimator.estimate(frames).shape                      # (2, 40, 70, 3); NaN in columns 0-7 and 62-69

Preprocessing is `VipaProcessor.spatial_frame`'s, the model's own: aspect-preserving resize until the image
covers `spatial_image_size` (h_s, w_s), centre crop, `(rgb / 255 - mean) / std`. Undoing it, with pixel
centres at integers (`cameras.py`): the resize takes a pixel coordinate u to u_r = (u + 1/2) * s_x - 1/2
(s_x = W_resized / W, likewise for v), the crop to u_c = u_r - left. Every original pixel reads the CUT3R
pixel nearest to (u_c, v_c) (or a bilinear blend, `interpolation="bilinear"`); pixels whose (u_c, v_c) falls
outside the crop, [-1/2, w_s - 1/2) x [-1/2, h_s - 1/2), were never seen by CUT3R and are NaN. The 3D points
themselves need no change: resizing and cropping an image changes the intrinsics, not the camera frame.

Nearest is the default for the same reason `calibrate_scale` reads nearest pixels: a blend would mix the hand
with the background at silhouette edges, exactly where joints project.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from hand3d_dataset._checks import check_intrinsics
from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.spatial_encoder import Cut3rEncoder
from processing_vipa.processing_vipa import VipaProcessor

__all__ = ["Cut3rPointCloudEstimator", "crop_geometry"]


@dataclass(frozen=True)
class _SpatialSettings:
    """The attributes `VipaProcessor.spatial_frame` reads, so that its preprocessing runs without a tokenizer."""

    spatial_image_size: tuple[int, int]  # CUT3R input (height, width)
    spatial_image_mean: tuple[float, float, float]  # Cut3rConfig.image_mean
    spatial_image_std: tuple[float, float, float]  # Cut3rConfig.image_std
    load_rgb = staticmethod(VipaProcessor.load_rgb)


def crop_geometry(
    image_hw: tuple[int, int], spatial_image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of `VipaProcessor.spatial_frame` for an image of `image_hw`.

    Must follow `spatial_frame` exactly (same max-scale, rounding and integer centre offsets).
    """
    h, w = image_hw
    hs, ws = spatial_image_size
    scale = max(hs / h, ws / w)
    new_w, new_h = max(ws, round(w * scale)), max(hs, round(h * scale))
    return new_h, new_w, (new_h - hs) // 2, (new_w - ws) // 2


class Cut3rPointCloudEstimator:
    """Self-view pointmaps of a clip from CUT3R, at the frames' resolution, NaN outside CUT3R's crop.

    Args:
        encoder: a `Cut3rEncoder`, a converted checkpoint folder (`Cut3rEncoder.from_pretrained`), or a
            `Cut3rConfig` (random weights: tests only).
        spatial_image_size: CUT3R input (height, width), multiples of 16; (384, 512) is 4:3 at the 512 side
            the official checkpoint was trained at.
        interpolation: "nearest" (default, see the module docstring) or "bilinear" to resample the pointmap.
        min_confidence: pixels whose CUT3R confidence (>= 1) is below this become NaN; None keeps all.
        device, dtype: where and in which precision CUT3R runs; outputs are float64 numpy arrays.
    """

    def __init__(
        self,
        encoder: Cut3rEncoder | Cut3rConfig | str | Path,
        spatial_image_size: tuple[int, int] = (384, 512),
        interpolation: str = "nearest",
        min_confidence: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(encoder, Cut3rConfig):
            encoder = Cut3rEncoder(encoder)
        elif isinstance(encoder, (str, Path)):
            encoder = Cut3rEncoder.from_pretrained(encoder)
        if not isinstance(encoder, Cut3rEncoder):
            raise ValueError(
                f"encoder: expected a Cut3rEncoder, Cut3rConfig or checkpoint folder, got {type(encoder)}"
            )
        patch = encoder.config.patch_size
        size = tuple(int(s) for s in spatial_image_size)
        if len(size) != 2 or min(size) < patch or size[0] % patch or size[1] % patch:
            raise ValueError(
                f"spatial_image_size: expected (height, width), positive multiples of {patch}, got {spatial_image_size}"
            )
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation: expected 'nearest' or 'bilinear', got {interpolation!r}")
        if min_confidence is not None and not np.isfinite(min_confidence):
            raise ValueError(f"min_confidence: expected a finite number or None, got {min_confidence}")
        self.encoder = encoder.to(device=device, dtype=dtype).eval()
        self.settings = _SpatialSettings(size, encoder.config.image_mean, encoder.config.image_std)
        self.interpolation = interpolation
        self.min_confidence = min_confidence

    @property
    def spatial_image_size(self) -> tuple[int, int]:
        return self.settings.spatial_image_size

    def preprocess(self, frames: list[np.ndarray]) -> torch.Tensor:
        """(1, T, 3, h_s, w_s) float32 CUT3R input of a clip, through `VipaProcessor.spatial_frame`."""
        pixels = [
            VipaProcessor.spatial_frame(self.settings, PIL.Image.fromarray(frame)) for frame in frames
        ]  # spatial_frame only reads the settings' attributes, so it runs unbound on them
        return torch.from_numpy(np.stack(pixels))[None]

    def predict(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Pointmaps and confidences of a clip at the frames' resolution.

        frames: T images (H, W, 3) uint8 RGB of one clip, in time order (one recurrent pass).
        Returns pointmaps (T, H, W, 3) float64, each frame's own camera frame (OpenCV), CUT3R's scale
        (roughly metres with the official weights); confidence (T, H, W) float64; both NaN outside the crop.
        """
        frames = self._check_frames(frames)
        h, w = frames[0].shape[:2]
        pixels = self.preprocess(frames).to(device=self.encoder.device, dtype=self.encoder.dtype)
        with torch.no_grad():
            out = self.encoder(pixels, return_heads=True)
        pts = out.pts3d_self[0].float()  # (T, h_s, w_s, 3)
        conf = out.conf[0].float()  # (T, h_s, w_s)
        maps = self._to_original(torch.cat([pts, conf[..., None]], dim=-1), (h, w))
        pointmaps, confidence = maps[..., :3], maps[..., 3]
        if self.min_confidence is not None:
            pointmaps[confidence < self.min_confidence] = np.nan
        return pointmaps, confidence

    def estimate(self, frames: list[np.ndarray], K: np.ndarray | None = None) -> np.ndarray:
        """`PointCloudEstimator.estimate`: (T, H, W, 3) pointmaps, arbitrary scale, NaN outside the crop.

        K: (3, 3) or (T, 3, 3); validated, otherwise unused: CUT3R predicts geometry from pixels alone, so
        its implied focal length may differ from K (scale calibration only reads z at the joints' pixels).
        """
        if K is not None:
            K = check_intrinsics("K", K)
            if K.shape not in ((3, 3), (len(frames), 3, 3)):
                raise ValueError(f"K: expected (3, 3) or ({len(frames)}, 3, 3), got {K.shape}")
        return self.predict(frames)[0]

    @staticmethod
    def _check_frames(frames: list[np.ndarray]) -> list[np.ndarray]:
        if len(frames) == 0:
            raise ValueError("frames: expected at least one image, got none")
        out = []
        for i, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frames[{i}]: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
            if out and frame.shape != out[0].shape:
                raise ValueError(f"frames[{i}]: shape {frame.shape} differs from frames[0] {out[0].shape}")
            out.append(frame)
        return out

    def _to_original(self, maps: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
        """(T, h_s, w_s, C) CUT3R-grid maps -> (T, H, W, C) float64 on the original grid, NaN outside the crop."""
        h, w = image_hw
        hs, ws = self.spatial_image_size
        new_h, new_w, top, left = crop_geometry(image_hw, (hs, ws))
        # original pixel centre -> crop coordinates (integer pixel centres throughout)
        u_c = (np.arange(w) + 0.5) * (new_w / w) - 0.5 - left
        v_c = (np.arange(h) + 0.5) * (new_h / h) - 0.5 - top
        inside = ((v_c >= -0.5) & (v_c < hs - 0.5))[:, None] & ((u_c >= -0.5) & (u_c < ws - 0.5))[None, :]
        maps = maps.cpu().double()
        if self.interpolation == "nearest":
            rows = np.clip(np.floor(v_c + 0.5).astype(np.int64), 0, hs - 1)
            cols = np.clip(np.floor(u_c + 0.5).astype(np.int64), 0, ws - 1)
            out = maps[:, rows][:, :, cols].numpy()
        else:
            # grid_sample's normalised coordinates with align_corners=False: x_n = (u + 1/2) / w_s * 2 - 1
            gx = torch.from_numpy((u_c + 0.5) / ws * 2 - 1)
            gy = torch.from_numpy((v_c + 0.5) / hs * 2 - 1)
            grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
            grid = grid[None].expand(maps.shape[0], -1, -1, -1)
            sampled = F.grid_sample(
                maps.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            out = sampled.permute(0, 2, 3, 1).numpy()
        out = np.ascontiguousarray(out)
        out[:, ~inside] = np.nan
        return out
