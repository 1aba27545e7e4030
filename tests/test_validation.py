"""Validation loss: the held-out subset, fixed noise, one compile, the same value on any mesh."""

import dataclasses
import io
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from at1_io import schema
from at1_io.synthetic import make_dataset
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.presets import PRESETS
from at1_jax.train import data, sharding, validation

MODEL = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("val"))
    make_dataset(root, shards=2, per_shard=8, val_shards=2)
    ds = data.open_dataset(root)
    return ds, validation.load_split(*validation.find_split(ds), 13)


@pytest.fixture(scope="module")
def weights():
    graphdef, params, buffers = nnx.split(Denoiser(MODEL, nnx.Rngs(5)), nnx.Param, ...)
    return graphdef, params, buffers


def test_sigma_levels_are_bin_centres():
    np.testing.assert_allclose(validation.sigma_levels(5), [0.1, 0.3, 0.5, 0.7, 0.9], rtol=1e-7)
    assert validation.bin_names(2) == ["sigma_0.25", "sigma_0.75"]


def test_the_subset_is_the_first_samples_of_the_split_in_manifest_order(split):
    ds, vset = split
    assert (vset.root, vset.split, vset.size) == (ds.root, schema.VAL, 13)
    expected = []
    for shard in ds.manifest.val_shards:
        with open(f"{ds.root}/{shard.path}", "rb") as f:
            expected += list(schema.iter_shard_samples(f, shard.name))
    # The stored fp16 posterior mean times the latent scale (1/8), never re-sampled.
    x0 = np.stack([s["latent_mean"] for s in expected[:13]]).astype(np.float32) / 8
    np.testing.assert_array_equal(vset.x0, x0)
    text = np.stack([s["clip_pooled"] for s in expected[:13]]).astype(np.float32)
    np.testing.assert_array_equal(vset.text, text)
    # No training sample is in it.
    assert expected[0]["json"]["index"] == 2 * 8


def _reference(graphdef, params, buffers, vset, bins):
    """Sample by sample on one device, as the module docstring defines the loss."""
    model = nnx.merge(graphdef, params, buffers)
    levels = validation.sigma_levels(bins)
    out = np.zeros((vset.size, bins))
    for i in range(vset.size):
        x0 = jax.numpy.asarray(vset.x0[i : i + 1])
        for b, s in enumerate(levels):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), b)
            eps = jax.random.normal(key, x0.shape[1:])[None]
            sigma = np.full((1, 1), s, np.float32)
            pred = model(s * eps + (1 - s) * x0, sigma, vset.text[i : i + 1])
            out[i, b] = float(np.mean(np.square(np.asarray(pred) - np.asarray(x0))))
    return out.mean(axis=0)


def test_losses_match_a_sample_by_sample_reference(split, weights):
    _, vset = split
    graphdef, params, buffers = weights
    mesh = sharding.make_mesh(4, 1)
    got = validation.Validator(vset, graphdef, mesh, bins=3, chunk=8).per_bin(
        nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    )
    # 13 samples in two chunks of 8 (3 padding rows dropped). One device against four and
    # batched against single-sample matmuls: float32 rounding only, ~1e-7 relative.
    np.testing.assert_allclose(got, _reference(graphdef, params, buffers, vset, 3), rtol=2e-6)


def test_same_value_on_every_mesh_deterministic_and_compiled_once(split, weights):
    _, vset = split
    graphdef, params, buffers = weights
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation of jit(losses)" in record.getMessage():
                compiles.append(record)

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    results = {}
    try:
        for shape in ((4, 1), (2, 2), (1, 1)):
            mesh = sharding.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
            # FSDP-sharded weights as the train state holds them on a (data, fsdp) mesh.
            p_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
            b_sh = nnx.to_pure_dict(sharding.state_shardings(buffers, mesh))
            p = jax.device_put(nnx.to_pure_dict(params), p_sh)
            b = jax.device_put(nnx.to_pure_dict(buffers), b_sh)
            v = validation.Validator(
                vset, graphdef, mesh, bins=5, chunk=4, param_shardings=p_sh, buffer_shardings=b_sh
            )
            compiles.clear()
            with jax.log_compiles():
                first = v.losses(p, b, "val_loss")
                again = v.evaluate({"params": p, "ema": p, "buffers": b})
                other = jax.tree.map(lambda x: x * 1.01, p)  # new weights, same shapes
                changed = v.losses(other, b, "val_loss")
            assert len(compiles) == 1, shape  # the first call only
            assert again["val_loss"] == again["val_loss_ema"] == first["val_loss"]
            assert changed["val_loss"] != first["val_loss"]
            results[shape] = first
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert sorted(results[(4, 1)]) == sorted(
        ["val_loss"] + [f"val_loss_{n}" for n in validation.bin_names(5)]
    )
    ref = results[(4, 1)]
    for shape, got in results.items():
        for k in ref:  # fsdp all-reduces and one-device matmuls reassociate float32 sums
            assert got[k] == pytest.approx(ref[k], rel=1e-6), (shape, k)
    means = [ref[f"val_loss_{n}"] for n in validation.bin_names(5)]
    assert ref["val_loss"] == pytest.approx(np.mean(means), rel=1e-12)


def test_chunks_must_split_over_the_data_devices(split, weights):
    with pytest.raises(ValueError, match="chunk 6 is not a multiple of the 4 data shards"):
        validation.Validator(split[1], weights[0], sharding.make_mesh(4, 1), bins=5, chunk=6)


def test_val_path_takes_another_data_set_encoded_alike(tmp_path, split):
    ds, _ = split
    assert validation.find_split(data.open_dataset(ds.root)) == (ds, schema.VAL)
    plain = str(tmp_path / "plain")
    make_dataset(plain, shards=1, per_shard=4, seed=7)
    assert validation.find_split(data.open_dataset(plain)) is None  # no split, no val_path
    other, where = validation.find_split(ds, plain)  # no val/ split: its shards
    assert (other.root, where) == (plain, schema.TRAIN)
    assert validation.load_split(other, where, 100).size == 4
    wide = str(tmp_path / "wide")
    make_dataset(wide, shards=1, per_shard=4, text_dim=16)
    with pytest.raises(data.DataError) as err:
        validation.find_split(ds, wide)
    assert f"data.val_path {wide} was not encoded like data.path {ds.root}" in str(err.value)
    assert "text array 'clip_pooled' 16-d vs 'clip_pooled' 32-d" in str(err.value)


def test_a_damaged_validation_shard_is_an_error_not_a_smaller_set(tmp_path):
    root = str(tmp_path)
    make_dataset(root, shards=1, per_shard=4, val_shards=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    victim = tmp_path / manifest["val_shards"][0]["path"]
    buf = io.BytesIO(victim.read_bytes()[:-1024])
    victim.write_bytes(buf.getvalue())
    ds = data.open_dataset(root)
    with pytest.raises(data.DataError) as err:
        validation.load_split(ds, schema.VAL, 100)
    assert "val split: shard" in str(err.value) and "size or sha256 differs" in str(err.value)
    assert "never a smaller validation set" in str(err.value)
