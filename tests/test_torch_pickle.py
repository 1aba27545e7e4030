"""The torch-free checkpoint reader returns what torch.load returns."""

import argparse

import ml_dtypes
import numpy as np
import torch

from at1_jax import torch_pickle


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
    got["slice"][0, 0] = -1  # copies, not views into a shared buffer
    assert got["transposed"][2, 1] == base.t()[2, 1]
