"""safe_pickle: code-carrying pickles are refused; torch / joblib / plain pickles load as numpy arrays.

The files are written by the real writers (torch.save in both formats, pickle.dump of tensors, joblib.dump
plain and compressed) and compared with the tensors that were saved.
"""

import collections
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch

from hand3d_dataset import safe_pickle


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _payload():
    g = torch.Generator().manual_seed(0)
    return {
        "strided": torch.randn(4, 5, generator=g, dtype=torch.float64)[:, 1::2],  # a non-contiguous view
        "long": torch.arange(7),
        "half": torch.tensor([0.5, -1.25], dtype=torch.float16),
        "bf16": torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(2, 3)),
        "scalar": torch.tensor(3.5),
        "numpy": np.arange(6.0).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
        "nested": collections.OrderedDict(a=[1, 2.5, "x", None], b=(True, b"raw")),
    }


def _check_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert isinstance(got[k], np.ndarray), k
            exp = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            assert got[k].shape == exp.shape and got[k].dtype == exp.dtype, k
            np.testing.assert_array_equal(got[k], exp)
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(got[k], v)
        else:
            assert got[k] == v, k


@pytest.mark.parametrize(
    "writer",
    [
        "torch-zip",
        "torch-legacy",
        "pickle",
        "pickle-proto0",
        "joblib",
        "joblib-zlib",
        "joblib-gzip",
        "joblib-xz",
    ],
)
def test_saved_tensors_load_as_arrays(tmp_path, writer):
    want = _payload()
    path = tmp_path / "f.bin"
    if writer == "torch-zip":
        torch.save(want, path)
    elif writer == "torch-legacy":
        torch.save(want, path, _use_new_zipfile_serialization=False)
    elif writer.startswith("pickle"):
        with open(path, "wb") as fh:
            pickle.dump(want, fh, protocol=0 if writer.endswith("0") else pickle.HIGHEST_PROTOCOL)
    else:
        compress = {"joblib": 0, "joblib-zlib": 3, "joblib-gzip": ("gzip", 3), "joblib-xz": ("xz", 3)}[writer]
        joblib.dump(want, path, compress=compress)
    _check_same(safe_pickle.load(path), want)


def test_loading_does_not_import_torch(tmp_path):
    """Tensors are rebuilt without torch's unpickler: a fresh process never imports torch."""
    path = tmp_path / "t.pt"
    torch.save({"x": torch.arange(3.0)}, path)
    code = (
        "import sys; from hand3d_dataset.safe_pickle import load; "
        f"print(load({str(path)!r})['x'].tolist(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0.0, 1.0, 2.0] False"


@pytest.mark.parametrize("container", ["pickle", "torch-zip", "torch-legacy", "joblib"])
def test_a_callable_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    evil = {"x": torch.zeros(2), "cmd": _SystemCall(f"touch {marker}")}
    path = tmp_path / "evil.bin"
    if container == "pickle":
        path.write_bytes(pickle.dumps(evil))
    elif container == "torch-zip":
        torch.save(evil, path)
    elif container == "torch-legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        joblib.dump(evil, path)
    with pytest.raises(ValueError, match=r"refusing to unpickle global '(posix|os|nt)\.system'") as e:
        safe_pickle.load(path)
    assert str(path) in str(e.value)
    assert not marker.exists()
    with open(path, "wb") as fh:  # the payload does run under plain pickle: the test can fail
        pickle.dump(evil, fh)
    with open(path, "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


def test_other_globals_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="refusing to unpickle global 'builtins.eval'"):
        safe_pickle.loads(pickle.dumps(eval))
    with pytest.raises(ValueError, match="refusing to unpickle global 'collections.Counter'"):
        safe_pickle.loads(pickle.dumps(collections.Counter("ab")))

    class Local:  # any class, even harmless ones, is refused unless a caller allows a stand-in
        pass

    globals()["Local"] = Local
    Local.__qualname__ = "Local"
    with pytest.raises(ValueError, match=r"refusing to unpickle global '[\w.]*test_safe_pickle\.Local'"):
        safe_pickle.loads(pickle.dumps(Local()))
    obj = safe_pickle.loads(pickle.dumps(Local()), stand_in=lambda m, n: n == "Local")
    assert isinstance(obj, safe_pickle.PickledStandIn) and obj.origin.endswith(".Local")

    path = tmp_path / "cut.pkl"
    data = pickle.dumps({"a": np.arange(100.0)})
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        safe_pickle.load(path)
    with pytest.raises(FileNotFoundError, match="no file"):
        safe_pickle.load(tmp_path / "missing.pkl")


def test_a_crafted_tensor_cannot_read_outside_its_storage(tmp_path):
    """A view whose size/stride reach past the storage is refused (as_strided would read foreign memory)."""
    t = torch.arange(4.0)
    path = tmp_path / "t.pt"
    torch.save({"x": t}, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    # the size tuple (4,) is pickled as BININT1 4 + TUPLE1; make it (200,)
    assert members[pkl].count(b"K\x04\x85") == 1
    members[pkl] = members[pkl].replace(b"K\x04\x85", b"K\xc8\x85")
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(ValueError, match="tensor view reaches element 199 of a storage of 4"):
        safe_pickle.load(path)


def test_gpu_saved_storages_load_on_a_cpu_only_machine(tmp_path):
    """Older torch pickles a GPU tensor's storage as `torch.cuda.FloatStorage` with location "cuda:0"."""
    import zipfile

    path = tmp_path / "t.pt"
    torch.save({"x": torch.arange(4.0)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    assert b"ctorch\nFloatStorage\n" in members[pkl]
    members[pkl] = members[pkl].replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n")
    members[pkl] = members[pkl].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    np.testing.assert_array_equal(safe_pickle.load(path)["x"], np.arange(4.0, dtype=np.float32))
