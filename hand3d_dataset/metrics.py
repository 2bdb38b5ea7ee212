"""Hand3D-test metrics: direction score (0-3) and distance error in metres (paper §4, Table 8).

Free-form answers are parsed into per-axis direction labels, a distance and, for camera-movement
answers, rotation words and degrees; ground truth is structured and never parsed from text.

    >>> from hand3d_dataset.metrics import evaluate_answers
    >>> target = {"labels": {"x": "left", "y": "down", "z": "forward"}, "distance_m": 0.44}
    >>> r = evaluate_answers(["left and slightly down, forward; about 40 cm"], [target])
    >>> r["overall"]["direction_score"], round(r["overall"]["distance_error_m"], 3)
    (3.0, 0.04)

Scoring (the paper: "each axis contributes a binary score of 0 or 1"; "average prediction error in
meters"):

- direction score per sample = number of axes (x, y, z) whose predicted label equals the
  ground-truth label, where "no label" is a label too; so "left" against (left, None, None) scores 3.
- An answer with no direction words at all (and no "no movement" phrase) is *unparseable* for
  direction: it scores 0 and is counted in `n_unparseable_direction`, never dropped.
- An answer with no length is unparseable for distance. It enters `distance_error_m` as if it had
  answered 0 m (error = the ground-truth distance): a model must not gain by omitting numbers. The
  mean over the parseable ones alone is `distance_error_m_parsed`. An answer that says "no
  significant movement" without a number has answered 0 m and is parseable.
- Camera-movement targets score `rotation_accuracy` (predicted rotation words equal the truth's;
  "no significant rotation" is a label too) and `angle_error_deg`, with the same unparseable
  policy (a missing angle counts as 0 degrees).

Synonym table (lower-cased, whole words; DESIGN.md §2 axes, camera frame):

| label    | accepted words                                                                             |
|----------|--------------------------------------------------------------------------------------------|
| right    | right, rightward(s)                                                                        |
| left     | left, leftward(s)                                                                          |
| up       | up, upward(s), above, higher, upper, raise(d/s), lift(ed/s)                                |
| down     | down, downward(s), below, beneath, under, underneath, lower (also the verb)                |
| forward  | forward(s), away from the camera/viewer, farther/further (from), deeper, behind             |
| backward | backward(s), toward(s) the camera/viewer, closer, nearer, in front (of)                    |
| none     | "no (significant) movement/motion/displacement", "does not move", "stationary", "static"   |

"behind X" / "in front of X" read as depth from the camera (behind = farther = forward), the
standard reading of an egocentric view; "closer"/"farther" read as towards/away from the camera even
when another object follows ("closer to the mug"), because Hand3D answers state offsets in the
camera frame. Idioms that carry a direction word but no direction are removed first: "pick up",
"up to", "right now", "all right", "right away", "right after/before", "set/put down". When both
words of an axis occur ("left ... right"), the axis counts as wrong. Rotation phrases are read
before, and removed from, the direction text: "turn/pan/yaw/rotate (to the) left/right",
"tilt/pitch up/down", "roll (counter/anti-)clockwise". Lengths: m, metre(s)/meter(s), cm,
centimetre(s), mm, millimetre(s), inch(es), ft/foot/feet; when several lengths occur, the first is
used. Angles: deg, degree(s), °, rad, radian(s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from .language import AXES, AXIS_LABELS, LABEL_AXIS, ROTATION_AXIS

# Regex for each direction label; applied after idioms and rotation phrases are blanked out.
DIRECTION_SYNONYMS: dict[str, str] = {
    "right": r"\bright(?:wards?)?\b",
    "left": r"\bleft(?:wards?)?\b",
    "up": r"\bup(?:wards?)?\b|\babove\b|\bhigher\b|\bupper\b|\brais(?:e|es|ed|ing)\b|\blift(?:s|ed|ing)?\b",
    "down": r"\bdown(?:wards?)?\b|\bbelow\b|\bbeneath\b|\bunder(?:neath)?\b|\blower(?:s|ed|ing)?\b",
    "forward": (
        r"\bforwards?\b|\baway\s+from\s+(?:the\s+)?(?:camera|viewer)\b|\bdeeper\b|\bbehind\b"
        r"|\b(?:farther|further)\b(?!\s+(?:to\s+the\s+)?(?:left|right|up|down|above|below|forward|backward))"
    ),
    "backward": (
        r"\bbackwards?\b|\btowards?\s+(?:the\s+)?(?:camera|viewer)\b|\bcloser\b|\bnearer\b|\bin\s+front\b"
    ),
}
# the synonym table covers exactly the label vocabulary of language.py
assert set(DIRECTION_SYNONYMS) == set(LABEL_AXIS), "DIRECTION_SYNONYMS out of sync with AXIS_LABELS"
NO_MOVEMENT_PATTERN = (
    r"\bno\s+(?:significant\s+|noticeable\s+|notable\s+|real\s+)?(?:movement|motion|displacement)\b"
    r"|\b(?:does|did)\s*n[o']t\s+move\b|\bstationary\b|\bstatic\b"
)
NO_ROTATION_PATTERN = r"\bno\s+(?:significant\s+|noticeable\s+)?rotation\b|\b(?:does|did)\s*n[o']t\s+rotate\b"
# Phrases with a direction word that say nothing about direction; blanked before label matching.
IDIOMS = (
    r"\bpick(?:s|ed|ing)?\s+(?:it\s+|them\s+)?up\b|\bup\s+to\b|\bright\s+(?:now|away|after|before)\b"
    r"|\ball\s+right\b|\b(?:set|put)(?:s|ting)?\s+(?:it\s+|them\s+)?down\b"
)
# (regex whose group 1 is the direction word, direction word -> rotation label); roll words are
# mapped in _rotation_label because of their spelling variants
_ROT_PATTERNS: tuple[tuple[str, dict[str, str]], ...] = (
    (
        r"\b(?:turn|pan|yaw|rotat)(?:s|ed|ing|e|es|ned|ning)?\s+(?:to\s+(?:the\s+)?)?(left|right)(?:wards?)?\b",
        {"left": "turn left", "right": "turn right"},
    ),
    (r"\b(?:tilt|pitch)(?:s|es|ed|ing)?\s+(up|down)(?:wards?)?\b", {"up": "tilt up", "down": "tilt down"}),
    (
        r"\b(?:roll|rotat)(?:s|ed|ing|e|es)?\s+(counter-?\s?clockwise|anti-?\s?clockwise|clockwise)\b",
        {"clockwise": "roll clockwise"},
    ),
)
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
# unit regex -> metres per unit; "m" must not swallow "mm", hence the order and the \b
_LENGTH_UNITS: tuple[tuple[str, float], ...] = (
    (r"mm|millimet(?:er|re)s?", 1e-3),
    (r"cm|centimet(?:er|re)s?", 1e-2),
    (r"m|met(?:er|re)s?", 1.0),
    (r"inch(?:es)?", 0.0254),
    (r"ft|foot|feet", 0.3048),
)
_LENGTH_RE = re.compile(
    _NUMBER + r"\s*(" + "|".join(u for u, _ in _LENGTH_UNITS) + r")\b", flags=re.IGNORECASE
)
_ANGLE_RE = re.compile(_NUMBER + r"\s*(°|degrees?\b|deg\b|radians?\b|rad\b)", flags=re.IGNORECASE)


@dataclass(frozen=True)
class ParsedAnswer:
    """What a free-form answer says.

    labels: axis -> label, None (no component) or "ambiguous" (both words of the axis occur, which
        scores 0 on that axis); None as a whole when no direction was found
    distance_m: the first length, metres; None when no length was found (0.0 for "no movement")
    rotation: rotation words (a `ROTATION_LABELS` entry), None for "no significant rotation";
        `rotation_found` tells the two Nones apart
    angle_deg: the first angle, degrees; None when none was found (0.0 for "no rotation")
    """

    labels: dict[str, str | None] | None
    distance_m: float | None
    rotation: str | None
    rotation_found: bool
    angle_deg: float | None


def _rotation_label(word: str, table: dict[str, str]) -> str:
    w = word.lower()
    if "clockwise" in w:
        return "roll clockwise" if w == "clockwise" else "roll counterclockwise"
    return table[w]


def parse_answer(text: str) -> ParsedAnswer:
    """Parses one free-form answer (see the module docstring for the synonym table)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    s = " " + text.lower().replace("\u2019", "'") + " "

    rotation: str | None = None
    rotation_found = False
    for pat, table in _ROT_PATTERNS:
        m = re.search(pat, s)
        if m and not rotation_found:
            rotation, rotation_found = _rotation_label(m.group(1), table), True
        s = re.sub(pat, " ", s)
    no_rot = re.search(NO_ROTATION_PATTERN, s) is not None
    if no_rot and not rotation_found:
        rotation, rotation_found = None, True
    s = re.sub(NO_ROTATION_PATTERN, " ", s)

    angle: float | None = None
    m = _ANGLE_RE.search(s)
    if m:
        v = float(m.group(1))
        angle = math.degrees(v) if m.group(2).lower().startswith("rad") else v
        s = s[: m.start()] + " " + s[m.end() :]
    elif no_rot:
        angle = 0.0

    distance: float | None = None
    m = _LENGTH_RE.search(s)
    if m:
        unit = m.group(2).lower()
        scale = next(f for u, f in _LENGTH_UNITS if re.fullmatch(u, unit))
        distance = float(m.group(1)) * scale
    s = _LENGTH_RE.sub(" ", s)

    s = re.sub(IDIOMS, " ", s)
    no_move = re.search(NO_MOVEMENT_PATTERN, s) is not None
    found = {lab: re.search(pat, s) is not None for lab, pat in DIRECTION_SYNONYMS.items()}
    labels: dict[str, str | None] | None
    if any(found.values()):
        labels = {}
        for ax in AXES:
            hits = [lab for lab in AXIS_LABELS[ax] if found[lab]]
            labels[ax] = hits[0] if len(hits) == 1 else (None if not hits else "ambiguous")
    elif no_move:
        labels = dict.fromkeys(AXES)
        if distance is None:
            distance = 0.0
    else:
        labels = None
    return ParsedAnswer(labels, distance, rotation, rotation_found, angle)


