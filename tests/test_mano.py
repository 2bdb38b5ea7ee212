"""MANO layer: parity with smplx's MANO on a synthetic model file, safe loading, and fitting to joints.

The official MANO files are licensed, so the tests write a synthetic model with the official keys,
shapes and pickle layout: a hand-shaped template (joints spread along five fingers), a joint
regressor that averages rings of vertices around each joint, and small shape/pose blend shapes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import smplx  # noqa: E402  (dev extra: the reference MANO implementation)
import torch

from hand3d_dataset.mano import (
    FINGERTIP_VERTICES,
    ManoLayer,
    ManoModelData,
    convert_mano,
    fit_mano_to_joints,
    fix_left_shapedirs,
    load_mano_model,
)

# smplx builds its layers with torch.jit.script, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# MANO joint tree (written out here, independently of the module): 0 wrist; index 1-3; middle 4-6;
# pinky 7-9; ring 10-12; thumb 13-15.
PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
# finger: (MANO joint ids base..distal, base position (right hand, metres), direction, segment lengths)
FINGERS = {
    "thumb": ((13, 14, 15), (0.022, -0.008, 0.028), (0.7, -0.15, 0.7), (0.036, 0.032, 0.026)),
    "index": ((1, 2, 3), (0.088, 0.0, 0.022), (1.0, 0.0, 0.05), (0.038, 0.024, 0.020)),
    "middle": ((4, 5, 6), (0.092, 0.0, 0.002), (1.0, 0.0, 0.0), (0.042, 0.027, 0.022)),
    "ring": ((10, 11, 12), (0.086, 0.0, -0.018), (1.0, 0.0, -0.06), (0.040, 0.026, 0.021)),
    "pinky": ((7, 8, 9), (0.078, 0.0, -0.036), (1.0, 0.0, -0.12), (0.030, 0.020, 0.018)),
}
TIP_ORDER = ("thumb", "index", "middle", "ring", "pinky")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def make_synthetic_mano(side: str = "right", seed: int = 0) -> dict:
    """Random but hand-shaped MANO arrays with the official keys, shapes and dtypes."""
    rng = np.random.default_rng(seed)
    joints = np.zeros((16, 3))
    tips = {}
    for name, (ids, base, direction, lengths) in FINGERS.items():
        d = _unit(direction)
        p = np.asarray(base, dtype=np.float64)
        for j, length in zip(ids, lengths):
            joints[j] = p
            p = p + length * d
        tips[name] = p

    tip_ids = {
        name: (FINGERTIP_VERTICES["smplx"][i], FINGERTIP_VERTICES["manopth"][i])
        for i, name in enumerate(TIP_ORDER)
    }
    reserved = {v for pair in tip_ids.values() for v in pair}
    free = rng.permutation([v for v in range(778) if v not in reserved])
    ring_ids, body_ids = free[: 16 * 8].reshape(16, 8), free[16 * 8 :]

    v = np.zeros((778, 3))
    weights = np.zeros((778, 16))
    regressor = np.zeros((16, 778))
    for j in range(16):
        # 4 random directions and their opposites: the ring's mean is exactly the joint.
        u = rng.normal(size=(4, 3))
        offsets = 0.007 * u / np.linalg.norm(u, axis=1, keepdims=True)
        v[ring_ids[j]] = joints[j] + np.concatenate([offsets, -offsets])
        regressor[j, ring_ids[j]] = 1.0 / 8
        weights[ring_ids[j], j] += 0.5
        weights[ring_ids[j], max(PARENTS[j], 0)] += 0.5
    for name, (ids, *_rest) in FINGERS.items():
        for k, vid in enumerate(tip_ids[name]):
            # the manopth vertex sits 2 mm below the smplx one, like neighbouring vertices of a real tip
            v[vid] = tips[name] + (0.0, -0.002 * k, 0.0)
            weights[vid, ids[-1]] = 1.0
    # bones: wrist -> each finger base (palm), then each finger segment up to its tip
    bones = []
    for name, (ids, *_rest) in FINGERS.items():
        chain = [joints[i] for i in ids] + [tips[name]]
        bones.append((0, joints[0], chain[0]))
        bones += [(ids[k], chain[k], chain[k + 1]) for k in range(3)]
    for vid in body_ids:
        j, a, b = bones[rng.integers(len(bones))]
        t = rng.uniform()
        v[vid] = a + t * (b - a) + rng.normal(size=3) * 0.004
        weights[vid, j] += 0.6 + 0.4 * t
        weights[vid, max(PARENTS[j], 0)] += 0.4 - 0.4 * t

    shapedirs = np.stack([v @ (rng.normal(size=(3, 3)) * 0.03).T for _ in range(10)], axis=-1)
    shapedirs += rng.normal(size=shapedirs.shape) * 2e-4
    components = np.linalg.qr(rng.normal(size=(45, 45)))[0].T
    faces = rng.integers(0, 778, size=(1538, 3)).astype(np.uint32)
    if side == "left":  # mirror x, as the official left model mirrors the right one
        v[:, 0] *= -1
        shapedirs[:, 0, :] *= -1
        faces = faces[:, ::-1].copy()
    return {
        "v_template": v,
        "shapedirs": shapedirs,
        "posedirs": rng.normal(size=(778, 3, 135)) * 1e-4,
        "J_regressor": sp.csc_matrix(regressor),
        "kintree_table": np.array([[4294967295] + PARENTS[1:], list(range(16))], dtype=np.uint32),
        "weights": weights,
        "hands_components": components,
        "hands_mean": rng.normal(size=45) * 0.15,
        "f": faces,
        # extra keys found in the official files
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def write_pkl(path: Path, data: dict, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)  # the official files are protocol-2 Python 2 pickles
    return path


@pytest.fixture(scope="module")
def mano_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mano")
    return {
        "right": write_pkl(root / "right" / "MANO_RIGHT.pkl", make_synthetic_mano("right", seed=1)),
        "left": write_pkl(root / "left" / "MANO_LEFT.pkl", make_synthetic_mano("left", seed=2)),
    }


def _random_params(batch: int, pose_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    global_orient = torch.randn(batch, 3, generator=g, dtype=torch.float64) * 1.5
    global_orient[0] = 0.0  # exactly the zero rotation (the small-angle branch)
    global_orient[1] = 1e-5  # tiny angle
    return {
        "global_orient": global_orient,
        "hand_pose": torch.randn(batch, pose_dim, generator=g, dtype=torch.float64) * 0.6,
        "betas": torch.randn(batch, 10, generator=g, dtype=torch.float64),
        "transl": torch.randn(batch, 3, generator=g, dtype=torch.float64) * 0.3,
    }


def _expected_openpose(joints16: torch.Tensor, vertices: torch.Tensor, tips: tuple[int, ...]) -> torch.Tensor:
    # OpenPose order written from DESIGN.md §2: wrist, then per finger (thumb, index, middle, ring,
    # pinky) its 3 MANO joints base to distal and the tip vertex.
    chains = {
        "thumb": (13, 14, 15),
        "index": (1, 2, 3),
        "middle": (4, 5, 6),
        "ring": (10, 11, 12),
        "pinky": (7, 8, 9),
    }
    cols = [joints16[:, 0]]
    for i, name in enumerate(TIP_ORDER):
        cols += [joints16[:, j] for j in chains[name]] + [vertices[:, tips[i]]]
    return torch.stack(cols, dim=1)


# --------------------------------------------------------------------------------------------------
# Forward parity with smplx
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("use_pca,ncomps", [(False, 45), (True, 6), (True, 12)])
@pytest.mark.parametrize("flat_hand_mean", [False, True])
def test_forward_matches_smplx(mano_files, side, use_pca, ncomps, flat_hand_mean):
    path = mano_files[side]
    ref = smplx.MANO(
        str(path), use_pca=use_pca, num_pca_comps=ncomps, flat_hand_mean=flat_hand_mean, dtype=torch.float64
    )
    assert ref.is_rhand == (side == "right")
    layer = ManoLayer(path, use_pca=use_pca, num_pca_comps=ncomps, flat_hand_mean=flat_hand_mean).double()
    assert layer.side == side
    params = _random_params(5, ncomps if use_pca else 45, seed=3)
    with torch.no_grad():
        want = ref(**params)
        got = layer(**params)
    assert got.vertices.shape == (5, 778, 3) and got.joints.shape == (5, 21, 3)
    torch.testing.assert_close(got.vertices, want.vertices, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.joints_mano, want.joints, atol=1e-6, rtol=0)
    expected = _expected_openpose(want.joints, want.vertices, FINGERTIP_VERTICES["smplx"])
    torch.testing.assert_close(got.joints, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_joints(**params), expected, atol=1e-6, rtol=0)


def test_float32_matches_smplx_and_defaults(mano_files):
    ref = smplx.MANO(str(mano_files["right"]), use_pca=False, dtype=torch.float64)
    layer = ManoLayer(mano_files["right"])  # float32 by default
    params = _random_params(4, 45, seed=4)
    params["betas"] = torch.zeros(4, 10, dtype=torch.float64)
    params["transl"] = torch.zeros(4, 3, dtype=torch.float64)
    with torch.no_grad():
        want = ref(**params)
        got = layer(params["global_orient"].float(), params["hand_pose"].float())  # betas, transl default
    assert got.vertices.dtype == torch.float32
    torch.testing.assert_close(got.vertices.double(), want.vertices, atol=1e-6, rtol=0)


def test_large_batch_uses_blocks_and_still_matches_smplx(mano_files):
    # 150 frames run as blocks of 64 + 64 + 22 inside `forward`; the block seams must be invisible.
    ref = smplx.MANO(str(mano_files["left"]), use_pca=True, num_pca_comps=12, dtype=torch.float64)
    layer = ManoLayer(mano_files["left"], use_pca=True, num_pca_comps=12).double()
    params = _random_params(150, 12, seed=8)
    with torch.no_grad():
        want, got = ref(**params), layer(**params)
    assert got.vertices.shape == (150, 778, 3)
    torch.testing.assert_close(got.vertices, want.vertices, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.joints_mano, want.joints, atol=1e-6, rtol=0)


def test_fingertip_conventions_select_named_vertices(mano_files):
    params = _random_params(3, 45, seed=5)
    for name, tips in FINGERTIP_VERTICES.items():
        out = ManoLayer(mano_files["right"], fingertips=name).double()(**params)
        torch.testing.assert_close(
            out.joints[:, [4, 8, 12, 16, 20]], out.vertices[:, list(tips)], atol=0, rtol=0
        )
    assert FINGERTIP_VERTICES["manopth"] == (745, 317, 444, 556, 673)
    assert FINGERTIP_VERTICES["smplx"] == tuple(smplx.vertex_ids.vertex_ids["mano"].values())


def test_gradients_finite_at_zero_pose(mano_files):
    layer = ManoLayer(mano_files["right"], flat_hand_mean=True).double()
    go = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    hp = torch.zeros(2, 45, dtype=torch.float64, requires_grad=True)
    layer(go, hp).joints.sum().backward()
    assert torch.isfinite(go.grad).all() and torch.isfinite(hp.grad).all()
    assert go.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Loading: .npz vs .pkl, restricted unpickler, chumpy
# --------------------------------------------------------------------------------------------------


def test_npz_and_pkl_give_identical_results(mano_files, tmp_path):
    for side, pkl in mano_files.items():
        npz = convert_mano(pkl, tmp_path / f"converted_{side}.npz")  # no side in the name: stored inside
        a, b = load_mano_model(pkl), load_mano_model(npz)
        assert a.side == b.side == side
        for field in (
            "v_template",
            "shapedirs",
            "posedirs",
            "J_regressor",
            "weights",
            "hands_components",
            "hands_mean",
            "faces",
        ):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.parents == b.parents == tuple(PARENTS)
        np.testing.assert_array_equal(
            a.J_regressor,
            make_synthetic_mano(side, seed=1 if side == "right" else 2)["J_regressor"].toarray(),
        )
        params = _random_params(3, 12, seed=6)
        out_pkl = ManoLayer(pkl, use_pca=True, num_pca_comps=12).double()(**params)
        out_npz = ManoLayer(npz, use_pca=True, num_pca_comps=12).double()(**params)
        torch.testing.assert_close(out_pkl.vertices, out_npz.vertices, atol=0, rtol=0)
        # smplx itself accepts the converted file and agrees with its own reading of the .pkl
        ref_npz = smplx.MANO(
            str(npz), ext="npz", is_rhand=side == "right", use_pca=True, num_pca_comps=12, dtype=torch.float64
        )
        ref_pkl = smplx.MANO(str(pkl), use_pca=True, num_pca_comps=12, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(
                ref_npz(**params).vertices, ref_pkl(**params).vertices, atol=1e-9, rtol=0
            )


def test_npz_loads_in_fresh_process_without_pickle(mano_files, tmp_path):
    npz = convert_mano(mano_files["right"], tmp_path / "MANO_RIGHT.npz")
    code = textwrap.dedent(
        f"""
        import numpy as np
        z = np.load({str(npz)!r}, allow_pickle=False)
        assert z["J_regressor"].shape == (16, 778) and str(z["side"]) == "right"
        print(float(z["v_template"].sum()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == pytest.approx(
        make_synthetic_mano("right", seed=1)["v_template"].sum(), abs=1e-12
    )


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalCall:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload,global_name", [("system", "posix.system"), ("eval", "__builtin__.eval")])
def test_restricted_unpickler_refuses_code(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    data = make_synthetic_mano("right")
    data["shapedirs"] = _SystemCall(f"touch {marker}") if payload == "system" else _EvalCall()
    path = write_pkl(tmp_path / "MANO_RIGHT.pkl", data)
    with pytest.raises(ValueError, match=f"refusing to unpickle global '{global_name}'"):
        load_mano_model(path)
    with pytest.raises(ValueError, match=global_name):
        convert_mano(path, tmp_path / "out.npz")
    assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()
    # the same file does run the payload under plain pickle: the test would catch a permissive loader
    if payload == "system":
        with open(path, "rb") as f:
            pickle.load(f, encoding="latin1")
        assert marker.exists()


@pytest.mark.parametrize("attr,protocol", [("x", 2), ("r", 2), ("x", 0)])
def test_chumpy_arrays_rebuilt_as_plain_arrays(mano_files, tmp_path, monkeypatch, attr, protocol):
    # A stand-in class registered as chumpy.ch.Ch, so the pickle references that global exactly as
    # the official files do; it is removed before loading, so the loader cannot import it.
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, value):
            setattr(self, attr, value)
            self._dirty_vars = {"x"}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch = Ch
    chumpy.ch = ch
    monkeypatch.setitem(sys.modules, "chumpy", chumpy)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch)
    data = make_synthetic_mano("right", seed=1)
    data["shapedirs"] = Ch(data["shapedirs"])
    data["v_template"] = Ch(Ch(data["v_template"]))  # nested, as a derived chumpy value may be
    path = write_pkl(tmp_path / "MANO_RIGHT.pkl", data, protocol=protocol)
    assert b"chumpy.ch\nCh" in path.read_bytes()
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    monkeypatch.delitem(sys.modules, "chumpy")

    model = load_mano_model(path)
    plain = load_mano_model(mano_files["right"])
    assert isinstance(model.shapedirs, np.ndarray) and model.shapedirs.shape == (778, 3, 10)
    np.testing.assert_array_equal(model.shapedirs, plain.shapedirs)
    np.testing.assert_array_equal(model.v_template, plain.v_template)


def test_missing_key_and_bad_shape_are_named(tmp_path):
    data = make_synthetic_mano("right")
    del data["posedirs"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['posedirs'\]"):
        load_mano_model(write_pkl(tmp_path / "a" / "MANO_RIGHT.pkl", data))
    data = make_synthetic_mano("right")
    data["shapedirs"] = data["shapedirs"][:, :, :8]
    with pytest.raises(ValueError, match=r"shapedirs has shape \(778, 3, 8\), expected \(778, 3, 10\)"):
        load_mano_model(write_pkl(tmp_path / "b" / "MANO_RIGHT.pkl", data))
    data = make_synthetic_mano("right")
    data["weights"][3, 0] = np.nan
    with pytest.raises(ValueError, match="weights: contains 1 non-finite"):
        load_mano_model(write_pkl(tmp_path / "c" / "MANO_RIGHT.pkl", data))
    data = make_synthetic_mano("right")
    data["kintree_table"][0, 5] = 1
    with pytest.raises(ValueError, match="kintree_table is not MANO's joint tree"):
        load_mano_model(write_pkl(tmp_path / "d" / "MANO_RIGHT.pkl", data))
    with pytest.raises(ValueError, match="side: cannot tell"):
        load_mano_model(write_pkl(tmp_path / "e" / "hand.pkl", make_synthetic_mano("right")))
    assert load_mano_model(tmp_path / "e" / "hand.pkl", side="left").side == "left"
    with pytest.raises(ValueError, match="suffix '.json'"):
        (tmp_path / "MANO_RIGHT.json").write_text("{}")
        load_mano_model(tmp_path / "MANO_RIGHT.json")
    with pytest.raises(ValueError, match="dst: expected a path ending in .npz"):
        convert_mano(tmp_path / "e" / "hand.pkl", tmp_path / "out.pkl")


def test_layer_rejects_bad_arguments(mano_files):
    with pytest.raises(ValueError, match="fingertips: unknown convention 'openpose'"):
        ManoLayer(mano_files["right"], fingertips="openpose")
    with pytest.raises(ValueError, match="num_pca_comps: expected 1..45, got 0"):
        ManoLayer(mano_files["right"], use_pca=True, num_pca_comps=0)
    layer = ManoLayer(mano_files["right"], use_pca=True, num_pca_comps=6)
    with pytest.raises(ValueError, match=r"hand_pose: expected shape \(2, 6\), got \(2, 45\)"):
        layer(torch.zeros(2, 3), torch.zeros(2, 45))
    with pytest.raises(ValueError, match=r"global_orient: expected shape \(B, 3\), got \(2, 4\)"):
        layer(torch.zeros(2, 4), torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"betas: expected shape \(2, 10\), got \(2, 16\)"):
        layer(torch.zeros(2, 3), torch.zeros(2, 6), betas=torch.zeros(2, 16))


def test_fix_left_shapedirs(tmp_path):
    right = make_synthetic_mano("right", seed=1)
    left = make_synthetic_mano("left", seed=1)
    left["shapedirs"][:, 0, :] = right["shapedirs"][:, 0, :]  # the official left files' flaw
    r = load_mano_model(write_pkl(tmp_path / "MANO_RIGHT.pkl", right))
    bad = load_mano_model(write_pkl(tmp_path / "MANO_LEFT.pkl", left))
    fixed = fix_left_shapedirs(bad, r)
    np.testing.assert_array_equal(fixed.shapedirs[:, 0], -right["shapedirs"][:, 0])
    np.testing.assert_array_equal(fixed.shapedirs[:, 1:], right["shapedirs"][:, 1:])
    assert fix_left_shapedirs(fixed, r) is fixed  # already mirrored: unchanged
    assert isinstance(fixed, ManoModelData) and fixed.side == "left"


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    # The fits are many tiny ops: on a loaded shared CPU, intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smooth_sequence(num_frames: int, ncomps: int, seed: int) -> dict[str, torch.Tensor]:
    """A smooth hand motion: rotating wrist, PCA finger motion, drifting position, fixed shape."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, num_frames)[:, None]
    axis = _unit(rng.normal(size=3))
    global_orient = rng.normal(size=3) * 0.8 + 0.6 * np.sin(2 * np.pi * 0.5 * t) * axis
    freq, phase = rng.uniform(0.3, 1.0, ncomps), rng.uniform(0, 2 * np.pi, ncomps)
    hand_pose = 0.7 * np.sin(2 * np.pi * freq * t + phase)
    transl = np.concatenate([0.05 * np.sin(2 * np.pi * t), 0.03 * t, 0.5 + 0.02 * t], axis=1)
    betas = np.tile(rng.normal(size=10) * 0.8, (num_frames, 1))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return {
        "global_orient": as_t(global_orient),
        "hand_pose": as_t(hand_pose),
        "betas": as_t(betas),
        "transl": as_t(transl),
    }


def test_fit_recovers_joints_and_flags_corrupted_frame(mano_files, one_thread):
    layer = ManoLayer(mano_files["right"], use_pca=True, num_pca_comps=12).double()
    truth = _smooth_sequence(12, 12, seed=7)
    with torch.no_grad():
        joints = layer(**truth).joints.numpy()
    corrupted = joints.copy()
    corrupted[6, 5:9] += (0.03, 0.0, 0.0)  # the whole index finger displaced 3 cm
    fit = fit_mano_to_joints(layer, corrupted, window=4)
    clean = np.arange(12) != 6
    assert fit.hand_pose.shape == (12, 12) and fit.betas.shape == (10,) and fit.global_orient.shape == (12, 3)
    # noise-free joints of the same model: the fit must explain them almost exactly, the corrupted
    # frame being kept out of the shared shape
    assert fit.residual_mm[clean].max() < 0.1, fit.residual_mm
    assert fit.flagged.tolist() == (~clean).tolist(), fit.max_residual_mm
    # independent check of the returned parameters: re-pose them with smplx and compare to the input joints
    ref = smplx.MANO(str(mano_files["right"]), use_pca=True, num_pca_comps=12, dtype=torch.float64)
    with torch.no_grad():
        out = ref(
            global_orient=torch.as_tensor(fit.global_orient),
            hand_pose=torch.as_tensor(fit.hand_pose),
            betas=torch.as_tensor(fit.betas).expand(12, -1),
            transl=torch.as_tensor(fit.transl),
        )
    reposed = _expected_openpose(out.joints, out.vertices, FINGERTIP_VERTICES["smplx"]).numpy()
    assert np.linalg.norm(reposed - joints, axis=-1)[clean].max() < 1e-4


@pytest.mark.parametrize("window", [1, 5])  # 1: every frame starts from the previous frame's solution
def test_fit_full_pose_with_known_betas_float32_layer(mano_files, one_thread, window):
    gen = ManoLayer(mano_files["left"], use_pca=True, num_pca_comps=12).double()
    truth = _smooth_sequence(10, 12, seed=8)
    with torch.no_grad():
        joints = gen(**truth).joints.float()
    layer = ManoLayer(mano_files["left"], use_pca=False)  # full 45-dim pose, float32
    fit = fit_mano_to_joints(layer, joints, betas=truth["betas"][0].numpy(), window=window)
    assert fit.hand_pose.shape == (10, 45)
    np.testing.assert_array_equal(fit.betas, truth["betas"][0].numpy())
    assert fit.residual_mm.mean() < 1.0, fit.residual_mm
    assert not fit.flagged.any()
    # the fitted global orientation is the true one: the wrist and finger bases are rigid
    from scipy.spatial.transform import Rotation

    rel = Rotation.from_rotvec(fit.global_orient).inv() * Rotation.from_rotvec(truth["global_orient"].numpy())
    assert np.degrees(rel.magnitude()).max() < 2.0


def test_fit_rejects_bad_joints(mano_files):
    layer = ManoLayer(mano_files["right"])
    good = np.zeros((2, 21, 3))
    good[:, 9, 0] = 0.09
    bad = good.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="joints: contains 1 non-finite"):
        fit_mano_to_joints(layer, bad)
    with pytest.raises(ValueError, match=r"joints: expected shape \(\.\.\., 21, 3\), got \(2, 16, 3\)"):
        fit_mano_to_joints(layer, np.zeros((2, 16, 3)))
    with pytest.raises(ValueError, match=r"joints: expected shape \(T, 21, 3\)"):
        fit_mano_to_joints(layer, good[0])
    with pytest.raises(ValueError, match="expected metres, not millimetres"):
        fit_mano_to_joints(layer, good * 1000)
    with pytest.raises(ValueError, match=r"betas: expected shape \(\.\.\., 10\)"):
        fit_mano_to_joints(layer, good, betas=np.zeros(16))
    with pytest.raises(ValueError, match="residual_threshold_mm"):
        fit_mano_to_joints(layer, good, residual_threshold_mm=float("nan"))
