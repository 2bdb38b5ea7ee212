"""The Hand3D annotation pipeline for one clip (paper §3.2.1, Figure 2; DESIGN.md §3).

    >>> from hand3d_dataset.pipeline import PipelineConfig, process_clip
    >>> from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
    >>> from hand3d_dataset.sources import get_source
    >>> src = get_source("synth", num_clips=1, seed=0, image_size=64, num_frames=4)
    >>> result = process_clip(src.load_clip(src.clip_ids()[0]), GroundTruthDepthEstimator(seed=0),
    ...                       GroundTruthBoxDetector(), PipelineConfig(), seed=0)
    >>> result.skipped is None and len(result.rows_visual) > 0
    True

Steps, per clip:

1. hand joints (world) → camera frame of each frame (`Clip.joints_cam`);
2. project → visibility filter: a hand counts as in view on a frame when it is tracked there and at
   least `min_visible_joints` of its 21 joints project in front of the camera and inside the image;
   frames without any hand in view are dropped for image samples (the paper filters those frames);
3. point cloud from the estimator (`(T, H, W, 3)` camera frame, its own units);
4. scale calibration ``s = median_{k∈Ω}(z_joint_k / z_cloud_k)`` pooled over all in-view frames
   (one scale per clip: depth models are consistent within a clip, and pooling makes |Ω| large).
   Three refinements of Ω and z_joint, each against a bias measured on `synth` (1-4 % → < 1 %):
   joints move towards the camera by their depth under the skin (`JOINT_SKIN_DEPTH_M`), since the cloud
   sees skin; joints hidden behind another bone of the hand leave Ω (`self_occluded`); a second median
   keeps only joints whose calibrated cloud depth agrees within `inlier_tol_m` (objects held in front);
5. object boxes from the detector (`(T, O, 4)` xyxy, NaN where not detected);
6. 3D object positions from the calibrated cloud inside each box (`calibration.localize_object`:
   by default the object's estimated volumetric centre, `localization.estimate="surface"` for the
   visible-surface centre), with the hands' pixels (drawn from the joints, `hand_mask`) removed;
7. samples: Hand3D-visual (`samples_visual`) and Hand3D-action (`samples_action`), turned into rows.

Object positions from the dataset (`PipelineConfig.object_source`): where a source gives an object's pose
(`ObjectTrack.position3d`: DexYCB, H2O, FPHA, ARCTIC, OakInk2, TACO, HOI4D, HOT3D and synth do), its
centre moved into each frame's camera by the clip's R, t is exact, so "auto" (the default) takes it and
runs steps 3-6 only for the (frame, object) pairs without one; "pose" uses the dataset's poses alone
(objects without one get no position, and no estimator or detector runs), "estimate" ignores them (the
paper's pipeline, and the way to measure it against the poses). A posed centre counts on a frame only
when it is in front of the camera and projects inside the image (`objects_from_poses`). A pose gives the
centre, not the visible surface: with `localization.estimate="surface"`, "auto" estimates every object.
In "auto" the estimator still runs on clips with images (the clip's calibrated scale is reported) and the
detector only when some position lacks a pose. On a clip with poses, an estimate that cannot be made (an
estimator or detector that cannot run on the clip, e.g. `gt-depth` or `gt-boxes` on a dataset without
depth or segmentation; a failed calibration) is a note, and the positions without a pose stay empty; on a
clip without any pose, "auto" is the estimate path, whose failures skip the clip.

Nothing in a clip raises past `process_clip` for bad data: a clip that cannot be annotated comes
back with `skipped` set to the reason, and frame-level drops (a blank frame, an object without a
usable box) are listed in `notes`, so the run report can say what was left out and why.
"""

from __future__ import annotations

import io
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from hand3d_dataset.calibration import LocalizationConfig, calibrate_scale, localize_object, sample_pointmap
from hand3d_dataset.cameras import project, visibility
from hand3d_dataset.clip import Clip
from hand3d_dataset.estimators import detect_clip, estimate_clip
from hand3d_dataset.records import (  # noqa: F401  (re-exported: pipeline's public names)
    ACTION_FEATURES,
    TARGET_FEATURES,
    VISUAL_FEATURES,
    ClipAnnotation,
    ClipResult,
    Sample,
)
from hand3d_dataset.samples_action import ActionSampleConfig, build_action_samples
from hand3d_dataset.samples_visual import VisualSampleConfig, build_visual_samples
from processing_vipa.motion_tokenizer import MotionTokenizer

