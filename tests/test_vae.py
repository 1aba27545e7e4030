"""Parity of the Flax AutoencoderKL decoder with diffusers (fp32) and its weight-loading errors."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from diffusers import AutoencoderKL
from flax import nnx

from at1_jax.decode.vae import GroupNorm, VAEConfig, VAEDecoder
from at1_jax.decode.vae_weights import load_vae_decoder

TINY = {
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
}

# fp32 parity bound, relative to the output's peak |value|. Torch and XLA convolve and reduce
# in different orders, so each of the ~25 sequential layers (reductions of <= 144 terms, group
# norms that divide by the group std) adds a few ulp (eps = 1.2e-7); ~100 ulp of the output
# scale is the budget. Measured ~1.5e-6 here; any real porting bug (a wrong eps, scale, skip
# or transpose) shows as >= 1e-3.
RTOL_FP32 = 1e-5


def _tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """A random tiny diffusers VAE; norms get random affine params so their mapping is tested."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def _torch_decode(vae: AutoencoderKL, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z)).sample.numpy()


def _assert_parity(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    bound = RTOL_FP32 * float(np.max(np.abs(ref)))
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch vae, saved folder, latents): non-square latents catch H/W transposes."""
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    vae = _tiny_vae()
    vae.save_pretrained(folder)  # safetensors
    z = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)
    return vae, folder, z


def test_decode_matches_diffusers_fp32(tiny):
    vae, folder, z = tiny
    model, cfg = load_vae_decoder(folder)
    assert cfg.block_out_channels == (8, 16, 16, 16) and cfg.use_post_quant_conv
    ref = _torch_decode(vae, z)
    out = model.decode(z)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 48, 40)
    _assert_parity(out, ref)

    images = model.decode_to_images(z)
    ref_images = np.clip(ref / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(images, ref_images, rtol=0, atol=RTOL_FP32 * np.abs(ref).max())
    u8 = model.decode_to_images(z, uint8=True)
    assert u8.dtype == jnp.uint8 and u8.shape == (2, 48, 40, 3)
    # Rounding can flip only where the float error straddles a .5 boundary.
    assert np.max(np.abs(u8.astype(int) - np.round(ref_images * 255).astype(int))) <= 1


def test_unscale_with_shift_factor_sd3_like(tiny, tmp_path):
    vae, folder, z = tiny
    shutil.copytree(folder, tmp_path / "v")
    cfg_path = tmp_path / "v" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(scaling_factor=1.5305, shift_factor=0.0609)
    cfg_path.write_text(json.dumps(cfg))
    model, _ = load_vae_decoder(tmp_path / "v")
    ref = _torch_decode(vae, z / 1.5305 + 0.0609)
    _assert_parity(model.decode(z, unscale=True), ref)


def test_no_mid_attention_no_post_quant_conv(tmp_path):
    vae = _tiny_vae(1, mid_block_add_attention=False, use_post_quant_conv=False, latent_channels=8)
    vae.save_pretrained(tmp_path)
    model, cfg = load_vae_decoder(tmp_path)
    assert not cfg.mid_block_add_attention and not cfg.use_post_quant_conv
    assert model.post_quant_conv is None and model.decoder.mid_block.attentions is None
    z = np.random.default_rng(1).standard_normal((1, 8, 4, 7)).astype(np.float32)
    _assert_parity(model.decode(z), _torch_decode(vae, z))


def test_old_attention_names_and_bin(tiny, tmp_path):
    vae, folder, z = tiny
    ref = np.asarray(load_vae_decoder(folder)[0].decode(z))
    sd = safetensors.numpy.load_file(folder / "diffusion_pytorch_model.safetensors")
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, o in new_to_old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        old[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    (tmp_path / "old").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "old")
    safetensors.numpy.save_file(old, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(load_vae_decoder(tmp_path / "old")[0].decode(z), ref)

    vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "diffusion_pytorch_model.safetensors").exists()
    np.testing.assert_array_equal(load_vae_decoder(tmp_path / "bin")[0].decode(z), ref)


def test_bf16_weights(tiny, tmp_path):
    vae, folder, z = tiny
    # safetensors.numpy has no BF16, so this goes through the loader's direct reader.
    bf16 = {k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()}
    safetensors.torch.save_file(bf16, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    model, _ = load_vae_decoder(tmp_path, dtype=jnp.bfloat16)
    w = vae.decoder.conv_in.weight.detach().to(torch.bfloat16).float().numpy()
    kernel = np.asarray(model.decoder.conv_in.kernel[...].astype(jnp.float32))
    np.testing.assert_array_equal(kernel, w.transpose(2, 3, 1, 0))
    out = np.asarray(model.decode(z))
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_group_norm_matches_torch_small_variance():
    # Group variance ~1e-6 = eps makes the epsilon visible (eps=1e-5 would be off by ~2x).
    x = np.random.default_rng(2).standard_normal((2, 16, 5, 3)).astype(np.float32) * 1e-3
    tn = torch.nn.GroupNorm(8, 16, eps=1e-6)
    with torch.no_grad():
        tn.weight.normal_()
        tn.bias.normal_()
        ref = tn(torch.from_numpy(x)).numpy()
    gn = GroupNorm(16, 8)
    gn.scale[...] = jnp.asarray(tn.weight.detach().numpy())
    gn.bias[...] = jnp.asarray(tn.bias.detach().numpy())
    out = np.asarray(gn(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_missing_weights_file_names_it(tiny, tmp_path):
    _, folder, _ = tiny
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        load_vae_decoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae_decoder(tmp_path / "nope" / "vae")


def test_offline_hub_id_says_which_files(tmp_path):
    with pytest.raises(
        OSError, match=r"vae/config\.json.*vae/diffusion_pytorch_model\.safetensors"
    ):
        load_vae_decoder("no-such-org/no-such-vae", subfolder="vae")


def _write_weights(src, dst, sd):
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    safetensors.numpy.save_file(sd, dst / "diffusion_pytorch_model.safetensors")


def test_bad_weights_name_the_key(tiny, tmp_path):
    _, folder, _ = tiny
    sd = safetensors.numpy.load_file(folder / "diffusion_pytorch_model.safetensors")

    missing = dict(sd)
    del missing["decoder.up_blocks.1.resnets.0.norm2.bias"]
    _write_weights(folder, tmp_path / "missing", missing)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.0\.norm2"):
        load_vae_decoder(tmp_path / "missing")

    shaped = dict(sd)
    shaped["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    _write_weights(folder, tmp_path / "shape", shaped)
    with pytest.raises(ValueError, match=r"wrong shapes: decoder\.conv_out\.weight \(expected"):
        load_vae_decoder(tmp_path / "shape")

    extra = {**sd, "decoder.mid_block.extra.weight": np.zeros(3, np.float32)}
    _write_weights(folder, tmp_path / "extra", extra)
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.mid_block\.extra\.weight"):
        load_vae_decoder(tmp_path / "extra")


SDXL_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "shift_factor": None,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD3_CONFIG = {
    **SDXL_CONFIG,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
}


@pytest.mark.parametrize("raw", [SDXL_CONFIG, SD3_CONFIG], ids=["sdxl", "sd3"])
def test_full_size_configs_parse_and_match_diffusers_keys(raw):
    cfg = VAEConfig.from_dict(raw)
    assert cfg.shift_factor == raw["shift_factor"] and cfg.upscale_factor == 8
    assert cfg.use_post_quant_conv == raw.get("use_post_quant_conv", True)
    # Full-size key/shape check without allocating: flax abstract vs torch on the meta device.
    abstract = nnx.eval_shape(lambda: VAEDecoder(cfg, rngs=nnx.Rngs(0)))
    ours = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        *mods, leaf = (str(p) for p in path)
        shape = var.get_value().shape
        shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: s[::-1]}.get(
            len(shape), lambda s: s
        )(tuple(shape))
        ours[".".join([*mods, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])] = shape
    with torch.device("meta"):
        tvae = AutoencoderKL.from_config({k: v for k, v in raw.items() if not k.startswith("_")})
    theirs = {
        k: tuple(v.shape)
        for k, v in tvae.state_dict().items()
        if k.startswith(("decoder.", "post_quant_conv."))
    }
    assert ours == theirs


def test_config_errors():
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        VAEConfig.from_dict({**SDXL_CONFIG, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        VAEConfig.from_dict({**SDXL_CONFIG, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="AutoencoderKL"):
        VAEConfig.from_dict({**SDXL_CONFIG, "_class_name": "AutoencoderTiny"})


def test_module_does_not_import_torch():
    code = "import sys, at1_jax.decode.vae_weights; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
