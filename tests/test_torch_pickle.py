"""The torch-free checkpoint reader returns what torch.load returns."""

import argparse
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from at1_jax.model import torch_pickle


def test_reads_dtypes_views_and_containers_like_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(5),
        "transposed": base.t(),  # non-contiguous view
        "slice": base[1:3, 2:],  # offset view of the same storage
        "scalar": torch.tensor(2.5),
        "nested": {"step": 7, "names": ["a", "b"]},
        "param": torch.nn.Parameter(torch.ones(2)),
        "args": argparse.Namespace(lr=3e-4),  # an arbitrary class: must not be instantiated
    }
    torch.save(obj, tmp_path / "x.pth")
    got = torch_pickle.load(str(tmp_path / "x.pth"))
    for k in ("f32", "f16", "i64", "transposed", "slice", "scalar", "param"):
        expected = obj[k].detach().numpy()
        assert got[k].dtype == expected.dtype, k
        np.testing.assert_array_equal(got[k], expected)
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), obj["bf16"].float().numpy())
    assert got["nested"] == {"step": 7, "names": ["a", "b"]}
    assert isinstance(got["args"], torch_pickle.Opaque) and "Namespace" in got["args"].name
    assert got["args"].state == {"lr": 3e-4}  # kept as data, the class never instantiated
    got["slice"][0, 0] = -1  # copies, not views into a shared buffer
    assert got["transposed"][2, 1] == base.t()[2, 1]


# ------------------------------------------------------------------ hostile and broken files


class _Payload:
    """Pickles as a call to os.system that would create `marker` if it ever ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state_dict():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}


def _save(obj, path, legacy: bool):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def _expect_refusal(path, marker=None):
    with pytest.raises(torch_pickle.CheckpointFormatError) as info:
        torch_pickle.load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    if marker is not None:
        assert not os.path.exists(marker), "the payload ran"
    return message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_payload_is_refused_not_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = _save({**_state_dict(), "x": _Payload(marker)}, tmp_path / "evil.pth", legacy)
    assert "refuses global posix.system" in _expect_refusal(path, marker)


def test_payload_in_a_legacy_header_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    good = Path(_save(_state_dict(), tmp_path / "good.pth", legacy=True)).read_bytes()
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=2) + good)
    _expect_refusal(str(evil), marker)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_truncation_is_a_clean_error(tmp_path, legacy):
    good = Path(_save(_state_dict(), tmp_path / "good.pth", legacy)).read_bytes()
    cut = tmp_path / "cut.pth"
    for n in range(0, len(good), 7 if legacy else 13):
        cut.write_bytes(good[:n])
        _expect_refusal(str(cut))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_byte_mutations_load_or_fail_cleanly(tmp_path, legacy):
    sd = _state_dict()
    good = Path(_save(sd, tmp_path / "good.pth", legacy)).read_bytes()
    bad = tmp_path / "bad.pth"
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        bad.write_bytes(bytes(data))
        try:
            torch_pickle.load(str(bad))
            outcomes["loaded"] += 1  # a flip inside tensor bytes gives other numbers: fine
        except torch_pickle.CheckpointFormatError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes


class _StorageRef:
    def __init__(self, key, dtype_name="FloatStorage", numel=6, view=None):
        self.key, self.dtype_name, self.numel, self.view = key, dtype_name, numel, view


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))


class _CraftingPickler(pickle.Pickler):
    """Writes the opcodes torch.save writes, with any geometry a crafted file could hold."""

    def __init__(self, f, legacy):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        kind = getattr(torch, obj.dtype_name, None) or obj.dtype_name
        if self.legacy:
            return ("storage", kind, obj.key, "cpu", obj.numel, obj.view)
        return ("storage", kind, obj.key, "cpu", obj.numel)

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            return torch._utils._rebuild_tensor_v2, (*obj.args, False, OrderedDict())
        return NotImplemented


def _crafted(path, tensors, storages, legacy):
    """A checkpoint of {name: _Tensor} whose storages hold `storages` {key: float32 array}."""
    buf = io.BytesIO()
    _CraftingPickler(buf, legacy).dump(tensors)
    if legacy:
        with open(path, "wb") as f:
            for header in (torch_pickle.LEGACY_MAGIC, 1001, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(buf.getvalue())
            pickle.dump(sorted(storages), f, protocol=2)
            for key in sorted(storages):
                f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", "little")
            for key, arr in storages.items():
                z.writestr(f"archive/data/{key}", arr.tobytes())
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_crafted_geometry_is_bounds_checked(tmp_path, legacy):
    data = {"0": np.arange(6, dtype=np.float32)}
    ref = _StorageRef("0")
    fine = _crafted(tmp_path / "ok.pth", {"t": _Tensor(ref, 1, (2, 2), (2, 1))}, data, legacy)
    np.testing.assert_array_equal(torch_pickle.load(fine)["t"], [[1, 2], [3, 4]])
    crafted = {
        "huge stride": _Tensor(ref, 0, (2, 2), (1 << 40, 1)),
        "offset past the end": _Tensor(ref, 6, (1,), (1,)),
        "view one past the end": _Tensor(ref, 3, (2, 2), (2, 1)),
        "negative stride": _Tensor(ref, 5, (3,), (-1,)),
        "negative size": _Tensor(ref, 0, (-1,), (1,)),
        "rank mismatch": _Tensor(ref, 0, (2, 2), (1,)),
        "float offset": _Tensor(ref, 0.5, (2,), (1,)),
        "missing storage": _Tensor(_StorageRef("9"), 0, (1,), (1,)),
        "unknown storage type": _Tensor(_StorageRef("0", "EvilStorage"), 0, (1,), (1,)),
        "broadcast bomb": _Tensor(ref, 0, (1 << 20, 1 << 20), (0, 0)),
    }
    if legacy:
        crafted["view past storage"] = _Tensor(_StorageRef("0", view=("0", 4, 5)), 0, (1,), (1,))
        crafted["storage larger than file"] = _Tensor(
            _StorageRef("0", numel=1 << 40), 0, (1,), (1,)
        )
    for name, tensor in crafted.items():
        path = _crafted(tmp_path / "bad.pth", {"t": tensor}, data, legacy)
        message = _expect_refusal(path)
        assert "PyTorch checkpoint" in message or "storage" in message, (name, message)


def test_zip_member_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/data/0", bytes(200 << 20))  # 200 MB of zeros in ~200 KB
    assert "far more than the file holds" in _expect_refusal(str(path))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_exits_2_with_one_line_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = _save({**_state_dict(), "x": _Payload(marker)}, tmp_path / "evil.pth", legacy)
    proc = subprocess.run(
        [sys.executable, "-m", "at1_jax.convert", "import", path, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
