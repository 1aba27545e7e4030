"""The core runs without PyTorch; what needs it says which extra to install, no traceback."""

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser, DenoiserConfig

# A meta-path hook that makes the torch side uninstallable, as on a core-only install.
NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""

PIXEL_MODEL = DenoiserConfig(
    latent_size=8,
    latent_channels=3,
    width=64,
    depth=1,
    noise_embed_dims=16,
    text_dim=8,
    head_dim=32,
    cross_heads=2,
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def pixel_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "pixel"
    weights.save(str(path), PIXEL_MODEL, weights.model_arrays(Denoiser(PIXEL_MODEL, nnx.Rngs(0))))
    return str(path)


def test_core_imports_and_samples_from_given_embeddings_without_torch(pixel_weights, tmp_path):
    code = """
import numpy as np
import at1_jax.train.trainer, at1_jax.generate.cli, at1_jax.evaluate.cli, at1_jax.bench.benchmarks
from at1_jax.decode.pixels import make_decoder, resolve_decode
from at1_jax.checkpointing.load import load_model
from at1_jax.generate.pipeline import Denoising
from at1_jax.model.samplers import SamplerConfig
model, facts = load_model(sys.argv[1])
x0 = Denoising(model, 2).latents(np.ones((3, 8), np.float32), [1, 2, 3], SamplerConfig(steps=2))
imgs = make_decoder(resolve_decode(facts, 3, "jax", None, None), 2)(x0)
np.save(sys.argv[2], imgs)
assert not any(m in sys.modules for m in ("torch", "transformers", "diffusers"))
"""
    out = tmp_path / "imgs.npy"
    r = _run(code, pixel_weights, str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    imgs = np.load(out)
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.uint8 and imgs.std() > 0


def test_uncached_prompt_without_torch_names_the_extra(pixel_weights, tmp_path):
    encoder = tmp_path / "minilm"  # present on disk: only PyTorch is missing
    encoder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (encoder / name).write_text("{}")
    code = """
from at1_jax.generate.cli import main
sys.exit(main(["--checkpoint", sys.argv[1], "--prompt", "a red square", "--vae", "pixel",
               "--text-encoder", "sentence=" + sys.argv[2] + "/minilm", "--cache-dir", sys.argv[2],
               "--out", sys.argv[2] + "/out", "--steps", "2"]))
"""
    r = _run(code, pixel_weights, str(tmp_path))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    assert "prompt encoding needs PyTorch" in r.stderr and "at1-jax[data]" in r.stderr


def test_clip_score_without_torch_names_the_extra():
    code = """
from at1_jax import torch_bridge
try:
    torch_bridge.clip_embedder("openai/clip")
except torch_bridge.MissingExtra as e:
    print(e)
"""
    r = _run(code)
    assert "the CLIP score needs PyTorch (torch is not installed)" in r.stdout, r.stderr
