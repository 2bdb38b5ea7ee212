"""`hand3d build --engine ray` (hand3d_dataset/build_ray.py) against the local runner, on a local Ray instance.

Every test compares the Ray build's output folder with a build of the same arguments by the local runner
(`engine="local"`, in this process): the reference is the code path `tests/test_build.py` checks against
independent computations. One Ray instance of 2 CPUs serves the module and is shut down after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from hand3d_dataset import build_ray
from hand3d_dataset.build import BuildConfig, build
from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
from tests.hand3d_fake_source import EmptyBoxDetector, FakeSource, InterruptingSource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU Ray instance; workers import `tests.*` (the injected fakes) from the repository."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


# ---- injected sources and models (picklable; they run inside Ray workers) -------------------------------
class KillOnceSource(FakeSource):
    """SIGKILLs the worker process reading clip `kill_at` the first time (a file remembers it happened)."""

    def __init__(self, flag: str, kill_at: int, **kw) -> None:
        super().__init__(**kw)
        self.flag, self.kill_at = flag, kill_at

    def load_clip(self, clip_id: str):
        if int(clip_id.rsplit("-", 1)[1]) == self.kill_at and not os.path.exists(self.flag):
            Path(self.flag).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load_clip(clip_id)


class HostileSource(FakeSource):
    """Clips in `missing` live on a folder mounted only where the build started (the driver); the worker
    reading clip `kill_at` dies on every attempt (as one whose frames always exhaust the memory); clip
    `unpicklable` carries a lock in its meta (an adapter keeping a handle there)."""

    def __init__(self, driver_pid: int, missing: set[int], kill_at: int, unpicklable: int, **kw) -> None:
        super().__init__(**kw)
        self.driver_pid, self.missing, self.kill_at = driver_pid, set(missing), kill_at
        self.unpicklable = unpicklable

    def load_clip(self, clip_id: str):
        index = int(clip_id.rsplit("-", 1)[1])
        if index in self.missing and os.getpid() != self.driver_pid:
            raise FileNotFoundError(f"/mnt/driver-only/{clip_id}/frames: no such folder on this node")
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        clip = super().load_clip(clip_id)
        if index == self.unpicklable:
            import threading

            clip.meta["handle"] = threading.Lock()
        return clip


class LoggingEstimator:
    """A stand-in for a learnt estimator: ground-truth depth, but frames batched across clips through
    `estimate_batch`; logs each model load (unpickling = loading into an actor) and each call to `log`.
    Optionally fails on one clip, or SIGKILLs its actor once on clip `kill_at` (`flag` remembers)."""

    def __init__(
        self, log: str, fail_at: int | None = None, kill_at: int | None = None, flag: str = ""
    ) -> None:
        self.inner, self.log = GroundTruthDepthEstimator(), log
        self.fail_at, self.kill_at, self.flag = fail_at, kill_at, flag

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._write({"event": "load", "pid": os.getpid()})

    def _write(self, rec: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def true_scale(self, clip_id: str) -> float:
        return self.inner.true_scale(clip_id)

    def estimate_clip(self, clip):
        index = int(clip.clip_id.rsplit("-", 1)[1])
        if index == self.kill_at and not os.path.exists(self.flag):
            Path(self.flag).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if index == self.fail_at:
            raise RuntimeError(f"CUDA error: out of memory on {clip.clip_id}")
        return self.inner.estimate_clip(clip)

    def estimate_batch(self, clips):
        self._write({"event": "call", "pid": os.getpid(), "frames": sum(c.num_frames for c in clips)})
        return [self.estimate_clip(c) for c in clips]


# ---- helpers ---------------------------------------------------------------------------------------------
def _cfg(out: Path, num_clips: int, **kw) -> BuildConfig:
    return BuildConfig(source="fake", num_clips=num_clips, out=str(out), shard_size=3, progress=False, **kw)


def _local(out: Path, source, estimator=None, detector=None, **kw) -> dict:
    return build(
        _cfg(out, source.num_clips, **kw),
        source=source,
        estimator=estimator or GroundTruthDepthEstimator(),
        detector=detector or GroundTruthBoxDetector(),
    )


def _ray(out: Path, source, estimator=None, detector=None, **kw) -> dict:
    return build(
        _cfg(out, source.num_clips, engine="ray", num_workers=2, **kw),
        source=source,
        estimator=estimator or GroundTruthDepthEstimator(),
        detector=detector or GroundTruthBoxDetector(),
    )


def _files(out: Path) -> dict[str, list[dict]]:
    """Every parquet file's rows (pyarrow), by path: same files, same rows, same order."""
    return {
        str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(out.glob("data/*/*.parquet"))
    }


