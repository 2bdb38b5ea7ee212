"""Interfaces for the learned parts of the annotation pipeline, with real implementations.

    >>> from hand3d_dataset.estimators import GroundTruthDepthEstimator, GroundTruthBoxDetector
    >>> from hand3d_dataset.estimators import estimate_clip, detect_clip
    >>> from hand3d_dataset.sources.synth import SynthSource
    >>> clip = SynthSource(num_clips=1, image_size=64, num_frames=2).load_clip("synth-s0-000000")
    >>> est = GroundTruthDepthEstimator(seed=0)
    >>> estimate_clip(est, clip).shape, detect_clip(GroundTruthBoxDetector(), clip).shape[-1]
    ((2, 64, 64, 3), 4)

`PointCloudEstimator.estimate(frames, K) -> pointmaps`:
    frames: list of T images (H, W, 3) uint8 RGB; K: (T, 3, 3) or (3, 3) intrinsics, or None (the
    estimator assumes or predicts its own); returns (T, H, W, 3) float pointmaps, each in its frame's
    camera frame (OpenCV), at an ARBITRARY scale (scale calibration against the hand joints brings them
    to metres), NaN where there is no estimate. The CUT3R estimator of the model package implements it.
`ObjectDetector.detect(frames, names) -> boxes`:
    returns (T, N, 4) xyxy boxes in pixels for the N object names, in the integer-pixel-centre
    convention of `cameras.py` (pixel-edge boxes, see `hand3d_dataset.clip`), NaN rows where not found.

Ground-truth implementations need more of the clip than its frames (rendered depth, segmentation).
The pipeline therefore calls `estimate_clip(estimator, clip)` / `detect_clip(detector, clip)`: an
object with an `estimate_clip(clip)` / `detect_clip(clip)` method gets the clip, any other gets frames,
K and object names through the protocol above.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hand3d_dataset._checks import check_intrinsics
from hand3d_dataset.cameras import backproject_depth
from hand3d_dataset.clip import Clip, boxes_from_segmentation

__all__ = [
    "PointCloudEstimator",
    "ObjectDetector",
    "estimate_clip",
    "detect_clip",
    "GroundTruthDepthEstimator",
    "DepthAnythingEstimator",
    "GroundTruthBoxDetector",
    "GroundingDinoDetector",
    "default_intrinsics",
]


@runtime_checkable
class PointCloudEstimator(Protocol):
    """Per-frame pointmaps at an arbitrary scale; see the module docstring for shapes."""

    def estimate(self, frames: list[np.ndarray], K: np.ndarray | None = None) -> np.ndarray: ...


@runtime_checkable
class ObjectDetector(Protocol):
    """2D boxes of named objects in every frame; see the module docstring for the box convention."""

    def detect(self, frames: list[np.ndarray], names: list[str]) -> np.ndarray: ...


def _check_frames(frames) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("frames: expected at least one image, got none")
    out = []
    for i, f in enumerate(frames):
        f = np.asarray(f)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"frames[{i}]: expected uint8 (H, W, 3), got {f.dtype} {f.shape}")
        if f.shape != np.shape(frames[0]):
            raise ValueError(f"frames[{i}]: shape {f.shape} differs from frames[0] {np.shape(frames[0])}")
        out.append(f)
    return out


def _check_output(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if arr.shape != shape:
        raise ValueError(f"{name}: returned shape {arr.shape}, expected {shape}")
    return arr


def estimate_clip(estimator: PointCloudEstimator, clip: Clip) -> np.ndarray:
    """(T, H, W, 3) pointmaps of `clip` from `estimator` (see the module docstring for dispatch)."""
    T, (h, w) = clip.num_frames, clip.image_hw
    if hasattr(estimator, "estimate_clip"):
        return _check_output("estimate_clip", estimator.estimate_clip(clip), (T, h, w, 3))
    if clip.frames is None:
        raise ValueError(f"clip: {clip.clip_id} has no frames; a point-cloud estimator needs images")
    return _check_output("estimate", np.asarray(estimator.estimate(list(clip.frames), clip.K)), (T, h, w, 3))


def detect_clip(detector: ObjectDetector, clip: Clip) -> np.ndarray:
    """(T, N, 4) boxes of `clip.objects` from `detector` (see the module docstring for dispatch)."""
    T, N = clip.num_frames, len(clip.objects)
    if hasattr(detector, "detect_clip"):
        return _check_output("detect_clip", detector.detect_clip(clip), (T, N, 4))
    if clip.frames is None:
        raise ValueError(f"clip: {clip.clip_id} has no frames; an object detector needs images")
    names = [o.name for o in clip.objects]
    return _check_output("detect", np.asarray(detector.detect(list(clip.frames), names)), (T, N, 4))


def default_intrinsics(image_hw: tuple[int, int], fov_deg: float = 60.0) -> np.ndarray:
    """(3, 3) K of a pinhole camera with horizontal field of view `fov_deg`, centred, square pixels.

    Used when an estimator gets K=None: the pointmap is then right up to this guess of the focal length.
    """
    h, w = image_hw
    if not 1.0 < fov_deg < 179.0:
        raise ValueError(f"fov_deg: expected a field of view in (1, 179) degrees, got {fov_deg}")
    f = (w / 2) / np.tan(np.deg2rad(fov_deg) / 2)
    return np.array([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]])


def _per_frame_K(K, T: int, image_hw: tuple[int, int]) -> np.ndarray:
    if K is None:
        return np.broadcast_to(default_intrinsics(image_hw), (T, 3, 3))
    K = check_intrinsics("K", K)
    if K.ndim == 2:
        K = np.broadcast_to(K, (T, 3, 3))
    if K.shape != (T, 3, 3):
        raise ValueError(f"K: expected (3, 3) or ({T}, 3, 3), got {K.shape}")
    return K


# --- point clouds ------------------------------------------------------------------------------------


class GroundTruthDepthEstimator:
    """Rendered metric depth divided by an unknown per-clip scale, back-projected with the clip's K.

    The pointmap is ``backproject(depth / s_clip, K)`` with ``s_clip ~ U(scale_range)`` drawn from
    (seed, clip_id), so scale calibration on `synth` has a real unknown to recover: the calibrated scale
    should equal `true_scale(clip_id)` (returned by that method for tests and run reports).
    """

    def __init__(self, seed: int = 0, scale_range: tuple[float, float] = (0.3, 3.0)) -> None:
        lo, hi = scale_range
        if not 0 < lo <= hi or not np.isfinite(hi):
            raise ValueError(f"scale_range: expected 0 < lo ≤ hi < inf, got {scale_range}")
        self.seed, self.scale_range = int(seed), (float(lo), float(hi))

    def true_scale(self, clip_id: str) -> float:
        """The factor that turns this estimator's cloud for `clip_id` back into metres."""
        rng = np.random.default_rng([self.seed, zlib.crc32(clip_id.encode())])
        return float(rng.uniform(*self.scale_range))

    def estimate(
        self, frames: list[np.ndarray], K: np.ndarray | None = None, *, depth=None, clip_id: str = ""
    ) -> np.ndarray:
        """As the protocol, but needs the metric `depth` (T, H, W) the frames were rendered with."""
        frames = _check_frames(frames)
        if depth is None:
            raise ValueError("depth: the ground-truth estimator needs the rendered depth (use estimate_clip)")
        depth = np.asarray(depth, dtype=np.float64)
        T, (h, w) = len(frames), frames[0].shape[:2]
        if depth.shape != (T, h, w):
            raise ValueError(f"depth: expected shape ({T}, {h}, {w}), got {depth.shape}")
        return backproject_depth(depth / self.true_scale(clip_id), _per_frame_K(K, T, (h, w)))

    def estimate_clip(self, clip: Clip) -> np.ndarray:
        """(T, H, W, 3) pointmaps of a clip that carries rendered depth."""
        if clip.depth is None:
            raise ValueError(
                f"clip: {clip.clip_id} has no depth; GroundTruthDepthEstimator needs a rendered source"
            )
        return backproject_depth(clip.depth.astype(np.float64) / self.true_scale(clip.clip_id), clip.K)