__all__ = [
    "OBJECT_SOURCES",
    "PipelineConfig",
    "objects_from_poses",
    "ClipAnnotation",
    "ClipResult",
    "annotate_clip",
    "process_clip",
    "sample_to_row",
    "target_object_of",
    "clip_seed",
    "self_occluded",
    "hand_mask",
    "HAND_BONES",
    "JOINT_SKIN_DEPTH_M",
    "TARGET_FEATURES",
    "VISUAL_FEATURES",
    "ACTION_FEATURES",
]


OBJECT_SOURCES = ("auto", "pose", "estimate")  # PipelineConfig.object_source


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the per-clip pipeline; the sample builders carry their own configs."""

    min_visible_joints: int = 21  # a hand is "in view" when at least this many joints project inside
    min_valid_joints: int = 3  # scale calibration needs |Ω| >= this (calibration.calibrate_scale)
    # Joints sit inside the hand, behind the skin the cloud sees: matching z_joint to the skin's cloud depth
    # biases s high by d/z (3 % for d = 12 mm at 0.4 m). Joints are moved JOINT_SKIN_DEPTH_M x this factor
    # towards the camera before calibration; 0 gives the paper's formula literally.
    joint_depth_offset_scale: float = 1.0
    # Joints hidden behind another bone of the hand (fingers curled under the palm) read the occluder's
    # depth, biasing the median up by another ~1.5 % on synth; they leave Ω (self_occluded). 0 disables.
    occlusion_radius_m: float = 0.01
    # Pixels within this of a hand bone (drawn from the joints) are removed before objects are localised:
    # a hand holding an object is nearer and would take over its box (hand_mask). 0 disables.
    hand_mask_radius_m: float = 0.015
    # After the first median, joints whose calibrated cloud depth is farther than this from them (an object
    # held in front of the fingers, background at a silhouette) leave Ω and the median is taken again.
    inlier_tol_m: float = 0.02
    png_compress_level: int = 1  # zlib level of the stored PNGs: 1 is ~5x faster than 6, ~10% larger
    visual: VisualSampleConfig = field(default_factory=VisualSampleConfig)  # Hand3D-visual builders
    action: ActionSampleConfig = field(default_factory=ActionSampleConfig)  # Hand3D-action builders
    # object 3D from boxes; its `estimate` picks the centre (default) or the visible surface
    localization: LocalizationConfig = field(default_factory=LocalizationConfig)
    # where object positions come from: "auto" (the dataset's pose where it has one, else estimated),
    # "pose" (poses only) or "estimate" (detector boxes + calibrated cloud only); see the module docstring
    object_source: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.min_visible_joints <= 21:
            raise ValueError(f"min_visible_joints: expected 1..21, got {self.min_visible_joints}")
        if self.min_valid_joints < 1:
            raise ValueError(f"min_valid_joints: expected >= 1, got {self.min_valid_joints}")
        if not (np.isfinite(self.joint_depth_offset_scale) and 0 <= self.joint_depth_offset_scale <= 3):
            raise ValueError(
                f"joint_depth_offset_scale: expected a value in [0, 3], got {self.joint_depth_offset_scale}"
            )
        if not (np.isfinite(self.occlusion_radius_m) and 0 <= self.occlusion_radius_m < 0.05):
            raise ValueError(
                f"occlusion_radius_m: expected a value in [0, 0.05) m, got {self.occlusion_radius_m}"
            )
        if not (np.isfinite(self.inlier_tol_m) and self.inlier_tol_m >= 0):
            raise ValueError(f"inlier_tol_m: expected a finite value >= 0, got {self.inlier_tol_m}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level: expected 0..9, got {self.png_compress_level}")
        if self.object_source not in OBJECT_SOURCES:
            raise ValueError(f"object_source: expected one of {OBJECT_SOURCES}, got {self.object_source!r}")
        if self.object_source == "pose" and self.localization.estimate != "centre":
            raise ValueError(
                f"object_source: 'pose' gives object centres, not localization.estimate="
                f"{self.localization.estimate!r}; use object_source 'auto' or 'estimate'"
            )


def clip_seed(seed: int, clip_id: str) -> int:
    """A per-clip RNG seed from the run seed and the clip id (stable across processes and runs;
    Python's hash() is salted per process, crc32 is not)."""
    return (int(seed) * 1_000_003 + zlib.crc32(clip_id.encode())) % (2**63)


def target_object_of(clip: Clip) -> str | None:
    """The object the task acts on: `meta["target_object"]` (or `meta["target"]`) when the source gives it, else the object
    whose name occurs first in the task text, else None."""
    names = [o.name for o in clip.objects]
    for key in ("target_object", "target"):  # synth writes "target"
        name = clip.meta.get(key)
        if isinstance(name, str) and name in names:
            return name
    task = clip.task.lower()
    hits = [(task.find(n.lower()), -len(n), n) for n in names if n.lower() in task]
    return min(hits)[2] if hits else None


def _hand_in_view(clip: Clip, side: str, min_joints: int) -> np.ndarray:
    """(T,) bool: tracked and >= min_joints joints projecting into the image (wrist-only: the wrist)."""
    hand = clip.hands[side]
    pts = clip.joints_cam(side) if hand.joints3d is not None else clip.wrist_cam(side)[:, None]
    need = min(min_joints, pts.shape[1])
    safe = np.where(np.isfinite(pts), pts, np.array([0.0, 0.0, -1.0]))  # untracked → behind the camera
    _, vis = visibility(safe, clip.K, clip.image_hw)  # (T, J)
    return hand.valid & (vis.sum(axis=1) >= need)


# Bones of the 21-joint hand (OpenPose tree: each joint's parent) plus the links across the palm.
_PARENTS = (0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19)
HAND_BONES = tuple((p, c + 1) for c, p in enumerate(_PARENTS)) + ((5, 9), (9, 13), (13, 17))


def self_occluded(joints_cam: np.ndarray, radius_m: float, samples: int = 6) -> np.ndarray:
    """(..., 21) bool: the viewing ray of the joint passes within `radius_m` of a bone of the same hand
    at least 2·radius in front of the joint, so the cloud at its pixel shows that bone, not the joint.

    joints_cam: (..., 21, 3) camera frame, metres. Bones are sampled at `samples` points each.
    """
    j = np.asarray(joints_cam, dtype=np.float64)
    a = j[..., [b[0] for b in HAND_BONES], :]
    b = j[..., [b[1] for b in HAND_BONES], :]
    s = np.linspace(0.0, 1.0, samples)[:, None]
    q = (a[..., None, :] + (b - a)[..., None, :] * s).reshape(j.shape[:-2] + (-1, 3))  # (..., M, 3)
    n = np.linalg.norm(j, axis=-1)  # (..., 21) distance of each joint
    u = j / np.maximum(n, 1e-9)[..., None]  # (..., 21, 3) unit rays
    along = np.einsum("...jc,...mc->...jm", u, q)  # (..., 21, M) depth of bone points along each ray
    perp = np.linalg.norm(q[..., None, :, :] - along[..., None] * u[..., :, None, :], axis=-1)
    return ((perp < radius_m) & (along < n[..., None] - 2 * radius_m)).any(axis=-1)


def hand_mask(
    hands_cam: list[np.ndarray], K: np.ndarray, image_hw: tuple[int, int], radius_m: float
) -> np.ndarray:
    """(H, W) bool: pixels covered by the hands' bones drawn as capsules of `radius_m`.

    hands_cam: list of (21, 3) joints (camera frame, metres) of the hands in view on this frame; K (3, 3).
    Objects are localised in the cloud with these pixels removed: a hand over an object's box is nearer
    than the object and would otherwise take over the box's depth cluster.
    """
    h, w = image_hw
    mask = np.zeros((h, w), dtype=bool)
    s = np.linspace(0.0, 1.0, 8)[:, None]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    for j in hands_cam:
        a = j[[b[0] for b in HAND_BONES]]
        b = j[[b[1] for b in HAND_BONES]]
        pts = (a[:, None] + (b - a)[:, None] * s).reshape(-1, 3)
        pts = pts[pts[:, 2] > 1e-3]
        u = K[0, 0] * pts[:, 0] / pts[:, 2] + K[0, 1] * pts[:, 1] / pts[:, 2] + K[0, 2]
        v = K[1, 1] * pts[:, 1] / pts[:, 2] + K[1, 2]
        rad = K[0, 0] * radius_m / pts[:, 2] + 0.5  # pixels, at least half a pixel
        for uu, vv, rr in zip(u, v, rad):
            r0, r1 = max(int(vv - rr), 0), min(int(vv + rr) + 2, h)
            c0, c1 = max(int(uu - rr), 0), min(int(uu + rr) + 2, w)
            if r0 < r1 and c0 < c1:
                mask[r0:r1, c0:c1] |= (rows[r0:r1] - vv) ** 2 + (cols[:, c0:c1] - uu) ** 2 <= rr**2
    return mask


# Depth of each OpenPose joint under the skin, metres, for an adult hand: the wrist joint lies mid-wrist
# (~4 cm thick), finger bases mid-palm (~2.2 cm), finger joints on the bone axis (finger radius ~8 mm);
# fingertip "joints" are near the surface (MANO takes them from skin vertices), hence the small value.
JOINT_SKIN_DEPTH_M = np.array([0.02, 0.011, 0.009, 0.008, 0.004] + [0.011, 0.008, 0.008, 0.004] * 4)


def _skin_points(joints_cam: np.ndarray, offset_m: np.ndarray) -> np.ndarray:
    """Joints (..., J, 3) moved offset_m (J,) towards the camera along their viewing rays: where the cloud
    sees the skin over each joint."""
    dist = np.linalg.norm(joints_cam, axis=-1, keepdims=True)
    return joints_cam * np.clip(1.0 - offset_m[:, None] / np.maximum(dist, 1e-9), 0.0, None)


def objects_from_poses(clip: Clip) -> np.ndarray:
    """(T, O, 3) camera-frame centres of the objects whose pose the source gives (`ObjectTrack.position3d`,
    world, moved by each frame's R, t), in `clip.objects` order; NaN where there is none, or where the
    centre is behind the camera or projects outside the image (the frame does not show the object)."""
    out = np.full((clip.num_frames, len(clip.objects), 3), np.nan)
    for o, obj in enumerate(clip.objects):
        if obj.position3d is None:
            continue
        p = clip._to_cam(obj.position3d)  # (T, 3)
        _, seen = visibility(np.where(np.isfinite(p), p, [0.0, 0.0, -1.0])[:, None], clip.K, clip.image_hw)
        out[seen[:, 0], o] = p[seen[:, 0]]
    return out


def _frames_usable(clip: Clip, notes: list[str]) -> np.ndarray:
    """(T,) bool: a frame whose pixels are all one value is a dropped/unreadable frame."""
    if clip.frames is None:
        return np.zeros(clip.num_frames, dtype=bool)
    flat = clip.frames.reshape(clip.num_frames, -1)
    ok = (flat != flat[:, :1]).any(axis=1)
    for f in np.flatnonzero(~ok):
        notes.append(f"frame {int(f)}: blank image (all pixels {int(flat[f, 0])}), dropped")
    return ok


def annotate_clip(
    clip: Clip, estimator, detector, cfg: PipelineConfig, notes: list[str]
) -> tuple[ClipAnnotation | None, str | None, int]:
    """Steps 1–6 of the module docstring.

    estimator: `estimators.PointCloudEstimator` (clip → (T, H, W, 3) pointmaps, any consistent unit);
    detector: `estimators.ObjectDetector` (clip → (T, O, 4) boxes, NaN rows where not found).
    Object positions follow `cfg.object_source` (module docstring); the estimator and the detector are
    called only when some position on a used frame must be estimated.
    Returns (annotation, None, |Ω|) or (None, reason, |Ω|) when the clip cannot be annotated.
    """
    T = clip.num_frames
    hand_visible = {side: _hand_in_view(clip, side, cfg.min_visible_joints) for side in sorted(clip.hands)}
    names = [o.name for o in clip.objects]
    objects_cam = np.full((T, len(names), 3), np.nan)
    poses_usable = cfg.object_source == "pose" or (
        cfg.object_source == "auto" and cfg.localization.estimate == "centre"
    )
    if poses_usable:
        objects_cam = objects_from_poses(clip)
    # (T, O): positions the estimator and detector must give
    to_estimate = np.zeros((T, len(names)), bool)
    if cfg.object_source != "pose":
        to_estimate = ~np.isfinite(objects_cam).all(axis=-1)
    target = target_object_of(clip)
    any_visible = np.any([v for v in hand_visible.values()], axis=0)
    if not clip.has_frames:  # trajectory-only clip: no images, so no cloud; action samples only
        ann = ClipAnnotation(clip, np.zeros(T, bool), hand_visible, names, objects_cam, None, target)
        return ann, None, 0
    frame_ok = _frames_usable(clip, notes)
    for f in np.flatnonzero(frame_ok & ~any_visible):
        notes.append(f"frame {int(f)}: no hand in view, dropped")
    use = frame_ok & any_visible
    if not use.any():
        return None, "no frame with a hand in view (visibility filter)", 0
    needed = bool(to_estimate[use].any())  # some position must come from the cloud

    def posed_only(scale: float | None) -> ClipAnnotation:
        return ClipAnnotation(clip, use, hand_visible, names, objects_cam, scale, target)

    if cfg.object_source == "pose":  # the dataset's poses only: no cloud, no scale
        return posed_only(None), None, 0
    # "auto" on a clip with poses: an estimate that cannot be made leaves the positions without a pose
    # empty (noted) instead of dropping the poses with the clip; without any pose it is the estimate path
    lenient = cfg.object_source == "auto" and bool(np.isfinite(objects_cam[use]).any())
    unposed = "objects without a pose have no position" if needed else "every object position is a pose"
    try:
        pointmaps = estimate_clip(estimator, clip)  # (T, H, W, 3), shape checked there
    except ValueError as e:
        if not lenient:
            raise
        notes.append(f"cloud: not made ({e}); {unposed}")
        return posed_only(None), None, 0
    # joints of every hand in view on each used frame; others flagged invalid (calibrate_scale drops them)
    frames = np.flatnonzero(use)
    joints, valid = [], []
    for side in sorted(clip.hands):
        hand = clip.hands[side]
        pts = clip.joints_cam(side) if hand.joints3d is not None else clip.wrist_cam(side)[:, None]
        ok = hand_visible[side][frames]
        flags = np.broadcast_to(ok[:, None], (len(frames), pts.shape[1]))
        if hand.joints3d is not None and cfg.occlusion_radius_m > 0:
            flags = flags & ~self_occluded(np.nan_to_num(pts[frames], nan=1.0), cfg.occlusion_radius_m)
        depth_m = JOINT_SKIN_DEPTH_M if pts.shape[1] == 21 else JOINT_SKIN_DEPTH_M[:1]
        pts = _skin_points(np.nan_to_num(pts[frames], nan=1.0), depth_m * cfg.joint_depth_offset_scale)
        joints.append(np.where(ok[:, None, None], pts, 1.0))
        valid.append(flags)
    joints_all, valid_all = np.concatenate(joints, axis=1), np.concatenate(valid, axis=1)  # (F, J, 3), (F, J)
    res = calibrate_scale(
        joints_all, pointmaps[frames], clip.K[frames], joint_valid=valid_all, min_valid=cfg.min_valid_joints
    )
    if res.scale is not None and cfg.inlier_tol_m > 0:
        # second pass over the joints whose calibrated cloud depth agrees with them: an object held in
        # front of the fingers (nearer) or background at a silhouette (farther) is not the hand
        uv, _ = project(joints_all, clip.K[frames])
        z_cloud = np.stack([sample_pointmap(pointmaps[f], uv[i])[:, 2] for i, f in enumerate(frames)])
        with np.errstate(invalid="ignore"):
            inlier = np.abs(res.scale * z_cloud - joints_all[..., 2]) < cfg.inlier_tol_m
        refined = calibrate_scale(
            joints_all,
            pointmaps[frames],
            clip.K[frames],
            joint_valid=valid_all & inlier,
            min_valid=cfg.min_valid_joints,
        )
        res = refined if refined.scale is not None else res
    if res.scale is None:
        if not lenient:
            return None, f"scale calibration failed: {res.reason}", res.num_valid
        notes.append(f"cloud: scale calibration failed ({res.reason}); {unposed}")
        return posed_only(None), None, res.num_valid
    if not needed:  # every position is a pose: no boxes needed
        return posed_only(res.scale), None, res.num_valid
    frame_ok = use
    try:
        boxes = detect_clip(detector, clip)  # (T, O, 4), shape checked there
    except ValueError as e:
        if not lenient:
            raise
        notes.append(f"boxes: not detected ({e}); {unposed}")
        return posed_only(res.scale), None, res.num_valid
    for f in frames:
        cloud = pointmaps[f]
        hands_f = [
            clip.joints_cam(sd)[f]
            for sd in sorted(clip.hands)
            if clip.hands[sd].joints3d is not None and hand_visible[sd][f]
        ]
        if cfg.hand_mask_radius_m > 0 and hands_f:
            cloud = cloud.copy()
            cloud[hand_mask(hands_f, clip.K[f], clip.image_hw, cfg.hand_mask_radius_m)] = np.nan
        for o, name in enumerate(names):
            b = boxes[f, o]
            if not to_estimate[f, o] or not np.isfinite(b).all():
                continue  # not detected on this frame: nothing to say
            loc = localize_object(b, cloud, scale=res.scale, config=cfg.localization)
            if loc.xyz is None:
                notes.append(f"frame {int(f)} object {name!r}: {loc.reason}")
            else:
                objects_cam[f, o] = loc.xyz
    ann = ClipAnnotation(clip, frame_ok, hand_visible, names, objects_cam, res.scale, target)
    return ann, None, res.num_valid


def _png(image: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def sample_to_row(sample: Sample, clip: Clip, index: int, png: dict[int, bytes], action: bool) -> dict:
    """A dataset row (DESIGN.md §3 columns) from a sample.

    png: frame index → PNG bytes, filled lazily so that each frame of a clip is encoded once.
    messages: TRL's conversational format with one {"type": "image"} entry per image, before the text.
    """
    images = [{"bytes": png[f], "path": None} for f in sample.frame_indices]
    user = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": sample.question}]
    row = {
        "id": f"{clip.clip_id}/{sample.task_type}/{index}",
        "source": clip.source,
        "clip_id": clip.clip_id,
        "task_type": sample.task_type,
        "images": images,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
        ],
        "target": sample.target,
        "K": clip.K[sample.frame_indices[-1]].tolist() if sample.frame_indices else None,
    }
    if action:
        row["trajectory"] = [[float(x) for x in p] for p in sample.trajectory]
        row["motion_ids"] = [int(i) for i in sample.motion_ids]
    return row


def process_clip(
    clip: Clip, estimator, detector, cfg: PipelineConfig, seed: int, tokenizer: MotionTokenizer | None = None
) -> ClipResult:
    """Annotates one clip and builds its rows; bad data gives `skipped`, never an exception."""
    result = ClipResult(clip_id=clip.clip_id, source=clip.source)
    try:
        ann, reason, n_valid = annotate_clip(clip, estimator, detector, cfg, result.notes)
    except ValueError as e:  # a geometry check refused a value: the clip's data are corrupt
        ann, reason, n_valid = None, f"invalid data: {e}", 0
    result.scale_num_valid = n_valid
    if ann is None:
        result.skipped = reason
        return result
    result.scale = ann.scale
    if ann.scale is not None and hasattr(estimator, "true_scale"):
        result.true_scale = float(estimator.true_scale(clip.clip_id))
    rng = np.random.default_rng(clip_seed(seed, clip.clip_id))
    visual = build_visual_samples(ann, cfg.visual, rng)
    action, stats = build_action_samples(ann, cfg.action, rng, tokenizer)
    result.action_stats = stats
    png: dict[int, bytes] = {}
    for s in visual + action:
        for f in s.frame_indices:
            if f not in png:
                png[f] = _png(clip.frames[f], cfg.png_compress_level)
    counts: Counter = Counter()
    for s in visual:
        result.rows_visual.append(sample_to_row(s, clip, counts[s.task_type], png, action=False))
        counts[s.task_type] += 1
    for s in action:
        result.rows_action.append(sample_to_row(s, clip, counts[s.task_type], png, action=True))
        counts[s.task_type] += 1
        result.waypoints += len(s.trajectory)
        result.clipped += int(s.clipped.sum())
    if not (result.rows_visual or result.rows_action):
        result.skipped = (
            "no sample survived the filters (" + (", ".join(result.notes[-3:]) or "no usable frame") + ")"
        )
    return result
