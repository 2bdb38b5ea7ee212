"""HOT3D adapter on the real trimmed sequences, checked against the raw files with scipy."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.hot3d import Hot3dSource, pinhole_from_fisheye624

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
HOT3D = FIXTURES / "real" / "hot3d"
QUEST = HOT3D / "Quest3" / "P0002_273c2819"
QUEST_ID = "hot3d-Quest3-P0002_273c2819"

pytestmark = pytest.mark.skipif(not QUEST.exists(), reason=f"HOT3D fixture not found at {HOT3D}")


def rows(name):
    with open(QUEST / name, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def clip():
    return Hot3dSource(HOT3D).load_clip(QUEST_ID)


def test_ids_and_protocol():
    src = get_source("hot3d", root=HOT3D)
    assert isinstance(src, SourceAdapter)
    assert QUEST_ID in src.clip_ids() and "hot3d-Aria-P0003_c701bd11" in src.clip_ids()
    with pytest.raises(ValueError, match="camera_models.json"):  # the Aria sample ships no camera model
        src.load_clip("hot3d-Aria-P0003_c701bd11")
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("hot3d-nope")
    with pytest.raises(ValueError, match="stream"):
        Hot3dSource(HOT3D, stream_id="9999-9").load_clip(QUEST_ID)


def test_camera_pose_from_composed_transforms(clip):
    head = rows("headset_trajectory.csv")
    cam = next(
        c for c in json.loads((QUEST / "camera_models.json").read_text()) if c["stream_id"] == "1201-1"
    )
    qd = cam["T_Device_Camera"]["quaternion_wxyz"]
    R_dc = Rotation.from_quat([qd[1], qd[2], qd[3], qd[0]])
    t_dc = np.array(cam["T_Device_Camera"]["translation_xyz"])
    assert clip.num_frames == len(head) == 15
    assert clip.fps == pytest.approx(30.0, rel=1e-3)
    for k, r in enumerate(head):
        R_wd = Rotation.from_quat([float(r[f"q_wo_{a}"]) for a in "xyzw"])
        t_wd = np.array([float(r[f"t_wo_{a}[m]"]) for a in "xyz"])
        R_wc = R_wd * R_dc
        t_wc = R_wd.apply(t_dc) + t_wd
        np.testing.assert_allclose(clip.R[k], R_wc.inv().as_matrix(), atol=1e-9)
        np.testing.assert_allclose(clip.camera_centers()[k], t_wc, atol=1e-9)
    p = cam["projectionParams"]
    np.testing.assert_allclose(clip.K[0], [[p[0], 0, p[2]], [0, p[1], p[3]], [0, 0, 1]])
    assert clip.image_hw == (cam["imageHeight"], cam["imageWidth"]) and clip.frames is None


def test_wrist_only_hands_from_wrist_xform(clip):
    recs = [
        json.loads(line)
        for line in (QUEST / "mano_hand_pose_trajectory.jsonl").read_text().splitlines()
        if line
    ]
    for key, side in (("0", "left"), ("1", "right")):
        hand = clip.hands[side]
        assert hand.wrist_only and hand.valid.all()
        want = np.array([r["hand_poses"][key]["wrist_xform"]["t_xyz"] for r in recs])
        np.testing.assert_allclose(hand.wrist3d, want, atol=1e-12)
        np.testing.assert_allclose(hand.mano["pose_pca"], [r["hand_poses"][key]["pose"] for r in recs])
        q = np.array([r["hand_poses"][key]["wrist_xform"]["q_wxyz"] for r in recs])
        np.testing.assert_allclose(
            hand.mano["wrist_R"], Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(), atol=1e-9
        )
    # real egocentric data: wrists sit 0.2-0.7 m in front of the headset camera
    z = clip.wrist_cam("left")[:, 2]
    assert np.all((z > 0.2) & (z < 0.7))


def test_objects_project_into_their_real_boxes(clip):
    """Independent check of K, R, t on real data: object origins project inside HOT3D's 2D boxes."""
    head_ts = [int(r["timestamp[ns]"]) for r in rows("headset_trajectory.csv")]
    boxes = {}
    for r in rows("box2d_objects.csv"):
        if r["stream_id"] == "1201-1":
            boxes[(r["object_uid"], int(r["timestamp[ns]"]))] = [
                float(r[c]) for c in ("x_min[pixel]", "x_max[pixel]", "y_min[pixel]", "y_max[pixel]")
            ]
    inside = total = 0
    for r in rows("dynamic_objects.csv"):
        key = (r["object_uid"], int(r["timestamp[ns]"]))
        if key not in boxes or key[1] not in head_ts:
            continue
        k = head_ts.index(key[1])
        p = clip.R[k] @ [float(r[f"t_wo_{a}[m]"]) for a in "xyz"] + clip.t[k]
        u, v = (
            clip.K[k, 0, 0] * p[0] / p[2] + clip.K[k, 0, 2],
            clip.K[k, 1, 1] * p[1] / p[2] + clip.K[k, 1, 2],
        )
        x0, x1, y0, y1 = boxes[key]
        inside += int(x0 <= u <= x1 and y0 <= v <= y1)
        total += 1
        obj = clip.object(f"object {key[0]}")
        np.testing.assert_allclose(obj.box2d[k], [x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5])
    assert total >= 50
    assert inside / total > 0.9  # pinhole approximation of a fisheye: near the centre it is close