def _target_labels(i: int, target: Mapping) -> dict[str, str | None]:
    raw = target["labels"]
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"targets[{i}]['labels']: expected a mapping axis -> label, got {type(raw).__name__}"
        )
    out: dict[str, str | None] = {}
    for ax in AXES:
        if ax not in raw:
            raise ValueError(f"targets[{i}]['labels']: missing axis {ax!r} (have {sorted(raw)})")
        lab = raw[ax]
        lab = None if lab in (None, "none", "") else lab
        if lab is not None and LABEL_AXIS.get(lab) != ax:
            raise ValueError(
                f"targets[{i}]['labels'][{ax!r}]: {lab!r} is not one of {AXIS_LABELS[ax]} or None"
            )
        out[ax] = lab
    return out


def _target_number(i: int, target: Mapping, key: str) -> float:
    try:
        v = float(target[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"targets[{i}][{key!r}]: expected a number, got {target[key]!r}") from e
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"targets[{i}][{key!r}]: must be finite and >= 0, got {v}")
    return v


def score_answer(prediction: str, target: Mapping, index: int = 0) -> dict:
    """Scores one answer against its structured ground truth.

    target: {"labels": {"x": "left"|"right"|None, "y": ..., "z": ...}, "distance_m": float} for
        displacement questions and/or {"rotation": ROTATION_LABELS entry or None, "angle_deg": float}
        for camera-movement questions; keys holding None count as absent (parquet structs), other
        keys are ignored and `text` is never read.
    Returns a per-sample dict with the parse and whichever scores apply.
    """
    if not isinstance(target, Mapping):
        raise ValueError(f"targets[{index}]: expected a dict, got {type(target).__name__}")
    # A key holding None counts as absent: parquet struct columns give every row the union of keys.
    # A parquet struct gives camera rows `labels={x: None, y: None, z: None}` beside `distance_m=None`:
    # all-None labels only make a displacement target together with a distance.
    labels = target.get("labels")
    labels_set = labels is not None and not (
        isinstance(labels, Mapping) and all(v in (None, "none", "") for v in labels.values())
    )
    has_disp = labels_set or target.get("distance_m") is not None
    has_rot = target.get("rotation") is not None or target.get("angle_deg") is not None
    if not (has_disp or has_rot):
        raise ValueError(
            f"targets[{index}]: needs 'labels' and 'distance_m' and/or 'rotation' and 'angle_deg', "
            f"got keys {sorted(target)}"
        )
    if not isinstance(prediction, str):
        raise ValueError(f"predictions[{index}]: expected a str, got {type(prediction).__name__}")
    p = parse_answer(prediction)
    out: dict = {"parsed": asdict(p)}
    if has_disp:
        for k in ("labels", "distance_m"):
            if target.get(k) is None:
                raise ValueError(
                    f"targets[{index}]: displacement targets need 'labels' and 'distance_m', missing {k!r}"
                )
        gt = _target_labels(index, target)
        d_gt = _target_number(index, target, "distance_m")
        axis_ok = {ax: p.labels is not None and p.labels[ax] == gt[ax] for ax in AXES}
        out.update(
            direction_parsed=p.labels is not None,
            axis_correct=axis_ok,
            direction_score=int(sum(axis_ok.values())),
            distance_parsed=p.distance_m is not None,
            # missing number = a 0 m answer, so omitting numbers never helps
            distance_error_m=abs((p.distance_m or 0.0) - d_gt),
        )
    if has_rot:
        if target.get("angle_deg") is None:
            raise ValueError(f"targets[{index}]: rotation targets need 'angle_deg' (got rotation only)")
        r_gt = target.get("rotation")
        r_gt = None if r_gt in (None, "none", "") else r_gt
        if r_gt is not None and r_gt not in ROTATION_AXIS:
            raise ValueError(
                f"targets[{index}]['rotation']: {r_gt!r} is not one of {sorted(ROTATION_AXIS)} or None"
            )
        a_gt = _target_number(index, target, "angle_deg")
        out.update(
            rotation_parsed=p.rotation_found,
            rotation_correct=int(p.rotation_found and p.rotation == r_gt),
            angle_parsed=p.angle_deg is not None,
            angle_error_deg=abs((p.angle_deg or 0.0) - a_gt),
        )
    return out


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _aggregate(samples: list[dict]) -> dict:
    disp = [s for s in samples if "direction_score" in s]
    rot = [s for s in samples if "rotation_correct" in s]
    agg: dict = {"n": len(samples), "n_direction": len(disp), "n_rotation": len(rot)}
    agg.update(
        direction_score=_mean([s["direction_score"] for s in disp]),
        direction_score_max=3,
        axis_accuracy={ax: _mean([float(s["axis_correct"][ax]) for s in disp]) for ax in AXES},
        distance_error_m=_mean([s["distance_error_m"] for s in disp]),
        distance_error_m_parsed=_mean([s["distance_error_m"] for s in disp if s["distance_parsed"]]),
        n_unparseable_direction=sum(not s["direction_parsed"] for s in disp),
        n_unparseable_distance=sum(not s["distance_parsed"] for s in disp),
        rotation_accuracy=_mean([float(s["rotation_correct"]) for s in rot]),
        angle_error_deg=_mean([s["angle_error_deg"] for s in rot]),
        angle_error_deg_parsed=_mean([s["angle_error_deg"] for s in rot if s["angle_parsed"]]),
        n_unparseable_rotation=sum(not s["rotation_parsed"] for s in rot),
        n_unparseable_angle=sum(not s["angle_parsed"] for s in rot),
    )
    agg["n_unparseable"] = sum(
        not (s.get("direction_parsed", True) and s.get("distance_parsed", True))
        or not (s.get("rotation_parsed", True) and s.get("angle_parsed", True))
        for s in samples
    )
    return agg