class DepthAnythingEstimator:
    """Pointmaps from a transformers `DepthAnythingForDepthEstimation` and intrinsics.

    Relative checkpoints (`config.depth_estimation_type == "relative"`) predict affine-invariant
    disparity; we read it as inverse depth up to scale (``z = 1 / disparity``) and ignore the unknown
    shift, an approximation that scale calibration cannot undo. Metric checkpoints predict metres.
    Frames are resized so that the short side is `input_size` (both sides multiples of the 14-pixel
    patch), normalised with ImageNet statistics, and the prediction is resized back bilinearly.
    """

    _MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    _STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, model: Any, input_size: int = 518, device: str = "cpu", batch_size: int = 8) -> None:
        if isinstance(model, str):
            from transformers import DepthAnythingForDepthEstimation

            model = DepthAnythingForDepthEstimation.from_pretrained(model)
        if input_size < 14:
            raise ValueError(f"input_size: expected ≥ 14, got {input_size}")
        self.model = model.to(device).eval()
        self.input_size, self.device, self.batch_size = int(input_size), device, int(batch_size)
        self.metric = getattr(model.config, "depth_estimation_type", "relative") == "metric"

    def _preprocess(self, frames: list[np.ndarray]):
        import torch
        from PIL import Image

        h, w = frames[0].shape[:2]
        s = self.input_size / min(h, w)
        size = (max(14, round(h * s / 14) * 14), max(14, round(w * s / 14) * 14))
        imgs = [
            np.asarray(Image.fromarray(f).resize(size[::-1], Image.BICUBIC), np.float32) / 255 for f in frames
        ]
        x = (np.stack(imgs) - self._MEAN) / self._STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device)

    def depth(self, frames: list[np.ndarray]) -> np.ndarray:
        """(T, H, W) depth at the model's scale (metres for metric checkpoints), NaN where ≤ 0."""
        import torch

        frames = _check_frames(frames)
        h, w = frames[0].shape[:2]
        out = []
        with torch.no_grad():
            for i in range(0, len(frames), self.batch_size):
                pred = self.model(
                    pixel_values=self._preprocess(frames[i : i + self.batch_size])
                ).predicted_depth
                pred = torch.nn.functional.interpolate(
                    pred[:, None].float(), (h, w), mode="bilinear", align_corners=False
                )
                out.append(pred[:, 0].cpu().numpy().astype(np.float64))
        pred = np.concatenate(out)
        if self.metric:
            return np.where(pred > 0, pred, np.nan)
        with np.errstate(divide="ignore"):
            return np.where(pred > 1e-6 * np.nanmax(np.abs(pred), initial=1.0), 1.0 / pred, np.nan)

    def estimate(self, frames: list[np.ndarray], K: np.ndarray | None = None) -> np.ndarray:
        """(T, H, W, 3) pointmaps; K None uses `default_intrinsics` (60° horizontal field of view)."""
        depth = self.depth(frames)
        return backproject_depth(depth, _per_frame_K(K, depth.shape[0], depth.shape[1:]))


