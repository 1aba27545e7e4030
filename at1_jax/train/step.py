"""The train state (params, EMA, optimiser state, step), its shardings, and the pure step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from at1_jax.model.denoiser import Denoiser, DenoiserConfig
from at1_jax.model.objective import ema_update, training_targets, x0_loss
from at1_jax.train import sharding
from at1_jax.train.config import ConfigError, OptimConfig, TrainConfig

# Purposes of the per-step key, split from fold_in(key(seed), step).
_INIT, _LATENT, _OBJECTIVE, _DROPOUT = range(4)


def learning_rate(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to lr·final_lr_ratio."""
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, o.warmup_steps, max(total_steps, o.warmup_steps + 1), o.lr * o.final_lr_ratio
        )
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
        [o.warmup_steps],
    )


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (optional) then AdamW; weight decay spares biases, norms and 1-D weights."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(
        learning_rate(o, total_steps),
        o.b1,
        o.b2,
        o.eps,
        weight_decay=o.weight_decay,
        mask=decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


def _pure(state: nnx.State):
    return nnx.to_pure_dict(state)


@dataclasses.dataclass
class StateSpec:
    """The model graph, the abstract train state, and the shardings of both it and batches."""

    graphdef: nnx.GraphDef
    abstract: dict
    shardings: dict
    batch: NamedSharding
    mesh: Mesh


def _new_model(cfg: DenoiserConfig, seed: int) -> Denoiser:
    return Denoiser(cfg, nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), _INIT)))


def state_spec(cfg: TrainConfig, tx: optax.GradientTransformation, mesh: Mesh) -> StateSpec:
    """Shapes and shardings of the train state, computed without allocating it."""
    model = nnx.eval_shape(lambda: _new_model(cfg.model, cfg.seed))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    rules, small = cfg.mesh.rules, cfg.mesh.min_fsdp_mib
    param_sh = _pure(sharding.state_shardings(params, mesh, rules, small))
    buffer_sh = _pure(sharding.state_shardings(buffers, mesh, rules, small))
    abstract_params = _pure(params)
    opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: replicated
    )
    abstract = {
        "params": abstract_params,
        "ema": abstract_params,
        "buffers": _pure(buffers),
        "opt": opt,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    shardings = {
        "params": param_sh,
        "ema": param_sh,
        "buffers": buffer_sh,
        "opt": opt_sh,
        "step": replicated,
    }
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return StateSpec(graphdef, abstract, shardings, sharding.batch_sharding(mesh, rules), mesh)


def init_state(cfg: TrainConfig, tx, spec: StateSpec, model: Denoiser | None = None) -> dict:
    """A fresh sharded train state from the seed, or around given weights (fine-tuning)."""

    def build(params, buffers):
        return {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),  # its own buffers: the step donates both
            "buffers": buffers,
            "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    if model is None:

        def fresh():
            _, params, buffers = nnx.split(_new_model(cfg.model, cfg.seed), nnx.Param, ...)
            return build(_pure(params), _pure(buffers))

        return jax.jit(fresh, out_shardings=spec.shardings)()
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    args = (_pure(params), _pure(buffers))
    in_sh = (spec.shardings["params"], spec.shardings["buffers"])
    return jax.jit(build, in_shardings=in_sh, out_shardings=spec.shardings)(*args)


def all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite (one reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _micro_batches(x, n: int):
    """(B, …) → (n, B/n, …): micro-batch i holds examples i, n + i, 2n + i, …"""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def _accumulated(grad_fn, params, buffers, args, k_drop, accum: int, constrain=None):
    """(loss, grads) over `args` in `accum` micro-batches: means of the micro-batch means."""
    if accum == 1:
        return grad_fn(params, buffers, *args, k_drop)
    micro = [_micro_batches(a, accum) for a in args]
    if constrain is not None:
        micro = [constrain(m) for m in micro]

    def body(carry, i):
        loss_sum, grad_sum = carry
        key = jax.random.fold_in(k_drop, i)
        loss, grads = grad_fn(params, buffers, *(m[i] for m in micro), key)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros), jnp.arange(accum))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)


def _flat_reduced(grad_fn, mesh: Mesh, rules: sharding.Rules, accum: int):
    """(loss, grads) per device over its part of the batch, then one all-reduce of both.

    The gradients leave shard_map as one flat buffer summed over `axes` (the batch axes);
    parameters and buffers must be replicated. Dropout keys fold in the device's batch
    shard, so masks depend on the batch split (the loss and gradients otherwise do not).
    """
    axes, n = sharding.batch_axes(mesh, rules), sharding.data_parallel_size(mesh, rules)
    part = PartitionSpec(axes)

    def local(params, buffers, x_noisy, sigma, text, x, k_drop):
        k_drop = jax.random.fold_in(k_drop, jax.lax.axis_index(axes))
        args = (x_noisy, sigma, text, x)
        loss, grads = _accumulated(grad_fn, params, buffers, args, k_drop, accum)
        flat, unravel = ravel_pytree(grads)
        total = jax.lax.psum(jnp.concatenate([flat, loss[None].astype(flat.dtype)]), axes) / n
        return total[-1].astype(loss.dtype), unravel(total[:-1])

    specs = (PartitionSpec(), PartitionSpec(), part, part, part, part, PartitionSpec())
    # Without replication checks, the gradient of a replicated input is this device's own;
    # with them, JAX would sum it over `axes` array by array: the all-reduces replaced here.
    return jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False
    )


