"""Hand3D-test metrics on hand-written answers with scores worked out by hand, and parse-back properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from hand3d_dataset.language import describe_displacement, relative_camera_motion
from hand3d_dataset.metrics import (
    evaluate_answers,
    parse_answer,
    score_answer,
    target_from_camera_motion,
    target_from_description,
)

LDF = {"labels": {"x": "left", "y": "down", "z": "forward"}, "distance_m": 0.44}
RIGHT = {"labels": {"x": "right", "y": None, "z": None}, "distance_m": 0.32}
STILL = {"labels": {"x": None, "y": None, "z": None}, "distance_m": 0.0}


# (answer, target, direction score, |distance error| in m (unparseable = 0 m answer), distance parsed?)
CASES = [
    ("left and slightly down, forward; about 44 cm", LDF, 3, 0.0, True),
    ("Left, down and forward, 0.44m", LDF, 3, 0.0, True),
    ("0.44m", LDF, 0, 0.0, True),  # no direction words: unparseable direction, scored 0
    ("440 mm", LDF, 0, 0.0, True),
    ("right and up, 0.5 m", LDF, 0, 0.06, True),  # x, y wrong; z: said nothing vs forward
    ("left and down", LDF, 2, 0.44, False),  # z missing; no number counts as 0 m
    ("The hand is to the right of the mug, roughly 0.3 meters away", RIGHT, 3, 0.02, True),
    ("to the right and above the mug, 30 cm", RIGHT, 2, 0.02, True),
    ("no significant movement", STILL, 3, 0.0, True),
    ("no significant movement", RIGHT, 2, 0.32, True),  # y and z right (None); says 0 m
    ("it is above", {"labels": {"x": None, "y": "up", "z": None}, "distance_m": 0.1}, 3, 0.1, False),
    ("below, 1 ft", {"labels": {"x": None, "y": "down", "z": None}, "distance_m": 0.3}, 3, 0.0048, True),
    (
        "towards the camera by 10 cm",
        {"labels": {"x": None, "y": None, "z": "backward"}, "distance_m": 0.1},
        3,
        0,
        True,
    ),
    (
        "away from the camera, 2 inches",
        {"labels": {"x": None, "y": None, "z": "forward"}, "distance_m": 0.05},
        3,
        0.0008,
        True,
    ),
    (
        "closer and lower",
        {"labels": {"x": None, "y": "down", "z": "backward"}, "distance_m": 0.2},
        3,
        0.2,
        False,
    ),
    (
        "farther and to the left",
        {"labels": {"x": "left", "y": None, "z": "forward"}, "distance_m": 0.2},
        3,
        0.2,
        False,
    ),
    (
        "move left and right, 0.2 m",
        {"labels": {"x": "left", "y": None, "z": None}, "distance_m": 0.2},
        2,
        0.0,
        True,
    ),
    (
        "pick up the cup: move left 20 cm",
        {"labels": {"x": "left", "y": None, "z": None}, "distance_m": 0.2},
        3,
        0.0,
        True,
    ),
    ("I cannot tell.", LDF, 0, 0.44, False),
]


@pytest.mark.parametrize("answer, target, score, err, parsed", CASES, ids=[c[0][:40] for c in CASES])
def test_hand_written_answers(answer, target, score, err, parsed):
    s = score_answer(answer, target)
    assert s["direction_score"] == score
    assert s["distance_error_m"] == pytest.approx(err, abs=1e-9)
    assert s["distance_parsed"] is parsed


@pytest.mark.parametrize(
    "text, metres",
    [
        ("0.44m", 0.44),
        ("440 mm", 0.44),
        ("44 cm", 0.44),
        ("about 0.3 meters", 0.3),
        ("1.5 metres", 1.5),
        ("12 centimeters", 0.12),
        (".5 m", 0.5),
        ("3 feet", 0.9144),
        ("it takes 5 minutes", None),
    ],
)
def test_lengths(text, metres):
    d = parse_answer(text).distance_m
    assert d == pytest.approx(metres) if metres is not None else d is None


@pytest.mark.parametrize(
    "text, label, degrees",
    [
        ("turn left, 12.4 degrees", "turn left", 12.4),
        ("The camera pans to the right by about 8°", "turn right", 8.0),
        ("tilt up, 3.0 degrees", "tilt up", 3.0),
        ("tilts downward 5 deg", "tilt down", 5.0),
        ("roll clockwise, 2.5 degrees", "roll clockwise", 2.5),
        ("rolls counter-clockwise by 0.1 rad", "roll counterclockwise", np.degrees(0.1)),
        ("anticlockwise roll? no: rolled anticlockwise 4 degrees", "roll counterclockwise", 4.0),
        ("no significant rotation", None, 0.0),
    ],
)
def test_camera_answers(text, label, degrees):
    p = parse_answer(text)
    assert p.rotation_found and p.rotation == label
    assert p.angle_deg == pytest.approx(degrees)
    assert p.labels is None  # "turn left" is a rotation, not a leftward displacement


def test_aggregation_by_hand():
    preds = [
        "left and slightly down, forward; about 44 cm",  # 3, err 0
        "right, 0.5 m",  # x wrong, y (None vs down) wrong, z (None vs forward) wrong: 0, err 0.06
        "no idea",  # unparseable: 0, err = 0.44 (as a 0 m answer)
        "turn left, 10 degrees",  # camera: correct, err 2.4 deg
        "tilt up",  # camera: wrong words, no angle: err 12.4 deg
    ]
    cam = {"rotation": "turn left", "angle_deg": 12.4}
    targets = [LDF, LDF, LDF, cam, cam]
    tasks = ["hand_movement", "hand_movement", "spatial_relationship", "camera_movement", "camera_movement"]
    r = evaluate_answers(preds, targets, tasks)
    o = r["overall"]
    assert o["n"] == 5 and o["n_direction"] == 3 and o["n_rotation"] == 2
    assert o["direction_score"] == pytest.approx(1.0)  # (3 + 0 + 0) / 3
    assert o["axis_accuracy"] == pytest.approx({"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})
    assert o["distance_error_m"] == pytest.approx((0 + 0.06 + 0.44) / 3)
    assert o["distance_error_m_parsed"] == pytest.approx(0.03)
    assert o["n_unparseable_direction"] == 1 and o["n_unparseable_distance"] == 1
    assert o["rotation_accuracy"] == pytest.approx(0.5)
    assert o["angle_error_deg"] == pytest.approx((2.4 + 12.4) / 2)
    assert o["angle_error_deg_parsed"] == pytest.approx(2.4)
    assert o["n_unparseable_angle"] == 1 and o["n_unparseable_rotation"] == 0
    assert o["n_unparseable"] == 2
    hm = r["per_task"]["hand_movement"]
    assert hm["n"] == 2 and hm["direction_score"] == pytest.approx(1.5)
    assert hm["distance_error_m"] == pytest.approx(0.03) and hm["n_unparseable"] == 0
    assert r["per_task"]["spatial_relationship"]["direction_score"] == 0.0
    assert r["per_task"]["camera_movement"]["direction_score"] is None
    assert len(r["samples"]) == 5


def test_no_task_types():
    r = evaluate_answers(
        ["left, 1 m"], [{"labels": {"x": "left", "y": "none", "z": None}, "distance_m": 1.0}]
    )
    assert r["per_task"] == {} and r["overall"]["direction_score"] == 3.0


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(*[st.floats(-2, 2, allow_nan=False)] * 3),
    st.floats(0.05, 0.95),
)
def test_canonical_displacement_answers_parse_back(v, gamma):
    v = np.array(v)
    assume(np.linalg.norm(v) > 1e-6)
    d = describe_displacement(v, gamma)
    p = parse_answer(d.text)
    assert p.labels == d.labels
    assert p.distance_m == pytest.approx(float(np.linalg.norm(v)), abs=0.005 + 1e-12) or all(
        lab is None for lab in d.labels.values()
    )
    s = score_answer(d.text, target_from_description(d))
    assert s["direction_score"] == 3
    assert s["distance_error_m"] <= 0.005 + 1e-12 or all(lab is None for lab in d.labels.values())


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_canonical_camera_answers_parse_back(seed):
    rng = np.random.default_rng(seed)
    r1 = Rotation.random(random_state=rng)
    rel = Rotation.from_rotvec(rng.normal(size=3) * rng.uniform(0.0, 0.8))
    r2 = rel.inv() * r1
    m = relative_camera_motion(r1.as_matrix(), rng.normal(size=3), r2.as_matrix(), rng.normal(size=3))
    p = parse_answer(m.text)
    # the dominant component of scipy's rotvec, by hand, gives the words
    rv = (r1 * r2.inv()).as_rotvec(degrees=True)
    i = int(np.argmax(np.abs(rv)))
    words = [
        ("tilt down", "tilt up"),
        ("turn left", "turn right"),
        ("roll counterclockwise", "roll clockwise"),
    ]
    expected = words[i][int(rv[i] > 0)] if np.linalg.norm(rv) >= 1.0 else None
    assert p.rotation_found and p.rotation == expected
    if expected is not None:
        assert p.angle_deg == pytest.approx(np.linalg.norm(rv), abs=0.05 + 1e-9)
    s = score_answer(m.text, target_from_camera_motion(m))
    assert s["rotation_correct"] == 1


@pytest.mark.parametrize(
    "preds, targets, tasks, match",
    [
        (["a"], [LDF, LDF], None, "lengths differ"),
        (["a"], [LDF], ["x", "y"], "task_types"),
        ("left", [LDF], None, "predictions"),
        ([3.0], [LDF], None, r"predictions\[0\]"),
        (["a"], [{"foo": 1}], None, r"targets\[0\]"),
        (
            ["a"],
            [{"labels": {"x": "up", "y": None, "z": None}, "distance_m": 1}],
            None,
            r"targets\[0\]\['labels'\]\['x'\]",
        ),
        (["a"], [{"labels": {"x": None, "y": None}, "distance_m": 1}], None, "missing axis 'z'"),
        (["a"], [{"labels": {"x": None, "y": None, "z": None}, "distance_m": -1}], None, "distance_m"),
        (
            ["a"],
            [{"labels": {"x": None, "y": None, "z": None}, "distance_m": float("nan")}],
            None,
            "distance_m",
        ),
        (["a"], [{"labels": {"x": None, "y": None, "z": None}}], None, "distance_m"),
        (["a"], [{"rotation": "spin", "angle_deg": 1}], None, "rotation"),
        (["a"], [{"rotation": "turn left"}], None, "angle_deg"),
    ],
)
def test_bad_input(preds, targets, tasks, match):
    with pytest.raises(ValueError, match=match):
        evaluate_answers(preds, targets, tasks)


def test_targets_through_a_parquet_struct_column():
    # Published targets are one struct column: every row gets the union of keys, missing ones as None.
    import pyarrow as pa

    cam = {"rotation": "turn left", "angle_deg": 12.4}
    still_cam = {"rotation": None, "angle_deg": 0.3}
    rows = pa.Table.from_pylist([{"target": LDF}, {"target": cam}, {"target": still_cam}]).to_pylist()
    targets = [r["target"] for r in rows]
    assert targets[0]["rotation"] is None and targets[1]["labels"] is None  # the union really happened
    r = evaluate_answers(
        ["left, down, forward, 44 cm", "turn left, 12.4 degrees", "no significant rotation"], targets
    )
    o = r["overall"]
    assert o["n_direction"] == 1 and o["n_rotation"] == 2
    assert o["direction_score"] == 3.0 and o["distance_error_m"] == pytest.approx(0.0)
    assert o["rotation_accuracy"] == 1.0 and o["angle_error_deg"] == pytest.approx(0.15)


def test_camera_row_with_struct_padding_is_scored_as_a_camera_target():
    # Rows read back from parquet carry the union of struct keys: a camera row has all-None labels.
    target = {
        "labels": {"x": None, "y": None, "z": None},
        "distance_m": None,
        "rotation": "turn left",
        "angle_deg": 12.0,
    }
    res = evaluate_answers(["turn left, 10 degrees"], [target])["overall"]
    assert res["rotation_accuracy"] == 1.0 and abs(res["angle_error_deg"] - 2.0) < 1e-9
    assert res["n_direction"] == 0
    # ...while "no significant movement" (all-None labels WITH a distance) stays a displacement target.
    still = {"labels": {"x": None, "y": None, "z": None}, "distance_m": 0.01}
    assert evaluate_answers(["no significant movement"], [still])["overall"]["direction_score"] == 3.0
