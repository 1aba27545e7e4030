"""The jitted train step: learning, accumulation, non-finite safety, schedules, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at1_jax.model.objective import ObjectiveConfig
from at1_jax.model.presets import PRESETS
from at1_jax.train import sharding
from at1_jax.train import step as train_step
from at1_jax.train.config import ConfigError, DataConfig, MeshConfig, OptimConfig, TrainConfig

MODEL = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=16)


def _cfg(**optim):
    return TrainConfig(
        steps=100,
        model=MODEL,
        data=DataConfig(path="unused", batch_size=8),
        optim=OptimConfig(**{"lr": 3e-3, "warmup_steps": 0, "ema_decay": 0.9, **optim}),
        # Split every parameter, however small, so the tiny model exercises FSDP.
        mesh=MeshConfig(data=2, fsdp=2, min_fsdp_mib=0),
        objective=ObjectiveConfig(cfg_drop=0.0),
    )


def _setup(cfg):
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=jax.devices()[:4])
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, mesh)
    state = train_step.init_state(cfg, tx, spec)
    return tx, spec, state


def _batch(spec, n=8, seed=0):
    rng = np.random.default_rng(seed)
    local = {
        "latent": rng.normal(size=(n, 4, 8, 8)).astype(np.float16),
        "text": rng.normal(size=(n, 16)).astype(np.float16),
    }
    return train_step.global_batch(local, spec, n)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_state_is_sharded_by_the_rules():
    _, _, state = _setup(_cfg())
    kernel = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    mu = state["opt"][0].mu["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    assert int(state["step"]) == 0


@pytest.mark.slow
def test_overfits_a_fixed_batch():
    cfg = _cfg()
    tx, spec, state = _setup(cfg)
    step = train_step.make_train_step(cfg, tx, spec, latent_scale=1.0)
    batch = _batch(spec)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    # Same 8 samples every step (fresh noise each time): the model memorises them. The
    # first loss is ~1 (x0 ≈ unit-variance data); a 5-fold drop cannot come from noise.
    assert losses[0] > 0.5
    assert np.mean(losses[-5:]) < losses[0] / 5
    assert int(state["step"]) == 60


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    # Noise is drawn for the whole batch before splitting, so only summation order differs.
    results = []
    for accum in (1, 4):
        cfg = _cfg(grad_accum=accum)
        tx, spec, state = _setup(cfg)
        state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
        # Adam's first moment after one step is (1 − b1)·g: the gradient itself.
        results.append((float(m["loss"]), float(m["grad_norm"]), _host(state["opt"][0].mu)))
    (l1, g1, mu1), (l4, g4, mu4) = results
    assert l4 == pytest.approx(l1, rel=1e-5)  # fp32 sums of 4 partial means
    assert g4 == pytest.approx(g1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(mu1), jax.tree.leaves(mu4), strict=True):
        # Per-element fp32 reassociation over 4 partial sums: ~1e-6 of the leaf's scale.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


@pytest.mark.slow
def test_tensor_parallel_mesh_gives_the_same_step():
    losses = []
    for data, fsdp, tensor in ((2, 2, 1), (1, 2, 2)):
        mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, min_fsdp_mib=0)
        cfg = dataclasses.replace(_cfg(), mesh=mesh_cfg)
        mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:4])
        tx = train_step.make_optimizer(cfg.optim, cfg.steps)
        spec = train_step.state_spec(cfg, tx, mesh)
        state = train_step.init_state(cfg, tx, spec)
        fc1 = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
        expected = ("fsdp", "tensor") if tensor > 1 else ("fsdp", None)
        assert fc1.sharding.spec == jax.sharding.PartitionSpec(*expected)
        state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
        losses.append((float(m["loss"]), _host(state["opt"][0].mu)))  # mu = 0.1·gradient
    (l1, mu1), (l2, mu2) = losses
    # Same math partitioned differently: fp32 reassociation only, ~1e-6 of each leaf's scale.
    assert l2 == pytest.approx(l1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(mu1), jax.tree.leaves(mu2), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


@pytest.mark.slow
def test_flat_gradient_reduce_gives_the_same_step():
    # The default min_fsdp_mib keeps the tiny model's weights whole: both paths apply.
    results = []
    for grad_reduce, accum in (("xla", 1), ("flat", 1), ("flat", 2)):
        mesh_cfg = MeshConfig(data=2, fsdp=2, grad_reduce=grad_reduce)
        cfg = dataclasses.replace(_cfg(grad_accum=accum), mesh=mesh_cfg)
        tx, spec, state = _setup(cfg)
        assert train_step.grad_reduce(cfg, spec) == grad_reduce
        state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
        results.append((float(m["loss"]), float(m["grad_norm"]), _host(state["opt"][0].mu)))
    (l1, g1, mu1), *flat = results
    for lf, gf, muf in flat:
        # Per-device means summed over 4 devices (and 2 micro-batches) instead of XLA's
        # partial sums: fp32 reassociation, ~1e-7 relative, ~1e-6 of each leaf's scale.
        assert lf == pytest.approx(l1, rel=1e-5)
        assert gf == pytest.approx(g1, rel=1e-5)
        for a, b in zip(jax.tree.leaves(mu1), jax.tree.leaves(muf), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def test_flat_gradient_reduce_refuses_split_weights():
    cfg = _cfg()  # min_fsdp_mib=0: every weight split over fsdp
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, grad_reduce="flat"))
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    mesh = sharding.make_mesh(2, 2, devices=jax.devices()[:4])
    spec = train_step.state_spec(cfg, tx, mesh)
    want = r"grad_reduce='flat' needs every parameter replicated; \d+ arrays are split "
    want += r"\(mesh.fsdp=2, mesh.tensor=1, mesh.min_fsdp_mib=0\): use 'auto' or 'xla'"
    with pytest.raises(ConfigError, match=want):
        train_step.make_train_step(cfg, tx, spec, 1.0)


def test_flat_gradient_reduce_needs_a_split_batch():
    rules = (("batch", None), *(r for r in sharding.DEFAULT_RULES if r[0] != "batch"))
    mesh_cfg = MeshConfig(data=2, fsdp=2, rules=rules, grad_reduce="flat")
    cfg = dataclasses.replace(_cfg(), mesh=mesh_cfg)
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, sharding.make_mesh(2, 2, devices=jax.devices()[:4]))
    assert train_step.grad_reduce(cfg, spec) == "xla"  # every device has the whole batch


@pytest.mark.slow
def test_non_finite_step_leaves_the_state_untouched():
    cfg = _cfg()
    tx, spec, state = _setup(cfg)
    before = _host(state)
    bad = {k: np.array(v) for k, v in jax.device_get(_batch(spec)).items()}
    bad["latent"][0, 0, 0, 0] = np.inf
    state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(
        state, train_step.global_batch(bad, spec, 8)
    )
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(state)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the point of the test
@pytest.mark.slow
def test_update_that_overflows_the_weights_is_not_applied():
    # lr=1e39 is a finite Python float but inf in float32: loss and gradient are finite,
    # the weights the update would produce are not (±inf, and 0·inf = nan where g = 0).
    cfg = _cfg(lr=1e39)
    tx, spec, state = _setup(cfg)
    before = _host(state)
    state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(state)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not bool(m["update_finite"])  # what tells the host the update was the problem
    # The same step at a sane rate is applied and reported finite.
    cfg = _cfg()
    tx, spec, state = _setup(cfg)
    state, m = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
    assert bool(m["update_finite"]) and bool(m["finite"]) and int(state["step"]) == 1


def test_all_finite_looks_at_every_float_leaf():
    tree = {"a": jnp.ones((3,)), "opt": (jnp.zeros((2, 2)), jnp.int32(7))}
    assert bool(train_step.all_finite(tree))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        broken = {**tree, "opt": (jnp.zeros((2, 2)).at[1, 0].set(bad), jnp.int32(7))}
        assert not bool(train_step.all_finite(broken))


def test_ema_follows_params_with_its_decay():
    cfg = _cfg(ema_decay=0.9)
    tx, spec, state = _setup(cfg)
    p0 = _host(state["params"])
    state, _ = train_step.make_train_step(cfg, tx, spec, 1.0)(state, _batch(spec))
    p1, ema = _host(state["params"]), _host(state["ema"])
    for a0, a1, e in zip(*(jax.tree.leaves(t) for t in (p0, p1, ema)), strict=True):
        np.testing.assert_allclose(e, 0.9 * a0 + 0.1 * a1, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedules():
    warm = train_step.learning_rate(OptimConfig(lr=1.0, warmup_steps=10), 100)
    assert [float(warm(s)) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    cos = train_step.learning_rate(
        OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", final_lr_ratio=0.1), 110
    )
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)  # half-way down
    assert float(cos(110)) == pytest.approx(0.1, rel=1e-4)


def test_weight_decay_spares_one_dimensional_weights():
    cfg = _cfg(weight_decay=0.5, lr=1e-2)
    tx = train_step.make_optimizer(cfg.optim, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1e-2 * 0.5)  # decay only: -lr·wd·w
    np.testing.assert_array_equal(updates["b"], 0.0)


@pytest.mark.slow
def test_bfloat16_compute_trains_like_float32():
    """bf16 compute (fp32 params, loss, optimiser) follows the fp32 loss curve on the same data."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(_cfg(), model=dataclasses.replace(MODEL, dtype=dtype))
        tx, spec, state = _setup(cfg)
        step = train_step.make_train_step(cfg, tx, spec, latent_scale=1.0)
        batches = [_batch(spec, seed=s) for s in range(4)]
        losses = []
        for i in range(40):  # the same seed: the same noise levels and noise in both runs
            state, m = step(state, batches[i % 4])
            losses.append(float(m["loss"]))
        curves[dtype] = np.asarray(losses)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    assert f32[-10:].mean() < 0.8 * f32[:10].mean()  # it learns: the comparison means something
    # bf16 rounds each matmul operand to 8 significant bits (≤ 0.2% relative error each);
    # errors of independent roundings summed in fp32 partly cancel, so outputs move by well
    # under 0.5% and the MSE by at most about twice that: 1% per step leaves room for the
    # slow drift of the two weight trajectories (seen: 0.15% at most over these 40 steps).
    np.testing.assert_allclose(bf16, f32, rtol=0.01)
    assert abs(bf16[-10:].mean() / f32[-10:].mean() - 1) < 0.005
