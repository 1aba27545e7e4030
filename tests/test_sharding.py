"""Logical axes → mesh: mesh construction and partition rules."""

import dataclasses

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from at1_jax.train import sharding


def test_make_mesh_fills_the_free_axis():
    mesh = sharding.make_mesh(data=-1, fsdp=2)
    assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2, "tensor": 1}


def test_make_mesh_rejects_sizes_that_do_not_cover_the_devices():
    with pytest.raises(ValueError, match="must equal the 4 available devices"):
        sharding.make_mesh(data=3, fsdp=1, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh(data=-1, fsdp=3, devices=jax.devices()[:4])


def test_rules_map_each_mesh_axis_once_and_skip_indivisible_dims():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    assert sharding.spec_for(("embed", "mlp"), (8, 32), mesh, sharding.DEFAULT_RULES) == P(
        "fsdp", "tensor"
    )
    # Both dims map to fsdp: only the first takes it.
    rules = (("embed", "fsdp"), ("embed2", "fsdp"))
    assert sharding.spec_for(("embed", "embed2"), (8, 8), mesh, rules) == P("fsdp", None)
    # 5 is not divisible by 2: replicated rather than an error.
    assert sharding.spec_for(("embed", None), (5, 8), mesh, sharding.DEFAULT_RULES) == P(None, None)


def test_weights_of_at_most_min_fsdp_mib_stay_whole_on_every_fsdp_device():
    from flax import nnx

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    axes = {"logical_axes": ("embed", "mlp")}
    state = {
        "exactly_1_mib": nnx.Param(jax.ShapeDtypeStruct((512, 512), "float32"), **axes),
        "over_1_mib": nnx.Param(jax.ShapeDtypeStruct((514, 512), "float32"), **axes),
    }
    specs = jax.tree.map(
        lambda v: v.get_value().spec,
        sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES, min_fsdp_mib=1.0),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    # The small one keeps its tensor split (compute, not memory); only fsdp is dropped.
    assert specs == {"exactly_1_mib": P(None, "tensor"), "over_1_mib": P("fsdp", "tensor")}
    at_zero = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES, min_fsdp_mib=0.0)
    assert at_zero["exactly_1_mib"].get_value().spec == P("fsdp", "tensor")


def test_batch_sharding_and_data_parallel_size():
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh) == 4


def _compile_train_step(cfg):
    """Compile the real train step for `cfg` on abstract inputs (nothing is allocated)."""
    import numpy as np

    from at1_jax.train import step as train_step

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=jax.devices()[:4])
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, mesh)
    m, n = cfg.model, cfg.data.batch_size
    shapes = {
        "latent": (n, m.latent_channels, m.latent_size, m.latent_size),
        "text": (n, m.text_dim),
    }
    batch = {k: jax.ShapeDtypeStruct(v, np.float16, sharding=spec.batch) for k, v in shapes.items()}
    return train_step.make_train_step(cfg, tx, spec, 1.0).lower(spec.abstract, batch).compile()


def _collectives_by_computation(hlo: str) -> dict[str, list[str]]:
    """{computation name ("ENTRY" for the entry): the collective ops in it}."""
    import re

    from at1_jax.bench.trace_summary import computations

    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    collective = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")
    found = {}
    for name, body in computations(hlo).items():
        ops = collective.findall(body)
        if ops:
            found["ENTRY" if name == entry else name] = ops
    return found


def test_sharded_step_synchronises_devices_once_outside_any_loop():
    """Weights whole on every device: one all-reduce (the gradients, combined), in the entry
    computation. The Beta draws of the noise levels are rejection loops; split over the batch,
    each loop iteration was a predicate all-reduce between all devices (across hosts too)."""
    from at1_demo.config import get_config

    hlo = _compile_train_step(get_config()).as_text()
    assert _collectives_by_computation(hlo) == {"ENTRY": ["all-reduce"]}


