"""Denoiser: sizes, config validation, numerics options, jit and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from at1_jax.model.denoiser import F32, Denoiser, Dense, count_params, dense
from at1_jax.model.presets import PRESETS, get_preset
from at1_jax.train import sharding

TINY = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32)


def _inputs(cfg, batch=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size))
    sigma = jax.random.uniform(k[1], (batch, 1), minval=0.05, maxval=0.95)
    return x, sigma, jax.random.normal(k[2], (batch, cfg.text_dim))


@pytest.mark.parametrize(
    "name,count", [("tld-tiny", 868_800), ("at1", 23_049_536), ("tld-101m", 101_164_352)]
)
def test_parameter_counts_match_spec(name, count):
    model = nnx.eval_shape(lambda: Denoiser(PRESETS[name], nnx.Rngs(0)))
    assert count_params(model) == count


def test_xl_preset_is_about_600m_and_follows_the_size_formula():
    cfg = PRESETS["xl-600m"]
    E, L, F, P, T = cfg.width, cfg.depth, cfg.noise_embed_dims, cfg.patch_dim, cfg.num_tokens
    H = cfg.mlp_mult * E
    block = 6 * E * E + (E * H + H) + (9 * H + H) + (H * E + E) + 6 * E
    outer = (F * E + E) + (E * E + E) + (cfg.text_dim * E + E) + 2 * E  # cond MLP, text, norm
    outer += (P * P + P) + 2 * P + (P * E + E) + 2 * E + T * E + (E * P + P)  # patch in/out
    model = nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0)))
    assert count_params(model) == L * block + outer
    assert 0.55e9 < count_params(model) < 0.65e9


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("latent_size", 15, "not a multiple of model.patch_size"),
        ("width", 32, "smaller than model.head_dim=64"),
        ("width", 200, "does not split into 3 equal heads"),
        ("cross_heads", 3, "must divide model.width"),
        ("block", "postnorm", "model.block must be one of"),
        ("dropout", 1.0, "model.dropout must be in [0, 1)"),
        ("dtype", "float8", "model.dtype must be one of"),
        ("depth", 0, "model.depth must be >= 1"),
    ],
)
def test_bad_config_names_the_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=r"model\." + field) as err:
        dataclasses.replace(TINY, **{field: value})
    assert message in str(err.value) and str(value) in str(err.value)


@pytest.mark.parametrize(
    "width,heads,size", [(96, 1, 96), (100, 1, 100), (160, 2, 80), (192, 3, 64), (512, 8, 64)]
)
def test_widths_follow_tlds_head_rule(width, heads, size):
    """TLD has width // 64 heads of width / heads channels: width 96 is one head of 96."""
    cfg = dataclasses.replace(TINY, width=width)
    assert (cfg.self_heads, cfg.head_size, cfg.n_cross_heads) == (heads, size, heads)
    model = Denoiser(cfg, nnx.Rngs(0))
    assert model(*_inputs(cfg)).shape == (4, 4, 8, 8)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known: at1, tld-101m, tld-tiny, xl-600m"):
        get_preset("at2")


def test_wrong_latent_shape_is_a_clear_error():
    model = Denoiser(TINY, nnx.Rngs(0))
    _x, s, t = _inputs(TINY)
    with pytest.raises(ValueError, match=r"latent shape \(4, 16, 16\)"):
        model(jnp.zeros((4, 4, 16, 16)), s, t)


@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_jit_matches_eager(block):
    cfg = dataclasses.replace(TINY, block=block, cross_heads=4 if block == "legacy" else None)
    model = Denoiser(cfg, nnx.Rngs(1))
    x, s, t = _inputs(cfg)
    eager = model(x, s, t)
    jitted = nnx.jit(lambda m, *a: m(*a))(model, x, s, t)
    # Same ops, fused differently: fp32 reassociation over ≤512-term sums, ~1e-6 relative.
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-5 * float(jnp.abs(eager).max()))


def test_output_depends_on_each_input():
    model = Denoiser(TINY, nnx.Rngs(0))
    x, s, t = _inputs(TINY)
    base = model(x, s, t)
    for changed in (model(x + 0.1, s, t), model(x, s * 0.5, t), model(x, s, t + 1.0)):
        assert float(jnp.abs(changed - base).max()) > 1e-3


