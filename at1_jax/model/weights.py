"""This project's weight format: a folder with `config.json` and `params.safetensors`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from at1_jax.model.denoiser import Denoiser, DenoiserConfig

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
DATASET_FILE = "dataset.json"  # written by the trainer: text encoder, VAE, latent scale


def path_key(path: tuple) -> str:
    """('blocks', 0, 'mlp', 'fc1', 'kernel') → 'blocks/0/mlp/fc1/kernel'."""
    return "/".join(str(p) for p in path)


def model_arrays(model: Denoiser) -> dict[str, np.ndarray]:
    """Every weight and buffer of `model` as float32 NumPy, keyed by `path_key`."""
    return {
        path_key(path): np.asarray(var[...], dtype=np.float32)
        for path, var in nnx.to_flat_state(nnx.state(model))
    }


def _abstract(cfg: DenoiserConfig):
    model = nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0)))
    return model, nnx.to_flat_state(nnx.state(model))


def _check(flat, arrays: dict[str, np.ndarray], source: str) -> None:
    expected = {path_key(p): tuple(v.shape) for p, v in flat}
    problems = [f"missing {k} {shape}" for k, shape in expected.items() if k not in arrays]
    problems += [f"unexpected {k} {arrays[k].shape}" for k in arrays if k not in expected]
    problems += [
        f"shape of {k}: file has {arrays[k].shape}, model needs {shape}"
        for k, shape in expected.items()
        if k in arrays and arrays[k].shape != shape
    ]
    if problems:
        raise ValueError(
            f"{source}: weights do not fit the model config:\n  " + "\n  ".join(problems)
        )


def check_arrays(cfg: DenoiserConfig, arrays: dict[str, np.ndarray], source: str) -> None:
    """Raises a ValueError naming every missing, unexpected or mis-shaped entry of `arrays`."""
    _check(_abstract(cfg)[1], arrays, source)


def model_from_arrays(cfg: DenoiserConfig, arrays: dict[str, np.ndarray], source: str) -> Denoiser:
    """A `Denoiser` holding `arrays`; names every missing, unexpected or mis-shaped entry."""
    model, flat = _abstract(cfg)
    _check(flat, arrays, source)
    new = {path: var.replace(jnp.asarray(arrays[path_key(path)], var.dtype)) for path, var in flat}
    nnx.update(model, nnx.from_flat_state(new))
    return model


def save(directory: str, cfg: DenoiserConfig, arrays: dict[str, np.ndarray], meta=None) -> None:
    """Write the folder; the params file is written under a temporary name, then renamed."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=meta)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))


def load_config(directory: str) -> DenoiserConfig:
    """The `DenoiserConfig` stored in a weights folder."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not an at1-jax weights folder")
    with open(path) as f:
        return config_from_dict(json.load(f), path)


def config_from_dict(raw: dict, source: str) -> DenoiserConfig:
    """A `DenoiserConfig` from its JSON form (weights folder or checkpoint metadata)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: model config is not a JSON object")
    known = {f.name for f in dataclasses.fields(DenoiserConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model config fields {unknown}")
    try:
        return DenoiserConfig(**raw)
    except (TypeError, ValueError) as e:  # a string where a number belongs raises TypeError.
        raise ValueError(f"{source}: invalid model config: {e}") from None


def load(directory: str, **overrides) -> Denoiser:
    """The model stored in a weights folder; `overrides` change numerics (dtype, remat…)."""
    cfg = dataclasses.replace(load_config(directory), **overrides)
    path = os.path.join(directory, PARAMS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (an interrupted save leaves only .tmp)")
    return model_from_arrays(cfg, load_file(path), path)
