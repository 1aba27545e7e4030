"""TLD / AT-1 PyTorch state_dicts ↔ this project's weights: names, layouts, inferred config."""

from __future__ import annotations

import math
import re

import numpy as np

from at1_jax.model import torch_pickle, weights
from at1_jax.model.denoiser import BLOCKS, DenoiserConfig
from at1_jax.model.presets import PRESETS

WRAPPER_KEYS = ("model_ema", "ema", "ema_model", "state_dict", "model", "module")
STRIP_PREFIXES = ("_orig_mod.", "module.")
DT = "denoiser_trans_block."


# (to_jax, to_torch) pairs; `to_torch` gets the config for shapes that a flat kernel lost.
def _linear():
    return (lambda w: w.T, lambda k, cfg: k.T)


def _plain():
    return (lambda w: w, lambda k, cfg: k)


def _conv1x1():
    return (lambda w: w[:, :, 0, 0].T, lambda k, cfg: k.T[:, :, None, None])


def _patch_conv():
    def to_torch(k, cfg):
        p = cfg.patch_size
        return k.T.reshape(cfg.patch_dim, cfg.latent_channels, p, p)

    return (lambda w: w.reshape(w.shape[0], -1).T, to_torch)


def _depthwise():
    return (lambda w: w[:, 0].transpose(1, 2, 0), lambda k, cfg: k.transpose(2, 0, 1)[:, None])


def _dense(torch_name, jax_name):
    return [
        (f"{torch_name}.weight", f"{jax_name}/kernel", _linear()),
        (f"{torch_name}.bias", f"{jax_name}/bias", _plain()),
    ]


def _norm(torch_name, jax_name):
    return [
        (f"{torch_name}.weight", f"{jax_name}/scale", _plain()),
        (f"{torch_name}.bias", f"{jax_name}/bias", _plain()),
    ]


def name_map(cfg: DenoiserConfig) -> list[tuple[str, str, tuple]]:
    """(PyTorch name, this project's name, (to_jax, to_torch)) for every array."""
    pe = DT + "patchify_and_embed."
    rows = [("fourier_feats.0.angular_speeds", "angular_speeds", _plain())]
    rows += _dense("fourier_feats.1", "noise_fc1") + _dense("fourier_feats.3", "noise_fc2")
    rows += [
        (pe + "0.weight", "patch_conv/kernel", _patch_conv()),
        (pe + "0.bias", "patch_conv/bias", _plain()),
    ]
    rows += _norm(pe + "2", "patch_norm1") + _dense(pe + "3", "patch_proj")
    rows += _norm(pe + "4", "patch_norm2")
    rows += [(DT + "pos_embed.weight", "pos_embed", _plain())]
    for i in range(cfg.depth):
        t, j = f"{DT}decoder_blocks.{i}.", f"blocks/{i}/"
        rows += [
            (
                t + "self_attention.qkv_linear.weight",
                j + "self_attention/qkv_linear/kernel",
                _linear(),
            ),
            (
                t + "cross_attention.q_linear.weight",
                j + "cross_attention/q_linear/kernel",
                _linear(),
            ),
            (
                t + "cross_attention.kv_linear.weight",
                j + "cross_attention/kv_linear/kernel",
                _linear(),
            ),
            (t + "mlp.mlp.0.weight", j + "mlp/fc1/kernel", _conv1x1()),
            (t + "mlp.mlp.0.bias", j + "mlp/fc1/bias", _plain()),
            (t + "mlp.mlp.1.weight", j + "mlp/dw_kernel", _depthwise()),
            (t + "mlp.mlp.1.bias", j + "mlp/dw_bias", _plain()),
            (t + "mlp.mlp.3.weight", j + "mlp/fc2/kernel", _conv1x1()),
            (t + "mlp.mlp.3.bias", j + "mlp/fc2/bias", _plain()),
        ]
        for n in (1, 2, 3):
            rows += _norm(f"{t}norm{n}", f"{j}norm{n}")
    rows += _dense(DT + "out_proj.0", "out_proj") + _norm("norm", "cond_norm")
    rows += _dense("label_proj", "label_proj")
    return rows


