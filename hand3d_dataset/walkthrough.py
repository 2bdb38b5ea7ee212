"""A short tour of the Hand3D geometry core on real data (`hand3d walkthrough`, `make demo`).

    python -m hand3d_dataset.walkthrough                # uses ../shared/fixtures
    python -m hand3d_dataset.walkthrough --fixtures DIR

Each step runs one piece of the annotation pipeline of paper §3.2.1 on a public sample and prints
what it found next to what the dataset itself says, so the numbers can be checked by eye:

1. RHD: camera-frame joints → pixels, against the dataset's own 2D keypoints.
2. InterHand2.6M: world joints → camera (`x_c = R x_w + t`) → pixels, against the annotated hand box.
3. HOT3D: the real headset trajectory → relative camera motion in words; the real wrist trajectory
   → a hand-movement answer and motion tokens, decoded back.
4. Scale calibration: the InterHand joints against a point cloud of unknown scale with corrupted
   pixels, and 3D localisation of an object from its box in the calibrated cloud.
5. Metrics: free-form answers scored against the structured ground truth of step 3.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hand3d_dataset.calibration import calibrate_scale, localize_object
from hand3d_dataset.cameras import backproject_depth, intrinsics_matrix, project, visibility, world_to_camera
from hand3d_dataset.language import describe_displacement, relative_camera_motion
from hand3d_dataset.metrics import evaluate_answers, target_from_camera_motion, target_from_description
from processing_vipa.motion_tokenizer import MotionTokenizer

DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _rhd(root: Path, console: Console) -> None:
    data = json.loads((root / "real" / "rhd" / "test_rhd.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    table = Table(title="1. RHD: project camera-frame joints, compare with the stored 2D keypoints")
    for col in ("image", "joints", "max |Δ| px", "mean |Δ| px"):
        table.add_column(col)
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        K = intrinsics_matrix(im["cam_param"]["focal"], im["cam_param"]["princpt"])
        uv, _ = project(np.asarray(ann["joint_cam"], float), K)
        err = np.linalg.norm(uv - np.asarray(ann["keypoints"], float)[:, :2], axis=-1)
        table.add_row(im["file_name"], str(len(err)), f"{err.max():.4f}", f"{err.mean():.4f}")
    console.print(table)


def _interhand(root: Path, console: Console) -> np.ndarray:
    """Returns the right-hand joints of the first sample in its camera frame, metres: (21, 3)."""
    folder = root / "real" / "interhand2.6m"
    cams = json.loads((folder / "test_interhand2.6m_camera.json").read_text())
    joints = json.loads((folder / "test_interhand2.6m_joint_3d.json").read_text())
    data = json.loads((folder / "test_interhand2.6m_data.json").read_text())
    table = Table(title="2. InterHand2.6M: world → camera → pixels, against the annotated hand box")
    for col in ("image", "valid joints", "inside box", "visible", "depth range (m)"):
        table.add_column(col)
    first = None
    for im, ann in zip(data["images"], data["annotations"]):
        cap, cam_id = str(im["capture"]), im["camera"]
        R = np.asarray(cams[cap]["camrot"][cam_id], float)
        campos = np.asarray(cams[cap]["campos"][cam_id], float) / 1000.0
        K = intrinsics_matrix(cams[cap]["focal"][cam_id], cams[cap]["princpt"][cam_id])
        j = joints[cap][str(im["frame_idx"])]
        world = np.asarray(j["world_coord"], float) / 1000.0
        valid = np.asarray(j["joint_valid"], bool)[:, 0] & np.asarray(ann["joint_valid"], bool)[:, 0]
        cam_pts = world_to_camera(world, R, -R @ campos)  # the dataset's camrot @ (X - campos)
        uv, vis = visibility(cam_pts, K, image_hw=(im["height"], im["width"]))
        x, y, w, h = ann["bbox"]
        u, v = uv[valid, 0], uv[valid, 1]
        inside = (u >= x) & (u <= x + w) & (v >= y) & (v <= y + h)
        z = cam_pts[valid, 2]
        table.add_row(
            im["file_name"],
            str(int(valid.sum())),
            f"{int(inside.sum())}/{int(valid.sum())}",
            f"{int(vis[valid].sum())}/{int(valid.sum())}",
            f"{z.min():.3f}–{z.max():.3f}",
        )
        if first is None and valid[:21].all():
            first = (cam_pts[:21], K, (im["height"], im["width"]))
    console.print(table)
    return first


def _read_pose_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """HOT3D `*_trajectory.csv` → (device→world rotations (T, 3, 3), translations (T, 3))."""
    from scipy.spatial.transform import Rotation

    with open(path) as f:
        rows = list(csv.DictReader(f))
    t = np.array([[float(r[f"t_wo_{a}[m]"]) for a in "xyz"] for r in rows])
    q = np.array([[float(r[f"q_wo_{a}"]) for a in "xyzw"] for r in rows])  # scipy wants scalar last
    return Rotation.from_quat(q).as_matrix(), t


def _hot3d(root: Path, console: Console) -> list[tuple[str, dict, str]]:
    """Camera and wrist motion in words on the real Quest3 sequence; returns (question kind, target, text)."""
    seq = root / "real" / "hot3d" / "Quest3" / "P0002_273c2819"
    R_wd, t_wd = _read_pose_csv(seq / "headset_trajectory.csv")
    # The headset frame stands in for the camera here (the Quest3 cameras are fisheye; the device
    # trajectory is what carries the head motion). world→camera is the inverse of device→world.
    R_cw = np.transpose(R_wd, (0, 2, 1))
    t_cw = -np.einsum("tij,tj->ti", R_cw, t_wd)
    motion = relative_camera_motion(R_cw[0], t_cw[0], R_cw[-1], t_cw[-1])

    wrists = []
    for line in (seq / "mano_hand_pose_trajectory.jsonl").read_text().splitlines():
        hand = json.loads(line)["hand_poses"].get("1")  # "1" = right hand
        if hand is not None:
            wrists.append(hand["wrist_xform"]["t_xyz"])
    wrist_w = np.asarray(wrists, float)
    wrist_c = world_to_camera(wrist_w, R_cw[0], t_cw[0])  # in the first frame's camera
    move = describe_displacement(wrist_c[-1] - wrist_c[0])

    tok = MotionTokenizer()
    enc = tok.encode(wrist_c)
    back = tok.decode_text(enc.text).xyz
    table = Table(title=f"3. HOT3D Quest3 ({len(R_wd)} headset poses, {len(wrist_w)} right-wrist poses)")
    table.add_column("what")
    table.add_column("result")
    table.add_row("camera motion, first → last frame", motion.text)
    table.add_row("camera translation", motion.translation.text)
    table.add_row("right wrist movement (camera frame of frame 0)", move.text)
    table.add_row("motion tokens", f"{len(enc.ids)} ids, clipped per axis {enc.clipped.tolist()}")
    table.add_row("token text (start)", enc.text[:80] + "…")
    err = np.abs(back - np.clip(wrist_c, tok.config.low, tok.config.high)).max()
    table.add_row("decode max |Δ| (half a bin = 0.49 mm)", f"{err * 1000:.3f} mm")
    console.print(table)
    return [
        ("camera movement", target_from_camera_motion(motion), motion.text),
        ("hand movement", target_from_description(move), move.text),
    ]


def _calibration(first, console: Console) -> None:
    joints_c, K, (h, w) = first
    rng = np.random.default_rng(0)
    # A metric depth map: a wall 0.3 m behind the hand, the hand's own depth at its joint pixels,
    # and a 40×40 px box-shaped object standing 0.1 m in front of the wall.
    wall = float(joints_c[:, 2].max()) + 0.3
    depth = np.full((h, w), wall)
    uv, _ = project(joints_c, K)
    rows, cols = np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)
    depth[rows, cols] = joints_c[:, 2]
    r0, c0 = h // 4, w // 4
    depth[r0 : r0 + 40, c0 : c0 + 40] = wall - 0.1
    truth = backproject_depth(depth, K)[r0 + 20, c0 + 20]  # the object's visible-surface centre
    true_scale = 2.7
    cloud = backproject_depth(depth, K) / true_scale  # an estimator's relative cloud
    bad = rng.random((h, w)) < 0.3
    cloud[bad] = rng.choice([np.nan, 0.0, -1.0, 50.0], size=(int(bad.sum()), 1))
    res = calibrate_scale(joints_c, cloud, K)
    table = Table(title="4. Scale calibration s = median(z_joint / z_cloud), 30 % of cloud pixels corrupted")
    table.add_column("what")
    table.add_column("result")
    table.add_row("true scale", f"{true_scale:.4f}")
    table.add_row("recovered scale", f"{res.scale:.4f}" if res.scale else f"none ({res.reason})")
    table.add_row("|Ω| (joints used)", str(res.num_valid))
    box = [c0 - 6, r0 - 6, c0 + 46, r0 + 46]  # a loose detector box: wall pixels inside it too
    loc = localize_object(box, cloud, scale=res.scale)
    if loc.xyz is None:
        table.add_row("object from its box", f"no position: {loc.reason}")
    else:
        err_cm = 100 * float(np.linalg.norm(loc.xyz - truth))
        table.add_row(
            "object from its box (calibrated)", f"{np.round(loc.xyz, 3).tolist()} m, {loc.num_pixels} px"
        )
        table.add_row("object, ground truth", f"{np.round(truth, 3).tolist()} m (error {err_cm:.2f} cm)")
    console.print(table)


def _metrics(qa: list[tuple[str, dict, str]], console: Console) -> None:
    kinds, targets, truths = zip(*qa)
    answers = {
        "the ground-truth text itself": list(truths),
        "a plausible free-form answer": ["the camera turns left by about 20 degrees", "left, about 30 cm"],
        "an unparseable answer": ["I cannot tell.", "hard to say"],
    }
    table = Table(title="5. Hand3D-test metrics on free-form answers")
    for col in ("answers", "direction score (of 3)", "distance err (m)", "angle err (deg)", "unparseable"):
        table.add_column(col)
    for name, preds in answers.items():
        res = evaluate_answers(list(preds), list(targets), list(kinds))["overall"]

        def fmt(x):
            return "–" if x is None else f"{x:.3f}"

        table.add_row(
            name,
            fmt(res["direction_score"]),
            fmt(res["distance_error_m"]),
            fmt(res["angle_error_deg"]),
            str(res["n_unparseable"]),
        )
    console.print(table)


def run_walkthrough(fixtures: Path | None = None) -> int:
    """Runs the tour; returns a process exit code (0 also when fixtures are absent: it says so)."""
    root = Path(fixtures) if fixtures is not None else DEFAULT_FIXTURES
    console = Console() if sys.stdout.isatty() else Console(width=110)
    if not (root / "real").is_dir():
        console.print(
            f"[yellow]No fixtures at {root}[/]: the walkthrough needs the real samples "
            "(real/rhd, real/interhand2.6m, real/hot3d); pass --fixtures DIR."
        )
        return 0
    console.rule("Hand3D geometry walkthrough (paper §3.2.1) on real samples")
    _rhd(root, console)
    first = _interhand(root, console)
    qa = _hot3d(root, console)
    if first is not None:
        _calibration(first, console)
    _metrics(qa, console)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixtures", type=Path, default=None, help="folder holding real/ (default ../shared/fixtures)"
    )
    return run_walkthrough(parser.parse_args(argv).fixtures)


if __name__ == "__main__":
    sys.exit(main())
