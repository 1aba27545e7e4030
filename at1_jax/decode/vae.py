"""Flax NNX port of the diffusers `AutoencoderKL` decoder (with `post_quant_conv`).

diffusers >= 0.40 ships no Flax models, so sampled latents are decoded here, in JAX, with the
PyTorch weights of any diffusers `AutoencoderKL` (SD 1.x/2.x, SDXL, SD3, FLUX-style VAEs).

Layout: the public API takes latents NCHW `(B, C, h, w)` like diffusers; modules run NHWC
inside. `decode` returns NCHW like `AutoencoderKL.decode(z).sample` (roughly in [-1, 1]);
`decode_to_images` returns NHWC in [0, 1] (float32) or uint8, ready to save.

Scaling: diffusion models are trained on `(z - shift_factor) * scaling_factor`. `decode` and
`decode_to_images` undo that only when called with `unscale=True`; by default the latents are
fed to the decoder as given (the raw-VAE-latent convention of `AutoencoderKL.decode`).

Weights: `at1_jax.decode.vae_weights.load_vae_decoder` reads a diffusers folder or hub id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

CONFIG_NAME = "config.json"

# Every GroupNorm of the diffusers VAE decoder uses eps=1e-6 (resnets, attention, conv_norm_out).
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The decoder-relevant fields of a diffusers `AutoencoderKL` config.json."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        # diffusers maps both names to nn.SiLU; anything else would need a different activation.
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAEConfig: act_fn={self.act_fn!r} is not supported (only 'silu').")
        if not self.block_out_channels:
            raise ValueError("VAEConfig: block_out_channels is empty.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: block_out_channels {bad} not divisible by norm_num_groups "
                f"{self.norm_num_groups}."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Builds a config from a diffusers config dict; missing keys take diffusers' defaults."""
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(
                f"VAEConfig: expected an AutoencoderKL config, got _class_name={class_name!r}."
            )
        up_types = d.get("up_block_types")
        if up_types is not None and any(t != "UpDecoderBlock2D" for t in up_types):
            raise ValueError(
                f"VAEConfig: only UpDecoderBlock2D up blocks are ported, got {up_types}."
            )
        if up_types is not None and len(up_types) != len(d.get("block_out_channels", (64,))):
            raise ValueError("VAEConfig: up_block_types and block_out_channels differ in length.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        """Reads a diffusers `config.json`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def upscale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------- modules


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC; statistics in float32 with the two-pass variance."""

    def __init__(self, num_channels: int, num_groups: int, *, param_dtype=jnp.float32, dtype=None):
        self.num_groups = num_groups
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        g = self.num_groups
        x = x_BHWC.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
        # Two-pass (centred) variance as torch does; E[x^2]-E[x]^2 loses digits on large means.
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + _NORM_EPS)).reshape(b, h, w, c)
        x = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype or x_BHWC.dtype)


def _conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, **kw) -> nnx.Conv:
    """A stride-1 conv padded like torch `padding=k // 2`."""
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), padding=((p, p), (p, p)), rngs=rngs, **kw)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding (temb=None, output_scale_factor=1)."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, **kw):
        nkw = {"param_dtype": kw["param_dtype"], "dtype": kw["dtype"]}
        self.norm1 = GroupNorm(cin, groups, **nkw)
        self.conv1 = _conv(cin, cout, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(cout, groups, **nkw)
        self.conv2 = _conv(cout, cout, 3, rngs=rngs, **kw)
        # A 1x1 projection on the skip path only when the width changes, as in diffusers.
        self.conv_shortcut = _conv(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout is 0 in the VAE
        skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
        return skip + h


class Attention(nnx.Module):
    """The VAE mid-block self-attention: group norm, one head of full width, residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, **kw):
        self.group_norm = GroupNorm(
            channels, groups, param_dtype=kw["param_dtype"], dtype=kw["dtype"]
        )
        self.to_q = nnx.Linear(channels, channels, rngs=rngs, **kw)
        self.to_k = nnx.Linear(channels, channels, rngs=rngs, **kw)
        self.to_v = nnx.Linear(channels, channels, rngs=rngs, **kw)
        # A list so the parameter path reads `to_out.0`, as in diffusers (index 1 is dropout).
        self.to_out = nnx.List([nnx.Linear(channels, channels, rngs=rngs, **kw)])
        self.precision = kw.get("precision")

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        x_BLC = self.group_norm(x_BHWC).reshape(b, h * w, c)
        q_BLC, k_BLC, v_BLC = self.to_q(x_BLC), self.to_k(x_BLC), self.to_v(x_BLC)
        # heads = channels // attention_head_dim = 1, so the softmax scale is 1/sqrt(channels).
        logits_BLL = jnp.einsum(
            "bqc,bkc->bqk",
            q_BLC,
            k_BLC,
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        # Softmax in float32 (diffusers builds this block with upcast_softmax=True).
        probs_BLL = jax.nn.softmax(logits_BLL * (c**-0.5), axis=-1).astype(v_BLC.dtype)
        o_BLC = jnp.einsum("bqk,bkc->bqc", probs_BLL, v_BLC, precision=self.precision)
        o_BHWC = self.to_out[0](o_BLC).reshape(b, h, w, c)
        return o_BHWC + x_BHWC  # residual_connection=True, rescale_output_factor=1


class UNetMidBlock2D(nnx.Module):
    """resnet, [attention], resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs, **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, groups, rngs=rngs, **kw) for _ in range(2)]
        )
        self.attentions = (
            nnx.List([Attention(channels, groups, rngs=rngs, **kw)]) if add_attention else None
        )

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = self.resnets[0](x_BHWC)
        if self.attentions is not None:
            x_BHWC = self.attentions[0](x_BHWC)
        return self.resnets[1](x_BHWC)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (as F.interpolate(scale_factor=2)) followed by a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, **kw):
        self.conv = _conv(channels, channels, 3, rngs=rngs, **kw)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return self.conv(x_BHWC)


class UpDecoderBlock2D(nnx.Module):
    """layers_per_block + 1 resnets, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, add_upsample: bool, *, rngs, **kw):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if i == 0 else cout, cout, groups, rngs=rngs, **kw)
                for i in range(n)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs, **kw)]) if add_upsample else None

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x_BHWC = resnet(x_BHWC)
        if self.upsamplers is not None:
            x_BHWC = self.upsamplers[0](x_BHWC)
        return x_BHWC


