"""The `arctic` source: ARCTIC bimanual sequences seen from the egocentric camera, as unified clips.

    from hand3d_dataset.sources.arctic import ArcticSource
    src = ArcticSource("/data/arctic/data/arctic_data/data")   # holds raw_seqs/, meta/, images/
    clip = src.load_clip(src.clip_ids()[0])                    # e.g. "arctic-s01-box_grab_01-c000"
    clip.hands["right"].joints3d.shape, clip.task              # (10, 21, 3), "grab the box"

On-disk layout read here (`docs/data/data_doc.md` of zc-alexfan/arctic; the root is `arctic_data/data`):
- `raw_seqs/<sid>/<obj>_<action>_<nn>.mano.npy`: a pickled dict (`np.load(..., allow_pickle=True).item()`)
  `{"right"|"left": {"rot" (T, 3) axis-angle, "pose" (T, 45) axis-angle, "trans" (T, 3) m, "shape" (10,),
  "fitting_err" (T,)}}`: MANO in the world (mocap) frame.
- `raw_seqs/<sid>/<seq>.egocam.dist.npy`: pickled dict with `R_k_cam_np` (T, 3, 3), `T_k_cam_np` (T, 3, 1),
  `intrinsics` (3, 3), `dist8` (8,) ...; `world2ego = [R_k_cam_np | T_k_cam_np]` (`preprocess_dataset.py`).
- `raw_seqs/<sid>/<seq>.object.npy`: (T, 7) float array: articulation (rad), rotation (axis-angle), translation
  in **millimetres** (`processing.py` divides it by 1000).
- `meta/misc.json`: per subject `ioi_offset` (image index of frame 0), `image_size` ([w, h] per view, view 0
  = egocentric), allocentric `world2cam` / `intris_mat` (unused here).
- `meta/object_vtemplates/<obj>/mesh.obj`: object template in millimetres (optional; gives the centre).
- `images/<sid>/<seq>/0/<frame + ioi_offset:05d>.jpg`: egocentric view 0 (optional, see `images`).
- `processed_seqs/<sid>/<seq>.npy` (optional): pickled dict whose `world_coord["joints.right|left"]` (T, 21, 3)
  are ARCTIC's own MANO joints in the world frame; used when no MANO model files are found.

Conventions and why:
- Camera: ARCTIC's egocentric camera is head-mounted and moves; `world2ego` maps world points into it
  (`transform_points_batch(world2ego, pts_world)` in `processing.py`), so it is our world → camera directly:
  R = `R_k_cam_np`, t = `T_k_cam_np`, OpenCV axes, metres; K = `intrinsics`, fixed per sequence. The
  raw egocentric images are distorted (`dist8`); like `processing.py`'s view 0 ("egocentric view:
  undistorted space") we use the pinhole K and ignore the distortion, so joints land on the undistorted
  projection (the dataset's view 0 2D joints), a few pixels off the raw image towards its corners.
- Hands: `processing.py` poses MANO with smplx's `MANO(use_pca=False, flat_hand_mean=False)`
  (`build_mano_aa(flat_hand=False)` in `common/body_models.py`): 45-D axis-angle, the files' mean pose added,
  `transl` added last, smplx fingertips; left hands from MANO_LEFT as stored (smplx does not flip
  shapedirs). `hand3d_dataset.mano.ManoLayer` reproduces exactly that and its joints are OpenPose-ordered.
  Model files come from `mano_dir`, else `$HAND3D_MANO_DIR`, else `<root>/../../body_models/mano` (the
  official repo's `data/body_models/mano` next to `data/arctic_data`). Without model files the joints
  come from `processed_seqs` (ARCTIC's 21 joints are MANO's 16 + 5 smplx tips, reordered here with
  `MANO_TO_OPENPOSE`); with neither, the clip is refused (the MANO translation is not the wrist: it is off
  by the template's root joint, ~10 cm).
- Objects: one object per sequence, named from the sequence ("capsulemachine_use_02" → "capsule machine"),
  position = R_obj · c + t_obj with c the centre of the template's bounding box (mm → m) when the template
  is there, else the object origin; articulation of the top part is ignored (the centre of the whole
  object moves little with it). Task: "grab the box" / "use the box" (ARCTIC's two actions: "use"
  articulates the object).
- Frames: 30 fps (ARCTIC's capture rate), sampled at `sample_fps` in `chunk_s` chunks with DexYCB's
  `chunk_frame_indices`. `images="auto"` reads the egocentric images when the sequence's `images/.../0`
  folder exists and otherwise yields trajectory-only clips (frames None; the images are ~1 TB and many
  users only download `raw_seqs`); "required" makes a missing folder an error; "none" never reads them.

Bad input: a missing or unreadable file, mismatched frame counts, or non-finite cameras raise ValueError
naming the file (the build records the clip as skipped). A frame whose MANO parameters are not finite is
an invalid frame of that hand (NaN), counted in `meta["nonfinite_mano_frames"]`.

Helpers shared with the other MANO-based adapters (OakInk2, TACO, HOI4D, HaWoR): `load_npy`, `npy_length`,
`cached_count`, `find_mano_dir`, `ManoPoser`, `obj_vertices`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset import safe_pickle
from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources.dexycb import chunk_frame_indices, read_rgb, sampled_fps

__all__ = [
    "ArcticSource",
    "ManoPoser",
    "cached_count",
    "find_mano_dir",
    "load_npy",
    "npy_length",
    "obj_vertices",
    "FPS",
]

FPS = 30.0  # ARCTIC's image rate
EGO_IMAGE_HW = (2000, 2800)  # egocentric image size (processing.py's fixed ego box) when misc.json lacks it
# ARCTIC object ids → natural names
OBJECT_NAMES = {
    "capsulemachine": "capsule machine",
    "espressomachine": "espresso machine",
    "waffleiron": "waffle iron",
    "ketchup": "ketchup bottle",
}
MANO_DIR_ENV = "HAND3D_MANO_DIR"  # environment variable naming a folder with MANO_LEFT/RIGHT files


# ------------------------------------------------------------------------------------------------------
# Shared helpers of the MANO-based adapters
# ------------------------------------------------------------------------------------------------------


def load_npy(path: Path, what: str) -> Any:
    """An `.npy` file; pickled object arrays (dicts saved with np.save) via `safe_pickle`, never `pickle`.

    Returns the array, or the object for a 0-d object array (what `np.load(...).item()` gives).
    """
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(fh)
            if not dtype.hasobject:
                fh.seek(0)
                arr = np.load(fh, allow_pickle=False)
                return arr
            obj = safe_pickle.loads(fh.read(), str(path))
    except ValueError as e:
        if "refusing" in str(e):
            raise
        raise ValueError(f"{what}: {path} is not a readable .npy file ({e})") from e
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj.item()
    return obj


def find_mano_dir(mano_dir: str | Path | None, candidates: list[Path]) -> Path | None:
    """The folder with MANO_LEFT/RIGHT files: `mano_dir`, else $HAND3D_MANO_DIR, else the first candidate
    holding a MANO file."""
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
        mano_dir: Path,
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
        self.flip_left_shapedirs, self.extra_dirs = (
            bool(flip_left_shapedirs),
            tuple(Path(d) for d in extra_dirs),
        )
        self._layers: dict[str, Any] = {}

    def layer(self, side: str):
        if side not in self._layers:
            from dataclasses import replace

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


CACHE_ENV = "HAND3D_CACHE"  # folder for small indexes (default ~/.cache/hand3d)


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


def npy_length(path: Path) -> int:
    """First dimension of an `.npy` array, from its header (the data is not read)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read(fh)
    if not shape:
        raise ValueError(f"{path}: a 0-d array has no length")
    return int(shape[0])


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