def test_flat_grad_reduce_sums_gradients_and_loss_as_one_buffer():
    """gloo sums a tuple one array at a time, a TCP ring each: the flat step has one array."""
    import re

    from at1_demo.config import get_config
    from at1_jax.train.run_setup import param_count

    cfg = get_config()
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, grad_reduce="flat"))
    hlo = _compile_train_step(cfg).as_text()
    assert _collectives_by_computation(hlo) == {"ENTRY": ["all-reduce"]}
    shapes = re.findall(r"= (.+?) all-reduce(?:-start)?\(", hlo)
    assert shapes == [f"f32[{param_count(cfg.model) + 1}]{{0}}"]


def test_grad_reduce_modes_resolve_by_platform_processes_and_sharding():
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    whole = {"w": NamedSharding(mesh, P()), "b": NamedSharding(mesh, P(None))}
    split = {**whole, "k": NamedSharding(mesh, P("fsdp"))}
    assert sharding.split_arrays(whole) == 0 and sharding.split_arrays(split) == 1
    assert sharding.flat_grad_reduce("flat", whole, mesh)
    assert not sharding.flat_grad_reduce("xla", whole, mesh)
    # One process: XLA's in-process all-reduce sums the tuple at once; auto leaves it.
    assert not sharding.flat_grad_reduce("auto", whole, mesh)


REMAT = "Involuntary full rematerialization"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("min_fsdp_mib", [None, 0.0])  # the demo's default; every weight split
def test_demo_step_compiles_without_involuntary_rematerialization(dtype, min_fsdp_mib, capfd):
    """XLA logs the SPMD partitioner's warning from C++ to stderr: captured at the fd."""
    import dataclasses

    from at1_demo.config import get_config

    cfg = get_config()
    mesh = cfg.mesh if min_fsdp_mib is None else dataclasses.replace(cfg.mesh, min_fsdp_mib=0.0)
    model = dataclasses.replace(cfg.model, dtype=dtype)
    cfg = dataclasses.replace(cfg, model=model, mesh=mesh)
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, 2)
    _compile_train_step(cfg)
    assert REMAT not in capfd.readouterr().err


def test_the_remat_check_sees_the_warning_when_conditioning_weights_are_split(capfd):
    """The control: split "cond" over fsdp as "embed" is and the warning comes back."""
    import dataclasses

    from at1_demo.config import get_config

    cfg = get_config()
    rules = (*sharding.DEFAULT_RULES, ("cond", "fsdp"))
    mesh = dataclasses.replace(cfg.mesh, rules=rules, min_fsdp_mib=0.0)
    _compile_train_step(dataclasses.replace(cfg, mesh=mesh))
    assert REMAT in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tld-tiny", "at1", "tld-101m"])
@pytest.mark.parametrize("mesh", [(2, 2), (1, 4)])
def test_preset_steps_compile_without_involuntary_rematerialization(preset, mesh, capfd):
    from at1_jax.model.presets import get_preset
    from at1_jax.train.config import DataConfig, MeshConfig, OptimConfig, TrainConfig

    cfg = TrainConfig(
        model=get_preset(preset),
        data=DataConfig(path="unused", batch_size=32),
        optim=OptimConfig(clip_norm=1.0),
        mesh=MeshConfig(data=mesh[0], fsdp=mesh[1], min_fsdp_mib=0.0),  # every weight split
    )
    _compile_train_step(cfg)
    assert REMAT not in capfd.readouterr().err


@pytest.mark.slow
def test_xl_600m_scanned_step_compiles_without_involuntary_rematerialization(capfd):
    """The largest preset as the GPU suite runs it (bf16, blocks scanned) on a 2×2 mesh."""
    import dataclasses

    from at1_jax.model.presets import get_preset
    from at1_jax.train.config import DataConfig, MeshConfig, OptimConfig, TrainConfig

    model = dataclasses.replace(get_preset("xl-600m"), dtype="bfloat16", scan_blocks=True)
    cfg = TrainConfig(
        model=model,
        data=DataConfig(path="unused", batch_size=8),
        optim=OptimConfig(clip_norm=1.0),
        mesh=MeshConfig(data=2, fsdp=2, min_fsdp_mib=0.0),
    )
    _compile_train_step(cfg)
    assert REMAT not in capfd.readouterr().err