class Decoder(nnx.Module):
    """diffusers `vae.Decoder` with norm_type='group'."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, **kw):
        chans = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, chans[-1], 3, rngs=rngs, **kw)
        self.mid_block = UNetMidBlock2D(
            chans[-1], groups, cfg.mid_block_add_attention, rngs=rngs, **kw
        )
        rev = list(reversed(chans))
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    rev[max(i - 1, 0)],
                    rev[i],
                    cfg.layers_per_block + 1,
                    groups,
                    add_upsample=i < len(rev) - 1,
                    rngs=rngs,
                    **kw,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(
            chans[0], groups, param_dtype=kw["param_dtype"], dtype=kw["dtype"]
        )
        self.conv_out = _conv(chans[0], cfg.out_channels, 3, rngs=rngs, **kw)

    def __call__(self, z_BHWC: jax.Array) -> jax.Array:
        x = self.conv_in(z_BHWC)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAEDecoder(nnx.Module):
    """`post_quant_conv` + `decoder` of a diffusers AutoencoderKL; attribute paths = its keys."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision}
        c = config.latent_channels
        self.post_quant_conv = (
            _conv(c, c, 1, rngs=rngs, **kw) if config.use_post_quant_conv else None
        )
        self.decoder = Decoder(config, rngs=rngs, **kw)

    def __call__(self, z_BHWC: jax.Array) -> jax.Array:
        """Raw decode, NHWC in, NHWC out (no unscaling, no clipping)."""
        if self.post_quant_conv is not None:
            z_BHWC = self.post_quant_conv(z_BHWC)
        return self.decoder(z_BHWC)

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Undoes the diffusion-space scaling: `latents / scaling_factor + shift_factor`."""
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift

    def decode(self, latents_BCHW: jax.Array, *, unscale: bool = False) -> jax.Array:
        """NCHW latents -> NCHW float32 images in ~[-1, 1], like `AutoencoderKL.decode(z).sample`.

        `unscale=True` first applies `latents / scaling_factor + shift_factor` (for latents taken
        from a diffusion sampler); `unscale=False` decodes the latents as given.
        """
        return _decode_jit(self, jnp.asarray(latents_BCHW), unscale=unscale, out="nchw")

    def decode_to_images(
        self, latents_BCHW: jax.Array, *, unscale: bool = False, uint8: bool = False
    ) -> jax.Array:
        """NCHW latents -> NHWC images in [0, 1] (float32), or uint8 in [0, 255] if `uint8`."""
        out = "uint8" if uint8 else "unit"
        return _decode_jit(self, jnp.asarray(latents_BCHW), unscale=unscale, out=out)


@functools.partial(nnx.jit, static_argnames=("unscale", "out"))
def _decode_jit(
    model: VAEDecoder, latents_BCHW: jax.Array, *, unscale: bool, out: str
) -> jax.Array:
    """The whole decode under one jit: unscale, NCHW->NHWC, decoder, output layout."""
    cfg = model.config
    if latents_BCHW.ndim != 4 or latents_BCHW.shape[1] != cfg.latent_channels:
        raise ValueError(
            f"expected latents (B, {cfg.latent_channels}, h, w), got {tuple(latents_BCHW.shape)}"
        )
    z = latents_BCHW.astype(jnp.float32)
    if unscale:
        z = model.unscale_latents(z)
    z_BHWC = jnp.transpose(z, (0, 2, 3, 1)).astype(model.decoder.conv_in.kernel.dtype)
    x_BHWC = model(z_BHWC).astype(jnp.float32)
    if out == "nchw":
        return jnp.transpose(x_BHWC, (0, 3, 1, 2))
    images_BHWC = jnp.clip(x_BHWC / 2 + 0.5, 0.0, 1.0)
    if out == "uint8":
        # Same rounding as diffusers' VaeImageProcessor.numpy_to_pil.
        return jnp.round(images_BHWC * 255.0).astype(jnp.uint8)
    return images_BHWC