# ------------------------------------------------------------------------------------------------------
# ARCTIC
# ------------------------------------------------------------------------------------------------------


class ArcticSource:
    """`SourceAdapter` over an ARCTIC `arctic_data/data` root; ids `arctic-<sid>-<seq>-c<chunk>`."""

    name = "arctic"

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO_LEFT/RIGHT files; None → $HAND3D_MANO_DIR or beside root
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": read the egocentric images (see module doc)
    ) -> None:
        self.root = Path(root)
        if (
            not (self.root / "raw_seqs").is_dir()
            and (self.root / "arctic_data" / "data" / "raw_seqs").is_dir()
        ):
            self.root = self.root / "arctic_data" / "data"
        if not (self.root / "raw_seqs").is_dir():
            raise ValueError(
                f"root: {self.root} has no raw_seqs/ folder; point it at ARCTIC's arctic_data/data"
            )
        if not (sample_fps > 0 and chunk_s > 0):
            raise ValueError(f"sample_fps, chunk_s: expected positive values, got {sample_fps}, {chunk_s}")
        if images not in ("auto", "required", "none"):
            raise ValueError(f"images: expected 'auto', 'required' or 'none', got {images!r}")
        self.sample_fps, self.chunk_s, self.images = float(sample_fps), float(chunk_s), images
        found = find_mano_dir(mano_dir, [self.root.parent.parent / "body_models" / "mano"])
        self.poser = None if found is None else ManoPoser(found, use_pca=False, flat_hand_mean=False)
        self._misc: dict | None = None
        self._clips: dict[str, tuple[str, str, np.ndarray]] = {}
        self.skipped: dict[str, str] = {}  # sequence → why it yields no clip
        for mano_p in sorted(self.root.glob("raw_seqs/*/*.mano.npy")):
            sid, seq = mano_p.parent.name, mano_p.name[: -len(".mano.npy")]
            try:  # only the MANO file here: the others are read (and their errors reported) per clip
                n = len(load_npy(mano_p, f"sequence {sid}/{seq}")["right"]["rot"])
            except (ValueError, KeyError, TypeError) as e:
                self.skipped[f"{sid}/{seq}"] = str(e)
                continue
            for c, idx in enumerate(chunk_frame_indices(n, FPS, self.sample_fps, self.chunk_s)):
                self._clips[f"arctic-{sid}-{seq}-c{c:03d}"] = (sid, seq, idx)

    def clip_ids(self) -> list[str]:
        return list(self._clips)

    def misc(self) -> dict:
        if self._misc is None:
            path = self.root / "meta" / "misc.json"
            self._misc = json.loads(path.read_text()) if path.exists() else {}
        return self._misc

    def _raw(self, sid: str, seq: str, what: str) -> tuple[dict, dict, np.ndarray]:
        base = self.root / "raw_seqs" / sid / seq
        mano = load_npy(Path(f"{base}.mano.npy"), what)
        ego = load_npy(Path(f"{base}.egocam.dist.npy"), what)
        obj = load_npy(Path(f"{base}.object.npy"), what)
        if not isinstance(mano, dict) or not {"right", "left"} <= set(mano):
            raise ValueError(f"{what}: {base}.mano.npy is not a dict with 'right' and 'left'")
        for key in ("R_k_cam_np", "T_k_cam_np", "intrinsics"):
            if not isinstance(ego, dict) or key not in ego:
                raise ValueError(f"{what}: {base}.egocam.dist.npy lacks {key!r}")
        return mano, ego, np.asarray(obj, float)

    def load_clip(self, clip_id: str) -> Clip:
        if clip_id not in self._clips:
            raise ValueError(f"clip_id: unknown {clip_id!r}; known: {list(self._clips)[:5]}")
        sid, seq, idx = self._clips[clip_id]
        what = f"clip {clip_id}"
        base = self.root / "raw_seqs" / sid / seq
        mano, ego, obj = self._raw(sid, seq, what)
        T = len(mano["right"]["rot"])
        R_all = np.asarray(ego["R_k_cam_np"], float)
        t_all = np.asarray(ego["T_k_cam_np"], float).reshape(-1, 3)
        K = np.asarray(ego["intrinsics"], float)
        if len(R_all) != T or len(t_all) != T or obj.shape != (T, 7):
            raise ValueError(
                f"{what}: frame counts disagree: mano {T}, egocam {len(R_all)}, object {obj.shape} (expected ({T}, 7))"
            )
        if not (np.isfinite(R_all[idx]).all() and np.isfinite(t_all[idx]).all() and np.isfinite(K).all()):
            raise ValueError(f"{what}: {base}.egocam.dist.npy has non-finite camera values")
        if K.shape != (3, 3):
            raise ValueError(
                f"{what}: intrinsics in {base}.egocam.dist.npy have shape {K.shape}, expected (3, 3)"
            )

        hands, bad = {}, {}
        for side in ("left", "right"):
            joints, params, nonfinite = self._hand(mano[side], side, sid, seq, idx, what)
            valid = np.isfinite(joints).all(axis=(1, 2))
            bad[side] = nonfinite
            hands[side] = HandTrack(side, joints3d=joints, valid=valid, mano=params)

        obj_name = seq.split("_")[0]
        name = OBJECT_NAMES.get(obj_name, obj_name)
        centre = np.zeros(3)
        mesh = self.root / "meta" / "object_vtemplates" / obj_name / "mesh.obj"
        if mesh.exists():
            v = obj_vertices(mesh) / 1000.0
            centre = (v.min(axis=0) + v.max(axis=0)) / 2
        o = obj[idx]
        if not np.isfinite(o).all():
            raise ValueError(f"{what}: {base}.object.npy has non-finite values on the sampled frames")
        pos = Rotation.from_rotvec(o[:, 1:4]).apply(centre) + o[:, 4:7] / 1000.0
        action = seq.split("_")[1] if seq.count("_") >= 2 else "use"

        misc = self.misc().get(sid, {})
        size = misc.get("image_size", [[EGO_IMAGE_HW[1], EGO_IMAGE_HW[0]]])[0]
        image_hw = (int(size[1]), int(size[0]))
        frames = self._frames(sid, seq, idx, image_hw, misc, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=sampled_fps(FPS, self.sample_fps),
            K=K,
            R=R_all[idx],
            t=t_all[idx],
            image_hw=image_hw,
            hands=hands,
            objects=[ObjectTrack(name, position3d=pos)],
            task=f"{action} the {name}",
            frames=frames,
            meta={
                "sequence": f"{sid}/{seq}",
                "frame_indices": idx.tolist(),
                "source_fps": FPS,
                "joints_from": "mano" if self.poser is not None else "processed_seqs",
                "object_articulation_rad": o[:, 0].tolist(),
                "nonfinite_mano_frames": bad,
                "distortion_ignored": np.asarray(ego.get("dist8", []), float).tolist(),
            },
        )

    def _hand(self, h: dict, side: str, sid: str, seq: str, idx: np.ndarray, what: str):
        n = len(idx)
        try:
            rot = np.asarray(h["rot"], float)[idx]
            pose = np.asarray(h["pose"], float)[idx]
            trans = np.asarray(h["trans"], float)[idx]
            shape = np.broadcast_to(np.asarray(h["shape"], float).reshape(-1, 10)[0], (n, 10)).copy()
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{what}: {side} hand of {sid}/{seq}.mano.npy lacks rot/pose/trans/shape ({e})"
            ) from e
        ok = (
            np.isfinite(rot).all(1)
            & np.isfinite(pose).all(1)
            & np.isfinite(trans).all(1)
            & np.isfinite(shape).all(1)
        )
        params = {
            "global_orient": np.where(ok[:, None], rot, np.nan),
            "hand_pose": np.where(ok[:, None], pose, np.nan),
            "transl": np.where(ok[:, None], trans, np.nan),
            "betas": np.where(ok[:, None], shape, np.nan),
        }
        if self.poser is not None:
            joints = self.poser.joints(side, rot, pose, shape, trans)
        else:
            joints = self._processed_joints(side, sid, seq, idx, what)
        joints[~ok] = np.nan
        return joints, params, int((~ok).sum())

    def _processed_joints(self, side: str, sid: str, seq: str, idx: np.ndarray, what: str) -> np.ndarray:
        from hand3d_dataset.mano import MANO_TO_OPENPOSE

        path = self.root / "processed_seqs" / sid / f"{seq}.npy"
        if not path.exists():
            raise ValueError(
                f"{what}: no MANO model files (pass mano_dir or set ${MANO_DIR_ENV}) and no {path} to take "
                "ARCTIC's own joints from"
            )
        data = load_npy(path, what)
        try:
            j = np.asarray(data["world_coord"][f"joints.{side}"], float)[idx]
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(
                f"{what}: {path} lacks world_coord['joints.{side}'] for the sampled frames ({e})"
            ) from e
        if j.shape[1:] != (21, 3):
            raise ValueError(f"{what}: {path} joints.{side} has shape {j.shape}, expected (T, 21, 3)")
        return j[:, MANO_TO_OPENPOSE].copy()

    def _frames(
        self, sid: str, seq: str, idx: np.ndarray, image_hw, misc: dict, what: str
    ) -> np.ndarray | None:
        folder = self.root / "images" / sid / seq / "0"
        if self.images == "none" or (self.images == "auto" and not folder.is_dir()):
            return None
        if not folder.is_dir():
            raise ValueError(f"{what}: missing egocentric image folder {folder}")
        if "ioi_offset" not in misc:
            raise ValueError(f"{what}: {self.root / 'meta' / 'misc.json'} has no ioi_offset for {sid}")
        off = int(misc["ioi_offset"])
        frames = np.zeros((len(idx), *image_hw, 3), np.uint8)
        for k, f in enumerate(idx):
            path = folder / f"{int(f) + off:05d}.jpg"
            img = read_rgb(path, what)
            if img.shape[:2] != tuple(image_hw):
                raise ValueError(f"{what}: {path} is {img.shape[:2]}, misc.json says {tuple(image_hw)}")
            frames[k] = img
        return frames
