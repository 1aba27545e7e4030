"""TLD / AT-1 PyTorch state_dicts ↔ this project's weights: names, layouts, model config."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from at1_jax.model import torch_pickle, weights
from at1_jax.model.denoiser import BLOCKS, DenoiserConfig
from at1_jax.model.presets import PRESETS

WRAPPER_KEYS = ("model_ema", "ema", "ema_model", "state_dict", "model", "module")
STRIP_PREFIXES = ("_orig_mod.", "module.")
DT = "denoiser_trans_block."
# Header metadata keys of an exported .safetensors: the DenoiserConfig and the model card
# (at1_jax.checkpointing.model_card) as JSON.
CONFIG_METADATA = "at1_jax.config"
CARD_METADATA = "at1_jax.model_card"
VARIANT_UNKNOWN = (
    "the block variant is not recorded in this file and the weights cannot tell (prenorm and "
    "legacy blocks have identical shapes; the wrong one gives wrong images, no error). Look at "
    "the DecoderBlock.forward of the code that trained it: `x = self.norm1(self.self_attention(x)"
    " + x)` is --variant legacy (the released TLD-101M and AT-1 weights, TLD before its prenorm "
    "change); `x = self.self_attention(self.norm1(x)) + x` is --variant prenorm (TLD's main "
    "branch). Files written by `python -m at1_jax.convert export` record it"
)


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


def name_map(depth: int) -> list[tuple[str, str, tuple]]:
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
    for i in range(depth):
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


def read_header(path: str, key: str) -> str | None:
    """A value of a .safetensors header's metadata (None for other files or without it)."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            return (f.metadata() or {}).get(key)
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from e


def read_recorded_config(path: str) -> DenoiserConfig | None:
    """The config that `export_checkpoint` recorded in a .safetensors header, if any."""
    raw = read_header(path, CONFIG_METADATA)
    if raw is None:
        return None
    source = f"{path} (metadata {CONFIG_METADATA!r})"
    try:
        return weights.config_from_dict(json.loads(raw), source)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not JSON ({e}); re-export the file") from None


def _shape(sd, name, source):
    if name not in sd:
        raise ValueError(f"{source}: missing {name}; is this a TLD / AT-1 denoiser checkpoint?")
    return sd[name].shape


def shape_fields(sd: dict[str, np.ndarray], source: str) -> dict[str, int]:
    """The config fields that the checkpoint's shapes determine (not block, heads, head_dim)."""
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
    return dict(
        latent_size=grid * patch,
        latent_channels=channels,
        patch_size=patch,
        width=width,
        depth=depth,
        noise_embed_dims=noise_dims,
        text_dim=text_dim,
        mlp_mult=hidden // width,
    )


def resolve_config(
    shapes: dict[str, int],
    source: str,
    variant: str | None = None,
    cross_heads: int | None = None,
    recorded: DenoiserConfig | None = None,
) -> DenoiserConfig:
    """The model config: `shape_fields`, and the rest as recorded in the file or given."""
    if recorded is not None:
        for flag, field, value in (
            ("--variant", "block", variant),
            ("--cross-heads", "cross_heads", cross_heads),
        ):
            if value is not None and value != getattr(recorded, field):
                raise ValueError(
                    f"{source}: {flag} {value} contradicts the file's recorded {field}="
                    f"{getattr(recorded, field)!r} (written by at1_jax.convert export); "
                    f"drop {flag}"
                )
        differ = [
            f"{k}: recorded {getattr(recorded, k)}, weights {v}"
            for k, v in shapes.items()
            if getattr(recorded, k) != v
        ]
        if differ:
            raise ValueError(
                f"{source}: the weights' shapes contradict the config recorded in the file "
                f"({'; '.join(differ)}): it was changed after export; export it again"
            )
        return recorded
    if variant is None:
        raise ValueError(f"{source}: {VARIANT_UNKNOWN}")
    if variant not in BLOCKS:
        raise ValueError(f"--variant must be one of {BLOCKS}, got {variant!r}")
    if cross_heads is None:
        cross_heads = 4 if variant == "legacy" else None
    try:
        return DenoiserConfig(**shapes, cross_heads=cross_heads, block=variant)
    except ValueError as e:
        raise ValueError(f"{source}: no model of this shape: {e}") from None