def test_object_names_and_fisheye_params():
    uid = rows("dynamic_objects.csv")[0]["object_uid"]
    clip = Hot3dSource(QUEST, object_names={uid: "white mug"}).load_clip(QUEST_ID)
    assert "white mug" in [o.name for o in clip.objects]
    np.testing.assert_allclose(
        pinhole_from_fisheye624([300.0, 10.0, 20.0] + [0.0] * 12), [[300, 0, 10], [0, 300, 20], [0, 0, 1]]
    )
    with pytest.raises(ValueError, match="projectionParams"):
        pinhole_from_fisheye624([1.0, 2.0])


def test_full_joints_with_a_mano_model(tmp_path):
    """With MANO files (synthetic, hand-shaped ones here) hands get 21 joints posed by wrist_xform."""
    import pickle

    import torch

    import tests.test_mano as mano_helpers  # the synthetic MANO builder
    from hand3d_dataset.mano import ManoLayer

    for side, seed in (("left", 2), ("right", 1)):
        with open(tmp_path / f"MANO_{side.upper()}.pkl", "wb") as fh:
            pickle.dump(mano_helpers.make_synthetic_mano(side, seed=seed), fh, protocol=2)
    clip = Hot3dSource(QUEST, mano_dir=tmp_path).load_clip(QUEST_ID)
    recs = [
        json.loads(line)
        for line in (QUEST / "mano_hand_pose_trajectory.jsonl").read_text().splitlines()
        if line
    ]
    hp = [r["hand_poses"]["1"] for r in recs]
    joints = clip.hands["right"].joints3d
    assert joints.shape == (15, 21, 3) and not clip.hands["right"].wrist_only
    np.testing.assert_allclose(joints[:, 0], [h["wrist_xform"]["t_xyz"] for h in hp], atol=1e-9)
    layer = ManoLayer(tmp_path / "MANO_RIGHT.pkl", use_pca=True, num_pca_comps=15).double()
    with torch.no_grad():
        local = layer.forward_joints(
            torch.zeros(15, 3, dtype=torch.float64),
            torch.tensor([h["pose"] for h in hp], dtype=torch.float64),
            torch.tensor([h["betas"] for h in hp], dtype=torch.float64),
        ).numpy()
    for k, h in enumerate(hp):
        q = h["wrist_xform"]["q_wxyz"]
        rot = Rotation.from_quat([q[1], q[2], q[3], q[0]])
        np.testing.assert_allclose(
            rot.inv().apply(joints[k] - joints[k, 0]), local[k] - local[k, 0], atol=1e-9
        )
