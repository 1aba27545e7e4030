"""pytorch-fid's own InceptionV3 for parity tests, imported beside a CPU-only torch.

pytorch-fid subclasses torchvision's Inception blocks, but the only torchvision matching
torch 2.13.0 (0.28.0) ships a CUDA-linked `_C.so`: its package `__init__` registers
`torchvision::nms` meta kernels and fails without libtorch_cuda ("operator torchvision::nms
does not exist"). Installed in site-packages it would also make transformers pick its
torchvision image processors, which then fail to import. So the Makefile installs both wheels
without dependencies into `<venv>/fid-reference`, off sys.path, and `upstream()` imports
torchvision's pure-Python model code from there under a bare `torchvision` package (skipping
only that `__init__`), then takes every module it added out of sys.modules again.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

FOLDER = Path(sys.prefix) / "fid-reference"
INSTALL = (
    "make setup, or: .venv/bin/pip install --no-deps --upgrade --target .venv/fid-reference "
    "-c constraints.txt torchvision pytorch-fid"
)


@functools.cache
def upstream() -> types.ModuleType:
    """The `pytorch_fid.inception` module, with torchvision's real Inception3 underneath."""
    tv = FOLDER / "torchvision"
    for needed in (tv / "version.py", tv / "models" / "inception.py", FOLDER / "pytorch_fid"):
        if not needed.exists():
            raise RuntimeError(f"{needed} is missing: install the FID reference with `{INSTALL}`")
    before = set(sys.modules)
    package = types.ModuleType("torchvision")
    package.__path__ = [str(tv)]  # submodules import from the folder; __init__ never runs
    sys.modules["torchvision"] = package
    sys.path.insert(0, str(FOLDER))
    try:
        package.__version__ = importlib.import_module("torchvision.version").__version__
        importlib.import_module("torchvision.models")
        fid = importlib.import_module("pytorch_fid.inception")
    except Exception as e:
        raise RuntimeError(
            f"importing torchvision's models from {tv} without its package __init__ failed: "
            f"{e!r}. This bypass was written for torchvision 0.28.0 and pytorch-fid 0.3.0 "
            "(pinned in constraints.txt); a new layout needs tests/pytorch_fid_upstream.py "
            "updated."
        ) from e
    finally:
        sys.path.remove(str(FOLDER))
        # Later imports (transformers probing for torchvision) must not see this stand-in.
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "pytorch_fid"):
                del sys.modules[name]
    return fid


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of pytorch-fid's weights file (fc.* included).

    He-normal convolutions and batch-norm statistics near 1, so activations stay O(1) through
    all 94 conv layers and pool3 carries signal. Keys come from the network pytorch-fid builds
    before swapping in its FID blocks (which keep every parameter's name and shape).
    """
    base = upstream()._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.state_dict().items():
        shape, kind = value.shape, key.rsplit(".", 1)[-1]
        if key.endswith("conv.weight"):
            new = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif kind in ("weight", "running_var") and ".bn." in key:
            new = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif kind in ("bias", "running_mean") and ".bn." in key:
            new = 0.1 * torch.randn(shape, generator=g)
        elif key.startswith("fc."):  # the 1008-way logits: in the file, unused for FID
            new = 0.01 * torch.randn(shape, generator=g)
        elif kind == "num_batches_tracked":
            new = value
        else:
            raise AssertionError(f"unexpected Inception state dict entry {key} {tuple(shape)}")
        out[key] = new
    return out


def fid_inception(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`InceptionV3([3])` as pytorch-fid's FID code builds it, loading `state_dict` strictly.

    pytorch-fid downloads its weights inside the constructor; this hands it `state_dict` in
    place of that download (and checks it asked for the published file).
    """
    fid = upstream()

    def load(url, progress=True):
        assert url == fid.FID_WEIGHTS_URL, url
        return state_dict

    download, fid.load_state_dict_from_url = fid.load_state_dict_from_url, load
    try:
        model = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid.load_state_dict_from_url = download
    return model.eval()


def pool3(model: torch.nn.Module, images_NHWC: np.ndarray) -> np.ndarray:
    """f32[N, 2048] as pytorch-fid's `get_activations` computes them from uint8 RGB images."""
    x = torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float() / 255.0  # its ToTensor
    with torch.no_grad():
        pred = model(x)[0]
    return pred.squeeze(3).squeeze(2).numpy()
