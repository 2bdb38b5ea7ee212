"""`vipa-eval` end to end on Meta-World with a tiny stage-3 checkpoint trained on `vipa-demos` data: the command in
a fresh process gives the in-process episodes, environment processes give the single-process episodes, a
single-encoder start (config.use_spatial_branch off) never runs CUT3R, and bad input exits with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.cli import main as eval_main
from evaluation.demos import DemoConfig, record_demos
from evaluation.rollout import PolicySpec, RolloutConfig, evaluate_policy
from tests.test_stage3 import save_init, tiny_recipe
from tests.tiny_assets import record_calls
from training.stage3 import train_stage3

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vipa_eval")
    record_demos(
        DemoConfig(out=str(root / "demos"), tasks="reach-v3", episodes=1, image_size=SIZE, max_steps=60, use_videos=False, progress=False)
    )  # fmt: skip
    save_init(root / "init")
    result = train_stage3(root / "init", root / "demos", root / "stage3", recipe=tiny_recipe(max_steps=2))
    assert result.finished and result.start.kind == "no-pretraining"
    return root


def _cfg(out, **kw) -> RolloutConfig:
    values = dict(out=str(out), tasks="reach-v3", episodes=1, seed=1000, max_steps=8, image_size=SIZE, videos_per_task=0, progress=False)  # fmt: skip
    values.update(kw)
    return RolloutConfig(**values)


KEYS = ("task", "seed", "steps", "success", "error", "clipped_actions")


def test_vipa_eval_in_a_fresh_process_matches_in_process(trained, tmp_path) -> None:
    here = evaluate_policy(PolicySpec("vipa", path=str(trained / "stage3")), _cfg(tmp_path / "here"))
    record = here["records"][0]
    assert record["steps"] == 8 and record["error"] is None  # 8 steps of a policy that acts, no fault
    cmd = [sys.executable, "-m", "evaluation.cli", "--policy", str(trained / "stage3"), "--tasks", "reach-v3",
           "--episodes", "1", "--seed", "1000", "--max-steps", "8", "--image-size", str(SIZE), "--videos", "0",
           "--references", "noop", "--no-progress", "--out", str(tmp_path / "cli")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no-op" in proc.stdout and "0/1 0%" in proc.stdout
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert list(results["policies"]) == ["VIPA-VLA (stage3)", "no-op"]
    fresh = json.loads(
        (tmp_path / "cli" / "vipa_vla_stage3" / "episodes" / "reach-v3" / "seed-001000.json").read_text()
    )
    assert {k: fresh[k] for k in KEYS} == {k: record[k] for k in KEYS}
    assert fresh["reward_sum"] == pytest.approx(record["reward_sum"], rel=1e-6)


def test_environment_processes_give_the_single_process_episodes(tmp_path) -> None:
    spec = PolicySpec("random", seed=5)
    serial = evaluate_policy(spec, _cfg(tmp_path / "serial", tasks="reach-v3,drawer-open-v3", episodes=2))
    parallel = evaluate_policy(
        spec, _cfg(tmp_path / "parallel", tasks="reach-v3,drawer-open-v3", episodes=2, num_workers=2)
    )
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(parallel["records"]) == strip(serial["records"])
    assert [(r["task"], r["seed"]) for r in serial["records"]] == [
        ("reach-v3", 1000), ("reach-v3", 1001), ("drawer-open-v3", 1000), ("drawer-open-v3", 1001)
    ]  # fmt: skip


def test_single_encoder_start_never_runs_cut3r(trained, tmp_path, monkeypatch) -> None:
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    from modeling_vipa.spatial_encoder import Cut3rEncoder

    model = VipaForConditionalGeneration.from_pretrained(str(trained / "init"))
    model.config.use_spatial_branch = (
        False  # how cpu_demo writes its single-encoder backbone (alpha stays 0.5)
    )
    model.save_pretrained(tmp_path / "single")
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (trained / "init" / name).is_file():
            (tmp_path / "single" / name).write_bytes((trained / "init" / name).read_bytes())
    calls = record_calls(monkeypatch, Cut3rEncoder, "forward")
    result = train_stage3(
        tmp_path / "single", trained / "demos", tmp_path / "s3", recipe=tiny_recipe(max_steps=2)
    )
    summary = evaluate_policy(
        PolicySpec("vipa", path=str(tmp_path / "s3")), _cfg(tmp_path / "eval", max_steps=3)
    )
    assert result.start.kind == "single-encoder" and not result.start.spatial_branch
    assert summary["records"][0]["steps"] == 3 and not calls


def test_bad_input_exits_with_a_reason(trained, tmp_path, capsys) -> None:
    base = ["--episodes", "1", "--image-size", str(SIZE), "--no-progress", "--out", str(tmp_path / "e")]
    assert eval_main(["--policy", "expert", "--tasks", "reach-v9", *base]) == 2
    assert "unknown Meta-World task or group 'reach-v9'" in capsys.readouterr().err
    assert eval_main(["--policy", str(tmp_path / "nope"), "--tasks", "reach-v3", *base]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    # evaluation scenes that were demonstrations: refused (the checkpoint names its dataset)
    assert eval_main(["--policy", str(trained / "stage3"), "--tasks", "reach-v3", "--seed", "0", *base]) == 2
    assert "were demonstration scenes" in capsys.readouterr().err
    assert eval_main(["--policy", "expert", "--references", "vipa", "--tasks", "reach-v3", *base]) == 2
    assert "not reference policies" in capsys.readouterr().err


def test_table7_pairs_episodes_by_seed_and_tests_the_split() -> None:
    from math import comb

    from evaluation.cli import format_table7, paired_comparison

    def recs(successes):
        return [{"task": "t", "seed": 1000 + i, "success": s} for i, s in enumerate(successes)]

    base = recs([1, 1, 1, 1, 1, 0, 1, 0])
    other = recs([0, 1, 0, 0, 0, 1, 1, 0])  # only base: seeds 0, 2, 3, 4; only other: seed 5
    c = paired_comparison(base, other)
    assert (c["only_base"], c["only_other"]) == (4, 1)
    assert c["p_value"] == pytest.approx(
        2 * sum(comb(5, k) for k in (0, 1)) / 2**5
    )  # exact two-sided sign test
    assert paired_comparison(base, base)["p_value"] == 1.0

    def summary(records):
        k, n = sum(r["success"] for r in records), len(records)
        stats = {"success_rate": k / n, "ci95": [0.1, 0.9], "successes": k, "n": n}
        return {"per_task": {"t": stats}, "overall": stats, "records": records}

    table = format_table7({"VIPA-VLA": summary(base), "- Both": summary(other)}, ["t"])
    assert table.splitlines()[2] == "| VIPA-VLA | 75.0 | 75.0 [10, 90] | — |"
    assert table.splitlines()[3] == "| - Both | 37.5 | 37.5 (-37.5) [10, 90] | 4 / 1, p = 0.38 |"
