"""The AT-1 / TLD latent transformer denoiser in Flax NNX (see shared spec, section 2)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from at1_jax.model.depthwise import depthwise_conv3x3_gelu
from at1_jax.model.hardware import resolve_dtype

BLOCKS = ("prenorm", "legacy")
ATTENTION = ("auto", "xla", "cudnn")
DEPTHWISE = ("auto", "conv", "shift", "native")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LN_EPS = 1e-5  # PyTorch's default; flax's is 1e-6.
F32 = jnp.float32
# Fields that change how the model computes, not which weights it has.
NUMERICS = ("dtype", "remat", "scan_blocks", "attention", "depthwise", "dropout")


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Sizes and numerics of the denoiser; `presets.PRESETS` names the published ones."""

    latent_size: int = 32
    latent_channels: int = 4
    patch_size: int = 2
    width: int = 512
    depth: int = 6
    noise_embed_dims: int = 128
    text_dim: int = 768
    mlp_mult: int = 4
    cross_heads: int | None = 4  # None: as many as self-attention, as in TLD's prenorm code.
    # TLD's rule: width // head_dim heads of width / heads channels (width 96: one head of 96).
    head_dim: int = 64
    block: str = "legacy"
    dropout: float = 0.0
    # Compute dtype; parameters are always float32. "auto": bfloat16 where the hardware has
    # fast bfloat16 dot products (GPU, TPU, CPUs with AVX512_BF16/AMX), else float32.
    dtype: str = "float32"
    remat: bool = False
    # One lax.scan over the blocks: the model compiles in nearly constant time whatever the
    # depth (xl-600m's train step: 54 → 39 s on CPU, its fwd+bwd 14 → 6 s) for a stacked copy
    # of the block weights in each step.
    scan_blocks: bool = False
    attention: str = "auto"
    depthwise: str = "auto"

    def __post_init__(self):
        for name in ("latent_size", "latent_channels", "patch_size", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("noise_embed_dims", "text_dim", "mlp_mult", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"model.latent_size={self.latent_size} is not a multiple of "
                f"model.patch_size={self.patch_size}"
            )
        if self.width < self.head_dim:
            raise ValueError(
                f"model.width={self.width} is smaller than model.head_dim={self.head_dim}: "
                "TLD's rule (heads = width // head_dim) would give no attention head"
            )
        if self.width % self.self_heads:
            raise ValueError(
                f"model.width={self.width} does not split into {self.self_heads} equal heads "
                f"(TLD's rule: heads = model.width // model.head_dim={self.head_dim}); use a "
                f"width that {self.self_heads} divides, e.g. {self.self_heads * self.head_dim}"
            )
        if self.noise_embed_dims % 2:
            raise ValueError(f"model.noise_embed_dims must be even, got {self.noise_embed_dims}")
        if self.cross_heads is not None and (self.cross_heads < 1 or self.width % self.cross_heads):
            raise ValueError(
                f"model.cross_heads={self.cross_heads} must divide model.width={self.width}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (
            ("block", BLOCKS),
            ("attention", ATTENTION),
            ("depthwise", DEPTHWISE),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    def architecture(self) -> DenoiserConfig:
        """This config with the numerics options at their defaults: what the weights fit."""
        return dataclasses.replace(self, **{k: getattr(DenoiserConfig, k) for k in NUMERICS})

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def self_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def head_size(self) -> int:
        """Channels per self-attention head: head_dim when it divides the width (TLD's rule)."""
        return self.width // self.self_heads

    @property
    def n_cross_heads(self) -> int:
        return self.cross_heads or self.self_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(resolve_dtype(self.dtype))


class Buffer(nnx.Variable):
    """A non-trainable array that travels with the weights (PyTorch's register_buffer)."""


def angular_speeds(noise_embed_dims: int) -> np.ndarray:
    """2π·f for F/2 frequencies spaced geometrically in [1, 1000], computed in float64."""
    freqs = np.exp(np.linspace(math.log(1.0), math.log(1000.0), noise_embed_dims // 2))
    return (2.0 * math.pi * freqs).astype(np.float32)


def _torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init, U(±1/sqrt(fan_in)), for weights and biases alike."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _matmul(a, b, dims, dtype):
    """dot_general of `a` and `b` cast to `dtype`, accumulated and returned in float32."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense(x, kernel, bias, dtype):
    """x·kernel + bias on `dtype` operands with float32 accumulation; the result in `dtype`.

    XLA:CPU runs a bf16 dot with a bf16 result as a float32 dot; asking for a float32
    result keeps its bf16 dot-product path (~2× faster). The hand-written VJP keeps the two
    gradient products in that form, returns the kernel gradient unrounded in float32, and
    takes the bias gradient as a matrix-vector product (XLA:CPU column sums are slow).
    """
    y = _matmul(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), dtype)
    return (y if bias is None else y + bias).astype(dtype)


def _dense_fwd(x, kernel, bias, dtype):
    return dense(x, kernel, bias, dtype), (x, kernel, bias)


def _dense_bwd(dtype, res, dy):
    x, kernel, bias = res
    dx = _matmul(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), dtype).astype(x.dtype)
    # Contracting all leading axes rather than reshaping to (N, C): merging a batch-split
    # axis on a (data, fsdp) mesh made XLA's SPMD partitioner replicate the gradient.
    lead = tuple(range(x.ndim - 1))
    dk = _matmul(x, dy, ((lead, lead), ((), ())), dtype).astype(kernel.dtype)
    db = None if bias is None else jnp.sum(dy, axis=lead, dtype=F32).astype(bias.dtype)
    return dx, dk, db


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nnx.Linear):
    """nnx.Linear (the same parameters and layout) computed by `dense`."""

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        return dense(x, self.kernel[...], bias, dtype)


def _linear(cfg, n_in, n_out, axes, rngs, use_bias=True) -> Dense:
    return Dense(
        n_in,
        n_out,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        kernel_init=_torch_uniform(n_in),
        bias_init=_torch_uniform(n_in),
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": axes[1:]},
        rngs=rngs,
    )


def _layer_norm(cfg, n, axis, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        n,
        epsilon=LN_EPS,
        dtype=cfg.compute_dtype,
        use_fast_variance=False,  # E[x²]−E[x]² loses ~1e-4 against PyTorch in fp32.
        scale_metadata={"logical_axes": (axis,)},
        bias_metadata={"logical_axes": (axis,)},
        rngs=rngs,
    )


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _heads_first(x_BTE, n_heads: int, strided: bool):
    """(B, T, E) → (B, N, T, H); strided: channel c goes to head c mod N (legacy layout)."""
    B, T, E = x_BTE.shape
    if strided:
        return x_BTE.reshape(B, T, E // n_heads, n_heads).transpose(0, 3, 1, 2)
    return x_BTE.reshape(B, T, n_heads, E // n_heads).transpose(0, 2, 1, 3)


def _merge_heads(x_BNTH, strided: bool):
    """Inverse of `_heads_first`: (B, N, T, H) → (B, T, E)."""
    B, N, T, H = x_BNTH.shape
    order = (0, 2, 3, 1) if strided else (0, 2, 1, 3)
    return x_BNTH.transpose(order).reshape(B, T, N * H)


def attention_impl(impl: str, q_BNTH) -> str:
    """The kernel `impl` means for these queries: "auto" picks cuDNN where it applies."""
    if impl != "auto":
        return impl
    half = q_BNTH.dtype in (jnp.bfloat16, jnp.float16)
    # cuDNN's fused kernel takes head sizes that are multiples of 8 up to 128 (256 on Hopper).
    size_ok = q_BNTH.shape[-1] % 8 == 0 and q_BNTH.shape[-1] <= 128
    return "cudnn" if jax.default_backend() == "gpu" and half and size_ok else "xla"


def _attend(q_BNTH, k_BNSH, v_BNSH, impl: str):
    impl = attention_impl(impl, q_BNTH)
    if impl == "xla":
        return softmax_attention(q_BNTH, k_BNSH, v_BNSH)
    # jax.nn.dot_product_attention takes (B, T, N, H).
    q, k, v = (t.swapaxes(1, 2) for t in (q_BNTH, k_BNSH, v_BNSH))
    return jax.nn.dot_product_attention(q, k, v, implementation=impl).swapaxes(1, 2)


def _einsum(spec, a, b):
    """einsum accumulated and returned in float32; on CPU of float32 operands.

    XLA:CPU sends a bf16 batched dot whose layout its YNNPACK path rejects to a kernel that
    has no bf16 (the step fails with "Unsupported element type for DotThunk"); attention's
    layouts depend on the surrounding graph, so they go as float32 (the attention products
    are ~10% of the step's FLOPs).
    """
    if jax.default_backend() == "cpu":
        a, b = a.astype(F32), b.astype(F32)
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


@jax.custom_vjp
def softmax_attention(q_BNTH, k_BNSH, v_BNSH):
    """softmax(q·kᵀ/√H)·v with float32 scores and softmax; the result in q's dtype.

    jax.nn.dot_product_attention's "xla" formula with a hand-written VJP (~30% faster on
    XLA:CPU, less memory), heads first so that every product is a plain batched matmul
    (with heads after the tokens XLA:CPU ran some of them at a tenth of the matmul speed).
    Every product accumulates in float32 (`_einsum`); the backward pass reuses the saved
    probabilities and takes the softmax gradient's row term from rowsum(dO·O).
    """
    return _attention_fwd(q_BNTH, k_BNSH, v_BNSH)[0]


def _attention_fwd(q_BNTH, k_BNSH, v_BNSH):
    scale = 1.0 / math.sqrt(q_BNTH.shape[-1])
    s_BNTS = _einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH) * scale
    p_BNTS = jax.nn.softmax(s_BNTS, axis=-1).astype(q_BNTH.dtype)
    o_BNTH = _einsum("bnts,bnsh->bnth", p_BNTS, v_BNSH).astype(q_BNTH.dtype)
    return o_BNTH, (q_BNTH, k_BNSH, v_BNSH, p_BNTS, o_BNTH)


def _attention_bwd(res, do_BNTH):
    q, k, v, p_BNTS, o_BNTH = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = _einsum("bnts,bnth->bnsh", p_BNTS, do_BNTH)
    dp_BNTS = _einsum("bnth,bnsh->bnts", do_BNTH, v)
    # Σ_s p·dp over the keys equals Σ_h dO·O over the head: a (B,N,T) pass, not a (B,N,T,S).
    row_BNT = jnp.sum(do_BNTH.astype(F32) * o_BNTH.astype(F32), axis=-1)
    ds_BNTS = (p_BNTS.astype(F32) * (dp_BNTS - row_BNT[..., None]) * scale).astype(q.dtype)
    dq = _einsum("bnts,bnsh->bnth", ds_BNTS, k)
    dk = _einsum("bnts,bnth->bnsh", ds_BNTS, q)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection and no output projection."""

    def __init__(self, cfg: DenoiserConfig, rngs: nnx.Rngs):
        self.qkv_linear = _linear(cfg, cfg.width, 3 * cfg.width, ("embed", "qkv"), rngs, False)
        self.heads = cfg.self_heads
        self.strided = cfg.block == "legacy"
        self.impl = cfg.attention

    def __call__(self, h_BTE):
        q, k, v = jnp.split(self.qkv_linear(h_BTE), 3, axis=-1)
        q, k, v = (_heads_first(t, self.heads, self.strided) for t in (q, k, v))
        return _merge_heads(_attend(q, k, v, self.impl), self.strided)


class CrossAttention(nnx.Module):
    """Attention from image tokens to the two conditioning tokens; no output projection."""

    def __init__(self, cfg: DenoiserConfig, rngs: nnx.Rngs):
        self.q_linear = _linear(cfg, cfg.width, cfg.width, ("embed", "qkv"), rngs, False)
        self.kv_linear = _linear(cfg, cfg.width, 2 * cfg.width, ("embed", "qkv"), rngs, False)
        self.heads = cfg.n_cross_heads
        self.strided = cfg.block == "legacy"
        # Two keys: a fused kernel gains nothing and cuDNN rejects some legacy head sizes.
        self.impl = "xla"

    def __call__(self, h_BTE, ctx_BSE):
        q = _heads_first(self.q_linear(h_BTE), self.heads, self.strided)
        k, v = jnp.split(self.kv_linear(ctx_BSE), 2, axis=-1)
        k, v = (_heads_first(t, self.heads, self.strided) for t in (k, v))
        return _merge_heads(_attend(q, k, v, self.impl), self.strided)


class ConvMLP(nnx.Module):
    """LocalViT MLP: 1×1 conv, depthwise 3×3 conv, exact GELU, 1×1 conv, dropout."""

    def __init__(self, cfg: DenoiserConfig, rngs: nnx.Rngs):
        hidden = cfg.mlp_mult * cfg.width
        self.fc1 = _linear(cfg, cfg.width, hidden, ("embed", "mlp"), rngs)
        init = _torch_uniform(9)
        self.dw_kernel = nnx.Param(
            init(rngs.params(), (3, 3, hidden)), logical_axes=(None, None, "mlp")
        )
        self.dw_bias = nnx.Param(init(rngs.params(), (hidden,)), logical_axes=("mlp",))
        self.fc2 = _linear(cfg, hidden, cfg.width, ("mlp", "embed"), rngs)
        self.grid = cfg.grid
        self.dropout = cfg.dropout
        self.impl = cfg.depthwise

    def __call__(self, h_BTE, dropout_key=None):
        B, T, _ = h_BTE.shape
        x_BTM = self.fc1(h_BTE)
        x_BHWM = x_BTM.reshape(B, self.grid, self.grid, -1)
        w, b = self.dw_kernel[...], self.dw_bias[...]
        x_BHWM = depthwise_conv3x3_gelu(x_BHWM, w, b, self.impl)
        y_BTE = self.fc2(x_BHWM.reshape(B, T, -1))
        if dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, y_BTE.shape)
            y_BTE = jnp.where(keep, y_BTE / (1.0 - self.dropout), 0).astype(y_BTE.dtype)
        return y_BTE


class Block(nnx.Module):
    """Self-attention, cross-attention to the conditioning tokens, conv MLP."""

    def __init__(self, cfg: DenoiserConfig, rngs: nnx.Rngs):
        self.self_attention = SelfAttention(cfg, rngs)
        self.cross_attention = CrossAttention(cfg, rngs)
        self.mlp = ConvMLP(cfg, rngs)
        self.norm1 = _layer_norm(cfg, cfg.width, "embed", rngs)
        self.norm2 = _layer_norm(cfg, cfg.width, "embed", rngs)
        self.norm3 = _layer_norm(cfg, cfg.width, "embed", rngs)
        self.legacy = cfg.block == "legacy"

    def __call__(self, h_BTE, ctx_BSE, dropout_key=None):
        if self.legacy:
            h_BTE = self.norm1(self.self_attention(h_BTE) + h_BTE)
            h_BTE = self.norm2(self.cross_attention(h_BTE, ctx_BSE) + h_BTE)
            return self.norm3(self.mlp(h_BTE, dropout_key) + h_BTE)
        h_BTE = h_BTE + self.self_attention(self.norm1(h_BTE))
        h_BTE = h_BTE + self.cross_attention(self.norm2(h_BTE), ctx_BSE)
        return h_BTE + self.mlp(self.norm3(h_BTE), dropout_key)


class Denoiser(nnx.Module):
    """Predicts the clean latent x0 from (x_noisy, sigma, pooled text vector)."""

    def __init__(self, cfg: DenoiserConfig, rngs: nnx.Rngs):
        E, F, P = cfg.width, cfg.noise_embed_dims, cfg.patch_dim
        self.cfg = cfg
        self.angular_speeds = Buffer(jnp.asarray(angular_speeds(F)), logical_axes=(None,))
        self.noise_fc1 = _linear(cfg, F, E, ("noise_feats", "cond"), rngs)
        self.noise_fc2 = _linear(cfg, E, E, ("cond_hidden", "cond"), rngs)
        self.label_proj = _linear(cfg, cfg.text_dim, E, ("text", "cond"), rngs)
        self.cond_norm = _layer_norm(cfg, E, "cond", rngs)
        # Conv2d(C → C·p·p, kernel p, stride p) acts on each patch alone: a Dense on patches.
        self.patch_conv = _linear(cfg, P, P, ("patch_in", "patch"), rngs)
        self.patch_norm1 = _layer_norm(cfg, P, "patch", rngs)
        self.patch_proj = _linear(cfg, P, E, ("patch", "embed"), rngs)
        self.patch_norm2 = _layer_norm(cfg, E, "embed", rngs)
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_tokens, E)), logical_axes=("tokens", "embed")
        )
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.out_proj = _linear(cfg, E, P, ("embed", "patch"), rngs)

    def _scanned_blocks(self, h_BTE, ctx_BSE, dropout_key):
        """The blocks as one lax.scan over their weights stacked on a leading axis.

        The weights stay one module per block (the checkpoint and PyTorch layout); the
        stack is built inside the step, and its gradient is sliced back to each block.
        """
        split = [nnx.split(block) for block in self.blocks]
        graphdef = split[0][0]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(state for _, state in split))
        body = _scan_body(graphdef, ctx_BSE, dropout_key, self.cfg.remat)
        h_BTE, _ = jax.lax.scan(body, h_BTE, (stacked, jnp.arange(len(split))))
        return h_BTE

    def conditioning(self, sigma_B1, text_BD):
        """The two context tokens [noise, text], layer-normed: (B, 2, E)."""
        phase_BK = sigma_B1.astype(jnp.float32) * self.angular_speeds[...]
        feats_BF = jnp.concatenate([jnp.sin(phase_BK), jnp.cos(phase_BK)], axis=-1)
        noise_BE = self.noise_fc2(_gelu(self.noise_fc1(feats_BF)))
        text_BE = self.label_proj(text_BD)
        return self.cond_norm(jnp.stack([noise_BE, text_BE], axis=1))

    def patchify(self, x_BCHW):
        """(B, C, H, W) → (B, T, C·p·p), tokens row-major, patch vector (C, p-row, p-col)."""
        B, C = x_BCHW.shape[:2]
        p, g = self.cfg.patch_size, self.cfg.grid
        x = x_BCHW.reshape(B, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(B, g * g, C * p * p)

    def unpatchify(self, t_BTP):
        """Inverse of `patchify`."""
        B = t_BTP.shape[0]
        C, p, g = self.cfg.latent_channels, self.cfg.patch_size, self.cfg.grid
        x = t_BTP.reshape(B, g, g, C, p, p).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, g * p, g * p)

    def __call__(self, x_BCHW, sigma_B1, text_BD, *, dropout_key=None):
        cfg = self.cfg
        expected = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if x_BCHW.shape[1:] != expected:
            raise ValueError(f"latent shape {x_BCHW.shape[1:]} != model's (C, H, W) {expected}")
        dtype = cfg.compute_dtype
        ctx_BSE = self.conditioning(sigma_B1, text_BD.astype(dtype))
        h = self.patch_norm1(self.patch_conv(self.patchify(x_BCHW.astype(dtype))))
        h_BTE = self.patch_norm2(self.patch_proj(h)) + self.pos_embed[...].astype(dtype)
        if cfg.scan_blocks:
            h_BTE = self._scanned_blocks(h_BTE, ctx_BSE, dropout_key)
        else:
            call = nnx.remat(Block.__call__) if cfg.remat else Block.__call__
            for i, block in enumerate(self.blocks):
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
                h_BTE = call(block, h_BTE, ctx_BSE, key)
        return self.unpatchify(self.out_proj(h_BTE)).astype(jnp.float32)


def _scan_body(graphdef, ctx_BSE, dropout_key, remat: bool):
    """One block as a lax.scan step: (h, (block state, index)) → (h, None)."""

    def body(h_BTE, xs):
        state, i = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        return nnx.merge(graphdef, state)(h_BTE, ctx_BSE, key), None

    return jax.checkpoint(body) if remat else body


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (buffers such as angular_speeds are not counted)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