def _same_output(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert list(fa) == list(fb) and sum(len(v) for v in fa.values()) > 0
    for k in fa:
        same = fa[k] == fb[k]  # (not in the assert: pytest would diff megabytes of PNG bytes)
        assert same, f"{k}: rows differ"
    markers = sorted(p.name for p in (a / ".build").glob("*.json"))
    assert markers == sorted(p.name for p in (b / ".build").glob("*.json"))
    for m in markers:
        assert json.loads((a / ".build" / m).read_text()) == json.loads((b / ".build" / m).read_text()), m
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for k in ("config", "this_run"):  # the engine's name and its timing
        ra.pop(k), rb.pop(k)
    assert ra == rb
    assert (a / "README.md").read_text() == (b / "README.md").read_text()
    assert not list(b.rglob(".*.tmp"))


# ---- tests -----------------------------------------------------------------------------------------------
def test_engine_settings_are_validated():
    with pytest.raises(ValueError, match="engine: expected one of"):
        BuildConfig(engine="spark")
    with pytest.raises(
        ValueError, match="ray_address: expected 'auto' or 'ray://HOST:PORT', got 'localhost:6379'"
    ):
        BuildConfig(engine="ray", ray_address="localhost:6379")
    with pytest.raises(ValueError, match="ray_address: only used with engine 'ray'"):
        BuildConfig(ray_address="auto")
    a = BuildConfig(engine="ray", ray_address="ray://head:10001").resume_key()
    assert a == BuildConfig().resume_key()  # the engine never changes a shard


def test_missing_ray_extra_is_named_by_the_cli(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
        "from hand3d_dataset.cli import main\n"
        f"sys.exit(main(['build', '--engine', 'ray', '--num-clips', '1', '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert 'pip install "vipa-vla[ray]"' in res.stderr and "Traceback" not in res.stderr


def test_no_cluster_at_the_address_is_a_one_line_error(tmp_path):
    """Runs before any test starts the module's Ray instance, so 'auto' finds no cluster."""
    assert not ray.is_initialized()
    args = [
        "build",
        "--engine",
        "ray",
        "--ray-address",
        "auto",
        "--num-clips",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    code = f"import sys; from hand3d_dataset.cli import main; sys.exit(main({args!r}))"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert res.returncode == 2, res.stderr
    assert "ray_address: no Ray cluster at 'auto'" in res.stderr and "ray start --head" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.usefixtures("local_ray")
def test_ray_build_of_synth_equals_the_local_build(tmp_path, capfd, monkeypatch):
    common = dict(source="synth", num_clips=6, image_size=64, frames=4, shard_size=4)
    build(BuildConfig(out=str(tmp_path / "local"), progress=False, **common))
    capfd.readouterr()
    # blocks of 2 clips here (the other tests run the default, 1): the order and the rows do not change
    monkeypatch.setattr(build_ray, "DEFAULT", build_ray.RayEngineConfig(clips_per_block=2))
    report = build(
        BuildConfig(out=str(tmp_path / "ray"), engine="ray", num_workers=2, progress=True, **common)
    )
    assert report["clips_done"] + report["clips_skipped"] == 6 and report["this_run"]["clips_processed"] == 6
    err = capfd.readouterr().err
    assert err.count("hand3d: 100%") == 1 and "6/6" in err  # one bar over the clips, none of Ray Data's
    common["progress"] = False
    _same_output(tmp_path / "local", tmp_path / "ray")
    # a finished build re-run touches nothing
    again = build(BuildConfig(out=str(tmp_path / "ray"), engine="ray", num_workers=2, **common))
    assert again["this_run"]["clips_processed"] == 0
    _same_output(tmp_path / "local", tmp_path / "ray")


@pytest.mark.usefixtures("local_ray")
def test_resumed_build_with_killed_workers_equals_an_uninterrupted_build(tmp_path):
    """An interrupted local build is resumed on Ray (the resume key does not hold the engine), and during
    that run a read task's worker and a model actor's process are SIGKILLed; both are redone."""
    _local(tmp_path / "ref", FakeSource(8))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _local(out, InterruptingSource(stop_at=5, num_clips=8))
    assert sorted(p.name for p in (out / ".build").glob("shard-*.json")) == ["shard-00000.json"]
    (out / "data" / "action" / ".train-00001.parquet.tmp").write_bytes(b"half a file")  # as a kill leaves it
    log = tmp_path / "model.log"
    source = KillOnceSource(str(tmp_path / "read-killed"), kill_at=4, num_clips=8)
    estimator = LoggingEstimator(str(log), kill_at=6, flag=str(tmp_path / "actor-killed"))
    report = _ray(out, source, estimator=estimator)
    assert report["this_run"]["clips_processed"] == 5  # shard 0 (clips 0-2) kept
    killed = [int((tmp_path / f).read_text()) for f in ("read-killed", "actor-killed")]
    assert all(pid != os.getpid() for pid in killed)  # real worker processes, not this one
    assert report["clips_skipped"] == 0
    _same_output(tmp_path / "ref", out)
    # the learnt stand-in ran in an actor pool: one load per actor process (a restarted actor loads again),
    # several clips per call: frames batched across clips
    events = [json.loads(line) for line in log.read_text().splitlines()]
    loads = [e["pid"] for e in events if e["event"] == "load"]
    calls = [e for e in events if e["event"] == "call"]
    assert len(loads) == len(set(loads)) and killed[1] in loads
    assert {c["pid"] for c in calls} <= set(loads) and len(calls) < 5
    assert max(c["frames"] for c in calls) > 6  # FakeSource clips have 6 frames: > 1 clip in a call


@pytest.mark.usefixtures("local_ray")
def test_bad_inputs_and_lost_workers_are_counted_skips(tmp_path, monkeypatch):
    """Corrupt clips, a folder missing on the workers, an estimator failing on one clip, an empty box, a
    clip whose worker dies on every attempt, a clip that does not pickle: skips with reasons; the rest equals
    the local runner's."""
    corrupt = {1: "unreadable", 2: "nan_joints", 3: "out_of_view", 4: "empty_box"}
    log = str(tmp_path / "model.log")
    kw = dict(estimator=LoggingEstimator(log, fail_at=5), detector=EmptyBoxDetector())
    # reference: the local runner, with the clips that only fail on Ray workers unreadable
    ray_only = {6: "unreadable", 7: "unreadable", 9: "unreadable"}
    local = _local(tmp_path / "local", FakeSource(10, corrupt={**corrupt, **ray_only}), **kw)
    src = HostileSource(os.getpid(), missing={6}, kill_at=7, unpicklable=9, num_clips=10, corrupt=corrupt)
    monkeypatch.setattr(build_ray, "DEFAULT", build_ray.RayEngineConfig(max_retries=1))  # 2 deaths, not 4
    got = _ray(tmp_path / "ray", src, **kw)
    reasons = {s["clip_id"]: s["reason"] for s in got["skipped"]}
    assert set(reasons) == {f"fake-s0-{i:04d}" for i in (1, 2, 3, 5, 6, 7, 9)}
    assert "unreadable" in reasons["fake-s0-0001"] and "non-finite" in reasons["fake-s0-0002"]
    assert "no frame with a hand in view" in reasons["fake-s0-0003"]
    assert (
        reasons["fake-s0-0005"] == "pipeline error: RuntimeError: CUDA error: out of memory on fake-s0-0005"
    )
    assert reasons["fake-s0-0006"].startswith("load failed: FileNotFoundError: /mnt/driver-only/fake-s0-0006")
    lost = reasons["fake-s0-0007"]
    assert lost.startswith("worker lost: the process running clip fake-s0-0007 died in stage 'read'")
    assert "after 2 attempts" in lost and "max_retries 1" in lost  # each attempt a real worker death
    assert reasons["fake-s0-0009"].startswith("ray read stage: the clip's data do not pickle: TypeError")
    # everything else is skipped exactly as the local runner skips it
    want = {s["clip_id"]: s["reason"] for s in local["skipped"]}
    only = {f"fake-s0-{i:04d}" for i in ray_only}
    assert {k: v for k, v in reasons.items() if k not in only} == {
        k: v for k, v in want.items() if k not in only
    }
    assert got["skip_reasons"] == {
        "load failed": 3,  # unreadable frame, NaN joints (the Clip refuses them), the worker-only folder
        "no frame with a hand in view (visibility filter)": 1,
        "pipeline error": 1,
        "worker lost": 1,
        "ray read stage": 1,
    }
    assert got["frame_drops"] == local["frame_drops"]
    same = _files(tmp_path / "ray") == _files(tmp_path / "local")  # rows of clips 0, 4 and 8
    assert same


@pytest.mark.usefixtures("local_ray")
def test_learnt_models_named_by_the_config_run_in_the_model_pool(tmp_path):
    """depth-anything:<folder> and grounding-dino:<folder> (tiny random weights) are loaded inside the
    pool's actor from the config, and give the local runner's rows."""
    from tests.test_estimators import tiny_depth_anything, tiny_grounding_dino

    tiny_depth_anything("metric").save_pretrained(tmp_path / "da")
    dino, processor = tiny_grounding_dino(tmp_path)
    dino.save_pretrained(tmp_path / "gd")
    processor.save_pretrained(tmp_path / "gd")
    models = dict(estimator=f"depth-anything:{tmp_path / 'da'}", detector=f"grounding-dino:{tmp_path / 'gd'}")
    local = build(_cfg(tmp_path / "local", 2, **models), source=FakeSource(2))
    got = build(_cfg(tmp_path / "ray", 2, engine="ray", num_workers=2, **models), source=FakeSource(2))
    assert got["skipped"] == local["skipped"] and got["clips_done"] == local["clips_done"]
    _same_output(tmp_path / "local", tmp_path / "ray")
