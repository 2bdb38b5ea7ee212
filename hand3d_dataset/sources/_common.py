"""What the real-dataset source adapters share: chunked frame sampling, image / depth / video readers,
`.npy` readers, the frame-count cache, MANO posing in a dataset's convention and camera inversion.

    >>> from hand3d_dataset.sources._common import chunk_frame_indices, sampled_fps
    >>> [c.tolist() for c in chunk_frame_indices(75, 30.0, sample_fps=1.0, chunk_s=2.0)]
    [[0, 30]]
    >>> sampled_fps(30.0, 1.0)
    1.0

`ChunkedSource` is the base of the adapters that cut each sequence into `chunk_s`-second clips sampled at
`sample_fps` (the paper's 1 fps and ~10 s chunks): it validates those settings and `images`, holds the
clip table (`clip_ids`, `_entry`) and `skipped`, the sequences that failed while the source was listed
(sequence → reason; `hand3d build` counts them in report.json). Optional dependencies: PyAV and h5py
come with the `sources` extra (`hand3d_dataset.extras.require("av", "sources")`).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from hand3d_dataset import safe_pickle
from hand3d_dataset.extras import require

__all__ = [
    "CACHE_ENV",
    "IMAGES",
    "MANO_DIR_ENV",
    "ChunkedSource",
    "ManoPoser",
    "cached_count",
    "chunk_frame_indices",
    "depth_from_units",
    "find_mano_dir",
    "invert_poses",
    "load_npy",
    "masked",
    "model_box_centre",
    "npy_length",
    "obj_vertices",
    "read_depth_mm",
    "read_rgb",
    "read_video_frames",
    "sampled_fps",
]

IMAGES = ("auto", "required", "none")  # the `images` setting of the adapters that may lack frames
MANO_DIR_ENV = "HAND3D_MANO_DIR"  # environment variable naming a folder with MANO_LEFT/RIGHT files
CACHE_ENV = "HAND3D_CACHE"  # folder for small indexes (default ~/.cache/hand3d)


# ------------------------------------------------------------------------------------------------------
# Frame sampling and the clip table
# ------------------------------------------------------------------------------------------------------


def chunk_frame_indices(
    num_frames: int, fps: float, sample_fps: float = 1.0, chunk_s: float = 10.0, min_frames: int = 2
) -> list[np.ndarray]:
    """Frame indices of each chunk: every round(fps / sample_fps)-th frame, grouped by `chunk_s` seconds.

    Returns a list of int arrays (one per chunk, consecutive, non-overlapping); a trailing chunk with fewer
    than `min_frames` sampled frames is dropped (too short for a motion), so a sequence shorter than that
    yields no chunk. The sampled frames' rate is `sampled_fps(fps, sample_fps)`.
    """
    if num_frames < 0 or not (fps > 0 and sample_fps > 0 and chunk_s > 0) or min_frames < 1:
        raise ValueError(
            f"chunk_frame_indices: need num_frames ≥ 0, fps, sample_fps, chunk_s > 0 and min_frames ≥ 1; got "
            f"{num_frames}, {fps}, {sample_fps}, {chunk_s}, {min_frames}"
        )
    step = max(1, round(fps / sample_fps))
    per_chunk = max(1, round(chunk_s * fps / step))
    sampled = np.arange(0, num_frames, step)
    chunks = [sampled[i : i + per_chunk] for i in range(0, len(sampled), per_chunk)]
    return [c for c in chunks if len(c) >= min_frames]


def sampled_fps(fps: float, sample_fps: float) -> float:
    """Rate of the frames `chunk_frame_indices` keeps."""
    return fps / max(1, round(fps / sample_fps))


class ChunkedSource:
    """Base of the chunked adapters: settings, the clip table id → (entry..., frame indices), `skipped`.

    Subclasses set `name` and `FPS` (the dataset's frame rate), call `super().__init__(...)` first, then
    list their sequences with `_add` (or record a failing one in `skipped`).
    """

    name = ""
    FPS = 30.0  # the dataset's frame rate; subclasses set theirs

    def __init__(self, sample_fps: float = 1.0, chunk_s: float = 10.0, images: str = "auto") -> None:
        if not (sample_fps > 0 and chunk_s > 0):
            raise ValueError(f"sample_fps, chunk_s: expected positive values, got {sample_fps}, {chunk_s}")
        if images not in IMAGES:
            raise ValueError(f"images: expected one of {IMAGES}, got {images!r}")
        self.sample_fps, self.chunk_s, self.images = float(sample_fps), float(chunk_s), images
        self._clips: dict[str, tuple] = {}
        self.skipped: dict[str, str] = {}  # sequence → why listing it failed (it yields no clip)

    def clip_ids(self) -> list[str]:
        return list(self._clips)

    @property
    def clip_fps(self) -> float:
        """Rate of the clips' frames."""
        return sampled_fps(self.FPS, self.sample_fps)

    def _add(self, base_id: str, num_frames: int, *entry) -> None:
        """Lists the chunks of a sequence of `num_frames` frames as `<base_id>-c<chunk>` → (*entry, indices)."""
        for c, idx in enumerate(chunk_frame_indices(num_frames, self.FPS, self.sample_fps, self.chunk_s)):
            self._clips[f"{base_id}-c{c:03d}"] = (*entry, idx)

    def _entry(self, clip_id: str) -> tuple:
        if clip_id not in self._clips:
            raise ValueError(f"clip_id: unknown {clip_id!r}; known: {list(self._clips)[:5]}")
        return self._clips[clip_id]

    def _use_images(self, present: bool) -> bool:
        """Whether to read frames: never for "none", when `present` for "auto", always for "required" (a
        missing file then raises, naming it)."""
        return self.images == "required" or (self.images == "auto" and present)


# ------------------------------------------------------------------------------------------------------
# Images, depth, videos
# ------------------------------------------------------------------------------------------------------


def read_rgb(path: Path, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; ValueError naming the file when absent or unreadable."""
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        with PIL.Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{what}: cannot decode {path}: {e}") from e


def depth_from_units(raw: np.ndarray, units_per_m: float) -> np.ndarray:
    """Integer depth (…, H, W) in 1/units_per_m metres → float32 metres, NaN where the sensor gave 0."""
    raw = np.asarray(raw, np.float32)
    return np.where(raw > 0, raw / units_per_m, np.nan).astype(np.float32)


def read_depth_mm(path: Path, what: str) -> np.ndarray:
    """(H, W) float32 metres from a uint16 millimetre PNG, NaN where the sensor gave 0."""
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        with PIL.Image.open(path) as im:
            d = np.asarray(im)
    except OSError as e:
        raise ValueError(f"{what}: cannot decode {path}: {e}") from e
    if d.ndim != 2:
        raise ValueError(f"{what}: {path} is not a single-channel 16-bit depth image (shape {d.shape})")
    return depth_from_units(d, 1000.0)


def read_video_frames(
    path: Path, indices, what: str, fmt: str = "rgb24", expect: int | None = None
) -> np.ndarray:
    """Decoded frames `indices` (0-based, in decode order) of a video, via PyAV (the `sources` extra).

    Returns (len(indices), H, W, 3) uint8 for fmt "rgb24", or (len(indices), H, W) uint16 for "gray16le".
    ValueError naming the file when it is missing, undecodable, or ends before the last index (truncated);
    with `expect`, also when the container declares fewer frames than `expect` (frames lost in the video).
    """
    av = require("av", "sources")
    if not path.exists():
        raise ValueError(f"{what}: missing video {path}")
    want = sorted({int(i) for i in indices})
    if not want:
        raise ValueError(f"{what}: no frame requested from {path}")
    got: dict[int, np.ndarray] = {}
    declared = decoded = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            declared = int(stream.frames or 0)
            if expect is None or not declared or declared >= expect:
                for k, frame in enumerate(container.decode(stream)):
                    decoded = k + 1
                    if k in want:
                        got[k] = frame.to_ndarray(format=fmt)
                    if k >= want[-1]:
                        break
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise ValueError(f"{what}: cannot decode {path}: {e}") from e
    if expect is not None and declared and declared < expect:
        raise ValueError(
            f"{what}: {path} has {declared} frames for {expect} poses (frames lost in the video)"
        )
    missing = [i for i in want if i not in got]
    if missing:
        raise ValueError(
            f"{what}: {path} ends before frame {missing[0]} (truncated video of {decoded} frames)"
        )
    return np.stack([got[int(i)] for i in indices])


# ------------------------------------------------------------------------------------------------------
# .npy files and the frame-count cache
# ------------------------------------------------------------------------------------------------------


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return shape, dtype


def load_npy(path: Path, what: str) -> Any:
    """An `.npy` file; pickled object arrays (dicts saved with np.save) via `safe_pickle`, never `pickle`.

    Returns the array, or the object for a 0-d object array (what `np.load(...).item()` gives).
    """
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        with open(path, "rb") as fh:
            _, dtype = _npy_header(fh)
            if not dtype.hasobject:
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
            obj = safe_pickle.loads(fh.read(), str(path))
    except ValueError as e:
        if "refusing" in str(e):
            raise
        raise ValueError(f"{what}: {path} is not a readable .npy file ({e})") from e
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj.item()
    return obj


def npy_length(path: Path) -> int:
    """First dimension of an `.npy` array, from its header (the data is not read)."""
    with open(path, "rb") as fh:
        shape, _ = _npy_header(fh)
    if not shape:
        raise ValueError(f"{path}: a 0-d array has no length")
    return int(shape[0])


def cached_count(path: Path, count: Any) -> int:
    """`count(path)` remembered per (file, size, mtime) in `$HAND3D_CACHE/frame_counts.json`.

    Listing a dataset needs each sequence's frame count, and some formats only give it by unpickling a
    large file (OakInk2's annotations: tens of seconds each); the count is kept so the next listing is
    instant. The index is rewritten atomically; an unreadable index is ignored.
    """
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hand3d") / "frame_counts.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return int(index[key])
    n = int(count(path))
    index[key] = n
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f"{index_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    except OSError:
        pass  # a read-only cache only costs time
    return n


# ------------------------------------------------------------------------------------------------------
# Objects and cameras
# ------------------------------------------------------------------------------------------------------


def obj_vertices(path: Path) -> np.ndarray:
    """(V, 3) vertex positions of a Wavefront .obj file (the `v` lines), in the file's unit."""
    verts = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("v "):
                verts.append([float(x) for x in line.split()[1:4]])
    if not verts:
        raise ValueError(f"{path}: no vertices ('v x y z' lines)")
    return np.asarray(verts)


def model_box_centre(path: Path, metres_per_unit: float) -> np.ndarray:
    """(3,) centre of the bounding box of an object model in metres; the origin when the file is absent
    (the pose then places the model's origin)."""
    if not path.exists():
        return np.zeros(3)
    v = obj_vertices(path) * metres_per_unit
    return (v.min(axis=0) + v.max(axis=0)) / 2


def invert_poses(R: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of rigid poses: (R (T, 3, 3), t (T, 3)) → (Rᵀ, −Rᵀ t), e.g. camera → world into world → camera."""
    R_inv = np.transpose(R, (0, 2, 1))
    return R_inv, -np.einsum("tij,tj->ti", R_inv, t)


def masked(ok: np.ndarray, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame arrays (T, ...) with the rows where `ok` (T,) is False set to NaN (invalid frames)."""
    return {k: np.where(ok.reshape(-1, *([1] * (np.ndim(v) - 1))), v, np.nan) for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------------------
# MANO
# ------------------------------------------------------------------------------------------------------


def find_mano_dir(mano_dir: str | Path | None, candidates: list[Path]) -> Path | None:
    """The folder with MANO_LEFT/RIGHT files: `mano_dir`, else $HAND3D_MANO_DIR, else the first candidate
    holding a MANO file; None when there is none."""
    if mano_dir is not None:
        p = Path(mano_dir)
        if not p.is_dir():
            raise ValueError(f"mano_dir: {p} is not a folder")
        return p
    for p in ([Path(os.environ[MANO_DIR_ENV])] if os.environ.get(MANO_DIR_ENV) else []) + candidates:
        if any((p / f"MANO_{s}.{e}").exists() for s in ("RIGHT", "LEFT") for e in ("pkl", "npz")):
            return p
    return None


class ManoPoser:
    """21 OpenPose joints from MANO parameters in one dataset's convention (layers cached per side).

    Args:
        mano_dir: folder with MANO_RIGHT / MANO_LEFT (.npz or .pkl).
        use_pca, num_pca_comps, flat_hand_mean, fingertips: as `hand3d_dataset.mano.ManoLayer`.
        flip_left_shapedirs: negate the left model's `shapedirs[:, 0, :]` unconditionally, as HaWoR's
            `run_mano_left(fix_shapedirs=True)` does (smplx issue 48).
        extra_dirs: further folders searched for a side's file (HaWoR keeps MANO_LEFT elsewhere).
    """

    def __init__(
        self,
        mano_dir: str | Path,
        use_pca: bool = False,
        num_pca_comps: int = 45,
        flat_hand_mean: bool = False,
        fingertips: str = "smplx",
        flip_left_shapedirs: bool = False,
        extra_dirs: tuple[Path, ...] = (),
    ) -> None:
        self.mano_dir = Path(mano_dir)
        self.kwargs = dict(
            use_pca=use_pca, num_pca_comps=num_pca_comps, flat_hand_mean=flat_hand_mean, fingertips=fingertips
        )
        self.flip_left_shapedirs = bool(flip_left_shapedirs)
        self.extra_dirs = tuple(Path(d) for d in extra_dirs)
        self._layers: dict[str, Any] = {}

    def layer(self, side: str):
        """The (float64) `ManoLayer` of `side`; ValueError naming the files looked for when none exists."""
        if side not in self._layers:
            from hand3d_dataset.mano import ManoLayer, load_mano_model

            files = [
                d / f"MANO_{side.upper()}.{ext}"
                for d in (self.mano_dir, *self.extra_dirs)
                for ext in ("npz", "pkl")
            ]
            found = [f for f in files if f.exists()]
            if not found:
                raise ValueError(f"mano_dir: none of {[str(f) for f in files]} exists")
            model = load_mano_model(found[0], side=side)
            if side == "left" and self.flip_left_shapedirs:
                shapedirs = np.array(model.shapedirs)
                shapedirs[:, 0, :] *= -1
                shapedirs.setflags(write=False)
                model = replace(model, shapedirs=shapedirs)
            self._layers[side] = ManoLayer(model, **self.kwargs).double()
        return self._layers[side]

    def joints(
        self,
        side: str,
        global_orient: np.ndarray,
        hand_pose: np.ndarray,
        betas: np.ndarray,
        transl: np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, 21, 3) joints, metres: global_orient (N, 3), hand_pose (N, P), betas (N, 10), transl (N, 3).

        Rows with any non-finite input come back NaN (they are not posed).
        """
        import torch

        n = len(global_orient)
        parts = [global_orient, hand_pose, betas] + ([] if transl is None else [transl])
        ok = np.all([np.isfinite(np.asarray(p, float).reshape(n, -1)).all(axis=1) for p in parts], axis=0)
        out = np.full((n, 21, 3), np.nan)
        if ok.any():
            t = [torch.as_tensor(np.asarray(p, np.float64)[ok]) for p in parts]
            with torch.no_grad():
                out[ok] = self.layer(side).forward_joints(*t).numpy()
        return out

    def max_error_mm(self, side: str, joints: np.ndarray, *params: np.ndarray) -> float:
        """Largest distance (mm) between the joints posed from `params` (as `joints`) and given `joints`
        (N, 21, 3) metres: a check of a dataset's files against its MANO convention."""
        return float(np.nanmax(np.linalg.norm(self.joints(side, *params) - joints, axis=-1)) * 1000.0)
