"""MANO hand model: safe loading of the official model files, a batched torch layer, and fitting to joints.

MANO (Romero et al. 2017) maps 10 shape coefficients `betas` and a pose (global orientation plus 15
finger joints, axis-angle) to a 778-vertex hand mesh and 16 joints. This module appends 5 fingertip
vertices and reorders the result to the 21 OpenPose joints of DESIGN.md §2 (0 wrist; 1-4 thumb;
5-8 index; 9-12 middle; 13-16 ring; 17-20 pinky, each base to tip). The model files themselves are
licensed and not shipped (https://mano.is.tue.mpg.de); with one at hand:

    >>> import torch
    >>> from hand3d_dataset.mano import ManoLayer, fit_mano_to_joints  # the lines below need a MANO model file
    >>> layer = ManoLayer("MANO_RIGHT.pkl", use_pca=True, num_pca_comps=12)  # doctest: +SKIP
    >>> out = layer(torch.zeros(2, 3), torch.zeros(2, 12))  # doctest: +SKIP
    >>> joints = layer.forward_joints(torch.zeros(2, 3), torch.zeros(2, 12))  # doctest: +SKIP
    >>> fit = fit_mano_to_joints(layer, out.joints)  # doctest: +SKIP

Official `.pkl` files are pickles (Python 2, partly chumpy objects). They are read with the restricted
unpickler of `hand3d_dataset.safe_pickle`, which rebuilds numpy arrays, scipy.sparse matrices and chumpy
arrays as plain arrays and refuses every other global, so a tampered file cannot run code;
`hand3d convert-mano SRC DST` (`convert_mano`) writes a pickle-free `.npz` once.

Fingertips: MANO has no fingertip joints, so one mesh vertex per finger stands in for each tip, and
two conventions are in use (thumb, index, middle, ring, pinky):
  * "smplx" `(744, 320, 443, 554, 671)`: smplx's `VERTEX_IDS["mano"]`, also used by HaMeR; the default.
  * "manopth" `(745, 317, 444, 556, 673)`: manopth / manotorch.
They are nearby vertices of the same fingertip, so the tips differ by millimetres; pick the
convention the ground truth you compare with was made with.

Left hands use the same math as right hands; the official MANO_LEFT files differ only in their
arrays. Those files carry a known flaw (`shapedirs[:, 0, :]`, the x components of the shape
blend shapes, have the wrong sign); like smplx, `load_mano_model` keeps the arrays as stored, and
`fix_left_shapedirs` applies the usual correction explicitly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from hand3d_dataset import safe_pickle
from hand3d_dataset._checks import as_array, check_shape
from hand3d_dataset.safe_pickle import PickledStandIn

# OpenPose order from MANO's 16 joints followed by the 5 fingertip vertices (thumb, index, middle,
# ring, pinky). MANO joints: 0 wrist, 1-3 index, 4-6 middle, 7-9 pinky, 10-12 ring, 13-15 thumb.
MANO_TO_OPENPOSE: list[int] = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]

# Fingertip vertex ids (thumb, index, middle, ring, pinky) per convention; see the module docstring.
FINGERTIP_VERTICES: dict[str, tuple[int, int, int, int, int]] = {
    "smplx": (744, 320, 443, 554, 671),
    "manopth": (745, 317, 444, 556, 673),
}

NUM_VERTICES = 778
NUM_JOINTS = 16
NUM_BETAS = 10
NUM_POSE = 45  # 15 finger joints x 3 axis-angle components

# Parent of each MANO joint; MANO_TO_OPENPOSE is only valid for this tree, so files are checked against it.
MANO_PARENTS: tuple[int, ...] = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)

# Joints whose posed position depends only on the global orientation and the shape (the wrist and
# the 5 children of the root): a closed-form rigid alignment of these initialises the fit.
_RIGID_MANO = (0, 1, 4, 7, 10, 13)
_RIGID_OPENPOSE = (0, 5, 9, 17, 13, 1)

# Key: expected shape. `J_regressor` may be stored sparse, `kintree_table` and `f` are integers.
_MODEL_KEYS: dict[str, tuple[int, ...]] = {
    "v_template": (NUM_VERTICES, 3),
    "shapedirs": (NUM_VERTICES, 3, NUM_BETAS),
    "posedirs": (NUM_VERTICES, 3, 9 * (NUM_JOINTS - 1)),
    "J_regressor": (NUM_JOINTS, NUM_VERTICES),
    "kintree_table": (2, NUM_JOINTS),
    "weights": (NUM_VERTICES, NUM_JOINTS),
    "hands_components": (NUM_POSE, NUM_POSE),
    "hands_mean": (NUM_POSE,),
    "f": (1538, 3),
}


# --------------------------------------------------------------------------------------------------
# Model data and loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ManoModelData:
    """The arrays of one MANO model file, validated, dense, float64 (read-only)."""

    side: str  # "right" or "left"
    v_template: np.ndarray  # (778, 3) rest-pose vertices, metres
    shapedirs: np.ndarray  # (778, 3, 10) shape blend shapes, metres per unit beta
    posedirs: np.ndarray  # (778, 3, 135) pose blend shapes, metres per unit of (R - I) entry
    J_regressor: np.ndarray  # (16, 778) joint regressor from vertices
    parents: tuple[int, ...]  # (16,) parent joint of each joint, -1 for the root
    weights: np.ndarray  # (778, 16) linear blend skinning weights, rows sum to 1
    hands_components: np.ndarray  # (45, 45) pose PCA basis, one component per row
    hands_mean: np.ndarray  # (45,) mean finger pose, axis-angle radians
    faces: np.ndarray  # (1538, 3) int64 triangle vertex ids


_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}


def _mano_stand_in(module: str, name: str) -> bool:
    """Classes a MANO pickle may reference as array containers: chumpy objects and scipy.sparse matrices."""
    is_chumpy = module == "chumpy" or module.startswith("chumpy.")
    return is_chumpy or (module.startswith("scipy.sparse") and name in _SPARSE_NAMES)


_MANO_WHAT = (
    "a MANO model file may only contain numpy arrays, scipy.sparse matrices and chumpy arrays (the file "
    "is not a MANO model or has been tampered with)"
)


def _state_dict(obj: PickledStandIn, key: str) -> dict:
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2:  # (state, slotstate) from __reduce_ex__
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {obj.origin} object has no state dict (got {type(state).__name__})")
    return state


def _plain(value: Any, key: str) -> Any:
    """Turns unpickled stand-ins into dense numpy arrays; leaves arrays and plain values as they are."""
    if isinstance(value, PickledStandIn):
        state = _state_dict(value, key)
        if value.origin.startswith("chumpy"):
            # A leaf chumpy.Ch keeps its value in `x`; some derived objects carry a cached result `r`.
            for attr in ("x", "r"):
                if attr in state:
                    return _plain(state[attr], key)
            raise ValueError(
                f"{key}: {value.origin} object without an 'x' or 'r' array (state {sorted(state)})"
            )
        return _sparse_to_dense(value.origin, state, key)
    if isinstance(value, np.ndarray) and value.dtype == object:
        raise ValueError(f"{key}: object arrays are not allowed in a MANO model file")
    return value


def _sparse_to_dense(origin: str, state: dict, key: str) -> np.ndarray:
    import scipy.sparse as sp

    shape = state.get("_shape", state.get("shape"))
    try:
        shape = tuple(int(s) for s in shape)
        if "indptr" in state:
            cls = sp.csc_matrix if "csc" in origin else sp.csr_matrix
            mat = cls(
                (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"])), shape
            )
        else:
            row, col = state["coords"] if "coords" in state else (state["row"], state["col"])
            mat = sp.coo_matrix((np.asarray(state["data"]), (np.asarray(row), np.asarray(col))), shape)
        return np.asarray(mat.toarray())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{key}: could not rebuild {origin} from its pickled state ({e})") from e


def _read_raw(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        raw = safe_pickle.loads(path.read_bytes(), str(path), stand_in=_mano_stand_in, what=_MANO_WHAT)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
        return {str(k): _plain(v, str(k)) for k, v in raw.items()}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:  # an object array needs pickle, which stays off
                    raise ValueError(
                        f"{path}: key '{k}' needs pickle to load ({e}); reconvert the file"
                    ) from e
            return out
    raise ValueError(f"path: expected a MANO .pkl or .npz file, got suffix '{path.suffix}' ({path})")


def _infer_side(path: Path, raw: dict[str, Any], side: str | None) -> str:
    if side is not None:
        if side not in ("right", "left"):
            raise ValueError(f"side: expected 'right' or 'left', got {side!r}")
        return side
    if "side" in raw:
        stored = str(np.asarray(raw["side"]))
        if stored in ("right", "left"):
            return stored
    name = path.name.upper()
    if ("RIGHT" in name) != ("LEFT" in name):
        return "right" if "RIGHT" in name else "left"
    raise ValueError(
        f"side: cannot tell the hand from the file name '{path.name}'; pass side='right' or 'left'"
    )


def _model_from_raw(raw: dict[str, Any], side: str, source: str) -> ManoModelData:
    missing = sorted(set(_MODEL_KEYS) - set(raw))
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; a MANO model file has {sorted(_MODEL_KEYS)}")
    arrays: dict[str, np.ndarray] = {}
    for key, shape in _MODEL_KEYS.items():
        arr = as_array(f"{source}: {key}", raw[key], dtype=np.float64)
        if arr.shape != shape:
            raise ValueError(f"{source}: {key} has shape {arr.shape}, expected {shape}")
        arrays[key] = arr

    table = arrays["kintree_table"]
    parents = tuple(-1 if j == 0 else int(p) for j, p in enumerate(table[0]))
    if parents != MANO_PARENTS or not np.array_equal(table[1], np.arange(NUM_JOINTS)):
        raise ValueError(
            f"{source}: kintree_table is not MANO's joint tree: parents {parents}, want {MANO_PARENTS}"
        )
    row_sums = arrays["weights"].sum(axis=1)
    if np.abs(row_sums - 1.0).max() > 1e-3:
        raise ValueError(
            f"{source}: weights rows must sum to 1, got sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]"
        )
    faces = arrays["f"]
    if np.any(faces != np.round(faces)) or faces.min() < 0 or faces.max() >= NUM_VERTICES:
        raise ValueError(
            f"{source}: f must hold vertex ids in [0, {NUM_VERTICES}), got [{faces.min()}, {faces.max()}]"
        )

    def frozen(a: np.ndarray) -> np.ndarray:
        a = np.array(a)  # own copy, so that read-only does not leak into the caller's arrays
        a.setflags(write=False)
        return a

    return ManoModelData(
        side=side,
        v_template=frozen(arrays["v_template"]),
        shapedirs=frozen(arrays["shapedirs"]),
        posedirs=frozen(arrays["posedirs"]),
        J_regressor=frozen(arrays["J_regressor"]),
        parents=parents,
        weights=frozen(arrays["weights"]),
        hands_components=frozen(arrays["hands_components"]),
        hands_mean=frozen(arrays["hands_mean"]),
        faces=frozen(faces.astype(np.int64)),
    )


def load_mano_model(path: str | Path, side: str | None = None) -> ManoModelData:
    """Loads an official MANO model file (`.pkl` via the restricted unpickler, or a converted `.npz`).

    `side` ("right" / "left") defaults to the one stored by `convert_mano`, else to the file name
    (`MANO_RIGHT` / `MANO_LEFT`). Raises `ValueError` naming the key for missing keys, wrong shapes,
    non-finite values or a non-MANO joint tree, and naming the global for a pickle that references
    anything but arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no MANO model file at {path}")
    raw = _read_raw(path)
    return _model_from_raw(raw, _infer_side(path, raw, side), str(path))


