"""Parity of the JAX FID Inception with a PyTorch reference of pytorch-fid's network."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inception_reference import FIDInceptionV3, randomize

from at1_jax.evaluate import inception


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize(FIDInceptionV3(), seed=0)


@pytest.fixture(scope="module", params=["zip", "legacy"])
def weights_file(request, reference, tmp_path_factory):
    """The reference's state dict saved as pytorch-fid ships it (legacy) and as torch saves now."""
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
    sd = dict(reference.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # ignored
    torch.save(sd, path, _use_new_zipfile_serialization=request.param == "zip")
    return str(path)


def test_resize_matches_torch_bilinear():
    rng = np.random.default_rng(0)
    for h, w in ((32, 48), (299, 299), (512, 300)):  # up, identity, down (no antialias)
        x = rng.uniform(size=(2, h, w, 3)).astype(np.float32)
        want = F.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear"
        )
        got = (inception.preprocess(jnp.asarray(x)) + 1) / 2
        # PyTorch computes source coordinates c < max(h, w) in float32, so its weights are off
        # by up to ulp(c) ≈ c·2⁻²³ (ours are exact); pixel values in [0, 1] move by as much.
        atol = max(h, w) * 2.0**-23 + 1e-6
        np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=atol)


def test_features_match_pytorch_reference(reference, weights_file):
    params = inception.load(weights_file)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        want = reference(x).numpy()
    got = np.asarray(inception.features_jit(params, jnp.asarray(images)))
    assert got.shape == want.shape == (2, inception.FEATURE_DIM)
    # fp32 both sides, ~20 convolutions deep with fan-ins up to 4032: each layer adds a few ulp
    # (1.2e-7) relative to its activations in a different summation order, and batch norm is
    # folded here but applied in two steps there. 1e-4 of the features' peak is ~50× the
    # error that ordering alone gives, and far below what wrong wiring gives (O(1)).
    scale = np.abs(want).max()
    assert scale > 0.1  # the random network still carries signal to pool3
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        inception.load(str(tmp_path / "nothing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not pytorch-fid Inception weights"):
        inception.load(str(bad))