def unwrap_state_dict(obj, source: str, key: str | None = None) -> dict[str, np.ndarray]:
    """The tensor dict inside a checkpoint (wrapped under e.g. 'model_ema'), prefixes stripped."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{source}: no key {key!r} at the top level (found {found})")
        obj = obj[key]
    elif isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
        else:
            raise ValueError(
                f"{source}: no state_dict found: top-level keys are {sorted(obj)}; "
                "pass --key NAME to pick the one holding the weights"
            )
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state_dict, found {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if isinstance(value, np.ndarray):
            out[name] = value
    return out


def read_checkpoint(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch state_dict from .pth/.pt/.bin (read without torch) or .safetensors."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return unwrap_state_dict(load_file(path), path, key)
        except SafetensorError as e:
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
    return unwrap_state_dict(torch_pickle.load(path), path, key)


def _shape(sd, name, source):
    if name not in sd:
        raise ValueError(f"{source}: missing {name}; is this a TLD / AT-1 denoiser checkpoint?")
    return sd[name].shape


def infer_config(
    sd: dict[str, np.ndarray], variant: str, source: str, cross_heads: int | None = None
) -> DenoiserConfig:
    """The model config that the checkpoint's shapes imply; the block variant is given."""
    if variant not in BLOCKS:
        raise ValueError(f"--variant must be one of {BLOCKS}, got {variant!r}")
    width, text_dim = _shape(sd, "label_proj.weight", source)
    noise_dims = _shape(sd, "fourier_feats.1.weight", source)[1]
    _, channels, patch, _ = _shape(sd, DT + "patchify_and_embed.0.weight", source)
    tokens = _shape(sd, DT + "pos_embed.weight", source)[0]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{source}: pos_embed has {tokens} rows, not a square token grid")
    depth = 1 + max(
        (
            int(m.group(1))
            for n in sd
            if (m := re.match(re.escape(DT) + r"decoder_blocks\.(\d+)\.", n))
        ),
        default=-1,
    )
    if depth == 0:
        raise ValueError(f"{source}: no {DT}decoder_blocks.* weights found")
    hidden = _shape(sd, DT + "decoder_blocks.0.mlp.mlp.0.weight", source)[0]
    if cross_heads is None:
        cross_heads = 4 if variant == "legacy" else None
    return DenoiserConfig(
        latent_size=grid * patch,
        latent_channels=channels,
        patch_size=patch,
        width=width,
        depth=depth,
        noise_embed_dims=noise_dims,
        text_dim=text_dim,
        mlp_mult=hidden // width,
        cross_heads=cross_heads,
        block=variant,
    )


def preset_name(cfg: DenoiserConfig) -> str | None:
    """The preset whose architecture equals `cfg` (numerics such as dtype aside), if any."""
    return next((n for n, p in PRESETS.items() if p.architecture() == cfg.architecture()), None)


def torch_to_arrays(sd: dict[str, np.ndarray], cfg: DenoiserConfig, source: str):
    """This project's arrays (float32) from a PyTorch state_dict; names what does not fit."""
    rows = name_map(cfg)
    known = {t for t, _, _ in rows} | {DT + "precomputed_pos_enc"}
    missing = [t for t, _, _ in rows if t not in sd]
    unexpected = sorted(n for n in sd if n not in known)
    if missing or unexpected:
        raise ValueError(
            f"{source}: state_dict does not match a {cfg.block} TLD/AT-1 denoiser of depth "
            f"{cfg.depth}:\n  missing: {missing}\n  unexpected: {unexpected}"
        )
    return {j: np.asarray(to_jax(sd[t]), dtype=np.float32) for t, j, (to_jax, _) in rows}


def arrays_to_torch(arrays: dict[str, np.ndarray], cfg: DenoiserConfig, dtype=np.float32):
    """A state_dict (NumPy) with the reference implementation's names and layouts."""
    sd = {
        t: np.ascontiguousarray(to_torch(arrays[j], cfg), dtype)
        for t, j, (_, to_torch) in name_map(cfg)
    }
    sd["fourier_feats.0.angular_speeds"] = arrays["angular_speeds"].astype(np.float32)
    sd[DT + "precomputed_pos_enc"] = np.arange(cfg.num_tokens, dtype=np.int64)
    return sd


def import_checkpoint(
    path, out_dir, variant="legacy", key=None, cross_heads=None
) -> DenoiserConfig:
    """Convert a PyTorch checkpoint into a weights folder; returns the inferred config."""
    sd = read_checkpoint(path, key)
    cfg = infer_config(sd, variant, path, cross_heads)
    arrays = torch_to_arrays(sd, cfg, path)
    weights.model_from_arrays(cfg, arrays, path)  # checks every shape against the model.
    weights.save(out_dir, cfg, arrays, meta={"source": str(path), "variant": variant})
    return cfg


def export_checkpoint(weights_dir: str, out_path: str, dtype: str = "float32") -> None:
    """Write a weights folder as a PyTorch-named state_dict in .safetensors."""
    from safetensors.numpy import load_file, save_file

    if not out_path.endswith(".safetensors"):
        raise ValueError(
            f"{out_path}: export writes .safetensors (load with safetensors.torch.load_file)"
        )
    cfg = weights.load_config(weights_dir)
    arrays = load_file(f"{weights_dir}/{weights.PARAMS_FILE}")
    weights.model_from_arrays(cfg, arrays, weights_dir)
    save_file(arrays_to_torch(arrays, cfg, np.dtype(dtype)), out_path)