def convert_mano(src: str | Path, dst: str | Path) -> Path:
    """Converts a MANO model file (`.pkl`) into a pickle-free `.npz` with dense arrays; returns `dst`.

    The `.npz` keeps the official key names (so smplx's `MANO(..., ext="npz")` reads it too) plus `side`.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".npz":
        raise ValueError(f"dst: expected a path ending in .npz, got '{dst}'")
    model = load_mano_model(src)
    kintree = np.stack([np.array(model.parents, dtype=np.int64), np.arange(NUM_JOINTS, dtype=np.int64)])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        np.savez(
            f,
            v_template=model.v_template,
            shapedirs=model.shapedirs,
            posedirs=model.posedirs,
            J_regressor=model.J_regressor,
            kintree_table=kintree,
            weights=model.weights,
            hands_components=model.hands_components,
            hands_mean=model.hands_mean,
            f=model.faces,
            side=np.array(model.side),
        )
    return dst


def fix_left_shapedirs(left: ManoModelData, right: ManoModelData) -> ManoModelData:
    """Returns `left` with the sign of `shapedirs[:, 0, :]` flipped when it equals the right hand's.

    The official MANO_LEFT files mirror everything but the x components of the shape blend shapes,
    so a left hand with betas != 0 grows in the mirrored direction; this is the usual correction
    (as in HaMeR and manotorch). It does nothing for a file whose x components are already mirrored.
    """
    if left.side != "left" or right.side != "right":
        raise ValueError(
            f"left, right: expected a left and a right model, got {left.side!r} and {right.side!r}"
        )
    if np.abs(left.shapedirs[:, 0, :] - right.shapedirs[:, 0, :]).sum() >= 1.0:
        return left
    shapedirs = np.array(left.shapedirs)
    shapedirs[:, 0, :] *= -1
    shapedirs.setflags(write=False)
    return replace(left, shapedirs=shapedirs)


# --------------------------------------------------------------------------------------------------
# Forward kinematics
# --------------------------------------------------------------------------------------------------


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: `(..., 3)` axis-angle (radians) to `(..., 3, 3)` rotation matrices.

    R = I + a K + b K^2 with K the cross-product matrix of the (unnormalised) vector, a = sin t / t
    and b = (1 - cos t) / t^2; near t = 0 both use their Taylor series so values and gradients stay
    finite at the zero pose.
    """
    theta2 = (axis_angle * axis_angle).sum(-1)[..., None, None]
    small = theta2 < 1e-6
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    # 2 sin^2(t/2) rather than 1 - cos t: no cancellation in float32 for small angles.
    b = torch.where(small, 0.5 - theta2 / 24.0, 2.0 * torch.sin(0.5 * theta) ** 2 / safe2)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * K + b * (K @ K)


