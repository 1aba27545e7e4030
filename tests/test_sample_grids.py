"""The trainer's sample sheets are what `sample` gives for the same prompts and seeds."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from at1_io.synthetic import make_dataset
from at1_jax.generate.pipeline import Denoising
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.presets import PRESETS
from at1_jax.model.samplers import SamplerConfig
from at1_jax.train import config, data, sharding
from at1_jax.train.sample_grids import SampleGrids


def _grids(tmp_path, val_prompts, **log):
    make_dataset(str(tmp_path), shards=1, per_shard=4, val_prompts=val_prompts)
    model_cfg = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=1, text_dim=32)
    cfg = config.TrainConfig(
        data=config.DataConfig(path=str(tmp_path)),
        model=model_cfg,
        log=config.LogConfig(sample_steps=3, num_samples=3, **log),
    )
    ds = data.open_dataset(str(tmp_path))
    model = Denoiser(model_cfg, nnx.Rngs(1))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    grids = SampleGrids(cfg, ds, graphdef, mesh)
    return cfg, model, grids, grids.latents({"ema": params, "buffers": buffers})


def test_sheet_defaults_are_those_of_sample_evaluate_and_serve():
    from at1_jax.evaluate import cli as evaluate_cli
    from at1_jax.generate import cli as sample_cli
    from at1_jax.serve.schema import DEFAULTS

    log = config.LogConfig()
    sample = sample_cli._parser().parse_args(["--checkpoint", "x"])
    evaluate = evaluate_cli._parser().parse_args(["--checkpoint", "x"])
    sheet = (log.sample_guidance, log.sample_seed)
    assert sheet == (sample.guidance, sample.seed) == (DEFAULTS.guidance, DEFAULTS.seed)
    assert sheet == (float(evaluate.guidance), evaluate.seed)


def test_grid_is_sample_remade_with_the_labelled_seed(tmp_path):
    _, model, grids, got = _grids(tmp_path, val_prompts=3, sample_guidance=4.0)
    assert len(grids.prompts) == 3 and grids.seeds == [11, 11, 11]
    # `sample --seed 11 --num-images 1` over the same prompts (their stored text vectors).
    sampler = SamplerConfig(steps=3, guidance=4.0, seed=11)
    want = Denoising(model, batch_size=4).latents(grids.text, grids.seeds, sampler)
    # Same program on the same device and inputs, but the grid's jit has a replicated output
    # sharding: allow float32 rounding of reordered ops over 3 steps, nothing more.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the prompts steer the samples apart


def test_unconditional_grids_use_consecutive_seeds(tmp_path):
    _, _, grids, got = _grids(tmp_path, val_prompts=0, sample_seed=5)
    assert grids.prompts == [] and grids.seeds == [5, 6, 7]
    assert np.abs(got[0] - got[1]).max() > 1e-3
