"""Parity of the JAX FID Inception with pytorch-fid's own InceptionV3 (random weights)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid_upstream import fid_inception, pool3, random_state_dict, upstream

from at1_jax.evaluate import inception

IMAGES = np.random.default_rng(1).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(seed=0)


@pytest.fixture(scope="module")
def upstream_features(state_dict):
    """pytorch-fid's pool3 features of IMAGES, through its resize and [-1, 1] scaling."""
    return pool3(fid_inception(state_dict), IMAGES)


@pytest.fixture(scope="module", params=["zip", "legacy"])
def weights_file(request, state_dict, tmp_path_factory):
    """The weights saved as pytorch-fid ships them (legacy) and as torch saves now (zip)."""
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
    torch.save(state_dict, path, _use_new_zipfile_serialization=request.param == "zip")
    return str(path)


def test_weights_file_is_pytorch_fids():
    assert inception.WEIGHTS_URL == upstream().FID_WEIGHTS_URL


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


def test_features_match_pytorch_fid(upstream_features, weights_file):
    got = np.asarray(inception.features_jit(inception.load(weights_file), jnp.asarray(IMAGES)))
    want = upstream_features
    assert got.shape == want.shape == (2, inception.FEATURE_DIM)
    # Both sides fp32 (u = 2⁻²⁴ ≈ 6e-8), summing in different orders. A conv output sums up to
    # K = 4032 products of random sign, so sequential summation errs by ~u·√K ≈ 4e-6 of its
    # value; the deepest chain is 47 convs, and He-scaled layers with batch norm near 1 carry
    # relative errors with gain ~1, so independent ones add to ~√47·4e-6 ≈ 3e-5. The resize
    # adds ≤ 2·80·2⁻²³ ≈ 2e-5 per input pixel (see above), averaged down by the pooling.
    # 1e-4 of the peak is 3× that estimate; measured: 6e-7 (blocked summation on both sides,
    # each within 6e-7 of a float64 run of the upstream network). Wiring errors are far
    # above it: average pools counting the padding give 5e-2, an average pool in place of
    # FIDInceptionE_2's max pool 0.2.
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
