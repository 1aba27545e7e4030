"""The trainer's validation loss of a weights folder on a data set, computed after the fact."""

from __future__ import annotations

from flax import nnx

from at1_io import schema
from at1_jax.checkpointing.load import card_of, load_model
from at1_jax.train import sharding, validation
from at1_jax.train.data import open_dataset


def validation_loss(args, announce: bool = True) -> dict:
    """The trainer's validation loss of the checkpoint's weights on `args.val_loss`."""
    model, info = load_model(args.checkpoint, args.cache_dir)
    if announce:  # the FID/CLIP pipeline has printed it already
        print(f"model: {info['summary']}", flush=True)
    card = card_of(args.checkpoint) or {}
    record = (card.get("data") or [{}])[0]
    # The text array and latent scale the weights were trained with, when their card says.
    ds = open_dataset(
        args.val_loss, record.get("text_array") or "", record.get("latent_scale") or 0
    )
    cfg = model.cfg
    want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if tuple(ds.latent_shape) != want or ds.text_dim != cfg.text_dim:
        raise ValueError(
            f"--val-loss {args.val_loss}: latents {tuple(ds.latent_shape)} and {ds.text_dim}-d "
            f"text do not fit the model ({want}, {cfg.text_dim}-d): use the data set it was "
            "trained on or one encoded alike"
        )
    split = schema.VAL if ds.manifest.val_shards else schema.TRAIN
    vset = validation.load_split(ds, split, args.val_samples)
    mesh = sharding.make_mesh(data=-1)  # every local device, weights replicated
    devices = mesh.devices.size
    chunk = -(-args.batch_size // devices) * devices
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    validator = validation.Validator(vset, graphdef, mesh, args.val_bins, chunk)
    losses = validator.losses(nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), "val_loss")
    return {"set": vset.describe(), "bins": validation.bin_names(args.val_bins), **losses}
