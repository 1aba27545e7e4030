"""JAX port of pytorch-fid's Inception-v3 (the TF FID graph): images → 2048-d pool3 features.

Matches `pytorch_fid.inception.InceptionV3([3])` with its default flags: bilinear resize to
299×299 (align_corners=False, no antialiasing, like `F.interpolate`), scaling from [0, 1] to
[-1, 1], the FID-specific blocks (average pools that ignore padding; max pool in the last
block), and global average pooling. Weights: pytorch-fid's `pt_inception-2015-12-05-
6726825d.pth` (the TF 2015-12-05 graph ported to PyTorch), read without torch. Inference
only, so the network is plain functions over a dict of arrays keyed by the PyTorch names;
batch norm is folded into a per-channel scale and shift at load time.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from at1_jax.model import torch_pickle

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3  # torchvision's BasicConv2d
_HIGHEST = jax.lax.Precision.HIGHEST  # FID needs the same features on every backend (no TF32)

Params = dict[str, jax.Array]


# ----------------------------------------------------------------------------- layers


def _conv(p: Params, name: str, x, stride: int = 1, pad: tuple[int, int] = (0, 0)):
    """BasicConv2d: conv (no bias) → folded batch norm → ReLU, NHWC."""
    y = jax.lax.conv_general_dilated(
        x,
        p[f"{name}.kernel"],
        (stride, stride),
        [(pad[0], pad[0]), (pad[1], pad[1])],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HIGHEST,
    )
    return jax.nn.relu(y * p[f"{name}.scale"] + p[f"{name}.shift"])


def _max_pool(x, stride: int, pad: int = 0):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding
    )


def _avg_pool_no_pad(x):
    """3×3, stride 1, padding 1, dividing by the number of real (unpadded) pixels."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = ((1, 3, 3, 1), (1, 1, 1, 1), padding)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, *window)
    return total / count


