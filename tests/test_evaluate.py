"""Hand3D-test evaluation (hand3d_dataset/scoring.py, evaluation/hand3d_test.py, `hand3d evaluate`) on a tiny synth Hand3D built by
`hand3d build`: ground-truth answers score perfectly, the trivial baseline scores what numpy by hand says,
motion metrics match numpy on hand-made token texts, and a tiny random model runs end to end through the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from evaluation.hand3d_test import evaluate_model
from hand3d_dataset.atomic import write_json
from hand3d_dataset.cli import main
from hand3d_dataset.scoring import (
    MOTION_TASK_TYPES,
    evaluate_predictions,
    load_rows,
    motion_metrics,
    trivial_baseline_predictions,
)

AXES = ("x", "y", "z")
# The motion box of DESIGN.md §3, written out here rather than read from the tokenizer.
LOW, HIGH, BINS = np.array([-0.5, -0.5, 0.0]), np.array([0.5, 0.5, 1.0]), 1024
WIDTH = (HIGH - LOW) / BINS


def _centres(ids) -> np.ndarray:
    return LOW + (np.asarray(ids).reshape(-1, 3) + 0.5) * WIDTH


def _tokens(ids) -> str:
    return "<motion>" + "".join(f"<motion_{i}>" for i in ids) + "</motion>"


def _answer(row) -> str:
    return row["messages"][-1]["content"][0]["text"]


@pytest.fixture(scope="module")
def hand3d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hand3d")
    args = ["build", "--source", "synth", "--num-clips", "6", "--out", str(out), "--image-size", "64"]
    # 6 frames so that contextual motion prediction (3 past frames + a future) has samples
    args += ["--frames", "6", "--test-fraction", "0.5", "--no-progress"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def rows(hand3d):
    return {(c, s): load_rows(hand3d, c, s) for c in ("visual", "action") for s in ("train", "test")}


def _tiny_model(with_motion: bool):
    from tests.tiny_assets import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    if with_motion:
        from modeling_vipa.modeling_vipa import add_motion_tokens

        add_motion_tokens(model, processor)
    return model, processor


def test_ground_truth_answers_score_perfectly(rows) -> None:
    test = rows["visual", "test"] + rows["action", "test"]
    kinds = Counter(r["task_type"] for r in test)
    assert kinds["camera_movement"] and all(kinds[t] for t in MOTION_TASK_TYPES), kinds
    res = evaluate_predictions([_answer(r) for r in test], test)
    text = res["text"]["overall"]
    assert text["direction_score"] == 3.0
    assert text["n_unparseable"] == 0
    # answers state distances to 2 decimals and angles to 1
    assert text["distance_error_m"] <= 0.005 + 1e-9
    assert text["rotation_accuracy"] == 1.0 and text["angle_error_deg"] <= 0.05 + 1e-9
    assert res["text"]["per_task"]["camera_movement"]["n_rotation"] == kinds["camera_movement"]
    motion = res["motion"]["overall"]
    assert motion["n"] == sum(kinds[t] for t in MOTION_TASK_TYPES)
    assert motion["decodable_fraction"] == 1.0 and motion["n_strict"] == motion["n"]
    assert motion["n_length_mismatch"] == 0
    half_diagonal = float(np.linalg.norm(WIDTH)) / 2  # quantisation error bound of a bin centre
    assert motion["waypoint_error_m"] <= half_diagonal and motion["final_error_m"] <= half_diagonal


def test_trivial_baseline_matches_numpy_by_hand(rows) -> None:
    train = rows["visual", "train"] + rows["action", "train"]
    test = rows["visual", "test"] + rows["action", "test"]
    preds = trivial_baseline_predictions(train, test)
    res = evaluate_predictions(preds, test)

    def most_frequent(values):  # ties: first seen in training order, as documented
        counts: dict = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        return max(counts, key=lambda v: (counts[v], -list(counts).index(v)))

    scores, errors, per_task, rot_ok, angle_err, wp_err, final_err = [], [], {}, [], [], [], []
    for tt in dict.fromkeys(r["task_type"] for r in test):
        tr = [r for r in train if r["task_type"] == tt]
        te = [r for r in test if r["task_type"] == tt]
        if tt in MOTION_TASK_TYPES:
            trajs = [np.array(r["trajectory"]) for r in tr]
            T = int(np.median([len(t) for t in trajs]))
            mean = np.array([np.mean([t[k] for t in trajs if len(t) > k], axis=0) for k in range(T)])
            pred = _centres(np.clip(np.floor((mean - LOW) / WIDTH), 0, BINS - 1).astype(int))
            for r in te:
                g = np.array(r["trajectory"])
                n = min(len(g), len(pred))
                wp_err.append(np.linalg.norm(pred[:n] - g[:n], axis=1).mean())
                final_err.append(np.linalg.norm(pred[-1] - g[-1]))
            continue
        if tt == "camera_movement":
            label = most_frequent([r["target"]["rotation"] for r in tr])
            angle = round(float(np.mean([r["target"]["angle_deg"] for r in tr])), 1)
            rot_ok += [r["target"]["rotation"] == label for r in te]
            angle_err += [abs(angle - r["target"]["angle_deg"]) for r in te]
            continue
        labels = {ax: most_frequent([r["target"]["labels"][ax] for r in tr]) for ax in AXES}
        dist = round(float(np.mean([r["target"]["distance_m"] for r in tr])), 3)
        s = [sum(labels[ax] == r["target"]["labels"][ax] for ax in AXES) for r in te]
        e = [abs(dist - r["target"]["distance_m"]) for r in te]
        per_task[tt] = (np.mean(s), np.mean(e))
        scores += s
        errors += e

    text = res["text"]
    assert text["overall"]["direction_score"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert text["overall"]["distance_error_m"] == pytest.approx(np.mean(errors), abs=1e-9)
    assert text["overall"]["n_unparseable"] == 0  # the baseline always answers in canonical form
    for tt, (s, e) in per_task.items():
        assert text["per_task"][tt]["direction_score"] == pytest.approx(s, abs=1e-12), tt
        assert text["per_task"][tt]["distance_error_m"] == pytest.approx(e, abs=1e-9), tt
    assert text["per_task"]["camera_movement"]["rotation_accuracy"] == pytest.approx(np.mean(rot_ok))
    assert text["per_task"]["camera_movement"]["angle_error_deg"] == pytest.approx(
        np.mean(angle_err), abs=1e-9
    )
    motion = res["motion"]["overall"]
    assert motion["decodable_fraction"] == 1.0
    assert motion["waypoint_error_m"] == pytest.approx(np.mean(wp_err), abs=1e-12)
    assert motion["final_error_m"] == pytest.approx(np.mean(final_err), abs=1e-12)


def test_motion_metrics_against_numpy_on_hand_made_predictions() -> None:
    rng = np.random.default_rng(3)
    gts = [rng.uniform([-0.3, -0.3, 0.2], [0.3, 0.3, 0.8], size=(n, 3)) for n in (4, 3, 5, 4, 2)]
    ids_a = rng.integers(0, BINS, size=6)  # 2 waypoints against 4: a length mismatch
    ids_b = rng.integers(0, BINS, size=9)  # 3 against 3, written with prose around and no closing token
    ids_c = rng.integers(0, BINS, size=7)  # 2 full triplets + an incomplete one (dropped), against 5
    preds = [
        _tokens(ids_a),
        "Sure: <motion>" + "".join(f"<motion_{i}>" for i in ids_b),
        _tokens(ids_c),
        "the hand moves left, 0.2 m",  # no motion token at all: undecodable
        "<motion><motion_5000><motion_1><motion_2></motion>",  # only triplet out of range: undecodable
    ]
    res = motion_metrics(preds, gts, ["a", "a", "b", "b", "b"])
    expect = []
    for ids, g in ((ids_a, gts[0]), (ids_b, gts[1]), (ids_c[:6], gts[2])):
        p = _centres(ids)
        n = min(len(p), len(g))
        expect.append((np.linalg.norm(p[:n] - g[:n], axis=1).mean(), np.linalg.norm(p[-1] - g[-1]), len(p)))
    o = res["overall"]
    assert (o["n"], o["n_decodable"], o["n_strict"]) == (5, 3, 1)
    assert o["decodable_fraction"] == pytest.approx(0.6)
    assert o["waypoint_error_m"] == pytest.approx(np.mean([e[0] for e in expect]), abs=1e-12)
    assert o["final_error_m"] == pytest.approx(np.mean([e[1] for e in expect]), abs=1e-12)
    assert o["n_length_mismatch"] == 2  # a: 2 vs 4, c: 2 vs 5; b matches
    assert o["mean_abs_length_diff"] == pytest.approx((2 + 0 + 3) / 3)
    b = res["per_task"]["b"]
    assert (b["n"], b["n_decodable"]) == (3, 1)
    assert b["waypoint_error_m"] == pytest.approx(expect[2][0], abs=1e-12)
    with pytest.raises(ValueError, match="trajectories\\[0\\]"):
        motion_metrics(["<motion></motion>"], [np.zeros((0, 3))])
    with pytest.raises(ValueError, match="lengths differ"):
        motion_metrics(["x", "y"], [np.zeros((2, 3))])


def test_cli_tiny_random_model_end_to_end(tmp_path, hand3d) -> None:
    from hand3d_dataset.metrics import parse_answer

    model, processor = _tiny_model(with_motion=True)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    processor.save_pretrained(str(ckpt))
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(ckpt), "--data", str(hand3d), "--config", "both", "--limit", "3"]
    args += ["--batch-size", "2", "--max-new-tokens", "6", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["configs"]) == {"visual", "action"} and result["split"] == "test"
    visual = result["configs"]["visual"]
    assert visual["n"] == 3 and len(visual["text"]["samples"]) == 3
    # unparseable answers are counted, not dropped: recount from the stored predictions with the parser
    expected = 0
    for row, s in zip(load_rows(hand3d, "visual", "test", limit=3), visual["text"]["samples"]):
        p = parse_answer(s["prediction"])
        if row["target"]["distance_m"] is not None:
            expected += p.labels is None or p.distance_m is None
        else:
            expected += not p.rotation_found or p.angle_deg is None
    assert visual["text"]["overall"]["n_unparseable"] == expected
    assert visual["summary"]["n_unparseable"] == expected
    motion = result["configs"]["action"]["motion"]
    assert motion is not None and motion["overall"]["n"] >= 1
    assert 0.0 <= motion["overall"]["decodable_fraction"] <= 1.0
    for name in ("figure8.png", "figure9.png"):
        with PIL.Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files


def test_bad_input_is_a_clear_error(tmp_path, hand3d, capsys) -> None:
    model, processor = _tiny_model(with_motion=False)
    with pytest.raises(ValueError, match="split 'validation'"):
        load_rows(hand3d, "visual", "validation")
    with pytest.raises(ValueError, match="config"):
        load_rows(hand3d, "depth", "test")
    with pytest.raises(ValueError, match="no dataset folder"):
        load_rows(tmp_path / "missing", "visual", "test")
    with pytest.raises(ValueError, match="no motion tokens"):
        evaluate_model(model, processor, hand3d, config="action", progress=False)
    res = evaluate_model(model, processor, hand3d, config="auto", limit=1, max_new_tokens=2, progress=False)
    assert set(res["configs"]) == {"visual"} and "no motion tokens" in res["skipped"]["action"]
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(hand3d), "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lengths differ"):
        evaluate_predictions(["a"], load_rows(hand3d, "visual", "test", limit=2))


def test_write_json_is_atomic_and_refuses_nan(tmp_path) -> None:
    path = write_json({"a": np.float64(1.5), "b": np.arange(2)}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1]}
    with pytest.raises(ValueError):
        write_json({"a": float("nan")}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1]}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