@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_remat_gives_the_same_loss_and_gradients(block):
    cfg = dataclasses.replace(TINY, block=block, cross_heads=4 if block == "legacy" else None)
    x, s, t = _inputs(cfg)

    def loss_and_grads(c):
        model = Denoiser(c, nnx.Rngs(2))
        return nnx.value_and_grad(lambda m: jnp.mean(m(x, s, t) ** 2))(model)

    (l0, g0), (l1, g1) = loss_and_grads(cfg), loss_and_grads(dataclasses.replace(cfg, remat=True))
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_only_with_a_key():
    cfg = dataclasses.replace(TINY, dropout=0.5)
    model = Denoiser(cfg, nnx.Rngs(0))
    x, s, t = _inputs(cfg)
    np.testing.assert_array_equal(model(x, s, t), model(x, s, t))
    a = model(x, s, t, dropout_key=jax.random.key(0))
    b = model(x, s, t, dropout_key=jax.random.key(1))
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, model(x, s, t, dropout_key=jax.random.key(0)))


def test_bf16_compute_keeps_fp32_params_and_output_close():
    x, s, t = _inputs(TINY)
    f32 = Denoiser(TINY, nnx.Rngs(3))
    b16 = Denoiser(dataclasses.replace(TINY, dtype="bfloat16"), nnx.Rngs(3))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(b16, nnx.Param))} == {jnp.dtype("float32")}
    y32, y16 = f32(x, s, t), b16(x, s, t)
    assert y16.dtype == jnp.float32
    # bf16 keeps 8 significant bits (rel. step 2^-8 ≈ 4e-3); through 2 blocks errors stay
    # within a few percent of the output scale, far below the O(1) gap of unrelated outputs.
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert rel < 0.05


@pytest.mark.parametrize(
    "backend,dtype,size,want",
    [
        ("gpu", jnp.bfloat16, 64, "cudnn"),
        ("gpu", jnp.float16, 96, "cudnn"),  # width 96: one head of 96
        ("gpu", jnp.bfloat16, 100, "xla"),  # not a multiple of 8: cuDNN would refuse it
        ("gpu", jnp.bfloat16, 192, "xla"),  # above 128
        ("gpu", jnp.float32, 64, "xla"),
        ("cpu", jnp.bfloat16, 64, "xla"),
    ],
)
def test_auto_attention_picks_cudnn_only_where_it_applies(backend, dtype, size, want, monkeypatch):
    from at1_jax.model.denoiser import attention_impl

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attention_impl("auto", jnp.zeros((1, 4, 2, size), dtype)) == want
    assert attention_impl("xla", jnp.zeros((1, 4, 2, size), dtype)) == "xla"


def test_xla_attention_matches_a_plain_softmax_reference():
    from at1_jax.model.denoiser import _attend

    k = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(ki, (2, 4, 16, 64)) for ki in k)  # heads first: (B, N, T, H)
    logits = jnp.einsum("bnth,bnsh->bnts", q, kk) / 8.0
    ref = jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(logits, -1), v)
    np.testing.assert_allclose(_attend(q, kk, v, "xla"), ref, atol=1e-5)