def _block_a(p, n, x):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b5 = _conv(p, f"{n}.branch5x5_2", _conv(p, f"{n}.branch5x5_1", x), pad=(2, 2))
    b3 = _conv(p, f"{n}.branch3x3dbl_1", x)
    b3 = _conv(p, f"{n}.branch3x3dbl_2", b3, pad=(1, 1))
    b3 = _conv(p, f"{n}.branch3x3dbl_3", b3, pad=(1, 1))
    bp = _conv(p, f"{n}.branch_pool", _avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _block_b(p, n, x):
    b3 = _conv(p, f"{n}.branch3x3", x, stride=2)
    bd = _conv(p, f"{n}.branch3x3dbl_1", x)
    bd = _conv(p, f"{n}.branch3x3dbl_2", bd, pad=(1, 1))
    bd = _conv(p, f"{n}.branch3x3dbl_3", bd, stride=2)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


_ROW, _COL = (0, 3), (3, 0)  # paddings of the (1, 7) and (7, 1) convolutions


def _block_c(p, n, x):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b7 = _conv(p, f"{n}.branch7x7_1", x)
    b7 = _conv(p, f"{n}.branch7x7_2", b7, pad=_ROW)
    b7 = _conv(p, f"{n}.branch7x7_3", b7, pad=_COL)
    bd = _conv(p, f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), (_COL, _ROW, _COL, _ROW), strict=True):
        bd = _conv(p, f"{n}.branch7x7dbl_{i}", bd, pad=pad)
    bp = _conv(p, f"{n}.branch_pool", _avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _block_d(p, n, x):
    b3 = _conv(p, f"{n}.branch3x3_2", _conv(p, f"{n}.branch3x3_1", x), stride=2)
    b7 = _conv(p, f"{n}.branch7x7x3_1", x)
    b7 = _conv(p, f"{n}.branch7x7x3_2", b7, pad=_ROW)
    b7 = _conv(p, f"{n}.branch7x7x3_3", b7, pad=_COL)
    b7 = _conv(p, f"{n}.branch7x7x3_4", b7, stride=2)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


def _block_e(p, n, x, max_pool: bool):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b3 = _conv(p, f"{n}.branch3x3_1", x)
    b3 = [
        _conv(p, f"{n}.branch3x3_2a", b3, pad=(0, 1)),
        _conv(p, f"{n}.branch3x3_2b", b3, pad=(1, 0)),
    ]
    bd = _conv(p, f"{n}.branch3x3dbl_2", _conv(p, f"{n}.branch3x3dbl_1", x), pad=(1, 1))
    bd = [
        _conv(p, f"{n}.branch3x3dbl_3a", bd, pad=(0, 1)),
        _conv(p, f"{n}.branch3x3dbl_3b", bd, pad=(1, 0)),
    ]
    # FIDInceptionE_2 max-pools here: a quirk of the TF graph that FID scores depend on.
    pooled = _max_pool(x, 1, pad=1) if max_pool else _avg_pool_no_pad(x)
    bp = _conv(p, f"{n}.branch_pool", pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


# ----------------------------------------------------------------------------- network


@functools.cache
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """f32[n_out, n_in] of PyTorch's bilinear interpolation, align_corners=False, no antialias.

    Source coordinates are exact here; PyTorch rounds them to float32, which moves its
    interpolated pixel values by up to ~size·2⁻²³ (6e-5 at 512 px, 1/65 of a uint8 step).
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def preprocess(images_NHWC: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] NHWC RGB → 299×299 NHWC in [-1, 1] (pytorch-fid's steps)."""
    x = images_NHWC.astype(jnp.float32)
    if images_NHWC.dtype == jnp.uint8:
        x = x / 255.0  # torchvision ToTensor, as pytorch-fid's image loader does
    _, h, w, _ = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        rh, rw = resize_matrix(h, INPUT_SIZE), resize_matrix(w, INPUT_SIZE)
        x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=_HIGHEST)
        x = jnp.einsum("pw,nowc->nopc", rw, x, precision=_HIGHEST)
    return 2.0 * x - 1.0


def features(params: Params, images_NHWC: jax.Array) -> jax.Array:
    """f32[N, 2048] pool3 features of N RGB images (uint8, or float in [0, 1])."""
    x = preprocess(images_NHWC)
    x = _conv(params, "Conv2d_1a_3x3", x, stride=2)
    x = _conv(params, "Conv2d_2a_3x3", x)
    x = _max_pool(_conv(params, "Conv2d_2b_3x3", x, pad=(1, 1)), 2)
    x = _conv(params, "Conv2d_3b_1x1", x)
    x = _max_pool(_conv(params, "Conv2d_4a_3x3", x), 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(params, name, x)
    x = _block_b(params, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(params, name, x)
    x = _block_d(params, "Mixed_7a", x)
    x = _block_e(params, "Mixed_7b", x, max_pool=False)
    x = _block_e(params, "Mixed_7c", x, max_pool=True)
    return x.mean(axis=(1, 2))


features_jit = jax.jit(features)


# ----------------------------------------------------------------------------- weights


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict (zip or legacy format) as NumPy arrays."""
    sd = torch_pickle.load(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def params_from_state_dict(sd: dict[str, np.ndarray], source: str = "state dict") -> Params:
    """Folds each conv + batch norm of a pytorch-fid state dict into (HWIO kernel, scale, shift)."""
    names = sorted(k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight"))
    needed = _expected_convs()
    missing = sorted(set(needed) - set(names))
    if missing:
        raise ValueError(
            f"{source}: not pytorch-fid Inception weights; missing {len(missing)} layers, "
            f"e.g. {', '.join(missing[:4])}"
        )
    params = {}
    for name in needed:
        w = np.asarray(sd[f"{name}.conv.weight"], np.float64)
        if w.shape != needed[name]:
            raise ValueError(f"{source}: {name}.conv.weight is {w.shape}, expected {needed[name]}")
        gamma, beta, mean, var = (
            np.asarray(sd[f"{name}.bn.{k}"], np.float64)
            for k in ("weight", "bias", "running_mean", "running_var")
        )
        scale = gamma / np.sqrt(var + _BN_EPS)
        params[f"{name}.kernel"] = jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32)
        params[f"{name}.scale"] = jnp.asarray(scale, jnp.float32)
        params[f"{name}.shift"] = jnp.asarray(beta - mean * scale, jnp.float32)
    return params


@functools.cache
def _expected_convs() -> dict[str, tuple[int, int, int, int]]:
    """Every conv layer's name → PyTorch weight shape (out, in, kh, kw), per torchvision."""
    s: dict[str, tuple[int, int, int, int]] = {}

    def add(name, cin, cout, kh, kw=None):
        s[name] = (cout, cin, kh, kw or kh)

    for name, cin, cout, k in (
        ("Conv2d_1a_3x3", 3, 32, 3),
        ("Conv2d_2a_3x3", 32, 32, 3),
        ("Conv2d_2b_3x3", 32, 64, 3),
        ("Conv2d_3b_1x1", 64, 80, 1),
        ("Conv2d_4a_3x3", 80, 192, 3),
    ):
        add(name, cin, cout, k)
    for n, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        add(f"{n}.branch1x1", cin, 64, 1)
        add(f"{n}.branch5x5_1", cin, 48, 1)
        add(f"{n}.branch5x5_2", 48, 64, 5)
        add(f"{n}.branch3x3dbl_1", cin, 64, 1)
        add(f"{n}.branch3x3dbl_2", 64, 96, 3)
        add(f"{n}.branch3x3dbl_3", 96, 96, 3)
        add(f"{n}.branch_pool", cin, pool, 1)
    add("Mixed_6a.branch3x3", 288, 384, 3)
    add("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    add("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    add("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for n, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        add(f"{n}.branch1x1", 768, 192, 1)
        add(f"{n}.branch7x7_1", 768, c7, 1)
        add(f"{n}.branch7x7_2", c7, c7, 1, 7)
        add(f"{n}.branch7x7_3", c7, 192, 7, 1)
        add(f"{n}.branch7x7dbl_1", 768, c7, 1)
        add(f"{n}.branch7x7dbl_2", c7, c7, 7, 1)
        add(f"{n}.branch7x7dbl_3", c7, c7, 1, 7)
        add(f"{n}.branch7x7dbl_4", c7, c7, 7, 1)
        add(f"{n}.branch7x7dbl_5", c7, 192, 1, 7)
        add(f"{n}.branch_pool", 768, 192, 1)
    add("Mixed_7a.branch3x3_1", 768, 192, 1)
    add("Mixed_7a.branch3x3_2", 192, 320, 3)
    add("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    add("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    add("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    add("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for n, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        add(f"{n}.branch1x1", cin, 320, 1)
        add(f"{n}.branch3x3_1", cin, 384, 1)
        add(f"{n}.branch3x3_2a", 384, 384, 1, 3)
        add(f"{n}.branch3x3_2b", 384, 384, 3, 1)
        add(f"{n}.branch3x3dbl_1", cin, 448, 1)
        add(f"{n}.branch3x3dbl_2", 448, 384, 3)
        add(f"{n}.branch3x3dbl_3a", 384, 384, 1, 3)
        add(f"{n}.branch3x3dbl_3b", 384, 384, 3, 1)
        add(f"{n}.branch_pool", cin, 192, 1)
    return s


def load(path: str) -> Params:
    """Inception parameters from pytorch-fid's .pth file (or a state dict with its names)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    return params_from_state_dict(read_state_dict(path), path)


def missing_weights_message(path: str) -> str:
    """What to download and where to put it when the Inception weights are not there."""
    return (
        f"FID Inception weights not found at {path}. FID needs pytorch-fid's Inception-v3 "
        f"file {WEIGHTS_FILE} (95 MB, from {WEIGHTS_URL}): download it on a machine with "
        f"network access and put it at that path (or pass --inception-weights PATH)."
    )