def evaluate_answers(
    predictions: Sequence[str], targets: Sequence[Mapping], task_types: Sequence[str] | None = None
) -> dict:
    """Hand3D-test evaluation of model answers against structured ground truth.

    predictions: N answer strings; targets: N dicts (see `score_answer`); task_types: N names
    (e.g. "spatial_relationship", "hand_movement", "camera_movement") or None.
    Returns {"overall": agg, "per_task": {task: agg}, "samples": [per-sample dicts]}, where agg
    holds n, direction_score (mean of 0-3), axis_accuracy, distance_error_m (unparseable = 0 m
    answer), distance_error_m_parsed, rotation_accuracy, angle_error_deg(_parsed) and the
    n_unparseable_* counts; a mean over no samples is None.
    """
    if isinstance(predictions, str):
        raise ValueError("predictions: expected a list of strings, got a single str")
    if len(predictions) != len(targets):
        raise ValueError(f"predictions/targets: lengths differ ({len(predictions)} vs {len(targets)})")
    if task_types is not None and len(task_types) != len(predictions):
        raise ValueError(f"task_types: expected {len(predictions)} entries, got {len(task_types)}")
    samples = [score_answer(p, t, i) for i, (p, t) in enumerate(zip(predictions, targets))]
    result: dict = {"overall": _aggregate(samples), "per_task": {}, "samples": samples}
    if task_types is not None:
        for i, tt in enumerate(task_types):
            if not isinstance(tt, str):
                raise ValueError(f"task_types[{i}]: expected a str, got {type(tt).__name__}")
            samples[i]["task_type"] = tt
        for tt in dict.fromkeys(task_types):
            result["per_task"][tt] = _aggregate([s for s in samples if s["task_type"] == tt])
    return result


def target_from_description(desc) -> dict:
    """Structured ground truth from a `language.DisplacementDescription`."""
    return {"labels": dict(desc.labels), "distance_m": float(desc.distance_m)}


def target_from_camera_motion(motion, with_translation: bool = False) -> dict:
    """Structured ground truth from a `language.CameraMotion` (rotation; optionally translation too)."""
    out = {"rotation": motion.rotation_label, "angle_deg": round(float(motion.angle_deg), 6)}
    if with_translation:
        out.update(target_from_description(motion.translation))
    return out


__all__ = [
    "DIRECTION_SYNONYMS",
    "ParsedAnswer",
    "parse_answer",
    "score_answer",
    "evaluate_answers",
    "target_from_description",
    "target_from_camera_motion",
]