# --- detectors ---------------------------------------------------------------------------------------


class GroundTruthBoxDetector:
    """Boxes from the clip's rendered segmentation (tight around each object's visible pixels)."""

    def detect_clip(self, clip: Clip) -> np.ndarray:
        if clip.segmentation is None:
            raise ValueError(
                f"clip: {clip.clip_id} has no segmentation; GroundTruthBoxDetector needs a rendered source"
            )
        ids = []
        for o in clip.objects:
            if o.segment_id is None:
                raise ValueError(f"clip: object {o.name!r} of {clip.clip_id} has no segment_id")
            ids.append(o.segment_id)
        return boxes_from_segmentation(clip.segmentation, ids)

    def detect(self, frames: list[np.ndarray], names: list[str]) -> np.ndarray:
        raise ValueError(
            "frames: ground-truth boxes come from a clip's segmentation; call detect_clip(detector, clip)"
        )


class GroundingDinoDetector:
    """Open-vocabulary boxes from transformers' `GroundingDinoForObjectDetection`.

    The prompt lists the object names GroundingDINO-style (lower case, each followed by " ."); each name
    gets the highest-scoring box whose predicted phrase equals it (or, failing that, whose words all
    occur in it). The processor's boxes span the image as [0, W] × [0, H]; we shift them by −½ pixel
    into the integer-centre convention of `cameras.py`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        box_threshold: float = 0.3,  # minimum box score
        text_threshold: float = 0.25,  # minimum token score for a phrase to be read out
        device: str = "cpu",
    ) -> None:
        if isinstance(model, str):
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            processor = processor or AutoProcessor.from_pretrained(model)
            model = GroundingDinoForObjectDetection.from_pretrained(model)
        if processor is None:
            raise ValueError("processor: a GroundingDinoProcessor is required with a model object")
        for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name}: expected a value in [0, 1], got {v}")
        self.model, self.processor, self.device = model.to(device).eval(), processor, device
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    @staticmethod
    def prompt(names: list[str]) -> str:
        """GroundingDINO's text format: 'red mug . small blue box .'"""
        return " ".join(f"{n.lower().strip()} ." for n in names)

    def detect(self, frames: list[np.ndarray], names: list[str]) -> np.ndarray:
        import torch
        from PIL import Image

        frames = _check_frames(frames)
        if not names:
            return np.full((len(frames), 0, 4), np.nan)
        h, w = frames[0].shape[:2]
        text = self.prompt(names)
        out = np.full((len(frames), len(names), 4), np.nan)
        for k, f in enumerate(frames):
            inputs = self.processor(images=Image.fromarray(f), text=text, return_tensors="pt").to(self.device)
            with torch.no_grad():
                outputs = self.model(**inputs)
            res = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(h, w)],
            )[0]
            labels = (
                res["text_labels"] if "text_labels" in res else res["labels"]
            )  # older transformers: "labels"
            boxes, scores = res["boxes"].cpu().numpy(), res["scores"].cpu().numpy()
            for n, name in enumerate(names):
                words = set(name.lower().split())
                exact = [i for i, lab in enumerate(labels) if str(lab).strip() == name.lower()]
                loose = [
                    i for i, lab in enumerate(labels) if str(lab).split() and set(str(lab).split()) <= words
                ]
                cand = exact or loose
                if cand:
                    best = max(cand, key=lambda i: scores[i])
                    x0, y0, x1, y1 = boxes[best] - 0.5
                    x0, y0 = max(x0, -0.5), max(y0, -0.5)
                    x1, y1 = min(x1, w - 0.5), min(y1, h - 0.5)
                    if x1 > x0 and y1 > y0:
                        out[k, n] = (x0, y0, x1, y1)
        return out