def test_sharded_over_a_2x2_data_fsdp_mesh_matches_one_device():
    assert jax.device_count() >= 4, "tests/conftest.py sets 4 fake CPU devices"
    model = Denoiser(TINY, nnx.Rngs(0))
    x, s, t = _inputs(TINY, batch=8)
    expected = jax.jit(lambda st, *a: nnx.merge(nnx.graphdef(model), st)(*a))(
        nnx.state(model), x, s, t
    )
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    sharding.shard_model(model, mesh)
    kernel = model.blocks[0].mlp.fc1.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    batch = sharding.batch_sharding(mesh)
    x, s, t = (jax.device_put(a, batch) for a in (x, s, t))
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, x, s, t)
    assert len(out.sharding.device_set) == 4
    # Partitioned matmuls sum in another order: fp32 reassociation, ~1e-6 relative.
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_equals_nnx_linear_in_value_and_gradient(use_bias):
    """Dense's hand-written VJP against autodiff of the nnx.Linear it replaces (float32)."""
    kw = dict(use_bias=use_bias, bias_init=nnx.initializers.normal(1.0))
    ours, linear = Dense(24, 40, rngs=nnx.Rngs(0), **kw), nnx.Linear(24, 40, rngs=nnx.Rngs(0), **kw)
    x = jax.random.normal(jax.random.key(1), (3, 5, 24))
    dy = jax.random.normal(jax.random.key(2), (3, 5, 40))

    def value_and_grads(m):
        return nnx.value_and_grad(lambda m, x: jnp.sum(m(x) * dy), argnums=(0, 1))(m, x)

    (v1, (g1, gx1)), (v2, (g2, gx2)) = value_and_grads(ours), value_and_grads(linear)
    # Sums of 24 (forward) or 15 (kernel, bias gradients) fp32 products in another order.
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx2, rtol=0, atol=1e-5 * float(jnp.abs(gx2).max()))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_dense_in_bf16_keeps_float32_kernel_gradients_of_bf16_products():
    x = jax.random.normal(jax.random.key(1), (64, 48)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(2), (48, 32))
    bias = jax.random.normal(jax.random.key(3), (32,))
    dy = jax.random.normal(jax.random.key(4), (64, 32)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, k, b: dense(x, k, b, jnp.dtype(jnp.bfloat16)), x, kernel, bias)
    dx, dk, db = vjp(dy)
    assert (y.dtype, dx.dtype, dk.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16, F32, F32)
    x32, k16, dy32 = x.astype(F32), kernel.astype(jnp.bfloat16).astype(F32), dy.astype(F32)
    # The kernel gradient sums 64 exact bf16·bf16 products in float32 and is not rounded
    # to bf16: it matches the float64 sum to float32 accumulation error.
    want_dk = np.asarray(x32, np.float64).T @ np.asarray(dy32, np.float64)
    np.testing.assert_allclose(dk, want_dk, rtol=0, atol=1e-5 * np.abs(want_dk).max())
    np.testing.assert_allclose(db, np.asarray(dy32).sum(0), rtol=1e-6, atol=1e-5)
    # The output is rounded once to bf16: within half a bf16 ulp (2^-8 relative).
    want_y = np.asarray(x32 @ k16 + bias)
    np.testing.assert_allclose(np.asarray(y, F32), want_y, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("seq", [16, 2])  # self-attention, cross-attention to 2 tokens
def test_softmax_attention_equals_jax_dot_product_attention(seq):
    from at1_jax.model.denoiser import softmax_attention

    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (2, 16, 4, 32))
    kk, v = (jax.random.normal(ki, (2, seq, 4, 32)) for ki in k[1:3])
    do = jax.random.normal(k[3], q.shape)

    def run(f):
        out, vjp = jax.vjp(f, q, kk, v)
        return (out, *vjp(do))

    # softmax_attention takes heads first, (B, N, T, H); dot_product_attention (B, T, N, H).
    heads_first = lambda *a: softmax_attention(*(t.swapaxes(1, 2) for t in a)).swapaxes(1, 2)  # noqa: E731
    got = run(heads_first)
    want = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    for a, b in zip(got, want, strict=True):
        # fp32 both, same formula; the row term from rowsum(dO·O) instead of rowsum(P·dP).
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.torch
@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_gradients_match_the_pytorch_reference(block):
    """Every parameter's x0-loss gradient against PyTorch autograd of the reference model."""
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    from at1_jax.model import torch_names, weights
    from at1_jax.model.objective import x0_loss

    cfg = dataclasses.replace(TINY, block=block, cross_heads=4 if block == "legacy" else None)
    model = Denoiser(cfg, nnx.Rngs(5))
    x, s, t = _inputs(cfg)
    torch_model = ref.Denoiser(
        c=cfg.latent_channels, size=cfg.latent_size, p=cfg.patch_size, e=cfg.width,
        depth=cfg.depth, noise_dims=cfg.noise_embed_dims, text_dim=cfg.text_dim,
        mult=cfg.mlp_mult, cross_heads=cfg.cross_heads, block=block,
    )  # fmt: skip
    sd = torch_names.arrays_to_torch(weights.model_arrays(model), cfg)
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    tx, ts, tt = (torch.tensor(np.asarray(a)) for a in (x, s, t))
    torch_loss = ((torch_model(tx, ts, tt) - tx) ** 2).mean()
    torch_loss.backward()
    grad_sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    grad_sd.update({k: p.grad.numpy() for k, p in torch_model.named_parameters()})
    want = torch_names.torch_to_arrays(grad_sd, cfg)
    want.pop("angular_speeds")  # a buffer
    loss, grads = nnx.value_and_grad(lambda m: x0_loss(m(x, s, t), x))(model)
    got = {weights.path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-6)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        # fp32 both sides, sums over ≤ 64 positions in another order: measured ≤ 1e-6 of each
        # tensor's largest entry; a wrong formula is off by O(1).
        np.testing.assert_allclose(got[name], w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_bf16_training_loss_stays_within_1pct_of_float32(block):
    """30 real train steps (Adam, clipping, EMA) with bf16 compute against float32."""
    from at1_jax.model.objective import ObjectiveConfig
    from at1_jax.train import step as train_step
    from at1_jax.train.config import DataConfig, MeshConfig, OptimConfig, TrainConfig

    def losses(dtype):
        model = dataclasses.replace(
            TINY,
            text_dim=16,
            dtype=dtype,
            block=block,
            cross_heads=4 if block == "legacy" else None,
        )
        cfg = TrainConfig(
            model=model,
            data=DataConfig(path="unused", batch_size=16),
            optim=OptimConfig(lr=3e-3, warmup_steps=0, clip_norm=1.0, ema_decay=0.9),
            mesh=MeshConfig(data=2, fsdp=2, min_fsdp_mib=0),
            objective=ObjectiveConfig(cfg_drop=0.0),
        )
        mesh = sharding.make_mesh(2, 2, devices=jax.devices()[:4])
        tx = train_step.make_optimizer(cfg.optim, cfg.steps)
        spec = train_step.state_spec(cfg, tx, mesh)
        state = train_step.init_state(cfg, tx, spec)
        rng = np.random.default_rng(0)
        local = {
            "latent": rng.normal(size=(16, 4, 8, 8)).astype(np.float16),
            "text": rng.normal(size=(16, 16)).astype(np.float16),
        }
        batch = train_step.global_batch(local, spec, 16)
        step, out = train_step.make_train_step(cfg, tx, spec, 1.0), []
        for _ in range(30):
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        return np.array(out)

    f32, b16 = losses("float32"), losses("bfloat16")
    assert f32[-1] < 0.4 * f32[0]  # it learns: the comparison below is not of flat curves
    # Each loss is a mean of 4,096 squared errors of bf16-rounded predictions (≤ 2^-8
    # relative each, so ≤ 2·2^-8 ≈ 0.8% for the square); measured ≤ 0.17% over 30 steps.
    np.testing.assert_allclose(b16, f32, rtol=0.01)


@pytest.mark.parametrize("part", ["self_attention", "cross_attention", "model"])
@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_bf16_forward_and_backward_compile_and_run_on_this_backend(part, block):
    """XLA:CPU fails at run time ("Unsupported element type for DotThunk") on a bf16 dot
    whose layout its bf16 kernels reject; the attention modules alone hit it with bf16
    operands, whatever their size."""
    heads = 4 if block == "legacy" else None
    cfg = dataclasses.replace(TINY, dtype="bfloat16", block=block, cross_heads=heads)
    model = Denoiser(cfg, nnx.Rngs(0))
    x, s, t = _inputs(cfg, batch=2)
    h = jax.random.normal(jax.random.key(1), (2, cfg.num_tokens, cfg.width), jnp.bfloat16)
    ctx = jax.random.normal(jax.random.key(2), (2, 2, cfg.width), jnp.bfloat16)
    module, call = {
        "self_attention": (model.blocks[0].self_attention, lambda m: m(h)),
        "cross_attention": (model.blocks[0].cross_attention, lambda m: m(h, ctx)),
        "model": (model, lambda m: m(x, s, t)),
    }[part]
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(p):
        return jnp.mean(call(nnx.merge(graphdef, p, rest)).astype(F32) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("remat,dropout", [(False, 0.0), (True, 0.3)])
def test_scan_over_blocks_equals_the_unrolled_blocks(remat, dropout):
    """Same weights, same dropout keys per block: the same output and parameter gradients."""
    cfg = dataclasses.replace(TINY, depth=3, remat=remat, dropout=dropout)
    model = Denoiser(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    scanned = nnx.graphdef(Denoiser(dataclasses.replace(cfg, scan_blocks=True), nnx.Rngs(0)))
    x, s, t = _inputs(cfg)
    key = jax.random.key(5) if dropout else None

    def loss(g, st):
        return jnp.mean(nnx.merge(g, st)(x, s, t, dropout_key=key) ** 2)

    assert "scan" in str(jax.make_jaxpr(loss, static_argnums=0)(scanned, state))
    assert "scan" not in str(jax.make_jaxpr(loss, static_argnums=0)(graphdef, state))
    grad = jax.value_and_grad(loss, argnums=1)
    (l1, g1), (l2, g2) = grad(graphdef, state), grad(scanned, state)
    # The same float32 ops in the same order, once inside a loop: equal to rounding.
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * float(jnp.abs(a).max()) + 1e-12)
    assert dataclasses.replace(cfg, scan_blocks=True).architecture() == cfg.architecture()
