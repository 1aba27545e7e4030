"""Logical axes → mesh: mesh construction and partition rules."""

import jax
import pytest
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


def test_batch_sharding_and_data_parallel_size():
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh) == 4