def _tree_levels(parents: tuple[int, ...]) -> list[list[int]]:
    depth = [0] * len(parents)
    for j, p in enumerate(parents):
        if p >= j and j > 0:
            raise ValueError(f"parents: joint {j} has parent {p}; parents must precede their children")
        depth[j] = 0 if p < 0 else depth[p] + 1
    return [[j for j in range(len(parents)) if depth[j] == d] for d in range(max(depth) + 1)]


class ManoOutput(NamedTuple):
    """Result of `ManoLayer.forward`; all positions in metres, in the frame of the given pose."""

    vertices: torch.Tensor  # (B, 778, 3) posed mesh vertices
    joints: torch.Tensor  # (B, 21, 3) joints in OpenPose order, fingertips from the chosen convention
    joints_mano: torch.Tensor  # (B, 16, 3) MANO's native joints


_FORWARD_BLOCK = 64  # frames per block in `ManoLayer.forward` (see there)


class ManoLayer(nn.Module):
    """Batched MANO forward pass (pure torch; float32 or float64 via `.float()` / `.double()`).

    Equations (one frame): with `theta = [global_orient, hand_pose (+ hands_mean)]` and `R_k` its
    per-joint rotations,
        v_shaped = v_template + shapedirs . betas,     J = J_regressor v_shaped
        v_posed  = v_shaped + posedirs . vec(R_1..15 - I)
        G_k      = G_parent(k) [R_k | J_k - J_parent(k)]                (kinematic chain)
        v        = sum_k w_vk [rot(G_k) | pos(G_k) - rot(G_k) J_k] v_posed + transl   (skinning)
    The joint regressor is folded into the shape space once (`J_template`, `J_shapedirs`) since it
    is linear, so a forward pass never regresses all 778 vertices; `forward_joints` skins only the
    5 fingertip vertices (about 10x the throughput of `forward`, for fitting and joint-only users).

    Args:
        model: `ManoModelData` or a path to a `.pkl` / `.npz` model file.
        use_pca: hand pose given as `num_pca_comps` coefficients of `hands_components`, else 45 axis-angle
            values. With all 45 components the basis is still applied (smplx instead treats 45 PCA
            components as raw axis-angle).
        num_pca_comps: number of PCA components, 1..45.
        flat_hand_mean: a zero hand pose is the flat hand; otherwise it is the file's `hands_mean`.
        fingertips: fingertip vertex convention, a key of `FINGERTIP_VERTICES`.
        side: overrides the side inferred when `model` is a path.
    """

    def __init__(
        self,
        model: ManoModelData | str | Path,
        use_pca: bool = False,
        num_pca_comps: int = 45,
        flat_hand_mean: bool = False,
        fingertips: str = "smplx",
        side: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, ManoModelData):
            model = load_mano_model(model, side=side)
        if fingertips not in FINGERTIP_VERTICES:
            raise ValueError(
                f"fingertips: unknown convention {fingertips!r}; known: {sorted(FINGERTIP_VERTICES)}"
            )
        if not 1 <= int(num_pca_comps) <= NUM_POSE:
            raise ValueError(f"num_pca_comps: expected 1..{NUM_POSE}, got {num_pca_comps}")
        self.side = model.side
        self.use_pca = bool(use_pca)
        self.num_pca_comps = int(num_pca_comps)
        self.flat_hand_mean = bool(flat_hand_mean)
        self.fingertips = fingertips
        self.parents = model.parents
        self.pose_dim = self.num_pca_comps if self.use_pca else NUM_POSE

        def buf(name: str, array: np.ndarray) -> None:
            self.register_buffer(name, torch.tensor(np.asarray(array), dtype=torch.get_default_dtype()))

        # Vertex arrays are stored channel-first (xyz, vertex): the blend shapes then become two plain
        # matmuls and skinning nine (B, V) multiply-adds, instead of B·V tiny 3×3 products (5× slower).
        buf("v_template", model.v_template.T)  # (3, 778)
        buf("shapedirs", model.shapedirs.transpose(2, 1, 0))  # (10, 3, 778)
        # (135, 3, 778): one slice per entry of the 15 stacked (R - I) matrices.
        buf("posedirs", model.posedirs.transpose(2, 1, 0))
        buf("J_template", model.J_regressor @ model.v_template)
        buf("J_shapedirs", np.einsum("jv,vck->jck", model.J_regressor, model.shapedirs))
        buf("lbs_weights", model.weights.T)  # (16, 778)
        buf("hand_mean", np.zeros(NUM_POSE) if self.flat_hand_mean else model.hands_mean)
        if self.use_pca:
            buf("hand_components", model.hands_components[: self.num_pca_comps])
        self.register_buffer("faces", torch.tensor(model.faces, dtype=torch.long), persistent=False)
        tips = torch.tensor(FINGERTIP_VERTICES[fingertips], dtype=torch.long)
        self.register_buffer("fingertip_ids", tips, persistent=False)
        self.register_buffer("openpose_order", torch.tensor(MANO_TO_OPENPOSE), persistent=False)
        # The joint tree by depth: each level is posed with one batched matmul from its parents,
        # which all sit in the level before (at positions `_parent_slots`).
        self._levels = _tree_levels(self.parents)
        self._parent_levels = [[max(self.parents[j], 0) for j in level] for level in self._levels]
        self._parent_slots = [[]] + [
            [prev.index(p) for p in parents] for prev, parents in zip(self._levels, self._parent_levels[1:])
        ]
        flat = [j for level in self._levels for j in level]
        self._level_order = [flat.index(j) for j in range(len(flat))]

    def extra_repr(self) -> str:
        return (
            f"side={self.side}, use_pca={self.use_pca}, pose_dim={self.pose_dim}, "
            f"flat_hand_mean={self.flat_hand_mean}, fingertips={self.fingertips}"
        )

    def _as_input(self, name: str, x: Any, batch: int | None, width: int) -> torch.Tensor:
        x = torch.as_tensor(x).to(device=self.v_template.device, dtype=self.v_template.dtype)
        if x.ndim != 2 or x.shape[1] != width or (batch is not None and x.shape[0] != batch):
            want = f"({'B' if batch is None else batch}, {width})"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
        return x

    def full_pose(self, hand_pose: torch.Tensor) -> torch.Tensor:
        """Layer pose parameters `(B, pose_dim)` to absolute finger axis-angles `(B, 45)` (mean added)."""
        if self.use_pca:
            hand_pose = hand_pose @ self.hand_components
        return hand_pose + self.hand_mean

    def kinematic_chain(
        self, rotations: torch.Tensor, joints: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Composes local rotations along the joint tree, one level of the tree per batched matmul.

        Args:
            rotations: (B, 16, 3, 3) local joint rotations.
            joints: (B, 16, 3) rest-pose joint positions.
        Returns:
            world rotations (B, 16, 3, 3) and posed joint positions (B, 16, 3).
        """
        rot_levels: list[torch.Tensor] = []
        pos_levels: list[torch.Tensor] = []
        for level, parent_level, slots in zip(self._levels, self._parent_levels, self._parent_slots):
            if not rot_levels:  # the root
                rot_levels.append(rotations[:, level])
                pos_levels.append(joints[:, level])
                continue
            parent_rot, parent_pos = rot_levels[-1][:, slots], pos_levels[-1][:, slots]
            bone = joints[:, level] - joints[:, parent_level]
            rot_levels.append(parent_rot @ rotations[:, level])
            pos_levels.append((parent_rot @ bone[..., None])[..., 0] + parent_pos)
        order = self._level_order  # joint j sits at position order[j] of the concatenated levels
        return torch.cat(rot_levels, 1)[:, order], torch.cat(pos_levels, 1)[:, order]

    def _pose(
        self, global_orient: Any, hand_pose: Any, betas: Any, transl: Any, vertex_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed vertices (all, or only `vertex_ids`) and MANO joints; see `forward` for the arguments."""
        global_orient = self._as_input("global_orient", global_orient, None, 3)
        batch = global_orient.shape[0]
        hand_pose = self._as_input("hand_pose", hand_pose, batch, self.pose_dim)
        dtype, device = global_orient.dtype, global_orient.device
        betas = (
            torch.zeros(batch, NUM_BETAS, dtype=dtype, device=device)
            if betas is None
            else self._as_input("betas", betas, batch, NUM_BETAS)
        )
        v_template, shapedirs, posedirs, weights = (
            self.v_template,
            self.shapedirs,
            self.posedirs,
            self.lbs_weights,
        )
        if vertex_ids is not None:
            v_template, shapedirs, posedirs, weights = (
                v_template[:, vertex_ids],
                shapedirs[..., vertex_ids],
                posedirs[..., vertex_ids],
                weights[:, vertex_ids],
            )
        num_v = v_template.shape[-1]

        pose = torch.cat([global_orient, self.full_pose(hand_pose)], dim=1).reshape(batch, NUM_JOINTS, 3)
        rotations = axis_angle_to_matrix(pose)
        joints_rest = self.J_template + torch.einsum("jck,bk->bjc", self.J_shapedirs, betas)
        eye = torch.eye(3, dtype=dtype, device=device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        blend = betas @ shapedirs.reshape(NUM_BETAS, -1) + pose_feature @ posedirs.reshape(-1, 3 * num_v)
        v_posed = v_template + blend.reshape(batch, 3, num_v)  # (B, 3, V)

        world_rot, joints_mano = self.kinematic_chain(rotations, joints_rest)
        # Skinning transforms map rest-pose points: rotate about the rest joint, then move it to its posed place.
        skin_t = joints_mano - (world_rot @ joints_rest[..., None])[..., 0]
        per_joint = torch.cat([world_rot.reshape(batch, NUM_JOINTS, 9), skin_t], dim=-1)  # (B, 16, 12)
        m = per_joint.transpose(1, 2) @ weights  # (B, 12, V): blended [R | t] per vertex, row-major R
        x, y, z = v_posed.unbind(1)
        vertices = torch.stack(
            [m[:, 3 * i] * x + m[:, 3 * i + 1] * y + m[:, 3 * i + 2] * z + m[:, 9 + i] for i in range(3)], -1
        )

        if transl is not None:
            transl = self._as_input("transl", transl, batch, 3)
            vertices = vertices + transl[:, None]
            joints_mano = joints_mano + transl[:, None]
        return vertices, joints_mano

    def forward(
        self,
        global_orient: torch.Tensor,
        hand_pose: torch.Tensor,
        betas: torch.Tensor | None = None,
        transl: torch.Tensor | None = None,
    ) -> ManoOutput:
        """Poses the hand.

        Args:
            global_orient: (B, 3) axis-angle of the wrist, radians.
            hand_pose: (B, pose_dim) 45 finger axis-angles or `num_pca_comps` PCA coefficients, relative
                to the mean pose unless `flat_hand_mean`.
            betas: (B, 10) shape coefficients; None for the mean shape.
            transl: (B, 3) translation, metres; None for zero.
        Inputs are cast to the layer's dtype and device.
        """
        batch = len(global_orient)
        if batch > _FORWARD_BLOCK:
            # Cache blocking: the (block, 12, 778) skinning intermediates stay in L2; 2× faster at B = 1024.
            parts = [
                self.forward(
                    *(
                        None if a is None else a[i : i + _FORWARD_BLOCK]
                        for a in (global_orient, hand_pose, betas, transl)
                    )
                )
                for i in range(0, batch, _FORWARD_BLOCK)
            ]
            return ManoOutput(*(torch.cat(field) for field in zip(*parts)))
        vertices, joints_mano = self._pose(global_orient, hand_pose, betas, transl, None)
        joints = torch.cat([joints_mano, vertices[:, self.fingertip_ids]], dim=1)[:, self.openpose_order]
        return ManoOutput(vertices=vertices, joints=joints, joints_mano=joints_mano)

    def forward_joints(
        self,
        global_orient: torch.Tensor,
        hand_pose: torch.Tensor,
        betas: torch.Tensor | None = None,
        transl: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 21 OpenPose joints `(B, 21, 3)` only, as in `forward`, skinning just the 5 fingertip vertices."""
        tips, joints_mano = self._pose(global_orient, hand_pose, betas, transl, self.fingertip_ids)
        return torch.cat([joints_mano, tips], dim=1)[:, self.openpose_order]


# --------------------------------------------------------------------------------------------------
# Fitting to 3D joints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ManoFitResult:
    """MANO parameters fitted to a joint sequence, in the fitted layer's parametrisation."""

    global_orient: np.ndarray  # (T, 3) wrist axis-angle, radians
    hand_pose: np.ndarray  # (T, pose_dim) layer pose parameters (45 axis-angle or PCA coefficients)
    betas: np.ndarray  # (10,) shape shared by the whole sequence
    transl: np.ndarray  # (T, 3) translation, metres
    joints: np.ndarray  # (T, 21, 3) joints of the fitted hands, OpenPose order, metres
    residual_mm: np.ndarray  # (T,) mean distance between fitted and given joints, millimetres
    max_residual_mm: np.ndarray  # (T,) largest joint distance per frame, millimetres
    flagged: np.ndarray  # (T,) bool, max_residual_mm > residual_threshold_mm


def _kabsch_init(
    layer: ManoLayer, targets: torch.Tensor, betas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form global orientation and translation from the wrist and the 5 root-child joints.

    Those 6 joints move rigidly with the wrist whatever the finger pose, so a rigid (Kabsch) fit of
    the shaped rest joints onto them is exact for noise-free joints.
    targets: (N, 21, 3) OpenPose joints; betas: (10,). Returns axis-angle (N, 3) and transl (N, 3).
    """
    from scipy.spatial.transform import Rotation

    rest = (
        (layer.J_template + torch.einsum("jck,k->jc", layer.J_shapedirs, betas))
        .detach()
        .cpu()
        .double()
        .numpy()
    )
    src = rest[list(_RIGID_MANO)]
    dst = targets[:, list(_RIGID_OPENPOSE)].detach().cpu().double().numpy()
    src_c, dst_c = src - src.mean(0), dst - dst.mean(1, keepdims=True)
    u, _, vt = np.linalg.svd(np.einsum("ki,nkj->nij", src_c, dst_c))
    d = np.sign(np.linalg.det(np.einsum("nij,njk->nik", u, vt)))  # no reflections
    fix = np.broadcast_to(np.eye(3), (len(dst), 3, 3)).copy()
    fix[:, 2, 2] = d
    R = np.einsum("nji,njk,nlk->nil", vt, fix, u)  # V diag(1, 1, d) U^T
    offset = dst.mean(1) - np.einsum("nij,j->ni", R, src.mean(0))
    # The root rotates about its rest position J_0, so transl = offset + R J_0 - J_0.
    transl = offset + np.einsum("nij,j->ni", R, rest[0]) - rest[0]
    as_t = dict(dtype=targets.dtype, device=targets.device)
    return torch.as_tensor(Rotation.from_matrix(R).as_rotvec(), **as_t), torch.as_tensor(transl, **as_t)


def _levenberg_marquardt(
    layer: ManoLayer,
    targets: torch.Tensor,
    global_orient: torch.Tensor,
    hand_pose: torch.Tensor,
    transl: torch.Tensor,
    betas: torch.Tensor,
    fit_betas: bool,
    num_iters: int,
    pose_prior_weight: float,
    betas_prior_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Gauss-Newton on the joint residuals (mm) of N frames; optionally a shared shape.

    Each frame's residual depends only on its own parameters and the shared betas, so the Jacobian
    is per frame (`vmap(jacfwd)`), and the normal equations are block diagonal: solved per frame
    when the shape is fixed, as one dense system (frames plus the 10 betas) when it is fitted.
    targets: (N, 21, 3) metres; global_orient (N, 3), hand_pose (N, P), transl (N, 3), betas (10,).
    """
    num, pose_dim = hand_pose.shape
    dim = 3 + pose_dim + 3
    sqrt_wp = math.sqrt(pose_prior_weight)

    def residual(x: torch.Tensor, beta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Translation in centimetres so that unit steps in all parameters move the joints comparably.
        go, hp, tr_cm = x[..., :3], x[..., 3 : 3 + pose_dim], x[..., 3 + pose_dim :]
        flat = x.ndim == 1  # under vmap: one frame
        if flat:
            go, hp, tr_cm, target = go[None], hp[None], tr_cm[None], target[None]
        joints = layer.forward_joints(go, hp, beta.expand(len(go), -1), tr_cm / 100.0)
        r = torch.cat([((joints - target) * 1000.0).flatten(1), sqrt_wp * hp], dim=1)
        return r[0] if flat else r

    jacobian = torch.func.vmap(torch.func.jacfwd(residual, argnums=(0, 1)), in_dims=(0, None, 0))

    def cost(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:  # (N,) per-frame cost
        return residual(x, beta, targets).square().sum(-1)

    x = torch.cat([global_orient, hand_pose, transl * 100.0], dim=1)
    beta = betas.clone()
    damping = torch.full((num,), 1e-3, dtype=x.dtype, device=x.device)
    step_tol = 1e-8  # radians / PCA units / cm: far below what moves a joint by a micrometre
    with torch.no_grad():
        for _ in range(num_iters):
            r = residual(x, beta, targets)
            jx, jb = jacobian(x, beta, targets)
            a = jx.transpose(1, 2) @ jx
            g = (jx.transpose(1, 2) @ r[..., None])[..., 0]
            # Marquardt's scaling: damping proportional to the curvature of each parameter.
            diag = torch.diagonal(a, dim1=1, dim2=2) + 1e-9
            old = r.square().sum(-1)
            if not fit_betas:
                step = -torch.linalg.solve(a + damping[:, None, None] * torch.diag_embed(diag), g)
                accept = cost(x + step, beta) < old
                x = torch.where(accept[:, None], x + step, x)
                damping = torch.where(accept, damping * 0.3, damping * 10.0).clamp(1e-9, 1e9)
                if step.abs().max() < step_tol:
                    break
                continue
            # One system over all frames and the shared shape: [A_x  A_xb; A_bx  A_bb].
            a_xb = jx.transpose(1, 2) @ jb  # (N, dim, 10)
            eye_b = torch.eye(NUM_BETAS, dtype=x.dtype, device=x.device)
            a_bb = torch.einsum("nrk,nrl->kl", jb, jb) + betas_prior_weight * eye_b
            g_b = torch.einsum("nrk,nr->k", jb, r) + betas_prior_weight * beta
            big = torch.zeros(num * dim + NUM_BETAS, num * dim + NUM_BETAS, dtype=x.dtype, device=x.device)
            big[: num * dim, : num * dim] = torch.block_diag(*(a + damping[0] * torch.diag_embed(diag)))
            big[: num * dim, num * dim :] = a_xb.reshape(num * dim, NUM_BETAS)
            big[num * dim :, : num * dim] = a_xb.reshape(num * dim, NUM_BETAS).T
            big[num * dim :, num * dim :] = a_bb + damping[0] * torch.diag(torch.diagonal(a_bb))
            step = -torch.linalg.solve(big, torch.cat([g.reshape(-1), g_b]))
            new_x, new_beta = x + step[: num * dim].reshape(num, dim), beta + step[num * dim :]
            new_total = cost(new_x, new_beta).sum() + betas_prior_weight * new_beta.square().sum()
            if new_total < old.sum() + betas_prior_weight * beta.square().sum():
                x, beta, damping = new_x, new_beta, damping * 0.3
            else:
                damping = (damping * 10.0).clamp(max=1e9)
            if step.abs().max() < step_tol:
                break
    return x[:, :3], x[:, 3 : 3 + pose_dim], x[:, 3 + pose_dim :] / 100.0, beta


def fit_mano_to_joints(
    layer: ManoLayer,
    joints: Any,
    betas: Any = None,
    fit_betas: bool = True,
    num_iters: int = 20,
    window: int = 16,
    residual_threshold_mm: float = 10.0,
    num_shape_frames: int = 16,
    pose_prior_weight: float = 1.0,
    betas_prior_weight: float = 1e-2,
) -> ManoFitResult:
    """Fits MANO parameters to a sequence of 21 OpenPose joints by damped Gauss-Newton (Levenberg-Marquardt).

    Scheme: given the shape, frames are independent problems, so they are solved as a batch, one
    window of `window` consecutive frames at a time: batching keeps the hardware busy, and each
    window starts from the previous window's last solution (smooth motion makes it close, which
    saves iterations and keeps the fit in the same local minimum across the sequence). The global
    orientation and translation of every frame start from a closed-form rigid alignment of the wrist
    and the 5 root-child joints, which do not depend on the finger pose. The shape is shared by the
    sequence, so when it is fitted it is solved first, jointly with the poses of up to
    `num_shape_frames` frames spread over the sequence, and then held fixed.
    Gauss-Newton rather than a first-order method: the problem is a small least-squares one (63
    residuals per frame) and converges to sub-millimetre residuals in a handful of iterations, where
    L-BFGS needed hundreds. Fitting runs in float64 on a copy of the layer.

    Args:
        layer: the MANO layer whose parametrisation (PCA or not, mean pose) the result uses.
        joints: (T, 21, 3) OpenPose-order joints, metres.
        betas: (10,) known shape (then not fitted); None to fit it (`fit_betas`) or use the mean shape.
        fit_betas: fit a shared shape when `betas` is None.
        num_iters: Gauss-Newton iterations per window (twice that for the shape stage).
        window: frames optimised together.
        residual_threshold_mm: a frame is flagged when its worst joint is further than this.
        num_shape_frames: frames used to fit the shape.
        pose_prior_weight: weight of |hand_pose|^2 against the summed squared joint errors (mm^2); it
            picks the least-bent pose among those the joints cannot tell apart (twist about a bone),
            which also keeps Gauss-Newton well conditioned (1e-2 needed ~4x more iterations).
        betas_prior_weight: weight of |betas|^2, in the same units.
    """
    if not isinstance(layer, ManoLayer):
        raise ValueError(f"layer: expected a ManoLayer, got {type(layer).__name__}")
    target_np = check_shape("joints", as_array("joints", joints), (21, 3))
    if target_np.ndim != 3 or len(target_np) == 0:
        raise ValueError(f"joints: expected shape (T, 21, 3) with T >= 1, got {target_np.shape}")
    hand_size = np.median(np.linalg.norm(target_np[:, 9] - target_np[:, 0], axis=-1))
    if hand_size > 0.5:
        raise ValueError(
            f"joints: wrist to middle MCP is {hand_size:.3g} (median); expected metres, not millimetres"
        )
    for name, value, low in (
        ("num_iters", num_iters, 1),
        ("window", window, 1),
        ("num_shape_frames", num_shape_frames, 1),
    ):
        if int(value) < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    if not math.isfinite(residual_threshold_mm) or residual_threshold_mm <= 0:
        raise ValueError(f"residual_threshold_mm: expected a positive number, got {residual_threshold_mm}")

    fit_layer = copy.deepcopy(layer).double()
    device = fit_layer.v_template.device
    targets = torch.as_tensor(target_np, dtype=torch.float64, device=device)
    T = len(targets)
    fixed_shape = betas is not None
    if fixed_shape:
        shape = torch.as_tensor(check_shape("betas", as_array("betas", betas), (NUM_BETAS,)), device=device)
        if shape.ndim != 1:
            raise ValueError(f"betas: expected shape (10,), got {tuple(shape.shape)}")
    else:
        shape = torch.zeros(NUM_BETAS, dtype=torch.float64, device=device)
    pose_dim = fit_layer.pose_dim
    priors = (pose_prior_weight, betas_prior_weight)

    if not fixed_shape and fit_betas:
        keys = np.unique(np.linspace(0, T - 1, min(T, int(num_shape_frames))).round().astype(int))
        go0, tr0 = _kabsch_init(fit_layer, targets[keys], shape)
        hp0 = torch.zeros(len(keys), pose_dim, dtype=torch.float64, device=device)
        iters = 2 * int(num_iters)
        go, hp, tr, shape = _levenberg_marquardt(
            fit_layer, targets[keys], go0, hp0, tr0, shape, True, iters, *priors
        )
        # A corrupted key frame would bend the shared shape towards it and so raise every frame's
        # residual: drop key frames the fit cannot explain and refit the shape once without them.
        with torch.no_grad():
            fitted = fit_layer.forward_joints(go, hp, shape.expand(len(keys), -1), tr)
            worst = ((fitted - targets[keys]).norm(dim=-1) * 1000.0).max(-1).values
        inliers = worst <= residual_threshold_mm
        if 0 < int(inliers.sum()) < len(keys):
            keep = inliers.nonzero()[:, 0]
            sel = (targets[keys][keep], go[keep], hp[keep], tr[keep], shape)
            *_, shape = _levenberg_marquardt(fit_layer, *sel, True, iters, *priors)

    go_all, hp_all, tr_all = [], [], []
    previous_pose = torch.zeros(pose_dim, dtype=torch.float64, device=device)
    for start in range(0, T, int(window)):
        chunk = targets[start : start + int(window)]
        go0, tr0 = _kabsch_init(fit_layer, chunk, shape)
        hp0 = previous_pose.expand(len(chunk), -1)
        go, hp, tr, _ = _levenberg_marquardt(
            fit_layer, chunk, go0, hp0, tr0, shape, False, int(num_iters), *priors
        )
        go_all.append(go)
        hp_all.append(hp)
        tr_all.append(tr)
        previous_pose = hp[-1]

    go, hp, tr = torch.cat(go_all), torch.cat(hp_all), torch.cat(tr_all)
    with torch.no_grad():
        fitted = fit_layer(go, hp, shape.expand(T, -1), tr).joints
        dist_mm = (fitted - targets).norm(dim=-1) * 1000.0
    residual = dist_mm.mean(-1).cpu().numpy()
    # Worst joint rather than mean: one displaced finger moves 4 of 21 joints and is diluted five-fold in a mean.
    worst = dist_mm.max(-1).values.cpu().numpy()
    return ManoFitResult(
        global_orient=go.cpu().numpy(),
        hand_pose=hp.cpu().numpy(),
        betas=shape.cpu().numpy(),
        transl=tr.cpu().numpy(),
        joints=fitted.cpu().numpy(),
        residual_mm=residual,
        max_residual_mm=worst,
        flagged=worst > residual_threshold_mm,
    )