def grad_reduce(cfg: TrainConfig, spec: StateSpec) -> str:
    """How the step sums gradients: "flat" or "xla" (config.mesh.grad_reduce, resolved)."""
    arrays = (spec.shardings["params"], spec.shardings["buffers"])
    if not sharding.flat_grad_reduce(cfg.mesh.grad_reduce, arrays, spec.mesh):
        return "xla"
    if not sharding.batch_axes(spec.mesh, cfg.mesh.rules):
        return "xla"  # the batch is not split (mesh.rules): there is nothing to sum
    if split := sharding.split_arrays(arrays):
        raise ConfigError(
            f"config.mesh.grad_reduce='flat' needs every parameter replicated; {split} arrays "
            f"are split (mesh.fsdp={cfg.mesh.fsdp}, mesh.tensor={cfg.mesh.tensor}, "
            f"mesh.min_fsdp_mib={cfg.mesh.min_fsdp_mib}): use 'auto' or 'xla'"
        )
    return "flat"


def make_train_step(
    cfg: TrainConfig, tx: optax.GradientTransformation, spec: StateSpec, latent_scale: float
) -> Callable:
    """The jitted step: (state, batch) → (state, metrics); the input state is donated."""
    graphdef, objective = spec.graphdef, cfg.objective
    accum, decay = cfg.optim.grad_accum, cfg.optim.ema_decay
    use_dropout = cfg.model.dropout > 0
    base_key = jax.random.key(cfg.seed)
    schedule = learning_rate(cfg.optim, cfg.steps)
    replicated = sharding.replicated(spec.mesh)

    def loss_fn(params, buffers, x_noisy, sigma, text, x, k_drop):
        model = nnx.merge(graphdef, params, buffers)
        pred = model(x_noisy, sigma, text, dropout_key=k_drop if use_dropout else None)
        return x0_loss(pred, x)

    grad_fn = jax.value_and_grad(loss_fn)
    flat = grad_reduce(cfg, spec) == "flat"
    flat_grads = _flat_reduced(grad_fn, spec.mesh, cfg.mesh.rules, accum) if flat else None
    batch_constraint = NamedSharding(spec.mesh, PartitionSpec(None, *spec.batch.spec))

    def step(state, batch):
        key = jax.random.fold_in(base_key, state["step"])
        x = batch["latent"].astype(jnp.float32)
        if "latent_std" in batch:  # re-sample the VAE posterior every time a sample is seen
            eps = jax.random.normal(jax.random.fold_in(key, _LATENT), x.shape)
            x = x + batch["latent_std"].astype(jnp.float32) * eps
        x = x * latent_scale
        text = batch["text"].astype(jnp.float32)
        # Noise for the whole batch at once: accumulation changes only the summation order.
        inputs = training_targets(
            jax.random.fold_in(key, _OBJECTIVE), x, text, objective, replicated
        )
        k_drop = jax.random.fold_in(key, _DROPOUT)
        params, buffers = state["params"], state["buffers"]
        args = (inputs.x_noisy, inputs.sigma, inputs.text, x)
        if flat_grads is not None:
            loss, grads = flat_grads(params, buffers, *args, k_drop)
        else:
            # Every micro-batch spread over all data devices.
            constrain = lambda m: jax.lax.with_sharding_constraint(m, batch_constraint)  # noqa: E731
            loss, grads = _accumulated(grad_fn, params, buffers, args, k_drop, accum, constrain)
        grad_norm = optax.global_norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        new = {
            "params": new_params,
            "ema": ema_update(state["ema"], new_params, decay),
            "buffers": buffers,
            "opt": opt,
            "step": state["step"] + 1,
        }
        # Finite loss and gradient can still give non-finite weights (an update that
        # overflows, g² overflowing Adam's second moment): check what would be saved.
        update_finite = all_finite(new)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
        # A non-finite step changes nothing: the host stops on the last good state.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "finite": finite,
            "update_finite": update_finite,
        }
        return new, metrics

    return jax.jit(
        step,
        in_shardings=(spec.shardings, spec.batch),
        out_shardings=(spec.shardings, replicated),
        donate_argnums=0,
    )


def global_batch(local: dict, spec: StateSpec, global_size: int) -> dict:
    """Process-local numpy batches → global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(spec.batch, v, (global_size, *v.shape[1:]))
        for k, v in local.items()
    }
