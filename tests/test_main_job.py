"""The main job (`python -m cpu_demo.main_job --quick --no-serve`) runs end to end in a fresh process: every
phase's output exists, the Table-8-shaped table prints, the trivial-baseline row matches a by-hand computation
from the parquet files, the served checkpoint reloads through the Auto classes in another process and carries
the Space's "trained" marker, and a second run resumes (every phase skipped). No accuracy is asserted: the
quick run learns nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = (
    "build",
    "stand-in init",
    "CUT3R stand-in",
    "single encoder",
    "compose",
    "stage 1",
    "stage 2",
    "evaluate",
    "3D probe",
    "Meta-World expert demonstrations",
    "stage 3 on the demonstrations",
    "closed-loop Meta-World evaluation",
)


def _env() -> dict:
    # two data-parallel processes (cpu_demo.parallel), as on any machine with 2 CPUs, even on a 1-CPU runner
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VIPA_NO_SERVE": "1",
            "VIPA_DEMO_PROCESSES": "2"}  # fmt: skip


def _run_job(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cpu_demo.main_job", "--quick", "--no-serve", "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _trivial_by_hand(data: Path, n_test: int) -> float:
    """Direction score of "most frequent label per axis per task type" from the raw parquet rows."""
    import pyarrow.parquet as pq

    def rows(split: str) -> list[dict]:
        tables = [pq.read_table(p, columns=["task_type", "target"]) for p in sorted((data / "data" / "visual").glob(f"{split}-*.parquet"))]  # fmt: skip
        return [r for t in tables for r in t.to_pylist()]

    train, test = rows("train"), rows("test")[:n_test]
    scores = []
    for r in test:
        if r["target"].get("distance_m") is None:  # camera rows have no direction score
            continue
        pool = [t["target"]["labels"] for t in train if t["task_type"] == r["task_type"]]
        guess = {ax: Counter(p[ax] for p in pool).most_common(1)[0][0] for ax in ("x", "y", "z")}
        scores.append(sum(guess[ax] == r["target"]["labels"][ax] for ax in ("x", "y", "z")))
    return float(np.mean(scores))


@pytest.mark.slow
def test_quick_main_job_end_to_end_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _run_job(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert "Dist. Err. (m)" in stdout and "Dir. Scr." in stdout, stdout[-2000:]
    for row in ("Trivial baseline", "Single encoder + Hand3D (no 3D branch)", "VIPA-VLA-PT"):
        assert row in stdout, row

    results = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in results["table8"]]
    assert len(names) == 3 and names[0].startswith("Trivial"), names
    for phase in PHASES:
        assert any(phase in k for k in results["phase_seconds"]), (phase, results["phase_seconds"])
    # the trivial row, recomputed independently from the parquet files
    n_test = results["config"]["main_job"]["eval_limit"]
    expected = _trivial_by_hand(out / "hand3d", n_test)
    assert results["table8"][0]["direction_score"] == pytest.approx(expected, abs=1e-9)
    # stand-ins are labelled as such wherever they are recorded
    assert results["stand_ins"]["cut3r"]["stand_in"] is True
    backbone = json.loads((out / "single_encoder" / "training_summary.json").read_text())
    assert backbone["stand_in"] is True
    # the training phases ran data parallel on 2 processes; phases 8-10 ran side by side
    assert results["stand_ins"]["cut3r"]["processes"] == backbone["processes"] == 2
    assert results["stages"]["stage1"]["processes"] == results["stages"]["stage2"]["processes"] == 2
    assert "[main_job] 8 evaluate on Hand3D test, 9 3D probe" in stdout
    # the dense name loss ran on every frame of the train clips (the quick build: 3 frames per clip)
    import pyarrow.parquet as pq

    shards = sorted((out / "hand3d" / "data" / "visual").glob("train-*.parquet"))
    n_train_clips = len(
        {c for f in shards for c in pq.read_table(f, columns=["clip_id"]).column("clip_id").to_pylist()}
    )
    assert backbone["dense_names"]["frames"] >= 3 * n_train_clips > 0
    assert backbone["dense_names"]["name_tokens"] > 0
    assert backbone["dense_names"]["depth_weight"] > 0 and backbone["dense_names"]["depth_loss_last"] >= 0
    # phase 9: the 3D probe fitted and scored every readout (a pair score is a mean of 0..3 hits per pair)
    probe = results["probe3d"]
    assert set(probe["rows"]) == {
        "constant",
        "CUT3R pointmap (no probe)",
        "V_sem",
        "V_spa",
        "V_f",
        "LLM input",
        "V_sem + V_spa",
    }, probe
    for row in probe["rows"].values():
        assert (
            0.0 <= row["direction_score"] <= 3.0
            and row["n_pairs"] > 0
            and np.isfinite(row["distance_error_m"])
        )
    assert "linear probe of V_spa" in stdout
    ablation = probe["branch_ablation"]
    assert ablation["n_rows"] == 4 and ablation["answer_tokens"] > 0
    assert set(ablation["nll_per_token"]) == {"as trained", "V_spa zeroed", "3D branch off (alpha = 0)"}
    assert "What the answers use" in stdout
    for png in ("eval/figure8.png", "eval/probe3d.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # the served checkpoint: trained marker + loadable by the Auto classes in a fresh process
    served = out / "vipa"
    summary = json.loads((served / "training_summary.json").read_text())
    assert summary["stage"] == 2 and summary["steps"] == 2
    code = (
        "import sys\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "for path in sys.argv[1:]:\n"
        "    m = AutoModel.from_pretrained(path, trust_remote_code=True)\n"
        "    p = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n"
        "    assert type(m).__name__ == 'VipaForConditionalGeneration', type(m)\n"
        "    print('CKPT', path.split('/')[-1], m.config.num_motion_bins, p.has_motion_tokens, m.config.use_spatial_branch)\n"
    )
    check = subprocess.run(
        [sys.executable, "-c", code, str(served), str(out / "single_encoder")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    lines = {ln.split()[1]: ln.split()[2:] for ln in check.stdout.splitlines() if ln.startswith("CKPT")}
    assert lines["vipa"][:2] == ["1024", "True"], lines  # stage 2 added the motion tokens
    # the single-encoder checkpoint really has its 3D branch off (V_f = V_sem) and no motion tokens; VIPA has it
    assert lines["single_encoder"] == ["0", "False", "False"] and lines["vipa"][2] == "True", lines

    # phases 10-12: demonstrations, stage 3 from the stage-2 checkpoint, the closed-loop table next to expert and floor
    robot = results["metaworld"]
    assert (
        robot["demos"]["tasks"]["reach-v3"]["seeds"] == [0] and robot["stage3"]["start"]["kind"] == "stage2"
    )
    policies = robot["policies"]
    assert list(policies) == ["VIPA-VLA (stages 1-3)", "scripted expert", "random"], list(policies)
    assert policies["scripted expert"]["overall"]["successes"] == 1  # reach-v3's expert, seed 1000
    assert "Meta-World closed loop" in stdout and "scripted expert" in stdout
    videos = sorted((out / "robot" / "eval").glob("*/videos/reach-v3/seed-001000.mp4"))
    assert len(videos) == 3 and all(v.stat().st_size > 0 for v in videos)
    # vipa-eval in a fresh process on the same checkpoint and seeds: the same episodes as the main job
    cli = [sys.executable, "-m", "evaluation.cli", "--policy", str(out / "runs" / "stage3"), "--tasks", "reach-v3",
           "--episodes", "1", "--seed", "1000", "--no-references",
           "--videos", "0", "--no-progress", "--out", str(tmp_path / "vipa_eval")]  # fmt: skip
    ran = subprocess.run(cli, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    fresh = json.loads(
        next((tmp_path / "vipa_eval").glob("*/episodes/reach-v3/seed-001000.json")).read_text()
    )
    job = json.loads(
        (
            out / "robot" / "eval" / "vipa_vla_stages_1_3" / "episodes" / "reach-v3" / "seed-001000.json"
        ).read_text()
    )
    keys = ("seed", "steps", "success", "success_step", "error")
    assert {k: fresh[k] for k in keys} == {k: job[k] for k in keys}
    # torch's float sums differ in the last bits between thread counts: the rewards agree to 1e-6, not bit for bit
    assert fresh["reward_sum"] == pytest.approx(job["reward_sum"], rel=1e-6)

    # resume: a second run skips every phase and prints the same table
    again = _run_job(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already complete, skipped") == len(PHASES), again.stdout[-3000:]
    assert results["table8"] == json.loads((out / "results.json").read_text())["table8"]


def test_main_job_refuses_other_settings_in_same_folder(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "job_config.json").write_text(json.dumps({"main_job": {"num_clips": 1}, "standins": {}}))
    proc = _run_job(out)
    assert proc.returncode == 2
    assert "other settings" in proc.stderr


def test_main_job_config_names_a_bad_fusion_option() -> None:
    from cpu_demo.main_job import MainJobConfig

    with pytest.raises(ValueError, match="fusion_qk_position.*'rope'"):
        MainJobConfig(fusion_qk_position="rope")