def preset_name(cfg: DenoiserConfig) -> str | None:
    """The preset whose architecture equals `cfg` (numerics such as dtype aside), if any."""
    return next((n for n, p in PRESETS.items() if p.architecture() == cfg.architecture()), None)


def check_names(sd: dict[str, np.ndarray], depth: int, source: str) -> None:
    """Raises a ValueError listing the missing and unexpected names of a `depth`-block model."""
    rows = name_map(depth)
    known = {t for t, _, _ in rows} | {DT + "precomputed_pos_enc"}
    missing = [t for t, _, _ in rows if t not in sd]
    unexpected = sorted(n for n in sd if n not in known)
    if missing or unexpected:
        raise ValueError(
            f"{source}: state_dict does not match a TLD/AT-1 denoiser of depth "
            f"{depth}:\n  missing: {missing}\n  unexpected: {unexpected}"
        )


def torch_to_arrays(sd: dict[str, np.ndarray], cfg: DenoiserConfig) -> dict[str, np.ndarray]:
    """This project's arrays (float32) from a state_dict whose names passed `check_names`."""
    return {
        j: np.asarray(to_jax(sd[t]), dtype=np.float32) for t, j, (to_jax, _) in name_map(cfg.depth)
    }


def arrays_to_torch(arrays: dict[str, np.ndarray], cfg: DenoiserConfig, dtype=np.float32):
    """A state_dict (NumPy) with the reference implementation's names and layouts."""
    sd = {
        t: np.ascontiguousarray(to_torch(arrays[j], cfg), dtype)
        for t, j, (_, to_torch) in name_map(cfg.depth)
    }
    sd["fourier_feats.0.angular_speeds"] = arrays["angular_speeds"].astype(np.float32)
    sd[DT + "precomputed_pos_enc"] = np.arange(cfg.num_tokens, dtype=np.int64)
    return sd


def import_checkpoint(path, out_dir, variant=None, key=None, cross_heads=None) -> DenoiserConfig:
    """Convert a PyTorch checkpoint into a weights folder; returns the model config."""
    path = str(path)
    sd = read_checkpoint(path, key)
    shapes = shape_fields(sd, path)
    check_names(sd, shapes["depth"], path)  # a foreign file is named so before the variant.
    cfg = resolve_config(shapes, path, variant, cross_heads, read_recorded_config(path))
    arrays = torch_to_arrays(sd, cfg)
    weights.check_arrays(cfg, arrays, path)
    weights.save(out_dir, cfg, arrays, meta={"source": path, "variant": cfg.block})
    return cfg


def export_checkpoint(
    weights_dir: str, out_path: str, dtype: str = "float32", header: dict[str, str] | None = None
) -> DenoiserConfig:
    """Write a weights folder as a PyTorch-named .safetensors that records the model config.

    `header`: more metadata entries for the file's header (e.g. the model card).
    """
    from safetensors.numpy import load_file, save_file

    if not out_path.endswith(".safetensors"):
        raise ValueError(
            f"{out_path}: export writes .safetensors (load with safetensors.torch.load_file)"
        )
    cfg = weights.load_config(weights_dir)
    params = os.path.join(weights_dir, weights.PARAMS_FILE)
    if not os.path.isfile(params):
        raise FileNotFoundError(f"{params} not found (an interrupted save leaves only .tmp)")
    arrays = load_file(params)
    weights.check_arrays(cfg, arrays, params)
    meta = {**(header or {}), "format": "pt", CONFIG_METADATA: json.dumps(dataclasses.asdict(cfg))}
    tmp = out_path + ".tmp"  # a failed write never leaves a partial file under the real name.
    try:
        save_file(arrays_to_torch(arrays, cfg, np.dtype(dtype)), tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return cfg
